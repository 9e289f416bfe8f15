"""The training loop: resume or start, step, log, evaluate, checkpoint, stop cleanly.

`train(config, workdir)` is everything `scanformer train` does after parsing flags.
A workdir holds `config.json`, `checkpoints/`, `metrics.jsonl` and `tensorboard/`
(workdir.py).
Rerunning the same command on a workdir resumes from its newest readable checkpoint
with the saved data-iterator position and RNG, so the result equals an uninterrupted
run. SIGTERM (preemption) saves a checkpoint at the next step and stops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from data_pipelines.contract import DEVICE_KEYS
from scanformer_jax import (checkpointing, config_io, data_source, evaluate, optim,
                            sharding as sharding_lib, train_state, train_step)
from scanformer_jax import workdir as workdir_lib, workdir_lock
from scanformer_jax.config import ExperimentConfig, ModelConfig
from scanformer_jax.errors import UserError
from scanformer_jax.eval_step import EvalStep
from scanformer_jax.metric_writer import MetricWriter

log = logging.getLogger(__name__)

# Called after every training step with (step, checkpointer), e.g. fault injection
# in tests (cli/train.py installs it from SCANFORMER_TEST_FAULT).
StepCallback = Callable[[int, checkpointing.Checkpointer], None]

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


def _param_shapes(model: ModelConfig) -> Any:
  """The parameter tree's shapes for `model`, computed without allocating it."""
  return jax.tree.map(lambda x: x.shape, train_state.abstract_params(model))


def _check_resumed_config(path: str, config: ExperimentConfig) -> None:
  """Refuses a workdir whose run has other parameter shapes; warns on other changes.

  Runs before `config.json` is rewritten, so a refused command leaves the workdir
  exactly as it was.
  """
  if not os.path.exists(path):
    return
  previous_config = config_io.load_json(path)
  previous = dict(config_io.flat_items(previous_config))
  current = dict(config_io.flat_items(config))
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


def _vilt_loader(config: ExperimentConfig):
  if not config.train.init_from:
    return None
  path = os.path.expanduser(config.train.init_from)
  if not os.path.isdir(path):
    raise UserError(f"train.init_from={path!r} is not a directory; create it with "
                    "`scanformer convert-vilt`")

  def load(params):
    from scanformer_jax import vilt  # pylint: disable=g-import-not-at-top
    try:
      params, summary = vilt.init_scanformer_from_vilt(params, path, config.model)
    except ValueError as e:
      raise UserError(f"cannot initialise from {path}: {e}") from None
    log.info("initialised from ViLT weights: %s", summary)
    return params
  return load


def _host_metrics(metrics: dict[str, Any]) -> dict[str, float]:
  return {k: float(v) for k, v in sharding_lib.fetch(metrics).items()}


def _log_line(step: int, m: dict[str, float]) -> str:
  keeps = " ".join(f"{m[k]:.2f}" for k in sorted(m) if k.startswith("keep_s"))
  return (f"step {step}: loss {m['loss']:.4f} l1 {m['l1']:.4f} giou {m['giou']:.4f} "
          f"ratio {m['ratio']:.4f} keep [{keeps}] lr {m['lr']:.2e} skipped {int(m['skipped'])}")


def train(config: ExperimentConfig, workdir: str, devices=None, progress: bool = True,
          step_callbacks: Sequence[StepCallback] = ()) -> TrainResult:
  """Trains (or resumes) `config` in `workdir` until `train.num_steps`.

  The first process holds `<workdir>/.lock` throughout: one run per workdir.
  """
  lock = (workdir_lock.WorkdirLock(workdir) if jax.process_index() == 0
          else contextlib.nullcontext())
  with lock:
    return _train_locked(config, workdir, devices, progress, step_callbacks)


def _train_locked(config: ExperimentConfig, workdir: str, devices, progress: bool,
                  step_callbacks: Sequence[StepCallback]) -> TrainResult:
  tc = config.train
  cfg = config.model
  if tc.num_steps < 1 or tc.log_every < 1 or config.checkpoint.every_steps < 1:
    raise UserError("train.num_steps, train.log_every and checkpoint.every_steps must be >= 1")
  evaluate.exit_criterion(config)  # A bad eval.exit_criterion fails now, not at eval time.
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  config_path = workdir_lib.config_path(workdir)
  checkpoint_dir = workdir_lib.checkpoint_dir(config, workdir)
  is_main = jax.process_index() == 0
  # Every process checks, so that a refused resume stops all of them, not only the first.
  _check_resumed_config(config_path, config)
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    config_io.save_json(config, config_path)

  tx, schedules = optim.make_optimizer(config.optim, tc.num_steps)
  shardings = train_state.state_shardings(cfg, tx, mesh, config.mesh)
  data_iter = data_source.train_iterator(config, mesh)
  tokenizer = getattr(data_iter, "tokenizer", None)
  if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
    raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but "
                    f"model.vocab_size is {cfg.vocab_size}")
  ckpt = checkpointing.Checkpointer(checkpoint_dir, config.checkpoint)
  state = ckpt.restore_latest(train_state.abstract_state(cfg, tx), shardings, data_iter)
  if state is None:
    state = train_state.create_train_state(cfg, tx, tc.seed, mesh, config.mesh,
                                           load_params=_vilt_loader(config))
  start = int(jax.device_get(state.step))
  if start:
    log.info("resumed from step %d in %s", start, checkpoint_dir)

  step_fn = train_step.jit_train_step(
      train_step.make_train_step(cfg, config.loss, tx, schedules, config.train),
      shardings, mesh)
  writer = MetricWriter(workdir)
  eval_step = None
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
        for callback in step_callbacks:
          callback(step, ckpt)
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
          reports = evaluate.evaluate_params(config, state.params, mesh, shardings.params,
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
