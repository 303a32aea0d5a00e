"""KTO's data: unpaired JSON lines and split preference pairs, every record accounted for; the mismatched
completions of the KL term; and KTO end to end against a live or a precomputed reference."""

import gzip
import json

import numpy as np
import pytest

from jaxalign import logprobs, tasks, trainer
from jaxalign.data import hh, pipeline, unpaired
from jaxalign.tokenizer import load_tokenizer
from helpers import losses_by_step, prepared, tiny_config

P = "\n\nHuman: How do I bake bread?\n\nAssistant:"


def write_jsonl(path, records):
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "wt") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")
  return path


UNUSABLE = {
    hh.MISSING_FIELD: [{"completion": " a", "label": True}, {"prompt": "Q", "completion": " a"}],
    hh.NOT_A_STRING: [{"prompt": "Q", "completion": 3, "label": False}],
    unpaired.NOT_A_BOOLEAN: [{"prompt": "Q", "completion": " a", "label": "yes"}],
    hh.EMPTY_RESPONSE: [{"prompt": "Q", "completion": "  ", "label": True}],
}


def test_unpaired_records_are_each_used_or_counted_by_reason():
  good = [{"prompt": "Q1", "completion": " fine", "label": True}, {"prompt": "Q2", "completion": " rude", "label": False}]
  bad = [record for records in UNUSABLE.values() for record in records]
  examples, report = unpaired.examples_from_records(good[:1] + bad + good[1:], "mine.jsonl")
  assert [(e.prompt, e.completion, e.desirable, e.index) for e in examples] == [
      ("Q1", " fine", True, 0), ("Q2", " rude", False, len(bad) + 1)]
  assert dict(report.skipped) == {reason: len(records) for reason, records in UNUSABLE.items()}
  assert report.total == report.used + sum(report.skipped.values()) == len(bad) + 2


def test_unpaired_jsonl_loads_from_a_folder_of_splits(tmp_path):
  records = [{"prompt": f"Q{i}", "completion": f" answer {i}", "label": i % 3 != 0} for i in range(9)]
  records.append({"prompt": "Q9", "completion": " ", "label": True})
  write_jsonl(tmp_path / "train.jsonl.gz", records)
  examples, report = unpaired.load_examples(str(tmp_path), split="train")
  assert [e.desirable for e in examples] == [i % 3 != 0 for i in range(9)]
  assert (report.total, report.used, dict(report.skipped)) == (10, 9, {hh.EMPTY_RESPONSE: 1})


def test_a_file_without_usable_unpaired_records_is_an_error_naming_it(tmp_path):
  path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Q", "completion": " ", "label": True}] * 2)
  with pytest.raises(ValueError, match=f"{path}: no usable unpaired example among its 2 records"):
    unpaired.load_examples(str(path))


def test_preference_pairs_split_into_desirable_and_undesirable_examples(tmp_path):
  records = [{"chosen": P + " Mix flour and water.", "rejected": P + " No idea."},
             {"chosen": P + " same", "rejected": P + " same"},  # identical: skipped and counted
             {"chosen": P + " Knead it.", "rejected": P + " Buy some."}]
  write_jsonl(tmp_path / "train.jsonl", records)
  examples, report = unpaired.load_examples(str(tmp_path / "train.jsonl"))
  assert [(e.prompt, e.completion, e.desirable, e.index) for e in examples] == [
      (P, " Mix flour and water.", True, 0), (P, " No idea.", False, 0), (P, " Knead it.", True, 2),
      (P, " Buy some.", False, 2)]
  assert (report.total, report.used, dict(report.skipped)) == (3, 2, {hh.IDENTICAL: 1})


def test_each_example_gets_another_examples_completion_for_the_kl_term():
  partner = unpaired.mismatched(50, seed=3)
  assert sorted(partner) == list(range(50)) and not np.any(partner == np.arange(50))
  np.testing.assert_array_equal(partner, unpaired.mismatched(50, seed=3))  # deterministic
  examples = [unpaired.UnpairedExample(f"Q{i}", f" A{i}", i % 2 == 0, "f", i) for i in range(5)]
  pairs = unpaired.as_pairs(examples, seed=0)
  partner = unpaired.mismatched(5, seed=0)
  assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [(f"Q{i}", f" A{i}", f" A{partner[i]}")
                                                                for i in range(5)]


def test_kto_stage_data_carries_labels_and_mismatched_completions(cache_dir):
  config = tiny_config(cache_dir, "kto", **{"data.eval_pairs": 8})
  task, model, data, reference, mesh = prepared(config)
  records, report = hh.load_preference_pairs(pipeline.data_source(config), subsets=["harmless-base", "helpful-base"])
  assert len(data.train.records) == len(data.train.examples) == 2 * report.used  # every used pair gives two
  labels = unpaired.desirable_labels(data.train.records)
  assert labels.sum() == report.used
  tokenizer = load_tokenizer(pipeline.tokenizer_path(config, ""))
  first = data.train.examples
  completions = {tuple(first.chosen_ids[i]) for i in range(len(first))}
  assert all(tuple(ids) in completions for ids in first.rejected_ids)  # the KL side is some example's completion
  assert tokenizer.decode(first.chosen_ids[0]).strip() in (records[0].chosen.strip() + tokenizer.eos_token)
  streams = pipeline.streams(config, data, mesh, tokenizer.pad_token_id, reference.per_pair())
  batch = streams.train.next_global()
  assert set(np.unique(np.asarray(batch.extras["desirable"]))) <= {0, 1}
  assert reference.mode == "model" and task.uses_reference


@pytest.mark.slow
def test_kto_precomputed_reference_equals_the_live_one_on_packed_rows(cache_dir, tmp_path):
  results = {}
  for mode in ("model", "precomputed"):
    config = tiny_config(cache_dir, "kto", **{"data.prefix_sharing": True, "data.packing": True, "dpo.reference": mode, "training.max_steps": 3,
                                                        "training.batch_size": 16, "optimizer.lr": 3e-3})
    trainer.run(config, str(tmp_path / mode))
    results[mode] = losses_by_step(str(tmp_path / mode))
  assert results["model"][1] == pytest.approx(0.5, abs=1e-6)  # policy == reference: u = z = 0, 1 - sigmoid(0)
  for step in (1, 2, 3):  # a reference log-prob attached to the wrong example would move the loss
    assert results["precomputed"][step] == pytest.approx(results["model"][step], abs=1e-5)
  assert results["model"][3] < results["model"][1]


def test_kto_task_reads_its_config():
  config = tiny_config("", "kto", **{"kto.beta": 0.3, "kto.desirable_weight": 1.2, "kto.loss_type":
                                     "apo_zero_unpaired"})
  assert tasks.make_task(config) == tasks.KTOTask(beta=0.3, desirable_weight=1.2, loss_type="apo_zero_unpaired",
                                                  logprob_chunks=logprobs.configured(config.model))


@pytest.mark.slow
def test_kto_trains_from_unpaired_jsonl(cache_dir, tmp_path):
  """A KTO stage from a folder of unpaired {prompt, completion, label} files (the synthetic pairs split by hand, one
  unusable record added): every usable record is an example, the stage trains and evaluates."""
  source = pipeline.data_source(tiny_config(cache_dir, "kto"))
  folder = tmp_path / "unpaired"
  folder.mkdir()
  for split in ("train", "test"):
    pairs, _ = hh.load_preference_pairs(source, split=split, subsets=["harmless-base"])
    records = [{"prompt": p.prompt, "completion": c, "label": label}
               for p in pairs for c, label in ((p.chosen, True), (p.rejected, False))]
    write_jsonl(folder / f"{split}.jsonl", records + [{"prompt": "Q", "completion": "", "label": True}])
  config = tiny_config(cache_dir, "kto", **{"data.source": str(folder), "data.subsets": "", "training.max_steps": 2,
                                            "data.eval_pairs": 16})
  task, model, data, reference, mesh = prepared(config)
  assert len(data.train.examples) == len(records_of(folder / "train.jsonl")) - 1
  trainer.run(config, str(tmp_path / "run"))
  done = json.load(open(tmp_path / "run" / trainer.DONE_FILE))
  assert done["steps"] == 2 and 0.0 <= done["eval/rewards/accuracies"] <= 1.0 and "eval/kl" in done


def records_of(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_unpaired_files_keep_the_data_guarantees(tmp_path, caplog):
  """Issue 25: a bad JSON line is a counted skip (not an AttributeError), a mostly-skipped file warns loudly, and a
  source without undesirable (or desirable) examples is refused."""
  good = [{"prompt": f"Q{i}", "completion": f" a{i}", "label": i % 2 == 0} for i in range(32)]
  odd = [{"prompt": f"Q{i}", "completion": f" b{i}", "label": "yes"} for i in range(96)]
  path = tmp_path / "train.jsonl"
  path.write_text("{not json\n" + "".join(json.dumps(r) + "\n" for r in good + odd))
  with caplog.at_level("WARNING", logger="jaxalign"):
    examples, report = unpaired.load_examples(str(path))
  assert len(examples) == report.used == 32 and report.total == 129
  assert dict(report.skipped) == {hh.MALFORMED_LINE: 1, unpaired.NOT_A_BOOLEAN: 96}
  assert "97 of its 129 records (75%, more than data.warn_skipped_share = 50%) were SKIPPED" in caplog.text
  write_jsonl(path, [r for r in good if r["label"]])
  with pytest.raises(ValueError, match=r"train.jsonl \(train\): all 16 usable KTO examples are desirable, none is "
                                       r"undesirable: KTO needs both classes. Add examples with label false"):
    unpaired.load_examples(str(path))


def test_a_file_may_mix_unpaired_records_and_preference_pairs(tmp_path):
  records = [{"prompt": "Q", "completion": " yes", "label": True},
             {"chosen": P + " Mix flour.", "rejected": P + " No idea."},
             {"prompt": "Q2", "chosen": " Knead.", "rejected": " Buy."}]
  examples, report = unpaired.load_examples(str(write_jsonl(tmp_path / "train.jsonl", records)))
  assert [(e.completion, e.desirable, e.index) for e in examples] == [
      (" yes", True, 0), (" Mix flour.", True, 1), (" No idea.", False, 1), (" Knead.", True, 2), (" Buy.", False, 2)]
  assert (report.total, report.used) == (3, 3)
