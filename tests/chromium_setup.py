"""Test setup: headless Chromium from Debian's packages, installed only where missing.

`find_or_install_chromium()` returns the binary, installs it with apt-get when the
tests run as root on a Debian-like machine, and otherwise skips with the reason.
`run_headless` runs one isolated, offline headless session (own profile directory).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Sequence

import pytest

CHROMIUM = "/usr/bin/chromium"
INSTALL_TIMEOUT_S = 1800
RUN_TIMEOUT_S = 120
# No network, no background services: the page is local and the run must be repeatable.
HEADLESS_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--disable-dev-shm-usage", "--hide-scrollbars",
)


def find_or_install_chromium() -> str:
  """Path of a working chromium; installs Debian's package if missing, else skips."""
  if os.access(CHROMIUM, os.X_OK):
    return CHROMIUM
  if os.geteuid() != 0 or shutil.which("apt-get") is None:
    pytest.skip(f"{CHROMIUM} is missing and cannot be installed here (needs root and "
                "apt-get): run `apt-get install -y chromium` to enable the browser test")
  env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
  for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
    try:
      done = subprocess.run(cmd, env=env, capture_output=True, text=True,
                            timeout=INSTALL_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
      pytest.skip(f"`{' '.join(cmd)}` took over {INSTALL_TIMEOUT_S} s: chromium not installed")
    if done.returncode:
      tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
      pytest.skip(f"`{' '.join(cmd)}` failed ({done.returncode}): {' '.join(tail)}")
  if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"apt-get installed chromium but {CHROMIUM} is not there")
  return CHROMIUM


def run_headless(chromium: str, profile_dir: str, args: Sequence[str]) -> str:
  """Runs one headless chromium command; returns its stdout (fails the test on error)."""
  cmd = [chromium, *HEADLESS_FLAGS, f"--user-data-dir={profile_dir}", *args]
  env = dict(os.environ, HOME=profile_dir)  # keep caches / crash dumps in the tmp dir
  done = subprocess.run(cmd, env=env, capture_output=True, text=True,
                        timeout=RUN_TIMEOUT_S, check=False)
  if done.returncode:
    raise AssertionError(f"chromium exited {done.returncode}: {done.stderr[-2000:]}")
  return done.stdout
