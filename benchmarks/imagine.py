"""Image-token throughput: `nanoseek imagine`'s sampler vs transformers' `generate(generation_mode="image")`.

Both hold the same random Janus (nanoseek's `save_pretrained` directory loaded with
`JanusForConditionalGeneration.from_pretrained`): Janus-Pro-1B's widths (LLM 2048 wide, 16 heads, SigLIP-L, VQ-16)
with `--layers` LLM layers, the same prompt for `--images` images, classifier-free guidance weight 5 (two rows per
image: 2 x images rows through the KV cache), temperature 1, `--tokens` image tokens (576 for a 384 px image).
Image tokens/s = images x tokens / sampling time (prefill included, as a user waits for it); the VQ decoder is
timed apart (decoding `--images` random 576-token images) and not part of the ratio. fp32 and bf16 by default.
Settings are interleaved and the median of `--repeats` runs is reported.

nanoseek runs twice: eager (`nanoseek imagine`'s default; its first call includes packing the weights) and with
the compiled decode step (`imagine --compile`, what a server uses): its warm-up (one generation of the same shape,
compiling the span buckets) is timed and reported apart, as benchmarks/decode.py does, and not part of its rate.

    .venv/bin/python benchmarks/imagine.py                          # 4 layers, 576 tokens, 4 images, fp32 + bf16
    .venv/bin/python benchmarks/imagine.py --tokens 8 --layers 1 --repeats 1 --dtypes float32   # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek import save_pretrained  # noqa: E402
from nanoseek.infer import generate_image_tokens  # noqa: E402
from nanoseek.janus import Janus, janus_preset  # noqa: E402


def build(layers: int, seed: int = 0) -> Janus:
    cfg = janus_preset("janus-pro-1b")
    cfg = replace(cfg, text=replace(cfg.text, num_hidden_layers=layers, first_k_dense_replace=layers))
    torch.manual_seed(seed)
    return Janus(cfg).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4, help="LLM layers (Janus-Pro-1B has 24)")
    ap.add_argument("--tokens", type=int, default=576, help="image tokens per image (576 = 384 px)")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"), default=["float32", "bfloat16"])
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import JanusForConditionalGeneration

    ours = build(args.layers)
    cfg = ours.config
    prompt = [cfg.text.bos_token_id, *range(1000, 1020), cfg.boi_token_id]  # a 22-token prompt ending with BOI
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(ours, Path(d) / "m")
        theirs = JanusForConditionalGeneration.from_pretrained(str(Path(d) / "m"), dtype=torch.float32).eval()
    theirs.model.vision_model.config.num_image_tokens = args.tokens  # the length of its image loop
    results: dict[str, Any] = {"layers": args.layers, "tokens": args.tokens, "images": args.images, "cfg": args.cfg,
                               "threads": torch.get_num_threads(), "runs": {}}
    ids = torch.tensor([prompt] * args.images)
    for dt in args.dtypes:
        dtype = getattr(torch, dt)
        ours.to(dtype)
        theirs.to(dtype)
        times: dict[str, list[float]] = {"nanoseek": [], "nanoseek_compiled": [], "transformers": [],
                                         "vq_decode": []}

        def ours_run(seed: int, compile: bool) -> float:
            t0 = time.perf_counter()
            generate_image_tokens(ours, [prompt] * args.images, cfg_weight=args.cfg, temperature=1.0, seed=seed,
                                  num_tokens=args.tokens, compile=compile)
            return time.perf_counter() - t0

        warmup = ours_run(0, True)  # the compiled step's graphs, kept with the model for the timed calls
        for r in range(args.repeats):
            with torch.inference_mode():
                times["nanoseek"].append(ours_run(r, False))
                times["nanoseek_compiled"].append(ours_run(r, True))
                torch.manual_seed(r)
                t0 = time.perf_counter()
                theirs.generate(ids, attention_mask=torch.ones_like(ids), generation_mode="image", do_sample=True,
                                temperature=1.0, guidance_scale=args.cfg, max_new_tokens=args.tokens)
                times["transformers"].append(time.perf_counter() - t0)
                codes = torch.randint(0, cfg.vq.num_embeddings, (args.images, cfg.num_image_tokens))
                t0 = time.perf_counter()
                ours.decode_image(codes)
                times["vq_decode"].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        n = args.images * args.tokens
        row = {"nanoseek_tokens_per_s": n / med["nanoseek"], "transformers_tokens_per_s": n / med["transformers"],
               "nanoseek_compiled_tokens_per_s": n / med["nanoseek_compiled"],
               "ratio": med["transformers"] / med["nanoseek"],
               "ratio_compiled": med["transformers"] / med["nanoseek_compiled"],
               "compiled_warmup_s": warmup, "vq_decode_s": med["vq_decode"], "times": times}
        results["runs"][dt] = row
        print(f"{dt}: transformers {row['transformers_tokens_per_s']:.1f} image tokens/s; nanoseek eager "
              f"{row['nanoseek_tokens_per_s']:.1f} -> {row['ratio']:.2f}x; nanoseek compiled "
              f"{row['nanoseek_compiled_tokens_per_s']:.1f} -> {row['ratio_compiled']:.2f}x (warm-up {warmup:.0f}s, "
              f"not timed); VQ decoding of {args.images} images {med['vq_decode']:.2f}s (not in the ratios)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
