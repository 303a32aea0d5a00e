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


def padded_rows(lengths: np.ndarray, stage, buckets: tuple[int, ...], max_length: int, seed: int = 0) -> np.ndarray:
  """The padded row length of every batch of one epoch, batched as the trainer batches them."""
  batch_size = stage.training.batch_size
  order = batches.epoch_order(lengths, batch_size, seed, 0, stage.data.group_by_length)
  bucket_set = batches.bucket_lengths(buckets, max_length)
  usable = len(order) // batch_size * batch_size
  per_batch = lengths[order[:usable]].reshape(-1, batch_size).max(axis=1)
  return np.array([batches.pick_bucket(int(n), bucket_set) for n in per_batch])


def stage_flops(stage, pairs: tokenize.TokenizedPairs, arch: opt.OPTConfig, scale: float) -> tuple[float, float]:
  """(training FLOPs, FLOPs of a precomputed-reference pass) of one stage, scaled to the full train split."""
  batch = stage.training.batch_size
  buckets = tuple(stage.data.buckets)
  if stage.task == "sft":
    examples = tokenize.sft_examples(pairs, max_length=stage.data.max_length)
    lengths, rows_per_item, max_length = examples.lengths, 1, stage.data.max_length
  elif stage.dpo.prefix_sharing:
    lengths, rows_per_item, max_length = batches.shared_lengths(pairs), 1, 2 * stage.data.max_length
    buckets = buckets + tuple(2 * b for b in buckets if b > buckets[-1] // 2)
  else:
    lengths, rows_per_item, max_length = pairs.lengths, 2, stage.data.max_length
  padded = padded_rows(lengths, stage, buckets, max_length)
  epochs = stage.training.num_epochs
  live_reference = stage.task == "dpo" and stage.dpo.reference == "model"
  train = sum(batch * rows_per_item * n * flops.training_flops_per_token(arch, int(n),
                                                                         extra_forwards=int(live_reference))
              for n in padded) * epochs * scale
  reference = 0.0
  if stage.task == "dpo" and stage.dpo.reference == "precomputed":
    # The reference pass runs length-sorted batches in the training row layout.
    ordered = np.sort(lengths)[::-1]
    usable = len(ordered) // batch * batch
    bucket_set = batches.bucket_lengths(buckets, max_length)
    sorted_rows = [batches.pick_bucket(int(n), bucket_set) for n in ordered[:usable].reshape(-1, batch).max(axis=1)]
    reference = sum(batch * rows_per_item * n * flops.forward_flops_per_token(arch, int(n))
                    for n in sorted_rows) * scale
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
