"""OLMo 2 and 3, Phi-3, SmolLM3 and Granite compute transformers' models (random weights, fp32, left and right
padding, rows longer than every sliding window); cached decoding equals the full forward; greedy decoding equals
transformers' `generate` (OLMo 2); exports load back bit-exact (Phi-3's fused projections fused again); reward models
export as `<Family>ForSequenceClassification`; presets have the real sizes (the published config.json files, written
here as fixtures, give transformers' parameter counts); LoRA wraps q and v; FLOPs count every matmul weight."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import family_parity as fp
from chat_data import OLMO2_CHAT_TEMPLATE, chat_stage, conversational_records, tiny_olmo2_chat_folder, write_jsonl
from helpers import losses_by_step
from jaxalign import flops, trainer
from jaxalign.models import hub, layers, lora, registry, reward
from jaxalign.tokenizer import load_tokenizer

torch, transformers = fp.torch, fp.transformers

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=None)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
        "attention_factor": 1.2}
CONFIGS = {
    # Norms after attention and MLP, q/k RMSNorm over the whole projection (GQA: k's is narrower).
    "olmo2_post_norm_qk_norm": ("olmo2", dict(SMALL, rope_parameters={"rope_type": "default", "rope_theta": 1000.0})),
    # Three sliding layers (window 4 < the 11-token rows) then a full one, each kind with its own rotary table.
    "olmo3_sliding_and_full": ("olmo3", dict(
        SMALL, num_hidden_layers=4, sliding_window=4,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}})),
    # YaRN on the full layers only, as Olmo 3's long-context checkpoints.
    "olmo3_yarn_full_layers": ("olmo3", dict(
        SMALL, num_hidden_layers=2, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
                         "full_attention": {**YARN, "rope_theta": 1000.0}})),
    # Fused qkv_proj and gate_up_proj, half the head rotated (Phi-4-mini's twist), a 4-slot window.
    "phi3_fused_partial_rotary_window": ("phi3", dict(
        SMALL, sliding_window=4,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0, "partial_rotary_factor": 0.5})),
    # Every fourth layer without rotary embedding, tied head.
    "smollm3_no_rope_every_4th": ("smollm3", dict(SMALL, num_hidden_layers=4, tie_word_embeddings=True,
                                                  rope_parameters={"rope_type": "default", "rope_theta": 1000.0})),
    # Every second layer without rotary embedding, those layers sliding-window (use_sliding_window).
    "smollm3_sliding_no_rope_layers": ("smollm3", dict(
        SMALL, num_hidden_layers=4, no_rope_layer_interval=2, use_sliding_window=True, sliding_window=4,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1000.0})),
    # The four multipliers at Granite 3's values but the attention scale (not 1/sqrt(head_dim) = 0.25).
    "granite_multipliers": ("granite", dict(
        SMALL, tie_word_embeddings=True, embedding_multiplier=12.0, attention_multiplier=0.1,
        residual_multiplier=0.22, logits_scaling=8.0, rope_parameters={"rope_type": "default", "rope_theta": 1000.0})),
}
HF_CLASS_PREFIX = {"olmo2": "Olmo2", "olmo3": "Olmo3", "phi3": "Phi3", "smollm3": "SmolLM3", "granite": "Granite"}


def pair(name, tmp_path, seed=0):
  return fp.torch_and_flax(*CONFIGS[name], tmp_path / "in", seed=seed)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers_left_and_right_padding(name, tmp_path):
  torch_model, model = pair(name, tmp_path)
  assert model.config.model_type == CONFIGS[name][0]
  for side in ("right", "left"):
    fp.assert_logits_match(torch_model, model, side)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_decoding_equals_full_forward(name, tmp_path):
  _, model = pair(name, tmp_path, seed=1)
  fp.assert_cached_decoding_matches(model)


def test_sliding_layers_cache_only_their_window():
  """OLMo 3's sliding layers keep a rolling buffer of their 4 slots; its full layer keeps all 11."""
  config = registry.config_from_hf({"model_type": "olmo3", **CONFIGS["olmo3_sliding_and_full"][1], "vocab_size": 99})
  cache = registry.abstract_causal_lm(config).init_cache(2, 11)
  assert [layer["k"].shape[1] for layer in cache["layers"]] == [4, 4, 4, 11]


def test_olmo2_greedy_generation_equals_transformers_generate(tmp_path):
  torch_model, model = pair("olmo2_post_norm_qk_norm", tmp_path, seed=2)
  fp.assert_greedy_matches_generate(torch_model, model)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_export_loads_in_transformers_bit_exact_with_equal_logits(name, tmp_path):
  torch_model, model = pair(name, tmp_path, seed=3)
  config = fp.assert_export_is_bit_exact(torch_model, model, tmp_path / "out")
  assert config["architectures"] == [f"{HF_CLASS_PREFIX[config['model_type']]}ForCausalLM"]
  assert hub.from_pretrained(str(tmp_path / "out")).config == model.config
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  fp.assert_logits_match(reloaded, model, "left")


@fp.needs_8
@pytest.mark.parametrize("name", ["olmo3_sliding_and_full", "phi3_fused_partial_rotary_window"])
def test_sharded_forward_and_grad_equal_single_device(name, tmp_path):
  _, model = pair(name, tmp_path)
  fp.assert_sharded_matches_single_device(model, fp.VOCAB)


def test_phi3_keeps_separate_projections_inside_and_fuses_them_on_export(tmp_path):
  torch_model, model = pair("phi3_fused_partial_rotary_window", tmp_path)
  attention, mlp = model.layers[0].self_attn, model.layers[0].mlp
  assert attention.q_proj.kernel.shape == (64, 64) and attention.k_proj.kernel.shape == (64, 32)
  assert mlp.gate_proj.kernel.shape == mlp.up_proj.kernel.shape == (64, 96)
  fused = torch_model.model.layers[0].self_attn.qkv_proj.weight.detach().numpy()
  np.testing.assert_array_equal(np.asarray(attention.k_proj.kernel[...]).T, fused[64:96])
  gate_up = torch_model.model.layers[0].mlp.gate_up_proj.weight.detach().numpy()
  np.testing.assert_array_equal(np.asarray(mlp.up_proj.kernel[...]).T, gate_up[96:])


@pytest.mark.parametrize("scaling", [{"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
                                     {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}])
def test_phi3_longrope_is_refused_with_a_clear_error(scaling):
  hf = {"model_type": "phi3", **SMALL, "rope_scaling": scaling, "original_max_position_embeddings": 32}
  with pytest.raises(ValueError, match="phi3.*longrope.*not supported"):
    registry.config_from_hf(hf)


def test_granite_scales_embeddings_residuals_attention_and_logits(tmp_path):
  """Each multiplier changes the function (so parity above checks them all)."""
  _, model = pair("granite_multipliers", tmp_path)
  ids, mask = (jnp.asarray(a) for a in fp.padded_batch("right"))
  base = np.asarray(fp.forward(model, ids, mask))
  for field, value in (("embedding_multiplier", 1.0), ("attention_multiplier", 0.25),
                       ("residual_multiplier", 1.0), ("logits_scaling", 1.0)):
    changed = nnx.merge(nnx.split(registry.build_causal_lm(model.config.replace(**{field: value}),
                                                           rngs=nnx.Rngs(0)))[0], nnx.state(model))
    assert np.abs(np.asarray(fp.forward(changed, ids, mask)) - base).max() > 1e-5, field


def test_smollm3_layers_without_rope_ignore_positions(tmp_path):
  """A NoPE layer sees positions only through the causal mask: shifting every position changes nothing there."""
  _, model = pair("smollm3_no_rope_every_4th", tmp_path)
  assert model.layer_kinds() == ("full_attention",) * 3 + ("full_attention_no_rope",)
  assert model.attention_kinds()["full_attention_no_rope"].inv_freq is None
  ids = jnp.asarray(fp.padded_batch("right")[0][:1])
  nope = model.config.replace(no_rope_layers=(0, 0, 0, 0))
  nope_model = nnx.merge(nnx.split(registry.build_causal_lm(nope, rngs=nnx.Rngs(0)))[0], nnx.state(model))
  positions = jnp.arange(ids.shape[1])[None]
  np.testing.assert_allclose(fp.forward(nope_model, ids, positions=positions + 7),
                             fp.forward(nope_model, ids, positions=positions), atol=1e-5)


@pytest.mark.parametrize("name", ["olmo2_post_norm_qk_norm", "olmo3_sliding_and_full",
                                  "phi3_fused_partial_rotary_window", "smollm3_sliding_no_rope_layers",
                                  "granite_multipliers"])
def test_reward_model_exports_and_scores_the_same(name, tmp_path):
  """transformers' `<Family>ForSequenceClassification` scores our export as we do; Granite has no such class in
  transformers, so its export is checked by reading it back."""
  torch_model, _ = pair(name, tmp_path, seed=4)
  model = reward.from_pretrained(str(tmp_path / "in"), heads=("harmless", "helpful"), seed=1)
  assert model.backbone.lm_head is None
  pad = 1
  reward.save_pretrained(model, str(tmp_path / "rm"), pad_token_id=pad)
  ids, mask = fp.padded_batch("right", pad_id=pad)
  ids[ids == pad] = 2
  ids[mask == 0] = pad
  got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  model_type = CONFIGS[name][0]
  if model_type != "granite":
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm")).eval()
    assert type(theirs).__name__ == f"{HF_CLASS_PREFIX[model_type]}ForSequenceClassification"
    with torch.no_grad():
      expected = theirs(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
  again = reward.from_pretrained(str(tmp_path / "rm"))
  np.testing.assert_array_equal(np.asarray(again(jnp.asarray(ids), jnp.asarray(mask))), got)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_lora_wraps_q_and_v_and_its_merged_export_loads_in_transformers(name, tmp_path):
  torch_model, model = pair(name, tmp_path, seed=5)
  assert registry.family_of(model.config).default_lora_targets == ("q_proj", "v_proj")
  adapted = lora.apply_lora(model)
  assert {n for _, n, _ in lora._lora_modules(adapted)} == {"q_proj", "v_proj"}
  graphdef, lora_state, rest = nnx.split(adapted, nnx.LoRAParam, ...)
  adapted = nnx.merge(graphdef, jax_normal_like(lora_state), rest)
  ids, mask = (jnp.asarray(a) for a in fp.padded_batch("left"))
  expected = np.asarray(fp.forward(adapted, ids, mask))
  hub.save_pretrained(lora.merge_lora(adapted), str(tmp_path / "merged"))
  theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
  got = fp.torch_logits(theirs, np.asarray(ids), np.asarray(mask))
  assert np.abs(got - expected)[np.asarray(mask).astype(bool)].max() <= 1e-4


def jax_normal_like(tree):
  return jax.tree.map(lambda x: 0.1 * jax.random.normal(jax.random.key(1), x.shape, x.dtype), tree)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_flops_count_every_matmul_weight_of_transformers_model(name):
  """The matmul weights FLOPs count are transformers' Linear weights but the LM head (fused or split alike)."""
  model_type, arch = CONFIGS[name]
  torch_model = fp.make_torch(model_type, **arch)
  linear = sum(m.weight.numel() for n, m in torch_model.named_modules()
               if isinstance(m, torch.nn.Linear) and n != "lm_head")
  config = registry.config_from_hf(torch_model.config.to_dict())
  assert flops.matmul_weights(config) == linear


def test_flops_count_sliding_layers_over_their_window_only():
  config = registry.config_from_hf({"model_type": "olmo3", **CONFIGS["olmo3_sliding_and_full"][1], "vocab_size": 99})
  assert flops.layer_windows(config) == (4, 4, 4, None)
  width = config.num_attention_heads * config.head_dim
  assert flops.body_flops_per_token(config, 10) == 2.0 * flops.matmul_weights(config) + 4 * (3 * 4 + 10) * width


# ------------------------------------------------------------------ the real architectures (config.json fixtures)

# The published config.json files (the fields that define the architecture, as on the Hub).
REAL_CONFIGS = {
    "olmo-2-0425-1b": {
        "architectures": ["Olmo2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "eos_token_id": 100257, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
        "intermediate_size": 8192, "max_position_embeddings": 4096, "model_type": "olmo2", "num_attention_heads": 16,
        "num_hidden_layers": 16, "num_key_value_heads": 16, "pad_token_id": 100277, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 500000, "tie_word_embeddings": False, "torch_dtype": "float32",
        "use_cache": True, "vocab_size": 100352},
    "olmo-3-1025-7b": {
        "architectures": ["Olmo3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "eos_token_id": 100257, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
        "intermediate_size": 11008,
        "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"] * 8,
        "max_position_embeddings": 65536, "model_type": "olmo3", "num_attention_heads": 32, "num_hidden_layers": 32,
        "num_key_value_heads": 32, "pad_token_id": 100277, "rms_norm_eps": 1e-06,
        "rope_scaling": {"attention_factor": 1.2079441541679836, "beta_fast": 32, "beta_slow": 1, "factor": 8.0,
                         "original_max_position_embeddings": 8192, "rope_type": "yarn"},
        "rope_theta": 500000, "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "use_cache": True, "vocab_size": 100278},
    "phi-3-mini-4k-instruct": {
        "architectures": ["Phi3ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "embd_pdrop": 0.0,
        "eos_token_id": 32000, "hidden_act": "silu", "hidden_size": 3072, "initializer_range": 0.02,
        "intermediate_size": 8192, "max_position_embeddings": 4096, "model_type": "phi3", "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 32, "original_max_position_embeddings": 4096,
        "pad_token_id": 32000, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0,
        "sliding_window": 2047, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 32064},
    "smollm3-3b": {
        "architectures": ["SmolLM3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": None, "eos_token_id": 128012, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 11008, "layer_types": ["full_attention"] * 36,
        "max_position_embeddings": 65536, "max_window_layers": 28, "mlp_bias": False, "model_type": "smollm3",
        "no_rope_layer_interval": 4, "no_rope_layers": [1, 1, 1, 0] * 9, "num_attention_heads": 16,
        "num_hidden_layers": 36, "num_key_value_heads": 4, "pad_token_id": 128004, "pretraining_tp": 2,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 5000000.0, "sliding_window": None,
        "torch_dtype": "bfloat16", "use_cache": False, "use_sliding_window": False, "vocab_size": 128256},
    "granite-3.1-2b-instruct": {
        "architectures": ["GraniteForCausalLM"], "attention_bias": False, "attention_dropout": 0.1,
        "attention_multiplier": 0.015625, "bos_token_id": 0, "embedding_multiplier": 12.0, "eos_token_id": 0,
        "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
        "logits_scaling": 8.0, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "granite",
        "num_attention_heads": 32, "num_hidden_layers": 40, "num_key_value_heads": 8, "pad_token_id": 0,
        "residual_multiplier": 0.22, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 5000000.0,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 49155},
}
# The published sizes (a tied head counted once).
PARAMETER_COUNTS = {
    "olmo-2-0425-1b": 1_484_916_736, "olmo-3-1025-7b": 7_298_011_136, "phi-3-mini-4k-instruct": 3_821_079_552,
    "smollm3-3b": 3_075_098_624, "granite-3.1-2b-instruct": 2_533_531_648,
}
SPECIAL_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")


@pytest.fixture(params=sorted(REAL_CONFIGS))
def real_folder(request, tmp_path):
  """A folder holding only the published config.json of a real model."""
  (tmp_path / "config.json").write_text(json.dumps(REAL_CONFIGS[request.param]))
  return request.param, tmp_path


def test_presets_are_the_published_configs(real_folder):
  name, folder = real_folder
  from_file = registry.config_from_hf(hub.load_config(str(folder)))
  ours = registry.preset(name)
  # Presets carry the tokenizers' special tokens: a pad that is never EOS (the files of Phi-3 and Granite pad with it).
  assert from_file.replace(**{k: getattr(ours, k) for k in SPECIAL_IDS}) == ours
  assert ours.pad_token_id is None or ours.pad_token_id not in np.atleast_1d(ours.eos_token_id)


def test_presets_have_the_parameter_counts_transformers_builds_from_the_published_configs(real_folder):
  name, _ = real_folder
  hf = REAL_CONFIGS[name]
  with torch.device("meta"):
    theirs = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**hf))
  ours = registry.preset(name)
  assert type(theirs).__name__ == registry.family_of(ours).hf_causal_lm
  assert layers.count_params(registry.abstract_causal_lm(ours)) == theirs.num_parameters() == PARAMETER_COUNTS[name]
  with torch.device("meta"):  # and our config.json builds the same model
    again = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**ours.to_hf_dict()))
  assert again.num_parameters() == PARAMETER_COUNTS[name]


def test_a_preset_of_fewer_layers_keeps_the_per_layer_patterns():
  assert registry.preset("smollm3-3b", num_hidden_layers=6).no_rope_layers == (1, 1, 1, 0, 1, 1)
  olmo3 = registry.preset("olmo-3-1025-7b", num_hidden_layers=4)
  assert olmo3.layer_types == ("sliding_attention",) * 3 + ("full_attention",)
  with pytest.raises(ValueError, match="no_rope_layers has 2 entries; expected one per layer"):
    registry.preset("smollm3-3b", num_hidden_layers=3, no_rope_layers=(1, 0))


# ------------------------------------------------------------------ training an OLMo 2 folder on its chat template


@pytest.mark.slow
def test_trainer_runs_sft_and_dpo_on_an_olmo2_folder_with_its_chat_template(tmp_path):
  folder = tiny_olmo2_chat_folder(str(tmp_path / "olmo2"))
  write_jsonl(str(tmp_path / "data" / "train.jsonl"), conversational_records(32))
  write_jsonl(str(tmp_path / "data" / "test.jsonl"), conversational_records(8))
  data, cache = str(tmp_path / "data"), str(tmp_path / "cache")
  sft = trainer.run(chat_stage("sft", folder, cache, data, **{"data.loss_on": "assistant", "data.eval_pairs": 0,
                                                               "training.max_steps": 5, "optimizer.lr": 3e-3}),
                    str(tmp_path / "sft"))
  losses = losses_by_step(str(tmp_path / "sft"))
  assert losses[5] < losses[1], losses
  dpo = trainer.run(chat_stage("dpo", sft, cache, data, **{"data.eval_pairs": 0, "optimizer.lr": 1e-3}),
                    str(tmp_path / "dpo"))
  assert losses_by_step(str(tmp_path / "dpo"))[1] == pytest.approx(math.log(2), abs=1e-5)

  exported = load_tokenizer(dpo)
  assert exported.chat_template == OLMO2_CHAT_TEMPLATE and exported.pad_token_id != exported.eos_token_id
  theirs = transformers.AutoModelForCausalLM.from_pretrained(dpo).eval()
  assert type(theirs).__name__ == "Olmo2ForCausalLM"
  ids = np.array([[5, 17, 40, 99, 6, 300]])
  with torch.no_grad():
    expected = theirs(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(hub.from_pretrained(dpo)(ids)), expected, atol=1e-4)

