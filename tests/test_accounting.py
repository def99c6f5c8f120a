"""Accounting: parameter counts vs transformers and first principles, KV bytes, FLOPs, the V3 cost table, CLI.

Everything large is built on the meta device (shapes only), so the whole file runs in a few seconds.
"""

from __future__ import annotations

import json

import pytest
import torch

from nanoseek import ModelConfig, build
from nanoseek.accounting import (
    DEFAULT_MFU,
    GPU_PEAKS,
    cost_report,
    count_params,
    flops_per_token,
    inference_flops_per_token,
    params_report,
)
from nanoseek.cli import main
from nanoseek.weights import config_to_hf

V3_TOTAL = 671_026_404_352  # transformers' meta-device count, /work/shared/REFERENCE.md


def _hf_meta_count(cfg: ModelConfig) -> int:
    """sum(numel) of transformers' own model class on the meta device, from nanoseek's official config.json."""
    transformers = pytest.importorskip("transformers")
    if cfg.model_type == "deepseek_v3":
        config_cls, model_cls = transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM
    else:
        config_cls, model_cls = transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM
    hf_cfg = config_cls(**config_to_hf(cfg))
    with torch.device("meta"):
        model = model_cls(hf_cfg)
    return sum(p.numel() for p in model.parameters())


def _v3_first_principles() -> dict[str, int]:
    """V3 counts written out from the architecture (V2 report 2.1, V3 report 2.1-2.2), independent of the code."""
    D, L, H, V = 7168, 61, 128, 129280
    q_rank, kv_rank, nope, rope, v = 1536, 512, 128, 64, 128
    inter, moe_inter, E, K, shared, n_dense = 18432, 2048, 256, 8, 1, 3
    attn = (D * q_rank + q_rank + q_rank * H * (nope + rope)  # q_a_proj, q_a_layernorm, q_b_proj
            + D * (kv_rank + rope) + kv_rank + kv_rank * H * (nope + v)  # kv_a_proj_with_mqa, norm, kv_b_proj
            + H * v * D)  # o_proj
    norms = 2 * D
    dense = 3 * D * inter
    expert = 3 * D * moe_inter
    moe_total = E * expert + shared * expert + E * D  # routed, shared, router
    main_total = V * D + V * D + D + L * (attn + norms) + n_dense * dense + (L - n_dense) * moe_total
    mtp = attn + norms + moe_total + 2 * D * D + 3 * D  # block + eh_proj + enorm, hnorm, shared_head.norm
    activated = (L * (attn + norms) + n_dense * dense + (L - n_dense) * ((K + shared) * expert + E * D)
                 + D + V * D)  # final norm + head; the embedding table is a lookup
    return {"total": main_total, "shared": main_total + mtp, "stored": main_total + mtp + 2 * V * D,
            "activated": activated}


def test_v3_totals_match_transformers_and_first_principles():
    cfg = ModelConfig.from_preset("deepseek-v3")
    p = count_params(cfg)
    fp = _v3_first_principles()
    assert p["total"] == V3_TOTAL == fp["total"]
    assert p["total"] == _hf_meta_count(cfg)
    # MTP shares embedding and head (~682.6B); the files repeat both for layer 61 ("685B", ~684.5B)
    assert p["total_with_mtp"] == fp["shared"]
    assert p["total_with_mtp_stored"] == fp["stored"]
    assert round(fp["shared"] / 1e9, 1) == 682.6 and round(fp["stored"] / 1e9, 1) == 684.5
    assert p["activated"] == fp["activated"]
    assert 36.5e9 <= p["activated"] <= 38e9  # official "37B"
    assert p["activated_with_embedding"] == p["activated"] + 129280 * 7168


@pytest.mark.parametrize("name,billions", [("deepseek-v2", 235.74), ("deepseek-v2-lite", 15.71)])
def test_v2_totals_match_transformers(name, billions):
    cfg = ModelConfig.from_preset(name)
    p = count_params(cfg)
    assert p["total"] == _hf_meta_count(cfg)
    assert round(p["total"] / 1e9, 2) == billions
    assert p["total_with_mtp"] == p["total_with_mtp_stored"] == p["total"]  # V2 has no MTP


def test_activated_matches_official_rounding():
    # one convention (embedding table excluded, head included) reproduces all three published figures
    assert round(count_params("deepseek-v3")["activated"] / 1e9) == 37
    assert round(count_params("deepseek-v2")["activated"] / 1e9) == 21
    assert int(count_params("deepseek-v2-lite")["activated"] / 1e8) == 24  # "2.4B"


def test_components_sum_and_real_model_agrees():
    # a real (CPU) tiny model and its meta twin give the same counts; components add up to the totals
    model = build("tiny")
    p = count_params(model)
    assert p == count_params("tiny")
    assert p["total_with_mtp"] == model.num_params()
    assert sum(c["total"] for c in p["components"].values()) == p["total"]
    assert sum(c["activated"] for c in p["components"].values()) == p["activated"]
    assert sum(c["total"] for c in p["mtp_components"].values()) == p["total_with_mtp"] - p["total"]
    cfg = model.config
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    n_moe = cfg.num_hidden_layers - cfg.first_k_dense_replace
    assert p["components"]["routed_experts"]["activated"] == n_moe * cfg.num_experts_per_tok * per_expert
    # tied embeddings: stored once, but the head still costs a matmul per token
    tied = count_params(ModelConfig.from_preset("tiny", tie_word_embeddings=True))
    assert tied["total"] == p["total"] - cfg.vocab_size * cfg.hidden_size
    assert tied["matmul_params_per_token"] == p["matmul_params_per_token"]


def test_kv_cache_bytes_v3():
    kv = params_report(preset="deepseek-v3")["kv_cache"]
    assert kv["dtype"] == "bfloat16" and kv["bytes_per_element"] == 2
    assert kv["mla_bytes_per_token"] == 61 * 576 * 2
    assert kv["mha_bytes_per_token"] == 61 * 128 * (192 + 128) * 2


def test_flops_formula():
    cfg = ModelConfig.from_preset("deepseek-v3")
    p = count_params(cfg)
    attn_fwd = 2 * 128 * (192 + 128) * (4096 / 2) * 61
    assert flops_per_token(cfg, 4096) == pytest.approx(6 * p["matmul_params_per_token"] + 3 * attn_fwd)
    assert flops_per_token(cfg, 4096, training=False) == pytest.approx(flops_per_token(cfg, 4096) / 3)
    assert inference_flops_per_token(cfg) == 2 * p["matmul_params_per_token"]
    # MTP adds its block, eh_proj and a second pass through the (shared) head: more than its own parameters
    mtp_matmul = p["matmul_params_per_token_with_mtp"] - p["matmul_params_per_token"]
    assert mtp_matmul > 129280 * 7168 + 2 * 7168 * 7168
    assert flops_per_token(cfg, 4096, mtp=True) == pytest.approx(
        6 * p["matmul_params_per_token_with_mtp"] + 3 * attn_fwd * 62 / 61)


def test_v3_cost_table_reproduced():
    r = cost_report(preset="deepseek-v3", tokens=14.8e12, gpu="h800", gpu_hour_price=2,
                    gpu_hours_per_trillion=180000, extra_gpu_hours=[119e3, 5e3])
    assert round(r["pretraining_gpu_hours"] / 1e3) == 2664
    assert round(r["total_gpu_hours"] / 1e3) == 2788
    assert round(r["total_cost_usd"] / 1e3) == 5576
    bf16, fp8 = r["implied_mfu"]["bf16"]["with_mtp"], r["implied_mfu"]["fp8"]["with_mtp"]
    assert 0.3 < bf16 < 0.5 and fp8 == pytest.approx(bf16 / 2)


def test_cost_from_mfu_and_default():
    r = cost_report(preset="deepseek-v3", tokens=14.8e12, mfu=0.5)
    expected = 14.8e12 * flops_per_token("deepseek-v3", 4096, mtp=True) / (0.5 * GPU_PEAKS["h800"]["bf16"]) / 3600
    assert r["pretraining_gpu_hours"] == pytest.approx(expected)
    assert r["implied_mfu"]["bf16"]["with_mtp"] == pytest.approx(0.5)
    d = cost_report(preset="tiny", tokens=1e9, gpu="a100")
    assert d["method"] == "default MFU" and d["mfu"] == DEFAULT_MFU
    assert any("default MFU" in n for n in d["notes"])
    assert d["peak_flops"]["fp8"] is None and d["implied_mfu"]["fp8"]["without_mtp"] is None
    assert any("no fp8" in n for n in d["notes"])


@pytest.mark.parametrize("kwargs,message", [
    ({"gpu": "b200"}, "accepted: h800, h100, h200, a100"),
    ({"tokens": -1}, "tokens must be positive"),
    ({"mfu": 0}, "mfu must be in (0, 1]"),
    ({"mfu": 1.5}, "mfu must be in (0, 1]"),
    ({"gpu_hours_per_trillion": -5}, "gpu_hours_per_trillion must be positive"),
    ({"extra_gpu_hours": [-1]}, "extra_gpu_hours must not be negative"),
    ({"mfu": 0.4, "gpu_hours_per_trillion": 1.0}, "not both"),
])
def test_cost_errors(kwargs, message):
    args = {"preset": "tiny", "tokens": 1e9, **kwargs}
    with pytest.raises(ValueError) as e:
        cost_report(**args)
    assert message in str(e.value)


def test_params_from_model_dir(tmp_path):
    cfg = ModelConfig.from_preset("deepseek-v2-lite")
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    assert params_report(model_dir=tmp_path)["params"] == params_report(preset="deepseek-v2-lite")["params"]
    with pytest.raises(ValueError, match="exactly one"):
        params_report()


def test_cli_params_json_and_tables(capsys):
    assert main(["params", "--preset", "deepseek-v3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["params"]["total"] == V3_TOTAL
    assert report["kv_cache"]["mla_bytes_per_token"] == 70272
    assert main(["params", "--preset", "tiny"]) == 0
    assert "KV cache" in capsys.readouterr().out


def test_cli_cost_table_and_unknown_gpu(capsys):
    argv = ["cost", "--preset", "deepseek-v3", "--tokens", "14.8e12", "--gpu", "h800", "--gpu-hour-price", "2",
            "--gpu-hours-per-trillion", "180000", "--extra-gpu-hours", "119e3", "--extra-gpu-hours", "5e3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2,664K" in out and "2,788K" in out and "$5.576M" in out
    assert main(["cost", "--preset", "deepseek-v3", "--tokens", "1e12", "--gpu", "b200"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "unknown GPU 'b200'" in err and "h800, h100, h200, a100" in err
