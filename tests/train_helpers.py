"""Shared helpers of the trainer tests: the tiny test config and CLI subprocesses.

Subprocesses get a persistent JAX compilation cache (one per user, in the temp dir),
so runs of the same config compile once; the cache is keyed on the program, jax
version and flags, so it can never return a wrong executable.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TESTS = str(Path(__file__).resolve().parent)
FAKE_CONFIG = str(Path(TESTS) / "fake_tiny_config.py")
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
JAX_CACHE = os.path.join(tempfile.gettempdir(), f"scanformer-test-jax-cache-{os.getuid()}")


def subprocess_env(extra: Optional[dict] = None) -> dict:
  env = dict(os.environ)
  env.update({
      "JAX_PLATFORMS": "cpu",
      "JAX_COMPILATION_CACHE_DIR": JAX_CACHE,
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
  })
  # Tiny programs: compile time dominates, so skip the expensive LLVM passes.
  env["XLA_FLAGS"] = FAST_COMPILE_FLAGS
  extra = dict(extra or {})
  if "XLA_FLAGS" in extra:
    env["XLA_FLAGS"] += " " + extra.pop("XLA_FLAGS")
  env.update(extra)
  return env


def run_cli(args: Sequence[str], extra_env: Optional[dict] = None, timeout: float = 300,
            check: bool = True) -> subprocess.CompletedProcess:
  """`python -m scanformer_jax <args>` in a fresh process."""
  proc = subprocess.run([sys.executable, "-m", "scanformer_jax", *args], cwd=ROOT,
                        env=subprocess_env(extra_env), capture_output=True, text=True,
                        timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"scanformer {' '.join(args)} exited {proc.returncode}\n"
                         f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}")
  return proc


def run_python(code: str, extra_env: Optional[dict] = None, timeout: float = 300
               ) -> subprocess.CompletedProcess:
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(extra_env),
                        capture_output=True, text=True, timeout=timeout)
  if proc.returncode != 0:
    raise AssertionError(f"subprocess exited {proc.returncode}\nstdout:\n"
                         f"{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}")
  return proc


def load_final_params(workdir: str, step: Optional[int] = None) -> dict:
  """The newest (or `step`'s) checkpoint parameters of a fake_tiny_config workdir, as
  numpy."""
  import jax  # pylint: disable=g-import-not-at-top
  from scanformer_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  run = workdir_lib.load_for_inference(workdir, step=step)
  return {"step": run.step, "params": jax.tree.map(np.asarray, run.params)}


def max_abs_diff(a, b) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  diffs = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b))
  return max(diffs)
