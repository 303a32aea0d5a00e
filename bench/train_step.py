"""SFT and DPO train-step throughput: step time, tokens/s, pairs/s, peak memory and MFU for an OPT preset.

  python bench/train_step.py --preset opt-350m --dtype bfloat16 --runs sft:32x512,dpo:16x1024

Rows are full (every token real; DPO rows are half prompt, half response), so the figures are per real token at
that length; the LM head runs on the scored tokens only, as in training, and MFU counts it only there. Random init (no weights
needed); the step is the trainer's own (`jaxalign.trainer.StepFunctions`), optimizer AdamW, dropout as in OPT.
DPO uses precomputed reference log-probs (the study recipe) unless --live-reference.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import common
from jaxalign import flops, parallel, tasks, trainer
from jaxalign.data import batches
from jaxalign.models import opt


def synthetic_batch(task: str, batch: int, length: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  ids = lambda: rng.integers(3, vocab, (batch, length)).astype(np.int32)
  ones = np.ones((batch, length), np.int32)
  loss = np.ones((batch, length), np.float32)
  if task == "sft":
    loss[:, 0] = 0  # the leading </s> is never a target
    targets, target_mask = batches.target_positions(list(loss), length)
    return {"input_ids": ids(), "attention_mask": ones, "loss_mask": loss, "targets": targets,
            "target_mask": target_mask}
  prompt = length // 2
  loss[:, :prompt] = 0
  targets, target_mask = batches.target_positions(list(loss), length)
  out = {}
  for side in ("chosen", "rejected"):
    out.update({f"{side}_input_ids": ids(), f"{side}_attention_mask": ones, f"{side}_loss_mask": loss,
                f"{side}_targets": targets, f"{side}_target_mask": target_mask})
  out["prompt_length"] = np.full((batch,), prompt, np.int32)
  out["reference_chosen_logps"] = np.full((batch,), -100.0, np.float32)
  out["reference_rejected_logps"] = np.full((batch,), -100.0, np.float32)
  return out


def measure(preset: str, task: str, batch: int, length: int, *, dtype: str, remat: bool, steps: int,
            live_reference: bool = False, arch: dict | None = None) -> dict:
  """Times `steps` train steps after one compile; returns the figures as a dict."""
  config = opt.preset(preset, **(arch or {})).replace(dtype=dtype, remat=remat)
  mesh = parallel.make_mesh()
  model = opt.OPTForCausalLM(config, rngs=nnx.Rngs(0))
  graphdef, params, rest = trainer.split_model(model, use_lora=False)
  tx = trainer.make_optimizer(common.get_config().optimizer, total_steps=10_000)
  state = trainer.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  state = jax.device_put(state, jax.tree.map(lambda x: parallel.replicated(mesh), state))
  task_obj = tasks.SFTTask() if task == "sft" else tasks.DPOTask()
  reference_mode, reference_graphdef, reference_state = "precomputed", None, None
  if task == "dpo" and live_reference:
    reference_mode = "model"
    reference_graphdef, reference_state = nnx.split(model)
    reference_state = jax.tree.map(lambda x: jnp.array(x, copy=True), reference_state)
  step_fns = trainer.StepFunctions(task_obj, graphdef, tx, jax.random.key(0), accum=1, reference_mode=reference_mode,
                                   reference_graphdef=reference_graphdef)
  batch_arrays = jax.device_put(synthetic_batch(task, batch, length, config.vocab_size),
                                parallel.batch_sharding(mesh))
  start = time.perf_counter()
  state, metrics = step_fns.train(state, rest, reference_state, batch_arrays)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step_fns.train(state, rest, reference_state, batch_arrays)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - start) / steps
  rows = batch * (2 if task == "dpo" else 1)
  tokens = rows * length
  scored = float(task_obj.scored_tokens(batch_arrays))
  extra = 1 if reference_mode == "model" else 0
  flops_per_s = flops.training_flops(config, length, tokens, scored, extra_forwards=extra) / step_s
  peak = flops.device_peak_flops()
  stats = jax.devices()[0].memory_stats() or {}
  return {
      "device": jax.devices()[0].device_kind, "preset": preset, "task": task, "dtype": dtype, "remat": remat,
      "batch": batch, "length": length, "compile_s": compile_s, "step_ms": step_s * 1e3,
      "tokens_per_s": tokens / step_s, "examples_per_s": batch / step_s,
      "tflops": flops_per_s / 1e12, "mfu": flops.mfu(flops_per_s, jax.device_count(), peak),
      "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30, "loss": float(metrics["loss"]),
  }


def format_row(r: dict) -> str:
  mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
  unit = "pairs" if r["task"] == "dpo" else "seqs"
  return (f"| {r['device']} | {r['preset']} | {r['task']} | {r['dtype']} | {r['batch']}x{r['length']} | "
          f"{r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['examples_per_s']:.1f} {unit}/s | "
          f"{r['tflops']:.1f} | {mfu} | {r['peak_gib']:.1f} | {r['compile_s']:.0f} |")


HEADER = ("| device | model | task | dtype | batch x len | step ms | tokens/s | examples/s | TFLOP/s | MFU | peak GiB |"
          " compile s |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def parse_run(spec: str) -> tuple[str, int, int]:
  """"dpo:16x1024" -> ("dpo", 16, 1024)."""
  task, _, shape = spec.partition(":")
  batch, _, length = shape.partition("x")
  if task not in ("sft", "dpo") or not batch.isdigit() or not length.isdigit():
    raise ValueError(f"--runs items look like sft:32x512 or dpo:16x1024, got {spec!r}")
  return task, int(batch), int(length)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="opt-350m")
  parser.add_argument("--runs", default="sft:16x512,dpo:8x1024",
                      help="comma-separated task:batch x length, e.g. sft:32x512,dpo:16x1024 (DPO batch = pairs)")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--remat", action="store_true")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--live-reference", action="store_true")
  args = parser.parse_args()
  print(HEADER, flush=True)
  for spec in args.runs.split(","):
    task, batch, length = parse_run(spec)
    print(format_row(measure(args.preset, task, batch, length, dtype=args.dtype, remat=args.remat,
                             steps=args.steps, live_reference=args.live_reference)), flush=True)


if __name__ == "__main__":
  main()
