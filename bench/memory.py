"""Vocabulary-dependent memory of the train step, before and after chunked log-probs (XLA's memory analysis).

  python bench/memory.py                       # the table of BENCHMARKS.md "Memory" (long: every compile is minutes)
  python bench/memory.py --presets qwen2.5-0.5b --chunks 0,16,32,64,128
  python bench/memory.py --timing              # old vs new path step time, alternating, on a small model
  python bench/memory.py --timing --real --chunks 0,v8192 --rounds 3   # the same on Qwen2.5-0.5B's own 24 blocks
  python bench/memory.py --strategies --chunks 16,32,64   # the log-prob gradient alone, per strategy

For each preset (rows chosen with --paths): the DPO train step (prefix-shared rows: 8 pairs of a 512-token prompt
and two 256-token responses in rows of 1,024 tokens, 512 scored positions a row; bf16 compute; precomputed reference
log-probs; AdamW; the trainer's own step via the dry run); the GRPO train step (one 256-token prompt and its G = 8
completions of 512 tokens in one group row, beta 0.04, the same way); and the GRPO log-prob path alone (per-token
log-probs and entropies of 8 completions x 512 tokens from final hidden states under the model's own head, with the
gradient of an advantage-weighted sum). Each is compiled (never run) with abstract inputs at the real vocabulary and
at a 1,024-token one; the difference of their temporary bytes is what the vocabulary costs. Chunks: 0 = unchunked
(the whole [rows, scored, vocab] float32 logits and their gradient), N = N positions a chunk, vN = the fused head
with N columns a slice, default = configs/common.py's settings (the fused head above 1 GiB of logits).

XLA:CPU's figures: its attention keeps whole score matrices, so the totals are far above a GPU's; the vocabulary
differences are what this bench reports. Random shapes only: no weights, no network.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import common
from jaxalign import dry_run, logprobs, parallel, reference as reference_lib, step as step_lib, tasks
from jaxalign.models import layers, registry
from train_step import _with_layers, synthetic_batch, with_reference_logps

PRESETS = ("opt-350m", "qwen2.5-0.5b", "llama-3.2-1b", "qwen2.5-1.5b")
SMALL_VOCAB = 1024


def parse_chunks(text: str) -> logprobs.Chunks:
  """"0" (off), "32" (model.logprob_chunk 32), "v8192" (model.logprob_vocab_chunk 8192) or "default" (configs/
  common.py's settings, chunking only above model.logprob_chunk_above_mib)."""
  if text == "default":
    return logprobs.configured(common.get_config().model)
  return logprobs.Chunks(vocabulary=int(text[1:])) if text.startswith("v") else logprobs.Chunks(positions=int(text))


def label(chunks: logprobs.Chunks) -> str:
  if chunks.above_bytes:
    return f"default (vocab {chunks.vocabulary} above {chunks.above_bytes / 2**20:.0f} MiB of logits)"
  if chunks.vocabulary:
    return f"vocab {chunks.vocabulary}"
  return str(chunks.positions) if chunks.positions else "off"


def dpo_step_temporaries(arch, chunk: logprobs.Chunks, pairs: int = 8, length: int = 1024) -> int:
  """Temporary bytes of the compiled DPO train step (see the module docstring)."""
  config = common.get_config()
  model = registry.abstract_causal_lm(arch)
  batch = with_reference_logps(synthetic_batch("dpo-shared", pairs, length, arch.vocab_size))
  task = tasks.DPOTask(logprob_chunks=chunk)
  compiled, _ = dry_run.compile_step(config, task, model, reference_lib.Reference("precomputed"), batch,
                                     parallel.make_mesh())
  return compiled.memory_analysis().temp_size_in_bytes


def grpo_step_temporaries(arch, chunk: logprobs.Chunks, completions: int = 8, length: int = 512,
                          prompt: int = 256) -> int:
  """Temporary bytes of the compiled GRPO train step (the trainer's own, via the dry run): one prompt of `prompt`
  tokens with G = `completions` completions of `length` tokens in one row (the group layout), beta 0.04 (reference
  log-probs in the batch), bf16, AdamW."""
  config = common.get_config()
  config.task, config.data.max_prompt_length, config.grpo.beta = "grpo", prompt, 0.04
  config.online.num_generations, config.online.max_completion_length = completions, length
  model = registry.abstract_causal_lm(arch)
  task = dataclasses.replace(tasks.make_task(config), logprob_chunks=chunk)
  reference = dry_run.abstract_reference(config, task, model)
  batch = dry_run.largest_batch(config, task, reference, completions)
  compiled, _ = dry_run.compile_step(config, task, model, reference, batch, parallel.make_mesh())
  return compiled.memory_analysis().temp_size_in_bytes


def grpo_logprob_temporaries(arch, chunk: logprobs.Chunks, completions: int = 8, length: int = 512) -> int:
  """Temporary bytes of the gradient of sum(advantage x log-prob) + entropy over `completions` x `length` tokens,
  from final hidden states through the model's head (the GRPO log-prob path alone)."""
  graphdef, params = nnx.split(registry.abstract_causal_lm(arch))
  width = jax.eval_shape(lambda p: nnx.merge(graphdef, p).hidden_states(jnp.zeros((1, 1), jnp.int32))[0],
                         params).shape[-1]

  def objective(params, hidden, targets, advantages):  # the entropy is logged (an output), without gradient
    logps, entropy = logprobs.head_logprobs(nnx.merge(graphdef, params), hidden, targets, chunk, with_entropies=True)
    return (advantages[:, None] * logps).sum(), jax.lax.stop_gradient(entropy).mean()

  args = (params, jax.ShapeDtypeStruct((completions, length, width), arch.dtype),
          jax.ShapeDtypeStruct((completions, length), jnp.int32), jax.ShapeDtypeStruct((completions,), jnp.float32))
  grad = jax.jit(jax.grad(objective, argnums=(0, 1), has_aux=True))
  return grad.lower(*args).compile().memory_analysis().temp_size_in_bytes


PATHS = {"dpo": ("DPO step (8 pairs x 1,024, shared)", dpo_step_temporaries),
         "grpo": ("GRPO step (G = 8 x 512, prompt 256)", grpo_step_temporaries),
         "grpo-logprobs": ("GRPO log-prob path (8 x 512)", grpo_logprob_temporaries)}


def vocabulary_bytes(measure, arch, chunk: logprobs.Chunks) -> tuple[int, int]:
  """(temporaries at the real vocabulary, at SMALL_VOCAB) of `measure(arch, chunk)`."""
  return measure(arch, chunk), measure(arch.replace(vocab_size=SMALL_VOCAB), chunk)


def memory_table(presets, chunks, num_layers: int = 0, paths=tuple(PATHS)) -> None:
  gib = lambda n: f"{n / 2**30:.2f}"
  print("| model | vocab | path | chunk | temporaries, real vocab (GiB) | at vocab 1,024 (GiB) | vocabulary-dependent "
        "(GiB) |\n|---|---|---|---|---|---|---|", flush=True)
  for preset in presets:
    arch = registry.preset(preset).replace(dtype="bfloat16")
    if num_layers:
      arch = _with_layers(arch, num_layers)
      preset += f" ({num_layers} layers)"
    for name, measure in [PATHS[path] for path in paths]:
      for chunk in chunks:
        start = time.perf_counter()
        real, small = vocabulary_bytes(measure, arch, chunk)
        print(f"| {preset} | {arch.vocab_size:,} | {name} | {label(chunk)} | {gib(real)} | {gib(small)} | "
              f"{gib(real - small)} |  <!-- {time.perf_counter() - start:.0f} s -->", flush=True)


def strategies(chunks) -> None:
  """Temporaries of the log-probs' gradient alone (Qwen2.5-0.5B's tied head, bf16 compute, 8 rows x 512 positions)
  unchunked, as a plain scan over positions (no checkpoint: every chunk's logits saved for the backward pass), as the
  library's checkpointed scan over positions, and as the fused head over vocabulary slices, per chunk size."""
  vocab, width, rows, length = 151_936, 896, 8, 512
  args = (jax.ShapeDtypeStruct((rows, length, width), jnp.float32), jax.ShapeDtypeStruct((vocab, width), jnp.float32),
          jax.ShapeDtypeStruct((rows, length), jnp.int32))

  def temporaries(chunk: logprobs.Chunks) -> int:
    def f(hidden, weight, targets):
      if chunk.vocabulary:
        flat = hidden.reshape(-1, width), weight, targets.reshape(-1)
        return logprobs.fused_head(*flat, jnp.bfloat16, True, chunk.vocabulary, False).sum()
      head = lambda h: layers.lm_logits(h, weight, jnp.bfloat16, vocab_first=True)
      return logprobs.chunked_logprobs(head, hidden, targets, chunk_size=chunk.positions).sum()
    return jax.jit(jax.grad(f, argnums=(0, 1))).lower(*args).compile().memory_analysis().temp_size_in_bytes

  print("| strategy | chunk | temporaries (GiB) |\n|---|---|---|")
  print(f"| unchunked | - | {temporaries(logprobs.UNCHUNKED) / 2**30:.2f} |")
  positions = [c for c in chunks if c.positions]
  if positions:
    checkpoint = jax.checkpoint
    jax.checkpoint = lambda f: f  # the same scan without rematerialisation
    try:
      print(f"| plain scan | {max(positions).positions} | {temporaries(max(positions)) / 2**30:.2f} |")
    finally:
      jax.checkpoint = checkpoint
  for chunk in chunks:
    if chunk != logprobs.UNCHUNKED:
      name = "fused head, vocabulary slices" if chunk.vocabulary else "scan + checkpoint"
      print(f"| {name} | {chunk.vocabulary or chunk.positions} | {temporaries(chunk) / 2**30:.2f} |", flush=True)


SMALL_TIMING_MODEL = dict(num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=64)


def timing(rounds: int, chunks, real: bool, num_layers: int = 0, pairs: int = 4, length: int = 512) -> None:
  """Train-step time of the unchunked path and each chunk size, alternating step by step: DPO, `pairs`
  prefix-shared rows of `length` tokens (half of them scored), fp32, on Qwen2.5-0.5B's vocabulary (151,936) with
  its real blocks (`real`; `num_layers` of them, 0 = all 24) or 2 blocks at width 256 (where the head is nearly the
  whole step: the worst case for the fused head's extra matmul)."""
  arch = registry.preset("qwen2.5-0.5b")
  arch = (_with_layers(arch, num_layers) if num_layers else arch) if real else arch.replace(**SMALL_TIMING_MODEL)
  print(f"timing: {arch.num_hidden_layers} blocks, width {arch.hidden_size}, DPO, {pairs} rows x {length} tokens, "
        f"{rounds} rounds", flush=True)
  config = common.get_config()
  batch = jax.device_put(with_reference_logps(synthetic_batch("dpo-shared", pairs, length, arch.vocab_size)))
  graphdef, params, rest = step_lib.split_model(registry.build_causal_lm(arch, rngs=nnx.Rngs(0)), use_lora=False)
  tx = step_lib.make_optimizer(config.optimizer, total_steps=10_000)
  # One train state goes through every path in turn (the paths compute the same step): one copy of the weights
  # and optimizer state in memory, whatever the number of paths.
  state = step_lib.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  steps = {label(chunk): step_lib.StepFunctions(tasks.DPOTask(logprob_chunks=chunk), graphdef, rest, tx,
                                                jax.random.key(0), accum=1,
                                                reference=reference_lib.Reference("precomputed"))
           for chunk in chunks}
  for path in steps:  # compile
    state, metrics = steps[path].train(state, batch)
    jax.block_until_ready(metrics)
  seconds = {path: [] for path in steps}
  for _ in range(rounds):
    for path in steps:
      start = time.perf_counter()
      state, metrics = steps[path].train(state, batch)
      jax.block_until_ready(metrics)
      seconds[path].append(time.perf_counter() - start)
  for path, values in seconds.items():
    print(f"{path}: median {np.median(values) * 1e3:.0f} ms, min {min(values) * 1e3:.0f} ms over {rounds} steps "
          "(alternating)", flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--presets", default=",".join(PRESETS))
  parser.add_argument("--chunks", default="0,32,v8192",
                      help="model.logprob_chunk values (0 = off), vN for model.logprob_vocab_chunk N, or default")
  parser.add_argument("--timing", action="store_true", help="time old vs new path instead of the memory table")
  parser.add_argument("--strategies", action="store_true",
                      help="the log-prob gradient alone: unchunked, plain scan, checkpointed scan per chunk")
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--real", action="store_true", help="--timing on Qwen2.5-0.5B's own blocks (--layers of them)")
  parser.add_argument("--pairs", type=int, default=4, help="--timing: prefix-shared rows of 512 tokens a step")
  parser.add_argument("--layers", type=int, default=0, help="keep only N blocks (faster compiles; 0 = all)")
  parser.add_argument("--paths", default=",".join(PATHS), help=f"memory table rows, of {','.join(PATHS)}")
  args = parser.parse_args()
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {os.cpu_count()} cores visible")
  if args.timing:
    timing(args.rounds, [parse_chunks(c) for c in args.chunks.split(",")], args.real, args.layers, args.pairs)
  elif args.strategies:
    strategies([parse_chunks(c) for c in args.chunks.split(",")])
  else:
    memory_table(args.presets.split(","), [parse_chunks(c) for c in args.chunks.split(",")], args.layers,
                 args.paths.split(","))


if __name__ == "__main__":
  main()
