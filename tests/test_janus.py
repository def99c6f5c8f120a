"""Janus-Pro against transformers' JanusForConditionalGeneration (the reference), on tiny random configs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import nanoseek
from nanoseek import ModelConfig, build, save_pretrained
from nanoseek.imagine import janus_config_to_hf, preprocess, read_processor_config, to_pil
from nanoseek.infer import generate_image_tokens
from nanoseek.janus import (
    Janus,
    JanusConfig,
    VisionConfig,
    generate_image_tokens_reference,
    guidance_rows,
    janus_preset,
)
from nanoseek.model import KVCache
from nanoseek.weights import config_to_hf

TINY = janus_preset("janus-tiny")
ATOL = 1e-4


def _tiny(tied: bool = False) -> JanusConfig:
    return replace(TINY, text=replace(TINY.text, tie_word_embeddings=tied))


def _random(cfg: JanusConfig, seed: int = 0) -> Janus:
    torch.manual_seed(seed)
    m = Janus(cfg).eval()
    with torch.no_grad():  # no structure hidden by zero biases / unit norms
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


def _hf(path: Path):
    from transformers import JanusForConditionalGeneration

    return JanusForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()


def write_tokenizer(d: Path, cfg: JanusConfig, every_id: bool = False) -> Path:
    """A word-level tokenizer with Janus' special tokens at the tiny config's ids and the words of the test prompts;
    `every_id` adds a word for every other id, so that any output decodes to text (the serving tests compare the
    server's text with the in-process model's tokens)."""
    import tokenizers
    from tokenizers import models, pre_tokenizers

    special = {1: "<｜begin▁of▁sentence｜>", 2: "<｜end▁of▁sentence｜>", 3: "<｜▁pad▁｜>",
               cfg.image_token_id: "<image_placeholder>", cfg.boi_token_id: "<begin_of_image>",
               cfg.eoi_token_id: "<end_of_image>"}
    words = ["a", "red", "bicycle", "under", "tree", "what", "is", "in", "this", "picture", "<|", "User", "|>:",
             "Assistant", "the", "blue", "cat", "and", "now"]
    vocab = {"<unk>": 0, **{t: i for i, t in special.items()}}
    free = [i for i in range(cfg.text.vocab_size) if i not in vocab.values()]
    if every_id:
        words += [f"w{i}" for i in range(len(free) - len(words))]
    vocab.update(zip(words, free))
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(special.values()))
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": special[1], "eos_token": special[2],
        "pad_token": special[3], "unk_token": "<unk>"}))
    return d


def _inputs(cfg: JanusConfig, B: int = 2, T: int = 30, n_img: int = 1):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 140, (B, T), generator=g)
    N = cfg.num_image_tokens
    for b in range(B):
        for k in range(n_img):
            ids[b, 2 + k * (N + 3): 2 + k * (N + 3) + N] = cfg.image_token_id
    return ids, torch.randn(B * n_img, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)


def _compare(ours: Janus, hf, cfg: JanusConfig) -> None:
    ids, pix = _inputs(cfg, T=45, n_img=2)
    with torch.no_grad():
        a = ours(ids, pix)
        b = hf(input_ids=ids, pixel_values=pix).logits
        assert (a - b).abs().max() < ATOL
        p, im = torch.randint(4, 140, (2, 7)), torch.randint(0, cfg.vq.num_embeddings, (2, cfg.num_image_tokens))
        x = torch.cat([hf.get_input_embeddings()(p), hf.prepare_embeddings_for_image_generation(im[:, :-1])], 1)
        ref = hf.model.generation_head(hf.model.language_model(inputs_embeds=x).last_hidden_state[:, p.shape[1] - 1:])
        got = ours.image_logits(p, im)
        assert got.shape == (2, cfg.num_image_tokens, cfg.vq.num_embeddings)
        assert (got - ref).abs().max() < ATOL
        assert (ours.decode_image(im) - hf.model.vqmodel.decode(im)).abs().max() < ATOL


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_parity_nanoseek_to_transformers(tmp_path, tied):
    cfg = _tiny(tied)
    ours = _random(cfg)
    save_pretrained(ours, tmp_path / "m")
    hf = _hf(tmp_path / "m")
    assert (hf.lm_head.weight is hf.model.language_model.embed_tokens.weight) == tied
    _compare(ours, hf, cfg)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_parity_transformers_to_nanoseek(tmp_path, tied):
    from transformers import JanusConfig as HFConfig
    from transformers import JanusForConditionalGeneration

    cfg = _tiny(tied)
    hf_cfg = {k: v for k, v in janus_config_to_hf(cfg).items() if k not in ("architectures", "model_type")}
    if tied:
        hf_cfg.pop("tie_word_embeddings")  # transformers' default: tied
    torch.manual_seed(3)
    hf = JanusForConditionalGeneration(HFConfig(**hf_cfg)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hf.save_pretrained(str(tmp_path / "hf"))
    ours = nanoseek.load(tmp_path / "hf")
    assert isinstance(ours, Janus) and ours.config.text.tie_word_embeddings == tied
    _compare(ours, hf, cfg)


def test_parity_with_a_deepseek_v3_trunk(tmp_path):
    """The mini Janus' trunk is nanoseek's DeepSeek-V3 block (MLA + DeepSeekMoE, docs/janus.md): transformers' Janus
    builds its language model from any text config, so a V3 text config loads there as DeepseekV3Model and the
    logits, image features and generation head match."""
    from nanoseek.model import PRESETS

    t = TINY.text
    v3 = replace(PRESETS["tiny"], vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                 max_position_embeddings=t.max_position_embeddings, num_nextn_predict_layers=0,
                 tie_word_embeddings=False)
    cfg = replace(TINY, text=v3)
    ours = _random(cfg)
    save_pretrained(ours, tmp_path / "m")
    hf = _hf(tmp_path / "m")
    assert type(hf.model.language_model).__name__ == "DeepseekV3Model"
    _compare(ours, hf, cfg)
    back = nanoseek.load(tmp_path / "m")
    assert back.config.text.attention == "mla" and back.config.text.n_routed_experts == v3.n_routed_experts


def test_untied_head_under_a_tied_config_loads_untied(tmp_path):
    """Janus-Pro's head is its own while JanusConfig defaults to tied: a different lm_head in the files wins."""
    cfg = _tiny(False)
    ours = _random(cfg)
    save_pretrained(ours, tmp_path / "m")
    c = json.loads((tmp_path / "m" / "config.json").read_text())
    c.pop("tie_word_embeddings")
    (tmp_path / "m" / "config.json").write_text(json.dumps(c))
    loaded = nanoseek.load(tmp_path / "m")
    assert not loaded.config.text.tie_word_embeddings
    assert torch.equal(loaded.language_model.lm_head.weight, ours.language_model.lm_head.weight)


def test_dense_trunk_matches_llama_and_its_cache():
    """DeepSeek-LLM = the trunk with attention="mha": transformers' LlamaForCausalLM, GQA too; cached = full."""
    from transformers import LlamaConfig, LlamaForCausalLM

    for kv in (4, 2):
        cfg = ModelConfig.from_preset("tiny-dense", num_key_value_heads=kv, attention_bias=kv == 2)
        torch.manual_seed(0)
        ours = build(cfg).eval()
        hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config_to_hf(cfg).items() if k != "model_type"})).eval()
        hf.load_state_dict({(k if k.startswith("lm_head") else "model." + k): v for k, v in ours.state_dict().items()})
        ids = torch.randint(0, cfg.vocab_size, (2, 11))
        with torch.no_grad():
            full = ours(ids)
            assert (full - hf(ids).logits).abs().max() < ATOL
            cache = KVCache(cfg, 2, 16)
            assert cache.c_kv.shape[-1] == kv * cfg.attn_head_dim  # keys; values in the second slot
            steps = [ours(ids[:, :6], cache=cache)] + [ours(ids[:, t:t + 1], cache=cache) for t in range(6, 11)]
            assert (torch.cat(steps, 1) - full).abs().max() < ATOL


def test_engine_runs_the_dense_trunk(one_torch_thread):
    """The text engine drives the MHA cache as it drives MLA's: greedy decoding equals a no-cache loop."""
    from nanoseek.infer import generate

    torch.manual_seed(0)
    model = build(ModelConfig.from_preset("tiny-dense", num_key_value_heads=2)).eval()
    prompt = [0, 5, 9, 33, 7]
    out = generate(model, prompt, 8)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt):]


def test_prompt_formats_follow_deepseek():
    from nanoseek.imagine import UNDERSTANDING_SYSTEM, user_turn

    assert user_turn(" a red bicycle ") == "<|User|>: a red bicycle\n\n<|Assistant|>:"
    assert user_turn("q", UNDERSTANDING_SYSTEM).startswith("You are a helpful language and vision assistant.")
    assert user_turn("q", UNDERSTANDING_SYSTEM).endswith("natural language.\n\n<|User|>: q\n\n<|Assistant|>:")


# ---------------------------------------------------------------------------------------------------------------
# DeepSeek's original layout (MultiModalityCausalLM): the key inventory is written here from DeepSeek's code
# (janus/models/siglip_vit.py: timm VisionTransformer, global_pool "map" -> attn_pool; vq_model.py: VQModel with
# conv_blocks/res/mid.0-2 and a codebook_used buffer; projector.py: nn.Sequential "layers"; modeling_vlm.py:
# vision_head.output_mlp_projector / vision_head, gen_embed; LlamaForCausalLM under language_model), not from
# nanoseek's mapping.


def original_inventory(cfg: JanusConfig) -> dict[str, tuple[int, ...]]:
    v, q, t = cfg.vision, cfg.vq, cfg.text
    D, C, I = t.hidden_size, v.hidden_size, int(v.hidden_size * v.mlp_ratio)
    inv: dict[str, tuple[int, ...]] = {}
    vt = "vision_model.vision_tower."
    inv[vt + "pos_embed"] = (1, v.grid ** 2, C)
    inv[vt + "patch_embed.proj.weight"] = (C, 3, v.patch_size, v.patch_size)
    inv[vt + "patch_embed.proj.bias"] = (C,)
    for i in range(v.num_hidden_layers):
        b = f"{vt}blocks.{i}."
        inv.update({b + "norm1.weight": (C,), b + "norm1.bias": (C,), b + "attn.qkv.weight": (3 * C, C),
                    b + "attn.qkv.bias": (3 * C,), b + "attn.proj.weight": (C, C), b + "attn.proj.bias": (C,),
                    b + "norm2.weight": (C,), b + "norm2.bias": (C,), b + "mlp.fc1.weight": (I, C),
                    b + "mlp.fc1.bias": (I,), b + "mlp.fc2.weight": (C, I), b + "mlp.fc2.bias": (C,)})
    inv.update({vt + "norm.weight": (C,), vt + "norm.bias": (C,)})
    ap = vt + "attn_pool."  # timm AttentionPoolLatent: in the checkpoint, unused (ignore_head=True)
    inv.update({ap + "latent": (1, 1, C), ap + "q.weight": (C, C), ap + "q.bias": (C,), ap + "kv.weight": (2 * C, C),
                ap + "kv.bias": (2 * C,), ap + "proj.weight": (C, C), ap + "proj.bias": (C,), ap + "norm.weight": (C,),
                ap + "norm.bias": (C,), ap + "mlp.fc1.weight": (I, C), ap + "mlp.fc1.bias": (I,),
                ap + "mlp.fc2.weight": (C, I), ap + "mlp.fc2.bias": (C,)})
    inv.update({"aligner.layers.0.weight": (D, C), "aligner.layers.0.bias": (D,), "aligner.layers.2.weight": (D, D),
                "aligner.layers.2.bias": (D,)})

    def res(p: str, cin: int, cout: int) -> None:
        inv.update({p + "norm1.weight": (cin,), p + "norm1.bias": (cin,), p + "conv1.weight": (cout, cin, 3, 3),
                    p + "conv1.bias": (cout,), p + "norm2.weight": (cout,), p + "norm2.bias": (cout,),
                    p + "conv2.weight": (cout, cout, 3, 3), p + "conv2.bias": (cout,)})
        if cin != cout:
            inv.update({p + "nin_shortcut.weight": (cout, cin, 1, 1), p + "nin_shortcut.bias": (cout,)})

    def attn(p: str, c: int) -> None:
        inv.update({p + "norm.weight": (c,), p + "norm.bias": (c,)})
        for n in ("q", "k", "v", "proj_out"):
            inv.update({p + f"{n}.weight": (c, c, 1, 1), p + f"{n}.bias": (c,)})

    g, ch, mult = "gen_vision_model.", q.base_channels, q.channel_multiplier
    inv.update({g + "encoder.conv_in.weight": (ch, 3, 3, 3), g + "encoder.conv_in.bias": (ch,)})
    c = ch
    for i, m in enumerate(mult):
        for j in range(q.num_res_blocks):
            res(f"{g}encoder.conv_blocks.{i}.res.{j}.", c, ch * m)
            c = ch * m
            if i == len(mult) - 1:
                attn(f"{g}encoder.conv_blocks.{i}.attn.{j}.", c)
        if i != len(mult) - 1:
            inv.update({f"{g}encoder.conv_blocks.{i}.downsample.conv.weight": (c, c, 3, 3),
                        f"{g}encoder.conv_blocks.{i}.downsample.conv.bias": (c,)})
    for part in ("encoder", "decoder"):
        res(f"{g}{part}.mid.0.", c, c)
        attn(f"{g}{part}.mid.1.", c)
        res(f"{g}{part}.mid.2.", c, c)
    inv.update({g + "encoder.norm_out.weight": (c,), g + "encoder.norm_out.bias": (c,),
                g + "encoder.conv_out.weight": (q.latent_channels, c, 3, 3),
                g + "encoder.conv_out.bias": (q.latent_channels,),
                g + "decoder.conv_in.weight": (c, q.latent_channels, 3, 3), g + "decoder.conv_in.bias": (c,)})
    for k, i in enumerate(reversed(range(len(mult)))):
        for j in range(q.num_res_blocks + 1):
            res(f"{g}decoder.conv_blocks.{k}.res.{j}.", c, ch * mult[i])
            c = ch * mult[i]
            if i == len(mult) - 1:
                attn(f"{g}decoder.conv_blocks.{k}.attn.{j}.", c)
        if i != 0:
            inv.update({f"{g}decoder.conv_blocks.{k}.upsample.conv.weight": (c, c, 3, 3),
                        f"{g}decoder.conv_blocks.{k}.upsample.conv.bias": (c,)})
    inv.update({g + "decoder.norm_out.weight": (c,), g + "decoder.norm_out.bias": (c,),
                g + "decoder.conv_out.weight": (3, c, 3, 3), g + "decoder.conv_out.bias": (3,),
                g + "quantize.embedding.weight": (q.num_embeddings, q.embed_dim),
                g + "quantize.codebook_used": (65536,),
                g + "quant_conv.weight": (q.embed_dim, q.latent_channels, 1, 1), g + "quant_conv.bias": (q.embed_dim,),
                g + "post_quant_conv.weight": (q.latent_channels, q.embed_dim, 1, 1),
                g + "post_quant_conv.bias": (q.latent_channels,)})
    inv.update({"gen_aligner.layers.0.weight": (D, q.embed_dim), "gen_aligner.layers.0.bias": (D,),
                "gen_aligner.layers.2.weight": (D, D), "gen_aligner.layers.2.bias": (D,),
                "gen_head.output_mlp_projector.weight": (D, D), "gen_head.output_mlp_projector.bias": (D,),
                "gen_head.vision_head.weight": (q.num_embeddings, D), "gen_head.vision_head.bias": (q.num_embeddings,),
                "gen_embed.weight": (q.num_embeddings, q.embed_dim)})
    lm, hd = "language_model.model.", t.attn_head_dim
    inv[lm + "embed_tokens.weight"] = (t.vocab_size, D)
    for i in range(t.num_hidden_layers):
        b = f"{lm}layers.{i}."
        inv.update({b + "self_attn.q_proj.weight": (t.num_attention_heads * hd, D),
                    b + "self_attn.k_proj.weight": (t.kv_heads * hd, D),
                    b + "self_attn.v_proj.weight": (t.kv_heads * hd, D),
                    b + "self_attn.o_proj.weight": (D, t.num_attention_heads * hd),
                    b + "mlp.gate_proj.weight": (t.intermediate_size, D),
                    b + "mlp.up_proj.weight": (t.intermediate_size, D),
                    b + "mlp.down_proj.weight": (D, t.intermediate_size), b + "input_layernorm.weight": (D,),
                    b + "post_attention_layernorm.weight": (D,)})
    inv.update({lm + "norm.weight": (D,), "language_model.lm_head.weight": (t.vocab_size, D)})
    return inv


def original_config(cfg: JanusConfig) -> dict:
    t, D = cfg.text, cfg.text.hidden_size
    return {"model_type": "multi_modality", "architectures": ["MultiModalityCausalLM"],
            "vision_config": {"cls": "CLIPVisionTower", "model_type": "vision", "params": {
                "image_size": cfg.vision.image_size, "model_name": "siglip_large_patch16_384",
                "select_feature": "same", "select_layer": -1}},
            "aligner_config": {"cls": "MlpProjector", "model_type": "aligner", "params": {
                "depth": 2, "input_dim": cfg.vision.hidden_size, "n_embed": D, "projector_type": "mlp_gelu"}},
            "gen_vision_config": {"cls": "VQ-16", "model_type": "gen_vision", "params": {
                "image_token_size": cfg.vq.num_embeddings, "n_embed": cfg.vq.embed_dim}},
            "gen_aligner_config": {"cls": "MlpProjector", "model_type": "gen_aligner", "params": {
                "depth": 2, "input_dim": cfg.vq.embed_dim, "n_embed": D, "projector_type": "mlp_gelu"}},
            "gen_head_config": {"cls": "vision_head", "model_type": "gen_head", "params": {
                "image_token_embed": D, "image_token_size": cfg.vq.num_embeddings, "n_embed": D}},
            "language_config": {"hidden_size": D, "intermediate_size": t.intermediate_size,
                                "max_position_embeddings": t.max_position_embeddings, "model_type": "llama",
                                "num_attention_heads": t.num_attention_heads, "num_hidden_layers": t.num_hidden_layers,
                                "num_key_value_heads": t.kv_heads, "vocab_size": t.vocab_size},
            # test-sized towers (DeepSeek's code fixes SigLIP-L and VQ-16 widths by name)
            "nanoseek": {"vision": {k: getattr(cfg.vision, k) for k in (
                "hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size")},
                "vq": {"base_channels": cfg.vq.base_channels, "channel_multiplier": list(cfg.vq.channel_multiplier),
                       "num_res_blocks": cfg.vq.num_res_blocks, "latent_channels": cfg.vq.latent_channels}}}


def expected_name(key: str) -> str | None:
    """Where each original tensor lands in nanoseek, spelled out per module (independent of imagine.ORIGINAL_TO_HF)."""
    if ".attn_pool." in key or key.endswith("codebook_used"):
        return None
    parts = key.split(".")
    if key.startswith("vision_model.vision_tower."):
        rest = parts[2:]
        if rest[0] == "pos_embed":
            return "vision_model.embeddings.position_embedding.weight"
        if rest[0] == "patch_embed":
            return "vision_model.embeddings.patch_embedding." + rest[-1]
        if rest[0] == "norm":
            return "vision_model.post_layernorm." + rest[-1]
        i, mod = rest[1], rest[2]
        sub = {"norm1": "layer_norm1", "norm2": "layer_norm2", "mlp": "mlp." + rest[3] if mod == "mlp" else "",
               "attn": "self_attn.qkv" if rest[3] == "qkv" else "self_attn.projection_layer"}[mod]
        return f"vision_model.encoder.layers.{i}.{sub}.{rest[-1]}"
    if parts[0] in ("aligner", "gen_aligner"):
        mod = "aligner" if parts[0] == "aligner" else "generation_aligner"
        return f"{mod}.fc1.{parts[-1]}" if parts[2] == "0" else f"{mod}.hidden_layers.0.{parts[-1]}"
    if parts[0] == "gen_head":
        return "generation_head." + {"output_mlp_projector": "proj_out", "vision_head": "vision_head"}[parts[1]] \
            + "." + parts[-1]
    if parts[0] == "gen_embed":
        return "generation_embeddings.weight"
    if parts[0] == "gen_vision_model":
        rest = parts[1:]
        if len(rest) > 2 and rest[1] == "mid":
            rest = [rest[0], "mid", {"0": "block_1", "1": "attn_1", "2": "block_2"}[rest[2]], *rest[3:]]
        if len(rest) > 2 and rest[1] == "conv_blocks":
            rest = [rest[0], "down" if rest[0] == "encoder" else "up", rest[2],
                    "block" if rest[3] == "res" else rest[3], *rest[4:]]
        return "vqmodel." + ".".join(rest)
    if key.startswith("language_model.model."):
        return "language_model." + key.removeprefix("language_model.model.")
    assert key == "language_model.lm_head.weight"
    return key


def test_original_layout_loads_from_deepseek_inventory(tmp_path):
    cfg = _tiny(False)
    inv = original_inventory(cfg)
    torch.manual_seed(5)
    sd = {k: torch.randn(s) * 0.05 for k, s in inv.items()}
    d = tmp_path / "orig"
    d.mkdir()
    torch.save(sd, d / "pytorch_model.bin")  # DeepSeek's repositories ship .bin files
    (d / "config.json").write_text(json.dumps(original_config(cfg)))
    write_tokenizer(d, cfg)
    model = nanoseek.load(d)
    assert isinstance(model, Janus)
    assert (model.config.image_token_id, model.config.boi_token_id, model.config.pad_token_id) == (150, 151, 3)
    own = model.state_dict()
    C = cfg.vision.hidden_size
    for k, t in sd.items():
        name = expected_name(k)
        if name is None:
            continue
        if name.endswith(("qkv.weight", "qkv.bias")):
            for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                assert torch.equal(own[name.replace("qkv", proj)], t[j * C:(j + 1) * C]), k
        else:
            assert torch.equal(own[name], t.reshape(own[name].shape)), k
    # and it runs like transformers on the same weights (through nanoseek's HF save)
    save_pretrained(model, tmp_path / "hf")
    _compare(model, _hf(tmp_path / "hf"), cfg)


def test_checkpoint_errors_name_the_tensor(tmp_path):
    cfg = _tiny(False)
    d = tmp_path / "orig"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(original_config(cfg)))
    inv = original_inventory(cfg)
    sd = {k: torch.zeros(s) for k, s in inv.items() if k != "gen_head.vision_head.bias"}
    torch.save(sd, d / "pytorch_model.bin")
    with pytest.raises(nanoseek.CheckpointError, match="missing tensor.*model.generation_head.vision_head.bias"):
        nanoseek.load(d)
    sd["gen_head.vision_head.bias"] = torch.zeros(7)
    torch.save(sd, d / "pytorch_model.bin")
    with pytest.raises(nanoseek.CheckpointError, match=r"shape mismatch for model.generation_head.vision_head.bias"):
        nanoseek.load(d)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, d / "pytorch_model.bin")
    with pytest.raises(nanoseek.CheckpointError, match=r"weights_only=True"):
        nanoseek.load(d)


# ---------------------------------------------------------------------------------------------------------------
# Compatibility contract


def test_config_contracts():
    with pytest.raises(ValueError, match="num_image_tokens .* must equal the ViT patch grid"):
        replace(TINY, vision=replace(TINY.vision, num_image_tokens=15))
    with pytest.raises(ValueError, match="ViT patch grid .* must equal the VQ token grid"):
        JanusConfig(text=TINY.text, vision=replace(TINY.vision, patch_size=8, num_image_tokens=4), vq=TINY.vq)
    with pytest.raises(ValueError, match="must equal the LLM hidden_size"):
        JanusConfig(text=TINY.text, vision=VisionConfig(projection_dim=32), vq=TINY.vq)
    model = _random(TINY)
    ids, pix = _inputs(TINY, B=1)
    with pytest.raises(ValueError, match="hold 15 image tokens .* give 16 features"):
        model(ids.masked_fill(ids == TINY.image_token_id, 5).index_fill(1, torch.arange(2, 17), 150), pix)
    assert TINY.vision.grid ** 2 == TINY.num_image_tokens == model.vqmodel.grid ** 2
    for name in ("janus-pro-1b", "janus-pro-7b"):
        c = janus_preset(name)
        assert c.num_image_tokens == 576 == (384 // 16) ** 2 and c.vq.downsample == 16


def test_generation_config_tokenizer_and_processor(tmp_path):
    from transformers import AutoTokenizer, JanusImageProcessorPil, JanusProcessor

    cfg = _tiny(False)
    tok_dir = write_tokenizer(tmp_path / "tok", cfg)
    save_pretrained(_random(cfg), tmp_path / "m", tokenizer=tok_dir)
    gen = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    assert (gen["boi_token_id"], gen["pad_token_id"], gen["bos_token_id"]) == (151, 3, 1)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    proc = JanusProcessor(JanusImageProcessorPil(**json.loads((tmp_path / "m" / "preprocessor_config.json")
                                                              .read_text())), tok, num_image_tokens=16)
    assert (proc.image_token, proc.image_start_token, proc.image_end_token) == \
        ("<image_placeholder>", "<begin_of_image>", "<end_of_image>")
    assert tok.pad_token_id == 3 and tok.convert_tokens_to_ids(proc.image_token) == cfg.image_token_id
    with pytest.raises(nanoseek.CheckpointError, match="does not match the model's special tokens"):
        save_pretrained(_random(replace(cfg, boi_token_id=9)), tmp_path / "bad", tokenizer=tok_dir)
    assert not (tmp_path / "bad").exists()


def _images():
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
            ((37, 23), (23, 37), (16, 16), (5, 101), (400, 391), (3, 3))]


@pytest.mark.parametrize("size", [16, 384])
def test_preprocess_matches_transformers(tmp_path, size):
    """Equal to transformers' JanusImageProcessorPil with the checkpoint's preprocessor_config.json within 1e-5
    (float32 normalisation), on odd-sized, non-square, tiny and larger-than-target images."""
    from transformers import JanusImageProcessorPil

    cfg = TINY  # the size comes from the directory's preprocessor_config.json
    save_pretrained(_random(TINY), tmp_path / "m")
    proc_json = json.loads((tmp_path / "m" / "preprocessor_config.json").read_text())
    proc_json["size"] = {"height": size, "width": size}
    (tmp_path / "m" / "preprocessor_config.json").write_text(json.dumps(proc_json))
    ref = JanusImageProcessorPil(**proc_json)
    ours = preprocess(_images(), read_processor_config(tmp_path / "m", cfg))
    for i, im in enumerate(_images()):
        want = torch.as_tensor(ref(images=im, return_tensors="pt")["pixel_values"][0])
        assert ours[i].shape == want.shape == (3, size, size)
        assert (ours[i] - want).abs().max() < 1e-5, i
    # DeepSeek's own preprocessor_config.json (image_size, background_color) reads the same way
    (tmp_path / "m" / "preprocessor_config.json").write_text(json.dumps({
        "background_color": [127, 127, 127], "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5], "image_size": size, "min_size": 14, "rescale_factor": 0.00392156862745098}))
    assert torch.allclose(preprocess(_images(), read_processor_config(tmp_path / "m", cfg)), ours, atol=1e-6)


def test_postprocess_matches_transformers():
    from transformers import JanusImageProcessorPil

    x = torch.randn(2, 3, 16, 16) * 0.7
    ref = JanusImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3).postprocess(
        list(x), return_tensors="PIL.Image.Image")["pixel_values"]
    for a, b in zip(to_pil(x), ref):
        assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 1


def test_encode_image():
    """Cosine nearest code (DeepSeek/LlamaGen); equal to transformers' encode when the codes have unit norm."""
    from transformers import JanusConfig as HFConfig
    from transformers import JanusForConditionalGeneration

    from nanoseek.imagine import to_hf_state_dict

    model = _random(TINY)
    pix = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ids = model.encode_image(pix)
        assert ids.shape == (3, TINY.num_image_tokens)
        vq = model.vqmodel
        z = torch.nn.functional.normalize(vq.quant_conv(vq.encoder(pix)).permute(0, 2, 3, 1).flatten(1, 2), dim=-1)
        code = torch.nn.functional.normalize(vq.quantize.embedding.weight, dim=-1)
        assert torch.equal(ids, torch.cdist(z, code[None].expand(3, -1, -1)).argmin(-1))
        vq.quantize.embedding.weight.copy_(code)
        hf = JanusForConditionalGeneration(HFConfig(**{k: v for k, v in janus_config_to_hf(TINY).items()
                                                       if k not in ("architectures", "model_type")})).eval()
        hf.load_state_dict(to_hf_state_dict(model))
        assert torch.equal(model.encode_image(pix), hf.model.vqmodel.encode(pix).image_tokens.view(3, -1))


# ---------------------------------------------------------------------------------------------------------------
# Classifier-free guidance sampling


def test_guidance_rows_follow_deepseek():
    ids, mask = guidance_rows([[1, 7, 8, 9, 151], [1, 5, 151]], pad_id=3)
    assert ids.tolist() == [[1, 7, 8, 9, 151], [3, 3, 1, 5, 151], [1, 3, 3, 3, 151], [3, 3, 1, 3, 151]]
    assert mask.tolist() == [[1] * 5, [0, 0, 1, 1, 1], [1] * 5, [0, 0, 1, 1, 1]]


def test_cfg_sampling_is_seeded_and_equals_the_reference_loop(one_torch_thread):
    model = _random(TINY)
    prompts = [[1, 5, 6, 7, 151], [1, 8, 151]]  # left-padded batch
    a = generate_image_tokens(model, prompts, seed=7)
    assert torch.equal(a, generate_image_tokens(model, prompts, seed=7))
    assert not torch.equal(a, generate_image_tokens(model, prompts, seed=8))
    assert torch.equal(a, generate_image_tokens_reference(model, prompts, seed=7))
    assert a.shape == (2, 16) and int(a.max()) < TINY.vq.num_embeddings
    # greedy: a prompt in a padded batch gets the tokens it gets alone
    g = generate_image_tokens(model, prompts, temperature=0, cfg_weight=3)
    assert torch.equal(g[1:], generate_image_tokens(model, prompts[1:], temperature=0, cfg_weight=3))
    with pytest.raises(ValueError, match="must be >= 1"):
        generate_image_tokens(model, prompts, cfg_weight=0.5)


def test_cfg_greedy_matches_transformers_generate(tmp_path, one_torch_thread):
    """transformers' generate(generation_mode="image") keeps BOS and <begin_of_image> in the unconditional row:
    the same as DeepSeek's rule on a prompt with one BOS first and one <begin_of_image> last."""
    cfg = _tiny(False)
    model = _random(cfg)
    save_pretrained(model, tmp_path / "m")
    hf = _hf(tmp_path / "m")
    prompt = [1, 9, 12, 5, 6, 151]
    ours = generate_image_tokens(model, [prompt, prompt], temperature=0, cfg_weight=5)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt, prompt]), attention_mask=torch.ones(2, len(prompt), dtype=torch.long),
                          generation_mode="image", do_sample=False, guidance_scale=5,
                          max_new_tokens=cfg.num_image_tokens)
    assert torch.equal(ours, ref)


# ---------------------------------------------------------------------------------------------------------------
# The commands


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("janus")
    cfg = _tiny(False)
    save_pretrained(_random(cfg), d / "m", tokenizer=write_tokenizer(d / "tok", cfg))
    return d / "m"


def test_one_loader_and_saver_for_every_model(tiny_dir, tmp_path):
    """nanoseek.load / save_pretrained take any model; nanoseek.weights.load reads the DeepSeek LLMs only."""
    with pytest.raises(nanoseek.CheckpointError, match="is a Janus directory .*load it with nanoseek.load"):
        nanoseek.weights.load(tiny_dir)
    model = nanoseek.load(tiny_dir)
    assert isinstance(model, Janus)
    assert save_pretrained(model, tmp_path / "again") == tmp_path / "again"
    assert json.loads((tmp_path / "again" / "config.json").read_text())["model_type"] == "janus"


def test_imagine_writes_pngs_and_a_grid(tiny_dir, tmp_path, capsys, one_torch_thread):
    from PIL import Image

    from nanoseek.cli import main

    assert main(["imagine", "--model", str(tiny_dir), "a red bicycle under a tree", "--n", "2", "--seed", "3",
                 "--out", str(tmp_path / "a")]) == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["grid.png", "image_0.png", "image_1.png"]
    assert Image.open(tmp_path / "a" / "image_0.png").size == (16, 16)
    assert Image.open(tmp_path / "a" / "grid.png").size == (32, 16)
    main(["imagine", "--model", str(tiny_dir), "a red bicycle under a tree", "--n", "2", "--seed", "3",
          "--out", str(tmp_path / "b")])
    assert (tmp_path / "a" / "image_1.png").read_bytes() == (tmp_path / "b" / "image_1.png").read_bytes()


def test_understand_from_the_terminal(tiny_dir, tmp_path, capsys, one_torch_thread):
    from PIL import Image

    from nanoseek.cli import main

    Image.fromarray(np.zeros((20, 13, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    assert main(["generate", "--model", str(tiny_dir), "--image", str(tmp_path / "photo.png"), "--prompt",
                 "what is in this picture", "--max-tokens", "4"]) == 0
    assert "tokens in" in capsys.readouterr().err


def test_text_only_generate_on_a_janus_directory(tiny_dir, capsys):
    from nanoseek.cli import main

    assert main(["generate", "--model", str(tiny_dir), "--prompt", "a red bicycle", "--max-tokens", "3",
                 "--temperature", "0", "--ignore-eos"]) == 0
    assert "3 tokens in" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing_image", "image_is_dir", "corrupt_image", "cfg_below_1", "n_zero",
                                  "long_prompt"])
def test_bad_input_one_error_line_nothing_written(tiny_dir, tmp_path, capsys, case):
    from nanoseek.cli import main

    out = tmp_path / "out"
    (tmp_path / "bad.png").write_bytes(b"not a png")
    (tmp_path / "dir.png").mkdir()
    imagine = ["imagine", "--model", str(tiny_dir), "a red bicycle", "--out", str(out)]
    generate = ["generate", "--model", str(tiny_dir), "--prompt", "what", "--image"]
    argv, match = {
        "missing_image": (generate + [str(tmp_path / "none.png")], "does not exist"),
        "image_is_dir": (generate + [str(tmp_path / "dir.png")], "is not a file"),
        "corrupt_image": (generate + [str(tmp_path / "bad.png")], "cannot read image"),
        "cfg_below_1": (imagine + ["--cfg", "0.5"], "must be >= 1"),
        "n_zero": (imagine + ["--n", "0"], "--n must be >= 1"),
        "long_prompt": (["imagine", "--model", str(tiny_dir), " ".join(["red"] * 1100), "--out", str(out)],
                        "exceeds the context"),
    }[case]
    assert main(argv) == 2
    err = capsys.readouterr().err
    one = " ".join(err.split())  # the console wraps long lines at its width: one message, one "error:"
    assert err.count("error:") == 1 and "Traceback" not in err and match in one, err
    assert not out.exists()


def test_params_per_component(capsys):
    from nanoseek.accounting import janus_params_report

    r = janus_params_report("janus-pro-7b")
    c = r["components"]
    assert set(c) == {"vision_encoder", "aligner", "vq_model", "generation_embeddings", "generation_aligner",
                      "generation_head", "llm"}
    assert sum(c.values()) == r["total"]
    assert c["llm"] == 6_910_365_696  # DeepSeek-LLM 7B widths, untied head
    assert 300e6 < c["vision_encoder"] < 310e6  # SigLIP-L/16 at 384: ~303M
    from nanoseek.cli import main

    assert main(["params", "--preset", "janus-pro-1b"]) == 0
    assert "vision_encoder" in capsys.readouterr().out


def test_params_of_a_janus_directory(tiny_dir, capsys):
    from nanoseek.accounting import janus_params_report
    from nanoseek.cli import main

    r = janus_params_report(model_dir=tiny_dir)
    assert r["total"] == sum(p.numel() for p in nanoseek.load(tiny_dir).parameters())
    assert main(["params", "--model", str(tiny_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["components"]["llm"] == r["components"]["llm"]
