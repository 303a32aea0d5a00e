"""Evaluation: models answer the harmful and helpful prompt sets, one or several judges score the answers, and the
metrics and reports are written: Table 1 and Table 2 of the paper with bootstrap CIs, paired comparisons of every
two models (paired bootstrap, exact McNemar) and the paper's claims, every judge's Table 1 and their agreement,
held-out preference accuracy (the judge's, and each DPO model's implicit reward against its reference), and the
blind annotation page for a human evaluation, whose answers a later run reads back (`human_annotations`).

Or, with `rated_responses`, the same reports from existing rated responses (the paper's published files, or our
own `responses-*.jsonl`) without generating anything.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ml_collections
import numpy as np

from jaxalign import (annotate, curves, hub_push, judges, metrics, pair_scores, parallel, progress, rated,
                      reference as reference_lib, reports, rewards, sampling, workdirs)
from jaxalign.config_lib import parse_named
from jaxalign.errors import ConfigError
from jaxalign.data import hh, layouts, pipeline, prompts as prompts_lib, tokenize
from jaxalign.models import hub
from jaxalign.tokenizer import load_tokenizer
from jaxalign.workdirs import resolve_init_path

log = logging.getLogger(__name__)

SETS = ("harmful", "helpful")


def prompt_sets(config) -> dict[str, list[str]]:
  """The harmful and helpful prompts: JSON files if given, else the paper's selection from `prompts.source` (with
  the dataset's chosen answers as `<set>_references`, for win rates)."""
  p = config.prompts
  if p.harmful_file or p.helpful_file:
    if not (p.harmful_file and p.helpful_file):
      raise ConfigError("config.prompts: give both harmful_file and helpful_file, or neither")
    return {"harmful": prompts_lib.load_prompt_file(p.harmful_file),
            "helpful": prompts_lib.load_prompt_file(p.helpful_file)}
  return prompts_lib.paper_prompt_sets(p.source, n_harmful=p.n_harmful, n_helpful=p.n_helpful,
                                       keywords=tuple(p.keywords), seed=p.seed, style=p.style, with_references=True,
                                       harmful_subset=p.harmful_subset, helpful_subset=p.helpful_subset,
                                       split=p.split)


def load_policy(path: str, dtype: str):
  """A causal LM and its tokenizer from a Hub id, a Hugging Face folder or a training workdir."""
  model_dir = hub.resolve_model_dir(resolve_init_path(path))
  return hub.from_pretrained(model_dir, dtype=dtype), load_tokenizer(model_dir)


def judge_thresholds(config, names: list[str]) -> dict[str, dict[str, float]]:
  """Each judge's (harmless, helpful) thresholds: `metrics.judge_thresholds` ("name=harmless:helpful") where it
  names the judge, else `metrics.harmless_threshold` / `metrics.helpful_threshold`."""
  default = {"harmless_threshold": config.metrics.harmless_threshold,
             "helpful_threshold": config.metrics.helpful_threshold}
  out = dict.fromkeys(names, default)
  for name, value in parse_named(config.metrics.judge_thresholds, "metrics.judge_thresholds").items():
    try:
      harmless, helpful = map(float, value.split(":"))
    except ValueError:
      harmless = helpful = None
    if harmless is None or name not in names:
      raise ConfigError(f"config.metrics.judge_thresholds: expected name=harmless:helpful for one of the judges "
                        f"{names}, e.g. {names[-1]}=0:0; got {name}={value}")
    out[name] = {"harmless_threshold": harmless, "helpful_threshold": helpful}
  return out


def generate(config, models: dict[str, str], prompts: dict[str, list[str]]) -> dict[str, dict[str, list[dict]]]:
  """{model: {set: [{prompt, response}]}}: every model's answers to every prompt set."""
  mesh = parallel.make_mesh()
  suffix = config.generation.prompt_suffix
  answers: dict[str, dict[str, list[dict]]] = {}
  for name, path in models.items():
    model, tokenizer = load_policy(path, config.model_dtype)
    answers[name] = {}
    chat = config.generation.chat_template
    if chat:
      tokenize.set_chat_template(tokenizer, chat)
    bar = progress.Progress("generating", name, sum(len(prompts[s]) for s in SETS))
    for set_name in SETS:
      bar.start(set_name)
      texts, stops = [p + suffix for p in prompts[set_name]], tuple(config.generation.stop_strings)
      if chat:  # the turns rendered by the template; answers end at its end-of-turn token
        texts, end_of_turn = tokenize.render_prompts(tokenizer, prompts[set_name])
        stops += end_of_turn
      generations = sampling.generate(
          model, tokenizer, texts, max_new_tokens=config.generation.max_new_tokens,
          temperature=config.generation.temperature, top_k=config.generation.top_k, top_p=config.generation.top_p,
          stop_strings=stops, batch_size=config.generation.batch_size,
          seed=config.seed, max_prompt_length=config.generation.max_prompt_length,
          sharding=parallel.batch_sharding(mesh), add_special_tokens=not chat)
      answers[name][set_name] = [{"prompt": p, "response": r} for p, r in zip(prompts[set_name], generations.texts)]
      bar.done(set_name, len(prompts[set_name]))
    bar.close()
    del model
  return answers


def score_answers(answers: dict[str, dict[str, list[dict]]], prompts: dict[str, list[str]],
                  judge_of: dict[str, judges.Judge]) -> dict[str, dict[str, list[dict]]]:
  """The answers rated by one judge: {model: {set: [{prompt, response, score[, reference_score]}]}}; the reference
  score is the judge's score of the dataset's chosen answer, where the prompt set has one."""
  reference_scores = {s: judge_of[s].score(prompts[s], prompts[f"{s}_references"]) for s in SETS
                      if f"{s}_references" in prompts}
  records: dict[str, dict[str, list[dict]]] = {}
  for name, sets in answers.items():
    records[name] = {}
    bar = progress.Progress("judging", name, sum(len(items) for items in sets.values()))
    for set_name, items in sets.items():
      bar.start(set_name)
      scores = judge_of[set_name].score([a["prompt"] for a in items], [a["response"] for a in items])
      bar.done(set_name, len(items))
      records[name][set_name] = [{**a, "score": float(s)} for a, s in zip(items, scores)]
      for record, reference in zip(records[name][set_name], reference_scores.get(set_name, ())):
        record["reference_score"] = float(reference)
      log.info("%s / %s: mean score %.3f", name, set_name, float(np.mean(scores)))
    bar.close()
  return records


def judge_preference_accuracy(judge_of: dict[str, judges.Judge], pairs: list[hh.PreferencePair]) -> dict[str, float]:
  """How often the judge scores the chosen response above the rejected one, overall and per kind of pair: pairs
  from harmlessness subsets are scored by the harmful set's judge (a two-head model's harmless head), the rest by
  the helpful set's."""
  scores = pair_scores.score_pairs(pairs, judge_of)
  kinds = np.array([pair_scores.pair_kind(p) for p in pairs])
  out = {f"judge_accuracy/{kind}_pairs": metrics.preference_accuracy(scores[kinds == kind, 0], scores[kinds == kind, 1])
         for kind in SETS if np.any(kinds == kind)}
  out["judge_accuracy"] = metrics.preference_accuracy(scores[:, 0], scores[:, 1])
  return out


def implicit_reward_accuracy(policy, reference, tokenizer, pairs: list[hh.PreferencePair], config) -> float:
  """DPO's implicit reward accuracy: log π(y_c)/π_ref(y_c) > log π(y_r)/π_ref(y_r) on held-out pairs, tokenized and
  batched as the training pairs are (separate rows of `preference.max_length` tokens)."""
  pref = config.preference
  tokenized = tokenize.tokenize_pairs(pairs, tokenizer, max_length=pref.max_length,
                                      max_prompt_length=pref.max_prompt_length)
  layout = layouts.SeparateRows(max_length=pref.max_length)
  mesh = parallel.make_mesh()
  batch_size = -(-pref.batch_size // mesh.size) * mesh.size  # a whole number of rows per device
  margins = []
  for model in (policy, reference):
    logps = reference_lib.compute_logps(model, layout, tokenized, batch_size=batch_size,
                                        pad_id=tokenizer.pad_token_id, mesh=mesh)
    margins.append(logps[:, 0] - logps[:, 1])
  return metrics.preference_accuracy(margins[0], margins[1])


def preference_report(config, models: dict[str, str], judge_of: dict[str, judges.Judge]) -> dict[str, Any]:
  """Held-out preference accuracy of the judge and of each DPO model named in `preference.references`."""
  pref = config.preference
  if not pref.pairs:
    return {}
  pairs, _ = hh.load_preference_pairs(pref.source, split="test")
  pairs = [pairs[i] for i in np.sort(np.random.default_rng(config.seed).permutation(len(pairs))[:pref.pairs])]
  out: dict[str, Any] = {"pairs": len(pairs), **judge_preference_accuracy(judge_of, pairs)}
  for name, reference_name in parse_named(pref.references, "preference.references").items():
    if name not in models or reference_name not in models:
      raise ConfigError(f"config.preference.references: {name!r} and {reference_name!r} must both be in config.models")
    policy, tokenizer = load_policy(models[name], "float32")
    reference, _ = load_policy(models[reference_name], "float32")
    out[f"implicit_reward_accuracy/{name}"] = implicit_reward_accuracy(policy, reference, tokenizer, pairs, config)
  return out


def _judge_summary(result: dict[str, Any]) -> dict[str, Any]:
  """One judge's thresholds, Table 1 metrics and claims, for the multi-judge sections of the reports."""
  return {"config": result["config"], "claims": result["claims"],
          "models": {name: {"metrics": m["metrics"], "gains": m["gains"]} for name, m in result["models"].items()}}


def rated_by_judge(config) -> tuple[dict[str, dict], dict[str, Any]]:
  """({judge: {model: {set: records}}}, preference report): the rated responses of `rated_responses` (under the
  first judge's name), or every model's answers rated by every judge, the first of them also ranking held-out
  preference pairs."""
  names = list(judges.parse_judges(config.judges, config.judge).items())
  if config.rated_responses:
    return {names[0][0]: rated.load_rated_responses(config.rated_responses)}, {}
  parallel.enable_compilation_cache(config.compilation_cache, pipeline.default_cache_dir())
  models = parse_named(config.models, "models")
  if not models:
    raise ConfigError("config.models is empty: give name=path items, e.g. base=facebook/opt-350m,sft=runs/sft")
  prompts = prompt_sets(config)
  answers = generate(config, models, prompts)
  set_heads = parse_named(config.judge_heads, "judge_heads")
  by_judge, preference = {}, {}
  for i, (name, path) in enumerate(names):  # one judge in memory at a time
    judge_of = judges.load_set_judges(path, SETS, set_heads, batch_size=config.judge_batch_size,
                                      dtype=config.model_dtype)
    by_judge[name] = score_answers(answers, prompts, judge_of)
    if i == 0:
      preference = preference_report(config, models, judge_of)
    del judge_of
  return by_judge, preference


def optimised_judges(models: dict[str, str], judge_paths: dict[str, str]) -> list[str]:
  """A note for each evaluated model that was trained against a reward model which is also a judge here (the
  training config its workdir recorded, `online.rewards`, where a study's "stage:<name>" is already its export): a
  reward that was optimised is not an independent measure. Paths are compared as real paths (a relative one read
  from the current directory, as when training ran from there). Models without a recorded training config (a Hub
  id, a plain folder, a workdir whose checkpoints were deleted) get none."""
  judge_at = {name: workdirs.model_location(path) for name, path in judge_paths.items()}
  notes = []
  for model, path in models.items():
    workdir = workdirs.training_workdir(path)
    trained = (workdirs.training_config(workdir) if workdir else None) or {}
    specs = parse_named(trained.get("online", {}).get("rewards", ""), "online.rewards")
    for reward, spec in specs.items():
      if not rewards.is_reward_model(spec):
        continue
      notes += [f"{model!r} was trained against the reward {reward!r} ({spec}), which is the same model as the judge "
                f"{judge!r} ({judge_paths[judge]}): that judge's scores of {model!r} are not an independent measure "
                "(the model was optimised to raise them); judge it with another model as well"
                for judge, location in judge_at.items() if location == workdirs.model_location(spec)]
  return notes


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Evaluates, writes the reports (and the human-annotation page) into `workdir`, prints Table 1, and returns the
  results: those of the first judge, with every judge's Table 1 and their agreement when there are several, held-out
  preference accuracy, and human annotations' win rates when `human_annotations` names files. Inside a study folder
  it also refreshes the study's study.md; with `push_to_hub` it pushes the folder to a Hub dataset repo."""
  if config.push_to_hub:
    hub_push.check_repo_id(config.push_to_hub, "push_to_hub")
  notes = optimised_judges(parse_named(config.models, "models") if not config.rated_responses else {},
                           dict(judges.parse_judges(config.judges, config.judge)))
  for note in notes:
    log.warning("%s", note)
  by_judge, preference = rated_by_judge(config)
  thresholds = judge_thresholds(config, list(by_judge))
  baseline = config.metrics.baseline if config.metrics.baseline in next(iter(by_judge.values())) else None
  results_by_judge = {name: metrics.metrics_from_rated(records, baseline=baseline,
                                                       n_bootstrap=config.metrics.n_bootstrap, seed=config.seed,
                                                       **thresholds[name])
                      for name, records in by_judge.items()}
  primary = next(iter(results_by_judge))
  results = results_by_judge[primary]
  if len(results_by_judge) > 1:
    results["judges"] = {name: _judge_summary(r) for name, r in results_by_judge.items()}
    results["judge_agreement"] = metrics.judge_agreement(results_by_judge)
    for name, model in results["models"].items():  # every judge's score beside the primary one, in responses-*.jsonl
      for set_name, records in model["records"].items():
        for i, record in enumerate(records):
          record["judge_scores"] = {j: by_judge[j][name][set_name][i]["score"] for j in by_judge}
  if preference:
    results["preference"] = preference
  if notes:
    results["judge_notes"] = notes
  os.makedirs(workdir, exist_ok=True)
  if config.human_annotations:
    files = [f.strip() for f in config.human_annotations.split(",") if f.strip()]
    key_path = config.annotation_key or annotate.key_path(config.rated_responses, workdir)
    results["human"] = annotate.human_report(annotate.read_annotations(files, key_path),
                                             n_bootstrap=config.metrics.n_bootstrap, seed=config.seed)
  pairs = list(parse_named(config.annotation_pairs, "annotation_pairs").items()) or None
  # From rated responses (reading answers back, or reporting again) a page and key already there are kept.
  written = annotate.write_annotation_files(by_judge[primary], workdir, pairs=pairs, seed=config.seed,
                                           keep_existing=bool(config.rated_responses))
  written.update(reports.write_reports(results, workdir))
  written["study"] = curves.refresh_study_summary(workdir)
  reports.print_locations(written)
  reports.print_table(results)
  if config.push_to_hub:
    hub_push.push_results(workdir, config.push_to_hub, private=config.hub_private)
  return results
