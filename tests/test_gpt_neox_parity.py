"""gpt_neox.py computes transformers' GPTNeoXForCausalLM (Pythia; random weights, fp32) with partial rotary and
parallel or serial residual; cached decoding and greedy generation match; exports load back bit-exact."""

import pytest

import family_parity as fp
from jaxalign.models import gpt_neox, hub

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=None)
CONFIGS = {
    "parallel_residual": dict(SMALL, use_parallel_residual=True,
                              rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.25}),
    "serial_residual": dict(SMALL, use_parallel_residual=False,
                            rope_parameters={"rope_theta": 500.0, "partial_rotary_factor": 0.5}),
}


def pair(name, tmp_path, seed=0):
  return fp.torch_and_flax("gpt_neox", CONFIGS[name], tmp_path / "in", seed=seed)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers_left_and_right_padding(name, tmp_path):
  torch_model, model = pair(name, tmp_path)
  assert model.config.rotary_dim == int(16 * CONFIGS[name]["rope_parameters"]["partial_rotary_factor"])
  for side in ("right", "left"):
    fp.assert_logits_match(torch_model, model, side)


def test_cached_decoding_equals_full_forward(tmp_path):
  _, model = pair("parallel_residual", tmp_path, seed=1)
  fp.assert_cached_decoding_matches(model)


def test_greedy_generation_equals_transformers_generate(tmp_path):
  torch_model, model = pair("serial_residual", tmp_path, seed=2)
  fp.assert_greedy_matches_generate(torch_model, model)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_export_loads_in_transformers_bit_exact(name, tmp_path):
  torch_model, model = pair(name, tmp_path, seed=3)
  config = fp.assert_export_is_bit_exact(torch_model, model, tmp_path / "out")
  assert config["architectures"] == ["GPTNeoXForCausalLM"]
  assert hub.from_pretrained(str(tmp_path / "out")).config == model.config


def test_transformers_4_config_form():
  v4 = dict(SMALL, model_type="gpt_neox", rotary_pct=0.5, rotary_emb_base=500.0, use_parallel_residual=False)
  v5 = dict(SMALL, model_type="gpt_neox", use_parallel_residual=False,
            rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5})
  assert gpt_neox.GPTNeoXConfig.from_hf_dict(v4) == gpt_neox.GPTNeoXConfig.from_hf_dict(v5)
  config = gpt_neox.GPTNeoXConfig.from_hf_dict(v4)
  assert config.rotary_pct == 0.5 and config.rope_theta == 500.0
  assert gpt_neox.GPTNeoXConfig.from_hf_dict(config.to_hf_dict()) == config
