"""Reward plugins used by tests/test_rewards.py (imported by module path, in the reward worker)."""

import math
import time


def length_reward(completions, prompts, **columns):
    return [min(len(c), 10) / 10 for c in completions]


def uses_columns(completions, prompts, answer, **_):
    return [1.0 if str(a) in c else 0.0 for c, a in zip(completions, answer)]


def raises_on_bad(completions, **_):
    if any("bad" in c for c in completions):
        raise RuntimeError("cannot score this")
    return [1.0] * len(completions)


def hangs(completions, **_):
    time.sleep(60)
    return [1.0] * len(completions)


def nan_reward(completions, **_):
    return [math.nan if "x" in c else 0.5 for c in completions]


def digit_fraction(completions, **_):
    """A trivially learnable reward for the GRPO learning test: the share of digit characters."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
