"""`nanoseek demo`: until the full recipe lands (issue "Evaluation, report card, and nanoseek demo"), a smoke run:
build the `small` preset, print its parameter table, save it as an HF directory, reload it and generate."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console

from . import accounting
from .infer import generate
from .model import build
from .weights import load


def run_demo(out: str = "runs/demo", fast: bool = False) -> int:
    console = Console()
    preset = "tiny" if fast else "small"
    console.rule(f"nanoseek demo (smoke): the `{preset}` preset")
    accounting.print_params_report(accounting.params_report(preset=preset), console)
    torch.manual_seed(0)
    model = build(preset)
    path = model.save_pretrained(Path(out) / f"{preset}-random")
    model = load(path).eval()
    t0 = time.perf_counter()
    ids = generate(model, [model.config.bos_token_id or 0], 32, temperature=0.0)
    dt = time.perf_counter() - t0
    console.print(f"saved an untrained `{preset}` model to [bold]{path}[/] (HF format; "
                  "transformers' AutoModelForCausalLM loads it)")
    console.print(f"greedy decode through the absorbed-MLA cache: {len(ids)} tokens in {dt:.2f}s "
                  f"({len(ids) / dt:.0f} tok/s): {ids[:16]}...")
    console.print("(untrained weights: the tokens are noise. The full recipe is what `make demo` will run.)")
    return 0
