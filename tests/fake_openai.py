"""A scripted fake OpenAI-compatible server on 127.0.0.1 for client tests (real HTTP: the `openai` library under
test is never patched)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def completion(content: str | None, reasoning: str | None = None, finish: str = "stop") -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning is not None:
        msg["reasoning_content"] = reasoning
    return {"id": "c1", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "message": msg, "finish_reason": finish}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8,
                      "completion_tokens_details": {"reasoning_tokens": 2}}}


def error(status: int, message: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    return status, headers or {}, {"error": {"message": message, "type": "error", "param": None, "code": None}}


def sse(chunks: list[dict[str, Any]]) -> tuple[int, dict[str, str], str]:
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    return 200, {"content-type": "text/event-stream"}, body


def delta(**d: Any) -> dict[str, Any]:
    finish = d.pop("finish", None)
    return {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": d, "finish_reason": finish}]}


class FakeServer:
    """Answers each POST with the next scripted (status, headers, body), or with `respond(request_body)` when the
    script is empty and `respond` is set; GET /v1/models lists `models`."""

    def __init__(self, models: list[str] | None = None,
                 respond: Callable[[dict[str, Any]], tuple[int, dict[str, str], Any]] | None = None) -> None:
        self.script: list[tuple[int, dict[str, str], Any]] = []
        self.respond = respond
        self.lock = threading.Lock()
        self.models = ["m"] if models is None else models
        self.posts: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def _send(self, status: int, headers: dict[str, str], body: Any) -> None:
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", headers.pop("content-type", "application/json"))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                outer.auth.append(self.headers.get("authorization"))
                self._send(200, {}, {"object": "list", "data": [{"id": m, "object": "model", "created": 0,
                                                                  "owned_by": "x"} for m in outer.models]})

            def do_POST(self) -> None:  # noqa: N802
                outer.auth.append(self.headers.get("authorization"))
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with outer.lock:
                    outer.posts.append(body)
                    scripted = outer.script.pop(0) if outer.script or outer.respond is None else None
                status, headers, body = scripted or outer.respond(body)  # type: ignore[misc]
                self._send(status, dict(headers), body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
