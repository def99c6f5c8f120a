"""`nanoseek serve` with a Janus-Pro model: /v1/images/generations and image inputs in chat completions, driven by
the real `openai` client against a real uvicorn on 127.0.0.1, with a tiny random Janus (tests/test_janus.py's
config: 16x16 images, 16 image tokens) and a word-level tokenizer that has a word for every id, so that any output
decodes to text and the comparisons with the in-process model are token for token."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import openai
import pytest
import torch

from nanoseek import save_pretrained
from nanoseek.imagine import read_processor_config, understand
from nanoseek.multimodal import decode_data_url, render_conversation
from nanoseek.serve import BackgroundServer, ServeConfig, Server

from .test_janus import _random, _tiny, write_tokenizer

KEY = "sk-janus-test"
SIZE = "16x16"


def make_janus_dir(root: Path) -> Path:
    """A tiny random Janus directory (transformers' layout) with its tokenizer. The aligner's output is scaled up so
    that the image features weigh on the answer as much as the text (at init they are tiny): different images then
    give different answers."""
    cfg = _tiny(False)
    model = _random(cfg)
    with torch.no_grad():
        for p in model.aligner.hidden_layers[-1].parameters():
            p.mul_(10)
    return save_pretrained(model, root / "janus", tokenizer=write_tokenizer(root / "tok", cfg, every_id=True))


def png_url(seed: int = 0, size: tuple[int, int] = (20, 13), fmt: str = "PNG") -> str:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def image_message(url: str, text: str = "what is in this picture") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def pngs(response) -> list:
    from PIL import Image

    return [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in response.data]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one thread for tiny ops


@pytest.fixture(scope="module")
def janus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_janus_dir(tmp_path_factory.mktemp("janus-serve"))


@pytest.fixture(scope="module")
def server(janus_dir: Path):
    srv = Server.from_config(ServeConfig(model=str(janus_dir), api_key=KEY, served_model_name="janus",
                                         max_images=4, max_queue=2, max_body_bytes=256 * 1024))
    with BackgroundServer(srv) as url:
        yield srv, url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[1] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def generate(client: openai.OpenAI, prompt: str = "a red bicycle under a tree", **kw):
    return client.images.generate(model="janus", prompt=prompt, **kw)


@pytest.fixture
def slow_steps(server):
    """Each image-token step takes >= 50 ms (the generation head sleeps), counted: long enough to disconnect in."""
    head = server[0].janus.model.generation_head
    calls = []
    inner = head.forward

    def slow(h: torch.Tensor) -> torch.Tensor:
        calls.append(time.monotonic())
        time.sleep(0.05)
        return inner(h)

    head.forward = slow
    yield calls
    del head.forward


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics") as r:
        m = re.search(rf"^{name} (\S+)$", r.read().decode(), re.M)
    return float(m.group(1)) if m else 0.0


def wait_for(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# ---- models and image generation -------------------------------------------------------------------------------


def test_models_lists_the_janus_model_with_its_modalities(client: openai.OpenAI) -> None:
    (m,) = client.models.list().data
    assert m.id == "janus"
    assert (m.model_extra["input_modalities"], m.model_extra["output_modalities"]) == (["text", "image"],) * 2


def test_images_are_pngs_of_the_native_size(client: openai.OpenAI) -> None:
    r = generate(client, n=2, size=SIZE, response_format="b64_json")
    assert len(r.data) == 2 and abs(r.created - time.time()) < 60
    assert all(d.revised_prompt is None and d.url is None for d in r.data)
    images = pngs(r)
    assert [(im.format, im.size, im.mode) for im in images] == [("PNG", (16, 16), "RGB")] * 2
    assert r.size == SIZE and r.output_format == "png"
    assert r.usage.output_tokens == 2 * 16 and r.usage.total_tokens == r.usage.input_tokens + 32
    (one,) = generate(client, size="auto").data  # "auto" and no size: the native size
    assert pngs(generate(client))[0].size == (16, 16) and one.b64_json


def test_a_seed_gives_the_same_images_as_nanoseek_imagine(client: openai.OpenAI, janus_dir: Path,
                                                          tmp_path: Path) -> None:
    from nanoseek.imagine import run_imagine

    kw = dict(n=2, extra_body={"seed": 3, "guidance_scale": 5})
    a, b = generate(client, **kw), generate(client, **kw)
    assert [d.b64_json for d in a.data] == [d.b64_json for d in b.data]
    c = generate(client, n=2, extra_body={"seed": 4})
    assert [d.b64_json for d in c.data] != [d.b64_json for d in a.data]
    # the same files as the terminal command: same prompt format, sampler, seed and decoding
    run_imagine(janus_dir, "a red bicycle under a tree", tmp_path, n=2, seed=3, cfg_weight=5)
    assert [base64.b64decode(d.b64_json) for d in a.data] == [(tmp_path / f"image_{i}.png").read_bytes()
                                                              for i in range(2)]
    greedy = [generate(client, extra_body={"temperature": 0, "guidance_scale": 2}).data[0].b64_json
              for _ in range(2)]
    assert greedy[0] == greedy[1]  # temperature 0: greedy, no seed needed


@pytest.mark.parametrize("kw, param, code", [
    (dict(size="1024x1024"), "size", "invalid_value"),
    (dict(size="16x17"), "size", "invalid_value"),
    (dict(n=0), "n", "invalid_value"),
    (dict(n=5), "n", "invalid_value"),  # above --max-images (4 here)
    (dict(n=11), "n", "invalid_value"),  # above OpenAI's 10
    (dict(prompt=""), "prompt", "invalid_value"),
    (dict(prompt="  \n"), "prompt", "invalid_value"),
    (dict(response_format="url"), "response_format", "unsupported_parameter"),
    (dict(style="vivid"), "style", "unsupported_parameter"),
    (dict(moderation="auto"), "moderation", "unsupported_parameter"),
    (dict(output_format="jpeg"), "output_format", "unsupported_parameter"),
    (dict(partial_images=2), "partial_images", "unsupported_parameter"),
    (dict(extra_body={"guidance_scale": 0.5}), "guidance_scale", "invalid_value"),
    (dict(extra_body={"temperature": -1}), "temperature", "invalid_value"),
    (dict(extra_body={"seed": "1"}), "seed", "invalid_type"),
    (dict(extra_body={"cfg": 5}), "cfg", "unknown_parameter"),
    (dict(prompt=" ".join(["red"] * 1100)), "prompt", "context_length_exceeded"),
])
def test_image_errors_are_openai_shaped_400s(client: openai.OpenAI, kw: dict, param: str, code: str) -> None:
    args = {"prompt": "a red bicycle", **kw}
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="janus", **args)
    assert e.value.status_code == 400 and e.value.type == "invalid_request_error", e.value.body
    assert (e.value.param, e.value.code) == (param, code), e.value.body
    if param == "response_format":
        assert "stores no images" in e.value.message
    if param == "size":
        assert "16x16" in e.value.message


def test_image_request_errors_before_generation(server, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.images.generate(model="dall-e-3", prompt="a red bicycle")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="janus", prompt=None)  # type: ignore[arg-type]
    assert (e.value.param, e.value.code) == ("prompt", "missing_required_parameter")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server[1] + "/v1", api_key="wrong", max_retries=0).images.generate(
            model="janus", prompt="a red bicycle")


def test_image_stream_reports_progress_then_each_image(server, client: openai.OpenAI) -> None:
    events = list(generate(client, n=2, stream=True, extra_body={"seed": 3}))
    kinds = [e.type for e in events]
    progress = [e for e in events if e.type == "image_generation.progress"]
    steps = [(e.model_extra["step"], e.model_extra["steps"]) for e in progress]
    assert steps == [(i, 16) for i in range(1, 17)]  # every percent that changes: each token for 16 tokens
    assert kinds[-2:] == ["image_generation.completed"] * 2 and kinds[:-2] == ["image_generation.progress"] * 16
    done = events[-2:]
    assert [e.model_extra["index"] for e in done] == [0, 1] and all(e.size == SIZE for e in done)
    assert [e.b64_json for e in done] == [d.b64_json for d in generate(client, n=2, extra_body={"seed": 3}).data]
    # on the wire: gpt-image's `event:` lines before each `data:`
    body = json.dumps({"model": "janus", "prompt": "a red bicycle", "stream": True}).encode()
    req = urllib.request.Request(server[1] + "/v1/images/generations", data=body, headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        text = r.read().decode()
    assert r.headers["content-type"].startswith("text/event-stream")
    assert text.startswith("event: image_generation.progress\ndata: {")
    assert text.count("event: image_generation.completed\ndata: {") == 1


def test_chat_keeps_streaming_while_an_image_is_generated(server, client: openai.OpenAI, slow_steps) -> None:
    """Image steps and chat steps share the engine thread: a chat does not wait for the image to finish."""
    done: dict[str, float] = {}

    def image() -> None:
        generate(client, n=1)
        done["image"] = time.monotonic()

    t = threading.Thread(target=image)
    t.start()
    wait_for(lambda: len(slow_steps) >= 2)
    # few tokens: each text step runs between two image steps, and the image has 16 (plus the requests' latency)
    r = client.chat.completions.create(model="janus", max_tokens=2, temperature=0, extra_body={"ignore_eos": True},
                                       messages=[{"role": "user", "content": "what is this"}])
    # an image chat too: its features are computed between the image's steps, not after them
    v = client.chat.completions.create(model="janus", max_tokens=2, temperature=0, extra_body={"ignore_eos": True},
                                       messages=image_message(png_url(5)))
    done["chat"] = time.monotonic()
    t.join()
    assert r.usage.completion_tokens == 2 and v.usage.completion_tokens == 2 and done["chat"] < done["image"]


def test_client_disconnect_aborts_the_generation(server, slow_steps) -> None:
    srv, url = server
    images0 = metric(url, "nanoseek_images_total")
    # streamed: the client reads one progress event and leaves
    c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    stream = c.images.generate(model="janus", prompt="a red bicycle", stream=True)
    next(iter(stream))
    stream.close()
    wait_for(lambda: srv.image_requests == 0)
    assert len(slow_steps) < 16  # stopped within a step or two, not run to the end
    # not streamed: the connection closes while the server samples
    slow_steps.clear()
    body = json.dumps({"model": "janus", "prompt": "a red bicycle", "n": 2}).encode()
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_for(lambda: len(slow_steps) >= 2)
    wait_for(lambda: srv.image_requests == 0)
    assert len(slow_steps) < 16
    assert metric(url, "nanoseek_images_total") == images0  # nothing was delivered
    assert pngs(generate(openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)))  # and it still works


def test_too_many_image_requests_is_429(server, client: openai.OpenAI, slow_steps) -> None:
    srv, _ = server
    threads = [threading.Thread(target=generate, args=(client,)) for _ in range(3)]  # 1 running + max_queue 2
    for t in threads:
        t.start()
    wait_for(lambda: srv.image_requests == 3)
    with pytest.raises(openai.RateLimitError) as e:
        generate(client)
    assert e.value.code == "rate_limit_exceeded"
    for t in threads:
        t.join()
    assert srv.image_requests == 0


def test_a_failing_generation_is_a_500_and_the_server_goes_on(server) -> None:
    head = server[0].janus.model.generation_head

    def broken(h: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("simulated failure")

    def fresh() -> openai.OpenAI:  # uvicorn closes a connection after a 500: no reuse of a pooled one
        return openai.OpenAI(base_url=server[1] + "/v1", api_key=KEY, max_retries=0)

    head.forward = broken
    try:
        with pytest.raises(openai.APIError) as e:  # streamed: the status has gone, an error event instead
            list(generate(fresh(), stream=True))
        assert "Internal server error" in str(e.value)
        with pytest.raises(openai.InternalServerError) as e:
            generate(fresh())
        assert e.value.status_code == 500 and e.value.code == "internal_error"
        assert "simulated" not in e.value.message  # the traceback is in the log, not in the response
    finally:
        del head.forward
    assert server[0].image_requests == 0 and pngs(generate(fresh()))


# ---- images in chat completions ----------------------------------------------------------------------------


def local_answer(srv: Server, url: str, question: str = "what is in this picture", max_tokens: int = 8) -> str:
    j = srv.janus
    ids = understand(j.model, srv.tokenizer, decode_data_url(url), question, j.processor, max_tokens=max_tokens)
    return srv.tokenizer.decode(ids, skip_special_tokens=True)


def test_vision_chat_equals_nanoseek_generate_image(server, client: openai.OpenAI, janus_dir: Path) -> None:
    srv, _ = server
    url = png_url(0)
    r = client.chat.completions.create(model="janus", messages=image_message(url), temperature=0, max_tokens=8)
    answer = r.choices[0].message.content
    assert answer == local_answer(srv, url) and answer
    assert r.usage.prompt_tokens > 16 + 2  # the image's placeholders, begin and end of image count
    # the same as the terminal command (greedy by default there), image file and processor config from disk
    from PIL import Image

    from nanoseek.imagine import load_janus

    model = load_janus(janus_dir)
    ids = understand(model, srv.tokenizer, Image.open(io.BytesIO(base64.b64decode(url.split(",")[1]))),
                     "what is in this picture", read_processor_config(janus_dir, model.config), max_tokens=8)
    assert answer == srv.tokenizer.decode(ids, skip_special_tokens=True)
    # the image matters (another image, other probabilities); a JPEG reads as well; streaming gives the same text
    other = png_url(1, size=(40, 40))
    r2 = client.chat.completions.create(model="janus", messages=image_message(other), temperature=0, max_tokens=8,
                                        logprobs=True)
    assert r2.choices[0].message.content == local_answer(srv, other)
    r1 = client.chat.completions.create(model="janus", messages=image_message(url), temperature=0, max_tokens=8,
                                        logprobs=True)
    assert abs(r1.choices[0].logprobs.content[0].logprob - r2.choices[0].logprobs.content[0].logprob) > 1e-4
    jpeg = png_url(2, fmt="JPEG")
    assert client.chat.completions.create(model="janus", messages=image_message(jpeg), temperature=0,
                                          max_tokens=8).choices[0].message.content == local_answer(srv, jpeg)
    chunks = client.chat.completions.create(model="janus", messages=image_message(url), temperature=0, max_tokens=8,
                                            stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == answer


def test_text_chat_on_a_janus_model(server, client: openai.OpenAI) -> None:
    """Text only: the LLM through the engine, prompted in Janus' conversation format (no image)."""
    srv, _ = server
    r = client.chat.completions.create(model="janus", temperature=0, max_tokens=5, extra_body={"ignore_eos": True},
                                       messages=[{"role": "user", "content": "what is the red cat"}])
    tok = srv.tokenizer
    prompt = tok.encode("You are a helpful language and vision assistant. You are able to understand the visual "
                        "content that the user provides, and assist the user with a variety of tasks using natural "
                        "language.\n\n<|User|>: what is the red cat\n\n<|Assistant|>:", add_bos=True)
    lm = srv.janus.model.language_model
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(lm(torch.tensor([ids]))[0, -1].argmax()))
    assert r.choices[0].message.content == tok.decode(ids[len(prompt):], skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(prompt)


def test_multi_turn_with_images_and_system_prompt(server, client: openai.OpenAI) -> None:
    srv, _ = server
    a, b = png_url(3), png_url(4)
    messages = [{"role": "system", "content": "the blue cat"}, *image_message(a),
                {"role": "assistant", "content": "a red tree"},
                {"role": "user", "content": [{"type": "text", "text": "and this"},
                                             {"type": "image_url", "image_url": {"url": b, "detail": "low"}}]}]
    r = client.chat.completions.create(model="janus", messages=messages, temperature=0, max_tokens=3)
    ids = srv.janus.prompt(messages)
    assert ids.count(srv.janus.config.image_token_id) == 2 * 16
    assert r.usage.prompt_tokens == len(ids)
    # DeepSeek's conversation format; the images where their parts are (transformers' Janus template's spacing)
    assert render_conversation(messages, "<eos>") == (
        "the blue cat\n\n<|User|>: <image_placeholder>\nwhat is in this picture\n\n<|Assistant|>: a red tree<eos>"
        "<|User|>: and this\n<image_placeholder>\n\n<|Assistant|>:")
    assert render_conversation([{"role": "system", "content": ""}, {"role": "user", "content": " hi "}], "") == \
        "<|User|>: hi\n\n<|Assistant|>:"  # an empty system message: no system prompt at all


@pytest.mark.parametrize("url, code, words", [
    ("https://example.com/cat.png", "invalid_image_url", "fetch"),
    ("http://127.0.0.1:1/x.png", "invalid_image_url", "fetch"),
    ("file:///etc/passwd", "invalid_image_url", "data URL"),
    ("cat.png", "invalid_image_url", "data URL"),
    ("data:image/png,rawbytes", "invalid_image_url", "base64"),
    ("data:image/png;base64,@@@notbase64", "invalid_image_url", "base64"),
    ("data:image/gif;base64,R0lGODlhAQABAAAAACw=", "invalid_image_format", "PNG or JPEG"),
    ("data:text/plain;base64,aGVsbG8=", "invalid_image_format", "PNG or JPEG"),
    ("data:image/png;base64,aGVsbG8gd29ybGQ=", "image_parse_error", "not a PNG or JPEG"),
    ("data:image/png;base64,", "image_parse_error", "no image data"),
    ("truncated", "image_parse_error", "corrupt"),
])
def test_bad_image_inputs_are_400s_naming_the_url(client: openai.OpenAI, url: str, code: str, words: str) -> None:
    if url == "truncated":
        raw = base64.b64decode(png_url(0, size=(64, 64)).split(",")[1])
        url = "data:image/png;base64," + base64.b64encode(raw[: len(raw) // 2]).decode()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="janus", messages=image_message(url))
    assert (e.value.param, e.value.code) == ("messages[0].content[0].image_url.url", code), e.value.body
    assert words in e.value.message


def test_image_parts_where_they_do_not_belong(client: openai.OpenAI) -> None:
    part = {"type": "image_url", "image_url": {"url": png_url(0)}}
    cases = [([{"role": "system", "content": [part]}, {"role": "user", "content": "hi"}], "messages[0].content[0]"),
             ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": [part]},
               {"role": "user", "content": "hi"}], "messages[1].content[0]"),
             ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url(0), "x": 1}}]}],
              "messages[0].content[0].image_url.x"),
             ([{"role": "user", "content": [{"type": "image_url", "image_url": png_url(0)}]}],
              "messages[0].content[0].image_url"),
             ([{"role": "user", "content": "what is <image_placeholder> this"}], "messages")]
    for messages, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="janus", messages=messages)
        assert e.value.param == param, e.value.body


def test_an_image_larger_than_the_body_limit_is_413(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="janus", messages=image_message(png_url(0, size=(400, 400))))
    assert e.value.status_code == 413


def test_cli_serve_a_janus_directory(janus_dir: Path, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "serve.log"
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "nanoseek.cli", "serve", "--model", str(janus_dir), "--port",
                                 str(port), "--max-images", "2"], stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: proc.poll() is not None or _up(url), timeout=60)
        assert proc.poll() is None, log.read_text()
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        assert [m.id for m in c.models.list()] == ["janus"]
        assert pngs(c.images.generate(model="janus", prompt="a blue cat", n=2))[1].size == (16, 16)
        with pytest.raises(openai.BadRequestError) as e:
            c.images.generate(model="janus", prompt="a blue cat", n=3)
        assert e.value.param == "n" and "--max-images" in e.value.message
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1):
            return True
    except OSError:
        return False


def test_an_engine_failure_during_an_image_is_503_for_everyone(janus_dir: Path) -> None:
    """The text step that an image job runs between its own steps fails: the chat, the image and later requests get
    503, as when the engine thread fails on its own (tests/test_serve.py)."""
    srv = Server.from_config(ServeConfig(model=str(janus_dir), served_model_name="janus"))
    head = srv.janus.model.generation_head
    inner = head.forward
    steps = []

    def slow(h: torch.Tensor) -> torch.Tensor:
        steps.append(1)
        time.sleep(0.05)
        return inner(h)

    def broken() -> list:
        raise RuntimeError("simulated device failure")

    head.forward = slow
    with BackgroundServer(srv) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        errors: list[Exception] = []

        def image() -> None:
            try:
                generate(c)
            except openai.APIStatusError as e:
                errors.append(e)

        t = threading.Thread(target=image)
        t.start()
        wait_for(lambda: len(steps) >= 2)
        srv.engine.step = broken  # type: ignore[method-assign]
        with pytest.raises(openai.InternalServerError) as e:
            c.chat.completions.create(model="janus", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert e.value.status_code == 503
        t.join()
        assert [(x.status_code, x.code) for x in errors] == [(503, "engine_unavailable")]
        assert len(steps) < 16
        with pytest.raises(openai.InternalServerError) as e:  # refused up front from now on
            generate(openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0))
        assert e.value.status_code == 503 and not _up(url)
