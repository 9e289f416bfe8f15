"""The training loop: resume or start, step, log, evaluate, checkpoint, stop cleanly.

`train(config, workdir)` is everything `scanformer train` does after parsing flags.
A workdir holds `config.json`, `checkpoints/`, `metrics.jsonl` and `tensorboard/`.
Rerunning the same command on a workdir resumes from its newest readable checkpoint
with the saved data-iterator position and RNG, so the result equals an uninterrupted
run. SIGTERM (preemption) saves a checkpoint at the next step and stops.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from scanformer_jax import (checkpointing, data_source, early_exit, evaluate, experiment,
                            optim, sharding as sharding_lib, train_state, train_step)
from scanformer_jax.errors import UserError
from scanformer_jax.eval_step import EvalStep
from scanformer_jax.metric_writer import MetricWriter

log = logging.getLogger(__name__)

DEVICE_KEYS = evaluate.DEVICE_KEYS
# Test hook, "<signal>@<step>" (e.g. "KILL@5", "TERM@3"): this process sends itself
# the signal right after that step (a crash or a preemption at a known point; see
# tests/test_checkpoint_resume.py).
FAULT_ENV = "SCANFORMER_TEST_FAULT"

# Configs that may change when a workdir is resumed without affecting the result.
_RESUMABLE_CHANGES = ("train.num_steps", "train.log_every", "checkpoint.", "eval.",
                      "mesh.", "data.data_dir")


@dataclasses.dataclass
class TrainResult:
  state: train_state.TrainState
  start_step: int  # 0 for a fresh run, else the step the run resumed from.
  stopped_early: bool  # SIGTERM: saved and stopped before train.num_steps.


class _StopFlag:
  """Set by SIGTERM; checked once per step (in sync across hosts when logging)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    def handler(signum, frame):
      del signum, frame
      self.requested = True
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # Not the main thread: no handler, no preemption save.
      self._previous = None
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def checkpoint_dir(config: experiment.ExperimentConfig, workdir: str) -> str:
  """`checkpoint.directory`, or `<workdir>/checkpoints` when unset."""
  if config.checkpoint.directory:
    return os.path.expanduser(config.checkpoint.directory)
  return os.path.join(workdir, "checkpoints")


def workdir_paths(workdir: str, config: experiment.ExperimentConfig) -> dict[str, str]:
  return {"config": os.path.join(workdir, "config.json"),
          "checkpoints": checkpoint_dir(config, workdir)}


def _param_shapes(model: experiment.ExperimentModelConfig) -> Any:
  """The parameter tree's shapes for `model`, computed without allocating it."""
  return jax.tree.map(lambda x: x.shape, train_state.abstract_params(model.architecture()))


def _check_resumed_config(path: str, config: experiment.ExperimentConfig) -> None:
  """Refuses a workdir whose run has other parameter shapes; warns on other changes.

  Runs before `config.json` is rewritten, so a refused command leaves the workdir
  exactly as it was.
  """
  if not os.path.exists(path):
    return
  previous_config = experiment.load_json(path)
  previous = dict(experiment.flat_items(previous_config))
  current = dict(experiment.flat_items(config))
  changed = [k for k, v in current.items()
             if previous.get(k) != v and not k.startswith(_RESUMABLE_CHANGES)]
  if not changed:
    return
  model_changes = [f"{k} {previous.get(k)!r} -> {current[k]!r}" for k in changed
                   if k.startswith("model.")]
  if model_changes and _param_shapes(previous_config.model) != _param_shapes(config.model):
    workdir = os.path.dirname(path) or "."
    raise UserError(
        f"{workdir} holds a run of a different model ({', '.join(model_changes)}); "
        f"resume it with its own config (`scanformer train --workdir {workdir}`, no "
        "--config) or start a new --workdir")
  log.warning("config differs from the one this workdir was started with in %s; "
              "resuming anyway (the run will not match an uninterrupted one)", changed)


def _vilt_loader(config: experiment.ExperimentConfig):
  if not config.model.init_from:
    return None
  path = os.path.expanduser(config.model.init_from)
  if not os.path.isdir(path):
    raise UserError(f"model.init_from={path!r} is not a directory; create it with "
                    "`scanformer convert-vilt`")

  def load(params):
    from scanformer_jax import vilt  # pylint: disable=g-import-not-at-top
    try:
      params, summary = vilt.init_scanformer_from_vilt(params, path, config.model.architecture())
    except ValueError as e:
      raise UserError(f"cannot initialise from {path}: {e}") from None
    log.info("initialised from ViLT weights: %s", summary)
    return params
  return load


def _parse_fault(spec: str) -> tuple[int, int]:
  if not spec:
    return 0, -1
  name, _, step = spec.partition("@")
  if step.startswith("save:"):  # checkpointing.py fires it inside that step's save.
    return 0, -1
  return getattr(signal, "SIG" + name.upper()), int(step)


def _host_metrics(metrics: dict[str, Any]) -> dict[str, float]:
  return {k: float(v) for k, v in sharding_lib.fetch(metrics).items()}


def _log_line(step: int, m: dict[str, float]) -> str:
  keeps = " ".join(f"{m[k]:.2f}" for k in sorted(m) if k.startswith("keep_s"))
  return (f"step {step}: loss {m['loss']:.4f} l1 {m['l1']:.4f} giou {m['giou']:.4f} "
          f"ratio {m['ratio']:.4f} keep [{keeps}] lr {m['lr']:.2e} skipped {int(m['skipped'])}")


def evaluate_params(config: experiment.ExperimentConfig, params: Any, mesh, param_shardings,
                    splits: Sequence[str], progress: bool = True,
                    step: Optional[EvalStep] = None) -> dict[str, dict]:
  """Every split's report (see evaluate.py) for `params`."""
  cfg = config.model.architecture()
  step = step or EvalStep(cfg, mesh, param_shardings)
  criterion = None
  if config.eval.exit_iou_threshold is not None and cfg.iou_head:
    criterion = early_exit.IouHeadThreshold(config.eval.exit_iou_threshold)
  return {
      split: evaluate.evaluate_batches(
          cfg, params, step, data_source.eval_batches(config, split, mesh), mesh,
          config.eval.iou_threshold, criterion, desc=f"eval {split}", progress=progress,
          blank=config.eval.blank_expressions)
      for split in splits
  }


def train(config: experiment.ExperimentConfig, workdir: str, devices=None,
          progress: bool = True) -> TrainResult:
  """Trains (or resumes) `config` in `workdir` until `train.num_steps`."""
  tc = config.train
  cfg = config.model.architecture()
  if tc.num_steps < 1 or tc.log_every < 1 or config.checkpoint.every_steps < 1:
    raise UserError("train.num_steps, train.log_every and checkpoint.every_steps must be >= 1")
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  paths = workdir_paths(workdir, config)
  is_main = jax.process_index() == 0
  # Every process checks, so that a refused resume stops all of them, not only the first.
  _check_resumed_config(paths["config"], config)
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    experiment.save_json(config, paths["config"])

  tx, schedules = optim.make_optimizer(config.optim, tc.num_steps)
  shardings = train_state.state_shardings(cfg, tx, mesh, config.mesh)
  data_iter = data_source.train_iterator(config, mesh)
  tokenizer = getattr(data_iter, "tokenizer", None)
  if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
    raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but "
                    f"model.vocab_size is {cfg.vocab_size}")
  ckpt = checkpointing.Checkpointer(paths["checkpoints"], config.checkpoint)
  state = ckpt.restore_latest(train_state.abstract_state(cfg, tx), shardings, data_iter)
  if state is None:
    state = train_state.create_train_state(cfg, tx, tc.seed, mesh, config.mesh,
                                           load_params=_vilt_loader(config))
  start = int(jax.device_get(state.step))
  if start:
    log.info("resumed from step %d in %s", start, paths["checkpoints"])

  step_fn = train_step.jit_train_step(
      train_step.make_train_step(cfg, config.loss, tx, schedules,
                                 config.train.select_warmup_steps), shardings, mesh)
  writer = MetricWriter(workdir)
  eval_step = None
  fault_signal, fault_step = _parse_fault(os.environ.get(FAULT_ENV, ""))
  stopped = False
  bar = tqdm(total=tc.num_steps, initial=start, desc="train", unit="step",
             disable=not (progress and is_main), dynamic_ncols=True)
  t_last, step_last = time.perf_counter(), start
  try:
    with _StopFlag() as stop:
      for step in range(start + 1, tc.num_steps + 1):  # `step` = updates done after it.
        batch = next(data_iter)
        state, metrics = step_fn(state, sharding_lib.to_global(
            {k: batch[k] for k in DEVICE_KEYS}, mesh))
        bar.update(1)
        if step == fault_step:
          if fault_signal == signal.SIGKILL:
            ckpt.wait()  # Let the previous save land: the kill is "between checkpoints".
          os.kill(os.getpid(), fault_signal)
        last = step == tc.num_steps
        # One process acts on SIGTERM at once; several agree at the next log step.
        stop_now = stop.requested and jax.process_count() == 1
        if step % tc.log_every == 0 or last:
          host = _host_metrics(metrics)
          now = time.perf_counter()
          host["steps_per_s"] = (step - step_last) / max(now - t_last, 1e-9)
          t_last, step_last = now, step
          writer.write(step, host)
          bar.set_postfix(loss=f"{host['loss']:.3f}", skipped=int(host["skipped"]),
                          refresh=False)
          if not progress and is_main:
            print(_log_line(step, host), flush=True)
          if jax.process_count() > 1:  # Agree on preemption at a synced point.
            requested = np.int32(stop.requested)
            stop_now = bool(multihost_utils.process_allgather(requested).max())
        if config.eval.every_steps and (step % config.eval.every_steps == 0 or last):
          eval_step = eval_step or EvalStep(cfg, mesh, shardings.params)
          reports = evaluate_params(config, state.params, mesh, shardings.params,
                                    config.data.eval_splits, progress=False, step=eval_step)
          for split, report in reports.items():
            writer.write(step, {k: v for k, v in report.items() if np.isscalar(v)},
                         prefix=f"eval/{split}/")
        if step % config.checkpoint.every_steps == 0 or last or stop_now:
          ckpt.save(state, data_iter)
        if stop_now and not last:
          log.warning("SIGTERM: saved a checkpoint at step %d and stopped", step)
          stopped = True
          break
  finally:
    bar.close()
    ckpt.close()
    writer.close()
  return TrainResult(state=state, start_step=start, stopped_early=stopped)
