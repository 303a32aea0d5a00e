"""The methods table: HmR / HpR / CAS per model from an evaluation's results.json, with each training stage's own
held-out accuracy from its done.json (`eval/rewards/accuracies`: the implicit-reward accuracy of DPO and IPO, the
log-prob accuracy of SimPO, ORPO and CPO, KTO's label accuracy around its KL point; SFT stages have none).

  python bench/methods_table.py runs/quickstart_methods [--eval runs/quickstart_methods/eval] [--record]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

from configs.quickstart_methods_eval import MODELS  # noqa: E402

ACCURACY = "eval/rewards/accuracies"


def held_out_accuracy(study: str, stage: str) -> str:
  path = os.path.join(study, stage, "done.json")
  if not os.path.exists(path):
    return "not run"
  with open(path) as f:
    done = json.load(f)
  return f"{done[ACCURACY]:.3f}" if ACCURACY in done else "—"


def table(study: str, eval_dir: str) -> str:
  with open(os.path.join(eval_dir, "results.json")) as f:
    models = json.load(f)["models"]
  lines = ["| model | HmR % | HpR % | CAS % | held-out accuracy (own metric) |", "|---|---|---|---|---|"]
  for name, stage in MODELS:
    metrics = models.get(name, {}).get("metrics", {})
    rates = [f"{metrics[k]:.1f}" if k in metrics else "—" for k in ("hmr", "hpr", "cas")]
    lines.append(f"| {name} | {' | '.join(rates)} | {held_out_accuracy(study, stage)} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("study", help="the study's workdir (one folder per stage)")
  parser.add_argument("--eval", default="", help="the evaluation's workdir (default <study>/eval)")
  parser.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
  args = parser.parse_args()
  out = table(args.study, args.eval or os.path.join(args.study, "eval"))
  print(out)
  if args.record:
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    with open(os.path.join(REPO, "BENCHMARKS.md"), "a") as f:
      f.write(f"\n### {stamp} — the quickstart methods study (`configs/quickstart_methods.py`, "
              f"`configs/quickstart_methods_eval.py`, `bench/methods_table.py`)\n\n{out}\n")


if __name__ == "__main__":
  main()
