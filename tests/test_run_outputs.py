"""What a run leaves behind besides its model: curves.png per stage, study.md per study, the W&B offline run holding
metrics.jsonl's values, and the files and cards a push to the Hub sends (HfApi mocked at huggingface_hub's boundary).
One tiny two-stage study (SFT, then DPO) feeds every test."""

import glob
import importlib.util
import json
import logging
import os

import pytest
from PIL import Image

from configs import common, eval as eval_config
from jaxalign import curves, evaluator, hub_push, tasks, trackers, workdirs
from helpers import FakeHub, tiny_config, wandb_records

HAS_WANDB = importlib.util.find_spec("wandb") is not None  # the [test] extra installs it

SFT_STEPS, DPO_STEPS = 4, 4
SECRET = "hf_notarealtokenbutsecret"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  root = tmp_path_factory.mktemp("study")
  cache = str(tmp_path_factory.mktemp("cache"))
  c = common.get_config()
  c.stages = ("sft", "dpo")
  c.stage_configs.sft = tiny_config(cache, "sft", **{"training.max_steps": SFT_STEPS, "training.eval_every": 2})
  c.stage_configs.dpo = tiny_config(cache, "dpo", **{"training.max_steps": DPO_STEPS, "init_from": "stage:sft",
                                                     "export.push_to_hub": "someone/tiny-dpo"})
  c.logging.update(wandb=HAS_WANDB, wandb_mode="offline", wandb_project="jaxalign-tests", wandb_tags=("tiny", "ci"))
  fake = FakeHub()
  with pytest.MonkeyPatch.context() as mp:
    fake.install(mp)
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("HF_TOKEN", SECRET)
    from jaxalign import trainer

    log, logger = CapturedLog(), logging.getLogger("jaxalign")
    level = logger.level
    logger.addHandler(log)
    logger.setLevel(logging.INFO)
    try:
      trainer.run(c, str(root))
    finally:
      logger.removeHandler(log)
      logger.setLevel(level)
  return {"root": str(root), "config": c, "hub": fake, "log": log.messages}


class CapturedLog(logging.Handler):
  """The messages of the records it handles (caplog is per test; the study runs once per module)."""

  def __init__(self):
    super().__init__(logging.INFO)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


def jsonl_by_step(path):
  """{step: {metric: value}} of a metrics.jsonl, records of one step merged."""
  out = {}
  with open(path) as f:
    for line in f:
      record = json.loads(line)
      out.setdefault(record.pop("step"), {}).update(record)
  return out


@pytest.mark.slow
def test_each_stage_has_curves_and_the_study_a_summary(study):
  root = study["root"]
  sizes = {}
  for stage in ("sft", "dpo"):
    path = os.path.join(root, stage, curves.CURVES_FILE)
    with Image.open(path) as image:
      sizes[stage] = image.size
  assert sizes["dpo"][1] > sizes["sft"][1]  # DPO draws more panels (rewards, margins, accuracies, log-probs)
  text = open(os.path.join(root, curves.STUDY_FILE)).read()
  done = {s: json.load(open(os.path.join(root, s, "done.json"))) for s in ("sft", "dpo")}
  assert "![sft training curves](sft/curves.png)" in text and "![dpo training curves](dpo/curves.png)" in text
  sft_row = next(line for line in text.splitlines() if line.startswith("| [sft]"))
  cells = [c.strip() for c in sft_row.strip("|").split("|")]
  assert cells[1:4] == ["sft", "random init", str(SFT_STEPS)]
  assert cells[4] == f"{done['sft']['seconds']['stage']:.1f} / {done['sft']['seconds']['loop']:.1f}"
  assert cells[7] == f"{done['sft']['compilations']['train']} / {done['sft']['compilations']['eval']}"
  assert cells[8] == f"{done['sft']['eval/loss']:.4f}"
  dpo_row = next(line for line in text.splitlines() if line.startswith("| [dpo]"))
  assert "[sft/model](sft/model)" in dpo_row  # started from the study's SFT stage
  # The log opened each stage with a header and ended saying where study.md is.
  headers = [m for m in study["log"] if m.startswith("=== stage")]
  assert headers == ["=== stage 1 of 2: sft (task sft, from a random init of opt-125m) ===",
                     f"=== stage 2 of 2: dpo (task dpo, from {os.path.join(root, 'sft', 'model')}) ==="]
  assert f"study summary: {os.path.join(root, curves.STUDY_FILE)}" in study["log"]
  assert (f"stage done: done.json, metrics.jsonl, model/ (the model), curves.png in {os.path.join(root, 'sft')}"
          in study["log"])


@pytest.mark.slow
def test_curve_panels_follow_the_task(study):
  sft = curves.read_metrics(os.path.join(study["root"], "sft", "metrics.jsonl"))
  dpo = curves.read_metrics(os.path.join(study["root"], "dpo", "metrics.jsonl"))
  out = os.path.join(study["root"], "panels.png")
  assert curves.plot_curves(sft, out, "sft")[:2] == ["loss", "perplexity"]
  dpo_panels = curves.plot_curves(dpo, out, "dpo", "dpo")
  assert {"rewards of the chosen and rejected responses", "reward margin (chosen - rejected)",
          "preference accuracy"} <= set(dpo_panels) and "perplexity" not in dpo_panels
  assert set(sft["eval/loss"]) == {2, SFT_STEPS}  # held-out points at eval_every and at the end


def test_read_metrics_keeps_the_last_value_of_a_repeated_step(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/loss": 1.5}\n{"step": 2, "train/loss": 1.25}\n')
  assert curves.read_metrics(str(path)) == {"train/loss": {1: 2.0, 2: 1.25}}
  path.write_text('{"step": 1, "train/loss": 2.0}\nnot json\n')
  with pytest.raises(ValueError, match="metrics.jsonl, line 2"):
    curves.read_metrics(str(path))


@pytest.mark.slow
@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (pip install -e '.[wandb]')")
def test_wandb_offline_run_holds_the_metrics_jsonl_values(study):
  for stage, steps in (("sft", SFT_STEPS), ("dpo", DPO_STEPS)):
    workdir = os.path.join(study["root"], stage)
    (run_dir,) = glob.glob(os.path.join(workdir, "wandb", "offline-run-*"))
    records = wandb_records(run_dir)
    history = {}
    for r in records:
      if r.WhichOneof("record_type") == "history":
        row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
        step = row["_step"]
        history.setdefault(step, {}).update({k: v for k, v in row.items() if not k.startswith("_")})
    assert history == jsonl_by_step(os.path.join(workdir, "metrics.jsonl"))  # same names, same values, same steps
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["task"] == stage and config["training"]["max_steps"] == steps
    assert run.display_name == stage and run.run_group == os.path.basename(study["root"])
    assert list(run.tags) == ["tiny", "ci"] and run.project == "jaxalign-tests"
    summary = {}
    for r in records:
      if r.WhichOneof("record_type") == "summary":
        summary.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.summary.update})
    done = json.load(open(os.path.join(workdir, "done.json")))
    assert summary["steps"] == done["steps"] == steps and summary["compilations/train"] == done["compilations"]["train"]
    assert summary["seconds/loop"] == done["seconds"]["loop"]
    saved = os.path.join(run_dir, "files", "done.json")
    assert json.load(open(saved)) == done and os.path.exists(os.path.join(run_dir, "files", "curves.png"))


def test_missing_wandb_gives_an_install_hint(monkeypatch, tmp_path):
  c = tiny_config(str(tmp_path), "sft", **{"logging.wandb": True})
  monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # what `import wandb` sees when it is not installed
  with pytest.raises(ImportError, match=r'pip install -e "\.\[wandb\]"'):
    trackers.start(c, str(tmp_path))


@pytest.mark.slow
def test_push_sends_the_export_with_its_model_card(study):
  fake = study["hub"]
  assert fake.repos == [{"repo_id": "someone/tiny-dpo", "repo_type": "model", "private": False, "exist_ok": True}]
  (upload,) = fake.uploads  # only the stage that asked is pushed
  assert upload["repo_id"] == "someone/tiny-dpo"
  assert upload["files"] == sorted(["README.md", "config.json", "model.safetensors", "tokenizer.json",
                                    "tokenizer_config.json"])
  card = upload["card"]
  assert card.startswith("---\n") and "library_name: transformers" in card and "- dpo" in card
  assert "Direct Preference Optimization (DPO)" in card and "(a local model)" in card  # began from the SFT stage
  assert "Direct Preference Optimization (DPO) of" in card  # the opening sentence keeps the method's capitals
  assert "| `dpo.beta` | 0.1 |" in card and "| `training.max_steps` | 4 |" in card
  assert "| `optimizer.lr` | 0.001 |" in card and "`synthetic`" in card
  done = json.load(open(os.path.join(study["root"], "dpo", "done.json")))
  assert f"| rewards/accuracies | {done['eval/rewards/accuracies']:.4f} |" in card
  assert SECRET not in card  # the token stays inside huggingface_hub


def test_push_settings_are_checked_before_training(tmp_path):
  c = tiny_config(str(tmp_path), "sft", **{"export.push_to_hub": "no namespace"})
  with pytest.raises(ValueError, match="config.export.push_to_hub"):
    hub_push.check_config(c)
  study = common.get_config()
  study.stages = ("sft",)
  study.stage_configs.sft = tiny_config(str(tmp_path), "sft", **{"export.push_to_hub": "a/b", "export.enabled": False})
  with pytest.raises(ValueError, match="stage_configs.sft.export.push_to_hub needs export.enabled"):
    hub_push.check_config(study)


@pytest.mark.slow
def test_evaluation_in_a_study_refreshes_study_md_and_pushes_its_results(study, tmp_path, monkeypatch):
  """evaluate.py on rated responses, with its workdir inside the study: Table 1 joins study.md, the results folder
  goes to a Hub dataset repo with Table 1 in its card, and a later stage card carries the table too."""
  rated = tmp_path / "rated"
  rated.mkdir()
  for model, scores in (("base", [-4.0, 1.0, -3.0, 2.0]), ("dpo", [-2.0, 1.0, 1.0, 2.0])):
    with open(rated / f"responses-{model}.jsonl", "w") as f:
      for i, score in enumerate(scores):
        set_name = "harmful" if i < 2 else "helpful"
        f.write(json.dumps({"model": model, "set": set_name, "prompt": f"p{i}", "response": f"r{i}",
                            "score": score}) + "\n")
  fake = FakeHub()
  fake.install(monkeypatch)
  config = eval_config.get_config()
  config.rated_responses = str(rated)
  config.metrics.n_bootstrap = 50
  config.push_to_hub = "someone/tiny-eval"
  eval_dir = os.path.join(study["root"], "eval")
  evaluator.run(config, eval_dir)

  text = open(os.path.join(study["root"], curves.STUDY_FILE)).read()
  assert "## Evaluation `eval`" in text
  # base: 1 of 2 harmful answers > -3 (50%), 1 of 2 helpful > -2 (50%); dpo: 100% and 100%.
  assert "| base | 50.0 [" in text and "| dpo | 100.0 [" in text
  (upload,) = fake.uploads
  assert fake.repos[0]["repo_type"] == upload["repo_type"] == "dataset"
  assert upload["files"] == sorted(["README.md", "annotate.html", "comparisons.png", "metrics.png",
                                    "responses-base.jsonl", "responses-dpo.jsonl", "results.json", "results.md",
                                    "scores.png"])  # annotate-key.json (which model is on which side) stays local
  assert os.path.exists(os.path.join(eval_dir, "annotate-key.json"))
  assert "| base | 50.0 [" in upload["card"] and "Gains over `base`" in upload["card"]
  dpo_config = study["config"].stage_configs.dpo
  card = hub_push.stage_card(dpo_config, os.path.join(study["root"], "dpo"), "someone/tiny-dpo",
                             json.load(open(os.path.join(study["root"], "dpo", "done.json"))))
  assert "## Evaluation" in card.content and "| dpo | 100.0 [" in card.content


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_every_task_pushes_a_card_naming_its_method_and_the_model_family(task, tmp_path, monkeypatch):
  """push_stage as the trainer calls it after done.json, for each task of the registry, from an export whose
  config.json names a family other than OPT."""
  config = tiny_config(str(tmp_path / "cache"), task, **{"export.push_to_hub": f"someone/tiny-{task}"})
  export_dir = tmp_path / "stage" / workdirs.EXPORT_DIR
  export_dir.mkdir(parents=True)
  (export_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
  fake = FakeHub()
  fake.install(monkeypatch)
  done = {"steps": 4, "eval/loss": 0.6931, "seconds": {"stage": 1.5}}
  hub_push.push_stage(config, str(tmp_path / "stage"), str(export_dir), done)
  (upload,) = fake.uploads
  card, spec = upload["card"], tasks.spec(task)
  assert upload["repo_id"] == f"someone/tiny-{task}" and upload["files"] == ["README.md", "config.json"]
  assert f"- {task}\n" in card and "- llama\n" in card and "- opt\n" not in card and "OPT" not in card
  assert "of a model of the `llama` family" in card and f"**Method:** {spec.description}" in card
  assert all(f"| `{name}` |" in card for name in spec.settings) and "| loss | 0.6931 |" in card
  model_class = "LlamaForSequenceClassification" if spec.reward_model else "LlamaForCausalLM"
  assert f"{model_class}.from_pretrained('someone/tiny-{task}')" in card

