"""Plain ViLT forward on ScanFormer's parameter tree, and loading converted weights.

`vilt_forward` reproduces Hugging Face `transformers.ViltModel` (text tokens, image
[CLS], patches with interpolated position embeddings, pixel mask, full attention,
final LayerNorm, pooler) with static shapes, so it can be jitted. It exists to prove
that a converted checkpoint is exactly ViLT: the parameter names are ScanFormer's
(`layers.py`), so the same tree initialises ScanFormer (`init_scanformer_from_vilt`).

Token order: text, image [CLS], the valid patches row-major, then the padding patches
(masked out as keys). HF puts its padding patches at random at the end; a sample's
padding positions carry no meaning in either.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Mapping, Union

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from scanformer_jax import config_io
from scanformer_jax.config import ModelConfig
from scanformer_jax.layers import (NEG_INF, EncoderLayer, PatchEmbed, TextEmbeddings, dense,
                                   embed, final_norm, patchify)
from scanformer_jax.model import BACKBONE

# A converted ViLT tree is ScanFormer's `params["backbone"]` (copied by `init_from`),
# plus these entries, present in converted checkpoints and unused by ScanFormer:
VILT_ONLY_GROUPS = ("cls_token", "pooler")
# ModelConfig fields that fix the backbone's parameter shapes and numerics.
BACKBONE_FIELDS = ("vocab_size", "max_text_len", "type_vocab_size", "hidden_size", "num_layers",
                   "num_heads", "mlp_dim", "layer_norm_eps", "patch_size", "pos_grid_size")
PARAMS_SUBDIR = "params"
CONFIG_FILE = "config.json"


# ----------------------------------------------------------------------------- image side


def nearest_indices(out_size: int, in_size: int) -> np.ndarray:
  """Source indices of torch `interpolate(mode="nearest")` from in_size to out_size."""
  if out_size == in_size:
    return np.arange(out_size)
  scale = np.float32(in_size) / np.float32(out_size)  # float32, as torch computes it
  src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(src, in_size - 1)


def patch_mask(pixel_mask: jax.Array, grid_h: int, grid_w: int) -> jax.Array:
  """[B, H, W] pixel mask -> [B, gh, gw] int32 patch mask (HF: nearest resize, .long())."""
  _, h, w = pixel_mask.shape
  rows = nearest_indices(grid_h, h)
  cols = nearest_indices(grid_w, w)
  return pixel_mask[:, rows][:, :, cols].astype(jnp.float32).astype(jnp.int32)


def align_corners_weights(valid: jax.Array, out_size: int, in_size: int) -> jax.Array:
  """Per-sample 1-D linear interpolation weights, align_corners=True, zero-padded.

  valid: [B] int, the number of output positions resized to (the rest are padding).
  Returns [B, out_size, in_size]; row i < valid[b] resizes in_size -> valid[b].
  Traced `valid`, so this is the jit-able twin of `layers.interpolation_matrix`.
  """
  idx = jnp.arange(out_size, dtype=jnp.float32)  # [out]
  denom = jnp.maximum(valid - 1, 1).astype(jnp.float32)
  scale = jnp.where(valid > 1, jnp.float32(in_size - 1) / denom, 0.0)  # [B]
  coord = idx[None, :] * scale[:, None]  # [B, out]
  lower = jnp.clip(jnp.floor(coord), 0, in_size - 1).astype(jnp.int32)
  upper = jnp.minimum(lower + 1, in_size - 1)
  frac = (coord - lower)[..., None]
  weights = ((1.0 - frac) * jax.nn.one_hot(lower, in_size, dtype=jnp.float32)
             + frac * jax.nn.one_hot(upper, in_size, dtype=jnp.float32))  # [B, out, in]
  inside = idx[None, :] < valid[:, None]
  return jnp.where(inside[..., None], weights, 0.0)


def image_positions(pos_grid: jax.Array, mask: jax.Array) -> jax.Array:
  """Position embeddings of every patch: the grid resized to each sample's valid box.

  pos_grid: [g, g, D]; mask: [B, gh, gw] int. As HF, the valid box is (rows valid in
  column 0) x (columns valid in row 0); patches outside it get zero position.
  Returns [B, gh, gw, D].
  """
  _, gh, gw = mask.shape
  g = pos_grid.shape[0]
  valid_h = jnp.minimum(mask[:, :, 0].sum(axis=1), gh)  # [B]
  valid_w = jnp.minimum(mask[:, 0, :].sum(axis=1), gw)  # [B]
  rows = align_corners_weights(valid_h, gh, g)  # [B, gh, g]
  cols = align_corners_weights(valid_w, gw, g)  # [B, gw, g]
  hp = jax.lax.Precision.HIGHEST
  x = jnp.einsum("bhi,ijd->bhjd", rows, pos_grid.astype(jnp.float32), precision=hp)
  return jnp.einsum("bhjd,bwj->bhwd", x, cols, precision=hp)


def valid_first_order(valid: jax.Array) -> jax.Array:
  """[B, N] bool -> [B, N] permutation: valid indices row-major, then the others."""
  return jnp.argsort(jnp.where(valid, 0, 1), axis=1, stable=True)


def image_token_mask(pixel_mask: jax.Array, patch_size: int) -> jax.Array:
  """[B, H, W] -> [B, 1 + gh*gw] bool: which image tokens ([CLS] first) are real."""
  _, h, w = pixel_mask.shape
  mask = patch_mask(pixel_mask, h // patch_size, w // patch_size)
  valid = mask.reshape(mask.shape[0], -1) != 0
  valid = jnp.take_along_axis(valid, valid_first_order(valid), axis=1)
  return jnp.concatenate([jnp.ones_like(valid[:, :1]), valid], axis=1)


# ----------------------------------------------------------------------------- module


class Pooler(nn.Module):
  """tanh(Dense(first token)), as ViLT/BERT."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.tanh(dense(self.cfg, self.cfg.hidden_size, "dense")(x[:, 0]))  # [B, D]


class Vilt(nn.Module):
  """ViLT backbone with ScanFormer's top-level parameter names."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids, image, pixel_mask):
    """input_ids/attention_mask/token_type_ids [B, L]; image [B, H, W, 3] (NHWC).

    Returns (last_hidden_state [B, L + 1 + gh*gw, D], pooled [B, D]).
    """
    cfg = self.cfg
    b = input_ids.shape[0]
    modality = embed(cfg, 2, "modality_embed")  # 0 = text, 1 = image
    text = TextEmbeddings(cfg, name="text_embed")(input_ids, token_type_ids)  # [B, L, D]
    text = text + modality(jnp.zeros((b, 1), jnp.int32))
    img, img_valid = self.image_tokens(image, pixel_mask)  # [B, 1+N, D]
    img = img + modality(jnp.ones((b, 1), jnp.int32))
    x = jnp.concatenate([text, img.astype(text.dtype)], axis=1)  # [B, T, D]
    valid = jnp.concatenate([attention_mask != 0, img_valid], axis=1)  # [B, T]
    bias = jnp.where(valid, 0.0, NEG_INF).astype(jnp.float32)[:, None, None, :]
    for i in range(cfg.num_layers):
      x, _ = EncoderLayer(cfg, name=f"layers_{i}")(x, bias)
    x = final_norm(cfg)(x)
    return x, Pooler(cfg, name="pooler")(x)

  def image_tokens(self, image: jax.Array, pixel_mask: jax.Array):
    """image [B, H, W, 3], pixel_mask [B, H, W] -> ([B, 1+N, D], valid [B, 1+N])."""
    cfg = self.cfg
    p, g, d = cfg.patch_size, cfg.pos_grid_size, cfg.hidden_size
    b, h, w, _ = image.shape
    gh, gw = h // p, w // p
    init = nn.initializers.normal(cfg.initializer_range)
    pos_embed = self.param("pos_embed", init, (1 + g * g, d), jnp.float32)  # [CLS] + grid
    cls_token = self.param("cls_token", nn.initializers.zeros, (d,), jnp.float32)
    x = PatchEmbed(cfg, name="patch_embed")(patchify(image[:, :gh * p, :gw * p], p))  # [B, N, D]
    mask = patch_mask(pixel_mask, gh, gw)  # [B, gh, gw]
    pos = image_positions(pos_embed[1:].reshape(g, g, d), mask)  # [B, gh, gw, D]
    x = x + pos.reshape(b, gh * gw, d).astype(x.dtype)
    valid = mask.reshape(b, gh * gw) != 0
    order = valid_first_order(valid)
    x = jnp.take_along_axis(x, order[..., None], axis=1)
    valid = jnp.take_along_axis(valid, order, axis=1)
    cls = (cls_token + pos_embed[0]).astype(x.dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)  # [B, 1+N, D]
    valid = jnp.concatenate([jnp.ones((b, 1), bool), valid], axis=1)
    return x, valid


# ----------------------------------------------------------------------------- forward


def unwrap(params: Mapping[str, Any]) -> Mapping[str, Any]:
  """Accept both `{'params': tree}` (flax variables) and the bare tree."""
  if set(params.keys()) == {"params"}:
    return params["params"]
  return params


@functools.partial(jax.jit, static_argnums=1)
def _forward(params, cfg, input_ids, attention_mask, token_type_ids, image, pixel_mask):
  return Vilt(cfg).apply({"params": params}, input_ids, attention_mask, token_type_ids, image,
                         pixel_mask)


def vilt_forward(params: Mapping[str, Any], cfg: ModelConfig, input_ids,
                 attention_mask=None, token_type_ids=None, pixel_values=None,
                 pixel_mask=None) -> tuple[jax.Array, jax.Array]:
  """ViLT on HF-style inputs; jitted (one compile per cfg and input shapes).

  input_ids, attention_mask, token_type_ids: [B, L] (masks/types default to 1/0);
  pixel_values [B, 3, H, W] as `ViltModel` takes them (H, W beyond a multiple of the
  patch are dropped, as its conv does); pixel_mask [B, H, W] (default all ones).
  Returns (last_hidden_state [B, L + 1 + (H//p)*(W//p), D], pooled [B, D]).
  Padding image tokens (see `image_token_mask`) come last in the image part.
  """
  input_ids = jnp.asarray(input_ids, jnp.int32)
  chex.assert_rank(input_ids, 2)
  b, length = input_ids.shape
  attention_mask = (jnp.ones((b, length), jnp.int32) if attention_mask is None
                    else jnp.asarray(attention_mask))
  token_type_ids = (jnp.zeros((b, length), jnp.int32) if token_type_ids is None
                    else jnp.asarray(token_type_ids, jnp.int32))
  pixel_values = jnp.asarray(pixel_values)
  chex.assert_shape(pixel_values, (b, 3, None, None))
  h, w = pixel_values.shape[2:]
  pixel_mask = (jnp.ones((b, h, w), jnp.int32) if pixel_mask is None else jnp.asarray(pixel_mask))
  chex.assert_shape([attention_mask, token_type_ids], (b, length))
  chex.assert_shape(pixel_mask, (b, h, w))
  if h < cfg.patch_size or w < cfg.patch_size:
    raise ValueError(f"image {h}x{w} is smaller than one patch ({cfg.patch_size})")
  image = jnp.transpose(pixel_values, (0, 2, 3, 1))  # [B, H, W, 3]
  return _forward(unwrap(params), cfg, input_ids, attention_mask, token_type_ids, image,
                  pixel_mask)


@functools.partial(jax.jit, static_argnums=0)
def _init(cfg: ModelConfig, rng: jax.Array) -> dict:
  """Random ViLT parameters (the tree `convert-vilt` writes)."""
  p = cfg.patch_size
  ids = jnp.zeros((1, 1), jnp.int32)
  image = jnp.zeros((1, p, p, 3), jnp.float32)
  return Vilt(cfg).init(rng, ids, ids, ids, image, jnp.ones((1, p, p), jnp.int32))["params"]


def param_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flat {path: shape} of the ViLT tree for cfg, without allocating it."""
  tree = jax.eval_shape(functools.partial(_init, cfg), jax.random.key(0))
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}


# ----------------------------------------------------------------------------- files


def save(directory: Union[str, os.PathLike], params: Mapping[str, Any], cfg: ModelConfig,
         force: bool = False) -> None:
  """Write DIR/params (orbax) and DIR/config.json (ModelConfig fields)."""
  import orbax.checkpoint as ocp  # heavy; only when writing

  directory = os.path.abspath(os.fspath(directory))
  os.makedirs(directory, exist_ok=True)
  tree = jax.tree.map(np.asarray, dict(unwrap(params)))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, PARAMS_SUBDIR), tree, force=force)
    ckptr.wait_until_finished()
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(config_io.model_config_to_dict(cfg), f, indent=2, sort_keys=True)
    f.write("\n")


def load(directory: Union[str, os.PathLike]) -> tuple[dict, ModelConfig]:
  """Read what `scanformer convert-vilt` wrote: (params tree of host numpy arrays, cfg)."""
  import orbax.checkpoint as ocp

  directory = os.path.abspath(os.fspath(directory))
  config_path = os.path.join(directory, CONFIG_FILE)
  params_path = os.path.join(directory, PARAMS_SUBDIR)
  if not (os.path.isfile(config_path) and os.path.isdir(params_path)):
    raise FileNotFoundError(
        f"{directory} is not a converted ViLT directory (needs {CONFIG_FILE} and "
        f"{PARAMS_SUBDIR}/); create one with `scanformer convert-vilt --src ... --out DIR`")
  with open(config_path) as f:
    cfg = config_io.model_config_from_dict(json.load(f), config_path)
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(params_path)
  return jax.tree.map(np.asarray, params), cfg


# ----------------------------------------------------------------------------- init_from


def backbone_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
  """Backbone fields on which two configs disagree, as 'field: a != b'."""
  return [f"{name}: {getattr(a, name)!r} != {getattr(b, name)!r}" for name in BACKBONE_FIELDS
          if getattr(a, name) != getattr(b, name)]


def _count(arrays) -> int:
  return int(sum(np.prod(np.shape(x)) for x in arrays))


def init_scanformer_from_vilt(
    scanformer_params: Mapping[str, Any],
    converted: Union[str, os.PathLike, Mapping[str, Any], tuple],
    cfg: ModelConfig,
    reg_from_cls: bool = False,
) -> tuple[dict, str]:
  """Copy converted ViLT weights into freshly initialised ScanFormer params, by name.

  scanformer_params: ScanFormer's params (bare tree or `{'params': tree}`);
  converted: a `convert-vilt` output directory, a `(params, cfg)` pair, or a bare
  ViLT params tree (then only shapes are checked); cfg: the training ModelConfig.
  Every tensor under `params["backbone"]` is copied; the others keep their init, except that `reg_from_cls` (`train.init_reg_from_vilt_cls`)
  starts every REG_s from ViLT's pretrained image [CLS] token: REG_s enters the encoder
  where ViLT's [CLS] does (its position and modality embeddings), so each scale's REG
  begins as the token ViLT pretrained to summarise an image with its text.
  Raises ValueError when the backbones differ, a tensor is missing or has another shape.
  Returns (params in the input's structure and array kind, human summary).
  """
  source = "params"
  vilt_cfg = None
  if isinstance(converted, (str, os.PathLike)):
    source = os.fspath(converted)
    try:
      vilt_params, vilt_cfg = load(converted)
    except FileNotFoundError as e:
      raise ValueError(str(e)) from None
  elif isinstance(converted, tuple):
    vilt_params, vilt_cfg = converted
  else:
    vilt_params = converted
  if vilt_cfg is not None:
    diffs = backbone_differences(vilt_cfg, cfg)
    if diffs:
      raise ValueError(f"init_from {source}: the converted ViLT backbone differs from the "
                       f"training ModelConfig ({'; '.join(diffs)}); set these fields to the "
                       "converted values")
  wrapped = set(scanformer_params.keys()) == {"params"}
  target = traverse_util.flatten_dict(dict(unwrap(scanformer_params)))
  vilt_flat = traverse_util.flatten_dict(dict(unwrap(vilt_params)))
  out, copied, fresh, errors = {}, [], set(), []
  for path, value in target.items():
    if path[0] != BACKBONE:
      out[path] = value
      fresh.add(path[0])
      continue
    vilt_path = path[1:]  # params["backbone"] is the converted ViLT tree.
    name = "/".join(vilt_path)
    if vilt_path not in vilt_flat:
      errors.append(f"missing in the converted ViLT: {name} {tuple(np.shape(value))}")
      continue
    src = vilt_flat[vilt_path]
    if np.shape(src) != np.shape(value):
      hint = ""
      if vilt_path[0] == "pos_embed":
        hint = " (ViLT position grid: pos_grid_size must match the checkpoint)"
      elif vilt_path[:2] == ("text_embed", "position"):
        hint = " (text positions: max_text_len must match the checkpoint)"
      errors.append(f"shape mismatch for {name}: ScanFormer {tuple(np.shape(value))} vs "
                    f"ViLT {tuple(np.shape(src))}{hint}")
      continue
    # Host arrays stay on the host (the trainer passes fetched params), others on device.
    as_array = np.asarray if isinstance(value, np.ndarray) else jnp.asarray
    out[path] = as_array(src, dtype=value.dtype)
    copied.append(path)
  if reg_from_cls:
    if ("cls_token",) not in vilt_flat or ("reg_tokens",) not in out:
      errors.append("init_reg_from_vilt_cls needs cls_token in the converted ViLT and "
                    "reg_tokens in ScanFormer")
    else:
      reg = out[("reg_tokens",)]  # [S, D]
      cls = np.asarray(vilt_flat[("cls_token",)]).reshape(1, -1)  # [1, D]
      if cls.shape[1] != np.shape(reg)[1]:
        errors.append(f"shape mismatch for cls_token -> reg_tokens: {cls.shape} vs "
                      f"{tuple(np.shape(reg))}")
      else:
        as_array = np.asarray if isinstance(reg, np.ndarray) else jnp.asarray
        out[("reg_tokens",)] = as_array(np.broadcast_to(cls, np.shape(reg)), dtype=reg.dtype)
        copied.append(("reg_tokens",))
        fresh.discard("reg_tokens")
  if errors:
    raise ValueError(f"init_from {source}: cannot load ViLT weights: " + "; ".join(errors))
  used = {p[1] for p in target if p[0] == BACKBONE} | ({"cls_token"} if reg_from_cls else set())
  unused = sorted({p[0] for p in vilt_flat} - used)
  groups = sorted({p[1] if p[0] == BACKBONE else p[0] for p in copied},
                  key=lambda n: (n.startswith("layers_"), n))
  layers = [g for g in groups if g.startswith("layers_")]
  shown = [g for g in groups if not g.startswith("layers_")]
  if layers:
    shown.append(f"layers_0..{len(layers) - 1}")
  summary = (
      f"init_from {source}: copied {len(copied)} ViLT tensors "
      f"({_count(out[p] for p in copied):,} values: {', '.join(shown)}); "
      f"initialised fresh: {', '.join(sorted(fresh)) or 'nothing'} "
      f"({_count(target[p] for p in target if p[0] in fresh):,} values); "
      f"unused from ViLT: {', '.join(unused) or 'nothing'}")
  tree = traverse_util.unflatten_dict(out)
  return ({"params": tree} if wrapped else tree), summary
