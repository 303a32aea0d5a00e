"""OLMo 2 and OLMo 3 (Groeneveld et al.; OLMo Team, 2024-2025): the RoPE decoder of llama.py with its norms moved.

Each block normalises the OUTPUT of attention and of the MLP before it joins the residual stream
(`post_attention_layernorm`, `post_feedforward_layernorm`; no norm on the block's input), and q and k are
RMS-normalised over the whole projection (all heads at once, `LlamaConfig.qk_norm = "projection"`). OLMo 3 adds
`layer_types`: three sliding-window layers then one full-attention layer, the full ones with their own RoPE (YaRN in
the long-context checkpoints). The config is `llama.LlamaConfig` (model_type "olmo2" / "olmo3").

Computes the same function as transformers' `Olmo2ForCausalLM` and `Olmo3ForCausalLM`
(tests/test_olmo_phi3_smollm3_granite.py).
"""

from __future__ import annotations

from flax import nnx

from jaxalign.models import layers, llama
from jaxalign.models.layers import dropout


class OlmoDecoderLayer(nnx.Module):
  """x + norm(attn(x)), then x + norm(mlp(x))."""

  def __init__(self, config: llama.LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.self_attn = llama.LlamaAttention(config, rngs=rngs)
    self.post_attention_layernorm = llama._rms_norm(config, config.hidden_size)
    self.mlp = llama.LlamaMLP(config, rngs=rngs)
    self.post_feedforward_layernorm = llama._rms_norm(config, config.hidden_size)

  def __call__(self, x, mask, rope, layer_cache=None, cache_index=None, dropout_key=None):
    keys = layers.split_key(dropout_key, 4)
    h, new_cache = self.self_attn(x, mask, rope, layer_cache, cache_index, keys[0])
    x = x + dropout(self.post_attention_layernorm(h), self.config.dropout, keys[1])
    x = x + dropout(self.post_feedforward_layernorm(self.mlp(x, keys[2])), self.config.dropout, keys[3])
    return x, new_cache


class OlmoForCausalLM(llama.LlamaForCausalLM):
  """The Llama decoder of OLMo's blocks."""

  decoder_layer = OlmoDecoderLayer
