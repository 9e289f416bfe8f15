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
The still-scanning rows are gathered (images, wanted patches, KV cache rows), scanned
by the model's own sparse step (`ScanFormer.scan_scale_inference`, capacity buckets
included), and their results scattered back to the full batch. A sample's answer at
its exit scale k is the full scan's scale-k output (tests/test_exit_scan.py): the scan
is causal, and every per-sample quantity depends on that sample's rows only.

With the batch sharded over several devices each device compacts its own rows
(`sharding.per_device`): its sub-batch sizes are fractions of its own rows, and the
batch-level skip happens when its own samples have all stopped. No row crosses
devices.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence

import chex
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from scanformer_jax import box_ops, early_exit, selection, sharding as sharding_lib
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
  """Full-batch state between scales ([B, ...] rows; rows not scanned stay as they are)."""
  cache: KVCache
  wanted: jax.Array       # [B, N_s] bool, the patches scale s wants
  scores: jax.Array       # [B, N_s] float32, their priorities
  boxes: jax.Array        # [B, S, 4]
  signals: dict           # early_exit.model_signals(cfg) -> [B, S]
  wanted_next: jax.Array  # [B, S] float32
  taken: jax.Array        # [B, S] int32
  num_dropped: jax.Array  # [B, S] int32
  capacity: jax.Array     # [B, S] int32, patch slots each scale ran with (0: not run)


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
    return self._jitted(params, batch, (jnp.int32(which), jnp.float32(threshold)))

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
    which, threshold = choice
    uses_ground_truth = any(c.uses_ground_truth for c in self.criteria)
    b, text_tokens = batch["text_ids"].shape
    num_scales = cfg.num_scales
    valid = batch["valid"].astype(bool)  # [B]
    images = build_pyramid(batch["image"].astype(jnp.float32), cfg.image_sizes)
    zeros = lambda dtype=jnp.int32: jnp.zeros((b, num_scales), dtype)  # noqa: E731
    state = _State(
        cache=apply(batch["text_ids"], batch["text_mask"], method=ScanFormer.encode_text),
        wanted=jnp.ones((b, cfg.num_patches[0]), bool),
        scores=jnp.zeros((b, cfg.num_patches[0]), jnp.float32),
        boxes=jnp.zeros((b, num_scales, 4), jnp.float32),
        signals={k: zeros(jnp.float32) for k in early_exit.model_signals(cfg)},
        wanted_next=zeros(jnp.float32), taken=zeros(), num_dropped=zeros(), capacity=zeros())
    active = valid
    exit_scale = jnp.zeros((b,), jnp.int32)
    forced = jnp.zeros((b,), bool)
    ran, rows_run = [], []
    sizes = (0,) + sub_batch_sizes(b, self.sub_batches)
    for s in range(num_scales):
      if s == 0:  # Every sample reads the coarsest scale: the full batch, no compaction.
        state = self._run_scale(apply, 0, images[0], state, None, None)
        ran.append(jnp.ones((b,), bool))
        rows_run.append(jnp.int32(b))
      else:
        # Overflow: the sub-batch cannot hold more than its largest size.
        rank = jnp.cumsum(active) - 1  # [B]
        over = active & (rank >= sizes[-1])
        exit_scale = jnp.where(over, s - 1, exit_scale)
        forced = forced | over
        active = active & ~over
        count = active.sum(dtype=jnp.int32)
        branch = jnp.minimum(jnp.sum(jnp.asarray(sizes) < count), len(sizes) - 1)
        state = jax.lax.switch(branch, [self._branch(apply, s, images[s], c) for c in sizes],
                               state, active)
        ran.append(active)
        rows_run.append(jnp.asarray(sizes)[branch])
      if s == num_scales - 1:
        exit_scale = jnp.where(active, s, exit_scale)
        break
      signals = early_exit.ScaleSignals(
          scale=s, boxes=state.boxes[:, :s + 1], wanted_next=state.wanted_next[:, s],
          gt_box=batch["box"] if uses_ground_truth else None,
          **{k: v[:, :s + 1] for k, v in state.signals.items()})
      stop = jax.lax.switch(which, [functools.partial(_stop, c, signals)
                                    for c in self.criteria], threshold) & active  # [B]
      exit_scale = jnp.where(stop, s, exit_scale)
      active = active & ~stop

    rows = jnp.arange(b)
    answer = state.boxes[rows, exit_scale]  # [B, 4]
    result = {
        "boxes": state.boxes, "answer": answer,
        "iou": box_ops.iou_cxcywh(state.boxes, batch["box"][:, None, :]),  # [B, S]
        "answer_iou": box_ops.iou_cxcywh(answer, batch["box"]),  # [B]
        "exit_scale": exit_scale, "forced": forced,
        "ran": jnp.stack(ran, axis=1),  # [B, S]
        "rows_run": jnp.broadcast_to(jnp.stack(rows_run).astype(jnp.int32), (b, num_scales)),
        "taken": state.taken, "num_dropped": state.num_dropped, "capacity": state.capacity,
        "wanted_next": state.wanted_next,
        "text_len": batch["text_mask"].sum(-1).astype(jnp.int32),
        "text_len_run": jnp.full((b,), text_tokens, jnp.int32),
        "valid": batch["valid"],
    }
    result.update(state.signals)
    return result

  def _branch(self, apply, s: int, image: jax.Array, size: int):
    """The `lax.switch` branch of scale s that scans `size` compacted rows (0: skip)."""
    def run(state: _State, active: jax.Array) -> _State:
      b = active.shape[0]
      if size == 0:
        return self._skip_scale(s, state, b)
      if size == b:  # Every row fits: run them in place, keep the scanning ones.
        return self._run_scale(apply, s, image, state, None, active)
      rows = jnp.argsort(~active, stable=True)[:size]  # [C] still-scanning rows first
      ok = jnp.arange(size) < active.sum()  # [C] the slot holds a scanning sample
      return self._run_scale(apply, s, image, state, rows, ok)
    return run

  def _block_length(self, s: int) -> int:
    """Tokens of scale s's block in the cache: REG, the slots, the merged token."""
    return 1 + self.cfg.max_capacities[s] + (1 if s > 0 else 0)

  def _skip_scale(self, s: int, state: _State, b: int) -> _State:
    """No sample scans scale s: the state with an empty (masked) block appended."""
    cfg = self.cfg
    if s == cfg.num_scales - 1:
      return state
    length = self._block_length(s)
    empty = lambda x: jnp.zeros((b, length) + x.shape[2:], x.dtype)  # noqa: E731
    block = KVCache(keys=tuple(map(empty, state.cache.keys)),
                    values=tuple(map(empty, state.cache.values)),
                    bias=jnp.full((b, length), NEG_INF, state.cache.bias.dtype))
    n_next = cfg.num_patches[s + 1]
    return state.replace(cache=state.cache.append(block),
                         wanted=jnp.zeros((b, n_next), bool),
                         scores=jnp.zeros((b, n_next), jnp.float32))

  def _run_scale(self, apply, s: int, image: jax.Array, state: _State,
                 rows: Optional[jax.Array], ok: Optional[jax.Array]) -> _State:
    """Scale s for the batch rows `rows` [C] (`ok` [C]: a real row, else padding).

    rows None: every row in place, no gather or scatter (`ok` [B]: the rows whose
    results are kept, None: all).
    """
    cfg = self.cfg
    b = state.wanted.shape[0]
    if rows is None:
      ok = jnp.ones((b,), bool) if ok is None else ok
      def keep(new, old):  # Rows not kept hold their old values.
        return jnp.where(ok.reshape((b,) + (1,) * (new.ndim - 1)), new.astype(old.dtype), old)
      take = lambda x: x  # noqa: E731
      put = lambda full, sub: full.at[:, s].set(keep(sub, full[:, s]))  # noqa: E731
      scatter = lambda full, sub: keep(sub, full)  # noqa: E731
    else:
      target = jnp.where(ok, rows, b)  # Scatters to row b are dropped.
      take = lambda x: jnp.take(x, rows, axis=0)  # noqa: E731
      put = lambda full, sub: full.at[target, s].set(sub, mode="drop")  # noqa: E731
      def scatter(full, sub):
        return full.at[target].set(sub.astype(full.dtype), mode="drop")
    wanted = take(state.wanted) & ok[:, None]  # [C, N_s]
    scores = None if s == 0 else take(state.scores)
    sub_cache = jax.tree.map(take, state.cache)
    out = apply(s, take(image), wanted, scores, sub_cache,
                method=ScanFormer.scan_scale_inference)
    heads = apply(out.reg, method=ScanFormer.read_heads)
    signals = early_exit.head_signals(heads.pred_iou, heads.halt_logit, heads.box_log_scale)
    state = state.replace(
        boxes=put(state.boxes, heads.boxes),
        signals={k: put(v, signals[k]) for k, v in state.signals.items()},
        taken=put(state.taken, out.taken.sum(-1, dtype=jnp.int32)),
        num_dropped=put(state.num_dropped, out.num_dropped.astype(jnp.int32)),
        capacity=put(state.capacity, out.capacity.astype(jnp.int32)))
    if s == cfg.num_scales - 1:
      return state
    next_wanted, next_scores = selection.wanted_children(cfg, s, out.taken,
                                                         out.selection_logits)
    length = self._block_length(s)
    chex.assert_equal(out.kv.bias.shape[1], length)
    new_block = KVCache(
        keys=tuple(scatter(jnp.zeros((b,) + k.shape[1:], c.dtype), k)
                   for k, c in zip(out.kv.keys, state.cache.keys)),
        values=tuple(scatter(jnp.zeros((b,) + v.shape[1:], c.dtype), v)
                     for v, c in zip(out.kv.values, state.cache.values)),
        bias=scatter(jnp.full((b, length), NEG_INF, state.cache.bias.dtype), out.kv.bias))
    n_next = cfg.num_patches[s + 1]
    fraction = next_wanted.sum(-1) / n_next  # [C]
    return state.replace(
        cache=state.cache.append(new_block),
        wanted=scatter(jnp.zeros((b, n_next), bool), next_wanted),
        scores=scatter(jnp.zeros((b, n_next), jnp.float32), next_scores),
        wanted_next=put(state.wanted_next, fraction))
