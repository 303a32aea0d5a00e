"""How train.py, evaluate.py and `python -m jaxalign.chat` end on bad input: one clear message on stderr and exit
status 2 (the convention for usage errors), never a traceback. A traceback is left for bugs.

Expected input errors are `errors.InputError` (a config field, a data file, a Hub id), a missing path
(FileNotFoundError), a command-line flag absl cannot parse, and a `--config.<field>` override that names no field (the
message then lists the closest field names).
"""

from __future__ import annotations

import contextlib
import difflib
import sys
from collections.abc import Iterator, Sequence

from jaxalign.errors import InputError

EXIT_INPUT_ERROR = 2
INPUT_ERRORS = (InputError, FileNotFoundError)
CLOSEST = 3  # field names suggested for a misspelled one


def fail(message: str) -> None:
  """Prints `error: <message>` on stderr and exits with status 2."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(EXIT_INPUT_ERROR)


@contextlib.contextmanager
def input_errors() -> Iterator[None]:
  """Runs the body; an expected input error ends the program with its message (see the module docstring)."""
  try:
    yield
  except INPUT_ERRORS as error:
    fail(str(error))


def field_names(config, prefix: str = "") -> list[str]:
  """Every dotted field name of a ConfigDict (sections too), e.g. "optimizer", "optimizer.lr"."""
  names = []
  for key, value in config.items():
    name = prefix + key
    names.append(name)
    if hasattr(value, "items") and hasattr(value, "to_dict"):
      names += field_names(value, name + ".")
  return names


def overridden_fields(argv: Sequence[str], flag: str = "config") -> list[str]:
  """The field names of `--config.<field>[=value]` arguments, in order."""
  prefix = f"--{flag}."
  return [arg[len(prefix):].split("=", 1)[0] for arg in argv if arg.startswith(prefix)]


def unknown_field_message(config, argv: Sequence[str], flag: str = "config") -> str | None:
  """For the first override naming no field of `config`: which one, and the closest valid names; else None."""
  known = field_names(config)
  for name in overridden_fields(argv, flag):
    if name not in known:
      close = difflib.get_close_matches(name, known, n=CLOSEST, cutoff=0.5)
      hint = f"did you mean {' or '.join(f'--{flag}.{c}' for c in close)}?" if close else (
          f"its top-level fields are {sorted(k for k in known if '.' not in k)}")
      return f"--{flag}.{name}: the config has no field {name!r}; {hint}"
  return None


def _config_file(argv: Sequence[str], flag: str = "config") -> str | None:
  """The value of `--config=<file>` or `--config <file>` in `argv`."""
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{flag}="):
      return arg.split("=", 1)[1]
    if arg == f"--{flag}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (for `app.run(main, flags_parser=parse_flags)`) with its errors as input errors: a value that
  does not parse, or an override of a field the config does not have."""
  from absl import flags

  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    fail(str(error))
  except (AttributeError, KeyError):  # ml_collections, applying the overrides: one names no field
    path = _config_file(argv)
    config = flags.FLAGS["config"].parser.parse(path) if path and "config" in flags.FLAGS else None
    message = unknown_field_message(config, argv) if config is not None else None
    if message is None:
      raise
    fail(message)
