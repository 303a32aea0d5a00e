"""SFT, DPO and reward-model train-step throughput: step time, tokens/s, examples/s, peak memory and MFU.

  python bench/train_step.py --preset opt-350m --dtype bfloat16 --runs sft:32x512,dpo-shared:32x1024,reward:32x512
  python bench/train_step.py --preset smollm2-360m,qwen2.5-0.5b --runs sft:16x512,dpo-shared:8x1024

Presets: every family's real shapes (`jaxalign.models.registry.preset_names()`: opt-*, smollm2-360m, llama-3.2-1b,
qwen2.5-0.5b, qwen2.5-1.5b, qwen3-0.6b, mistral-7b, pythia-*, gpt2*), comma-separated; `--layers N` keeps only N
blocks (a quick CPU check of a big shape).

Tasks: `sft` (rows of `length`), `dpo` (chosen and rejected rows of `length` each: half prompt, half response),
`dpo-shared` (prefix-shared rows of `length`: prompt half, then chosen and rejected a quarter each, the prompt
computed once) and `reward` (two rows of `length` per pair, a scalar head, as `dpo`). Every row is full, so the
figures are per real token at that length. Batches come from the library's own collate functions on synthetic
pairs, the LM head runs at the scored (response) positions only, as in training, and MFU counts it only there.
Random init (no weights needed); the step is the trainer's own (`jaxalign.step.StepFunctions`), AdamW, each
family's own dropout (0.1 for OPT and GPT-2, none for the others). DPO uses precomputed reference log-probs (the
study recipe) unless --live-reference. `--json FILE` appends one JSON line per run, which
`bench/study_estimate.py --measured FILE` turns into a projected study time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import common
from jaxalign import flops, parallel, reference as reference_lib, step as step_lib, tasks
from jaxalign.data import layouts, tokenize
from jaxalign.models import layers, registry, reward

TASKS = ("sft", "dpo", "dpo-shared", "reward")
PAD_ID = 1


def synthetic_pairs(count: int, prompt: int, response: int, vocab: int, seed: int = 0) -> tokenize.TokenizedPairs:
  """`count` pairs of random ids: a `prompt`-token prompt (starting with `</s>`) and two `response`-token answers."""
  rng = np.random.default_rng(seed)
  ids = lambda n: rng.integers(3, vocab, n).astype(np.int32)
  prompts = [np.concatenate([[2], ids(prompt - 1)]).astype(np.int32) for _ in range(count)]
  flags = np.zeros(count, bool)
  return tokenize.TokenizedPairs(prompts, [ids(response) for _ in range(count)], [ids(response) for _ in range(count)],
                                 flags, flags.copy(), flags.copy())


def synthetic_batch(task: str, batch: int, length: int, vocab: int):
  """One full batch of `task` (see the module docstring) from the library's layouts."""
  indices = np.arange(batch)
  if task == "dpo-shared":
    pairs = synthetic_pairs(batch, length // 2, length // 4, vocab)
    return layouts.SharedRows(max_length=length).collate(pairs, indices, length, PAD_ID)
  pairs = synthetic_pairs(batch, length // 2, length - length // 2, vocab)
  if task == "sft":
    return layouts.SFTRows(max_length=length).collate(tokenize.sft_examples(pairs, max_length=length), indices,
                                                      length, PAD_ID)
  if task == "reward":
    return layouts.SeparateRows(max_length=length, scored=False).collate(
        pairs, indices, length, PAD_ID, per_pair={"head": np.zeros(batch, np.int32)})
  return layouts.SeparateRows(max_length=length).collate(pairs, indices, length, PAD_ID)


def with_reference_logps(batch):
  """The batch with precomputed reference log-probs (the study recipe's DPO)."""
  shape = batch.pair_mask.shape if isinstance(batch, layouts.SharedPairBatch) else (batch.num_rows,)
  batch.extras = {name: np.full(shape, -100.0, np.float32) for name in reference_lib.PER_PAIR_NAMES}
  return batch


def make_task(task: str):
  return {"sft": tasks.SFTTask, "reward": tasks.RewardTask}.get(task, tasks.DPOTask)()


def measure(preset: str, task: str, batch: int, length: int, *, dtype: str, remat: bool, steps: int,
            live_reference: bool = False, attention: str = "auto", num_layers: int = 0) -> dict:
  """Times `steps` train steps after one compile; returns the figures as a dict."""
  config = registry.preset(preset).replace(dtype=dtype, remat=remat, attention_impl=attention)
  if num_layers:
    config = _with_layers(config, num_layers)
  mesh = parallel.make_mesh()
  model = (reward.RewardModel(config, ("harmless", "helpful"), rngs=nnx.Rngs(0)) if task == "reward"
           else registry.build_causal_lm(config, rngs=nnx.Rngs(0)))
  graphdef, params, rest = step_lib.split_model(model, use_lora=False)
  tx = step_lib.make_optimizer(common.get_config().optimizer, total_steps=10_000)
  state = step_lib.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  state = jax.device_put(state, jax.tree.map(lambda x: parallel.replicated(mesh), state))
  task_obj = make_task(task)
  host_batch = synthetic_batch(task, batch, length, config.vocab_size)
  reference = reference_lib.Reference("none")
  if task.startswith("dpo") and live_reference:
    reference_graphdef, reference_state = nnx.split(model)
    reference = reference_lib.Reference("model", reference_graphdef,
                                        jax.tree.map(lambda x: jnp.array(x, copy=True), reference_state))
  elif task.startswith("dpo"):
    reference = reference_lib.Reference("precomputed")
    host_batch = with_reference_logps(host_batch)
  step_fns = step_lib.StepFunctions(task_obj, graphdef, rest, tx, jax.random.key(0), accum=1, reference=reference)
  batch_arrays = jax.device_put(host_batch, parallel.batch_sharding(mesh))
  start = time.perf_counter()
  state, metrics = step_fns.train(state, batch_arrays)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step_fns.train(state, batch_arrays)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - start) / steps
  rows = host_batch.num_rows * (1 if task in ("sft", "dpo-shared") else 2)
  tokens = rows * length
  scored = float(task_obj.scored_tokens(batch_arrays))
  extra = 1 if reference.runs_forward else 0
  flops_per_s = flops.training_flops(config, length, tokens, scored, extra_forwards=extra) / step_s
  stats = jax.devices()[0].memory_stats() or {}
  return {
      "device": jax.devices()[0].device_kind, "preset": preset + (f" ({num_layers} layers)" if num_layers else ""),
      "task": task, "dtype": dtype, "remat": remat,
      "attention": layers.attention_implementation(config.attention_impl, config.dtype),
      "reference": reference.mode if task.startswith("dpo") else "", "batch": batch, "length": length,
      "rows": rows, "scored": scored, "compile_s": compile_s, "step_ms": step_s * 1e3,
      "tokens_per_s": tokens / step_s, "examples_per_s": batch / step_s, "tflops": flops_per_s / 1e12,
      "mfu": flops.mfu(flops_per_s, jax.device_count(), flops.device_peak_flops()),
      "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30, "loss": float(metrics["loss"]),
  }


def _with_layers(config, num_layers: int):
  field = "n_layer" if registry.family_of(config).model_type == "gpt2" else "num_hidden_layers"
  return config.replace(**{field: num_layers})


def format_row(r: dict) -> str:
  mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
  unit = "seqs" if r["task"] == "sft" else "pairs"
  task = r["task"] + (", live ref" if r["reference"] == "model" else "")
  return (f"| {r['device']} | {r['preset']} | {task} | {r['dtype']}{', remat' if r['remat'] else ''}, "
          f"{r['attention']} attention | "
          f"{r['batch']}x{r['length']} | {r['rows']}x{r['length']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
          f"{r['examples_per_s']:.1f} {unit}/s | {r['tflops']:.1f} | {mfu} | {r['peak_gib']:.1f} | "
          f"{r['compile_s']:.0f} |")


HEADER = ("| device | model | task | dtype | batch x len | rows | step ms | tokens/s | examples/s | TFLOP/s | MFU |"
          " peak GiB (process) | compile s |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def parse_run(spec: str) -> tuple[str, int, int]:
  """"dpo-shared:16x1024" -> ("dpo-shared", 16, 1024)."""
  task, _, shape = spec.partition(":")
  batch, _, length = shape.partition("x")
  if task not in TASKS or not batch.isdigit() or not length.isdigit():
    raise ValueError(f"--runs items look like TASK:BATCHxLENGTH with TASK one of {TASKS}, e.g. sft:32x512 or "
                     f"dpo-shared:16x1024, got {spec!r}")
  return task, int(batch), int(length)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="opt-350m",
                      help=f"comma-separated presets, from {', '.join(registry.preset_names())}")
  parser.add_argument("--layers", type=int, default=0, help="keep only this many blocks (0 = all)")
  parser.add_argument("--runs", default="sft:16x512,dpo-shared:8x1024",
                      help="comma-separated TASK:BATCHxLENGTH, e.g. sft:32x512,dpo-shared:16x1024 (DPO and reward "
                           "batch = pairs)")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--remat", action="store_true")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--live-reference", action="store_true")
  parser.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn"),
                      help="attention implementation; with auto, a run that fails under cuDNN is retried with xla")
  parser.add_argument("--json", help="append one JSON line per run to this file")
  args = parser.parse_args()
  runs = [(preset, *parse_run(spec)) for preset in args.preset.split(",") for spec in args.runs.split(",")]
  for preset, *_ in runs:
    registry.preset(preset)  # an unknown name fails before anything runs
  print(HEADER, flush=True)
  for preset, task, batch, length in runs:
    for attention in (args.attention, "xla") if args.attention == "auto" else (args.attention,):
      try:
        result = measure(preset, task, batch, length, dtype=args.dtype, remat=args.remat, steps=args.steps,
                         live_reference=args.live_reference, attention=attention, num_layers=args.layers)
        break
      except Exception as error:  # a benchmark reports a failing shape and goes on with the others
        result = None
        print(f"| {task} {batch}x{length} failed with attention={attention}: {type(error).__name__}: "
              f"{str(error)[:300]} |", flush=True)
    if result is None:
      continue
    print(format_row(result), flush=True)
    if args.json:
      with open(args.json, "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
  main()
