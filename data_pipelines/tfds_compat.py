"""Works around a packaging bug of the installed tensorflow-datasets when building.

tensorflow-datasets 4.9.x imports the `importlib_resources` backport, but only
declares it for Python < 3.9; building any dataset whose builder lives in a package
then fails with `No module named 'importlib_resources'`. Python >= 3.9 ships the
same API as `importlib.resources`, so alias it. Call before building; a no-op when
the backport is installed.
"""

from __future__ import annotations

import importlib.resources
import importlib.resources.abc  # noqa: F401 -- makes `.abc` an attribute
import importlib.util
import sys


def patch_importlib_resources() -> None:
  if "importlib_resources" in sys.modules:
    return
  if importlib.util.find_spec("importlib_resources") is None:
    sys.modules["importlib_resources"] = importlib.resources
