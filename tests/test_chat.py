"""`nanoseek chat`: the REPL driven through a stdin pipe (in-process engine) and against a server URL."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nanoseek.chat import ChatREPL, HTTPBackend, LocalBackend
from nanoseek.serve import BackgroundServer, ServeConfig, Server

from .test_serve import ANSWER, REASONING, make_model_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one thread for tiny ops


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("chat"))


@pytest.fixture(scope="module")
def local(model_dir: Path) -> LocalBackend:
    return LocalBackend(model_dir)


def drive(backend, lines: list[str], **kw) -> tuple[str, ChatREPL]:
    out = io.StringIO()
    repl = ChatREPL(backend, out=out, **kw)
    feed = iter(lines)

    def read(prompt: str) -> str:
        out.write(prompt)
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    assert repl.run(read) == 0
    return out.getvalue(), repl


def test_cli_chat_through_a_stdin_pipe(model_dir: Path) -> None:
    script = "What is 2 + 2?\n/think\nAnd 3 + 3?\n/thoughts\n/system Be brief.\n/bogus\n/reset\n/exit\n"
    env = {**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "nanoseek.cli", "chat", "--model", str(model_dir), "--temperature",
                        "0"], input=script, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "\x1b[" not in out  # a pipe gets no colour codes
    first, second = out.split("(thinking shown)")
    assert "(thinking… 1 word; /thoughts shows it)\nHey!" in first and REASONING not in first  # folded away
    assert f"thinking: {REASONING}\n\n{ANSWER}" in second  # streamed, then the answer
    assert "finish: stop" in out and "(6 thinking)" in out
    assert "(system prompt set)" in out and "unknown command /bogus" in out and "(conversation cleared)" in out


def test_repl_history_system_prompt_and_dimmed_thinking(local: LocalBackend) -> None:
    seen: list[list[dict[str, str]]] = []
    inner = local.stream

    def spy(messages: list[dict[str, str]], sampling: dict) -> Iterator[tuple[str, str]]:
        seen.append(list(messages))
        return inner(messages, sampling)

    local.stream = spy  # type: ignore[method-assign]
    try:
        text, repl = drive(local, ["/system Be brief.", "hi", "/think", "again", "/reset", "new"], color="always",
                           sampling={"temperature": 0})
    finally:
        del local.stream
    assert seen[0] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert seen[1][1:] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ANSWER},
                           {"role": "user", "content": "again"}]  # the answer only, not the reasoning
    assert seen[2] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "new"}]
    assert f"thinking: {REASONING}" in "".join(re.findall(r"\x1b\[2m(.*?)\x1b\[0m", text))  # dimmed after /think
    assert repl.last_reasoning == REASONING


def test_output_cut_inside_the_thinking(local: LocalBackend) -> None:
    text, repl = drive(local, ["hi"], color="never", sampling={"temperature": 0, "max_tokens": 3})
    assert "(no answer: the output ended inside the thinking)" in text and "finish: length" in text
    assert repl.history[-1] == {"role": "assistant", "content": ""}


def test_ctrl_c_stops_the_generation_and_frees_the_engine(local: LocalBackend) -> None:
    inner = local.stream

    def interrupted(messages: list[dict[str, str]], sampling: dict) -> Iterator[tuple[str, str]]:
        for i, event in enumerate(inner(messages, sampling)):
            if i == 2:
                raise KeyboardInterrupt
            yield event

    local.stream = interrupted  # type: ignore[method-assign]
    try:
        text, _ = drive(local, ["hi"], color="never", sampling={"temperature": 0, "max_tokens": 50})
    finally:
        del local.stream
    assert "[interrupted" in text
    assert not local.engine.has_work()
    text, _ = drive(local, ["hi"], color="never", sampling={"temperature": 0})
    assert ANSWER in text


def test_chat_against_a_server_url(model_dir: Path) -> None:
    srv = Server.from_config(ServeConfig(model=str(model_dir), api_key="k1", served_model_name="r1"))
    with BackgroundServer(srv) as url:
        backend = HTTPBackend(url + "/v1", api_key="k1")
        assert backend.name == "r1"  # the first served model
        text, repl = drive(backend, ["hi", "/thoughts"], color="never", sampling={"temperature": 0})
        assert f"(thinking… 1 word; /thoughts shows it)\n{ANSWER}" in text and "finish: stop" in text
        assert "11 tokens (6 thinking)" in text and repl.last_reasoning == REASONING
        bad = HTTPBackend(url, api_key="wrong", model="r1")  # a named model: nothing asked before the first turn
        text, _ = drive(bad, ["hi"], color="never")
        assert f"error: the server {url}/v1 rejected the API key (HTTP 401)" in text


# ---- a Janus model: /image attaches a picture to the next message -------------------------------------------


@pytest.fixture(scope="module")
def janus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from .test_serve_janus import make_janus_dir

    return make_janus_dir(tmp_path_factory.mktemp("chat-janus"))


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import numpy as np
    from PIL import Image

    path = tmp_path_factory.mktemp("photo") / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 20, 3), dtype=np.uint8)).save(path)
    return path


def greedy_answer(janus_dir: Path, photo: Path, question: str, max_tokens: int) -> str:
    """`nanoseek generate --image` in-process: the reference answer."""
    from nanoseek.imagine import load_janus, open_image, read_processor_config, understand
    from nanoseek.tokenizer import Tokenizer

    model, tok = load_janus(janus_dir), Tokenizer.load(janus_dir)
    ids = understand(model, tok, open_image(photo), question, read_processor_config(janus_dir, model.config),
                     max_tokens=max_tokens)
    return tok.decode(ids, skip_special_tokens=True)


def test_image_command_with_a_local_janus_model(janus_dir: Path, photo: Path, tmp_path: Path) -> None:
    backend = LocalBackend(janus_dir)
    seen: list[list[dict]] = []
    inner = backend.stream

    def spy(messages: list[dict], sampling: dict) -> Iterator[tuple[str, str]]:
        seen.append(list(messages))
        return inner(messages, sampling)

    backend.stream = spy  # type: ignore[method-assign]
    (tmp_path / "notes.txt").write_text("not an image")
    text, repl = drive(backend, [f"/image {tmp_path / 'none.png'}", f"/image {tmp_path / 'notes.txt'}",
                                 f"/image {photo}", "what is in this picture", "and now", f"/image {photo}",
                                 "/image", "/image"],
                       color="never", sampling={"temperature": 0, "max_tokens": 6})
    assert f"error: image {tmp_path / 'none.png'} does not exist" in text
    assert "error: cannot read image" in text
    assert "(image attached: photo.jpg; it goes with your next message)" in text
    assert "(image dropped)" in text and "usage: /image PATH" in text
    first, second = seen
    image, question = first[0]["content"]
    assert image["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert question == {"type": "text", "text": "what is in this picture"}
    assert second[0] == first[0] and second[2] == {"role": "user", "content": "and now"}  # the image stays
    answer = greedy_answer(janus_dir, photo, "what is in this picture", 6)
    assert second[1] == {"role": "assistant", "content": answer} and answer
    assert repl.attachment is None


def test_image_command_needs_a_model_that_reads_images(local: LocalBackend, photo: Path) -> None:
    text, repl = drive(local, [f"/image {photo}"], color="never")
    assert "is a text model: it does not read images" in text and repl.attachment is None


def test_image_command_against_a_janus_server(janus_dir: Path, photo: Path) -> None:
    srv = Server.from_config(ServeConfig(model=str(janus_dir), served_model_name="janus"))
    with BackgroundServer(srv) as url:
        backend = HTTPBackend(url, api_key="none")
        text, repl = drive(backend, [f"/image {photo}", "what is in this picture"], color="never",
                           sampling={"temperature": 0, "max_tokens": 6})
    answer = greedy_answer(janus_dir, photo, "what is in this picture", 6)
    assert f"> {answer}\n" in text and "finish: length" in text  # the server read the image: the same answer
    assert repl.history[0]["content"][0]["type"] == "image_url"


def test_cli_chat_with_a_janus_model(janus_dir: Path, photo: Path) -> None:
    script = f"/image {photo}\nwhat is in this picture\n/exit\n"
    env = {**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "nanoseek.cli", "chat", "--model", str(janus_dir), "--temperature",
                        "0", "--max-tokens", "6"], input=script, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    assert "(image attached: photo.jpg" in p.stdout
    assert greedy_answer(janus_dir, photo, "what is in this picture", 6) in p.stdout
