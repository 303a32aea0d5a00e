"""JSON lines files: read with errors that name the file and line, written whole or not at all."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from jaxalign.errors import DataError


def read(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
  """("<path> line <n>", value) for every non-blank line; raises ValueError naming the line that is not JSON."""
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path} line {n}"
      try:
        yield where, json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e})") from e


def write(records: Iterable[Mapping], path: str | os.PathLike) -> None:
  """One JSON object a line, through a temporary file, so a reader (or a cache lookup) never sees half a file."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(path.suffix + ".tmp")
  with tmp.open("w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
  tmp.replace(path)
