"""Held-out exact-match accuracy of the arithmetic task's models (configs/arithmetic.py): greedy answers to the 200
held-out problems (never trained on), exact checker of jaxalign/data/arithmetic.py; the first and last stage
compared on the same problems with McNemar's exact test.

  python bench/arithmetic_accuracy.py runs/arithmetic [--stages sft,grpo]
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

from jaxalign import sampling, stats  # noqa: E402
from jaxalign.data import arithmetic  # noqa: E402
from jaxalign.models import hub  # noqa: E402
from jaxalign.tokenizer import load_tokenizer  # noqa: E402


def accuracy(model_dir: str, problems: list[dict]) -> tuple[list[bool], int]:
  """(correct per problem, how many answered in the format) of the model's greedy answers to `problems`."""
  model, tokenizer = hub.from_pretrained(model_dir), load_tokenizer(model_dir)
  answers = sampling.generate_texts(model, tokenizer, [p["prompt"] for p in problems], max_new_tokens=8,
                                    batch_size=len(problems), max_prompt_length=32)
  correct = [arithmetic.is_correct(a, p["answer"]) for a, p in zip(answers, problems)]
  return correct, sum(arithmetic.parse_answer(a) is not None for a in answers)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("study")
  parser.add_argument("--stages", default="sft,grpo")
  args = parser.parse_args()
  _, held_out = arithmetic.arithmetic_split()
  print("| stage | exact match (held-out) | in the answer format |\n|---|---|---|")
  stages = args.stages.split(",")
  correct = {}
  for stage in stages:
    correct[stage], formatted = accuracy(os.path.join(args.study, stage, "model"), held_out)
    print(f"| {stage} | {sum(correct[stage])}/{len(held_out)} = {sum(correct[stage]) / len(held_out):.1%} | "
          f"{formatted / len(held_out):.0%} |")
  if len(stages) > 1:
    print(f"\n{stages[0]} vs {stages[-1]}, McNemar's exact test: {stats.mcnemar_exact(correct[stages[0]], correct[stages[-1]])}")


if __name__ == "__main__":
  main()
