"""The `nanoseek` command: parses arguments and calls one library function per subcommand."""

from __future__ import annotations

import argparse
import json
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console


def _model_source(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--preset", help="a named preset (tiny, small, deepseek-v2-lite, deepseek-v2, deepseek-v3, "
                                    "deepseek-llm-7b; params also janus-pro-1b, janus-pro-7b)")
    g.add_argument("--model", help="an HF-format model directory or Hub id (only its config.json is read)")
    _revision_arg(p)


# Model arguments (--model, --teacher, --student) take a local directory or a Hugging Face Hub id; main()
# resolves them to a local directory once (nanoseek.hub), so the stages only ever see directories.
MODEL_ARGS = ("model", "teacher", "student")
HUB_NOTE = " or Hub id (owner/name)"


def _task_help(what: str) -> str:
    """The --task / --prompts help: the registry's built-in names, a JSONL file or a plugin (nanoseek.tasks)."""
    from .tasks import task_names

    return f"{' | '.join(task_names())} | FILE.jsonl ({what}) | plugin module:name (docs/rl.md#tasks)"


def _revision_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--revision", default=None,
                   help="with a Hub id: the branch, tag or commit to use (default: main); applies to every Hub id")


def _resolve_models(args: argparse.Namespace) -> None:
    if not hasattr(args, "revision"):  # commands whose --model is not a model to load (audit: a served name)
        return
    from .hub import resolve_model_dir

    weights = args.func not in (cmd_params, cmd_cost)  # accounting reads config.json only
    for name in MODEL_ARGS:
        value = getattr(args, name, None)
        if value:
            setattr(args, name, str(resolve_model_dir(value, args.revision, flag=f"--{name}", weights=weights)))


# --device / --dtype of every command that loads a model. The strings travel in the stage's config dataclass and
# are resolved by nanoseek.device (not imported here: `nanoseek --help` should not wait for torch). Bad values fail
# there as ValueError, i.e. one "error:" line from main().
DEVICE_HELP = "where the model runs: cpu | cuda | cuda:N | mps (default: cuda if available, else cpu)"
TRAIN_DTYPE_HELP = "autocast precision over fp32 weights: auto (bf16 on CUDA, fp32 on a CPU) | fp32 | bf16"
AMX_NOTE = "; auto is also bf16 on AMX CPUs from hidden size 512 (measured: docs/training.md)"
INFER_DTYPE_HELP = ("weights and KV cache: auto (bf16 on CUDA, fp32 on a CPU) | float32 | bfloat16 | float16 "
                    "(aliases fp32, bf16, fp16)")
INT8_HELP = ("weight-only int8 linear layers, experts and head (CPU only; pair it with --dtype bfloat16: the int8 "
             "matmul is vectorised for bf16 activations; docs/inference.md)")


def _device_args(p: argparse.ArgumentParser, dtype_help: str, dtype_default: str | None = "auto") -> None:
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument("--dtype", default=dtype_default, help=dtype_help)


def _show(report: dict, printer: Callable[[dict, Console], None], as_json: bool) -> int:
    """A report as JSON on stdout (--json) or as rich tables."""
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        printer(report, Console())
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    from . import accounting
    from .janus import JANUS_PRESETS

    if args.preset in JANUS_PRESETS:
        return _show(accounting.janus_params_report(args.preset), accounting.print_janus_report, args.json)
    cfg_file = Path(args.model or "") / "config.json"
    if args.model and cfg_file.is_file() and json.loads(cfg_file.read_text()).get("model_type") in (
            "janus", "multi_modality"):
        return _show(accounting.janus_params_report(model_dir=args.model), accounting.print_janus_report, args.json)
    report = accounting.params_report(preset=args.preset, model_dir=args.model)
    return _show(report, accounting.print_params_report, args.json)


def cmd_cost(args: argparse.Namespace) -> int:
    from . import accounting

    report = accounting.cost_report(preset=args.preset, model_dir=args.model, tokens=args.tokens, gpu=args.gpu,
                                    gpu_hour_price=args.gpu_hour_price, mfu=args.mfu,
                                    gpu_hours_per_trillion=args.gpu_hours_per_trillion,
                                    extra_gpu_hours=args.extra_gpu_hours, seq_len=args.seq_len)
    return _show(report, accounting.print_cost_report, args.json)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    cfg = TrainConfig.from_sources(args.config, args.overrides, preset=args.preset, out=args.out,
                                   resume=True if args.resume else None, fsdp=True if args.fsdp else None,
                                   device=args.device, dtype=args.dtype)
    return _training(train, cfg, lambda s: f"training {s['status']} at step {s['step']}; checkpoints, "
                     f"metrics.jsonl and loss.png in [bold]{s['out']}[/]")


def _training(run: Callable[[Any], dict], cfg: object, done: Callable[[dict], str]) -> int:
    """A training command's ending: the summary line, or exit 3 with one error line when the loss went non-finite."""
    from .train import NonFiniteLoss

    try:
        summary = run(cfg)
    except NonFiniteLoss as e:
        Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False)
        return 3
    Console().print(done(summary))
    return 0


def cmd_rl(args: argparse.Namespace) -> int:
    from .rl import RLConfig, rl
    from .train import check_keys, parse_overrides

    values: dict = {"model": args.model, "task": args.task, "out": args.out, "rewards": args.reward or []}
    for name in ("steps", "group_size", "batch_prompts", "loss", "beta", "device", "dtype"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    values.update(parse_overrides(args.overrides))
    check_keys(values, set(RLConfig.__dataclass_fields__), "RL config key")
    summary = rl(RLConfig(**values))
    Console().print(f"RL finished at step {summary['steps']}; final model: [bold]{summary['final_model']}[/]")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval import EvalConfig, evaluate, summary_markdown
    from .janus_eval import TASKS as JANUS_TASKS
    from .train import parse_overrides

    if args.task in JANUS_TASKS:  # a Janus on the shapes world: images out (geneval) or answers (vqa)
        from .janus_eval import JanusEvalConfig, run_janus_eval

        if args.model is None:
            raise ValueError(f"--task {args.task} evaluates a local Janus directory: give --model DIR")
        if args.task == "shapes-vqa" and args.temperature is not None:
            raise ValueError("--task shapes-vqa answers greedily: --temperature does not apply")
        run_janus_eval(JanusEvalConfig(task=args.task, model=args.model, out=args.out, n=args.n,
                                       cfg_weight=args.cfg, world=args.world, split=args.split, device=args.device,
                                       temperature=1.0 if args.temperature is None else args.temperature,
                                       dtype="float32" if args.dtype == "auto" else args.dtype))
        return 0
    s = evaluate(EvalConfig(task=args.task, model=args.model, url=args.url, served_model=args.served_model,
                            api_key=args.api_key, k=args.k, n=args.n or 200,
                            temperature=0.6 if args.temperature is None else args.temperature,
                            top_p=args.top_p, max_tokens=args.max_tokens, prompt_format=args.prompt_format,
                            out=args.out, device=args.device, dtype=args.dtype, max_batch=args.max_batch,
                            task_options=parse_overrides(args.task_option) or None))
    print(summary_markdown(s))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import run_generate

    if args.image is not None:  # Janus: a question about an image
        from .imagine import run_understand

        if args.prompt is None:
            raise ValueError("--image needs --prompt (the question about the image)")
        return run_understand(args.model, args.image, args.prompt, max_tokens=args.max_tokens,
                              temperature=args.temperature or 0.0, seed=args.seed, device=args.device,
                              dtype=args.dtype)

    ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()] if args.prompt_ids else None
    return run_generate(args.model, args.prompt, ids, max_tokens=args.max_tokens, temperature=args.temperature,
                        top_p=args.top_p, seed=args.seed, speculative=args.draft_tokens if args.speculative else 0,
                        chat=args.chat, ignore_eos=args.ignore_eos, compile=args.compile, dtype=args.dtype,
                        device=args.device, int8=args.int8)


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_gguf

    out = export_gguf(args.model, args.out, file_type=args.type, tokenizer_dir=args.tokenizer)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.type})")
    return 0


def cmd_imagine(args: argparse.Namespace) -> int:
    from .imagine import run_imagine

    run_imagine(args.model, args.prompt, args.out, n=args.n, cfg_weight=args.cfg, temperature=args.temperature,
                seed=args.seed, device=args.device, dtype=args.dtype, compile=args.compile)
    return 0


def cmd_janus_train(args: argparse.Namespace) -> int:
    from .janus_train import JanusTrainConfig, train_janus

    cfg = JanusTrainConfig.from_sources(args.config, args.overrides, data=args.data, vq=args.vq, out=args.out,
                                        resume=True if args.resume else None, device=args.device, dtype=args.dtype)
    return _training(train_janus, cfg, lambda s: f"mini Janus {s['status']} at step {s['step']}; model: "
                     f"[bold]{s['model']}[/] (nanoseek imagine / eval --task shapes-geneval / serve)")


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .experiment import parse_stage_list

    return run_demo(out=args.out, fast=args.fast, fresh=args.fresh, device=args.device, dtype=args.dtype,
                    skip=parse_stage_list(args.skip), only=parse_stage_list(args.only), max_minutes=args.max_minutes,
                    threads=args.threads)


def cmd_experiment(args: argparse.Namespace) -> int:
    from .experiment import experiment, experiment_config, parse_stage_list
    from .janus_experiment import EXPERIMENTS as JANUS_EXPERIMENTS

    common = dict(out=args.out or f"runs/{args.name}", fast=args.fast, seed=args.seed)
    stages = dict(skip=parse_stage_list(args.skip), only=parse_stage_list(args.only), fresh=args.fresh)
    if args.name == "distill-vs-rl":
        experiment(experiment_config(args.overrides, **common), **stages)
    elif args.name in JANUS_EXPERIMENTS:  # the mini Janus' findings (docs/findings/janus.md)
        from .janus_experiment import janus_experiment_config, run_experiment

        run_experiment(janus_experiment_config(args.name, args.overrides, **common), **stages)
    else:  # V3's ablations (docs/findings/moe-balance.md, mtp.md)
        from .ablations import run_ablation

        run_ablation(args.name, args.overrides, **stages, **common)
    return 0


def _stage_args(p: argparse.ArgumentParser) -> None:
    """--skip / --only / --fresh of every staged run (nanoseek.experiment)."""
    p.add_argument("--skip", action="append", metavar="STAGE[,STAGE]", help="do not run these stages (repeatable)")
    p.add_argument("--only", action="append", metavar="STAGE[,STAGE]",
                   help="run only these stages (finished ones stay skipped; repeatable)")
    p.add_argument("--fresh", action="store_true", help="start over instead of resuming finished stages")


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from .data import train_tokenizer

    tok = train_tokenizer(args.input, args.vocab_size, args.out, min_frequency=args.min_frequency)
    short = f" (of {args.vocab_size} requested: no pair left with count >= {args.min_frequency})" \
        if tok.vocab_size < args.vocab_size else ""
    Console().print(f"trained a {tok.vocab_size}-token byte-level BPE{short}, bos {tok.bos_id}, eos {tok.eos_id}, "
                    f"pad {tok.pad_id} -> [bold]{args.out}[/]")
    return 0


def cmd_tokenizer_stats(args: argparse.Namespace) -> int:
    from .data import tokenizer_stats
    from .tokenizer import print_stats

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
    if args.task == "shapes":  # a directory of images and items, not a JSONL of text problems
        from .minijanus import synth_world

        path = synth_world(args.n, args.split, args.seed, args.out, args.set, png=args.png)
        Console().print(f"{args.n} shapes items ({args.split}, seed {args.seed}) -> [bold]{path}[/]")
        return 0
    if args.set or args.png:
        raise ValueError("--set and --png are for --task shapes")
    from .tasks import synth

    path = synth(args.task, args.n, args.split, args.seed, args.out, args.format)
    Console().print(f"{args.n} {args.task} items ({args.split}, seed {args.seed}, {args.format}) -> [bold]{path}[/]")
    return 0


def cmd_janus_train_vq(args: argparse.Namespace) -> int:
    from .minijanus import print_train_summary, train_vq, vq_train_config

    cfg = vq_train_config(args.overrides, data=args.data, out=args.out, resume=True if args.resume else None,
                          device=args.device, progress=False if args.quiet else None)
    print_train_summary(train_vq(cfg), Console())
    return 0


def cmd_janus_score(args: argparse.Namespace) -> int:
    from .minijanus import print_score, run_score

    report = run_score(args.images, world=args.world, vq=args.vq, out=args.json, per_category=args.per_category,
                       device=args.device, progress=not args.quiet)
    print_score(report, Console())
    return 0


def _add_janus_commands(sub: argparse._SubParsersAction) -> None:
    jp = sub.add_parser("janus", help="mini Janus on the shapes world: VQ tokenizer, training, GenEval-style "
                                      "scores (docs/mini-janus.md)")
    jsub = jp.add_subparsers(dest="janus_command", required=True, metavar="COMMAND")
    sp = jsub.add_parser("train-vq", help="train the VQ tokenizer (Janus' VQ architecture) on a shapes world",
                         description="Any VQTrainConfig field as key=value (docs/mini-janus.md), e.g. "
                                     "max_steps=400 codebook_size=512.")
    sp.add_argument("--data", required=True, help="a directory from `nanoseek data synth --task shapes --split train`")
    sp.add_argument("--out", default=None, help="run directory (default runs/vq)")
    sp.add_argument("--resume", action="store_true", help="continue from OUT/latest")
    sp.add_argument("--device", default=None, help=DEVICE_HELP)
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="VQTrainConfig overrides")
    sp.set_defaults(func=cmd_janus_train_vq)
    sp = jsub.add_parser("train", help="train the unified mini Janus from scratch (V3 trunk, frozen VQ)",
                         description="Text-to-image (CFG dropout), image-to-text understanding and caption text in "
                                     "one loop; checkpoints, resume, metrics.jsonl, loss.png; OUT/model is the "
                                     "published Janus directory. Any JanusTrainConfig field as key=value.")
    sp.add_argument("--config", help="TOML file of JanusTrainConfig fields")
    sp.add_argument("--data", help="shapes world directory (nanoseek data synth --task shapes --split train)")
    sp.add_argument("--vq", help="the trained VQ (nanoseek janus train-vq)")
    sp.add_argument("--out", default=None, help="run directory (default runs/janus)")
    sp.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    _device_args(sp, "fp32 (default) | bf16 autocast", "fp32")
    sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="JanusTrainConfig fields (model.* for the "
                                                                      "trunk)")
    sp.set_defaults(func=cmd_janus_train)
    sp = jsub.add_parser("score", help="score generated images against their prompts (rule-based verifier)",
                         description="Always reports the verifier's own accuracy on freshly rendered ground truth of "
                                     "the test prompts, and with --vq the VQ round-trip ceiling.")
    sp.add_argument("images", nargs="?", default=None,
                    help="a JSONL of generated images (rows: category, requirement, image = a PNG path relative to "
                         "the file) or a directory holding images.jsonl; omit to measure only the verifier/ceiling")
    sp.add_argument("--world", default=None, help="world.json or a data directory (default: the default world)")
    sp.add_argument("--vq", default=None, help="a VQ directory or train-vq run: also the round-trip ceiling")
    sp.add_argument("--per-category", type=int, default=60, help="test prompts per category for the verifier check "
                                                                 "and the ceiling (default 60: 360 in all)")
    sp.add_argument("--json", default=None, metavar="OUT", help="also write the report as JSON")
    sp.add_argument("--device", default=None, help=DEVICE_HELP)
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(func=cmd_janus_score)


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
    from .tasks import task_names

    sp = dsub.add_parser("synth", help="a task's items (synthetic problems with reasoning) as JSONL")
    sp.add_argument("--task", choices=(*task_names(), "shapes"), required=True,
                    help="shapes: the mini-Janus world, a directory of images + items (docs/mini-janus.md)")
    sp.add_argument("--n", type=int, required=True, help="number of items")
    sp.add_argument("--split", choices=("train", "test"), default="train")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--out", required=True, help="output .jsonl file")
    sp.add_argument("--format", choices=("item", "text", "chat"), default="item",
                    help="raw items (default; for RL/eval), {text} for pretraining, {messages} for SFT")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="shapes: a world setting, e.g. image_size=48, max_objects=2, 'sizes=[10,13]' (repeatable)")
    sp.add_argument("--png", action="store_true", help="shapes: also one PNG per item")
    sp.set_defaults(func=cmd_data_synth)


def cmd_distill_generate(args: argparse.Namespace) -> int:
    from .distill import FilterConfig, GenerateConfig, generate, print_stats

    flt = FilterConfig(min_score=args.min_score, require_verified=args.require_verified,
                       max_completion_tokens=args.max_completion_tokens, max_chars=args.max_chars,
                       max_foreign_frac=None if args.max_foreign_frac < 0 else args.max_foreign_frac,
                       min_compression_ratio=None if args.min_compression_ratio < 0 else args.min_compression_ratio,
                       max_paragraph_chars=args.max_paragraph_chars, drop_code_blocks=args.drop_code_blocks,
                       dedup=not args.no_dedup, max_per_prompt=args.max_per_prompt)
    stats = generate(GenerateConfig(
        out=args.out, teacher=args.teacher, teacher_url=args.teacher_url, teacher_model=args.teacher_model,
        api_key=args.api_key, prompts=args.prompts, n_prompts=args.n_prompts, split=args.split, samples=args.samples,
        temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, verifier=args.verifier,
        filter=flt, batch_prompts=args.batch_prompts, concurrency=args.concurrency, retries=args.retries,
        backoff=args.backoff, timeout=args.timeout, seed=args.seed, overwrite=args.overwrite,
        answer_instruction=not args.no_answer_instruction, progress=not args.json, device=args.device,
        dtype=args.dtype))
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        print_stats(stats, Console())
        Console().print(f"{stats['accepted']:,} traces -> [bold]{args.out}/traces.jsonl[/] (statistics in stats.json)")
    return 1 if stats["prompts_failed"] else 0


def cmd_distill_sft(args: argparse.Namespace) -> int:
    from .distill import SFTConfig, sft

    s = sft(SFTConfig(traces=args.traces, out=args.out, student=args.student, preset=args.preset,
                      tokenizer=args.tokenizer, epochs=args.epochs, config=args.config, overrides=args.overrides,
                      resume=args.resume, device=args.device, dtype=args.dtype))
    Console().print(f"SFT on {s['traces']:,} traces ({s['max_steps']} steps, seq_len {s['seq_len']}, "
                    f"{s['train_flops']:.3g} training FLOPs); student: [bold]{s['final_model']}[/]")
    return 0


def cmd_distill_kd(args: argparse.Namespace) -> int:
    from .distill import KDConfig, kd

    s = kd(KDConfig(teacher=args.teacher, student=args.student, out=args.out, data=args.data, prompts=args.prompts,
                    divergence=args.divergence, beta=args.beta, temperature=args.temperature,
                    lmbda=1.0 if args.on_policy else args.lmbda, ce_weight=args.ce_weight,
                    max_new_tokens=args.max_new_tokens, steps=args.steps, batch_size=args.batch_size,
                    seq_len=args.seq_len, lr=args.lr, seed=args.seed, resume=args.resume, device=args.device,
                    dtype=args.dtype))
    Console().print(f"KD finished at step {s['steps']}: held-out KL(teacher||student) {s['kl_start']:.4f} -> "
                    f"{s['kl_end']:.4f}; student: [bold]{s['final_model']}[/]")
    return 0


def cmd_distill_experiment(args: argparse.Namespace) -> int:
    args.name = "distill-vs-rl"  # the same experiment as `nanoseek experiment distill-vs-rl`
    return cmd_experiment(args)


def _add_distill_commands(sub: argparse._SubParsersAction) -> None:
    dp = sub.add_parser("distill", help="R1-style distillation: teacher traces, SFT students, logit KD",
                        description="See docs/distill.md.")
    dsub = dp.add_subparsers(dest="distill_command", required=True, metavar="COMMAND")
    sp = dsub.add_parser("generate", help="sample reasoning traces from a teacher, keep the verified ones (resumable)")
    t = sp.add_mutually_exclusive_group(required=True)
    t.add_argument("--teacher", help="a model directory" + HUB_NOTE + " (nanoseek's engine)")
    _revision_arg(sp)
    t.add_argument("--teacher-url", help="an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    sp.add_argument("--teacher-model", help="model name at --teacher-url (default: its only model)")
    sp.add_argument("--api-key", default=None, help="API key (default $OPENAI_API_KEY; never written to disk)")
    sp.add_argument("--prompts", default="arithmetic", help="the task: " + _task_help("prompt/messages"))
    sp.add_argument("--n-prompts", type=int, default=None, help="built-in tasks: how many (200); files: first N")
    sp.add_argument("--split", choices=("train", "test"), default="train", help="built-in tasks' split")
    sp.add_argument("--samples", type=int, default=4, help="K samples per prompt (default 4)")
    sp.add_argument("--out", required=True, help="directory: traces.jsonl, samples.jsonl (log), stats.json")
    sp.add_argument("--temperature", type=float, default=0.6, help="default 0.6 (R1's recommendation)")
    sp.add_argument("--top-p", type=float, default=0.95)
    sp.add_argument("--max-tokens", type=int, default=512, help="new tokens per sample (longer: rejected)")
    sp.add_argument("--verifier", default=None,
                    help="a built-in task's rule | math_verify | none | reward module:fn (default: the task's)")
    sp.add_argument("--min-score", type=float, default=1.0, help="verifier score to accept (default 1.0)")
    sp.add_argument("--require-verified", action="store_true", help="drop prompts the verifier cannot check")
    sp.add_argument("--max-completion-tokens", type=int, default=None, help="drop longer traces")
    sp.add_argument("--max-chars", type=int, default=None, help="drop traces with more characters")
    sp.add_argument("--max-foreign-frac", type=float, default=0.05,
                    help="drop mixed-language traces: share of words outside the prompt's script (-1: off)")
    sp.add_argument("--min-compression-ratio", type=float, default=0.1,
                    help="drop degenerate repetition: zlib ratio below this (-1: off)")
    sp.add_argument("--max-paragraph-chars", type=int, default=None, help="drop traces with a longer paragraph")
    sp.add_argument("--drop-code-blocks", action="store_true", help="drop reasoning with ``` code blocks (R1)")
    sp.add_argument("--no-dedup", action="store_true", help="keep duplicate traces")
    sp.add_argument("--max-per-prompt", type=int, default=None, help="keep at most N traces per prompt")
    sp.add_argument("--no-answer-instruction", action="store_true",
                    help="do not append the <answer> tag instruction to prompts")
    sp.add_argument("--batch-prompts", type=int, default=16, help="local teacher: prompts per engine batch")
    sp.add_argument("--concurrency", type=int, default=8, help="remote teacher: requests in flight (default 8)")
    sp.add_argument("--retries", type=int, default=5, help="remote teacher: retries per request (default 5)")
    sp.add_argument("--backoff", type=float, default=1.0, help="remote teacher: first backoff in seconds")
    sp.add_argument("--timeout", type=float, default=600.0, help="remote teacher: seconds per request")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--overwrite", action="store_true", help="start over instead of resuming")
    sp.add_argument("--json", action="store_true", help="print the statistics as JSON")
    _device_args(sp, "local teacher's " + INFER_DTYPE_HELP)
    sp.set_defaults(func=cmd_distill_generate)

    sp = dsub.add_parser("sft", help="SFT a student on traces (reasoning-keeping chat render)",
                         description="Extra KEY=VALUE arguments are TrainConfig overrides (docs/training.md).")
    s = sp.add_mutually_exclusive_group(required=True)
    s.add_argument("--student", help="a model directory" + HUB_NOTE + " (with tokenizer) to fine-tune")
    _revision_arg(sp)
    s.add_argument("--preset", help="a fresh student from a preset (tiny, small, ...)")
    sp.add_argument("--traces", required=True, help="traces.jsonl or a `distill generate` directory")
    sp.add_argument("--tokenizer", help="with --preset: tokenizer directory (default: a local teacher's)")
    sp.add_argument("--out", required=True, help="run directory; the student is written to OUT/final")
    sp.add_argument("--epochs", type=float, default=2.0, help="passes over the traces, unless max_steps=N is given")
    sp.add_argument("--config", help="a TOML file of TrainConfig fields")
    sp.add_argument("--resume", action="store_true", help="continue from OUT/latest")
    sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="TrainConfig overrides")
    _device_args(sp, TRAIN_DTYPE_HELP + AMX_NOTE, None)
    sp.set_defaults(func=cmd_distill_sft)

    sp = dsub.add_parser("kd", help="logit distillation (shared vocabulary): forward/reverse KL, JSD, on-policy")
    sp.add_argument("--teacher", required=True, help="teacher model directory" + HUB_NOTE + " (with tokenizer)")
    _revision_arg(sp)
    sp.add_argument("--student", required=True, help="student model directory" + HUB_NOTE + " (same vocabulary)")
    sp.add_argument("--out", required=True, help="run directory; the student is written to OUT/final")
    sp.add_argument("--data", help="a prepared directory (`nanoseek data prepare`) or chat traces (.jsonl/dir)")
    sp.add_argument("--prompts", help="on-policy prompts, a task: " + _task_help("prompt/messages"))
    sp.add_argument("--divergence", choices=("forward_kl", "reverse_kl", "jsd"), default="forward_kl")
    sp.add_argument("--beta", type=float, default=0.5, help="JSD interpolation (0 forward KL, 1 reverse KL)")
    sp.add_argument("--temperature", type=float, default=1.0, help="softening temperature (loss x T^2)")
    sp.add_argument("--lmbda", type=float, default=0.0, help="share of on-policy steps (GKD's lambda)")
    sp.add_argument("--on-policy", action="store_true", help="every step on student samples (lmbda 1)")
    sp.add_argument("--ce-weight", type=float, default=0.0, help="+ cross-entropy on the data's targets")
    sp.add_argument("--max-new-tokens", type=int, default=64, help="on-policy completion length")
    sp.add_argument("--steps", type=int, default=100)
    sp.add_argument("--batch-size", type=int, default=8)
    sp.add_argument("--seq-len", type=int, default=128)
    sp.add_argument("--lr", type=float, default=5e-4)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--resume", action="store_true", help="continue from OUT/latest")
    _device_args(sp, TRAIN_DTYPE_HELP)
    sp.set_defaults(func=cmd_distill_kd)

    sp = dsub.add_parser("experiment", help="distillation vs GRPO on a small student (docs/findings/distill-vs-rl.md)")
    sp.add_argument("--out", default="runs/distill-vs-rl")
    sp.add_argument("--fast", action="store_true", help="toy sizes: checks the pipeline, numbers meaningless")
    sp.add_argument("--seed", type=int, default=0)
    _stage_args(sp)
    sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="ExperimentConfig fields, e.g. "
                    "student_rl_steps=400 'student_rl_lrs=[1e-4, 3e-5]'")
    sp.set_defaults(func=cmd_distill_experiment)


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import ServeConfig, serve

    return serve(ServeConfig(
        model=args.model, host=args.host, port=args.port, api_key=args.api_key,
        served_model_name=args.served_model_name, max_model_len=args.max_model_len, chat_template=args.chat_template,
        reasoning_parser=args.reasoning_parser, max_batch=args.max_batch, max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes, max_images=args.max_images,
        num_speculative_tokens=args.num_speculative_tokens, seed=args.seed,
        log_level=args.log_level, compile=args.compile, dtype=args.dtype, device=args.device, int8=args.int8))


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat import run_chat

    return run_chat(args.model, args.url, api_key=args.api_key, served_model=args.served_model, system=args.system,
                    temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed,
                    show_thinking=args.show_thinking, color=args.color, max_model_len=args.max_model_len,
                    reasoning_parser=args.reasoning_parser, device=args.device, dtype=args.dtype)


def _add_serve_commands(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("serve", help="OpenAI-compatible API server (+ web chat at /; Janus: images too)",
                        description="See docs/serving.md. Binds 127.0.0.1 unless --host says otherwise.")
    sp.add_argument("--model", required=True, help="model directory" + HUB_NOTE + " (with its tokenizer files)")
    _revision_arg(sp)
    sp.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--api-key", default=None, help="require this bearer key (default $NANOSEEK_API_KEY, if set)")
    sp.add_argument("--served-model-name", default=None, help="model name in the API (default: directory name)")
    sp.add_argument("--max-model-len", type=int, default=None, help="context length (default min(model's, 4096))")
    sp.add_argument("--chat-template", default=None, help="a Jinja chat template file replacing the tokenizer's")
    sp.add_argument("--reasoning-parser", choices=("auto", "deepseek_r1", "none"), default="auto",
                    help="split <think>...</think> into reasoning_content (auto: if the chat template uses <think>)")
    sp.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default 8)")
    sp.add_argument("--max-queue", type=int, default=64, help="sequences waiting beyond the batch before 429")
    sp.add_argument("--max-body-bytes", type=int, default=4 * 2**20,
                    help="request body limit (413 above it); images in chat messages travel in the body")
    sp.add_argument("--max-images", type=int, default=4,
                    help="Janus: images per /v1/images/generations request (n, at most 10; default 4)")
    sp.add_argument("--num-speculative-tokens", type=int, default=0, help="MTP speculative decoding drafts")
    sp.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="compile the decode step at startup (default: when the model is large enough for it to pay; "
                         "weights stay live; docs/inference.md)")
    sp.add_argument("--int8", action="store_true", help=INT8_HELP)
    _device_args(sp, INFER_DTYPE_HELP)
    sp.add_argument("--seed", type=int, default=None, help="engine seed for unseeded requests")
    sp.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("chat", help="terminal chat with a model directory (in-process) or a server URL")
    g = sp.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="model directory" + HUB_NOTE + ": runs the engine in this process (a Janus "
                   "directory also reads images: /image PATH)")
    _revision_arg(sp)
    g.add_argument("--url", help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    sp.add_argument("--api-key", default=None, help="with --url (default $NANOSEEK_API_KEY)")
    sp.add_argument("--served-model", default=None, help="with --url: model name (default: the first listed)")
    sp.add_argument("--system", default=None, help="system prompt")
    sp.add_argument("--temperature", type=float, default=None, help="default: the model's generation_config")
    sp.add_argument("--top-p", type=float, default=None)
    sp.add_argument("--max-tokens", type=int, default=None, help="per answer (default: the rest of the context)")
    sp.add_argument("--seed", type=int, default=None)
    sp.add_argument("--show-thinking", action="store_true", help="stream the thinking (toggle with /think)")
    sp.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    sp.add_argument("--max-model-len", type=int, default=None, help="with --model: context length")
    sp.add_argument("--reasoning-parser", choices=("auto", "deepseek_r1", "none"), default="auto",
                    help="with --model: split <think>...</think> (auto: if the chat template uses <think>)")
    _device_args(sp, "with --model: " + INFER_DTYPE_HELP)
    sp.set_defaults(func=cmd_chat)


def cmd_audit(args: argparse.Namespace) -> int:
    if getattr(args, "validate", None) is not None:  # the classifier's own test (audit_validation sits above audit)
        from rich.console import Console

        from .audit_validation import command as validate_command

        return validate_command(args.validate, args.json, Console(), store_error=args.store_error)
    from .audit import command

    return command(args)


def _add_audit_command(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("audit", help="measure refusal and deflection of any OpenAI-compatible model (en/zh/ja)",
                        description="See docs/audit.md. Resumable: rerun the same command to continue.")
    sp.add_argument("--url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    sp.add_argument("--model", default=None, help="model name at --url (default: the endpoint's only model)")
    sp.add_argument("--api-key", default=None, help="API key (default $OPENAI_API_KEY; never written to disk)")
    sp.add_argument("--suite", default="builtin", help="builtin | FILE.jsonl (schema in docs/audit.md)")
    sp.add_argument("--lang", default="en,zh,ja", help="languages, comma-separated (default en,zh,ja)")
    sp.add_argument("--kinds", default=None, help="only these kinds, e.g. sensitive,control_history")
    sp.add_argument("--categories", default=None, help="only these categories, e.g. tiananmen,taiwan")
    sp.add_argument("--limit", type=int, default=None, help="only the first N questions (smoke runs)")
    sp.add_argument("--samples", type=int, default=3, help="answers per prompt (default 3)")
    sp.add_argument("--temperature", type=float, default=0.6, help="default 0.6 (R1's recommendation)")
    sp.add_argument("--top-p", type=float, default=0.95)
    sp.add_argument("--max-tokens", type=int, default=4096, help="reasoning + answer tokens (default 4096)")
    sp.add_argument("--system", default=None, help="a system prompt (default none)")
    sp.add_argument("--seed", type=int, default=0, help="base of the per-sample seeds")
    sp.add_argument("--no-seed", action="store_true", help="do not send a seed (endpoints that reject it)")
    sp.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    sp.add_argument("--rps", type=float, default=None, help="at most this many requests per second")
    sp.add_argument("--retries", type=int, default=5, help="retries per request, with exponential backoff")
    sp.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    sp.add_argument("--judge-url", default=None, help="an OpenAI-compatible endpoint for an LLM judge (optional)")
    sp.add_argument("--judge-model", default=None, help="the judge's model name")
    sp.add_argument("--judge-api-key", default=None, help="the judge's key (default $NANOSEEK_JUDGE_API_KEY)")
    sp.add_argument("--stop-after", type=int, default=None, help="stop after N new answers (resume later)")
    sp.add_argument("--overwrite", action="store_true", help="start over instead of resuming")
    sp.add_argument("--report-only", action="store_true", help="rebuild the report of --out without asking")
    sp.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), default=None,
                    help="compare two audit directories (McNemar, Holm); writes compare.{md,json,png} to --out")
    sp.add_argument("--validate", nargs="*", metavar="FILE", default=None,
                    help="score the rule classifier on labelled answers (default: the frozen test set, "
                         "nanoseek/audit_suite/validation/test-round3.jsonl); no model is asked")
    sp.add_argument("--json", default=None, metavar="OUT", help="with --validate: also write the score to OUT")
    sp.add_argument("--store-error", action="store_true",
                    help="with --validate of the frozen test set: store its score in the package, where every "
                         "report reads the classifier's measured error")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.add_argument("--out", default=None, help="output directory (required unless --validate)")
    sp.set_defaults(func=cmd_audit)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="nanoseek", description="DeepSeek's LLM system, compact and hackable.")
    p.add_argument("--version", action="version", version=f"nanoseek {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sp = sub.add_parser("params", help="parameter, KV-cache and FLOP accounting (on the meta device)")
    _model_source(sp)
    sp.add_argument("--json", action="store_true", help="print JSON instead of tables")
    sp.set_defaults(func=cmd_params)

    sp = sub.add_parser("cost", help="GPU-hours and dollars from given inputs (rate or MFU, extra hours, $/GPU-hour)")
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
    _device_args(sp, TRAIN_DTYPE_HELP + AMX_NOTE + " (same as dtype=...)", None)
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser("rl", help="GRPO reasoning RL (R1-Zero recipe) with rule-based or plugin rewards")
    sp.add_argument("--model", required=True, help="model directory" + HUB_NOTE + " (with tokenizer files)")
    _revision_arg(sp)
    sp.add_argument("--task", default="arithmetic", help=_task_help("prompt, answer"))
    sp.add_argument("--reward", action="append", help="extra reward module:fn[=weight] (repeatable)")
    sp.add_argument("--steps", type=int)
    sp.add_argument("--group-size", dest="group_size", type=int, help="G samples per prompt")
    sp.add_argument("--batch-prompts", dest="batch_prompts", type=int, help="P prompts per step")
    sp.add_argument("--loss", choices=["grpo", "dr_grpo", "dapo"])
    sp.add_argument("--beta", type=float, help="KL coefficient (R1: 0.001; 0 = no reference model)")
    sp.add_argument("--out", default="runs/rl")
    sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="any RLConfig field (see docs/rl.md)")
    _device_args(sp, TRAIN_DTYPE_HELP + " (CPU: fp32 measured faster, docs/rl.md; same as dtype=...)", None)
    sp.set_defaults(func=cmd_rl)

    sp = sub.add_parser("eval", help="pass@1 / pass@k / cons@k / greedy accuracy with confidence intervals")
    src = sp.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a local model directory" + HUB_NOTE)
    _revision_arg(sp)
    src.add_argument("--url", help="an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    sp.add_argument("--served-model", help="model name at --url")
    sp.add_argument("--api-key", default=None)
    sp.add_argument("--task", default="arithmetic", help=_task_help("prompt, answer"))
    sp.add_argument("--k", type=int, default=8, help="samples per item (default 8)")
    sp.add_argument("--n", type=int, default=None,
                    help="held-out items (default 200; shapes-geneval 360 prompts, shapes-vqa 600 questions)")
    sp.add_argument("--temperature", type=float, default=None,
                    help="sampling temperature (default 0.6; shapes-geneval: 1, Janus-Pro's image sampling)")
    sp.add_argument("--top-p", type=float, default=0.95)
    sp.add_argument("--max-tokens", type=int, default=256)
    sp.add_argument("--prompt-format", choices=["chat", "r1_zero"], default="chat")
    sp.add_argument("--out", default=None, help="directory for items.jsonl, summary.json and summary.md")
    sp.add_argument("--task-option", action="append", metavar="KEY=VALUE",
                    help="a setting of the task (TOML value, repeatable), e.g. max_digits=3: it must match what the "
                         "model was trained on")
    sp.add_argument("--max-batch", type=int, default=32, help="local model: engine rows decoded together "
                                                              "(default 32)")
    sp.add_argument("--cfg", type=float, default=5.0, help="shapes-geneval: guidance weight, >= 1 (default 5)")
    sp.add_argument("--world", default=None, help="shapes tasks: the world.json (default: the model's own)")
    sp.add_argument("--split", choices=("test", "train"), default="test",
                    help="shapes tasks: test = held-out compositions (the score); train = prompts with the seen "
                         "colour-shape pairings (a diagnostic)")
    _device_args(sp, "with --model: " + INFER_DTYPE_HELP)
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("generate", help="generate from an HF-format model directory (streams to stdout)")
    sp.add_argument("--model", required=True,
                    help="model directory" + HUB_NOTE + " (its tokenizer files are used when present)")
    _revision_arg(sp)
    g = sp.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="prompt text (needs tokenizer.json in the model directory)")
    g.add_argument("--prompt-ids", help="comma-separated prompt token ids, e.g. 0,5,17")
    sp.add_argument("--chat", action="store_true", help="wrap --prompt as a user turn of the chat template")
    sp.add_argument("--max-tokens", type=int, default=128, help="new tokens at most (default 128)")
    sp.add_argument("--temperature", type=float, default=None,
                    help="0 = greedy (default: generation_config.json, else 1)")
    sp.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default: generation_config.json)")
    sp.add_argument("--seed", type=int, default=None, help="sampling seed")
    sp.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS")
    sp.add_argument("--speculative", action="store_true", help="MTP speculative decoding (V3 report 5.4.3)")
    sp.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="compile the decode step (default: when the model is large enough for it to pay; "
                         "docs/inference.md)")
    sp.add_argument("--int8", action="store_true", help=INT8_HELP)
    _device_args(sp, INFER_DTYPE_HELP)
    sp.add_argument("--draft-tokens", type=int, default=1, help="MTP draft tokens per step (default 1, as V3)")
    sp.add_argument("--image", help="an image file: ask --prompt about it (Janus models)")
    sp.set_defaults(func=cmd_generate)

    sp = sub.add_parser("export", help="a model + its tokenizer as one GGUF file llama.cpp runs (docs/inference.md)")
    sp.add_argument("--format", choices=("gguf",), default="gguf", help="output format (gguf: llama.cpp)")
    sp.add_argument("--model", required=True, help="model directory (MLA + MoE)" + HUB_NOTE)
    _revision_arg(sp)
    sp.add_argument("--out", required=True, help="the .gguf file to write")
    sp.add_argument("--type", choices=("f32", "bf16", "f16", "q8_0"), default="f32",
                    help="weight type (q8_0: llama.cpp's 8-bit blocks; norms and router stay f32)")
    sp.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser("imagine", help="text-to-image with a Janus-Pro model (PNGs and a grid)",
                        description="576 image tokens per image, each from a conditional and an unconditional row "
                                    "(classifier-free guidance), then the VQ decoder. A 1B model on a CPU takes "
                                    "minutes per batch (docs/janus.md).")
    sp.add_argument("prompt", help="what to draw, e.g. \"a red bicycle under a tree\"")
    sp.add_argument("--model", required=True,
                    help="a Janus directory (transformers' or DeepSeek's layout)" + HUB_NOTE)
    _revision_arg(sp)
    sp.add_argument("--n", type=int, default=4, help="images (default 4)")
    sp.add_argument("--cfg", type=float, default=5.0, help="guidance weight, >= 1 (default 5, as Janus-Pro)")
    sp.add_argument("--temperature", type=float, default=1.0, help="default 1 (0 = greedy)")
    sp.add_argument("--seed", type=int, default=None, help="same seed, same images")
    sp.add_argument("--compile", action="store_true",
                    help="compile the decode step first (tens of seconds; then ~2x faster per token in bf16)")
    _device_args(sp, INFER_DTYPE_HELP)
    sp.add_argument("--out", required=True, help="output directory for image_*.png and grid.png")
    sp.set_defaults(func=cmd_imagine)

    sp = sub.add_parser("demo", help="the whole recipe on a CPU, ending in a report card (docs/demo.md)",
                        description="Stages: data, pretrain, rl, student_pretrain, student_rl, traces, "
                                    "student_distill, eval; then the report. Fixed work: the same numbers on every run "
                                    "with the same seed, machine type and thread count.")
    sp.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    sp.add_argument("--fast", action="store_true", help="toy sizes that run every stage, in about a minute")
    _stage_args(sp)
    sp.add_argument("--max-minutes", type=float, default=None, metavar="M",
                    help="fit the remaining stages into M minutes: training stages do fewer steps (their lr decay "
                         "still completes) and the report says the run was time-limited")
    sp.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's); results differ in their last digits between counts")
    _device_args(sp, "every stage (training: autocast, inference: weights): auto (fp32 on a CPU, as the estimates "
                 "were measured; bf16 on CUDA) | fp32 | bf16")
    sp.set_defaults(func=cmd_demo)

    sp = sub.add_parser("experiment", help="a staged experiment behind a finding (docs/findings), resumable",
                        description="distill-vs-rl: docs/findings/distill-vs-rl.md (same as `nanoseek distill "
                                    "experiment`); moe-balance: docs/findings/moe-balance.md (aux-loss-free bias vs "
                                    "auxiliary loss vs neither); mtp: docs/findings/mtp.md (with vs without the MTP "
                                    "module); janus-encoding, janus-cfg: docs/findings/janus.md. Any experiment config "
                                    "field as key=value.")
    sp.add_argument("name", choices=("distill-vs-rl", "moe-balance", "mtp", "janus-encoding", "janus-cfg"),
                    help="the experiment")
    sp.add_argument("--out", default=None, help="output directory (default runs/NAME)")
    sp.add_argument("--fast", action="store_true", help="toy sizes: checks the pipeline, numbers mean nothing")
    sp.add_argument("--seed", type=int, default=0)
    _stage_args(sp)
    sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="experiment config fields (TOML values)")
    sp.set_defaults(func=cmd_experiment)
    _add_tokenizer_and_data_commands(sub)
    _add_janus_commands(sub)
    _add_distill_commands(sub)
    _add_serve_commands(sub)
    _add_audit_command(sub)
    return p


def _raised_by_nanoseek(e: BaseException) -> bool:
    """Whether nanoseek's own code raised `e` (its checks of user input, which word the fix), rather than torch or
    another library deep inside a computation (where one line without a traceback would hide a bug)."""
    from pathlib import Path

    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(Path(__file__).resolve().parent)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """argparse, plus KEY=VALUE overrides after an option: `experiment NAME --out DIR key=value` would otherwise
    be refused, because argparse fills a trailing `nargs="*"` positional (empty) together with the one before it."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list) and all(
            re.match(r"^[A-Za-z_][\w.]*=", x) for x in extra):
        args.overrides.extend(extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        _resolve_models(args)
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        if not _raised_by_nanoseek(e):  # a library's own ValueError is a bug to report: keep its traceback
            raise
        Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False)  # user errors: one clear line
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
