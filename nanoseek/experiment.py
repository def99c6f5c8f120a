"""One runner for multi-stage experiments: the demo, `nanoseek experiment NAME` and `nanoseek distill experiment`.

A stage is a named function that does a fixed amount of work (steps, samples, problems) and returns its results as
JSON-able numbers. The runner
  - runs the selected stages in order (`skip` / `only`), and refuses, before any work, a selection in which a stage
    needs another that is neither finished nor selected;
  - keeps OUT/state.json: the plan the run was started with and each finished stage's results. A re-run skips the
    finished stages (resume), `fresh` starts over, and a different plan is refused: its results would be mixed
    with this one's;
  - keeps the timings apart, in OUT/timings.json (seconds per stage and per invocation): they are the only numbers
    that differ between two runs of the same plan on the same machine, so results stay comparable byte for byte;
  - with a time limit (`max_minutes`), hands each stage that can shrink its work (`fits_time`) a budget in seconds:
    the time left, minus the estimated time of the fixed-work stages still to come (scaled by how much slower than
    the reference this machine has been so far), shared among the shrinkable stages in proportion to their
    estimates. Without a limit no stage ever sees a clock.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from .files import atomic_write_json

STATE_FILE, TIMINGS_FILE = "state.json", "timings.json"


@dataclass
class Stage:
    name: str
    run: Callable[[StageRun], dict[str, Any]]
    needs: tuple[str, ...] = ()  # stages whose outputs this one reads
    work: str = ""  # the fixed work in words, printed when the stage starts
    estimate_s: float = 0.0  # seconds on the reference machine (each experiment says which one)
    fits_time: bool = False  # can shrink its work to a time budget (training stages); others always finish


@dataclass
class StageRun:
    """What a stage function gets: where to write, the results of the stages before it, and its time budget (None:
    do the planned work, whatever it takes)."""

    root: Path
    console: Console
    results: dict[str, dict[str, Any]]
    budget_s: float | None = None
    clock: Callable[[], float] = time.perf_counter


@dataclass
class Outcome:
    results: dict[str, dict[str, Any]]  # every finished stage's results, in stage order
    timings: dict[str, Any]
    ran: list[str] = field(default_factory=list)  # stages run by this invocation
    interrupted: str | None = None  # the stage a KeyboardInterrupt stopped


def parse_stage_list(value: str | Sequence[str] | None) -> list[str]:
    """`a,b` or ["a", "b,c"] -> ["a", "b", "c"]: --skip / --only accept both repeated and comma-separated names."""
    if not value:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [n.strip() for item in items for n in item.split(",") if n.strip()]


def select(stages: Sequence[Stage], skip: Sequence[str] = (), only: Sequence[str] = ()) -> list[Stage]:
    """The stages to consider, in order; unknown names are a ValueError naming the valid ones."""
    names = [s.name for s in stages]
    for flag, given in (("--skip", skip), ("--only", only)):
        unknown = [n for n in given if n not in names]
        if unknown:
            raise ValueError(f"{flag}: unknown stage {', '.join(map(repr, unknown))} (stages: {', '.join(names)})")
    if skip and only:
        raise ValueError("give --skip or --only, not both")
    return [s for s in stages if (not only or s.name in only) and s.name not in skip]


def load_state(root: Path) -> dict[str, Any]:
    f = root / STATE_FILE
    return json.loads(f.read_text()) if f.exists() else {}


def run(root: str | Path, stages: Sequence[Stage], plan: dict[str, Any], *, skip: Sequence[str] = (),
        only: Sequence[str] = (), fresh: bool = False, max_minutes: float | None = None,
        slowdown: float | Callable[[], float] = 1.0,
        console: Console | None = None, title: str = "experiment", threads: int | None = None,
        clock: Callable[[], float] = time.perf_counter) -> Outcome:
    """Run (or resume) `stages` under OUT = `root`. `plan` identifies the run (JSON-able): a directory holding
    another plan's results is refused. `slowdown` is this machine's time relative to the reference machine's, or
    a calibration that measures it (called only when a stage is left to run, after the checks), used for the
    estimate printed at the start and for the time budgets. `threads` is recorded
    (results differ in their last digits between thread counts, so a resume with another count is flagged)."""
    console = console or Console()
    root = Path(root)
    if max_minutes is not None and max_minutes <= 0:
        raise ValueError(f"--max-minutes must be > 0, got {max_minutes}")
    chosen = select(stages, skip, only)
    if fresh and root.exists():
        shutil.rmtree(root)
    if root.exists() and not (root / STATE_FILE).exists() and any(root.iterdir()):
        # checkpoints there would be resumed as if they were this plan's
        raise ValueError(f"{root} is not empty and has no {STATE_FILE} (an older layout or other files): use "
                         "--fresh to start over there, or another --out")
    root.mkdir(parents=True, exist_ok=True)
    state = load_state(root)
    plan = json.loads(json.dumps(plan))  # the JSON form, so a plan compares equal to its stored self
    if state.get("plan") is not None and state["plan"] != plan:
        differ = sorted(k for k in set(plan) | set(state["plan"]) if plan.get(k) != state["plan"].get(k))
        raise ValueError(f"{root} holds a run of another plan (differs in: {', '.join(differ)}): use --fresh to "
                         "start over, or another --out")
    state["plan"] = plan
    done: dict[str, dict[str, Any]] = state.setdefault("stages", {})
    if threads is not None:
        if state.get("threads") not in (None, threads) and any(s.name not in done for s in chosen):
            console.print(f"[yellow]this run uses {threads} threads; its finished stages used {state['threads']}: "
                          "float rounding differs between thread counts, so the numbers will not match an "
                          "uninterrupted run's to the last digit[/]")
        state.setdefault("threads", threads)
    names = {s.name for s in chosen}
    for s in chosen:
        missing = [n for n in s.needs if n not in done and n not in names]
        if missing and s.name not in done:
            raise ValueError(f"stage {s.name!r} needs {', '.join(map(repr, missing))}, which is neither finished "
                             "nor selected (drop it from --skip, or add it to --only)")
    timings_file = root / TIMINGS_FILE
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {"stages": {}, "invocations": []}
    todo = [s for s in chosen if s.name not in done]
    if callable(slowdown):
        slowdown = slowdown() if todo else 1.0
    t_start = clock()
    deadline = None if max_minutes is None else t_start + 60 * max_minutes
    planned = sum(s.estimate_s for s in todo)
    console.rule(f"{title} -> {root}")
    if todo:
        expect = planned * slowdown
        console.print(f"to run: {', '.join(s.name for s in todo)} — about {planned / 60:.1f} min on the reference "
                      f"machine" + (f"; this machine measured {slowdown:.2f}x its time, so expect about "
                                    f"{expect / 60:.1f} min" if abs(slowdown - 1) > 0.05 else ""))
        if max_minutes is not None:
            console.print(f"--max-minutes {max_minutes:g}: the training stages shrink their steps to fit (their "
                          "learning-rate decay still completes); the report says the run was time-limited")
        elif slowdown > 1.5:
            console.print(f"[yellow]this machine is {slowdown:.1f}x slower than the reference: expect about "
                          f"{expect / 60:.0f} min. `--max-minutes M` caps the run (training stages then do less "
                          "work, and the report says so)[/]")
    invocation = {"started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"), "stages": [],
                  "max_minutes": max_minutes, "slowdown": slowdown, "threads": threads}
    outcome = Outcome(results={}, timings=timings)
    speed = slowdown  # observed / estimated time of this invocation's fixed-work stages, refined as they finish
    spent_est = spent = 0.0
    for s in chosen:
        if s.name in done:
            t = timings["stages"].get(s.name, {}).get("seconds")
            console.print(f"[dim]{s.name}: done{f' ({t:.0f}s)' if t is not None else ''}, skipped — `--fresh` to "
                          "redo[/]")
            continue
        budget = None
        if deadline is not None and s.fits_time:
            rest = todo[todo.index(s):]
            fixed = sum(r.estimate_s for r in rest if not r.fits_time) * speed
            shrinkable = sum(r.estimate_s for r in rest if r.fits_time)
            budget = max(1.0, (deadline - clock() - fixed) * s.estimate_s / max(shrinkable, 1e-9))
        console.rule(f"[bold]{s.name}[/]" + (f" — {s.work}" if s.work else "")
                     + (f" (budget {budget:.0f}s)" if budget is not None else ""))
        ts = clock()
        try:
            result = s.run(StageRun(root=root, console=console, results={**done}, budget_s=budget, clock=clock))
        except KeyboardInterrupt:
            console.print(f"[yellow]interrupted in {s.name}; finished stages are kept — run the same command to "
                          "resume[/]")
            outcome.interrupted = s.name
            break
        seconds = clock() - ts
        done[s.name] = result
        atomic_write_json(root / STATE_FILE, state)
        timings["stages"][s.name] = {"seconds": seconds, "estimate_s": s.estimate_s, "budget_s": budget}
        invocation["stages"].append(s.name)
        atomic_write_json(timings_file, timings)
        outcome.ran.append(s.name)
        if s.estimate_s > 0 and not s.fits_time:  # a shrinkable stage's time reflects its budget, not the machine
            spent_est, spent = spent_est + s.estimate_s, spent + seconds
            speed = spent / spent_est
    atomic_write_json(root / STATE_FILE, state)  # the plan and thread count, even when nothing ran
    invocation["seconds"] = clock() - t_start
    timings["invocations"].append(invocation)
    atomic_write_json(timings_file, timings)
    outcome.results = {s.name: done[s.name] for s in stages if s.name in done}
    return outcome
