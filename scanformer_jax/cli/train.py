"""`scanformer train --config PATH --workdir W [--set key=value ...]`.

Starts a run, or resumes it when W already holds checkpoints (same command). Without
--config, resumes with W/config.json.
"""

from __future__ import annotations

import argparse
import os
import signal
from typing import Any, Callable, Optional

from scanformer_jax import checkpointing
from scanformer_jax.cli import common

# Test hook, "<signal>@<step>" (e.g. "KILL@5", "TERM@3"): this process sends itself
# the signal right after that step (a crash or a preemption at a known point; see
# tests/test_checkpoint_resume.py). "<signal>@save:<step>" fires inside that step's
# checkpoint save instead (checkpointing.py).
FAULT_ENV = checkpointing.FAULT_ENV


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="scanformer train", description="Train ScanFormer; resumes an existing workdir.")
  common.add_workdir_args(parser)
  parser.add_argument("--no-progress", action="store_true",
                      help="log lines instead of a progress bar")
  parser.add_argument("--extend", action="store_true",
                      help="resume with a changed train.num_steps (the learning-rate "
                      "schedule is recomputed over the new total)")
  parser.add_argument("--allow-model-change", action="store_true",
                      help="resume with another architecture of the same parameter "
                      "shapes (e.g. model.num_heads): the saved weights train as the new one")
  parser.add_argument("--reset-optimizer", action="store_true",
                      help="resume the parameters only, with a fresh optimizer state "
                      "(after an optim.* change of the optimizer state's structure)")
  parser.add_argument("--from-scratch", action="store_true",
                      help="train from step 0 although the checkpoint directory only "
                      "holds checkpoints moved aside as unreadable")
  return parser


def fault_injection(spec: str) -> Optional[Callable[[int, Any], None]]:
  """A `trainer.StepCallback` for `FAULT_ENV`'s "<signal>@<step>", or None if unset."""
  if not spec:
    return None
  name, _, at = spec.partition("@")
  if at.startswith("save:"):  # checkpointing.py fires it inside that step's save.
    return None
  signum, fault_step = getattr(signal, "SIG" + name.upper()), int(at)

  def inject(step: int, checkpointer) -> None:
    if step != fault_step:
      return
    if signum == signal.SIGKILL:
      checkpointer.wait()  # Let the previous save land: the kill is "between checkpoints".
    os.kill(os.getpid(), signum)
  return inject


def main(argv: list[str]) -> int:
  args = _parser().parse_args(argv)
  common.setup_logging(args.verbose)

  def body() -> int:
    config = common.resolve_config(args.config, args.workdir, args.overrides)
    from scanformer_jax import sharding  # pylint: disable=g-import-not-at-top
    sharding.initialize_distributed(config.mesh)  # Before anything touches devices.
    from scanformer_jax import trainer  # pylint: disable=g-import-not-at-top
    fault = fault_injection(os.environ.get(FAULT_ENV, ""))
    result = trainer.train(config, args.workdir, progress=not args.no_progress,
                           step_callbacks=[fault] if fault else [], extend=args.extend,
                           allow_model_change=args.allow_model_change,
                           reset_optimizer=args.reset_optimizer,
                           from_scratch=args.from_scratch)
    if result.stopped_early:
      return 128 + result.stop_signal  # As if ended by the signal; the checkpoint is saved.
    return 0

  return common.run("scanformer train", body, args.verbose)
