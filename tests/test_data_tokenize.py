"""Tokenization: the exact prompt/response boundary, both truncation paths, the cache, SFT examples and packing."""

import numpy as np
import pytest

from jaxalign.data import tokenize
from jaxalign.data.hh import PreferencePair
from jaxalign.tokenizer import OPT_EOS_ID

P = "\n\nHuman: How do I bake bread at home?\n\nAssistant:"
PAIRS = [
    PreferencePair(P, " Mix flour, water, salt and yeast, let it rise, then bake.", " I can't help.", "t", 0),
    PreferencePair("\n\nHuman: Tell me a joke.\n\nAssistant:", " Why did the chicken cross the road?", " No.", "t", 1),
    # The prompt ends in a space that BPE merges into the response's first word: the boundary must move.
    PreferencePair(P + " ", "it is easy: mix flour and water.", "at home? No.", "t", 2),
]


def untruncated(tokenizer, pairs=PAIRS):
  return tokenize.tokenize_pairs(pairs, tokenizer, max_length=None, max_prompt_length=None)


def test_prompt_plus_response_ids_are_the_ids_of_the_whole_text(tiny_tokenizer):
  tokenized = untruncated(tiny_tokenizer)
  for i, pair in enumerate(PAIRS):
    prompt = tokenized.prompt_ids[i].tolist()
    assert prompt[0] == OPT_EOS_ID  # OPT's leading </s>
    for response, ids in ((pair.chosen, tokenized.chosen_ids[i]), (pair.rejected, tokenized.rejected_ids[i])):
      assert ids.dtype == np.int32 and ids[-1] == OPT_EOS_ID
      assert prompt + ids[:-1].tolist() == tiny_tokenizer(pair.prompt + response).input_ids
  assert tokenized.boundary_adjusted.tolist() == [False, False, True]
  # The merged token went to the responses, so the prompt ids decode to the prompt without its trailing space.
  assert tiny_tokenizer.decode(tokenized.prompt_ids[2], skip_special_tokens=True) == P


def test_encoding_the_prompt_head_once_changes_nothing(tiny_tokenizer, monkeypatch):
  assert tokenize.splits_at_newlines(tiny_tokenizer.backend_tokenizer)  # GPT-2's regex: the head is split off
  split = untruncated(tiny_tokenizer)
  monkeypatch.setattr(tokenize, "splits_at_newlines", lambda backend: False)  # as for tokenizers without it
  whole = untruncated(tiny_tokenizer)
  for name in ("prompt_ids", "chosen_ids", "rejected_ids", "boundary_adjusted"):
    assert [np.asarray(a).tolist() for a in getattr(split, name)] == [np.asarray(b).tolist()
                                                                         for b in getattr(whole, name)]


def test_prompt_is_truncated_first_keeping_its_end_or_start(tiny_tokenizer):
  full = untruncated(tiny_tokenizer, PAIRS[:1])
  prompt, chosen = full.prompt_ids[0], full.chosen_ids[0]
  max_length = len(prompt) + len(chosen) - 1  # one token too long: the prompt alone gives way
  for mode, kept in (("keep_end", prompt[-5:]), ("keep_start", prompt[1:6])):
    out = tokenize.tokenize_pairs(PAIRS[:1], tiny_tokenizer, max_length=max_length, max_prompt_length=6,
                                  truncation_mode=mode)
    assert out.prompt_ids[0].tolist() == [OPT_EOS_ID] + kept.tolist()  # the leading </s> always stays
    assert out.chosen_ids[0].tolist() == chosen.tolist()
    assert out.counts() == {"pairs": 1, "prompt_truncated": 1, "response_truncated": 0, "boundary_adjusted": 0}


def test_responses_are_cut_to_the_room_left_by_the_prompt(tiny_tokenizer):
  full = untruncated(tiny_tokenizer, PAIRS[:1])
  prompt, chosen, rejected = full.prompt_ids[0], full.chosen_ids[0], full.rejected_ids[0]
  # The prompt fits max_prompt_length, so only the responses are cut (to 4 tokens, losing the EOS).
  out = tokenize.tokenize_pairs(PAIRS[:1], tiny_tokenizer, max_length=len(prompt) + 4,
                                max_prompt_length=len(prompt))
  assert out.prompt_ids[0].tolist() == prompt.tolist()
  assert out.chosen_ids[0].tolist() == chosen[:4].tolist()
  assert out.rejected_ids[0].tolist() == rejected[:4].tolist()
  assert out.counts()["response_truncated"] == 1 and out.counts()["prompt_truncated"] == 0
  assert out.lengths.tolist() == [len(prompt) + 4]


def test_invalid_lengths_are_rejected(tiny_tokenizer):
  with pytest.raises(ValueError, match="max_prompt_length < max_length"):
    tokenize.tokenize_pairs(PAIRS, tiny_tokenizer, max_length=8, max_prompt_length=8)
  with pytest.raises(ValueError, match="truncation_mode"):
    tokenize.tokenize_pairs(PAIRS, tiny_tokenizer, max_length=8, max_prompt_length=4, truncation_mode="middle")


def test_cache_is_reused_and_keyed_by_the_settings(tiny_tokenizer, tmp_path, monkeypatch):
  first = tokenize.tokenize_pairs(PAIRS, tiny_tokenizer, max_length=64, max_prompt_length=32, cache_dir=tmp_path)
  assert len(list(tmp_path.glob("pairs-*.npz"))) == 1

  def no_encoding(*args, **kwargs):
    raise AssertionError("the second run should read the cache")

  monkeypatch.setattr(tokenize, "_encode", no_encoding)
  second = tokenize.tokenize_pairs(PAIRS, tiny_tokenizer, max_length=64, max_prompt_length=32, cache_dir=tmp_path)
  for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
    assert [a.tolist() for a in getattr(first, name)] == [b.tolist() for b in getattr(second, name)]
  assert second.boundary_adjusted.tolist() == first.boundary_adjusted.tolist()
  with pytest.raises(AssertionError, match="read the cache"):  # other lengths: another key
    tokenize.tokenize_pairs(PAIRS, tiny_tokenizer, max_length=64, max_prompt_length=16, cache_dir=tmp_path)


def test_sft_loss_on_conversation_or_completion(tiny_tokenizer):
  tokenized = untruncated(tiny_tokenizer)
  conversation = tokenize.sft_examples(tokenized, loss_on="conversation")
  completion = tokenize.sft_examples(tokenized, loss_on="completion")
  for i in range(len(PAIRS)):
    n_prompt, n_chosen = len(tokenized.prompt_ids[i]), len(tokenized.chosen_ids[i])
    ids = np.concatenate([tokenized.prompt_ids[i], tokenized.chosen_ids[i]])
    assert conversation.input_ids[i].tolist() == completion.input_ids[i].tolist() == ids.tolist()
    assert conversation.loss_mask[i].tolist() == [0.0] + [1.0] * (len(ids) - 1)
    assert completion.loss_mask[i].tolist() == [0.0] * n_prompt + [1.0] * n_chosen


def test_sft_truncation_keeps_the_start_and_drops_examples_left_without_targets(tiny_tokenizer):
  tokenized = untruncated(tiny_tokenizer)
  shortest_prompt = min(len(p) for p in tokenized.prompt_ids)
  out = tokenize.sft_examples(tokenized, loss_on="completion", max_length=shortest_prompt)
  assert len(out) == 0 and out.counts == {"examples": 0, "truncated": 3, "dropped_no_target": 3}
  out = tokenize.sft_examples(tokenized, loss_on="conversation", max_length=shortest_prompt)
  assert out.counts["examples"] == 3 and set(out.lengths.tolist()) == {shortest_prompt}
  assert out.input_ids[0].tolist() == tokenized.prompt_ids[0][:shortest_prompt].tolist()


def make_examples(lengths, seed=0):
  rng = np.random.default_rng(seed)
  ids = [rng.integers(3, 300, n).astype(np.int32) for n in lengths]
  masks = [np.concatenate([[0.0], rng.integers(0, 2, n - 1)]).astype(np.float32) for n in lengths]
  return tokenize.SFTExamples(ids, masks)


def test_packing_places_every_example_once_with_segments_and_restarting_positions():
  lengths = [7, 3, 12, 5, 9, 2, 16, 4, 6, 1]
  examples = make_examples(lengths)
  packed = tokenize.pack_examples(examples, seq_len=16)
  assert all(len(row) <= 16 for row in packed.input_ids)
  assert packed.counts["rows"] == len(packed) == 5  # 65 tokens: best-fit decreasing fills 5 rows of 16
  seen = []
  for ids, mask, segments, positions in zip(packed.input_ids, packed.loss_mask, packed.segment_ids,
                                             packed.positions):
    assert segments[0] == 1 and np.all(np.diff(segments) >= 0) and segments.dtype == np.int32
    for segment in np.unique(segments):
      where = segments == segment
      assert positions[where].tolist() == list(range(where.sum()))
      match = [i for i, e in enumerate(examples.input_ids) if e.tolist() == ids[where].tolist()]
      assert len(match) == 1 and mask[where].tolist() == examples.loss_mask[match[0]].tolist()
      seen.append(match[0])
  assert sorted(seen) == list(range(len(lengths)))


def test_packing_rejects_examples_longer_than_a_row():
  with pytest.raises(ValueError, match="example 1 has 20 tokens"):
    tokenize.pack_examples(make_examples([3, 20]), seq_len=16)
