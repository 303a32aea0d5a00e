"""Side by side with TRL: a jaxalign GRPO step (the online source sampling from the current policy, scoring and the
update, `train.py`'s own setup) vs TRL's `GRPOTrainer` (transformers' `generate` on CPU, no vLLM), run alternately
in one process, on the CPU.

  * model: bench/trl_compare.py's small OPT (4 layers, hidden 256, 4 heads, ffn 1024, vocab 50272), random init,
    built by jaxalign and written with `hub.save_pretrained`; TRL loads that folder
    (`AutoModelForCausalLM.from_pretrained`) and builds its reference model from it; jaxalign's stage starts from
    it (`init_from`) and keeps a frozen copy as its reference. fp32, dropout 0 on both sides.
  * prompts: real HH prompts (harmless-base test, the conversation through its last "\\n\\nAssistant:", the real OPT
    tokenizer) of at most --max-prompt-tokens tokens (longer ones are left out, counted; neither side truncates);
    both sides see the same prompts in the same order (jaxalign's seeded prompt order; TRL with
    `shuffle_dataset=False` on the prompts in that order), --prompts-per-step prompts a step.
  * generation: G = --generations completions per prompt, --new-tokens tokens at most, temperature 1, top_p 1,
    top_k off; a random model rarely samples EOS, so nearly every completion runs to the limit on both sides (the
    generated tokens are counted and printed). jaxalign also stops a completion at "\\n\\nHuman:" (its plain-text
    prompts' stop string); TRL does not.
  * reward: `letter_share` below (the share of ASCII letters in the completion text), the same Python function for
    both (jaxalign: `online.rewards = "letters=grpo_compare:letter_share"`).
  * loss: GRPO, TRL's defaults (loss_type dapo, epsilon 0.2, scale_rewards group, one iteration), beta --beta > 0
    so both compute the reference model's per-token log-probs each step (k3 KL).
  * optimizer: AdamW, constant lr 1e-6, weight decay 0, grad clip 1.0 on both; one optimizer step per generation
    (steps_per_generation = 1, no accumulation); no logging, evaluation or checkpoints during the timed steps.
  * timing: a step = generation + scoring + update. TRL: a `TrainerCallback`, on_step_begin -> on_step_end; its
    generation time = `GRPOTrainer._generate` (tokenizing the prompts, `generate`, decoding), its scoring time =
    `_calculate_rewards`, both timed by wrapping the methods. jaxalign: `source.next(state)` + the train step, until
    `block_until_ready` of the step's metrics; its generation and scoring times are the source's own metrics
    (`time/generation`: the sampler call; `time/scoring`: decoding and the rewards). jaxalign compiles first: an
    untimed warm-up pass over the same steps compiles its sampler and train-step shapes, then the train state and
    the source are put back to their start (so the timed steps are the first steps of a fresh run). Then --rounds
    rounds of: --steps TRL steps, then the same steps of jaxalign (run inside TRL's step-end callback, so the two
    never overlap and a change in machine load hits both). Reported: median steps/s, the ratio of medians, the
    per-round ratios, the ratio of total time, and each side's generation share of its step time.

  python bench/grpo_compare.py              # ~5-10 minutes on 2 loaded cores
  python bench/grpo_compare.py --threads 1  # torch on one thread: on an oversubscribed machine its 2-thread OpenMP
                                            # barriers stall (BENCHMARKS.md); the fair setting there
  python bench/grpo_compare.py --record     # also appends the table to BENCHMARKS.md
  (--data / --tokenizer when ../shared is not beside the checkout, e.g. a worktree: /work/shared/data/...)

Needs `trl` (the `bench` extra) and ../shared; skips, with the reason printed, when either is missing.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from timing import Timer, small_opt_config  # noqa: E402  (bench/ is the script's own folder)
from trl_compare import CPU, REPO, comparison_parser, skip_reason, trl_common_args  # noqa: E402

LR = 1e-6


def letter_share(prompts, completions, completion_ids=None, **columns) -> list[float]:
  """The benchmark's reward (TRL's signature): the share of ASCII letters among a completion's characters."""
  text = lambda c: c if isinstance(c, str) else "".join(m["content"] for m in c)
  return [sum(ch.isascii() and ch.isalpha() for ch in text(c)) / max(len(text(c)), 1) for c in completions]


def parse_args():
  parser = comparison_parser(__doc__)
  parser.add_argument("--prompts-per-step", type=int, default=2)
  parser.add_argument("--generations", type=int, default=4, help="G, completions per prompt")
  parser.add_argument("--new-tokens", type=int, default=32, help="max completion length")
  parser.add_argument("--max-prompt-tokens", type=int, default=128, help="longer prompts are left out")
  parser.add_argument("--beta", type=float, default=0.04, help="KL coefficient (> 0: both run a reference)")
  parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
  args = parser.parse_args()
  args.setting = CPU
  return args


# ------------------------------------------------------------------------------------------------------ setup


def load_prompts(args, tokenizer, count: int):
  """(all HH prompts of at most --max-prompt-tokens tokens, the first `count` of them in jaxalign's prompt order,
  the number left out as too long)."""
  from jaxalign import rollout
  from jaxalign.data import prompts

  records, report = prompts.load_training_prompts(args.data, split="test")
  short = [r.prompt for r in records if len(tokenizer.encode(r.prompt)) <= args.max_prompt_tokens]
  order = rollout.PromptOrder(len(short), args.seed).take(count)
  print(f"prompts: {report.summary()}; {len(short)} of at most {args.max_prompt_tokens} tokens "
        f"({len(records) - len(short)} longer ones left out)", flush=True)
  return short, [short[i] for i in order], len(records) - len(short)


def jax_config(args, model_dir: str, prompt_file: str, steps: int):
  """A GRPO stage like the TRL run's (module docstring), from the saved small OPT."""
  from configs import common

  c = common.get_config()
  c.task, c.seed, c.init_from, c.tokenizer = "grpo", args.seed, model_dir, args.tokenizer
  c.model.dropout = 0.0
  c.data.source, c.data.train_split, c.data.max_prompt_length = prompt_file, "train", args.max_prompt_tokens
  c.data.eval_pairs = 0
  c.optimizer.lr, c.optimizer.schedule, c.optimizer.weight_decay, c.optimizer.grad_clip = LR, "constant", 0.0, 1.0
  c.training.batch_size = args.prompts_per_step * args.generations
  c.training.max_steps, c.training.log_every, c.training.progress_bar = steps, 1_000_000, False
  c.checkpoint.every_steps, c.logging.tensorboard, c.export.enabled = 1_000_000, False, False
  c.online.rewards = "letters=grpo_compare:letter_share"
  c.online.num_generations, c.online.max_completion_length = args.generations, args.new_tokens
  c.online.temperature, c.online.top_p, c.online.top_k = 1.0, 1.0, 0
  c.grpo.beta = args.beta
  return c


class JaxGRPO:
  """jaxalign's GRPO stage (trainer.setup), stepped by hand: the source's next batch, then the train step."""

  def __init__(self, config, workdir: str):
    import jax

    from jaxalign import trainer

    start = time.perf_counter()
    self.stage = trainer.setup(config, workdir)
    self.copy = lambda tree: jax.tree.map(lambda x: x.copy(), tree)
    self.initial_state, self.initial_source = self.copy(self.stage.state), self.stage.source.state()
    self.setup_s = time.perf_counter() - start
    self.timer, self.generation, self.scoring, self.tokens = Timer(), [], [], []

  def step(self):
    import jax

    stage = self.stage
    stage.state, metrics = stage.steps.train(stage.state, stage.source.next(stage.state))
    return jax.block_until_ready(metrics), stage.source.metrics()

  def warm_up(self, steps: int) -> float:
    """Runs `steps` steps (compiling every shape they meet), then puts the state and the source back."""
    start = time.perf_counter()
    for _ in range(steps):
      self.step()
    self.stage.state = self.copy(self.initial_state)
    self.stage.source.restore(self.initial_source)
    return time.perf_counter() - start

  def run(self, steps: int, round_index: int) -> None:
    for _ in range(steps):
      start = time.perf_counter()
      _, source_metrics = self.step()
      elapsed = time.perf_counter() - start
      tokens = source_metrics["completions/mean_length"] * self.stage.config.training.batch_size
      self.timer.add(elapsed, 1, tokens, round_index)
      self.generation.append(source_metrics["time/generation"])
      self.scoring.append(source_metrics["time/scoring"])
      self.tokens.append(tokens)


def trl_trainer(args, model_dir: str, prompts: list[str], steps: int, out_dir: str, callback):
  """TRL's GRPOTrainer on the same model and prompts, its generation and scoring timed (module docstring)."""
  import datasets
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer
  from trl import GRPOConfig, GRPOTrainer

  class TimedGRPOTrainer(GRPOTrainer):
    def __init__(self, *a, **k):
      super().__init__(*a, **k)
      self.generation, self.scoring, self.tokens = [], [], []  # per step: seconds, seconds, completion tokens

    def _generate(self, prompts):
      start = time.perf_counter()
      out = super()._generate(prompts)
      self.generation.append(time.perf_counter() - start)
      self.tokens.append(sum(len(ids) for ids in out[1]))  # completion_ids
      return out

    def _calculate_rewards(self, *a, **k):
      start = time.perf_counter()
      out = super()._calculate_rewards(*a, **k)
      self.scoring.append(time.perf_counter() - start)
      return out

  common = trl_common_args(args.setting, out_dir, steps)
  common["per_device_train_batch_size"] = args.prompts_per_step * args.generations
  config = GRPOConfig(**common, beta=args.beta, num_generations=args.generations,
                      max_completion_length=args.new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                      shuffle_dataset=False, loss_type="dapo", scale_rewards="group", num_iterations=1,
                      steps_per_generation=1, disable_dropout=True, log_completions=False)
  model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  return TimedGRPOTrainer(model=model, reward_funcs=[letter_share], args=config,
                          train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
                          processing_class=AutoTokenizer.from_pretrained(args.tokenizer), callbacks=[callback])


# ------------------------------------------------------------------------------------------------------- main


def main():
  args = parse_args()
  reason = skip_reason(args)
  if reason:
    print(f"SKIPPED bench/grpo_compare.py: {reason}")
    return
  from flax import nnx

  from jaxalign import tokenizer as tokenizer_lib
  from jaxalign.models import hub, registry
  from trl_compare import alternating_callback, load_average, prepare_libraries

  machine = prepare_libraries(args)
  steps = args.warmup + args.rounds * args.steps
  tokenizer = tokenizer_lib.load_tokenizer(args.tokenizer)
  pool, ordered, left_out = load_prompts(args, tokenizer, steps * args.prompts_per_step)
  print(machine, flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    model_dir, prompt_file = os.path.join(tmp, "model"), os.path.join(tmp, "prompts.jsonl")
    hub.save_pretrained(registry.build_causal_lm(small_opt_config(), rngs=nnx.Rngs(args.seed)), model_dir)
    with open(prompt_file, "w") as f:
      f.writelines(json.dumps({"prompt": p}) + "\n" for p in pool)
    ours = JaxGRPO(jax_config(args, model_dir, prompt_file, steps), os.path.join(tmp, "jax_run"))
    warm_s = ours.warm_up(steps)
    print(f"jaxalign: setup {ours.setup_s:.1f}s (incl. precompiling the train step), warm-up pass of {steps} steps "
          f"{warm_s:.1f}s (compiles the sampler)", flush=True)
    trl_timer = Timer()

    def between_rounds(r):
      if r < 0:
        ours.run(args.warmup, -1)  # jaxalign's first steps too, so both time the same steps (warm-up untimed)
        ours.timer, ours.generation, ours.scoring, ours.tokens = Timer(), [], [], []
        return
      ours.run(args.steps, r)
      print(f"  round {r + 1}/{args.rounds}: steps/s TRL {trl_timer.round_rate(r):.3f}, jaxalign "
            f"{ours.timer.round_rate(r):.3f}", flush=True)

    tokens = [0] * steps  # the callback's per-step token counts; generated tokens are counted by the trainer
    callback = alternating_callback(args.warmup, args.steps, trl_timer, 1, tokens, between_rounds)
    trainer = trl_trainer(args, model_dir, ordered, steps, os.path.join(tmp, "trl_run"), callback)
    trainer.train()
  trl_side = (trl_timer, trainer.generation[args.warmup:], trainer.scoring[args.warmup:],
              trainer.tokens[args.warmup:])
  ours_side = (ours.timer, ours.generation, ours.scoring, ours.tokens)
  machine += f"; load average {load_average()} at the end"
  table = format_table(trl_side, ours_side)
  notes = [f"{args.prompts_per_step} prompts x G = {args.generations} completions of at most {args.new_tokens} "
           f"tokens a step, beta {args.beta}; prompts of at most {args.max_prompt_tokens} tokens ({left_out} longer "
           f"HH prompts left out)",
           f"generated tokens per timed step: TRL {trl_side[3]}, jaxalign {[int(t) for t in ours_side[3]]}"]
  print("\n" + table + "\n\n" + "\n".join(f"- {n}" for n in notes))
  if args.record:
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    command = "python bench/grpo_compare.py " + " ".join(a for a in sys.argv[1:] if a != "--record")
    with open(os.path.join(REPO, "BENCHMARKS.md"), "a") as f:
      f.write(f"\n### {stamp} — `{command.strip()}` (CPU, GRPO vs TRL)\n\nMachine: {machine}.\n\n{table}\n\n" +
              "\n".join(f"- {n}" for n in notes) + "\n")


def format_table(trl_side, ours_side) -> str:
  lines = ["| implementation | steps/s (median step) | generated tokens / s of step time | ratio vs TRL (medians) "
           "| ratio per round (min-max) | ratio, all steps (total time) | generation share of the step | scoring share "
           "| timed steps |",
           "|---|---|---|---|---|---|---|---|---|"]
  baseline = trl_side[0]
  for name, (timer, generation, scoring, tokens) in (("TRL GRPOTrainer", trl_side), ("jaxalign grpo", ours_side)):
    steps_s = timer.per_s()[0]
    tokens_s = sum(tokens) / sum(timer.times)
    per_round = sorted(timer.round_rate(r) / baseline.round_rate(r) for r in sorted(set(timer.rounds)))
    share = lambda part: (f"{sum(part) / sum(timer.times):.0%} (median "
                          f"{statistics.median(p / t for p, t in zip(part, timer.times)):.0%})")
    lines.append(f"| {name} | {steps_s:.3f} | {tokens_s:,.0f} | {steps_s / baseline.per_s()[0]:.2f}x | "
                 f"{per_round[0]:.2f}-{per_round[-1]:.2f}x | {timer.total_rate() / baseline.total_rate():.2f}x | "
                 f"{share(generation)} | {share(scoring)} | {len(timer.times)} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
