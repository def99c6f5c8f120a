"""Serving load test: concurrent streaming chat clients against `nanoseek serve` on loopback, in the style of vLLM's
benchmark_serving.py (Poisson arrivals, a concurrency cap, TTFT / TPOT / ITL percentiles, throughput).

By default it starts its own server (a subprocess) on a `small`-preset model with random weights and a tokenizer
trained on synthetic text (~530 tokens: the model keeps the preset's 4096-entry vocabulary; it only ever emits the
script's tokens). A random model never closes its reasoning, so the server model is *scripted*: every layer's
output projection is zeroed and lm_head maps each token of a fixed chain to the next one, so greedy or sampled
output is R reasoning tokens, `</think>`, then answer tokens. The forward pass does exactly the work of any `small`
model (same shapes, MoE routing, attention over the cache); only the values differ. Requests set `ignore_eos` and
`max_tokens`, so every request produces exactly --output-tokens tokens.

Metrics per request, from the client's side (time.perf_counter around a stdlib http.client streaming request):
  TTFT        first streamed token, reasoning or answer
  TTFA        first answer token (after </think>)
  TPOT        (latency - TTFT) / (output tokens - 1)          (vLLM's definition)
  ITL         gaps between streamed chunks
  E2E         latency of the whole request
Throughput: completed requests and output (and total) tokens per second over the benchmark's wall time. Errors must
be 0; the script exits 1 otherwise. Bounded: --num-prompts requests at most, no new request after --duration
seconds, and a per-request timeout. Loopback only.

    .venv/bin/python benchmarks/serve_load.py                       # 64 requests, 8 concurrent, ~1-2 minutes
    .venv/bin/python benchmarks/serve_load.py --quick               # smoke run
    .venv/bin/python benchmarks/serve_load.py --request-rate 4 --max-concurrency 16
    .venv/bin/python benchmarks/serve_load.py --url http://127.0.0.1:8000 --api-key KEY   # a running server
    .venv/bin/python benchmarks/serve_load.py --json results.json
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import math
import os
import platform
import random
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    start: float = 0.0
    ttft: float | None = None
    ttfa: float | None = None
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


# ---- the server under test -------------------------------------------------------------------------------------


def scripted_small_model(root: Path, reasoning_tokens: int) -> Path:
    """`small` preset, random weights, tokenizer trained on synthetic text, output scripted (see the docstring)."""
    import torch

    from nanoseek import save_pretrained, synthetic
    from nanoseek.data import train_tokenizer
    from nanoseek.model import build
    from nanoseek.reasoning import END_THINK
    from nanoseek.tokenizer import SPECIAL_TOKENS

    items = synthetic.generate("arithmetic", 3000) + synthetic.generate("countdown", 1000)
    (root / "corpus.txt").write_text("\n\n".join(synthetic.to_text(i) for i in items))
    tok = train_tokenizer([root / "corpus.txt"], 4096, root / "tok")
    torch.manual_seed(0)
    model = build("small")
    newline = tok.encode("\n")[0]  # R1's generation prompt ends with "<think>\n"
    printable = [i for i in range(len(SPECIAL_TOKENS), tok.vocab_size) if i != newline
                 and (s := tok.decode([i])).strip() and s.isprintable() and "<" not in s and "\ufffd" not in s]
    random.Random(0).shuffle(printable)
    n_answer = len(printable) - reasoning_tokens  # ~400: longer outputs continue with whatever follows
    chain = [newline, *printable[:reasoning_tokens], tok.token_id(END_THINK),
             *printable[reasoning_tokens:reasoning_tokens + n_answer]]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")):
                p.zero_()  # residual stream = the current token's embedding; the compute is unchanged
        e = model.embed_tokens.weight
        h = e / e.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        model.lm_head.weight.zero_()
        for a, b in zip(chain, chain[1:]):
            model.lm_head.weight[b] = 0.1 * h[a]  # logit margin ~ 0.1 * hidden_size = 25: the script wins
    return save_pretrained(model, root / "model", tokenizer=root / "tok")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, max_batch: int, threads: int | None, log_path: Path, extra: list[str],
                 start_timeout: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log = log_path.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek.cli", "serve", "--model", str(model_dir), "--port",
                             str(port), "--max-batch", str(max_batch), "--max-queue", "1024", "--log-level",
                             "warning", *extra], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + start_timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                pass
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not start:\n{log_path.read_text()[-2000:]}")
        time.sleep(0.2)


# ---- the client --------------------------------------------------------------------------------------------------


def one_request(url: str, api_key: str | None, model: str, prompt: str, max_tokens: int, timeout: float) -> Result:
    u = urllib.parse.urlsplit(url)
    r = Result()
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
                       "stream_options": {"include_usage": True}, "max_tokens": max_tokens, "ignore_eos": True,
                       "temperature": 0.6, "top_p": 0.95})
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    r.start = t0 = time.perf_counter()
    try:
        conn.request("POST", "/v1/chat/completions", body, headers)
        resp = conn.getresponse()
        if resp.status != 200:
            r.error = f"HTTP {resp.status}: {resp.read()[:200].decode(errors='replace')}"
            return r
        last = None
        for raw in resp:  # http.client undoes the chunked encoding; SSE events are "data: ..." lines
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                r.error = chunk["error"].get("message", "error event")
                return r
            now = time.perf_counter()
            if chunk.get("usage"):
                u_ = chunk["usage"]
                r.prompt_tokens, r.output_tokens = u_["prompt_tokens"], u_["completion_tokens"]
                r.reasoning_tokens = (u_.get("completion_tokens_details") or {}).get("reasoning_tokens", 0)
            for ch in chunk.get("choices", []):
                d = ch.get("delta") or {}
                if d.get("reasoning_content") or d.get("content"):
                    if r.ttft is None:
                        r.ttft = now - t0
                    else:
                        r.itl.append(now - last)  # type: ignore[operator]
                    last = now
                if d.get("content") and r.ttfa is None:
                    r.ttfa = now - t0
        r.latency = time.perf_counter() - t0
        r.ok = r.ttft is not None and r.output_tokens > 0
        if not r.ok:
            r.error = "no tokens streamed"
    except (OSError, http.client.HTTPException, json.JSONDecodeError) as e:
        r.error = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    return r


def run_load(url: str, api_key: str | None, model: str, prompts: list[str], *, max_tokens: int,
             max_concurrency: int, request_rate: float, duration: float, timeout: float, seed: int) -> tuple[
                 list[Result], float]:
    """Poisson arrivals at request_rate (inf: all at once), at most max_concurrency in flight."""
    rng = random.Random(seed)
    results: list[Result] = []
    lock = threading.Lock()

    def job(p: str) -> None:
        res = one_request(url, api_key, model, p, max_tokens, timeout)
        with lock:
            results.append(res)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_concurrency) as pool:
        for i, p in enumerate(prompts):
            if time.perf_counter() - t0 > duration:
                break
            pool.submit(job, p)
            if math.isfinite(request_rate) and i + 1 < len(prompts):
                time.sleep(rng.expovariate(request_rate))
    return results, time.perf_counter() - t0


# ---- report ------------------------------------------------------------------------------------------------------


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(results: list[Result], wall: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    s: dict[str, Any] = {
        "requests": len(results), "completed": len(ok), "errors": len(results) - len(ok),
        "error_examples": sorted({r.error for r in results if not r.ok})[:3], "wall_s": wall,
        "request_throughput": len(ok) / wall, "output_token_throughput": out_tokens / wall,
        "total_token_throughput": (in_tokens + out_tokens) / wall, "prompt_tokens": in_tokens,
        "output_tokens": out_tokens, "reasoning_tokens": sum(r.reasoning_tokens for r in ok),
        "with_answer": sum(r.ttfa is not None for r in ok)}
    series = {"ttft": [r.ttft for r in ok if r.ttft is not None], "ttfa": [r.ttfa for r in ok if r.ttfa is not None],
              "tpot": [r.tpot for r in ok if r.tpot is not None], "itl": [x for r in ok for x in r.itl],
              "e2e": [r.latency for r in ok]}
    for name, xs in series.items():
        s[f"{name}_ms"] = {"mean": statistics.fmean(xs) * 1e3 if xs else float("nan"),
                           "p50": pct(xs, 50) * 1e3, "p99": pct(xs, 99) * 1e3}
    return s


def print_report(s: dict[str, Any], setup: dict[str, Any]) -> None:
    print("=" * 60)
    print(f"{'Serving benchmark':^60}")
    print("=" * 60)
    for k, v in setup.items():
        print(f"{k:<36}{v}")
    print("-" * 60)
    rows = [("Successful requests", s["completed"]), ("Errors", s["errors"]),
            ("Benchmark duration (s)", f"{s['wall_s']:.2f}"), ("Prompt tokens", s["prompt_tokens"]),
            ("Output tokens (reasoning)", f"{s['output_tokens']} ({s['reasoning_tokens']})"),
            ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
            ("Output token throughput (tok/s)", f"{s['output_token_throughput']:.1f}"),
            ("Total token throughput (tok/s)", f"{s['total_token_throughput']:.1f}")]
    for k, v in rows:
        print(f"{k:<36}{v}")
    for name, title in (("ttft", "Time to first token"), ("ttfa", "Time to first answer token"),
                        ("tpot", "Time per output token (excl. 1st)"), ("itl", "Inter-token latency"),
                        ("e2e", "End-to-end latency")):
        m = s[f"{name}_ms"]
        print(f"{('-' * 14) + ' ' + title + ' ':-<60}")
        print(f"{'Mean (ms)':<36}{m['mean']:.1f}\n{'P50 (ms)':<36}{m['p50']:.1f}\n{'P99 (ms)':<36}{m['p99']:.1f}")
    print("=" * 60)
    for e in s["error_examples"]:
        print(f"error: {e}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--url", help="a running server on this machine (default: start one)")
    ap.add_argument("--api-key", default=os.environ.get("NANOSEEK_API_KEY"))
    ap.add_argument("--model", help="served model name (default: the server's first)")
    ap.add_argument("--num-prompts", type=int, default=64, help="requests to send (default 64)")
    ap.add_argument("--max-concurrency", type=int, default=8, help="requests in flight at most (default 8)")
    ap.add_argument("--request-rate", type=float, default=float("inf"),
                    help="Poisson arrival rate in requests/s (default inf: as fast as the concurrency allows)")
    ap.add_argument("--duration", type=float, default=120.0, help="no new request after this many seconds")
    ap.add_argument("--output-tokens", type=int, default=64, help="max_tokens of every request (ignore_eos)")
    ap.add_argument("--reasoning-tokens", type=int, default=16, help="own server: scripted reasoning length")
    ap.add_argument("--max-batch", type=int, default=8, help="own server: --max-batch (default 8)")
    ap.add_argument("--threads", type=int, default=None, help="own server: OMP_NUM_THREADS (default: torch's)")
    ap.add_argument("--server-args", default="", help='own server: extra `nanoseek serve` flags, e.g. '
                    '"--compile --dtype bfloat16"')
    ap.add_argument("--start-timeout", type=float, default=None,
                    help="own server: seconds to wait for it (default 120; 900 with --compile: it compiles first)")
    ap.add_argument("--timeout", type=float, default=300.0, help="per-request timeout in seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke run: 12 requests, 4 concurrent, 24 tokens")
    ap.add_argument("--json", help="write the setup and results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.num_prompts, args.max_concurrency, args.output_tokens = 12, 4, 24
    if args.url:
        host = urllib.parse.urlsplit(args.url).hostname or ""
        if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
            ap.error(f"--url must be a loopback address (this is a load test), got {host}")

    from nanoseek.tasks import get_task

    rng = random.Random(args.seed)
    task = get_task("arithmetic")
    items = task.items("test", args.num_prompts, args.seed) if args.num_prompts else []
    prompts = [task.messages(it)[0]["content"] for it in items]  # the chat format's user turn
    rng.shuffle(prompts)

    proc = None
    tmp = tempfile.TemporaryDirectory(prefix="serve_load-")
    try:
        url = args.url
        if url is None:
            t = time.perf_counter()
            model_dir = scripted_small_model(Path(tmp.name), args.reasoning_tokens)
            extra = shlex.split(args.server_args)
            start_timeout = args.start_timeout or (900.0 if "--compile" in extra else 120.0)
            proc, url = start_server(model_dir, args.max_batch, args.threads, Path(tmp.name) / "server.log", extra,
                                     start_timeout)
            print(f"started nanoseek serve ({url}, small preset, max_batch {args.max_batch}"
                  f"{', ' + args.server_args if extra else ''}) in {time.perf_counter() - t:.1f}s", flush=True)
        url = url.rstrip("/").removesuffix("/v1")
        model = args.model
        if model is None:
            u = urllib.parse.urlsplit(url)
            c = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
            c.request("GET", "/v1/models", headers={"Authorization": f"Bearer {args.api_key}"} if args.api_key else {})
            model = json.loads(c.getresponse().read())["data"][0]["id"]
        warm = one_request(url, args.api_key, model, "warm-up", 4, args.timeout)  # first-call costs out of the way
        if not warm.ok:
            raise RuntimeError(f"warm-up request failed: {warm.error}")
        results, wall = run_load(url, args.api_key, model, prompts, max_tokens=args.output_tokens,
                                 max_concurrency=args.max_concurrency, request_rate=args.request_rate,
                                 duration=args.duration, timeout=args.timeout, seed=args.seed)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        tmp.cleanup()
    s = summarize(results, wall)
    setup = {"Server": url if args.url else "own (small preset, scripted)", "Model": model,
             "Max concurrency": args.max_concurrency, "Request rate (req/s)": args.request_rate,
             "Output tokens per request": args.output_tokens,
             "Server threads": args.threads or "torch default", "CPU": f"{os.cpu_count()} cores, "
             f"{platform.machine()}", "Load average (1 min)": f"{os.getloadavg()[0]:.1f}"}
    print_report(s, setup)
    if args.json:
        Path(args.json).write_text(json.dumps({"setup": setup, "results": s, "requests": [
            {**asdict(r), "tpot": r.tpot} for r in results]}, indent=2, default=str))
    return 0 if s["errors"] == 0 and s["completed"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
