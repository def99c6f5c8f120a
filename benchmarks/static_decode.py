"""Prototype for a static-shape decode step under `torch.compile` (the open lever of docs/inference.md).

The engine's eager decode step is bound by per-op dispatch (~9,000 aten calls per `small` step). This script
measures what one compiled graph per step would give, without changing the engine: a KV cache whose `begin`
attends over the whole preallocated buffer with a mask (no `int(lengths.max())` host sync, static shapes) and a
static expert dispatch — `gathered` (the selected experts' weights gathered per token-slot, then `bmm`) or
`dense` (every expert on every token, weighted by a routing matrix that is zero off the top-k). Greedy tokens are
compared with the eager step. `small` preset, random weights, fp32, 1 thread, thread CPU time, 30-token prompts.

    .venv/bin/python benchmarks/static_decode.py --batch 1                  # ~1 minute (compile ~25 s)
    .venv/bin/python benchmarks/static_decode.py --batch 16 --experts dense

Measured 2026-11-23: batch 1 gathered 6.48 -> 2.11 ms/step (3.07x, identical tokens; one graph, no breaks once
the expert-load count used scatter_add instead of bincount); batch 16: gathered 15.85 -> 14.32 ms (1.11x), dense
20.3-21.9 ms (0.7x: 8x the expert FLOPs, as einsum or per-expert bmm alike). The engine has the gathered variant
as `Engine(compile=True)`; batch >= 16 still needs a static dispatch that stays cheap there.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
torch.set_num_threads(1)
from nanoseek.model import Experts, KVCache, ModelConfig, build  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("--experts", choices=["gathered", "dense"], default="gathered")
ap.add_argument("--explain", action="store_true", help="also print torch._dynamo.explain's graph breaks")
args = ap.parse_args()
B = args.batch
MAXLEN = 128

class StaticKVCache(KVCache):
    def begin(self, T, attention_mask):
        end = self.max_len
        ar = torch.arange(T, device=self.lengths.device)
        self._slots = self.lengths[:, None] + ar
        self.valid.scatter_(1, self._slots, torch.ones_like(self._slots, dtype=torch.bool))
        self._end = end
        key_pos = torch.arange(end, device=self.lengths.device)
        mask = (key_pos[None, None, :] <= self._slots[:, :, None]) & self.valid[:, None, :end]
        mask |= key_pos[None, None, :] == self._slots[:, :, None]
        return mask[:, None]
    def next_positions(self, attention_mask, T):
        return self.lengths[:, None] + torch.arange(T)

def gathered(self, x, idx, w):
    N, K = idx.shape
    f = idx.flatten()
    xs = x.repeat_interleave(K, 0)[:, :, None]
    h = F.silu(torch.bmm(self.gate_proj[f], xs)) * torch.bmm(self.up_proj[f], xs)
    y = torch.bmm(self.down_proj[f], h).squeeze(-1)
    return (y * w.flatten()[:, None].to(y.dtype)).view(N, K, -1).sum(1)

def dense(self, x, idx, w):
    # every expert on every token, weighted by a (N, E) routing matrix that is zero off the top-k: static shapes
    N, K = idx.shape
    E, I, D = self.gate_proj.shape
    gate = torch.zeros(N, E, dtype=x.dtype).scatter_(1, idx, w.to(x.dtype))
    h = F.silu(x @ self.gate_proj.reshape(E * I, D).T) * (x @ self.up_proj.reshape(E * I, D).T)
    h = (h.view(N, E, I) * gate[:, :, None]).transpose(0, 1)  # (E, N, I)
    return torch.bmm(h, self.down_proj.transpose(1, 2)).sum(0)  # per-expert GEMMs, then the weighted sum

STATIC = gathered if args.experts == "gathered" else dense
cfg = ModelConfig.from_preset("small", vocab_size=512, num_nextn_predict_layers=0)
torch.manual_seed(0)
m = build(cfg).eval()
prompt = torch.randint(0, 512, (B, 30))

def run(cache_cls, step_fn, n=64):
    cache = cache_cls(cfg, B, MAXLEN, absorb=None)
    with torch.no_grad():
        h, _ = m.trunk(prompt, cache=cache)
        tok = m.lm_head(h[:, -1]).argmax(-1)
        out = [tok]
        t = None
        for i in range(n):
            if i == 2:
                t = time.thread_time()
            tok = step_fn(tok, cache)
            out.append(tok)
        dt = (time.thread_time() - t) / (n - 2) * 1e3
    return dt, torch.stack(out, 1)

def eager_step(tok, cache):
    pos = cache.lengths[:, None].clone()
    h, _ = m.trunk(tok[:, None], position_ids=pos, cache=cache)
    return m.lm_head(h[:, 0]).argmax(-1)

dt_e, out_e = run(KVCache, eager_step)
print(f"eager engine-style step: {dt_e:.2f} ms")
Experts.forward = STATIC
dt_s, out_s = run(StaticKVCache, eager_step)
print(f"eager static cache + {args.experts} experts: {dt_s:.2f} ms, same tokens: {torch.equal(out_e, out_s)}")
compiled = torch.compile(eager_step, dynamic=False, fullgraph=False)
t0 = time.perf_counter()
run(StaticKVCache, compiled, n=4)
print(f"compile warm-up {time.perf_counter() - t0:.1f}s")
dt_c, out_c = run(StaticKVCache, compiled)
print(f"compiled static step ({args.experts}): {dt_c:.2f} ms, same tokens: {torch.equal(out_e, out_c)}; "
      f"{dt_e / dt_c:.2f}x the eager engine-style step")
if args.explain:
    import torch._dynamo as dynamo
    cache = StaticKVCache(cfg, B, MAXLEN)
    with torch.no_grad():
        m.trunk(prompt, cache=cache)
        ex = dynamo.explain(eager_step)(out_e[:, 0], cache)
    print("graphs", ex.graph_count, "breaks", ex.graph_break_count)
    for b in ex.break_reasons[:8]:
        print(" -", str(b.reason)[:200], "|", b.user_stack[-1] if b.user_stack else "")
