"""Gemma 2 and Gemma 3 (gemma.py) compute transformers' Gemma2ForCausalLM / Gemma3ForCausalLM (random weights,
fp32) over rows longer than the sliding window, left- and right-padded; cached decoding (a rolling buffer in the
sliding layers) equals the full forward past the window; greedy decoding gives transformers' `generate` tokens;
exports load back bit-exact; the presets are the real architectures (their config.json files, written here) with
transformers' exact parameter counts; a reward model exports as <Family>ForSequenceClassification."""

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import family_parity as fp
from chat_data import conversational_records, write_chat_tokenizer
from jaxalign import flops
from jaxalign.data import formats, tokenize
from jaxalign.models import gemma, hub, layers, lora, registry, reward
from jaxalign.tokenizer import end_of_turn, load_tokenizer

torch, transformers = fp.torch, fp.transformers

SLIDING, FULL = gemma.SLIDING, gemma.FULL
# Rows of 11 tokens against a window of 4 slots; heads of 16 with query_pre_attn_scalar != 16.
SMALL = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=64, sliding_window=4, query_pre_attn_scalar=20, bos_token_id=None,
             eos_token_id=None, pad_token_id=None)
CONFIGS = {
    # Alternating sliding / global layers, attention soft-cap tight enough to bite, final logit soft-cap.
    "gemma2_softcap": ("gemma2", dict(SMALL, num_hidden_layers=4, attn_logit_softcapping=2.0,
                                      final_logit_softcapping=3.0, rope_parameters={"rope_theta": 100.0})),
    # q/k norms, a local rotary base of its own and linear scaling on the global layers only, 2 local : 1 global.
    "gemma3_local_global": ("gemma3_text", dict(
        SMALL, num_hidden_layers=4, layer_types=[SLIDING, SLIDING, FULL, SLIDING],
        rope_parameters={FULL: {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
                         SLIDING: {"rope_type": "default", "rope_theta": 10.0}})),
    # An untied head and attention biases (off in the released models, allowed by the config).
    "gemma3_untied_bias": ("gemma3_text", dict(SMALL, num_hidden_layers=3, tie_word_embeddings=False,
                                               attention_bias=True, layer_types=[SLIDING, FULL, SLIDING])),
}


def pair(name, tmp_path, seed=0):
  return fp.torch_and_flax(*CONFIGS[name], tmp_path / "in", seed=seed)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers_left_and_right_padding(name, tmp_path):
  torch_model, model = pair(name, tmp_path)
  assert model.config.model_type == CONFIGS[name][0] and max(fp.LENGTHS) > model.config.sliding_window
  for side in ("right", "left"):
    fp.assert_logits_match(torch_model, model, side)


def test_soft_caps_and_local_rotary_base_change_the_function(tmp_path):
  """The features under test bite: without them the logits move away from transformers'."""
  torch_model, model = pair("gemma2_softcap", tmp_path)
  ids, mask = fp.padded_batch("right")
  expected = fp.torch_logits(torch_model, ids, mask)
  assert np.abs(expected).max() < 3.0  # the final cap bounds the logits
  for change in (dict(attn_logit_softcapping=None), dict(final_logit_softcapping=None), dict(sliding_window=64)):
    graphdef, state = nnx.split(model)
    changed = nnx.merge(nnx.split(gemma.GemmaForCausalLM(model.config.replace(**change), rngs=nnx.Rngs(0)))[0],
                        state)
    got = np.asarray(fp.forward(changed, jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(got - expected)[mask.astype(bool)].max() > 1e-3, change


@pytest.mark.parametrize("name", ["gemma2_softcap", "gemma3_local_global"])
def test_cached_decoding_equals_full_forward_past_the_window(name, tmp_path):
  _, model = pair(name, tmp_path, seed=1)
  fp.assert_cached_decoding_matches(model)


def test_greedy_generation_equals_transformers_generate(tmp_path):
  torch_model, model = pair("gemma3_local_global", tmp_path, seed=2)
  fp.assert_greedy_matches_generate(torch_model, model)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_export_loads_in_transformers_bit_exact(name, tmp_path):
  torch_model, model = pair(name, tmp_path, seed=3)
  config = fp.assert_export_is_bit_exact(torch_model, model, tmp_path / "out")
  assert config["architectures"] == [gemma.ARCHITECTURES[config["model_type"]]]
  assert hub.from_pretrained(str(tmp_path / "out")).config == model.config
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"),
                                                                attn_implementation="eager").eval()
  ids, mask = fp.padded_batch("left")
  real = mask.astype(bool)  # (padding queries see nothing real: their values are noise)
  np.testing.assert_array_equal(fp.torch_logits(reloaded, ids, mask)[real],
                                fp.torch_logits(torch_model, ids, mask)[real])


@fp.needs_8
@pytest.mark.parametrize("name", ["gemma2_softcap", "gemma3_local_global"])
def test_sharded_forward_and_grad_equal_single_device(name, tmp_path):
  _, model = pair(name, tmp_path)
  fp.assert_sharded_matches_single_device(model, fp.VOCAB)  # rows of 12 tokens past the window of 4


def test_transformers_4_config_form_reads_as_transformers_5_form():
  v5 = {"model_type": "gemma3_text", **CONFIGS["gemma3_local_global"][1]}
  v4 = {**v5, "rope_theta": 1000.0, "rope_local_base_freq": 10.0, "rope_scaling": {"type": "linear", "factor": 2.0}}
  del v4["rope_parameters"], v4["layer_types"]
  v4.update(num_hidden_layers=6, sliding_window_pattern=3)
  config = gemma.GemmaConfig.from_hf_dict(v4)
  assert config == gemma.GemmaConfig.from_hf_dict({**v5, "num_hidden_layers": 6, "layer_types": [SLIDING, SLIDING,
                                                                                                  FULL] * 2})
  assert (config.rope_theta, config.rope_local_base_freq, config.rope_type) == (1000.0, 10.0, "linear")
  assert gemma.GemmaConfig.from_hf_dict(config.to_hf_dict()) == config
  with pytest.raises(ValueError, match="gemma3_text"):
    gemma.GemmaConfig.from_hf_dict({"model_type": "gemma3"})


# --------------------------------------------------------------------------- the released architectures

# The config.json files of the Hub repos (google/gemma-3-270m, google/gemma-3-1b-pt, google/gemma-2-2b), as
# published (transformers 4 form), and transformers' parameter counts (the tied head counted once).
REAL_CONFIGS = {
    "gemma-3-270m": (268_098_176, {
        "architectures": ["Gemma3ForCausalLM"], "_sliding_window_pattern": 6, "attention_bias": False,
        "attention_dropout": 0.0, "attn_logit_softcapping": None, "bos_token_id": 2, "eos_token_id": 1,
        "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 640, "initializer_range": 0.02, "intermediate_size": 2048,
        "layer_types": ([SLIDING] * 5 + [FULL]) * 3, "max_position_embeddings": 32768, "model_type": "gemma3_text",
        "num_attention_heads": 4, "num_hidden_layers": 18, "num_key_value_heads": 1, "pad_token_id": 0,
        "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0, "rope_scaling": None,
        "rope_theta": 1000000.0, "sliding_window": 512, "torch_dtype": "bfloat16",
        "use_bidirectional_attention": False, "use_cache": True, "vocab_size": 262144}),
    "gemma-3-1b": (999_885_952, {
        "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
        "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 1152, "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 32768,
        "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
        "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
        "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
        "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 262144}),
    "gemma-2-2b": (2_614_341_888, {
        "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
        "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "initializer_range": 0.02,
        "intermediate_size": 9216, "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 8,
        "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0, "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096, "torch_dtype": "float32",
        "use_cache": True, "vocab_size": 256000}),
}


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_presets_are_the_real_configs_with_transformers_parameter_counts(name, tmp_path):
  count, hf = REAL_CONFIGS[name]
  (tmp_path / "config.json").write_text(json.dumps(hf))
  from_file = registry.config_from_hf(hub.load_config(str(tmp_path)))
  assert from_file == registry.preset(name)
  assert layers.count_params(registry.abstract_causal_lm(from_file)) == count
  with torch.device("meta"):  # no memory behind the weights
    theirs = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(str(tmp_path)))
  assert type(theirs).__name__ == registry.family_of(from_file).hf_causal_lm
  assert theirs.num_parameters() == count
  with torch.device("meta"):  # our export describes the same model
    again = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**from_file.to_hf_dict()))
  assert again.num_parameters() == count and list(again.config.layer_types) == list(theirs.config.layer_types)
  assert from_file.pad_token_id not in np.atleast_1d(from_file.eos_token_id)  # pad is never EOS


def test_flops_lora_targets_and_layer_kinds():
  config = registry.preset("gemma-3-1b")
  per_layer = 1152 * 1024 + 2 * 1152 * 256 + 1024 * 1152 + 3 * 1152 * 6912  # q, k and v, o, GeGLU
  assert flops.matmul_weights(config) == 26 * per_layer
  assert flops.head_flops_per_token(config) == 2.0 * 262144 * 1152
  assert config.layer_types.count(FULL) == 4 and config.layer_types[5] == FULL  # 5 local : 1 global
  model = lora.apply_lora(gemma.GemmaForCausalLM(gemma.GemmaConfig(**_tiny()), rngs=nnx.Rngs(0)))
  assert {name for _, name, _ in lora._lora_modules(model)} == {"q_proj", "v_proj"}


def _tiny():
  """A Gemma 3 of three layers (sliding, global, sliding) as SMALL describes."""
  fields = {f.name for f in dataclasses.fields(gemma.GemmaConfig)}
  return {k: v for k, v in SMALL.items() if k in fields} | dict(vocab_size=fp.VOCAB, num_hidden_layers=3,
                                                                 layer_types=(SLIDING, FULL, SLIDING))


def test_reward_export_scores_the_same_in_transformers(tmp_path):
  torch_model, _ = pair("gemma3_local_global", tmp_path, seed=4)
  model = reward.from_pretrained(str(tmp_path / "in"), heads=("harmless", "helpful"), seed=1)
  pad = 1
  reward.save_pretrained(model, str(tmp_path / "rm"), pad_token_id=pad)
  theirs = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm")).eval()
  assert type(theirs).__name__ == "Gemma3TextForSequenceClassification"
  ids, mask = fp.padded_batch("right", pad_id=pad)
  ids[ids == pad] = 2  # only padding is the pad token
  ids[mask == 0] = pad
  with torch.no_grad():
    expected = theirs(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))), expected, atol=1e-4)


def test_sliding_layers_cache_only_their_window():
  model = gemma.GemmaForCausalLM(gemma.GemmaConfig(**_tiny()), rngs=nnx.Rngs(0))  # sliding, global, sliding
  cache = model.init_cache(2, 11)
  assert [layer["k"].shape[1] for layer in cache["layers"]] == [4, 11, 4]
  assert [layer["k"].shape[1] for layer in model.init_cache(2, 3)["layers"]] == [3, 3, 3]


# ------------------------------------------------------------------------------------------- chat template

GEMMA_TEMPLATE = os.path.join(os.path.dirname(__file__), "..", "configs", "chat_templates", "gemma.jinja")


@pytest.fixture()
def gemma_tokenizer(tmp_path):
  tokenizer = load_tokenizer(write_chat_tokenizer(str(tmp_path)))
  tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
  tokenize.set_chat_template(tokenizer, GEMMA_TEMPLATE)
  return tokenizer


def test_chat_template_folds_a_system_turn_into_the_first_user_turn(gemma_tokenizer):
  bos = gemma_tokenizer.bos_token
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi. "},
              {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye."}]
  text = gemma_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert text == (f"{bos}<start_of_turn>user\nBe brief.\n\nHi.<end_of_turn>\n<start_of_turn>model\nHello."
                  "<end_of_turn>\n<start_of_turn>user\nBye.<end_of_turn>\n<start_of_turn>model\n")
  assert end_of_turn(gemma_tokenizer) == "<end_of_turn>"  # generation stops there; responses end with it
  assert gemma_tokenizer.pad_token_id != gemma_tokenizer.eos_token_id
  convs = formats.conversations_from_records(conversational_records(6), "t", "conversational")[0]
  pairs, report = tokenize.render_pairs(convs, gemma_tokenizer)
  assert report.used == 6 and not report.skipped  # system turns and multi-turn prompts included
  late_system = messages + [{"role": "system", "content": "No."}]
  with pytest.raises(Exception, match="one leading system turn; got a system turn at 4"):
    gemma_tokenizer.apply_chat_template(late_system, tokenize=False)


def test_a_null_soft_cap_means_none_not_the_default():
  hf = {"model_type": "gemma2", "final_logit_softcapping": None, "num_hidden_layers": 2}
  config = gemma.GemmaConfig.from_hf_dict(hf)
  assert (config.final_logit_softcapping, config.attn_logit_softcapping) == (None, 50.0)  # left out: the default
  assert config.layer_types == (SLIDING, FULL)
  assert transformers.AutoConfig.for_model(**hf).final_logit_softcapping is None  # as transformers reads it


def test_flops_count_sliding_layers_over_their_window():
  config = registry.preset("gemma-3-1b")  # 22 sliding layers of window 512, 4 global
  width = 4 * 256
  assert flops.body_flops_per_token(config, 2048) - flops.body_flops_per_token(config, 512) == 4 * 4 * 1536 * width
  assert flops.layer_windows(config).count(None) == 4 and set(flops.layer_windows(config)) == {None, 512}


@pytest.mark.slow
def test_trainer_runs_sft_then_dpo_from_a_gemma_folder(cache_dir, tmp_path):
  """SFT lowers the loss and DPO starts at ln 2 on a Gemma 3 whose window (8) is shorter than the rows; the export
  loads in transformers with our logits."""
  from helpers import losses_by_step, tiny_config
  from jaxalign import trainer
  from jaxalign.data import pipeline

  config = gemma.GemmaConfig(**{**_tiny(), "vocab_size": pipeline.SYNTHETIC_VOCAB_SIZE, "sliding_window": 8,
                                "max_position_embeddings": 160})
  folder = str(tmp_path / "gemma")
  hub.save_pretrained(gemma.GemmaForCausalLM(config, rngs=nnx.Rngs(0)), folder)
  run = lambda init, task, **f: tiny_config(cache_dir, task, **{"init_from": init, "data.eval_pairs": 0,
                                                                  "training.max_steps": 2, **f})
  sft = trainer.run(run(folder, "sft", **{"training.max_steps": 5, "optimizer.lr": 3e-3}), str(tmp_path / "sft"))
  losses = losses_by_step(str(tmp_path / "sft"))
  assert losses[5] < losses[1]
  dpo = trainer.run(run(sft, "dpo"), str(tmp_path / "dpo"))
  assert losses_by_step(str(tmp_path / "dpo"))[1] == pytest.approx(np.log(2), abs=1e-6)
  theirs = transformers.AutoModelForCausalLM.from_pretrained(dpo, attn_implementation="eager").eval()
  assert type(theirs).__name__ == "Gemma3ForCausalLM"
  ids = np.array([[5, 17, 40, 99, 6, 300, 7, 8, 9, 10, 11, 12]])
  with torch.no_grad():
    expected = theirs(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(fp.forward(hub.from_pretrained(dpo), jnp.asarray(ids))), expected, atol=1e-4)
