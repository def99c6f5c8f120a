"""The one client for remote models: any OpenAI-compatible chat endpoint (DeepSeek's API, vLLM, SGLang, OpenRouter,
`nanoseek serve`) through the `openai` library. eval, distill, audit (and its judge) and chat all use `Endpoint`, so
they share one retry policy, one Retry-After cap, one redaction of keys and URLs, one reading of reasoning fields
and one set of error messages.

Retry policy (one, for every caller):
- retried: connection errors and timeouts, HTTP 408, 409, 429 and 5xx, up to `retries` times, with exponential
  backoff and jitter (`backoff * 2**attempt`, at most `max_backoff`, times 0.5-1.5);
- a `Retry-After` header (seconds) is honoured but capped at `max_backoff`: a server asking for an hour should
  not stall a run for an hour; the cap is visible and configurable;
- not retried: 401/403 (key), 404 (model or route), 400/405/413/415/422 (the request): `EndpointError` at once,
  with one line naming the fix; an API content filter's 400 ("Content Exists Risk") is `RequestFailed(blocked=True)`.
The library's own retries are off (`max_retries=0`) because runs count their retries and pace every *attempt*
through the rate limiter; the library's timeout (`timeout`) is used as it is.

Secrets: the key lives only in the `openai.OpenAI` object. Messages and saved configs use `redact` and `redact_url`
(credentials and query strings removed from URLs, the key replaced by ***).
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .reasoning import reasoning_field


class EndpointError(ValueError):
    """A request failed in a way retrying cannot fix (unreachable URL, key, model name, malformed request)."""


class RequestFailed(Exception):
    """One request failed after its retries, or the API's own filter blocked it: the caller records it."""

    def __init__(self, message: str, blocked: bool = False) -> None:
        super().__init__(message)
        self.blocked = blocked


def normalize_url(url: str, flag: str = "--url") -> str:
    """An OpenAI base URL: `http://host:port` gets `/v1` (what `nanoseek serve`, vLLM and SGLang serve)."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise EndpointError(f"{flag} {redact_url(url)!r} is not an http(s) URL, e.g. http://127.0.0.1:8000/v1")
    return url + "/v1" if parts.path in ("", "/") else url


def redact_url(url: str | None) -> str | None:
    """The URL without user:password@ and query string (a key may hide there): what is shown and written."""
    if not url:
        return url
    p = urlsplit(url)
    return urlunsplit((p.scheme, p.hostname + (f":{p.port}" if p.port else "") if p.hostname else p.netloc,
                       p.path, "", ""))


class RateLimiter:
    """At most `rps` request starts per second across all threads (hosted APIs enforce per-minute limits)."""

    def __init__(self, rps: float | None) -> None:
        self.interval = 1.0 / rps if rps else 0.0
        self.next = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + self.interval
        if start > now:
            time.sleep(start - now)


@dataclass
class Reply:
    """One completion. `reasoning` is the endpoint's separate reasoning field (None when it sent none: then any
    reasoning is inline in `content`; `reasoning.split` reads both)."""

    content: str | None
    reasoning: str | None
    finish_reason: str | None
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    reasoning_tokens: int | None = None


# HTTP 400 bodies of content filters, e.g. DeepSeek's API: "Content Exists Risk"
_CONTENT_RISK = re.compile(r"content.{0,20}risk|content[ _-]?(?:filter|policy|management)|moderation|"
                           r"inappropriate|sensitive|safety system", re.I)


class Endpoint:
    """An OpenAI-compatible chat endpoint. Thread-safe: `chat` may be called from many threads at once.

    `model=None` asks the endpoint for its only model (vLLM, `nanoseek serve`) on first use. `what` names the
    endpoint in messages ("the teacher", "the judge"), `flag` and `model_flag` the options that fix a bad URL or
    model. The key comes from `api_key`, else `$key_env`."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, *, timeout: float = 600.0,
                 retries: int = 5, backoff: float = 1.0, max_backoff: float = 60.0, rps: float | None = None,
                 what: str = "the endpoint", flag: str = "--url", model_flag: str = "--model",
                 key_env: str = "OPENAI_API_KEY") -> None:
        from openai import OpenAI

        if retries < 0 or backoff < 0 or max_backoff < 0:
            raise ValueError(f"retries, backoff and max_backoff must be >= 0, got {retries}, {backoff}, {max_backoff}")
        self.url = normalize_url(url, flag)
        self.public_url = redact_url(self.url)
        self.what, self.model_flag = what, model_flag
        key = api_key or os.environ.get(key_env) or ""
        self._key = key
        self.client = OpenAI(base_url=self.url, api_key=key or "EMPTY", max_retries=0, timeout=timeout)
        self._model = model
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self.limiter = RateLimiter(rps)
        self.retried = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Endpoint({self.public_url!r}, model={self._model!r})"

    # -- names and messages

    @property
    def model(self) -> str:
        if self._model is None:
            with self._lock:
                if self._model is None:
                    self.check()
        return self._model  # type: ignore[return-value]

    @property
    def name(self) -> str:
        return f"{self.model}@{self.public_url}"

    def redact(self, text: str) -> str:
        return text.replace(self._key, "***") if len(self._key) >= 4 else text

    def _where(self) -> str:
        return f"{self.what} {self.public_url}"

    def _message(self, e: BaseException) -> str:
        body = getattr(e, "body", None)
        if isinstance(body, dict):
            err = body.get("error", body)
            if isinstance(err, dict) and err.get("message"):
                return self.redact(str(err["message"])[:500])
        return self.redact(str(e)[:500])

    def _fatal(self, e: BaseException) -> EndpointError | None:
        """The EndpointError for errors retrying cannot fix, else None."""
        import openai

        where = self._where()
        if isinstance(e, openai.AuthenticationError):
            return EndpointError(f"{where} rejected the API key (HTTP 401): pass --api-key or set the key's "
                                 "environment variable")
        if isinstance(e, openai.PermissionDeniedError):
            return EndpointError(f"{where} denied access (HTTP 403): {self._message(e)}")
        if isinstance(e, openai.NotFoundError):
            return EndpointError(f"{where} has no model {self._model!r} or no chat completions route (HTTP 404): "
                                 f"{self._message(e)}")
        if isinstance(e, openai.APIStatusError) and e.status_code in (400, 405, 413, 415, 422):
            return EndpointError(f"{where} rejected the request (HTTP {e.status_code}): {self._message(e)}")
        return None

    @staticmethod
    def _retryable(e: BaseException) -> bool:
        import openai

        if isinstance(e, openai.APIConnectionError):  # includes timeouts
            return True
        return isinstance(e, openai.APIStatusError) and (e.status_code in (408, 409, 429) or e.status_code >= 500)

    def delay(self, attempt: int, e: BaseException | None = None) -> float:
        """Seconds to wait before retry `attempt` (0-based): Retry-After capped at max_backoff, else backoff."""
        response = getattr(e, "response", None)
        try:
            retry_after = float(response.headers.get("retry-after")) if response is not None else None
        except (TypeError, ValueError):  # absent, or an HTTP date: use the backoff
            retry_after = None
        if retry_after is not None and retry_after >= 0:
            return min(retry_after, self.max_backoff)
        return min(self.max_backoff, self.backoff * 2**attempt) * (0.5 + random.random())

    def _unreachable(self, e: BaseException) -> EndpointError:
        return EndpointError(f"cannot reach {self._where()} ({type(e).__name__}: {self._message(e)}); is the "
                             "server running and the URL right?")

    # -- requests

    def check(self) -> str:
        """Fail fast: list the endpoint's models (connection and key problems show here, before any prompt) and
        resolve the model name when not given (a server with one model: vLLM, `nanoseek serve`)."""
        import openai

        try:
            ids = [m.id for m in self.client.models.list()]
        except openai.APIConnectionError as e:
            raise self._unreachable(e) from e
        except openai.APIStatusError as e:
            fatal = self._fatal(e)
            if isinstance(e, openai.NotFoundError | openai.BadRequestError | openai.UnprocessableEntityError):
                fatal = None  # some gateways have no /models; the first request will tell
            if fatal is not None:
                raise fatal from e
            ids = []
        if self._model is None:
            if len(ids) != 1:
                raise EndpointError(f"{self._where()} serves {len(ids)} models"
                                    f"{' (' + ', '.join(ids[:10]) + ')' if ids else ''}: pass {self.model_flag} NAME")
            self._model = ids[0]
        elif ids and self._model not in ids:
            raise EndpointError(f"{self._where()} does not serve {self._model!r}; it serves: {', '.join(ids[:20])}")
        return self._model

    def _call(self, **kwargs: Any) -> Any:
        """client.chat.completions.create with the retry policy of the module docstring."""
        import openai

        model = self.model
        for attempt in range(self.retries + 1):
            self.limiter.wait()
            try:
                return self.client.chat.completions.create(model=model, **kwargs)
            except openai.OpenAIError as e:
                if isinstance(e, openai.BadRequestError) and _CONTENT_RISK.search(self._message(e)):
                    raise RequestFailed(self._message(e), blocked=True) from e  # the API's own filter
                fatal = self._fatal(e)
                if fatal is not None:
                    raise fatal from e
                if not self._retryable(e) or attempt == self.retries:
                    if isinstance(e, openai.APIConnectionError):
                        raise self._unreachable(e) from e
                    status = getattr(e, "status_code", None)
                    raise RequestFailed(f"{type(e).__name__}{f' (HTTP {status})' if status else ''}: "
                                        f"{self._message(e)}") from e
                with self._lock:
                    self.retried += 1
                time.sleep(self.delay(attempt, e))
        raise AssertionError("unreachable")

    def chat(self, messages: list[dict[str, Any]], **params: Any) -> Reply:
        """One completion. Raises EndpointError (stop the run) or RequestFailed (this request failed for good)."""
        r = self._call(messages=messages, **params)
        if not r.choices:
            raise RequestFailed("the response has no choices")
        choice = r.choices[0]
        usage = getattr(r, "usage", None)
        return Reply(content=choice.message.content, reasoning=reasoning_field(choice.message),
                     finish_reason=choice.finish_reason, model=getattr(r, "model", None),
                     prompt_tokens=getattr(usage, "prompt_tokens", None),
                     completion_tokens=getattr(usage, "completion_tokens", None),
                     reasoning_tokens=_reasoning_tokens(usage))

    def stream(self, messages: list[dict[str, Any]], **params: Any) -> Iterator[tuple[str, Any]]:
        """A streamed completion through the library's SSE reader: yields ("reasoning", text) and ("content", text)
        deltas, then one ("done", Reply) with the finish reason and usage (content and reasoning are the joined
        deltas). Only opening the stream is retried: once text has arrived a failure raises RequestFailed."""
        import openai

        stream = self._call(messages=messages, stream=True, stream_options={"include_usage": True}, **params)
        content: list[str] = []
        reasoning: list[str] | None = None
        reply = Reply(content=None, reasoning=None, finish_reason=None)
        try:
            for chunk in stream:
                if getattr(chunk, "usage", None):
                    reply.prompt_tokens = chunk.usage.prompt_tokens
                    reply.completion_tokens = chunk.usage.completion_tokens
                    reply.reasoning_tokens = _reasoning_tokens(chunk.usage)
                reply.model = reply.model or getattr(chunk, "model", None)
                for choice in chunk.choices or []:
                    r = reasoning_field(choice.delta) if choice.delta is not None else None
                    if r is not None:
                        reasoning = (reasoning or []) + [r]
                        if r:
                            yield "reasoning", r
                    c = choice.delta.content if choice.delta is not None else None
                    if c:
                        content.append(c)
                        yield "content", c
                    if choice.finish_reason:
                        reply.finish_reason = choice.finish_reason
        except openai.APIConnectionError as e:  # before APIError: it is one
            raise RequestFailed(f"the connection dropped mid-stream: {self._message(e)}") from e
        except openai.APIError as e:  # an error event inside the stream
            raise RequestFailed(f"the stream failed: {self._message(e)}") from e
        finally:
            stream.close()
        reply.content = "".join(content)
        reply.reasoning = None if reasoning is None else "".join(reasoning)
        yield "done", reply


def _reasoning_tokens(usage: Any) -> int | None:
    details = getattr(usage, "completion_tokens_details", None)
    return getattr(details, "reasoning_tokens", None) if details is not None else None
