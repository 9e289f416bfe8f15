"""The training loop: resume or start, step, log, evaluate, checkpoint, stop cleanly.

`train(config, workdir)` is everything `scanformer train` does after parsing flags.
A workdir holds `config.json`, `checkpoints/`, `metrics.jsonl` and `tensorboard/`
(workdir.py).
Rerunning the same command on a workdir resumes from its newest readable checkpoint
with the saved data-iterator position and RNG, so the result equals an uninterrupted
run. SIGTERM (preemption) and Ctrl-C (SIGINT) save a checkpoint at the next step and
stop; a second Ctrl-C stops at once. `config.json` is written with the first
checkpoint, so a run that fails before it leaves nothing that blocks a changed retry.
A changed `train.num_steps` on resume is refused unless `extend=True` (`--extend`):
it recomputes the learning-rate schedule over the new total.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from data_pipelines.contract import DEVICE_KEYS
from scanformer_jax import (checkpointing, config_io, data_source, evaluate, optim, prefetch,
                            sharding as sharding_lib, train_state, train_step)
from scanformer_jax import workdir as workdir_lib, workdir_lock
from scanformer_jax.config import INIT_FROM_REQUIRED, ExperimentConfig, ModelConfig
from scanformer_jax.errors import UserError
from scanformer_jax.eval_step import EvalStep
from scanformer_jax.metric_writer import MetricWriter

log = logging.getLogger(__name__)

# Called after every training step with (step, checkpointer), e.g. fault injection
# in tests (cli/train.py installs it from SCANFORMER_TEST_FAULT).
StepCallback = Callable[[int, checkpointing.Checkpointer], None]

# Configs that may change when a workdir is resumed without affecting the result.
_RESUMABLE_CHANGES = ("train.num_steps", "train.log_every", "checkpoint.", "eval.",
                      "model.capacity",  # capacity and capacity_buckets: no parameter shape
                      "mesh.", "data.data_dir")


@dataclasses.dataclass
class TrainResult:
  state: train_state.TrainState
  start_step: int  # 0 for a fresh run, else the step the run resumed from.
  stopped_early: bool  # SIGTERM or SIGINT: saved and stopped before train.num_steps.
  stop_signal: int = 0  # The signal that stopped it (signal.SIGTERM, SIGINT), else 0.


class _StopFlag:
  """Set by SIGTERM or the first SIGINT; checked once per step (in sync across hosts
  at log steps). A second SIGINT raises KeyboardInterrupt: stop now, without saving."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum = 0
    self._previous = {}

  @property
  def requested(self) -> bool:
    return bool(self.signum)

  def _handler(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum
    if signum == signal.SIGINT:
      log.warning("Ctrl-C: saving a checkpoint after this step and stopping "
                  "(Ctrl-C again: stop now, losing the steps since the last checkpoint)")

  def __enter__(self):
    for signum in self.SIGNALS:
      try:
        self._previous[signum] = signal.signal(signum, self._handler)
      except ValueError:  # Not the main thread: no handler, no save on signals.
        pass
    return self

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)


class _SkipStreak:
  """Stops a diverged run: `limit` consecutive steps with a non-finite loss/gradient.

  Each step's `finite` flag is read one step late (while the next step runs), so the
  check never stalls the device; `flush` reads the pending one (before a save).
  """

  def __init__(self, limit: int):
    self.limit = limit
    self.count = 0
    self._pending: list[tuple[int, Any]] = []

  def push(self, step: int, finite: Any) -> None:
    if not self.limit:
      return
    self._pending.append((step, finite))
    while len(self._pending) > 1:
      self._resolve(*self._pending.pop(0))

  def flush(self) -> None:
    while self._pending:
      self._resolve(*self._pending.pop(0))

  def _resolve(self, step: int, finite: Any) -> None:
    self.count = 0 if int(jax.device_get(finite)) else self.count + 1
    if self.count >= self.limit:
      raise UserError(
          f"training diverged: steps {step - self.count + 1}-{step} all had a non-finite "
          f"loss or gradient (train.max_consecutive_skipped={self.limit}); stopped without "
          "saving. Lower optim.learning_rate (or check the data) and rerun to resume from "
          "the last checkpoint")


def _param_shapes(model: ModelConfig) -> Any:
  """The parameter tree's shapes for `model`, computed without allocating it."""
  return jax.tree.map(lambda x: x.shape, train_state.abstract_params(model))


def _previous_config(path: str) -> Optional[ExperimentConfig]:
  """The config.json a workdir's run was saved with, or None for a new workdir."""
  return config_io.load_json(path) if os.path.exists(path) else None


def _check_resumed_config(path: str, config: ExperimentConfig) -> None:
  """Refuses a workdir whose run has other parameter shapes; warns on other changes.

  Runs before anything is written, so a refused command leaves the workdir exactly
  as it was.
  """
  previous_config = _previous_config(path)
  if previous_config is None:
    return
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


def _check_init_choice(config: ExperimentConfig) -> None:
  """A config that expects pretrained weights never trains from scratch by accident."""
  if config.train.init_from == INIT_FROM_REQUIRED:
    raise UserError("this config starts from pretrained ViLT weights: pass --set "
                    "train.init_from=weights/vilt-b32 (a `scanformer convert-vilt` output) or "
                    "--set train.init_from=none to train from scratch")


def _check_schedule(previous: Optional[ExperimentConfig], config: ExperimentConfig,
                    start: int, schedules: dict[str, Callable], extend: bool) -> None:
  """A resumed run keeps its learning-rate schedule unless `extend` says otherwise.

  The warmup + cosine schedule spans `train.num_steps`: changing it on resume changes
  the learning rate of every remaining step (700 -> 720 at step 700: lr ~1e-6).
  """
  total = config.train.num_steps
  if not start or previous is None or previous.train.num_steps == total:
    return
  if start >= total:
    raise UserError(f"the run is at step {start} already (train.num_steps={total}): nothing "
                    "to train; to train longer, rerun with --set train.num_steps=N --extend")
  before = previous.train.num_steps
  lr = float(schedules["lr"](start))
  if not extend:
    raise UserError(
        f"train.num_steps changed from {before} to {total} on a run at step {start}: the "
        f"warmup+cosine schedule would be recomputed over {total} steps (lr {lr:.2e} at "
        f"step {start + 1}); rerun with --extend to do that, or keep "
        f"train.num_steps={before}")
  log.warning("--extend: train.num_steps %d -> %d, learning-rate schedule recomputed over "
              "%d steps (lr %.2e at step %d)", before, total, total, lr, start + 1)


def _with_vocab_from_init(config: ExperimentConfig) -> ExperimentConfig:
  """Unset data.vocab_path takes the vocab.txt `convert-vilt` wrote into train.init_from."""
  if config.data.vocab_path or not config.train.init_from:
    return config
  vocab = os.path.join(os.path.expanduser(config.train.init_from), "vocab.txt")
  if not os.path.isfile(vocab):
    return config
  log.info("data.vocab_path: %s (from train.init_from)", vocab)
  return config.replace(data=dataclasses.replace(config.data, vocab_path=vocab))


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
      params, summary = vilt.init_scanformer_from_vilt(
          params, path, config.model, reg_from_cls=config.train.init_reg_from_vilt_cls)
    except ValueError as e:
      raise UserError(f"cannot initialise from {path}: {e}") from None
    log.info("initialised from ViLT weights: %s", summary)
    return params
  return load


def _host_metrics(metrics: dict[str, Any]) -> dict[str, float]:
  return {k: float(v) for k, v in sharding_lib.fetch(metrics).items()}


def _log_line(step: int, m: dict[str, float]) -> str:
  keeps = " ".join(f"{m[k]:.2f}" for k in sorted(m) if k.startswith("keep_s"))
  speed = (f" {m['steps_per_s']:.2f} steps/s {m['examples_per_s']:.1f} ex/s"
           if "steps_per_s" in m else "")
  return (f"step {step}: loss {m['loss']:.4f} l1 {m['l1']:.4f} giou {m['giou']:.4f} "
          f"ratio {m['ratio']:.4f} keep [{keeps}] lr {m['lr']:.2e} "
          f"skipped {int(m['skipped'])}{speed}")


def _per_scale(values: Any) -> str:
  return "/".join(f"{float(v):.3f}" for v in np.ravel(values))


def _eval_line(step: int, split: str, report: dict[str, Any]) -> str:
  """One line per split: Acc@0.5 (overall and per scale), mean IoU, keep ratios."""
  parts = [f"eval step {step} {split}:"]
  for key in sorted(report):
    if key.startswith("acc@") and not key.endswith("_per_scale"):
      parts.append(f"{key} {float(report[key]):.4f}")
      if f"{key}_per_scale" in report:
        parts.append(f"(per scale {_per_scale(report[key + '_per_scale'])})")
  if "mean_iou" in report:
    parts.append(f"mean_iou {float(report['mean_iou']):.4f}")
  if "keep_ratio" in report:
    parts.append(f"keep {_per_scale(report['keep_ratio'])}")
  if "count" in report:
    parts.append(f"({int(report['count'])} samples)")
  return " ".join(parts)


def _say(bar: tqdm, line: str) -> None:
  """Prints `line` on stdout, above the progress bar if one is shown."""
  if bar.disable:
    print(line, flush=True)
  else:
    bar.write(line)


def train(config: ExperimentConfig, workdir: str, devices=None, progress: bool = True,
          step_callbacks: Sequence[StepCallback] = (), extend: bool = False) -> TrainResult:
  """Trains (or resumes) `config` in `workdir` until `train.num_steps`.

  The first process holds `<workdir>/.lock` throughout: one run per workdir.
  extend: allow a resumed run's `train.num_steps` to differ from the one it was saved
  with (the learning-rate schedule is recomputed over the new total).
  """
  lock = (workdir_lock.WorkdirLock(workdir) if jax.process_index() == 0
          else contextlib.nullcontext())
  with lock:
    return _train_locked(config, workdir, devices, progress, step_callbacks, extend)


def _train_locked(config: ExperimentConfig, workdir: str, devices, progress: bool,
                  step_callbacks: Sequence[StepCallback], extend: bool) -> TrainResult:
  _check_init_choice(config)
  config = _with_vocab_from_init(config)
  tc = config.train
  cfg = config.model
  evaluate.exit_criterion(config)  # A bad eval.exit_criterion fails now, not at eval time.
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  config_path = workdir_lib.config_path(workdir)
  checkpoint_dir = workdir_lib.checkpoint_dir(config, workdir)
  is_main = jax.process_index() == 0
  previous = _previous_config(config_path)
  # Every process checks, so that a refused resume stops all of them, not only the first.
  _check_resumed_config(config_path, config)

  tx, schedules = optim.make_optimizer(config.optim, tc.num_steps)
  shardings = train_state.state_shardings(cfg, tx, mesh, config.mesh)
  data_iter = data_source.train_iterator(config, mesh)
  tokenizer = getattr(data_iter, "tokenizer", None)
  if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
    raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but "
                    f"model.vocab_size is {cfg.vocab_size}")
  ckpt = checkpointing.Checkpointer(checkpoint_dir, config.checkpoint)
  try:
    state = ckpt.restore_latest(train_state.abstract_state(cfg, tx), shardings, data_iter)
    start = 0 if state is None else int(jax.device_get(state.step))
    _check_schedule(previous, config, start, schedules, extend)
  except BaseException:
    ckpt.close()
    raise
  if state is None:
    state = train_state.create_train_state(cfg, tx, tc.seed, mesh, config.mesh,
                                           load_params=_vilt_loader(config))
  if start:
    log.info("resumed from step %d in %s", start, checkpoint_dir)
  if start >= tc.num_steps:
    log.info("the run finished at step %d already: nothing to train", start)

  step_fn = train_step.jit_train_step(
      train_step.make_train_step(cfg, config.loss, tx, schedules, config.train, mesh.size),
      shardings, mesh)
  # Restored above; from here on batches are taken (and checkpointed) through `batches`.
  batches = (prefetch.DevicePrefetch(data_iter, mesh, DEVICE_KEYS, tc.device_prefetch)
             if tc.device_prefetch else None)
  writer = MetricWriter(workdir)
  eval_step = None
  stop = _StopFlag()
  streak = _SkipStreak(tc.max_consecutive_skipped)
  config_written = False
  bar = tqdm(total=tc.num_steps, initial=start, desc="train", unit="step",
             disable=not (progress and is_main), dynamic_ncols=True)
  t_last, step_last = time.perf_counter(), start
  try:
    with stop:
      for step in range(start + 1, tc.num_steps + 1):  # `step` = updates done after it.
        if batches is not None:
          device_batch = next(batches)
        else:
          batch = next(data_iter)
          device_batch = sharding_lib.to_global(
              {k: batch[k] for k in DEVICE_KEYS + prefetch.extra_keys(batch)}, mesh)
        if step == start + 1:
          log.info("compiling the train step (the first step takes a while)...")
        state, metrics = step_fn(state, device_batch, step - 1)
        if step == start + 1:  # Throughput from here on: compile time excluded.
          jax.block_until_ready(metrics)
          log.info("train step compiled and ran in %.1f s", time.perf_counter() - t_last)
          t_last = time.perf_counter()
        streak.push(step, metrics["finite"])
        bar.update(1)
        for callback in step_callbacks:
          callback(step, ckpt)
        last = step == tc.num_steps
        # One process acts on a signal at once; several agree at the next log step.
        stop_now = stop.requested and jax.process_count() == 1
        if step % tc.log_every == 0 or last:
          host = _host_metrics(metrics)
          now = time.perf_counter()
          if step > step_last:
            host["steps_per_s"] = (step - step_last) / max(now - t_last, 1e-9)
            host["examples_per_s"] = host["steps_per_s"] * tc.batch_size
            t_last, step_last = now, step
          writer.write(step, host, prefix="train/")
          bar.set_postfix(loss=f"{host['loss']:.3f}", skipped=int(host["skipped"]),
                          ex_s=f"{host.get('examples_per_s', 0.0):.1f}", refresh=False)
          if not progress and is_main:
            print(_log_line(step, host), flush=True)
          if jax.process_count() > 1:  # Agree on preemption at a synced point.
            requested = np.int32(stop.signum)
            stop.signum = int(multihost_utils.process_allgather(requested).max())
            stop_now = stop.requested
        if config.eval.every_steps and (step % config.eval.every_steps == 0 or last):
          eval_step = eval_step or EvalStep(cfg, mesh, shardings.params)
          reports = evaluate.evaluate_params(config, state.params, mesh, shardings.params,
                                    config.data.eval_splits, progress=False, step=eval_step)
          for split, report in reports.items():
            writer.write(step, report, prefix=f"eval/{split}/")
            if is_main:
              _say(bar, _eval_line(step, split, report))
        if step % config.checkpoint.every_steps == 0 or last or stop_now:
          streak.flush()  # A diverged run stops here, before saving.
          if is_main and not config_written:  # With the first checkpoint (see top).
            os.makedirs(workdir, exist_ok=True)
            config_io.save_json(config, config_path)
            config_written = True
          ckpt.save(state, batches or data_iter)
        if stop_now and not last:
          name = signal.Signals(stop.signum).name
          log.warning("%s: saved a checkpoint at step %d and stopped", name, step)
          return TrainResult(state=state, start_step=start, stopped_early=True,
                             stop_signal=stop.signum)
  finally:
    if batches is not None:
      batches.close()
    bar.close()
    ckpt.close()
    writer.close()
  return TrainResult(state=state, start_step=start, stopped_early=False)
