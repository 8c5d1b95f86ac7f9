"""The numbers a report shows, each with its n and its uncertainty; scipy does the statistics.

- ``probabilities``: softmax(100 · cos) of each pooled embedding over a vocabulary's prompts, as the
  Engine reads labels (``engine.models.clip.ZERO_SHOT_LOGIT_SCALE``).
- ``expected_values``: Σ p(label) · value(label) on a scale vocabulary (``Vocabulary.values``).
- ``label_distribution``: how many panoramas have each label on top, with a Wilson 95% interval
  (``scipy.stats.binomtest``).
- ``correlate``: Spearman's ρ (``scipy.stats.spearmanr``) with a paired bootstrap 95% interval
  (``scipy.stats.bootstrap``; BCa up to ``BCA_LIMIT`` pairs, percentile above, where BCa's jackknife
  costs n²) and a two-sided permutation p-value over ≥ 10,000 seeded re-pairings
  (``scipy.stats.permutation_test``). Fewer than ``MIN_PAIRS`` pairs, or a constant side, give no
  statistic and a ``reason`` instead.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

ZERO_SHOT_LOGIT_SCALE = 100.0  # the Engine's (engine.models.clip); repeated here so this module needs no torch
MIN_PAIRS = 3
PERMUTATIONS = 10_000
BOOTSTRAP_RESAMPLES = 9_999
LARGE_BOOTSTRAP = (5_000, 1_999)  # above this many pairs, this many resamples: each re-ranks all n pairs
BCA_LIMIT = 2_000
CONFIDENCE = 0.95


def probabilities(pooled: np.ndarray, text: np.ndarray) -> np.ndarray:
    """(N, D) unit image embeddings, (L, D) unit prompt embeddings -> (N, L) softmax(100 · cos), float64."""
    logits = ZERO_SHOT_LOGIT_SCALE * (pooled.astype(np.float64) @ text.astype(np.float64).T)
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


def expected_values(probs: np.ndarray, values) -> np.ndarray:
    """(N, L) probabilities, L values -> (N,) expected value."""
    return probs @ np.asarray(values, np.float64)


def label_distribution(probs: np.ndarray, labels) -> list[dict]:
    """Per label: how many panoramas have it on top (count, share, Wilson 95% CI of the share) and its mean
    probability; in label order."""
    n = len(probs)
    top = probs.argmax(axis=1) if n else np.zeros(0, int)
    counts = np.bincount(top, minlength=len(labels))
    out = []
    for k, label in enumerate(labels):
        row = {"label": label, "count": int(counts[k]), "n": n, "share": None, "ci95": None,
               "mean_probability": float(probs[:, k].mean()) if n else None}
        if n:
            interval = stats.binomtest(int(counts[k]), n).proportion_ci(CONFIDENCE, method="wilson")
            row.update(share=counts[k] / n, ci95=[float(interval.low), float(interval.high)])
        out.append(row)
    return out


def _spearman_of_ranks(x, y, axis=-1):
    """Pearson's r of two rank vectors along ``axis``: Spearman's ρ once the ranks are fixed (a permutation
    of the pairing keeps each side's ranks, so they are ranked once, not once per permutation). Plain numpy:
    ``stats.pearsonr`` checks its input on every call, which doubles the cost over 10,000 resamples."""
    x = x - x.mean(axis=axis, keepdims=True)
    y = y - y.mean(axis=axis, keepdims=True)
    return (x * y).sum(axis=axis) / np.sqrt((x * x).sum(axis=axis) * (y * y).sum(axis=axis))


def _spearman(x, y, axis=-1):
    """Spearman's ρ along ``axis`` (average ranks for ties, as spearmanr), vectorised for the bootstrap."""
    return _spearman_of_ranks(stats.rankdata(x, axis=axis), stats.rankdata(y, axis=axis), axis=axis)


def _bootstrap(x, y, method: str, resamples: int, batch: int, rng) -> list[float] | None:
    """scipy's paired bootstrap interval of ρ, or None where it has none."""
    import warnings

    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)  # answered by None, and said in ``reason``
        boot = stats.bootstrap((x, y), _spearman, paired=True, vectorized=True, n_resamples=resamples,
                               confidence_level=CONFIDENCE, method=method.lower(), batch=batch, rng=rng)
    low, high = boot.confidence_interval
    return [float(low), float(high)] if np.isfinite(low) and np.isfinite(high) else None


def correlate(x, y, *, seed: int = 0, permutations: int = PERMUTATIONS, resamples: int | None = None) -> dict:
    """Spearman's ρ between ``x`` and ``y`` (pairs with a NaN on either side are left out and counted).

    ``resamples``: of the bootstrap; by default 9,999, or 1,999 above 5,000 pairs (the interval of ρ is
    then narrow, and each resample re-ranks every pair)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = len(x)
    out = {"n": n, "left_out": int((~keep).sum()), "spearman": None, "ci95": None, "p_value": None,
           "permutations": permutations, "bootstrap": None, "seed": seed, "reason": None}
    if n < MIN_PAIRS:
        out["reason"] = f"{n} pair{'s' if n != 1 else ''} with a value: a correlation needs at least {MIN_PAIRS}"
        return out
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        side = "the expected value" if np.ptp(x) == 0 else "the column"
        out["reason"] = f"{side} is the same for all {n} pairs: no rank correlation"
        return out
    out["spearman"] = float(stats.spearmanr(x, y).statistic)
    if resamples is None:
        resamples = LARGE_BOOTSTRAP[1] if n > LARGE_BOOTSTRAP[0] else BOOTSTRAP_RESAMPLES
    rng = np.random.default_rng(seed)
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    batch = max(1, 2_000_000 // n)  # rows of resamples held at once: ~16 MB per side
    test = stats.permutation_test((rx, ry), _spearman_of_ranks, permutation_type="pairings", n_resamples=permutations,
                                  alternative="two-sided", vectorized=True, batch=batch, rng=rng)
    out["p_value"] = float(test.pvalue)
    method = "BCa" if n <= BCA_LIMIT else "percentile"
    interval = _bootstrap(x, y, method, resamples, batch, rng)
    if interval is None and method == "BCa":  # every resample gave the same ρ (e.g. 1): BCa is undefined
        method = "percentile"
        interval = _bootstrap(x, y, method, resamples, batch, rng)
    out["ci95"] = interval
    out["bootstrap"] = {"method": method, "resamples": resamples, "paired": True}
    if interval is None:
        out["reason"] = "the bootstrap gave no interval (too few distinct values)"
    return out
