"""Progress of the evaluation's long parts (generating, judging): a tqdm bar per model on a terminal (stderr; none
when stderr is not a terminal, so logs and CI output hold no bar redraws) and, always, a log line as each prompt set
is done, with its prompt count and seconds."""

from __future__ import annotations

import logging
import sys
import time

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


class Progress:
  """One model's way through the prompt sets: `p = Progress("generating", "sft", total)`, then `p.start(set_name)` and
  `p.done(set_name, count)` around each set's work, and `p.close()`."""

  def __init__(self, action: str, name: str, total: int):
    self.action, self.name = action, name
    self.bar = tqdm(total=total, desc=f"{action} {name}", unit="prompt", file=sys.stderr, dynamic_ncols=True,
                    disable=not sys.stderr.isatty())
    self._started = time.perf_counter()

  def start(self, part: str) -> None:
    self.bar.set_postfix_str(part)
    self._started = time.perf_counter()

  def done(self, part: str, count: int) -> None:
    self.bar.update(count)
    log.info("%s %s / %s: %d prompts in %.1f s", self.action, self.name, part, count,
             time.perf_counter() - self._started)

  def close(self) -> None:
    self.bar.close()
