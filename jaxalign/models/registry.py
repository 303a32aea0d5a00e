"""Model families by Hugging Face `model_type`: the one place that names them.

A `Family` says which config class reads a transformers `config.json`, which Flax NNX module computes the causal LM
(every one the template of layers.CausalLM: `hidden_states`, `logits`, `init_cache`), how its parameters are named in
transformers' checkpoints (`param_map`), its presets of real sizes, the projections LoRA may wrap (and wraps by
default), and the transformers classes its exports load in (`AutoModelForCausalLM`, and reward models in
`<Family>ForSequenceClassification`). `hub`, `reward`, `lora`, `flops`, `config_lib`, `judges` and the trainer
dispatch through here; adding a family is its model file plus one entry below.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from flax import nnx

from jaxalign.models import gemma, gpt2, gpt_neox, llama, olmo, opt


@dataclasses.dataclass(frozen=True)
class Family:
  model_type: str
  config_class: type  # from_hf_dict(hf, **compute), to_hf_dict(), replace(**changes)
  causal_lm: type  # causal_lm(config, rngs=..., lm_head=True)
  hf_causal_lm: str  # transformers class of a causal-LM export
  hf_sequence_classification: str  # transformers class of a reward-model export (scalar `score` head)
  # Where the decoder's tensors live in transformers' checkpoints (both the causal LM and the classifier): the
  # first prefix is written, any is read (e.g. facebook's original OPT uploads, openai's GPT-2 without "transformer.").
  prefixes: tuple[str, ...]
  presets: Mapping[str, Any]
  lora_targets: tuple[str, ...]  # projections (attribute names inside each block) LoRA can wrap
  default_lora_targets: tuple[str, ...]
  head_attributes: tuple[str, ...] = ()  # an untied LM head's attribute: named without the prefix
  renames: Mapping[str, str] = dataclasses.field(default_factory=dict)  # our attribute name -> transformers'
  kernels_in_out: bool = False  # GPT-2's Conv1D stores weights [in, out], as flax does (no transpose)
  # transformers' fused projection -> our projections stacked in it, in row order (Phi-3's qkv_proj = q, k, v): split
  # on import, concatenated again on export, so LoRA and sharding see the separate matrices.
  fused: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  # Width of the final hidden states (what an LM or reward head reads).
  hidden_width: Callable[[Any], int] = lambda config: config.hidden_size


_LLAMA_LIKE = dict(
    causal_lm=llama.LlamaForCausalLM, config_class=llama.LlamaConfig, prefixes=("model.",),
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    default_lora_targets=("q_proj", "v_proj"), head_attributes=("lm_head",),
)


# Where a Llama-family model type differs: OLMo's blocks (olmo.py); Phi-3's checkpoints fuse q, k, v and gate, up.
_LLAMA_VARIANTS = {
    "olmo2": dict(causal_lm=olmo.OlmoForCausalLM),
    "olmo3": dict(causal_lm=olmo.OlmoForCausalLM),
    "phi3": dict(fused={"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}),
}


def _llama_like(model_type: str, **changes) -> llama.LlamaConfig:
  return llama.LlamaConfig(model_type=model_type, **changes)


_SMALL_PRESETS = {
    # Real architectures (the configs of the Hub repos of the same names; special-token ids come from the tokenizer).
    "llama": {
        "smollm2-360m": _llama_like(
            "llama", vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
            num_attention_heads=15, num_key_value_heads=5, head_dim=64, max_position_embeddings=8192,
            rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
        "llama-3.2-1b": _llama_like(
            "llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
            num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
            rms_norm_eps=1e-5, rope_theta=500000.0, rope_type="llama3",
            rope_scaling=(("factor", 32.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                          ("original_max_position_embeddings", 8192)),
            tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001),
    },
    "qwen2": {
        "qwen2.5-0.5b": _llama_like(
            "qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
            rope_theta=1000000.0, tie_word_embeddings=True, qkv_bias=True, bos_token_id=None,
            eos_token_id=151643),
        "qwen2.5-1.5b": _llama_like(
            "qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
            num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=131072, rms_norm_eps=1e-6,
            rope_theta=1000000.0, tie_word_embeddings=True, qkv_bias=True, bos_token_id=None,
            eos_token_id=151643),
    },
    "qwen3": {
        "qwen3-0.6b": _llama_like(
            "qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
            num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
            rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, qk_norm="head", bos_token_id=None,
            eos_token_id=151645),
    },
    "olmo2": {
        "olmo-2-0425-1b": _llama_like(
            "olmo2", vocab_size=100352, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
            num_attention_heads=16, max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=500000.0,
            qk_norm="projection", pad_token_id=100277, bos_token_id=None, eos_token_id=100257),
    },
    "olmo3": {
        "olmo-3-1025-7b": _llama_like(
            "olmo3", vocab_size=100278, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
            num_attention_heads=32, max_position_embeddings=65536, rms_norm_eps=1e-6, rope_theta=500000.0,
            rope_type="yarn", rope_scaling=(("attention_factor", 1.2079441541679836), ("beta_fast", 32),
                                            ("beta_slow", 1), ("factor", 8.0),
                                            ("original_max_position_embeddings", 8192)),
            sliding_window=4096, sliding_rope_theta=500000.0,
            layer_types=("sliding_attention", "sliding_attention", "sliding_attention", "full_attention") * 8,
            qk_norm="projection", pad_token_id=100277, bos_token_id=None, eos_token_id=100257),
    },
    "phi3": {
        # Its config.json pads with EOS (32000); the tokenizer's <unk> (0) pads instead (tokenizer.ensure_pad_token).
        "phi-3-mini-4k-instruct": _llama_like(
            "phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
            num_attention_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
            sliding_window=2047, bos_token_id=1, eos_token_id=32000),
    },
    "smollm3": {
        "smollm3-3b": _llama_like(
            "smollm3", vocab_size=128256, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
            num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=65536, rms_norm_eps=1e-6,
            rope_theta=5000000.0, tie_word_embeddings=True, no_rope_layers=(1, 1, 1, 0) * 9,
            pad_token_id=128004, bos_token_id=None, eos_token_id=128012),
    },
    "granite": {
        # Its config.json pads with EOS (0); the tokenizer pads with "<fim_pad>" instead (tokenizer.ensure_pad_token).
        "granite-3.1-2b-instruct": _llama_like(
            "granite", vocab_size=49155, hidden_size=2048, intermediate_size=8192, num_hidden_layers=40,
            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
            rope_theta=5000000.0, tie_word_embeddings=True, attention_dropout=0.1, embedding_multiplier=12.0,
            attention_multiplier=0.015625, residual_multiplier=0.22, logits_scaling=8.0, bos_token_id=0,
            eos_token_id=0),
    },
    "mistral": {
        "mistral-7b": _llama_like(
            "mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5,
            rope_theta=10000.0, sliding_window=4096),
    },
    "gpt_neox": {
        name: gpt_neox.GPTNeoXConfig(vocab_size=50304, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=4 * hidden, bos_token_id=0,
                                     eos_token_id=0)
        for name, hidden, layers, heads in (("pythia-160m", 768, 12, 12), ("pythia-410m", 1024, 24, 16),
                                            ("pythia-1b", 2048, 16, 8), ("pythia-1.4b", 2048, 24, 16),
                                            ("pythia-2.8b", 2560, 32, 32))
    },
    "gemma3_text": {
        "gemma-3-270m": gemma.GemmaConfig(
            "gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
            num_attention_heads=4, num_key_value_heads=1, head_dim=256, max_position_embeddings=32768,
            sliding_window=512, eos_token_id=1),
        "gemma-3-1b": gemma.GemmaConfig(
            "gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
            num_attention_heads=4, num_key_value_heads=1, head_dim=256, max_position_embeddings=32768,
            sliding_window=512, eos_token_id=1),
    },
    "gemma2": {
        "gemma-2-2b": gemma.GemmaConfig(
            "gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
            num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
            rope_theta=10000.0, sliding_window=4096, final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0, eos_token_id=1),
    },
    "gpt2": {
        name: gpt2.GPT2Config(n_embd=width, n_layer=layers, n_head=heads)
        for name, width, layers, heads in (("gpt2", 768, 12, 12), ("gpt2-medium", 1024, 24, 16),
                                           ("gpt2-large", 1280, 36, 20), ("gpt2-xl", 1600, 48, 25))
    },
}

FAMILIES: dict[str, Family] = {
    "opt": Family(
        model_type="opt", config_class=opt.OPTConfig, causal_lm=opt.OPTForCausalLM, hf_causal_lm="OPTForCausalLM",
        hf_sequence_classification="OPTForSequenceClassification", prefixes=("model.decoder.", "decoder."),
        presets=opt.PRESETS, lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
        default_lora_targets=("q_proj", "v_proj"), hidden_width=lambda config: config.word_embed_proj_dim),
    **{t: Family(model_type=t, hf_causal_lm=f"{llama.ARCHITECTURES[t]}ForCausalLM",
                 # (transformers has no GraniteForSequenceClassification: a Granite reward model reads back here only)
                 hf_sequence_classification=f"{llama.ARCHITECTURES[t]}ForSequenceClassification",
                 presets=_SMALL_PRESETS[t], **{**_LLAMA_LIKE, **_LLAMA_VARIANTS.get(t, {})})
       for t in llama.MODEL_TYPES},
    **{t: Family(model_type=t, config_class=gemma.GemmaConfig, causal_lm=gemma.GemmaForCausalLM,
                 hf_causal_lm=gemma.ARCHITECTURES[t],
                 hf_sequence_classification=gemma.SEQUENCE_CLASSIFIERS[t],
                 prefixes=("model.",), presets=_SMALL_PRESETS[t], lora_targets=_LLAMA_LIKE["lora_targets"],
                 default_lora_targets=("q_proj", "v_proj"), head_attributes=("lm_head",))
       for t in gemma.MODEL_TYPES},
    "gpt_neox": Family(
        model_type="gpt_neox", config_class=gpt_neox.GPTNeoXConfig, causal_lm=gpt_neox.GPTNeoXForCausalLM,
        hf_causal_lm="GPTNeoXForCausalLM", hf_sequence_classification="GPTNeoXForSequenceClassification",
        prefixes=("gpt_neox.",), presets=_SMALL_PRESETS["gpt_neox"],
        lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
        default_lora_targets=("query_key_value",), head_attributes=("embed_out",)),
    "gpt2": Family(
        model_type="gpt2", config_class=gpt2.GPT2Config, causal_lm=gpt2.GPT2LMHeadModel,
        hf_causal_lm="GPT2LMHeadModel", hf_sequence_classification="GPT2ForSequenceClassification",
        prefixes=("transformer.", ""), presets=_SMALL_PRESETS["gpt2"], lora_targets=("c_attn", "c_proj", "c_fc"),
        default_lora_targets=("c_attn",), head_attributes=("lm_head",), renames={"layers": "h"},
        kernels_in_out=True),
}
ALL_LORA_TARGETS = tuple(sorted({t for family in FAMILIES.values() for t in family.lora_targets}))


def family(model_type: str) -> Family:
  if model_type not in FAMILIES:
    raise ValueError(f"model_type {model_type!r} is not supported; supported: {sorted(FAMILIES)}")
  return FAMILIES[model_type]


def family_of(config) -> Family:
  """The family of a config (each config class names its `model_type`)."""
  return family(config.model_type)


def config_from_hf(hf: dict[str, Any], **compute):
  """Our config for a transformers config.json dict (its `model_type` picks the family); `compute` (dtype, remat,
  attention_impl, dropout) wins over the file."""
  return family(hf.get("model_type")).config_class.from_hf_dict(hf, **compute)


def preset_names() -> list[str]:
  return sorted(name for f in FAMILIES.values() for name in f.presets)


def preset(name: str, **changes):
  """The architecture of a released model by preset name ("smollm2-360m", "qwen2.5-0.5b", "opt-350m"…; a Hub-style
  "org/" prefix is dropped), with field overrides."""
  key = name.rsplit("/", 1)[-1].lower()
  for f in FAMILIES.values():
    if key in f.presets:
      return f.presets[key].replace(**changes)
  raise ValueError(f"Unknown model preset {name!r}; known: {preset_names()}")


def build_causal_lm(config, *, rngs: nnx.Rngs, lm_head: bool = True) -> nnx.Module:
  return family_of(config).causal_lm(config, rngs=rngs, lm_head=lm_head)


def abstract_causal_lm(config, *, lm_head: bool = True) -> nnx.Module:
  """The causal LM with shapes and dtypes but no memory behind its parameters."""
  return nnx.eval_shape(lambda: build_causal_lm(config, rngs=nnx.Rngs(0), lm_head=lm_head))


# ---------------------------------------------------------------------------------------------- tensor names

_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def tensor_name(fam: Family, path: tuple, prefix: str) -> tuple[str, str]:
  """The transformers tensor name and layout transform ("copy" / "transpose") of one of our parameter paths
  (relative to the causal LM), e.g. ("layers", 3, "self_attn", "q_proj", "kernel") -> ("model.layers.3.self_attn.
  q_proj.weight", "transpose"). Our attribute names are transformers' (but for `renames`), so the rule is general."""
  *modules, leaf = path
  parts = [fam.renames.get(str(p), str(p)) for p in modules] + [_LEAF_NAMES[leaf]]
  transform = "transpose" if leaf == "kernel" and not fam.kernels_in_out else "copy"
  if modules and modules[0] in fam.head_attributes:
    return ".".join(parts), transform
  return prefix + ".".join(parts), transform


def param_map(model: nnx.Module, fam: Family, prefix: str | None = None, *, under: tuple = ()) -> dict:
  """{our parameter path: (transformers name, transform)} for every parameter of `model` (abstract or real) under
  `under` (e.g. ("backbone",) in a reward model), the decoder's names behind `prefix` (default: the family's
  first). A projection stacked in a fused tensor maps to its rows, "….qkv_proj.weight[64:96]" (see
  `hub.tensor_part`)."""
  prefix = fam.prefixes[0] if prefix is None else prefix
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  return {path: fused_tensor_name(fam, path[len(under):], prefix, flat, under) or tensor_name(
      fam, path[len(under):], prefix) for path in flat if path[:len(under)] == under}


def fused_tensor_name(fam: Family, path: tuple, prefix: str, flat: dict, under: tuple) -> tuple[str, str] | None:
  """The rows of a fused transformers tensor that hold the parameter at `path`, or None if it is not fused."""
  *modules, leaf = path
  for fused, members in fam.fused.items():
    if modules and modules[-1] in members:
      # Output widths: a kernel's last axis ([in, out]), a bias's only one.
      widths = [flat[under + (*modules[:-1], member, leaf)].shape[-1] for member in members]
      start = sum(widths[:members.index(modules[-1])])
      name, transform = tensor_name(fam, (*modules[:-1], fused, leaf), prefix)
      return f"{name}[{start}:{start + widths[members.index(modules[-1])]}]", transform
  return None
