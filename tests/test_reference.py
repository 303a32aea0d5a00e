"""The reference is prepared before the streams and follows from the loss: a reference-free loss builds, loads and
runs none; precomputed log-probs are computed in each split's own layout and travel with its batches."""

import json
import os

import numpy as np
import pytest

from jaxalign import reference as reference_lib, step, tasks, trainer
from jaxalign.data import layouts, pipeline
from helpers import losses_by_step, prepared, step_flops, tiny_config


@pytest.mark.parametrize("reference", ["model", "precomputed"])
def test_a_reference_free_loss_builds_and_runs_no_reference(reference, tmp_path, monkeypatch):
  cache_dir = str(tmp_path / "cache")  # its own: the session's cache holds other tests' reference log-probs
  passes = []
  monkeypatch.setattr(reference_lib, "compute_logps", lambda *args, **kwargs: passes.append(args))
  config = tiny_config(cache_dir, "dpo", **{"dpo.loss_type": "reference_free", "dpo.reference": reference})
  task, model, data, prepared_reference, _ = prepared(config)
  assert not task.uses_reference
  assert prepared_reference.mode == "none" and prepared_reference.state is None and not prepared_reference.logps
  assert not passes  # no reference pass over the data
  assert not os.path.exists(os.path.join(cache_dir, "reference"))
  flops_free = step.training_flops(model, prepared_reference)(128, 1000.0, 100.0)
  flops_live = step.training_flops(model, reference_lib.Reference("model"))(128, 1000.0, 100.0)
  assert flops_free < flops_live  # the step's FLOPs (and MFU) count no reference forward


def test_the_compiled_step_of_a_reference_free_loss_has_no_reference_forward(cache_dir):
  common = {"data.eval_pairs": 0}
  free = step_flops(tiny_config(cache_dir, "dpo", **common, **{"dpo.loss_type": "reference_free",
                                                                "dpo.reference": "model"}))
  live = step_flops(tiny_config(cache_dir, "dpo", **common, **{"dpo.reference": "model"}))
  precomputed = step_flops(tiny_config(cache_dir, "dpo", **common, **{"dpo.reference": "precomputed"}))
  assert free == pytest.approx(precomputed, rel=0.02)
  assert free < 0.85 * live  # a forward of the same rows is about a third of forward + backward


@pytest.mark.slow
def test_held_out_reference_logps_are_computed_in_the_held_out_layout(cache_dir, tmp_path, monkeypatch):
  """Packed training rows, unpacked held-out rows: each split's pass runs in its own layout, and the held-out
  metrics equal those against a live reference."""
  layouts_seen = []
  compute = reference_lib.compute_logps

  def recording(model, layout, examples, **kwargs):
    layouts_seen.append(layout)
    return compute(model, layout, examples, **kwargs)

  monkeypatch.setattr(reference_lib, "compute_logps", recording)
  done = {}
  for mode in ("precomputed", "model"):
    config = tiny_config(cache_dir, "dpo", **{"data.prefix_sharing": True, "data.packing": True,
                                              "dpo.reference": mode, "training.max_steps": 2})
    trainer.run(config, str(tmp_path / mode))
    done[mode] = json.load(open(tmp_path / mode / "done.json"))
  assert [type(l) for l in layouts_seen] == [layouts.SharedRows] * 2
  assert [l.packing for l in layouts_seen] == [True, False]  # train packed; held-out as its batches are
  for key in ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins"):
    assert done["precomputed"][key] == pytest.approx(done["model"][key], abs=1e-5), key
  assert losses_by_step(str(tmp_path / "precomputed"))[2] == pytest.approx(losses_by_step(str(tmp_path / "model"))[2],
                                                                           abs=1e-5)


def test_held_out_batches_carry_their_own_pairs_reference_logps(cache_dir):
  config = tiny_config(cache_dir, "dpo", **{"data.prefix_sharing": True, "data.packing": True,
                                            "dpo.reference": "precomputed"})
  task, model, data, reference, mesh = prepared(config)
  streams = pipeline.streams(config, data, mesh, 1, reference.per_pair())
  assert streams.eval_batches
  for batch in streams.eval_batches:
    live = tasks.pair_logprobs(model, batch)
    present = np.asarray(batch.pair_mask) == 1
    np.testing.assert_allclose(np.asarray(batch.extras["reference_chosen_logps"])[present],
                               np.asarray(live.chosen)[present], atol=1e-5)
    np.testing.assert_allclose(np.asarray(batch.extras["reference_rejected_logps"])[present],
                               np.asarray(live.rejected)[present], atol=1e-5)
