"""Two local processes as two hosts of a pod, each with its own local workdir (no
shared disk but the checkpoint directory): a checkpoint directory that is not shared
stops both with the same line; with a shared one they train, a SIGTERM to one process
makes both save the same step and exit 143, both killed with SIGKILL resume, and the
run ends with exactly the parameters of an uninterrupted two-process run."""

import os
import signal
import socket
import subprocess
import sys

import pytest

import train_helpers
from scanformer_jax.cli import train as train_cmd

STEPS = 6  # As the resume tests: the programs come from the compilation cache.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _two_hosts(workdirs, checkpoints=None, faults=(None, None), timeout=400):
  """Runs `scanformer train` as processes 0 and 1; returns [(returncode, stderr)]."""
  port = _free_port()
  procs = []
  for pid, (workdir, fault) in enumerate(zip(workdirs, faults)):
    cmd = [sys.executable, "-m", "scanformer_jax", "train", "--config",
           train_helpers.FAKE_CONFIG, "--workdir", str(workdir), "--no-progress",
           "--set", f"train.num_steps={STEPS}", "--set", "mesh.distributed=true",
           "--set", f"mesh.coordinator_address=localhost:{port}",
           "--set", "mesh.num_processes=2", "--set", f"mesh.process_id={pid}"]
    if checkpoints:
      cmd += ["--set", f"checkpoint.directory={checkpoints}"]
    env = train_helpers.subprocess_env({train_cmd.FAULT_ENV: fault} if fault else None)
    procs.append(subprocess.Popen(cmd, cwd=train_helpers.ROOT, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE))
  try:
    outputs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return [(p.returncode, err) for p, (_, err) in zip(procs, outputs)]


def _errors(stderr):
  return [l for l in stderr.splitlines() if l.startswith("scanformer train: error: ")]


def _steps(directory):
  return sorted(int(p) for p in os.listdir(directory) if p.isdigit())


@pytest.mark.slow
def test_local_checkpoint_directories_stop_both_hosts_with_one_line(tmp_path):
  """Each process's default checkpoint directory is under its own workdir."""
  results = _two_hosts([tmp_path / "host0", tmp_path / "host1"], timeout=120)
  lines = [_errors(err) for _, err in results]
  for (code, err), errors in zip(results, lines):
    assert code == 2, err[-3000:]
    assert len(errors) == 1 and "is not shared by the 2 processes" in errors[0], err[-3000:]
  assert lines[0] == lines[1]


@pytest.mark.slow
def test_pod_without_shared_workdirs_preempts_and_resumes_exactly(tmp_path):
  reference = tmp_path / "reference"
  results = _two_hosts([reference / "host0", reference / "host1"], reference / "ckpt")
  assert [code for code, _ in results] == [0, 0], results[0][1][-3000:]
  assert not os.path.exists(reference / "host1" / "config.json")  # Process 0 writes it.

  run = tmp_path / "run"
  workdirs, checkpoints = [run / "host0", run / "host1"], run / "ckpt"
  # SIGTERM to process 1 only, after step 3: both agree, save step 3 and exit 143.
  results = _two_hosts(workdirs, checkpoints, faults=(None, "TERM@3"))
  for code, err in results:
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert "SIGTERM: saved a checkpoint at step 3 and stopped" in err, err[-3000:]
  assert _steps(checkpoints) == [2, 3]
  # Both killed after step 5 (step 4 saved), then the same command again.
  results = _two_hosts(workdirs, checkpoints, faults=("KILL@5", "KILL@5"))
  assert all(code != 0 for code, _ in results), results[0][1][-3000:]
  assert _steps(checkpoints)[-1] == 4
  results = _two_hosts(workdirs, checkpoints)
  for code, err in results:
    assert code == 0 and "resumed from step 4" in err, err[-3000:]

  a = train_helpers.load_final_params(str(reference / "host0"))
  b = train_helpers.load_final_params(str(run / "host0"))
  assert a["step"] == b["step"] == STEPS
  assert train_helpers.max_abs_diff(a["params"], b["params"]) == 0.0
