"""On-disk cache entries that are written atomically, verified on read, and healed when damaged.

An entry is one file: a header line (`MAGIC`, the payload's BLAKE2b digest and length) followed by the payload bytes.
`write` puts it under a temporary name in the same folder and renames it, so a reader (another host sharing the
folder, or a rerun after a kill) sees the whole entry or none. `read` checks the header, the length and the digest,
then decodes; an entry that fails any of these (a torn or bit-flipped file, a file from an older format, a payload
the decoder rejects) is logged as a warning naming the file and the reason, deleted, and reported as absent, so the
caller rebuilds it and the next run does not fail the same way.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
from collections.abc import Callable
from typing import TypeVar

import numpy as np

log = logging.getLogger(__name__)

MAGIC = b"jaxalign-cache-v1"
_DIGEST_BYTES = 32
T = TypeVar("T")


class DamagedEntry(ValueError):
  """A cache file that is not a whole, unchanged entry."""


def digest(data: bytes) -> str:
  return hashlib.blake2b(data, digest_size=_DIGEST_BYTES).hexdigest()


def encode_entry(payload: bytes) -> bytes:
  """The bytes of a cache file holding `payload`."""
  return b"%s %s %d\n" % (MAGIC, digest(payload).encode(), len(payload)) + payload


def decode_entry(data: bytes) -> bytes:
  """The payload of a cache file's bytes; raises DamagedEntry saying what does not match."""
  header, newline, payload = data.partition(b"\n")
  parts = header.split(b" ")
  if not newline or len(parts) != 3 or parts[0] != MAGIC:
    raise DamagedEntry(f"no {MAGIC.decode()} header (an older cache format, or not a cache file)")
  expected_digest, expected_length = parts[1].decode(errors="replace"), parts[2].decode(errors="replace")
  if expected_length != str(len(payload)):
    raise DamagedEntry(f"{len(payload)} payload bytes, the header says {expected_length} (a torn write?)")
  if digest(payload) != expected_digest:
    raise DamagedEntry("the payload's checksum differs from the one recorded when it was written (damaged file)")
  return payload


def write(path: str | os.PathLike, payload: bytes) -> None:
  """Writes `payload` as the entry `path`, atomically (temporary file in the same folder, fsync, rename)."""
  path = os.fspath(path)
  folder = os.path.dirname(path) or "."
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(encode_entry(payload))
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def read(path: str | os.PathLike, decode: Callable[[bytes], T], what: str = "cache entry") -> T | None:
  """The decoded entry at `path`; None when it is absent, or damaged (then logged, deleted, to be rebuilt).

  `decode` turns the verified payload into the value; any exception it raises also counts as damage.
  """
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    return None
  try:
    return decode(decode_entry(data))
  except Exception as e:  # a damaged entry must never stop the run: it is rebuilt from its inputs
    log.warning("damaged %s %s (%s: %s); deleting it and rebuilding", what, path, type(e).__name__, e)
    try:
      os.remove(path)
    except FileNotFoundError:  # another host sharing the cache healed it first
      pass
    return None


def npz_bytes(**arrays: np.ndarray) -> bytes:
  """Arrays as the bytes of an .npz archive (for `write`)."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return buffer.getvalue()


def npz_arrays(payload: bytes) -> dict[str, np.ndarray]:
  """The arrays of `npz_bytes`'s output (for `read`)."""
  with np.load(io.BytesIO(payload), allow_pickle=False) as archive:
    return {name: archive[name] for name in archive.files}

