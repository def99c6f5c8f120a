"""The web chat page served at `/`, driven end to end in headless Chromium (Debian's, through Playwright)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from nanoseek.serve import BackgroundServer, ServeConfig, Server

from .test_serve import ANSWER, REASONING, make_model_dir


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

    # the server wants a key: the page says so, then loads the models once it is entered
    page.wait_for_function("document.getElementById('error').textContent.includes('API key')")
    page.click("#toggle-settings")
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.getElementById('model').options.length > 0")
    assert page.input_value("#model") == "model" and page.is_hidden("#error")
    page.fill("#max-tokens", "64")
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
