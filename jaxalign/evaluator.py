"""Evaluation: models answer the harmful and helpful prompt sets, a judge scores the answers, and the metrics and
reports (Table 1 and Table 2 of the paper, with bootstrap CIs) are written. Also held-out preference accuracy:
the judge's, and each DPO model's implicit reward against its reference.

Or, with `rated_responses`, the metrics of existing rated responses (the paper's published files, or our own
`responses-*.jsonl`) without generating anything.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import ml_collections
import numpy as np

from jaxalign import judges, metrics, parallel, rated, reference as reference_lib, reports, sampling
from jaxalign.data import hh, pipeline, prompts as prompts_lib, tokenize
from jaxalign.models import hub
from jaxalign.tokenizer import load_tokenizer
from jaxalign.trainer import resolve_init_path

log = logging.getLogger(__name__)

SETS = ("harmful", "helpful")


def parse_named(spec: str, what: str) -> dict[str, str]:
  """"name=value,name=value" -> {name: value}, in order; a clear error for a malformed item or a repeated name."""
  named = {}
  for item in filter(None, (part.strip() for part in spec.split(","))):
    name, sep, value = item.partition("=")
    if not sep or not name.strip() or not value.strip():
      raise ValueError(f"config.{what}: expected name=value items separated by commas, got {item!r}")
    if name.strip() in named:  # the later one would silently replace the earlier one's results
      raise ValueError(f"config.{what}: the name {name.strip()!r} is given twice ({named[name.strip()]!r} and "
                       f"{value.strip()!r}); give each a distinct name")
    named[name.strip()] = value.strip()
  return named


def prompt_sets(config) -> dict[str, list[str]]:
  """The harmful and helpful prompts: JSON files if given, else the paper's selection from `prompts.source` (with
  the dataset's chosen answers as `<set>_references`, for win rates)."""
  p = config.prompts
  if p.harmful_file or p.helpful_file:
    if not (p.harmful_file and p.helpful_file):
      raise ValueError("config.prompts: give both harmful_file and helpful_file, or neither")
    return {"harmful": prompts_lib.load_prompt_file(p.harmful_file),
            "helpful": prompts_lib.load_prompt_file(p.helpful_file)}
  return prompts_lib.paper_prompt_sets(p.source, n_harmful=p.n_harmful, n_helpful=p.n_helpful,
                                       keywords=tuple(p.keywords), seed=p.seed, style=p.style, with_references=True)


def load_policy(path: str, dtype: str):
  """A causal LM and its tokenizer from a Hub id, a Hugging Face folder or a training workdir."""
  model_dir = hub.resolve_model_dir(resolve_init_path(path))
  return hub.from_pretrained(model_dir, dtype=dtype), load_tokenizer(model_dir)


def judges_by_set(config) -> dict[str, judges.Judge]:
  """The judge of each prompt set; a two-head reward model scores harmful prompts with its harmless head and
  helpful prompts with its helpful head (`judge_heads`)."""
  judge = judges.load_judge(config.judge, batch_size=config.judge_batch_size, dtype=config.model_dtype)
  heads = parse_named(config.judge_heads, "judge_heads")
  if isinstance(judge, judges.OPTRewardJudge) and len(judge.heads) > 1:
    return {s: judge.for_head(heads.get(s, "")) for s in SETS}
  return dict.fromkeys(SETS, judge)


def generate_and_score(config, models: dict[str, str], prompts: dict[str, list[str]], judge_of: dict) -> dict:
  """{model: {set: [{prompt, response, score[, reference_score]}]}} for every model and prompt set; the reference
  score is the judge's score of the dataset's chosen answer, where the prompt set has one."""
  mesh = parallel.make_mesh()
  suffix = config.generation.prompt_suffix
  reference_scores = {s: judge_of[s].score(prompts[s], prompts[f"{s}_references"]) for s in SETS
                      if f"{s}_references" in prompts}
  records: dict[str, dict[str, list[dict]]] = {}
  for name, path in models.items():
    model, tokenizer = load_policy(path, config.model_dtype)
    records[name] = {}
    for set_name in SETS:
      generations = sampling.generate(
          model, tokenizer, [p + suffix for p in prompts[set_name]], max_new_tokens=config.generation.max_new_tokens,
          temperature=config.generation.temperature, top_k=config.generation.top_k, top_p=config.generation.top_p,
          stop_strings=tuple(config.generation.stop_strings), batch_size=config.generation.batch_size,
          seed=config.seed, max_prompt_length=config.generation.max_prompt_length,
          sharding=parallel.batch_sharding(mesh))
      scores = judge_of[set_name].score(prompts[set_name], generations.texts)
      records[name][set_name] = [{"prompt": p, "response": r, "score": float(s)}
                                 for p, r, s in zip(prompts[set_name], generations.texts, scores)]
      for record, reference in zip(records[name][set_name], reference_scores.get(set_name, ())):
        record["reference_score"] = float(reference)
      log.info("%s / %s: mean score %.3f", name, set_name, float(np.mean(scores)))
    del model
  return records


def judge_preference_accuracy(judge_of: dict[str, judges.Judge], pairs: list[hh.PreferencePair]) -> dict[str, float]:
  """How often the judge scores the chosen response above the rejected one, overall and per kind of pair: pairs
  from harmlessness subsets are scored by the harmful set's judge (a two-head model's harmless head), the rest by
  the helpful set's."""
  kinds = {"harmful": [p for p in pairs if "harmless" in p.source], "helpful": [p for p in pairs
                                                                              if "harmless" not in p.source]}
  chosen, rejected, out = [], [], {}
  for kind, kind_pairs in kinds.items():
    if not kind_pairs:
      continue
    prompts = [p.prompt for p in kind_pairs]
    chosen.append(judge_of[kind].score(prompts, [p.chosen for p in kind_pairs]))
    rejected.append(judge_of[kind].score(prompts, [p.rejected for p in kind_pairs]))
    out[f"judge_accuracy/{kind}_pairs"] = metrics.preference_accuracy(chosen[-1], rejected[-1])
  out["judge_accuracy"] = metrics.preference_accuracy(np.concatenate(chosen), np.concatenate(rejected))
  return out


def implicit_reward_accuracy(policy, reference, tokenizer, pairs: list[hh.PreferencePair], config) -> float:
  """DPO's implicit reward accuracy: log π(y_c)/π_ref(y_c) > log π(y_r)/π_ref(y_r) on held-out pairs."""
  tokenized = tokenize.tokenize_pairs(pairs, tokenizer, max_length=config.preference.max_length,
                                      max_prompt_length=config.preference.max_length // 2)
  mesh = parallel.make_mesh()
  batch_size = -(-config.preference.batch_size // mesh.size) * mesh.size  # a whole number of rows per device
  margins = []
  for model in (policy, reference):
    logps = reference_lib.compute_logps(model, tokenized, batch_size=batch_size, buckets=(128, 256, 512),
                                        max_length=config.preference.max_length, pad_id=tokenizer.pad_token_id,
                                        mesh=mesh)
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
      raise ValueError(f"config.preference.references: {name!r} and {reference_name!r} must both be in config.models")
    policy, tokenizer = load_policy(models[name], "float32")
    reference, _ = load_policy(models[reference_name], "float32")
    out[f"implicit_reward_accuracy/{name}"] = implicit_reward_accuracy(policy, reference, tokenizer, pairs, config)
  return out


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Evaluates, writes the reports into `workdir`, prints Table 1, and returns the results."""
  thresholds = dict(harmless_threshold=config.metrics.harmless_threshold,
                    helpful_threshold=config.metrics.helpful_threshold, n_bootstrap=config.metrics.n_bootstrap,
                    seed=config.seed)
  if config.rated_responses:
    records = rated.load_rated_responses(config.rated_responses)
    preference = {}
  else:
    parallel.enable_compilation_cache(config.compilation_cache, pipeline.default_cache_dir())
    models = parse_named(config.models, "models")
    if not models:
      raise ValueError("config.models is empty: give name=path items, e.g. base=facebook/opt-350m,sft=runs/sft")
    judge_of = judges_by_set(config)
    records = generate_and_score(config, models, prompt_sets(config), judge_of)
    preference = preference_report(config, models, judge_of)
  baseline = config.metrics.baseline if config.metrics.baseline in records else None
  results = metrics.metrics_from_rated(records, baseline=baseline, **thresholds)
  if preference:
    results["preference"] = preference
  os.makedirs(workdir, exist_ok=True)
  reports.write_reports(results, workdir)
  if preference:
    with open(os.path.join(workdir, "preference.json"), "w") as f:
      json.dump(preference, f, indent=2)
  reports.print_table(results)
  return results
