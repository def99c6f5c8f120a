"""The web chat page served at `/`, driven end to end in headless Chromium (Debian's, through Playwright)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from nanoseek.multimodal import decode_data_url
from nanoseek.serve import BackgroundServer, ServeConfig, Server

from .test_serve import ANSWER, REASONING, make_model_dir
from .test_serve_janus import local_answer, make_janus_dir


def find_chromium() -> str | None:
    """Playwright's own variable, else a Chromium on PATH (Debian's `chromium`, Ubuntu's `chromium-browser`)."""
    return os.environ.get("PLAYWRIGHT_CHROMIUM_EXECUTABLE_PATH") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


CHROMIUM = find_chromium()
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY = "k-web-123"

if CHROMIUM is None and os.environ.get("CI"):  # CI installs it (.ci/run): a missing browser there is a failure
    raise RuntimeError("no Chromium on PATH or in $PLAYWRIGHT_CHROMIUM_EXECUTABLE_PATH: .ci/run installs Debian's")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH or in "
                                "$PLAYWRIGHT_CHROMIUM_EXECUTABLE_PATH (apt-get install chromium; .ci/run does)")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is fastest on a shared CPU (see tests/test_serve.py)
    srv = Server.from_config(ServeConfig(model=str(make_model_dir(tmp_path_factory.mktemp("web"))), api_key=KEY))
    step = srv.engine.step

    def slow_step() -> list:  # ~30 ms per token, so the page visibly receives the answer piece by piece
        import time

        time.sleep(0.03)
        return step()

    srv.engine.step = slow_step  # type: ignore[method-assign]
    with BackgroundServer(srv) as url:
        yield url
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


RECORD = """() => {  // every state of the last answer's text, to check it arrived in pieces
  window.snapshots = [];
  new MutationObserver(() => {
    const c = document.querySelectorAll('.msg.assistant .content');
    if (c.length) window.snapshots.push(c[c.length - 1].textContent);
  }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}"""


def test_page_streams_an_answer_with_collapsible_thinking(server: str, browser, tmp_path: Path) -> None:
    page = browser.new_page(viewport={"width": 1000, "height": 720})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.method == "POST" else None)
    page.goto(server + "/")
    # a saved setting is loaded at start (the second test checks the same path for maxTokens 3); typing into the
    # number field here made this test flaky in full-suite runs (3 of ~6: the second turn sent the default 512,
    # cause not found, docs/LOG.md)
    page.evaluate("localStorage.setItem('nanoseek-settings', JSON.stringify({maxTokens: '64'}))")
    page.reload()

    # the server wants a key: the page says so, then loads the models once it is entered
    page.wait_for_function("document.getElementById('error').textContent.includes('API key')")
    page.click("#toggle-settings")
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.getElementById('model').options.length > 0")
    assert page.input_value("#model") == "model" and page.is_hidden("#error")
    assert page.is_hidden("#tabs") and page.is_hidden("#attach")  # a text model: the page as it always was
    assert page.input_value("#max-tokens") == "64"
    page.click("#toggle-settings")

    page.evaluate(RECORD)
    page.fill("#prompt", "What is 2 + 2?")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.assistant:not(.streaming) .meta:not(:empty)", timeout=30_000)

    msg = page.locator(".msg.assistant").last
    assert msg.locator(".content").text_content() == ANSWER
    assert msg.locator(".thinking-body").text_content() == REASONING
    assert msg.locator(".thinking").get_attribute("open") is None  # folded once the answer started
    assert msg.locator(".thinking summary").text_content().startswith("Thought for")
    meta = msg.locator(".meta").text_content()
    assert "11 tokens (6 thinking)" in meta and "finish: stop" in meta
    snapshots = [s for s in page.evaluate("window.snapshots") if s]
    assert len(set(snapshots)) >= 3 and snapshots[-1] == ANSWER  # streamed, not one final paint
    assert all(ANSWER.startswith(s) for s in snapshots)

    msg.locator(".thinking summary").click()  # expands on click
    assert msg.locator(".thinking").get_attribute("open") is not None
    page.screenshot(path=str(tmp_path / "chat.png"))

    # the second turn sends the history (answers only) with the page's sampling settings
    page.fill("#prompt", "And 3 + 3?")
    page.press("#prompt", "Enter")
    page.wait_for_function("document.querySelectorAll('.msg.assistant .meta:not(:empty)').length == 2",
                           timeout=30_000)
    assert [b["max_tokens"] for b in bodies] == [64, 64]  # both turns, with the saved setting
    body = bodies[-1]
    assert body["messages"] == [{"role": "user", "content": "What is 2 + 2?"},
                                {"role": "assistant", "content": ANSWER},
                                {"role": "user", "content": "And 3 + 3?"}]
    assert body["stream"] is True and body["max_tokens"] == 64 and body["temperature"] == 0.6
    assert body["top_p"] == 0.95 and body["model"] == "model"
    assert errors == []
    page.close()


def test_page_when_the_output_ends_inside_the_thinking(server: str, browser) -> None:
    page = browser.new_page()
    page.goto(server + "/")
    page.evaluate(f"localStorage.setItem('nanoseek-settings', JSON.stringify({{apiKey: '{KEY}', maxTokens: '3'}}))")
    page.reload()  # settings persist in localStorage
    page.wait_for_function("document.getElementById('model').options.length > 0")
    page.fill("#prompt", "hi")
    page.click("#send")
    page.wait_for_selector(".msg.assistant:not(.streaming) .meta:not(:empty)", timeout=30_000)
    msg = page.locator(".msg.assistant").last
    assert msg.locator(".content").text_content() == ""
    assert msg.locator(".thinking-body").text_content() == REASONING[:3]
    assert "no answer" in msg.locator(".thinking summary").text_content()
    assert "finish: length" in msg.locator(".meta").text_content()
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0 and page.is_visible("#empty")
    page.close()


def test_page_shows_server_errors(server: str, browser) -> None:
    page = browser.new_page()
    page.goto(server + "/")
    page.evaluate(f"localStorage.setItem('nanoseek-settings', JSON.stringify({{apiKey: '{KEY}', "
                  "temperature: '0.5', maxTokens: '100000'}))")
    page.reload()
    page.wait_for_function("document.getElementById('model').options.length > 0")
    page.fill("#prompt", "hi")
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])", timeout=30_000)
    assert "400" in page.text_content("#error") and "context length" in page.text_content("#error")
    page.close()


# ---- a Janus model: the Images tab and images attached to chat messages ----------------------------------------


@pytest.fixture(scope="module")
def janus_server(tmp_path_factory: pytest.TempPathFactory):
    import time

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    srv = Server.from_config(ServeConfig(model=str(make_janus_dir(tmp_path_factory.mktemp("web-janus"))),
                                         served_model_name="janus"))
    head = srv.janus.model.generation_head
    inner = head.forward

    def slow(h: torch.Tensor) -> torch.Tensor:  # ~40 ms per image-token step: the progress bar has time to move
        time.sleep(0.04)
        return inner(h)

    head.forward = slow
    with BackgroundServer(srv) as url:
        yield srv, url
    torch.set_num_threads(n)


POLL_PROGRESS = """() => {  // the progress bar's values while the images are generated (a property: no mutations)
  window.progress = [];
  window.poll = setInterval(() => {
    const p = document.getElementById('image-progress');
    if (!p.hidden) window.progress.push([document.getElementById('image-progress-bar').value,
                                         document.getElementById('image-status').textContent]);
  }, 5);
}"""


def test_image_tab_generates_images_with_progress(janus_server, browser, tmp_path: Path) -> None:
    import base64

    import openai

    srv, url = janus_server
    page = browser.new_page(viewport={"width": 1000, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.method == "POST" else None)
    page.goto(url + "/")
    page.wait_for_selector("#tabs:not([hidden])")
    assert page.is_visible("#attach")  # a Janus model reads images too
    page.click("#tab-images")
    assert page.is_hidden("#composer") and page.is_visible("#image-form")
    page.fill("#image-prompt", "a red bicycle under a tree")
    page.fill("#image-n", "2")
    page.fill("#image-seed", "3")
    page.evaluate(POLL_PROGRESS)
    page.press("#image-prompt", "Enter")
    page.wait_for_selector(".generation:not(.busy) .meta:not(:empty)", timeout=60_000)
    page.evaluate("clearInterval(window.poll)")

    imgs = page.locator(".generation img")
    assert imgs.count() == 2
    assert page.evaluate("[...document.querySelectorAll('.generation img')].map(i => i.naturalWidth)") == [16, 16]
    srcs = [imgs.nth(i).get_attribute("src") for i in range(2)]
    api = openai.OpenAI(base_url=url + "/v1", api_key="none").images.generate(
        model="janus", prompt="a red bicycle under a tree", n=2, extra_body={"seed": 3, "guidance_scale": 5})
    assert srcs == [f"data:image/png;base64,{d.b64_json}" for d in api.data]  # the server's images, as sent
    assert base64.b64decode(srcs[0].split(",")[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.locator(".generation figcaption").text_content() == "a red bicycle under a tree"
    assert "2 of 2 images" in page.locator(".generation .meta").text_content()
    assert bodies[-1] == {"model": "janus", "prompt": "a red bicycle under a tree", "n": 2, "stream": True,
                          "guidance_scale": 5, "seed": 3}
    progress = page.evaluate("window.progress")
    moving = {round(v) for v, _ in progress if 0 < v < 100}
    assert len(moving) >= 3, progress  # the bar moved through the steps
    assert any(t.startswith("sampling image tokens") for _, t in progress)
    assert page.is_hidden("#image-progress") and page.is_hidden("#error")
    page.screenshot(path=str(tmp_path / "images.png"))
    assert errors == []
    page.close()


def test_an_image_attached_to_a_chat_message(janus_server, browser, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    srv, url = janus_server
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 20, 3), dtype=np.uint8)).save(photo)
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.method == "POST" else None)
    page.goto(url + "/")
    page.evaluate("localStorage.setItem('nanoseek-settings', JSON.stringify({temperature: '0', maxTokens: '8'}))")
    page.reload()
    page.wait_for_selector("#attach:not([hidden])")
    with page.expect_file_chooser() as chooser:
        page.click("#attach")
    chooser.value.set_files(str(photo))
    page.wait_for_selector("#attachment:not([hidden])")
    assert page.text_content("#attachment-name") == "photo.png"
    page.fill("#prompt", "what is in this picture")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.assistant:not(.streaming) .meta:not(:empty)", timeout=30_000)

    (image, text) = bodies[-1]["messages"][0]["content"]
    assert image["type"] == "image_url" and text == {"type": "text", "text": "what is in this picture"}
    data_url = image["image_url"]["url"]
    assert data_url.startswith("data:image/png;base64,")
    assert page.get_attribute(".msg.user img.attached", "src") == data_url  # shown in the user's message
    answer = page.locator(".msg.assistant .content").last.text_content()
    assert answer == local_answer(srv, data_url)  # what the model says about this image, greedy
    assert page.is_hidden("#attachment")  # it went with that message

    # the next message has no attachment of its own; the image stays in the conversation
    page.fill("#prompt", "and now")
    page.press("#prompt", "Enter")
    page.wait_for_function("document.querySelectorAll('.msg.assistant .meta:not(:empty)').length == 2",
                           timeout=30_000)
    messages = bodies[-1]["messages"]
    assert messages[0]["content"][0]["image_url"]["url"] == data_url
    assert messages[1] == {"role": "assistant", "content": answer} and messages[2] == {"role": "user",
                                                                                         "content": "and now"}
    # a non-image file is refused on the page, before anything is sent
    (tmp_path / "notes.txt").write_text("hello")
    with page.expect_file_chooser() as chooser:
        page.click("#attach")
    chooser.value.set_files(str(tmp_path / "notes.txt"))
    page.wait_for_selector("#error:not([hidden])")
    assert "only PNG and JPEG" in page.text_content("#error") and page.is_hidden("#attachment")
    # a photo larger than 1024 px is scaled down on the page (the body limit; the model reads 16 px here anyway)
    big = tmp_path / "big.png"
    Image.fromarray(np.indices((1200, 2000)).sum(0).astype(np.uint8)).convert("RGB").save(big)
    with page.expect_file_chooser() as chooser:
        page.click("#attach")
    chooser.value.set_files(str(big))
    page.wait_for_selector("#attachment:not([hidden])")
    page.fill("#prompt", "what is this")
    page.press("#prompt", "Enter")
    page.wait_for_function("document.querySelectorAll('.msg.assistant .meta:not(:empty)').length == 3",
                           timeout=30_000)
    sent = bodies[-1]["messages"][4]["content"][0]["image_url"]["url"]
    assert sent.startswith("data:image/png;base64,") and decode_data_url(sent).size == (1024, 614)
    assert errors == [] and page.is_hidden("#error")
    page.close()
