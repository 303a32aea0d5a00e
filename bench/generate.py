"""Generation speed: jaxalign's compiled generation vs transformers' PyTorch `generate`, same weights, same prompts.

Both sides decode greedily and generate exactly --new-tokens tokens per prompt (EOS off). After a first call
(compilation / warm-up), --reps calls of each implementation alternate, so load from other processes hits them alike;
the table gives the best and the median. With the paper's prompts and a tokenizer (found in ../shared by default, or
--paper-prompts / --tokenizer), one more row times the evaluator's whole path, `sampling.generate`: tokenize, sort,
bucket, generate, decode, trim.

  CPU:  python bench/generate.py                        # small OPT: 4 layers, hidden 256, vocab 50272; 16 prompts
  GPU:  python bench/generate.py --preset opt-350m --prompts 100 --new-tokens 50 --dtype bfloat16 --no-torch

--record appends the table to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxalign import sampling  # noqa: E402
from jaxalign.models import hub, opt  # noqa: E402

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SHARED = os.path.join(REPO, "..", "shared", "data")
DEFAULT_PROMPTS = [os.path.join(SHARED, "paper-2509.09055", "data", "prompts", f"{name}_prompts.json")
                   for name in ("harmful", "helpful")]
DEFAULT_TOKENIZER = os.path.join(SHARED, "tokenizers", "opt", "hf")

PRESETS = {
    "small": opt.OPTConfig(vocab_size=50272, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                           ffn_dim=1024, word_embed_proj_dim=256),
    "opt-350m": opt.preset("opt-350m"),
}


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
  parser.add_argument("--prompts", type=int, default=16, help="prompts in the batch")
  parser.add_argument("--new-tokens", type=int, default=50)
  parser.add_argument("--prompt-length", type=int, default=64,
                      help="random prompts have between half this and this many tokens, left-padded to it")
  parser.add_argument("--dtype", default="float32", help="compute dtype of our model (float32, bfloat16)")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--batch-size", type=int, default=64, help="batch size of the sampling.generate row")
  parser.add_argument("--no-torch", action="store_true", help="skip transformers' generate")
  parser.add_argument("--paper-prompts", nargs="*", default=DEFAULT_PROMPTS,
                      help="JSON lists of prompt strings for the sampling.generate row (skipped if missing)")
  parser.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="tokenizer folder for that row")
  parser.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
  return parser.parse_args()


@dataclasses.dataclass
class Timing:
  first_s: float  # the first call, which compiles / warms up
  times_s: list[float]  # the timed calls after it
  output: object = None  # what the last call returned


def time_interleaved(fns: dict, reps: int) -> dict:
  """Times each function's first call, then `reps` more calls of each, alternating between the functions so that
  load from other processes hits them alike."""
  timings = {}
  for name, fn in fns.items():
    start = time.perf_counter()
    output = fn()
    timings[name] = Timing(time.perf_counter() - start, [], output)
  for _ in range(reps):
    for name, fn in fns.items():
      start = time.perf_counter()
      timings[name].output = fn()
      timings[name].times_s.append(time.perf_counter() - start)
  return timings


def random_prompts(num: int, length: int, vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded random prompts: OPT's leading </s>, then random ids; lengths between length // 2 and length."""
  rng = np.random.default_rng(seed)
  ids = np.full((num, length), 1, np.int32)
  mask = np.zeros((num, length), np.int32)
  for row, n in enumerate(rng.integers(length // 2, length + 1, num)):
    ids[row, length - n:] = np.concatenate([[2], rng.integers(4, vocab, n - 1)])
    mask[row, length - n:] = 1
  return ids, mask


def load_prompts(paths: list[str], num: int) -> list[str] | None:
  if not paths or not all(os.path.exists(p) for p in paths):
    return None
  prompts = [p for path in paths for p in json.load(open(path))]
  return [prompts[i % len(prompts)] for i in range(num)]


def main():
  args = parse_args()
  config = PRESETS[args.preset].replace(dtype=args.dtype)
  model = opt.OPTForCausalLM(config, rngs=nnx.Rngs(0))
  ids, mask = random_prompts(args.prompts, args.prompt_length, config.vocab_size)
  options = sampling.SamplingOptions(max_new_tokens=args.new_tokens, eos_id=None)
  device = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
  if jax.default_backend() == "cpu":
    device += f", {os.cpu_count()} cores"
  num_tokens = args.prompts * args.new_tokens
  graphdef, state = nnx.split(model)
  sampler = sampling.Sampler(graphdef, state, batch_size=args.prompts, prompt_length=args.prompt_length,
                             options=options)
  ours = ("jaxalign Sampler", args.dtype)
  fns = {ours: lambda: np.asarray(sampler(state, ids, mask).tokens)}
  if not args.no_torch:
    torch_generate, torch_device, torch_dtype = make_torch_generate(model, ids, mask, args)
    theirs = (f"transformers generate (PyTorch, {torch_device})", torch_dtype)
    fns[theirs] = torch_generate
  prompts = load_prompts(args.paper_prompts, args.prompts)
  if prompts is not None and os.path.isdir(args.tokenizer):
    from jaxalign.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    fns[("jaxalign sampling.generate, paper prompts", args.dtype)] = lambda: sampling.generate(
        model, tokenizer, prompts, max_new_tokens=args.new_tokens, batch_size=args.batch_size)
  timings = time_interleaved(fns, args.reps)

  header = (f"generation, {args.preset} ({opt.count_params(model) / 1e6:.1f}M params), {args.prompts} prompts x "
            f"{args.new_tokens} new tokens, random prompts {args.prompt_length // 2}-{args.prompt_length} tokens, "
            f"greedy, {args.reps} timed runs after a first (compiling) one; {device}")
  lines = [f"**{header}**", "", "| implementation | dtype | first call (s) | best (s) | median (s) | tokens/s (best) |",
           "|---|---|---|---|---|---|"]
  for (name, dtype), t in timings.items():
    lines.append(f"| {name} | {dtype} | {t.first_s:.2f} | {min(t.times_s):.3f} | {statistics.median(t.times_s):.3f} "
                 f"| {num_tokens / min(t.times_s):,.0f} |")
  lines += ["", f"compiled generation programs: {sampling.compiled_program_count()} (Sampler: 1; sampling.generate "
            "on the paper prompts: one per prompt-length bucket)"]
  if not args.no_torch:
    a, b = timings[ours], timings[theirs]
    agreement = np.mean(np.all(a.output == b.output, axis=1))
    lines.append(f"speed-up over transformers (best / median): {min(b.times_s) / min(a.times_s):.1f}x / "
                 f"{statistics.median(b.times_s) / statistics.median(a.times_s):.1f}x; rows with identical tokens: "
                 f"{agreement:.0%}")
  table = "\n".join(lines)
  print(table)
  if args.record:
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    command = "python bench/generate.py " + " ".join(sys.argv[1:])
    with open(os.path.join(REPO, "BENCHMARKS.md"), "a") as f:
      f.write(f"\n### {stamp} — `{command}`\n\n{table}\n")


def make_torch_generate(model, ids, mask, args):
  """transformers' generate on our weights (exported through save_pretrained), on the GPU if torch sees one, in
  our dtype there (fp32 on CPU); exactly new_tokens per row. Returns (a function returning them, device, dtype)."""
  import torch
  import transformers

  device = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = args.dtype if device == "cuda" else "float32"
  with tempfile.TemporaryDirectory() as folder:
    hub.save_pretrained(model, folder)
    torch_model = transformers.OPTForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()
  torch_model.generation_config.eos_token_id = None  # generate exactly max_new_tokens, as our side does
  input_ids = torch.tensor(ids, dtype=torch.long, device=device)
  attention_mask = torch.tensor(mask, dtype=torch.long, device=device)

  def generate():
    with torch.no_grad():
      out = torch_model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                 max_new_tokens=args.new_tokens, pad_token_id=1)
    return out[:, ids.shape[1]:].cpu().numpy()

  return generate, device, dtype


if __name__ == "__main__":
  main()
