"""ViLT building blocks shared by ScanFormer and the plain ViLT forward.

Parameter names here are the project's parameter layout: `vilt.py` (weight import)
and `model.py` both build on these modules, so a converted ViLT checkpoint loads
into ScanFormer by name.
"""

from __future__ import annotations

import functools
from typing import Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scanformer_jax.config import ModelConfig

# Additive attention bias of a key that must get zero weight. Finite so that a row
# whose keys are all masked gives a uniform (not NaN) softmax; exp(-1e9) is exactly
# 0 in float32 next to any real logit.
NEG_INF = -1e9

# GELU as in BERT/ViLT (erf form, not the tanh approximation).
gelu = functools.partial(nn.gelu, approximate=False)


def dense(cfg: ModelConfig, features: int, name: Optional[str] = None) -> nn.Dense:
  return nn.Dense(
      features, dtype=cfg.compute_dtype, param_dtype=jnp.float32, name=name,
      kernel_init=nn.initializers.normal(cfg.initializer_range))


def layer_norm(cfg: ModelConfig, name: Optional[str] = None) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.compute_dtype,
                      param_dtype=jnp.float32, name=name)


def embed(cfg: ModelConfig, num: int, name: Optional[str] = None) -> nn.Embed:
  return nn.Embed(num, cfg.hidden_size, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                  embedding_init=nn.initializers.normal(cfg.initializer_range), name=name)


class TextEmbeddings(nn.Module):
  """BERT embeddings: word + position + token type, then LayerNorm."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, text_ids: jax.Array,
               token_type_ids: Optional[jax.Array] = None) -> jax.Array:
    cfg = self.cfg
    _, length = text_ids.shape
    if length > cfg.max_text_len:
      raise ValueError(f"text length {length} exceeds max_text_len {cfg.max_text_len}")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(text_ids)
    x = embed(cfg, cfg.vocab_size, "word")(text_ids)  # [B, L, D]
    x = x + embed(cfg, cfg.max_text_len, "position")(jnp.arange(length))[None]
    x = x + embed(cfg, cfg.type_vocab_size, "token_type")(token_type_ids)
    return layer_norm(cfg, "norm")(x)


class PatchEmbed(nn.Module):
  """Linear projection of flattened patches; kernel in conv layout [p, p, 3, D]."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, patches: jax.Array) -> jax.Array:
    """patches: [..., p*p*3] pixels in (row, col, channel) order -> [..., D]."""
    cfg = self.cfg
    p, d = cfg.patch_size, cfg.hidden_size
    fan_in = p * p * 3
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, 3, d), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
    dtype = cfg.compute_dtype
    out = jnp.dot(patches.astype(dtype), kernel.reshape(fan_in, d).astype(dtype))
    return out + bias.astype(dtype)


def patchify(image: jax.Array, patch_size: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], patches in row-major order."""
  b, h, w, c = image.shape
  p = patch_size
  x = image.reshape(b, h // p, p, w // p, p, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, gh, gw, p, p, C]
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def interpolation_matrix(out_size: int, in_size: int) -> np.ndarray:
  """[out, in] weights of 1-D linear interpolation with align_corners=True."""
  if out_size == 1:
    coords = np.zeros((1,))
  else:
    coords = np.arange(out_size) * ((in_size - 1) / (out_size - 1))
  lower = np.clip(np.floor(coords).astype(np.int64), 0, in_size - 1)
  upper = np.clip(lower + 1, 0, in_size - 1)
  frac = coords - lower
  weights = np.zeros((out_size, in_size), np.float64)
  weights[np.arange(out_size), lower] += 1.0 - frac
  weights[np.arange(out_size), upper] += frac
  return weights.astype(np.float32)


def interpolate_pos_grid(grid: jax.Array, out_h: int, out_w: int) -> jax.Array:
  """Bilinear (align_corners=True) resize of a position grid [g, g, D] -> [h, w, D]."""
  gh, gw, _ = grid.shape
  rows = jnp.asarray(interpolation_matrix(out_h, gh))  # [h, g]
  cols = jnp.asarray(interpolation_matrix(out_w, gw))  # [w, g]
  return jnp.einsum("hi,ijd,wj->hwd", rows, grid, cols,
                    precision=jax.lax.Precision.HIGHEST)


def sincos_pos_grid(grid: int, dim: int) -> np.ndarray:
  """[1 + grid*grid, dim] 2-D sin-cos position table; row 0 (the [CLS] slot) is 0.

  Half the channels encode the row, half the column, each as sin/cos over
  geometrically spaced frequencies (as MAE/ViT-sincos), in row-major patch order.
  """
  if dim % 4:
    raise ValueError(f"sincos position embeddings need hidden_size % 4 == 0, got {dim}")
  omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim // 4))  # [D/4]
  rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
  def encode(pos):
    angles = pos.reshape(-1, 1) * omega[None]  # [G*G, D/4]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
  table = np.concatenate([encode(rows), encode(cols)], axis=1)  # [G*G, D]
  return np.concatenate([np.zeros((1, dim)), table]).astype(np.float32)


def attend_einsum(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
  """Attention as heads-major einsums, softmax in float32 (shapes as `attend`)."""
  scale = q.shape[-1] ** -0.5
  # Heads-major [B, H, T, Dh] operands: plain batched matmuls. With the token axis
  # second, XLA:CPU transposes inside the einsum: ~4x slower at the demo's fine scale.
  q, k, v = (y.transpose(0, 2, 1, 3) for y in (q, k, v))
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  logits = logits * scale + bias
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bhkd->bhqd", probs, v).transpose(0, 2, 1, 3)


# Channels that carry each key's additive bias inside the fused dot product: the bias
# split into pieces of the operand dtype whose float32 sum is the bias (hi + mid + lo:
# 3 x 8 mantissa bits in bfloat16, so the merged token's log n stays float32-exact).
BIAS_CHANNELS = 3


def key_bias(bias: jax.Array, batch: int, num_keys: int) -> Optional[jax.Array]:
  """The per-key bias [B, Tk] float32 of a bias broadcastable to [B, 1, 1, Tk], or None
  if it varies with the query (then only the einsum path takes it)."""
  if bias.ndim != 4 or bias.shape[1] != 1 or bias.shape[2] != 1:
    return None
  return jnp.broadcast_to(bias[:, 0, 0, :], (batch, num_keys)).astype(jnp.float32)


def bias_channels(bias: jax.Array, dtype, scale: float) -> jax.Array:
  """[B, Tk] float32 -> [B, Tk, BIAS_CHANNELS] in `dtype`, summing to bias / scale.

  With query channels of 1, the scaled dot product adds exactly the bias (to float32
  accuracy, the accumulation being float32).
  """
  rest = bias / jnp.float32(scale)
  pieces = []
  for _ in range(BIAS_CHANNELS):
    piece = rest.astype(dtype)
    pieces.append(piece)
    rest = rest - piece.astype(jnp.float32)
  return jnp.stack(pieces, axis=-1)


def fused_head_dim(head_dim: int) -> int:
  """The head dim of the fused call: head_dim + the bias channels, up to a multiple of 8."""
  return -(-(head_dim + BIAS_CHANNELS) // 8) * 8


def attend_fused(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array,
                 implementation: str) -> jax.Array:
  """`jax.nn.dot_product_attention` (shapes as `attend`); implementation 'cudnn' or 'xla'.

  A per-key `bias` ([B|1, 1, 1, Tk]: padding NEG_INF, the merged token's log n, what
  the scan passes) builds no [B, 1, Tq, Tk] bias and no bias gradient: it rides in
  BIAS_CHANNELS extra head channels (keys: `bias_channels`, queries: 1, values: 0), the
  head dim padded to a multiple of 8 (`fused_head_dim`), the softmax scale that of the
  real head dim. cuDNN needs even sequence lengths under a gradient: an odd query block
  gets one zero row (sliced off), an odd key list one zero key of bias NEG_INF (weight
  exactly 0). A query-dependent bias (the block-causal reference) is passed whole.
  """
  b, tq, _, dh = q.shape
  tk = k.shape[1]
  per_key = key_bias(bias, b, tk)
  if per_key is None:
    return _attend_fused_full_bias(q, k, v, bias, implementation)
  scale = dh ** -0.5
  pad_q, pad_k = tq % 2, tk % 2
  if pad_q or pad_k:
    q = jnp.pad(q, ((0, 0), (0, pad_q), (0, 0), (0, 0)))
    k, v = (jnp.pad(y, ((0, 0), (0, pad_k), (0, 0), (0, 0))) for y in (k, v))
    per_key = jnp.pad(per_key, ((0, 0), (0, pad_k)), constant_values=NEG_INF)
  extra = fused_head_dim(dh) - dh - BIAS_CHANNELS
  channels = bias_channels(per_key, k.dtype, scale)  # [B, Tk', C]
  channels = jnp.broadcast_to(channels[:, :, None, :], k.shape[:3] + (BIAS_CHANNELS,))
  zeros = lambda y, n: jnp.zeros(y.shape[:3] + (n,), y.dtype)  # noqa: E731
  q = jnp.concatenate([q, jnp.ones(q.shape[:3] + (BIAS_CHANNELS,), q.dtype), zeros(q, extra)],
                      axis=-1)  # [B, Tq', H, Dh']
  k = jnp.concatenate([k, channels, zeros(k, extra)], axis=-1)  # [B, Tk', H, Dh']
  v = jnp.concatenate([v, zeros(v, BIAS_CHANNELS + extra)], axis=-1)  # [B, Tk', H, Dh']
  out = jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)
  return out[:, :tq, :, :dh]


def _attend_fused_full_bias(q, k, v, bias, implementation: str) -> jax.Array:
  """The fused call with a whole [B, 1, Tq, Tk] bias (in the operands' dtype for cuDNN)."""
  b, tq, _, _ = q.shape
  tk = k.shape[1]
  pad_q, pad_k = tq % 2, tk % 2
  if pad_q or pad_k:
    q = jnp.pad(q, ((0, 0), (0, pad_q), (0, 0), (0, 0)))
    k, v = (jnp.pad(y, ((0, 0), (0, pad_k), (0, 0), (0, 0))) for y in (k, v))
  bias = jnp.broadcast_to(bias, (b, 1, tq, tk))
  bias = jnp.pad(bias, ((0, 0), (0, 0), (0, pad_q), (0, 0)))  # Padded queries: real keys.
  bias = jnp.pad(bias, ((0, 0), (0, 0), (0, 0), (0, pad_k)), constant_values=NEG_INF)
  if implementation == "cudnn":
    bias = bias.astype(q.dtype)
  out = jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=implementation)
  return out[:, :tq]


def attention_implementation(dtype, head_dim: int, per_key_bias: bool = True) -> str:
  """Which attention `attend` runs: 'cudnn' (fused flash attention) or 'einsum'.

  The rule: cuDNN flash attention on a GPU backend for bfloat16/float16 operands with a
  per-key bias and a fused head dim (`fused_head_dim`) cuDNN supports (at most 128);
  the heads-major einsums everywhere else (a query-dependent bias, float32, CPU, TPU).
  On CPU `jax.nn.dot_product_attention(implementation='xla')` (an einsum with the
  token axis second) was slower: summed over one forward's attention
  calls at batch 8 (experiments/bench_attention.py, median of 5, 2 shared cores), fused
  vs einsum took tiny 2.69 vs 2.47 ms (float32) and 2.21 vs 1.71 ms (bfloat16);
  vilt_b32 with capacities (16, 16, 64) 22.2 vs 11.8 ms and 17.6 vs 12.1 ms; vilt_b32
  with every patch slotted 136 vs 141 ms (float32, within this machine's noise: a rerun
  of its fine scale gave 149 vs 106 ms) and 124 vs 98 ms (bfloat16).
  On TPU the fused call lowers to the same XLA einsums, so the einsum path runs there:
  float32 logits [B, H, Tq, Tk] per layer, saved for the backward pass unless
  `model.remat` recomputes them. Not measured on a GPU (none was available): the
  cuDNN choice follows its documented support, and `attend_fused` is checked against
  the einsums on CPU via 'xla' (experiments/accelerator_check.py checks it on a GPU).
  """
  fused_ok = (jax.default_backend() == "gpu" and per_key_bias
              and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
              and fused_head_dim(head_dim) <= 128)
  return "cudnn" if fused_ok else "einsum"


def attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
  """Scaled dot-product attention with an additive bias, softmax in float32.

  q: [B, Tq, H, Dh]; k, v: [B, Tk, H, Dh]; bias broadcastable to [B, 1, Tq, Tk]
  (additive: NEG_INF padding and the merged token's log n must stay exact).
  Returns [B, Tq, H, Dh]. The implementation is `attention_implementation`'s choice.
  """
  per_key = bias.ndim == 4 and bias.shape[1] == 1 and bias.shape[2] == 1
  if attention_implementation(q.dtype, q.shape[-1], per_key) == "cudnn":
    return attend_fused(q, k, v, bias, "cudnn")
  return attend_einsum(q, k, v, bias)


class Attention(nn.Module):
  """Multi-head attention whose keys/values are a cache plus the queries' own tokens."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array,
               past: Optional[tuple[jax.Array, jax.Array]] = None):
    """x: [B, T, D] (normed); bias: [B, 1, T|1, Tc+T]; past: ([B, Tc, H, Dh]) * 2.

    Returns (out [B, T, D], (k, v) of x's own tokens [B, T, H, Dh] each).
    """
    cfg = self.cfg
    b, t, _ = x.shape
    split = lambda y: y.reshape(b, t, cfg.num_heads, cfg.head_dim)
    q = split(dense(cfg, cfg.hidden_size, "query")(x))
    k = split(dense(cfg, cfg.hidden_size, "key")(x))
    v = split(dense(cfg, cfg.hidden_size, "value")(x))
    if past is None:
      keys, values = k, v
    else:
      keys = jnp.concatenate([past[0].astype(k.dtype), k], axis=1)
      values = jnp.concatenate([past[1].astype(v.dtype), v], axis=1)
    chex.assert_shape(bias, (None, 1, None, keys.shape[1]))
    out = attend(q, keys, values, bias).reshape(b, t, cfg.hidden_size)
    return dense(cfg, cfg.hidden_size, "out")(out), (k, v)


class Mlp(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = gelu(dense(self.cfg, self.cfg.mlp_dim, "fc1")(x))
    return dense(self.cfg, self.cfg.hidden_size, "fc2")(x)


class EncoderLayer(nn.Module):
  """Pre-LN transformer layer (ViLT): x + Attn(LN(x)), then x + MLP(LN(x))."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array,
               past: Optional[tuple[jax.Array, jax.Array]] = None):
    """Returns (y [B, T, D], (k, v) of this layer for x's tokens)."""
    chex.assert_rank(x, 3)
    attn_out, kv = Attention(self.cfg, name="attn")(
        layer_norm(self.cfg, "norm_attn")(x), bias, past)
    x = x + attn_out
    x = x + Mlp(self.cfg, name="mlp")(layer_norm(self.cfg, "norm_mlp")(x))
    return x, kv


def final_norm(cfg: ModelConfig) -> nn.LayerNorm:
  """The backbone's closing LayerNorm (ViLT `layernorm`)."""
  return layer_norm(cfg, "final_norm")
