"""vilt_forward against Hugging Face `transformers.ViltModel` (float32, CPU).

A small random ViLT with odd sizes (hidden 48, 3 heads, 2 layers, MLP 80, patch 8,
position grid 5x5, 16 text positions) is saved, converted with the CLI function and
compared on padded text, non-square images, several patch grids (smaller and larger
than the position grid, one row, sizes that are not multiples of the patch) and
pixel masks with a different valid box per sample. HF puts its (randomly sampled)
padding patches at the end and may permute patches; rows are matched through HF's
own `patch_index`, and padding patches are not compared.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import types

import jax
import numpy as np
import pytest
from flax import traverse_util

from scanformer_jax import convert_vilt, vilt
from scanformer_jax.cli import convert_vilt as convert_cmd
from scanformer_jax.config import ModelConfig
from scanformer_jax.layers import interpolation_matrix

TOL = 1e-4
L_TEXT = 7

# ----------------------------------------------------------------------------- no torch


def test_align_corners_weights_match_static_matrix():
  """The traced per-sample weights equal layers.interpolation_matrix (ScanFormer's)."""
  valid = np.array([1, 2, 3, 5, 7, 9])
  w = np.asarray(vilt.align_corners_weights(valid, 9, 5))
  for b, n in enumerate(valid):
    np.testing.assert_allclose(w[b, :n], interpolation_matrix(int(n), 5), atol=1e-6)
    assert not w[b, n:].any()


def test_nearest_indices_follow_torch_rule():
  assert list(vilt.nearest_indices(3, 24)) == [0, 8, 16]
  assert list(vilt.nearest_indices(6, 52)) == [0, 8, 17, 26, 34, 43]  # floor(i * 52/6)


def test_random_model_runs_and_masks_padding():
  cfg = ModelConfig(vocab_size=50, max_text_len=8, hidden_size=32, num_layers=1, num_heads=2,
                    mlp_dim=40, patch_size=8, pos_grid_size=3, image_sizes=(32, 64, 128),
                    encoder1_layers=1)
  rng = np.random.default_rng(0)
  params = traverse_util.unflatten_dict({  # random, without compiling init
      k: rng.normal(size=s).astype(np.float32) for k, s in vilt.param_shapes(cfg).items()})
  ids = np.array([[3, 4, 5], [6, 7, 0]])
  pixels = np.random.default_rng(0).normal(size=(2, 3, 16, 24)).astype(np.float32)
  mask = np.ones((2, 16, 24), np.int32)
  mask[1, 8:] = 0  # second image: top row of patches only
  hidden, pooled = vilt.vilt_forward({"params": params}, cfg, ids, None, None, pixels, mask)
  assert hidden.shape == (2, 3 + 1 + 6, 32) and pooled.shape == (2, 32)
  assert np.isfinite(np.asarray(hidden)).all()
  np.testing.assert_array_equal(vilt.image_token_mask(mask, 8)[1], [1, 1, 1, 1, 0, 0, 0])
  # Padding patches carry no information into real tokens.
  pixels2 = pixels.copy()
  pixels2[1, :, 8:] += 5.0
  hidden2, _ = vilt.vilt_forward(params, cfg, ids, None, None, pixels2, mask)
  np.testing.assert_allclose(np.asarray(hidden2)[1, :7], np.asarray(hidden)[1, :7], atol=1e-6)


# ----------------------------------------------------------------------------- HF parity

try:
  import torch
  import transformers
  _MISSING = None
except ImportError as e:  # pragma: no cover - CI installs both (make test)
  torch = transformers = None
  _MISSING = str(e)
needs_hf = pytest.mark.skipif(
    _MISSING is not None, reason=f"torch/transformers cannot be imported ({_MISSING})")


def _hf_model():
  config = transformers.ViltConfig(
      vocab_size=99, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
      intermediate_size=80, max_position_embeddings=16, image_size=40, patch_size=8)
  torch.manual_seed(0)
  model = transformers.ViltForMaskedLM(config).eval()
  with torch.no_grad():  # random everything (HF zero-inits cls and positions)
    for name, p in model.named_parameters():
      if "LayerNorm" in name or "layernorm" in name:
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.2 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  """(ViltForMaskedLM, its saved directory, our converted directory)."""
  model = _hf_model()
  root = tmp_path_factory.mktemp("vilt")
  src = root / "hf"
  model.save_pretrained(src)  # config.json + model.safetensors
  (src / "vocab.txt").write_text("\n".join(f"tok{i}" for i in range(99)) + "\n")
  out = root / "converted"
  assert convert_cmd.main(["--src", str(src), "--out", str(out)]) == 0
  return model, src, out


def _batch(rng, b, h, w, boxes=None):
  """HF-style inputs; boxes: per-sample valid (rows, cols) in pixels, or full."""
  ids = rng.integers(1, 99, size=(b, L_TEXT))
  attn = np.ones((b, L_TEXT), np.int64)
  attn[-1, 4:] = 0  # padded text
  types_ = rng.integers(0, 2, size=(b, L_TEXT))
  pixels = rng.normal(size=(b, 3, h, w)).astype(np.float32)
  mask = np.zeros((b, h, w), np.int64)
  for i, (vh, vw) in enumerate(boxes or [(h, w)] * b):
    mask[i, :vh, :vw] = 1
  return dict(input_ids=ids, attention_mask=attn, token_type_ids=types_, pixel_values=pixels,
              pixel_mask=mask)


BATCHES = {
    "grid3x5": ((2, 24, 40), None),  # smaller than the 5x5 position grid, non-square
    "grid6x8_masked": ((3, 48, 64), [(48, 64), (32, 40), (17, 30)]),  # upsampled, 3 boxes
    "not_multiple_masked": ((2, 52, 42), [(52, 42), (30, 25)]),  # crop + nearest on 52/6
    "one_row": ((1, 8, 64), None),
}


def _hf_outputs(vilt_model, batch, seed=0):
  """HF last_hidden_state, pooled, image token mask and patch_index (same RNG draws)."""
  t = {k: torch.from_numpy(v) for k, v in batch.items()}
  with torch.no_grad():
    torch.manual_seed(seed)
    out = vilt_model(**t)
    torch.manual_seed(seed)
    _, img_mask, (patch_index, _) = vilt_model.embeddings.visual_embed(
        t["pixel_values"], t["pixel_mask"], max_image_length=vilt_model.config.max_image_length)
  return (out.last_hidden_state.numpy(), out.pooler_output.numpy(), img_mask.numpy(),
          patch_index.numpy())


def _parity(vilt_model, params, cfg, batch, drop_full_mask=False):
  """Max abs differences (hidden over real tokens, pooled) between HF and ours."""
  hf_h, hf_pool, hf_mask, hf_index = _hf_outputs(vilt_model, batch)
  mask = None if drop_full_mask else batch["pixel_mask"]
  ours_h, ours_pool = vilt.vilt_forward(params, cfg, batch["input_ids"], batch["attention_mask"],
                                        batch["token_type_ids"], batch["pixel_values"], mask)
  ours_h = np.asarray(ours_h)
  ours_mask = np.asarray(vilt.image_token_mask(batch["pixel_mask"], cfg.patch_size))
  head = L_TEXT + 1  # text tokens + image [CLS]: same positions in both
  diff = np.abs(hf_h[:, :head] - ours_h[:, :head]).max()
  for b in range(hf_h.shape[0]):
    real = np.nonzero(hf_mask[b, 1:])[0]  # HF image positions (after [CLS]) that are real
    assert ours_mask[b, 1:].sum() == len(real), "different valid patch sets"
    rc = hf_index[b, real]
    real = real[np.lexsort((rc[:, 1], rc[:, 0]))]  # row-major, our order
    diff = max(diff, np.abs(hf_h[b, head + real] - ours_h[b, head:head + len(real)]).max())
  return float(diff), float(np.abs(hf_pool - np.asarray(ours_pool)).max())


@needs_hf
@pytest.mark.parametrize("name", list(BATCHES))
def test_parity_safetensors(hf, name):
  model, _, out = hf
  params, cfg = vilt.load(out)
  shape, boxes = BATCHES[name]
  batch = _batch(np.random.default_rng(1), *shape, boxes)
  hidden, pooled = _parity(model.vilt, params, cfg, batch, drop_full_mask=boxes is None)
  print(f"\n[{name}] max |diff| last_hidden_state {hidden:.2e}, pooled {pooled:.2e}")
  assert hidden <= TOL and pooled <= TOL


@needs_hf
def test_converted_directory(hf):
  _, src, out = hf
  params, cfg = vilt.load(out)
  assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.mlp_dim) == (48, 2, 3, 80)
  assert (cfg.patch_size, cfg.pos_grid_size, cfg.max_text_len, cfg.vocab_size) == (8, 5, 16, 99)
  assert cfg.image_sizes == (32, 64, 128) and cfg.encoder1_layers == 1
  assert cfg.layer_norm_eps == 1e-12
  assert (out / "vocab.txt").read_text() == (src / "vocab.txt").read_text()
  assert set(params) == set(vilt.VILT_ONLY_GROUPS) | {
      "text_embed", "patch_embed", "pos_embed", "modality_embed", "final_norm", "layers_0",
      "layers_1"}


def _assert_same_tree(a, b):
  fa, fb = (jax.tree_util.tree_flatten_with_path(t)[0] for t in (a, b))
  assert [p for p, _ in fa] == [p for p, _ in fb]
  for (path, x), (_, y) in zip(fa, fb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


@needs_hf
def test_pytorch_model_bin(hf, tmp_path):
  """pytorch_model.bin of a bare ViltModel (no `vilt.` prefix) converts identically."""
  model, src, out = hf
  src_bin = tmp_path / "hf_bin"
  src_bin.mkdir()
  shutil.copy(src / "config.json", src_bin / "config.json")
  torch.save(model.vilt.state_dict(), src_bin / "pytorch_model.bin")
  assert convert_cmd.main(["--src", str(src_bin), "--out", str(tmp_path / "c")]) == 0
  _assert_same_tree(vilt.load(tmp_path / "c")[0], vilt.load(out)[0])


def _original_state_dict(model) -> dict:
  """The dandelin/ViLT key layout (timm ViT, fused qkv), built from HF tensors."""
  sd = {k[len("vilt."):]: v for k, v in model.state_dict().items() if k.startswith("vilt.")}
  o = {}
  for k, v in sd.items():
    if k.startswith("embeddings.text_embeddings."):
      o["text_embeddings." + k[len("embeddings.text_embeddings."):]] = v
  o["text_embeddings.position_ids"] = torch.arange(16)[None]  # buffer in the original
  o["token_type_embeddings.weight"] = sd["embeddings.token_type_embeddings.weight"]
  o["transformer.cls_token"] = sd["embeddings.cls_token"]
  o["transformer.pos_embed"] = sd["embeddings.position_embeddings"]
  for s in ("weight", "bias"):
    o[f"transformer.patch_embed.proj.{s}"] = sd[f"embeddings.patch_embeddings.projection.{s}"]
    o[f"transformer.norm.{s}"] = sd[f"layernorm.{s}"]
    o[f"pooler.dense.{s}"] = sd[f"pooler.dense.{s}"]
    for i in range(2):
      hf_l, og = f"encoder.layer.{i}", f"transformer.blocks.{i}"
      o[f"{og}.norm1.{s}"] = sd[f"{hf_l}.layernorm_before.{s}"]
      o[f"{og}.attn.qkv.{s}"] = torch.cat(
          [sd[f"{hf_l}.attention.attention.{n}.{s}"] for n in ("query", "key", "value")])
      o[f"{og}.attn.proj.{s}"] = sd[f"{hf_l}.attention.output.dense.{s}"]
      o[f"{og}.norm2.{s}"] = sd[f"{hf_l}.layernorm_after.{s}"]
      o[f"{og}.mlp.fc1.{s}"] = sd[f"{hf_l}.intermediate.dense.{s}"]
      o[f"{og}.mlp.fc2.{s}"] = sd[f"{hf_l}.output.dense.{s}"]
  for k, v in model.state_dict().items():
    if k.startswith("mlm_score."):
      o[k] = v
  o["itm_score.fc.weight"] = torch.randn(2, 48)
  o["itm_score.fc.bias"] = torch.randn(2)
  return o


@needs_hf
def test_parity_original_ckpt(hf, tmp_path, monkeypatch, capsys):
  """Original ViLT .ckpt (Lightning: hyper-parameters in an AttributeDict)."""
  model, _, out = hf
  # A stand-in for pytorch_lightning's AttributeDict, so the pickle names that class.
  parsing = types.ModuleType("pytorch_lightning.utilities.parsing")

  class AttributeDict(dict):
    pass

  AttributeDict.__module__, AttributeDict.__qualname__ = parsing.__name__, "AttributeDict"
  parsing.AttributeDict = AttributeDict
  for name in ("pytorch_lightning", "pytorch_lightning.utilities"):
    monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
  monkeypatch.setitem(sys.modules, parsing.__name__, parsing)
  ckpt = tmp_path / "vilt_mlm_itm.ckpt"
  torch.save({"state_dict": _original_state_dict(model), "epoch": 3,
              "hyper_parameters": AttributeDict(config={"num_heads": 3, "max_text_len": 16})},
             ckpt)
  monkeypatch.delitem(sys.modules, parsing.__name__)  # the reader must not need it
  capsys.readouterr()
  assert convert_cmd.main(["--src", str(ckpt), "--out", str(tmp_path / "c")]) == 0
  printed = capsys.readouterr().out
  assert "original ViLT checkpoint" in printed and "num_heads 3 from" in printed
  assert "itm_score.fc.weight" in printed and "mlm_score" in printed
  params, cfg = vilt.load(tmp_path / "c")
  assert cfg == vilt.load(out)[1]
  _assert_same_tree(params, vilt.load(out)[0])
  shape, boxes = BATCHES["grid6x8_masked"]
  hidden, pooled = _parity(model.vilt, params, cfg, _batch(np.random.default_rng(2), *shape, boxes))
  print(f"\n[original .ckpt] max |diff| last_hidden_state {hidden:.2e}, pooled {pooled:.2e}")
  assert hidden <= TOL and pooled <= TOL


class Opaque:
  """Stands for any class a pickle would make torch.load import."""


@needs_hf
def test_untrusted_pickle_is_refused(tmp_path, capsys):
  ckpt = tmp_path / "odd.ckpt"
  torch.save({"state_dict": {}, "hyper_parameters": Opaque()}, ckpt)
  capsys.readouterr()
  assert convert_cmd.main(["--src", str(ckpt), "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err
  assert "weights_only=True" in err and "Opaque" in err and "Traceback" not in err


@needs_hf
def test_hf_default_config_is_vilt_b32():
  assert convert_vilt.config_from_hf(transformers.ViltConfig().to_dict())[0] == ModelConfig()


@needs_hf
def test_cli_report_lists_mapped_and_skipped(hf, tmp_path, capsys):
  _, src, _ = hf
  capsys.readouterr()
  assert convert_cmd.main(["--src", str(src), "--out", str(tmp_path / "c")]) == 0
  printed = capsys.readouterr().out
  assert "encoder.layer.{i}.attention.attention.query.weight -> layers_{i}/attn/query/kernel" \
      in printed
  assert "mlm_score" in printed and "skipped" in printed
  assert "ScanFormer initialises fresh: reg_tokens" in printed
  config = json.loads((tmp_path / "c" / "config.json").read_text())
  assert config["pos_grid_size"] == 5 and config["image_sizes"] == [32, 64, 128]
  assert os.path.isdir(tmp_path / "c" / "params")
