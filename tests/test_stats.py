"""stats.py against hand-computed values, and the paired comparisons and claims built on it (metrics.py)."""

import math

import numpy as np
import pytest

from jaxalign import metrics, stats


def test_paired_bootstrap_matches_the_exact_bootstrap_distribution():
  # Two items, per-item differences +1 and 0: a resample of two is 100 (both the first), 50 (one each) or 0, with
  # probabilities 1/4, 1/2, 1/4; so the central 40% interval is [50, 50] and the 95% one [0, 100].
  a, b = [True, False], [False, False]
  narrow = stats.paired_bootstrap_diff(a, b, n_bootstrap=20000, seed=0, level=0.4)
  assert narrow == {"diff": 50.0, "ci": [50.0, 50.0]}
  assert stats.paired_bootstrap_diff(a, b, n_bootstrap=20000, seed=0)["ci"] == [0.0, 100.0]


def test_pairing_keeps_shared_verdicts_together():
  # 50 prompts, the two models agree on all but one (only a passes): a draw's difference is 2k points, k the copies
  # of that prompt, k ~ Binomial(50, 1/50): P(k = 0) = 0.364 > 2.5%, P(k <= 3) = 0.982 > 97.5% > P(k <= 2) = 0.922.
  shared = np.random.default_rng(0).random(50) < 0.5
  a, b = shared.copy(), shared.copy()
  a[0], b[0] = True, False
  result = stats.paired_bootstrap_diff(a, b, n_bootstrap=20000, seed=1)
  assert result == {"diff": 2.0, "ci": [0.0, 6.0]}
  # Identical and opposite systems: no spread at all.
  assert stats.paired_bootstrap_diff(shared, shared)["ci"] == [0.0, 0.0]
  assert stats.paired_bootstrap_diff([1] * 5, [0] * 5) == {"diff": 100.0, "ci": [100.0, 100.0]}
  with pytest.raises(ValueError, match="same items"):
    stats.paired_bootstrap_diff([1, 0], [1])
  with pytest.raises(ValueError, match="pass/fail"):
    stats.paired_bootstrap_diff([0.5, 1], [1, 1])


def test_exact_mcnemar_by_hand():
  # 9 prompts only a passes, 6 only b (the paper's SFT vs base on harmful prompts): p = 2 P(X <= 6), X ~ Bin(15, 1/2).
  a = [1] * 9 + [0] * 6 + [1] * 20 + [0] * 15
  b = [0] * 9 + [1] * 6 + [1] * 20 + [0] * 15
  want = 2 * sum(math.comb(15, k) for k in range(7)) / 2**15
  assert want == pytest.approx(0.607238, abs=1e-6)
  got = stats.mcnemar_exact(a, b)
  assert (got["a_only"], got["b_only"]) == (9, 6) and got["p_value"] == pytest.approx(want, rel=1e-12)
  assert stats.mcnemar_exact([0] * 5, [1] * 5)["p_value"] == pytest.approx(2 / 32)  # 0 of 5: 2 * (1/2)^5
  assert stats.mcnemar_exact([1, 0, 1], [1, 0, 1])["p_value"] == 1.0  # no discordant prompt
  assert stats.mcnemar_exact([1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1])["p_value"] == 1.0  # 3 vs 3


def test_kappa_spearman_and_win_rate_by_hand():
  # p_o = 3/4; p_e = (2/4)(1/4) + (2/4)(3/4) = 1/2; kappa = (3/4 - 1/2) / (1 - 1/2) = 1/2.
  assert stats.cohen_kappa([1, 1, 0, 0], [1, 0, 0, 0]) == pytest.approx(0.5)
  # Three labels: p_o = 4/6, p_e = (2*3 + 2*1 + 2*2) / 36 = 1/3, kappa = (2/3 - 1/3) / (2/3) = 1/2.
  assert stats.cohen_kappa(list("aabbcc"), list("aabacb")) == pytest.approx(0.5)
  assert stats.cohen_kappa([1, 1], [1, 1]) == 1.0
  assert stats.cohen_kappa([1, 0], [0, 1]) == pytest.approx(-1.0)
  # rho = 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 2 / 60 = 0.8.
  assert stats.spearman_rho([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)
  assert math.isnan(stats.spearman_rho([1, 1, 1], [1, 2, 3]))
  # Wins 2, losses 1, ties 1: (2 + 0.5) / 4 = 62.5%; sign test 2 of 3 at 1/2: p = 1.
  won = stats.win_rate_ci([1, 1, -1, 0], n_bootstrap=200)
  assert {k: won[k] for k in ("n", "wins", "losses", "ties", "win_rate", "p_value")} == {
      "n": 4, "wins": 2, "losses": 1, "ties": 1, "win_rate": 62.5, "p_value": 1.0}
  assert 0.0 <= won["ci"][0] <= 62.5 <= won["ci"][1] <= 100.0
  assert stats.win_rate_ci([1] * 6)["ci"] == [100.0, 100.0] and stats.win_rate_ci([1] * 6)["p_value"] == 2 / 64


def _records(passes, threshold):
  return [{"prompt": f"p{i}", "response": "r", "score": threshold + (1.0 if ok else -1.0)}
          for i, ok in enumerate(passes)]


def _models(harmful_counts, helpful_counts, n=30):
  """Nested passes: a model passing k prompts passes the first k, so a better model passes a superset."""
  return {name: {"harmful": _records([i < harmful_counts[name] for i in range(n)], -3.0),
                 "helpful": _records([i < helpful_counts[name] for i in range(n)], -2.0)}
          for name in harmful_counts}


def test_paired_comparisons_and_claims_supported():
  counts = {"base": 0, "sft": 20, "dpo": 10, "sft+dpo": 30}
  results = metrics.metrics_from_rated(_models(counts, counts), n_bootstrap=500)
  pairs = [(c["a"], c["b"]) for c in results["comparisons"]]
  assert pairs == [("sft", "base"), ("dpo", "base"), ("sft+dpo", "base"), ("dpo", "sft"), ("sft+dpo", "sft"),
                   ("sft+dpo", "dpo")]
  dpo_vs_sft = results["comparisons"][3]
  # dpo passes 10, sft 20 of 30 nested: 10 prompts only sft passes, p = 2 (1/2)^10.
  assert dpo_vs_sft["hmr"]["diff"] == pytest.approx(-100 / 3)
  assert (dpo_vs_sft["hmr"]["a_only"], dpo_vs_sft["hmr"]["b_only"]) == (0, 10)
  assert dpo_vs_sft["hmr"]["p_value"] == pytest.approx(2 / 1024)
  assert dpo_vs_sft["cas"]["diff"] == pytest.approx(-100 / 3) and dpo_vs_sft["cas"]["ci"][1] < 0
  assert [c["verdict"] for c in results["claims"]] == ["supported"] * 3
  # "sft beats dpo" reads dpo - sft flipped.
  sft_over_dpo = results["claims"][1]["checks"][0]
  assert (sft_over_dpo["a"], sft_over_dpo["diff"], sft_over_dpo["a_only"]) == ("sft", pytest.approx(100 / 3), 10)


def test_claims_within_noise_contradicted_and_unpaired():
  # sft+dpo passes one prompt more than sft (within noise); dpo clearly beats sft (contradicts "SFT beats DPO").
  harmful = {"base": 0, "sft": 10, "dpo": 25, "sft+dpo": 26}
  results = metrics.metrics_from_rated(_models(harmful, harmful), n_bootstrap=500)
  verdicts = [c["verdict"] for c in results["claims"]]
  assert verdicts[0].startswith("not supported (6 of 9 checks significant; 9 of 9 point estimates")
  assert verdicts[1] == "contradicted" and verdicts[2] == "supported"
  # Different prompts cannot be paired: the comparison says why and the claims that need it are not evaluable.
  models = _models(harmful, harmful)
  models["dpo"]["helpful"][0]["prompt"] = "another prompt"
  results = metrics.metrics_from_rated(models, n_bootstrap=50)
  unpaired = [c for c in results["comparisons"] if not c["paired"]]
  assert {(c["a"], c["b"]) for c in unpaired} == {("dpo", "base"), ("dpo", "sft"), ("sft+dpo", "dpo")}
  assert "helpful prompts differ" in unpaired[0]["reason"]
  assert [c["verdict"] for c in results["claims"]] == ["not evaluable", "not evaluable", "supported"]


def test_judge_agreement_by_hand():
  base = _models({"m1": 2, "m2": 3}, {"m1": 1, "m2": 0}, n=4)
  first = metrics.metrics_from_rated(base, baseline=None, n_bootstrap=10)
  # A second judge on another scale (threshold 0) that ranks harmful answers the same way and passes the same ones,
  # but flips one helpful verdict.
  other = {m: {s: [dict(r, score=r["score"] - (-3.0 if s == "harmful" else -2.0)) for r in rs]
               for s, rs in sets.items()} for m, sets in base.items()}
  other["m2"]["helpful"][0]["score"] = 1.0
  second = metrics.metrics_from_rated(other, baseline=None, n_bootstrap=10, harmless_threshold=0.0,
                                      helpful_threshold=0.0)
  rows = {r["set"]: r for r in metrics.judge_agreement({"x": first, "y": second})}
  assert rows["harmful"]["n"] == 8 and rows["harmful"]["kappa"] == pytest.approx(1.0)
  assert rows["harmful"]["spearman"] == pytest.approx(1.0) and rows["harmful"]["agreement"] == 100.0
  # helpful verdicts: x passes 1 of 8, y passes 2 (one more): p_o = 7/8, p_e = (1/8)(2/8) + (7/8)(6/8) = 44/64,
  # kappa = (56/64 - 44/64) / (20/64) = 0.6.
  assert rows["helpful"]["kappa"] == pytest.approx(0.6) and rows["helpful"]["agreement"] == 87.5
