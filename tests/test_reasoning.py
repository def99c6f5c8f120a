"""The one reasoning split (nanoseek/reasoning.py): a test per edge of the documented rule, and the streaming
splitter against the one-shot split under every chunking."""

from __future__ import annotations

import random

import pytest

from nanoseek.reasoning import Split, StreamSplitter, join, reasoning_field, split


def test_separate_field_wins_and_empty_is_not_absent() -> None:
    assert split("answer", "thoughts") == Split("thoughts", "answer")
    assert split("  answer\n", "") == Split("", "answer")  # R1's empty thinking through reasoning_content
    assert split(None, "only thinking") == Split("only thinking", "")
    # an inline tag in the content of an endpoint that already split: the content is the answer as it is
    assert split("a </think> b", "r") == Split("r", "a </think> b")


def test_inline_split_at_the_first_end_tag() -> None:
    assert split("<think>\nhm\n</think>\n\nyes") == Split("hm", "yes")
    assert split("hm</think>yes") == Split("hm", "yes")  # the template pre-filled <think>
    assert split("<think>\n\n</think>\n\nno") == Split("", "no")  # R1's empty reasoning, inline
    # the first </think> ends the reasoning (as a streaming server must decide); a later one is answer text
    assert split("r</think>the tag </think> closes thinking") == Split("r", "the tag </think> closes thinking")
    assert split("  <think>r</think>a", prefilled=True) == Split("r", "a")  # a prefill and a written tag


def test_unterminated_thinking() -> None:
    assert split("<think>still thinking") == Split("still thinking", "", closed=False)
    assert split("still thinking", prefilled=True) == Split("still thinking", "", closed=False)
    assert split("", prefilled=True) == Split("", "", closed=False)
    assert split("plain answer") == Split(None, "plain answer")  # no prefill, no tag: no reasoning at all
    assert split(None) == Split(None, "")


def test_join_is_the_inverse_of_split() -> None:
    for reasoning, answer in [("r1 r2", "a"), ("", "a"), (None, "just an answer")]:
        text = join(reasoning, answer)
        assert split(text, prefilled=reasoning is not None) == Split(reasoning, answer)
    assert join("r", "a") == "r\n</think>\n\na"


def test_reasoning_field_reads_both_names() -> None:
    assert reasoning_field({"content": "x", "reasoning_content": "a"}) == "a"
    assert reasoning_field({"content": "x", "reasoning": "b"}) == "b"  # vLLM's newer name
    assert reasoning_field({"content": "x", "reasoning_content": ""}) == ""
    assert reasoning_field({"content": "x"}) is None
    assert reasoning_field({"reasoning_content": None, "reasoning": 3}) is None  # not a string

    class Msg:  # the openai library's objects keep unknown fields in model_extra
        content, model_extra = "x", {"reasoning": "c"}

    assert reasoning_field(Msg()) == "c"


CASES = ["<think>\nLet me think.\n</think>\n\nThe answer is 4.", "Pre-filled reasoning\n</think>\n\nAnswer\n",
         "<think>\n\n</think>\n\nNo.", "never closes the <thi", "r</think>a </think> b", "   ", "x</think>",
         "<think", "<thinking>is not the tag</think>  a  ", "a\n\n</think\n>b</think>\n\nc  \n"]


@pytest.mark.parametrize("text", CASES)
def test_stream_equals_one_shot_under_any_chunking(text: str) -> None:
    want = split(text, prefilled=True)
    rng = random.Random(0)
    for trial in range(40):
        s = StreamSplitter()
        reasoning, content = [], []
        i = 0
        while i < len(text):
            n = 1 if trial == 0 else rng.randint(1, 6)
            r, c = s.feed(text[i:i + n])
            reasoning.append(r)
            content.append(c)
            i += n
        r, c = s.finish()
        assert "".join(reasoning) + r == want.reasoning == s.reasoning_content, (trial, text)
        assert "".join(content) + c == want.answer, (trial, text)
        assert s.answer == (want.answer if want.closed else None)


def test_stream_disabled_passes_text_through() -> None:
    s = StreamSplitter(enabled=False)
    assert s.feed("  <think>x</think> y ") == ("", "  <think>x</think> y ")
    assert s.finish() == ("", "") and s.reasoning_content is None and s.answer == "  <think>x</think> y "
