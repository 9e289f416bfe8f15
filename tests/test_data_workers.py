"""grain worker processes exit when their parent is killed (kill -9), instead of
living on (with multiprocessing's resource tracker) as orphans."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

_PARENT = textwrap.dedent("""
    import json, multiprocessing, sys, time
    from multiprocessing import resource_tracker
    from data_fixtures import block_sample
    from data_pipelines import pipeline
    it = pipeline.make_train_iter(
        "synthetic", "train", None, image_size=32, max_text_len=8, global_batch_size=4,
        num_workers=2, source=[block_sample(i) for i in range(16)])
    next(it)
    workers = [p.pid for p in multiprocessing.active_children()]
    tracker = resource_tracker._resource_tracker._pid
    print(json.dumps({"workers": workers, "tracker": tracker}), flush=True)
    time.sleep(600)
""")


def _running(pid: int) -> bool:
  """True while `pid` exists and is not a zombie (an exited, unreaped orphan)."""
  try:
    stat = Path(f"/proc/{pid}/stat").read_text()
  except OSError:
    return False
  return stat.rpartition(")")[2].split()[0] != "Z"


def test_workers_exit_when_the_parent_is_killed(tmp_path):
  tests = Path(__file__).resolve().parent
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")]))
  # stderr to a file: the orphans write to it, and an unread pipe would block them.
  log = open(tmp_path / "stderr.txt", "w")  # pylint: disable=consider-using-with
  parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE,
                            stderr=log, text=True, env=env,
                            cwd=tmp_path)
  pids = []
  try:
    line = parent.stdout.readline()
    assert line, (tmp_path / "stderr.txt").read_text()[-3000:]
    info = json.loads(line)
    pids = info["workers"] + ([info["tracker"]] if info["tracker"] else [])
    assert len(info["workers"]) == 2 and all(_running(p) for p in pids)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    for _ in range(240):  # bounded wait (60 s) for the orphans to notice
      if not any(_running(p) for p in pids):
        break
      time.sleep(0.25)
    assert [p for p in pids if _running(p)] == []
  finally:
    log.close()
    if parent.poll() is None:
      parent.kill()
    for p in pids:  # never leave orphans behind, even when the test fails
      if _running(p):
        os.kill(p, signal.SIGKILL)
