"""Parameter, KV-cache, FLOP and training-cost accounting (`nanoseek params`, `nanoseek cost`).

Counts come from the real module tree built on the meta device (shapes only, no memory), so they cannot drift
from `nanoseek.model`; the per-token figures (activated parameters, FLOPs) are derived from those counts and
the routing hyper-parameters. Formulas and the reproduced V3 figures are in docs/accounting.md.

Conventions (why each choice, with the V3 report's section):
- "activated" = parameters a token computes with in one forward pass: attention and dense layers fully, and
  per MoE layer the router, the shared experts and `num_experts_per_tok` of the routed experts (section 2.1.2),
  plus the output head and the norm scales. The input embedding table is not counted: a token only reads one
  row of it. This is the convention that reproduces all three official figures (V3 36.6B -> "37B", V2 20.9B ->
  "21B", V2-Lite 2.45B -> "2.4B"); counting the table too would give 37.6B / 21.4B / 2.66B.
- MTP (section 2.2) shares the embedding and the output head with the main model. Totals are given without MTP
  (what transformers counts: 671B), with one shared copy (~682.6B), and as stored in the official files, which
  repeat `embed_tokens` and `shared_head.head` for the MTP layer (~684.5B, the "685B" on the model card).
- Training FLOPs/token = 6 x matmul parameters + 3 x forward attention FLOPs (Kaplan et al. 2020 / PaLM
  appendix B, "model FLOPs": recomputation is not counted, so MFU stays comparable across implementations).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .model import MLP, Block, ModelConfig, MoE, MTPModule, Transformer, build
from .weights import config_from_hf

# ------------------------------------------------------------------------------------------------------------
# GPU peaks

# Dense (no 2:4 sparsity) tensor-core peaks in FLOP/s, from the vendors' datasheets. The datasheets quote
# Hopper numbers "with sparsity"; the dense peak is half of that. H800 is the export variant of the H100 SXM
# with the same tensor cores (NVLink cut to 400 GB/s), which is why the V3 report's H800 cluster reaches
# H100-class FLOPs; H200 is an H100 with more and faster HBM. A100 (Ampere) has no fp8 tensor cores.
GPU_PEAKS: dict[str, dict[str, Any]] = {
    "h800": {"name": "NVIDIA H800 SXM5", "bf16": 989.5e12, "fp8": 1979e12,
             "source": "vendor datasheet dense peak (1,979 / 3,958 TFLOPS with sparsity, halved)"},
    "h100": {"name": "NVIDIA H100 SXM5", "bf16": 989.5e12, "fp8": 1979e12,
             "source": "vendor datasheet dense peak (1,979 / 3,958 TFLOPS with sparsity, halved)"},
    "h200": {"name": "NVIDIA H200 SXM", "bf16": 989.5e12, "fp8": 1979e12,
             "source": "vendor datasheet dense peak (1,979 / 3,958 TFLOPS with sparsity, halved)"},
    "a100": {"name": "NVIDIA A100 SXM 80GB", "bf16": 312e12, "fp8": None,
             "source": "vendor datasheet dense peak (312 TFLOPS bf16; Ampere has no fp8 tensor cores)"},
}

# Used when neither an MFU nor a measured rate is given. Llama 3 (Dubey et al. 2024, table 4) reports 38-43 %
# bf16 MFU for 405B on 16K H100s; the V3 report's own rate implies ~41 % of the bf16 peak (docs/accounting).
DEFAULT_MFU = 0.40

# KV-cache figures are for bf16, the usual serving dtype of the cache (V3 serves with bf16 activations).
KV_DTYPE = torch.bfloat16

# Components of one transformer block / of the model, in print order.
COMPONENTS = ("embedding", "attention", "norms", "dense_mlp", "router", "shared_experts", "routed_experts",
              "output_head", "mtp")


def _numel(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _resolve(preset: str | None = None, model_dir: str | Path | None = None,
             config: ModelConfig | None = None) -> tuple[ModelConfig, str]:
    given = [x for x in (preset, model_dir, config) if x is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of preset, model_dir or config")
    if preset is not None:
        return ModelConfig.from_preset(preset), preset
    if model_dir is not None:
        return config_from_hf(model_dir), str(model_dir)
    assert config is not None
    return config, "config"


# ------------------------------------------------------------------------------------------------------------
# Parameter counts


def _block_counts(block: Block, cfg: ModelConfig) -> tuple[dict[str, int], dict[str, int]]:
    """(total, activated) parameters of one block by component."""
    tot = dict.fromkeys(COMPONENTS, 0)
    norms = _numel(block.input_layernorm) + _numel(block.post_attention_layernorm)
    attn_norms = sum(_numel(m) for n, m in block.self_attn.named_children() if n.endswith("layernorm"))
    # q_a_layernorm / kv_a_layernorm are norms too: kept under "norms" so "attention" is pure matmul weights
    tot["attention"] = _numel(block.self_attn) - attn_norms
    tot["norms"] = norms + attn_norms
    act = dict(tot)
    if isinstance(block.mlp, MoE):
        moe = block.mlp
        tot["router"] = act["router"] = _numel(moe.gate)
        tot["shared_experts"] = act["shared_experts"] = _numel(moe.shared_experts)
        tot["routed_experts"] = _numel(moe.experts)
        # each token runs top-K of the E routed experts (V3 section 2.1.2, eq. 12-13)
        per_expert = tot["routed_experts"] // cfg.n_routed_experts
        act["routed_experts"] = per_expert * cfg.num_experts_per_tok
    else:
        assert isinstance(block.mlp, MLP)
        tot["dense_mlp"] = act["dense_mlp"] = _numel(block.mlp)
    if isinstance(block, MTPModule):
        # eh_proj (2D -> D) and the MTP-only norms (V3 eq. 21); embedding and head are the main model's
        extra = _numel(block.eh_proj) + _numel(block.enorm) + _numel(block.hnorm) + _numel(block.shared_head)
        tot["mtp"] = act["mtp"] = extra
    return tot, act


def _sum_blocks(blocks: Any, cfg: ModelConfig) -> tuple[dict[str, int], dict[str, int]]:
    """Total and activated parameters per component, summed over blocks."""
    tot, act = dict.fromkeys(COMPONENTS, 0), dict.fromkeys(COMPONENTS, 0)
    for block in blocks:
        t, a = _block_counts(block, cfg)
        for k in COMPONENTS:
            tot[k] += t[k]
            act[k] += a[k]
    return tot, act


def _count_model(model: Transformer) -> dict[str, Any]:
    cfg = model.config
    main_tot, main_act = _sum_blocks(model.layers, cfg)
    emb = model.embed_tokens.weight.numel()
    tied = model.lm_head.weight is model.embed_tokens.weight
    head = model.lm_head.weight.numel()
    main_tot["embedding"], main_act["embedding"] = emb, 0  # a lookup reads one row: not "activated"
    # a tied head is the embedding tensor (stored once) but still a full matmul for every token
    main_tot["output_head"], main_act["output_head"] = (0 if tied else head), head
    for d in (main_tot, main_act):
        d["norms"] += _numel(model.norm)
    mtp_tot, mtp_act = _sum_blocks(model.mtp, cfg)
    total = sum(main_tot.values())
    mtp_total = sum(mtp_tot.values())
    # every parameter must land in exactly one component, or the breakdown is lying
    all_params = sum(p.numel() for p in model.parameters())
    if total + mtp_total != all_params:
        raise AssertionError(f"accounting missed parameters: {total + mtp_total} counted, {all_params} exist")
    activated = sum(main_act.values())
    mtp_activated = sum(mtp_act.values())
    n_mtp = len(model.mtp)
    # the official files repeat embed_tokens and shared_head.head inside every MTP layer (model.layers.61.*)
    stored_extra = n_mtp * (emb + model.lm_head.weight.numel())
    # matmul weights per token: activated minus the norm scales (elementwise, not matmuls)
    matmul = activated - main_act["norms"]
    # the MTP module runs its own block, eh_proj and the shared head once more for every token (V3 eq. 22)
    mtp_matmul = mtp_activated - mtp_act["norms"] - _mtp_norm_params(model) + n_mtp * head
    return {
        "total": total,
        "total_with_mtp": total + mtp_total,
        "total_with_mtp_stored": total + mtp_total + stored_extra,
        "total_non_embedding": total - main_tot["embedding"] - main_tot["output_head"],
        "activated": activated,
        "activated_with_mtp": activated + mtp_activated,
        "activated_with_embedding": activated + emb,
        "activated_non_embedding": activated - head,
        "matmul_params_per_token": matmul,
        "matmul_params_per_token_with_mtp": matmul + mtp_matmul,
        "tied_embeddings": tied,
        "mtp_layers": n_mtp,
        "components": {k: {"total": main_tot[k], "activated": main_act[k]} for k in COMPONENTS if k != "mtp"},
        "mtp_components": {k: {"total": mtp_tot[k], "activated": mtp_act[k]} for k in COMPONENTS},
    }


def _mtp_norm_params(model: Transformer) -> int:
    # enorm, hnorm and shared_head.norm sit in the "mtp" component but are elementwise scales, not matmuls
    return sum(_numel(m.enorm) + _numel(m.hnorm) + _numel(m.shared_head) for m in model.mtp)


@functools.lru_cache(maxsize=16)
def _count_config_json(cfg_json: str) -> str:
    cfg = ModelConfig.from_dict(json.loads(cfg_json))
    return json.dumps(_count_model(build(cfg, device="meta")))


def count_params(model_or_config: Transformer | ModelConfig | str) -> dict[str, Any]:
    """Total / activated parameter counts with a per-component breakdown.

    Accepts a model (any device), a ModelConfig or a preset name; configs are built on the meta device, so
    even V3 costs no memory. Keys: total, total_with_mtp, total_with_mtp_stored, total_non_embedding,
    activated, activated_with_mtp, activated_with_embedding, activated_non_embedding,
    matmul_params_per_token(_with_mtp), components, mtp_components.
    """
    if isinstance(model_or_config, Transformer):
        return _count_model(model_or_config)
    cfg = ModelConfig.from_preset(model_or_config) if isinstance(model_or_config, str) else model_or_config
    return json.loads(_count_config_json(json.dumps(cfg.to_dict(), sort_keys=True)))


# ------------------------------------------------------------------------------------------------------------
# KV cache and FLOPs


def kv_cache_bytes(cfg: ModelConfig, dtype: torch.dtype = KV_DTYPE) -> dict[str, Any]:
    """Cache bytes per token (all layers) for MLA and for an MHA model with the same heads and head dims.

    MLA caches the compressed latent c_kv and the shared decoupled RoPE key (V2 report section 2.1.2-2.1.3):
    kv_lora_rank + qk_rope_head_dim elements per token per layer. The MHA baseline caches per head a full key
    (qk_nope + qk_rope) and value (v_head_dim). A dense MHA model (DeepSeek-LLM) caches a key and a value per KV
    head: its MLA figures are None.
    """
    size = torch.empty(0, dtype=dtype).element_size()
    L = cfg.num_hidden_layers
    if cfg.attention == "mha":
        mha = 2 * cfg.kv_heads * cfg.attn_head_dim
        return {"dtype": str(dtype).removeprefix("torch."), "bytes_per_element": size, "layers": L,
                "mla_elements_per_token_per_layer": None, "mha_elements_per_token_per_layer": mha,
                "mla_bytes_per_token": None, "mha_bytes_per_token": L * mha * size, "mha_over_mla": None,
                "mtp_mla_bytes_per_token": 0}
    mla = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    mha = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "bytes_per_element": size,
        "layers": L,
        "mla_elements_per_token_per_layer": mla,
        "mha_elements_per_token_per_layer": mha,
        "mla_bytes_per_token": L * mla * size,
        "mha_bytes_per_token": L * mha * size,
        "mha_over_mla": mha / mla,
        # speculative decoding with the MTP module keeps one more (separate) latent cache per MTP layer
        "mtp_mla_bytes_per_token": cfg.num_nextn_predict_layers * mla * size,
    }


def attention_flops_per_token(cfg: ModelConfig, context: float, layers: int | None = None) -> float:
    """Forward score + value FLOPs for one query attending to `context` keys, summed over layers.

    Per head: q.k costs 2 x qk_head_dim and p.v 2 x v_head_dim multiply-adds per key (decompressed MLA, as
    trained; the absorbed decode path does different but equivalent arithmetic and is not what MFU counts).
    """
    L = cfg.num_hidden_layers if layers is None else layers
    return 2.0 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.value_head_dim) * context * L


def _as_config(config: ModelConfig | Transformer | str) -> ModelConfig:
    if isinstance(config, Transformer):
        return config.config
    if isinstance(config, str):
        return ModelConfig.from_preset(config)
    return config


def flops_per_token(config: ModelConfig | Transformer | str, seq_len: int = 4096, training: bool = True,
                    mtp: bool = False) -> float:
    """Model FLOPs per token, averaged over a causal sequence of seq_len tokens.

    forward = 2 x matmul params per token + 2 x heads x (qk_head_dim + v_head_dim) x (seq_len / 2) x layers;
    training = 3 x forward (backward costs twice the forward). Matmul params exclude the embedding lookup and
    norm scales and include the output head. With mtp=True the MTP modules (their block, eh_proj and one more
    pass through the shared head) are added, as they ran for every V3 training token (section 2.2).
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    cfg = _as_config(config)
    counts = count_params(config if isinstance(config, Transformer) else cfg)
    n = counts["matmul_params_per_token_with_mtp" if mtp else "matmul_params_per_token"]
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp else 0)
    fwd = 2.0 * n + attention_flops_per_token(cfg, seq_len / 2, layers)  # causal: average context seq_len/2
    return 3.0 * fwd if training else fwd


def inference_flops_per_token(config: ModelConfig | Transformer | str, context: float = 0,
                              mtp: bool = False) -> float:
    """Forward FLOPs for one token: 2 x activated matmul params (+ attention over `context` cached tokens).

    context=0 gives the plain 2N rule used for serving MFU; pass the current length for a decode step.
    """
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    cfg = _as_config(config)
    counts = count_params(config if isinstance(config, Transformer) else cfg)
    n = counts["matmul_params_per_token_with_mtp" if mtp else "matmul_params_per_token"]
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp else 0)
    return 2.0 * n + attention_flops_per_token(cfg, context, layers)


# ------------------------------------------------------------------------------------------------------------
# `nanoseek params`


def params_report(preset: str | None = None, model_dir: str | Path | None = None,
                  config: ModelConfig | None = None, seq_len: int = 4096) -> dict[str, Any]:
    """Everything `nanoseek params` prints, as a JSON-able dict (counts are exact integers)."""
    cfg, source = _resolve(preset, model_dir, config)
    counts = count_params(cfg)
    attn_fwd = attention_flops_per_token(cfg, seq_len / 2)
    return {
        "model": source,
        "model_type": cfg.model_type,
        "config": {k: getattr(cfg, k) for k in (
            "num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size", "q_lora_rank",
            "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "first_k_dense_replace",
            "n_shared_experts", "n_routed_experts", "num_experts_per_tok", "num_nextn_predict_layers")},
        "params": {k: v for k, v in counts.items() if not isinstance(v, dict)},
        "components": counts["components"],
        "mtp_components": counts["mtp_components"],
        "kv_cache": kv_cache_bytes(cfg),
        "flops": {
            "seq_len": seq_len,
            "training_per_token": flops_per_token(cfg, seq_len, training=True),
            "training_per_token_with_mtp": flops_per_token(cfg, seq_len, training=True, mtp=True),
            "inference_per_token": inference_flops_per_token(cfg),
            "attention_forward_per_token": attn_fwd,
            "formula": "training = 3 x (2 x matmul + 2 x heads x (qk_head_dim + v_head_dim) x seq_len/2 x layers); "
                       "inference = 2 x matmul (matmul = activated params minus norm scales)",
        },
    }


def _fmt(n: float) -> str:
    """671026404352 -> '671.03B'."""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:g}"


def _bytes(n: float) -> str:
    for div, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def print_params_report(report: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    p, c, kv, fl = report["params"], report["components"], report["kv_cache"], report["flops"]
    t = Table(title=f"{report['model']} ({report['model_type']}): parameters", title_justify="left")
    t.add_column("count")
    t.add_column("exact", justify="right")
    t.add_column("", justify="right")
    rows = [
        ("total (main model; = transformers)", p["total"]),
        ("total + MTP, shared embed/head", p["total_with_mtp"]),
        ("total + MTP, as stored on disk", p["total_with_mtp_stored"]),
        ("total without embed and head", p["total_non_embedding"]),
        ("activated per token (official basis)", p["activated"]),
        ("activated + MTP", p["activated_with_mtp"]),
        ("activated + embedding table", p["activated_with_embedding"]),
        ("activated without the output head", p["activated_non_embedding"]),
        ("matmul params/token (FLOPs basis)", p["matmul_params_per_token"]),
    ]
    for name, n in rows:
        t.add_row(name, f"{n:,}", _fmt(n))
    console.print(t)

    t = Table(title="per component (main model; MTP module in the last column)", title_justify="left")
    for col in ("component", "total", "activated", "% total", "% act.", "MTP"):
        t.add_column(col, justify="left" if col == "component" else "right")
    mtp = report["mtp_components"]
    for k, v in c.items():
        if not v["total"] and not mtp[k]["total"]:
            continue
        m = _fmt(mtp[k]["total"]) if mtp[k]["total"] else "-"
        act = "lookup" if k == "embedding" else _fmt(v["activated"])  # one row per token, see module docstring
        t.add_row(k, _fmt(v["total"]), act, f"{100 * v['total'] / p['total']:.2f}",
                  f"{100 * v['activated'] / p['activated']:.2f}", m)
    if mtp["mtp"]["total"]:
        t.add_row("eh_proj + MTP norms", "-", "-", "-", "-", _fmt(mtp["mtp"]["total"]))
    console.print(t)

    t = Table(title=f"KV cache per token, {kv['layers']} layers, {kv['dtype']} "
                    f"({kv['bytes_per_element']} B/element)", title_justify="left")
    for col in ("cache", "elements/layer", "bytes/token", ""):
        t.add_column(col, justify="left" if col == "cache" else "right")
    if kv["mla_bytes_per_token"] is None:  # a dense MHA model (DeepSeek-LLM)
        t.add_row("MHA: 2 x kv_heads x head_dim", f"{kv['mha_elements_per_token_per_layer']:,}",
                  f"{kv['mha_bytes_per_token']:,}", _bytes(kv["mha_bytes_per_token"]))
    else:
        t.add_row("MLA: kv_lora_rank + qk_rope", f"{kv['mla_elements_per_token_per_layer']:,}",
                  f"{kv['mla_bytes_per_token']:,}", _bytes(kv["mla_bytes_per_token"]))
        t.add_row("MHA: heads x (qk_head + v_head)", f"{kv['mha_elements_per_token_per_layer']:,}",
                  f"{kv['mha_bytes_per_token']:,}", _bytes(kv["mha_bytes_per_token"]))
        t.add_row("MHA / MLA", "", f"{kv['mha_over_mla']:.1f}x", "")
    console.print(t)

    t = Table(title=f"FLOPs per token (seq_len {fl['seq_len']})", title_justify="left")
    t.add_column("")
    t.add_column("FLOPs", justify="right")
    t.add_row("training, main model", f"{fl['training_per_token']:.4g}")
    t.add_row("training, with MTP", f"{fl['training_per_token_with_mtp']:.4g}")
    t.add_row("inference (2 x matmul params)", f"{fl['inference_per_token']:.4g}")
    t.add_row("attention scores+values, forward", f"{fl['attention_forward_per_token']:.4g}")
    console.print(t)
    for line in fl["formula"].split("; "):  # one formula per line: no mid-formula wrap on 80 columns
        console.print(f"[dim]{line}[/]", highlight=False)


# ------------------------------------------------------------------------------------------------------------
# `nanoseek cost`


def _check_number(name: str, x: float, *, positive: bool = True) -> float:
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number, got {x}")
    if positive and x <= 0:
        raise ValueError(f"{name} must be positive, got {x:g}")
    if not positive and x < 0:
        raise ValueError(f"{name} must not be negative, got {x:g}")
    return x


def cost_report(preset: str | None = None, model_dir: str | Path | None = None, tokens: float = 14.8e12,
                gpu: str = "h800", gpu_hour_price: float = 2.0, mfu: float | None = None,
                gpu_hours_per_trillion: float | None = None, extra_gpu_hours: Iterable[float] | None = (),
                seq_len: int = 4096, config: ModelConfig | None = None,
                mfu_peak: str = "bf16") -> dict[str, Any]:
    """Training GPU-hours and dollars for `tokens` tokens.

    Pre-training hours come from a measured rate (gpu_hours_per_trillion, the V3 report's 180K H800 GPU-hours
    per trillion tokens, section 1 and table 1) or else from FLOPs: training FLOPs / (mfu x peak[mfu_peak]).
    extra_gpu_hours (context extension, post-training, ...) are added as given. The implied MFU of the
    pre-training hours is reported against the bf16 and the fp8 dense peak (V3 trained with fp8 GEMMs, section
    3.3, so the fp8 peak is the honest ceiling for its matmuls).
    """
    gpu_key = str(gpu).lower()
    if gpu_key not in GPU_PEAKS:
        raise ValueError(f"unknown GPU {gpu!r}; accepted: {', '.join(GPU_PEAKS)}")
    peaks = GPU_PEAKS[gpu_key]
    tokens = _check_number("tokens", tokens)
    price = _check_number("gpu_hour_price", gpu_hour_price, positive=False)
    extras = [_check_number("extra_gpu_hours", h, positive=False) for h in (extra_gpu_hours or ())]
    if int(seq_len) <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if mfu_peak not in ("bf16", "fp8"):
        raise ValueError(f"mfu_peak must be 'bf16' or 'fp8', got {mfu_peak!r}")
    if mfu is not None and gpu_hours_per_trillion is not None:
        raise ValueError("give either an MFU or a measured GPU-hours-per-trillion rate, not both")
    if mfu is not None:
        mfu = float(mfu)
        if not (math.isfinite(mfu) and 0 < mfu <= 1):
            raise ValueError(f"mfu must be in (0, 1] (a fraction of the peak, e.g. 0.4), got {mfu:g}")
    if gpu_hours_per_trillion is not None:
        gpu_hours_per_trillion = _check_number("gpu_hours_per_trillion", gpu_hours_per_trillion)

    cfg, source = _resolve(preset, model_dir, config)
    with_mtp = cfg.num_nextn_predict_layers > 0  # V3 trained with its MTP module on every token (section 2.2)
    fpt = flops_per_token(cfg, seq_len, training=True, mtp=with_mtp)
    fpt_main = flops_per_token(cfg, seq_len, training=True, mtp=False)
    train_flops = tokens * fpt
    notes: list[str] = []
    if gpu_hours_per_trillion is not None:
        method = "measured rate"
        pre_hours = tokens / 1e12 * gpu_hours_per_trillion
    else:
        if mfu is None:
            mfu = DEFAULT_MFU
            method = "default MFU"
            notes.append("neither --mfu nor --gpu-hours-per-trillion given: assumed the default MFU "
                         f"{DEFAULT_MFU:.0%} of the {mfu_peak} peak")
        else:
            method = "MFU"
        peak = peaks[mfu_peak]
        if peak is None:
            raise ValueError(f"{gpu_key} has no {mfu_peak} tensor cores; use mfu_peak='bf16'")
        pre_hours = train_flops / (mfu * peak) / 3600
    if peaks["fp8"] is None:
        notes.append(f"{peaks['name']} has no fp8 tensor cores: no fp8 peak or fp8 MFU")
    seconds = pre_hours * 3600

    def implied(flops: float, peak: float | None) -> float | None:
        return None if peak is None or seconds == 0 else flops / (seconds * peak)

    implied_mfu = {
        dt: {"with_mtp": implied(train_flops, peaks[dt]) if with_mtp else None,
             "without_mtp": implied(tokens * fpt_main, peaks[dt])}
        for dt in ("bf16", "fp8")
    }
    total_hours = pre_hours + sum(extras)
    return {
        "model": source,
        "tokens": tokens,
        "seq_len": int(seq_len),
        "gpu": gpu_key,
        "gpu_name": peaks["name"],
        "peak_flops": {"bf16": peaks["bf16"], "fp8": peaks["fp8"]},
        "peak_source": peaks["source"],
        "gpu_hour_price": price,
        "mtp_included": with_mtp,
        "flops_per_token": fpt,
        "flops_per_token_without_mtp": fpt_main,
        "training_flops": train_flops,
        "method": method,
        "mfu": mfu if gpu_hours_per_trillion is None else None,
        "mfu_peak": mfu_peak if gpu_hours_per_trillion is None else None,
        "gpu_hours_per_trillion": gpu_hours_per_trillion if gpu_hours_per_trillion is not None
        else pre_hours / (tokens / 1e12),
        "pretraining_gpu_hours": pre_hours,
        "extra_gpu_hours": extras,
        "total_gpu_hours": total_hours,
        "pretraining_cost_usd": pre_hours * price,
        "total_cost_usd": total_hours * price,
        "implied_mfu": implied_mfu,
        "notes": notes,
    }


def _hours(h: float) -> str:
    # thousands, as the V3 report's table 1 prints them
    return f"{h / 1e3:,.1f}K".replace(".0K", "K") if h >= 1e3 else f"{h:,.1f}"


def print_cost_report(report: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    r = report
    t = Table(title=f"{r['model']}: {r['tokens'] / 1e12:g}T tokens on {r['gpu_name']}, "
                    f"${r['gpu_hour_price']:g}/GPU-hour", title_justify="left")
    for col in ("stage", "GPU-hours", "cost (USD)"):
        t.add_column(col, justify="left" if col == "stage" else "right")
    if r["method"] == "measured rate":
        basis = f"{r['gpu_hours_per_trillion']:,.0f} GPU-h/1T tokens"
    else:
        default = "default " if r["method"] == "default MFU" else ""
        basis = f"{default}MFU {r['mfu']:.0%} of {r['mfu_peak']} peak"
    t.add_row(f"pre-training ({basis})", _hours(r["pretraining_gpu_hours"]), _usd(r["pretraining_cost_usd"]))
    for i, h in enumerate(r["extra_gpu_hours"], 1):
        t.add_row(f"extra #{i} (as given)", _hours(h), _usd(h * r["gpu_hour_price"]))
    t.add_row("[bold]total[/]", f"[bold]{_hours(r['total_gpu_hours'])}[/]",
              f"[bold]{_usd(r['total_cost_usd'])}[/]")
    console.print(t)

    t = Table(title=f"FLOPs (seq_len {r['seq_len']}), MFU of pre-training", title_justify="left")
    for col in ("", "with MTP", "without MTP"):
        t.add_column(col, justify="left" if not col else "right")
    mtp = r["mtp_included"]
    t.add_row("FLOPs per token", f"{r['flops_per_token']:.4g}" if mtp else "-",
              f"{r['flops_per_token_without_mtp']:.4g}")
    t.add_row("total FLOPs", f"{r['training_flops']:.4g}" if mtp else "-",
              f"{r['tokens'] * r['flops_per_token_without_mtp']:.4g}")
    for dt in ("bf16", "fp8"):
        peak = r["peak_flops"][dt]
        m = r["implied_mfu"][dt]
        label = f"MFU vs {dt} peak ({peak / 1e12:,.1f} TFLOPS)" if peak else f"MFU vs {dt} (none on this GPU)"
        t.add_row(label, *(f"{m[k]:.1%}" if m[k] is not None else "-" for k in ("with_mtp", "without_mtp")))
    console.print(t)
    console.print(f"[dim]peaks: {r['peak_source']}[/]", highlight=False)
    for n in r["notes"]:
        console.print(f"note: {n}", highlight=False)


def _usd(x: float) -> str:
    return f"${x / 1e6:,.3f}M" if x >= 1e4 else f"${x:,.2f}"


__all__ = ["DEFAULT_MFU", "GPU_PEAKS", "KV_DTYPE", "attention_flops_per_token", "cost_report",
           "count_params", "flops_per_token", "inference_flops_per_token", "kv_cache_bytes", "params_report",
           "print_cost_report", "print_params_report"]


# ------------------------------------------------------------------------------------------------------------
# Janus-Pro (`nanoseek params --preset janus-pro-7b`)


def janus_params_report(preset: str | None = None, model_dir: str | Path | None = None) -> dict[str, Any]:
    """Parameters of a Janus preset or directory per component, counted on the meta device; the LLM's own report
    beside."""
    from .janus import Janus, janus_preset

    if (preset is None) == (model_dir is None):
        raise ValueError("give exactly one of preset or model_dir")
    if preset is not None:
        cfg = janus_preset(preset)
    else:
        from .imagine import janus_config

        cfg = janus_config(model_dir)[0]
        preset = str(model_dir)
    with torch.device("meta"):
        m = Janus(cfg)
    comps = {"vision_encoder": _numel(m.vision_model), "aligner": _numel(m.aligner), "vq_model": _numel(m.vqmodel),
             "generation_embeddings": _numel(m.generation_embeddings),
             "generation_aligner": _numel(m.generation_aligner), "generation_head": _numel(m.generation_head),
             "llm": _numel(m.language_model)}
    total = sum(p.numel() for p in m.parameters())
    if sum(comps.values()) != total:
        raise AssertionError(f"accounting missed parameters: {sum(comps.values())} counted, {total} exist")
    # image generation: one LLM forward and one generation-head pass per image token and row (2 rows with CFG)
    llm = count_params(cfg.text)
    per_token = 2.0 * (llm["matmul_params_per_token"] - cfg.text.vocab_size * cfg.text.hidden_size
                       + comps["generation_head"] + comps["generation_aligner"])
    return {"model": preset, "model_type": "janus", "total": total, "components": comps,
            "image_tokens": cfg.num_image_tokens, "image_size": cfg.vision.image_size,
            "generation_flops_per_image": 2 * cfg.num_image_tokens * per_token,
            "llm": params_report(config=cfg.text)}


def print_janus_report(report: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    t = Table(title=f"{report['model']} (Janus-Pro): parameters per component", title_justify="left")
    for col in ("component", "parameters", "", "%"):
        t.add_column(col, justify="left" if col == "component" else "right")
    for k, n in report["components"].items():
        t.add_row(k, f"{n:,}", _fmt(n), f"{100 * n / report['total']:.2f}")
    t.add_row("[bold]total[/]", f"[bold]{report['total']:,}[/]", _fmt(report["total"]), "100.00")
    console.print(t)
    console.print(f"image generation: {report['image_tokens']} tokens per {report['image_size']}px image, two rows "
                  f"each (classifier-free guidance): ~{report['generation_flops_per_image']:.3g} FLOPs per image "
                  "without attention and VQ decoding", highlight=False)
    console.print("the LLM alone:", highlight=False)
    print_params_report(report["llm"], console)
