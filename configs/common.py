"""Defaults shared by every stage. Each stage file starts from `get_config()` and changes what it needs."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "sft"  # sft | dpo | cpo (CPO, SimPO) | orpo | kto | reward | grpo | rloo | online_dpo
  c.seed = 0
  c.resume = True  # continue from the workdir's checkpoints; False refuses a workdir that has some
  # A resumed stage (or a rerun of a finished one) refuses a config whose fields that change the math (optimizer,
  # schedule, loss and its hyperparameters, model, LoRA, data, seed, ...) differ from the saved one, listing them;
  # logging, evaluation, checkpointing, export, mesh and the step count may change (config_lib.RESUME_FREE_FIELDS).
  # Comma-separated dotted fields (or sections, e.g. "optimizer") allowed to change anyway; "all" allows any.
  c.resume_allow_changes = ""
  # Where the weights start: a Hub id, a Hugging Face folder, a training workdir, "stage:<name>" (an earlier stage
  # of the same study), or "" for a random init of `model.preset` + `model.arch`.
  c.init_from = "facebook/opt-350m"
  # "" = the starting model's own tokenizer (init_from's folder, a workdir's exported folder, or the Hub id's); or a
  # Hub id or folder of another; "synthetic" trains a tiny BPE on the synthetic data. A random init (init_from = "")
  # has no model to take it from: name one.
  c.tokenizer = ""

  c.model = ml_collections.ConfigDict()
  # Architecture for random init: opt-125m … opt-66b, smollm2-360m, llama-3.2-1b, qwen2.5-0.5b, qwen2.5-1.5b,
  # qwen3-0.6b, mistral-7b, pythia-160m … pythia-2.8b, gpt2 … gpt2-xl (jaxalign.models.registry.preset_names())
  c.model.preset = "opt-350m"
  c.model.arch = ml_collections.ConfigDict()  # field overrides of the preset, e.g. num_hidden_layers
  c.model.dtype = "float32"  # compute dtype: bfloat16 on GPU/TPU; parameters stay float32
  c.model.remat = False
  # Chunked log-probs (jaxalign/logprobs.py): when the float32 logits of the scored tokens ([rows, scored, vocab],
  # the whole traced batch or micro-batch) would take more than logprob_chunk_above_mib, the step computes them in
  # pieces so that no such buffer (nor its gradient) exists; at or below it, all at once (the fastest). The pieces:
  # logprob_vocab_chunk columns of the head's vocabulary at a time (logprobs.fused_head: an online log-sum-exp forward
  # and a backward writing each slice's weight gradient once) where the family's head is a plain product, else
  # logprob_chunk scored positions per row at a time (a checkpointed scan; Gemma 2's soft-cap, Granite's scaling).
  # Measured on CPU (BENCHMARKS.md "Memory"): the vocabulary-dependent temporaries of a Qwen2.5-0.5B DPO step, 8 pairs
  # x 1,024 tokens, 5.92 GiB unchunked, 1.17 at 8,192 columns, 2.19 at 32 positions; the fused head's step time
  # is the unchunked one's or better (one more head matmul, far less memory traffic), 32-position chunks are slower.
  # 0 turns a way off; `dry_run` prints which one a step uses.
  c.model.logprob_chunk_above_mib = 1024
  c.model.logprob_vocab_chunk = 8192
  c.model.logprob_chunk = 32
  c.model.attention_impl = "auto"  # auto | xla | cudnn
  c.model.dropout = -1.0  # -1 keeps the checkpoint's dropout (0.1 for OPT)

  c.data = ml_collections.ConfigDict()
  c.data.source = "Anthropic/hh-rlhf"  # Hub id, local folder/file, or "synthetic"
  c.data.subsets = ""  # comma-separated HH subsets; "" = all four (the paper's 160,800-pair train split)
  # Record format (jaxalign/data/formats.py): auto (told apart per record by its fields) | hh ({chosen, rejected}
  # conversations) | preference (TRL: {prompt, chosen, rejected} strings) | conversational (the same as lists of
  # {"role", "content"} messages, prompt explicit or implicit) | messages ({messages}: SFT on assistant turns).
  c.data.format = "auto"
  # "" = plain text (HH as in the paper); "tokenizer" = render every record with the tokenizer's chat template (HH
  # text is split into messages; needed for the message formats); or a .jinja file replacing the tokenizer's (the
  # exported model folder then carries it). Responses end with the template's end-of-turn token.
  c.data.chat_template = ""
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.eval_pairs = 512  # held-out pairs for evaluation during training (0 = none)
  # The held-out records: "" = data.source's eval_split; a single data file has none, so eval_share of its records
  # (chosen by a permutation seeded with `seed`, logged) are held out and never trained on. Or a separate file,
  # folder or Hub id whose eval_split (a file: all of it) is held out.
  c.data.eval_source = ""
  c.data.eval_share = 0.1
  c.data.max_length = 512
  c.data.max_prompt_length = 256
  c.data.truncation_mode = "keep_end"  # keep_end | keep_start (which end of a long prompt survives)
  # SFT: conversation (every token, the paper) | assistant (every assistant turn; needs data.chat_template) |
  # completion (the final response only)
  c.data.loss_on = "conversation"
  c.data.sft_responses = "chosen"  # SFT on the chosen responses (the paper) | rejected | both
  # Pair tasks (dpo, reward): each pair's prompt + chosen + rejected as one sequence, the prompt computed once.
  c.data.prefix_sharing = False
  c.data.packing = False  # several examples per row of max_length tokens, segment masks keeping them apart (SFT;
  # dpo / reward with data.prefix_sharing: whole pairs as prompt + chosen + rejected); batch_size then counts rows
  c.data.buckets = (128, 256, 512, 1024)  # padded row lengths (capped at max_length)
  c.data.group_by_length = False  # batches of similar lengths (sorted within windows of 64 batches), less padding
  c.data.cache_dir = ""  # tokenization cache; "" = <workdir>/../cache
  c.data.synthetic_pairs = 2000  # size of the synthetic train split when source = "synthetic"
  # Cleaning the train pairs with a judge's scores (configs/score_pairs.py writes them): keep | drop | swap the
  # pairs whose judge margin score(chosen) - score(rejected) is below -pair_filter_margin (counted in the skip report)
  c.data.pair_filter = "keep"
  c.data.pair_filter_margin = 0.0
  c.data.pair_scores = ""  # the scored-<split>.jsonl of configs/score_pairs.py
  c.data.warn_skipped_share = 0.5  # warn loudly when a data file has more than this share of its records skipped

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"  # adamw | rmsprop
  c.optimizer.lr = 2e-5
  c.optimizer.schedule = "linear"  # linear | cosine | constant (after warmup)
  c.optimizer.warmup_steps = 0
  c.optimizer.weight_decay = 0.0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.grad_clip = 1.0  # global norm; 0 = off

  c.training = ml_collections.ConfigDict()
  c.training.batch_size = 8  # examples (SFT) or pairs (DPO, reward) per optimizer step, over all devices; rows
  # when data.packing
  c.training.grad_accum = 1  # micro-batches per step (batch_size must divide evenly)
  c.training.num_epochs = 1.0
  c.training.max_steps = -1  # -1: run the epochs
  c.training.log_every = 10
  c.training.eval_every = 0  # steps between evaluations; 0 = only at the end
  c.training.progress_bar = True
  c.training.precompile = True  # compile every batch shape of the run before the first step, on parallel threads

  c.dpo = ml_collections.ConfigDict()
  c.dpo.beta = 0.1
  # Any of jaxalign.losses.DPO_LOSS_TYPES (TRL's names and formulas, documented in losses.py), or several summed
  # with dpo.loss_weights, e.g. "sigmoid,sft" = RPO. A loss without a reference term (reference_free, sft)
  # builds, loads and runs no reference.
  c.dpo.loss_type = "sigmoid"
  c.dpo.loss_weights = ()  # one weight per loss type; () = 1 each
  c.dpo.label_smoothing = 0.0  # sigmoid: conservative DPO; TRL's eps for exo_pair / robust / aot / aot_unpaired
  c.dpo.f_divergence_type = "reverse_kl"  # reverse_kl (DPO) | forward_kl | js_divergence | alpha_divergence
  c.dpo.f_alpha_divergence_coef = 0.5
  c.dpo.discopop_tau = 0.05
  c.dpo.reference = "model"  # model (live forward) | precomputed (one pass first, cached on disk)
  c.dpo.reference_dtype = "float32"  # a frozen reference copy may be kept in bfloat16

  # Reference-free methods (no reference built or run; formulas and papers in jaxalign/losses.py). CPO: TRL's
  # CPOTrainer; its loss_type simpo with alpha 0 is SimPO (configs/simpo.py: beta 2.0, gamma 1.0, the SimPO authors').
  c.cpo = ml_collections.ConfigDict()
  c.cpo.loss_type = "sigmoid"  # sigmoid | hinge | ipo | simpo
  c.cpo.beta = 0.1  # CPO paper: 0.1
  c.cpo.alpha = 1.0  # weight of the chosen responses' NLL (CPO paper: 1.0; SimPO: 0)
  c.cpo.simpo_gamma = 0.5  # SimPO's target margin gamma (TRL's default 0.5; the SimPO authors use 1.0 with beta 2)
  c.cpo.label_smoothing = 0.0  # sigmoid / simpo: conservative eps
  c.orpo = ml_collections.ConfigDict()
  c.orpo.beta = 0.1  # the ORPO paper's lambda (0.1 in Mistral-ORPO and TRL); trains from the base model

  # KTO on unpaired examples (data.source: unpaired {prompt, completion, label} JSON lines, or preference pairs split
  # into desirable / undesirable examples); against the reference of dpo.reference / dpo.reference_dtype.
  c.kto = ml_collections.ConfigDict()
  c.kto.loss_type = "kto"  # kto | apo_zero_unpaired
  c.kto.beta = 0.1  # KTO paper: 0.1
  c.kto.desirable_weight = 1.0  # paper: keep desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
  c.kto.undesirable_weight = 1.0  # in [1, 4/3]

  # Online methods (grpo, rloo, online_dpo): prompts from data.source ("arithmetic" for the synthetic task, an HH
  # source without the evaluator's prompts, or a JSONL / Parquet file of TRL prompt-only or conversational records),
  # data.train_split / data.subsets, each cut to its last data.max_prompt_length tokens. training.batch_size counts
  # completions per optimizer step (TRL's effective batch); batch_size / num_generations prompts per step.
  # Defaults are TRL 1.16's GRPOConfig (configs/rloo.py and configs/online_dpo.py set their trainers' own).
  c.online = ml_collections.ConfigDict()
  # Rewards "name=spec,...": spec exact_answer | answer_format | soft_overlong (built-in), "module:function" (TRL's
  # signature f(prompts, completions, completion_ids, **columns)), or a reward model (folder, training workdir,
  # "stage:<name>", Hub id; a two-head model of ours gives <name>/harmless and <name>/helpful). Logged by name.
  c.online.rewards = ""
  c.online.reward_weights = ()  # one per reward (after heads are expanded); () = 1 each (TRL: reward_weights)
  # {prompt set: head} for a several-head reward model, "harmful=harmless,helpful=helpful" as the evaluator picks
  # heads ("" = every head scores every prompt)
  c.online.reward_set_heads = ""
  c.online.soft_punish_cache = 0  # the soft_overlong reward's ramp in tokens (TRL/DAPO: soft_punish_cache)
  c.online.num_generations = 8  # completions per prompt, G (TRL GRPO: 8; RLOO: 2; online DPO: 2)
  c.online.max_completion_length = 256  # TRL: 512 (GRPO, RLOO); online DPO's max_new_tokens: 64
  c.online.temperature = 1.0  # TRL: 1.0 (online DPO: 0.9)
  c.online.top_p = 1.0
  c.online.top_k = 0  # 0 = off
  c.online.steps_per_generation = 1  # optimizer steps served by one generation batch, in slices (TRL: = grad accum)
  c.online.num_iterations = 1  # mu: passes over each generation batch (TRL: 1)
  c.online.mask_truncated_completions = False  # DAPO's overlong filtering: completions cut at the limit not trained
  # DAPO's dynamic sampling: groups whose rewards are all equal (no signal) are dropped and refilled from further
  # prompts, up to dynamic_sampling_max_rounds generation rounds per batch (then filled with dropped groups, counted)
  c.online.dynamic_sampling = False
  c.online.dynamic_sampling_max_rounds = 4

  c.grpo = ml_collections.ConfigDict()
  c.grpo.loss_type = "dapo"  # grpo | bnpo | dr_grpo | dapo (TRL's default)
  c.grpo.beta = 0.0  # k3 KL to the reference; 0 (TRL's default) builds, loads and runs no reference
  c.grpo.epsilon = 0.2  # TRL: 0.2
  c.grpo.epsilon_high = ml_collections.config_dict.placeholder(float)  # None = epsilon; DAPO: 0.28
  c.grpo.delta = ml_collections.config_dict.placeholder(float)  # two-sided clipping bound (INTELLECT-2); None = off
  c.grpo.importance_sampling_level = "token"  # token | sequence (GSPO)
  c.grpo.scale_rewards = "group"  # group | batch | none (Dr. GRPO)

  c.rloo = ml_collections.ConfigDict()
  c.rloo.beta = 0.05  # TRL RLOOConfig: 0.05 (KL in the reward; 0 = no reference)
  c.rloo.epsilon = 0.2
  c.rloo.epsilon_high = ml_collections.config_dict.placeholder(float)
  c.rloo.normalize_advantages = False
  c.rloo.reward_clip_range = ()  # (low, high) or () = no clipping

  c.online_dpo = ml_collections.ConfigDict()
  c.online_dpo.beta = 0.1  # TRL OnlineDPOConfig: 0.1
  c.online_dpo.loss_type = "sigmoid"  # any dpo.loss_type (TRL: sigmoid | ipo)
  c.online_dpo.missing_eos_penalty = ml_collections.config_dict.placeholder(float)  # subtracted if no EOS; None = off

  c.lora = ml_collections.ConfigDict()
  c.lora.enabled = False
  c.lora.rank = 8
  c.lora.alpha = 16.0
  c.lora.dropout = 0.05
  # Projections to adapt; () = the family's default: q_proj, v_proj (OPT, Llama, Qwen, Mistral; the paper's),
  # query_key_value (GPT-NeoX), c_attn (GPT-2)
  c.lora.targets = ()

  c.reward = ml_collections.ConfigDict()
  c.reward.heads = ("reward",)  # or ("harmless", "helpful"): one head per criterion, trained on its HH subsets
  c.reward.margin = 0.0
  c.reward.center_rewards_coefficient = 0.0

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500
  c.checkpoint.keep = 2
  c.checkpoint.async_save = True

  c.mesh = ml_collections.ConfigDict()
  c.mesh.num_devices = -1  # use the first N devices (-1: all)
  c.mesh.data = -1  # -1: all devices not used by fsdp
  c.mesh.fsdp = 1
  c.mesh.min_fsdp_size = 2**18
  c.mesh.distributed = "auto"  # auto | on | off (jax.distributed.initialize)

  c.logging = ml_collections.ConfigDict()
  c.logging.tensorboard = True
  c.logging.peak_tflops = 0.0  # device peak for MFU; 0 = look up the device kind
  # Weights & Biases (pip install -e ".[wandb]"): every metrics.jsonl record under the same names, the config, and
  # done.json in the run's summary. In a study, the study's top-level logging.wandb* fields apply to every stage.
  c.logging.wandb = False
  c.logging.wandb_project = "jaxalign"
  c.logging.wandb_entity = ""  # "" = your default entity
  c.logging.wandb_name = ""  # run name; "" = the workdir's name (a study's stage: its stage name)
  c.logging.wandb_group = ""  # "" = none (a study's stages: the study's workdir name)
  c.logging.wandb_tags = ()
  c.logging.wandb_mode = ""  # "" = W&B's own setting (WANDB_MODE); online | offline (no network) | disabled

  c.export = ml_collections.ConfigDict()
  c.export.enabled = True  # write <workdir>/model in Hugging Face format at the end
  c.export.dtype = ""  # "" keeps float32
  # A Hub repo id ("user/name"): push the exported folder with a generated model card at the end of the stage
  # (token from HF_TOKEN or `hf auth login`). In a study, set it per stage: stage_configs.<name>.export.push_to_hub.
  c.export.push_to_hub = ""
  c.export.hub_private = False  # create the repo private

  # JAX's persistent compilation cache: "auto" = <data cache>/xla on GPU and TPU (later stages of the same shapes,
  # reruns and resumes load their programs instead of compiling; XLA:CPU gains nothing from it), a folder, or "" (off).
  c.compilation_cache = "auto"

  # Print the memory the stage's train step needs per device (XLA's analysis of the step compiled for the largest
  # batch; the model built from its config.json only, no weights or data loaded) and stop: jaxalign/dry_run.py.
  c.dry_run = False
  c.dry_run_memory = ""  # with dry_run: a per-device budget ("80GB", "79GiB"); also print the largest batch that fits

  c.stages = ()  # a study: names of sub-configs in `stage_configs`, run in order
  c.stage_configs = ml_collections.ConfigDict()
  return c
