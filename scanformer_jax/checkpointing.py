"""One orbax `CheckpointManager` per workdir: params, optimizer state, progress (step,
RNG, skipped count) and the grain iterator state, saved together.

Saves are asynchronous (training continues while arrays are written) and atomic
(orbax writes a temporary directory and renames it when complete; leftovers of a
killed save are deleted on start). Each checkpoint's metadata carries a checksum of
every array, so same-size garbage in an array file is caught on restore.

A checkpoint that fails to restore (unreadable files, a wrong checksum, non-finite
values) is skipped with a warning in favour of the previous one. A training run also
moves it aside to `<step>.corrupt-<time>` (never deleted), so that step is trained
and saved again instead of shadowing every later resume. If no checkpoint restores,
that is a user error (e.g. the checkpoint belongs to another config).

A checkpoint saved with another tree structure (an optimiser setting that changes the
optimizer state, a model with other parameters) is not corrupt: nothing is moved and
the restore stops with one line. `RUN_FILE` in the directory names the workdir that
owns it (another workdir is refused) and the format version: checkpoints written
since that version must carry checksums, so a step whose metadata went missing
counts as unverifiable (skipped like a corrupt one).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import time
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from scanformer_jax import param_layout, sharding as sharding_lib
from scanformer_jax.errors import UserError
from scanformer_jax.config import CheckpointConfig
from scanformer_jax.train_state import TrainState

log = logging.getLogger(__name__)

ITEMS = ("params", "opt_state", "progress", "data")
# In the checkpoint directory: {"workdir": owner, "format": FORMAT, "checksums_since": step}.
RUN_FILE = "scanformer_run.json"
FORMAT = 1  # 1: every step saved from `checksums_since` on carries checksums.
# orbax's per-step metadata file (holds our custom metadata, i.e. the checksums).
_STEP_METADATA = "_CHECKPOINT_METADATA"


class _ExpectedOrbaxNotices(logging.Filter):
  """Drops orbax's (absl) warnings about what we ask for on purpose: a read-only
  manager is read only, and a params-only restore leaves the other items alone."""

  _PREFIXES = ("CheckpointManagerOptions.read_only=True, setting",
               "Given directory is read only=")
  _SKIPPED_ITEM = 'Item "%s" was found in the checkpoint, but could not'

  def filter(self, record: logging.LogRecord) -> bool:
    msg = str(record.msg)
    if msg.startswith(self._PREFIXES):
      return False
    args = record.args if isinstance(record.args, tuple) else ()
    return not (msg.startswith(self._SKIPPED_ITEM) and args and args[0] in ITEMS[1:])


@contextlib.contextmanager
def _expected_notices_quiet() -> Iterator[None]:
  """Silences only `_ExpectedOrbaxNotices` on the absl logger, for the block."""
  logger, quiet = logging.getLogger("absl"), _ExpectedOrbaxNotices()
  logger.addFilter(quiet)
  try:
    yield
  finally:
    logger.removeFilter(quiet)
# Checked items: their checksums go into each step's custom metadata.
_CHECKED = ("params", "opt_state", "progress")
# The trainer's test hook; this module handles its "<signal>@save:<step>" form: the
# signal fires while step <step>'s checkpoint is being written (all arrays are in the
# temporary directory, which is not yet renamed), i.e. a crash in the middle of a save.
FAULT_ENV = "SCANFORMER_TEST_FAULT"
_FAULT_SAVE_PREFIX = "save:"


def _grain_checkpoint() -> Any:
  """grain's checkpoint handlers, imported where the data item is saved or restored:
  a parameters-only restore (eval, prediction) starts ~0.5 s sooner without grain."""
  import grain  # pylint: disable=g-import-not-at-top
  return grain.checkpoint


def _with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _words(x: Any, xp: Any) -> Any:
  """`x`'s bits as uint32 words (`xp` is numpy or jax.numpy; 8-byte values give two)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == np.bool_:
    return x.astype(xp.uint32)
  unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[x.dtype.itemsize]
  if xp is np:
    words = x.view(unsigned)
    if x.dtype.itemsize == 8:
      words = words.reshape(x.shape + (2,))
    return words.astype(np.uint32)
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_checksum(x: jax.Array) -> jax.Array:
  """[2] uint32: the sum of the leaf's 32-bit words and their position-weighted sum."""
  words = _words(x, jnp)
  # Flat index from iotas (no reshape, so sharded leaves stay sharded); uint32 wraps.
  index = jnp.zeros(words.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(words.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * np.uint32(
        stride % 2**32)
    stride *= words.shape[axis]
  weighted = words * (index * np.uint32(2) + np.uint32(1))
  return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(weighted, dtype=jnp.uint32)])


def _leaf_checksum_host(x: np.ndarray) -> np.ndarray:
  """`_leaf_checksum` of a host array, computed by numpy (same wrapping uint32 sums)."""
  words = _words(x, np).reshape(-1)  # [N]
  index = (np.arange(words.size, dtype=np.uint64) % 2**32).astype(np.uint32)  # [N]
  with np.errstate(over="ignore"):
    weighted = words * (index * np.uint32(2) + np.uint32(1))
  return np.stack([np.sum(words, dtype=np.uint32), np.sum(weighted, dtype=np.uint32)])


def _leaf_finite(x: jax.Array) -> jax.Array:
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.all(jnp.isfinite(x))
  return jnp.bool_(True)


@jax.jit
def _inspect(tree: Any) -> tuple[Any, jax.Array]:
  """Per-leaf checksums of `tree` and whether every floating value is finite."""
  finite = [_leaf_finite(x) for x in jax.tree.leaves(tree)]
  return (jax.tree.map(_leaf_checksum, tree),
          jnp.all(jnp.stack(finite)) if finite else jnp.bool_(True))


def _inspect_host(tree: Any) -> tuple[Any, bool]:
  """`_inspect` of arrays in host memory, by numpy: no program to trace, compile or load
  from the cache (a prediction's start is ~1 s shorter)."""
  arrays = jax.tree.map(lambda x: np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key) else x), tree)
  finite = all(bool(np.isfinite(x).all()) for x in jax.tree.leaves(arrays)
               if jnp.issubdtype(x.dtype, jnp.inexact))
  return jax.tree.map(_leaf_checksum_host, arrays), finite


def _in_host_memory(tree: Any) -> bool:
  return all(not isinstance(x, jax.Array) or (
      x.is_fully_addressable and all(d.platform == "cpu" for d in x.devices()))
      for x in jax.tree.leaves(tree))


def checksums(items: dict[str, Any]) -> tuple[dict[str, dict[str, str]], bool]:
  """`{item: {leaf path: hex checksum}}` of `items` and whether all values are finite.

  Arrays in this process's host memory are hashed by numpy; others (accelerators,
  arrays sharded across processes) by a jitted program where they live."""
  if _in_host_memory(items):
    sums, finite = _inspect_host(items)
  else:
    sums, finite = sharding_lib.fetch(_inspect(items))
  flat = jax.tree_util.tree_flatten_with_path(sums, is_leaf=lambda x: isinstance(
      x, np.ndarray))[0]
  out: dict[str, dict[str, str]] = {}
  for path, value in flat:
    item, rest = path[0].key, jax.tree_util.keystr(path[1:])
    out.setdefault(item, {})[rest] = f"{int(value[0]):08x}{int(value[1]):08x}"
  return out, bool(finite)


def _is_disk_full(e: Optional[BaseException]) -> bool:
  """Whether `e` or anything it was raised from is an out-of-space error."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


def _all_hosts_agree(ok: bool) -> bool:
  """True only if `ok` on every process (a per-host file may be the broken one)."""
  if jax.process_count() == 1:
    return ok
  return bool(multihost_utils.process_allgather(np.int32(ok)).min())


def _save_fault() -> Optional[tuple[int, int]]:
  """(signal, step) of a "<signal>@save:<step>" `FAULT_ENV`, else None."""
  name, _, at = os.environ.get(FAULT_ENV, "").partition("@")
  if not at.startswith(_FAULT_SAVE_PREFIX):
    return None
  return getattr(signal, "SIG" + name.upper()), int(at[len(_FAULT_SAVE_PREFIX):])


class CorruptCheckpointError(Exception):
  """A checkpoint whose files read back but hold other values than were saved."""


def _is_structure_mismatch(e: BaseException) -> bool:
  """orbax's error for a target tree with other keys than the saved one."""
  return "tree structures do not match" in str(e)


def read_run_record(directory: str) -> dict[str, Any]:
  """The directory's `RUN_FILE` ({} if there is none or it is unreadable)."""
  try:
    return json.loads((epath.Path(directory) / RUN_FILE).read_text())
  except Exception:  # pylint: disable=broad-except  # Missing or garbage: no record.
    return {}


def claim_directory(directory: str, workdir: str, steps: list[int],
                    inside_workdir: bool = False) -> Optional[dict]:
  """The record naming `workdir` the owner of checkpoint `directory`, to write with the
  first checkpoint (`write_run_record`; None: it is there already); another owner:
  UserError. Nothing is written here, so a refused command leaves no folder behind.

  `steps`: the steps in it already. inside_workdir: the directory is the workdir's own
  (`<workdir>/checkpoints`), which a copied or moved workdir takes over. A directory without a record that holds steps
  was written before records existed: its steps up to the newest are not required
  to carry checksums.
  """
  owner = os.path.abspath(workdir)
  record = read_run_record(directory)
  if record.get("workdir") not in (None, owner) and not inside_workdir:
    raise UserError(
        f"checkpoint directory {directory} belongs to the run in workdir "
        f"{record['workdir']}; resume that one (--workdir {record['workdir']}) or set "
        f"another checkpoint.directory (to hand it over, delete {RUN_FILE} in it)")
  since = record.get("checksums_since", max(steps) + 1 if steps and not record else 0)
  wanted = {"workdir": owner, "format": FORMAT, "checksums_since": since}
  return None if record == wanted else wanted


def write_run_record(directory: str, record: dict) -> None:
  """Writes what `claim_directory` returned into the checkpoint directory."""
  path = epath.Path(directory)
  path.mkdir(parents=True, exist_ok=True)
  (path / RUN_FILE).write_text(json.dumps(record) + "\n")


class Checkpointer:
  """Save/restore `TrainState` + data iterator under `<workdir>/checkpoints`."""

  def __init__(self, directory: str, cfg: CheckpointConfig = CheckpointConfig(),
               read_only: bool = False):
    if cfg.max_to_keep < 1:
      raise UserError(f"checkpoint.max_to_keep={cfg.max_to_keep} must be >= 1 (the "
                      "number of newest checkpoints kept)")
    # Local paths made absolute (orbax needs that); gs://... and other URLs as given.
    local = "://" not in directory
    self.directory = os.path.abspath(directory) if local else directory
    if read_only and local and not os.path.isdir(self.directory):
      raise UserError(f"no checkpoints in {self.directory}: train first "
                      "(scanformer train --config ... --workdir ...)")
    self.read_only = read_only
    self._restored_step: Optional[int] = None
    self._saving_step: Optional[int] = None
    self._fault = _save_fault()
    async_options = None
    if self._fault and cfg.async_save:
      async_options = ocp.AsyncOptions(post_finalization_callback=self._inject_save_fault)
    quiet = _expected_notices_quiet() if read_only else contextlib.nullcontext()
    with self._storage_errors("creating the checkpoint directory"), quiet:
      options = ocp.CheckpointManagerOptions(
          max_to_keep=cfg.max_to_keep, enable_async_checkpointing=cfg.async_save,
          async_options=async_options, create=not read_only, read_only=read_only,
          cleanup_tmp_directories=not read_only)
      self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  @contextlib.contextmanager
  def _storage_errors(self, what: str) -> Iterator[None]:
    """A full disk becomes one line naming the directory; other errors pass through."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except  # Re-raised unless disk full.
      if not _is_disk_full(e):
        raise
      raise UserError(
          f"no space left on the device of {self.directory} ({what}); free space or set "
          "checkpoint.directory, then rerun the same command: it resumes from the last "
          "complete checkpoint") from None

  def _inject_save_fault(self) -> None:
    signum, step = self._fault
    if self._saving_step == step:
      log.warning("%s: signal %d while writing the checkpoint of step %d", FAULT_ENV,
                  signum, step)
      os.kill(os.getpid(), signum)

  def _move_aside(self, step: int, reason: str) -> None:
    """Renames step `step` to `<step>.corrupt-<time>` (process 0), so it can be redone."""
    path = epath.Path(self.directory) / str(step)
    target = path.parent / f"{step}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
    if jax.process_index() == 0 and path.exists():
      path.rename(target)
      log.warning("moved checkpoint step %d aside to %s (%s); it will be saved again",
                  step, target, reason)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"scanformer_checkpoint_move_aside_{step}")
    self.manager.reload()

  def save(self, state: TrainState, data_iterator: Any,
           extra_metadata: Optional[dict[str, Any]] = None) -> None:
    """Starts an async save of `state` (all hosts must call it, at the same step).

    A step directory that exists already and is not the one this run resumed from
    (a stray or incomplete one) is moved aside and written anew. A non-finite state
    is refused (UserError): it would only shadow the good checkpoints.
    """
    step = int(jax.device_get(state.step))
    if step in self.manager.all_steps():
      if step == self._restored_step:
        return  # On disk already: this run resumed from it.
      self._move_aside(step, "replaced by a new save of that step")
    progress = {"step": state.step, "rng": state.rng, "skipped": state.skipped}
    sums, finite = checksums({"params": state.params, "opt_state": state.opt_state,
                              "progress": progress})
    if not finite:  # It could never be restored (see `_verify`); keep the older ones.
      raise UserError(
          f"training diverged: the parameters or optimizer state at step {step} are not "
          f"finite, so no checkpoint is saved (those in {self.directory} are kept); lower "
          "optim.learning_rate or resume from an earlier step with another config")
    self.wait()  # orbax would wait for the previous save anyway; this names its step.
    self._saving_step = step
    with self._storage_errors(f"saving step {step}"):
      self.manager.save(step, force=True,
                        custom_metadata={"checksums": sums, **(extra_metadata or {})},
                        args=ocp.args.Composite(
                            params=ocp.args.StandardSave(state.params),
                            opt_state=ocp.args.StandardSave(state.opt_state),
                            progress=ocp.args.StandardSave(progress),
                            data=_grain_checkpoint().CheckpointSave(data_iterator)))

  def _verify(self, step: int, restored: dict[str, Any]) -> None:
    """Raises CorruptCheckpointError if `restored` differs from what step `step` saved."""
    sums, finite = checksums(restored)
    if not finite:
      raise CorruptCheckpointError("non-finite values in the restored arrays")
    saved = self.custom_metadata(step).get("checksums")
    if saved is None:
      if self._checksums_required(step):
        raise CorruptCheckpointError("no checksums in its metadata: unverifiable")
      log.warning("checkpoint step %d in %s predates checksums: restored unverified",
                  step, self.directory)
      return
    for item, leaves in sums.items():
      bad = [k for k, v in leaves.items() if saved.get(item, {}).get(k) != v]
      if bad:
        raise CorruptCheckpointError(
            f"{item} checksum mismatch in {len(bad)} array(s), e.g. {bad[0] or '(root)'}")

  def custom_metadata(self, step: int) -> dict[str, Any]:
    """What `save` recorded with step `step` ({} if its metadata file is gone)."""
    if not (epath.Path(self.directory) / str(step) / _STEP_METADATA).exists():
      return {}
    return self.manager.metadata(step).custom_metadata or {}

  def _checksums_required(self, step: int) -> bool:
    """Whether step `step` was saved by a version that writes checksums (`RUN_FILE`),
    or lost orbax's metadata file (which every version writes)."""
    if not (epath.Path(self.directory) / str(step) / _STEP_METADATA).exists():
      return True
    record = read_run_record(self.directory)
    return bool(record) and step >= record.get("checksums_since", 0)

  def _restore_step(self, step: int, target: TrainState, shardings: TrainState,
                    data_iterator: Any, reset_optimizer: bool = False) -> TrainState:
    """Step `step` restored into `target`'s shapes; with `reset_optimizer` the optimizer
    state is not read (returned as None: the caller initialises it)."""
    progress = {"step": target.step, "rng": target.rng, "skipped": target.skipped}
    progress_sh = {"step": shardings.step, "rng": shardings.rng, "skipped": shardings.skipped}
    items = dict(
        params=ocp.args.StandardRestore(_with_shardings(target.params, shardings.params)),
        progress=ocp.args.StandardRestore(_with_shardings(progress, progress_sh)),
        data=_grain_checkpoint().CheckpointRestore(data_iterator))
    if not reset_optimizer:
      items["opt_state"] = ocp.args.StandardRestore(
          _with_shardings(target.opt_state, shardings.opt_state))
    with _expected_notices_quiet() if reset_optimizer else contextlib.nullcontext():
      out = self.manager.restore(step, args=ocp.args.Composite(**items))
      self._verify(step, {k: out[k] for k in _CHECKED if k in items})
    p = out["progress"]
    return TrainState(step=p["step"], params=out["params"],
                      opt_state=None if reset_optimizer else out["opt_state"],
                      rng=p["rng"], skipped=p["skipped"])

  def check_layout(self, step: int) -> None:
    """UserError naming the fix when step `step` holds the parameter layout from before
    params["backbone"] (param_layout.py); nothing if its metadata cannot be read."""
    try:
      names = list(self.manager.item_metadata(step)["params"].keys())
    except Exception:  # pylint: disable=broad-except  # Unreadable: the caller reports it.
      return
    param_layout.check(names, f"checkpoint step {step} in {self.directory}")

  def moved_aside(self) -> list[str]:
    """Names of the checkpoints moved aside as unreadable (`<step>.corrupt-<time>`)."""
    path = epath.Path(self.directory)
    if not path.exists():
      return []
    return sorted(p.name for p in path.iterdir() if ".corrupt-" in p.name)

  def restore_latest(self, abstract: TrainState, shardings: TrainState,
                     data_iterator: Any, reset_optimizer: bool = False
                     ) -> Optional[TrainState]:
    """The newest checkpoint that restores (None if there are none).

    `abstract`: shapes of the state (`train_state.abstract_state`); the data iterator
    is set to its saved position in place. Unless read-only, a newer checkpoint that
    fails is moved aside (see the module docstring); one saved with another tree
    structure stops the restore (UserError) and is left as it is.
    reset_optimizer: the optimizer state is not restored (None in the result).
    """
    steps = self.all_steps()
    errors = []
    for step in reversed(steps):
      state, error = None, None
      try:
        state = self._restore_step(step, abstract, shardings, data_iterator,
                                   reset_optimizer)
      except Exception as e:  # pylint: disable=broad-except  # Any unreadable checkpoint.
        error = e
      if not _all_hosts_agree(error is None or not _is_structure_mismatch(error)):
        self.check_layout(step)
        raise UserError(
            f"checkpoint step {step} in {self.directory} holds parameters or an optimizer "
            "state of another structure (a changed optim.* or model.* setting); nothing "
            "was moved. Resume "
            "with the run's own config, restore the parameters only with "
            "--reset-optimizer, or start a new --workdir")
      if not _all_hosts_agree(error is None):
        error = error or CorruptCheckpointError("unreadable on another process")
        errors.append((step, error))
        message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        log.warning("checkpoint at step %d in %s could not be restored (%s); "
                    "falling back to the previous one", step, self.directory, message)
        if not self.read_only:
          self._move_aside(step, message)
        continue
      if errors:
        log.warning("resumed from step %d after skipping unreadable checkpoint(s) %s",
                    step, [s for s, _ in errors])
      self._restored_step = step
      return state
    if errors:
      step, e = errors[0]
      raise UserError(
          f"no checkpoint in {self.directory} could be restored (steps {steps}); the "
          f"newest (step {step}) failed with {type(e).__name__}: "
          f"{str(e).splitlines()[0] if str(e) else ''}. If the config "
          "changed since these were written, use a new --workdir.")
    return None

  def restore_params(self, abstract_params: Any, shardings: Any,
                     step: Optional[int] = None) -> tuple[Any, int]:
    """Parameters only (evaluation, prediction): from `step` or the newest readable."""
    saved = self.all_steps()
    if not saved:
      raise UserError(f"no checkpoint found in {self.directory}: train first "
                      "(scanformer train --config ... --workdir ...)")
    if step is not None and step not in saved:
      raise UserError(f"no checkpoint at step {step} in {self.directory}; saved steps: "
                      f"{', '.join(map(str, saved))} (pass one of them to --step)")
    steps = [step] if step is not None else list(reversed(saved))
    errors = []
    for s in steps:
      try:
        with _expected_notices_quiet():  # Also while `_verify` reads the metadata.
          out = self.manager.restore(s, args=ocp.args.Composite(
              params=ocp.args.StandardRestore(_with_shardings(abstract_params, shardings))))
          self._verify(s, {"params": out["params"]})
        if errors:
          log.warning("using checkpoint step %d; newer ones were unreadable: %s", s,
                      [e for e, _ in errors])
        return out["params"], s
      except Exception as e:  # pylint: disable=broad-except
        log.warning("checkpoint at step %d could not be restored (%s: %s)", s,
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        errors.append((s, e))
    s, e = errors[0]
    self.check_layout(s)
    detail = str(e).splitlines()[0] if str(e) else ""
    raise UserError(f"checkpoint step {s} in {self.directory} does not match this model "
                    f"config or is corrupt ({type(e).__name__}: {detail}); evaluate the run "
                    "with the config it was trained with (its workdir's config.json), or "
                    "retrain")

  def wait(self) -> None:
    with self._storage_errors(f"saving step {self._saving_step}"):
      self.manager.wait_until_finished()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()


def check_shared(directory: str) -> None:
  """Every process must see one checkpoint directory (a collective; one process: no-op).

  Each process writes a token under `directory` (a fresh folder named by process 0)
  and looks for everyone's; a directory that is local to each host (not shared) stops
  every process with the same UserError.
  """
  if jax.process_count() == 1:
    return
  count, me = jax.process_count(), jax.process_index()
  nonce = sharding_lib.broadcast_text(os.urandom(8).hex())
  named = sharding_lib.broadcast_text(directory)  # Process 0's: one line on every host.
  tokens = epath.Path(directory) / f".hosts-{nonce}"
  problem = ""
  try:
    tokens.mkdir(parents=True, exist_ok=True)
    (tokens / str(me)).write_text(str(me))
  except Exception as e:  # pylint: disable=broad-except  # Reported on every host.
    problem = f"process {me} cannot write there ({type(e).__name__})"
  multihost_utils.sync_global_devices(f"scanformer_shared_dir_written_{nonce}")
  if not problem:
    missing = [i for i in range(count) if not (tokens / str(i)).exists()]
    if missing:
      problem = f"process {me} does not see the files of process(es) {missing}"
  problems = [p for p in sharding_lib.gather_texts(problem) if p]
  with contextlib.suppress(Exception):
    (tokens / str(me)).unlink()
  multihost_utils.sync_global_devices(f"scanformer_shared_dir_checked_{nonce}")
  with contextlib.suppress(Exception):
    tokens.rmdir()
  if problems:
    raise UserError(
        f"checkpoint directory {named} is not shared by the {count} processes "
        f"({problems[0]}); set checkpoint.directory to one location every host sees "
        "(e.g. gs://bucket/run/checkpoints)")
