"""The exit-aware sparse scan: samples that stop early do not pay for the finer scales.

`ExitScan(cfg, mesh, shardings, criteria)` compiles once per batch shape for a set
of criteria: which criterion runs and its threshold are arguments of the program
(the criteria's `stop` functions are the branches of a `lax.switch`), so a whole
sweep reuses one compile. After scale s the criterion (`early_exit.py`) decides which
samples stop; the samples still scanning are compacted into a sub-batch of static
size for scale s+1:
  - sub-batch sizes: `ceil(f * B)` for each fraction of `eval.exit_sub_batches`, plus
    0. Each scale s >= 1 runs the smallest that holds every sample still scanning,
    chosen inside the program (`lax.switch`: one compile, only that branch runs). Size
    0 is the batch-level exit: when every valid sample has stopped, the remaining
    scales are skipped.
  - overflow: if the largest size is below 1 and more samples are still scanning,
    the extra ones (highest batch rows first) stop at scale s-1; they are counted as
    `forced`, never silent.
The scan is the library's one loop (`scan.scan`) with `ExitPolicy`, which owns only
the compaction: the still-scanning rows are gathered (images, wanted patches, KV cache
rows), scanned by the model's own sparse step (`ScanFormer.scan_scale_inference`,
capacity buckets included), and their results gathered back into the full batch's
rows (a gather, not a scatter: XLA:CPU runs scatters row by row). A sample's answer at
its exit scale k is the full scan's scale-k output (tests/test_exit_scan.py): the scan
is causal, and every per-sample quantity depends on that sample's rows only.

With the batch sharded over several devices each device compacts its own rows
(`sharding.per_device`): its sub-batch sizes are fractions of its own rows, and the
batch-level skip happens when its own samples have all stopped. No row crosses
devices.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional, Sequence

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from scanformer_jax import box_ops, early_exit, exit_heads, selection, sharding as sharding_lib
from scanformer_jax import scan as scan_lib
from scanformer_jax.config import ModelConfig
from scanformer_jax.kv_cache import KVCache
from scanformer_jax.layers import NEG_INF
from scanformer_jax.model import ScanFormer
from scanformer_jax.pyramid import build_pyramid

def sub_batch_sizes(batch: int, fractions: Sequence[float]) -> tuple[int, ...]:
  """Static sub-batch sizes `ceil(f * batch)`, ascending and distinct, without 0."""
  if not fractions or not all(0.0 < f <= 1.0 for f in fractions):
    raise ValueError(f"exit sub-batch fractions must be in (0, 1], got {tuple(fractions)}")
  return tuple(sorted({max(1, math.ceil(f * batch)) for f in fractions}))


@flax.struct.dataclass
class _State:
  """Between scales: what the next scale wants and who is still scanning ([B] rows)."""
  wanted: jax.Array       # [B, N_s] bool, the patches scale s wants
  scores: jax.Array       # [B, N_s] float32, their priorities
  active: jax.Array       # [B] bool, still scanning
  exit_scale: jax.Array   # [B] int32
  forced: jax.Array       # [B] bool, stopped by overflow
  boxes: jax.Array        # [B, S, 4] of the scales run so far (criteria read them)
  signals: dict           # signal key -> [B, S]


@flax.struct.dataclass
class _ScaleRows:
  """One scale's results on the full batch; rows that did not run hold 0 in the
  per-row results. In `kv`, `next_wanted` and `next_scores` the rows not scanning hold
  whatever was computed or gathered for them (zeros and key bias NEG_INF when the
  scale was skipped): they are never read."""
  kv: Optional[KVCache]         # the block for the cache (None at the last scale)
  boxes: jax.Array              # [B, 4]
  signals: dict                 # signal key -> [B]
  taken: jax.Array              # [B] int32
  num_dropped: jax.Array        # [B] int32
  capacity: jax.Array           # [B] int32, patch slots run (0: not run)
  wanted_next: jax.Array        # [B] float32, fraction of scale s+1 wanted
  next_wanted: Optional[jax.Array]  # [B, N_{s+1}] bool (None at the last scale)
  next_scores: Optional[jax.Array]  # [B, N_{s+1}] float32
  ran: jax.Array                # [B] bool
  rows_run: jax.Array           # [] int32, the sub-batch size this scale ran with


@flax.struct.dataclass
class _Compaction:
  """The still-scanning rows of a batch of B gathered into a sub-batch of C slots."""
  rows: jax.Array   # [C] int32, the batch row in each slot (padding slots: any row)
  ok: jax.Array     # [C] bool, the slot holds a still-scanning row
  slot: jax.Array   # [B] int32, each row's slot (meaningful where `kept`)
  kept: jax.Array   # [B] bool, the row is in the sub-batch (still scanning)


def _stop(criterion: early_exit.ExitCriterion, signals: early_exit.ScaleSignals,
          threshold: jax.Array) -> jax.Array:
  """[B] bool: `criterion` at `threshold` (traced) on `signals`."""
  b = signals.boxes.shape[0]
  return jnp.broadcast_to(jnp.asarray(criterion.with_threshold(threshold).stop(signals), bool),
                          (b,))


class ExitScan:
  """`scan(params, batch, threshold, criterion) -> dict` of per-sample arrays (`_scan`).

  criteria: one criterion or several (distinct names); `criterion` (a name, default
  the first) picks the one that runs, `threshold` its threshold (default its own).
  """

  def __init__(self, cfg: ModelConfig, mesh: Mesh, param_shardings: Any,
               criteria: Any, sub_batches: Sequence[float] = (0.25, 0.5, 1.0),
               max_traces: Optional[int] = None):
    criteria = tuple(criteria) if isinstance(criteria, (list, tuple)) else (criteria,)
    for criterion in criteria:
      if not isinstance(criterion, early_exit.ExitCriterion):
        raise ValueError(f"exit criterion {criterion.name!r} is not an "
                         "early_exit.ExitCriterion with a `stop`: the exit path needs one")
    names = [c.name for c in criteria]
    if not criteria or len(set(names)) != len(names):
      raise ValueError(f"ExitScan needs criteria with distinct names, got {names}")
    self.cfg = cfg
    self.criteria = criteria
    self.criterion = criteria[0]
    self.sub_batches = tuple(sub_batches)
    self._model = ScanFormer(cfg)
    batch_sh = sharding_lib.batch_sharding(mesh)
    step = sharding_lib.per_device(self._scan, mesh, replicated_args=(0, 2))
    step = step if max_traces is None else chex.assert_max_traces(step, max_traces)
    replicated = sharding_lib.replicated(mesh)
    self._replicated = replicated
    self._choices: dict[tuple[int, float], tuple[jax.Array, jax.Array]] = {}
    self._jitted = jax.jit(step, in_shardings=(param_shardings, batch_sh,
                                               (replicated, replicated)),
                           out_shardings=batch_sh)

  def __call__(self, params: Any, batch: dict[str, jax.Array],
               threshold: Optional[float] = None,
               criterion: Optional[str] = None) -> dict[str, jax.Array]:
    """threshold: default the criterion's own (ignored by criteria without one)."""
    names = [c.name for c in self.criteria]
    if criterion is not None and criterion not in names:
      raise ValueError(f"exit criterion {criterion!r} is not in this program: {names}")
    which = 0 if criterion is None else names.index(criterion)
    if threshold is None:
      threshold = self.criteria[which].threshold
    threshold = 0.0 if threshold is None else threshold
    return self._jitted(params, batch, self._choice(which, float(threshold)))

  def _choice(self, which: int, threshold: float) -> tuple[jax.Array, jax.Array]:
    """The program's (criterion index, threshold) arguments, placed on every device once
    per pair: a sweep calls the program batch after batch with the same pair, and a
    fresh host scalar would be copied to the devices on every call."""
    key = (which, threshold)
    if key not in self._choices:
      pair = (np.int32(which), np.float32(threshold))
      if jax.process_count() == 1:
        pair = jax.device_put(pair, self._replicated)
      self._choices[key] = pair
    return self._choices[key]

  # ------------------------------------------------------------------ the program
  def _scan(self, params, batch, choice) -> dict[str, jax.Array]:
    """Per-sample outputs [B, ...]: `boxes` [B, S, 4] (zeros past the exit), `answer`
    [B, 4] (the exit scale's box), `iou` [B, S] / `answer_iou` [B] with the ground
    truth, `exit_scale` [B], `forced` [B] (stopped by overflow), `ran` [B, S], `rows_run`
    [B, S] (the sub-batch size each scale ran with on the row's device), `taken`,
    `num_dropped`, `capacity`, `wanted_next` [B, S], the exit heads' signals, `text_len`,
    `text_len_run` and `valid`."""
    cfg = self.cfg
    apply = functools.partial(self._model.apply, {"params": params})
    b, text_tokens = batch["text_ids"].shape
    images = build_pyramid(batch["image"].astype(jnp.float32), cfg.image_sizes)
    cache = apply(batch["text_ids"], batch["text_mask"], method=ScanFormer.encode_text)
    policy = ExitPolicy(cfg, apply, self.criteria, choice, batch["valid"].astype(bool),
                        batch["box"], (0,) + sub_batch_sizes(b, self.sub_batches))
    outs, last = scan_lib.scan(policy, images, cache)
    exit_scale = jnp.where(last.active, cfg.num_scales - 1, last.exit_scale)
    stack = lambda key: jnp.stack([getattr(o, key) for o in outs], axis=1)  # noqa: E731
    boxes = stack("boxes")  # [B, S, 4]
    answer = boxes[jnp.arange(b), exit_scale]  # [B, 4]
    result = {
        "boxes": boxes, "answer": answer,
        "iou": box_ops.iou_cxcywh(boxes, batch["box"][:, None, :]),  # [B, S]
        "answer_iou": box_ops.iou_cxcywh(answer, batch["box"]),  # [B]
        "exit_scale": exit_scale, "forced": last.forced,
        "ran": stack("ran"),  # [B, S]
        "rows_run": jnp.broadcast_to(jnp.stack([o.rows_run for o in outs]).astype(jnp.int32),
                                     (b, cfg.num_scales)),
        "taken": stack("taken"), "num_dropped": stack("num_dropped"),
        "capacity": stack("capacity"), "wanted_next": stack("wanted_next"),
        "text_len": batch["text_mask"].sum(-1).astype(jnp.int32),
        "text_len_run": jnp.full((b,), text_tokens, jnp.int32),
        "valid": batch["valid"],
    }
    for key in exit_heads.signals(cfg):
      result[key] = jnp.stack([o.signals[key] for o in outs], axis=1)  # [B, S]
    return result


@dataclasses.dataclass(frozen=True)
class ExitPolicy(scan_lib.ScanPolicy):
  """The scan policy of the exit path: after each scale the criterion stops samples;
  each scale s >= 1 runs the still-scanning rows compacted into the smallest static
  sub-batch of `sizes` that holds them (0: the scale is skipped).

  apply: `ScanFormer(cfg).apply` with the parameters bound; choice: (criterion index,
  threshold), traced; valid [B], gt_box [B, 4] (for the oracle only).
  """
  cfg: ModelConfig
  apply: Callable
  criteria: tuple
  choice: tuple
  valid: jax.Array
  gt_box: jax.Array
  sizes: tuple[int, ...]

  def first(self, batch):
    n, num_scales = self.cfg.num_patches[0], self.cfg.num_scales
    return _State(wanted=jnp.ones((batch, n), bool), scores=jnp.zeros((batch, n), jnp.float32),
                  active=self.valid, exit_scale=jnp.zeros((batch,), jnp.int32),
                  forced=jnp.zeros((batch,), bool),
                  boxes=jnp.zeros((batch, num_scales, 4), jnp.float32),
                  signals={k: jnp.zeros((batch, num_scales), jnp.float32)
                           for k in exit_heads.signals(self.cfg)})

  def run(self, s, image, state, cache):
    b = state.active.shape[0]
    if s == 0:  # Every sample reads the coarsest scale: the full batch, no compaction.
      return self._rows(s, image, state, cache, None, None).replace(
          ran=jnp.ones((b,), bool), rows_run=jnp.int32(b))
    count = state.active.sum(dtype=jnp.int32)
    branch = jnp.minimum(jnp.sum(jnp.asarray(self.sizes) < count), len(self.sizes) - 1)
    out = jax.lax.switch(branch, [functools.partial(self._sub_batch, s, image, size)
                                  for size in self.sizes], state, cache)
    return out.replace(ran=state.active, rows_run=jnp.asarray(self.sizes)[branch])

  def next(self, s, out, state):
    """The criterion's stops after scale s, then the overflow of scale s+1's sub-batch
    (the rows beyond its largest size stop at s, counted as forced)."""
    which, threshold = self.choice
    boxes = state.boxes.at[:, s].set(out.boxes)  # [B, S, 4]
    signals = {k: v.at[:, s].set(out.signals[k]) for k, v in state.signals.items()}
    uses_ground_truth = any(c.uses_ground_truth for c in self.criteria)
    seen = early_exit.ScaleSignals(
        scale=s, boxes=boxes[:, :s + 1], wanted_next=out.wanted_next,
        gt_box=self.gt_box if uses_ground_truth else None,
        heads={k: v[:, :s + 1] for k, v in signals.items()})
    stop = jax.lax.switch(which, [functools.partial(_stop, c, seen) for c in self.criteria],
                          threshold) & state.active  # [B]
    active = state.active & ~stop
    over = active & (jnp.cumsum(active) - 1 >= self.sizes[-1])  # [B] beyond the sub-batch
    return state.replace(wanted=out.next_wanted, scores=out.next_scores,
                         active=active & ~over,
                         exit_scale=jnp.where(stop | over, s, state.exit_scale),
                         forced=state.forced | over, boxes=boxes, signals=signals)

  def _sub_batch(self, s, image, size, state, cache) -> _ScaleRows:
    """Scale s for `size` compacted rows (0: skipped; the batch: in place)."""
    b = state.active.shape[0]
    if size == 0:
      return self._skipped(s, b, cache)
    if size == b:  # Every row fits: run them in place, keep the scanning ones.
      return self._rows(s, image, state, cache, None, state.active)
    order = jnp.argsort(~state.active, stable=True)  # [B] still-scanning rows first
    count = state.active.sum()
    slot = jnp.argsort(order)  # [B] each row's place in `order`: its slot when kept
    compact = _Compaction(rows=order[:size], ok=jnp.arange(size) < count,
                          slot=jnp.minimum(slot, size - 1),
                          kept=slot < jnp.minimum(count, size))
    return self._rows(s, image, state, cache, compact, None)

  def _block_length(self, s: int) -> int:
    """Tokens of scale s's block in the cache: REG, the slots, the merged token."""
    return 1 + self.cfg.max_capacities[s] + (1 if s > 0 else 0)

  def _skipped(self, s: int, b: int, cache: KVCache) -> _ScaleRows:
    """No sample scans scale s: zeros, and an empty (masked) block for the cache."""
    cfg = self.cfg
    zeros = lambda dtype=jnp.int32: jnp.zeros((b,), dtype)  # noqa: E731
    kv = next_wanted = next_scores = None
    if s < cfg.num_scales - 1:
      length = self._block_length(s)
      empty = lambda x: jnp.zeros((b, length) + x.shape[2:], x.dtype)  # noqa: E731
      kv = KVCache(keys=tuple(map(empty, cache.keys)), values=tuple(map(empty, cache.values)),
                   bias=jnp.full((b, length), NEG_INF, cache.bias.dtype))
      n_next = cfg.num_patches[s + 1]
      next_wanted = jnp.zeros((b, n_next), bool)
      next_scores = jnp.zeros((b, n_next), jnp.float32)
    return _ScaleRows(kv=kv, boxes=jnp.zeros((b, 4), jnp.float32),
                      signals={k: zeros(jnp.float32) for k in exit_heads.signals(cfg)},
                      taken=zeros(), num_dropped=zeros(), capacity=zeros(),
                      wanted_next=zeros(jnp.float32), next_wanted=next_wanted,
                      next_scores=next_scores, ran=zeros(bool), rows_run=jnp.int32(0))

  def _rows(self, s: int, image: jax.Array, state: _State, cache: KVCache,
            compact: Optional["_Compaction"], kept: Optional[jax.Array]) -> _ScaleRows:
    """Scale s for the compacted rows `compact.rows` [C], or with `compact` None every
    row in place, no gather (`kept` [B]: the rows whose results are kept, None: all).

    Results return to the batch's rows by a gather (`compact.slot`), not a scatter
    (XLA:CPU runs a scatter row by row). The rows not kept hold 0 in the per-row
    results; their cache block and next-scale selection hold whatever was computed or
    gathered for them: a stopped sample never scans again, so those are never read,
    and masking them would be a pass over the whole block for nothing.
    """
    cfg = self.cfg
    b = state.wanted.shape[0]
    if compact is None:
      kept = jnp.ones((b,), bool) if kept is None else kept
      ok = kept
      take = back = lambda x: x  # noqa: E731
    else:
      kept, ok = compact.kept, compact.ok
      take = lambda x: jnp.take(x, compact.rows, axis=0)  # noqa: E731  [B, ...] -> [C, ...]
      back = lambda x: jnp.take(x, compact.slot, axis=0)  # noqa: E731  [C, ...] -> [B, ...]
    def scatter(fill, sub):  # Rows not kept hold `fill`.
      return jnp.where(kept.reshape((b,) + (1,) * (sub.ndim - 1)),
                       back(sub).astype(fill.dtype), fill)
    def carry(sub, dtype=jnp.float32):  # Read only for rows still scanning.
      return back(sub).astype(dtype)
    zeros_like = lambda sub, dtype=None: jnp.zeros((b,) + sub.shape[1:], dtype or sub.dtype)  # noqa: E731
    put = lambda sub, dtype=jnp.float32: scatter(zeros_like(sub, dtype), sub)  # noqa: E731
    wanted = take(state.wanted) & ok[:, None]  # [C, N_s]
    scores = None if s == 0 else take(state.scores)
    out = self.apply(s, take(image), wanted, scores, jax.tree.map(take, cache),
                     method=ScanFormer.scan_scale_inference)
    heads = self.apply(out.reg, method=ScanFormer.read_heads)
    result = _ScaleRows(
        kv=None, boxes=put(heads.boxes), signals={k: put(v) for k, v in heads.signals.items()},
        taken=put(out.taken.sum(-1, dtype=jnp.int32), jnp.int32),
        num_dropped=put(out.num_dropped.astype(jnp.int32), jnp.int32),
        capacity=put(out.capacity.astype(jnp.int32), jnp.int32),
        wanted_next=jnp.zeros((b,), jnp.float32), next_wanted=None, next_scores=None,
        ran=jnp.zeros((b,), bool), rows_run=jnp.int32(0))
    if s == cfg.num_scales - 1:
      return result
    next_wanted, next_scores = selection.wanted_children(cfg, s, out.taken,
                                                         out.selection_logits)
    length = self._block_length(s)
    chex.assert_equal(out.kv.bias.shape[1], length)
    kv = KVCache(
        keys=tuple(carry(k, c.dtype) for k, c in zip(out.kv.keys, cache.keys)),
        values=tuple(carry(v, c.dtype) for v, c in zip(out.kv.values, cache.values)),
        bias=carry(out.kv.bias, cache.bias.dtype))
    n_next = cfg.num_patches[s + 1]
    return result.replace(
        kv=kv, wanted_next=put(next_wanted.sum(-1) / n_next),
        next_wanted=carry(next_wanted, bool), next_scores=carry(next_scores))
