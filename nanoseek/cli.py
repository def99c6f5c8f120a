"""The `nanoseek` command: parses arguments and calls one library function per subcommand."""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console


def _model_source(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--preset", help="a named preset (tiny, small, deepseek-v2-lite, deepseek-v2, deepseek-v3)")
    g.add_argument("--model", help="an HF-format model directory (config.json + safetensors)")


def cmd_params(args: argparse.Namespace) -> int:
    from . import accounting

    report = accounting.params_report(preset=args.preset, model_dir=args.model)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        accounting.print_params_report(report, Console())
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    from . import accounting

    report = accounting.cost_report(preset=args.preset, model_dir=args.model, tokens=args.tokens, gpu=args.gpu,
                                    gpu_hour_price=args.gpu_hour_price, mfu=args.mfu,
                                    gpu_hours_per_trillion=args.gpu_hours_per_trillion,
                                    extra_gpu_hours=args.extra_gpu_hours, seq_len=args.seq_len)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        accounting.print_cost_report(report, Console())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(out=args.out, fast=args.fast)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="nanoseek", description="DeepSeek's LLM system, compact and hackable.")
    p.add_argument("--version", action="version", version=f"nanoseek {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sp = sub.add_parser("params", help="parameter, KV-cache and FLOP accounting (on the meta device)")
    _model_source(sp)
    sp.add_argument("--json", action="store_true", help="print JSON instead of tables")
    sp.set_defaults(func=cmd_params)

    sp = sub.add_parser("cost", help="training cost in GPU-hours and dollars")
    _model_source(sp)
    sp.add_argument("--tokens", type=float, required=True, help="training tokens, e.g. 14.8e12")
    sp.add_argument("--gpu", default="h800", help="GPU type (h800, h100, a100, h200)")
    sp.add_argument("--gpu-hour-price", type=float, default=2.0, help="dollars per GPU-hour (default 2)")
    sp.add_argument("--mfu", type=float, default=None, help="model FLOPs utilisation (0-1) to estimate time from")
    sp.add_argument("--gpu-hours-per-trillion", type=float, default=None,
                    help="measured rate instead of an MFU (the V3 report: 180000)")
    sp.add_argument("--extra-gpu-hours", type=float, action="append", default=[],
                    help="extra GPU-hours to add, e.g. context extension 119e3, post-training 5e3 (repeatable)")
    sp.add_argument("--seq-len", type=int, default=4096, help="sequence length for attention FLOPs (default 4096)")
    sp.add_argument("--json", action="store_true", help="print JSON instead of tables")
    sp.set_defaults(func=cmd_cost)

    sp = sub.add_parser("demo", help="the whole recipe on a CPU, ending in a report card")
    sp.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    sp.add_argument("--fast", action="store_true", help="toy sizes, finishes in seconds")
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
