"""`nanoseek chat`: a terminal chat that streams the answer and shows R1's thinking dimmed and collapsible.

Two backends behind one `stream(messages, sampling)` generator of ("reasoning" | "content", text) events:
LocalBackend runs the engine in this process (no server), HTTPBackend talks to any OpenAI-compatible server
(`nanoseek serve`, vLLM, DeepSeek's API) over streamed chat completions. The REPL keeps the conversation (answers
only: R1's template drops past reasoning anyway) and has a few slash commands (/help). `/image PATH` attaches an
image to the next message as OpenAI's image_url content part with a data URL, for both backends: a Janus model
reads it (nanoseek/multimodal.py), locally or through `nanoseek serve`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from .janus import Janus
from .multimodal import JanusChat, decode_data_url, file_data_url, image_parts
from .reasoning import END_THINK, StreamSplitter, detect_reasoning

HELP = """commands:
  /think          show or hide the thinking while it streams (hidden: one summary line)
  /thoughts       print the last answer's thinking
  /system TEXT    set the system prompt (/system alone clears it)
  /image PATH     attach a PNG or JPEG to your next message (Janus models; /image alone drops it)
  /reset          forget the conversation
  /exit           quit (also Ctrl-D); Ctrl-C stops a generation"""


class ChatError(RuntimeError):
    pass


@dataclass
class TurnStats:
    finish_reason: str | None = None
    completion_tokens: int = 0
    reasoning_tokens: int = 0


class LocalBackend:
    """The engine in this process: one request at a time, stepped by the REPL's own thread."""

    def __init__(self, model_dir: str | Path, *, max_model_len: int | None = None, reasoning_parser: str = "auto",
                 seed: int | None = None, device: str | None = None, dtype: str = "auto") -> None:
        from . import load  # the package's load: a DeepSeek LLM or a Janus directory
        from .device import resolve_device, resolve_dtype
        from .infer import Engine
        from .tokenizer import Tokenizer

        dev = resolve_device(device)  # None: CUDA if available, else CPU
        dt = resolve_dtype(dtype, dev)  # weights and KV cache; "auto": bf16 on CUDA, fp32 on a CPU
        model_dir = Path(model_dir)
        if not (model_dir / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {model_dir}: chat needs the model's tokenizer")
        self.tokenizer = Tokenizer.load(model_dir)
        model = load(model_dir, device=dev, dtype=dt).eval()
        self.janus: JanusChat | None = None
        if isinstance(model, Janus):  # as the server: the engine runs its LLM, images arrive as prompt embeddings
            from .imagine import read_processor_config

            self.janus = JanusChat(model, self.tokenizer, read_processor_config(model_dir, model.config))
            model = model.language_model
        self.engine = Engine(model, self.tokenizer, max_batch=1, max_model_len=max_model_len, seed=seed)
        self.name = model_dir.resolve().name
        self.reasoning = detect_reasoning(self.tokenizer, reasoning_parser)
        self.end_think = self.tokenizer.tok.token_to_id(END_THINK)
        self.defaults: dict[str, float] = {}
        gen = model_dir / "generation_config.json"
        if gen.is_file() and self.janus is None:  # Janus' generation_config is image generation's (serve.py)
            g = json.loads(gen.read_text())
            self.defaults = {k: float(g[k]) for k in ("temperature", "top_p") if isinstance(g.get(k), int | float)}
        self.stats = TurnStats()

    @property
    def images(self) -> bool | None:
        """Whether the model reads images (None: unknown, the server decides)."""
        return self.janus is not None

    def _prompt(self, messages: list[dict[str, Any]]) -> tuple[list[int], Any]:
        """Token ids and, with images, prompt embeddings (Janus: image features over the placeholders)."""
        if self.janus is None:
            if any(True for _ in image_parts(messages)):
                raise ChatError("this is a text model: it does not read images")
            return self.tokenizer.encode_chat(messages, add_generation_prompt=True), None
        try:
            ids = self.janus.prompt(messages)
            images = [decode_data_url(url) for _, _, url in image_parts(messages)]
        except ValueError as e:
            raise ChatError(str(e)) from None
        return ids, self.janus.embeds(ids, self.janus.pixels(images)) if images else None

    def stream(self, messages: list[dict[str, Any]], sampling: dict[str, Any]) -> Iterator[tuple[str, str]]:
        from .infer import SamplingParams

        ids, embeds = self._prompt(messages)
        room = self.engine.max_model_len - len(ids)
        if room < 1:
            raise ChatError(f"the conversation is {len(ids)} tokens, the context is {self.engine.max_model_len}: "
                            "/reset to start over")
        params = SamplingParams(
            max_tokens=min(sampling.get("max_tokens") or room, room), seed=sampling.get("seed"),
            temperature=sampling.get("temperature", self.defaults.get("temperature", 1.0)),
            top_p=sampling.get("top_p", self.defaults.get("top_p", 1.0)))
        rid = self.engine.add_request(ids, params, prompt_embeds=embeds)
        splitter = StreamSplitter(self.reasoning, self.end_think)
        self.stats = TurnStats()
        done = False
        try:
            while not done:
                for d in self.engine.step():
                    if d.request_id != rid:
                        continue
                    r, c = splitter.feed(d.text, d.token_ids)
                    if d.finished:
                        r2, c2 = splitter.finish()
                        r, c, done = r + r2, c + c2, True
                        self.stats = TurnStats(d.finish_reason, d.completion_tokens, splitter.reasoning_tokens)
                    if r:
                        yield "reasoning", r
                    if c:
                        yield "content", c
        finally:
            if not done:  # Ctrl-C: free the row so the next turn starts from an idle engine
                self.engine.abort(rid)
                while self.engine.has_work():
                    self.engine.step()


class HTTPBackend:
    """Any OpenAI-compatible server (`nanoseek serve`, vLLM, DeepSeek's API) through the project's one client:
    streamed chat completions read by the `openai` library, reasoning from `reasoning_content` or `reasoning`."""

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None, timeout: float = 600) -> None:
        from .client import Endpoint, EndpointError

        try:
            self.endpoint = Endpoint(url, model, api_key, timeout=timeout, retries=2, what="the server",
                                     model_flag="--served-model", key_env="NANOSEEK_API_KEY")
            self.name = self.endpoint.model
        except EndpointError as e:
            raise ChatError(str(e)) from None
        self.stats = TurnStats()

    @property
    def images(self) -> bool | None:
        return None  # the server says (a text model answers an image part with a 400)

    def stream(self, messages: list[dict[str, Any]], sampling: dict[str, Any]) -> Iterator[tuple[str, str]]:
        from .client import EndpointError, RequestFailed

        self.stats = TurnStats()
        try:
            for kind, value in self.endpoint.stream(messages, **{k: v for k, v in sampling.items() if v is not None}):
                if kind == "done":
                    self.stats = TurnStats(value.finish_reason, value.completion_tokens or 0,
                                           value.reasoning_tokens or 0)
                else:
                    yield kind, value
        except (EndpointError, RequestFailed) as e:
            raise ChatError(str(e)) from None


class Style:
    def __init__(self, color: bool) -> None:
        self.color = color

    def dim(self, s: str) -> str:
        return f"\x1b[2m{s}\x1b[0m" if self.color and s else s

    def bold(self, s: str) -> str:
        return f"\x1b[1m{s}\x1b[0m" if self.color and s else s


def _use_color(mode: str, out: TextIO) -> bool:
    if mode != "auto":
        return mode == "always"
    return out.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


class ChatREPL:
    def __init__(self, backend: LocalBackend | HTTPBackend, *, system: str | None = None,
                 sampling: dict[str, Any] | None = None, show_thinking: bool = False, color: str = "auto",
                 out: TextIO = sys.stdout) -> None:
        self.backend, self.system, self.sampling = backend, system, dict(sampling or {})
        self.show_thinking, self.out = show_thinking, out
        self.style = Style(_use_color(color, out))
        self.history: list[dict[str, Any]] = []
        self.last_reasoning = ""
        self.attachment: str | None = None  # a data URL for the next message (/image)

    def write(self, s: str) -> None:
        self.out.write(s)
        self.out.flush()

    def run(self, read: Callable[[str], str] = input) -> int:
        self.write(self.style.bold(f"nanoseek chat with {self.backend.name}") + self.style.dim(
            " (/help for commands, /exit to quit)") + "\n")
        while True:
            try:
                line = read("> ")
            except EOFError:
                self.write("\n")
                return 0
            except KeyboardInterrupt:
                self.write("\n")
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if self.command(line):
                    return 0
                continue
            self.turn(line)

    def command(self, line: str) -> bool:
        """Run a slash command; True to quit."""
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        if cmd in ("/exit", "/quit"):
            return True
        if cmd == "/reset":
            self.history.clear()
            self.last_reasoning = ""
            self.write(self.style.dim("(conversation cleared)") + "\n")
        elif cmd == "/system":
            self.system = arg or None
            self.write(self.style.dim(f"(system prompt {'set' if arg else 'cleared'})") + "\n")
        elif cmd == "/think":
            self.show_thinking = not self.show_thinking
            self.write(self.style.dim(f"(thinking {'shown' if self.show_thinking else 'hidden'})") + "\n")
        elif cmd == "/image":
            self.attach(arg)
        elif cmd == "/thoughts":
            self.write(self.style.dim(self.last_reasoning or "(no thinking in the last answer)") + "\n")
        elif cmd == "/help":
            self.write(HELP + "\n")
        else:
            self.write(f"unknown command {cmd}; /help lists them\n")
        return False

    def attach(self, path: str) -> None:
        """/image PATH: the image goes with the next message, as an image_url part with a data URL (also to a
        server: it fetches nothing, so the image travels in the request)."""
        if not path:
            self.write(self.style.dim("(image dropped)" if self.attachment else "usage: /image PATH") + "\n")
            self.attachment = None
            return
        if self.backend.images is False:
            self.write(f"error: {self.backend.name} is a text model: it does not read images (Janus models do)\n")
            return
        try:
            self.attachment = file_data_url(path)
        except ValueError as e:
            self.write(f"error: {e}\n")
            return
        self.write(self.style.dim(f"(image attached: {Path(path).name}; it goes with your next message)") + "\n")

    def turn(self, text: str) -> None:
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        user: dict[str, Any] = {"role": "user", "content": text}
        if self.attachment is not None:  # the image first, then the question: Janus' own prompt order
            user["content"] = [{"type": "image_url", "image_url": {"url": self.attachment}},
                               {"type": "text", "text": text}]
        messages.append(user)
        reasoning, answer = [], []
        mode = "start"  # start -> reasoning -> content
        t0 = time.perf_counter()
        interrupted = False
        events = self.backend.stream(messages, self.sampling)
        try:
            for kind, piece in events:
                if kind == "reasoning":
                    if mode == "start":
                        self.write(self.style.dim("thinking: " if self.show_thinking else "(thinking… "))
                        mode = "reasoning"
                    reasoning.append(piece)
                    if self.show_thinking:
                        self.write(self.style.dim(piece))
                else:
                    if mode == "reasoning":
                        self._end_thinking(reasoning)
                    mode = "content"
                    answer.append(piece)
                    self.write(piece)
        except KeyboardInterrupt:
            interrupted = True
        except ChatError as e:
            self.write(f"\nerror: {e}\n")
            return
        finally:
            events.close()  # an interrupted local generation aborts its engine request here
        if mode == "reasoning":
            self._end_thinking(reasoning)
            self.write(self.style.dim("(no answer: the output ended inside the thinking)"))
        self.last_reasoning = "".join(reasoning)
        stats = self.backend.stats
        secs = time.perf_counter() - t0
        info = ["interrupted"] if interrupted else []
        if stats.completion_tokens:
            info.append(f"{stats.completion_tokens} tokens"
                        + (f" ({stats.reasoning_tokens} thinking)" if stats.reasoning_tokens else "")
                        + f", {stats.completion_tokens / secs:.1f} tok/s")
        if stats.finish_reason and not interrupted:
            info.append(f"finish: {stats.finish_reason}")
        self.write("\n" + self.style.dim(f"[{', '.join(info)}]") + "\n")
        # the image stays in the conversation: later questions can be about it too
        self.history += [user, {"role": "assistant", "content": "".join(answer)}]
        self.attachment = None

    def _end_thinking(self, reasoning: list[str]) -> None:
        if self.show_thinking:
            self.write("\n\n")
        else:
            words = len("".join(reasoning).split())
            self.write(self.style.dim(f"{words} word{'s' if words != 1 else ''}; /thoughts shows it)") + "\n")


def run_chat(model: str | None = None, url: str | None = None, *, api_key: str | None = None,
             served_model: str | None = None, system: str | None = None, temperature: float | None = None,
             top_p: float | None = None, max_tokens: int | None = None, seed: int | None = None,
             show_thinking: bool = False, color: str = "auto", max_model_len: int | None = None,
             reasoning_parser: str = "auto", device: str | None = None, dtype: str = "auto") -> int:
    """`nanoseek chat`: the REPL on stdin/stdout against a local model directory or a server URL. device/dtype:
    where and in which precision a local model runs (nanoseek.device; ignored with a URL)."""
    if (model is None) == (url is None):
        raise ValueError("give exactly one of --model DIR or --url URL")
    backend: LocalBackend | HTTPBackend
    if model is not None:
        backend = LocalBackend(model, max_model_len=max_model_len, reasoning_parser=reasoning_parser, seed=seed,
                               device=device, dtype=dtype)
    else:
        try:
            backend = HTTPBackend(url, api_key, served_model)  # type: ignore[arg-type]
        except ChatError as e:
            raise ValueError(str(e)) from None
    if sys.stdin.isatty():
        import readline  # noqa: F401 - line editing and history for input()
    sampling = {k: v for k, v in (("temperature", temperature), ("top_p", top_p), ("max_tokens", max_tokens),
                                  ("seed", seed)) if v is not None}
    repl = ChatREPL(backend, system=system, sampling=sampling, show_thinking=show_thinking, color=color)
    return repl.run()
