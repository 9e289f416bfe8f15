"""metrics.jsonl stays valid JSON lines: a torn last line is cut on open, a failed
write leaves no partial record and is one line naming the directory."""

import errno
import json
import logging

import pytest

from scanformer_jax.errors import UserError
from scanformer_jax.metric_writer import MetricWriter


def _records(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_torn_last_line_is_cut_on_open(tmp_path, caplog):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
  with caplog.at_level(logging.WARNING):
    writer = MetricWriter(str(tmp_path), enabled=True)
  writer.write(2, {"loss": 0.25})
  writer.close()
  assert _records(path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]
  assert "torn line" in caplog.text


def test_a_file_that_is_only_a_torn_line_is_emptied(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "lo')
  MetricWriter(str(tmp_path), enabled=True).close()
  assert path.read_text() == ""


class _FullDisk:
  """A file object whose writes put part of the data down, then fail like ENOSPC."""

  def __init__(self, f):
    self._f = f

  def write(self, data):
    self._f.write(data[:5])
    raise OSError(errno.ENOSPC, "No space left on device")

  def __getattr__(self, name):
    return getattr(self._f, name)


def test_disk_full_write_is_one_line_and_leaves_no_partial_record(tmp_path):
  path = tmp_path / "metrics.jsonl"
  writer = MetricWriter(str(tmp_path), enabled=True)
  writer.write(1, {"loss": 0.5})
  writer._jsonl = _FullDisk(writer._jsonl)  # pylint: disable=protected-access
  with pytest.raises(UserError, match=f"cannot write {path} \\(No space left on device\\); "
                     f"free space in {tmp_path}"):
    writer.write(2, {"loss": 0.25})
  writer.close()
  assert _records(path) == [{"step": 1, "loss": 0.5}]


@pytest.fixture
def tiny_tmpfs(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  mount_point = tmp_path / "tmpfs"
  mount_point.mkdir()
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
                        capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); "
                "the monkeypatched disk-full test covers the message")
  yield mount_point
  subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_really_full_disk_keeps_the_log_valid(tiny_tmpfs):
  """Fills a 64 KiB tmpfs, then logs until a write fails (mid-line at a page edge)."""
  workdir = tiny_tmpfs / "run"
  workdir.mkdir()
  writer = MetricWriter(str(workdir), enabled=True)
  writer._tb.close()  # pylint: disable=protected-access  # Only the JSONL file is tested.
  writer._tb = _NoTensorBoard()  # pylint: disable=protected-access
  filler = tiny_tmpfs / "filler"
  with open(filler, "wb", buffering=0) as f:
    try:
      while True:
        f.write(b"\0" * 1024)
    except OSError:
      pass
  with pytest.raises(UserError, match=f"cannot write {workdir / 'metrics.jsonl'}"):
    for step in range(1, 10_000):
      writer.write(step, {"loss": 1.0 / step, "name": "x" * 37})
  writer.close()
  written = _records(workdir / "metrics.jsonl")  # Every line parses.
  assert [r["step"] for r in written] == list(range(1, len(written) + 1))
  filler.unlink()
  writer = MetricWriter(str(workdir), enabled=True)
  writer.write(len(written) + 1, {"loss": 0.0})
  writer.close()
  assert _records(workdir / "metrics.jsonl")[-1] == {"step": len(written) + 1, "loss": 0}


class _NoTensorBoard:
  def add_scalar(self, *args, **kwargs):
    pass

  def flush(self):
    pass

  def close(self):
    pass
