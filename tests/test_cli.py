"""The `nanoseek` command end to end (in-process)."""

import pytest

from nanoseek import load
from nanoseek.cli import main


def test_demo_fast_smoke_writes_a_loadable_model(tmp_path, capsys):
    assert main(["demo", "--fast", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "greedy decode" in out and "KV cache per token" in out
    model = load(tmp_path / "tiny-random")
    assert model.config.num_hidden_layers == 2


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
