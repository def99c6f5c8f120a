"""The one remote-model client, against a scripted fake OpenAI server on 127.0.0.1 (real HTTP, the real `openai`
library: nothing inside the library is faked)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from nanoseek.client import Endpoint, EndpointError, RequestFailed, normalize_url, redact_url

from .fake_openai import FakeServer, completion, delta, error, sse


@pytest.fixture
def server() -> Iterator[FakeServer]:
    s = FakeServer()
    yield s
    s.close()


def test_urls_are_normalised_and_redacted() -> None:
    assert normalize_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1"  # a bare host gets /v1
    assert normalize_url("https://api.deepseek.com/v1/") == "https://api.deepseek.com/v1"
    with pytest.raises(EndpointError, match="--teacher-url 'ftp://x' is not an http"):
        normalize_url("ftp://x", "--teacher-url")
    assert redact_url("https://user:pw@host:8443/v1?key=abc") == "https://host:8443/v1"


def test_chat_retries_honour_capped_retry_after_and_count(server: FakeServer) -> None:
    ep = Endpoint(server.url, None, "sk-secret-key", retries=3, backoff=0.01, max_backoff=0.05)
    assert ep.model == "m" and ep.name == f"m@{server.url}/v1"  # the only model, asked on first use
    # a server asking for an hour is capped at max_backoff (the test would hang otherwise)
    server.script[:] = [error(429, "slow down", {"retry-after": "3600"}), error(503, "busy"),
                        (200, {}, completion("<think>hm</think>ok"))]
    r = ep.chat([{"role": "user", "content": "hi"}], temperature=0.0)
    assert ep.retried == 2 and len(server.posts) == 3
    assert r.content == "<think>hm</think>ok" and r.reasoning is None and r.finish_reason == "stop"
    assert (r.prompt_tokens, r.completion_tokens, r.reasoning_tokens) == (3, 5, 2)
    assert server.posts[-1]["model"] == "m" and server.posts[-1]["temperature"] == 0.0
    assert set(server.auth) == {"Bearer sk-secret-key"}
    assert ep.delay(0) <= 0.05 * 1.5


def test_chat_failures_are_classified(server: FakeServer) -> None:
    ep = Endpoint(server.url, "m", "sk-secret-key", retries=1, backoff=0.0)
    server.script[:] = [error(500, "down")] * 2  # retries exhausted: this request failed, the run goes on
    with pytest.raises(RequestFailed, match=r"HTTP 500.*down") as info:
        ep.chat([{"role": "user", "content": "hi"}])
    assert not info.value.blocked and ep.retried == 1
    server.script[:] = [error(400, "Content Exists Risk")]  # the API's own filter: recorded, not retried
    with pytest.raises(RequestFailed) as info:
        ep.chat([{"role": "user", "content": "hi"}])
    assert info.value.blocked and ep.retried == 1
    server.script[:] = [error(400, "unknown parameter: seed")]  # a bad request: stop the run
    with pytest.raises(EndpointError, match="rejected the request"):
        ep.chat([{"role": "user", "content": "hi"}], seed=1)
    server.script[:] = [error(401, "bad key sk-secret-key")]
    with pytest.raises(EndpointError, match="rejected the API key") as info:
        ep.chat([{"role": "user", "content": "hi"}])
    assert "sk-secret-key" not in str(info.value)
    server.script[:] = [error(404, "no such model sk-secret-key")]
    with pytest.raises(EndpointError, match="has no model 'm'") as info:
        ep.chat([{"role": "user", "content": "hi"}])
    assert "sk-secret-key" not in str(info.value) and "***" in str(info.value)


def test_model_resolution_errors(server: FakeServer) -> None:
    server.models[:] = ["a", "b"]
    with pytest.raises(EndpointError, match=r"serves 2 models \(a, b\): pass --teacher-model NAME"):
        Endpoint(server.url, None, model_flag="--teacher-model").check()
    with pytest.raises(EndpointError, match="does not serve 'c'; it serves: a, b"):
        Endpoint(server.url, "c").check()
    assert Endpoint(server.url, "b").check() == "b"


def test_unreachable_endpoint_names_the_fix() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ep = Endpoint(f"http://user:pw@127.0.0.1:{port}", "m", retries=1, backoff=0.0, what="the teacher")
    with pytest.raises(EndpointError, match=rf"cannot reach the teacher http://127.0.0.1:{port}/v1 .*running") as e:
        ep.chat([{"role": "user", "content": "hi"}])
    assert "pw" not in str(e.value) and ep.retried == 1


def test_reasoning_fields_and_empty_reasoning(server: FakeServer) -> None:
    ep = Endpoint(server.url, "m")
    server.script[:] = [(200, {}, completion("answer", reasoning="")),  # R1's empty thinking: "" is not None
                        (200, {}, {**completion("answer"), "choices": [{"index": 0, "finish_reason": "length",
                                   "message": {"role": "assistant", "content": "", "reasoning": "vllm's field"}}]})]
    r = ep.chat([{"role": "user", "content": "hi"}])
    assert r.reasoning == "" and r.content == "answer"
    r = ep.chat([{"role": "user", "content": "hi"}])
    assert r.reasoning == "vllm's field" and r.finish_reason == "length"


def test_stream_through_the_library(server: FakeServer) -> None:
    ep = Endpoint(server.url, "m", retries=1, backoff=0.0)
    usage = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [],
             "usage": {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}}
    server.script[:] = [error(503, "warming up"),  # opening the stream is retried
                        sse([delta(role="assistant", reasoning_content="Let me "), delta(reasoning_content="think."),
                             delta(content="The answer"), delta(content=" is 4.", finish="stop"), usage])]
    events = list(ep.stream([{"role": "user", "content": "2+2?"}], max_tokens=8))
    assert events[:4] == [("reasoning", "Let me "), ("reasoning", "think."), ("content", "The answer"),
                          ("content", " is 4.")]
    kind, reply = events[-1]
    assert kind == "done" and reply.content == "The answer is 4." and reply.reasoning == "Let me think."
    assert reply.finish_reason == "stop" and reply.completion_tokens == 6 and ep.retried == 1
    assert server.posts[-1]["stream"] is True and server.posts[-1]["stream_options"] == {"include_usage": True}
    server.script[:] = [sse([delta(content="plain"), {"error": {"message": "engine died", "type": "server_error"}}])]
    with pytest.raises(RequestFailed, match="engine died"):
        list(ep.stream([{"role": "user", "content": "hi"}]))
