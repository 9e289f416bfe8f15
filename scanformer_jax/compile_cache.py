"""JAX's persistent compilation cache, on by default for the CLI and `load()`.

A compiled program is written to disk keyed by its computation, shapes and the
jax/XLA version, so the second `scanformer predict` (or any later run of the same
model) skips XLA compilation, which dominates small jobs on CPU.

Where: `$SCANFORMER_CACHE_DIR`, else `$XDG_CACHE_HOME/scanformer_jax/jax`, else
`~/.cache/scanformer_jax/jax`. `SCANFORMER_NO_CACHE=1` turns it off. A cache
directory the user already gave jax (`JAX_COMPILATION_CACHE_DIR` or
`jax.config.update("jax_compilation_cache_dir", ...)`) is kept as it is.

jax's cache saves compilation only: tracing the model and lowering it still run in
every process, and so does tracing the model's init to learn the parameter shapes.
Both are cached too, in `<cache dir>/scanformer_programs/` (`load_blob`,
`store_blob`): the inference forward as a serialized `jax.export` program and the
parameter shapes, each under a key (`cache_key`) that covers everything it depends
on: the model config, the program's settings, jax/jaxlib/flax versions, the
backend, and the source of this package and of the plugin modules the config's
registry entries (selection rule, exit heads) come from. Change any of them and
the key changes; nothing stale is ever read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from typing import Any, Iterable, Optional

log = logging.getLogger(__name__)

DIR_ENV = "SCANFORMER_CACHE_DIR"
OFF_ENV = "SCANFORMER_NO_CACHE"
_JAX_DIR_ENV = "JAX_COMPILATION_CACHE_DIR"
# Small programs too: the tiny models compile in well under jax's default 1 s floor,
# yet their compilations add up to most of a short command's time.
_MIN_COMPILE_SECS = "0"

HELP = (f"compiled and traced programs are cached in {DIR_ENV} (default "
        "~/.cache/scanformer_jax/jax, under $XDG_CACHE_HOME when set); "
        f"{OFF_ENV}=1 turns the cache off")


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


PROGRAMS_SUBDIR = "scanformer_programs"


def programs_dir() -> Optional[str]:
  """Where traced programs and parameter shapes are kept: `<cache dir>/scanformer_programs`
  of the cache `enable` turned on; None when the cache is off."""
  if disabled():
    return None
  jax = sys.modules.get("jax")
  current = (jax.config.jax_compilation_cache_dir if jax is not None
             else os.environ.get(_JAX_DIR_ENV))
  return os.path.join(current or default_dir(), PROGRAMS_SUBDIR)


_SOURCE_DIGESTS: dict[str, str] = {}
# Libraries whose version is part of every key: their functions need no source digest.
_VERSIONED_LIBRARIES = ("jax", "jaxlib", "flax", "numpy")


def _file_digest(path: str) -> str:
  if path not in _SOURCE_DIGESTS:
    with open(path, "rb") as f:
      _SOURCE_DIGESTS[path] = hashlib.sha256(f.read()).hexdigest()
  return _SOURCE_DIGESTS[path]


def source_fingerprint(objects: Iterable[Any] = ()) -> Optional[str]:
  """A digest of this package's python sources and of the files defining `objects`
  (registry entries: functions, classes); None when one of them has no source file
  (defined interactively), so nothing keyed by it can be trusted across processes."""
  import inspect  # pylint: disable=g-import-not-at-top
  package = os.path.dirname(os.path.abspath(__file__))
  files = set()
  for root, _, names in os.walk(package):
    files.update(os.path.join(root, n) for n in names if n.endswith(".py"))
  for obj in objects:
    module = getattr(obj, "__module__", None) or ""
    if module.split(".")[0] in _VERSIONED_LIBRARIES:  # e.g. jax.nn.sigmoid: its version.
      continue
    try:
      path = inspect.getsourcefile(inspect.unwrap(obj))
    except (TypeError, ValueError):
      path = None
    if not path or not os.path.isfile(path):
      return None
    files.add(os.path.abspath(path))
  digest = hashlib.sha256()
  for path in sorted(files):
    digest.update(f"{os.path.relpath(path, package)}\0{_file_digest(path)}\0".encode())
  return digest.hexdigest()


def cache_key(kind: str, settings: dict[str, Any], objects: Iterable[Any] = ()
              ) -> Optional[str]:
  """The key of a cached `kind` ("params", "forward") built with `settings` (JSON-able:
  config, mode, shapes) by this package and `objects`; None when uncacheable."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  fingerprint = source_fingerprint(objects)
  if fingerprint is None:
    return None
  devices = jax.local_devices()
  material = {"kind": kind, "settings": settings, "source": fingerprint,
              "versions": [jax.__version__, jaxlib.__version__, flax.__version__],
              "backend": jax.default_backend(), "device": devices[0].device_kind}
  text = json.dumps(material, sort_keys=True, default=repr)
  return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:40]}"


def load_blob(key: Optional[str]) -> Optional[bytes]:
  """The bytes stored under `key`, or None (no key, cache off, not stored, unreadable)."""
  folder = programs_dir()
  if key is None or folder is None:
    return None
  try:
    with open(os.path.join(folder, key), "rb") as f:
      return f.read()
  except OSError:
    return None


def store_blob(key: Optional[str], data: bytes) -> None:
  """Stores `data` under `key` (atomically; a failure only logs: the cache is optional)."""
  folder = programs_dir()
  if key is None or folder is None:
    return
  try:
    os.makedirs(folder, exist_ok=True)
    partial = os.path.join(folder, f".{key}.{os.getpid()}.partial")
    with open(partial, "wb") as f:
      f.write(data)
    os.replace(partial, os.path.join(folder, key))
  except OSError as e:
    log.debug("not cached: %s (%s)", key, e.strerror or e)
