"""One check for every name or relative path that users or annotation files give us,
so nothing is read or written outside the directory it belongs to.

Used for `--dataset` / `--split-by` of the refer builder, the config part of dataset
names (`synthetic/<config>`, `refer/<config>`) and `file_name` in instances.json.
Paths are checked as written (no `..`, not absolute), not resolved: image trees made
of symlinks keep working.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePath

from data_pipelines.errors import DataError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def check_name(value: str, what: str) -> str:
  """`value` if it is one plain path component; DataError naming `what` otherwise."""
  if not _NAME.fullmatch(str(value)) or ".." in str(value):
    raise DataError(f"{what} {value!r} is not a plain name: use letters, digits and "
                    "_ . + - (no '/', '..' or absolute paths)")
  return str(value)


def inside(base: str | os.PathLike, relative: str, what: str) -> Path:
  """base / relative, refusing a `relative` that is absolute or climbs out with `..`."""
  rel = str(relative)
  parts = PurePath(rel.replace("\\", "/")).parts
  if not rel or os.path.isabs(rel) or rel.startswith(("/", "\\")) or ".." in parts:
    raise DataError(f"{what} {rel!r} points outside {os.fspath(base)}: it must be a "
                    "relative path inside that directory (no '..', not absolute)")
  return Path(base) / rel
