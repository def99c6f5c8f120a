"""Training step throughput: nanoseek vs transformers' DeepseekV3ForCausalLM, with the optimizer, on this CPU.

A step = forward + next-token loss + backward + gradient clipping + AdamW step, on the same config, the same
initial weights (nanoseek's `save_pretrained` directory loaded by transformers), the same batch and the same
optimizer settings. nanoseek runs its real training objective without MTP (`model.loss(..., mtp_lambda=0,
balance_alpha=0)`, so both sides do the same work; configs have no MTP module since transformers has none) and
the aux-loss-free router-bias update, as `nanoseek train` does. Settings are timed round-robin (one step each
in turn) so background load hits all alike; medians after warm-up.

MFU = (6 x activated params + attention FLOPs) x tokens/s / the measured matmul peak of the dtype used.

    .venv/bin/python benchmarks/train_step.py            # small + wide
    .venv/bin/python benchmarks/train_step.py --quick    # small only, few steps
    .venv/bin/python benchmarks/train_step.py --threads 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import forward as fb  # noqa: E402  (shared helpers: machine facts, matmul peak, HF loading, configs)

from nanoseek.model import ModelConfig, build  # noqa: E402


def make_settings(cfg: ModelConfig, include_hf: bool = True) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    ours = build(cfg)
    settings = []

    def nanoseek_step(model, opt, autocast, compile=False):
        def objective(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return model.loss(x, y, mtp_lambda=0.0, balance_alpha=0.0)["loss"]

        # compile: `nanoseek train`'s `compile = true` (the expert dispatch runs eagerly between graphs)
        loss_fn = torch.compile(objective) if compile else objective

        def run(ids: torch.Tensor) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = loss_fn(ids[:, :-1], ids[:, 1:])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.update_router_bias(1e-3)
        return run

    def hf_step(model, opt):
        def run(ids: torch.Tensor) -> None:
            logits = model(ids[:, :-1]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    def adamw(params):
        # fused, as nanoseek's trainer (and transformers' Trainer default, adamw_torch_fused) use
        return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    if include_hf:
        hf = fb.load_hf(ours).train()
        settings.append({"name": "transformers fp32", "run": hf_step(hf, adamw(hf.parameters())), "dtype": "fp32"})
    a = build(cfg)
    a.load_state_dict(ours.state_dict())
    settings.append({"name": "nanoseek fp32", "run": nanoseek_step(a, adamw(a.parameters()), False), "dtype": "fp32"})
    c = build(cfg)
    c.load_state_dict(ours.state_dict())
    settings.append({"name": "nanoseek fp32 compiled", "run": nanoseek_step(c, adamw(c.parameters()), False, True),
                     "dtype": "fp32"})
    b = build(cfg)
    b.load_state_dict(ours.state_dict())
    settings.append({"name": "nanoseek bf16 autocast", "run": nanoseek_step(b, adamw(b.parameters()), True),
                     "dtype": "bf16"})
    d = build(cfg)
    d.load_state_dict(ours.state_dict())
    settings.append({"name": "nanoseek bf16 compiled", "run": nanoseek_step(d, adamw(d.parameters()), True, True),
                     "dtype": "bf16"})
    return settings


def bench(name: str, overrides: dict[str, Any], args: argparse.Namespace, peaks: dict[str, float]) -> dict[str, Any]:
    cfg = ModelConfig.from_preset("small", **overrides)
    settings = make_settings(cfg)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {s["name"]: [] for s in settings}
    for i in range(args.warmup + args.steps):
        for s in settings:
            t = fb.CLOCK()
            s["run"](ids)
            if i >= args.warmup:
                times[s["name"]].append(fb.CLOCK() - t)
    model = build(cfg, device="meta")
    flops_per_token = 6 * fb.activated_params(model) + fb.attention_flops_per_token(cfg, args.seq)
    tokens = args.batch * args.seq
    rows = []
    for s in settings:
        med = statistics.median(times[s["name"]])
        tps = tokens / med
        rows.append({"setting": s["name"], "step_s": med, "tokens_per_s": tps,
                     "mfu": flops_per_token * tps / (peaks[s["dtype"]] * 1e9)})
    base = next(r for r in rows if r["setting"] == "transformers fp32")["tokens_per_s"]
    for r in rows:
        r["vs_transformers_fp32"] = r["tokens_per_s"] / base
    return {"config": name, "batch": args.batch, "seq": args.seq, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=5,
                   help="untimed steps first (bf16: oneDNN JIT-compiles a kernel per new expert token count)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        if args.threads == 1:
            fb.CLOCK = __import__("time").thread_time  # CPU time of this thread: immune to other jobs' load
    if args.quick:
        args.steps, args.warmup = 2, 1
    peaks = {"fp32": fb.matmul_peak(torch.float32), "bf16": fb.matmul_peak(torch.bfloat16)}
    print(f"machine: {fb.machine()}")
    print(f"matmul peak GFLOP/s: fp32 {peaks['fp32']:.0f}, bf16 {peaks['bf16']:.0f}")
    results = []
    for name, overrides in fb.CONFIGS.items():
        if args.quick and name != "small":
            continue
        res = bench(name, overrides, args, peaks)
        results.append(res)
        print(f"\n{name} (batch {res['batch']} x seq {res['seq']}, AdamW, grad clip):")
        print(f"  {'setting':26s} {'step s':>8s} {'tok/s':>9s} {'MFU':>7s} {'vs HF fp32':>11s}")
        for r in res["rows"]:
            print(f"  {r['setting']:26s} {r['step_s']:8.3f} {r['tokens_per_s']:9.0f} {100 * r['mfu']:6.1f}% "
                  f"{r['vs_transformers_fp32']:10.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"peaks_gflops": peaks, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
