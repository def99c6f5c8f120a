"""The OpenAI-compatible server, driven by the real `openai` client against a real uvicorn on 127.0.0.1.

The model is a scripted tiny model: every layer's output projection is zeroed, so the residual stream is the
current token's embedding, and lm_head maps each token of a script to the next one. Whatever the prompt, after
R1's generation prompt (`<think>\\n`) greedy and low-temperature decoding emit "Think</think>Hey!" + EOS, so the
reasoning split, stop strings and lengths have known answers.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from nanoseek import build, save_pretrained, synthetic
from nanoseek.data import train_tokenizer
from nanoseek.reasoning import END_THINK, StreamSplitter
from nanoseek.serve import BackgroundServer, ServeConfig, Server
from nanoseek.tokenizer import Tokenizer

REASONING, ANSWER = "Think", "Hey!"
KEY = "sk-test-0123456789"


def make_model_dir(root: Path, reasoning: str = REASONING, answer: str = ANSWER) -> Path:
    """A tiny model directory with a trained tokenizer whose greedy output is `reasoning</think>answer<eos>`."""
    items = synthetic.generate("arithmetic", 400)
    (root / "corpus.txt").write_text("\n\n".join(synthetic.to_text(i) for i in items))
    tok = train_tokenizer([root / "corpus.txt"], 512, root / "tok")
    torch.manual_seed(0)
    model = build("tiny")
    chain = [tok.encode("\n")[0], *(tok.token_id(c) for c in reasoning), tok.token_id(END_THINK),
             *(tok.token_id(c) for c in answer), tok.eos_id]
    assert len(set(chain)) == len(chain), "the script's tokens must be distinct (each maps to one successor)"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")):
                p.zero_()
        e = model.embed_tokens.weight
        h = e / e.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()  # what the final RMSNorm (weight 1) outputs
        model.lm_head.weight.zero_()
        for a, b in zip(chain, chain[1:]):
            model.lm_head.weight[b] = 0.5 * h[a]  # logit margin ~ 0.5 * hidden_size: deterministic even at T = 1
    return save_pretrained(model, root / "model", tokenizer=root / "tok")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one thread for tiny ops


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(model_dir: Path):
    srv = Server.from_config(ServeConfig(model=str(model_dir), api_key=KEY, served_model_name="tiny-r1",
                                         max_batch=4, max_model_len=128, max_body_bytes=64 * 1024))
    with BackgroundServer(srv) as url:
        yield srv, url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    c = openai.OpenAI(base_url=server[1] + "/v1", api_key=KEY, max_retries=0, timeout=60)
    c._nanoseek_model_dir = server[0].cfg.model  # type: ignore[attr-defined]
    return c


def chat(client: openai.OpenAI, content: str = "What is 2 + 2?", **kw):
    return client.chat.completions.create(model="tiny-r1", messages=[{"role": "user", "content": content}], **kw)


def extra(obj, name: str):
    return (obj.model_extra or {}).get(name)


# ---- the reasoning split on its own ----------------------------------------------------------------------------


def split_all(pieces: list[str], enabled: bool = True) -> tuple[list[tuple[str, str]], StreamSplitter]:
    s = StreamSplitter(enabled)
    out = [s.feed(p) for p in pieces] + [s.finish()]
    return out, s


@pytest.mark.parametrize("text, reasoning, answer", [
    ("abc\n</think>\n\nanswer", "abc", "answer"),  # R1's template pre-fills <think>\n: no opening tag
    ("<think>\nabc\n</think>\n\nanswer", "abc", "answer"),  # a template that does not pre-fill
    ("a b\nc</think>x </think> y", "a b\nc", "x </think> y"),  # only the first closing tag splits
    ("still thinking, cut by max_tokens", "still thinking, cut by max_tokens", None),
    ("abc </thi", "abc </thi", None),  # a partial tag at the end is reasoning text after all
    ("</think>only an answer", "", "only an answer"),
])
def test_reasoning_split_is_the_same_for_every_chunking(text: str, reasoning: str, answer: str | None) -> None:
    import random

    rng = random.Random(0)
    chunkings = [[text], list(text)] + [
        [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        for cuts in (sorted(rng.sample(range(1, len(text)), k=min(4, len(text) - 1))) for _ in range(20))]
    for pieces in chunkings:
        out, s = split_all(pieces)
        assert (s.reasoning_content, s.answer) == (reasoning, answer), pieces
        assert "".join(r for r, _ in out) == reasoning and "".join(c for _, c in out) == (answer or "")
        for r, _ in out[:-1]:  # never a piece of the closing tag in the streamed reasoning
            assert not any(r.endswith(END_THINK[:k]) for k in range(2, len(END_THINK) + 1)), (pieces, r)


def test_reasoning_split_disabled_and_token_counts() -> None:
    out, s = split_all(["<think>a</think>b"], enabled=False)
    assert (s.reasoning_content, s.answer) == (None, "<think>a</think>b")
    s = StreamSplitter(True, end_token_id=6)
    s.feed("ab", [10, 11])
    s.feed("</think>c", [6, 12])
    s.feed("d", [13])
    assert s.reasoning_tokens == 3  # the closing tag counts as reasoning, as DeepSeek's API counts it
    s = StreamSplitter(True, end_token_id=None)  # no single-token tag: counted by the state per delta
    s.feed("ab", [10, 11])
    s.feed("</think>", [6])
    s.feed("c", [12])
    assert s.reasoning_tokens == 3


# ---- the API, through the openai client -----------------------------------------------------------------------


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models] == ["tiny-r1"]
    assert client.models.retrieve("tiny-r1").id == "tiny-r1"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat_reasoning_split_and_usage(client: openai.OpenAI) -> None:
    r = chat(client, temperature=0)
    (c,) = r.choices
    assert c.message.role == "assistant" and c.finish_reason == "stop"
    assert c.message.content == ANSWER
    assert extra(c.message, "reasoning_content") == REASONING and extra(c.message, "reasoning") == REASONING
    assert r.model == "tiny-r1" and r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    n_out = len(REASONING) + 1 + len(ANSWER) + 1  # reasoning, </think>, answer, EOS (one token per character)
    assert r.usage.completion_tokens == n_out
    assert r.usage.completion_tokens_details.reasoning_tokens == len(REASONING) + 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + n_out
    # sampled at the model's recommended temperature (generation_config: 0.6): the script still wins
    assert chat(client, seed=1).choices[0].message.content == ANSWER


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    chunks = list(chat(client, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    reasoning = "".join(extra(ch.choices[0].delta, "reasoning_content") or "" for ch in chunks if ch.choices)
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert (reasoning, content) == (REASONING, ANSWER)
    assert all(extra(ch.choices[0].delta, "reasoning") == extra(ch.choices[0].delta, "reasoning_content")
               for ch in chunks if ch.choices)
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == ["stop"]
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == len(REASONING) + len(ANSWER) + 2
    assert last.usage.completion_tokens_details.reasoning_tokens == len(REASONING) + 1
    assert all(ch.usage is None for ch in body)
    # without include_usage there is no usage chunk
    assert all(ch.choices for ch in chat(client, temperature=0, stream=True))


def test_stopped_inside_the_reasoning(client: openai.OpenAI) -> None:
    for kw, reasoning, finish in ((dict(max_tokens=3), "Thi", "length"),
                                  (dict(max_completion_tokens=2, max_tokens=50), "Th", "length"),
                                  (dict(stop=["in"]), "Th", "stop")):
        c = chat(client, temperature=0, **kw).choices[0]
        assert (extra(c.message, "reasoning_content"), c.message.content, c.finish_reason) == (reasoning, None, finish)
        chunks = list(chat(client, temperature=0, stream=True, **kw))
        assert not any(ch.choices[0].delta.content for ch in chunks)
        assert "".join(extra(ch.choices[0].delta, "reasoning_content") or "" for ch in chunks) == reasoning
    r = chat(client, temperature=0, max_tokens=3)
    assert r.usage.completion_tokens == 3 and r.usage.completion_tokens_details.reasoning_tokens == 3
    assert extra(chat(client, temperature=0, stop="in").choices[0], "stop_reason") == "in"


def test_stop_strings_never_leak_into_the_stream(client: openai.OpenAI) -> None:
    c = chat(client, temperature=0, stop=["ey!", "zz"]).choices[0]
    assert (c.message.content, c.finish_reason) == ("H", "stop")
    pieces = [ch.choices[0].delta.content for ch in chat(client, temperature=0, stop=["ey!"], stream=True)
              if ch.choices[0].delta.content]
    assert pieces == ["H"]  # "e" and "y" were held back as a possible start of the stop string, then dropped
    # a held-back prefix that turns out not to be a stop string is released
    pieces = [ch.choices[0].delta.content for ch in chat(client, temperature=0, stop=["eyX"], stream=True)
              if ch.choices[0].delta.content]
    assert "".join(pieces) == ANSWER


def test_n_choices_seed_and_logprobs(client: openai.OpenAI) -> None:
    r = chat(client, n=3, seed=7, logprobs=True, top_logprobs=2)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content == ANSWER for c in r.choices)
    n_out = len(REASONING) + len(ANSWER) + 2
    assert r.usage.completion_tokens == 3 * n_out
    lp = r.choices[0].logprobs.content
    assert len(lp) == n_out and all(len(e.top_logprobs) == 2 for e in lp)
    assert "".join(e.token for e in lp[:len(REASONING)]) == REASONING
    assert all(-9999.0 <= e.logprob <= 0 for e in lp)
    streamed = list(chat(client, n=2, temperature=0, stream=True))
    for i in (0, 1):
        assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices[0].index == i) == ANSWER


def test_completions(client: openai.OpenAI) -> None:
    prompt = "<｜User｜>hi<｜Assistant｜><think>\n"
    r = client.completions.create(model="tiny-r1", prompt=prompt, max_tokens=20, temperature=0, logprobs=1)
    (c,) = r.choices
    assert c.text == f"{REASONING}</think>{ANSWER}" and c.finish_reason == "stop"
    assert c.logprobs.tokens[: len(REASONING)] == list(REASONING) and len(c.logprobs.top_logprobs[0]) == 1
    assert r.usage.completion_tokens == len(REASONING) + len(ANSWER) + 2
    r = client.completions.create(model="tiny-r1", prompt=prompt, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"  # OpenAI's default max_tokens
    tok = Tokenizer.load(client._nanoseek_model_dir)  # type: ignore[attr-defined]
    ids = tok.encode(prompt, add_bos=True)
    r = client.completions.create(model="tiny-r1", prompt=[ids, ids + [tok.token_id(c) for c in "Thi"]], n=2,
                                  max_tokens=3, temperature=0)  # token-id prompts, two of them, two choices each
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == ["Thi", "Thi", "nk</think>", "nk</think>"]
    text = "".join(ch.choices[0].text for ch in client.completions.create(
        model="tiny-r1", prompt=prompt, max_tokens=20, temperature=0, stream=True))
    assert text == f"{REASONING}</think>{ANSWER}"


def test_concurrent_requests_share_the_batch(server, client: openai.OpenAI) -> None:
    srv, _ = server
    steps0 = srv.engine.stats.steps
    results: list[str] = []

    def one() -> None:
        r = chat(client, temperature=0, max_tokens=40, extra_body={"ignore_eos": True})
        results.append(r.choices[0].finish_reason)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["length"] * 4
    assert srv.engine.stats.steps - steps0 < 4 * 40 * 0.6  # decoded together, not one after another


def test_reasoning_parser_off(server, client: openai.OpenAI) -> None:
    srv, _ = server
    srv.reasoning = False  # as --reasoning-parser none
    try:
        m = chat(client, temperature=0).choices[0].message
        assert m.content == f"{REASONING}</think>{ANSWER}" and extra(m, "reasoning_content") is None
    finally:
        srv.reasoning = True


def test_chat_template_option_and_detection(model_dir: Path, tmp_path: Path) -> None:
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    srv = Server.from_config(ServeConfig(model=str(model_dir), chat_template=str(template)))
    assert not srv.reasoning  # no <think> in the template: no split unless --reasoning-parser deepseek_r1
    assert srv.tokenizer.render_chat([{"role": "user", "content": "hi"}]) == "hi\n"
    assert Server.from_config(ServeConfig(model=str(model_dir), chat_template=str(template),
                                          reasoning_parser="deepseek_r1")).reasoning
    assert Server.from_config(ServeConfig(model=str(model_dir))).reasoning


# ---- errors: OpenAI-shaped, with the status the client maps to its exception ----------------------------------


@pytest.mark.parametrize("kw, param", [
    (dict(temperature=2.5), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(n=0), "n"),
    (dict(n=100), "n"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_completion_tokens=-1), "max_completion_tokens"),
    (dict(presence_penalty=3), "presence_penalty"),
    (dict(top_logprobs=2), "top_logprobs"),  # needs logprobs=true, as OpenAI
    (dict(logprobs=True, top_logprobs=50), "top_logprobs"),
    (dict(stop=[""]), "stop"),
    (dict(stream_options={"include_usage": True}), "stream_options"),  # only with stream
    (dict(seed="x"), "seed"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools"),
    (dict(response_format={"type": "json_object"}), "response_format"),
    (dict(logit_bias={"5": 10}), "logit_bias"),
    (dict(extra_body={"frobnicate": 1}), "frobnicate"),
    (dict(extra_body={"top_k": 0}), "top_k"),
])
def test_bad_parameters_are_400_naming_the_param(client: openai.OpenAI, kw: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, **kw)
    assert e.value.status_code == 400 and e.value.param == param, e.value.body
    assert e.value.type == "invalid_request_error"


@pytest.mark.parametrize("path, body, param, code", [
    ("/v1/chat/completions", {"temperature": "0.5"}, "temperature", "invalid_type"),  # JSON types as sent
    ("/v1/chat/completions", {"stream": True, "stream_options": {"x": 1}}, "stream_options.x", "unknown_parameter"),
    ("/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice", "unsupported_parameter"),
    ("/v1/chat/completions", {"model": None}, "model", "missing_required_parameter"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "messages[0].content[0].text", "missing_required_parameter"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, "messages[0].role", "missing_required_parameter"),
    ("/v1/completions", {"prompt": [[1, 2], [3, 10**6]]}, "prompt[1][1]", "invalid_value"),  # not in the vocabulary
    ("/v1/completions", {"prompt": {"text": "hi"}}, "prompt", "invalid_type"),
    ("/v1/completions", {"prompt": "hi", "echo": True}, "echo", "unsupported_parameter"),
])
def test_validation_errors_name_the_path_in_the_json(server, path: str, body: dict, param: str, code: str) -> None:
    base = {"model": "tiny-r1", **({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {})}
    status, err = raw(server[1], path, json.dumps({**base, **body}).encode())
    assert status == 400 and (err["error"]["param"], err["error"]["code"]) == (param, code), err


def test_neutral_values_of_unsupported_parameters_are_accepted(client: openai.OpenAI) -> None:
    r = chat(client, temperature=0, response_format={"type": "text"}, logit_bias={}, user="u1", store=False)
    assert r.choices[0].message.content == ANSWER


def test_message_errors(client: openai.OpenAI) -> None:
    cases = [([], "messages"), ([{"role": "tool", "content": "x", "tool_call_id": "1"}], "messages[0].role"),
             ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
              "messages[0].content[0]")]
    for messages, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny-r1", messages=messages)
        assert e.value.param == param
    # text parts, the developer role and an echoed reasoning-only assistant turn (content null) are accepted
    r = client.chat.completions.create(model="tiny-r1", temperature=0, messages=[
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": "a"},
        {"role": "assistant", "content": None, "reasoning_content": "Thi"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert r.choices[0].message.content == ANSWER


def test_a_text_model_refuses_images(client: openai.OpenAI) -> None:
    url = "data:image/png;base64,iVBORw0KGgo="
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-r1", messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": url}}]}])
    assert (e.value.param, e.value.code) == ("messages[0].content[1]", "unsupported_parameter")
    assert "text model" in e.value.message and "Janus" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="tiny-r1", prompt="a red bicycle")
    assert e.value.param == "model" and "does not generate images" in e.value.message
    assert client.models.list().data[0].model_extra["input_modalities"] == ["text"]


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="hi")


def test_context_length(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "1 2 3 4 5 6 7 8 9 " * 20)  # > 128 tokens (digits are one token each)
    assert e.value.code == "context_length_exceeded" and e.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, max_tokens=126)
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-r1", prompt=[1] * 200)
    assert e.value.param == "prompt"


def test_auth(server) -> None:
    _, url = server
    c = openai.OpenAI(base_url=url + "/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        c.models.list()
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        chat(c)
    for headers, code in (({}, "missing_api_key"), ({"Authorization": f"Basic {KEY}"}, "invalid_api_key")):
        req = urllib.request.Request(url + "/v1/models", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as h:
            urllib.request.urlopen(req)
        assert h.value.code == 401 and json.loads(h.value.read())["error"]["code"] == code
    with urllib.request.urlopen(url + "/health") as r:  # health, metrics and the page need no key
        assert json.loads(r.read()) == {"status": "ok"}


def raw(url: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict | str]:
    req = urllib.request.Request(url + path, data=body, headers={"Authorization": f"Bearer {KEY}",
                                                                 "Content-Type": "application/json",
                                                                 **(headers or {})})
    try:
        with urllib.request.urlopen(req) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def test_malformed_bodies_and_routes(server, client: openai.OpenAI) -> None:
    _, url = server
    for body in (b"{not json", b"[1, 2]", "\udcff".encode("utf-8", "surrogatepass")):
        status, err = raw(url, "/v1/chat/completions", body)
        assert status == 400 and set(err["error"]) == {"message", "type", "param", "code"}, err
    status, err = raw(url, "/v1/nothing-here")
    assert status == 404 and err["error"]["code"] == "not_found"
    status, err = raw(url, "/v1/chat/completions")  # GET on a POST route
    assert status == 405 and "error" in err
    with pytest.raises(openai.APIStatusError) as e:  # larger than --max-body-bytes (64 KiB here)
        chat(client, "x" * 70_000)
    assert e.value.status_code == 413 and e.value.code == "request_too_large"


def test_metrics_and_page(server, client: openai.OpenAI) -> None:
    _, url = server
    chat(client, temperature=0)
    with urllib.request.urlopen(url + "/metrics") as r:
        text = r.read().decode()
    for name in ("nanoseek_requests_total", "nanoseek_generation_tokens_total", "nanoseek_requests_waiting",
                 "nanoseek_requests_running", "nanoseek_time_to_first_token_seconds_bucket",
                 "nanoseek_time_per_output_token_seconds_count", "nanoseek_e2e_request_latency_seconds_sum"):
        assert name in text
    assert int(re.search(r'nanoseek_requests_total\{finish_reason="stop"\} (\d+)', text).group(1)) >= 1
    # parsed, not matched: the order of the labels is prometheus_client's choice
    assert any(s.name == "nanoseek_http_requests_total" and s.labels == {"path": "/v1/chat/completions", "code": "400"}
               and s.value >= 1 for family in text_string_to_metric_families(text) for s in family.samples)
    with urllib.request.urlopen(url + "/") as r:
        page = r.read().decode()
    assert "/static/app.js" in page and "/static/style.css" in page
    with urllib.request.urlopen(url + "/static/app.js") as r:
        assert "javascript" in r.headers["content-type"] and "getReader" in r.read().decode()
    assert raw(url, "/static/..%2Fserve.py")[0] == 404


# ---- overload, disconnects and a failing engine (a server with one batch slot and no queue) -----------------


@pytest.fixture(scope="module")
def small_server(model_dir: Path):
    srv = Server.from_config(ServeConfig(model=str(model_dir), max_batch=1, max_queue=0, max_model_len=1000,
                                         served_model_name="tiny-r1"))
    with BackgroundServer(srv) as url:
        yield srv, url, openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


def aborted(url: str) -> int:
    with urllib.request.urlopen(url + "/metrics") as r:
        m = re.search(r'nanoseek_requests_total\{finish_reason="abort"\} (\d+)', r.read().decode())
    return int(m.group(1)) if m else 0


def wait_idle(srv: Server, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while srv.worker.in_flight and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.worker.in_flight == 0


def test_overload_429_and_disconnect_frees_the_slot(small_server) -> None:
    srv, url, client = small_server
    long = dict(max_tokens=900, extra_body={"ignore_eos": True})
    stream = chat(client, stream=True, **long)
    next(iter(stream))  # the request holds the only slot
    with pytest.raises(openai.RateLimitError) as e:
        chat(client, max_tokens=5)
    assert e.value.status_code == 429
    before = aborted(url)
    stream.close()  # the client goes away mid-stream: the server aborts the sequence
    wait_idle(srv)
    assert aborted(url) == before + 1
    assert chat(client, temperature=0).choices[0].message.content == ANSWER

    # a non-streaming client that disconnects while waiting also frees its slot
    body = json.dumps({"model": "tiny-r1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 900,
                       "ignore_eos": True}).encode()
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 10
        while not srv.worker.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert srv.worker.in_flight == 1
    wait_idle(srv)
    assert aborted(url) == before + 2


def test_engine_failure_is_503(small_server) -> None:  # last: it kills this server's engine
    srv, url, client = small_server

    def broken() -> list:
        raise RuntimeError("simulated device failure")

    srv.engine.step = broken  # type: ignore[method-assign]
    with pytest.raises(openai.InternalServerError) as e:
        chat(client)
    assert e.value.status_code == 503
    with pytest.raises(openai.InternalServerError):  # the engine thread is gone: refused up front
        chat(client)
    with pytest.raises(urllib.error.HTTPError) as h:
        urllib.request.urlopen(url + "/health")
    assert h.value.code == 503


# ---- the `nanoseek serve` command ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_subprocess_never_logs_the_key(model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    secret = "sk-cli-secret-42"
    log = tmp_path / "serve.log"
    env = {**os.environ, "NANOSEEK_API_KEY": secret, "OMP_NUM_THREADS": "1"}
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "nanoseek.cli", "serve", "--model", str(model_dir),
                                 "--port", str(port), "--max-batch", "2", "--served-model-name", "r1"],
                                stdout=f, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=1):
                    break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        c = openai.OpenAI(base_url=url + "/v1", api_key=secret, max_retries=0)
        assert [m.id for m in c.models.list()] == ["r1"]
        r = c.chat.completions.create(model="r1", messages=[{"role": "user", "content": "hi"}], temperature=0)
        assert r.choices[0].message.content == ANSWER
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = log.read_text()
    assert "127.0.0.1" in text and "API key required" in text
    assert secret not in text


def test_tokenizer_fixture_round_trip(model_dir: Path) -> None:
    tok = Tokenizer.load(model_dir)
    ids = tok.encode_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert tok.decode(ids[-2:]) == "<think>\n"  # the prompt ends in the token the script starts from
