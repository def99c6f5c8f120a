"""The one reasoning split: a DeepSeek-R1 output -> (reasoning, answer). Used by serve, chat, eval, distill, audit
and the tokenizer's training render, so every stage reads the same output the same way.

The rule (documented in docs/serving.md, "Reasoning split"):

1. A separate reasoning field wins: `reasoning_content` (DeepSeek's API, SGLang, `nanoseek serve`) or `reasoning`
   (newer vLLM, OpenRouter); see `reasoning_field`. The content is then the answer as it is.
2. Otherwise the text is split at its **first** `</think>`. The first, not the last, because a streaming server can
   only decide at the first one (it cannot wait for a later tag that may never come): vLLM's `deepseek_r1` parser,
   DeepSeek's API and `nanoseek serve` split there, so an offline split that chose the last would disagree with
   the same output served. A second `</think>` is answer text (e.g. an answer that explains the tag).
   A leading `<think>` (after whitespace) is dropped from the reasoning.
3. Output with no `</think>`: if the prompt pre-filled `<think>` (R1's updated template ends the generation prompt
   with `<think>\\n`, so the model never writes the opening tag) or the text opens with `<think>`, it is all
   reasoning, the thinking never ended (`closed=False`, cut by max_tokens or a stop) and the answer is "".
   Otherwise the output has no reasoning at all: `reasoning=None`, the whole text is the answer.
4. Empty is not absent: `reasoning == ""` is R1's `<think>\\n\\n</think>` (no thoughts, seen on some sensitive
   prompts); `reasoning is None` is a model or endpoint that returned no reasoning.

Reasoning and answer are stripped: the `\\n` and `\\n\\n` around the tags of `<think>\\n{r}\\n</think>\\n\\n{a}`, the
format R1 is trained on, are layout, not content. `join` writes that format back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

THINK, END_THINK = "<think>", "</think>"
REASONING_PARSERS = ("auto", "deepseek_r1", "none")


@dataclass(frozen=True)
class Split:
    reasoning: str | None  # None: no reasoning at all; "": empty reasoning
    answer: str  # "" when the thinking never ended
    closed: bool = True  # False: the output stopped inside the reasoning


def split(text: str | None, reasoning: str | None = None, *, prefilled: bool = False) -> Split:
    """(reasoning, answer, closed) of one output; `reasoning` is an endpoint's separate field, if any."""
    text = text or ""
    if reasoning is not None:
        return Split(reasoning.strip(), text.strip())
    head, tag, tail = text.partition(END_THINK)
    if tag:
        return Split(_drop_open(head).strip(), tail.strip())
    if prefilled or text.lstrip().startswith(THINK):
        return Split(_drop_open(text).strip(), "", closed=False)
    return Split(None, text.strip())


def detect_reasoning(tokenizer: Any, parser: str = "auto") -> bool:
    """Whether a local model's output is split (`--reasoning-parser`): `auto` turns it on for chat templates that
    mention <think> (R1's, nanoseek's); `deepseek_r1` always, `none` never."""
    if parser not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {parser!r}; choose from {', '.join(REASONING_PARSERS)}")
    if parser != "auto":
        return parser == "deepseek_r1"
    return bool(tokenizer.chat_template) and THINK in tokenizer.chat_template


def _drop_open(text: str) -> str:
    s = text.lstrip()
    return s[len(THINK):] if s.startswith(THINK) else text


def join(reasoning: str | None, answer: str) -> str:
    """R1's output format, `{reasoning}\\n</think>\\n\\n{answer}` (the generation prompt pre-filled `<think>\\n`); the
    answer alone when there is no reasoning. What verifiers and graders read: the answer after `</think>`."""
    return answer if reasoning is None else f"{reasoning}\n{END_THINK}\n\n{answer}"


def reasoning_field(message: Any) -> str | None:
    """The separate reasoning of an OpenAI-style message or stream delta (a mapping or a client-library object):
    `reasoning_content`, else `reasoning`; None when the endpoint sent neither (or a non-string)."""
    if isinstance(message, Mapping):
        found = [message.get("reasoning_content"), message.get("reasoning")]
    else:
        extra = getattr(message, "model_extra", None) or {}
        found = [getattr(message, "reasoning_content", None), extra.get("reasoning_content"),
                 getattr(message, "reasoning", None), extra.get("reasoning")]
    return next((r for r in found if isinstance(r, str)), None)


class StreamSplitter:
    """`split(..., prefilled=True)` over streamed text: the concatenated deltas equal the one-shot split of the
    whole output, however the text is chunked (tested). Trailing whitespace and a possible partial `</think>` are
    held back until the next text resolves them.

    With `enabled=False` the text passes through untouched (a model without reasoning: no split, as a server with
    its reasoning parser off). Reasoning tokens are counted by token
    id when `</think>` is one token (DeepSeek's vocabularies, nanoseek's), else by the state when each delta
    arrives."""

    def __init__(self, enabled: bool = True, end_token_id: int | None = None) -> None:
        self.enabled, self.end_token_id = enabled, end_token_id
        self.state = "open" if enabled else "content"  # open -> reasoning -> after -> content
        self.buf = ""
        self.reasoning, self.content = "", ""
        self.reasoning_tokens = 0
        self._end_token_seen = False

    def feed(self, text: str, token_ids: Sequence[int] = ()) -> tuple[str, str]:
        """Add an output delta; returns the (reasoning, content) text that can be released now."""
        if self.enabled:
            self._count(token_ids)
        self.buf += text
        return self._release(final=False)

    def finish(self) -> tuple[str, str]:
        """Release what was held back (the output ended)."""
        return self._release(final=True)

    @property
    def in_reasoning(self) -> bool:
        return self.state in ("open", "reasoning")

    @property
    def reasoning_content(self) -> str | None:
        return self.reasoning if self.enabled else None

    @property
    def answer(self) -> str | None:
        """The answer; None when the output stopped before `</think>`."""
        return None if self.in_reasoning else self.content

    def _count(self, token_ids: Sequence[int]) -> None:
        if self.end_token_id is None:
            if self.in_reasoning:
                self.reasoning_tokens += len(token_ids)
            return
        for t in token_ids:
            if self._end_token_seen:
                break
            self.reasoning_tokens += 1  # the closing tag counts as reasoning
            self._end_token_seen = t == self.end_token_id

    def _release(self, final: bool) -> tuple[str, str]:
        r, c = self._advance(final)
        self.reasoning += r
        self.content += c
        return r, c

    def _advance(self, final: bool) -> tuple[str, str]:
        if not self.enabled:
            out, self.buf = self.buf, ""
            return "", out
        r, c = [], []
        while True:
            buf = self.buf
            if self.state == "open":  # before any reasoning text: drop whitespace and one opening <think>
                s = buf.lstrip()
                if s.startswith(THINK):
                    self.buf, self.state = s[len(THINK):], "reasoning"
                    continue
                if not s or (THINK.startswith(s) and not final):
                    self.buf = s  # nothing yet, or maybe the start of <think>
                    break
                self.buf, self.state = s, "reasoning"
            elif self.state == "reasoning":
                s = buf.lstrip() if not self.reasoning and not r else buf
                i = s.find(END_THINK)
                if i >= 0:
                    r.append(s[:i].rstrip())
                    self.buf, self.state = s[i + len(END_THINK):], "after"
                    continue
                if final:
                    r.append(s.rstrip())
                    self.buf = ""
                    break
                body = s[: len(s) - _partial_suffix(s, END_THINK)]
                out = body.rstrip()  # trailing whitespace waits: it may be the "\n" before </think>
                r.append(out)
                self.buf = s[len(out):]
                break
            elif self.state == "after":  # the answer starts at its first non-whitespace character
                s = buf.lstrip()
                self.buf = s
                if not s:
                    break
                self.state = "content"
            else:  # trailing whitespace waits too: the answer is stripped at both ends
                out = buf if final else buf.rstrip()
                c.append(out.rstrip() if final else out)
                self.buf = "" if final else buf[len(out):]
                break
        return "".join(r), "".join(c)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
