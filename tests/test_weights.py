"""Checkpoint I/O: official layout, FP8 block-scaled weights, sharding, and errors that name the problem."""

import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nanoseek import CheckpointError, build, load, save_pretrained
from nanoseek.weights import FP8_BLOCK, dequant_fp8, to_hf_state_dict


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_official_layout_with_mtp_at_layer_L(tmp_path):
    model = build("tiny")
    save_pretrained(model, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    L = model.config.num_hidden_layers
    for k in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
              "shared_head.head.weight", "embed_tokens.weight", "self_attn.kv_a_proj_with_mqa.weight",
              "mlp.experts.7.down_proj.weight", "mlp.gate.e_score_correction_bias"):
        assert f"model.layers.{L}.{k}" in keys
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in keys
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 1 and cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    assert "nanoseek" in cfg and "rope_scaling" in cfg
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == 1
    assert _same(load(tmp_path), model)


def test_sharded_round_trip_and_resave_replaces_shards(tmp_path):
    model = build("tiny")
    save_pretrained(model, tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    (tmp_path / "tokenizer.json").write_text("{}")  # files we do not own survive a re-save
    assert _same(load(tmp_path), model)
    save_pretrained(model, tmp_path)  # now a single file: stale shards and index are removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json",
                                                          "model.safetensors", "tokenizer.json"]
    assert _same(load(tmp_path), model)


def test_bf16_save_keeps_router_bias_fp32(tmp_path):
    model = build("tiny")
    save_pretrained(model, tmp_path, dtype=torch.bfloat16)
    sd = load_file(str(tmp_path / "model.safetensors"))
    assert sd["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert sd["model.layers.1.self_attn.o_proj.weight"].dtype == torch.bfloat16
    loaded = load(tmp_path)
    assert loaded.layers[0].self_attn.o_proj.weight.dtype == torch.bfloat16
    assert loaded.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32


def _quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 128x128 block absmax scaling, as DeepSeek's FP8 checkpoints store them."""
    rows, cols = w.shape
    br, bc = -(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)
    scale = torch.zeros(br, bc)
    q = torch.zeros(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(br):
        for j in range(bc):
            blk = w[i * FP8_BLOCK:(i + 1) * FP8_BLOCK, j * FP8_BLOCK:(j + 1) * FP8_BLOCK]
            s = blk.abs().max().clamp(min=1e-12) / 448.0
            scale[i, j] = s
            q[i * FP8_BLOCK:(i + 1) * FP8_BLOCK, j * FP8_BLOCK:(j + 1) * FP8_BLOCK] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


def test_fp8_block_scaled_checkpoint_dequantizes(tmp_path):
    from dataclasses import replace

    from nanoseek.model import PRESETS

    cfg = replace(PRESETS["tiny"], hidden_size=160, vocab_size=300)  # > 128: several blocks per matrix
    model = build(cfg)
    save_pretrained(model, tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    out, expected = {}, {}
    for k, t in sd.items():
        # as in the official files: linear weights in fp8; embeddings, norms, router gate and lm_head not
        if t.ndim == 2 and "proj" in k and "embed" not in k:
            q, s = _quantize_fp8(t)
            out[k], out[k + "_scale_inv"] = q, s
            expected[k] = dequant_fp8(q, s, torch.float32)
        else:
            out[k] = t.to(torch.bfloat16) if t.dtype == torch.float32 and "bias" not in k else t
    save_file(out, str(tmp_path / "model.safetensors"))
    loaded = load(tmp_path, dtype=torch.float32)
    w = loaded.layers[0].self_attn.kv_b_proj.weight
    ref = expected["model.layers.0.self_attn.kv_b_proj.weight"]
    assert torch.equal(w, ref)
    assert (w - model.layers[0].self_attn.kv_b_proj.weight).abs().max() < 0.1 * w.abs().max()
    x = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
    # default dtype for an FP8 checkpoint is bf16
    assert load(tmp_path).lm_head.weight.dtype == torch.bfloat16


def test_fp8_scale_shape_is_checked():
    with pytest.raises(CheckpointError, match=r"weight_scale_inv has shape \(1, 1\), expected \(2, 1\)"):
        dequant_fp8(torch.zeros(200, 100, dtype=torch.float8_e4m3fn), torch.ones(1, 1))


def test_missing_mtp_weights_warn_and_initialise(tmp_path, caplog):
    model = build("tiny")
    sd = {k: v for k, v in to_hf_state_dict(model).items() if not k.startswith("model.layers.2.")}
    save_pretrained(model, tmp_path)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with caplog.at_level(logging.WARNING):
        loaded = load(tmp_path)
    assert "no MTP weights" in caplog.text
    assert loaded.mtp[0].eh_proj.weight.std() > 0  # initialised, not left empty
    x = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("case", ["missing_tensor", "unexpected_tensor", "shape", "missing_shard", "no_weights",
                                  "pickle_only", "model_type", "no_config", "missing_expert"])
def test_errors_name_the_problem(tmp_path, case):
    model = build("tiny")
    save_pretrained(model, tmp_path)
    f = tmp_path / "model.safetensors"
    sd = load_file(str(f))
    if case == "missing_tensor":
        del sd["model.layers.0.self_attn.o_proj.weight"]
        save_file(sd, str(f))
        match = "missing tensor.*model.layers.0.self_attn.o_proj.weight"
    elif case == "missing_expert":
        del sd["model.layers.1.mlp.experts.3.up_proj.weight"]
        save_file(sd, str(f))
        match = r"missing tensor model.layers.1.mlp.experts.3.up_proj.weight"
    elif case == "unexpected_tensor":
        sd["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
        save_file(sd, str(f))
        match = "unexpected tensor.*model.layers.0.self_attn.extra.weight"
    elif case == "shape":
        sd["model.norm.weight"] = torch.ones(65)
        save_file(sd, str(f))
        match = r"shape mismatch for model.norm.weight: expected \(64,\), found \(65,\)"
    elif case == "missing_shard":
        save_pretrained(model, tmp_path, max_shard_bytes=200_000)
        next(tmp_path.glob("model-00002-*.safetensors")).unlink()
        match = "missing shard file.*model-00002-of"
    elif case == "no_weights":
        f.unlink()
        match = "no model.safetensors"
    elif case == "pickle_only":
        f.unlink()
        (tmp_path / "pytorch_model.bin").write_bytes(b"\x80")
        match = r"pytorch_model.bin could not be read with torch.load\(weights_only=True\)"
    elif case == "model_type":
        cfg = json.loads((tmp_path / "config.json").read_text())
        cfg["model_type"] = "mistral"
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        match = "unsupported model_type 'mistral'"
    elif case == "no_config":
        (tmp_path / "config.json").unlink()
        match = "no config.json"
    with pytest.raises((CheckpointError, ValueError), match=match):
        load(tmp_path)


def test_tied_head_stays_tied_on_load(tmp_path):
    """to_empty() replaces each module's parameters: a tied head must be tied again (it was silently random)."""
    from nanoseek import ModelConfig

    model = build(ModelConfig.from_preset("tiny-dense", tie_word_embeddings=True))
    save_pretrained(model, tmp_path)
    loaded = load(tmp_path)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    x = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
