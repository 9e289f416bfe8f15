"""The one exception type that means "the user asked for something we can't do".

Commands turn it into a one-line message and exit code 2 (no traceback); anything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """A bad config, path, override or checkpoint; the message says how to fix it."""
