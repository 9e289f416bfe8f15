"""`scanformer convert-vilt`: import pretrained ViLT weights into ScanFormer's layout.

Sources: a Hugging Face ViLT directory (config.json + model.safetensors or
pytorch_model.bin, vocab.txt when present), from `ViltModel` or a task model such
as `ViltForMaskedLM` (`dandelin/vilt-b32-mlm`); or the original ViLT Lightning
`.ckpt` (dandelin/ViLT, fused qkv), whose config is read off the tensor shapes.
Output DIR: params/ (orbax), config.json (ModelConfig fields), vocab.txt.
Read back with `scanformer_jax.vilt.load(DIR)`.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import shutil
from typing import Any, Callable, Optional

import numpy as np
from flax import traverse_util

from scanformer_jax import vilt
from scanformer_jax.config import ModelConfig
from scanformer_jax.errors import UserError
from scanformer_jax.weights_io import (WeightsError, read_safetensors, tensors_to_numpy,
                                       torch_load)

# HF buffers that may sit in older state dicts; not parameters.
BUFFERS = ("embeddings.text_embeddings.position_ids", "embeddings.text_embeddings.token_type_ids")
BACKBONE_PREFIXES = ("embeddings.", "encoder.", "layernorm.", "pooler.")


class ConversionError(UserError):
  """The source cannot be converted; the message says which tensor or field and why."""


# ----------------------------------------------------------------------------- reading


class Source:
  """What `--src` points at: format, weight file, optional config.json / vocab.txt."""

  def __init__(self, kind: str, weights: str, config: Optional[str], vocab: Optional[str]):
    self.kind, self.weights, self.config, self.vocab = kind, weights, config, vocab


def _existing(path: str) -> Optional[str]:
  return path if os.path.isfile(path) else None


def locate(src: str) -> Source:
  """Find the weight file, config and vocab of a HF directory or a single file."""
  if os.path.isdir(src):
    for name, kind in (("model.safetensors", "safetensors"),
                       ("model.safetensors.index.json", "safetensors"),
                       ("pytorch_model.bin", "torch")):
      if os.path.isfile(os.path.join(src, name)):
        config = _existing(os.path.join(src, "config.json"))
        if config is None:
          raise ConversionError(f"{src} has {name} but no config.json")
        vocab = _existing(os.path.join(src, "vocab.txt"))
        return Source(kind, os.path.join(src, name), config, vocab)
    raise ConversionError(f"{src} holds no model.safetensors or pytorch_model.bin (a Hugging "
                          "Face ViLT directory), and is not a .ckpt file")
  if not os.path.isfile(src):
    raise ConversionError(f"{src} does not exist")
  folder = os.path.dirname(os.path.abspath(src))
  kind = "safetensors" if src.endswith((".safetensors", ".index.json")) else "torch"
  return Source(kind, src, _existing(os.path.join(folder, "config.json")),
                _existing(os.path.join(folder, "vocab.txt")))


def read_weights(source: Source) -> tuple[dict[str, np.ndarray], dict]:
  """(state dict as numpy, Lightning hyper-parameters or {})."""
  try:
    if source.kind == "safetensors":
      return dict(read_safetensors(source.weights)), {}
    obj = torch_load(source.weights)
  except WeightsError as e:
    raise ConversionError(str(e)) from None
  hparams = {}
  if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
    hparams = obj.get("hyper_parameters") or {}
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise ConversionError(f"{source.weights} holds a {type(obj).__name__}, not a state dict")
  return tensors_to_numpy(obj), dict(hparams) if isinstance(hparams, dict) else {}


# ----------------------------------------------------------------------------- original ViLT


def is_original_layout(state: dict) -> bool:
  return any(k.startswith("transformer.blocks.") for k in state)


# dandelin/ViLT (timm ViT + BertEmbeddings) -> Hugging Face names (as HF's own converter).
_ORIGINAL_RENAMES = (
    (r"^text_embeddings\.", "embeddings.text_embeddings."),
    (r"^token_type_embeddings\.weight$", "embeddings.token_type_embeddings.weight"),
    (r"^transformer\.cls_token$", "embeddings.cls_token"),
    (r"^transformer\.pos_embed$", "embeddings.position_embeddings"),
    (r"^transformer\.patch_embed\.proj\.", "embeddings.patch_embeddings.projection."),
    (r"^transformer\.blocks\.(\d+)\.norm1\.", r"encoder.layer.\1.layernorm_before."),
    (r"^transformer\.blocks\.(\d+)\.norm2\.", r"encoder.layer.\1.layernorm_after."),
    (r"^transformer\.blocks\.(\d+)\.attn\.proj\.", r"encoder.layer.\1.attention.output.dense."),
    (r"^transformer\.blocks\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"^transformer\.blocks\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
    (r"^transformer\.norm\.", "layernorm."),
)
_QKV = re.compile(r"^transformer\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")


def original_to_hf(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Rename original ViLT keys to HF keys; split each fused qkv [3D, ...] in three.

  Keys it does not know (mlm_score, itm_score, mpp_score, transformer.head, ...) are
  kept under their own names, to be reported as skipped.
  """
  out = {}
  for key, value in state.items():
    fused = _QKV.match(key)
    if fused:
      layer, kind = fused.groups()
      if value.shape[0] % 3:
        raise ConversionError(f"{key} has shape {list(value.shape)}: not a fused q, k, v")
      for name, part in zip(("query", "key", "value"), np.split(value, 3, axis=0)):
        out[f"encoder.layer.{layer}.attention.attention.{name}.{kind}"] = part
      continue
    for pattern, repl in _ORIGINAL_RENAMES:
      new, n = re.subn(pattern, repl, key)
      if n:
        key = new
        break
    out[key] = value
  return out


def infer_hf_config(state: dict[str, np.ndarray], hparams: dict,
                    num_heads: Optional[int]) -> tuple[dict, list[str]]:
  """A HF-style config dict from tensor shapes (original .ckpt has no config.json)."""
  notes = []

  def shape(key):
    if key not in state:
      raise ConversionError(f"missing tensor {key} (original name inferred); is this a ViLT "
                            "checkpoint?")
    return state[key].shape

  vocab, hidden = shape("embeddings.text_embeddings.word_embeddings.weight")
  tokens = shape("embeddings.position_embeddings")[-2] - 1
  grid = math.isqrt(tokens)
  if grid * grid != tokens:
    raise ConversionError(f"transformer.pos_embed has {tokens} patch positions: not a square grid")
  patch = shape("embeddings.patch_embeddings.projection.weight")[-1]
  layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
  config = hparams.get("config", hparams) if isinstance(hparams, dict) else {}
  if num_heads is None and isinstance(config, dict) and config.get("num_heads"):
    num_heads = int(config["num_heads"])
    notes.append(f"num_heads {num_heads} from the checkpoint's hyper-parameters")
  if num_heads is None:
    num_heads = max(hidden // 64, 1)
    notes.append(f"num_heads not stored; assuming head dim 64 -> {num_heads} (use --num-heads)")
  notes.append("LayerNorm eps 1e-12, as the Hugging Face ViLT conversion")
  return dict(
      vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=num_heads,
      intermediate_size=shape("encoder.layer.0.intermediate.dense.weight")[0],
      max_position_embeddings=shape("embeddings.text_embeddings.position_embeddings.weight")[0],
      type_vocab_size=shape("embeddings.text_embeddings.token_type_embeddings.weight")[0],
      modality_type_vocab_size=shape("embeddings.token_type_embeddings.weight")[0],
      layer_norm_eps=1e-12, image_size=grid * patch, patch_size=patch, hidden_act="gelu",
      max_image_length=-1, initializer_range=0.02), notes


# ----------------------------------------------------------------------------- config


def _square(value: Any, name: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise ConversionError(f"config {name}={value}: only square values are supported")
    value = value[0]
  return int(value)


def config_from_hf(hf: dict) -> tuple[ModelConfig, list[str]]:
  """ModelConfig from a HF ViltConfig dict (backbone fields; ScanFormer defaults else)."""
  notes = []
  act = hf.get("hidden_act", "gelu")
  if act != "gelu":
    raise ConversionError(f"config hidden_act={act!r}: ScanFormer uses exact GELU ('gelu')")
  if hf.get("num_channels", 3) != 3:
    raise ConversionError(f"config num_channels={hf['num_channels']}: expected RGB (3)")
  if hf.get("modality_type_vocab_size", 2) != 2:
    raise ConversionError(
        f"config modality_type_vocab_size={hf['modality_type_vocab_size']}: ScanFormer has two "
        "modality rows (text, image); an NLVR2 model has three, use an MLM/ITM checkpoint")
  if hf.get("qkv_bias", True) is False:
    raise ConversionError("config qkv_bias=false: ScanFormer's attention has q, k, v biases")
  if int(hf.get("max_image_length", -1)) > 0:
    notes.append(f"max_image_length={hf['max_image_length']}: HF samples that many patches at "
                 "random; ScanFormer and vilt_forward use every patch")
  patch = _square(hf.get("patch_size", 32), "patch_size")
  image_size = _square(hf.get("image_size", 384), "image_size")
  layers = int(hf.get("num_hidden_layers", 12))
  try:
    cfg = ModelConfig(
        vocab_size=int(hf.get("vocab_size", 30522)),
        max_text_len=int(hf.get("max_position_embeddings", 40)),
        type_vocab_size=int(hf.get("type_vocab_size", 2)),
        hidden_size=int(hf.get("hidden_size", 768)),
        num_layers=layers,
        num_heads=int(hf.get("num_attention_heads", 12)),
        mlp_dim=int(hf.get("intermediate_size", 3072)),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        image_sizes=(128, 256, 512) if patch == 32 else (4 * patch, 8 * patch, 16 * patch),
        patch_size=patch,
        pos_grid_size=image_size // patch,
        encoder1_layers=max(layers // 2, 1),
        initializer_range=float(hf.get("initializer_range", 0.02)),
    )
  except ValueError as e:
    raise ConversionError(f"config does not make a valid ModelConfig: {e}") from None
  return cfg, notes


# ----------------------------------------------------------------------------- mapping


def _same(x):
  return x


def _linear(w):  # torch Linear [out, in] -> flax kernel [in, out]
  if w.ndim != 2:
    raise ValueError("expected a 2-D Linear weight")
  return w.T


def _conv(w):  # torch Conv2d [D, 3, p, p] (OIHW) -> [p, p, 3, D] (HWIO)
  if w.ndim != 4:
    raise ValueError("expected a 4-D Conv2d weight")
  return w.transpose(2, 3, 1, 0)


def _cls(w):  # [1, 1, D] -> [D]
  return w.reshape(-1)


def _pos(w):  # [1, 1 + N, D] -> [1 + N, D]
  return w.reshape(-1, w.shape[-1])


Table = dict[tuple[str, ...], tuple[str, Callable]]


def _dense(table: Table, path: tuple[str, ...], hf: str) -> None:
  table[path + ("kernel",)] = (hf + ".weight", _linear)
  table[path + ("bias",)] = (hf + ".bias", _same)


def _norm(table: Table, path: tuple[str, ...], hf: str) -> None:
  table[path + ("scale",)] = (hf + ".weight", _same)
  table[path + ("bias",)] = (hf + ".bias", _same)


def hf_table(num_layers: int) -> Table:
  """Our parameter path -> (HF key without the `vilt.` prefix, array transform)."""
  t: Table = {}
  te = "embeddings.text_embeddings"
  t[("text_embed", "word", "embedding")] = (f"{te}.word_embeddings.weight", _same)
  t[("text_embed", "position", "embedding")] = (f"{te}.position_embeddings.weight", _same)
  t[("text_embed", "token_type", "embedding")] = (f"{te}.token_type_embeddings.weight", _same)
  _norm(t, ("text_embed", "norm"), f"{te}.LayerNorm")
  t[("patch_embed", "kernel")] = ("embeddings.patch_embeddings.projection.weight", _conv)
  t[("patch_embed", "bias")] = ("embeddings.patch_embeddings.projection.bias", _same)
  t[("pos_embed",)] = ("embeddings.position_embeddings", _pos)
  t[("cls_token",)] = ("embeddings.cls_token", _cls)
  t[("modality_embed", "embedding")] = ("embeddings.token_type_embeddings.weight", _same)
  for i in range(num_layers):
    ours, hf = (f"layers_{i}",), f"encoder.layer.{i}"
    _norm(t, ours + ("norm_attn",), f"{hf}.layernorm_before")
    for name in ("query", "key", "value"):
      _dense(t, ours + ("attn", name), f"{hf}.attention.attention.{name}")
    _dense(t, ours + ("attn", "out"), f"{hf}.attention.output.dense")
    _norm(t, ours + ("norm_mlp",), f"{hf}.layernorm_after")
    _dense(t, ours + ("mlp", "fc1"), f"{hf}.intermediate.dense")
    _dense(t, ours + ("mlp", "fc2"), f"{hf}.output.dense")
  _norm(t, ("final_norm",), "layernorm")
  _dense(t, ("pooler", "dense"), "pooler.dense")
  return t


def strip_prefix(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Task models (ViltForMaskedLM, ...) keep the backbone under `vilt.`; drop it."""
  return {k[5:] if k.startswith("vilt.") else k: v for k, v in state.items()}


def hf_to_params(state: dict[str, np.ndarray], cfg: ModelConfig):
  """Map a HF ViLT state dict onto our tree; every tensor checked against cfg.

  Returns (params tree of float32 numpy, mapped [(hf key, our path)], skipped keys).
  Raises ConversionError naming every missing tensor and shape mismatch.
  """
  table = hf_table(cfg.num_layers)
  expected = vilt.param_shapes(cfg)
  assert set(table) == set(expected), sorted(set(table) ^ set(expected))
  flat, mapped, errors = {}, [], []
  for path, (key, fn) in table.items():
    want = expected[path]
    if key not in state:
      errors.append(f"missing tensor {key} (for {'/'.join(path)} {list(want)})")
      continue
    try:
      value = np.asarray(fn(state[key]), np.float32)
    except ValueError:
      value = None
    if value is None or value.shape != want:
      errors.append(f"shape mismatch: {key} is {list(state[key].shape)}, "
                    f"{'/'.join(path)} needs {list(want)} under this config")
      continue
    flat[path] = value
    mapped.append((key, path))
  used = {key for key, _ in mapped}
  skipped = sorted(k for k in state if k not in used)
  strays = [k for k in skipped if k.startswith(BACKBONE_PREFIXES) and k not in BUFFERS]
  if strays:
    errors.append("backbone tensors the config has no place for (config does not match the "
                  f"weights?): {', '.join(strays[:8])}{' ...' if len(strays) > 8 else ''}")
  if errors:
    raise ConversionError("cannot convert: " + "; ".join(errors)
                          + "; convert a ViLT checkpoint whose config.json matches its weights")
  return traverse_util.unflatten_dict(flat), mapped, skipped


# ----------------------------------------------------------------------------- report


def _layer_pattern(text: str) -> str:
  return re.sub(r"(layer\.|layers_)\d+", r"\1{i}", text)


def report(cfg: ModelConfig, mapped, skipped, notes) -> str:
  """Human summary: mapped (layer entries folded to {i}), skipped, fresh in ScanFormer."""
  lines, seen = [], []
  for key, path in mapped:
    line = f"  {_layer_pattern(key)} -> {_layer_pattern('/'.join(path))}"
    if line not in seen:
      seen.append(line)
  lines.append(f"mapped {len(mapped)} tensors ({{i}} = 0..{cfg.num_layers - 1}):")
  lines += seen
  if skipped:
    groups = collections.Counter(k.split(".")[0] for k in skipped)
    lines.append(f"skipped {len(skipped)} tensors not in the backbone "
                 f"({', '.join(f'{g}: {n}' for g, n in sorted(groups.items()))}):")
    lines += [f"  {k}" for k in skipped]
  else:
    lines.append("skipped nothing")
  lines.append("kept for vilt_forward, unused by ScanFormer: " + ", ".join(vilt.VILT_ONLY_GROUPS))
  lines.append("ScanFormer initialises fresh: reg_tokens, scale_embed, const_tokens, "
               "select_head, box_head and its exit heads (everything beside "
               "params['backbone'])")
  lines += [f"note: {n}" for n in notes]
  return "\n".join(lines)


# ----------------------------------------------------------------------------- convert


def convert(src: str, out: str, *, vocab: Optional[str] = None, num_heads: Optional[int] = None,
            force: bool = False) -> str:
  """Convert `src` into `out`; returns the report. Raises ConversionError."""
  source = locate(src)
  params_dir = os.path.join(out, vilt.PARAMS_SUBDIR)
  if os.path.exists(params_dir) and not force:
    raise ConversionError(f"{params_dir} exists; pass --force to overwrite")
  state, hparams = read_weights(source)
  notes = []
  if is_original_layout(state):
    fmt = "original ViLT checkpoint"
    state = original_to_hf(state)
    hf_config, notes = infer_hf_config(state, hparams, num_heads)
  else:
    fmt = f"Hugging Face {os.path.basename(source.weights)}"
    if source.config is None:
      raise ConversionError(f"{source.weights} uses Hugging Face names but has no config.json "
                            "next to it")
    with open(source.config) as f:
      hf_config = json.load(f)
  cfg, cfg_notes = config_from_hf(hf_config)
  params, mapped, skipped = hf_to_params(strip_prefix(state), cfg)
  vocab = vocab or source.vocab
  vilt.save(out, params, cfg, force=force)
  if vocab:
    shutil.copyfile(vocab, os.path.join(out, "vocab.txt"))
  else:
    notes.append("no vocab.txt found: ViLT uses bert-base-uncased's (pass --vocab)")
  head = (f"converted {src} ({fmt}) -> {out}\n"
          f"backbone: hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_heads} heads, "
          f"MLP {cfg.mlp_dim}, patch {cfg.patch_size}, position grid {cfg.pos_grid_size}x"
          f"{cfg.pos_grid_size}, text {cfg.max_text_len} tokens, vocab {cfg.vocab_size}")
  written = (f"wrote {params_dir} (orbax), {os.path.join(out, vilt.CONFIG_FILE)}"
             + (f", {os.path.join(out, 'vocab.txt')}" if vocab else ""))
  return "\n".join([head, report(cfg, mapped, skipped, notes + cfg_notes), written])
