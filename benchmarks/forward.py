"""Forward+backward throughput: nanoseek vs transformers' DeepseekV3ForCausalLM on this CPU.

Both models hold the same weights (nanoseek's `save_pretrained` directory loaded with
`AutoModelForCausalLM.from_pretrained(dir, dtype=torch.float32)`), see the same batch and compute the same
loss: plain next-token cross entropy on the logits,
`F.cross_entropy(logits[:, :-1].float(), input_ids[:, 1:])`.
nanoseek goes through its logits path `model(input_ids)` (no MTP, no balance loss), so both do the same work.
The benchmark configs set `num_nextn_predict_layers=0`: transformers has no MTP modules.

One step = forward + loss + backward (no optimizer). Settings are timed round-robin (one step of each in
turn) so that background load on a shared machine hits all of them alike; the reported time is the median over
the timed steps, after warm-up steps. Before timing, the fp32 logits of the two models are compared (max abs
diff).

MFU uses training FLOPs/token = 6 x activated parameters (everything but the embedding, with only
num_experts_per_tok of the n_routed_experts routed experts per MoE layer; attention score FLOPs not counted)
and the peak measured here: a 2048x2048 matmul in fp32 (fp32 settings) or bf16 (bf16 settings).

    .venv/bin/python benchmarks/forward.py            # small + wide, ~3-4 minutes on 2 cores
    .venv/bin/python benchmarks/forward.py --quick    # smoke run: small only, few steps
    .venv/bin/python benchmarks/forward.py --compile  # also nanoseek bf16 + torch.compile (slow to compile)
    .venv/bin/python benchmarks/forward.py --json results.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from nanoseek import save_pretrained  # noqa: E402
from nanoseek.model import ModelConfig, Transformer, build  # noqa: E402

# Benchmark configs. "small" is the preset (minus MTP); "wide" doubles the width, heads and experts.
CONFIGS: dict[str, dict[str, Any]] = {
    "small": {"num_nextn_predict_layers": 0},
    "wide": {
        "num_nextn_predict_layers": 0, "hidden_size": 512, "intermediate_size": 1536,
        "moe_intermediate_size": 256, "num_attention_heads": 16, "q_lora_rank": 256, "kv_lora_rank": 128,
        "n_routed_experts": 64, "num_experts_per_tok": 6, "n_group": 8, "topk_group": 4,
    },
}
ONEDNN_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ISA = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
SHOWN = ("hidden_size", "num_hidden_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
         "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size", "moe_intermediate_size",
         "n_routed_experts", "num_experts_per_tok", "n_shared_experts", "first_k_dense_replace", "vocab_size")


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "?"
    flags: set[str] = set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and cpu in ("?", "x86_64", ""):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    import transformers

    return {"cpu": cpu, "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "isa": sorted(f for f in flags if f in ISA),
            "onednn_primitive_cache_capacity": os.environ.get(ONEDNN_ENV, "1024 (default)")}


CLOCK = time.perf_counter  # wall time; time.thread_time with --threads 1 (see main)


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """GFLOP/s of an n x n x n matmul: best of reps (a peak; other jobs on a shared machine only lower it)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(3):
        a @ b
    ts = []
    for _ in range(reps):
        t = CLOCK()
        a @ b
        ts.append(CLOCK() - t)
    return 2 * n**3 / min(ts) / 1e9


def activated_params(model: Transformer) -> int:
    """Parameters used per token: all but the embedding; routed experts count K/E of their size."""
    cfg = model.config
    n = 0
    for name, p in model.named_parameters():
        if name.startswith("embed_tokens.") or name.startswith("mtp."):
            continue
        if ".mlp.experts." in name:
            n += p.numel() * cfg.num_experts_per_tok // cfg.n_routed_experts
        else:
            n += p.numel()
    return n


def attention_flops_per_token(cfg: ModelConfig, seq: int) -> float:
    """Training FLOPs/token of the causal score and value matmuls (not in 6N): 6 x L x H x (qk + v) x T/2."""
    per_layer = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq / 2
    return 6 * cfg.num_hidden_layers * per_layer


def load_hf(model: Transformer):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(model, d)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    return hf


@dataclass
class Setting:
    name: str
    impl: str  # nanoseek | transformers
    dtype: str  # fp32 | bf16
    fn: Callable[[torch.Tensor], torch.Tensor]  # input_ids -> logits
    params: Any
    times: list[float] = field(default_factory=list)
    error: str | None = None
    compile_s: float | None = None


def step(s: Setting, ids: torch.Tensor) -> float:
    for p in s.params:
        p.grad = None
    t = CLOCK()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=s.dtype == "bf16"):
        logits = s.fn(ids)
    loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return CLOCK() - t


def bench_config(name: str, args: argparse.Namespace, peaks: dict[str, float]) -> dict[str, Any]:
    cfg = ModelConfig.from_preset("small", **CONFIGS[name])
    torch.manual_seed(0)
    nano = build(cfg).train()
    hf = load_hf(nano).train()
    B, T = args.batch, args.seq
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))

    n_act, n_total = activated_params(nano), nano.num_params()
    hf_impl = f"attn={hf.config._attn_implementation}, experts={hf.config._experts_implementation}"
    print(f"\n== {name}: {n_total / 1e6:.1f}M params, {n_act / 1e6:.2f}M activated (non-embedding), "
          f"batch {B} x seq {T} = {B * T} tokens/step")
    print("   " + ", ".join(f"{k}={getattr(cfg, k)}" for k in SHOWN))
    print(f"   transformers: DeepseekV3ForCausalLM ({hf_impl})")

    # apples to apples: same logits in fp32 (and, for information, under bf16 autocast). Routing is a top-k: a
    # token whose expert scores nearly tie can pick another expert after a 1e-6 rounding difference, and its
    # logits (and those of later tokens attending to it) then differ by O(0.1). Such flips are counted.
    routes: dict[str, list[torch.Tensor]] = {"nanoseek": [], "transformers": []}
    hooks = [m.register_forward_hook(lambda _m, _a, o: routes["nanoseek"].append(o[1].sort(-1).values))
             for m in nano.routers()]
    hooks += [m.register_forward_hook(lambda _m, _a, o: routes["transformers"].append(o[2].sort(-1).values))
              for m in hf.modules() if type(m).__name__.endswith("TopkRouter")]
    with torch.no_grad():
        a, b = nano(ids), hf(ids).logits
        for h in hooks:
            h.remove()
        pairs = zip(routes["nanoseek"], routes["transformers"], strict=True)
        flipped = torch.stack([(x != y).any(-1).view(B, T) for x, y in pairs])  # (layers, B, T)
        flips, decisions = int(flipped.sum()), flipped.numel()
        clean = ~flipped.any(0).any(-1)  # sequences where every token took the same experts in both models
        seq_diff = (a - b).abs().flatten(1).amax(-1)  # (B,)
        diff = seq_diff.max().item()
        diff_clean = seq_diff[clean].max().item() if clean.any() else float("nan")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a16, b16 = nano(ids).float(), hf(ids).logits.float()
        diff16 = (a16 - b16).abs().max().item()
        loss_n = F.cross_entropy(a[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()
        loss_h = F.cross_entropy(b[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()
    del a, b, a16, b16
    print(f"   fp32 logits max |nanoseek - transformers| = {diff_clean:.2e} over the {int(clean.sum())}/{B} "
          f"sequences with identical routing; {diff:.2e} over all ({flips} of {decisions} token-layer "
          f"routings differ: top-k near-ties); loss {loss_n:.6f} vs {loss_h:.6f}")
    print(f"   (bf16 autocast, for information: max |diff| {diff16:.2e}: bf16 rounding differs between the "
          "two and flips more top-k routing choices)")
    if not diff_clean < 1e-3 or flips > 1e-3 * decisions or abs(loss_n - loss_h) > 1e-3:
        raise SystemExit("fp32 outputs disagree: the comparison would not be apples to apples")

    def hf_fn(x: torch.Tensor) -> torch.Tensor:
        return hf(x).logits

    settings = [
        Setting("transformers fp32", "transformers", "fp32", hf_fn, list(hf.parameters())),
        Setting("nanoseek fp32", "nanoseek", "fp32", nano, list(nano.parameters())),
        Setting("transformers bf16-autocast", "transformers", "bf16", hf_fn, list(hf.parameters())),
        Setting("nanoseek bf16-autocast", "nanoseek", "bf16", nano, list(nano.parameters())),
    ]
    if args.compile:
        torch.manual_seed(0)
        nano_c = build(cfg).train()
        nano_c.load_state_dict(nano.state_dict())
        settings.append(Setting("nanoseek bf16-autocast+compile", "nanoseek", "bf16", torch.compile(nano_c),
                                list(nano_c.parameters())))

    for s in settings:  # warm-up (and compilation)
        t0 = time.perf_counter()
        try:
            for _ in range(args.warmup):
                step(s, ids)
        except Exception as e:  # report and skip (e.g. torch.compile failures)
            s.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            print(f"   {s.name}: FAILED ({s.error})")
        if "compile" in s.name:
            s.compile_s = time.perf_counter() - t0
            print(f"   {s.name}: warm-up incl. compilation {s.compile_s:.1f}s")
    for _ in range(args.iters):  # round-robin: one step of each setting in turn
        for s in settings:
            if s.error is None:
                s.times.append(step(s, ids))

    flops_tok = 6 * n_act
    attn_tok = attention_flops_per_token(cfg, T)
    rows = []
    for s in settings:
        if s.error is not None:
            rows.append({"setting": s.name, "impl": s.impl, "dtype": s.dtype, "error": s.error})
            continue
        med, best = statistics.median(s.times), min(s.times)
        tps = B * T / med
        rows.append({"setting": s.name, "impl": s.impl, "dtype": s.dtype, "median_s": med, "min_s": best,
                     "max_s": max(s.times), "times_s": s.times, "tokens_per_s": tps,
                     "tokens_per_s_best": B * T / best, "gflops": tps * flops_tok / 1e9,
                     "mfu": tps * flops_tok / (peaks[s.dtype] * 1e9), "compile_s": s.compile_s})
    by = {r["setting"]: r for r in rows}

    head = (f"{'setting':<32}{'median s':>9}{'min-max s':>13}{'tokens/s':>10}{'(best)':>8}{'GFLOP/s':>9}"
            f"{'MFU':>7}")
    print(f"\n   {head}")
    for r in rows:
        if "error" in r:
            print(f"   {r['setting']:<32}  failed: {r['error']}")
            continue
        print(f"   {r['setting']:<32}{r['median_s']:>9.3f}{r['min_s']:>7.2f}-{r['max_s']:<5.2f}"
              f"{r['tokens_per_s']:>10.0f}{r['tokens_per_s_best']:>8.0f}{r['gflops']:>9.1f}"
              f"{100 * r['mfu']:>6.1f}%")
    nano_best = max((r for r in rows if r["impl"] == "nanoseek" and "tokens_per_s" in r),
                    key=lambda r: r["tokens_per_s"])
    ratios = {}
    for label, num, den in [
        ("nanoseek/transformers fp32", "nanoseek fp32", "transformers fp32"),
        ("nanoseek/transformers bf16-autocast", "nanoseek bf16-autocast", "transformers bf16-autocast"),
        (f"nanoseek best ({nano_best['setting']})/transformers default fp32", nano_best["setting"],
         "transformers fp32"),
    ]:
        if "tokens_per_s" in by.get(num, {}) and "tokens_per_s" in by.get(den, {}):
            r_med = by[num]["tokens_per_s"] / by[den]["tokens_per_s"]
            r_best = by[num]["tokens_per_s_best"] / by[den]["tokens_per_s_best"]
            ratios[label] = {"median": r_med, "best": r_best}
            print(f"   ratio {label}: {r_med:.2f}x (best-step ratio {r_best:.2f}x)")
    print(f"   (FLOPs/token: 6N = {flops_tok / 1e6:.1f}M; attention scores/values add {attn_tok / 1e6:.1f}M "
          f"= {100 * attn_tok / flops_tok:.0f}% more, not counted in MFU)")
    return {"config": {k: getattr(cfg, k) for k in SHOWN}, "overrides_of_small": CONFIGS[name],
            "params_total": n_total, "params_activated": n_act, "flops_per_token_6n": flops_tok,
            "attention_flops_per_token": attn_tok, "batch": B, "seq_len": T, "warmup": args.warmup,
            "iters": args.iters, "transformers_impl": hf_impl, "logits_max_abs_diff_fp32": diff,
            "logits_max_abs_diff_fp32_same_routing": diff_clean, "sequences_same_routing": int(clean.sum()),
            "routing_flips_fp32": flips, "routing_decisions": decisions,
            "loss_fp32": {"nanoseek": loss_n, "transformers": loss_h},
            "logits_max_abs_diff_bf16_autocast": diff16, "results": rows, "ratios": ratios}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: small config only, 1 warm-up + 3 steps")
    ap.add_argument("--compile", action="store_true", help="also time nanoseek bf16 autocast + torch.compile")
    ap.add_argument("--json", type=Path, help="write the results to this JSON file")
    ap.add_argument("--onednn-cache", type=int, default=None, metavar="N",
                    help="set ONEDNN_PRIMITIVE_CACHE_CAPACITY=N (oneDNN: 1024; nanoseek sets 16384) before the "
                         "first oneDNN call; see docs/benchmarks.md")
    ap.add_argument("--configs", default=None, help=f"comma-separated subset of {','.join(CONFIGS)}")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's, = cores). With 1, steps are timed in thread CPU "
                         "time, which other jobs on a shared machine do not inflate")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per setting (default 2, quick 1)")
    ap.add_argument("--iters", type=int, default=None, help="timed steps per setting (default 7, quick 3)")
    args = ap.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.iters = args.iters if args.iters is not None else (3 if args.quick else 7)
    names = args.configs.split(",") if args.configs else (["small"] if args.quick else list(CONFIGS))
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown config(s) {unknown}; available: {', '.join(CONFIGS)}")
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)

    if args.onednn_cache is not None:  # read by oneDNN when it builds its primitive cache (first bf16 matmul)
        os.environ[ONEDNN_ENV] = str(args.onednn_cache)
    global CLOCK
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        if args.threads == 1:
            CLOCK = time.thread_time
    info = machine()
    print(f"machine: {info['cpu']}, nproc {info['nproc']}, torch threads {info['torch_threads']}, "
          f"torch {info['torch']}, transformers {info['transformers']}, ISA {' '.join(info['isa'])}, "
          f"ONEDNN_PRIMITIVE_CACHE_CAPACITY={info['onednn_primitive_cache_capacity']}")
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"matmul peak (2048^3, best of 10): fp32 {peaks['fp32']:.0f} GFLOP/s, "
          f"bf16 {peaks['bf16']:.0f} GFLOP/s")
    clock = "thread CPU time" if CLOCK is time.thread_time else "wall time"
    print(f"step = forward + next-token cross entropy + backward; {args.warmup} warm-up + {args.iters} timed "
          f"steps per setting, round-robin, median reported; {clock}")
    out = {"machine": info, "matmul_peak_gflops": peaks, "clock": clock, "threads": torch.get_num_threads(),
           "loss": "F.cross_entropy(logits[:, :-1].float(), input_ids[:, 1:]); nanoseek via model(input_ids)",
           "configs": {}}
    for name in names:
        out["configs"][name] = bench_config(name, args, peaks)
    # other jobs on a shared machine lower a measured peak (and so inflate MFU): measure again at the end and
    # also give MFU against the best peak seen in the run
    again = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    best = {k: max(peaks[k], again[k]) for k in peaks}
    out["matmul_peak_gflops_end"], out["matmul_peak_gflops_best"] = again, best
    print(f"\nmatmul peak again at the end: fp32 {again['fp32']:.0f} GFLOP/s, bf16 {again['bf16']:.0f} "
          "GFLOP/s. MFU against the best peak of the run:")
    for name, res in out["configs"].items():
        for r in res["results"]:
            if "tokens_per_s" in r:
                r["mfu_best_peak"] = r["gflops"] / best[r["dtype"]]
                print(f"   {name:<6} {r['setting']:<32} {100 * r['mfu_best_peak']:5.1f}%")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
