"""Small file helpers shared by every stage: atomic writes, append-only JSONL logs, the resume check.

  atomic_path(path)           a temporary path next to `path`, renamed over it only when the block succeeds
                              (for libraries that write files themselves: safetensors, torch.save)
  atomic_dir(path)            the same for a directory (a checkpoint, prepared data, a published model)
  atomic_write(path, data)    str / bytes; atomic_write_json, atomic_write_jsonl
  append_jsonl(path, rows)    one write per call, so a crash leaves at most a torn last line
  read_jsonl(path)            every whole record; a torn last line is dropped (and cut off with repair=True)
  check_resume(config, now)   refuse to continue a run directory made with other settings

Atomic means: a reader (or a resumed run) sees either the old file or the new one, never a half-written one, even
after a crash or a kill -9 mid-write (POSIX rename is atomic within one file system, hence the temporary file in the
same directory).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's entries to disk; best-effort where the platform cannot (Windows opens no
    directories and fsyncs no read-only descriptors)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sibling(path: Path, kind: str) -> Path:
    # a unique hidden name in the same directory (the rename must not cross file systems); not mkstemp/mkdtemp,
    # which create mode 0600/0700 entries: the final file or directory gets the usual umask permissions
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.{kind}")


@contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yields a temporary path in `path`'s directory; write the file there. When the block exits normally the
    file is fsynced and renamed over `path` (os.replace); when it raises, the temporary file is removed and `path`
    is untouched. fsync before the rename, or after a power loss the new name can point to data that never reached
    the disk; fsync of the directory after it, so that the rename itself is durable."""
    path = Path(path)
    tmp = _sibling(path, "tmp")  # the library creates it
    try:
        yield tmp
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync(path.parent)


@contextmanager
def atomic_dir(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yields a new empty directory next to `path`; fill it. When the block exits normally its files are fsynced
    and it replaces `path`: an existing directory is renamed aside, the new one renamed in, the old one deleted (a
    directory cannot be renamed over a non-empty one; if the second rename fails the old one is put back). When the
    block raises, the new directory is deleted and `path` is untouched. Between the two renames `path` is briefly
    absent, never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        if fsync:
            for f in sorted(tmp.rglob("*")):
                _fsync(f)
            _fsync(tmp)
        if path.exists():
            old = _sibling(path, "old")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if fsync:
        _fsync(path.parent)


def atomic_write(path: str | os.PathLike, data: str | bytes, *, encoding: str = "utf-8") -> Path:
    """Write `data` to `path` atomically (see atomic_path). Returns the path."""
    raw = data.encode(encoding) if isinstance(data, str) else data
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(raw)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, **json_kwargs: Any) -> Path:
    """json.dumps(obj, **json_kwargs) + a newline, written atomically; indent defaults to 1. The object is
    serialised before anything is written, so a payload that fails to serialise leaves the old file as it was."""
    json_kwargs.setdefault("indent", 1)
    return atomic_write(path, json.dumps(obj, **json_kwargs) + "\n")


def _line(row: Mapping[str, Any]) -> str:
    # ensure_ascii=False: prompts and answers in Chinese or Japanese stay readable in the file (UTF-8)
    return json.dumps(row, ensure_ascii=False) + "\n"


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """One JSON object per line, written atomically; `rows` is streamed (a generator of any length is fine) and a
    row that fails to serialise leaves the old file as it was."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(_line(r))
    return Path(path)


def append_jsonl(path: str | os.PathLike, rows: Mapping[str, Any] | Iterable[Mapping[str, Any]], *,
                 fsync: bool = False) -> None:
    """Append one record (a mapping) or several to a JSONL log: serialised first, then one write and a flush, so
    a crash leaves at most a torn last line (read_jsonl drops it) and never a record split across lines.
    fsync=True also survives a power loss: for logs whose records cost money or time to redo (answers of a paid
    API, teacher samples); a per-step metrics log does not need it."""
    rows = [rows] if isinstance(rows, Mapping) else rows
    data = "".join(_line(r) for r in rows).encode("utf-8")
    if not data:
        return
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike, *, repair: bool = False) -> list[Any]:
    """The records of a JSONL file ([] when it does not exist); blank lines are skipped.

    A last line that is not valid JSON is what a crash mid-append leaves: it is dropped with a warning, and with
    `repair` cut off the file (and a missing final newline added), so the next append starts on a line of its own.
    Call with repair=True before appending to a log. Any other bad line is corruption, not a crash, and raises
    ValueError naming the line (rather than silently dropping it and every record after it)."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_bytes().splitlines(keepends=True)
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records, good, ends_with_newline = [], 0, True
    for i, line in enumerate(lines):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as e:
                if i != last:
                    raise ValueError(f"{path}, line {i + 1}: not a JSON record ({e}); only a torn last line (a "
                                     "crash mid-write) is tolerated") from e
                log.warning("%s: dropped a torn last line (%d bytes, a write cut by a crash)", path, len(line))
                break
        good += len(line)
        ends_with_newline = line.endswith((b"\n", b"\r"))
    if repair:
        if good < path.stat().st_size:
            with path.open("r+b") as f:
                f.truncate(good)
        if not ends_with_newline:  # a whole last record whose newline was not written yet
            with path.open("ab") as f:
                f.write(b"\n")
    return records


def check_resume(config_file: str | os.PathLike, current: Mapping[str, Any], keys: Sequence[str], *,
                 what: str = "a run", error: type[Exception] = ValueError,
                 hint: str = "pass --overwrite to start over or choose another --out") -> None:
    """Refuse to continue a run directory whose saved settings (`config_file`, JSON) differ from `current` in any
    of `keys`: results made with other settings must not be mixed into one log. The error names every differing
    key with its old and new value. No saved config (a new directory): nothing to check."""
    config_file = Path(config_file)
    if not config_file.exists():
        return
    try:
        saved = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise error(f"{config_file} is not readable JSON ({e}); {hint}") from e
    now = json.loads(json.dumps({k: current.get(k) for k in keys}))  # tuples -> lists, as the saved copy has them
    diff = [k for k in keys if saved.get(k) != now[k]]
    if diff:
        changes = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in diff)
        raise error(f"{config_file.parent} holds {what} made with other settings ({changes}); {hint}")
