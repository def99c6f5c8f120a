"""The `nanoseek` command end to end (in-process), and the demo's reproducibility (two fresh runs)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanoseek import load
from nanoseek.cli import main

ROOT = Path(__file__).resolve().parents[1]
# what may differ between two runs of the same plan on the same machine: everything else must be byte-identical
VARYING = ("timings", "environment")


@pytest.fixture(scope="module")
def two_fast_demos(tmp_path_factory):
    """`nanoseek demo --fast` twice, in fresh directories, as separate processes with different hash seeds (set and
    dict orders, import state and allocations differ) and one thread each — run side by side, which also shows that
    a busy machine changes nothing but the timings."""
    runs = []
    for i in (1, 2):
        out = tmp_path_factory.mktemp(f"demo{i}")
        env = {**os.environ, "PYTHONHASHSEED": str(i)}
        runs.append((out, subprocess.Popen([sys.executable, "-m", "nanoseek.cli", "demo", "--fast", "--out", str(out),
                                            "--threads", "1"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True)))
    done = []
    for out, proc in runs:
        stdout, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, stdout[-3000:]
        done.append((out, stdout))
    return done


def test_demo_fast_runs_every_stage_and_resumes(two_fast_demos, capsys):
    tmp_path, out = two_fast_demos[0]
    assert "nanoseek chat --model" in out
    report = (tmp_path / "report" / "report.md").read_text()
    for section in ("## What the numbers say", "## Environment", "## The model", "## Pretraining", "## GRPO",
                    "## Distillation vs RL on the student", "## Held-out accuracy",
                    "## The same recipe at DeepSeek-V3 scale", "## Mini Janus", "### Guidance"):
        assert section in report
    for png in ("janus-grid.png", "janus-guidance.png", "janus-train.png"):
        assert (tmp_path / "report" / png).exists()
    for name in ("base", "rl", "student-base", "student-rl", "student"):
        assert load(tmp_path / "models" / name) is not None
    assert (tmp_path / "report" / "accuracy.png").exists()
    state = (tmp_path / "state.json").read_text()
    assert main(["demo", "--fast", "--out", str(tmp_path), "--threads", "1"]) == 0  # finished stages are skipped
    assert "skipped" in capsys.readouterr().out
    assert (tmp_path / "state.json").read_text() == state


def test_demo_fast_gives_the_same_numbers_on_every_run(two_fast_demos):
    reports = []
    for out, _ in two_fast_demos:
        rep = json.loads((out / "report" / "report.json").read_text())
        assert rep["environment"]["threads"] == 1 and rep["timings"]["stages"]
        reports.append(json.dumps({k: v for k, v in rep.items() if k not in VARYING}, indent=1))
    assert reports[0] == reports[1]
    rep = json.loads(reports[0])
    assert len(rep["models"]) == 5 and not rep["time_limited"]  # same weights too: their hashes are in the report
    assert set(rep["stages_done"]) == {"data", "pretrain", "rl", "student_pretrain", "student_rl", "traces",
                                       "student_distill", "eval", "janus_data", "janus_vq", "janus_train",
                                       "janus_eval"}
    assert {"janus-verifier-valid", "janus-follows-prompts", "janus-understands", "janus-guidance-helps"} <= \
        {v["id"] for v in rep["verdicts"]}
    for v in rep["verdicts"]:  # every judgement carries its rule
        assert v["rule"] and v["text"] and v["holds"] in (True, False, None)


def test_demo_stage_selection_fails_before_any_work(tmp_path, capsys):
    assert main(["demo", "--fast", "--out", str(tmp_path / "a"), "--skip", "pretrain,nope"]) == 2
    assert "unknown stage 'nope'" in " ".join(capsys.readouterr().err.split())
    assert main(["demo", "--fast", "--out", str(tmp_path / "b"), "--only", "eval"]) == 2
    assert "needs 'pretrain'" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "b" / "data").exists()
    # `janus` names the Janus part's four stages
    assert main(["demo", "--fast", "--out", str(tmp_path / "c"), "--only", "janus_eval"]) == 2
    assert "needs 'janus_train'" in " ".join(capsys.readouterr().err.split())
    assert main(["demo", "--fast", "--out", str(tmp_path / "d"), "--skip", "janus,nope"]) == 2
    assert "unknown stage 'nope'" in " ".join(capsys.readouterr().err.split())


def test_user_errors_exit_2_with_one_line(capsys):
    assert main(["params", "--preset", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'nope'" in err and "Traceback" not in err


def test_missing_model_dir_is_a_clear_error(tmp_path, capsys):
    assert main(["params", "--model", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("params", "cost", "demo"):
        assert cmd in out


def test_only_nanoseeks_own_value_errors_are_one_line_user_errors(monkeypatch, capsys):
    import torch

    from nanoseek import cli

    def torch_bug(args):  # a ValueError raised inside torch: a bug to report, not bad input
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=-1.0)

    monkeypatch.setattr(cli, "cmd_params", torch_bug)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        cli.main(["params", "--preset", "tiny"])
    monkeypatch.undo()  # nanoseek's own check of the input: one line, exit code 2
    assert cli.main(["params", "--preset", "huge"]) == 2
    assert "error: unknown preset 'huge'" in " ".join(capsys.readouterr().err.split())


def test_overrides_may_follow_options(tmp_path, capsys):
    """`experiment NAME --out DIR key=value` reaches the experiment's config (argparse alone refuses the override
    there), so a misspelt key is the config's error; an unknown option is still argparse's."""
    assert main(["experiment", "janus-cfg", "--out", str(tmp_path / "c"), "wieghts=[1]"]) == 2
    assert "unknown janus experiment key" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["experiment", "mtp", "--out", str(tmp_path / "m"), "--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert not (tmp_path / "c").exists() and not (tmp_path / "m").exists()
