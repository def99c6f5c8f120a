"""Decode-sized products: `nanoseek.prepack`'s oneDNN-packed linear against `F.linear` on the same weight.

A decode step multiplies a few rows (1-16) by each weight matrix once, so its speed is the GB/s at which the
product streams the weight. Janus-Pro-1B's MLP shapes (2048 x 5632 and back), fp32 and bf16, rows 1, 2, 8, 16 and a
176-row prefill; the weights are several copies cycled so that they come from memory, not the caches (a 5632 x 2048
bf16 matrix is 23 MB, the L3 of this machine 32 MB). Prints GB/s of weights and the ratio packed / F.linear.

    .venv/bin/python benchmarks/linear.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek.prepack import packed_linear_eager  # noqa: E402


def rate(fn, weights: list[torch.Tensor], x: torch.Tensor, repeats: int) -> float:
    """GB/s of weight bytes: the median of `repeats` passes over all the copies."""
    for w in weights:
        fn(x, w)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for w in weights:
            fn(x, w)
        times.append(time.perf_counter() - t0)
    times.sort()
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    return nbytes / times[len(times) // 2] / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--copies", type=int, default=8, help="weight copies cycled (8 x 46 MB fp32 > any cache)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    torch.manual_seed(0)
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            for out_f, in_f in ((5632, 2048), (2048, 5632)):
                ws = [torch.randn(out_f, in_f, dtype=dtype) for _ in range(args.copies)]
                for rows in (1, 2, 8, 16, 176):
                    x = torch.randn(rows, in_f, dtype=dtype)
                    base = rate(lambda x, w: F.linear(x, w), ws, x, args.repeats)
                    packed = rate(packed_linear_eager, ws, x, args.repeats)
                    print(f"{str(dtype)[6:]:8s} {out_f}x{in_f} rows {rows:3d}: F.linear {base:5.1f} GB/s, "
                          f"packed {packed:5.1f} GB/s -> {packed / base:.2f}x")


if __name__ == "__main__":
    main()
