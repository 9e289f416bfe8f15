"""Evaluate parameters on one split: sparse (or dense) scan, batched, every expression once.

Returns the split's report (`acc@0.5`, `acc@0.5_per_scale`, `mean_iou`,
`keep_ratio`, `num_dropped`, `patches_dropped`, `overflow_fraction`, `capacity_used`,
`gflops_as_run`, `gflops_kept`, `gflops_dense`, `samples_per_s` (end to end),
`model_samples_per_s` (the compiled step alone: fastest of three passes over the
first `TIMED_BATCHES` batches, already on the device), `mode`, `count`)
plus, when an early-exit criterion is given, an `early_exit` entry. GFLOPs are
analytic (`flops.py`) means per sample:
  gflops_as_run  what the compiled program executed: every slot of the capacities (or
                 buckets) each batch ran with, padded text length (dense: dense FLOPs);
  gflops_kept    the patches the selection kept, real text length (a lower bound);
  gflops_dense   the dense path at the real text length.
`overflow_fraction`: samples with any patch dropped for lack of slots;
`patches_dropped`: their total; `capacity_used`: per scale, samples per slot count.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from data_pipelines.contract import DEVICE_KEYS
from scanformer_jax import capacity, data_source, early_exit, flops, sharding as sharding_lib
from scanformer_jax.config import ExperimentConfig, ModelConfig
from scanformer_jax.errors import UserError
from scanformer_jax.eval_step import EvalStep
from scanformer_jax.metrics import RecMetrics
from scanformer_jax.timing import best_pass


def blank_expressions(batch: dict) -> dict:
  """The batch with every expression reduced to its first and last token ([CLS] [SEP])."""
  ids, mask = np.asarray(batch["text_ids"]), np.asarray(batch["text_mask"], bool)
  last = np.maximum(mask.sum(1) - 1, 1)  # [B] position of [SEP]
  rows = np.arange(len(ids))
  blank_ids = np.zeros_like(ids)
  blank_ids[:, 0] = ids[:, 0]
  blank_ids[:, 1] = ids[rows, last]
  blank_mask = np.zeros_like(mask)
  blank_mask[:, :2] = True
  return {**batch, "text_ids": blank_ids, "text_mask": blank_mask}


def gflops_report(cfg: ModelConfig, rows: dict[str, np.ndarray], mode: str
                  ) -> dict[str, float]:
  """Mean analytic GFLOPs per sample: as run, kept and dense (module docstring)."""
  if mode == "dense":
    as_run = flops.dense_flops(cfg, rows["text_len_run"])
  else:
    as_run = capacity.flops_as_run(cfg, rows["text_len_run"], rows["capacity"])
  kept = flops.sparse_flops(cfg, rows["text_len"], rows["taken"])  # [N]
  dense = flops.dense_flops(cfg, rows["text_len"])  # [N]
  return {"gflops_as_run": float(np.mean(as_run) / 1e9),
          "gflops_kept": float(np.mean(kept) / 1e9),
          "gflops_dense": float(np.mean(dense) / 1e9)}


def capacity_report(rows: dict[str, np.ndarray]) -> dict[str, Any]:
  """Drops and the slot counts (buckets) the scan ran with (module docstring)."""
  dropped = rows["num_dropped"].sum(1)  # [N]
  used = [dict(zip(*(v.tolist() for v in np.unique(c, return_counts=True))))
          for c in rows["capacity"].T]
  return {"overflow_fraction": float(np.mean(dropped > 0)),
          "patches_dropped": int(dropped.sum()),
          "capacity_used": [{str(k): int(v) for k, v in u.items()} for u in used]}


def gflops_at_exit(cfg: ModelConfig, taken: np.ndarray, text_len: np.ndarray,
                   exit_scale: np.ndarray) -> float:
  """Mean GFLOPs when sample i stops after scale exit_scale[i]."""
  total = np.zeros(len(taken))
  for e in np.unique(exit_scale):
    rows = exit_scale == e
    prefix = cfg.replace(image_sizes=cfg.image_sizes[:e + 1], capacity=None,
                         capacity_buckets=None, select_topk=None)
    total[rows] = flops.sparse_flops(prefix, text_len[rows], taken[rows, :e + 1])
  return float(total.mean() / 1e9)


TIMED_BATCHES = 8  # Batches kept on the device to time the compiled step alone.


def first_device_batches(config: ExperimentConfig, split: str, mesh: Mesh,
                         count: int = TIMED_BATCHES) -> list[dict]:
  """The split's first `count` eval batches (the device keys) on the device, in
  `data_source.eval_batches` order: what the timings run on."""
  batches = itertools.islice(data_source.eval_batches(config, split, mesh), count)
  return [sharding_lib.to_global({k: b[k] for k in DEVICE_KEYS}, mesh) for b in batches]


def refuse_non_finite(boxes: np.ndarray, what: str) -> None:
  """One line instead of NaN metrics or boxes: the weights give non-finite outputs."""
  if not np.isfinite(boxes).all():
    raise UserError(f"{what}: the model gives non-finite boxes (a diverged checkpoint?); "
                    "evaluate an earlier step with --step, or retrain with a lower "
                    "optim.learning_rate")


def collect(cfg: ModelConfig, params: Any, step: EvalStep, batches: Iterable[dict],
            mesh: Mesh, iou_threshold: float = 0.5, desc: str = "eval",
            progress: bool = True, blank: bool = False,
            groups: Optional[data_source.ExpressionGroups] = None
            ) -> tuple[RecMetrics, dict]:
  """Runs `step` over `batches` (process-local contract batches).

  Returns the accumulated per-sample results and run facts (`samples_per_s`: end to
  end, reading the data included, the first batch (compilation) left out;
  `model_samples_per_s`: the compiled step alone, `best_pass` over the first
  `TIMED_BATCHES` batches kept on the device; `duplicates`). blank=True blanks every
  expression first (`blank_expressions`). `groups`: each sample's expression group is
  stored as the row `expression_group` (`group_accuracy` reports it).
  """
  metrics = RecMetrics(cfg.num_patches, iou_threshold)
  seen_indices: list[np.ndarray] = []
  start = warm_start = time.perf_counter()
  warm_count = 0
  timed_batches: list[dict] = []  # Device batches for model_samples_per_s.
  bar = tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False,
             total=getattr(batches, "num_batches", None))  # The pipeline knows the split size.
  for i, batch in enumerate(bar):
    if blank:
      batch = blank_expressions(batch)
    device_batch = sharding_lib.to_global({k: batch[k] for k in DEVICE_KEYS}, mesh)
    host = sharding_lib.fetch(step(params, device_batch))
    refuse_non_finite(host["boxes"][np.asarray(host["valid"], bool)], "eval")
    if groups is not None:
      host["expression_group"] = _expression_groups(batch, groups, mesh)
    if len(timed_batches) < TIMED_BATCHES:
      timed_batches.append(device_batch)
    metrics.add(host)
    meta = batch.get("meta", {})
    if "index" in meta:
      local_valid = np.asarray(batch["valid"], bool)
      seen_indices.append(np.asarray(meta["index"])[local_valid])
    if i == 0:  # Exclude compilation from the throughput.
      warm_start, warm_count = time.perf_counter(), metrics.count
  elapsed = time.perf_counter() - warm_start
  timed = metrics.count - warm_count
  if timed == 0:  # A single batch: report it including compilation.
    elapsed, timed = time.perf_counter() - start, metrics.count
  facts = {"samples_per_s": float(timed / max(elapsed, 1e-9))}
  if timed_batches:
    seconds, _ = best_pass(lambda: [step(params, b) for b in timed_batches])
    rows = sum(int(np.asarray(b["valid"]).sum()) for b in timed_batches)
    facts["model_samples_per_s"] = float(rows / max(seconds, 1e-9))
  if seen_indices:
    indices = np.concatenate(seen_indices)
    facts["duplicates"] = int(len(indices) - len(np.unique(indices)))
  stats = getattr(batches, "stats", None)  # data_pipelines' DataIterator counts bad rows.
  if stats is not None:
    skipped = {reason: n for reason, n in stats.totals.items()
               if reason not in ("good", "truncated")}
    facts["skipped_bad"] = int(sum(skipped.values()))
    facts["skipped_by_reason"] = {reason: n for reason, n in skipped.items() if n}
    facts["truncated_expressions"] = int(stats.totals["truncated"])
  return metrics, facts


def _expression_groups(batch: dict, groups: data_source.ExpressionGroups,
                       mesh: Mesh) -> np.ndarray:
  """The global batch's group index per row [B] (-1: no group), from this process's
  expressions (placed like the batch, so that every process sees every row's)."""
  texts = batch["meta"]["expression"]
  local = np.array([groups.group_of(str(t)) for t in texts], np.int32)  # [B_local]
  return sharding_lib.fetch(sharding_lib.to_global({"group": local}, mesh))["group"]


def group_accuracy(metrics: RecMetrics, names: Sequence[str],
                   iou_threshold: float) -> dict[str, dict[str, float]]:
  """Acc@0.5 at the last scale and sample count per expression group (empty groups
  left out)."""
  rows = metrics.arrays()
  group, final_iou = rows["expression_group"], rows["iou"][:, -1]  # [N], [N]
  report = {}
  for index, name in enumerate(names):
    chosen = group == index
    if chosen.any():
      report[name] = {"acc@0.5": float(np.mean(final_iou[chosen] >= iou_threshold)),
                      "count": int(chosen.sum())}
  return report


def exit_scales(metrics: RecMetrics, criterion: early_exit.ExitCriterion) -> np.ndarray:
  """Per-sample exit scale [N] of `criterion` on the stored rows: the model's outputs
  only (plus the ground truth for a criterion that `uses_ground_truth`, the oracle)."""
  rows = metrics.arrays()
  if getattr(criterion, "uses_ground_truth", False):
    return criterion.exit_scale(early_exit.model_outputs(rows), rows["gt_box"])
  return criterion.exit_scale(early_exit.model_outputs(rows))


def exit_report(cfg: ModelConfig, metrics: RecMetrics,
                criterion: early_exit.ExitCriterion) -> dict[str, Any]:
  """Accuracy and GFLOPs (of the patches kept up to the exit) when every sample stops
  where `criterion` says, with the histogram of exit scales."""
  rows = metrics.arrays()
  exit_scale = exit_scales(metrics, criterion)
  at_exit = metrics.result(exit_scale)
  return {
      "criterion": getattr(criterion, "spec", criterion.name),
      "acc@0.5": at_exit["acc@0.5"],
      "mean_iou": at_exit["mean_iou"],
      "mean_exit_scale": float(exit_scale.mean()),
      "exit_histogram": np.bincount(exit_scale, minlength=cfg.num_scales).tolist(),
      "gflops": gflops_at_exit(cfg, rows["taken"], rows["text_len"], exit_scale),
  }


def evaluate_batches(cfg: ModelConfig, params: Any, step: EvalStep,
                     batches: Iterable[dict], mesh: Mesh, iou_threshold: float = 0.5,
                     criterion: Optional[early_exit.ExitCriterion] = None,
                     desc: str = "eval", progress: bool = True,
                     blank: bool = False,
                     groups: Optional[data_source.ExpressionGroups] = None
                     ) -> dict[str, Any]:
  """The report of one split (module docstring); see `collect` for the arguments.
  With `groups`, `acc@0.5_by_group`: Acc@0.5 and count per expression group."""
  metrics, facts = collect(cfg, params, step, batches, mesh, iou_threshold, desc, progress,
                           blank, groups)
  report = metrics.result()
  if metrics.count == 0:
    return report
  rows = metrics.arrays()
  report.update(gflops_report(cfg, rows, step.mode))
  report.update(capacity_report(rows))
  report["mode"] = step.mode
  report.update(facts)
  if groups is not None:
    report["acc@0.5_by_group"] = group_accuracy(metrics, groups.names, iou_threshold)
  if criterion is not None:
    report["early_exit"] = exit_report(cfg, metrics, criterion)
  return report


def parse_criterion(spec: str, cfg: ModelConfig) -> early_exit.ExitCriterion:
  """The registry's criterion for `spec`, checked against the model's outputs up front.

  A criterion that cannot run on this model (e.g. `iou_head:...` without the "iou"
  exit head) is a UserError now, not after an evaluation (or hours of training).
  """
  s = cfg.num_scales
  probe = {"boxes": np.zeros((1, s, 4), np.float32), "taken": np.zeros((1, s), np.int32),
           "num_dropped": np.zeros((1, s), np.int32), "text_len": np.ones((1,), np.int32),
           "wanted_next": np.zeros((1, s), np.float32)}
  probe.update({key: np.zeros((1, s), np.float32) for key in early_exit.model_signals(cfg)})
  try:
    criterion = early_exit.parse(spec)
    threshold = getattr(criterion, "threshold", None)
    if threshold is not None and not np.isfinite(threshold):
      raise ValueError(f"the threshold must be a finite number, got {threshold}")
    if getattr(criterion, "uses_ground_truth", False):
      criterion.exit_scale(probe, np.zeros((1, 4), np.float32))
    else:
      criterion.exit_scale(probe)
  except ValueError as e:
    raise UserError(f"exit criterion {spec!r}: {e}") from None
  return criterion


def exit_criterion(config: ExperimentConfig) -> Optional[early_exit.ExitCriterion]:
  """`eval.exit_criterion` (None: no early-exit report); see `parse_criterion`."""
  spec = config.eval.exit_criterion
  return None if spec is None else parse_criterion(spec, config.model)


def evaluate_params(config: ExperimentConfig, params: Any, mesh: Mesh, param_shardings: Any,
                    splits: Sequence[str], progress: bool = True,
                    step: Optional[EvalStep] = None, mode: str = "sparse"
                    ) -> dict[str, dict]:
  """Every split's report (module docstring) for `params`, scanned in `mode`."""
  cfg = config.model
  step = step or EvalStep(cfg, mesh, param_shardings, mode=mode)
  criterion = exit_criterion(config)
  return {
      split: evaluate_batches(
          cfg, params, step, data_source.eval_batches(config, split, mesh), mesh,
          config.eval.iou_threshold, criterion, desc=f"eval {split}", progress=progress,
          blank=config.eval.blank_expressions, groups=data_source.expression_groups(config))
      for split in splits
  }


# ---------------------------------------------------------------------------- gallery
def gallery_records(config: ExperimentConfig, params: Any, split: str, mesh: Mesh,
                    progress: bool = True) -> list:
  """Every sample's `visualize.gallery.GalleryRecord` (no pixels) of `split`.

  A second pass over the split with the sparse forward, keeping what the gallery
  shows: boxes and IoU per scale, the taken masks, the meta row (index, original
  size, letterbox) and the ground truth. Light (about a kilobyte a sample); the
  images are read again only for the samples shown (`gallery_image_loader`).
  Needs a `data_pipelines` dataset (one with meta rows) and a single process.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from scanformer_jax import forward as forward_lib  # pylint: disable=g-import-not-at-top
  from scanformer_jax.visualize.gallery import GalleryRecord  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    raise UserError("--gallery runs on one process: run eval --gallery on a single host")
  cfg = config.model

  @jax.jit
  def forward(params, batch):
    rows = forward_lib.rows(cfg, params, batch, "sparse", masks=True)
    return {"boxes": rows["boxes"], "iou": rows["iou"],  # [B, S, 4], [B, S]
            "taken": rows["taken_masks"], "pred_iou": rows.get("pred_iou")}

  batches = data_source.eval_batches(config, split, mesh)
  records = []
  bar = tqdm(batches, desc=f"gallery {split}", unit="batch", disable=not progress,
             leave=False, total=getattr(batches, "num_batches", None))
  for batch in bar:
    meta = batch.get("meta", {})
    if "orig_size" not in meta:
      raise UserError(f"--gallery needs the original images: dataset "
                      f"{config.data.dataset!r} has no meta rows; use a dataset built by "
                      "`scanformer data`")
    device_batch = sharding_lib.to_global({k: batch[k] for k in DEVICE_KEYS}, mesh)
    out = sharding_lib.fetch(forward(params, device_batch))
    for i in np.nonzero(np.asarray(batch["valid"], bool))[0]:
      row = {k: v[i] for k, v in meta.items()}
      records.append(GalleryRecord(
          sample_id=f"{split}/{int(row['index'])}", expression=str(row["expression"]),
          meta=row, boxes=out["boxes"][i], taken=tuple(t[i] for t in out["taken"]),
          gt_box=np.asarray(row["box_orig"], np.float32), iou=out["iou"][i],
          pred_iou=None if out["pred_iou"] is None else out["pred_iou"][i]))
  return records


def gallery_image_loader(config: ExperimentConfig, split: str):
  """record -> its original upright uint8 [H, W, 3] image, read from the dataset."""
  from data_pipelines import images, sources  # pylint: disable=g-import-not-at-top
  source = sources.SampleSource(config.data.dataset, split, data_source.data_dir(config))

  def load(record) -> np.ndarray:
    raw = source[int(record.meta["index"])]
    return np.asarray(images.to_rgb(images.open_image(raw["image"])), np.uint8)

  return load


def write_split_gallery(config: ExperimentConfig, params: Any, split: str, mesh: Mesh,
                        report: dict, out_dir: str, size: int,
                        progress: bool = True, workdir: Optional[str] = None,
                        step: Optional[int] = None) -> str:
  """The gallery page of `split` (`visualize/gallery.py`); returns index.html's path.

  Its header names what was evaluated: the workdir (absolute), the checkpoint step,
  the split and the report's model-only samples/s (compiled step, no compilation or
  data loading), each when known.
  """
  import os  # pylint: disable=g-import-not-at-top
  from scanformer_jax.visualize import gallery  # pylint: disable=g-import-not-at-top
  records = gallery_records(config, params, split, mesh, progress)
  if not records:
    raise UserError(f"--gallery: split {split!r} has no samples to show")
  facts = {"workdir": os.path.abspath(workdir) if workdir else None, "checkpoint_step": step,
           "split": split, "model_samples_per_s": report.get("model_samples_per_s")}
  return gallery.write_gallery(out_dir, records, report, gallery_image_loader(config, split),
                               size=size, seed=config.data.seed,
                               iou_threshold=config.eval.iou_threshold,
                               title=f"ScanFormer evaluation: {config.data.dataset} {split}",
                               run_facts={k: v for k, v in facts.items() if v is not None})
