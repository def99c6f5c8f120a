"""The `nanoseek` command end to end (in-process)."""

import pytest

from nanoseek import load
from nanoseek.cli import main


def test_demo_fast_runs_every_stage_and_resumes(tmp_path, capsys):
    assert main(["demo", "--fast", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "nanoseek chat --model" in out
    report = (tmp_path / "report" / "report.md").read_text()
    for section in ("## Environment", "## The model", "## Pretraining", "## GRPO", "## Held-out accuracy",
                    "## The same recipe at DeepSeek-V3 scale"):
        assert section in report
    for name in ("base", "rl", "student"):
        assert load(tmp_path / "models" / name) is not None
    assert (tmp_path / "report" / "accuracy.png").exists()
    state = (tmp_path / "demo_state.json").read_text()
    assert main(["demo", "--fast", "--out", str(tmp_path)]) == 0  # finished stages are skipped
    assert "skipped" in capsys.readouterr().out
    assert (tmp_path / "demo_state.json").read_text() == state


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
