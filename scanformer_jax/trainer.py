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
it recomputes the learning-rate schedule over the new total. A changed architecture
(same parameter shapes, another network) is refused unless `allow_model_change`; a
changed optimizer-state structure unless `reset_optimizer` (parameters restored, a
fresh optimizer state).

Divergence never reaches the disk: a checkpoint is saved only while no skip streak is
open and the parameter norm stays within `checkpoint.max_param_norm_growth` of the
last checkpoint's, so the last good checkpoint stays the newest and `max_to_keep`
cannot delete it. Multi-process runs (pods) take process 0's config, check that the
checkpoint directory is shared, and raise any setup error on every process alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from etils import epath
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
_RESUMABLE_CHANGES = ("train.num_steps", "train.log_every", "train.preemption_check_every",
                      "checkpoint.", "eval.",
                      "model.capacity",  # capacity and capacity_buckets: no parameter shape
                      "model.remat", "mesh.", "data.data_dir")
# Model settings that leave the network a checkpoint's weights belong to as it is
# (inference selection, training-only knobs, initialisers, precision); any other
# model change on resume is an architecture change.
_NOT_ARCHITECTURE = ("model.select_", "model.train_select_rule", "model.tau",
                     "model.exit_heads_stop_gradient",
                     "model.initializer_range", "model.pos_embed_init", "model.dtype")


@dataclasses.dataclass
class TrainResult:
  state: train_state.TrainState
  start_step: int  # 0 for a fresh run, else the step the run resumed from.
  stopped_early: bool  # SIGTERM or SIGINT: saved and stopped before train.num_steps.
  stop_signal: int = 0  # The signal that stopped it (signal.SIGTERM, SIGINT), else 0.


class _StopFlag:
  """Set by SIGTERM or the first SIGINT; checked once per step (agreed across hosts
  every `train.preemption_check_every` steps). A second SIGINT raises KeyboardInterrupt: stop now, without saving."""

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


def _resume_note(step: int) -> str:
  """Where a rerun of the same command starts, in parentheses."""
  return (f"(a rerun resumes from step {step}, the last checkpoint)" if step else
          "(no checkpoint yet: a rerun starts from step 0)")


class _SkipStreak:
  """Stops a diverged run: `limit` consecutive steps with a non-finite loss/gradient.

  Each step's `finite` flag is read one step late (while the next step runs), so the
  check never stalls the device; `flush` reads the pending one (before a save).
  `count` is the open streak (0: the last step read was finite).
  """

  def __init__(self, limit: int):
    self.limit = limit
    self.count = 0
    self.last_saved = 0  # The step a rerun resumes from (named in the error).
    self._pending: list[tuple[int, Any]] = []

  def push(self, step: int, finite: Any) -> None:
    self._pending.append((step, finite))
    while len(self._pending) > 1:
      self._resolve(*self._pending.pop(0))

  def flush(self) -> None:
    while self._pending:
      self._resolve(*self._pending.pop(0))

  def _resolve(self, last_step: int, finite: Any) -> None:
    """`finite`: the flag of `last_step`, or [K] flags of the K steps ending there."""
    flags = np.asarray(jax.device_get(finite)).reshape(-1)
    for step, flag in enumerate(flags, last_step - len(flags) + 1):
      self._count_one(step, bool(flag))

  def _count_one(self, step: int, finite: bool) -> None:
    self.count = 0 if finite else self.count + 1
    if self.limit and self.count >= self.limit:
      raise UserError(
          f"training diverged: steps {step - self.count + 1}-{step} all had a non-finite "
          f"loss or gradient (train.max_consecutive_skipped={self.limit}); stopped without "
          f"saving {_resume_note(self.last_saved)}; lower optim.learning_rate (or check "
          "the data) first")


@jax.jit
def _param_norm(params: Any) -> jax.Array:
  return optax.tree.norm(params)  # [] global L2 norm


def _param_shapes(model: ModelConfig) -> Any:
  """The parameter tree's shapes for `model`, computed without allocating it."""
  return jax.tree.map(lambda x: x.shape, train_state.abstract_params(model))


def _previous_config(path: str) -> Optional[ExperimentConfig]:
  """The config.json a workdir's run was saved with, or None for a new workdir."""
  return config_io.load_json(path) if os.path.exists(path) else None


def _opt_state_shapes(config: ExperimentConfig) -> Any:
  """The optimizer state's tree structure and leaf shapes for `config`."""
  tx, _ = optim.make_optimizer(config.optim, config.train.num_steps)
  opt_state = train_state.abstract_state(config.model, tx).opt_state
  return jax.tree.structure(opt_state), [x.shape for x in jax.tree.leaves(opt_state)]


def _check_resumed_config(path: str, config: ExperimentConfig,
                          allow_model_change: bool = False,
                          reset_optimizer: bool = False) -> None:
  """`_check_config_change` against the config.json at `path` (if any)."""
  _check_config_change(_previous_config(path), config, os.path.dirname(path) or ".",
                       allow_model_change, reset_optimizer)


def _check_config_change(previous_config: Optional[ExperimentConfig],
                         config: ExperimentConfig, workdir: str,
                         allow_model_change: bool = False,
                         reset_optimizer: bool = False) -> None:
  """Refuses a resume that would load the checkpoints into another network or optimizer
  state (unless allowed); warns on other changes.

  Runs before anything is written, so a refused command leaves the workdir exactly
  as it was.
  """
  if previous_config is None:
    return
  previous = dict(config_io.flat_items(previous_config))
  current = dict(config_io.flat_items(config))
  changed = [k for k, v in current.items()
             if previous.get(k) != v and not k.startswith(_RESUMABLE_CHANGES)]
  if not changed:
    return
  describe = lambda keys: ", ".join(  # noqa: E731
      f"{k} {previous.get(k)!r} -> {current[k]!r}" for k in keys)
  model_changes = [k for k in changed if k.startswith("model.")]
  if model_changes and _param_shapes(previous_config.model) != _param_shapes(config.model):
    raise UserError(
        f"{workdir} holds a run of a different model ({describe(model_changes)}); "
        f"resume it with its own config (`scanformer train --workdir {workdir}`, no "
        "--config) or start a new --workdir")
  architecture = [k for k in model_changes if not k.startswith(_NOT_ARCHITECTURE)]
  if architecture and not allow_model_change:
    raise UserError(
        f"{workdir} holds a run of another architecture ({describe(architecture)}): its "
        "weights belong to that network. Resume it with its own config (no --config), "
        "start a new --workdir, or pass --allow-model-change to train them as the new one")
  optim_changes = [k for k in changed if k.startswith("optim.")]
  if (optim_changes and not reset_optimizer
      and _opt_state_shapes(previous_config) != _opt_state_shapes(config)):
    raise UserError(
        f"{describe(optim_changes)} changes the optimizer state saved in {workdir}'s "
        "checkpoints; resume with the run's own setting, pass --reset-optimizer to "
        "restore the parameters only (a fresh optimizer state), or start a new --workdir")
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
  """Scalars of the last step (a multi-step call's metrics are stacked [K])."""
  return {k: float(np.asarray(v).reshape(-1)[-1])
          for k, v in sharding_lib.fetch(metrics).items()}


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
    if key.startswith("acc@") and isinstance(report[key], dict):  # Per expression group.
      parts.append("(" + ", ".join(f"{name} {g['acc@0.5']:.3f}"
                                   for name, g in report[key].items()) + ")")
    elif key.startswith("acc@") and not key.endswith("_per_scale"):
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
          step_callbacks: Sequence[StepCallback] = (), extend: bool = False,
          allow_model_change: bool = False, reset_optimizer: bool = False,
          from_scratch: bool = False) -> TrainResult:
  """Trains (or resumes) `config` in `workdir` until `train.num_steps`.

  The first process holds `<workdir>/.lock` (and `<checkpoint.directory>/.lock` when
  set) throughout: one run per workdir and per checkpoint directory.
  extend: allow a resumed run's `train.num_steps` to differ from the one it was saved
  with (the learning-rate schedule is recomputed over the new total).
  allow_model_change: resume with another architecture of the same parameter shapes.
  reset_optimizer: restore the parameters (and progress) only; a fresh optimizer state.
  from_scratch: start at step 0 although checkpoints were moved aside as unreadable.
  """
  options = _ResumeOptions(extend=extend, allow_model_change=allow_model_change,
                           reset_optimizer=reset_optimizer, from_scratch=from_scratch)
  with contextlib.ExitStack() as held:
    run = _Run(config, workdir, devices, progress, step_callbacks, options)
    run.setup(held)
    run.restore()
    return run.train()


@dataclasses.dataclass(frozen=True)
class _ResumeOptions:
  extend: bool = False
  allow_model_change: bool = False
  reset_optimizer: bool = False
  from_scratch: bool = False


def _agreed(fn: Callable[[], Any]) -> Any:
  """`fn()` on every process; a UserError on any process is raised on all of them with
  the same line (process order decides which), so none is left in a collective."""
  error = ""
  result = None
  try:
    result = fn()
  except UserError as e:
    error = str(e)
  errors = [e for e in sharding_lib.gather_texts(error) if e]
  if errors:
    raise UserError(errors[0])
  return result


def _config_of_process_0(config: ExperimentConfig) -> ExperimentConfig:
  """Process 0's config on every process (hosts need not share a disk or flags)."""
  if jax.process_count() == 1:
    return config
  text = sharding_lib.broadcast_text(json.dumps(config_io.to_dict(config)))
  return config_io.from_dict(json.loads(text), where="process 0's config")


def _previous_text_of_process_0(path: str) -> str:
  """The workdir's config.json text as process 0 reads it ("": a new run)."""
  text = ""
  if jax.process_index() == 0 and os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      text = f.read()
  return sharding_lib.broadcast_text(text) if jax.process_count() > 1 else text


def _parse_previous(text: str, path: str) -> Optional[ExperimentConfig]:
  if not text:
    return None
  if jax.process_count() == 1:
    return _previous_config(path)  # The file itself (the same text).
  try:
    data = json.loads(text)
  except ValueError as e:
    raise UserError(f"{path} is not valid JSON ({e})") from None
  return config_io.from_dict(data, where=path)


def _prepared(config: ExperimentConfig) -> ExperimentConfig:
  """`config` checked for choices that fail late, with its vocab resolved."""
  _check_init_choice(config)
  config = _with_vocab_from_init(config)
  evaluate.exit_criterion(config)  # A bad eval.exit_criterion fails now, not at eval time.
  return config


def _check_tokenizer(data_iter: Any, cfg: ModelConfig) -> None:
  tokenizer = getattr(data_iter, "tokenizer", None)
  if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
    raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but "
                    f"model.vocab_size is {cfg.vocab_size}")


def _build_step(config: ExperimentConfig, tx: Any, schedules: dict[str, Callable],
                shardings: train_state.TrainState, mesh: Mesh) -> Callable:
  """The compiled train step `(state, global batch) -> (state, metrics)`."""
  return train_step.jit_train_step(
      train_step.make_train_step(config.model, config.loss, tx, schedules, config.train,
                                 mesh.size),
      shardings, mesh, config.train.steps_per_call)


def _next_batch(data_iter: Any, mesh: Mesh, steps_per_call: int) -> dict[str, jax.Array]:
  """The next global batch (stacked [K, B, ...] for K steps per call), placed on the
  mesh (this process feeds its own rows)."""
  host = prefetch.take_host_batches(data_iter, DEVICE_KEYS, steps_per_call)
  return sharding_lib.to_global(host, mesh, stacked=steps_per_call > 1)


def _check_steps_per_call(config: ExperimentConfig) -> None:
  """One line unless every step boundary the loop acts on is a whole number of calls."""
  k = config.train.steps_per_call
  if k < 1:
    raise UserError(f"train.steps_per_call={k} must be >= 1")
  boundaries = {"train.num_steps": config.train.num_steps,
                "train.log_every": config.train.log_every,
                "train.select_warmup_steps": config.train.select_warmup_steps,
                "checkpoint.every_steps": config.checkpoint.every_steps,
                "eval.every_steps": config.eval.every_steps}
  bad = [f"{name}={value}" for name, value in boundaries.items() if value % k]
  if bad:
    raise UserError(f"train.steps_per_call={k} runs {k} steps per call, but "
                    f"{', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not a multiple "
                    f"of {k}")


class _Run:
  """One training run: set up (agreed by every process), restore or start, then steps
  with periodic hooks (log, evaluate, checkpoint, stop on a signal)."""

  def __init__(self, config: ExperimentConfig, workdir: str, devices, progress: bool,
               step_callbacks: Sequence[StepCallback], options: _ResumeOptions):
    self.config = config
    self.workdir = workdir
    self.devices = devices
    self.progress = progress
    self.step_callbacks = step_callbacks
    self.options = options
    self.is_main = jax.process_index() == 0
    self.config_path = workdir_lib.config_path(workdir)
    self.config_written = False
    self.run_record: Optional[dict] = None  # The checkpoint directory's owner record.
    self.eval_step: Optional[EvalStep] = None

  # Set-up and restore.

  def setup(self, held: contextlib.ExitStack) -> None:
    """Config, locks and the checkpoint directory; any error stops every process."""
    self.config = _config_of_process_0(self.config)
    self.checkpoint_dir = workdir_lib.checkpoint_dir(self.config, self.workdir)
    if self.is_main:
      _agreed(lambda: held.enter_context(workdir_lock.WorkdirLock(self.workdir)))
    else:
      _agreed(lambda: None)
    checkpointing.check_shared(self.checkpoint_dir)
    self.previous_text = _previous_text_of_process_0(self.config_path)
    self.config = _agreed(self._checked_config)
    _agreed(lambda: self._claim_checkpoint_dir(held))
    self.mesh = sharding_lib.make_mesh(self.config.mesh, self.devices)

  def _checked_config(self) -> ExperimentConfig:
    config = _prepared(self.config)
    for key in ("preemption_check_every",):
      if getattr(config.train, key) < 1:
        raise UserError(f"train.{key}={getattr(config.train, key)} must be >= 1")
    _check_steps_per_call(config)
    if config.checkpoint.max_param_norm_growth < 0:
      raise UserError(f"checkpoint.max_param_norm_growth="
                      f"{config.checkpoint.max_param_norm_growth} must be >= 0 (0: no bound)")
    self.previous = _parse_previous(self.previous_text, self.config_path)
    _check_config_change(self.previous, config, self.workdir,
                         self.options.allow_model_change, self.options.reset_optimizer)
    return config

  def _claim_checkpoint_dir(self, held: contextlib.ExitStack) -> None:
    """Process 0 locks a separate checkpoint directory and records this workdir in it."""
    if not self.is_main:
      return
    inside = self.checkpoint_dir == os.path.join(self.workdir, workdir_lib.CHECKPOINTS_DIR)
    if not inside and "://" not in self.checkpoint_dir:
      held.enter_context(workdir_lock.WorkdirLock(self.checkpoint_dir,
                                                  flag="checkpoint.directory"))
    steps = []
    path = epath.Path(self.checkpoint_dir)
    if path.exists():
      steps = [int(p.name) for p in path.iterdir() if p.name.isdigit()]
    # Written with the first checkpoint: a refused command leaves no folder behind.
    self.run_record = checkpointing.claim_directory(self.checkpoint_dir, self.workdir, steps,
                                                    inside)

  def restore(self) -> None:
    """Sets `state` and `start`: the newest readable checkpoint, or a fresh state."""
    config, tc, cfg = self.config, self.config.train, self.config.model
    self.tx, self.schedules = optim.make_optimizer(config.optim, tc.num_steps)
    self.shardings = train_state.state_shardings(cfg, self.tx, self.mesh, config.mesh)
    self.data_iter = data_source.train_iterator(config, self.mesh)
    _agreed(lambda: _check_tokenizer(self.data_iter, cfg))
    self.ckpt = checkpointing.Checkpointer(self.checkpoint_dir, config.checkpoint)
    try:
      state = self.ckpt.restore_latest(train_state.abstract_state(cfg, self.tx),
                                       self.shardings, self.data_iter,
                                       reset_optimizer=self.options.reset_optimizer)
      self.start = 0 if state is None else int(jax.device_get(state.step))
      _agreed(self._check_start)
    except BaseException:
      self.ckpt.close()
      raise
    if state is None:
      state = train_state.create_train_state(cfg, self.tx, tc.seed, self.mesh, config.mesh,
                                             load_params=_vilt_loader(config))
    elif state.opt_state is None:  # --reset-optimizer
      state = state.replace(opt_state=jax.jit(
          self.tx.init, out_shardings=self.shardings.opt_state)(state.params))
      log.warning("--reset-optimizer: parameters restored from step %d, optimizer state "
                  "initialised afresh", self.start)
    self.state = state
    self.last_saved = self.start
    self.reference_norm = float(jax.device_get(_param_norm(state.params)))
    if self.start:
      log.info("resumed from step %d in %s", self.start, self.checkpoint_dir)
    if self.start >= tc.num_steps:
      log.info("the run finished at step %d already: nothing to train", self.start)

  def _check_start(self) -> None:
    _check_schedule(self.previous, self.config, self.start, self.schedules,
                    self.options.extend)
    k = self.config.train.steps_per_call
    if self.start % k:
      raise UserError(f"the checkpoint is at step {self.start}, not a multiple of "
                      f"train.steps_per_call={k}: resume with a steps_per_call that "
                      f"divides {self.start} (e.g. 1)")
    aside = self.ckpt.moved_aside()
    if not self.start and aside and not self.options.from_scratch:
      raise UserError(
          f"no readable checkpoint in {self.checkpoint_dir}, but {len(aside)} were moved "
          f"aside as unreadable ({', '.join(aside[:3])}); pass --from-scratch to train "
          "from step 0 anyway, or use a new --workdir")

  # Steps.

  def train(self) -> TrainResult:
    """Steps from `start` to `train.num_steps`; the checkpointer is closed at the end."""
    tc = self.config.train
    try:
      self.open_loop()
      with self.stop:
        # `step` = updates done after each call of `steps_per_call` updates.
        for step in range(self.start + tc.steps_per_call, tc.num_steps + 1,
                          tc.steps_per_call):
          metrics = self.step(step)
          if self.periodic(step, metrics):
            return TrainResult(state=self.state, start_step=self.start, stopped_early=True,
                               stop_signal=self.stop.signum)
    finally:
      self.close_loop()
    return TrainResult(state=self.state, start_step=self.start, stopped_early=False)

  def open_loop(self) -> None:
    """Compiles the step (lazily) and opens what the steps use: batches, metric
    writer, progress bar, stop flag, skip streak. `bench --train --loop` drives the
    same `step` and `periodic` between `open_loop` and `close_loop`."""
    tc = self.config.train
    self.step_fn = _build_step(self.config, self.tx, self.schedules, self.shardings,
                               self.mesh)
    # Restored above; from here on batches are taken (and checkpointed) through
    # `batches`: a device prefetch, or the data iterator itself.
    self.batches = (prefetch.DevicePrefetch(self.data_iter, self.mesh, DEVICE_KEYS,
                                            tc.device_prefetch, tc.steps_per_call)
                    if tc.device_prefetch else None)
    self.writer = MetricWriter(self.workdir)
    self.stop = _StopFlag()
    self.streak = _SkipStreak(tc.max_consecutive_skipped)
    self.streak.last_saved = self.last_saved
    self.bar = tqdm(total=tc.num_steps, initial=self.start, desc="train", unit="step",
                    disable=not (self.progress and self.is_main), dynamic_ncols=True)
    self.t_last, self.step_last = time.perf_counter(), self.start

  def close_loop(self) -> None:
    for closing in ("batches", "bar", "writer"):
      if getattr(self, closing, None) is not None:
        getattr(self, closing).close()
    self.ckpt.close()

  def step(self, step: int) -> dict[str, jax.Array]:
    """The call whose updates end at `step` (`train.steps_per_call` of them) on the
    next batches; returns its (device) metrics, stacked [K] when K > 1."""
    k = self.config.train.steps_per_call
    first = step == self.start + k
    if self.batches is not None:
      batch = next(self.batches)
    else:
      batch = _next_batch(self.data_iter, self.mesh, k)
    if first:
      log.info("compiling the train step (the first step takes a while)...")
    self.state, metrics = self.step_fn(self.state, batch, step - k)
    if first:  # Throughput from here on: compile time excluded.
      jax.block_until_ready(metrics)
      log.info("train step compiled and ran in %.1f s", time.perf_counter() - self.t_last)
      self.t_last = time.perf_counter()
    self.streak.push(step, metrics["finite"])
    self.bar.update(k)
    for done in range(step - k + 1, step + 1):
      for callback in self.step_callbacks:
        callback(done, self.ckpt)
    return metrics

  # Periodic hooks.

  def periodic(self, step: int, metrics: dict[str, jax.Array]) -> bool:
    """Logs, evaluates and checkpoints when due; True: stop now (a signal)."""
    config = self.config
    last = step == config.train.num_steps
    if step % config.train.log_every == 0 or last:
      self.log_metrics(step, metrics)
    stop_now = self.stop_requested(step)
    if config.eval.every_steps and (step % config.eval.every_steps == 0 or last):
      self.evaluate(step)
    saved = False
    if step % config.checkpoint.every_steps == 0 or last or stop_now:
      saved = self.save(step)
    if stop_now and not last:
      name = signal.Signals(self.stop.signum).name
      if saved:
        log.warning("%s: saved a checkpoint at step %d and stopped", name, step)
      else:
        log.warning("%s: stopped at step %d without saving it %s", name, step,
                    _resume_note(self.last_saved))
      return True
    return False

  def stop_requested(self, step: int) -> bool:
    """Whether to stop after `step` on a signal. One process acts at once; several
    agree every `train.preemption_check_every` steps (a collective) and stop together."""
    if jax.process_count() == 1:
      return self.stop.requested
    every, k = self.config.train.preemption_check_every, self.config.train.steps_per_call
    if step // every == (step - k) // every:  # No multiple of `every` in this call.
      return False
    requested = np.int32(self.stop.signum)
    self.stop.signum = int(multihost_utils.process_allgather(requested).max())
    return self.stop.requested

  def log_metrics(self, step: int, metrics: dict[str, jax.Array]) -> None:
    host = _host_metrics(metrics)
    now = time.perf_counter()
    if step > self.step_last:
      host["steps_per_s"] = (step - self.step_last) / max(now - self.t_last, 1e-9)
      host["examples_per_s"] = host["steps_per_s"] * self.config.train.batch_size
      self.t_last, self.step_last = now, step
    self.writer.write(step, host, prefix="train/")
    self.bar.set_postfix(loss=f"{host['loss']:.3f}", skipped=int(host["skipped"]),
                         ex_s=f"{host.get('examples_per_s', 0.0):.1f}", refresh=False)
    if not self.progress and self.is_main:
      print(_log_line(step, host), flush=True)

  def evaluate(self, step: int) -> None:
    config = self.config
    self.eval_step = self.eval_step or EvalStep(config.model, self.mesh,
                                                self.shardings.params)
    reports = evaluate.evaluate_params(config, self.state.params, self.mesh,
                                       self.shardings.params, config.data.eval_splits,
                                       progress=False, step=self.eval_step)
    for split, report in reports.items():
      self.writer.write(step, report, prefix=f"eval/{split}/")
      if self.is_main:
        _say(self.bar, _eval_line(step, split, report))

  def save(self, step: int) -> bool:
    """Checkpoints a healthy state (config.json is written with the first checkpoint);
    False: not saved, a skip streak is open. A parameter norm beyond the bound stops
    the run (UserError) naming the step a rerun resumes from."""
    self.streak.flush()  # A diverged run stops here, before saving.
    if self.streak.count:
      log.warning("step %d not saved: its last %d step(s) had a non-finite loss or "
                  "gradient; the last checkpoint stays step %d", step, self.streak.count,
                  self.last_saved)
      return False
    norm = float(jax.device_get(_param_norm(self.state.params)))
    growth = self.config.checkpoint.max_param_norm_growth
    if growth and not norm <= growth * self.reference_norm:
      raise UserError(
          f"training diverged: the parameter norm at step {step} is {norm:.3g}, more than "
          f"checkpoint.max_param_norm_growth={growth:g} times {self.reference_norm:.3g} "
          f"(step {self.last_saved}); not saved {_resume_note(self.last_saved)}; lower "
          "optim.learning_rate first")
    if self.is_main and not self.config_written:  # With the first checkpoint (see top).
      os.makedirs(self.workdir, exist_ok=True)
      config_io.save_json(self.config, self.config_path)
      workdir_lib.bundle_vocab(self.config, self.workdir)  # The run predicts wherever it moves.
      self.config_written = True
    if self.is_main and self.run_record is not None:
      checkpointing.write_run_record(self.checkpoint_dir, self.run_record)
      self.run_record = None
    self.ckpt.save(self.state, self.batches or self.data_iter)
    self.reference_norm, self.last_saved = norm, step
    self.streak.last_saved = step
    return True
