"""Rule-based rewards for GRPO (R1-Zero: accuracy + format, no neural reward model), the plugin API and the
sandboxed worker that runs them. Which rewards a task uses by default is the task's (nanoseek/tasks.py).

A reward function follows TRL's convention, so TRL/open-r1 reward functions work unchanged:

    def my_reward(completions: list[str], prompts: list[str], **columns) -> list[float]

`columns` are the task item's other fields (e.g. `answer`, `numbers`, `target`), one list entry per completion.
Rewards run in a separate worker process: a reward that raises, hangs past its timeout or returns NaN scores 0 for
the affected completions, is counted in the metrics, and the run continues. (math-verify's own timeout uses
signals and only works on a main thread — in the worker it runs on the worker's main thread, and the parent
enforces the wall-clock limit by killing and restarting the worker.)
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import re
from collections.abc import Callable
from typing import Any

from . import synthetic
from .plugins import import_object
from .reasoning import split as split_reasoning

RewardFn = Callable[..., list[float]]

# ------------------------------------------------------------------------------------------------------------
# built-in rewards

_THINK_ANSWER = re.compile(r"^\s*(?:<think>)?(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*$", re.S)
_ANSWER_ONLY = re.compile(r"<answer>(.*?)</answer>", re.S)


def format_reward(completions: list[str], **_: Any) -> list[float]:
    """1 for `<think> ... </think> <answer> ... </answer>` and nothing after (R1-Zero's format reward). The opening
    <think> may be absent: the R1 chat template pre-fills it in the prompt."""
    return [1.0 if (m := _THINK_ANSWER.match(c)) and m.group("think").strip() and m.group("answer").strip()
            else 0.0 for c in completions]


def arithmetic_accuracy(completions: list[str], answer: list[Any], **_: Any) -> list[float]:
    return [synthetic.verify_arithmetic({"answer": a}, c) for c, a in zip(completions, answer)]


def countdown_reward(completions: list[str], numbers: list[list[int]], target: list[int], **_: Any) -> list[float]:
    """TinyZero's scoring: 0 without the answer format, 0.1 with it but a wrong equation, 1 for a correct one."""
    return [synthetic.verify_countdown({"numbers": n, "target": t}, c) for c, n, t in zip(completions, numbers, target)]


def math_verify_accuracy(completions: list[str], answer: list[Any], **_: Any) -> list[float]:
    """GSM8K/MATH-style grading with math-verify: the <answer> content (or the text after </think>) against the
    reference, both parsed as LaTeX or plain expressions."""
    from math_verify import parse, verify

    out = []
    for c, a in zip(completions, answer):
        tail = split_reasoning(c).answer
        found = _ANSWER_ONLY.findall(tail)
        pred = found[-1] if found else tail
        gold = parse(_as_math(str(a)))
        guess = parse(_as_math(pred))
        out.append(1.0 if gold and guess and verify(gold, guess) else 0.0)
    return out


def _as_math(s: str) -> str:
    s = s.strip()
    return s if "$" in s or "\\boxed" in s else f"${s}$"


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "format": format_reward,
    "arithmetic": arithmetic_accuracy,
    "countdown": countdown_reward,
    "math_verify": math_verify_accuracy,
}


# ------------------------------------------------------------------------------------------------------------
# plugin resolution (in the parent: errors before any compute) and the sandboxed worker


def parse_reward_spec(spec: str) -> tuple[str, float]:
    """`module:fn`, `path/file.py:fn` or a built-in name, optionally `=weight` (e.g. `my_rewards:length=0.2`)."""
    weight = 1.0
    if "=" in spec:
        spec, w = spec.rsplit("=", 1)
        try:
            weight = float(w)
        except ValueError:
            raise ValueError(f"reward weight {w!r} in {spec}={w} is not a number") from None
    return spec, weight


def resolve_reward(spec: str) -> RewardFn:
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if ":" not in spec:
        raise ValueError(f"reward {spec!r} is not built in ({', '.join(BUILTIN_REWARDS)}) and not module:function")
    fn = import_object(spec, "reward")
    if not callable(fn):
        mod_name, fn_name = spec.rsplit(":", 1)
        raise ValueError(f"reward module {mod_name!r} has no function {fn_name!r}")
    return fn


def _worker_main(conn, specs: list[str]) -> None:
    fns: dict[str, RewardFn] = {}
    for spec in specs:  # import before the handshake, so start-up time never counts against a reward's timeout
        with contextlib.suppress(Exception):  # reported per call below
            fns[spec] = resolve_reward(spec)
    conn.send(("ready", None))
    while True:
        msg = conn.recv()
        if msg is None:
            return
        spec, completions, kwargs = msg
        try:
            fn = fns.get(spec) or fns.setdefault(spec, resolve_reward(spec))
            out = fn(completions, **kwargs)
            conn.send(("ok", [float(x) if x is not None else math.nan for x in out]))
        except Exception as e:  # report, never die: the parent scores 0
            conn.send(("error", f"{type(e).__name__}: {e}"))


class RewardRunner:
    """Weighted sum of reward functions, each run in a worker process with a timeout."""

    def __init__(self, specs: list[tuple[str, float]], timeout: float = 10.0):
        if not specs:
            raise ValueError("at least one reward is needed")
        for spec, _ in specs:
            resolve_reward(spec)  # import errors now, in the parent, before any rollout
        self.specs, self.timeout = specs, timeout
        self.ctx = mp.get_context("spawn")
        self.proc = None
        self.conn = None
        self.failures: dict[str, int] = {}
        self.timeouts_waited = 0  # timeouts sat through: bounded per batch (at most 3 per reward)

    def _start(self) -> None:
        parent, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker_main, args=(child, [s for s, _ in self.specs]), daemon=True)
        self.proc.start()
        self.conn = parent
        # wake on the worker's "ready" or on its death (its sentinel), whichever comes first: a worker that dies
        # while importing fails now, not after the timeout
        mp_connection.wait([parent, self.proc.sentinel], timeout=120)
        try:
            ready = parent.poll(0) and parent.recv()[0] == "ready"
        except EOFError:  # the worker died and closed its end
            ready = False
        if not ready:
            self.proc.join(1)
            raise RuntimeError(
                f"the reward worker process did not start (exit code {self.proc.exitcode}). Rewards run in a "
                "'spawn' subprocess that re-imports your __main__ module: a script that calls nanoseek's RL must "
                "guard its entry point with `if __name__ == \"__main__\":`")

    def _call(self, spec: str, completions: list[str], kwargs: dict[str, list[Any]]) -> list[float] | str:
        if self.proc is None or not self.proc.is_alive():
            self._start()
        self.conn.send((spec, completions, kwargs))
        if not self.conn.poll(self.timeout):
            self.proc.kill()  # a hung reward: kill and restart the worker
            self.proc.join()
            self.proc = None
            self.timeouts_waited += 1
            return f"timeout after {self.timeout}s"
        status, payload = self.conn.recv()
        if status != "ok":
            return payload
        if len(payload) != len(completions):
            return f"returned {len(payload)} scores for {len(completions)} completions"
        return payload

    def __call__(self, completions: list[str], prompts: list[str],
                 columns: dict[str, list[Any]]) -> tuple[list[float], dict[str, list[float]]]:
        """Total reward per completion and each component (unweighted)."""
        total = [0.0] * len(completions)
        parts: dict[str, list[float]] = {}
        for spec, weight in self.specs:
            kwargs = {"prompts": prompts, **columns}
            res = self._call(spec, completions, kwargs)
            if isinstance(res, str):  # the batch failed: retry item by item so one bad input costs one score
                scores, timeouts = [], 0
                for i, c in enumerate(completions):
                    if timeouts >= 2:  # it hangs on everything: do not wait out every item
                        scores.append(math.nan)
                        continue
                    one = self._call(spec, [c], {k: [v[i]] for k, v in kwargs.items()})
                    timeouts += isinstance(one, str) and one.startswith("timeout")
                    scores.append(math.nan if isinstance(one, str) else one[0])
            else:
                scores = res
            bad = sum(1 for s in scores if not math.isfinite(s))
            if bad:
                self.failures[spec] = self.failures.get(spec, 0) + bad
            scores = [s if math.isfinite(s) else 0.0 for s in scores]
            parts[spec] = scores
            total = [t + weight * s for t, s in zip(total, scores)]
        return total, parts

    def close(self) -> None:
        if getattr(self, "proc", None) is not None and self.proc.is_alive():
            try:
                self.conn.send(None)
                self.proc.join(timeout=2)
            except (BrokenPipeError, OSError):
                pass
            if self.proc.is_alive():
                self.proc.kill()
        self.proc = None

    def __del__(self) -> None:
        self.close()
