"""One run per workdir: an exclusive `flock` on `<workdir>/.lock`.

The lock file names its holder (pid and host) so a refused run can say who has it.
The kernel drops the lock when its process dies (even by kill -9), so a stale file
from a dead run is simply taken over. The file itself is never deleted (deleting a
flock file races with a run that has just opened it).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from typing import Optional

from scanformer_jax.errors import UserError

LOCK_NAME = ".lock"


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds the workdir; a second holder gets a UserError."""

  def __init__(self, workdir: str, flag: str = "--workdir"):
    """flag: what the user changes to use another directory (named in the error)."""
    self.path = os.path.join(workdir, LOCK_NAME)
    self.flag = flag
    self._fd: Optional[int] = None

  def acquire(self) -> "WorkdirLock":
    os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_holder(fd)
      os.close(fd)
      workdir = os.path.dirname(self.path) or "."
      raise UserError(
          f"{workdir} is in use by another run ({holder}, lock {self.path}); wait for "
          f"it to finish or stop it, or use another {self.flag}") from None
    except OSError:
      os.close(fd)
      raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
              + b"\n", 0)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _read_holder(fd: int) -> str:
  try:
    holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    return f"pid {holder['pid']} on {holder['host']}"
  except (ValueError, KeyError, TypeError, OSError):
    return "pid unknown"
