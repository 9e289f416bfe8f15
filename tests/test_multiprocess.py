"""Two local processes (`jax.distributed.initialize` on CPU, gloo collectives) as two
hosts: they train a few steps, checkpoint together, and end with the parameters of a
one-process run. As pod hosts without a shared disk (a local workdir each): a
checkpoint directory that is not shared stops both with the same line; with a shared
one, both killed with SIGKILL resume exactly, and a SIGTERM to one process makes both
save the same step and exit 143.

`data.dataset="fake"` gives every process the same global batches (each keeps its
own rows), so the two runs see identical data; the comparison with one process is to
float tolerance (the gradient all-reduce sums in another order), between two-process
runs it is exact.
"""

import os
import signal
import socket
import subprocess
import sys

import pytest

import train_helpers
from scanformer_jax.cli import train as train_cmd

STEPS = 6  # As the resume tests: the one-process run reuses their compile.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _train_cmd(workdir, *extra):
  return [sys.executable, "-m", "scanformer_jax", "train", "--config",
          train_helpers.FAKE_CONFIG, "--workdir", str(workdir), "--no-progress",
          "--set", f"train.num_steps={STEPS}", *extra]


def _two_hosts(workdirs, checkpoints=None, faults=(None, None), timeout=400):
  """`scanformer train` as processes 0 and 1; returns [(returncode, stderr)]."""
  port = _free_port()
  procs = []
  for pid, (workdir, fault) in enumerate(zip(workdirs, faults)):
    cmd = _train_cmd(workdir, "--set", "mesh.distributed=true",
                     "--set", f"mesh.coordinator_address=localhost:{port}",
                     "--set", "mesh.num_processes=2", "--set", f"mesh.process_id={pid}")
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


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  """A workdir both processes share, trained STEPS steps (checkpoints 2, 4, 6)."""
  multi = tmp_path_factory.mktemp("two_processes") / "w"
  results = _two_hosts([multi, multi])
  for code, err in results:
    assert code == 0, err[-4000:]
  return multi


@pytest.mark.slow
def test_two_processes_match_one(two_processes, tmp_path):
  single = tmp_path / "one_process"
  train_helpers.run_cli(_train_cmd(single)[3:])

  a = train_helpers.load_final_params(str(single))
  b = train_helpers.load_final_params(str(two_processes))
  assert a["step"] == b["step"] == STEPS
  assert train_helpers.max_abs_diff(a["params"], b["params"]) < 1e-5


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
def test_local_workdirs_resume_exactly_and_agree_on_sigterm(two_processes, tmp_path):
  """A local workdir per process, one shared checkpoint directory."""
  workdirs, checkpoints = [tmp_path / "host0", tmp_path / "host1"], tmp_path / "ckpt"
  # Both killed after step 3 (step 2 saved).
  results = _two_hosts(workdirs, checkpoints, faults=("KILL@3", "KILL@3"))
  assert all(code != 0 for code, _ in results), results[0][1][-3000:]
  assert _steps(checkpoints) == [2]
  assert not os.path.exists(workdirs[1] / "config.json")  # Process 0 writes it.
  # The same command resumes; SIGTERM to process 1 only after step 5: both agree,
  # save step 5 and exit 143.
  results = _two_hosts(workdirs, checkpoints, faults=(None, "TERM@5"))
  for code, err in results:
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert "resumed from step 2" in err, err[-3000:]
    assert "SIGTERM: saved a checkpoint at step 5 and stopped" in err, err[-3000:]
  assert _steps(checkpoints) == [2, 4, 5]

  # Step 4 was trained after the kill-resume: equal to the uninterrupted run's.
  resumed = train_helpers.load_final_params(str(workdirs[0]), step=4)
  uninterrupted = train_helpers.load_final_params(str(two_processes), step=4)
  assert train_helpers.max_abs_diff(uninterrupted["params"], resumed["params"]) == 0.0
