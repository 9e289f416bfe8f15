"""JAX's persistent compilation cache, on by default for the CLI and `load()`.

A compiled program is written to disk keyed by its computation, shapes and the
jax/XLA version, so the second `scanformer predict` (or any later run of the same
model) skips XLA compilation, which dominates small jobs on CPU.

Where: `$SCANFORMER_CACHE_DIR`, else `$XDG_CACHE_HOME/scanformer_jax/jax`, else
`~/.cache/scanformer_jax/jax`. `SCANFORMER_NO_CACHE=1` turns it off. A cache
directory the user already gave jax (`JAX_COMPILATION_CACHE_DIR` or
`jax.config.update("jax_compilation_cache_dir", ...)`) is kept as it is.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional

log = logging.getLogger(__name__)

DIR_ENV = "SCANFORMER_CACHE_DIR"
OFF_ENV = "SCANFORMER_NO_CACHE"
_JAX_DIR_ENV = "JAX_COMPILATION_CACHE_DIR"
# Small programs too: the tiny models compile in well under jax's default 1 s floor,
# yet their compilations add up to most of a short command's time.
_MIN_COMPILE_SECS = "0"

HELP = (f"compiled programs are cached in {DIR_ENV} (default ~/.cache/scanformer_jax/jax, "
        f"under $XDG_CACHE_HOME when set); {OFF_ENV}=1 turns the cache off")


def disabled() -> bool:
  return os.environ.get(OFF_ENV, "").strip().lower() not in ("", "0", "false", "no")


def default_dir() -> str:
  """The cache directory this process would use (whether or not it is on)."""
  if os.environ.get(DIR_ENV):
    return os.path.expanduser(os.environ[DIR_ENV])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "scanformer_jax", "jax")


def enable(cache_dir: Optional[str] = None) -> Optional[str]:
  """Turns the persistent cache on (unless disabled); returns its directory or None.

  Before jax is imported this sets jax's environment variables (read at import, and
  inherited by worker processes); afterwards it updates `jax.config`.
  """
  if disabled():
    return None
  jax = sys.modules.get("jax")
  current = (jax.config.jax_compilation_cache_dir if jax is not None
             else os.environ.get(_JAX_DIR_ENV))
  if current:
    return current
  path = cache_dir or default_dir()
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:  # A read-only home: run uncached rather than fail.
    log.warning("compilation cache off: cannot create %s (%s)", path, e.strerror or e)
    return None
  if jax is None:
    os.environ[_JAX_DIR_ENV] = path
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", _MIN_COMPILE_SECS)
  else:
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(_MIN_COMPILE_SECS))
  log.debug("compilation cache: %s", path)
  return path
