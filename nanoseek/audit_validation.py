"""`nanoseek audit --validate`: the rule classifier scored on hand-labelled answers.

A labelled row is `{"id", "item_id", "lang", "label", "answer"}` with optional `"triple"` (rows sharing it are
translations of one answer into en/zh/ja: same label by construction) and `"style"`. Each answer is classified
against the built-in suite item `item_id`, after the one reasoning split (an answer written as
`<think>...</think>answer` is split like a model's output). The score: accuracy, macro-F1 and per-class
precision/recall/F1 with percentile-bootstrap 95% intervals (nanoseek.stats.prf_cis), the same per language, the
confusion matrix, the misclassified ids, and the cross-lingual agreement over translated triples.

The protocol (docs/audit.md, "Measuring the classifier"): the rules are tuned on the development set only
(`labelled.jsonl`, retired test rounds, `validation/dev-*.jsonl`); the current frozen test set (FROZEN_TEST) is
scored once, when the rules are final, and its score is stored in CLASSIFIER_ERROR for the reports.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from .files import atomic_write_json
from .reasoning import split as split_reasoning
from .stats import prf, prf_cis

SCORED_LABELS = ("answered", "partial", "refused", "deflected", "narrative")  # `error` is not a judgement
FROZEN_TEST = "validation/test-round3.jsonl"  # the current frozen test set: scored once, at the end of a round
# the development set (plus validation/dev-*.jsonl): the first labelled set and the retired rounds
DEV_FILES = ("labelled.jsonl", "validation/test-round1.jsonl", "validation/test-round2.jsonl")
CLASSIFIER_ERROR = "validation/classifier-error.json"  # the last score of a frozen test set (audit.py reads it)


def suite_path(name: str) -> Path:
    """A file of the built-in suite directory (nanoseek/audit_suite/...)."""
    return Path(str(resources.files("nanoseek.audit_suite").joinpath(name)))


def dev_files() -> list[Path]:
    """The development set: labelled.jsonl, the retired round(s) and any validation/dev-*.jsonl."""
    extra = sorted(suite_path("validation").glob("dev-*.jsonl"))
    return [suite_path(n) for n in DEV_FILES] + extra


def read_labelled(path: str | Path) -> list[dict[str, Any]]:
    from .audit import AuditError

    rows = []
    for n, line in enumerate(Path(path).read_text("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise AuditError(f"{path}:{n}: not JSON ({e})") from e
        missing = [k for k in ("id", "item_id", "lang", "label", "answer") if k not in r]
        if missing:
            raise AuditError(f"{path}:{n}: a labelled row needs {', '.join(missing)}")
        if r["label"] not in SCORED_LABELS:
            raise AuditError(f"{path}:{n}: label {r['label']!r} is not one of {', '.join(SCORED_LABELS)}")
        rows.append(r)
    return rows


def predict(rows: Sequence[dict[str, Any]], items: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The rules' label (and the rule that fired) for each labelled row, against its suite item."""
    from .audit import AuditError, analyse, load_suite

    items = items if items is not None else {it["id"]: it for it in load_suite()}
    out = []
    for r in rows:
        it = items.get(r["item_id"])
        if it is None:
            raise AuditError(f"{r['id']}: item {r['item_id']!r} is not in the built-in suite")
        s = split_reasoning(r["answer"])  # the one reasoning split: "<think>\n\n</think>\n\nSorry..." as served
        a = analyse({"answer": s.answer, "reasoning": s.reasoning, "finish_reason": "stop"}, it)
        out.append({"label": a["label"], "rule": a["rule"]})
    return out


def _metrics(gold: Sequence[str], pred: Sequence[str], reps: int, seed: int) -> dict[str, Any]:
    m = prf(gold, pred, SCORED_LABELS)
    ci = prf_cis(gold, pred, SCORED_LABELS, reps=reps, seed=seed) if gold else {}

    def cis(key: str) -> list[float]:
        return list(ci.get(key, (math.nan, math.nan)))

    return {"n": len(gold), "accuracy": m["accuracy"], "accuracy_ci": cis("accuracy"), "macro_f1": m["macro_f1"],
            "macro_f1_ci": cis("macro_f1"),
            "per_class": {lab: {**v, **{f"{k}_ci": cis(f"{k}/{lab}") for k in ("precision", "recall", "f1")}}
                          for lab, v in m["per_class"].items()}}


def score(rows: Sequence[dict[str, Any]], preds: Sequence[dict[str, Any]], *, reps: int = 2000,
          seed: int = 0) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class P/R/F1 with bootstrap CIs, overall and per language; the confusion matrix
    (rows: gold, columns: predicted); the misclassified rows; the agreement over translated triples."""
    gold = [r["label"] for r in rows]
    pred = [p["label"] for p in preds]
    scored = [i for i, p in enumerate(pred) if p != "error"]  # `error` cannot come from a text; kept out anyway
    g, p = [gold[i] for i in scored], [pred[i] for i in scored]
    by_lang = {}
    for lang in sorted({rows[i]["lang"] for i in scored}, key=lambda x: ("en", "zh", "ja").index(x)
                       if x in ("en", "zh", "ja") else 9):
        idx = [i for i in scored if rows[i]["lang"] == lang]
        by_lang[lang] = _metrics([gold[i] for i in idx], [pred[i] for i in idx], reps, seed)
    confusion = {a: {b: sum(x == a and y == b for x, y in zip(gold, pred)) for b in (*SCORED_LABELS, "error")}
                 for a in SCORED_LABELS}
    triples: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        if r.get("triple"):
            triples[str(r["triple"])].append(i)
    full = {t: ix for t, ix in triples.items() if len(ix) >= 2}
    disagree = {t: {rows[i]["lang"]: pred[i] for i in ix} for t, ix in full.items() if len({pred[i] for i in ix}) > 1}
    return {
        "n": len(rows), "labels": list(SCORED_LABELS), "gold_counts": dict(Counter(gold)),
        "overall": _metrics(g, p, reps, seed), "by_lang": by_lang, "confusion": confusion,
        "misclassified": [{"id": r["id"], "item_id": r["item_id"], "lang": r["lang"], "gold": gold[i],
                           "pred": pred[i], "rule": preds[i]["rule"], "style": r.get("style")}
                          for i, r in enumerate(rows) if gold[i] != pred[i]],
        "triples": {"n": len(full), "agreeing": len(full) - len(disagree),
                    "agreement": (len(full) - len(disagree)) / len(full) if full else math.nan,
                    "disagreeing": disagree},
        "rows": [{"id": r["id"], "lang": r["lang"], "triple": r.get("triple"), "gold": gold[i], "pred": pred[i]}
                 for i, r in enumerate(rows)],
        "bootstrap": {"reps": reps, "seed": seed, "level": 0.95},
    }


def validate(files: Sequence[str | Path] | None = None, *, reps: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Score the rules on labelled files (default: the frozen test set). Rows of several files are pooled; ids must
    be unique."""
    from .audit import AuditError

    paths = [Path(f) for f in files] if files else [suite_path(FROZEN_TEST)]
    rows: list[dict[str, Any]] = []
    for f in paths:
        if not f.is_file():
            raise AuditError(f"labelled file {f} does not exist")
        rows += [r | {"_file": f.name} for r in read_labelled(f)]
    dup = [k for k, v in Counter(r["id"] for r in rows).items() if v > 1]
    if dup:
        raise AuditError(f"duplicate labelled ids: {', '.join(dup[:5])}")
    res = score(rows, predict(rows), reps=reps, seed=seed)
    res["files"] = [str(f) for f in paths]
    return res


def _f(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def _ci(v: float, ci: Sequence[float]) -> str:
    return f"{_f(v)} [{_f(ci[0])}, {_f(ci[1])}]"


def format_validation(res: dict[str, Any]) -> str:
    """The plain-text table `nanoseek audit --validate` prints."""
    o = res["overall"]
    lines = [f"rule classifier on {res['n']} labelled answers ({', '.join(Path(f).name for f in res['files'])})",
             f"accuracy {_ci(o['accuracy'], o['accuracy_ci'])}   macro-F1 {_ci(o['macro_f1'], o['macro_f1_ci'])}"
             "   (95% bootstrap CIs)", "",
             f"{'label':10s} {'n':>4s}  {'precision':19s} {'recall':19s} {'F1':19s}"]
    for lab, v in o["per_class"].items():
        lines.append(f"{lab:10s} {v['support']:4d}  {_ci(v['precision'], v['precision_ci']):19s} "
                     f"{_ci(v['recall'], v['recall_ci']):19s} {_ci(v['f1'], v['f1_ci']):19s}")
    lines += ["", "per language:"]
    for lang, m in res["by_lang"].items():
        f1s = " ".join(f"{lab[:4]} {_f(v['f1'])}" for lab, v in m["per_class"].items())
        lines.append(f"  {lang} (n={m['n']}): accuracy {_ci(m['accuracy'], m['accuracy_ci'])}, macro-F1 "
                     f"{_ci(m['macro_f1'], m['macro_f1_ci'])}; F1 {f1s}")
    lines += ["", "confusion (rows gold, columns predicted):",
              f"{'':10s} " + " ".join(f"{lab[:9]:>9s}" for lab in (*SCORED_LABELS, "error"))]
    for a, row in res["confusion"].items():
        lines.append(f"{a:10s} " + " ".join(f"{row[b]:9d}" for b in row))
    t = res["triples"]
    lines += ["", f"translated triples: {t['agreeing']}/{t['n']} agree ({_f(t['agreement'])})"]
    for tid, labs in t["disagreeing"].items():
        lines.append(f"  {tid}: " + ", ".join(f"{lg} {lab}" for lg, lab in labs.items()))
    lines += ["", f"misclassified ({len(res['misclassified'])}):"]
    for m in res["misclassified"]:
        lines.append(f"  {m['id']} ({m['item_id']}): gold {m['gold']}, predicted {m['pred']} ({m['rule']})")
    return "\n".join(lines)


def error_summary(res: dict[str, Any], commit: str | None = None) -> dict[str, Any]:
    """The small summary the reports read (CLASSIFIER_ERROR): which set, its size, per class and per language
    precision/recall, and the binary withheld-vs-not precision/recall per language (what a withheld rate rests on)."""
    from .audit import WITHHELD

    def binary(pairs: list[tuple[str, str]]) -> dict[str, float]:
        tp = sum(g in WITHHELD and p in WITHHELD for g, p in pairs)
        fp = sum(g not in WITHHELD and p in WITHHELD for g, p in pairs)
        fn = sum(g in WITHHELD and p not in WITHHELD for g, p in pairs)
        tn = len(pairs) - tp - fp - fn
        return {"precision": tp / (tp + fp) if tp + fp else math.nan,
                "recall": tp / (tp + fn) if tp + fn else math.nan,
                "fpr": fp / (fp + tn) if fp + tn else math.nan, "n": len(pairs)}

    pairs_by_lang: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for row in res["rows"]:
        pairs_by_lang[row["lang"]].append((row["gold"], row["pred"]))
    allp = [p for v in pairs_by_lang.values() for p in v]
    return {
        "set": [Path(f).name for f in res["files"]], "commit": commit, "n": res["n"],
        "accuracy": res["overall"]["accuracy"], "macro_f1": res["overall"]["macro_f1"],
        "per_class": {lab: {k: v[k] for k in ("precision", "recall", "f1", "support")}
                      for lab, v in res["overall"]["per_class"].items()},
        "by_lang": {lg: {"macro_f1": m["macro_f1"]} for lg, m in res["by_lang"].items()},
        "withheld": {"all": binary(allp), **{lg: binary(v) for lg, v in pairs_by_lang.items()}},
    }


def load_error_summary() -> dict[str, Any] | None:
    """The stored score of the last frozen test set, or None when there is none yet (audit.classifier_error)."""
    from .audit import classifier_error

    return classifier_error()


def _finite(x: Any) -> Any:
    """NaN -> None, recursively: the JSON file stays strict JSON."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def _git_commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def command(files: Sequence[str] | None, json_out: str | None, console: Any, *, store_error: bool = False) -> int:
    """`nanoseek audit --validate [FILE ...] [--json OUT] [--store-error]`."""
    from .audit import AuditError

    if store_error and files and [Path(f).resolve() for f in files] != [suite_path(FROZEN_TEST).resolve()]:
        raise AuditError("--store-error records the frozen test set's score only: run it without FILE")
    res = validate(files or None)
    console.print(format_validation(res), highlight=False, markup=False, soft_wrap=True)
    if json_out:
        atomic_write_json(json_out, _finite(res), ensure_ascii=False)
        console.print(f"-> {json_out}", highlight=False, markup=False)
    if store_error:
        # the reports read it: every withheld rate then states the instrument's error (audit.instrument_error)
        atomic_write_json(suite_path(CLASSIFIER_ERROR), _finite(error_summary(res, _git_commit())), ensure_ascii=False)
        console.print(f"-> {suite_path(CLASSIFIER_ERROR)}", highlight=False, markup=False)
    return 0
