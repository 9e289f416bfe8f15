"""One run per workdir: a second holder is refused naming the first's pid; the lock
of a killed process is taken over."""

import json
import os
import signal
import subprocess
import sys

import pytest

from scanformer_jax import workdir_lock
from scanformer_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLD = """
import sys, time
from scanformer_jax import workdir_lock
lock = workdir_lock.WorkdirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
  """Another process holding `tmp_path`'s lock."""
  proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline().strip() == "locked"
  yield proc
  if proc.poll() is None:
    proc.kill()
  proc.wait()


def test_second_run_is_refused_naming_the_holder(tmp_path, holder):
  with pytest.raises(UserError, match=f"in use by another run \\(pid {holder.pid} on "):
    workdir_lock.WorkdirLock(str(tmp_path)).acquire()


def test_lock_of_a_killed_run_is_taken_over(tmp_path, holder):
  os.kill(holder.pid, signal.SIGKILL)
  holder.wait()
  with workdir_lock.WorkdirLock(str(tmp_path)) as lock:
    with open(lock.path) as f:
      assert json.load(f)["pid"] == os.getpid()
    with pytest.raises(UserError, match=f"pid {os.getpid()}"):  # Even from this process.
      workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  workdir_lock.WorkdirLock(str(tmp_path)).acquire().release()  # Released on exit.


def test_lock_creates_a_new_workdir(tmp_path):
  with workdir_lock.WorkdirLock(str(tmp_path / "new" / "run")) as lock:
    assert os.path.exists(lock.path)
