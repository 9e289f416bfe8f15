"""ScanFormer: a ViLT-style transformer that scans an image pyramid coarse to fine.

One forward pass (DESIGN.md section 2): the text runs through every layer first and
its keys/values start the KV cache. Then each scale s, coarse to fine, runs its
tokens `[REG_s | patches]` through the same layers, attending to the cache (text and
every earlier scale) and to itself; its keys/values are appended afterwards. After
Encoder1 a selection head decides which patches get their four children at s+1;
after Encoder2 a box head reads REG_s. A patch not taken is replaced by the learned
constant token C_s.

Two execution paths share the parameters:
  dense  (training, reference): every patch is a token; replacement is a 0/1 mask.
  sparse (inference): taken patches are gathered into `capacity[s]` static slots and
         all replaced patches collapse into ONE merged C_s token whose key carries
         the bias log(n): n identical keys weigh exp(q.k) * n = exp(q.k + log n),
         so this is exact, not an approximation.
The scale loop is unrolled in Python: every shape and cache offset is static.
"""

from __future__ import annotations

from typing import Optional

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from scanformer_jax import selection
from scanformer_jax.config import ModelConfig
from scanformer_jax.heads import BoxHead, IouHead, SelectionHead
from scanformer_jax.kv_cache import KVCache
from scanformer_jax.layers import (NEG_INF, EncoderLayer, PatchEmbed, TextEmbeddings, embed,
                                   interpolate_pos_grid, layer_norm, patchify,
                                   sincos_pos_grid)
from scanformer_jax.pyramid import build_pyramid

MODES = ("sparse", "dense")
TEXT_MODALITY, IMAGE_MODALITY = 0, 1


@flax.struct.dataclass
class ScanFormerOutput:
  boxes: jax.Array                         # [B, S, 4] normalized (cx, cy, w, h)
  selection_logits: tuple[jax.Array, ...]  # per scale [B, N_s] float32
  taken: tuple[jax.Array, ...]             # per scale [B, N_s]: bool; float 0/1 in dense+train
  num_dropped: jax.Array                   # [B, S] int32, wanted but over capacity
  reg_features: jax.Array                  # [B, S, D] float32, REG after the final LayerNorm
  pred_iou: Optional[jax.Array] = None     # [B, S] when cfg.iou_head


class ScanFormer(nn.Module):
  """See the module docstring. `__call__` is the public forward."""

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    d, s = cfg.hidden_size, cfg.num_scales
    normal = nn.initializers.normal(cfg.initializer_range)
    # Backbone (ViLT parameter layout, see layers.py and vilt.py).
    self.text_embed = TextEmbeddings(cfg)
    self.patch_embed = PatchEmbed(cfg)
    pos_init = normal
    if cfg.pos_embed_init == "sincos":
      pos_init = lambda *_: jnp.asarray(sincos_pos_grid(cfg.pos_grid_size, d))  # noqa: E731
    self.pos_embed = self.param("pos_embed", pos_init, (1 + cfg.pos_grid_size ** 2, d))
    self.modality_embed = embed(cfg, 2)
    self.layers = [EncoderLayer(cfg) for _ in range(cfg.num_layers)]
    self.final_norm = layer_norm(cfg)
    # ScanFormer's own parameters.
    self.reg_tokens = self.param("reg_tokens", normal, (s, d))
    self.scale_embed = self.param("scale_embed", nn.initializers.zeros, (s, d))
    self.const_tokens = self.param("const_tokens", normal, (s, d))
    self.select_head = SelectionHead(cfg)
    self.box_head = BoxHead(cfg)
    if cfg.iou_head:
      self.iou_head = IouHead(cfg)

  # ---------------------------------------------------------------- embeddings
  def _embed_text(self, text_ids: jax.Array) -> jax.Array:
    """[B, L] -> [B, L, D]."""
    return self.text_embed(text_ids) + self.modality_embed(jnp.array(TEXT_MODALITY))

  def _patch_tokens(self, image: jax.Array, s: int,
                    index: Optional[jax.Array] = None) -> jax.Array:
    """Scale-s image [B, r, r, 3] -> patch input embeddings.

    index None: every patch, [B, N_s, D]. index [B, C]: only those patches, [B, C, D],
    gathered as pixels BEFORE the projection (the same rows as embedding every patch
    and gathering after, without projecting the patches that are never used).
    """
    cfg = self.cfg
    g, pg = cfg.grid_sizes[s], cfg.pos_grid_size
    pos_grid = self.pos_embed[1:].reshape(pg, pg, cfg.hidden_size)
    pos = interpolate_pos_grid(pos_grid, g, g).reshape(g * g, cfg.hidden_size)
    patches = patchify(image, cfg.patch_size)  # [B, N, p*p*3]
    if index is not None:
      patches = jnp.take_along_axis(patches, index[..., None], axis=1)  # [B, C, p*p*3]
      pos = pos[index]  # [B, C, D]
    x = self.patch_embed(patches)  # [B, N | C, D]
    extra = pos + self.modality_embed(jnp.array(IMAGE_MODALITY)) + self.scale_embed[s]
    return x + extra.astype(x.dtype)

  def _reg_token(self, s: int, batch: int) -> jax.Array:
    """[B, 1, D]: REG_s, placed like ViLT's image [CLS] (its position, image modality)."""
    token = (self.reg_tokens[s] + self.pos_embed[0]
             + self.modality_embed(jnp.array(IMAGE_MODALITY)).astype(jnp.float32))
    token = token.astype(self.cfg.compute_dtype)
    return jnp.broadcast_to(token, (batch, 1, self.cfg.hidden_size))

  def _const_token(self, s: int) -> jax.Array:
    return self.const_tokens[s].astype(self.cfg.compute_dtype)  # [D]

  # ------------------------------------------------------------------- blocks
  def _encode_text(self, text_ids: jax.Array, text_mask: jax.Array) -> KVCache:
    """Text through every layer (attending to itself only); starts the cache."""
    x = self._embed_text(text_ids)
    bias = jnp.where(text_mask, 0.0, NEG_INF).astype(jnp.float32)  # [B, L]
    keys, values = [], []
    for layer in self.layers:
      x, (k, v) = layer(x, bias[:, None, None, :])
      keys.append(k)
      values.append(v)
    return KVCache.start(keys, values, bias)

  def _encode_scale(self, tokens: jax.Array, bias: jax.Array, cache: KVCache):
    """One scale's block through every layer, attending to the cache and itself.

    tokens: [B, T, D] with REG first; bias: [B, T] additive key bias of the block.
    Returns (REG feature [B, D] after the final norm, selection logits of tokens
    1..T-1 [B, T-1], the block's per-layer keys and values).
    """
    full_bias = jnp.concatenate([cache.bias, bias], axis=1)[:, None, None, :]
    x, keys, values = tokens, [], []
    logits = None
    for index, layer in enumerate(self.layers):
      x, (k, v) = layer(x, full_bias, past=cache.layer(index))
      keys.append(k)
      values.append(v)
      if index == self.cfg.encoder1_layers - 1:
        logits = self.select_head(x[:, 1:])
    reg = self.final_norm(x[:, 0]).astype(jnp.float32)
    return reg, logits, keys, values

  # --------------------------------------------------------------- the paths
  def _dense_scale(self, s, tokens, mask, cache):
    """Every patch is a token; replaced ones (mask 0) have input C_s."""
    b = tokens.shape[0]
    m = mask.astype(tokens.dtype)[..., None]  # [B, N, 1]
    x = m * tokens + (1 - m) * self._const_token(s)
    block = jnp.concatenate([self._reg_token(s, b), x], axis=1)
    bias = jnp.zeros(block.shape[:2], jnp.float32)
    reg, logits, keys, values = self._encode_scale(block, bias, cache)
    return reg, logits, (keys, values, bias)

  def _sparse_scale(self, s, image, wanted, scores, cache):
    """Taken patches in `capacity[s]` slots, the rest merged into one C_s token.

    Block layout: [REG_s | capacity[s] slots | merged C_s] (no merged token at
    scale 0, where every patch is taken). Only the slotted patches are embedded.
    """
    cfg = self.cfg
    b, n = wanted.shape
    capacity = cfg.capacities[s]
    if capacity == n:  # Every wanted patch fits: keep the patches in place.
      slots = self._patch_tokens(image, s)  # [B, N, D]
      slot_valid, taken = wanted, wanted
      index, dropped = None, jnp.zeros((b,), jnp.int32)
    else:
      index, slot_valid, taken, dropped = selection.capacity_slots(wanted, scores, capacity)
      slots = self._patch_tokens(image, s, index)  # [B, C, D]
    parts = [self._reg_token(s, b), slots]
    bias_parts = [jnp.zeros((b, 1)), jnp.where(slot_valid, 0.0, NEG_INF)]
    if s > 0:
      num_replaced = n - taken.sum(axis=1)  # [B]
      merged_bias = jnp.where(num_replaced > 0,
                              jnp.log(jnp.maximum(num_replaced, 1).astype(jnp.float32)),
                              NEG_INF)
      parts.append(jnp.broadcast_to(self._const_token(s), (b, 1, cfg.hidden_size)))
      bias_parts.append(merged_bias[:, None])
    block = jnp.concatenate(parts, axis=1)
    bias = jnp.concatenate(bias_parts, axis=1).astype(jnp.float32)
    reg, head_logits, keys, values = self._encode_scale(block, bias, cache)
    # Logits on the full grid; a replaced patch's logit is the merged token's.
    slot_logits = head_logits[:, :slots.shape[1]]
    if s == 0:
      logits = slot_logits
    else:
      merged_logit = head_logits[:, -1:]  # [B, 1]
      if index is None:
        logits = jnp.where(taken, slot_logits, merged_logit)
      else:
        logits = jnp.broadcast_to(merged_logit, (b, n)).at[jnp.arange(b)[:, None], index].set(
            jnp.where(slot_valid, slot_logits, merged_logit))
    return reg, logits, taken, dropped, (keys, values, bias)

  def __call__(self, image: jax.Array, text_ids: jax.Array, text_mask: jax.Array,
               mode: str = "sparse", train: bool = False,
               force_taken: Optional[tuple[jax.Array, ...]] = None) -> ScanFormerOutput:
    """Scans `image` [B, R, R, 3] (R = finest size) for `text_ids` [B, L].

    mode: "sparse" (inference) or "dense". train=True samples hard Gumbel decisions
    (rng "gumbel"; dense only). force_taken (dense only): per-scale [B, N_s] masks
    used instead of the model's own decisions, e.g. to replay a sparse scan.
    """
    cfg = self.cfg
    if mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if train and mode != "dense":
      raise ValueError("train=True samples Gumbel decisions and needs mode='dense'")
    if force_taken is not None and mode != "dense":
      raise ValueError("force_taken is only supported with mode='dense'")
    b = image.shape[0]
    chex.assert_shape(image, (b, cfg.image_size, cfg.image_size, 3))
    chex.assert_shape([text_ids, text_mask], (b, None))
    chex.assert_type(text_ids, int)

    cache = self._encode_text(text_ids, text_mask.astype(bool))
    images = build_pyramid(image.astype(jnp.float32), cfg.image_sizes)
    gumbel_rng = self.make_rng("gumbel") if train else None
    topk = cfg.select_topk or (None,) * cfg.num_scales

    regs, logits_out, taken_out, dropped_out = [], [], [], []
    mask = jnp.ones((b, cfg.num_patches[0]), jnp.float32)  # dense: scale-0 takes all
    wanted, scores = jnp.ones((b, cfg.num_patches[0]), bool), None
    for s in range(cfg.num_scales):
      image_s = images[s].astype(cfg.compute_dtype)
      last = s == cfg.num_scales - 1
      if mode == "dense":
        tokens = self._patch_tokens(image_s, s)
        if force_taken is not None:
          mask = force_taken[s].astype(jnp.float32)
        reg, logits, block_kv = self._dense_scale(s, tokens, mask, cache)
        taken = mask if train else mask > 0.5
        dropped = jnp.zeros((b,), jnp.int32)
        if not last:
          grid = cfg.grid_sizes[s]
          if train:
            decide = selection.hard_gumbel_sigmoid(
                logits, jax.random.fold_in(gumbel_rng, s), cfg.tau)
            mask = selection.upsample_to_children(mask * decide, grid)
          else:
            child, _ = selection.wanted_children(
                mask > 0.5, logits, grid, cfg.select_threshold, topk[s + 1])
            mask = child.astype(jnp.float32)
      else:
        reg, logits, taken, dropped, block_kv = self._sparse_scale(s, image_s, wanted, scores,
                                                                   cache)
        if not last:
          wanted, scores = selection.wanted_children(
              taken, logits, cfg.grid_sizes[s], cfg.select_threshold, topk[s + 1])
      if not last:  # The last scale's keys/values are never attended to.
        cache = cache.append(*block_kv)
      chex.assert_shape([logits, taken], (b, cfg.num_patches[s]))
      regs.append(reg)
      logits_out.append(logits)
      taken_out.append(taken)
      dropped_out.append(dropped)

    reg_features = jnp.stack(regs, axis=1)  # [B, S, D]
    boxes = self.box_head(reg_features)     # [B, S, 4]
    pred_iou = self.iou_head(reg_features) if cfg.iou_head else None
    chex.assert_shape(boxes, (b, cfg.num_scales, 4))
    return ScanFormerOutput(boxes=boxes, selection_logits=tuple(logits_out),
                            taken=tuple(taken_out), num_dropped=jnp.stack(dropped_out, 1),
                            reg_features=reg_features, pred_iou=pred_iou)

  def block_causal_reference(self, image: jax.Array, text_ids: jax.Array,
                             text_mask: jax.Array, taken: tuple[jax.Array, ...]) -> jax.Array:
    """REG features [B, S, D] from ONE pass over [text | scale 0 | ... | scale S-1].

    Given the taken masks of a scan, a block-causal mask (each block sees itself
    and every earlier block; text sees only text) must reproduce the scan with
    the KV cache. A test reference, not a fast path.
    """
    cfg = self.cfg
    b, length = text_ids.shape
    images = build_pyramid(image.astype(jnp.float32), cfg.image_sizes)
    seq = [self._embed_text(text_ids)]
    key_bias = [jnp.where(text_mask.astype(bool), 0.0, NEG_INF)]
    block_ids = [jnp.zeros((length,), jnp.int32)]
    reg_positions = []
    offset = length
    for s in range(cfg.num_scales):
      tokens = self._patch_tokens(images[s].astype(cfg.compute_dtype), s)
      m = taken[s].astype(tokens.dtype)[..., None]
      x = m * tokens + (1 - m) * self._const_token(s)
      seq.append(jnp.concatenate([self._reg_token(s, b), x], axis=1))
      key_bias.append(jnp.zeros((b, 1 + cfg.num_patches[s])))
      block_ids.append(jnp.full((1 + cfg.num_patches[s],), s + 1, jnp.int32))
      reg_positions.append(offset)
      offset += 1 + cfg.num_patches[s]
    x = jnp.concatenate(seq, axis=1)
    block = jnp.concatenate(block_ids)
    causal = jnp.where(block[None, :] <= block[:, None], 0.0, NEG_INF)  # [T, T]
    bias = causal[None, None] + jnp.concatenate(key_bias, axis=1)[:, None, None, :]
    for layer in self.layers:
      x, _ = layer(x, bias.astype(jnp.float32))
    regs = x[:, jnp.array(reg_positions)]  # [B, S, D]
    return self.final_norm(regs).astype(jnp.float32)
