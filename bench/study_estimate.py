"""Projected wall time of a whole study (configs/paper.py or configs/study.py) on one accelerator.

Pairs are tokenized with the real OPT tokenizer from a local HH file (default: the harmless-base test split in
../shared, standing in for the 160,800-pair train split's length distribution), batched exactly as the trainer would
(random order, bucket padding, prefix sharing where the recipe uses it), and every padded token is charged the
model's training FLOPs. Time = FLOPs / (MFU x peak); pass the MFU measured by bench/train_step.py on the card.

  python bench/study_estimate.py --recipe study --sft-mfu 0.45 --dpo-mfu 0.40 --peak-tflops 989
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from jaxalign import flops
from jaxalign.data import batches, hh, tokenize
from jaxalign.models import opt
from jaxalign.tokenizer import load_tokenizer

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
TRAIN_PAIRS = 160_800  # Anthropic/hh-rlhf default train split (all four subsets)


def padded_batches(lengths: np.ndarray, targets: np.ndarray, stage, buckets: tuple[int, ...], max_length: int, *,
                   sort: bool = False) -> list[tuple[int, int]]:
  """(padded row length, LM-head positions per row) of every batch of one epoch, batched as the trainer batches
  them (or length-sorted, as the reference pass runs)."""
  batch_size = stage.training.batch_size
  order = (np.argsort(-lengths, kind="stable") if sort
           else batches.epoch_order(lengths, batch_size, 0, 0, stage.data.group_by_length))
  bucket_set = batches.bucket_lengths(buckets, max_length)
  usable = len(order) // batch_size * batch_size
  out = []
  for chunk in order[:usable].reshape(-1, batch_size):
    length = batches.pick_bucket(int(lengths[chunk].max()), bucket_set)
    out.append((length, batches.target_width(int(targets[chunk].max()), length)))
  return out


def stage_flops(stage, pairs: tokenize.TokenizedPairs, arch: opt.OPTConfig, scale: float) -> tuple[float, float]:
  """(training FLOPs, FLOPs of a precomputed-reference pass) of one stage, scaled to the full train split: every
  padded token through the decoder, the LM head at each row's padded scored positions (none for reward models)."""
  batch = stage.training.batch_size
  buckets = tuple(stage.data.buckets)
  shared = stage.task == "dpo" and stage.dpo.prefix_sharing
  if stage.task == "sft":
    examples = tokenize.sft_examples(pairs, max_length=stage.data.max_length)
    lengths, rows_per_item, max_length = examples.lengths, 1, stage.data.max_length
    targets = np.array([int(mask.sum()) for mask in examples.loss_mask])
  else:
    lengths = batches.shared_lengths(pairs) if shared else pairs.lengths
    rows_per_item, max_length = (1, 2 * stage.data.max_length) if shared else (2, stage.data.max_length)
    targets = batches.pair_target_counts(pairs, shared)
    if shared:
      buckets = buckets + tuple(2 * b for b in buckets if b > buckets[-1] // 2)
  head = 0 if stage.task == "reward" else 1
  rows = batch * rows_per_item

  def total(extra_forwards: int, sort: bool = False) -> float:
    return sum(flops.training_flops(arch, n, rows * n, head * rows * width, extra_forwards=extra_forwards)
               for n, width in padded_batches(lengths, targets, stage, buckets, max_length, sort=sort))

  live_reference = stage.task == "dpo" and stage.dpo.reference == "model"
  train = total(int(live_reference)) * stage.training.num_epochs * scale
  reference = 0.0
  if stage.task == "dpo" and stage.dpo.reference == "precomputed":
    reference = total(0, sort=True) / 3 * scale  # forward only: a third of a training step's FLOPs
  return train, reference


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--recipe", default="study", help="a configs/ module with stages (paper or study)")
  parser.add_argument("--data", default=os.path.join(SHARED, "hh-rlhf", "harmless-base", "test.jsonl.gz"))
  parser.add_argument("--tokenizer", default=os.path.join(SHARED, "tokenizers", "opt", "hf"))
  parser.add_argument("--sft-mfu", type=float, default=0.45)
  parser.add_argument("--dpo-mfu", type=float, default=0.40)
  parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200: 989)")
  args = parser.parse_args()
  if not os.path.exists(args.data) or not os.path.isdir(args.tokenizer):
    print(f"skipped: needs {args.data} and {args.tokenizer} (../shared on the development machines)")
    return
  recipe = importlib.import_module(f"configs.{args.recipe}").get_config()
  tokenizer = load_tokenizer(args.tokenizer)
  text_pairs, _ = hh.load_preference_pairs(args.data)
  scale = TRAIN_PAIRS / len(text_pairs)
  arch = opt.preset("opt-350m")
  print("| stage | task | TFLOP (train) | TFLOP (reference pass) | assumed MFU | minutes |\n|---|---|---|---|---|---|")
  total = 0.0
  for name in recipe.stages:
    stage = recipe.stage_configs[name]
    pairs = tokenize.tokenize_pairs(text_pairs, tokenizer, max_length=stage.data.max_length,
                                    max_prompt_length=stage.data.max_prompt_length)
    train, reference = stage_flops(stage, pairs, arch, scale)
    mfu = args.sft_mfu if stage.task == "sft" else args.dpo_mfu
    minutes = (train + reference) / (mfu * args.peak_tflops * 1e12) / 60
    total += minutes
    print(f"| {name} | {stage.task} | {train / 1e12:,.0f} | {reference / 1e12:,.0f} | {mfu:.0%} | {minutes:.1f} |")
  print(f"\nprojected training time of `{args.recipe}` on one {args.peak_tflops:.0f} TFLOP/s card: {total:.1f} min "
        f"(HH lengths from {os.path.basename(args.data)}, scaled to {TRAIN_PAIRS:,} pairs)")


if __name__ == "__main__":
  main()
