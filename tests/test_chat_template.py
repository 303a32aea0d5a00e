"""Chat templates: the end-of-turn token, a pad token that is never EOS, conversations rendered with the tokenizer's
own template at exact token boundaries, SFT loss on assistant turns only, and evaluation prompts."""

import os

import numpy as np
import pytest

from chat_data import CHATML, IM_END, IM_START, QA, conversational_records, write_chat_tokenizer
from jaxalign.data import formats, tokenize
from jaxalign.tokenizer import (NEW_PAD_TOKEN, OPT_EOS_ID, check_vocabulary, end_of_turn, ensure_pad_token,
                                load_tokenizer)

SHARED_GPT2 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "tokenizers", "gpt2")
# A template whose turns end with no special token: EOS has to end the responses.
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
  return write_chat_tokenizer(str(tmp_path_factory.mktemp("chat_tokenizer")))


@pytest.fixture()
def chat_tokenizer(chat_dir):
  return load_tokenizer(chat_dir)  # fresh per test: some tests change its template


def conversations(n=6):
  return formats.conversations_from_records(conversational_records(n), "t", "conversational")[0]


def test_end_of_turn_is_the_special_token_after_the_answer(chat_tokenizer):
  assert end_of_turn(chat_tokenizer) == IM_END
  chat_tokenizer.chat_template = CHATML.replace("'<|im_end|>'", "eos_token")
  assert end_of_turn(chat_tokenizer) == "</s>"
  chat_tokenizer.chat_template = PLAIN_TEMPLATE
  assert end_of_turn(chat_tokenizer) is None


def test_a_tokenizer_without_a_distinct_pad_token_gets_one_that_is_not_eos(tmp_path):
  tokenizer = load_tokenizer(write_chat_tokenizer(str(tmp_path / "a"), pad=False))
  assert tokenizer.pad_token == "<unk>" and tokenizer.pad_token_id != tokenizer.eos_token_id
  # pad == eos, no unk (Qwen2.5 base): an added token named like a pad, within the vocabulary.
  tokenizer.add_special_tokens({"additional_special_tokens": [IM_START, IM_END, "<|fim_pad|>"]})
  tokenizer.pad_token, tokenizer.unk_token = tokenizer.eos_token, None
  ensure_pad_token(tokenizer)
  assert tokenizer.pad_token == "<|fim_pad|>"
  # Only EOS and the tokens the chat template uses (GPT-2 with ChatML): a new token, never EOS.
  bare = bare_tokenizer()
  size = len(bare)
  ensure_pad_token(bare)
  assert bare.pad_token == NEW_PAD_TOKEN and bare.pad_token_id == size and len(bare) == size + 1


def bare_tokenizer():
  """A byte-level BPE whose only special tokens are EOS and ChatML's, carrying the ChatML template."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  bpe.train_from_iterator([q + a for q, a, _ in QA], trainers.BpeTrainer(
      vocab_size=300, special_tokens=["</s>", IM_START, IM_END], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>")
  tokenizer.chat_template = CHATML
  return tokenizer


def test_gpt2_tokenizer_gets_a_new_pad_token_that_the_model_must_embed():
  if not os.path.isfile(os.path.join(SHARED_GPT2, "vocab.json")):
    pytest.skip(f"no GPT-2 tokenizer files at {SHARED_GPT2} (optional; ../shared is not needed by the suite)")
  from transformers import GPT2TokenizerFast

  tokenizer = GPT2TokenizerFast.from_pretrained(SHARED_GPT2)
  assert tokenizer.pad_token is None and tokenizer.unk_token == tokenizer.eos_token == "<|endoftext|>"
  ensure_pad_token(tokenizer)
  assert (tokenizer.pad_token, tokenizer.pad_token_id, tokenizer.eos_token_id) == (NEW_PAD_TOKEN, 50257, 50256)
  with pytest.raises(ValueError, match="has 50258 tokens .* the model embeds only 50257"):
    check_vocabulary(tokenizer, 50257)  # GPT-2's embedding has no row for it


def test_rendered_pairs_are_the_templates_text_cut_at_exact_token_boundaries(chat_tokenizer):
  convs = conversations()
  pairs, report = tokenize.render_pairs(convs, chat_tokenizer)
  assert report.used == len(convs) and not report.skipped
  im_end = chat_tokenizer.convert_tokens_to_ids(IM_END)
  tokenized = tokenize.tokenize_pairs(pairs, chat_tokenizer, max_length=None, max_prompt_length=None, rendered=True)
  for i, (conv, pair) in enumerate(zip(convs, pairs)):
    assert pair.prompt == chat_tokenizer.apply_chat_template(list(conv.prompt), tokenize=False,
                                                             add_generation_prompt=True)
    whole = chat_tokenizer.apply_chat_template(list(conv.prompt + conv.chosen), tokenize=False)
    assert pair.prompt + pair.chosen == whole.removesuffix("\n") and pair.chosen.endswith(IM_END)
    prompt = tokenized.prompt_ids[i].tolist()
    assert prompt[0] == chat_tokenizer.convert_tokens_to_ids(IM_START)  # the template's tokens, no OPT </s>
    for text, ids in ((pair.chosen, tokenized.chosen_ids[i]), (pair.rejected, tokenized.rejected_ids[i])):
      assert ids[-1] == im_end and OPT_EOS_ID not in ids  # the end-of-turn token ends it; no EOS appended
      assert prompt + ids.tolist() == chat_tokenizer(pair.prompt + text, add_special_tokens=False).input_ids
  assert tokenizer_decoded_answers(chat_tokenizer, tokenized, convs)


def tokenizer_decoded_answers(tokenizer, tokenized, convs) -> bool:
  return all(tokenizer.decode(ids, skip_special_tokens=True) == conv.chosen[0]["content"]
             for ids, conv in zip(tokenized.chosen_ids, convs))


def test_prompt_truncation_keeps_the_templates_bos(chat_tokenizer):
  chat_tokenizer.chat_template = "{{ bos_token }}" + CHATML  # as Llama 3's template starts with <|begin_of_text|>
  (pair,), _ = tokenize.render_pairs(conversations(3)[2:], chat_tokenizer)  # a multi-turn prompt
  full = tokenize.tokenize_pairs([pair], chat_tokenizer, max_length=None, max_prompt_length=None, rendered=True)
  prompt, chosen = full.prompt_ids[0], full.chosen_ids[0]
  assert prompt[0] == chat_tokenizer.bos_token_id
  cut = tokenize.tokenize_pairs([pair], chat_tokenizer, max_length=len(prompt) + len(chosen) - 1,
                                max_prompt_length=8, rendered=True)
  assert cut.prompt_ids[0].tolist() == [chat_tokenizer.bos_token_id] + prompt[-7:].tolist()
  assert cut.chosen_ids[0].tolist() == chosen.tolist() and cut.counts()["prompt_truncated"] == 1


def test_templates_without_an_end_of_turn_token_get_eos(chat_tokenizer):
  chat_tokenizer.chat_template = PLAIN_TEMPLATE
  convs = conversations(2)
  pairs, _ = tokenize.render_pairs(convs, chat_tokenizer)
  tokenized = tokenize.tokenize_pairs(pairs, chat_tokenizer, max_length=None, max_prompt_length=None, rendered=True)
  assert all(ids[-1] == chat_tokenizer.eos_token_id for ids in tokenized.chosen_ids)
  examples = tokenize.conversation_sft_examples(convs, chat_tokenizer, loss_on="completion")
  for ids, mask in zip(examples.input_ids, examples.loss_mask):
    assert ids[-1] == chat_tokenizer.eos_token_id and mask[-1] == 1  # EOS stays a trained target


def test_templates_that_rewrite_earlier_turns_are_skipped_and_counted(chat_tokenizer):
  # Renders the final message differently from the same message followed by others (as templates that drop
  # reasoning from past turns do): the prompt is then not where the conversation starts.
  chat_tokenizer.chat_template = CHATML.replace("message['content']",
                                                "(message['content'] + ' [last]' if loop.last else message['content'])")
  with pytest.raises(ValueError, match=r"rendered none of its 3 conversations .*template_not_prefix 3"):
    tokenize.render_pairs(conversations(3), chat_tokenizer)


def target_text(tokenizer, ids, mask) -> str:
  return tokenizer.decode(np.asarray(ids)[np.asarray(mask) > 0], skip_special_tokens=False)


def test_sft_loss_on_assistant_turns_only(chat_tokenizer):
  record = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."},
                         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": QA[0][0]},
                         {"role": "assistant", "content": QA[0][1]}]}
  convs, _ = formats.conversations_from_records([record], "t", "messages")
  text = chat_tokenizer.apply_chat_template(record["messages"], tokenize=False).removesuffix("\n")
  full_ids = chat_tokenizer(text, add_special_tokens=False).input_ids
  by_loss = {loss_on: tokenize.conversation_sft_examples(convs, chat_tokenizer, loss_on=loss_on)
             for loss_on in ("assistant", "completion", "conversation")}
  for examples in by_loss.values():
    assert examples.input_ids[0].tolist() == full_ids  # the whole conversation, ending with <|im_end|>
  first = by_loss["assistant"]
  assert target_text(chat_tokenizer, first.input_ids[0], first.loss_mask[0]) == (
      f"Hello.{IM_END}{QA[0][1]}{IM_END}")
  last = by_loss["completion"]
  assert target_text(chat_tokenizer, last.input_ids[0], last.loss_mask[0]) == f"{QA[0][1]}{IM_END}"
  assert by_loss["conversation"].loss_mask[0].tolist() == [0.0] + [1.0] * (len(full_ids) - 1)
  assert first.counts["boundary_adjusted"] == 0 and first.counts["template_skipped"] == 0


def test_sft_on_pairs_with_both_responses_and_truncation(chat_tokenizer):
  convs = conversations(4)
  both = tokenize.conversation_sft_examples(convs, chat_tokenizer, loss_on="completion", responses="both")
  assert len(both) == 8
  answers = [target_text(chat_tokenizer, ids, mask) for ids, mask in zip(both.input_ids, both.loss_mask)]
  assert answers == [f"{text}{IM_END}" for c in convs for text in (c.chosen[0]["content"], c.rejected[0]["content"])]
  short = tokenize.conversation_sft_examples(convs, chat_tokenizer, loss_on="completion", max_length=8)
  assert short.counts["truncated"] == 4 and short.counts["dropped_no_target"] == 4 and len(short) == 0


def test_evaluation_prompts_are_rendered_turns_with_the_end_of_turn_as_stop(chat_tokenizer):
  prompts = ["Human: Hi.\n\nAssistant: Hello.\n\nHuman: Tell me a joke.", "Plain question?"]
  rendered, stops = tokenize.render_prompts(chat_tokenizer, prompts)
  assert rendered == [
      f"{IM_START}user\nHi.{IM_END}\n{IM_START}assistant\nHello.{IM_END}\n{IM_START}user\nTell me a joke.{IM_END}\n"
      f"{IM_START}assistant\n", f"{IM_START}user\nPlain question?{IM_END}\n{IM_START}assistant\n"]
  assert stops == (IM_END,)
  # sampling.generate turns stop strings into token sequences: the end-of-turn is one token.
  assert chat_tokenizer.encode(IM_END, add_special_tokens=False) == [chat_tokenizer.convert_tokens_to_ids(IM_END)]


def test_set_chat_template_from_a_file_or_the_tokenizer(chat_tokenizer, tmp_path):
  path = tmp_path / "plain.jinja"
  path.write_text(PLAIN_TEMPLATE)
  tokenize.set_chat_template(chat_tokenizer, str(path))
  assert chat_tokenizer.chat_template == PLAIN_TEMPLATE
  chat_tokenizer.chat_template = None
  with pytest.raises(ValueError, match="has no chat template"):
    tokenize.set_chat_template(chat_tokenizer, "tokenizer")


def test_generation_stops_at_the_templates_end_of_turn_token(chat_tokenizer):
  import jax.numpy as jnp
  from flax import nnx

  from jaxalign import sampling
  from jaxalign.models import opt

  config = opt.preset("opt-125m", vocab_size=512, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                      num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=160, dropout=0.0)
  model = opt.OPTForCausalLM(config, rngs=nnx.Rngs(0))
  # Every final hidden state is the last layer norm's bias, which the (tied) head row of <|im_end|> matches best.
  im_end = chat_tokenizer.convert_tokens_to_ids(IM_END)
  model.final_layer_norm.scale[...] = jnp.zeros(32)
  model.final_layer_norm.bias[...] = jnp.ones(32)
  model.embed_tokens.embedding[im_end] = jnp.ones(32)
  rendered, stops = tokenize.render_prompts(chat_tokenizer, ["Human: Tell me a joke."])
  (ids,), _ = sampling.encode_prompts(chat_tokenizer, rendered, 64, add_special_tokens=False)
  assert ids == chat_tokenizer(rendered[0], add_special_tokens=False).input_ids and ids[0] != OPT_EOS_ID
  kwargs = dict(max_new_tokens=6, batch_size=1, add_special_tokens=False)
  stopped = sampling.generate(model, chat_tokenizer, rendered, stop_strings=stops, **kwargs)
  unstopped = sampling.generate(model, chat_tokenizer, rendered, stop_strings=(), **kwargs)
  assert stopped.num_new_tokens == [1] and unstopped.num_new_tokens == [6] and stopped.texts == [""]
