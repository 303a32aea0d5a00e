"""Run-level safety for a training stage: one run per workdir, and a clean stop on SIGTERM / SIGINT.

Workdir lock: `lock_workdir` takes an exclusive `flock` on `<workdir>/run.lock` for the whole stage and writes the
holder (host, pid, start time) into it. The kernel drops the lock when the process ends in any way (an exception,
SIGKILL, a crash), so a lock left by a dead run never blocks a rerun; a second live run fails at once naming the
holder. Only process 0 of a multi-host run takes it (the hosts of one run share the workdir) and all processes learn
the outcome, so either every host starts or every host fails. Across machines the lock relies on the filesystem's
`flock` (local disks; NFSv4 and Lustre mounted with flock support); where it is not enforced across machines, the
holder line still says who else wrote there.

Preemption: `StopSignals` holds SIGTERM (what cloud schedulers and SLURM send before killing) and SIGINT (Ctrl-C)
for the whole stage. In the training loop the first one is a request the loop polls with `should_stop`: it finishes
the current step, saves a checkpoint and raises `Preempted`, whose exit status (`PREEMPTED_EXIT_CODE`) tells a
scheduler "resume me". Outside the loop (data, model, reference pass, compilation, export), and for a second signal,
`Preempted` is raised at once, with a line saying what was stopped and which checkpoint is committed. In a
multi-host run every process polls at the same steps (every `check_every`) and the processes exchange their flags
there, so all stop after the same step.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
# EX_TEMPFAIL from sysexits.h: a temporary failure, to be retried (a resumable stop), unlike a crash or a kill.
PREEMPTED_EXIT_CODE = 75
# EX_IOERR from sysexits.h: a checkpoint could not be written; the run resumes from its last saved step once the
# folder can be written again.
SAVE_FAILED_EXIT_CODE = 74


class WorkdirBusyError(RuntimeError):
  """Another live run holds the workdir."""


class Preempted(SystemExit):
  """Raised after the checkpoint of a stop requested by a signal was saved; exits with PREEMPTED_EXIT_CODE."""

  def __init__(self, message: str):
    super().__init__(PREEMPTED_EXIT_CODE)
    self.message = message

  def __str__(self) -> str:
    return self.message


class WorkdirLock:
  """The held lock of one workdir (process 0 only holds the file); `release()` or `with` frees it."""

  def __init__(self, fd: int | None):
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing the descriptor drops the flock
      self._fd = None

  def __enter__(self) -> WorkdirLock:
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _holder_line() -> str:
  started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  return f"host {socket.gethostname()}, pid {os.getpid()}, started {started}"


def _try_lock(path: str) -> tuple[int | None, str]:
  """(descriptor holding the lock, "") or (None, the holder's line)."""
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
      os.close(fd)
      raise
    holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown (it has not written its line yet)"
    os.close(fd)
    return None, holder
  os.ftruncate(fd, 0)
  os.pwrite(fd, (_holder_line() + "\n").encode(), 0)
  return fd, ""


def lock_workdir(workdir: str) -> WorkdirLock:
  """Takes the workdir's run lock (see the module docstring); raises WorkdirBusyError naming the live holder."""
  fd, holder = None, ""
  if jax.process_index() == 0:
    fd, holder = _try_lock(os.path.join(workdir, LOCK_FILE))
  busy = jax.process_index() == 0 and fd is None
  if jax.process_count() > 1:
    busy = bool(multihost_utils.broadcast_one_to_all(np.int32(busy)))
  if busy:
    raise WorkdirBusyError(f"{workdir} is in use by another training run ({holder or 'see process 0 for who'}); "
                           "wait for it to finish, stop it, or use another --workdir: two runs in one workdir would "
                           "mix their checkpoints, metrics and exported model")
  return WorkdirLock(fd)


def exit_now(message: str, code: int) -> None:
  """Logs `message` as an error, flushes the logs and standard streams, and ends the process with `code` at once.

  For a checkpoint save that failed in Orbax's background threads: Orbax leaves a non-daemon thread waiting for a
  signal from the failed save that never comes, and Python's normal exit (SystemExit, or returning from main) joins
  every non-daemon thread, so the process would wait for ever (a scheduler then waits out its wall-time limit). A
  thread cannot be cancelled from Python, hence `os._exit`, which skips the join (and `atexit` handlers and
  `finally` blocks: the caller closes its own files first). The workdir lock goes with the process.
  """
  log.error("%s", message)
  for handler in logging.getLogger().handlers + log.handlers:
    handler.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


class StopSignals:
  """While entered (a whole stage: data, model, reference pass, compilation, training, export), SIGTERM and SIGINT
  stop the stage with `Preempted` (exit status 75, no traceback), saying what was stopped and what was kept.

  Inside `polling()` (the training loop) the first signal is a request the loop polls with `should_stop`: it
  finishes the current step, saves a checkpoint and stops. Anywhere else, and for a second signal, the handler raises
  `Preempted` at once. `phase` names what the stage is doing (set by the trainer); `kept()` says what a rerun
  resumes from (the newest committed checkpoint), read when the signal comes. Handlers can only be installed from the
  main thread; elsewhere (a training run started from a worker thread) the signals keep their previous behaviour and
  a warning says so. In a multi-host run a signal outside the loop stops only the processes it reaches (schedulers
  signal every host).
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, check_every: int = 1, kept: Callable[[], str] = lambda: "nothing was saved"):
    self.check_every = max(1, check_every)
    self.kept = kept
    self.phase = "starting the stage"
    self.received: str | None = None
    self._polling = False
    self._previous: dict[int, object] = {}

  def _handle(self, signum, frame) -> None:
    name = signal.Signals(signum).name
    if self.received is None and self._polling:
      self.received = name
      log.warning("%s received: finishing the current step, then saving a checkpoint and stopping (send it again to "
                  "exit at once)", name)
      return
    what = f"second signal ({name})" if self.received is not None else name
    message = f"stopped by {what} while {self.phase}: {self.kept()}; rerun the same command to resume"
    log.warning(message)
    self._restore()
    raise Preempted(message)

  @contextlib.contextmanager
  def polling(self, phase: str):
    """Within: the first signal is a request polled by `should_stop` (the training loop's steps end cleanly)."""
    self.phase, self._polling = phase, True
    try:
      yield self
    finally:
      self._polling = False

  def __enter__(self) -> StopSignals:
    if threading.current_thread() is not threading.main_thread():
      log.warning("training outside the main thread: SIGTERM/SIGINT will not save a checkpoint before stopping")
      return self
    for signum in self.SIGNALS:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _restore(self) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def __exit__(self, *exc) -> None:
    self._restore()

  def stop_after(self, step: int, total_steps: int, directory: str) -> None:
    """Raises `Preempted` once the loop has saved `step` after a signal (logged: what stopped, what was kept)."""
    message = (f"stopped by {self.received} after step {step} of {total_steps}: checkpoint step {step} saved in "
               f"{directory}; rerun the same command to resume")
    log.warning(message)
    raise Preempted(message)

  def should_stop(self, step: int) -> bool:
    """Whether the loop should save and stop after `step`. Single process: as soon as a signal came. Several
    processes: at steps that are multiples of `check_every`, if a signal reached any of them (all agree)."""
    if jax.process_count() == 1:
      return self.received is not None
    if step % self.check_every:
      return False
    flags = multihost_utils.process_allgather(np.int32(self.received is not None))
    if np.any(flags) and self.received is None:
      self.received = "a signal on another process"
    return bool(np.any(flags))
