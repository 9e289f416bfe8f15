"""BERT-uncased WordPiece tokenizer (the `tokenizers` library) with fixed length.

`encode` gives `[CLS] tokens [SEP]` padded with 0 to exactly `max_len` ids, and says
whether the expression had to be truncated (the pipeline counts and logs those).
Truncation keeps the first `max_len - 2` word pieces and the final [SEP], as
HuggingFace's BertTokenizer does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from data_pipelines.contract import PAD_ID
from data_pipelines.errors import DataError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def read_vocab(path: str | os.PathLike) -> list[str]:
  """Reads a BERT `vocab.txt` (one token per line, line number = id)."""
  if not os.path.isfile(path):
    raise DataError(
        f"vocab file not found: {os.fspath(path)!r}. Real datasets need the "
        "BERT-uncased `vocab.txt` that ViLT uses: converted ViLT checkpoints "
        "include one (pass its path), or download `vocab.txt` of "
        "bert-base-uncased from the HuggingFace hub.")
  with open(path, encoding="utf-8") as f:
    return [line.rstrip("\r\n") for line in f]


class Tokenizer:
  """Fixed-length BERT WordPiece encoder; picklable (built lazily per process)."""

  def __init__(self, vocab: str | os.PathLike | Sequence[str], max_len: int,
               lowercase: bool = True):
    if max_len < 2:
      raise ValueError(f"max_len must be >= 2 ([CLS] and [SEP]), got {max_len}")
    tokens = read_vocab(vocab) if isinstance(vocab, (str, os.PathLike)) else list(vocab)
    missing = [t for t in SPECIAL_TOKENS[:4] if t not in tokens]
    if missing:
      raise DataError(f"vocab lacks the special tokens {missing}; not a BERT vocab")
    if tokens[PAD_ID] != "[PAD]":
      raise DataError(f"vocab must have [PAD] at id {PAD_ID}, found {tokens[PAD_ID]!r}")
    self.tokens = tokens
    self.max_len = max_len
    self.lowercase = lowercase
    self.cls_id = tokens.index("[CLS]")
    self.sep_id = tokens.index("[SEP]")
    self.unk_id = tokens.index("[UNK]")
    self._tok = None

  @property
  def vocab_size(self) -> int:
    return len(self.tokens)

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_tok"] = None
    return state

  def _backend(self):
    if self._tok is None:
      from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers
      vocab = {t: i for i, t in enumerate(self.tokens)}
      tok = HFTokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]",
                                         max_input_chars_per_word=100))
      tok.normalizer = normalizers.BertNormalizer(
          clean_text=True, handle_chinese_chars=True, strip_accents=None,
          lowercase=self.lowercase)
      tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
      tok.decoder = decoders.WordPiece(prefix="##")
      self._tok = tok
    return self._tok

  def wordpiece_ids(self, text: str) -> list[int]:
    """Word-piece ids of `text` without special tokens or length limit."""
    return self._backend().encode(text, add_special_tokens=False).ids

  def encode(self, text: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """Returns (ids [L] int32, mask [L] bool, truncated)."""
    pieces = self.wordpiece_ids(text)
    room = self.max_len - 2
    truncated = len(pieces) > room
    ids = [self.cls_id] + pieces[:room] + [self.sep_id]
    out = np.full((self.max_len,), PAD_ID, np.int32)  # [L]
    out[:len(ids)] = ids
    mask = np.zeros((self.max_len,), np.bool_)  # [L]
    mask[:len(ids)] = True
    return out, mask, truncated

  def decode(self, ids: Sequence[int]) -> str:
    """Text of ids, dropping special and padding tokens (for debugging)."""
    keep = [int(i) for i in ids if int(i) not in (PAD_ID, self.cls_id, self.sep_id)]
    return self._backend().decode(keep)


def for_dataset(dataset: str, tokenizer_path: str | os.PathLike | None,
                max_len: int) -> Tokenizer:
  """`tokenizer_path` (a BERT vocab.txt) if given; the synthetic vocab for synthetic."""
  if tokenizer_path:
    return Tokenizer(tokenizer_path, max_len)
  if dataset == "synthetic" or dataset.startswith("synthetic/"):
    from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top
    return Tokenizer(synthetic.vocab(), max_len)
  raise DataError(
      f"dataset {dataset!r} needs a BERT-uncased vocab.txt: set data.vocab_path, or "
      "train.init_from to a `scanformer convert-vilt` output (its vocab.txt is used)")
