"""MTP speculative decoding (V3 report section 5.4.3) against plain decoding of the same engine.

On a random model the MTP module's guesses are noise and almost nothing is accepted, so the benchmark first trains
the `small` preset (MTP on; `tiny` with --quick) for 120 steps on a synthetic language: a fixed random successor for
every token, replaced by a random token 20% of the time. The main model learns next = succ(t), the MTP module
succ(succ(t)), which makes drafts acceptable; a real model's acceptance (V3: 85-90% for the second token) depends on
its data. `small` rather than `tiny`: the draft must be cheap next to the main model, and tiny's MTP block costs 75%
of its 2-layer main model (small: 20%; V3: 1 block vs 61 layers). Reported per k (draft tokens per step):
acceptance, tokens per step, and speedup over plain decoding of the same engine, greedy (outputs checked
identical) and sampled (temperature 1). Decode time runs from the first generated token to the last.

Timing on a shared machine: settings are interleaved round-robin and the median of the repeats is reported. With
one torch thread (the default), times are the thread's CPU time (`time.thread_time`); `--threads 2` uses wall time.
(Until 2026-12 this was part 2 of benchmarks/decode.py, which now measures end-to-end decode against transformers
and llama.cpp.)

    .venv/bin/python benchmarks/speculative.py               # ~10 minutes
    .venv/bin/python benchmarks/speculative.py --quick       # smoke run: tiny, short outputs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from nanoseek.infer import Engine, EngineStats, SamplingParams  # noqa: E402
from nanoseek.model import Transformer, build  # noqa: E402


def load_hf(model: Transformer):
    """transformers' model on nanoseek's exported weights (shared with benchmarks/forward.py), in eval mode."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from forward import load_hf as load_hf_train

    return load_hf_train(model).eval()


class Timer:
    """Thread CPU time with one torch thread (robust to other jobs on a shared machine), else wall time."""

    def __init__(self) -> None:
        self.clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
        self.kind = "thread CPU time" if torch.get_num_threads() == 1 else "wall time"


def nanoseek_decode(engine: Engine, prompts: list[list[int]], params: SamplingParams, clock: Callable[[], float]
                    ) -> tuple[float, list[list[int]]]:
    """Returns (decode seconds after the prefill step, tokens per request)."""
    ids = [engine.add_request(p, params) for p in prompts]
    out: dict[str, list[int]] = {i: [] for i in ids}
    for d in engine.step():  # admits every request: the prefill, and the first token
        out[d.request_id] += d.token_ids
    t = clock()
    while engine.has_work():
        for d in engine.step():
            out[d.request_id] += d.token_ids
    return clock() - t, [out[i] for i in ids]


def hf_decode(hf: Any, x: torch.Tensor, n_new: int, clock: Callable[[], float]) -> tuple[float, list[list[int]]]:
    """Returns (decode seconds from the first generated token on, tokens per row)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class Stamp(LogitsProcessor):  # called once per step, after its forward: the first call ends the prefill
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if not stamps:
                stamps.append(clock())
            return scores

    pad = hf.config.pad_token_id if hf.config.pad_token_id is not None else 0
    with torch.inference_mode():
        seq = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n_new, min_new_tokens=n_new,
                          do_sample=False, pad_token_id=pad, logits_processor=LogitsProcessorList([Stamp()]))
    return clock() - stamps[0], seq[:, x.shape[1]:].tolist()


def round_robin(runs: dict[Any, Callable[[], tuple[float, list[list[int]]]]], repeats: int
                ) -> tuple[dict[Any, float], dict[Any, list[list[int]]]]:
    """Median time per setting, running one of each in turn so that background load hits all of them alike."""
    times: dict[Any, list[float]] = {k: [] for k in runs}
    outs: dict[Any, list[list[int]]] = {}
    for _ in range(repeats):
        for k, run in runs.items():
            t, outs[k] = run()
            times[k].append(t)
    return {k: statistics.median(v) for k, v in times.items()}, outs


# ---- MTP speculative decoding on a briefly trained model ----------------------------------------------------------


def synthetic_batch(succ: torch.Tensor, B: int, T: int, noise: float, g: torch.Generator) -> torch.Tensor:
    """Token t+1 = succ[t] (a fixed random map), or a uniformly random token with probability `noise`."""
    V = succ.numel()
    x = torch.empty(B, T, dtype=torch.long)
    x[:, 0] = torch.randint(3, V, (B,), generator=g)
    for t in range(1, T):
        rnd = torch.rand(B, generator=g) < noise
        x[:, t] = torch.where(rnd, torch.randint(3, V, (B,), generator=g), succ[x[:, t - 1]])
    return x


def train_mtp_model(preset: str, steps: int) -> tuple[Transformer, torch.Tensor, dict[str, Any]]:
    torch.manual_seed(0)
    model = build(preset)
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    succ = torch.cat([torch.arange(3), torch.randperm(V - 3, generator=g) + 3])  # specials map to themselves
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    t = time.perf_counter()
    out: dict[str, torch.Tensor] = {}
    for _ in range(steps):
        x = synthetic_batch(succ, 16, 65, 0.2, g)
        out = model.loss(x[:, :-1], x[:, 1:], mtp_lambda=1.0)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
    info = {"preset": preset, "steps": steps, "main_loss": out["main"].item(), "mtp_loss": out["mtp"].item(),
            "train_s": time.perf_counter() - t}
    print(f"\n== MTP speculative decoding: `{preset}` preset trained {steps} steps on the synthetic successor language "
          f"({info['train_s']:.0f}s): main loss {info['main_loss']:.2f}, MTP loss {info['mtp_loss']:.2f} "
          f"(20% noise: the floor is ~{-(0.8 * torch.tensor(0.8).log() + 0.2 * torch.tensor(0.2 / V).log()):.2f})")
    return model.eval(), succ, info


def fresh_stats_decode(engine: Engine, prompts: list[list[int]], params: SamplingParams,
                       clock: Callable[[], float]) -> tuple[float, list[list[int]]]:
    engine.stats = EngineStats()  # acceptance of the last run only
    return nanoseek_decode(engine, prompts, params, clock)


def bench_speculative(args: argparse.Namespace, timer: Timer) -> dict[str, Any]:
    model, succ, info = train_mtp_model(args.spec_preset, args.train_steps)
    hf = load_hf(model)  # transformers runs the same main model (it has no MTP: the module's weights are dropped)
    P, N = args.prompt_len, args.new_tokens
    result: dict[str, Any] = {"training": info, "runs": []}
    for label, temperature in (("greedy", 0.0), ("sampled T=1", 1.0)):
        for B in args.batches:
            g = torch.Generator().manual_seed(B)
            prompts = synthetic_batch(succ, B, P, 0.2, g).tolist()
            params = SamplingParams(max_tokens=N, temperature=temperature, seed=0, ignore_eos=True)
            engines = {k: Engine(model, max_batch=B, max_model_len=P + N, num_speculative_tokens=k, compile=False)
                       # eager all: speculative steps run eagerly, so the plain engine does too (like for like)
                       for k in (0, *args.draft_tokens)}
            for e in engines.values():  # warm-up
                nanoseek_decode(e, prompts, replace(params, max_tokens=4), timer.clock)
            runs: dict[Any, Callable[[], tuple[float, list[list[int]]]]] = {
                k: partial(fresh_stats_decode, e, prompts, params, timer.clock) for k, e in engines.items()}
            if temperature == 0:
                runs["transformers"] = partial(hf_decode, hf, torch.tensor(prompts), N, timer.clock)
            med, outs = round_robin(runs, args.repeats)
            hf_note = ""
            if temperature == 0:
                hf_note = (f" | plain nanoseek vs transformers {med['transformers'] / med[0]:.2f}x, identical "
                           f"{sum(a == b for a, b in zip(outs[0], outs['transformers']))}/{B}")
            print(f"   {label}, batch {B}" + hf_note)
            for k in args.draft_tokens:
                s = engines[k].stats
                speedup = med[0] / med[k]
                same = sum(a == b for a, b in zip(outs[k], outs[0])) if temperature == 0 else None
                vs_hf = med["transformers"] / med[k] if temperature == 0 else None
                print(f"      k={k}: acceptance {s.acceptance_rate:5.1%}, {s.tokens_per_verify:.2f} tokens/step, "
                      f"speedup {speedup:.2f}x over plain decoding"
                      + (f", {vs_hf:.2f}x over transformers, identical outputs {same}/{B}" if same is not None
                         else ""))
                result["runs"].append({"mode": label, "batch": B, "k": k, "acceptance": s.acceptance_rate,
                                       "tokens_per_step": s.tokens_per_verify, "speedup": speedup,
                                       "vs_transformers": vs_hf, "identical_outputs": same})
    # the same engine on the untrained model: the MTP guesses are noise
    torch.manual_seed(0)
    raw = build(args.spec_preset).eval()
    prompts = synthetic_batch(succ, 1, P, 0.2, torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True)
    # eager both (the compiled decode step covers plain decoding only): the cost of drafting, like for like
    plain = Engine(raw, max_batch=1, max_model_len=P + N, compile=False)
    spec = Engine(raw, max_batch=1, max_model_len=P + N, num_speculative_tokens=1, compile=False)
    tp, ts = [], []
    for _ in range(args.repeats):
        tp.append(nanoseek_decode(plain, prompts, params, timer.clock)[0])
        ts.append(nanoseek_decode(spec, prompts, params, timer.clock)[0])
    speedup = statistics.median(tp) / statistics.median(ts)
    print(f"   untrained `{args.spec_preset}`, greedy, batch 1, k=1: acceptance {spec.stats.acceptance_rate:.1%}, "
          f"speedup {speedup:.2f}x (the cost of drafting when nothing is accepted)")
    result["untrained"] = {"acceptance": spec.stats.acceptance_rate, "speedup": speedup}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny, short outputs, few train steps")
    ap.add_argument("--json", help="write the results to this file")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: thread CPU time is timed)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=120)
    ap.add_argument("--spec-preset", default="small", help="preset trained for the MTP part (default small)")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    args = ap.parse_args()
    if args.quick:
        args.new_tokens, args.repeats, args.train_steps, args.spec_preset = 16, 1, 30, "tiny"
    args.draft_tokens = (1, 2, 3)
    torch.set_num_threads(args.threads)
    timer = Timer()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); times are {timer.kind}, median of "
          f"{args.repeats} round-robin runs")
    results: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k != "json"}, "timing": timer.kind,
                               "speculative": bench_speculative(args, timer)}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
