"""Push to the Hugging Face Hub: a trained stage's exported model (`export.push_to_hub=<repo id>`) or an evaluation's
results folder (evaluate.py's `push_to_hub`), each with a generated card (`README.md`).

A model card names the base model, the data, the method and its hyperparameters, the stage's held-out figures from
`done.json`, and the Table 1 of any evaluation found beside the stage (an evaluate.py workdir inside the same study).
A results card is the evaluation's Table 1 and Table 2. Uploads go through `huggingface_hub.HfApi` (create the repo
if needed, then one commit of the whole folder); the token is huggingface_hub's own (`HF_TOKEN` or `hf auth login`)
and is never read, printed or stored here.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from huggingface_hub import DatasetCard, DatasetCardData, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from jaxalign import annotate, reports, tasks
from jaxalign.models import hub, registry
from jaxalign.workdirs import EXPORT_DIR

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
RESULTS_FILE = "results.json"  # evaluate.py's
PROJECT_URL = "https://arxiv.org/abs/2509.09055"


def check_repo_id(repo_id: str, field: str) -> None:
  """Fails before any training when `field` (a dotted config name) holds no valid Hub repo id."""
  try:
    validate_repo_id(repo_id)
  except HFValidationError as e:
    raise ValueError(f"config.{field} = {repo_id!r} is not a Hub repo id: expected 'user/name' or 'org/name' "
                     f"({e})") from None
  if "/" not in repo_id:
    raise ValueError(f"config.{field} = {repo_id!r}: give the namespace too, 'user/name' or 'org/name'")


def check_config(config) -> None:
  """Checks a training config's push settings (every stage of a study) before anything runs."""
  if config.stages:
    if config.export.push_to_hub:
      raise ValueError("config.export.push_to_hub is a setting of each stage in a study: use "
                       "--config.stage_configs.<name>.export.push_to_hub=<repo id> for the stage(s) to push")
    for name in config.stages:
      stage = config.stage_configs[name]
      if stage.export.push_to_hub:
        check_repo_id(stage.export.push_to_hub, f"stage_configs.{name}.export.push_to_hub")
        if not stage.export.enabled:
          raise ValueError(f"config.stage_configs.{name}.export.push_to_hub needs export.enabled = True")
    return
  if config.export.push_to_hub:
    check_repo_id(config.export.push_to_hub, "export.push_to_hub")
    if not config.export.enabled:
      raise ValueError("config.export.push_to_hub needs config.export.enabled = True (the pushed folder is the export)")


def _is_hub_id(name: str) -> bool:
  """A Hub id (not a local path, not our synthetic data)."""
  if not name or name == "synthetic" or os.path.exists(name):
    return False
  try:
    validate_repo_id(name)
  except HFValidationError:
    return False
  return True


def _setting(config, dotted: str):
  value = config
  for part in dotted.split("."):
    value = value[part]
  return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else value


def hyperparameters(config) -> dict[str, Any]:
  """The settings that define the stage's training, by their config names: the common ones, the task's own
  (`tasks.TaskSpec.settings`) and LoRA's when enabled."""
  names = ("task", "optimizer.name", "optimizer.lr", "optimizer.schedule", "optimizer.warmup_steps",
           "optimizer.weight_decay", "optimizer.grad_clip", "training.batch_size", "training.grad_accum",
           "training.num_epochs", "training.max_steps", "data.max_length", "data.max_prompt_length", "model.dtype",
           "seed", *tasks.spec(config.task).settings)
  if config.lora.enabled:
    names += ("lora.rank", "lora.alpha", "lora.dropout", "lora.targets")
  return {name: _setting(config, name) for name in names}


def evaluation_sections(results_paths: list[str]) -> list[str]:
  """Table 1 (and Table 2 where there is a baseline) of each results.json, as Markdown sections."""
  parts = []
  for path in results_paths:
    with open(path) as f:
      results = json.load(f)
    name = os.path.basename(os.path.dirname(os.path.abspath(path)))
    c = results["config"]
    parts += [f"### Evaluation `{name}`",
              f"HmR = % of answers to harmful prompts the judge scores > {c['harmless_threshold']:g}, HpR = % of "
              f"answers to helpful prompts scored > {c['helpful_threshold']:g}, CAS = (HmR + HpR) / 2; brackets: "
              f"{round(100 * c['ci_level'])}% bootstrap CIs.",
              reports.markdown_table(*reports.table1(results))]
    if c.get("baseline") is not None:
      parts += [f"Gains over `{c['baseline']}`:", reports.markdown_table(*reports.table2(results))]
  return parts


def evaluations_beside(workdir: str) -> list[str]:
  """results.json of the evaluate.py workdirs next to a stage's workdir (inside the same study folder)."""
  root = os.path.dirname(os.path.abspath(workdir))
  found = [os.path.join(root, n, RESULTS_FILE) for n in sorted(os.listdir(root))]
  return [p for p in found if os.path.exists(p)]


def exported_family(workdir: str) -> registry.Family:
  """The model family of a stage's export (its config.json's `model_type`)."""
  return registry.family(hub.load_config(os.path.join(workdir, EXPORT_DIR))["model_type"])


def _usage(repo_id: str, family: registry.Family, reward_model: bool) -> list[str]:
  model_class = family.hf_sequence_classification if reward_model else family.hf_causal_lm
  lines = ["## Use", f"```python\nfrom transformers import AutoTokenizer, {model_class}\n"
           f"tokenizer = AutoTokenizer.from_pretrained({repo_id!r})\n"
           f"model = {model_class}.from_pretrained({repo_id!r})\n```"]
  return lines if reward_model else lines + [f"Or talk to it: `python -m jaxalign.chat {repo_id}`."]


def stage_card(config, workdir: str, repo_id: str, done: dict[str, Any]) -> ModelCard:
  """The model card of a trained stage (its export in `<workdir>/export`): base model, model family, data, method
  and hyperparameters, held-out figures, and the evaluation table when an evaluation lies beside the stage."""
  spec, family = tasks.spec(config.task), exported_family(workdir)
  base, source = config.init_from, config.data.source
  data = ModelCardData(
      base_model=base if _is_hub_id(base) else None, datasets=[source] if _is_hub_id(source) else None,
      library_name="transformers", pipeline_tag=None if spec.reward_model else "text-generation",
      tags=["jaxalign", config.task, family.model_type] + (["lora"] if config.lora.enabled else []))
  subsets = f" (subsets: {config.data.subsets})" if config.data.subsets else " (all subsets)"
  starts = f"`{base}`" + ("" if _is_hub_id(base) else " (a local model)") if base else \
      f"a random initialisation of `{config.model.preset}`"
  held_out = {k: v for k, v in done.items() if k.startswith("eval/")}
  lines = [f"# {repo_id.split('/')[-1]}",
           f"{spec.description[0].upper()}{spec.description[1:]} of a model of the `{family.model_type}` family "
           f"with [jaxalign]({PROJECT_URL}) (JAX/Flax), exported in Hugging Face format.",
           "## Training",
           f"- **Starts from:** {starts}",
           f"- **Data:** `{source}`{subsets}, train split `{config.data.train_split}`",
           f"- **Method:** {spec.description}" + (" with LoRA adapters (merged)" if config.lora.enabled else ""),
           f"- **Steps:** {done.get('steps', 'n/a')}; wall time {done.get('seconds', {}).get('stage', 'n/a')} s",
           "### Hyperparameters",
           reports.markdown_table(["Setting", "Value"],
                                  [[f"`{k}`", str(v)] for k, v in hyperparameters(config).items()])]
  if held_out:
    lines += ["### Held-out figures at the end of training",
              reports.markdown_table(["Metric", "Value"],
                                     [[k[len("eval/"):], f"{v:.4f}"] for k, v in held_out.items()])]
  evaluations = evaluation_sections(evaluations_beside(workdir))
  if evaluations:
    lines += ["## Evaluation", *evaluations]
  lines += _usage(repo_id, family, spec.reward_model)
  return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(lines) + "\n")


def results_card(results_dir: str, repo_id: str) -> DatasetCard:
  """The card of an evaluation's results folder: what was measured, Table 1, Table 2."""
  data = DatasetCardData(tags=["jaxalign", "alignment-evaluation"])
  lines = [f"# {repo_id.split('/')[-1]}",
           f"An alignment evaluation made with [jaxalign]({PROJECT_URL}): each model's answers to harmful and helpful "
           "prompts (`responses-<model>.jsonl`), the judge's scores, and the metrics (`results.json`, `results.md`).",
           *evaluation_sections([os.path.join(results_dir, RESULTS_FILE)])]
  return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(lines) + "\n")


def folder_files(folder: str) -> list[str]:
  """Every file under `folder`, relative, sorted: what `upload_folder` sends."""
  return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder) for f in files)


def push(folder: str, repo_id: str, card: ModelCard | DatasetCard, *, repo_type: str = "model",
         private: bool = False, keep_local: tuple[str, ...] = ()) -> list[str]:
  """Writes `card` as the folder's README.md, creates the repo if needed and uploads the folder, less the files
  named in `keep_local`, in one commit; returns the files sent."""
  card.save(os.path.join(folder, CARD_FILE))
  files = [name for name in folder_files(folder) if name not in keep_local]
  api = HfApi()  # the token comes from HF_TOKEN or the login cache, inside huggingface_hub
  try:
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type=repo_type, ignore_patterns=list(keep_local),
                      commit_message=f"Upload {os.path.basename(os.path.normpath(folder))} from jaxalign")
  except Exception as e:  # offline, no login, no write access: the cause attached, the folder kept
    raise RuntimeError(f"pushing {folder} to the Hub {repo_type} repo {repo_id!r} failed: {e}. The folder (with its "
                       f"{CARD_FILE}) is complete; log in (`hf auth login` or HF_TOKEN) and push it again with "
                       f"`hf upload {repo_id} {folder}`") from e
  log.info("pushed %d files of %s to https://huggingface.co/%s%s", len(files), folder,
           "datasets/" if repo_type == "dataset" else "", repo_id)
  return files


def push_stage(config, workdir: str, export_dir: str, done: dict[str, Any]) -> list[str]:
  """Pushes a finished stage's exported model to `config.export.push_to_hub` with its model card."""
  repo_id = config.export.push_to_hub
  return push(export_dir, repo_id, stage_card(config, workdir, repo_id, done), private=config.export.hub_private)


def push_results(results_dir: str, repo_id: str, *, private: bool = False) -> list[str]:
  """Pushes an evaluation's results folder to a Hub dataset repo with its card; the key that unblinds the human
  annotation page stays local."""
  return push(results_dir, repo_id, results_card(results_dir, repo_id), repo_type="dataset", private=private,
              keep_local=(annotate.KEY_FILE,))
