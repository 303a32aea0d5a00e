"""HH tokenization throughput: `data.tokenize.tokenize_pairs` on the real harmless-base test file (2,312 records).

Times loading + splitting (`hh.load_preference_pairs`) once, then tokenization with the paper's DPO lengths
(max_length 1024, max_prompt_length 512) --reps times, each with a freshly loaded tokenizer (its BPE word cache
starts cold, as in a real run), and once more from the on-disk cache. Reports pairs/s (median), the CPU seconds
per pair, and the projected time for the paper's 160,800-pair train split: at the measured wall rate, and at the
measured CPU cost spread over 2 cores (what the run would take on 2 otherwise idle cores).

  python bench/tokenize_hh.py                   # files from ../shared; prints why and exits 0 when absent
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxalign.data import hh, tokenize  # noqa: E402
from jaxalign.tokenizer import load_tokenizer  # noqa: E402

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
DEFAULT_DATA = os.path.join(SHARED, "hh-rlhf", "harmless-base", "test.jsonl.gz")
DEFAULT_TOKENIZER = os.path.join(SHARED, "tokenizers", "opt", "hf")
HH_TRAIN_PAIRS = 160_800


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data", default=DEFAULT_DATA, help="an HH .jsonl[.gz] file or folder")
  parser.add_argument("--split", default="test")
  parser.add_argument("--tokenizer", default=DEFAULT_TOKENIZER)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--max-length", type=int, default=1024)
  parser.add_argument("--max-prompt-length", type=int, default=512)
  return parser.parse_args()


def timed(fn):
  """(result, wall seconds, CPU seconds of this process, all threads)."""
  wall, cpu = time.perf_counter(), time.process_time()
  result = fn()
  return result, time.perf_counter() - wall, time.process_time() - cpu


def main():
  args = parse_args()
  missing = [path for path in (args.data, args.tokenizer) if not os.path.exists(path)]
  if missing:
    print(f"SKIPPED: {', '.join(missing)} not found (the real HH file and OPT tokenizer live in ../shared)")
    return
  logging.basicConfig(level=logging.WARNING)
  (pairs, report), load_s, _ = timed(lambda: hh.load_preference_pairs(args.data, split=args.split))
  lengths = dict(max_length=args.max_length, max_prompt_length=args.max_prompt_length)
  runs = []
  for _ in range(args.reps):
    tokenizer = load_tokenizer(args.tokenizer)
    tokenized, wall, cpu = timed(lambda: tokenize.tokenize_pairs(pairs, tokenizer, **lengths))
    runs.append((wall, cpu))
  with tempfile.TemporaryDirectory() as cache:
    tokenize.tokenize_pairs(pairs, tokenizer, **lengths, cache_dir=cache)
    _, cached_s, _ = timed(lambda: tokenize.tokenize_pairs(pairs, tokenizer, **lengths, cache_dir=cache))

  n = len(pairs)
  wall = statistics.median(w for w, _ in runs)
  cpu = statistics.median(c for _, c in runs)
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  print(f"data: {args.data} ({args.split}): {report.summary()}")
  print(f"tokenizer: {args.tokenizer}; lengths {lengths}; {cores} cores visible; {tokenized.counts()}")
  print(f"load + split: {load_s:.2f} s ({report.total / load_s:,.0f} records/s)")
  print()
  print("| measure | value |")
  print("|---|---|")
  print(f"| tokenize_pairs, wall (median of {len(runs)}) | {wall:.2f} s = {n / wall:,.0f} pairs/s |")
  print(f"| CPU time per pair | {1e6 * cpu / n:.0f} us ({cpu:.2f} CPU s) |")
  print(f"| cached (second run) | {cached_s:.3f} s |")
  print(f"| projected {HH_TRAIN_PAIRS:,} pairs at the wall rate | {HH_TRAIN_PAIRS / n * wall:.0f} s |")
  print(f"| projected {HH_TRAIN_PAIRS:,} pairs on 2 idle cores (CPU / 2) | {HH_TRAIN_PAIRS / n * cpu / 2:.0f} s |")


if __name__ == "__main__":
  main()
