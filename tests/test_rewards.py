"""Rewards for the online methods: rule rewards (the soft over-length penalty equal to TRL's), "module:function"
rewards, reward models as rewards (a head per prompt set), scoring with every bad-reward case refused by name, and
TRL's weighted sum with its None / NaN rules."""

import math

import numpy as np
import pytest
from flax import nnx

from jaxalign import judges, losses, rewards
from jaxalign.data import arithmetic
from jaxalign.models import opt, reward as reward_model

PROMPTS = ["\n\nHuman: What is 1 + 2?\n\nAssistant:", "\n\nHuman: What is 3 * 4?\n\nAssistant:"]
G = 2
ROW_PROMPTS = [p for p in PROMPTS for _ in range(G)]
COMPLETIONS = [" Answer: 3", " Answer: 4", " Answer: 12", " twelve"]
COMPLETION_IDS = [[5, 6], [5, 7, 8], [5], [9, 9, 9, 9]]
ANSWERS = [3, 3, 12, 12]


def test_rule_rewards_of_the_arithmetic_task():
  assert rewards.exact_answer_reward(ROW_PROMPTS, COMPLETIONS, answer=ANSWERS) == [1.0, 0.0, 1.0, 0.0]
  assert rewards.answer_format_reward(ROW_PROMPTS, COMPLETIONS) == [1.0, 1.0, 1.0, 0.0]
  conversational = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
  assert rewards.exact_answer_reward(ROW_PROMPTS, conversational, answer=ANSWERS) == [1.0, 0.0, 1.0, 0.0]


def test_soft_overlong_punishment_equals_trl():
  trl_rewards = pytest.importorskip("trl.rewards")
  ids = [[1] * n for n in range(0, 14)]
  for max_length, cache in ((10, 4), (10, 10), (12, 1)):
    want = trl_rewards.get_soft_overlong_punishment(max_completion_len=max_length, soft_punish_cache=cache)(ids)
    got = rewards.soft_overlong_punishment(max_length, cache)(None, None, ids)
    np.testing.assert_allclose(got, want)
  assert rewards.soft_overlong_punishment(100, 20)(None, None, [[1] * 90]) == [-0.5]  # TRL's docstring example
  with pytest.raises(ValueError, match="soft_punish_cache 0"):
    rewards.soft_overlong_punishment(10, 0)


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
  (tmp_path / "my_rewards.py").write_text(
      "def length(prompts, completions, completion_ids, **columns):\n"
      "    return [float(len(c)) for c in completions]\n"
      "def fails_on_twelve(prompts, completions, completion_ids, answer, **columns):\n"
      "    return [1.0 / (a - 12) for a in answer]\n"
      "def fails_on_batches(prompts, completions, completion_ids, **columns):\n"
      "    assert len(prompts) == 1, 'one at a time'\n"
      "    return [0.0]\n"
      "def too_few(prompts, completions, completion_ids, **columns):\n"
      "    return [1.0] * (len(prompts) - 1)\n"
      "def not_a_list(prompts, completions, completion_ids, **columns):\n"
      "    return 1.0\n"
      "def text(prompts, completions, completion_ids, **columns):\n"
      "    return [1.0, '2', 3.0, 4.0][:len(prompts)]\n"
      "def infinite(prompts, completions, completion_ids, **columns):\n"
      "    return [1.0, 2.0, float('inf'), 4.0][:len(prompts)]\n"
      "def partial(prompts, completions, completion_ids, **columns):\n"
      "    return [None, float('nan'), 2, True][:len(prompts)]\n"
      "NOT_CALLABLE = 3\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  return "my_rewards"


def _score(module, name, **kwargs):
  reward = rewards.Reward(name, rewards.load_function(f"{module}:{name}"))
  return rewards.score([reward], ROW_PROMPTS, COMPLETIONS, COMPLETION_IDS, {"answer": ANSWERS}, num_generations=G,
                       **kwargs)


def test_python_function_rewards(reward_module):
  np.testing.assert_array_equal(_score(reward_module, "length")[:, 0], [10, 10, 11, 7])
  got = _score(reward_module, "partial")[:, 0]  # None and NaN: no reward; numbers and bools: their value
  assert np.isnan(got[:2]).all() and list(got[2:]) == [2.0, 1.0]


@pytest.mark.parametrize("name,message", [
    ("fails_on_twelve", "reward 'fails_on_twelve' raised ZeroDivisionError: float division by zero, on completion 2 "
                        "(prompt 1: '\\n\\nHuman: What is 3 * 4?\\n\\nAssistant:')"),
    ("fails_on_batches", "reward 'fails_on_batches' raised AssertionError: one at a time, on the batch of 4 "
                         "completions (on none of them alone)"),
    ("too_few", "reward 'too_few' returned 3 values for 4 completions; expected one number (or None) per completion"),
    ("not_a_list", "reward 'not_a_list' returned 1.0 for 4 completions"),
    ("text", "reward 'text' returned '2' (str) for completion 1 (prompt 0: '\\n\\nHuman: What is 1 + 2?"),
    ("infinite", "reward 'infinite' returned inf (float) for completion 2 (prompt 1")])
def test_bad_rewards_fail_naming_the_reward_and_the_completion(reward_module, name, message):
  with pytest.raises(rewards.RewardError) as error:
    _score(reward_module, name)
  assert message in str(error.value)


@pytest.mark.parametrize("spec,message", [
    ("my_rewards", "expected 'module:function'"), ("no_such_module:f", "cannot import module 'no_such_module'"),
    ("my_rewards:missing", "has no function 'missing'"), ("my_rewards:NOT_CALLABLE", "has no function")])
def test_bad_function_names_are_refused(reward_module, spec, message):
  with pytest.raises(ValueError, match=message):
    rewards.load_function(spec)


def test_columns_must_have_one_value_per_completion(reward_module):
  reward = rewards.Reward("length", rewards.load_function(f"{reward_module}:length"))
  with pytest.raises(ValueError, match="column 'answer' has 2 values for 4 completions"):
    rewards.score([reward], ROW_PROMPTS, COMPLETIONS, COMPLETION_IDS, {"answer": [3, 12]})


def test_combine_is_a_weighted_nansum_with_unscored_completions_nan():
  named = [rewards.Reward("a", None, 1.0), rewards.Reward("b", None, 0.5)]
  per_reward = np.array([[1.0, 2.0], [np.nan, 4.0], [3.0, np.nan], [np.nan, np.nan]], np.float32)
  combined, metrics = rewards.combine(named, per_reward)
  np.testing.assert_array_equal(combined[:3], [2.0, 2.0, 3.0])
  assert np.isnan(combined[3])  # no reward scored it: no advantage, out of the reward metrics
  assert metrics["rewards/a/mean"] == 2.0 and metrics["rewards/b/mean"] == 3.0
  np.testing.assert_allclose([metrics["rewards/a/std"], metrics["rewards/b/std"]], [math.sqrt(2), math.sqrt(2)])
  np.testing.assert_allclose([metrics["reward"], metrics["reward_std"]], [7 / 3, np.std([2, 2, 3], ddof=1)])


def test_missing_eos_penalty():
  got = losses.apply_missing_eos_penalty(np.array([1.0, 1.0]), np.array([True, False]), 0.5)
  np.testing.assert_array_equal(got, [1.0, 0.5])


class _LengthJudge(judges.Judge):
  def __init__(self):
    self.seen = []

  def score(self, prompts, responses):
    self.seen.append((list(prompts), list(responses)))
    return np.array([len(r) for r in responses], np.float32)


def test_judge_reward_scores_its_prompt_sets_only():
  judge = _LengthJudge()
  harmful_only = rewards.judge_reward(judge, prompt_sets=frozenset({"harmful"}))
  sets = ["harmful", "harmful", "helpful", "helpful"]
  assert harmful_only(ROW_PROMPTS, COMPLETIONS, prompt_set=sets) == [10.0, 10.0, None, None]
  assert judge.seen == [(ROW_PROMPTS[:2], COMPLETIONS[:2])]
  with pytest.raises(ValueError, match="needs each prompt's 'prompt_set' column"):
    harmful_only(ROW_PROMPTS, COMPLETIONS)
  messages = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]]
  rewards.judge_reward(judge)(messages, [[{"role": "assistant", "content": "Hello"}]])
  assert judge.seen[-1] == (["\n\nHuman: Be brief.\n\nHuman: Hi"], ["Hello"])


@pytest.fixture
def two_head_reward_model(tmp_path, tiny_tokenizer):
  config = opt.OPTConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         ffn_dim=64, word_embed_proj_dim=32, do_layer_norm_before=False, max_position_embeddings=128)
  model = reward_model.RewardModel(config, ("harmless", "helpful"), rngs=nnx.Rngs(0))
  folder = str(tmp_path / "rm")
  reward_model.save_pretrained(model, folder, pad_token_id=tiny_tokenizer.pad_token_id)
  tiny_tokenizer.save_pretrained(folder)
  return folder


def test_a_reward_model_gives_a_reward_per_head_routed_by_prompt_set(two_head_reward_model):
  sets = {"harmful": "harmless", "helpful": "helpful"}
  made = rewards.make_rewards({"rm": two_head_reward_model, "format": "answer_format"}, weights=[1.0, 1.0, 0.1],
                              set_heads=sets, judge_kwargs={"batch_size": 2})
  assert [r.name for r in made] == ["rm/harmless", "rm/helpful", "format"]
  column = {"prompt_set": ["harmful", "harmful", "helpful", "helpful"]}
  per_reward = rewards.score(made, ROW_PROMPTS, COMPLETIONS, COMPLETION_IDS, column, num_generations=G)
  judge = judges.load_judge(two_head_reward_model, batch_size=2)
  for head, rows in (("harmless", slice(0, 2)), ("helpful", slice(2, 4))):
    want = judge.for_head(head).score(ROW_PROMPTS[rows], COMPLETIONS[rows])
    np.testing.assert_allclose(per_reward[rows, [r.name for r in made].index(f"rm/{head}")], want, rtol=1e-6)
  assert np.isnan(per_reward[2:, 0]).all() and np.isnan(per_reward[:2, 1]).all()
  combined, _ = rewards.combine(made, per_reward)  # each completion: its set's head, plus 0.1 x format
  np.testing.assert_allclose(combined, np.nansum(per_reward[:, :2], axis=1) + 0.1 * per_reward[:, 2], rtol=1e-6)
  with pytest.raises(ValueError, match=r"set_heads names heads \['safe'\]"):
    rewards.make_rewards({"rm": two_head_reward_model}, set_heads={"harmful": "safe"})


def test_make_rewards_checks_its_specs(reward_module):
  made = rewards.make_rewards({"exact": "exact_answer", "len": f"{reward_module}:length", "long": "soft_overlong"},
                              max_completion_length=3, soft_punish_cache=1)
  per_reward = rewards.score(made, ROW_PROMPTS, COMPLETIONS, COMPLETION_IDS, {"answer": ANSWERS})
  np.testing.assert_array_equal(per_reward, [[1, 10, 0], [0, 10, -1], [1, 11, 0], [0, 7, -1]])
  with pytest.raises(ValueError, match="one weight per reward"):
    rewards.make_rewards({"exact": "exact_answer"}, weights=[1.0, 2.0])
  with pytest.raises(ValueError, match="soft_overlong needs max_completion_length"):
    rewards.make_rewards({"long": "soft_overlong"})
  with pytest.raises(ValueError, match="'exact_answr' is not a built-in reward"):
    rewards.make_rewards({"exact": "exact_answr"})
  assert arithmetic.completion_text(3) == COMPLETIONS[0]


def test_is_reward_model_tells_model_specs_from_rules_and_functions():
  for spec in ("exact_answer", "answer_format", "soft_overlong", "my_rewards:length", "pkg.mod:fn"):
    assert not rewards.is_reward_model(spec), spec
  for spec in ("runs/reward", "OpenAssistant/reward-model-deberta-v3-large-v2", "stage:reward", "/abs/rm"):
    assert rewards.is_reward_model(spec), spec
