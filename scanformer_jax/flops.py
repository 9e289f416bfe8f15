"""Analytic forward FLOPs per sample, from the token counts a scan actually uses.

What is counted: matrix multiplications only, at 2*M*N*K FLOPs each (one multiply
and one add per MAC). Per transformer layer, for a block of T query tokens whose
attention sees K keys (the cached text and earlier scales, plus the block itself):
  Q, K, V and output projections   4 * 2*T*D*D
  attention logits q.k             2*T*K*D      (summed over heads: H * Dh = D)
  attention-weighted sum of v      2*T*K*D
  MLP                              2 * 2*T*D*F
plus the patch embedding (2 * embedded patches * p*p*3 * D per scale: every patch in
the dense path, the slots in the sparse path, which gathers pixels before the
projection), the selection head
(2*D per token after Encoder1, computed on every non-REG token of every scale) and
the box head (and IoU head) MLPs on the REG tokens.
What is NOT counted: elementwise work (LayerNorm, GELU, softmax, residual adds,
biases, embedding lookups), the position-grid interpolation (per batch, not per
sample), the image pyramid, top-k, gathers and scatters. XLA's own cost analysis
counts some of these, so for matmul-dominated shapes it is a few percent above
this count (tests/test_flops.py checks the gap).

Token counts per scale s (a "block" is [REG_s | patches | merged C_s]):
  dense (`dense_flops`): 1 + N_s                  (every patch is a token)
  sparse, as run (`sparse_flops_as_run`): 1 + capacity[s] (+1 merged token for
                    s >= 1); padding slots are computed (and embedded) like real
                    tokens, so this is what the compiled program does, independent
                    of the selection (eval's `gflops_as_run`).
  sparse, effective (`sparse_flops` with taken counts; eval's `gflops_kept`):
                    1 + taken_s (+1 if any patch of scale s was replaced), and
                    taken_s patches embedded; what the scan needs for this sample's
                    selection (a lower bound of the work, reached by a ragged
                    implementation).
The text block is `text_len` tokens, padding included when the model runs padded
text (pass the padded length for "as run", the real length for a lower bound).
The last scale's keys/values are computed (its own block attends to them) but are
not appended to the cache. The text's outputs after the last layer are never read
(only its keys/values are), so jit drops that work: the text block's last layer
counts only its K and V projections, as the compiled program runs it.

Every function accepts numpy arrays for counts and broadcasts, so per-sample counts
of a whole batch ([B, S] taken counts) give per-sample FLOPs [B].
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from scanformer_jax import exit_heads
from scanformer_jax.config import ModelConfig


def _layer_flops(cfg: ModelConfig, tokens, keys):
  """One transformer layer on `tokens` queries attending to `keys` keys."""
  d, f = cfg.hidden_size, cfg.mlp_dim
  return (8.0 * tokens * d * d         # Q, K, V, output projections
          + 4.0 * tokens * keys * d    # logits and weighted sum
          + 4.0 * tokens * d * f)      # MLP fc1, fc2


def _head_flops(cfg: ModelConfig) -> float:
  """Box and exit head MLPs on one REG token."""
  box = exit_heads.mlp_flops(cfg, cfg.box_head_layers, 4)
  return box + sum(exit_heads.get(name).flops(cfg) for name in cfg.exit_heads)


def forward_flops(cfg: ModelConfig, text_len, tokens_per_scale: Sequence,
                  embedded_patches: Optional[Sequence] = None):
  """FLOPs of one sample's forward pass given each block's token count.

  text_len: text tokens run (scalar or array). tokens_per_scale: S block lengths,
  each including REG_s and, where present, the merged token (scalars or arrays of
  one shape). embedded_patches: patches run through the patch embedding per scale
  (default: every patch, as the dense path does).
  Returns a float, or an array of the broadcast shape of the counts.
  """
  if len(tokens_per_scale) != cfg.num_scales:
    raise ValueError(f"need {cfg.num_scales} block sizes, got {len(tokens_per_scale)}")
  if embedded_patches is None:
    embedded_patches = cfg.num_patches
  d, layers = cfg.hidden_size, cfg.num_layers
  patch_dim = cfg.patch_size ** 2 * 3
  text = np.asarray(text_len, np.float64)
  # Text: every layer but the last in full; the last only feeds the cache (K, V).
  total = (layers - 1) * _layer_flops(cfg, text, text) + 4.0 * text * d * d
  cache = text
  for s in range(cfg.num_scales):
    t = np.asarray(tokens_per_scale[s], np.float64)
    total = total + layers * _layer_flops(cfg, t, cache + t)
    total = total + 2.0 * np.asarray(embedded_patches[s], np.float64) * patch_dim * d
    total = total + 2.0 * (t - 1) * d   # selection head on every non-REG token
    total = total + _head_flops(cfg)
    cache = cache + t
  return float(total) if np.ndim(total) == 0 else total


def dense_tokens(cfg: ModelConfig) -> tuple[int, ...]:
  """Block lengths of the dense path: REG + every patch."""
  return tuple(1 + n for n in cfg.num_patches)


def sparse_tokens_as_run(cfg: ModelConfig,
                         capacities: Optional[Sequence[int]] = None) -> tuple[int, ...]:
  """Block lengths the compiled sparse program computes: REG + capacity (+ merged).

  capacities: slots per scale (default `cfg.capacities`; e.g. the bucket a run chose).
  """
  capacities = cfg.capacities if capacities is None else tuple(capacities)
  if len(capacities) != cfg.num_scales:
    raise ValueError(f"need {cfg.num_scales} capacities, got {len(capacities)}")
  return tuple(1 + c + (1 if s > 0 else 0) for s, c in enumerate(capacities))


def _taken_per_scale(cfg: ModelConfig, taken_counts) -> list:
  taken = np.asarray(taken_counts, np.float64)
  if taken.shape[-1] != cfg.num_scales:
    raise ValueError(f"taken_counts needs a last axis of {cfg.num_scales}, got {taken.shape}")
  return [taken[..., s] for s in range(cfg.num_scales)]


def sparse_tokens_effective(cfg: ModelConfig, taken_counts) -> list:
  """Block lengths a scan needs: REG + taken (+ merged if anything was replaced).

  taken_counts: [..., S] real tokens per scale (e.g. `out.taken[s].sum(-1)` stacked).
  """
  blocks = []
  for s, (taken, n) in enumerate(zip(_taken_per_scale(cfg, taken_counts), cfg.num_patches)):
    merged = (taken < n).astype(np.float64) if s > 0 else 0.0
    blocks.append(1.0 + taken + merged)
  return blocks


def dense_flops(cfg: ModelConfig, text_len):
  """FLOPs per sample of the dense path (independent of the selection)."""
  return forward_flops(cfg, text_len, dense_tokens(cfg))


def sparse_flops_as_run(cfg: ModelConfig, text_len,
                        capacities: Optional[Sequence[int]] = None):
  """FLOPs per sample the compiled sparse program executes, whatever the selection.

  Every slot is computed: REG, `capacities[s]` patch slots (padding slots included),
  the merged token, and `text_len` text tokens (the padded length the program runs).
  capacities: static slots per scale, default `cfg.capacities` (every patch when
  `cfg.capacity` is None); pass a bucket's capacities for a bucketed run.
  """
  capacities = cfg.capacities if capacities is None else tuple(capacities)
  return forward_flops(cfg, text_len, sparse_tokens_as_run(cfg, capacities), capacities)


def sparse_flops(cfg: ModelConfig, text_len, taken_counts=None):
  """FLOPs per sample of the sparse path.

  taken_counts None: "as run" with `cfg.capacities` (`sparse_flops_as_run`).
  taken_counts [..., S]: "effective" (kept), each sample's actual taken counts.
  """
  if taken_counts is None:
    return sparse_flops_as_run(cfg, text_len)
  return forward_flops(cfg, text_len, sparse_tokens_effective(cfg, taken_counts),
                       _taken_per_scale(cfg, taken_counts))
