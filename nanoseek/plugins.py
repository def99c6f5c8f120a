"""User code named on the command line: `module:name` or `path/to/file.py:name`, as reward functions
(`--reward my_rewards:brevity`) and tasks (`--task my_tasks:poetry`) are given. One import rule for both, so a
plugin that works as a reward works the same way as a task."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any


def import_object(spec: str, what: str) -> Any:
    """The attribute `name` of the module `spec` = `module:name` names (found like `python -m`, the current directory
    first) or of the file `spec` = `path/file.py:name`; None when the module has no such attribute. `what` ("reward",
    "task") words the error for a module that cannot be imported."""
    mod_name, attr = spec.rsplit(":", 1)
    try:
        if mod_name.endswith(".py"):
            p = Path(mod_name)
            if not p.exists():
                raise FileNotFoundError(f"{what} file {p} does not exist")
            module_spec = importlib.util.spec_from_file_location(f"nanoseek_{what}_{p.stem}", p)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if "" not in sys.path:
                sys.path.insert(0, "")  # `--reward my_module:fn` from the current directory, like python -m
            module = importlib.import_module(mod_name)
    except (ImportError, FileNotFoundError, SyntaxError) as e:
        raise ValueError(f"cannot import {what} module {mod_name!r}: {e}") from e
    return getattr(module, attr, None)
