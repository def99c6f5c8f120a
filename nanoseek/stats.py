"""The statistics every stage reports with, in one place (by hand: small, and the formulas are the documentation).

  proportions    wilson (score interval, Wilson 1927), newcombe_diff (difference of two independent proportions,
                 Newcombe 1998 method 10), mcnemar_exact (paired proportions), holm (multiple testing)
  resampling     bootstrap / percentile_ci / bootstrap_ci / bootstrap_cis (percentile bootstrap over items of any
                 statistic), paired_difference (paired bootstrap over matched items)
  few runs       t_quantile (Student's t, by hand), t_interval / paired_t (t intervals over a few runs and over
                 matched runs, e.g. seeds: where a bootstrap over 3 values is too narrow)
  generation     pass_at_k (Chen et al. 2021), majority_vote (cons@k / maj@k)
  agreement      cohen_kappa, prf (per-class precision / recall / F1, macro-F1, accuracy) and prf_cis
  seeds          derive_seed: the one way a per-sample or per-step seed is derived from a run seed

Conventions: intervals are (lo, hi) tuples; an undefined estimate is NaN rather than an exception, so a report over
sparse groups still renders.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from statistics import NormalDist
from typing import Any, TypeVar

T = TypeVar("T")
H = TypeVar("H", bound=Hashable)

Z95 = NormalDist().inv_cdf(0.975)  # 1.959963984540054: the exact two-sided 95% normal quantile
NAN = float("nan")


# ------------------------------------------------------------------------------------------------------------
# proportions


def wilson(k: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n (Wilson 1927; Newcombe 1998a method 3).

    k may be fractional: the audit passes a share of samples times a number of prompts. Unlike the Wald interval it
    stays inside [0, 1] and is not degenerate at k = 0 or k = n. n = 0 gives the uninformative (0, 1)."""
    if n <= 0:
        return 0.0, 1.0
    p = min(max(k / n, 0.0), 1.0)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # the limits are exactly 0 at k = 0 and 1 at k = n; rounding would leave 3e-17 below 1 or above 0
    return (0.0 if p == 0 else max(0.0, centre - half)), (1.0 if p == 1 else min(1.0, centre + half))


def newcombe_diff(k1: float, n1: float, k2: float, n2: float, z: float = Z95) -> tuple[float, float, float]:
    """(d, lo, hi) for d = k1/n1 - k2/n2 with Newcombe's hybrid score interval (Newcombe 1998b, method 10).

    Each side combines the distances from the two proportions to their own Wilson limits, so it keeps Wilson's good
    coverage near 0 and 1 where the Wald difference interval fails. NaNs when either n is 0."""
    if n1 <= 0 or n2 <= 0:
        return NAN, NAN, NAN
    p1, p2 = k1 / n1, k2 / n2
    (l1, u1), (l2, u2) = wilson(k1, n1, z), wilson(k2, n2, z)
    d = p1 - p2
    return d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar test: the discordant pairs b (A only) vs c (B only) under Binomial(b + c, 1/2)
    (the exact conditional form; the chi-square approximation is poor for the few discordant pairs audits have)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (Holm 1979): family-wise error control, uniformly more powerful than
    Bonferroni. The running max keeps the adjusted values monotone in the raw ones."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


# ------------------------------------------------------------------------------------------------------------
# resampling


def mean(values: Sequence[float]) -> float:
    # plain left-to-right sum (not fsum): the bootstrap of the mean reproduces the numbers eval reported before
    return sum(values) / len(values) if len(values) else NAN


def bootstrap(data: Sequence[T], statistic: Callable[[list[T]], Any], *, reps: int = 2000, seed: int = 0) -> list[Any]:
    """`reps` bootstrap replicates of `statistic`: each applied to len(data) items drawn with replacement.

    Items are whatever the statistic needs: numbers for a mean, (gold, pred) pairs for an F1, rows for a metric over
    several columns. Resampling the item keeps what belongs to one item together (Efron & Tibshirani 1993)."""
    rng = random.Random(seed)
    n = len(data)
    return [statistic([data[rng.randrange(n)] for _ in range(n)]) for _ in range(reps)]


def percentile_ci(replicates: Iterable[float], level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates; NaN replicates (a statistic undefined on a resample) are left
    out. Symmetric order statistics: with 2,000 replicates the 95% interval is the 51st and the 1,950th value."""
    vals = sorted(x for x in replicates if not math.isnan(x))
    if not vals:
        return NAN, NAN
    # (1 - level) / 2 is inexact in binary: + 1e-9 keeps a product like 49.9999999 from flooring to 49
    cut = int((1 - level) / 2 * len(vals) + 1e-9)
    return vals[cut], vals[len(vals) - 1 - cut]


def bootstrap_ci(data: Sequence[T], statistic: Callable[[list[T]], float] = mean, *, reps: int = 2000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` over items (by default the mean of numbers). (NaN, NaN) when
    there are no items."""
    if not len(data):
        return NAN, NAN
    return percentile_ci(bootstrap(data, statistic, reps=reps, seed=seed), level)


def bootstrap_cis(data: Sequence[T], statistic: Callable[[list[T]], Mapping[str, float]], *, reps: int = 2000,
                  level: float = 0.95, seed: int = 0) -> dict[str, tuple[float, float]]:
    """bootstrap_ci for a statistic that returns several numbers at once ({name: value}): one set of resamples, an
    interval per name (e.g. every class's F1 and the macro-F1 from the same replicates)."""
    if not len(data):
        return {}
    reps_ = bootstrap(data, statistic, reps=reps, seed=seed)
    return {k: percentile_ci((r[k] for r in reps_), level) for k in reps_[0]}


def paired_difference(a: Mapping[Hashable, float], b: Mapping[Hashable, float], *, reps: int = 2000,
                      level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Mean of b[i] - a[i] over the items both have (matched by key, in b's order), with a percentile bootstrap
    interval over items. Paired over the same items, so the between-item variance cancels: far tighter than
    comparing two separate intervals. Raises ValueError when the two share no item."""
    diffs = [float(v) - float(a[i]) for i, v in b.items() if i in a]
    if not diffs:
        raise ValueError("the two evaluations share no item ids: compare them on the same items")
    return {"mean": mean(diffs), "ci": bootstrap_ci(diffs, reps=reps, level=level, seed=seed), "n": len(diffs)}


# ------------------------------------------------------------------------------------------------------------
# few runs: Student's t


def _t_central(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer df, in closed form (Abramowitz & Stegun 26.7.3-4): with
    theta = atan(t / sqrt(df)), a finite series in cos(theta) whose length grows with df."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)), the series empty at df 1
        term, series = 1.0, 1.0 if df > 1 else 0.0
        for j in range(1, (df - 1) // 2):
            term *= 2 * j / (2 * j + 1) * c2
            series += term
        return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * series)
    term = series = 1.0  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
    for j in range(1, df // 2):
        term *= (2 * j - 1) / (2 * j) * c2
        series += term
    return math.sin(theta) * series


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with integer df >= 1 (bisection on the closed-form CDF, to ~1e-12):
    t_quantile(0.975, 2) = 4.3027, the factor a 95% interval over 3 paired runs needs (1.96 for a normal)."""
    if not 0 < p < 1 or df < 1 or int(df) != df:
        raise ValueError(f"t_quantile needs 0 < p < 1 and an integer df >= 1, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    target, lo, hi = 2 * p - 1, 0.0, 1.0
    while _t_central(hi, int(df)) < target:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_central(mid, int(df)) < target else (lo, mid)
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2


def t_interval(values: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Mean of a few values (one number per run) with Student's t interval, mean +- t * sd / sqrt(n), df = n - 1:
    for a handful of runs, where a bootstrap over n = 3 values can only return their spread and under-covers.
    Returns mean, ci, n, sd; the interval is NaN for fewer than two values."""
    n, m = len(values), mean(values)
    if n < 2:
        return {"mean": m, "ci": (NAN, NAN), "n": n, "sd": NAN}
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return {"mean": m, "ci": (m - half, m + half), "n": n, "sd": sd}


def paired_t(a: Mapping[Hashable, float], b: Mapping[Hashable, float], *, level: float = 0.95) -> dict[str, Any]:
    """Mean of b[i] - a[i] over the keys both have (in b's order) with t_interval's interval: for matched runs
    (seeds of two training recipes), where the pairing removes what the seed does to both. Returns mean, ci, n, sd
    and the differences; ValueError when the two share no key."""
    diffs = [float(v) - float(a[i]) for i, v in b.items() if i in a]
    if not diffs:
        raise ValueError("the two sets of runs share no key (seed): compare them on the same seeds")
    return {**t_interval(diffs, level), "diffs": diffs}


# ------------------------------------------------------------------------------------------------------------
# generation metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021, eq. 1),
    as their numerically stable product."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_vote(votes: Iterable[H | None], rank: Callable[[H], Any] | None = None) -> H | None:
    """The most common vote (cons@k / maj@k: the majority over k extracted answers), None and "" abstaining;
    None when nobody voted. Ties go to the lowest `rank(vote)`, by default to the vote cast first (for sampled
    answers: the earliest sample, a rule that needs nothing but the samples)."""
    counts: Counter = Counter(v for v in votes if v is not None and v != "")
    if not counts:
        return None
    best = max(counts.values())
    tied = [v for v in counts if counts[v] == best]  # a Counter keeps first-seen order
    return tied[0] if rank is None else min(tied, key=rank)


# ------------------------------------------------------------------------------------------------------------
# agreement and classification


def cohen_kappa(pairs: Sequence[tuple[Hashable, Hashable]]) -> float:
    """Cohen's kappa of two raters' labels, (p_o - p_e) / (1 - p_e): agreement beyond what their label frequencies
    give by chance (Cohen 1960). 1.0 when both raters use one and the same label throughout (p_e = 1)."""
    n = len(pairs)
    if not n:
        return NAN
    po = sum(a == b for a, b in pairs) / n
    ca, cb = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    pe = sum(ca[k] * cb[k] for k in ca) / n**2
    return 1.0 if pe == 1 else (po - pe) / (1 - pe)


def prf(gold: Sequence[Hashable], pred: Sequence[Hashable], labels: Sequence[Hashable]) -> dict[str, Any]:
    """Precision, recall and F1 per class, macro-F1 over `labels` (every class weighs the same, so rare labels
    count) and accuracy. An undefined precision or recall (no prediction / no gold item of the class) is 0."""
    if len(gold) != len(pred):
        raise ValueError(f"gold and pred differ in length ({len(gold)} vs {len(pred)})")
    per: dict[Hashable, dict[str, float]] = {}
    for lab in labels:
        tp = sum(g == lab and p == lab for g, p in zip(gold, pred))
        fp = sum(g != lab and p == lab for g, p in zip(gold, pred))
        fn = sum(g == lab and p != lab for g, p in zip(gold, pred))
        pr = tp / (tp + fp) if tp + fp else 0.0
        rc = tp / (tp + fn) if tp + fn else 0.0
        per[lab] = {"precision": pr, "recall": rc, "f1": 2 * pr * rc / (pr + rc) if pr + rc else 0.0,
                    "support": tp + fn}
    return {"per_class": per, "macro_f1": sum(v["f1"] for v in per.values()) / len(labels) if labels else NAN,
            "accuracy": sum(g == p for g, p in zip(gold, pred)) / len(gold) if len(gold) else NAN}


def prf_cis(gold: Sequence[Hashable], pred: Sequence[Hashable], labels: Sequence[Hashable], *, reps: int = 2000,
            level: float = 0.95, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Bootstrap intervals for a classifier's test: resamples (gold, pred) items and gives "accuracy", "macro_f1"
    and "<metric>/<label>" (precision, recall, f1 per class). For per-language intervals, call it per language."""
    def stat(sample: list[tuple[Hashable, Hashable]]) -> dict[str, float]:
        m = prf([g for g, _ in sample], [p for _, p in sample], labels)
        out = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}
        for lab, v in m["per_class"].items():
            out.update({f"{k}/{lab}": v[k] for k in ("precision", "recall", "f1")})
        return out

    return bootstrap_cis(list(zip(gold, pred)), stat, reps=reps, level=level, seed=seed)


# ------------------------------------------------------------------------------------------------------------
# seeds


def derive_seed(*parts: object, bits: int = 63) -> int:
    """A seed from a run seed and what identifies one draw (prompt id, sample index, step...): the top `bits` bits
    of SHA-256 over the parts joined by ":". Stable across processes, machines and Python versions (Python's
    hash() is salted per process), and independent of order of execution, so a resumed, re-chunked or parallel run
    draws exactly what an uninterrupted one would. 63 bits fit a signed 64-bit integer (torch generators, JSON);
    31 bits suit endpoints that take a 32-bit seed."""
    if not 1 <= bits <= 256:
        raise ValueError(f"bits must be in [1, 256], got {bits}")
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest, "big") >> (256 - bits)
