"""Projected wall time of a whole study (configs/paper.py or configs/study.py) on one accelerator.

Pairs are tokenized with the real OPT tokenizer from a local HH file (default: the harmless-base test split in
../shared, standing in for the 160,800-pair train split's length distribution), batched exactly as the trainer would
(random order, bucket padding, prefix sharing where the recipe uses it), and every padded token is charged the
model's training FLOPs. Time = FLOPs / (MFU x peak), batch by batch. The MFU comes from `--measured`, the JSON lines
`bench/train_step.py --json` wrote on the card: per task kind (sft, dpo, dpo-shared, reward), at each batch's row
length, interpolated linearly between the measured lengths (held flat beyond them); the reference pass of a
precomputed-reference DPO stage is charged at its stage's MFU. Kinds not measured fall back to --sft-mfu / --dpo-mfu,
marked "assumed".

  python bench/study_estimate.py --recipe study --measured runs/train_step.jsonl
  python bench/study_estimate.py --recipe study --sft-mfu 0.45 --dpo-mfu 0.40 --peak-tflops 989
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from jaxalign import flops, losses, shapes
from jaxalign.data import batches, hh, layouts, pipeline, tokenize
from jaxalign.models import opt
from jaxalign.tokenizer import load_tokenizer

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
TRAIN_PAIRS = 160_800  # Anthropic/hh-rlhf default train split (all four subsets)


def padded_batches(lengths: np.ndarray, targets: np.ndarray, stage, ladder: tuple[int, ...], *,
                   sort: bool = False) -> list[tuple[int, int]]:
  """(padded row length, LM-head positions per row) of every batch of one epoch, batched as the trainer batches
  them (or length-sorted, as the reference pass runs)."""
  batch_size = stage.training.batch_size
  order = (np.argsort(-lengths, kind="stable") if sort
           else batches.epoch_order(lengths, batch_size, 0, 0, stage.data.group_by_length))
  usable = len(order) // batch_size * batch_size
  out = []
  for chunk in order[:usable].reshape(-1, batch_size):
    length = shapes.fit(int(lengths[chunk].max()), ladder)
    out.append((length, shapes.target_width(int(targets[chunk].max()), length)))
  return out


def stage_kind(stage) -> str:
  """The bench/train_step.py task whose measured MFU stands for this stage."""
  if stage.task == "dpo" and stage.data.prefix_sharing:
    return "dpo-shared"
  return stage.task  # reward rows, shared or not, have no LM head: the "reward" runs stand for both


def stage_batches(stage, pairs: tokenize.TokenizedPairs, arch: opt.OPTConfig, *,
                  scored_head: bool = True) -> tuple[list, list]:
  """(training, precomputed-reference pass) batches of one epoch as (row length, FLOPs): every padded token through
  the decoder, the LM head at each row's padded scored positions (none for reward models; at every position
  without `scored_head`)."""
  batch = stage.training.batch_size
  batch_kind = "sft" if stage.task == "sft" else "pairs"
  layout = pipeline.layout_for(stage, batch_kind)
  examples = layout.examples(tokenize.sft_examples(pairs, max_length=stage.data.max_length) if batch_kind == "sft"
                             else pairs)
  lengths = layout.lengths(examples)
  targets = layout.target_counts(examples)
  if targets is None:  # reward models: no LM head
    targets = np.zeros(len(lengths), np.int64)
  rows_per_item = 2 if isinstance(layout, layouts.SeparateRows) else 1
  head = 0 if stage.task == "reward" else 1
  rows = batch * rows_per_item

  def charged(extra_forwards: int, sort: bool = False) -> list[tuple[int, float]]:
    return [(n, flops.training_flops(arch, n, rows * n, head * rows * (width if scored_head else n),
                                     extra_forwards=extra_forwards))
            for n, width in padded_batches(lengths, targets, stage, layout.ladder, sort=sort)]

  needs_reference = stage.task == "dpo" and losses.needs_reference(stage.dpo.loss_type)
  train = charged(int(needs_reference and stage.dpo.reference == "model"))
  reference = []
  if needs_reference and stage.dpo.reference == "precomputed":
    reference = [(n, f / 3) for n, f in charged(0, sort=True)]  # forward only: a third of a training step's FLOPs
  return train, reference


# Each speed option of a recipe turned on in turn (`--ablation`): (what changes, LM head at scored positions only,
# length grouping, prefix sharing, packing); an option stays off where the recipe has it off.
ABLATION = (
    ("none: random batches, chosen and rejected rows apart, the LM head at every position", False, False, False, False),
    ("+ the LM head at scored positions only", True, False, False, False),
    ("+ length-grouped batches", True, True, False, False),
    ("+ prefix-shared pairs (DPO, its reference pass, reward)", True, True, True, False),
    ("+ packing (SFT; prefix-shared pairs): the recipe", True, True, True, True),
)


def without_options(stage, pairs: tokenize.TokenizedPairs, *, group: bool, share: bool, pack: bool):
  """A copy of `stage` with the speed options not asked for turned off; where packing goes, the batch holds as many
  examples as the recipe's packed rows held on average."""
  out = stage.copy_and_resolve_references()
  out.data.group_by_length = stage.data.group_by_length and group
  out.data.prefix_sharing = stage.data.prefix_sharing and share
  out.data.packing = stage.data.packing and pack and (stage.task == "sft" or out.data.prefix_sharing)
  if stage.data.packing and not out.data.packing:
    if stage.task == "sft":
      examples = tokenize.sft_examples(pairs, max_length=stage.data.max_length)
      per_row = len(examples) / len(tokenize.pack_examples(examples, seq_len=stage.data.max_length))
    else:
      per_row = len(pairs) / len(tokenize.pack_pairs(pairs, capacity=stage.data.max_length))
    out.training.batch_size = round(stage.training.batch_size * per_row)
  return out


def stage_time(stage, pairs, arch, mfu, scale: float, peak: float, scored_head: bool = True):
  """(training FLOPs, reference-pass FLOPs, seconds) of one stage on the full train split; `mfu(row length)`."""
  train, reference = stage_batches(stage, pairs, arch, scored_head=scored_head)
  epochs = stage.training.num_epochs
  seconds = (sum(f / mfu(n) for n, f in train) * epochs + sum(f / mfu(n) for n, f in reference)) * scale / peak
  return sum(f for _, f in train) * epochs * scale, sum(f for _, f in reference) * scale, seconds


def load_measured(path: str, device: str = "") -> dict[str, list[tuple[int, float]]]:
  """{task kind: [(row length, MFU)] sorted by length} from bench/train_step.py --json lines (the precomputed
  reference runs of DPO; the best MFU where a shape was measured more than once)."""
  best: dict[tuple[str, int], float] = {}
  with open(path) as f:
    for line in f:
      r = json.loads(line)
      if r.get("mfu") is None or r.get("reference") == "model" or (device and r["device"] != device):
        continue
      key = (r["task"], r["length"])
      best[key] = max(best.get(key, 0.0), r["mfu"])
  out: dict[str, list[tuple[int, float]]] = {}
  for (kind, length), value in sorted(best.items()):
    out.setdefault(kind, []).append((length, value))
  return out


def mfu_at(points: list[tuple[int, float]], length: int) -> float:
  lengths, values = zip(*points)
  return float(np.interp(length, lengths, values))


def mfu_for(stage, measured: dict, args):
  """(MFU as a function of row length, "measured" or "assumed") for a stage's task kind."""
  kind = stage_kind(stage)
  if kind in measured:
    return (lambda n: mfu_at(measured[kind], n)), "measured"
  value = args.sft_mfu if stage.task == "sft" else args.dpo_mfu
  return (lambda n: value), "assumed"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--recipe", default="study", help="a configs/ module with stages (paper or study)")
  parser.add_argument("--data", default=os.path.join(SHARED, "hh-rlhf", "harmless-base", "test.jsonl.gz"))
  parser.add_argument("--tokenizer", default=os.path.join(SHARED, "tokenizers", "opt", "hf"))
  parser.add_argument("--measured", help="bench/train_step.py --json output from the card")
  parser.add_argument("--sft-mfu", type=float, default=0.45, help="assumed where --measured has no sft runs")
  parser.add_argument("--dpo-mfu", type=float, default=0.40, help="assumed for other kinds --measured lacks")
  parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200: 989)")
  parser.add_argument("--ablation", action="store_true", help="also: the recipe's speed options turned on in turn")
  args = parser.parse_args()
  if not os.path.exists(args.data) or not os.path.isdir(args.tokenizer):
    print(f"skipped: needs {args.data} and {args.tokenizer} (../shared on the development machines)")
    return
  measured = load_measured(args.measured) if args.measured else {}
  recipe = importlib.import_module(f"configs.{args.recipe}").get_config()
  tokenizer = load_tokenizer(args.tokenizer)
  text_pairs, _ = hh.load_preference_pairs(args.data)
  scale = TRAIN_PAIRS / len(text_pairs)
  arch = opt.preset("opt-350m")
  peak = args.peak_tflops * 1e12
  stages = []
  for name in recipe.stages:
    stage = recipe.stage_configs[name]
    pair_task = stage.task != "sft"  # SFT rows are cut later, keeping their start (as the trainer does)
    pairs = tokenize.tokenize_pairs(text_pairs, tokenizer, max_length=stage.data.max_length if pair_task else None,
                                    max_prompt_length=stage.data.max_prompt_length if pair_task else None)
    stages.append((name, stage, pairs))
  print("| stage | task | TFLOP (train) | TFLOP (reference pass) | MFU (FLOP-weighted) | minutes |\n"
        "|---|---|---|---|---|---|")
  total = 0.0
  for name, stage, pairs in stages:
    mfu, source = mfu_for(stage, measured, args)
    train_flops, reference_flops, seconds = stage_time(stage, pairs, arch, mfu, scale, peak)
    total += seconds / 60
    weighted = (train_flops + reference_flops) / (seconds * peak)
    print(f"| {name} | {stage_kind(stage)} | {train_flops / 1e12:,.0f} | {reference_flops / 1e12:,.0f} | "
          f"{weighted:.0%} ({source}) | {seconds / 60:.1f} |")
  print(f"\nprojected training time of `{args.recipe}` on one {args.peak_tflops:.0f} TFLOP/s card: {total:.1f} min "
        f"(HH lengths from {os.path.basename(args.data)}, scaled to {TRAIN_PAIRS:,} pairs; compilation and "
        "evaluation not included)")
  if args.ablation:
    print("\n| speed options | TFLOP | minutes |\n|---|---|---|")
    for label, scored_head, group, share, pack in ABLATION:
      flop = minutes = 0.0
      for _, stage, pairs in stages:
        variant = without_options(stage, pairs, group=group, share=share, pack=pack)
        train_flops, reference_flops, seconds = stage_time(variant, pairs, arch, mfu_for(variant, measured, args)[0],
                                                           scale, peak, scored_head=scored_head)
        flop, minutes = flop + train_flops + reference_flops, minutes + seconds / 60
      print(f"| {label} | {flop / 1e12:,.0f} | {minutes:.1f} |")


if __name__ == "__main__":
  main()
