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
  sparse (inference, training): taken patches are gathered into `capacity[s]` static slots and
         all replaced patches collapse into ONE merged C_s token whose key carries
         the bias log(n): n identical keys weigh exp(q.k) * n = exp(q.k + log n),
         so this is exact, not an approximation.
The scale loop is unrolled in Python: every shape and cache offset is static.

Sparse training (`mode="sparse", train=True`) runs the sparse block with the dense
path's hard Gumbel decisions and gets the dense path's gradients, exactly:
  In the dense path a replaced patch's input is x_i = m_i * t_i + (1 - m_i) * C_s,
  m_i the straight-through mask (value 0, gradient path d x_i / d m_i = t_i - C_s).
  Write F for the dense loss as a function of the block inputs. The sparse forward
  with merged-token input z is F(x_T, z, ..., z) (n copies of z) for EVERY z, not only
  at z = C_s: n identical tokens stay identical through every layer, and their keys
  weigh exp(q.k + log n), in this scale and in every later scale's cache. So
  dL/dz = sum_i dF/dx_i (the merged token's one query row is all n copies' rows: its
  output is each copy's output, and each key it writes counts n times through the
  bias). The dense replaced copies are interchangeable (a replaced patch's own logit
  gets no gradient: its children's mask is m_i * decision_i with m_i = 0, and the
  selection loss weighs it 0), so each gets dF/dx_i = (1/n) dL/dz. With
  z = mean_i x_i the chain rule gives each m_i the gradient (t_i - C_s) . dL/dz / n
  and C_s the gradient mean_i (1 - m_i) . dL/dz = dL/dz: both the dense path's. A sum
  instead of the mean would give each m_i n times its dense gradient (and the wrong
  value n * C_s). Slots keep x_i, so taken patches match too. This needs t_i of the
  replaced patches, i.e. the patch projection of every patch (not the transformer).
  Patches that the Gumbel decisions take but the training capacity cannot hold are
  replaced with mask 0 and no gradient (lowest parent logits first, as at inference),
  and counted in `num_dropped`. tests/test_sparse_train.py checks all of this.

The steps are public, so that other code can run a prefix of the scan (as
PaliGemma's prefill_cache / extend_cache): `encode_text` returns the cache;
`scan_scale_dense` / `scan_scale_sparse` run one scale against it and return a
`ScaleOutput` whose `kv` the next scale appends. One loop (`scan.scan`) drives them
for every path, each path's decisions a policy (scan.py).
Call them with `model.apply(variables, ..., method=ScanFormer.encode_text)`.

Parameters: `params["backbone"]` holds ViLT's (embeddings, layers, final norm: the
tree `convert-vilt` writes, trained at the backbone learning rate); everything beside
it is ScanFormer's own (REG, scale and constant tokens, selection and box heads,
`exit_heads/<name>`), trained at the full rate (optim.py).
"""

from __future__ import annotations

from typing import Optional

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from scanformer_jax import exit_heads, scan, selection
from scanformer_jax.config import ModelConfig
from scanformer_jax.heads import BoxHead, SelectionHead
from scanformer_jax.kv_cache import KVCache
from scanformer_jax.layers import (NEG_INF, EncoderLayer, PatchEmbed, TextEmbeddings, embed,
                                   interpolate_pos_grid, layer_norm, patchify,
                                   sincos_pos_grid)
from scanformer_jax.pyramid import build_pyramid

MODES = ("sparse", "dense")
TEXT_MODALITY, IMAGE_MODALITY = 0, 1

BACKBONE = "backbone"  # params[BACKBONE]: ViLT's parameters (class Backbone).


def merged_key_bias(num_replaced: jax.Array) -> jax.Array:
  """Key bias of the merged constant token: log n for n replaced patches (n identical
  keys weigh exp(q.k + log n)), NEG_INF when none is replaced. [B] int -> [B] float32."""
  return jnp.where(num_replaced > 0,
                   jnp.log(jnp.maximum(num_replaced, 1).astype(jnp.float32)), NEG_INF)


def encoder_layer_class(cfg: ModelConfig) -> type:
  """EncoderLayer, rematerialised in the backward pass as `cfg.remat` says."""
  if cfg.remat == "none":
    return EncoderLayer
  policy = (None if cfg.remat == "layer"
            else jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  return nn.remat(EncoderLayer, policy=policy)


class Backbone(nn.Module):
  """ViLT's parameters, in the layout `convert-vilt` writes (`params["backbone"]`)."""

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    normal = nn.initializers.normal(cfg.initializer_range)
    self.text_embed = TextEmbeddings(cfg)
    self.patch_embed = PatchEmbed(cfg)
    pos_init = normal
    if cfg.pos_embed_init == "sincos":
      pos_init = lambda *_: jnp.asarray(sincos_pos_grid(cfg.pos_grid_size, cfg.hidden_size))  # noqa: E731
    self.pos_embed = self.param("pos_embed", pos_init, (1 + cfg.pos_grid_size ** 2,
                                                        cfg.hidden_size))
    self.modality_embed = embed(cfg, 2)
    layer = encoder_layer_class(cfg)
    self.layers = [layer(cfg) for _ in range(cfg.num_layers)]
    self.final_norm = layer_norm(cfg)

  def __call__(self):  # Not a forward: ScanFormer uses the parts (init needs no call).
    raise TypeError("Backbone holds parameters; ScanFormer calls its parts")


class ExitHeads(nn.Module):
  """The configured exit heads (`params["exit_heads"][name]`, exit_heads.py)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, reg: jax.Array) -> dict[str, jax.Array]:
    """reg: [..., D] -> {head name: raw output [...] or [..., k]}."""
    return {name: exit_heads.get(name).module(self.cfg, name=name)(reg)
            for name in self.cfg.exit_heads}


@flax.struct.dataclass
class ScaleOutput:
  """What one scale of the scan produces (`ScanFormer.scan_scale_dense` / `_sparse`)."""
  reg: jax.Array               # [B, D] float32, REG_s after the final LayerNorm
  selection_logits: jax.Array  # [B, N_s] float32, on the full patch grid
  taken: jax.Array             # [B, N_s]: bool; the float 0/1 mask in the dense path
  num_dropped: jax.Array       # [B] int32, wanted but over capacity
  kv: KVCache                  # the block's keys/values and key bias, for `cache.append`
  capacity: Optional[jax.Array] = None  # [B] int32, the slots the sparse block ran with


@flax.struct.dataclass
class HeadOutputs:
  """What the heads read from REG features `[..., D]` (`ScanFormer.read_heads`)."""
  boxes: jax.Array                 # [..., 4] normalized (cx, cy, w, h)
  raw: dict[str, jax.Array]        # exit head name -> its raw output [...] / [..., k]
  signals: dict[str, jax.Array]    # signal key (e.g. "halt_prob") -> [...]


@flax.struct.dataclass
class ScanFormerOutput:
  boxes: jax.Array                         # [B, S, 4] normalized (cx, cy, w, h)
  selection_logits: tuple[jax.Array, ...]  # per scale [B, N_s] float32
  taken: tuple[jax.Array, ...]             # per scale [B, N_s]: bool; float 0/1 if train
  num_dropped: jax.Array                   # [B, S] int32, wanted but over capacity
  reg_features: jax.Array                  # [B, S, D] float32, REG after the final LayerNorm
  exit_heads: dict[str, jax.Array] = flax.struct.field(default_factory=dict)
                                           # head name -> raw [B, S] / [B, S, k]
  signals: dict[str, jax.Array] = flax.struct.field(default_factory=dict)
                                           # signal key -> [B, S] (criteria read these)
  capacity: Optional[jax.Array] = None     # [B, S] int32, patch slots each scale ran with
                                           # (dense: every patch)

  @property
  def pred_iou(self) -> Optional[jax.Array]:
    """[B, S], the IoU head's signal when the model has that head, else None."""
    return self.signals.get("pred_iou")


def capacity_group_rows(cfg: ModelConfig, batch: int) -> tuple[int, int]:
  """(groups, rows per group) of the bucketed scan for a batch of `batch` rows."""
  if cfg.capacity_group_rows is None or cfg.capacity_group_rows >= batch:
    return 1, batch
  groups = -(-batch // cfg.capacity_group_rows)
  rows = -(-batch // groups)  # Balanced: every group but the (padded) first is full.
  return groups, rows


def _pad_block(kv: KVCache, length: int) -> KVCache:
  """A block's keys/values padded to `length` tokens; padding keys get bias NEG_INF."""
  pad = length - kv.bias.shape[1]
  if pad == 0:
    return kv
  widths = lambda x: [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)  # noqa: E731
  zeros = lambda x: jnp.pad(x, widths(x))  # noqa: E731
  return KVCache(keys=tuple(map(zeros, kv.keys)), values=tuple(map(zeros, kv.values)),
                 bias=jnp.pad(kv.bias, widths(kv.bias), constant_values=NEG_INF))


class ScanFormer(nn.Module):
  """See the module docstring. `__call__` is the forward; `encode_text`,
  `scan_scale_dense` and `scan_scale_sparse` are its public steps."""

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    d, s = cfg.hidden_size, cfg.num_scales
    normal = nn.initializers.normal(cfg.initializer_range)
    self.backbone = Backbone(cfg)
    # ScanFormer's own parameters.
    self.reg_tokens = self.param("reg_tokens", normal, (s, d))
    self.scale_embed = self.param("scale_embed", nn.initializers.zeros, (s, d))
    self.const_tokens = self.param("const_tokens", normal, (s, d))
    self.select_head = SelectionHead(cfg)
    self.box_head = BoxHead(cfg)
    if cfg.exit_heads:
      self.exit_heads = ExitHeads(cfg)

  # ---------------------------------------------------------------- embeddings
  def _embed_text(self, text_ids: jax.Array) -> jax.Array:
    """[B, L] -> [B, L, D]."""
    backbone = self.backbone
    return backbone.text_embed(text_ids) + backbone.modality_embed(jnp.array(TEXT_MODALITY))

  def _patch_tokens(self, image: jax.Array, s: int,
                    index: Optional[jax.Array] = None) -> jax.Array:
    """Scale-s image [B, r, r, 3] -> patch input embeddings.

    index None: every patch, [B, N_s, D]. index [B, C]: only those patches, [B, C, D],
    gathered as pixels BEFORE the projection (the same rows as embedding every patch
    and gathering after, without projecting the patches that are never used).
    """
    cfg = self.cfg
    g, pg = cfg.grid_sizes[s], cfg.pos_grid_size
    pos_grid = self.backbone.pos_embed[1:].reshape(pg, pg, cfg.hidden_size)
    pos = interpolate_pos_grid(pos_grid, g, g).reshape(g * g, cfg.hidden_size)
    patches = patchify(image, cfg.patch_size)  # [B, N, p*p*3]
    if index is not None:
      patches = jnp.take_along_axis(patches, index[..., None], axis=1)  # [B, C, p*p*3]
      pos = pos[index]  # [B, C, D]
    x = self.backbone.patch_embed(patches)  # [B, N | C, D]
    image_modality = self.backbone.modality_embed(jnp.array(IMAGE_MODALITY))
    extra = pos + image_modality + self.scale_embed[s]
    return x + extra.astype(x.dtype)

  def _reg_token(self, s: int, batch: int) -> jax.Array:
    """[B, 1, D]: REG_s, placed like ViLT's image [CLS] (its position, image modality)."""
    token = (self.reg_tokens[s] + self.backbone.pos_embed[0]
             + self.backbone.modality_embed(jnp.array(IMAGE_MODALITY)).astype(jnp.float32))
    token = token.astype(self.cfg.compute_dtype)
    return jnp.broadcast_to(token, (batch, 1, self.cfg.hidden_size))

  def _const_token(self, s: int) -> jax.Array:
    return self.const_tokens[s].astype(self.cfg.compute_dtype)  # [D]

  def _straight_through_inputs(self, s: int, image: jax.Array, mask: jax.Array,
                               slots: selection.Slots) -> tuple[jax.Array, jax.Array]:
    """Sparse-training inputs of scale s: (slots [B, C, D], merged token [B, 1, D]).

    Every patch i gets x_i = m_i * t_i + (1 - m_i) * C_s (mask [B, N] float, hard 0/1
    with straight-through gradient), as in the dense block; the slots hold the x_i
    of their patches, the merged token the mean of x_i over the replaced patches
    (module docstring: this gives the dense gradients). Its value is C_s exactly.
    """
    tokens = self._patch_tokens(image.astype(self.cfg.compute_dtype), s)  # [B, N, D]
    const = self._const_token(s)  # [D]
    m = mask.astype(tokens.dtype)[..., None]  # [B, N, 1]
    x = m * tokens + (1 - m) * const  # [B, N, D]
    if slots.index is not None:
      slot_x = jnp.take_along_axis(x, slots.index[..., None], axis=1)  # [B, C, D]
    else:
      slot_x = x
    replaced = (~slots.taken).astype(jnp.float32)  # [B, N]
    weight = replaced / jnp.maximum(replaced.sum(axis=1, keepdims=True), 1.0)  # [B, N]
    mean = jnp.einsum("bn,bnd->bd", weight, x.astype(jnp.float32))[:, None]  # [B, 1, D]
    # Value C_s exactly (no rounding of the mean), gradient of the mean.
    merged = mean + jax.lax.stop_gradient(const.astype(jnp.float32) - mean)
    return slot_x, merged.astype(x.dtype)

  def _dense_block(self, s: int, image: jax.Array, mask: jax.Array) -> jax.Array:
    """[REG_s | every patch] [B, 1 + N_s, D]; replaced patches (mask 0) have input C_s."""
    tokens = self._patch_tokens(image.astype(self.cfg.compute_dtype), s)  # [B, N, D]
    m = mask.astype(tokens.dtype)[..., None]  # [B, N, 1]
    x = m * tokens + (1 - m) * self._const_token(s)
    return jnp.concatenate([self._reg_token(s, tokens.shape[0]), x], axis=1)

  def _encode_block(self, tokens: jax.Array, bias: jax.Array, cache: KVCache):
    """One scale's block through every layer, attending to the cache and itself.

    tokens: [B, T, D] with REG first; bias: [B, T] additive key bias of the block.
    Returns (REG feature [B, D] after the final norm, selection logits of tokens
    1..T-1 [B, T-1], the block as a KVCache).
    """
    full_bias = jnp.concatenate([cache.bias, bias], axis=1)[:, None, None, :]
    x, keys, values = tokens, [], []
    logits = None
    for index, layer in enumerate(self.backbone.layers):
      x, (k, v) = layer(x, full_bias, past=cache.layer(index))
      keys.append(k)
      values.append(v)
      if index == self.cfg.encoder1_layers - 1:
        logits = self.select_head(x[:, 1:])
    reg = self.backbone.final_norm(x[:, 0]).astype(jnp.float32)
    return reg, logits, KVCache.start(keys, values, bias)

  # ------------------------------------------------------------------- the steps
  def read_heads(self, reg: jax.Array) -> HeadOutputs:
    """The box and the configured exit heads on REG features [..., D].

    The exit heads read stop_gradient(reg) when cfg.exit_heads_stop_gradient, so
    their losses train the heads only (the grounding model is unchanged by them).
    """
    cfg = self.cfg
    raw, signals = {}, {}
    if cfg.exit_heads:
      exit_reg = jax.lax.stop_gradient(reg) if cfg.exit_heads_stop_gradient else reg
      raw = self.exit_heads(exit_reg)
      signals = {exit_heads.get(name).signal: exit_heads.get(name).to_signal(out)
                 for name, out in raw.items()}
    return HeadOutputs(boxes=self.box_head(reg), raw=raw, signals=signals)

  def encode_text(self, text_ids: jax.Array, text_mask: jax.Array) -> KVCache:
    """Text [B, L] (mask [B, L]) through every layer, attending to itself only.

    Returns the cache every scale starts from (the text's keys/values, padding masked).
    """
    chex.assert_equal_shape([text_ids, text_mask])
    chex.assert_type(text_ids, int)
    x = self._embed_text(text_ids)
    bias = jnp.where(text_mask.astype(bool), 0.0, NEG_INF).astype(jnp.float32)  # [B, L]
    keys, values = [], []
    for layer in self.backbone.layers:
      x, (k, v) = layer(x, bias[:, None, None, :])
      keys.append(k)
      values.append(v)
    return KVCache.start(keys, values, bias)

  def scan_scale_dense(self, s: int, image: jax.Array, mask: jax.Array,
                       cache: KVCache) -> ScaleOutput:
    """Scale s of the dense path: every patch is a token, attending to `cache`.

    image: [B, r_s, r_s, 3], pyramid level s. mask: [B, N_s] 0/1 (float, the gradient
    path in training, or bool): patches with mask 0 are replaced by C_s. The output's
    `taken` is `mask` as given.
    """
    cfg = self.cfg
    b, n = mask.shape
    chex.assert_shape(image, (b, cfg.image_sizes[s], cfg.image_sizes[s], 3))
    chex.assert_equal(n, cfg.num_patches[s])
    block = self._dense_block(s, image, mask)
    reg, logits, kv = self._encode_block(block, jnp.zeros(block.shape[:2], jnp.float32), cache)
    return ScaleOutput(reg=reg, selection_logits=logits, taken=mask,
                       num_dropped=jnp.zeros((b,), jnp.int32), kv=kv)

  def scan_scale_sparse(self, s: int, image: jax.Array, wanted: jax.Array,
                        scores: Optional[jax.Array], cache: KVCache,
                        capacity: Optional[int] = None) -> ScaleOutput:
    """Scale s of the sparse path: taken patches in `capacity` slots, the rest merged.

    image: [B, r_s, r_s, 3], pyramid level s; wanted: [B, N_s] bool; scores: [B, N_s]
    priorities when more are wanted than fit (None at full capacity). capacity: static
    slots (default `cfg.capacities[s]`; a bucket's size in a bucketed scan). Block
    layout: [REG_s | capacity slots | merged C_s] (no merged token at scale 0, where
    every patch is taken). Only the slotted patches are embedded.
    """
    cfg = self.cfg
    b, n = wanted.shape
    chex.assert_shape(image, (b, cfg.image_sizes[s], cfg.image_sizes[s], 3))
    chex.assert_equal(n, cfg.num_patches[s])
    capacity = cfg.capacities[s] if capacity is None else capacity
    slots = selection.fill_slots(wanted, scores, capacity)
    patches = self._patch_tokens(image.astype(cfg.compute_dtype), s, slots.index)  # [B, C, D]
    merged = jnp.broadcast_to(self._const_token(s), (b, 1, cfg.hidden_size))  # [B, 1, D]
    return self._sparse_block(s, slots, patches, merged, cache).replace(
        taken=slots.taken, capacity=jnp.full((b,), capacity, jnp.int32))

  def _sparse_block(self, s: int, slots: selection.Slots, slot_x: jax.Array,
                    merged: jax.Array, cache: KVCache) -> ScaleOutput:
    """The sparse block of scale s, `[REG_s | slots | merged C_s]`, through every layer.

    slot_x: [B, C, D] inputs of the slots (padding slots get key bias NEG_INF); merged:
    [B, 1, D] the input of the one merged token, whose key carries `merged_key_bias`
    (no merged token at scale 0, where every patch is taken). Returns the scale's
    output with `taken` = slots.taken; selection logits on the full grid, a replaced
    patch's logit being the merged token's.
    """
    b, n = slots.taken.shape
    parts = [self._reg_token(s, b), slot_x]
    bias_parts = [jnp.zeros((b, 1)), jnp.where(slots.valid, 0.0, NEG_INF)]
    if s > 0:
      parts.append(merged)
      bias_parts.append(merged_key_bias(n - slots.taken.sum(axis=1))[:, None])
    block = jnp.concatenate(parts, axis=1)
    bias = jnp.concatenate(bias_parts, axis=1).astype(jnp.float32)
    reg, head_logits, kv = self._encode_block(block, bias, cache)
    slot_logits = head_logits[:, :slot_x.shape[1]]
    logits = slot_logits if s == 0 else slots.to_grid(slot_logits, head_logits[:, -1:])
    return ScaleOutput(reg=reg, selection_logits=logits, taken=slots.taken,
                       num_dropped=slots.num_dropped, kv=kv)

  def scan_scale_inference(self, s: int, image: jax.Array, wanted: jax.Array,
                           scores: Optional[jax.Array], cache: KVCache) -> ScaleOutput:
    """Scale s as the sparse inference scan runs it: `cfg.capacity_buckets` in row
    groups of `cfg.capacity_group_rows` when set (scales >= 1), else
    `cfg.capacities[s]` slots. Arguments as `scan_scale_sparse`."""
    if self.cfg.capacity_buckets is None or s == 0:
      return self.scan_scale_sparse(s, image, wanted, scores, cache)
    return self._scan_scale_bucketed(s, image, wanted, scores, cache)

  def _scan_scale_bucketed(self, s: int, image: jax.Array, wanted: jax.Array,
                           scores: jax.Array, cache: KVCache) -> ScaleOutput:
    """`scan_scale_sparse` in capacity groups: the batch's rows sorted by wanted count
    and cut into G = ceil(B / cfg.capacity_group_rows) groups of R = ceil(B / G)
    consecutive rows (`capacity_group_rows`), each run by `_scan_group_bucketed` with
    its own bucket.

    So rows that want few patches run a small bucket beside rows that want many: the
    batch pays about what its rows need. The groups are the steps of one `nn.scan`
    (one compiled body whatever the group count); the sorted order is padded at its
    start with copies of the least needy row to fill the last group, and those rows'
    results are dropped. Results return to the batch's row order. The sort is over
    this program's batch axis: under `shard_map` (`EvalStep`) each device groups its
    own rows and no row crosses devices.
    """
    b = wanted.shape[0]
    groups, rows_per_group = capacity_group_rows(self.cfg, b)
    if groups == 1:
      return self._scan_group_bucketed(s, image, wanted, scores, cache)
    need = wanted.sum(axis=1, dtype=jnp.int32)  # [B]
    order = jnp.argsort(need, stable=True)  # [B] rows by ascending need
    pad = groups * rows_per_group - b
    padded = jnp.concatenate([jnp.broadcast_to(order[:1], (pad,)), order])  # [G * R]

    def group(module, carry, rows):  # rows: [R] batch rows of one group
      take = lambda x: jnp.take(x, rows, axis=0)  # noqa: E731
      out = module._scan_group_bucketed(s, take(image), take(wanted), take(scores),
                                        jax.tree.map(take, cache))
      return carry, out

    scan = nn.scan(group, variable_broadcast="params", split_rngs={"params": False},
                   length=groups)
    _, outs = scan(self, None, padded.reshape(groups, rows_per_group))  # [G, R, ...]
    restore = jnp.argsort(order) + pad  # [B] position of each batch row in `padded`
    return jax.tree.map(
        lambda x: jnp.take(x.reshape((-1,) + x.shape[2:]), restore, axis=0), outs)

  def _scan_group_bucketed(self, s: int, image: jax.Array, wanted: jax.Array,
                           scores: jax.Array, cache: KVCache) -> ScaleOutput:
    """`scan_scale_sparse` with the smallest of `cfg.capacity_buckets[s]` that holds the
    largest wanted count of these rows (the last bucket if none does), chosen in the
    program.

    One branch per bucket (`lax.switch`: one compile, only the chosen branch runs).
    Every branch's block keys/values are padded to the largest bucket's block with
    key bias NEG_INF, so the cache of later scales has one static shape; attending to
    the padding costs 4*T*pad*D per layer, small next to the block's own projections.
    """
    buckets = self.cfg.capacity_buckets[s]
    largest = 1 + buckets[-1] + (1 if s > 0 else 0)  # Tokens of the largest block.
    need = wanted.sum(axis=1, dtype=jnp.int32).max()  # The rows' largest count.
    index = jnp.minimum(jnp.sum(jnp.asarray(buckets) < need), len(buckets) - 1)

    def branch(capacity: int):
      def run(module, image, wanted, scores, cache):
        out = module.scan_scale_sparse(s, image, wanted, scores, cache, capacity=capacity)
        return out.replace(kv=_pad_block(out.kv, largest))
      return run

    if len(buckets) == 1:
      return branch(buckets[0])(self, image, wanted, scores, cache)
    return nn.switch(index, [branch(c) for c in buckets], self, image, wanted, scores, cache)

  def scan_scale_sparse_train(self, s: int, image: jax.Array, mask: jax.Array,
                              scores: Optional[jax.Array], cache: KVCache,
                              slots: Optional[int] = None) -> ScaleOutput:
    """Scale s of sparse training: the patches the training rule took, in `slots`
    static slots (default `cfg.capacities[s]`; the trainer passes `train.slots`).

    image: [B, r_s, r_s, 3]; mask: [B, N_s] float, the hard straight-through decisions
    (as the dense path's); scores: [B, N_s] priorities when more are taken than fit
    (None when every patch fits). Same block as `scan_scale_sparse`, inputs from
    `_straight_through_inputs`. The output's `taken` is `mask` with the patches that
    did not fit set to 0 (float, the gradient path), their count in `num_dropped`.
    """
    cfg = self.cfg
    b, n = mask.shape
    chex.assert_shape(image, (b, cfg.image_sizes[s], cfg.image_sizes[s], 3))
    chex.assert_equal(n, cfg.num_patches[s])
    slots = cfg.capacities[s] if slots is None else slots
    wanted = mask > 0.5
    filled = selection.fill_slots(wanted, scores, slots)
    kept = mask * (filled.taken | ~wanted).astype(mask.dtype)  # Over capacity: 0, no gradient.
    slot_x, merged = self._straight_through_inputs(s, image, kept, filled)
    out = self._sparse_block(s, filled, slot_x, merged, cache)
    return out.replace(taken=kept, capacity=jnp.full((b,), slots, jnp.int32))

  # ------------------------------------------------------------------- the forward
  def __call__(self, image: jax.Array, text_ids: jax.Array, text_mask: jax.Array,
               mode: str = "sparse", train: bool = False,
               force_taken: Optional[tuple[jax.Array, ...]] = None,
               slots: Optional[tuple[int, ...]] = None) -> ScanFormerOutput:
    """Scans `image` [B, R, R, 3] (R = finest size) for `text_ids` [B, L].

    mode: "sparse" or "dense". train=True takes the training rule's hard decisions
    (rng "gumbel"); with mode="sparse" the taken patches fill `slots` static slots per
    scale (default `cfg.capacities`; sparse training, module docstring). force_taken
    (dense only): per-scale [B, N_s] masks used instead of the model's own decisions,
    e.g. to replay a scan.
    """
    cfg = self.cfg
    if mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if force_taken is not None and mode != "dense":
      raise ValueError("force_taken is only supported with mode='dense'")
    b = image.shape[0]
    chex.assert_shape(image, (b, cfg.image_size, cfg.image_size, 3))
    chex.assert_shape([text_ids, text_mask], (b, None))

    cache = self.encode_text(text_ids, text_mask)
    images = build_pyramid(image.astype(jnp.float32), cfg.image_sizes)
    rng = self.make_rng("gumbel") if train else None
    if mode == "dense":
      policy = scan.DensePolicy(self, rng, force_taken)
    elif train:
      policy = scan.SparseTrainPolicy(self, rng, cfg.capacities if slots is None else slots)
    else:
      policy = scan.SparsePolicy(self)
    scales, _ = scan.scan(policy, images, cache)

    reg_features = jnp.stack([out.reg for out in scales], axis=1)  # [B, S, D]
    heads = self.read_heads(reg_features)
    chex.assert_shape(heads.boxes, (b, cfg.num_scales, 4))
    if mode == "dense":  # Every patch of every scale is a token.
      capacity = jnp.broadcast_to(jnp.array(cfg.num_patches, jnp.int32), (b, cfg.num_scales))
    else:
      capacity = jnp.stack([out.capacity for out in scales], axis=1)  # [B, S]
    return ScanFormerOutput(
        boxes=heads.boxes, selection_logits=tuple(out.selection_logits for out in scales),
        taken=tuple(out.taken for out in scales),
        num_dropped=jnp.stack([out.num_dropped for out in scales], axis=1),
        reg_features=reg_features, exit_heads=heads.raw, signals=heads.signals,
        capacity=capacity)

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
      seq.append(self._dense_block(s, images[s], taken[s]))
      key_bias.append(jnp.zeros((b, 1 + cfg.num_patches[s])))
      block_ids.append(jnp.full((1 + cfg.num_patches[s],), s + 1, jnp.int32))
      reg_positions.append(offset)
      offset += 1 + cfg.num_patches[s]
    x = jnp.concatenate(seq, axis=1)
    block = jnp.concatenate(block_ids)
    causal = jnp.where(block[None, :] <= block[:, None], 0.0, NEG_INF)  # [T, T]
    bias = causal[None, None] + jnp.concatenate(key_bias, axis=1)[:, None, None, :]
    for layer in self.backbone.layers:
      x, _ = layer(x, bias.astype(jnp.float32))
    regs = x[:, jnp.array(reg_positions)]  # [B, S, D]
    return self.backbone.final_norm(regs).astype(jnp.float32)
