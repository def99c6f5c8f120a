"""End-to-end decode: nanoseek's Engine against transformers' `generate` and llama.cpp, in two regimes.

What a user meets: `Engine.generate` end to end (prefill included, wall clock), 32-token prompts, 128 new tokens,
greedy, MTP off, the machine's two threads, each engine in its own process (fresh allocator, caches, threads). Every
engine first generates once; the greedy tokens are compared across engines before anything is timed; then the
same generation is timed `--repeats` times (median and spread reported). nanoseek runs its default decode path
(the compiled `DecodeStep`, weights live; its warm-up is reported apart, cold and from the warm compile cache);
`--eager` adds the eager engine as a reference row.

Regime `overhead` (models whose decode step is short, so per-op and per-step costs decide): the hidden-320 V3-style
config of the decode issue (5 layers, 24 routed experts top-3, MLA with q-LoRA) and the demo's model (nanoseek's
DemoPlan: `small` at hidden 128, 4 layers, vocabulary 1024), random weights, fp32. Peers: transformers (the same
weights through `save_pretrained`, fp32) at batch 1, 4 and 16; llama.cpp (the same weights through
`nanoseek export --format gguf`, f32) at batch 1 (its Python binding's high-level API decodes one sequence).

Regime `bandwidth` (a real model's decode on a laptop: the weights' bytes decide): a DeepSeek-V2-Lite-shaped
slice (V2-Lite's widths, heads, experts and 102,400-token vocabulary; 1 dense + 3 MoE layers; bf16, ~4.5 GB),
against llama.cpp in the same precision (bf16 GGUF), batch 1. Achieved bandwidth = bytes of weights one token reads
(attention, the dense MLP, shared experts, the 6 routed experts chosen per layer, norms, the output head; one
embedding row) x tokens/s, against the read bandwidth of this machine measured beside each run (two threads
summing a 2 GiB tensor, before and after it; with `--rounds N` the engines alternate N times). `--int8` adds
nanoseek's weight-only int8 (`nanoseek.quant.quantize_int8`: int8 weights with a bf16 scale per output channel,
bf16 activations) and llama.cpp's Q8_0 (int8 blocks of 32 with an fp16 scale; its matmuls also quantize the
activations to int8): rows of a different precision from the bf16 ones, labelled so, with the bytes each format
reads per token.

llama.cpp comes from llama-cpp-python (the `bench` extra: built from source, minutes on two cores; install it into
its own venv and pass `--llama-python`). Models, GGUF files and results go to `--out`.

    .venv/bin/python benchmarks/decode.py overhead --llama-python /work/bench-venv/bin/python
    .venv/bin/python benchmarks/decode.py bandwidth --llama-python /work/bench-venv/bin/python --rounds 3
    .venv/bin/python benchmarks/decode.py overhead --configs demo --batches 1 --repeats 1   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROMPT_LEN, NEW_TOKENS = 32, 128
SAMPLE_TEXT = "Question: what is 123 + 4567? Answer: 4690.\n\n  x  日本語 abc 7x8=56 (99) don't\tend "

CONFIGS: dict[str, dict[str, Any]] = {
    # the decode issue's "V3-style config the project never tuned for"
    "v3-320": {"preset": "small", "hidden_size": 320, "num_hidden_layers": 5, "intermediate_size": 960,
               "moe_intermediate_size": 160, "n_routed_experts": 24, "num_experts_per_tok": 3, "n_group": 4,
               "topk_group": 2, "q_lora_rank": 128, "kv_lora_rank": 64, "num_nextn_predict_layers": 0},
    # the demo's base model (nanoseek.demo.DemoPlan), MTP off
    "demo": {"preset": "small", "vocab_size": 1024, "hidden_size": 128, "num_hidden_layers": 4,
             "intermediate_size": 384, "moe_intermediate_size": 64, "q_lora_rank": 96, "kv_lora_rank": 64,
             "num_nextn_predict_layers": 0},
    # DeepSeek-V2-Lite's widths, heads, experts and vocabulary, 4 of its 27 layers (1 dense + 3 MoE); with V2's
    # q-LoRA (rank 1536) because llama.cpp loads a q-LoRA-free deepseek2 only at 26-27 layers
    "v2-lite-slice": {"preset": "deepseek-v2-lite", "num_hidden_layers": 4, "first_k_dense_replace": 1,
                      "q_lora_rank": 1536},
}


# ---- children: one engine per process ------------------------------------------------------------------------


def child_nanoseek(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    sys.path.insert(0, str(ROOT))
    from nanoseek import load
    from nanoseek.infer import Engine, SamplingParams

    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    model = load(a.model_dir, dtype=dtype).eval()
    quantize_s = None
    if a.int8:
        from nanoseek.quant import quantize_int8

        t0 = time.perf_counter()
        quantize_int8(model)
        quantize_s = time.perf_counter() - t0
    prompts = json.loads(a.prompts)
    sp = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    engine = Engine(model, max_batch=len(prompts), max_model_len=PROMPT_LEN + NEW_TOKENS, compile=not a.eager)
    engine.warmup()
    engine.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    warm = time.perf_counter() - t0
    tokens = [o.token_ids for o in engine.generate(prompts, sp)]
    times = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        engine.generate(prompts, sp)
        times.append(time.perf_counter() - t)
    return {"tokens": tokens, "times": times, "warmup_s": warm, "quantize_s": quantize_s}


def child_transformers(a: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=getattr(torch, a.dtype)).eval()
    x = torch.tensor(json.loads(a.prompts))
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def run(n: int) -> list[list[int]]:
        with torch.inference_mode():
            seq = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=pad)
        return seq[:, x.shape[1]:].tolist()

    t0 = time.perf_counter()
    run(4)
    warm = time.perf_counter() - t0
    tokens = run(NEW_TOKENS)
    times = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        run(NEW_TOKENS)
        times.append(time.perf_counter() - t)
    return {"tokens": tokens, "times": times, "warmup_s": warm}


def child_llama(a: argparse.Namespace) -> dict[str, Any]:
    import llama_cpp  # the bench venv: no torch, no nanoseek

    prompts = json.loads(a.prompts)
    if len(prompts) != 1:
        raise SystemExit("llama.cpp's high-level API decodes one sequence: batch 1 only")
    t0 = time.perf_counter()
    # the KV cache in the weights' precision, as nanoseek's (llama.cpp's default is f16: with it, a random
    # model's near-tied greedy tokens drifted apart after ~80 tokens)
    kv = {"float32": 0, "bfloat16": 30}.get(a.dtype, 1)  # ggml_type: F32 = 0, F16 = 1, BF16 = 30
    llm = llama_cpp.Llama(model_path=a.model_dir, n_ctx=PROMPT_LEN + NEW_TOKENS + 8, n_threads=a.threads,
                          n_threads_batch=a.threads, n_batch=PROMPT_LEN, type_k=kv, type_v=kv, verbose=False)

    def run(n: int) -> list[int]:
        out: list[int] = []
        for tok in llm.generate(prompts[0], temp=0.0, top_k=1, reset=True):
            out.append(tok)
            if len(out) == n:
                break
        return out

    run(4)
    warm = time.perf_counter() - t0
    tokens = [run(NEW_TOKENS)]
    times = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        run(NEW_TOKENS)
        times.append(time.perf_counter() - t)
    return {"tokens": tokens, "times": times, "warmup_s": warm,
            "tokenize": llm.tokenize(a.text.encode(), add_bos=True, special=False) if a.text else None}


def child_membw(a: argparse.Namespace) -> dict[str, Any]:
    """Read bandwidth: two threads reducing a 2 GiB tensor (the best of 5 per method), as a decode step streams its
    weights. Methods: `sum` of fp32 and of bf16 (fp32 accumulation inside). (`bf16.sum(dtype=float32)` is not one:
    it read 1.0-1.6 GB/s here, an unvectorised cast path.)"""
    import torch

    torch.set_num_threads(a.threads)
    best: dict[str, float] = {}
    for dt in (torch.float32, torch.bfloat16):
        x = torch.ones(2**31 // torch.finfo(dt).bits * 8, dtype=dt)
        x.sum()
        for _ in range(5):
            t = time.perf_counter()
            x.sum()
            best[str(dt)] = max(best.get(str(dt), 0.0), 2**31 / (time.perf_counter() - t) / 1e9)
        del x
    return {"read_GBps": max(best.values()), "by_method": best}


CHILDREN = {"nanoseek": child_nanoseek, "transformers": child_transformers, "llama": child_llama,
            "membw": child_membw}


def spawn(python: str, engine: str, env: dict[str, str] | None = None, **kw: Any) -> dict[str, Any]:
    cmd = [python, str(Path(__file__).resolve()), "--child", engine]
    for k, v in kw.items():
        if isinstance(v, bool):
            cmd += [f"--{k.replace('_', '-')}"] if v else []
        elif v is not None:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    r = subprocess.run(cmd, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS=str(kw.get("threads", 2)), **(env or {})))
    if r.returncode:
        raise RuntimeError(f"{engine} child failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- preparation: model directories and GGUF files ------------------------------------------------------------


def prepare(name: str, out: Path, file_types: tuple[str, ...]) -> dict[str, Any]:
    """A random model (seed 0) of config `name` with a trained tokenizer, its GGUF exports, and its per-token
    weight bytes at batch 1. Reused when already there."""
    import torch

    sys.path.insert(0, str(ROOT))
    from nanoseek import ModelConfig, build, save_pretrained
    from nanoseek.export import export_gguf

    kw = dict(CONFIGS[name])
    cfg = ModelConfig.from_preset(kw.pop("preset"), **kw)
    d = out / name
    tok = out / "tokenizer"
    if not (tok / "tokenizer.json").is_file():
        from nanoseek.data import train_tokenizer
        from nanoseek.synthetic import generate, to_text

        out.mkdir(parents=True, exist_ok=True)
        (out / "corpus.txt").write_text("\n\n".join(to_text(it) for it in generate("arithmetic", 2000, seed=1)))
        train_tokenizer([out / "corpus.txt"], 1024, tok)
    big = cfg.hidden_size >= 1024
    if not (d / "config.json").is_file():
        torch.manual_seed(0)
        if big:  # 2.2B parameters: allocate and initialise in bf16 directly (an fp32 copy would be 9 GB)
            from nanoseek.model import rope_frequencies

            model = build(cfg, device="meta").to(torch.bfloat16).to_empty(device="cpu")
            model.init_weights()
            model.rotary.inv_freq.copy_(rope_frequencies(cfg)[0])  # buffers are not parameters: set them too
            for r in model.routers():
                r.expert_load.zero_()
        else:
            model = build(cfg)
        with torch.no_grad():  # logits 8x sharper than N(0, 0.02) gives: greedy ties broken by margins well above
            model.norm.weight.fill_(8.0)  # fp rounding, so identical tokens are a fair check between engines
        save_pretrained(model.eval(), d, tokenizer=tok, dtype=torch.bfloat16 if big else None)
        del model
    for ft in file_types:
        if not (out / f"{name}-{ft}.gguf").is_file():
            export_gguf(d, out / f"{name}-{ft}.gguf", file_type=ft)
    meta = build(cfg, device="meta")
    total = sum(p.numel() for n, p in meta.named_parameters() if not n.startswith("mtp."))
    return {"dir": str(d), "params": total, "params_read_per_token": int(read_per_token(meta, "params")),
            "bytes_read_per_token": {f: int(read_per_token(meta, f)) for f in ("bf16", "int8", "q8_0")},
            "vocab_size": cfg.vocab_size}


def read_per_token(model: Any, fmt: str) -> float:
    """Weights one batch-1 decode step reads (MTP off): every tensor of the trunk and head, the chosen top-k of
    the routed experts, one embedding row. fmt "params" counts parameters; "bf16", "int8" (nanoseek.quant: int8
    linear layers and experts with a bf16 scale per output channel; `kv_b_proj`, norms, router and embedding bf16)
    and "q8_0" (nanoseek's GGUF export: every 2-D weight in Q8_0, 34 bytes per 32, except norms and the router in
    f32) count bytes."""
    from torch import nn

    from nanoseek.model import Experts, Router
    from nanoseek.quant import ALIGN, KEEP

    cfg, n = model.config, 0.0
    for name, mod in model.named_modules():
        if name.startswith("mtp") or isinstance(mod, nn.Embedding):
            continue
        if isinstance(mod, Experts):
            frac = cfg.num_experts_per_tok / cfg.n_routed_experts
            for p in (mod.gate_proj, mod.up_proj, mod.down_proj):
                per = {"params": 1, "bf16": 2, "int8": 1 + 2 / p.shape[-1] if p.shape[-1] % ALIGN == 0 else 2,
                       "q8_0": 34 / 32}[fmt]
                n += frac * p.numel() * per
            continue
        for pname, p in mod.named_parameters(recurse=False):
            lin = isinstance(mod, nn.Linear) and pname == "weight"
            quant8 = lin and name.rsplit(".", 1)[-1] not in KEEP and p.shape[-1] % ALIGN == 0
            per = {"params": 1, "bf16": 2, "int8": 1 + 2 / p.shape[-1] if quant8 else 2,
                   "q8_0": 4 if p.ndim == 1 or isinstance(mod, Router) else 34 / 32 if p.shape[-1] % 32 == 0 else 2
                   }[fmt]
            n += p.numel() * per
    emb = model.embed_tokens.weight
    return n + emb.shape[1] * {"params": 1, "bf16": 2, "int8": 2, "q8_0": 34 / 32}[fmt]


# ---- the two regimes --------------------------------------------------------------------------------------------


def summary(r: dict[str, Any], B: int) -> dict[str, Any]:
    med = statistics.median(r["times"])
    # best-of-N beside the median: on a shared machine other jobs only ever add time, so the fastest run is the
    # least disturbed one (both are printed; ratios of each)
    return {"tok_s": B * NEW_TOKENS / med, "tok_s_best": B * NEW_TOKENS / min(r["times"]), "s_median": med,
            "s_min": min(r["times"]), "s_max": max(r["times"]), "warmup_s": r["warmup_s"]}


def same_tokens(a: list[list[int]], b: list[list[int]]) -> str:
    return f"{sum(x == y for x, y in zip(a, b))}/{len(a)}"


def pooled(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Each engine's runs over the alternating rounds as one run, its timed repeats joined; an engine missing from
    any round (it failed there: bandwidth's int8 rows) is left out."""
    return {k: {**v, "times": [t for rd in rounds for t in rd[k]["times"]]} for k, v in rounds[0].items()
            if all(k in rd for rd in rounds)}


def overhead(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in args.configs:
        info = prepare(name, out, ("f32",))
        rows = []
        for B in args.batches:
            import torch

            prompts = torch.randint(3, info["vocab_size"], (B, PROMPT_LEN),
                                    generator=torch.Generator().manual_seed(B)).tolist()
            common = {"prompts": json.dumps(prompts), "threads": args.threads, "repeats": args.repeats,
                      "dtype": "float32"}
            rounds: list[dict[str, dict[str, Any]]] = []
            for _ in range(args.rounds):  # the engines alternate, one process each per round
                runs = {"nanoseek": spawn(sys.executable, "nanoseek", model_dir=info["dir"], **common),
                        "transformers": spawn(sys.executable, "transformers", model_dir=info["dir"], **common)}
                if args.eager:
                    runs["nanoseek eager"] = spawn(sys.executable, "nanoseek", model_dir=info["dir"], eager=True,
                                                   **common)
                if B == 1 and args.llama_python:
                    runs["llama.cpp"] = spawn(args.llama_python, "llama", model_dir=str(out / f"{name}-f32.gguf"),
                                              text=SAMPLE_TEXT, **common)
                rounds.append(runs)
            runs = pooled(rounds)
            row: dict[str, Any] = {"batch": B, **{k: summary(v, B) for k, v in runs.items()}}
            if args.rounds > 1:  # each round's ratio of medians: how far the machine's state moves it
                row["ratios by round"] = {k: [statistics.median(rd[k]["times"]) / statistics.median(rd["nanoseek"]
                                                                                                    ["times"])
                                              for rd in rounds] for k in runs if k != "nanoseek"}
            if "llama.cpp" in runs:  # the GGUF's tokenizer (deepseek-v3 pre-tokenizer) against nanoseek's
                from nanoseek.tokenizer import Tokenizer

                ours = Tokenizer.load(info["dir"]).encode(SAMPLE_TEXT, add_bos=True)
                row["llama.cpp tokenization identical"] = ours == runs["llama.cpp"]["tokenize"]
            ref = runs["nanoseek"]["tokens"]
            row["identical"] = {k: same_tokens(ref, v["tokens"]) for k, v in runs.items() if k != "nanoseek"}
            for k in runs:
                if k != "nanoseek":
                    row[f"nanoseek / {k}"] = row["nanoseek"]["tok_s"] / row[k]["tok_s"]
                    row[f"best: nanoseek / {k}"] = row["nanoseek"]["tok_s_best"] / row[k]["tok_s_best"]
            rows.append(row)
            print(f"{name} batch {B:>2}: " + " | ".join(
                f"{k} {row[k]['tok_s']:.0f} tok/s ({row[k]['s_min']:.2f}-{row[k]['s_max']:.2f} s)" for k in runs)
                + " | median ratio " + " ".join(f"x{k.split(' / ')[1]} {v:.2f}" for k, v in row.items()
                                                if k.startswith("nanoseek / "))
                + " | best-of-runs ratio " + " ".join(f"x{k.split(' / ')[1]} {v:.2f}" for k, v in row.items()
                                                      if k.startswith("best: "))
                + f" | identical {row['identical']} | nanoseek warm-up {row['nanoseek']['warmup_s']:.0f} s"
                + "".join(f" | by round x{k}: " + " ".join(f"{x:.2f}" for x in v)
                          for k, v in row.get("ratios by round", {}).items()), flush=True)
        results[name] = {"model": info, "rows": rows}
        if args.warmup_cold:  # the batch-1 engine's warm-up from an empty Inductor cache, then from that cache
            import tempfile

            import torch

            prompts = torch.randint(3, info["vocab_size"], (1, PROMPT_LEN),
                                    generator=torch.Generator().manual_seed(1)).tolist()
            with tempfile.TemporaryDirectory() as cache:
                kw = {"model_dir": info["dir"], "prompts": json.dumps(prompts), "threads": args.threads,
                      "repeats": 0, "env": {"TORCHINDUCTOR_CACHE_DIR": cache}}
                cold, warm = (spawn(sys.executable, "nanoseek", **kw)["warmup_s"] for _ in range(2))
            results[name]["warmup_batch1_s"] = {"cold": cold, "warm": warm}
            print(f"{name}: compiled engine warm-up at batch 1: {cold:.1f} s from an empty compile cache, "
                  f"{warm:.1f} s from a warm one", flush=True)
    return results


def bandwidth(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Engines alternate `--rounds` times, each run between two read-bandwidth probes: this machine's memory
    moves between ~33 and ~61 GB/s within minutes (docs/LOG.md), so a run is set against the probes beside it."""
    name = "v2-lite-slice"
    info = prepare(name, out, ("bf16", "q8_0") if args.int8 else ("bf16",))
    import torch

    prompts = torch.randint(3, 1024, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1)).tolist()
    common = {"prompts": json.dumps(prompts), "threads": args.threads, "repeats": args.repeats}
    engines: dict[str, tuple[str, dict[str, Any]]] = {
        "nanoseek bf16": (sys.executable, {"engine": "nanoseek", "model_dir": info["dir"], "dtype": "bfloat16"})}
    if args.int8:
        engines["nanoseek int8"] = (sys.executable, {"engine": "nanoseek", "model_dir": info["dir"],
                                                     "dtype": "bfloat16", "int8": True})
    if args.llama_python:
        engines["llama.cpp bf16"] = (args.llama_python, {"engine": "llama", "dtype": "bfloat16",
                                                         "model_dir": str(out / f"{name}-bf16.gguf")})
        if args.int8:
            engines["llama.cpp Q8_0"] = (args.llama_python, {"engine": "llama", "dtype": "bfloat16",
                                                             "model_dir": str(out / f"{name}-q8_0.gguf")})
    probes = [spawn(sys.executable, "membw", threads=args.threads)["read_GBps"]]
    rounds: list[dict[str, dict[str, Any]]] = []
    failed: dict[str, str] = {}
    for _ in range(args.rounds):
        rd: dict[str, dict[str, Any]] = {}
        for k, (python, kw) in engines.items():
            if k in failed:
                continue
            try:  # a failure here (the int8 path) must not cost the run's other rows
                rd[k] = spawn(python, **kw, **common)
            except RuntimeError as e:
                if k == "nanoseek bf16":
                    raise
                failed[k] = str(e)[-2000:]
                print(f"{k} failed: {e}", flush=True)
                continue
            probes.append(spawn(sys.executable, "membw", threads=args.threads)["read_GBps"])
            rd[k]["read_GBps"] = max(probes[-2:])  # the faster of the probes just before and just after
        rounds.append(rd)
    runs = pooled(rounds)
    row: dict[str, Any] = {"read_GBps": probes, "model": info, "failed": failed, "rounds": args.rounds}
    for k, r in runs.items():
        s = summary(r, 1)
        bytes_tok = info["bytes_read_per_token"]["q8_0" if "Q8_0" in k else "int8" if "int8" in k else "bf16"]
        s["weight_bytes_per_token"] = bytes_tok
        s["quantize_s"] = r.get("quantize_s")
        s["weights_GBps"] = bytes_tok * s["tok_s"] / 1e9
        # each round's stream against the probes beside it, then the median over rounds
        by_round = [bytes_tok * NEW_TOKENS / statistics.median(rd[k]["times"]) / 1e9 / rd[k]["read_GBps"]
                    for rd in rounds]
        s["of_read_bw_by_round"] = by_round
        s["of_read_bw"] = statistics.median(by_round)
        row[k] = s
        print(f"{k}: {s['tok_s']:.1f} tok/s ({s['s_min']:.2f}-{s['s_max']:.2f} s per 128), "
              f"{s['weights_GBps']:.1f} GB/s of weights = {s['of_read_bw']:.0%} of the read bandwidth measured beside "
              f"it (median over rounds: " + " ".join(f"{x:.0%}" for x in by_round) + ")", flush=True)
    print("read-bandwidth probes (GB/s, in order): " + " ".join(f"{x:.1f}" for x in probes), flush=True)
    if "llama.cpp bf16" in runs:
        row["nanoseek / llama.cpp bf16"] = row["nanoseek bf16"]["tok_s"] / row["llama.cpp bf16"]["tok_s"]
        row["best: nanoseek / llama.cpp bf16"] = \
            row["nanoseek bf16"]["tok_s_best"] / row["llama.cpp bf16"]["tok_s_best"]
        row["identical"] = same_tokens(runs["nanoseek bf16"]["tokens"], runs["llama.cpp bf16"]["tokens"])
        lead = _prefix(runs["nanoseek bf16"]["tokens"][0], runs["llama.cpp bf16"]["tokens"][0])
        row["bf16 tokens equal to llama.cpp bf16's"] = lead
        row["ratios by round"] = [statistics.median(rd["llama.cpp bf16"]["times"])
                                  / statistics.median(rd["nanoseek bf16"]["times"]) for rd in rounds]
        print("by round: " + " ".join(f"{x:.2f}x" for x in row["ratios by round"]), flush=True)
        print(f"nanoseek / llama.cpp (bf16): {row['nanoseek / llama.cpp bf16']:.2f}x; identical greedy tokens "
              f"{row['identical']} (the first {lead} of 128 equal)", flush=True)
    row["tokens"] = {k: r["tokens"][0] for k, r in runs.items()}
    if "nanoseek int8" in runs:  # a different precision from the bf16 rows: int8 weights against Q8_0 blocks
        ref = runs["nanoseek bf16"]["tokens"][0]
        row["int8 tokens equal to nanoseek bf16's"] = _prefix(runs["nanoseek int8"]["tokens"][0], ref)
        if "llama.cpp Q8_0" in runs:
            row["int8: nanoseek / llama.cpp Q8_0"] = row["nanoseek int8"]["tok_s"] / row["llama.cpp Q8_0"]["tok_s"]
            row["int8 best: nanoseek / llama.cpp Q8_0"] = \
                row["nanoseek int8"]["tok_s_best"] / row["llama.cpp Q8_0"]["tok_s_best"]
            row["Q8_0 tokens equal to nanoseek bf16's"] = _prefix(runs["llama.cpp Q8_0"]["tokens"][0], ref)
            row["int8 tokens equal to Q8_0's"] = _prefix(runs["nanoseek int8"]["tokens"][0],
                                                         runs["llama.cpp Q8_0"]["tokens"][0])
            print(f"int8 rows (not the bf16 precision): nanoseek int8 / llama.cpp Q8_0 "
                  f"{row['int8: nanoseek / llama.cpp Q8_0']:.2f}x", flush=True)
        print("greedy tokens equal for the first N of 128: " + ", ".join(
            f"{k} {v}" for k, v in row.items() if "tokens equal" in k), flush=True)
    return row


def _prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy outputs share (different precisions: they part at a near-tie)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("regime", nargs="?", choices=("overhead", "bandwidth"))
    ap.add_argument("--out", default="runs/bench-decode", help="models, GGUF files and results.json")
    ap.add_argument("--llama-python", help="a Python with llama-cpp-python (the bench extra); omit: no llama.cpp")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every engine's process this many times, alternating (the timed runs are pooled; each "
                         "round's ratio is printed; bandwidth: a read-bandwidth probe after every run)")
    ap.add_argument("--configs", nargs="+", default=["v3-320", "demo"], choices=("v3-320", "demo"))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--eager", action="store_true", help="also time nanoseek's eager engine (reference)")
    ap.add_argument("--warmup-cold", action="store_true",
                    help="overhead: also time the batch-1 warm-up from an empty compile cache and from a warm one")
    ap.add_argument("--int8", action="store_true",
                    help="bandwidth: also nanoseek weight-only int8 and llama.cpp Q8_0 (int8 rows); child: quantize")
    # child mode (internal)
    ap.add_argument("--child", choices=tuple(CHILDREN))
    ap.add_argument("--model-dir")
    ap.add_argument("--prompts")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--text", default=None)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(CHILDREN[a.child](a)))
        return
    if a.regime is None:
        ap.error("give a regime: overhead | bandwidth")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(f"{a.regime}: {a.threads} threads, {a.repeats} timed runs each, load average {load[0]:.2f} at start",
          flush=True)
    res = overhead(a, out) if a.regime == "overhead" else bandwidth(a, out)
    res["load_average"] = [load, os.getloadavg()]
    res["args"] = {k: v for k, v in vars(a).items() if k not in ("child", "model_dir", "prompts", "text")}
    path = out / f"{a.regime}.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {path}; load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
