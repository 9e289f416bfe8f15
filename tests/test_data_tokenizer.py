"""WordPiece tokenizer: BERT-compatible ids, [CLS]/[SEP], padding, counted truncation."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from data_pipelines import synthetic
from data_pipelines.errors import DataError
from data_pipelines.tokenizer import Tokenizer

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "man", "on", "left",
         "right", "##s", "dog", "play", "##ing", ",", ".", "cafe", "red"]


@pytest.fixture
def vocab_file(tmp_path):
  p = tmp_path / "vocab.txt"
  p.write_text("\n".join(VOCAB) + "\n")
  return p


def test_encode_layout(vocab_file):
  tok = Tokenizer(vocab_file, max_len=10)
  ids, mask, truncated = tok.encode("The dogs, playing  LEFT.")
  want = [2, 5, 11, 10, 14, 12, 13, 8, 15, 3]
  assert ids.dtype == np.int32 and mask.dtype == np.bool_ and ids.shape == (10,)
  assert ids.tolist() == want and mask.all() and not truncated
  ids, mask, truncated = tok.encode("man")
  assert ids.tolist() == [2, 6, 3] + [0] * 7
  assert mask.tolist() == [True] * 3 + [False] * 7
  assert tok.encode("zebra café")[0][:4].tolist() == [2, 1, 16, 3]  # unk; accent stripped


def test_truncation_is_flagged_and_keeps_sep(vocab_file):
  tok = Tokenizer(vocab_file, max_len=5)
  ids, mask, truncated = tok.encode("the man on the left")
  assert truncated and ids.tolist() == [2, 5, 6, 7, 3] and mask.all()
  assert not tok.encode("the man on")[2]


def test_matches_huggingface_bert_tokenizer(vocab_file):
  transformers = pytest.importorskip("transformers")
  hf = transformers.BertTokenizer(str(vocab_file), do_lower_case=True)
  tok = Tokenizer(vocab_file, max_len=12)
  for text in ["The dogs, playing LEFT.", "red cafés on the right", "man man man man "
               "man man man man man man man man man", "Zebra!"]:
    want = hf(text, max_length=12, truncation=True, padding="max_length")
    ids, mask, _ = tok.encode(text)
    assert ids.tolist() == want["input_ids"], text
    assert mask.astype(int).tolist() == want["attention_mask"], text


def test_picklable_and_bad_vocab(vocab_file, tmp_path):
  tok = Tokenizer(vocab_file, max_len=8)
  tok.encode("man")
  tok2 = pickle.loads(pickle.dumps(tok))
  assert tok2.encode("the man")[0].tolist() == tok.encode("the man")[0].tolist()
  with pytest.raises(DataError, match="vocab file not found"):
    Tokenizer(tmp_path / "missing.txt", 8)
  with pytest.raises(DataError, match="special tokens"):
    Tokenizer(["a", "b"], 8)


def test_synthetic_vocab_covers_the_grammar():
  vocab = synthetic.vocab()
  assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  assert len(set(vocab)) == len(vocab) == synthetic.VOCAB_SIZE <= 512
  tok = Tokenizer(vocab, max_len=24)
  cfg = synthetic.SceneConfig(image_size=64)
  for i in range(30):
    for e in synthetic.make_scene(0, "train", i, cfg).expressions:
      ids, _, truncated = tok.encode(e.text)
      assert tok.unk_id not in ids.tolist() and not truncated, e.text
