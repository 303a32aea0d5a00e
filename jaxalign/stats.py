"""Statistics for comparing models on the same prompts and judges with each other. Pure numpy/scipy, no I/O.

With 50 prompts a pass rate has a standard error of about 7 points, so a difference between two models is only
evidence when it is large against its own noise. Paired methods use that both models answered the *same* prompts:
  paired_bootstrap_diff   the difference of two pass rates with a percentile-bootstrap CI over prompts resampled
                          jointly (each draw keeps both models' verdicts on a prompt together);
  mcnemar_exact           the exact McNemar test: only prompts where exactly one model passes carry evidence, and
                          under "no difference" each of them is a fair coin (two-sided binomial p-value);
  cohen_kappa             agreement of two raters' labels beyond chance (judges' pass/fail, annotators' choices);
  spearman_rho            rank correlation of two judges' scores;
  win_rate_ci             a win rate (ties count half) with a bootstrap CI over items and the sign test's p-value.
Rates are percentages in [0, 100].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats as scipy_stats

CI_LEVEL = 0.95


def _binary(values, name: str) -> np.ndarray:
  array = np.asarray(values)
  if array.ndim != 1 or array.size == 0:
    raise ValueError(f"{name}: expected a non-empty 1-D sequence of pass/fail values, got shape {array.shape}")
  if array.dtype != bool and not np.isin(array, (0, 1)).all():
    raise ValueError(f"{name}: expected pass/fail values (booleans or 0/1)")
  return array.astype(bool)


def _paired_binary(a, b, names=("a", "b")) -> tuple[np.ndarray, np.ndarray]:
  a, b = _binary(a, names[0]), _binary(b, names[1])
  if a.shape != b.shape:
    raise ValueError(f"{names[0]} and {names[1]} must be verdicts on the same items; got {a.size} and {b.size}")
  return a, b


def _check_bootstrap(n_bootstrap: int, level: float) -> None:
  if n_bootstrap < 1:
    raise ValueError(f"n_bootstrap must be at least 1, got {n_bootstrap}")
  if not 0.0 < level < 1.0:
    raise ValueError(f"level must be in (0, 1), got {level}")


def percentile_ci(draws: np.ndarray, level: float = CI_LEVEL) -> list[float]:
  """[lo, hi]: the central `level` interval of bootstrap draws."""
  tail = 100.0 * (1.0 - level) / 2.0
  lo, hi = np.percentile(draws, [tail, 100.0 - tail])
  return [float(lo), float(hi)]


def paired_diff_draws(a, b, *, n_bootstrap: int = 1000, seed: int = 0) -> tuple[float, np.ndarray]:
  """(rate(a) - rate(b), [n_bootstrap] bootstrap draws of that difference): item indices are resampled with
  replacement, the same indices for both, so each draw keeps the pairing."""
  a, b = _paired_binary(a, b)
  _check_bootstrap(n_bootstrap, CI_LEVEL)
  diff = a.astype(np.int64) - b.astype(np.int64)  # -1, 0, +1 per item
  index = np.random.default_rng(seed).integers(0, diff.size, (n_bootstrap, diff.size))
  # Sum then divide, so a draw is an exact multiple of 100/n (as the rates themselves are).
  return 100.0 * int(diff.sum()) / diff.size, 100.0 * diff[index].sum(axis=1) / diff.size


def paired_bootstrap_diff(a, b, *, n_bootstrap: int = 1000, seed: int = 0,
                          level: float = CI_LEVEL) -> dict[str, float | list[float]]:
  """The difference of pass rates rate(a) - rate(b) (percentage points) of two systems judged on the same items,
  with its paired percentile-bootstrap CI: {"diff", "ci": [lo, hi]}."""
  _check_bootstrap(n_bootstrap, level)
  diff, draws = paired_diff_draws(a, b, n_bootstrap=n_bootstrap, seed=seed)
  return {"diff": diff, "ci": percentile_ci(draws, level)}


def discordant_counts(a, b) -> tuple[int, int]:
  """(items only a passes, items only b passes)."""
  a, b = _paired_binary(a, b)
  return int(np.count_nonzero(a & ~b)), int(np.count_nonzero(~a & b))


def sign_test(wins: int, losses: int) -> float:
  """Two-sided exact binomial p-value of `wins` against `losses` under a fair coin; 1.0 when both are 0."""
  if wins < 0 or losses < 0:
    raise ValueError(f"counts must be >= 0, got {wins} and {losses}")
  if wins + losses == 0:
    return 1.0
  return float(scipy_stats.binomtest(wins, wins + losses, 0.5, alternative="two-sided").pvalue)


def mcnemar_exact(a, b) -> dict[str, float | int]:
  """Exact McNemar test of two systems' pass/fail verdicts on the same items.

  Returns {"a_only", "b_only" (the discordant counts), "p_value"}: the two-sided binomial p-value of a_only among
  a_only + b_only discordant items at probability 1/2 (1.0 with no discordant item).
  """
  a_only, b_only = discordant_counts(a, b)
  return {"a_only": a_only, "b_only": b_only, "p_value": sign_test(a_only, b_only)}


def cohen_kappa(a: Sequence, b: Sequence) -> float:
  """Cohen's κ of two raters' labels on the same items: (p_o - p_e) / (1 - p_e), with p_o the observed agreement
  and p_e the agreement expected from each rater's label frequencies. 1.0 when both use a single, same label
  (perfect agreement, nothing left to chance); NaN needs 1 - p_e = 0 with disagreement, which cannot happen."""
  a, b = np.asarray(a), np.asarray(b)
  if a.shape != b.shape or a.ndim != 1 or a.size == 0:
    raise ValueError(f"cohen_kappa needs two non-empty label sequences of the same length, got {a.shape} and {b.shape}")
  labels = np.union1d(a, b)
  observed = float(np.mean(a == b))
  expected = float(sum(np.mean(a == label) * np.mean(b == label) for label in labels))
  if expected == 1.0:
    return 1.0
  return (observed - expected) / (1.0 - expected)


def spearman_rho(x, y) -> float:
  """Spearman's rank correlation of two score sequences on the same items (average ranks for ties); NaN when one
  of them is constant."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape or x.ndim != 1 or x.size < 2:
    raise ValueError(f"spearman_rho needs two score sequences of the same length >= 2, got {x.shape} and {y.shape}")
  if np.ptp(x) == 0 or np.ptp(y) == 0:
    return float("nan")
  return float(scipy_stats.spearmanr(x, y).statistic)


def win_rate_ci(outcomes, *, n_bootstrap: int = 1000, seed: int = 0,
                level: float = CI_LEVEL) -> dict[str, float | int | list[float]]:
  """A's win rate over B from per-item outcomes +1 (A better), -1 (B better), 0 (tie), or a value between (the
  mean of several raters' outcomes on the item), as a percentage with ties counting half, with its
  percentile-bootstrap CI over items and the sign test's p-value over the items not tied (outcome != 0).

  Returns {"n", "wins", "losses", "ties" (items with outcome > 0, < 0, = 0), "win_rate", "ci": [lo, hi], "p_value"}.
  """
  _check_bootstrap(n_bootstrap, level)
  outcomes = np.asarray(outcomes, np.float64)
  if outcomes.ndim != 1 or outcomes.size == 0 or not ((outcomes >= -1) & (outcomes <= 1)).all():
    raise ValueError("outcomes: expected a non-empty 1-D sequence of +1 (A wins), -1 (B wins), 0 (tie), or means "
                     "of those")
  points = (outcomes + 1.0) / 2.0  # win 1, tie 0.5, loss 0
  index = np.random.default_rng(seed).integers(0, points.size, (n_bootstrap, points.size))
  wins, losses = int(np.count_nonzero(outcomes > 0)), int(np.count_nonzero(outcomes < 0))
  return {"n": int(outcomes.size), "wins": wins, "losses": losses, "ties": int(outcomes.size) - wins - losses,
          "win_rate": 100.0 * float(points.sum()) / points.size,
          "ci": percentile_ci(100.0 * points[index].mean(axis=1), level), "p_value": sign_test(wins, losses)}
