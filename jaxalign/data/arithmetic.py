"""A synthetic verifiable task for the online methods: small-integer arithmetic with an exact checker.

Every problem "a op b" (a, b in 0 … max_operand, op in `operations`) is one prompt in TRL's prompt-only format, the
expected answer in an extra column that reaches reward functions as `answer=[...]`:
  {"prompt": "\\n\\nHuman: What is 7 + 12?\\n\\nAssistant:", "answer": 19}
(HH text, as the study's models read). The expected completion is ANSWER_TEMPLATE, " Answer: 19": `parse_answer`
reads it back (None when the completion is not in that format), `is_correct` checks it exactly.

`arithmetic_split` shuffles the whole problem space with the seed and deals disjoint train and held-out sets;
`sft_records` makes HH pairs from problems (chosen: the right answer in the format; rejected: a wrong number), for
a short SFT on the answer format before GRPO, or for DPO.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Sequence

OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
PROMPT_TEMPLATE = "\n\nHuman: What is {a} {op} {b}?\n\nAssistant:"
ANSWER_TEMPLATE = " Answer: {answer}"
# The expected format, the whole completion (surrounding whitespace aside): "Answer: <integer>".
_ANSWER = re.compile(r"\s*Answer: (-?\d+)\s*")


def problems(max_operand: int = 20, operations: Sequence[str] = ("+", "-", "*")) -> list[tuple[int, str, int]]:
  """Every problem (a, op, b) of the space, in a fixed order."""
  unknown = [op for op in operations if op not in OPERATIONS]
  if unknown or not operations or max_operand < 1:
    raise ValueError(f"operations {list(operations)} / max_operand {max_operand}: expected operations from "
                     f"{list(OPERATIONS)} and max_operand >= 1")
  numbers = range(max_operand + 1)
  return [(a, op, b) for op in operations for a, b in itertools.product(numbers, numbers)]


def record(a: int, op: str, b: int) -> dict:
  """One problem in TRL's prompt-only format, its exact answer as the "answer" column."""
  return {"prompt": PROMPT_TEMPLATE.format(a=a, op=op, b=b), "answer": OPERATIONS[op](a, b)}


def arithmetic_split(*, seed: int = 0, n_train: int = 1000, n_held_out: int = 200, max_operand: int = 20,
                     operations: Sequence[str] = ("+", "-", "*")) -> tuple[list[dict], list[dict]]:
  """(train, held-out) prompt records: the problem space shuffled by `seed`, the first `n_held_out` held out, the
  next `n_train` for training (no problem in both)."""
  space = problems(max_operand, operations)
  if n_train < 0 or n_held_out < 0 or n_train + n_held_out > len(space):
    raise ValueError(f"n_train {n_train} + n_held_out {n_held_out}: expected at most the {len(space)} problems of "
                     f"max_operand {max_operand} with operations {list(operations)}")
  random.Random(seed).shuffle(space)
  held_out = [record(*p) for p in space[:n_held_out]]
  return [record(*p) for p in space[n_held_out:n_held_out + n_train]], held_out


def completion_text(answer: int) -> str:
  """The expected completion for an answer."""
  return ANSWER_TEMPLATE.format(answer=answer)


def parse_answer(completion: str) -> int | None:
  """The integer a completion answers, or None when it is not in the expected format."""
  match = _ANSWER.fullmatch(completion)
  return int(match.group(1)) if match else None


def is_correct(completion: str, answer: int) -> bool:
  """Whether the completion is in the expected format with exactly the answer."""
  return parse_answer(completion) == int(answer)


def sft_records(records: Sequence[dict], *, seed: int = 0) -> list[dict]:
  """HH pairs of prompt records: chosen = prompt + the right answer in the format, rejected = prompt + a wrong
  number (off by 1 to 5, either way), from `seed`."""
  rng = random.Random(seed)
  pairs = []
  for r in records:
    wrong = r["answer"] + rng.choice((-1, 1)) * rng.randint(1, 5)
    pairs.append({"chosen": r["prompt"] + completion_text(r["answer"]),
                  "rejected": r["prompt"] + completion_text(wrong)})
  return pairs
