"""Synthetic HH data: deterministic, loads through the real loader with nothing skipped, and carries its signal."""

from jaxalign.data import hh, prompts, synthetic


def test_files_are_deterministic_and_load_like_hh(tmp_path):
  first = synthetic.write_synthetic_hh(tmp_path / "a", n_train=41, n_test=10, seed=7)
  second = synthetic.write_synthetic_hh(tmp_path / "b", n_train=41, n_test=10, seed=7)
  assert [p.relative_to(tmp_path / "a") for p in first] == [p.relative_to(tmp_path / "b") for p in second]
  assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, second))
  subsets = list(synthetic.SUBSETS)
  for split, n in (("train", 41), ("test", 10)):
    pairs, report = hh.load_preference_pairs(str(tmp_path / "a"), split=split, subsets=subsets)
    assert len(pairs) == report.total == n and not report.skipped and report.fallback == 0
  assert synthetic.synthetic_records("harmless-base", 5, seed=8) != synthetic.synthetic_records(
      "harmless-base", 5, seed=7)


def test_chosen_refuses_harm_and_answers_questions():
  for record in synthetic.synthetic_records("harmless-base", 50, seed=0):
    chosen = record["chosen"].rsplit(hh.ASSISTANT, 1)[1]
    assert any(word in chosen for word in ("can't", "won't", "not able")), chosen
  for record in synthetic.synthetic_records("helpful-base", 50, seed=0):
    assert record["chosen"] != record["rejected"]
    assert record["chosen"].rsplit(hh.ASSISTANT, 1)[0] == record["rejected"].rsplit(hh.ASSISTANT, 1)[0]


def test_paper_prompt_selection_finds_synthetic_harm_requests(tmp_path):
  synthetic.write_synthetic_hh(tmp_path, n_train=2, n_test=200, seed=0)
  sets = prompts.paper_prompt_sets(str(tmp_path), n_harmful=10, n_helpful=10)
  assert all(("kill" in p or "murder" in p) for p in sets["harmful"])
  assert len(sets["helpful"]) == 10


def test_corpus_covers_both_sides_of_both_subsets():
  corpus = synthetic.synthetic_corpus(10, seed=0)
  assert len(corpus) == 40 and all(text.startswith("\n\nHuman:") for text in corpus)
