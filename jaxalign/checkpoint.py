"""Checkpoints: the train state (sharded arrays) plus a JSON side item, written by Orbax in the background and read
back straight onto the devices and shardings the caller asks for, newest restorable step first.

One step folder holds two Orbax items:
  state   any pytree of arrays: params (a plain dict or an `nnx.State`), the optax state, the RNG key data, the step.
          `nnx.State` and optax's namedtuples round-trip as they are (Orbax walks them as pytrees and restores into
          the structure of the abstract tree given to `restore_latest`), so no conversion happens here.
  extra   a JSON dict: the data-iterator position, the config, the last metrics. JSON turns tuples into lists.

Atomicity comes from Orbax: a step is written under `<step>.orbax-checkpoint-tmp*` and renamed (or, on object
stores, marked with `commit_success.txt`) only when every process has finished, so a run killed mid-save leaves the
earlier steps intact and the unfinished folder invisible; it is deleted when the next `Checkpointer` opens the folder.
Every method must be called on every process: Orbax synchronises them and picks the process that writes shared files.

Integrity: Orbax's commit protects against a save cut short, not against files damaged afterwards (a flipped bit
keeps a file's size and often still decodes). So `save` records, in the extra item, a 64-bit checksum of every array
(over the bits of the blocks each process holds, so sharded and multi-host arrays need no gathering) and a digest of
the extra item itself, and refuses a state with non-finite values. `restore_latest` recomputes both on the restored
state and also checks that every floating-point array is finite; a step that fails is reported with the arrays that
differ and the previous step is tried, exactly as for a step whose files cannot be read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

STATE_ITEM = "state"
EXTRA_ITEM = "extra"
# The key of the extra item under which `save` records checksums (removed again by `restore_latest`).
INTEGRITY_KEY = "_integrity"


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written: the folder (`check_writable`) or a save, maybe one in the background."""


class CheckpointRestoreError(RuntimeError):
  """No checkpoint in the folder could be restored."""


class CheckpointIntegrityError(RuntimeError):
  """A restored step differs from what was saved, or holds non-finite values."""


class Restored(NamedTuple):
  """What `restore_latest` found: the step, the state laid out like the abstract state, and the JSON extra."""

  step: int
  state: Any
  extra: dict


def _absolute(directory: str | os.PathLike) -> epath.Path:
  # Orbax refuses relative local paths (its TensorStore specs need absolute ones); gs:// and friends pass through.
  path = epath.Path(directory)
  return path if "://" in str(directory) else epath.Path(os.path.abspath(directory))


def check_writable(directory: str | os.PathLike) -> None:
  """Creates the checkpoint folder if needed and writes and removes a file in it, so a folder that cannot be written
  fails before training (not at the first save, minutes or hours in); raises CheckpointSaveError naming the folder and
  the cause. Object-store folders (gs://, ...) are left to Orbax."""
  if "://" in str(directory):
    return
  try:
    os.makedirs(directory, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=directory)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise CheckpointSaveError(f"the checkpoint folder {os.path.abspath(directory)} cannot be written "
                              f"({type(e).__name__}: {e}); make it a writable folder, free space, or use another "
                              "--workdir") from e


def latest_step(directory: str | os.PathLike) -> int | None:
  """The newest committed step in a checkpoint folder (unfinished temporary folders ignored), or None.

  Committed is not the same as restorable: a damaged step still counts here; `Checkpointer.restore_latest` skips it.
  """
  # The step naming `Checkpointer` writes (Orbax's default); the lookup skips uncommitted folders as Orbax does.
  newest = ocp.path.step.latest_step_metadata(_absolute(directory), ocp.path.step.standard_name_format())
  return None if newest is None else newest.step


def describe_saved(directory: str | os.PathLike) -> str:
  """What a run stopped now keeps, read from the folder itself (so it is true whatever is still being written): the
  newest committed step, or that none is."""
  try:
    step = latest_step(directory)
  except (OSError, ValueError):  # no folder yet, or not a folder
    step = None
  where = _absolute(directory)
  return (f"checkpoint step {step} is committed in {where}" if step is not None
          else f"no checkpoint is committed in {where}")


def latest_extra(directory: str | os.PathLike) -> dict | None:
  """The JSON extra item (the run's config, the data position) of the newest committed step in a checkpoint folder,
  read without touching the arrays and without its integrity record; None when the folder holds no step."""
  step = latest_step(directory) if os.path.isdir(directory) or "://" in str(directory) else None
  if step is None:
    return None
  manager = ocp.CheckpointManager(_absolute(directory), options=ocp.CheckpointManagerOptions(create=False))
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**{EXTRA_ITEM: ocp.args.JsonRestore()}))
  finally:
    manager.close()
  extra = dict(restored[EXTRA_ITEM])
  extra.pop(INTEGRITY_KEY, None)
  return extra


class Checkpointer:
  """Saves every `save_every_steps` steps (0: only forced saves), keeps the newest `keep` (None: all).

  With `async_save` (the default) `save` returns once the arrays are copied to host memory, so the caller may donate
  or overwrite them right away; the files are written in a background thread. Call `close()` (or use `with`) before
  the process exits or before reading the folder from elsewhere, or the last save may be lost.
  """

  @classmethod
  def from_config(cls, directory: str | os.PathLike, checkpoint_config) -> Checkpointer:
    """A checkpointer with a stage's `checkpoint.*` settings (every_steps, keep, async_save)."""
    return cls(directory, save_every_steps=checkpoint_config.every_steps, keep=checkpoint_config.keep,
               async_save=checkpoint_config.async_save)

  def __init__(self, directory: str | os.PathLike, *, save_every_steps: int, keep: int | None,
               async_save: bool = True):
    if save_every_steps < 0:
      raise ValueError(f"checkpoint save_every_steps must be >= 0 (0 = only forced saves), got {save_every_steps}")
    if keep is not None and keep < 1:
      raise ValueError(f"checkpoint keep must be >= 1 or None (keep all), got {keep}")
    self.directory = _absolute(directory)
    self.save_every_steps = save_every_steps
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,  # still the portable spelling: preservation_policy is missing from older Orbax releases
        # Frees the space of saves cut short by a kill; committed steps are never touched.
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    # Steps that failed to restore: a resumed run reaching one of them overwrites it instead of skipping the save.
    self._unrestorable: set[int] = set()
    # The newest step known good: restored and verified, or saved with checksums from a finite state.
    self.last_verified_step: int | None = None
    # The newest step whose save is committed, and the step of a save still running in the background.
    self.last_saved_step: int | None = max(self._manager.all_steps(), default=None)
    self._in_flight: int | None = None
    self._async = async_save
    self._failed = False

  def steps(self) -> list[int]:
    """Saved steps, oldest first; a step still being written in the background is listed too."""
    return sorted(self._manager.all_steps())

  def should_save(self, step: int, force: bool = False) -> bool:
    return force or (self.save_every_steps > 0 and step % self.save_every_steps == 0)

  def save(self, step: int, *, state: Any, extra: dict, force: bool = False) -> bool:
    """Starts saving `state` and `extra` as `step` if `should_save(step, force)`; returns whether it did.

    A step that is already saved is skipped (the forced save at the end of a run often lands on a periodic one),
    unless `restore_latest` found it damaged: then it is replaced.
    """
    if not self.should_save(step, force):
      return False
    self.check_saves()
    if not isinstance(extra, dict):
      raise TypeError(f"checkpoint extra must be a dict, got {type(extra).__name__}")
    try:
      # Checked now: with async saves a bad value would only surface at the next save or at close().
      json.dumps(extra)
    except (TypeError, ValueError) as e:
      raise TypeError(f"checkpoint extra for step {step} is not JSON-serialisable ({e}); convert numpy/jax values "
                      "with int()/float()/.tolist() and configs with .to_dict()") from e
    if step in self._manager.all_steps():
      if step not in self._unrestorable:
        log.info("checkpoint step %d already exists in %s; not saving it again", step, self.directory)
        return False
      log.warning("replacing the unrestorable checkpoint step %d in %s", step, self.directory)
      self._manager.delete(step)
      self._unrestorable.discard(step)
    checksums, nonfinite = state_checksums(state)
    if nonfinite:
      kept = (f"the last verified checkpoint is step {self.last_verified_step}" if self.last_verified_step is not None
              else "no checkpoint was verified")
      raise FloatingPointError(f"not saving checkpoint step {step} in {self.directory}: non-finite values in "
                               f"{_some(nonfinite)}; {kept}")
    extra = {**extra, INTEGRITY_KEY: {"arrays": checksums, "extra": _extra_digest(extra)}}
    try:
      # Orbax's own save policy is bypassed (force=True): it would also save the first step of every run.
      saved = self._manager.save(step, args=ocp.args.Composite(**{
          STATE_ITEM: ocp.args.StandardSave(state), EXTRA_ITEM: ocp.args.JsonSave(extra)}), force=True)
    except Exception as e:  # whatever the cause (a folder gone, a full disk), the step is not saved
      raise self._save_error(self._in_flight or step, e) from e
    if saved:
      self.last_verified_step = step
      self._committed()  # Orbax finished the previous save before starting this one
      self._in_flight = step
      if not self._async:
        self._committed()
    return saved

  def check_saves(self) -> None:
    """Raises CheckpointSaveError if a background save has failed (without waiting for one still running): cheap
    enough to call after every step, so a failure is reported at once, not at the next save."""
    if self._in_flight is not None and not self._manager.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Blocks until background saves are committed; raises CheckpointSaveError if one failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      raise self._save_error(self._in_flight, e) from e
    self._committed()

  def _committed(self) -> None:
    if self._in_flight is not None:
      self.last_saved_step, self._in_flight = self._in_flight, None

  def _save_error(self, step: int | None, error: Exception) -> CheckpointSaveError:
    """The one-line report of a failed save: the step, the folder, the cause, and the last step that is saved."""
    self._failed = True
    kept = (f"the last saved step is {self.last_saved_step}" if self.last_saved_step is not None
            else "no step of this run is saved")
    return CheckpointSaveError(f"checkpoint step {step} could not be saved in {self.directory} ({_describe(error)}); "
                               f"{kept}. Make the folder writable (space, permissions, mount) and rerun to resume")

  def restore_latest(self, abstract_state: Any) -> Restored | None:
    """Restores the newest step that loads, or returns None when the folder has no checkpoint.

    `abstract_state` is the state's pytree with `jax.ShapeDtypeStruct` leaves carrying shardings; each array is read
    directly onto its devices in that sharding (and cast to that dtype), then verified (`verify`: the checksums
    recorded at save time, finite values). A step that fails (damaged or missing files, data changed since it was
    saved, non-finite values, a missing item, a structure or shape that differs from `abstract_state`) is logged as
    a warning and the previous one tried; if every step fails, `CheckpointRestoreError` lists each step's error.
    """
    unsharded = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state)
                 if getattr(leaf, "sharding", None) is None]
    if unsharded:
      # Orbax would quietly fall back to the saved layout or one device: wrong on another mesh or host count.
      raise ValueError(f"restore_latest: every leaf of abstract_state needs a sharding (jax.ShapeDtypeStruct(shape, "
                       f"dtype, sharding=...)); {len(unsharded)} have none, e.g. {', '.join(unsharded[:3])}")
    self._manager.wait_until_finished()
    failures: list[str] = []
    damaged = 0  # failures that are damaged files, not a config that differs from the saving run's
    steps = sorted(self._manager.all_steps(), reverse=True)
    for i, step in enumerate(steps):
      try:
        self._check_files(step)
        restored = self._manager.restore(step, args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardRestore(abstract_state), EXTRA_ITEM: ocp.args.JsonRestore()}))
        extra = verify(step, restored[STATE_ITEM], dict(restored[EXTRA_ITEM]))
        error = None
      except Exception as e:  # whatever broke, the previous step may load; all failures are reported below
        error = e
      error = _agree_across_processes(error)
      if error is None:
        if failures:
          log.warning("resuming from checkpoint step %d in %s (verified), older than the unrestorable newest step "
                      "%d", step, self.directory, steps[0])
        self.last_verified_step = step
        return Restored(step, restored[STATE_ITEM], extra)
      reason = _describe(error)
      log.warning("checkpoint step %d in %s could not be restored (%s); %s", step, self.directory, reason,
                  f"trying step {steps[i + 1]}" if i + 1 < len(steps) else "no older step left")
      failures.append(f"step {step}: {reason}")
      damaged += isinstance(error, CheckpointIntegrityError)
      self._unrestorable.add(step)
    if failures:
      raise CheckpointRestoreError(f"no checkpoint in {self.directory} could be restored:\n  " + "\n  ".join(failures)
                                   + "\n" + _restore_advice(damaged, len(failures)))
    return None

  def _check_files(self, step: int) -> None:
    """Raises CheckpointIntegrityError naming the first index file a committed step lacks (Orbax would report the
    missing array index as a pytree structure mismatch, blaming the config)."""
    for item, index in ((STATE_ITEM, "_METADATA"), (EXTRA_ITEM, "metadata")):
      path = self.directory / str(step) / item / index
      if not path.exists():
        raise CheckpointIntegrityError(f"{path} is missing (the index of the {item} item): the step's files were "
                                       "damaged or partly deleted after it was saved")

  def close(self) -> None:
    """Finishes background saves and releases Orbax's threads (after a failed save there is nothing to finish: the
    failure was reported, and Orbax's threads of that save never end, see `runguard.exit_now`)."""
    if not self._failed:
      self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _words(x: np.ndarray) -> np.ndarray:
  """An array's bits as uint32 words of the same shape (narrower types widened; 64-bit ones folded)."""
  if x.dtype == np.bool_:
    x = x.view(np.uint8)
  unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize]
  words = x.view(unsigned)
  if x.dtype.itemsize == 8:
    words = (words ^ (words >> np.uint64(32))) & np.uint64(0xFFFFFFFF)
  return words.astype(np.uint32)


def _mix(h: np.ndarray) -> np.ndarray:
  """MurmurHash3's 32-bit finaliser: every input bit flips about half the output bits (uint32, wrapping)."""
  h = h ^ (h >> np.uint32(16))
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> np.uint32(13))
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> np.uint32(16))


def _block_checksum(block: np.ndarray, starts: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
  """[positional, hashed, finite] (uint64) of one block of an array of `shape` whose corner is at `starts`.

  Each element's weight comes from its row-major index in the whole array, and the sums wrap modulo 2**32, so the
  blocks of any sharding add up to the same two checksums. The first changes under any single bit flip (odd
  weights); the second is a sum of hashed words.
  """
  words = _words(block)
  index = np.zeros(words.shape, np.uint32)
  stride = 1
  for axis in reversed(range(words.ndim)):
    along = (np.arange(words.shape[axis], dtype=np.uint64) + starts[axis]) * stride
    index = index + (along & 0xFFFFFFFF).astype(np.uint32).reshape([-1] + [1] * (words.ndim - axis - 1))
    stride *= shape[axis]
  with np.errstate(over="ignore"):
    positional = np.sum(words * (np.uint32(2) * index + np.uint32(1)), dtype=np.uint32)
    hashed = np.sum(_mix(words ^ _mix(index + np.uint32(0x9E3779B9))), dtype=np.uint32)
  finite = bool(np.all(np.isfinite(block))) if jnp.issubdtype(block.dtype, jnp.inexact) else True  # bf16 too
  return np.array([positional, hashed, finite], np.uint64)


def _host_blocks(leaf) -> list[tuple[np.ndarray, tuple[int, ...]]]:
  """(values, corner) of the blocks of `leaf` this process holds, each stored block once (replicas skipped)."""
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.random.key_data(leaf)
  if not isinstance(leaf, jax.Array):
    return [(np.asarray(leaf), (0,) * np.ndim(leaf))] if jax.process_index() == 0 else []
  blocks = []
  for shard in leaf.addressable_shards:
    if shard.replica_id == 0:
      corner = tuple(s.start or 0 for s in shard.index) if shard.index else ()
      blocks.append((np.asarray(shard.data), corner))
  return blocks


def state_checksums(state: Any) -> tuple[dict[str, str], list[str]]:
  """({array path: 16 hex digits}, paths of arrays with non-finite values) of a pytree of (sharded) arrays.

  Computed on the host from the blocks each process holds (no device program, so no compilation and no collective
  that could interleave with the training step's), then summed over the processes.
  """
  paths_leaves = jax.tree_util.tree_leaves_with_path(state)
  totals = np.zeros((len(paths_leaves), 3), np.uint64)
  totals[:, 2] = 1
  for i, (_, leaf) in enumerate(paths_leaves):
    shape = tuple(np.shape(jax.random.key_data(leaf) if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
                           else leaf))
    for block, corner in _host_blocks(leaf):
      checksum = _block_checksum(block, corner, shape)
      totals[i, :2] += checksum[:2]
      totals[i, 2] &= checksum[2]
  if jax.process_count() > 1:
    gathered = np.asarray(multihost_utils.process_allgather(totals)).astype(np.uint64)
    totals = np.concatenate([gathered[..., :2].sum(axis=0), gathered[..., 2:].min(axis=0)], axis=-1)
  checksums, nonfinite = {}, []
  for (path, _), (positional, hashed, finite) in zip(paths_leaves, totals):
    name = jax.tree_util.keystr(path)
    checksums[name] = f"{int(positional) & 0xFFFFFFFF:08x}{int(hashed) & 0xFFFFFFFF:08x}"
    if not finite:
      nonfinite.append(name)
  return checksums, nonfinite


def _extra_digest(extra: dict) -> str:
  return hashlib.blake2b(json.dumps(extra, sort_keys=True).encode(), digest_size=16).hexdigest()


def _some(names: list[str], shown: int = 3) -> str:
  more = f" and {len(names) - shown} more" if len(names) > shown else ""
  return f"{len(names)} array(s): {', '.join(names[:shown])}{more}"


def verify(step: int, state: Any, extra: dict) -> dict:
  """Checks a restored step against the checksums `save` recorded and for finite values; returns the caller's extra
  (without the checksums). Raises CheckpointIntegrityError naming the arrays that fail."""
  integrity = extra.pop(INTEGRITY_KEY, None)
  checksums, nonfinite = state_checksums(state)
  problems = []
  if integrity is None:
    log.warning("checkpoint step %d has no checksums (saved by an older jaxalign): only checked for finite values",
                step)
  else:
    recorded = integrity.get("arrays", {})
    if set(recorded) != set(checksums):
      problems.append(f"saved arrays {sorted(set(recorded) ^ set(checksums))[:3]} differ from the expected structure")
    changed = [name for name in checksums if name in recorded and recorded[name] != checksums[name]]
    if changed:
      problems.append(f"checksum mismatch (data changed since it was saved) in {_some(changed)}")
    if integrity.get("extra") != _extra_digest(extra):
      problems.append(f"the {EXTRA_ITEM} item (data position, config) changed since it was saved")
  if nonfinite:
    problems.append(f"non-finite values in {_some(nonfinite)}")
  if problems:
    raise CheckpointIntegrityError("; ".join(problems))
  return extra


def _restore_advice(damaged: int, failed: int) -> str:
  """What to do when no step restores: a damaged folder is not cured by changing the config."""
  if damaged == failed:
    return ("Every step failed its integrity check (files damaged or changed since they were saved; the config is "
            "not the cause): restore the folder from a copy, or move it away to start afresh.")
  return ("Check that the config (model, optimizer, mesh) matches the run that saved them, or move the folder away "
          "to start afresh." + (f" ({damaged} of the {failed} steps are damaged files.)" if damaged else ""))


def _agree_across_processes(error: Exception | None) -> Exception | None:
  """Makes a restore count as failed everywhere if it failed on any process, so all resume from the same step."""
  failed_anywhere = multihost_utils.process_allgather(np.int32(error is not None))
  if error is None and np.any(failed_anywhere):
    return RuntimeError("restored on this process but failed on another one (see that process's log)")
  return error


def _describe(error: BaseException) -> str:
  """One line per exception in the chain: Orbax wraps the telling TensorStore error (e.g. a short file) in a generic
  one whose message runs on with a dump of the store's spec."""
  parts = []
  while error is not None and len(parts) < 4:
    lines = str(error).strip().splitlines() or [""]
    parts.append(f"{type(error).__name__}: {lines[0][:200]}")
    error = error.__cause__ or error.__context__
  return "; caused by ".join(parts)
