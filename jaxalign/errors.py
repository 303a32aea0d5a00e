"""The errors a user's input can cause (a config field, a path, a data file, a Hub id), told apart from bugs.

The command-line programs (`jaxalign.cli`) print an `InputError`'s message alone and exit with status 2; any other
exception is a bug and keeps its traceback. Each class also derives from the built-in error it replaces, so code that
catches ValueError or FileNotFoundError still does.
"""


class InputError(Exception):
  """Raised for input the user can fix; the message says what was wrong, where, and what was expected."""


class DataError(InputError, ValueError):
  """A data, prompt or response file that cannot be used as it is (named in the message, with its record)."""


class MissingInput(InputError, FileNotFoundError):
  """A path or Hub id that names nothing there is (or nothing of the expected kind)."""


class ConfigError(InputError, ValueError):
  """A config field (named by its dotted path) with a value that is not allowed, or fields that contradict."""
