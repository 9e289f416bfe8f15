"""`host_allocator.keep_freed_memory`: large buffers come from the heap, not fresh mmaps."""

import json
import subprocess
import sys
import textwrap

import pytest

# In a child process: the setting is process-wide, and the measurement needs its
# default state first.
_CHILD = textwrap.dedent("""
    import ctypes, json
    import numpy as np
    from scanformer_jax import host_allocator

    class MallInfo2(ctypes.Structure):
      _fields_ = [(name, ctypes.c_size_t) for name in (
          "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
          "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2

    def mapped_by_a_40mb_buffer():
      before = libc.mallinfo2().hblkhd
      buffer = np.ones(10 * 2**20, np.float32)  # 40 MB, above glibc's mmap ceiling.
      mapped = libc.mallinfo2().hblkhd - before
      del buffer
      return mapped

    default = mapped_by_a_40mb_buffer()
    ok = host_allocator.keep_freed_memory()
    print(json.dumps({"default": default, "ok": ok, "kept": mapped_by_a_40mb_buffer()}))
""")


def test_large_buffers_come_from_the_heap():
  if not sys.platform.startswith("linux"):
    pytest.skip("glibc's allocator only")
  out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                       check=True).stdout
  result = json.loads(out)
  assert result["default"] >= 40 * 2**20  # glibc's default: a fresh mapping per buffer.
  assert result["ok"]
  assert result["kept"] == 0
