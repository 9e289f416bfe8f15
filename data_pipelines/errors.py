"""The data-side user error: a missing dataset, directory or file, or bad data.

It subclasses the project's `UserError`, so every command prints its message and
exits with code 2 instead of a traceback.
"""

from __future__ import annotations

from scanformer_jax.errors import UserError


class DataError(UserError):
  """A dataset problem the user can fix; the message says exactly how."""
