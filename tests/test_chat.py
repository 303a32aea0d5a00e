"""The chat CLI driven through a real terminal (pexpect on a pty): streaming, /reset, Ctrl-C, --compare, /save; the
saved answers are token for token what `sampling.generate` gives for the same prompts."""

import json
import os
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from jaxalign import chat, sampling, shapes
from jaxalign.models import hub, opt
from jaxalign.tokenizer import load_tokenizer

pexpect = pytest.importorskip("pexpect")
# pexpect forks this (JAX-threaded) process to start the CLI; the child execs at once, so the fork is safe.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG = 3000  # new tokens of the answer that is interrupted: long enough to still be running when Ctrl-C arrives
SHORT = 24


def make_model_dir(path, tokenizer_dir, seed):
  """A random 2-layer OPT (weights spread far from init, so answers vary) whose special tokens never win: EOS and
  padding rows of the tied embedding are zero, so an answer runs to max_new_tokens."""
  config = opt.preset("opt-125m", vocab_size=384, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                      num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=LONG + 1100,
                      dropout=0.0)
  model = opt.OPTForCausalLM(config, rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(model)
  keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(state))))
  state = jax.tree.map(lambda x: x + 0.5 * jax.random.normal(next(keys), x.shape, x.dtype), state)
  model = nnx.merge(graphdef, state)
  table = model.embed_tokens.embedding
  table[...] = table[...].at[:4].set(0.0)  # <s>, <pad>, </s>, <unk>
  hub.save_pretrained(model, str(path))
  load_tokenizer(tokenizer_dir).save_pretrained(str(path))
  return str(path)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_tokenizer_dir):
  root = tmp_path_factory.mktemp("chat_models")
  return [make_model_dir(root / name, tiny_tokenizer_dir, seed) for name, seed in (("alpha", 1), ("beta", 2))]


def spawn(args, tmp_path):
  env = dict(os.environ, JAXALIGN_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  child = pexpect.spawn(sys.executable, ["-m", "jaxalign.chat", *args], cwd=REPO, env=env, encoding="utf-8",
                        timeout=180, dimensions=(40, 200))
  child.logfile_read = open(tmp_path / "terminal.log", "w")  # what the terminal showed, for a failing test
  return child


def say(child, text):
  child.expect_exact("you> ")
  child.sendline(text)


def check_against_generate(model_dir, record):
  """The saved answer equals sampling.generate's text and generate_ids' tokens for its prompt, seed and settings."""
  model, tokenizer = hub.from_pretrained(model_dir), load_tokenizer(model_dir)
  settings = dict(max_new_tokens=len(record["token_ids"]), temperature=0.0,
                  max_prompt_length=record["max_prompt_length"], seed=record["seed"])
  out = sampling.generate(model, tokenizer, [record["prompt"]], **settings)
  assert out.texts == [record["content"]]
  assert out.num_new_tokens == [len(record["token_ids"])]
  (prompt_ids,), _ = sampling.encode_prompts(tokenizer, [record["prompt"]], record["max_prompt_length"])
  width = shapes.fit(len(prompt_ids), shapes.power_ladder(record["max_prompt_length"]))
  ids, mask = np.full((1, width), tokenizer.pad_token_id), np.zeros((1, width), bool)
  ids[0, width - len(prompt_ids):], mask[0, width - len(prompt_ids):] = prompt_ids, True
  out = sampling.generate_ids(model, ids, mask, options=sampling.SamplingOptions(
      max_new_tokens=len(record["token_ids"]), eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id))
  assert np.asarray(out.tokens)[0, :int(out.lengths[0])].tolist() == record["token_ids"]


def terminal_text(text):
  """What a pty shows, as the program wrote it (the terminal turns each "\n" into "\r\n")."""
  return text.replace("\r\n", "\n")


def test_chat_session_in_a_terminal(model_dirs, tmp_path):
  before_reset, after_reset = tmp_path / "before.json", tmp_path / "after.json"
  child = spawn([model_dirs[0], "--temperature", "0", "--max_new_tokens", str(SHORT), "--system", "Be kind."],
                tmp_path)
  say(child, "How do I bake bread?")
  child.expect_exact("alpha: ")
  say(child, "And cake?")  # a second turn: its prompt holds the first exchange

  # Streaming: a long answer shows its first text while it is still being generated; Ctrl-C stops it.
  say(child, f"/max_new_tokens {LONG}")
  say(child, "Tell me a joke.")
  child.expect_exact("alpha: ")
  child.expect(r".+", timeout=60)  # returns with the first text of the answer, whatever has arrived by then
  streamed = terminal_text(child.after)
  assert streamed.strip() and "you> " not in streamed and "[interrupted]" not in streamed
  child.sendintr()
  child.expect_exact("[interrupted]")
  say(child, f"/max_new_tokens {SHORT}")  # the session goes on
  say(child, f"/save {before_reset}")
  child.expect_exact("[saved to")

  say(child, "/reset")
  child.expect_exact("[conversation cleared]")
  say(child, "How do I bake bread?")
  child.expect_exact("alpha: ")
  say(child, f"/save {after_reset}")
  child.expect_exact("[saved to")
  say(child, "/quit")
  child.expect(pexpect.EOF)

  messages = json.loads(before_reset.read_text())["models"]["alpha"]["messages"]
  assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
  first, second, stopped = messages[2], messages[4], messages[6]
  assert first["prompt"] == "Be kind.\n\nHuman: How do I bake bread?\n\nAssistant:"
  assert second["prompt"] == first["prompt"] + " " + first["content"] + "\n\nHuman: And cake?\n\nAssistant:"
  assert len(first["token_ids"]) == len(second["token_ids"]) == SHORT
  # Ctrl-C stopped the long answer early; what it had said is kept, and began with what had streamed.
  assert stopped["interrupted"] and 0 < len(stopped["token_ids"]) < LONG
  assert chat.printable(stopped["content"]).startswith(streamed.strip())
  for record in (first, second, stopped):
    check_against_generate(model_dirs[0], record)

  # After /reset only the system text and the new exchange are left: the first turn's prompt again, same answer.
  messages = json.loads(after_reset.read_text())["models"]["alpha"]["messages"]
  assert [m["role"] for m in messages] == ["system", "user", "assistant"]
  assert messages[2]["prompt"] == first["prompt"] and messages[2]["token_ids"] == first["token_ids"]


def test_chat_compare_shows_two_answers(model_dirs, tmp_path):
  transcript = tmp_path / "compare.json"
  child = spawn(["--compare", *model_dirs, "--temperature", "0", "--max_new_tokens", str(SHORT)], tmp_path)
  say(child, "What is the capital of France?")
  child.expect_exact("── alpha ──")
  child.expect_exact("── beta ──")
  say(child, f"/save {transcript}")
  say(child, "/quit")
  child.expect(pexpect.EOF)
  models = json.loads(transcript.read_text())["models"]
  answers = {name: m["messages"][-1] for name, m in models.items()}
  assert set(answers) == {"alpha", "beta"} and answers["alpha"]["content"] != answers["beta"]["content"]
  for name, model_dir in zip(("alpha", "beta"), model_dirs):
    check_against_generate(model_dir, answers[name])


def test_visible_text_holds_back_a_possible_stop_string():
  stops = ("\n\nHuman:",)
  assert chat.visible_text("Sure, here", stops) == "Sure, here"
  assert chat.visible_text("Sure.\n\nHu", stops) == "Sure."  # may still become the next human turn
  assert chat.visible_text("Sure.\n\nHuman: more", stops) == "Sure."
  assert chat.visible_text("caf\ufffd", stops) == "caf"  # half a UTF-8 character


def test_hh_prompt_format(tiny_tokenizer):
  messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello!", "token_ids": [1]}, {"role": "user", "content": "Bye"}]
  assert chat.format_prompt(tiny_tokenizer, messages) == \
      "Be kind.\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant:"


def test_sampled_answers_match_generate_with_the_same_seed(model_dirs):
  """In-process session (no terminal): a sampled answer is generate's for the same prompt, settings and seed, and
  the stream printed is the answer."""
  import io

  model, tokenizer = hub.from_pretrained(model_dirs[1]), load_tokenizer(model_dirs[1])
  out = io.StringIO()
  settings = chat.Settings(temperature=0.9, top_p=0.8, max_new_tokens=SHORT, seed=7)
  session = chat.Session([chat.ChatModel("beta", model_dirs[1], model, tokenizer, chat.StreamingSampler(model))],
                         settings, out=out)
  session.send("Tell me a joke.")
  record = session.models[0].messages[-1]
  expected = sampling.generate(model, tokenizer, [record["prompt"]], max_new_tokens=SHORT, temperature=0.9, top_p=0.8,
                               seed=record["seed"], max_prompt_length=record["max_prompt_length"])
  assert expected.texts == [record["content"]] and expected.num_new_tokens == [len(record["token_ids"])]
  assert out.getvalue() == f"beta: {chat.printable(record['content'])}\n"


def test_chat_template_is_used_where_the_tokenizer_has_one(tiny_tokenizer_dir):
  tokenizer = load_tokenizer(tiny_tokenizer_dir)
  tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                             "{% if add_generation_prompt %}<|assistant|>{% endif %}")
  messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "Bye"}]
  assert chat.format_prompt(tokenizer, messages) == "<|user|>Hi\n<|assistant|>Hello!\n<|user|>Bye\n<|assistant|>"
  assert chat.stop_strings_for(tokenizer) == ()  # the template's model ends its turn with EOS
