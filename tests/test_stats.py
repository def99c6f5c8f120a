"""nanoseek.stats against published values (Newcombe 1998a/b, Wikipedia's Holm and kappa examples, R's
binom.test), brute-force definitions (pass@k) and hand computations."""

from __future__ import annotations

import hashlib
import itertools
import math
import random

import pytest

from nanoseek.stats import (
    bootstrap,
    bootstrap_ci,
    bootstrap_cis,
    cohen_kappa,
    derive_seed,
    holm,
    majority_vote,
    mcnemar_exact,
    newcombe_diff,
    paired_difference,
    paired_t,
    pass_at_k,
    percentile_ci,
    prf,
    prf_cis,
    t_interval,
    t_quantile,
    wilson,
)

# ---------------------------------------------------------------------------------------------------------------
# proportions


@pytest.mark.parametrize("k, n, lo, hi", [
    # Newcombe (1998a), "Two-sided confidence intervals for the single proportion", Table I, method 3 (score)
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718),
    # the usual small-sample values (0/10, 5/10, 10/10 are the Wilson limits in every table)
    (0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0), (8, 10, 0.4902, 0.9433),
])
def test_wilson_published_values(k, n, lo, hi):
    got = wilson(k, n)
    assert got == pytest.approx((lo, hi), abs=6e-5)


def test_wilson_edges_and_fractional_counts():
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0  # exactly, not 3e-17 off
    assert wilson(0, 0) == (0.0, 1.0)  # nothing observed: uninformative
    lo, hi = wilson(3, 10)
    assert (1 - hi, 1 - lo) == pytest.approx(wilson(7, 10))  # symmetric in successes and failures
    # a fractional count (the audit's share of samples x prompts) lies between its integer neighbours
    a, b, c = wilson(4, 10), wilson(4.5, 10), wilson(5, 10)
    assert a[0] < b[0] < c[0] and a[1] < b[1] < c[1]
    assert wilson(5, 10, z=1.0)[1] - wilson(5, 10, z=1.0)[0] < c[1] - c[0]  # a narrower level, a narrower interval


@pytest.mark.parametrize("k1, n1, k2, n2, lo, hi", [
    # Newcombe (1998b), "Interval estimation for the difference between independent proportions", Table II,
    # method 10 (hybrid score); all eight of the paper's examples
    (56, 70, 48, 80, 0.0524, 0.3339), (9, 10, 3, 10, 0.1705, 0.8090), (6, 7, 2, 7, 0.0582, 0.8062),
    (5, 56, 0, 29, -0.0381, 0.1926), (0, 10, 0, 20, -0.1611, 0.2775), (0, 10, 0, 10, -0.2775, 0.2775),
    (10, 10, 0, 20, 0.6791, 1.0000), (10, 10, 0, 10, 0.6075, 1.0000),
])
def test_newcombe_method_10_published_values(k1, n1, k2, n2, lo, hi):
    d, got_lo, got_hi = newcombe_diff(k1, n1, k2, n2)
    assert d == pytest.approx(k1 / n1 - k2 / n2)
    assert (got_lo, got_hi) == pytest.approx((lo, hi), abs=6e-5)


def test_newcombe_is_antisymmetric_and_undefined_without_data():
    d, lo, hi = newcombe_diff(56, 70, 48, 80)
    assert newcombe_diff(48, 80, 56, 70) == pytest.approx((-d, -hi, -lo))
    assert all(math.isnan(x) for x in newcombe_diff(1, 0, 1, 10))


def test_mcnemar_exact():
    assert mcnemar_exact(2, 8) == pytest.approx(0.109375)  # R: binom.test(2, 10)$p.value = 0.1094
    assert mcnemar_exact(8, 2) == mcnemar_exact(2, 8)
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)
    assert mcnemar_exact(0, 20) == pytest.approx(2 / 2**20)
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0  # capped; no discordant pair: no evidence


def test_holm():
    # Wikipedia's example (Holm-Bonferroni method): at alpha 0.05 H1 and H4 are rejected, H2 and H3 are not
    adj = holm([0.01, 0.04, 0.03, 0.005])
    assert adj == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert [p <= 0.05 for p in adj] == [True, False, False, True]
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == [1.0, 1.0] and holm([]) == []  # capped at 1


# ---------------------------------------------------------------------------------------------------------------
# resampling


def test_bootstrap_of_the_mean_reproduces_the_numbers_eval_reported_before():
    rng = random.Random(1)
    values = [float(rng.random() < 0.6) for _ in range(137)]
    # eval.bootstrap_ci before nanoseek.stats, verbatim: saved reports keep their numbers when rebuilt
    r = random.Random(0)
    n = len(values)
    means = sorted(sum(values[r.randrange(n)] for _ in range(n)) / n for _ in range(2000))
    assert bootstrap_ci(values) == (means[int(0.025 * 2000)], means[int(0.975 * 2000) - 1])


def test_bootstrap_ci_properties():
    lo, hi = bootstrap_ci([0.0] * 50 + [1.0] * 50)
    assert lo < 0.5 < hi and 0.15 < hi - lo < 0.25  # about 2 x 1.96 x sqrt(0.25 / 100) = 0.196
    assert bootstrap_ci([0.25] * 20) == (0.25, 0.25)  # exact in binary: no rounding in the sum
    assert bootstrap_ci([1.0, 2.0, 3.0], seed=1) == bootstrap_ci([1.0, 2.0, 3.0], seed=1)
    assert all(math.isnan(x) for x in bootstrap_ci([]))
    # any statistic over any items: the median of numbers, here
    lo, hi = bootstrap_ci(list(range(101)), lambda s: sorted(s)[len(s) // 2], reps=500)
    assert lo < 50 < hi
    assert len(bootstrap([1, 2, 3], len, reps=7)) == 7
    # order statistics: 2,000 replicates -> the 51st and the 1,950th; NaN replicates are left out
    assert percentile_ci(range(2000)) == (50, 1949)
    assert percentile_ci([float("nan"), 1.0, 2.0, 3.0], level=1.0) == (1.0, 3.0)


def test_bootstrap_cis_and_classifier_intervals():
    gold = ["a"] * 40 + ["b"] * 40 + ["c"] * 20
    pred = ["a"] * 35 + ["b"] * 5 + ["b"] * 30 + ["a"] * 10 + ["c"] * 18 + ["a"] * 2
    point = prf(gold, pred, ["a", "b", "c"])
    cis = prf_cis(gold, pred, ["a", "b", "c"], reps=300)
    assert {"accuracy", "macro_f1", "f1/a", "precision/b", "recall/c"} <= set(cis)
    assert cis["accuracy"][0] < point["accuracy"] < cis["accuracy"][1]
    assert cis["macro_f1"][0] < point["macro_f1"] < cis["macro_f1"][1]
    for lab in "abc":
        lo, hi = cis[f"f1/{lab}"]
        assert 0.0 <= lo <= point["per_class"][lab]["f1"] <= hi <= 1.0
    both = bootstrap_cis([1.0, 2.0, 3.0, 4.0], lambda s: {"min": min(s), "max": max(s)}, reps=200)
    assert both["min"][0] == 1.0 and both["max"][1] == 4.0
    assert bootstrap_cis([], lambda s: {"x": 0.0}) == {}


def test_paired_difference():
    a = {f"q{i}": 0.0 for i in range(40)}
    b = {f"q{i}": 1.0 if i < 20 else 0.0 for i in reversed(range(40))}  # order must not matter
    b["only-in-b"] = 1.0  # unmatched items are left out
    d = paired_difference(a, b)
    assert d["n"] == 40 and d["mean"] == pytest.approx(0.5) and 0.3 < d["ci"][0] < 0.5 < d["ci"][1] < 0.7
    assert paired_difference(a, a) == {"mean": 0.0, "ci": (0.0, 0.0), "n": 40}
    with pytest.raises(ValueError, match="share no item ids"):
        paired_difference(a, {"other": 1.0})


# ---------------------------------------------------------------------------------------------------------------
# few runs: Student's t


@pytest.mark.parametrize("p, df, t", [
    # the two-sided 95% row of every t table (e.g. Fisher & Yates; NIST/SEMATECH e-Handbook 1.3.6.7.2), and one-sided
    (0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 3, 3.182), (0.975, 4, 2.776), (0.975, 5, 2.571),
    (0.975, 10, 2.228), (0.975, 30, 2.042), (0.95, 2, 2.920), (0.99, 7, 2.998), (0.995, 12, 3.055),
])
def test_t_quantile_published_values(p, df, t):
    assert t_quantile(p, df) == pytest.approx(t, abs=6e-4)
    assert t_quantile(1 - p, df) == pytest.approx(-t, abs=6e-4)  # symmetric


def test_t_quantile_tends_to_the_normal_and_rejects_bad_input():
    assert t_quantile(0.975, 2000) == pytest.approx(1.95996, abs=2e-3) and t_quantile(0.5, 3) == pytest.approx(0)
    for p, df in ((0.0, 3), (1.0, 3), (0.9, 0), (0.9, 2.5)):
        with pytest.raises(ValueError, match="t_quantile needs"):
            t_quantile(p, df)


def test_paired_t_hand_computed():
    a, b = {"s0": 1.0, "s1": 2.0, "s2": 3.0}, {"s2": 3.0, "s1": 4.0, "s0": 2.0, "s9": 7.0}
    d = paired_t(a, b)  # differences (b's order) 0, 2, 1: mean 1, sd 1, half-width 4.3027 / sqrt(3)
    assert d["diffs"] == [0.0, 2.0, 1.0] and d["n"] == 3 and d["mean"] == 1.0 and d["sd"] == pytest.approx(1.0)
    assert d["ci"] == pytest.approx((1 - 4.302653 / math.sqrt(3), 1 + 4.302653 / math.sqrt(3)))
    one = paired_t({"s0": 1.0}, {"s0": 1.5})
    assert one["mean"] == 0.5 and all(math.isnan(x) for x in one["ci"])  # one pair: no interval
    with pytest.raises(ValueError, match="share no key"):
        paired_t(a, {"other": 1.0})
    # the interval of one set of runs: zero spread gives a zero-width interval
    assert t_interval([0.9, 0.9, 0.9])["ci"] == pytest.approx((0.9, 0.9))


# ---------------------------------------------------------------------------------------------------------------
# generation metrics


def test_pass_at_k_matches_the_brute_force_definition():
    """pass@k = the probability that a random k-subset of the n samples holds a correct one (Chen et al. 2021)."""
    for n in range(1, 8):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                assert pass_at_k(n, c, k) == pytest.approx(sum(map(any, subsets)) / len(subsets))
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)  # pass@1 is the fraction correct
    for bad in [(4, 5, 1), (4, 0, 5), (4, 1, 0), (4, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)  # k > n used to give 1.0 even with no correct sample


def test_majority_vote():
    assert majority_vote(["3", None, "4", "4", "3"]) == "3"  # tie: the earliest sampled answer
    assert majority_vote(["4", "", "4", "3"]) == "4"  # None and "" abstain
    assert majority_vote([None, ""]) is None and majority_vote([]) is None
    order = ["refused", "answered"]
    assert majority_vote(["answered", "refused"], rank=order.index) == "refused"  # another tie rule
    assert majority_vote(["answered", "answered", "refused"], rank=order.index) == "answered"


# ---------------------------------------------------------------------------------------------------------------
# agreement and classification


def _pairs(table: list[list[int]], labels=("yes", "no")) -> list[tuple[str, str]]:
    return [(labels[i], labels[j]) for i in range(2) for j in range(2) for _ in range(table[i][j])]


def test_cohen_kappa_worked_examples():
    # Wikipedia (Cohen's kappa): 50 proposals, both yes 20, A yes / B no 5, A no / B yes 10, both no 15
    assert cohen_kappa(_pairs([[20, 5], [10, 15]])) == pytest.approx(0.4)
    # same 60% agreement, different kappa (Wikipedia's two further tables)
    assert cohen_kappa(_pairs([[45, 15], [25, 15]])) == pytest.approx(0.1304, abs=5e-5)
    assert cohen_kappa(_pairs([[25, 35], [5, 35]])) == pytest.approx(0.2593, abs=5e-5)
    assert cohen_kappa([("a", "a"), ("b", "b")]) == 1.0
    assert cohen_kappa([("a", "b"), ("b", "a")]) == pytest.approx(-1.0)
    assert cohen_kappa([("a", "a")] * 3) == 1.0 and math.isnan(cohen_kappa([]))


def test_prf_hand_computed():
    gold = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "a", "b", "b", "c", "c"]
    m = prf(gold, pred, ["a", "b", "c"])
    assert m["per_class"]["a"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert m["per_class"]["b"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert m["per_class"]["c"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3) and m["accuracy"] == pytest.approx(4 / 6)
    assert prf(gold, pred, ["z"])["per_class"]["z"]["f1"] == 0.0  # a class nobody uses: 0, not an error
    with pytest.raises(ValueError, match="differ in length"):
        prf(gold, pred[:-1], ["a"])


# ---------------------------------------------------------------------------------------------------------------
# seeds


def test_derive_seed_is_stable_and_keeps_the_old_numbers():
    # pinned: a change here changes every sampled run (and what resuming an old log samples)
    assert derive_seed(0, "arith-1", 0) == 965946416888685315
    assert derive_seed(7, "rollout", 3, 0, 5) == 8848569402836837237
    # the audit's and distill's per-sample seeds before derive_seed existed: same numbers, so their logs resume
    sha = hashlib.sha256(b"0:arith-1:0")
    assert derive_seed(0, "arith-1", 0, bits=31) == int.from_bytes(sha.digest()[:4], "big") >> 1 == 224901925
    assert derive_seed(0, "arith-1", 0, bits=60) == int(sha.hexdigest()[:15], 16)
    seeds = {derive_seed(0, "p", j) for j in range(1000)}
    assert len(seeds) == 1000 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(1, "p", 0) != derive_seed(0, "p", 0)
    with pytest.raises(ValueError):
        derive_seed(0, bits=0)
