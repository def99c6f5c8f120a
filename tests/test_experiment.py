"""The stage runner (nanoseek.experiment): order, resume, plan identity, --skip/--only, needs, interrupts, timings kept
apart from results, and the time budgets of --max-minutes — on stages that record what they were given."""

import json

import pytest
from rich.console import Console

from nanoseek import experiment
from nanoseek.experiment import Stage, parse_stage_list


class Clock:
    """A clock the stages advance by hand: a stage "takes" what it adds."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _stages(log, clock=None, took=None):
    took = took or {}

    def make(name):
        def fn(r):
            log.append((name, r.budget_s, sorted(r.results)))
            if clock is not None:
                clock.t += took.get(name, 0.0)
            return {"value": len(log), "name": name}
        return fn

    return [Stage("a", make("a"), estimate_s=10), Stage("b", make("b"), needs=("a",), estimate_s=30, fits_time=True),
            Stage("c", make("c"), needs=("b",), estimate_s=20), Stage("d", make("d"), estimate_s=40, fits_time=True)]


def _run(tmp_path, stages, plan=None, **kw):
    return experiment.run(tmp_path / "out", stages, plan or {"x": 1}, console=Console(quiet=True), **kw)


def test_runs_in_order_keeps_results_and_timings_apart_and_resumes(tmp_path):
    log = []
    out = _run(tmp_path, _stages(log))
    assert [n for n, _, _ in log] == ["a", "b", "c", "d"] and out.ran == ["a", "b", "c", "d"]
    assert log[2][2] == ["a", "b"]  # a stage sees the results of the stages before it
    state = json.loads((tmp_path / "out" / "state.json").read_text())
    assert state["plan"] == {"x": 1} and state["stages"]["c"] == {"value": 3, "name": "c"}
    assert "seconds" not in json.dumps(state)  # timings live in timings.json only
    timings = json.loads((tmp_path / "out" / "timings.json").read_text())
    assert set(timings["stages"]) == {"a", "b", "c", "d"} and len(timings["invocations"]) == 1
    before = (tmp_path / "out" / "state.json").read_text()
    calls = []
    again = _run(tmp_path, _stages(log), slowdown=lambda: calls.append(1) or 1.0)
    assert again.ran == [] and len(log) == 4 and not calls  # nothing to do: no calibration either
    assert (tmp_path / "out" / "state.json").read_text() == before
    assert again.results == out.results


def test_plan_identity_and_foreign_directories(tmp_path):
    _run(tmp_path, _stages([]))
    with pytest.raises(ValueError, match="another plan.*differs in: x"):
        _run(tmp_path, _stages([]), plan={"x": 2})
    log = []
    _run(tmp_path, _stages(log), plan={"x": 2}, fresh=True)
    assert len(log) == 4
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "latest").write_text("step_00000005\n")  # e.g. an older demo's checkpoints
    with pytest.raises(ValueError, match="not empty and has no state.json"):
        experiment.run(tmp_path / "other", _stages([]), {"x": 1}, console=Console(quiet=True))


def test_skip_only_and_needs(tmp_path):
    assert parse_stage_list(["a,b", " c "]) == ["a", "b", "c"] and parse_stage_list(None) == []
    with pytest.raises(ValueError, match="unknown stage 'zz'.*stages: a, b, c, d"):
        _run(tmp_path, _stages([]), skip=["zz"])
    with pytest.raises(ValueError, match="stage 'c' needs 'b'"):
        _run(tmp_path, _stages([]), skip=["b"])
    log = []
    _run(tmp_path, _stages(log), skip=["b", "c"])
    assert [n for n, _, _ in log] == ["a", "d"]
    _run(tmp_path, _stages(log), only=["b"])  # a is finished, so b may run alone
    assert [n for n, _, _ in log] == ["a", "d", "b"]
    with pytest.raises(ValueError, match="not both"):
        _run(tmp_path, _stages(log), skip=["a"], only=["b"])


def test_an_interrupt_keeps_the_finished_stages(tmp_path):
    log = []
    stages = _stages(log)

    def interrupted(r):
        raise KeyboardInterrupt

    stages[2] = Stage("c", interrupted, needs=("b",))
    out = _run(tmp_path, stages)
    assert out.interrupted == "c" and out.ran == ["a", "b"]
    resumed = _run(tmp_path, _stages(log))
    assert resumed.ran == ["c", "d"]


def test_max_minutes_budgets_the_shrinkable_stages(tmp_path):
    # 10 minutes; estimates a 10 s, b 30 s (shrinkable), c 20 s, d 40 s (shrinkable): b gets
    # (600 - 10 (a took it) - 20 (c's estimate)) * 30 / 70 seconds
    clock, log = Clock(), []
    _run(tmp_path, _stages(log, clock, took={"a": 10.0, "b": 100.0, "c": 40.0}), max_minutes=10, clock=clock)
    budgets = {n: b for n, b, _ in log}
    assert budgets["a"] is None and budgets["c"] is None
    assert budgets["b"] == pytest.approx((600 - 10 - 20) * 30 / 70)
    # c took 2x its estimate: d's share is the time left (600 - 150), all of it d's
    assert budgets["d"] == pytest.approx(600 - 150)
    timings = json.loads((tmp_path / "out" / "timings.json").read_text())
    assert timings["stages"]["b"]["budget_s"] == budgets["b"] and timings["invocations"][0]["max_minutes"] == 10
    with pytest.raises(ValueError, match="max-minutes must be > 0"):
        _run(tmp_path, _stages([]), max_minutes=0)
