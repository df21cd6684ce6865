"""Correlation statistics for the pilot study (numpy + the standard library only):
Pearson r (point-biserial when one variable is binary), a seeded percentile bootstrap CI
(over points or clusters), and the Fisher-z CI and p-value."""
from __future__ import annotations

import math
import statistics

import numpy as np


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r; NaN when either variable is constant or there are < 2 points."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size < 2:
        return math.nan
    xc, yc = x - x.mean(), y - y.mean()
    den = math.sqrt(float(xc @ xc) * float(yc @ yc))
    return float(xc @ yc) / den if den > 0 else math.nan


def bootstrap_ci(x: np.ndarray, y: np.ndarray, *, n_boot: int = 2000, level: float = 0.95,
                 seed: int = 0, clusters: np.ndarray | None = None) -> tuple[float, float]:
    """Percentile bootstrap CI of pearson(x, y), resampling points (or whole `clusters`, e.g.
    trajectories, when given) with numpy's seeded generator. Degenerate resamples (a constant
    variable) are skipped; NaN bounds when fewer than half the resamples are usable.

    Vectorised: each resample is a vector of cluster counts, and its Pearson r comes from
    the count-weighted sums (n, Σx, Σy, Σx², Σy², Σxy) of the clusters."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    inv = np.arange(x.size) if clusters is None else np.unique(np.asarray(clusters),
                                                               return_inverse=True)[1]
    n_groups = int(inv.max()) + 1 if x.size else 0
    if n_groups < 2:
        return math.nan, math.nan
    sums = np.stack([np.bincount(inv, weights=w, minlength=n_groups)
                     for w in (np.ones_like(x), x, y, x * x, y * y, x * y)], axis=1)  # G×6
    rng = np.random.default_rng(seed)
    rs, chunk = [], max(1, 2_000_000 // n_groups)
    for b0 in range(0, n_boot, chunk):
        b = min(chunk, n_boot - b0)
        draws = rng.integers(0, n_groups, (b, n_groups)) + n_groups * np.arange(b)[:, None]
        counts = np.bincount(draws.ravel(), minlength=b * n_groups).reshape(b, n_groups)
        n, sx, sy, sxx, syy, sxy = (counts @ sums).T
        vx, vy, cov = sxx - sx * sx / n, syy - sy * sy / n, sxy - sx * sy / n
        ok = (vx > 1e-9 * np.maximum(sxx, 1)) & (vy > 1e-9 * np.maximum(syy, 1e-300))
        rs.append(cov[ok] / np.sqrt(vx[ok] * vy[ok]))
    rs = np.concatenate(rs)
    if rs.size < n_boot / 2:
        return math.nan, math.nan
    alpha = (1 - level) / 2
    lo, hi = np.quantile(rs, [alpha, 1 - alpha])
    return float(lo), float(hi)


def fisher_ci(r: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """CI of a correlation from the Fisher transform: tanh(atanh(r) ± z/√(n−3))."""
    if math.isnan(r) or n <= 3:
        return math.nan, math.nan
    z = math.atanh(min(max(r, -0.9999999), 0.9999999))
    half = statistics.NormalDist().inv_cdf(0.5 + level / 2) / math.sqrt(n - 3)
    return math.tanh(z - half), math.tanh(z + half)


def fisher_p_value(r: float, n: int) -> float:
    """Two-sided p-value of r = 0 under the Fisher-z normal approximation."""
    if math.isnan(r) or n <= 3:
        return math.nan
    z = math.atanh(min(max(r, -0.9999999), 0.9999999)) * math.sqrt(n - 3)
    return 2 * (1 - statistics.NormalDist().cdf(abs(z)))


def _bootstrap_means(values: np.ndarray, n_boot: int, seed: int,
                     clusters: np.ndarray | None = None) -> np.ndarray:
    """Means of `n_boot` resamples (with replacement) of `values`, or of whole `clusters`
    (e.g. the calls of one trajectory together) when given."""
    rng = np.random.default_rng(seed)
    inv = np.arange(values.size) if clusters is None else np.unique(clusters, return_inverse=True)[1]
    k = int(inv.max()) + 1
    sums, counts = np.bincount(inv, weights=values, minlength=k), np.bincount(inv, minlength=k)
    draws = rng.integers(0, k, (n_boot, k))
    return sums[draws].sum(axis=1) / counts[draws].sum(axis=1)


def bootstrap_mean_ci(values, *, n_boot: int = 4000, level: float = 0.95, seed: int = 0,
                      clusters=None) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of `values` (e.g. one per question) and its percentile-
    bootstrap CI, resampling values (or whole `clusters`). NaN bounds for fewer than 2
    values or clusters."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return math.nan, math.nan, math.nan
    groups = None if clusters is None else np.asarray(clusters)
    if (v.size if groups is None else np.unique(groups).size) < 2:
        return float(v.mean()), math.nan, math.nan
    alpha = (1 - level) / 2
    lo, hi = np.quantile(_bootstrap_means(v, n_boot, seed, groups), [alpha, 1 - alpha])
    return float(v.mean()), float(lo), float(hi)


def paired_difference_ci(a, b, *, n_boot: int = 4000, level: float = 0.95,
                         seed: int = 0) -> tuple[float, float, float]:
    """(mean(a − b), lo, hi) for paired per-question values (the same questions, in the same
    order), resampling questions: the CI of an improvement on one evaluation set."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same shape, got {a.shape} and {b.shape}")
    return bootstrap_mean_ci(a - b, n_boot=n_boot, level=level, seed=seed)


# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: `t975`).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom: the table to 30, then
    the Cornish-Fisher expansion around the normal's (within 1e-4 from 31 on; the normal's
    own 1.960 would make the interval 4% too narrow at 31)."""
    if df <= len(_T975):
        return _T975[df - 1]
    z = statistics.NormalDist().inv_cdf(0.975)
    terms = ((z ** 3 + z) / 4, (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96,
             (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384)
    return z + sum(g / df ** (i + 1) for i, g in enumerate(terms))


def t_interval(values) -> tuple[float, float, float]:
    """(mean, lo, hi): the 95% Student-t interval of the mean of a few values (e.g. one per
    seed); NaN bounds for fewer than 2 values. Wide on purpose: 3 seeds say little."""
    v = np.asarray(values, np.float64)
    if v.size < 2:
        return (float(v.mean()) if v.size else math.nan), math.nan, math.nan
    half = t975(v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return float(v.mean()), float(v.mean() - half), float(v.mean() + half)
