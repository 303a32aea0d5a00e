"""gpt2.py computes transformers' GPT2LMHeadModel (Conv1D weights, learned positions, tied head; random weights,
fp32); cached decoding matches; exports load back bit-exact, and openai's unprefixed checkpoint names load."""

import pytest

import family_parity as fp
from jaxalign.models import gpt2, hub

torch = fp.torch
SMALL = dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
             bos_token_id=None, eos_token_id=None)
CONFIGS = {
    "gpt2": SMALL,
    "inverse_layer_scaling": dict(SMALL, scale_attn_by_inverse_layer_idx=True, n_inner=96,
                                  activation_function="gelu"),
}


def pair(name, tmp_path, seed=0):
  return fp.torch_and_flax("gpt2", CONFIGS[name], tmp_path / "in", seed=seed)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers_left_and_right_padding(name, tmp_path):
  torch_model, model = pair(name, tmp_path)
  for side in ("right", "left"):
    fp.assert_logits_match(torch_model, model, side)


def test_cached_decoding_equals_full_forward(tmp_path):
  _, model = pair("gpt2", tmp_path, seed=1)
  fp.assert_cached_decoding_matches(model)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_export_loads_in_transformers_bit_exact(name, tmp_path):
  torch_model, model = pair(name, tmp_path, seed=3)
  config = fp.assert_export_is_bit_exact(torch_model, model, tmp_path / "out")
  assert config["architectures"] == ["GPT2LMHeadModel"]
  assert hub.from_pretrained(str(tmp_path / "out")).config == model.config


def test_openai_checkpoint_names_without_prefix_load(tmp_path):
  """openai-community/gpt2's safetensors name tensors "h.0.attn.c_attn.weight" (no "transformer.") and carry the
  causal-mask buffers "h.N.attn.bias"."""
  from safetensors.torch import save_file

  torch_model = fp.make_torch("gpt2", seed=4, **SMALL)
  state = {k.removeprefix("transformer."): v.contiguous() for k, v in torch_model.state_dict().items()
           if k != "lm_head.weight"}
  state |= {f"h.{i}.attn.bias": torch.ones(1, 1, 64, 64) for i in range(2)}
  tmp_path.mkdir(exist_ok=True)
  save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  torch_model.config.to_json_file(str(tmp_path / "config.json"))
  model = hub.from_pretrained(str(tmp_path))
  assert isinstance(model, gpt2.GPT2LMHeadModel)
  fp.assert_logits_match(torch_model, model, "right")
