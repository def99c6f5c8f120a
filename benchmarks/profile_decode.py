"""Where one decode step's time goes: scheduler, model forward (Python per layer vs kernels), sampling,
detokenizer. The engine's eager step and its compiled step, on the models of benchmarks/decode.py.

Each part is timed on its own, the same work as inside `Engine.step()` (wall time, median of the steps):
- step: one whole `Engine.step()` of n running requests (greedy, with a tokenizer: text is decoded);
- forward: the decode forward alone (`DecodeStep.run` over the same cache rows);
- sampling: `process_logits` + `draw` on that step's logits;
- detokenizer: the incremental decode (`_Text.add`) of one token per request;
- scheduler and bookkeeping: step - forward - sampling - detokenizer (admission, row views, RequestOutputs, ...).
Inside the eager forward, torch.profiler splits the time into aten operators (kernels plus dispatch) and the rest
(Python: module calls, tensor views, the cache bookkeeping); `layer` hooks time attention, MoE and dense MLPs.

    .venv/bin/python benchmarks/profile_decode.py                      # v3-320 and demo, batch 1 and 8, 2 threads
    .venv/bin/python benchmarks/profile_decode.py --configs demo --batches 1 --steps 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import prepare  # noqa: E402

from nanoseek import load  # noqa: E402
from nanoseek.infer import Engine, SamplingParams, SamplingTensors, _Text, draw, process_logits  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402


def timed(fn: Any, n: int) -> float:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def profile(model_dir: str, B: int, compiled: bool, steps: int) -> dict[str, Any]:
    model = load(model_dir).eval()
    tok = Tokenizer.load(model_dir)
    V = model.config.vocab_size
    prompts = torch.randint(3, min(V, 1024), (B, 32), generator=torch.Generator().manual_seed(B)).tolist()
    sp = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    engine = Engine(model, tok, max_batch=B, max_model_len=32 + steps + 16, compile=compiled)
    engine.warmup()
    for p in prompts:
        engine.add_request(p, sp)
    engine.step()  # prefill
    for _ in range(3):
        engine.step()
    out: dict[str, Any] = {}
    with torch.inference_mode():
        out["step"] = timed(engine.step, steps)
        need = max(len(r.prompt) + len(r.output) for r in engine.rows) + 1
        logits = engine._step.run(engine._last[:B, None], engine.cache, need)
        engine.cache.lengths[:B] -= 1  # undo the extra forward's slot (its entries are overwritten next)
        engine.cache.valid[torch.arange(B), engine.cache.lengths[:B]] = False

        def fwd() -> None:
            engine._step.run(engine._last[:B, None], engine.cache, need)
            engine.cache.lengths[:B] -= 1
            engine.cache.valid[torch.arange(B), engine.cache.lengths[:B]] = False

        out["forward"] = timed(fwd, steps)
        st = SamplingTensors.from_params([sp] * B, V)
        out["sampling"] = timed(lambda: draw(process_logits(logits, st), st, engine.generator).tolist(), steps)
        texts = [_Text(tok, sp) for _ in range(B)]
        ids = logits.argmax(-1).tolist()
        out["detokenizer"] = timed(lambda: [t.add(i) for t, i in zip(texts, ids)], steps)
        out["scheduler and bookkeeping"] = out["step"] - out["forward"] - out["sampling"] - out["detokenizer"]
        if not compiled:
            out.update(split_forward(engine, fwd, steps))
    return out


def split_forward(engine: Engine, fwd: Any, steps: int) -> dict[str, float]:
    """Eager forward: aten operators vs Python (torch.profiler), and attention / MoE / dense MLP (module hooks)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fwd()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    aten_self = sum(e.self_cpu_time_total for e in events) / 1e3 / steps  # ms, operators' own time
    n_ops = sum(e.count for e in events) / steps
    parts: dict[str, list[float]] = {"attention": [], "moe": [], "dense mlp": []}
    starts: dict[int, float] = {}

    def pre(m: Any, *_: Any) -> None:
        starts[id(m)] = time.perf_counter()

    def post(kind: str) -> Any:
        def hook(m: Any, *_: Any) -> None:
            parts[kind].append(time.perf_counter() - starts[id(m)])
        return hook

    handles = []
    for layer in engine.model.layers:
        kind = "moe" if type(layer.mlp).__name__ == "MoE" else "dense mlp"
        for mod, k in ((layer.self_attn, "attention"), (layer.mlp, kind)):
            handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post(k))]
    for _ in range(steps):
        fwd()
    for h in handles:
        h.remove()
    return {"forward: aten operators (kernels + dispatch)": aten_self, "forward: aten operator calls": n_ops,
            **{f"forward: {k} (all layers)": sum(v) / steps * 1e3 for k, v in parts.items() if v}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=["v3-320", "demo"], choices=("v3-320", "demo"))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--out", default="runs/bench-decode")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {}
    for name in args.configs:
        info = prepare(name, Path(args.out), ())
        for B in args.batches:
            for compiled in (False, True):
                r = profile(info["dir"], B, compiled, args.steps)
                key = f"{name} batch {B} {'compiled' if compiled else 'eager'}"
                results[key] = r
                print(f"{key}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in r.items()), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
