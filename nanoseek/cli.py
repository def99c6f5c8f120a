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


def cmd_train(args: argparse.Namespace) -> int:
    from .train import NonFiniteLoss, TrainConfig, train

    cfg = TrainConfig.from_sources(args.config, args.overrides, preset=args.preset, out=args.out,
                                   resume=True if args.resume else None, fsdp=True if args.fsdp else None)
    try:
        summary = train(cfg)
    except NonFiniteLoss as e:
        Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False)
        return 3
    Console().print(f"training {summary['status']} at step {summary['step']}; checkpoints, metrics.jsonl and "
                    f"loss.png in [bold]{summary['out']}[/]")
    return 0


def cmd_rl(args: argparse.Namespace) -> int:
    from .rl import RLConfig, rl
    from .train import _parse_value

    values: dict = {"model": args.model, "task": args.task, "out": args.out, "rewards": args.reward or []}
    for name in ("steps", "group_size", "batch_prompts", "loss", "beta"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    for item in args.overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        k, v = item.split("=", 1)
        values[k.strip()] = _parse_value(v.strip())
    known = set(RLConfig.__dataclass_fields__)
    unknown = [k for k in values if k not in known]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], known, 1)
        raise ValueError(f"unknown RL config key {unknown[0]!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    summary = rl(RLConfig(**values))
    Console().print(f"RL finished at step {summary['steps']}; final model: [bold]{summary['final_model']}[/]")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval import EvalConfig, evaluate, summary_markdown

    s = evaluate(EvalConfig(task=args.task, model=args.model, url=args.url, served_model=args.served_model,
                            api_key=args.api_key, k=args.k, n=args.n, temperature=args.temperature,
                            top_p=args.top_p, max_tokens=args.max_tokens, prompt_format=args.prompt_format,
                            out=args.out))
    print(summary_markdown(s))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(out=args.out, fast=args.fast, fresh=args.fresh)


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from .tokenizer import train_tokenizer

    tok = train_tokenizer(args.input, args.vocab_size, args.out, min_frequency=args.min_frequency)
    short = f" (of {args.vocab_size} requested: no pair left with count >= {args.min_frequency})" \
        if tok.vocab_size < args.vocab_size else ""
    Console().print(f"trained a {tok.vocab_size}-token byte-level BPE{short}, bos {tok.bos_id}, eos {tok.eos_id}, "
                    f"pad {tok.pad_id} -> [bold]{args.out}[/]")
    return 0


def cmd_tokenizer_stats(args: argparse.Namespace) -> int:
    from .tokenizer import print_stats, tokenizer_stats

    rows = tokenizer_stats(args.tokenizer, args.input)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_stats(rows, Console(), title=f"tokenizer {args.tokenizer}")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from .data import prepare

    m = prepare(args.input, args.tokenizer, args.out, workers=args.workers, sft=args.sft, all_turns=args.all_turns,
                txt_split=args.txt_split, shard_tokens=args.shard_tokens, overwrite=args.overwrite)
    Console().print(f"{m['num_documents']:,} documents, {m['total_tokens']:,} tokens ({m['dtype']}, "
                    f"{len(m['shards'])} shard(s){', with loss masks' if m['sft'] else ''}) -> [bold]{args.out}[/]")
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from .synthetic import synth

    path = synth(args.task, args.n, args.split, args.seed, args.out, args.format)
    Console().print(f"{args.n} {args.task} items ({args.split}, seed {args.seed}, {args.format}) -> [bold]{path}[/]")
    return 0


def _add_tokenizer_and_data_commands(sub: argparse._SubParsersAction) -> None:
    tp = sub.add_parser("tokenizer", help="train a byte-level BPE with DeepSeek's special tokens; token statistics")
    tsub = tp.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
    sp = tsub.add_parser("train", help="train on text files and save an HF tokenizer directory")
    sp.add_argument("--input", nargs="+", required=True, help=".txt (paragraphs), .jsonl (text/messages), .parquet")
    sp.add_argument("--vocab-size", type=int, required=True, help="vocabulary size incl. special tokens and bytes")
    sp.add_argument("--out", required=True, help="output directory (may be a model directory)")
    sp.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge (default 2)")
    sp.set_defaults(func=cmd_tokenizer_train)
    sp = tsub.add_parser("stats", help="characters and bytes per token, per file")
    sp.add_argument("--tokenizer", required=True, help="an HF tokenizer directory")
    sp.add_argument("--input", nargs="+", required=True, help="text files to measure")
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sp.set_defaults(func=cmd_tokenizer_stats)

    dp = sub.add_parser("data", help="tokenize corpora into shards; synthetic reasoning tasks")
    dsub = dp.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    sp = dsub.add_parser("prepare", help="tokenize files into token shards + manifest.json")
    sp.add_argument("--input", nargs="+", required=True, help=".txt (paragraphs), .jsonl (text/messages), .parquet")
    sp.add_argument("--tokenizer", required=True, help="an HF tokenizer directory")
    sp.add_argument("--out", required=True, help="output directory")
    sp.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    sp.add_argument("--sft", action="store_true", help="chat data: write loss masks (final assistant turn)")
    sp.add_argument("--all-turns", action="store_true", help="with --sft, also train earlier assistant answers")
    sp.add_argument("--txt-split", choices=("paragraph", "file"), default="paragraph",
                    help="a .txt document is a blank-line-separated paragraph (default) or the whole file")
    sp.add_argument("--shard-tokens", type=int, default=2**26, help="tokens per shard (default 2^26)")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    sp.set_defaults(func=cmd_data_prepare)
    sp = dsub.add_parser("synth", help="synthetic arithmetic / countdown problems with reasoning, as JSONL")
    sp.add_argument("--task", choices=("arithmetic", "countdown"), required=True)
    sp.add_argument("--n", type=int, required=True, help="number of items")
    sp.add_argument("--split", choices=("train", "test"), default="train")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--out", required=True, help="output .jsonl file")
    sp.add_argument("--format", choices=("item", "text", "chat"), default="item",
                    help="raw items (default; for RL/eval), {text} for pretraining, {messages} for SFT")
    sp.set_defaults(func=cmd_data_synth)


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

    sp = sub.add_parser("train", help="pretrain or SFT (runs under torchrun for DDP/FSDP2)",
                        description="Config from a TOML file and/or key=value overrides (model.KEY=... for model "
                                    "config keys), e.g. `nanoseek train --preset small data=runs/data max_steps=500`.")
    sp.add_argument("--config", help="a TOML file of TrainConfig fields ([model] table: model config overrides)")
    sp.add_argument("--preset", help="model preset (same as preset=...)")
    sp.add_argument("--out", help="run directory (same as out=...)")
    sp.add_argument("--resume", action="store_true", help="continue from OUT/latest")
    sp.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (under torchrun)")
    sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="TrainConfig overrides")
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser("rl", help="GRPO reasoning RL (R1-Zero recipe) with rule-based or plugin rewards")
    sp.add_argument("--model", required=True, help="model directory (with tokenizer files)")
    sp.add_argument("--task", default="arithmetic", help="arithmetic | countdown | FILE.jsonl (prompt, answer)")
    sp.add_argument("--reward", action="append", help="extra reward module:fn[=weight] (repeatable)")
    sp.add_argument("--steps", type=int)
    sp.add_argument("--group-size", dest="group_size", type=int, help="G samples per prompt")
    sp.add_argument("--batch-prompts", dest="batch_prompts", type=int, help="P prompts per step")
    sp.add_argument("--loss", choices=["grpo", "dr_grpo", "dapo"])
    sp.add_argument("--beta", type=float, help="KL coefficient (R1: 0.001; 0 = no reference model)")
    sp.add_argument("--out", default="runs/rl")
    sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="any RLConfig field (see docs/rl.md)")
    sp.set_defaults(func=cmd_rl)

    sp = sub.add_parser("eval", help="pass@1 / pass@k / cons@k / greedy accuracy with confidence intervals")
    src = sp.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a local model directory")
    src.add_argument("--url", help="an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    sp.add_argument("--served-model", help="model name at --url")
    sp.add_argument("--api-key", default=None)
    sp.add_argument("--task", default="arithmetic", help="arithmetic | countdown | FILE.jsonl (prompt, answer)")
    sp.add_argument("--k", type=int, default=8, help="samples per item (default 8)")
    sp.add_argument("--n", type=int, default=200, help="held-out items (default 200)")
    sp.add_argument("--temperature", type=float, default=0.6)
    sp.add_argument("--top-p", type=float, default=0.95)
    sp.add_argument("--max-tokens", type=int, default=256)
    sp.add_argument("--prompt-format", choices=["chat", "r1_zero"], default="chat")
    sp.add_argument("--out", default=None, help="directory for items.jsonl, summary.json and summary.md")
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("demo", help="the whole recipe on a CPU, ending in a report card")
    sp.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    sp.add_argument("--fast", action="store_true", help="toy sizes, finishes in about a minute")
    sp.add_argument("--fresh", action="store_true", help="start over instead of resuming finished stages")
    sp.set_defaults(func=cmd_demo)
    _add_tokenizer_and_data_commands(sub)
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
