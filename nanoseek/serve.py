"""OpenAI-compatible HTTP server over the engine, with DeepSeek-R1's reasoning split and a web chat page.

Read top to bottom (the reasoning split, `<think>...</think>` -> reasoning_content / content as vLLM's deepseek_r1
parser and DeepSeek's own API, is reasoning.StreamSplitter): OpenAI-shaped errors -> request parsing (every parameter
checked, unsupported ones rejected naming the `param`) -> the engine thread (one thread runs Engine.step() in a
loop; each HTTP request waits on its own asyncio queue) -> Prometheus metrics (prometheus_client) -> the FastAPI app
(chat completions, completions, models, health, metrics, the static web page) -> serve() and a background server
for tests. docs/serving.md has the API details and the design notes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.exceptions import HTTPException

from .infer import Engine, RequestOutput, SamplingParams
from .reasoning import END_THINK, StreamSplitter, detect_reasoning
from .tokenizer import Tokenizer

log = logging.getLogger("nanoseek.serve")

# ----------------------------------------------------------------------------------------------------------------
# Errors, shaped as OpenAI's: {"error": {"message", "type", "param", "code"}}


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(param: str | None, message: str, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


# ----------------------------------------------------------------------------------------------------------------
# Request parsing: everything is checked before the engine sees it


# vLLM's extensions of the OpenAI API that the engine supports (sent by clients in `extra_body`)
_VLLM_EXTRAS = ("top_k", "min_p", "repetition_penalty", "stop_token_ids", "ignore_eos", "include_stop_str_in_output",
                "skip_special_tokens")
# OpenAI parameters that are accepted only at a value that means "feature not used"
_NEUTRAL = {"response_format": lambda v: isinstance(v, dict) and v.get("type") == "text",
            "modalities": lambda v: v == ["text"], "store": lambda v: v is False,
            "service_tier": lambda v: v in ("auto", "default"), "logit_bias": lambda v: v == {},
            "parallel_tool_calls": lambda v: isinstance(v, bool), "echo": lambda v: v is False,
            "suffix": lambda v: v == "", "metadata": lambda v: isinstance(v, dict)}
_CHAT_KEYS = frozenset({"model", "messages", "stream", "stream_options", "n", "stop", "max_tokens",
                        "max_completion_tokens", "temperature", "top_p", "seed", "logprobs", "top_logprobs",
                        "presence_penalty", "frequency_penalty", "user", *_VLLM_EXTRAS})
_COMPLETION_KEYS = frozenset({"model", "prompt", "stream", "stream_options", "n", "best_of", "stop", "max_tokens",
                              "temperature", "top_p", "seed", "logprobs", "presence_penalty", "frequency_penalty",
                              "user", *_VLLM_EXTRAS})
MAX_N = 16
MAX_STOP = 16


def _check_keys(body: dict[str, Any], allowed: frozenset[str]) -> None:
    for key, value in body.items():
        if key in allowed or value is None:  # null means "not given", as OpenAI treats it
            continue
        if key in _NEUTRAL and _NEUTRAL[key](value):
            continue
        if key in _NEUTRAL or key in ("tools", "tool_choice", "functions", "function_call", "audio", "prediction",
                                      "reasoning_effort", "web_search_options", "verbosity"):
            raise _bad(key, f"'{key}' is not supported by this server (value {json.dumps(value)[:80]})",
                       "unsupported_parameter")
        raise _bad(key, f"Unrecognized request argument supplied: {key}", "unknown_parameter")


def _num(body: dict[str, Any], name: str, default: Any, lo: float | None = None, hi: float | None = None, *,
         integer: bool = False, lo_open: bool = False) -> Any:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)) or \
            (isinstance(v, float) and not math.isfinite(v)):
        raise _bad(name, f"'{name}' must be {'an integer' if integer else 'a number'}, got {json.dumps(v)[:40]}",
                   "invalid_type")
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        lo_s = "-inf" if lo is None else str(lo)
        rng = f"{'(' if lo_open else '['}{lo_s}, {'inf' if hi is None else hi}]"
        raise _bad(name, f"'{name}' must be in {rng}, got {v}")
    return v


def _bool(body: dict[str, Any], name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name, f"'{name}' must be a boolean, got {json.dumps(v)[:40]}", "invalid_type")
    return v


def _stop(body: dict[str, Any]) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", "'stop' must be a string or a list of strings", "invalid_type")
    if len(stops) > MAX_STOP:
        raise _bad("stop", f"'stop' takes at most {MAX_STOP} strings, got {len(stops)}")
    if any(not s for s in stops):
        raise _bad("stop", "'stop' strings must be non-empty")
    return stops


@dataclass
class GenerationRequest:
    """A parsed request: the prompts (token ids), the sampling of each choice, and the response options."""

    kind: str  # "chat" | "completion"
    prompts: list[list[int]]
    params: list[SamplingParams]  # one per sequence: prompt p, choice j at p * n + j
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None  # None: no logprobs; else the number of top alternatives
    max_tokens_param: str | None = None  # which field set max_tokens, for error messages

    @property
    def num_sequences(self) -> int:
        return len(self.params)


def _sampling(body: dict[str, Any], n: int, max_tokens: int | None, logprobs: int | None,
              defaults: dict[str, float]) -> list[SamplingParams]:
    temperature = _num(body, "temperature", defaults.get("temperature", 1.0), 0, 2)
    top_p = _num(body, "top_p", defaults.get("top_p", 1.0), 0, 1, lo_open=True)
    seed = _num(body, "seed", None, -(2**63), 2**64 - 1, integer=True)
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None and (not isinstance(stop_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in stop_ids)):
        raise _bad("stop_token_ids", "'stop_token_ids' must be a list of non-negative integers", "invalid_type")
    common = dict(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=_stop(body), stop_token_ids=stop_ids,
        top_k=_num(body, "top_k", -1, integer=True), min_p=_num(body, "min_p", 0.0, 0, 1),
        repetition_penalty=_num(body, "repetition_penalty", 1.0, 0, lo_open=True),
        presence_penalty=_num(body, "presence_penalty", 0.0, -2, 2),
        frequency_penalty=_num(body, "frequency_penalty", 0.0, -2, 2),
        ignore_eos=_bool(body, "ignore_eos"), include_stop_str_in_output=_bool(body, "include_stop_str_in_output"),
        skip_special_tokens=_bool(body, "skip_special_tokens", True), logprobs=logprobs)
    if common["top_k"] != -1 and common["top_k"] < 1:
        raise _bad("top_k", f"'top_k' must be -1 (off) or >= 1, got {common['top_k']}")
    # n > 1 with a seed: choice j uses seed + j, so the choices differ and the response is still reproducible
    return [SamplingParams(**common, seed=None if seed is None else (seed + j) % 2**64) for j in range(n)]


def _stream_options(body: dict[str, Any], stream: bool) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not stream:
        raise _bad("stream_options", "'stream_options' is only allowed when 'stream' is enabled")
    if not isinstance(opts, dict):
        raise _bad("stream_options", "'stream_options' must be an object", "invalid_type")
    for k in opts:
        if k != "include_usage":
            raise _bad(f"stream_options.{k}", f"Unrecognized stream option: {k}", "unknown_parameter")
    return _bool(opts, "include_usage")


def _text_content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for i, p in enumerate(content):
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise _bad(f"{where}[{i}]", "only text content parts are supported", "unsupported_parameter")
            parts.append(p["text"])
        return "".join(parts)
    raise _bad(where, "message content must be a string or a list of text parts", "invalid_type")


def parse_messages(messages: Any) -> list[dict[str, str]]:
    """OpenAI messages -> the template's {"role", "content"}; `developer` (OpenAI's newer name) means system."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "'messages' must be a non-empty list", "invalid_type")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", "each message must be an object", "invalid_type")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise _bad(f"messages[{i}].role", f"unsupported role {json.dumps(role)} (system, developer, user, "
                       "assistant)")
        if m.get("tool_calls"):
            raise _bad(f"messages[{i}].tool_calls", "tool calls are not supported", "unsupported_parameter")
        # an assistant turn's reasoning_content is dropped, as R1's template drops past reasoning anyway; its
        # content is null when the turn stopped inside the reasoning
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        out.append({"role": "system" if role == "developer" else role,
                    "content": _text_content(content, f"messages[{i}].content")})
    return out


def _n(body: dict[str, Any]) -> int:
    return _num(body, "n", 1, 1, MAX_N, integer=True)


def parse_chat(body: dict[str, Any], encode: Callable[[list[dict[str, str]]], list[int]],
               defaults: dict[str, float]) -> GenerationRequest:
    _check_keys(body, _CHAT_KEYS)
    messages = parse_messages(body.get("messages"))
    stream = _bool(body, "stream")
    n = _n(body)
    include_usage = _stream_options(body, stream)
    want_logprobs = _bool(body, "logprobs")
    top = _num(body, "top_logprobs", None, 0, 20, integer=True)
    if top is not None and not want_logprobs:
        raise _bad("top_logprobs", "'top_logprobs' requires 'logprobs' to be true")
    # max_completion_tokens is OpenAI's newer name and wins, as in vLLM
    which = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _num(body, which, None, 1, integer=True)
    logprobs = (top or 0) if want_logprobs else None
    params = _sampling(body, n, max_tokens, logprobs, defaults)
    return GenerationRequest("chat", [encode(messages)], params, n, stream, include_usage, logprobs, which)


def parse_completion(body: dict[str, Any], encode: Callable[[str], list[int]], vocab_size: int,
                     defaults: dict[str, float]) -> GenerationRequest:
    _check_keys(body, _COMPLETION_KEYS)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [encode(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = [encode(p) for p in prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
            for p in prompt):
        prompts = [list(p) for p in prompt]
    else:
        raise _bad("prompt", "'prompt' must be a string, a list of strings, a list of token ids or a list of lists "
                   "of token ids (non-empty)", "invalid_type")
    if any(t < 0 or t >= vocab_size for p in prompts for t in p):
        raise _bad("prompt", f"prompt token ids must be in [0, {vocab_size})")
    stream = _bool(body, "stream")
    n = _n(body)
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise _bad("best_of", "'best_of' is not supported (it must equal n)", "unsupported_parameter")
    include_usage = _stream_options(body, stream)
    logprobs = _num(body, "logprobs", None, 0, 20, integer=True)
    max_tokens = _num(body, "max_tokens", 16, 1, integer=True)  # OpenAI's default for legacy completions
    params = _sampling(body, n, max_tokens, logprobs, defaults)
    return GenerationRequest("completion", prompts, params * len(prompts), n, stream, include_usage, logprobs,
                             "max_tokens")


# ----------------------------------------------------------------------------------------------------------------
# The engine thread


class EngineDead(RuntimeError):
    pass


class ClientGone(Exception):
    pass


CLIENT_GONE = ClientGone()  # put on a request's queue when its client disconnects


class EngineWorker:
    """Runs Engine.step() in a loop on one thread; outputs go to per-request asyncio queues on the server's loop.

    Engine.add_request/abort are thread-safe, so the event loop calls them directly; the worker only steps.
    Every step's outputs are handed over in one call_soon_threadsafe (one loop wake-up per step, not per token).
    """

    def __init__(self, engine: Engine, metrics: Metrics) -> None:
        self.engine, self.metrics = engine, metrics
        self.queues: dict[str, asyncio.Queue] = {}
        self.started: dict[str, float] = {}  # sequence id -> submit time (for TTFT)
        self.last: dict[str, float] = {}  # sequence id -> time of its last token
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def in_flight(self) -> int:
        return len(self.queues)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    def submit(self, prompt: list[int], params: SamplingParams, rid: str, queue: asyncio.Queue) -> None:
        """Called on the event loop. Raises ValueError (from the engine's own checks) for a bad request."""
        self.engine.add_request(prompt, params, rid)
        self.queues[rid] = queue
        self.started[rid] = time.perf_counter()
        self._wake.set()

    def abort(self, rid: str) -> None:
        if rid in self.queues:
            self.engine.abort(rid)
            self._wake.set()

    def _run(self) -> None:
        assert self._loop is not None
        while not self._stopping:
            self._wake.clear()
            if not self.engine.has_work():
                self._wake.wait(0.5)
                continue
            try:
                outs = self.engine.step()
            except BaseException as e:  # noqa: BLE001 - reported to every waiting request, then the thread ends
                log.exception("engine step failed; the server stops accepting requests")
                self.error = e
                self._loop.call_soon_threadsafe(self._fail_all, e)
                return
            if outs:
                self._loop.call_soon_threadsafe(self._dispatch, outs, time.perf_counter())

    def _dispatch(self, outs: list[RequestOutput], now: float) -> None:
        m = self.metrics
        for out in outs:
            q = self.queues.get(out.request_id)
            if q is None:
                continue
            q.put_nowait(out)
            rid = out.request_id
            if out.token_ids:
                if rid not in self.last:
                    m.ttft.observe(now - self.started[rid])
                else:  # per-token latency: a step that emits k tokens (speculative) spreads its time over them
                    gap = (now - self.last[rid]) / len(out.token_ids)
                    for _ in out.token_ids:
                        m.itl.observe(gap)
                self.last[rid] = now
            if out.finished:
                m.finished.labels(finish_reason=out.finish_reason or "unknown").inc()
                m.prompt_tokens.inc(out.prompt_tokens)
                m.generation_tokens.inc(out.completion_tokens)
                m.e2e.observe(now - self.started[rid])
                del self.queues[rid], self.started[rid]
                self.last.pop(rid, None)

    def _fail_all(self, e: BaseException) -> None:
        for q in self.queues.values():
            q.put_nowait(EngineDead(f"the engine failed: {type(e).__name__}: {e}"))
        self.queues.clear()
        self.started.clear()
        self.last.clear()


# ----------------------------------------------------------------------------------------------------------------
# Prometheus metrics


_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """One server's metrics, in a registry of its own: several servers in one process (the tests) do not collide,
    and each /metrics shows its own. Updated on the event loop (the worker hands its outputs over there)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.finished = Counter("nanoseek_requests_total", "Finished sequences (one per choice), by finish reason.",
                                ["finish_reason"], registry=r)
        self.http = Counter("nanoseek_http_requests_total", "HTTP responses of the API, by path and status.",
                            ["path", "code"], registry=r)
        self.prompt_tokens = Counter("nanoseek_prompt_tokens_total", "Prompt tokens of finished sequences.",
                                     registry=r)
        self.generation_tokens = Counter("nanoseek_generation_tokens_total",
                                         "Generated tokens of finished sequences.", registry=r)
        self.ttft = Histogram("nanoseek_time_to_first_token_seconds",
                              "Time from arrival to the first generated token.", buckets=_LATENCY, registry=r)
        self.itl = Histogram("nanoseek_time_per_output_token_seconds", "Time between output tokens of a sequence.",
                             buckets=_LATENCY, registry=r)
        self.e2e = Histogram("nanoseek_e2e_request_latency_seconds",
                             "Time from arrival to the last token of a sequence.", buckets=_LATENCY, registry=r)

    def watch(self, worker: EngineWorker) -> None:
        self.registry.register(_EngineState(worker))


class _EngineState:
    """A custom collector: the batch, the queue and the engine's own step count, read when scraped."""

    def __init__(self, worker: EngineWorker) -> None:
        self.worker = worker

    def collect(self) -> Iterator[Metric]:
        running = len(self.worker.engine.rows)  # a len() of the engine thread's list: atomic under the GIL
        yield GaugeMetricFamily("nanoseek_requests_running", "Sequences in the running batch.", value=running)
        yield GaugeMetricFamily("nanoseek_requests_waiting", "Sequences queued for a batch slot (queue depth).",
                                value=max(0, self.worker.in_flight - running))
        yield CounterMetricFamily("nanoseek_engine_steps", "Engine scheduling steps.",
                                  value=self.worker.engine.stats.steps)


# ----------------------------------------------------------------------------------------------------------------
# The server


@dataclass
class ServeConfig:
    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # None: NANOSEEK_API_KEY from the environment, if set
    served_model_name: str | None = None  # default: the model directory's name
    max_model_len: int | None = None
    chat_template: str | None = None  # a Jinja file replacing the tokenizer's template
    reasoning_parser: str = "auto"  # auto | deepseek_r1 | none
    max_batch: int = 8
    max_queue: int = 64  # sequences waiting beyond the batch before requests get 429
    max_body_bytes: int = 4 * 2**20
    num_speculative_tokens: int = 0
    seed: int | None = None
    log_level: str = "info"
    compile: bool = False  # Engine(compile=True): a compiled decode step per batch bucket, compiled at startup
    dtype: str = "auto"  # weights and cache: auto (bf16 on CUDA, fp32 on a CPU) | float32 | bfloat16 | float16
    device: str | None = None  # None: nanoseek.device.default_device() (CUDA if available, else CPU)

    def __post_init__(self) -> None:
        from .device import dtype_name

        dtype_name(self.dtype)  # a bad --dtype fails before the model is read


class Server:
    """The loaded model, engine, worker and FastAPI app of `nanoseek serve`."""

    def __init__(self, cfg: ServeConfig, engine: Engine, tokenizer: Tokenizer,
                 generation_defaults: dict[str, float] | None = None) -> None:
        self.cfg, self.engine, self.tokenizer = cfg, engine, tokenizer
        self.name = cfg.served_model_name or Path(cfg.model).resolve().name
        self.api_key = cfg.api_key if cfg.api_key is not None else os.environ.get("NANOSEEK_API_KEY") or None
        self.reasoning = detect_reasoning(tokenizer, cfg.reasoning_parser)
        self.end_think_id = tokenizer.tok.token_to_id(END_THINK)
        self.defaults = generation_defaults or {}
        self.metrics = Metrics()
        self.worker = EngineWorker(engine, self.metrics)
        self.metrics.watch(self.worker)
        self.created = int(time.time())
        self.app = self._build_app()

    @classmethod
    def from_config(cls, cfg: ServeConfig) -> Server:
        from .device import resolve_device, resolve_dtype
        from .weights import load

        device = resolve_device(cfg.device)  # before reading anything: `--device cuda` without a GPU fails fast
        model_dir = Path(cfg.model)
        if not (model_dir / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {model_dir}: the server needs the model's tokenizer")
        tokenizer = Tokenizer.load(model_dir)
        if cfg.chat_template is not None:
            tokenizer.chat_template = Path(cfg.chat_template).read_text(encoding="utf-8")
        model = load(model_dir, device=device, dtype=resolve_dtype(cfg.dtype, device)).eval()
        engine = Engine(model, tokenizer, max_batch=cfg.max_batch, max_model_len=cfg.max_model_len,
                        num_speculative_tokens=cfg.num_speculative_tokens, seed=cfg.seed, compile=cfg.compile)
        defaults: dict[str, float] = {}
        gen = model_dir / "generation_config.json"
        if gen.is_file():  # as vLLM: the model's recommended sampling is the default (R1: 0.6 / 0.95)
            g = json.loads(gen.read_text())
            defaults = {k: float(g[k]) for k in ("temperature", "top_p") if isinstance(g.get(k), int | float)}
        return cls(cfg, engine, tokenizer, defaults)

    # ---- helpers ---------------------------------------------------------------------------------------------
    def _check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not header:
            raise APIError(401, "You didn't provide an API key. Provide it in the Authorization header as "
                           "'Bearer YOUR_KEY'.", code="missing_api_key")
        scheme, _, key = header.partition(" ")
        # compare_digest: the time taken does not reveal how much of the key matched
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def _read_json(self, request: Request) -> dict[str, Any]:
        limit = self.cfg.max_body_bytes
        too_large = APIError(413, f"Request body too large: the limit is {limit} bytes.", code="request_too_large")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():  # also bounds bodies sent without Content-Length (chunked)
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"We could not parse the JSON body of your request: {e}", code="invalid_json") from e
        if not isinstance(body, dict):
            raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
        return body

    def _check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _bad("model", "you must provide a model parameter", "missing_required_parameter")
        if model != self.name:  # OpenAI answers an unknown model with 404 model_not_found
            raise APIError(404, f"The model '{model}' does not exist. This server serves '{self.name}'.",
                           param="model", code="model_not_found")

    def _encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not self.tokenizer.chat_template:
            raise _bad("messages", "the model has no chat template (pass --chat-template FILE)", "no_chat_template")
        try:
            return self.tokenizer.encode_chat(messages, add_generation_prompt=True)
        except Exception as e:  # a template's raise_exception (e.g. role order), or a rendering error
            raise _bad("messages", f"the chat template could not render the messages: {e}") from e

    def _encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_bos=self.tokenizer.bos_id is not None)

    def _check_lengths(self, req: GenerationRequest) -> None:
        limit = self.engine.max_model_len
        where = "messages" if req.kind == "chat" else "prompt"
        for p, sp in zip(req.prompts, req.params[:: req.n]):
            if len(p) >= limit:
                raise _bad(where, f"This model's maximum context length is {limit} tokens. However, your "
                           f"{where} resulted in {len(p)} tokens.", "context_length_exceeded")
            if sp.max_tokens is not None and len(p) + sp.max_tokens > limit:
                raise _bad(req.max_tokens_param, f"This model's maximum context length is {limit} tokens. "
                           f"However, you requested {len(p) + sp.max_tokens} tokens ({len(p)} in the {where}, "
                           f"{sp.max_tokens} in the completion). Please reduce the length of the {where} or "
                           "completion.", "context_length_exceeded")

    def _submit(self, req: GenerationRequest, base: str, request: Request) -> _Submission:
        w = self.worker
        if not w.alive:
            raise APIError(503, "The engine is not running; the server cannot generate.", "server_error",
                           code="engine_unavailable")
        capacity = self.cfg.max_batch + self.cfg.max_queue
        if w.in_flight + req.num_sequences > capacity:
            raise APIError(429, f"The server is overloaded: {w.in_flight} sequences in flight, capacity "
                           f"{capacity}. Retry later.", "rate_limit_error", code="rate_limit_exceeded")
        sub = _Submission(w)
        try:
            for i, sp in enumerate(req.params):
                rid = f"{base}-{i}"
                w.submit(req.prompts[i // req.n], sp, rid, sub.queue)
                sub.add(rid)
        except ValueError as e:  # the engine's own checks; take back what was already queued
            sub.abort()
            raise _bad(None, str(e)) from e
        sub.watch(request)
        return sub

    # ---- response building -----------------------------------------------------------------------------------
    # Logprobs are of the processed distribution (infer.SamplingParams): tokens removed by top-p/top-k are -inf,
    # which JSON cannot carry; vLLM's -9999.0 stands in for them.
    def _token_str(self, t: int) -> str:
        return self.tokenizer.decode([t])

    def _chat_logprobs(self, out: RequestOutput) -> list[dict[str, Any]]:
        entries = []
        tops = out.top_logprobs or [{}] * len(out.token_ids)
        for t, lp, top in zip(out.token_ids, out.logprobs or [], tops):
            s = self._token_str(t)
            entries.append({"token": s, "logprob": _finite(lp), "bytes": list(s.encode()),
                            "top_logprobs": [{"token": (ts := self._token_str(i)), "logprob": _finite(v),
                                              "bytes": list(ts.encode())} for i, v in top.items()]})
        return entries

    def _completion_logprobs(self, out: RequestOutput, offset: int) -> dict[str, Any]:
        tokens = [self._token_str(t) for t in out.token_ids]
        offsets = []
        for s in tokens:
            offsets.append(offset)
            offset += len(s)
        tops = out.top_logprobs or [{}] * len(out.token_ids)
        return {"tokens": tokens, "token_logprobs": [_finite(v) for v in out.logprobs or []],
                "top_logprobs": [{self._token_str(i): _finite(v) for i, v in top.items()} for top in tops],
                "text_offset": offsets}

    def _usage(self, req: GenerationRequest, outs: dict[int, RequestOutput],
               splitters: list[StreamSplitter] | None) -> dict[str, Any]:
        prompt = sum(len(p) for p in req.prompts)
        completion = sum(o.completion_tokens for o in outs.values())
        usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                                 "total_tokens": prompt + completion}
        if splitters is not None:
            usage["completion_tokens_details"] = {"reasoning_tokens": sum(s.reasoning_tokens for s in splitters)}
        return usage

    def _splitters(self, req: GenerationRequest) -> list[StreamSplitter] | None:
        if req.kind != "chat":
            return None
        return [StreamSplitter(self.reasoning, self.end_think_id) for _ in range(req.num_sequences)]

    async def _collect(self, req: GenerationRequest, sub: _Submission) -> tuple[
            dict[int, RequestOutput], list[StreamSplitter] | None]:
        """Non-streaming: merge the deltas (ClientGone if the client disconnects meanwhile)."""
        outs: dict[int, RequestOutput] = {}
        splitters = self._splitters(req)
        try:
            async for i, delta in sub.events():
                outs.setdefault(i, RequestOutput(delta.request_id)).merge(delta)
                if splitters is not None:
                    splitters[i].feed(delta.text, delta.token_ids)
                    if delta.finished:
                        splitters[i].finish()
        finally:
            sub.abort()
        return dict(sorted(outs.items())), splitters

    # ---- endpoints -------------------------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        return await self._completions(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._completions(request, "completion")

    async def _completions(self, request: Request, kind: str) -> Response:
        self._check_auth(request)
        body = await self._read_json(request)
        self._check_model(body)
        if kind == "chat":
            req = parse_chat(body, self._encode_chat, self.defaults)
        else:
            req = parse_completion(body, self._encode_text, self.engine.vocab_size, self.defaults)
        self._check_lengths(req)
        base = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        # submitted before the response starts: overload and engine errors are still an HTTP status
        sub = self._submit(req, base, request)
        if req.stream:
            return StreamingResponse(self._stream(req, base, sub), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            outs, splitters = await self._collect(req, sub)
        except ClientGone:
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it, the log shows it
        choices = []
        for i, out in outs.items():
            finish = out.finish_reason if out.finish_reason != "abort" else "stop"
            if kind == "chat":
                message: dict[str, Any] = {"role": "assistant"}
                if self.reasoning:
                    s = splitters[i]  # type: ignore[index]
                    message.update(content=s.answer, reasoning_content=s.reasoning_content,
                                   reasoning=s.reasoning_content)
                else:
                    message["content"] = out.text
                choice: dict[str, Any] = {"index": i, "message": message, "finish_reason": finish,
                                          "stop_reason": out.stop_reason,
                                          "logprobs": {"content": self._chat_logprobs(out)}
                                          if req.logprobs is not None else None}
            else:
                choice = {"index": i, "text": out.text, "finish_reason": finish, "stop_reason": out.stop_reason,
                          "logprobs": self._completion_logprobs(out, 0) if req.logprobs is not None else None}
            choices.append(choice)
        return JSONResponse({"id": base, "object": "chat.completion" if kind == "chat" else "text_completion",
                             "created": int(time.time()), "model": self.name, "choices": choices,
                             "usage": self._usage(req, outs, splitters)})

    async def _stream(self, req: GenerationRequest, base: str, sub: _Submission) -> AsyncIterator[str]:
        """The SSE body. Its `finally` aborts the unfinished sequences however the stream ends: done, an error, the
        client gone (the watcher's ClientGone, or the response cancelled or closed: CancelledError, GeneratorExit)."""
        chat = req.kind == "chat"
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        splitters = self._splitters(req)
        outs: dict[int, RequestOutput] = {}
        offsets = [0] * req.num_sequences

        def chunk(choices: list[dict[str, Any]]) -> str:
            data: dict[str, Any] = {"id": base, "object": obj, "created": created, "model": self.name,
                                    "choices": choices}
            if req.include_usage:
                data["usage"] = None  # as OpenAI: every chunk has the field, only the last one fills it
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        try:
            if chat:  # the first chunk of each choice carries the role, as OpenAI's
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(req.num_sequences)])
            async for i, d in sub.events():
                outs.setdefault(i, RequestOutput(d.request_id)).merge(d)
                finish = None if not d.finished else (d.finish_reason if d.finish_reason != "abort" else "stop")
                end = {"stop_reason": d.stop_reason} if finish else {}
                if chat:
                    s = splitters[i]  # type: ignore[index]
                    r, c = s.feed(d.text, d.token_ids)
                    if d.finished:
                        r2, c2 = s.finish()
                        r, c = r + r2, c + c2
                    delta: dict[str, Any] = {"reasoning_content": r, "reasoning": r} if r else {}
                    if c:
                        delta["content"] = c
                    lp = {"content": self._chat_logprobs(d)} if req.logprobs is not None and d.token_ids else None
                    if delta or lp or finish:
                        yield chunk([{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish, **end}])
                else:
                    lp = self._completion_logprobs(d, offsets[i]) if req.logprobs is not None else None
                    offsets[i] += len(d.text)
                    if d.text or lp or finish:
                        yield chunk([{"index": i, "text": d.text, "logprobs": lp, "finish_reason": finish, **end}])
            if req.include_usage:
                data = {"id": base, "object": obj, "created": created, "model": self.name, "choices": [],
                        "usage": self._usage(req, outs, splitters)}
                yield f"data: {json.dumps(data)}\n\n"
            yield "data: [DONE]\n\n"
        except ClientGone:
            return  # nobody is reading
        except APIError as e:  # mid-stream the status is sent: the openai client raises on an error event
            yield f"data: {json.dumps(e.body())}\n\n"
        finally:
            sub.abort()

    def _models(self) -> list[dict[str, Any]]:
        return [{"id": self.name, "object": "model", "created": self.created, "owned_by": "nanoseek",
                 "max_model_len": self.engine.max_model_len}]

    # ---- the app ---------------------------------------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        @contextlib.asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            self.worker.start(asyncio.get_running_loop())
            log.info("serving %s (max_batch %d, max_model_len %d, reasoning split %s, %s)", self.name,
                     self.engine.max_batch, self.engine.max_model_len, "on" if self.reasoning else "off",
                     "API key required" if self.api_key else "no API key")
            yield
            self.worker.stop()

        app = FastAPI(title="nanoseek", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
        app.add_middleware(_CountResponses, metrics=self.metrics)

        @app.exception_handler(APIError)
        async def api_error(request: Request, e: APIError) -> JSONResponse:
            return JSONResponse(e.body(), status_code=e.status)

        @app.exception_handler(HTTPException)
        async def http_error(request: Request, e: HTTPException) -> JSONResponse:  # unknown route, wrong method
            code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
            return JSONResponse(APIError(e.status_code, str(e.detail), code=code).body(), status_code=e.status_code)

        @app.exception_handler(Exception)
        async def internal_error(request: Request, e: Exception) -> JSONResponse:
            log.exception("internal error")
            return JSONResponse(APIError(500, f"Internal server error: {type(e).__name__}", "server_error",
                                         code="internal_error").body(), status_code=500)

        @app.get("/v1/models")
        async def list_models(request: Request) -> JSONResponse:
            self._check_auth(request)
            return JSONResponse({"object": "list", "data": self._models()})

        @app.get("/v1/models/{model:path}")
        async def get_model(model: str, request: Request) -> JSONResponse:
            self._check_auth(request)
            if model != self.name:
                raise APIError(404, f"The model '{model}' does not exist.", param="model", code="model_not_found")
            return JSONResponse(self._models()[0])

        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])

        @app.get("/health")
        async def health() -> JSONResponse:
            if not self.worker.alive:
                return JSONResponse({"status": "engine not running"}, status_code=503)
            return JSONResponse({"status": "ok"})

        @app.get("/metrics")
        async def metrics(request: Request) -> Response:
            # the library's content negotiation: OpenMetrics for a scraper that asks for it, else the text format
            encode, content_type = choose_encoder(request.headers.get("accept", ""))
            return Response(encode(self.metrics.registry), media_type=content_type)

        web = resources.files("nanoseek.web")
        static = {"app.js": "text/javascript", "style.css": "text/css", "index.html": "text/html"}

        @app.get("/")
        async def index() -> FileResponse:
            return FileResponse(str(web / "index.html"), media_type="text/html")

        @app.get("/static/{name}")
        async def static_file(name: str) -> FileResponse:
            if name not in static:  # a fixed list: nothing from the URL reaches the filesystem
                raise HTTPException(404, "Not Found")
            return FileResponse(str(web / name), media_type=static[name])

        return app


def _finite(logprob: float) -> float:
    return logprob if logprob > -9999.0 else -9999.0  # also NaN -> -9999.0


class _Submission:
    """The engine sequences of one HTTP request, the queue their deltas arrive on, and a watch on its client."""

    def __init__(self, worker: EngineWorker) -> None:
        self.worker = worker
        self.queue: asyncio.Queue = asyncio.Queue()
        self.index: dict[str, int] = {}
        self.pending: set[str] = set()
        self.watcher: asyncio.Task | None = None

    def add(self, rid: str) -> None:
        self.index[rid] = len(self.index)
        self.pending.add(rid)

    def watch(self, request: Request) -> None:
        """Abort as soon as the client disconnects, whether the handler waits, the stream runs or has not started
        yet (a response that never starts never runs its body's `finally`), whatever the ASGI spec version."""

        async def until_gone() -> None:
            # the body has been read, so the next ASGI message is http.disconnect (also sent once the response is
            # complete: the abort is then a no-op)
            while (await request.receive())["type"] != "http.disconnect":
                pass
            self.queue.put_nowait(CLIENT_GONE)
            self.abort()

        self.watcher = asyncio.get_running_loop().create_task(until_gone())

    async def events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(sequence index, delta) until every sequence has finished."""
        while self.pending:
            item = await self.queue.get()
            if isinstance(item, EngineDead):
                self.pending.clear()
                raise APIError(503, str(item), "server_error", code="engine_unavailable")
            if item is CLIENT_GONE:
                raise item
            if item.finished:
                self.pending.discard(item.request_id)
            yield self.index[item.request_id], item

    def abort(self) -> None:
        """Free the batch slots of unfinished sequences (client gone, error) and stop watching; idempotent."""
        for rid in self.pending:
            self.worker.abort(rid)
        self.pending.clear()
        if self.watcher is not None:
            self.watcher.cancel()


class _CountResponses:
    """Pure ASGI middleware counting API responses by path and status (BaseHTTPMiddleware would wrap streams)."""

    PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models")

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in self.PATHS else "other"  # bounded label values

        async def counted(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.metrics.http.labels(path=path, code=str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)


# ----------------------------------------------------------------------------------------------------------------
# Running it


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(cfg: ServeConfig) -> int:
    """`nanoseek serve`: load the model and serve until interrupted."""
    import uvicorn

    logging.basicConfig(level=getattr(logging, cfg.log_level.upper(), logging.INFO),
                        format="%(levelname)s %(name)s: %(message)s")
    server = Server.from_config(cfg)
    if cfg.compile:  # before accepting requests: compiling a bucket takes about a minute on a CPU
        t0 = time.perf_counter()
        buckets = server.engine.warmup()
        log.info("compiled the decode step for batch sizes %s in %.0f s", buckets, time.perf_counter() - t0)
    if not _is_loopback(cfg.host) and server.api_key is None:
        log.warning("listening on %s without an API key: anyone who can reach the port can use the model "
                    "(set --api-key or NANOSEEK_API_KEY)", cfg.host)
    log.info("model %s (%s, %s) -> http://%s:%d (web chat at /, API at /v1)", cfg.model, server.engine.device,
             str(server.engine.dtype).removeprefix("torch."), cfg.host, cfg.port)
    uvicorn.run(server.app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, timeout_graceful_shutdown=5)
    return 0


class BackgroundServer:
    """Run a Server's app with uvicorn in a thread on a free loopback port (tests, notebooks, benchmarks).

    with BackgroundServer(server) as url: ...   # url = "http://127.0.0.1:PORT"
    """

    def __init__(self, server: Server, host: str = "127.0.0.1") -> None:
        import uvicorn

        self.server = server
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.uvicorn = uvicorn.Server(uvicorn.Config(server.app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc: Any) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
