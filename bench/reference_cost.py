"""What a reference costs a DPO step, and that a reference-free loss or method pays none of it: sigmoid DPO with a
live reference vs `reference_free`, CPO, SimPO and ORPO (each prepared by `reference.prepare` with
`dpo.reference=precomputed`: they must run no reference pass) vs sigmoid with precomputed reference log-probs, on the
same model and the same batches.

Same small OPT as the other CPU benchmarks (4 layers, hidden 256, OPT's vocabulary; fp32, AdamW, the trainer's own
step), synthetic pairs of a 96-token prompt and two 32-token responses (no data needed), prefix-shared rows as in
the study recipe. Every variant compiles first; then --rounds rounds each run --steps steps of every variant in
turn, so changes in machine load hit all alike. Reported per variant: the median step time, its ratio to the live
reference's, the FLOPs per step the trainer counts for MFU (`step.training_flops`) and XLA's own count of the
compiled step.

  python bench/reference_cost.py            # ~4 minutes on 2 cores
  python bench/reference_cost.py --record   # append the table to BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from timing import JaxVariant, small_opt_config  # noqa: E402  (bench/ is the script's own folder)

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PROMPT, RESPONSE, PAD_ID = 96, 32, 1


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=8, help="pairs per step")
  parser.add_argument("--batches", type=int, default=4, help="distinct batches, cycled")
  parser.add_argument("--steps", type=int, default=4, help="steps per variant per round")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
  return parser.parse_args()


def synthetic_pairs(count: int, vocab: int, seed: int = 0):
  from jaxalign.data import tokenize

  rng = np.random.default_rng(seed)
  ids = lambda n: rng.integers(3, vocab, n).astype(np.int32)
  flags = np.zeros(count, bool)
  return tokenize.TokenizedPairs([np.concatenate([[2], ids(PROMPT - 1)]).astype(np.int32) for _ in range(count)],
                                 [ids(RESPONSE) for _ in range(count)], [ids(RESPONSE) for _ in range(count)],
                                 flags, flags.copy(), flags.copy())


# (name, task, its config fields, dpo.reference)
VARIANTS = (
    ("sigmoid, live reference", "dpo", {}, "model"),
    ("reference_free (dpo.reference=precomputed)", "dpo", {"dpo": {"loss_type": "reference_free"}}, "precomputed"),
    ("sigmoid, precomputed reference", "dpo", {}, "precomputed"),
    ("CPO (sigmoid + NLL)", "cpo", {}, "precomputed"),
    ("SimPO (cpo.loss_type=simpo)", "cpo", {"cpo": {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 1.0,
                                                    "alpha": 0.0}}, "precomputed"),
    ("ORPO", "orpo", {}, "precomputed"),
)


def stage_config(task: str, fields: dict, reference: str):
  from configs import common

  c = common.get_config()
  c.task, c.init_from = task, ""
  for section, values in fields.items():
    c[section].update(values)
  c.dpo.reference = reference
  c.data.prefix_sharing, c.data.max_length = True, PROMPT + RESPONSE
  return c


def xla_flops(variant: JaxVariant, batch) -> float:
  compiled = variant.steps.lower_train(variant.state, batch).compile()
  analysis = compiled.cost_analysis()
  return float((analysis[0] if isinstance(analysis, list) else analysis)["flops"])


def main():
  args = parse_args()
  import jax
  from flax import nnx

  from jaxalign import parallel, reference as reference_lib, step, tasks
  from jaxalign.data import layouts, pipeline
  from jaxalign.models import opt

  arch = small_opt_config()
  model = opt.OPTForCausalLM(arch, rngs=nnx.Rngs(0))
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  layout = layouts.SharedRows(max_length=PROMPT + RESPONSE)
  pairs = synthetic_pairs(args.batch * args.batches, arch.vocab_size)
  length = 2 * (PROMPT + RESPONSE)
  chunks = [np.arange(k * args.batch, (k + 1) * args.batch) for k in range(args.batches)]
  data = pipeline.StageData(pipeline.Split(layout, pairs, []), None, "pairs")

  variants, counted, prepare_s = [], [], {}
  for name, task_name, fields, reference in VARIANTS:
    config = stage_config(task_name, fields, reference)
    task = tasks.make_task(config)
    start = time.perf_counter()
    prepared = (reference_lib.prepare(task, model, data, config, mesh, PAD_ID) if reference == "precomputed"
                else reference_lib.Reference("model"))
    prepare_s[name] = time.perf_counter() - start if reference == "precomputed" else None
    per_pair = prepared.per_pair().get("train", {})
    batches = [layout.collate(pairs, chunk, length, PAD_ID, per_pair=per_pair) for chunk in chunks]
    tokens = [int(b.attention_mask.sum()) for b in batches]
    variant = JaxVariant(name, task, model, batches, tokens, reference=prepared.mode, lr=1e-6)
    variant.compile(range(len(batches)))
    scored = float(batches[0].target_mask.sum())
    counted.append(step.training_flops(model, prepared)(length, tokens[0], scored))
    variant.xla = xla_flops(variant, batches[0])
    variant.mode = prepared.mode
    variants.append(variant)
    print(f"  {name}: reference mode {prepared.mode!r}, compiled in {variant.compile_s:.1f}s", flush=True)

  for r in range(args.rounds):
    for v in variants:
      v.run([(r * args.steps + i) % args.batches for i in range(args.steps)], args.batch, r)
  base = statistics.median(variants[0].timer.times)
  lines = []
  for v, flops in zip(variants, counted):
    step = statistics.median(v.timer.times)
    prepared_in = prepare_s[v.name]
    pass_note = "none run" if v.mode == "none" else (f"{prepared_in:.1f}s" if prepared_in is not None else "—")
    lines.append(f"| {v.name} | {v.mode} | {pass_note} | {step * 1e3:.1f} | {step / base:.2f}x | "
                 f"{flops / 1e9:.2f} | {v.xla / 1e9:.2f} |")
  table = "\n".join(["| variant | reference prepared | reference pass | step ms (median) | vs live reference | "
                     "GFLOP/step counted for MFU | GFLOP/step (XLA) |", "|---|---|---|---|---|---|---|", *lines])
  machine = (f"{os.cpu_count()} cores, jax {jax.__version__} ({jax.devices()[0].platform}), load average "
             f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
  print(f"\n{machine}\n\n{table}")
  if args.record:
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    command = "python bench/reference_cost.py " + " ".join(a for a in sys.argv[1:] if a != "--record")
    with open(os.path.join(REPO, "BENCHMARKS.md"), "a") as f:
      f.write(f"\n### {stamp} — `{command.strip()}` (CPU, what a reference costs a DPO step)\n\n"
              f"Machine: {machine}.\n\n{table}\n")


if __name__ == "__main__":
  main()
