"""One orbax `CheckpointManager` per workdir: params, optimizer state, progress (step,
RNG, skipped count) and the grain iterator state, saved together.

Saves are asynchronous (training continues while arrays are written) and atomic
(orbax writes a temporary directory and renames it when complete; leftovers of a
killed save are deleted on start). A latest checkpoint that still fails to restore
(corrupt files) is skipped with a warning in favour of the previous one; if none
restores, that is a user error (e.g. the checkpoint belongs to another config).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp

from scanformer_jax.errors import UserError
from scanformer_jax.config import CheckpointConfig
from scanformer_jax.train_state import TrainState

log = logging.getLogger(__name__)

ITEMS = ("params", "opt_state", "progress", "data")


def _with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


class Checkpointer:
  """Save/restore `TrainState` + data iterator under `<workdir>/checkpoints`."""

  def __init__(self, directory: str, cfg: CheckpointConfig = CheckpointConfig(),
               read_only: bool = False):
    # Local paths made absolute (orbax needs that); gs://... and other URLs as given.
    local = "://" not in directory
    self.directory = os.path.abspath(directory) if local else directory
    if read_only and local and not os.path.isdir(self.directory):
      raise UserError(f"no checkpoints in {self.directory}: train first "
                      "(scanformer train --config ... --workdir ...)")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.max_to_keep, enable_async_checkpointing=cfg.async_save,
        create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, state: TrainState, data_iterator: Any) -> None:
    """Starts an async save of `state` (all hosts must call it, at the same step)."""
    step = int(jax.device_get(state.step))
    if step in self.manager.all_steps():
      return
    progress = {"step": state.step, "rng": state.rng, "skipped": state.skipped}
    self.manager.save(step, force=True, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        opt_state=ocp.args.StandardSave(state.opt_state),
        progress=ocp.args.StandardSave(progress),
        data=grain.checkpoint.CheckpointSave(data_iterator)))

  def _restore_step(self, step: int, target: TrainState, shardings: TrainState,
                    data_iterator: Any) -> TrainState:
    progress = {"step": target.step, "rng": target.rng, "skipped": target.skipped}
    progress_sh = {"step": shardings.step, "rng": shardings.rng, "skipped": shardings.skipped}
    out = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_with_shardings(target.params, shardings.params)),
        opt_state=ocp.args.StandardRestore(
            _with_shardings(target.opt_state, shardings.opt_state)),
        progress=ocp.args.StandardRestore(_with_shardings(progress, progress_sh)),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
    p = out["progress"]
    return TrainState(step=p["step"], params=out["params"], opt_state=out["opt_state"],
                      rng=p["rng"], skipped=p["skipped"])

  def restore_latest(self, abstract: TrainState, shardings: TrainState,
                     data_iterator: Any) -> Optional[TrainState]:
    """The newest checkpoint that restores (None if there are none).

    `abstract`: shapes of the state (`train_state.abstract_state`); the data iterator
    is set to its saved position in place.
    """
    steps = self.all_steps()
    errors = []
    for step in reversed(steps):
      try:
        state = self._restore_step(step, abstract, shardings, data_iterator)
      except Exception as e:  # pylint: disable=broad-except  # Any unreadable checkpoint.
        errors.append((step, e))
        log.warning("checkpoint at step %d in %s could not be restored (%s: %s); "
                    "falling back to the previous one", step, self.directory,
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        continue
      if errors:
        log.warning("resumed from step %d after skipping unreadable checkpoint(s) %s",
                    step, [s for s, _ in errors])
      return state
    if errors:
      step, e = errors[0]
      raise UserError(
          f"no checkpoint in {self.directory} could be restored (steps {steps}); the "
          f"newest (step {step}) failed with {type(e).__name__}: {e}. If the config "
          "changed since these were written, use a new --workdir.")
    return None

  def restore_params(self, abstract_params: Any, shardings: Any,
                     step: Optional[int] = None) -> tuple[Any, int]:
    """Parameters only (evaluation, prediction): from `step` or the newest readable."""
    steps = [step] if step is not None else list(reversed(self.all_steps()))
    if not steps:
      raise UserError(f"no checkpoint found in {self.directory}: train first "
                      "(scanformer train --config ... --workdir ...)")
    errors = []
    for s in steps:
      try:
        out = self.manager.restore(s, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_with_shardings(abstract_params, shardings))))
        if errors:
          log.warning("using checkpoint step %d; newer ones were unreadable: %s", s,
                      [e for e, _ in errors])
        return out["params"], s
      except Exception as e:  # pylint: disable=broad-except
        log.warning("checkpoint at step %d could not be restored (%s: %s)", s,
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        errors.append((s, e))
    s, e = errors[0]
    raise UserError(f"checkpoint step {s} in {self.directory} does not match this model "
                    f"config or is corrupt ({type(e).__name__}: {e})")

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
