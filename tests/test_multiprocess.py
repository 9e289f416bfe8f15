"""Two local processes (`jax.distributed.initialize` on CPU, gloo collectives) train a
few steps, checkpoint together, and end with the parameters of a one-process run.

`data.dataset="fake"` gives every process the same global batches (each keeps its
own rows), so the two runs see identical data; the comparison is to float tolerance
(the gradient all-reduce sums in another order).
"""

import socket
import subprocess
import sys

import pytest

import train_helpers

STEPS = 6  # As the resume tests: the one-process run reuses their compile.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _train_cmd(workdir, *extra):
  return [sys.executable, "-m", "scanformer_jax", "train", "--config",
          train_helpers.FAKE_CONFIG, "--workdir", str(workdir), "--no-progress",
          "--set", f"train.num_steps={STEPS}", *extra]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  port = _free_port()
  multi = tmp_path / "two_processes"
  procs = []
  for pid in range(2):
    cmd = _train_cmd(multi, "--set", "mesh.distributed=true",
                     "--set", f"mesh.coordinator_address=localhost:{port}",
                     "--set", "mesh.num_processes=2", "--set", f"mesh.process_id={pid}")
    procs.append(subprocess.Popen(cmd, cwd=train_helpers.ROOT,
                                  env=train_helpers.subprocess_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  try:
    outputs = [p.communicate(timeout=400) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-4000:]

  single = tmp_path / "one_process"
  train_helpers.run_cli(_train_cmd(single)[3:])

  a = train_helpers.load_final_params(str(single))
  b = train_helpers.load_final_params(str(multi))
  assert a["step"] == b["step"] == STEPS
  assert train_helpers.max_abs_diff(a["params"], b["params"]) < 1e-5
