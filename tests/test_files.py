"""nanoseek.files: atomic writes leave the old file whole when the write fails, JSONL logs survive a torn last
line, and the resume check names what changed."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanoseek.files import (
    append_jsonl,
    atomic_dir,
    atomic_path,
    atomic_write,
    atomic_write_json,
    atomic_write_jsonl,
    check_resume,
    read_jsonl,
)
from nanoseek.metrics import truncate_jsonl


def _no_leftovers(d: Path, *keep: str) -> bool:
    return sorted(p.name for p in d.iterdir()) == sorted(keep)


# ---------------------------------------------------------------------------------------------------------------
# atomic writes


def test_atomic_write_text_bytes_and_json(tmp_path):
    p = tmp_path / "a.txt"
    assert atomic_write(p, "héllo\n") == p and p.read_text(encoding="utf-8") == "héllo\n"
    atomic_write(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    j = tmp_path / "c.json"
    atomic_write_json(j, {"b": "中文", "a": [1, 2]}, ensure_ascii=False)
    assert j.read_text(encoding="utf-8") == '{\n "b": "中文",\n "a": [\n  1,\n  2\n ]\n}\n'  # indent 1 + newline
    assert _no_leftovers(tmp_path, "a.txt", "c.json")


def test_a_failed_write_leaves_the_old_file_intact(tmp_path):
    p = tmp_path / "state.json"
    atomic_write_json(p, {"step": 1})
    with pytest.raises(TypeError):
        atomic_write_json(p, {"step": 2, "bad": object()})  # raises during serialisation
    assert json.loads(p.read_text()) == {"step": 1}

    def rows():
        yield {"i": 0}
        raise RuntimeError("killed mid-write")

    log = tmp_path / "items.jsonl"
    atomic_write_jsonl(log, [{"i": 9}])
    with pytest.raises(RuntimeError, match="mid-write"):
        atomic_write_jsonl(log, rows())  # the first row already reached the temporary file
    assert read_jsonl(log) == [{"i": 9}]
    assert _no_leftovers(tmp_path, "state.json", "items.jsonl")


def test_atomic_path_for_libraries_that_write_files_themselves(tmp_path):
    p = tmp_path / "w.safetensors"
    with atomic_path(p) as tmp:
        assert tmp.parent == p.parent and not tmp.exists()
        save_file({"x": torch.ones(2)}, str(tmp))
        assert not p.exists()  # nothing at the final name before the block succeeds
    assert load_file(str(p))["x"].tolist() == [1.0, 1.0]
    with pytest.raises(KeyboardInterrupt), atomic_path(p) as tmp:
        save_file({"x": torch.zeros(3)}, str(tmp))
        raise KeyboardInterrupt  # a kill after the library wrote: the old file stays
    assert load_file(str(p))["x"].tolist() == [1.0, 1.0]
    assert _no_leftovers(tmp_path, "w.safetensors")


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    d = tmp_path / "ckpt"
    with atomic_dir(d) as tmp:
        (tmp / "a").write_text("1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b").write_text("2")
    assert (d / "sub" / "b").read_text() == "2"
    with pytest.raises(OSError), atomic_dir(d) as tmp:
        (tmp / "a").write_text("new")
        raise OSError("disk full")
    assert (d / "a").read_text() == "1" and (d / "sub" / "b").exists()
    with atomic_dir(d) as tmp:  # an existing directory is replaced, not merged
        (tmp / "c").write_text("3")
    assert sorted(p.name for p in d.iterdir()) == ["c"]
    assert _no_leftovers(tmp_path, "ckpt")


# ---------------------------------------------------------------------------------------------------------------
# JSONL logs


def test_append_and_read_jsonl(tmp_path):
    p = tmp_path / "log.jsonl"
    assert read_jsonl(p) == []  # no log yet
    append_jsonl(p, {"id": 1, "text": "天安门"})
    append_jsonl(p, [{"id": 2}, {"id": 3}], fsync=True)
    append_jsonl(p, [])
    assert "天安门" in p.read_text(encoding="utf-8")  # readable, not \\u-escaped
    with p.open("a") as f:
        f.write("\n  \n")  # blank lines are skipped
    assert [r["id"] for r in read_jsonl(p)] == [1, 2, 3]


def test_torn_last_line_is_dropped_and_repaired(tmp_path, caplog):
    p = tmp_path / "answers.jsonl"
    append_jsonl(p, [{"id": 1}, {"id": 2}])
    whole = p.read_bytes()
    with p.open("a") as f:
        f.write('{"id": 3, "answer": "cut by a ki')  # kill -9 mid-append
    with caplog.at_level(logging.WARNING, logger="nanoseek.files"):
        assert read_jsonl(p) == [{"id": 1}, {"id": 2}]
    assert "torn last line" in caplog.text
    assert p.read_bytes() != whole  # reading alone does not modify the file
    assert read_jsonl(p, repair=True) == [{"id": 1}, {"id": 2}]
    assert p.read_bytes() == whole  # cut back to the last whole record
    append_jsonl(p, {"id": 3})  # the resumed run appends on a line of its own
    assert [r["id"] for r in read_jsonl(p)] == [1, 2, 3]


def test_whole_last_record_without_newline_is_kept(tmp_path):
    p = tmp_path / "log.jsonl"
    p.write_text('{"id": 1}\n{"id": 2}')  # the write stopped just before its newline
    assert read_jsonl(p, repair=True) == [{"id": 1}, {"id": 2}]
    append_jsonl(p, {"id": 3})
    assert read_jsonl(p) == [{"id": 1}, {"id": 2}, {"id": 3}]


def test_a_bad_line_before_the_last_is_an_error_not_a_silent_truncation(tmp_path):
    p = tmp_path / "log.jsonl"
    p.write_text('{"id": 1}\n{"id": 2, "oops\n{"id": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(p, repair=True)
    assert p.read_text().count("\n") == 3  # nothing was cut


def test_truncate_jsonl_survives_a_torn_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    append_jsonl(p, [{"step": s} for s in range(1, 6)])
    with p.open("a") as f:
        f.write('{"step": 6, "lo')
    truncate_jsonl(p, 3)  # resuming from step 3 after a kill (this crashed on the torn line before)
    assert read_jsonl(p) == [{"step": 1}, {"step": 2}, {"step": 3}]


# ---------------------------------------------------------------------------------------------------------------
# the resume check


def test_check_resume(tmp_path):
    cfg = tmp_path / "config.json"
    keys = ("model", "temperature", "langs")
    check_resume(cfg, {"model": "m"}, keys)  # a new directory: nothing to compare
    atomic_write_json(cfg, {"model": "m", "temperature": 0.6, "langs": ["en", "zh"], "progress": True})
    check_resume(cfg, {"model": "m", "temperature": 0.6, "langs": ("en", "zh"), "progress": False}, keys)
    with pytest.raises(ValueError, match=r"other settings \(model: 'm' -> 'n', temperature: 0.6 -> 1.0\); pass "
                                         "--overwrite") as info:
        check_resume(cfg, {"model": "n", "temperature": 1.0, "langs": ["en", "zh"]}, keys, what="an audit")
    assert str(info.value).startswith(f"{tmp_path} holds an audit made with other settings")

    class MyError(ValueError):
        pass

    with pytest.raises(MyError, match="langs"):
        check_resume(cfg, {"model": "m", "temperature": 0.6, "langs": ["en"]}, keys, error=MyError)
    cfg.write_text('{"model": "m", "tempera')  # a config torn by a crash (before it was written atomically)
    with pytest.raises(MyError, match="not readable JSON"):
        check_resume(cfg, {"model": "m"}, keys, error=MyError)
