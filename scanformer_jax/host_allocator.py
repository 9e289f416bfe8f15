"""Keeps freed host memory in the process, so XLA:CPU's per-call buffers are reused.

XLA:CPU allocates a program's temporary buffer with `malloc` on every call and frees
it when the call ends. glibc serves an allocation above its mmap threshold (32 MB at
most) with a fresh `mmap` and returns it with `munmap`, so every call of a program
whose temporaries exceed 32 MB page-faults all of them again: kernel time that grows
with the buffer, not with the work. The demo's exit path (seven sub-batch branches,
36 MB of temporaries per device) spent 120 ms of system time in each 510 ms pass and
ran 0.85x the plain sparse eval (25.7 MB, no system time) on the same batches; with
`keep_freed_memory()` both ran without system time and the exit path at 1.00x
(experiments/early_exit.md).

`keep_freed_memory()` tells glibc to serve every allocation from its heaps (no mmap'd
chunks) and to keep freed memory instead of trimming it, so a call reuses the pages
of the previous one. The price: the process holds its peak heap until it exits. Every
CLI command calls it, and so does `scanformer_jax.load()`; Python programs that train
or evaluate on CPU may call it first. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP_ALL = 2**31 - 1  # The largest trim threshold mallopt takes (an int).


@functools.cache
def keep_freed_memory() -> bool:
  """Heap-only allocation, never trimmed (glibc); True when glibc accepted both."""
  name = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(name)
    mallopt = libc.mallopt
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement  (glibc only)
  except (OSError, AttributeError, TypeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  ok = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_ALL))
  if not ok:
    log.debug("glibc refused the allocator settings: freed memory is trimmed as usual")
  return ok
