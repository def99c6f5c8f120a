"""Evaluation metrics against hand-computed values, and the pipeline on a tiny local model."""

import json
import math

import pytest

from nanoseek.eval import EvalConfig, evaluate, per_item
from nanoseek.stats import bootstrap_ci, majority_vote, paired_difference, pass_at_k, wilson
from nanoseek.synthetic import generate

from .fake_openai import FakeServer, completion, error
from .hf_ref import make_tiny_model_dir


def test_pass_at_k_matches_the_combinatorial_definition():
    for n, c, k in [(8, 0, 1), (8, 3, 1), (8, 3, 2), (8, 3, 8), (10, 9, 5), (16, 1, 4)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact)
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)


def test_wilson_and_bootstrap():
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)  # standard table
    assert wilson(0, 10)[0] == 0.0
    lo, hi = bootstrap_ci([0.0] * 50 + [1.0] * 50)
    assert lo < 0.5 < hi and hi - lo < 0.3


def test_majority_vote():
    assert majority_vote(["3", None, "4", "4", "3"]) == "3"  # tie: earliest sampled
    assert majority_vote(["4", "4", "3"]) == "4"
    assert majority_vote([None, None]) is None


def test_evaluate_with_a_scripted_sampler(tmp_path):
    items = generate("arithmetic", 4, "test")
    right = [f"work\n</think>\n\n<answer>{it['answer']}</answer>" for it in items]
    wrong = "x\n</think>\n\n<answer>-1</answer>"

    def sampler(its, k, temperature):  # item i: i of its k samples are right
        return [[right[i]] * min(i, k) + [wrong] * (k - min(i, k)) if temperature else [right[i] if i % 2 else wrong]
                for i, _ in enumerate(its)]

    s = evaluate(EvalConfig(model="unused", k=4, out=str(tmp_path)), items=items, sampler=sampler)
    assert s["pass@1"] == pytest.approx((0 + 1 + 2 + 3) / 16)
    assert s["cons@4"] == pytest.approx(2 / 4)  # item 3 (3 of 4 right) and item 2 (2-2 tie, right sampled first)
    assert s["greedy"] == pytest.approx(0.5)
    assert s["pass@4"] == pytest.approx(3 / 4)
    rows = [json.loads(x) for x in (tmp_path / "items.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and rows[3]["majority_answer"] == items[3]["answer"]
    assert "| pass@1" in (tmp_path / "summary.md").read_text()


def test_local_model_end_to_end(tmp_path):
    model = make_tiny_model_dir(tmp_path)
    s = evaluate(EvalConfig(model=str(model), n=6, k=2, max_tokens=8, out=str(tmp_path / "ev")))
    assert s["n_items"] == 6 and 0.0 <= s["pass@1"] <= 1.0 and "greedy" in s


def test_cli_task_options_and_engine_rows(tmp_path, capsys):
    """`--task-option` reaches the task (the items change with it) and `--max-batch` the engine; the answers do not
    depend on the rows decoded together; a misspelt option is refused by name before any model is loaded."""
    from nanoseek.cli import main

    model = make_tiny_model_dir(tmp_path)
    base = ["eval", "--model", str(model), "--n", "6", "--k", "2", "--max-tokens", "6"]
    assert main([*base, "--task-option", "max_digits=1", "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--task-option", "max_digits=1", "--max-batch", "3", "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in "ab")
    assert a["config"]["task_options"] == {"max_digits": 1} and b["config"]["max_batch"] == 3
    rows = [[json.loads(x) for x in (tmp_path / d / "items.jsonl").read_text().splitlines()] for d in "ab"]
    assert rows[0] == rows[1]
    assert main([*base, "--out", str(tmp_path / "c")]) == 0
    default = [json.loads(x) for x in (tmp_path / "c" / "items.jsonl").read_text().splitlines()]
    assert [r["id"] for r in default] != [r["id"] for r in rows[0]]  # other problems
    capsys.readouterr()
    assert main([*base, "--task-option", "max_digitz=3"]) == 2
    assert "task arithmetic has no option 'max_digitz'" in capsys.readouterr().err


def test_config_errors():
    with pytest.raises(ValueError, match="k, n and max_batch must be >= 1"):
        EvalConfig(model="m", max_batch=0)
    with pytest.raises(ValueError, match="exactly one of --model DIR or --url URL"):
        EvalConfig()
    with pytest.raises(ValueError, match="--url 'ftp://x' is not an http"):
        EvalConfig(url="ftp://x")


def test_remote_endpoint_end_to_end(tmp_path):
    """A fake OpenAI server (real HTTP, the real client): reasoning in `reasoning_content` for some answers and
    inline for others, one 503 retried; graders read the answer after the reasoning either way."""
    import re

    def respond(body):
        a, op, b = re.search(r"(\d+) ([-+*]) (\d+)", body["messages"][-1]["content"]).groups()
        value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        if body["seed"] % 2:  # odd seeds: inline thinking (no reasoning parser on the server)
            return 200, {}, completion(f"<think>\nadd\n</think>\n\n<answer>{value}</answer>")
        return 200, {}, completion(f"<answer>{value}</answer>", reasoning="add")

    server = FakeServer(models=["r1"], respond=respond)
    server.script.append(error(503, "warming up"))
    try:
        s = evaluate(EvalConfig(url=server.url, n=5, k=2, temperature=0.6, greedy=False, concurrency=2,
                                out=str(tmp_path / "ev")))
    finally:
        server.close()
    assert s["n_items"] == 5 and s["pass@1"] == 1.0  # every answer graded right, whichever form it came in
    assert len(server.posts) == 5 * 2 + 1 and {p["model"] for p in server.posts} == {"r1"}  # the only model


def test_paired_difference_matches_items_by_id_and_rejects_disjoint_sets():
    a = [{"id": f"q{i}", "pass1": 0.0} for i in range(40)]
    b = [{"id": f"q{i}", "pass1": 1.0 if i < 20 else 0.0} for i in reversed(range(40))]  # order must not matter
    d = paired_difference(per_item(a), per_item(b))
    assert d["n"] == 40 and d["mean"] == pytest.approx(0.5) and 0.3 < d["ci"][0] < 0.5 < d["ci"][1] < 0.7
    same = paired_difference(per_item(a), per_item(a))
    assert same["mean"] == 0 and same["ci"] == (0.0, 0.0)
    with pytest.raises(ValueError, match="share no item ids"):
        paired_difference(per_item(a), per_item([{"id": "other", "pass1": 1.0}]))
