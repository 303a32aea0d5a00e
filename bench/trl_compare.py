"""Side by side with TRL: jaxalign's DPO and SFT train steps vs TRL's `DPOTrainer` / `SFTTrainer` (PyTorch), on CPU
(the default) or on a GPU (`--gpu`). Same model, same weights, same token ids, same batches, run alternately in one
process. The CPU setting is described first; `--gpu` changes what the GPU setting list at the end says.

  * model: a small OPT (4 layers, hidden 256, 4 heads, ffn 1024, vocab 50272), or with `--model llama` a small
    Llama (4 layers, hidden 256, grouped-query attention with 4 query / 2 K/V heads, SwiGLU 1024, tied head, vocab
    49152: SmolLM2's shape in small), or with `--model gemma3` a small Gemma 3 text model of the same sizes (head_dim
    64, GeGLU 1024, tied head, vocab 49152, query_pre_attn_scalar 64, q/k norms; layers sliding, sliding, sliding,
    full with a window of 128 tokens: Gemma 3's local/global pattern in small), random init, built by jaxalign and
    written with `hub.save_pretrained`; TRL trains `AutoModelForCausalLM.from_pretrained` of that folder
    (`Gemma3ForCausalLM` for the Gemma; its reference model is a second copy). Dropout 0 on both sides (TRL's DPO
    default `disable_dropout=True`). fp32. The Llama and the Gemma read the OPT tokenizer's ids: the few at or above
    their vocabulary (rare BPE merges) are folded into it (id mod 49152), the same ids on both sides.
  * data: real Anthropic HH pairs (harmless-base test) and the real OPT tokenizer from ../shared. Pairs are tokenized
    ONCE by jaxalign (max_length 256, max_prompt_length 128, prompt keeps its end) and TRL is handed these very ids
    (`prompt_ids` / `chosen_ids` / `rejected_ids`; its own tokenization step is bypassed, because TRL >= 1.0 no longer
    has `max_prompt_length` and only truncates whole rows from the end). SFT: the chosen conversations (prompt +
    chosen, EOS), cut to 256 tokens keeping the start, loss on every token after the leading `</s>`, handed to
    `SFTTrainer` as a pre-tokenized `input_ids` dataset.
  * optimizer: AdamW, constant lr 1e-6, weight decay 0, grad clip 1.0 on both; batch 8 pairs (DPO) / 8 sequences
    (SFT); no accumulation, no eval, no logging, no checkpoints. TRL samples sequentially, so step k of every
    implementation sees the same batch k.
  * DPO: beta 0.1, sigmoid loss, live reference model (TRL's default; `precompute_ref_log_probs=False`).
    jaxalign runs three variants on the same batches: (a) separate chosen / rejected rows + live reference (the
    like-for-like row), (b) prefix-shared rows (`layouts.SharedRows`: prompt computed once) + live reference,
    (c) prefix-shared rows + precomputed reference log-probs (computed before timing, not timed).
  * the library's own loss path: batches come from the layouts' collates (`SeparateRows` / `SharedRows` / `SFTRows`),
    which list each row's scored positions (`targets` / `target_mask`), and the tasks run the LM head and its
    log-softmax at those positions only (`tasks.target_logprobs`), as TRL's fused LM head does.
  * shapes: TRL pads each batch to its longest row (its default); jaxalign pads rows to buckets — 128/256 for plain
    rows, 256/384/512 for prefix-shared rows — and gives every batch of a variant ONE target width (`target_width`
    argument of the collate functions): the most scored tokens of any row in the run's batches, rounded up to a
    multiple of 16. So a variant compiles once per row bucket its batches use (plain and SFT rows: one, 256), and
    all compiling happens before timing (reported separately). The library's `BatchIterator` would instead pick
    each batch's width from `shapes.target_width` (L/8, L/4, L/2 or L); `--breakdown` times that width too.
  * timing: TRL steps are timed by a `TrainerCallback` (on_step_begin -> on_step_end: forward, backward, clipping,
    optimizer; its Python collation of the batch is outside); jaxalign steps from the call with a numpy batch to
    `block_until_ready` of the metrics. Warm-up: --warmup untimed TRL steps; jaxalign's untimed steps are its
    compiling ones (one per bucket shape). Then --rounds rounds of: --steps TRL steps, then --steps steps of each
    jaxalign variant on the same batches (run inside TRL's step-end callback, so the two never overlap and a change
    in machine load hits both). Reported: median per-step pairs/s (seqs/s) and tokens/s, the ratio of medians to
    TRL, the spread of the per-round ratios, and the ratio of total examples / total time over all timed steps.
    The per-round ratios also move with the batch: TRL pads to the batch's longest row, jaxalign to its bucket.
  * tokens/s counts the real (unpadded) tokens of the plain layout — prompt + chosen and prompt + rejected rows —
    for every DPO row, so it is proportional to pairs/s; prefix sharing computes fewer tokens for the same work.

GPU setting (`--gpu`): OPT-350M's shape (with `--model llama`: SmolLM2-360M's, `--model gemma3`: Gemma 3 270M's;
random init), bf16 compute on both
sides (jaxalign: dtype bfloat16 with fp32 parameters and fp32 log-softmax; TRL: `bf16=True`, autocast over fp32
weights), max length 512 / prompt 256, still batch 8 (the paper's DPO batch). jaxalign pads plain and SFT rows to
512 and prefix-shared rows to 768 or 1024, and runs the like-for-like variant and the study's (prefix-shared,
precomputed reference) only, to keep the compilations few. TRL's steps are timed between `torch.cuda.synchronize()` calls.

  python bench/trl_compare.py                # ~5-7 minutes on 2 cores (longer when the machine is busy)
  python bench/trl_compare.py --record       # also appends the table to BENCHMARKS.md
  python bench/trl_compare.py --breakdown    # also times where a jaxalign DPO step goes (forward, head, backward)
  python bench/trl_compare.py --gpu          # on a GPU (bench/gpu.sh runs it)
  python bench/trl_compare.py --model llama  # the small Llama instead of the small OPT
  python bench/trl_compare.py --model gemma3  # the small Gemma 3 (sliding / full layers) instead of the small OPT

Needs `trl` (the `bench` extra). Skips, with the reason printed, when ../shared or trl is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from timing import JaxVariant, Timer, small_opt_config  # noqa: E402  (bench/ is the script's own folder)

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SHARED = os.path.join(REPO, "..", "shared", "data")
DEFAULT_DATA = os.path.join(SHARED, "hh-rlhf", "harmless-base", "test.jsonl.gz")
DEFAULT_TOKENIZER = os.path.join(SHARED, "tokenizers", "opt", "hf")

BATCH = 8
LR = 1e-6
BETA = 0.1
WIDTH_MULTIPLE = 16  # fixed target widths are rounded up to this
LIVE, SHARED_LIVE, SHARED_PRECOMPUTED = "live reference", "prefix-shared, live reference", \
    "prefix-shared, precomputed reference"


@dataclasses.dataclass(frozen=True)
class Setting:
  """Where and at what size the comparison runs (see the module docstring)."""

  name: str
  dtype: str
  max_length: int
  max_prompt_length: int
  row_buckets: tuple[int, ...]
  shared_buckets: tuple[int, ...]
  dpo_variants: tuple[str, ...]

  @property
  def gpu(self) -> bool:
    return self.name == "GPU"

  def model_config(self, family: str = "opt"):
    from jaxalign.models import gemma, llama, registry

    if self.gpu:
      name = {"llama": "smollm2-360m", "gemma3": "gemma-3-270m"}.get(family, "opt-350m")
      return registry.preset(name).replace(dtype=self.dtype, dropout=0.0, attention_dropout=0.0)
    if family == "llama":
      return llama.LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                               rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)
    if family == "gemma3":  # pad / BOS / EOS: the OPT tokenizer's, which both sides read
      return gemma.GemmaConfig("gemma3_text", vocab_size=49152, hidden_size=256, intermediate_size=1024,
                               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                               max_position_embeddings=2048, query_pre_attn_scalar=64, sliding_window=128,
                               layer_types=(gemma.SLIDING,) * 3 + (gemma.FULL,), tie_word_embeddings=True,
                               pad_token_id=1, bos_token_id=2, eos_token_id=2)
    return small_opt_config()


CPU = Setting("CPU", "float32", 256, 128, (128, 256), (256, 384, 512), (LIVE, SHARED_LIVE, SHARED_PRECOMPUTED))
GPU = Setting("GPU", "bfloat16", 512, 256, (512,), (768, 1024), (LIVE, SHARED_PRECOMPUTED))


def comparison_parser(doc: str) -> argparse.ArgumentParser:
  """The arguments of every side-by-side benchmark with TRL: the HH file, the tokenizer, the alternation."""
  parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data", default=DEFAULT_DATA, help="HH jsonl(.gz) file")
  parser.add_argument("--tokenizer", default=DEFAULT_TOKENIZER)
  parser.add_argument("--rounds", type=int, default=5, help="alternation rounds")
  parser.add_argument("--steps", type=int, default=1, help="timed (DPO) steps per implementation per round")
  parser.add_argument("--warmup", type=int, default=1, help="untimed TRL steps (and jaxalign steps) before round 1")
  return parser


def parse_args():
  parser = comparison_parser(__doc__)
  parser.add_argument("--sft-steps", type=int, default=2, help="timed SFT steps per implementation per round")
  parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
  parser.add_argument("--skip-sft", action="store_true")
  parser.add_argument("--skip-dpo", action="store_true")
  parser.add_argument("--breakdown", action="store_true", help="also time the parts of a jaxalign DPO step")
  parser.add_argument("--seed", type=int, default=0, help="batch order and model init")
  parser.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
  parser.add_argument("--gpu", action="store_true", help="the GPU setting: OPT-350M shape, bf16, length 512")
  parser.add_argument("--model", choices=("opt", "llama", "gemma3"), default="opt",
                      help="the small OPT, the small Llama or the small Gemma 3 (GQA 4/2, vocab 49152); with --gpu "
                           "OPT-350M, SmolLM2-360M or Gemma 3 270M")
  args = parser.parse_args()
  args.setting = GPU if args.gpu else CPU
  return args


def skip_reason(args) -> str | None:
  for path, what in ((args.data, "HH data"), (args.tokenizer, "OPT tokenizer")):
    if not os.path.exists(path):
      return f"{what} not found at {path} (../shared is missing?)"
  import importlib.util

  for module in ("torch", "trl"):
    if importlib.util.find_spec(module) is None:
      return f"{module} is not installed (pip install -e '.[bench]')"
  return None


# ------------------------------------------------------------------------------------------------------ setup


def fold_ids(pairs, vocab_size: int):
  """The pairs with ids >= vocab_size folded into the vocabulary (the small Llama / Gemma read the OPT tokenizer's
  ids)."""
  fold = lambda arrays: [np.where(a >= vocab_size, a % vocab_size, a).astype(a.dtype) for a in arrays]
  return dataclasses.replace(pairs, prompt_ids=fold(pairs.prompt_ids), chosen_ids=fold(pairs.chosen_ids),
                             rejected_ids=fold(pairs.rejected_ids))


def load_data(args, vocab_size: int):
  """(tokenized DPO pairs at the setting's lengths, SFT examples cut to its max length, permutation of the pairs),
  every id below `vocab_size`."""
  from jaxalign import tokenizer as tokenizer_lib
  from jaxalign.data import hh, tokenize

  tokenizer = tokenizer_lib.load_tokenizer(args.tokenizer)
  pairs, report = hh.load_preference_pairs(args.data, split="test")
  setting = args.setting
  dpo = fold_ids(tokenize.tokenize_pairs(pairs, tokenizer, max_length=setting.max_length,
                                         max_prompt_length=setting.max_prompt_length), vocab_size)
  full = fold_ids(tokenize.tokenize_pairs(pairs, tokenizer, max_length=None, max_prompt_length=None), vocab_size)
  sft = tokenize.sft_examples(full, max_length=setting.max_length)
  order = np.random.default_rng(args.seed).permutation(len(dpo))
  print(f"data: {report.summary()}; DPO {dpo.counts()}; SFT {sft.counts}", flush=True)
  return tokenizer, dpo, sft, order


def dpo_row_tokens(pairs, idx) -> int:
  return int(sum(2 * len(pairs.prompt_ids[i]) + len(pairs.chosen_ids[i]) + len(pairs.rejected_ids[i]) for i in idx))


def fixed_width(counts) -> int:
  """One target width for all of a variant's batches: the most scored tokens of any row, rounded up."""
  return -(-max(int(max(counts)), 1) // WIDTH_MULTIPLE) * WIDTH_MULTIPLE


def scored_count(batch) -> int:
  from jaxalign.data import layouts

  named = layouts.named_arrays(batch)
  return int(sum(named[k].sum() for k in ("target_mask", "chosen_target_mask", "rejected_target_mask") if k in named))


def make_dpo_batches(setting, pairs, order, count, pad_id):
  """Per step: (plain-row batch, prefix-shared batch, real tokens), pairs order[8k : 8k+8]; and the notes."""
  from jaxalign import shapes
  from jaxalign.data import layouts

  indices = [order[k * BATCH:(k + 1) * BATCH] for k in range(count)]
  row_layout = layouts.SeparateRows(max_length=setting.max_length)
  shared_layout = layouts.SharedRows(max_length=setting.max_length)
  row_lengths, shared_lengths = row_layout.lengths(pairs), shared_layout.lengths(pairs)
  row_counts, shared_counts = row_layout.target_counts(pairs), shared_layout.target_counts(pairs)
  row_width = fixed_width(row_counts[idx].max() for idx in indices)
  shared_width = fixed_width(shared_counts[idx].max() for idx in indices)
  rows, shared, tokens, ladder = [], [], [], []
  for idx in indices:
    row_length = shapes.fit(int(row_lengths[idx].max()), setting.row_buckets)
    shared_length = shapes.fit(int(shared_lengths[idx].max()), setting.shared_buckets)
    rows.append(row_layout.collate(pairs, idx, row_length, pad_id, row_width))
    shared.append(shared_layout.collate(pairs, idx, shared_length, pad_id, shared_width))
    tokens.append(dpo_row_tokens(pairs, idx))
    ladder.append((shapes.target_width(int(row_counts[idx].max()), row_length),
                   shapes.target_width(int(shared_counts[idx].max()), shared_length)))
  note = (f"target widths, fixed per variant: plain rows {row_width}, prefix-shared rows {shared_width} (the "
          f"library's `target_width` ladder would pick, per batch, plain {[w for w, _ in ladder]}, prefix-shared "
          f"{[w for _, w in ladder]}); scored tokens per step: plain {[scored_count(b) for b in rows]}, "
          f"prefix-shared {[scored_count(b) for b in shared]}")
  print(f"DPO batches: plain-row lengths {[b.chosen_input_ids.shape[1] for b in rows]}, prefix-shared "
        f"{[b.input_ids.shape[1] for b in shared]}; mean real tokens {np.mean(tokens):.0f} / step; {note}",
        flush=True)
  return rows, shared, tokens, note


def with_reference_logps(model, rows, shared) -> tuple[list, float]:
  """Copies of the shared batches carrying the initial model's reference log-probs (from the plain rows), and the
  seconds that took."""
  import dataclasses

  import jax
  from flax import nnx

  from jaxalign import reference, tasks

  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, batch: tasks.pair_logprobs(nnx.merge(graphdef, state), batch)[:2])
  start = time.perf_counter()
  out = []
  for row_batch, shared_batch in zip(rows, shared):
    logps = [np.asarray(side, np.float32)[:, None] for side in forward(state, row_batch)]  # [B, K = 1]
    out.append(dataclasses.replace(shared_batch, extras=dict(zip(reference.PER_PAIR_NAMES, logps))))
  return out, time.perf_counter() - start


def check_same_function(model, hf_model, batch) -> float:
  """Max |difference| of the summed response log-probs of our model and the torch model on one plain-row batch."""
  import torch

  from jaxalign import tasks

  ours = np.concatenate([np.asarray(x) for x in tasks.pair_logprobs(model, batch)[:2]])
  ids, mask = (np.asarray(x) for x in tasks.concatenated_pairs(batch))
  # The scored tokens: each row's target positions.
  targets = np.concatenate([batch.chosen_targets, batch.rejected_targets])
  valid = np.concatenate([batch.chosen_target_mask, batch.rejected_target_mask])
  loss = np.zeros(ids.shape, np.float32)
  np.put_along_axis(loss, targets, valid, axis=1)
  device = next(hf_model.parameters()).device
  ids_t = torch.tensor(ids, dtype=torch.long, device=device)
  with torch.no_grad():
    logits = hf_model(input_ids=ids_t, attention_mask=torch.tensor(mask, dtype=torch.long, device=device)).logits
    logps = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids_t[:, 1:, None])
  theirs = (logps[..., 0].cpu().numpy() * loss[:, 1:]).sum(-1)
  return float(np.abs(ours - theirs).max())


# ------------------------------------------------------------------------------------------------------- TRL


def trl_common_args(setting, out_dir, max_steps):
  return dict(output_dir=out_dir, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1, learning_rate=LR,
              lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, max_steps=max_steps,
              logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
              use_cpu=not setting.gpu, bf16=setting.gpu, fp16=False, dataloader_num_workers=0, seed=0,
              train_sampling_strategy="sequential")


def alternating_callback(warmup, steps, timer, examples, tokens, between_rounds):
  """A TrainerCallback timing each TRL step and calling between_rounds(r) after round r's TRL steps."""
  import torch
  from transformers import TrainerCallback

  # CUDA runs asynchronously: a step's time ends when its kernels do.
  sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

  class Alternate(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
      sync()
      self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
      sync()
      elapsed = time.perf_counter() - self.start
      step = state.global_step  # 1-based, already incremented
      if step > warmup:
        timer.add(elapsed, examples, tokens[step - 1], (step - warmup - 1) // steps)
      if step == warmup:
        between_rounds(-1)
      elif step > warmup and (step - warmup) % steps == 0:
        between_rounds((step - warmup) // steps - 1)

  return Alternate()


# ------------------------------------------------------------------------------------------------------ runs


def run_dpo(args, model, model_dir, pairs, order, pad_id):
  import datasets
  import torch
  from transformers import AutoModelForCausalLM
  from trl import DPOConfig, DPOTrainer

  from jaxalign import tasks
  from jaxalign.data import layouts

  count = args.warmup + args.rounds * args.steps
  setting = args.setting
  rows, shared, tokens, width_note = make_dpo_batches(setting, pairs, order, count, pad_id)
  device = "cuda" if setting.gpu else "cpu"
  hf_policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
  hf_reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
  same = check_same_function(model, hf_policy, rows[0])
  compared = f"jaxalign in {setting.dtype}, transformers in float32"
  print(f"same function: max |logp(ours) - logp(torch)| over 16 rows = {same:.2e} ({compared})", flush=True)

  task = tasks.DPOTask(beta=BETA)
  notes = [f"summed response log-probs of the first batch (16 rows) agree with transformers' "
           f"{type(hf_policy).__name__} to {same:.1e} "
           f"(max abs difference; {compared})", width_note]
  batches_of = {LIVE: rows, SHARED_LIVE: shared}
  if SHARED_PRECOMPUTED in setting.dpo_variants:
    batches_of[SHARED_PRECOMPUTED], ref_s = with_reference_logps(model, rows, shared)
    notes.append(f"precomputing the reference log-probs of the {count} batches took {ref_s:.1f}s (incl. compile), "
                 "untimed")
  variants = [JaxVariant(f"DPO, {name}", task, model, batches_of[name], tokens,
                         reference="precomputed" if name == SHARED_PRECOMPUTED else "model", lr=LR)
              for name in setting.dpo_variants]
  for v in variants:
    v.compile(range(count))
    print(f"  compiled {v.name}: {v.compile_s:.1f}s", flush=True)

  trl_timer = Timer()

  def between_rounds(r):
    if r < 0:  # after TRL's warm-up; jaxalign's warm-up was its compiling steps
      return
    indices = range(args.warmup + r * args.steps, args.warmup + (r + 1) * args.steps)
    for v in variants:
      v.run(indices, BATCH, r)
    line = ", ".join(f"{v.name} {v.timer.round_rate(r):.2f}" for v in variants)
    print(f"  round {r + 1}/{args.rounds}: pairs/s TRL {trl_timer.round_rate(r):.2f}, {line}", flush=True)

  dataset = datasets.Dataset.from_dict({
      "prompt_ids": [pairs.prompt_ids[i].tolist() for i in order[:count * BATCH]],
      "chosen_ids": [pairs.chosen_ids[i].tolist() for i in order[:count * BATCH]],
      "rejected_ids": [pairs.rejected_ids[i].tolist() for i in order[:count * BATCH]],
  })

  class PreTokenizedDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer on ids tokenized by jaxalign (same truncation on both sides); everything else TRL's own."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
      return dataset

  with tempfile.TemporaryDirectory() as out_dir:
    config = DPOConfig(**trl_common_args(setting, out_dir, count), beta=BETA, loss_type=["sigmoid"],
                       max_length=setting.max_length,
                       precompute_ref_log_probs=False, disable_dropout=True)
    callback = alternating_callback(args.warmup, args.steps, trl_timer, BATCH, tokens, between_rounds)
    trainer = PreTokenizedDPOTrainer(model=hf_policy, ref_model=hf_reference, args=config, train_dataset=dataset,
                                     processing_class=_hf_tokenizer(args), callbacks=[callback])
    trainer.train()
  results = [("TRL DPOTrainer", "live reference", trl_timer, None)]
  results += [("jaxalign", v.name.removeprefix("DPO, "), v.timer, v.compile_s) for v in variants]
  last = order[(count - 1) * BATCH:count * BATCH]  # the breakdown's batch, with the width the library would pick
  ladder = layouts.SeparateRows(max_length=setting.max_length).collate(pairs, last, rows[-1].chosen_input_ids.shape[1],
                                                                      pad_id)
  return results, notes, (variants[0], ladder)


def run_sft(args, model, model_dir, examples, order, pad_id):
  import datasets
  import torch
  from transformers import AutoModelForCausalLM
  from trl import SFTConfig, SFTTrainer

  from jaxalign import shapes, tasks
  from jaxalign.data import layouts

  steps = args.sft_steps
  count = args.warmup + args.rounds * steps
  lengths = examples.lengths
  indices = [order[k * BATCH:(k + 1) * BATCH] for k in range(count)]
  width = fixed_width(int(examples.loss_mask[i].sum()) for idx in indices for i in idx)
  sft_layout = layouts.SFTRows(max_length=args.setting.max_length)
  batches = [sft_layout.collate(examples, idx, shapes.fit(int(lengths[idx].max()), args.setting.row_buckets), pad_id,
                                width) for idx in indices]
  tokens = [int(lengths[idx].sum()) for idx in indices]
  print(f"SFT batches: lengths {[b.input_ids.shape[1] for b in batches]}, target width {width}, scored tokens "
        f"{[scored_count(b) for b in batches]}", flush=True)
  variants = [JaxVariant("SFT", tasks.SFTTask(), model, batches, tokens, reference="precomputed", lr=LR)]
  for v in variants:
    v.compile(range(count))
    print(f"  compiled {v.name}: {v.compile_s:.1f}s", flush=True)
  trl_timer = Timer()

  def between_rounds(r):
    if r < 0:
      return
    for v in variants:
      v.run(range(args.warmup + r * steps, args.warmup + (r + 1) * steps), BATCH, r)
    line = ", ".join(f"{v.name} {v.timer.round_rate(r):.2f}" for v in variants)
    print(f"  round {r + 1}/{args.rounds}: seqs/s TRL {trl_timer.round_rate(r):.2f}, {line}", flush=True)

  dataset = datasets.Dataset.from_dict({"input_ids": [examples.input_ids[i].tolist()
                                                      for i in order[:count * BATCH]]})
  hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  with tempfile.TemporaryDirectory() as out_dir:
    config = SFTConfig(**trl_common_args(args.setting, out_dir, count), max_length=args.setting.max_length,
                       packing=False, padding_free=False)
    callback = alternating_callback(args.warmup, steps, trl_timer, BATCH, tokens, between_rounds)
    trainer = SFTTrainer(model=hf_model, args=config, train_dataset=dataset, processing_class=_hf_tokenizer(args),
                         callbacks=[callback])
    trainer.train()
  return [("TRL SFTTrainer", "SFT", trl_timer, None)] + [("jaxalign", v.name, v.timer, v.compile_s) for v in variants]


def _hf_tokenizer(args):
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(args.tokenizer)


# -------------------------------------------------------------------------------------------------- breakdown


def breakdown(model, variant: JaxVariant, ladder: dict, repeats: int = 3) -> list[str]:
  """Times the pieces of the like-for-like DPO step on its last batch (pieces interleaved, medians); `ladder` is the
  same batch with the target width `shapes.target_width` picks."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from jaxalign import losses, tasks

  index = len(variant.batches) - 1
  batch = jax.tree.map(jnp.asarray, variant.batches[index])
  ladder = jax.tree.map(jnp.asarray, ladder)
  graph, params, rest = nnx.split(model, nnx.Param, ...)
  merge = lambda params: nnx.merge(graph, params, rest)

  def hidden(params, batch):
    ids, mask = tasks.concatenated_pairs(batch)
    return merge(params).hidden_states(ids, mask)[0]

  logps = lambda params, batch: jnp.concatenate(tasks.pair_logprobs(merge(params), batch)[:2])

  def loss(params, batch, reference):
    chosen, rejected = tasks.pair_logprobs(merge(params), batch)[:2]
    half = reference.shape[0] // 2
    return losses.dpo_loss(chosen, rejected, reference[:half], reference[half:], beta=BETA)[0]

  reference = logps(params, batch)
  rows, length = 2 * BATCH, batch.chosen_input_ids.shape[1]
  width, ladder_width = batch.chosen_targets.shape[1], ladder.chosen_targets.shape[1]
  grad = jax.jit(jax.grad(loss))
  pieces = [
      (f"decoder forward, {rows} x {length}, no LM head", jax.jit(hidden), (params, batch)),
      (f"forward + LM head + log-softmax at the {rows} x {width} target slots", jax.jit(logps), (params, batch)),
      (f"policy forward + backward (DPO loss), target width {width}", grad, (params, batch, reference)),
  ]
  if ladder_width != width:
    pieces.append((f"policy forward + backward, target width {ladder_width} (what `shapes.target_width` picks for "
                   "this batch)", grad, (params, ladder, reference)))
  pieces.append(("whole train step: reference forward + policy forward + backward + AdamW", lambda: variant.step(index),
                 ()))
  times = {name: [] for name, _, _ in pieces}
  for name, fn, fn_args in pieces:
    jax.block_until_ready(fn(*fn_args))  # compile
  for _ in range(repeats):
    for name, fn, fn_args in pieces:
      start = time.perf_counter()
      jax.block_until_ready(fn(*fn_args))
      times[name].append(time.perf_counter() - start)
  lines = [f"jaxalign DPO step, one batch of {BATCH} pairs ({rows} rows x {length} slots, {scored_count(batch)} scored "
           f"tokens), {model.config.dtype}, median of {repeats} interleaved repeats:", "", "| piece | ms |", "|---|---|"]
  lines += [f"| {name} | {statistics.median(t) * 1e3:.0f} |" for name, t in times.items()]
  return lines


# ------------------------------------------------------------------------------------------------------- main


def load_average() -> str:
  return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def prepare_libraries(args) -> str:
  """Quiets transformers, datasets and their warnings, sets torch's threads and seed; returns the machine line
  (processor, cores, library versions, load average)."""
  import warnings

  import datasets
  import jax
  import torch
  import transformers
  import trl

  warnings.filterwarnings("ignore", category=FutureWarning)
  transformers.logging.set_verbosity_error()
  transformers.utils.logging.disable_progress_bar()
  datasets.disable_progress_bars()
  torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  accelerator = f"{jax.devices()[0].device_kind}, " if args.setting.gpu else ""
  return (f"{accelerator}{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}, TRL "
          f"{trl.__version__}, jax {jax.__version__} ({jax.devices()[0].platform}), load average {load_average()} "
          "at start")


def main():
  args = parse_args()
  reason = skip_reason(args)
  if reason:
    print(f"SKIPPED bench/trl_compare.py: {reason}")
    return
  from flax import nnx

  from jaxalign.models import hub, registry

  machine = prepare_libraries(args)
  model_config = args.setting.model_config(args.model)
  tokenizer, pairs, sft, order = load_data(args, model_config.vocab_size)
  pad_id = tokenizer.pad_token_id
  model = registry.build_causal_lm(model_config, rngs=nnx.Rngs(args.seed))
  print(machine, flush=True)
  results, notes, like_for_like = [], [], None
  with tempfile.TemporaryDirectory() as model_dir:
    hub.save_pretrained(model, model_dir)
    if not args.skip_dpo:
      dpo_results, notes, like_for_like = run_dpo(args, model, model_dir, pairs, order, pad_id)
      results += dpo_results
    if not args.skip_sft:
      results += run_sft(args, model, model_dir, sft, order, pad_id)

  table = format_table(results, args)
  machine += f"; load average {load_average()} at the end"
  print("\n" + table + "\n")
  for note in notes:
    print(f"- {note}")
  extra = []
  if args.breakdown and like_for_like is not None:
    extra = breakdown(model, *like_for_like)
    print("\n" + "\n".join(extra))
  if args.record:
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    command = "python bench/trl_compare.py " + " ".join(a for a in sys.argv[1:] if a != "--record")
    body = "\n".join([f"Machine: {machine}.", "", table, "", *[f"- {n}" for n in notes]] +
                     (["", *extra] if extra else []))
    with open(os.path.join(REPO, "BENCHMARKS.md"), "a") as f:
      f.write(f"\n### {stamp} — `{command.strip()}` ({args.setting.name}, vs TRL)\n\n{body}\n")


def format_table(results, args) -> str:
  lines = ["| implementation | variant | pairs/s or seqs/s (median step) | tokens/s | ratio vs TRL (medians) | "
           "ratio per round (min-max) | ratio, all steps (total / total time) | compile s | timed steps |",
           "|---|---|---|---|---|---|---|---|---|"]
  baseline = baseline_timer = None
  for impl, variant, timer, compile_s in results:
    if not timer.times:
      continue
    per_s, tok_s = timer.per_s()
    if impl.startswith("TRL"):
      baseline, baseline_timer = per_s, timer
    unit = "seqs/s" if variant.startswith("SFT") else "pairs/s"
    ratio = spread = total = "n/a"
    if baseline_timer is not None:
      ratio = f"{per_s / baseline:.2f}x"
      per_round = sorted(timer.round_rate(r) / baseline_timer.round_rate(r) for r in sorted(set(timer.rounds)))
      spread = f"{per_round[0]:.2f}-{per_round[-1]:.2f}x"
      total = f"{timer.total_rate() / baseline_timer.total_rate():.2f}x"
    compile_text = f"{compile_s:.0f}" if compile_s is not None else "-"
    lines.append(f"| {impl} | {variant} | {per_s:.2f} {unit} | {tok_s:,.0f} | {ratio} | {spread} | {total} | "
                 f"{compile_text} | {len(timer.times)} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
