"""Distillation: completion parsing, the rejection filter on hand-made traces, trace generation from a local model
and from OpenAI-compatible endpoints (a scripted HTTP server here; the real `nanoseek serve` once it exists), exact
resume, SFT on traces with the reasoning-keeping render, and logit distillation lowering the teacher-student KL."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from nanoseek import build, save_pretrained
from nanoseek.client import EndpointError
from nanoseek.data import train_tokenizer
from nanoseek.distill import (
    FilterConfig,
    GenerateConfig,
    KDConfig,
    LocalTeacher,
    SFTConfig,
    TraceFilter,
    check_same_vocabulary,
    completion_text,
    foreign_fraction,
    generate,
    kd,
    load_prompts,
    make_verifier,
    read_log,
    sample_fields,
    sft,
    token_divergence,
)
from nanoseek.reasoning import split as split_reasoning
from nanoseek.synthetic import generate as synth_items
from nanoseek.synthetic import to_text
from nanoseek.tasks import synth
from nanoseek.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tokenizer, a random `tiny` student and a random `tiny` teacher sharing it."""
    d = tmp_path_factory.mktemp("distill")
    (d / "c.txt").write_text("\n\n".join(to_text(it) for it in synth_items("arithmetic", 300, seed=1)))
    train_tokenizer([d / "c.txt"], 512, d / "tok")
    torch.manual_seed(0)
    save_pretrained(build("tiny"), d / "student", tokenizer=d / "tok")
    torch.manual_seed(1)
    save_pretrained(build("tiny"), d / "teacher", tokenizer=d / "tok")
    synth("arithmetic", 48, "train", 0, d / "chat.jsonl", "chat")  # chat records with reasoning_content
    return d


# ------------------------------------------------------------------------------------------------------------
# parsing and filtering


def test_sample_fields_from_the_one_split():
    # the split's edges are tested in test_reasoning.py; here: what a sample stores
    assert sample_fields(split_reasoning("ans", "think hard")) == {"reasoning": "think hard", "answer": "ans",
                                                                   "closed": True}
    # local engine output after the template's "<think>\n" pre-fill
    assert sample_fields(split_reasoning("step 1\n</think>\n\n<answer>4</answer>", prefilled=True)) == {
        "reasoning": "step 1", "answer": "<answer>4</answer>", "closed": True}
    assert sample_fields(split_reasoning("still thinking", prefilled=True))["closed"] is False
    # empty reasoning_content is empty reasoning, not absent: the content is not searched for inline tags
    assert sample_fields(split_reasoning("a</think>b", ""))["answer"] == "a</think>b"
    assert sample_fields(split_reasoning("just an answer")) == {"reasoning": "", "answer": "just an answer",
                                                                "closed": True}
    assert completion_text({"reasoning": "r", "answer": "<answer>4</answer>"}) == "r\n</think>\n\n<answer>4</answer>"


def test_foreign_fraction_counts_words_not_notation():
    assert foreign_fraction("First add the ones column, then carry the ten.", "What is 2 + 3?") == 0.0
    mixed = "First add the ones column, 然后我们进位 then carry the ten."
    assert foreign_fraction(mixed, "What is 2 + 3?") > 0.3
    # Chinese reasoning with single-letter variables and Greek notation stays "one language"
    assert foreign_fraction("设 x 为未知数，则 x + 3 = 5，所以 x = 2，α 不变。", "求解方程 x + 3 = 5") == 0.0


def _sample(reasoning: str, answer: str, **kw):
    return {"reasoning": reasoning, "answer": answer, "closed": True, "finish_reason": "stop",
            "prompt_tokens": 10, "completion_tokens": 20, **kw}


def test_rejection_sampling_keeps_exactly_the_verified_traces():
    items = synth_items("arithmetic", 3, "train", seed=5)
    verifier, name = make_verifier("arithmetic")
    assert name == "arithmetic"
    good = [f"Add the columns of {it['prompt']} carefully, then check." for it in items]
    records = []
    for it, g in zip(items, good):
        ok = f"<answer>{it['answer']}</answer>"
        samples = [
            _sample(g, ok),                                          # 0 kept
            _sample(g, "<answer>-12345</answer>"),                   # 1 wrong
            _sample(g, ok, finish_reason="length"),                  # 2 truncated
            _sample(g + " more", "", closed=False),                  # 3 unfinished reasoning
            _sample("", ok),                                         # 4 no reasoning
            _sample(g + " 然后我们把这些数字加起来得到结果吧", ok),        # 5 mixed language
            _sample("1 + 1 = 2. " * 80, ok),                         # 6 degenerate repetition
            _sample(g + " \ufffd", ok),                              # 7 broken UTF-8
            _sample("  " + g.replace(" ", "  "), ok + " "),          # 8 duplicate of 0 up to whitespace
            _sample(g + " Another valid route.", ok),                # 9 kept
        ]
        records.append({"prompt_id": it["id"], "item": it, "teacher": "t", "samples": samples,
                        "messages": [{"role": "user", "content": it["prompt"]}]})
    flt = TraceFilter(verifier, FilterConfig())
    kept, verdicts = [], []
    for rec in records:
        k, v = flt(rec)
        kept += k
        verdicts.append(v)
    assert [t["id"] for t in kept] == [f"{it['id']}#{j}" for it in items for j in (0, 9)]
    assert verdicts[0] == [None, "wrong", "truncated", "unfinished_reasoning", "no_reasoning", "mixed_language",
                           "repetitive", "unreadable", "duplicate", None]
    # every kept trace is one the verifier accepts, and every trace the verifier accepts is kept unless another
    # rule (readability, duplicate) rejected it
    for t in kept:
        item = next(it for it in items if it["id"] == t["prompt_id"])
        assert verifier(item, f"{t['messages'][-1]['reasoning_content']}\n</think>\n\n{t['messages'][-1]['content']}")
    s = flt.stats()
    assert (s["samples"], s["accepted"], s["prompts_with_accepted"]) == (30, 6, 3)
    assert s["rejected"] == {"truncated": 3, "unfinished_reasoning": 3, "no_reasoning": 3, "unreadable": 3,
                             "repetitive": 3, "mixed_language": 3, "wrong": 3, "duplicate": 3}
    assert s["acceptance_rate"] == pytest.approx(0.2)
    # the chat record is what `data.prepare(sft=True)` reads: reasoning separate from the answer
    assert kept[0]["messages"][-1] == {"role": "assistant", "reasoning_content": good[0],
                                       "content": f"<answer>{items[0]['answer']}</answer>"}
    # configurable: a per-prompt quota and an over-long limit
    flt = TraceFilter(verifier, FilterConfig(max_per_prompt=1, max_completion_tokens=15))
    assert flt(records[0])[1][0] == "too_long"
    flt = TraceFilter(verifier, FilterConfig(max_per_prompt=1))
    assert flt(records[0])[1][9] == "over_quota"


def test_prompt_files_and_verifiers(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "What is 2+2?", "answer": "4"}) + "\n\n"
                 + json.dumps({"id": "x", "messages": [{"role": "user", "content": "Say hi."}]}) + "\n")
    items = load_prompts(str(f))
    assert [it["id"] for it in items] == ["p-1", "x"]
    verify, name = make_verifier(str(f))
    assert name == "math_verify"
    assert verify(items[0], "thinking\n</think>\n\n<answer>4</answer>") == 1.0
    assert math.isnan(verify(items[1], "hi"))  # no answer column: unverified
    f.write_text(json.dumps({"id": "a", "prompt": "q"}) + "\n" + json.dumps({"id": "a", "prompt": "r"}) + "\n")
    with pytest.raises(ValueError, match="duplicate id"):
        load_prompts(str(f))
    with pytest.raises(FileNotFoundError, match="neither a built-in task"):
        load_prompts(str(tmp_path / "missing.jsonl"))


# ------------------------------------------------------------------------------------------------------------
# generation from a local model: shape and exact resume


class _Interrupt(LocalTeacher):
    """The local teacher, killed (KeyboardInterrupt) when asked for its `stop_after + 1`-th batch."""

    stop_after = 1

    def generate(self, requests, k):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls > self.stop_after:
            raise KeyboardInterrupt
        return super().generate(requests, k)


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_generate_local_shape_and_exact_resume(dirs, tmp_path):
    common = dict(teacher=str(dirs / "teacher"), prompts="arithmetic", n_prompts=6, samples=2, max_tokens=12,
                  batch_prompts=2, progress=False, filter=FilterConfig(min_score=0.0))
    ref = generate(GenerateConfig(out=str(tmp_path / "ref"), **common))
    assert ref["prompts"] == 6 and ref["samples"] == 12
    assert sum(ref["rejected"].values()) + ref["accepted"] == 12
    assert ref["teacher_sampling_flops"] > 0 and ref["teacher_completion_tokens"] > 0
    log = _lines(tmp_path / "ref" / "samples.jsonl")
    assert len(log) == 6 and all(len(r["samples"]) == 2 for r in log)
    assert log[0]["messages"][0]["content"].endswith("<answer> </answer> tags.")
    assert {"reasoning", "answer", "finish_reason", "completion_tokens", "rejected"} <= set(log[0]["samples"][0])
    assert json.loads((tmp_path / "ref" / "stats.json").read_text())["samples"] == 12

    # killed during the second batch: one batch (2 prompts) is logged, nothing else
    out = tmp_path / "run"
    cfg = GenerateConfig(out=str(out), **common)
    teacher = _Interrupt(cfg.teacher, max_tokens=cfg.max_tokens, seed=cfg.seed)
    with pytest.raises(KeyboardInterrupt):
        generate(cfg, teacher=teacher)
    assert len(_lines(out / "samples.jsonl")) == 2
    with (out / "samples.jsonl").open("a") as f:  # a line cut mid-write by a kill -9
        f.write('{"prompt_id": "half')
    # the restart asks the teacher only for the 4 missing prompts (2 batches)
    teacher = _Interrupt(cfg.teacher, max_tokens=cfg.max_tokens, seed=cfg.seed)
    teacher.stop_after = 2
    again = generate(GenerateConfig(out=str(out), **common), teacher=teacher)
    assert teacher.calls == 2 and again["prompts_resumed"] == 2
    log2 = _lines(out / "samples.jsonl")
    assert [r["prompt_id"] for r in log2] == [r["prompt_id"] for r in log]  # no duplicates, none missing
    # per-sample seeds: the resumed run sampled exactly what the uninterrupted one did
    assert [r["samples"] for r in log2] == [r["samples"] for r in log]
    assert (out / "traces.jsonl").read_text() == (tmp_path / "ref" / "traces.jsonl").read_text()
    assert {k: again[k] for k in ("samples", "accepted", "rejected")} == \
        {k: ref[k] for k in ("samples", "accepted", "rejected")}
    # a rerun with everything done calls nothing, and re-filters the log with the current settings
    teacher.stop_after = 0
    strict = generate(GenerateConfig(out=str(out), **{**common, "filter": FilterConfig(max_completion_tokens=0)}),
                      teacher=teacher)
    assert strict["accepted"] == 0 and len(_lines(out / "samples.jsonl")) == 6
    with pytest.raises(ValueError, match="other settings.*samples"):
        generate(GenerateConfig(out=str(out), **{**common, "samples": 3}))


# ------------------------------------------------------------------------------------------------------------
# remote teachers: a scripted OpenAI-compatible server (retries, reasoning_content, inline <think>)


class _FakeOpenAI:
    """Chat completions that answer `What is a op b?` right for even seeds and wrong for odd ones, with
    `reasoning_content` (mode "field"), `reasoning` (mode "reasoning") or inline `<think>` (mode "inline"); the
    first `fail_first` requests get 503, and `status` forces an error code."""

    def __init__(self, mode: str = "field", fail_first: int = 0, status: int | None = None):
        self.mode, self.fail_first, self.status = mode, fail_first, status
        self.requests = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": "fake-r1", "object": "model", "created": 0,
                                                             "owned_by": "test"}]})

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests += 1
                    n = fake.requests
                if fake.status is not None:
                    return self._send(fake.status, {"error": {"message": "nope", "type": "invalid_request_error"}})
                if n <= fake.fail_first:
                    return self._send(503, {"error": {"message": "overloaded", "type": "server_error"}})
                a, op, b = re.search(r"What is (\d+) ([-+*]) (\d+)", req["messages"][-1]["content"]).groups()
                value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
                value += req.get("seed", 0) % 2  # odd seeds: off by one
                reasoning = f"I compute {a} {op} {b} column by column (attempt {req.get('seed')})."
                answer = f"<answer>{value}</answer>"
                if fake.mode == "inline":
                    msg = {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\n{answer}"}
                else:  # "field": DeepSeek's API / nanoseek serve; "reasoning": newer vLLM's field name
                    key = "reasoning_content" if fake.mode == "field" else "reasoning"
                    msg = {"role": "assistant", "content": answer, key: reasoning}
                self._send(200, {"id": f"c{n}", "object": "chat.completion", "created": 0, "model": req["model"],
                                 "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}],
                                 "usage": {"prompt_tokens": 9, "completion_tokens": 11, "total_tokens": 20}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("mode", ["field", "reasoning", "inline"])
def test_generate_remote_with_retries_and_resume(tmp_path, mode):
    fake = _FakeOpenAI(mode=mode, fail_first=3)
    try:
        cfg = GenerateConfig(out=str(tmp_path), teacher_url=fake.url, prompts="arithmetic", n_prompts=8, samples=4,
                             concurrency=4, backoff=0.01, retries=5, progress=False)
        stats = generate(cfg)
        assert stats["teacher"] == f"fake-r1@{fake.url}"  # the endpoint's only model, found by listing
        assert stats["retried_requests"] == 3 and stats["prompts_failed"] == 0
        assert fake.requests == 8 * 4 + 3
        # exactly the even-seed samples are right: the kept traces are those and only those
        log = _lines(tmp_path / "samples.jsonl")
        traces = _lines(tmp_path / "traces.jsonl")
        right = {f"{r['prompt_id']}#{j}" for r in log for j, s in enumerate(r["samples"]) if s["rejected"] is None}
        assert {t["id"] for t in traces} == right and 0 < len(right) < 32
        assert stats["accepted"] == len(right) and stats["rejected"] == {"wrong": 32 - len(right)}
        msg = traces[0]["messages"][-1]
        assert msg["reasoning_content"].startswith("I compute") and msg["content"].startswith("<answer>")
        assert stats["teacher_completion_tokens"] == 32 * 11
        # a restart has nothing left to ask
        before = fake.requests
        again = generate(cfg)
        assert fake.requests == before and again["prompts_resumed"] == 8 and again["accepted"] == len(right)
        assert len(_lines(tmp_path / "traces.jsonl")) == len(right)
        # more prompts later: only the new ones are sampled; fewer: the others' records are ignored, not deleted
        more = generate(GenerateConfig(**{**cfg.__dict__, "n_prompts": 10}))
        assert fake.requests == before + 2 * 4 and more["prompts_resumed"] == 8 and more["samples"] == 40
        fewer = generate(GenerateConfig(**{**cfg.__dict__, "n_prompts": 5}))
        assert fewer["samples"] == 20 and fewer["log_records_ignored"] == 5
        assert len(_lines(tmp_path / "samples.jsonl")) == 10
    finally:
        fake.close()


def test_remote_errors(tmp_path):
    fake = _FakeOpenAI(status=401)
    try:  # a bad key is not retried: the run stops at once with the server's message
        with pytest.raises(EndpointError, match="the teacher .* rejected the API key \\(HTTP 401\\)"):
            generate(GenerateConfig(out=str(tmp_path / "a"), teacher_url=fake.url, teacher_model="m",
                                    n_prompts=3, samples=2, backoff=0.01, progress=False))
        assert fake.requests <= 2 * 4  # at most what was already in flight
        fake.status = 503  # an overloaded server: retried, then the prompts are reported failed (not logged)
        stats = generate(GenerateConfig(out=str(tmp_path / "b"), teacher_url=fake.url, teacher_model="m",
                                        n_prompts=2, samples=1, retries=1, backoff=0.01, progress=False))
        assert stats["prompts_failed"] == 2 and stats["samples"] == 0
        assert read_log(tmp_path / "b" / "samples.jsonl") == []
    finally:
        fake.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(importlib.util.find_spec("nanoseek.serve") is None, reason="nanoseek serve not available yet")
def test_generate_against_nanoseek_serve(dirs, tmp_path):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek.cli", "serve", "--model", str(dirs / "teacher"),
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=5)
        deadline = time.time() + 120
        while True:
            try:
                client.models.list()
                break
            except Exception as e:
                if proc.poll() is not None or time.time() > deadline:
                    err = proc.stderr.read().decode()[-2000:] if proc.poll() is not None else ""
                    raise AssertionError(f"nanoseek serve did not start: {err}") from e
                time.sleep(0.5)
        cfg = GenerateConfig(out=str(tmp_path), teacher_url=f"http://127.0.0.1:{port}/v1", n_prompts=3, samples=2,
                             max_tokens=16, concurrency=2, progress=False, filter=FilterConfig(min_score=0.0))
        stats = generate(cfg)
        assert stats["samples"] == 6 and stats["prompts_failed"] == 0
        assert stats["teacher_completion_tokens"] > 0
        log = _lines(tmp_path / "samples.jsonl")
        assert len(log) == 3 and all(len(r["samples"]) == 2 for r in log)
        assert generate(cfg)["prompts_resumed"] == 3
        assert len(_lines(tmp_path / "samples.jsonl")) == 3
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


# ------------------------------------------------------------------------------------------------------------
# students: SFT on traces, logit distillation


def test_sft_trains_on_the_reasoning(dirs, tmp_path):
    s = sft(SFTConfig(traces=str(dirs / "chat.jsonl"), out=str(tmp_path), student=str(dirs / "student"),
                      overrides=["max_steps=3", "batch_size=4", "progress=false", "dtype=fp32", "save_every=0"]))
    assert s["traces"] == 48 and s["train"]["step"] == 3 and s["train_flops"] > 0
    assert s["seq_len"] >= s["trace_tokens_max"]  # auto seq_len holds whole traces
    assert (Path(s["final_model"]) / "tokenizer.json").is_file()
    # the prepared data trains the reasoning tokens, not only the answer (R1's plain template would drop them)
    from nanoseek.data import TokenDataset

    ds = TokenDataset(tmp_path / "data")
    tok = Tokenizer.load(dirs / "tok")
    n = min(len(ds), 400)
    ids, mask = ds.tokens(0, n), ds.mask(0, n)
    trained = tok.decode([int(t) for t, m in zip(ids, mask) if m])
    first = json.loads((dirs / "chat.jsonl").read_text().splitlines()[0])["messages"][-1]
    assert first["reasoning_content"].splitlines()[0] in trained and "</think>" in trained
    assert np.asarray(mask).min() == 0  # prompts are masked out
    with pytest.raises(ValueError, match="needs --tokenizer"):
        sft(SFTConfig(traces=str(dirs / "chat.jsonl"), out=str(tmp_path / "p"), preset="tiny"))


def test_divergences_by_hand():
    p = torch.tensor([[0.7, 0.2, 0.1]])
    q = torch.tensor([[0.5, 0.3, 0.2]])
    t_logits, s_logits = p.log(), q.log()
    fkl = float((p * (p / q).log()).sum())
    rkl = float((q * (q / p).log()).sum())
    assert float(token_divergence(s_logits, t_logits, "forward_kl")) == pytest.approx(fkl, rel=1e-5)
    assert float(token_divergence(s_logits, t_logits, "reverse_kl")) == pytest.approx(rkl, rel=1e-5)
    m = 0.5 * (p + q)
    jsd = 0.5 * float((p * (p / m).log()).sum()) + 0.5 * float((q * (q / m).log()).sum())
    assert float(token_divergence(s_logits, t_logits, "jsd", beta=0.5)) == pytest.approx(jsd, rel=1e-5)
    assert 0 < jsd < math.log(2)
    # beta = 0 / 1 are exactly forward / reverse KL (GKD's limits, TRL's convention)
    assert float(token_divergence(s_logits, t_logits, "jsd", beta=0.0)) == pytest.approx(fkl, rel=1e-5)
    assert float(token_divergence(s_logits, t_logits, "jsd", beta=1.0)) == pytest.approx(rkl, rel=1e-5)
    # generalized JSD with beta: beta KL(p || M) + (1 - beta) KL(q || M), M = beta p + (1 - beta) q
    b = 0.3
    m = b * p + (1 - b) * q
    g = b * float((p * (p / m).log()).sum()) + (1 - b) * float((q * (q / m).log()).sum())
    assert float(token_divergence(s_logits, t_logits, "jsd", beta=b)) == pytest.approx(g, rel=1e-5)
    # temperature softens both and scales by T^2; equal distributions diverge by 0
    pt, qt = torch.softmax(t_logits / 2, -1), torch.softmax(s_logits / 2, -1)
    want = 4 * float((pt * (pt / qt).log()).sum())
    assert float(token_divergence(s_logits, t_logits, "forward_kl", temperature=2.0)) == pytest.approx(want, rel=1e-5)
    assert float(token_divergence(t_logits, t_logits, "jsd")) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_kd_lowers_the_kl(dirs, tmp_path, divergence):
    s = kd(KDConfig(teacher=str(dirs / "teacher"), student=str(dirs / "student"), out=str(tmp_path),
                    data=str(dirs / "chat.jsonl"), divergence=divergence, steps=12, batch_size=4, seq_len=64, lr=3e-3,
                    warmup_steps=2, save_every=0, progress=False))
    assert s["kl_end"] < 0.7 * s["kl_start"], s
    recs = _lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 13))
    assert (Path(s["final_model"]) / "config.json").is_file() and (tmp_path / "kd.png").is_file()


def test_kd_on_policy(dirs, tmp_path):
    s = kd(KDConfig(teacher=str(dirs / "teacher"), student=str(dirs / "student"), out=str(tmp_path),
                    prompts="arithmetic", lmbda=1.0, divergence="reverse_kl", steps=6, batch_size=4,
                    max_new_tokens=12, lr=3e-3, warmup_steps=1, save_every=0, progress=False))
    recs = [r for r in _lines(tmp_path / "metrics.jsonl") if "loss" in r]
    assert all(r["on_policy"] for r in recs) and all(r["tokens"] > 0 for r in recs)
    assert s["kl_end"] < s["kl_start"]
    with pytest.raises(ValueError, match="need --prompts"):
        KDConfig(teacher="t", student="s", data="d", lmbda=0.5)


def test_kd_refuses_different_tokenizers(dirs, tmp_path):
    (tmp_path / "other.txt").write_text("\n\n".join(f"completely different words {i} zebra quartz" for i in range(300)))
    train_tokenizer([tmp_path / "other.txt"], 400, tmp_path / "tok2")
    torch.manual_seed(2)
    save_pretrained(build("tiny"), tmp_path / "foreign", tokenizer=tmp_path / "tok2")
    with pytest.raises(ValueError, match="tokenizers differ.*distill generate"):
        check_same_vocabulary(dirs / "teacher", tmp_path / "foreign")
    from nanoseek.cli import main

    assert main(["distill", "kd", "--teacher", str(dirs / "teacher"), "--student", str(tmp_path / "foreign"),
                 "--out", str(tmp_path / "kd"), "--data", str(dirs / "chat.jsonl")]) == 2
    shared = check_same_vocabulary(dirs / "teacher", dirs / "student")
    assert shared.vocab_size == Tokenizer.load(dirs / "tok").vocab_size


def test_cli_generate_and_sft(dirs, tmp_path, capsys):
    from nanoseek.cli import main

    fake = _FakeOpenAI()
    try:
        assert main(["distill", "generate", "--teacher-url", fake.url, "--n-prompts", "4", "--samples", "2",
                     "--out", str(tmp_path / "tr"), "--json"]) == 0
    finally:
        fake.close()
    stats = json.loads(capsys.readouterr().out)
    assert stats["samples"] == 8 and stats["accepted"] + stats["rejected"].get("wrong", 0) == 8
    assert stats["accepted"] > 0 and "api_key" not in json.dumps(stats)
    assert main(["distill", "sft", "--student", str(dirs / "student"), "--traces", str(tmp_path / "tr"),
                 "--out", str(tmp_path / "sft"), "max_steps=2", "batch_size=1", "progress=false"]) == 0
    assert (tmp_path / "sft" / "final" / "config.json").is_file()
