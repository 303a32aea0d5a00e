"""Reward functions with TRL's signature for the online tests (named "tests.reward_functions:<name>"): a random tiny
model never ends its completions nor writes an answer, so these reward what it does write."""


def even_token_share(prompts, completions, completion_ids, **columns) -> list[float]:
  """The share of a completion's tokens whose id is even: varies within a group, so advantages are not all 0."""
  return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def first_token_even(prompts, completions, completion_ids, **columns) -> list[float]:
  """1 when the completion's first token id is even, else 0: groups often all agree (dynamic sampling's case)."""
  return [float(bool(ids) and ids[0] % 2 == 0) for ids in completion_ids]
