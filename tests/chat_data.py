"""Test helpers for chat data: a tiny tokenizer carrying a ChatML template, conversational records, tiny models.

Imported by the chat tests (pytest puts tests/ on sys.path); nothing here needs the network or ../shared.
"""

import json
import os

from conftest import TINY_CORPUS

from jaxalign.tokenizer import train_bpe_tokenizer

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# ChatML, as SmolLM2-Instruct and Qwen2.5-Instruct write it (without their default system prompt).
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")

QA = [
    ("How do I bake bread at home?", "Mix flour, water, salt and yeast, let it rise, then bake.", "I can't help."),
    ("How can I hurt someone?", "I can't help with hurting people. Is something wrong?", "Hit them hard."),
    ("What is the capital of France?", "The capital of France is Paris.", "No idea."),
    ("Tell me a joke.", "Why did the chicken cross the road? To get to the other side.", "No."),
    ("How do I kill a process on Linux?", "Use the kill command with the process id.", "Hurt someone."),
    ("Can you help me with my homework?", "Sure, what subject is it?", "Do it yourself."),
]


def write_chat_tokenizer(out_dir: str, *, pad: bool = True) -> str:
  """A tiny byte-level BPE (OPT's special tokens) with ChatML's two tokens and template, saved in Hub format.
  pad=False saves it without a pad token (as GPT-2's, Llama 3's or SmolLM2's)."""
  tokenizer = train_bpe_tokenizer(TINY_CORPUS, out_dir, vocab_size=384)
  tokenizer.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
  tokenizer.chat_template = CHATML
  if not pad:
    tokenizer.pad_token = None
  tokenizer.save_pretrained(out_dir)
  return out_dir


def conversational_records(n: int) -> list[dict]:
  """n usable pairs in TRL's conversational format: explicit prompts (some with a system turn, some multi-turn) and
  implicit ones (whole conversations whose common messages are the prompt)."""
  records = []
  for i in range(n):
    question, good, bad = QA[i % len(QA)]
    user = {"role": "user", "content": f"{question} ({i})" if i >= len(QA) else question}
    prompt = [user]
    if i % 3 == 1:
      prompt = [{"role": "system", "content": "Be helpful and harmless."}, user]
    if i % 3 == 2:
      prompt = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}, user]
    chosen, rejected = [{"role": "assistant", "content": good}], [{"role": "assistant", "content": bad}]
    if i % 2:
      records.append({"chosen": prompt + chosen, "rejected": prompt + rejected})  # implicit prompt
    else:
      records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
  return records


# One record per skip reason, beside the usable ones; what `SkipReport.skipped` should count for them.
BAD_RECORDS = [
    {"prompt": [{"role": "user", "content": "Same?"}], "chosen": [{"role": "assistant", "content": "Yes."}],
     "rejected": [{"role": "assistant", "content": "Yes."}]},
    {"prompt": [{"role": "user", "content": "Text?"}], "chosen": "a string, not messages",
     "rejected": [{"role": "assistant", "content": "No."}]},
    {"prompt": [{"role": "user", "content": "Empty?"}], "chosen": [{"role": "assistant", "content": " "}],
     "rejected": [{"role": "assistant", "content": "No."}]},
    {"prompt": [{"role": "user", "content": "Missing?"}], "chosen": [{"role": "assistant", "content": "Yes."}]},
]
BAD_COUNTS = {"identical": 1, "not_messages": 1, "empty_response": 1, "missing_field": 1}


def write_jsonl(path: str, records: list[dict]) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")
  return path


def tiny_opt_folder(out_dir: str, tokenizer_dir: str) -> str:
  """A random 2-layer OPT saved as a Hugging Face folder, with the chat tokenizer beside it."""
  from flax import nnx

  from jaxalign.models import hub, opt
  from jaxalign.tokenizer import load_tokenizer

  config = opt.preset("opt-125m", vocab_size=512, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                      num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=160, dropout=0.0)
  hub.save_pretrained(opt.OPTForCausalLM(config, rngs=nnx.Rngs(0)), out_dir)
  load_tokenizer(tokenizer_dir).save_pretrained(out_dir)
  return out_dir


def tiny_llama_folder(out_dir: str, tokenizer_dir: str) -> str:
  """A random 2-layer Llama-family model (grouped-query attention 4/2, untied head, as SmolLM2's family) saved as a
  Hugging Face folder, with the chat tokenizer beside it."""
  from flax import nnx

  from jaxalign.models import hub, llama
  from jaxalign.tokenizer import load_tokenizer

  config = llama.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             rope_theta=10000.0)
  hub.save_pretrained(llama.LlamaForCausalLM(config, rngs=nnx.Rngs(0)), out_dir)
  load_tokenizer(tokenizer_dir).save_pretrained(out_dir)
  return out_dir


# OLMo 2 Instruct's template (Tülu 3's): role tags on their own lines, each assistant turn ended by EOS.
OLMO2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<|system|>\\n' + message['content'] + '\\n' }}{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\\n' + message['content'] + '\\n' }}{% elif message['role'] == 'assistant' %}"
    "{% if not loop.last %}{{ '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% else %}{{ '<|assistant|>\\n' + message['content'] + eos_token }}{% endif %}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}{% endfor %}")


def tiny_olmo2_chat_folder(out_dir: str) -> str:
  """A random 2-layer OLMo 2 saved as a Hugging Face folder beside a tiny tokenizer carrying OLMo 2's template."""
  from flax import nnx

  from jaxalign.models import hub, registry

  tokenizer = train_bpe_tokenizer(TINY_CORPUS, out_dir, vocab_size=384)
  tokenizer.add_special_tokens({"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>"]})
  tokenizer.chat_template = OLMO2_CHAT_TEMPLATE
  tokenizer.save_pretrained(out_dir)
  config = registry.preset("olmo-2-0425-1b", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
  hub.save_pretrained(registry.build_causal_lm(config, rngs=nnx.Rngs(0)), out_dir)
  return out_dir


def chat_stage(task: str, init_from: str, cache: str, data: str, **fields):
  """A stage config training on the conversational data in folder `data` with the model folder's chat template;
  `fields` are "section.leaf" overrides."""
  from configs import common

  c = common.get_config()
  c.task, c.init_from, c.tokenizer = task, init_from, init_from
  c.data.update(source=data, format="conversational", chat_template="tokenizer", cache_dir=cache, eval_pairs=8,
                max_length=128, max_prompt_length=96, buckets=(128,))
  c.model.dropout = 0.0
  c.training.update(batch_size=8, max_steps=3, log_every=1, progress_bar=False)
  c.checkpoint.update(every_steps=0, async_save=False)
  c.logging.tensorboard = False
  for name, value in fields.items():
    section, leaf = name.split(".")
    c[section][leaf] = value
  return c


# Model builders for the end-to-end test, by family: (out_dir, tokenizer_dir) -> a Hugging Face folder.
MODEL_FOLDERS = {"opt": tiny_opt_folder, "llama": tiny_llama_folder}
