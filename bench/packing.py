"""Batch layouts in the real train step on real HH pairs: length-grouped vs prefix-shared vs packed, for SFT, DPO and
reward models. What each layout buys is fewer padded tokens per example; this measures it in examples/s.

Same small OPT as bench/trl_compare.py (4 layers, hidden 256, OPT's vocabulary; fp32), the same random init for
every layout, the real OPT tokenizer on a random subset of the HH harmless-base test pairs (max length 256, prompt
128). Each layout runs one epoch over the subset with the library's own iterators and
layouts (`jaxalign.data.layouts`; length-grouped, buckets 128/256 for rows of one sequence, 128/256/512 for
prefix-shared ones), its step the trainer's (`step.StepFunctions`, AdamW); DPO takes precomputed reference
log-probs (zeros: the values do not change the cost). Packed layouts fill rows of 256 tokens and take fewer rows per
step, about --batch examples. Every batch shape compiles before timing (the count is reported); then --rounds
rounds each run the same share of every layout's epoch, so changes in machine load hit all alike.

  python bench/packing.py                       # ~6-8 minutes on 2 cores
  python bench/packing.py --tasks dpo --record  # one task; append the table to BENCHMARKS.md

Skips, with the reason printed, when ../shared is missing.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from timing import JaxVariant, small_opt_config  # noqa: E402  (bench/ is the script's own folder)

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SHARED = os.path.join(REPO, "..", "shared", "data")
MAX_LENGTH, MAX_PROMPT_LENGTH = 256, 128
ROW_BUCKETS = (128, 256)
LR = 1e-6


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data", default=os.path.join(SHARED, "hh-rlhf", "harmless-base", "test.jsonl.gz"))
  parser.add_argument("--tokenizer", default=os.path.join(SHARED, "tokenizers", "opt", "hf"))
  parser.add_argument("--pairs", type=int, default=256, help="random HH pairs (one epoch each layout)")
  parser.add_argument("--batch", type=int, default=16, help="examples per step (packed: rows holding about this many)")
  parser.add_argument("--tasks", default="sft,dpo,reward")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
  return parser.parse_args()


def epoch(iterator) -> list[dict[str, np.ndarray]]:
  return [next(iterator) for _ in range(iterator.batches_per_epoch)]


def rows_for(examples_per_step: int, examples: int, rows: int) -> int:
  """Rows a packed step takes to hold about `examples_per_step` examples (rows hold examples / rows each)."""
  return max(1, round(examples_per_step * rows / examples))


def layout_epochs(task: str, pairs, args, pad_id: int) -> list[tuple[str, list, list[int]]]:
  """(name, one epoch of batches, examples per batch) of each layout of `task`, from the library's layouts."""
  from jaxalign import reference as reference_lib
  from jaxalign.data import layouts, tokenize

  common = dict(pad_id=pad_id, seed=args.seed, group_by_length=True, process_index=0, process_count=1)
  if task == "sft":
    examples = tokenize.sft_examples(pairs, max_length=MAX_LENGTH)
    rows_layout = layouts.SFTRows(max_length=MAX_LENGTH, buckets=ROW_BUCKETS)
    packed_layout = layouts.SFTRows(max_length=MAX_LENGTH, buckets=(MAX_LENGTH,), packing=True)
    packed = packed_layout.examples(examples)
    rows = rows_for(args.batch, len(examples), len(packed))
    packed_batches = epoch(packed_layout.iterator(packed, global_batch_size=rows, **common))
    counts = [int(b.segment_ids.max(axis=1).sum()) for b in packed_batches]  # segments are numbered 1..k per row
    return [("one sequence per row, length-grouped",
             epoch(rows_layout.iterator(examples, global_batch_size=args.batch, **common)), None),
            (f"packed, {rows} rows of {MAX_LENGTH}", packed_batches, counts)]
  scored = task == "dpo"
  # DPO takes precomputed reference log-probs (zeros: the values do not change the cost); reward models a head.
  names = reference_lib.PER_PAIR_NAMES if scored else ("head",)
  per_pair = {name: np.zeros(len(pairs), np.float32 if scored else np.int32) for name in names}
  out = []
  for name, layout in (("chosen and rejected rows, length-grouped",
                        layouts.SeparateRows(max_length=MAX_LENGTH, buckets=ROW_BUCKETS, scored=scored)),
                       ("prefix-shared rows, length-grouped",
                        layouts.SharedRows(max_length=MAX_LENGTH, buckets=ROW_BUCKETS, scored=scored)),
                       ("prefix-shared, packed", layouts.SharedRows(max_length=MAX_LENGTH, buckets=ROW_BUCKETS,
                                                                    scored=scored, packing=True))):
    examples = layout.examples(pairs)
    packed = getattr(layout, "packing", False)
    rows = rows_for(args.batch, len(pairs), len(examples)) if packed else args.batch
    layout_batches = epoch(layout.iterator(examples, global_batch_size=rows, per_pair=per_pair, **common))
    counts = [int(b.pair_mask.sum()) for b in layout_batches] if packed else None
    out.append((f"{name}, {rows} rows of {MAX_LENGTH}" if packed else name, layout_batches, counts))
  return out


def padded_tokens(batch) -> int:
  from jaxalign.data import layouts

  return int(sum(v.size for k, v in layouts.named_arrays(batch).items() if k.endswith("input_ids")))


def real_tokens(batch) -> int:
  from jaxalign.data import layouts

  return int(sum(v.sum() for k, v in layouts.named_arrays(batch).items() if k.endswith("attention_mask")))


def run_task(task: str, model, pairs, args, pad_id: int) -> list[str]:
  from jaxalign import tasks
  from jaxalign.data import layouts

  task_obj = {"sft": tasks.SFTTask, "dpo": tasks.DPOTask, "reward": tasks.RewardTask}[task]()
  variants, examples = [], []  # examples[k][i]: sequences or pairs in step i of layout k
  for name, layout_batches, counts in layout_epochs(task, pairs, args, pad_id):
    variant = JaxVariant(name, task_obj, model, layout_batches, [real_tokens(b) for b in layout_batches],
                         reference="precomputed", lr=LR)
    variant.compile(range(len(layout_batches)))
    print(f"  {task}: {name}: {len(layout_batches)} steps, compiled in {variant.compile_s:.1f}s", flush=True)
    variants.append(variant)
    examples.append(counts or [b.num_rows for b in layout_batches])
  for r in range(args.rounds):
    for v, counts in zip(variants, examples):
      n = len(v.batches)
      for i in range(r * n // args.rounds, (r + 1) * n // args.rounds):
        v.run([i], counts[i], r)
  unit = "seqs" if task == "sft" else "pairs"
  base = variants[0].timer.total_rate()
  lines = []
  for v, counts in zip(variants, examples):
    padded = sum(padded_tokens(b) for b in v.batches)
    real = sum(real_tokens(b) for b in v.batches)
    row_length = lambda b: max(x.shape[1] for k, x in layouts.named_arrays(b).items() if k.endswith("input_ids"))
    shapes = sorted({(b.num_rows, row_length(b)) for b in v.batches})
    rate = v.timer.total_rate()
    lines.append(f"| {task} | {v.name} | {sum(counts)} | {len(v.batches)} | {padded:,} | {real / padded:.0%} | "
                 f"{len(shapes)} | {sum(v.timer.times):.1f} | {rate:.2f} {unit}/s | {rate / base:.2f}x |")
  return lines


def main():
  args = parse_args()
  for path in (args.data, args.tokenizer):
    if not os.path.exists(path):
      print(f"SKIPPED bench/packing.py: {path} not found (../shared is missing?)")
      return
  import jax
  from flax import nnx

  from jaxalign import tokenizer as tokenizer_lib
  from jaxalign.data import hh, tokenize
  from jaxalign.models import opt, reward

  tokenizer = tokenizer_lib.load_tokenizer(args.tokenizer)
  text_pairs, _ = hh.load_preference_pairs(args.data, split="test")
  all_pairs = tokenize.tokenize_pairs(text_pairs, tokenizer, max_length=MAX_LENGTH,
                                      max_prompt_length=MAX_PROMPT_LENGTH)
  pairs = all_pairs.subset(np.sort(np.random.default_rng(args.seed).permutation(len(all_pairs))[:args.pairs]))
  config = small_opt_config()
  machine = (f"{os.cpu_count()} cores, jax {jax.__version__} ({jax.devices()[0].platform}), load average "
             f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} at start")
  print(machine, flush=True)
  lines = []
  for task in args.tasks.split(","):
    model = (reward.RewardModel(config, ("harmless", "helpful"), rngs=nnx.Rngs(args.seed)) if task == "reward"
             else opt.OPTForCausalLM(config, rngs=nnx.Rngs(args.seed)))
    lines += run_task(task, model, pairs, args, tokenizer.pad_token_id)
  table = "\n".join(["| task | layout | examples | steps | padded tokens | real / padded | batch shapes | "
                     "seconds | examples/s (all steps) | vs first layout |",
                     "|---|---|---|---|---|---|---|---|---|---|", *lines])
  machine += f"; load average {', '.join(f'{x:.1f}' for x in os.getloadavg())} at the end"
  print("\n" + table)
  if args.record:
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    command = "python bench/packing.py " + " ".join(a for a in sys.argv[1:] if a != "--record")
    with open(os.path.join(REPO, "BENCHMARKS.md"), "a") as f:
      f.write(f"\n### {stamp} — `{command.strip()}` (CPU, batch layouts)\n\nMachine: {machine}.\n\n{table}\n")


if __name__ == "__main__":
  main()
