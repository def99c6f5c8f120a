"""Export a nanoseek model directory as one GGUF file (model + tokenizer) that llama.cpp runs as it is.

llama.cpp's `deepseek2` architecture covers V2/V3-style models (MLA + DeepSeekMoE); this module writes what its own
converter (`convert_hf_to_gguf.py`, class DeepseekV2Model) writes for such a checkpoint, from nanoseek's weights:

- hyper-parameters under `deepseek2.*` (MLA seen as MQA with one KV head of kv_lora_rank + rope width; expert
  counts, groups, gating function, scaling; YaRN as the converter writes it);
- tensors under llama.cpp's names (`gguf.get_tensor_name_map`), `kv_b_proj` split into `attn_k_b` (transposed) and
  `attn_v_b` for its absorbed MLA path, experts already stacked (E, out, in) as llama.cpp wants them; MTP modules
  are left out (llama.cpp's deepseek2 does not run them); norms, the router and its bias stay fp32;
- the byte-level BPE tokenizer (`tokenizer.ggml.model = gpt2`: tokens, types, merges, special ids, chat template)
  with a *pre-tokenizer llama.cpp knows*. llama.cpp does not read tokenizer.json's regexes: it picks its split rules
  by name, so the export must name one that cuts text exactly as nanoseek's tokenizer does, or refuse
  (`pretokenizer()`).

Weights: f32, bf16, f16, or q8_0 (llama.cpp's 8-bit blocks of 32 with one fp16 scale, quantized here by the `gguf`
package with llama.cpp's own rounding). docs/inference.md, "GGUF export".
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .model import Transformer

FILE_TYPES = ("f32", "bf16", "f16", "q8_0")

# The split rules of llama.cpp's "deepseek-v3" pre-tokenizer (src/llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_DEEPSEEK3_LLM),
# which are DeepSeek-V3's tokenizer.json: runs of 1-3 digits, CJK runs, then the main pattern.
_V3_DIGITS = r"\p{N}{1,3}"
_CJK = "[一-龥\u3040-ゟ゠-ヿ]+"
_MAIN = (r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
         r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def pretokenizer(tokenizer_json: dict[str, Any]) -> str:
    """The llama.cpp pre-tokenizer name that reproduces this tokenizer's splits, or a ValueError saying why none does.

    Accepted: a byte-level BPE whose pre-tokenizer is Split(digits) -> Split(CJK) -> Split(V3's main pattern) ->
    ByteLevel(no prefix space, no regex), with no normalizer: DeepSeek-V3's own (digits `\\p{N}{1,3}`) or
    nanoseek's (every digit alone, `\\p{N}`). Both are llama.cpp's "deepseek-v3": with single-digit splits BPE was
    trained on pieces holding one digit, so no merge joins two digits and BPE cuts a 1-3 digit run into single
    digits exactly as a one-digit split would — checked on the vocabulary (no multi-digit token), not assumed.
    """
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"GGUF export needs a byte-level BPE tokenizer, got model type {model.get('type')!r}")
    if tokenizer_json.get("normalizer") is not None:
        raise ValueError("GGUF export: the tokenizer has a normalizer, which no llama.cpp pre-tokenizer reproduces")
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    shape = []
    for s in steps:
        if s.get("type") == "Split":
            shape.append(("Split", (s.get("pattern") or {}).get("Regex"), s.get("behavior")))
        elif s.get("type") == "ByteLevel":
            shape.append(("ByteLevel", bool(s.get("add_prefix_space")), bool(s.get("use_regex"))))
        else:
            shape.append((s.get("type"),))
    tail = [("Split", _CJK, "Isolated"), ("Split", _MAIN, "Isolated"), ("ByteLevel", False, False)]
    if shape == [("Split", _V3_DIGITS, "Isolated"), *tail]:
        return "deepseek-v3"
    if shape == [("Split", r"\p{N}", "Isolated"), *tail]:
        multi = [t for t in model.get("vocab", {}) if len(t) > 1 and all(c.isdigit() for c in t)]
        if multi:
            raise ValueError(f"GGUF export: single-digit pre-tokenizer but the vocabulary has multi-digit tokens "
                             f"({multi[:5]}): llama.cpp's deepseek-v3 splits (1-3 digits) would encode differently")
        return "deepseek-v3"
    raise ValueError("GGUF export: no llama.cpp pre-tokenizer reproduces this tokenizer's pre-tokenizer "
                     f"({[s[0] for s in shape]}); supported: DeepSeek-V3's and nanoseek's (digits, CJK, V3's main "
                     "pattern, byte level)")


def _vocab(tok_dir: Path, vocab_size: int) -> dict[str, Any]:
    """tokens / token types / merges / special ids / chat template, as llama.cpp's gpt2 vocabulary reads them."""
    import gguf

    tj = json.loads((tok_dir / "tokenizer.json").read_text())
    pre = pretokenizer(tj)
    ids: dict[int, str] = {i: t for t, i in tj["model"]["vocab"].items()}
    types = dict.fromkeys(ids, gguf.TokenType.NORMAL)
    for a in tj.get("added_tokens", []):
        ids[a["id"]] = a["content"]
        types[a["id"]] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    if max(ids) >= vocab_size:
        raise ValueError(f"GGUF export: the tokenizer has id {max(ids)} >= the model's vocab_size {vocab_size}")
    tokens, toktypes = [], []
    for i in range(vocab_size):  # rows of the embedding no token uses: placeholders, as llama.cpp's converter
        tokens.append(ids.get(i, f"[PAD{i}]"))
        toktypes.append(types.get(i, gguf.TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    cfg_path = tok_dir / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}

    def special(key: str) -> int | None:
        t = tcfg.get(key)
        t = t.get("content") if isinstance(t, dict) else t
        return next((i for i, s in ids.items() if s == t), None) if t else None

    return {"pre": pre, "tokens": tokens, "types": toktypes, "merges": merges, "bos": special("bos_token"),
            "eos": special("eos_token"), "pad": special("pad_token"), "chat_template": tcfg.get("chat_template"),
            "add_bos": bool(tcfg.get("add_bos_token", True))}


def _rope_halves_to_pairs(w: torch.Tensor, rope: int) -> torch.Tensor:
    """Reorder the last `rope` output rows of w (..., out, in) from rotate-half pairs (i, i + R/2) to adjacent pairs
    (2i, 2i + 1): llama.cpp's deepseek2 rotates adjacent pairs; nanoseek with rope_interleave=False rotates halves."""
    perm = torch.arange(rope).view(2, rope // 2).t().flatten()  # 0, R/2, 1, R/2 + 1, ...
    head, tail = w[..., : w.shape[-2] - rope, :], w[..., w.shape[-2] - rope:, :]
    return torch.cat([head, tail[..., perm, :]], dim=-2)


def gguf_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """(llama.cpp tensor name, fp32 tensor in HF (out, in) layout) for every tensor llama.cpp's deepseek2 reads."""
    import gguf

    cfg = model.config
    L = cfg.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, L)
    H, nope, rope, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    for name, t in model.state_dict().items():
        if name.startswith("mtp.") or (cfg.tie_word_embeddings and name == "lm_head.weight"):
            continue
        t = t.detach().float().cpu()
        hf = "model." + name if not name.startswith("lm_head.") else name
        if re.search(r"mlp\.experts\.(gate|up|down)_proj$", name):  # stacked (E, out, in), as llama.cpp's *_exps
            hf += ".weight"
        if not cfg.rope_interleave:
            if name.endswith(("q_proj.weight", "q_b_proj.weight")):
                t = _rope_halves_to_pairs(t.view(H, nope + rope, -1), rope).reshape(t.shape)
            elif name.endswith("kv_a_proj_with_mqa.weight"):
                t = _rope_halves_to_pairs(t, rope)
        if name.endswith("kv_b_proj.weight"):  # (H * (nope + v), C) -> k_b (H, C, nope) and v_b (H, v, C)
            kv = t.view(H, nope + v, -1)
            k_b, v_b = kv[:, :nope].transpose(1, 2), kv[:, nope:]
            for part, x in (("k_b_proj", k_b), ("v_b_proj", v_b)):
                yield names.get_name(hf.replace("kv_b_proj", part), try_suffixes=(".weight",)), x.contiguous()
            continue
        if hf.endswith("e_score_correction_bias"):  # V3 eq. 16's bias: llama.cpp's exp_probs_b, a ".bias"
            new = names.get_name(hf.removesuffix("_bias")) + ".bias"
        else:
            new = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ValueError(f"GGUF export: no llama.cpp name for tensor {name!r} ({hf})")
        yield new, t.contiguous()


def export_gguf(model_dir: str | Path, out: str | Path, *, file_type: str = "f32",
                tokenizer_dir: str | Path | None = None) -> Path:
    """Write `out` (.gguf) from a model directory with its tokenizer (or `tokenizer_dir`). Returns the path.

    Raises ValueError, before writing anything, for what llama.cpp could not run as nanoseek does: a dense/MHA
    model (llama.cpp's deepseek2 is MLA + MoE), a missing tokenizer, a pre-tokenizer llama.cpp has no name for."""
    import os

    import gguf

    from . import load

    if file_type not in FILE_TYPES:
        raise ValueError(f"unknown GGUF file type {file_type!r} (accepted: {', '.join(FILE_TYPES)})")
    model_dir = Path(model_dir)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else model_dir
    if not (tok_dir / "tokenizer.json").is_file():
        raise ValueError(f"no tokenizer.json in {tok_dir}: a GGUF file carries its tokenizer (pass --tokenizer)")
    model = load(model_dir, device="cpu")  # its own dtype: tensors are converted one at a time below
    if not isinstance(model, Transformer):
        raise ValueError("GGUF export supports nanoseek language models (a Janus directory is not one)")
    cfg = model.config
    if cfg.attention != "mla" or not cfg.has_moe:
        raise ValueError("GGUF export writes llama.cpp's deepseek2 architecture (MLA + DeepSeekMoE); this model is "
                         f"attention={cfg.attention!r}, n_routed_experts={cfg.n_routed_experts}")
    if cfg.q_lora_rank is None and cfg.num_hidden_layers not in (26, 27):
        # llama.cpp's deepseek2 loader recognises a model without q-LoRA (V2-Lite) by its layer count alone
        # (src/models/deepseek2.cpp: is_lite = n_layer == 26 or 27) and otherwise requires q_lora_rank
        raise ValueError(f"GGUF export: llama.cpp runs a deepseek2 model without q-LoRA (q_lora_rank null) only at 26 "
                         f"or 27 layers (V2-Lite's), this one has {cfg.num_hidden_layers}")
    vocab = _vocab(tok_dir, cfg.vocab_size)  # checks the tokenizer before any tensor is converted
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "bf16": gguf.GGMLQuantizationType.BF16,
             "f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[file_type]
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
             "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[file_type]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")  # written whole, then renamed: no half-written file at `out`
    w = gguf.GGUFWriter(path=tmp, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DEEPSEEK2])
    try:
        _write_hparams(w, cfg, model_dir.name, ftype)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(vocab["pre"])
        w.add_token_list(vocab["tokens"])
        w.add_token_types(vocab["types"])
        w.add_token_merges(vocab["merges"])
        for key, fn in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id)):
            if vocab[key] is not None:
                fn(vocab[key])
        w.add_add_bos_token(vocab["add_bos"])
        w.add_add_eos_token(False)
        if vocab["chat_template"]:
            w.add_chat_template(vocab["chat_template"])
        for name, t in gguf_tensors(model):
            data = t.numpy()
            # 1-D tensors, norms, the router and its bias in fp32 (llama.cpp's converter rule)
            keep32 = data.ndim <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name \
                or not name.endswith(".weight")
            q = gguf.GGMLQuantizationType.F32 if keep32 else qtype
            if q == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
                q = gguf.GGMLQuantizationType.F16  # Q8_0 needs rows of whole 32-blocks (the converter's fallback)
            if q == gguf.GGMLQuantizationType.F32:
                w.add_tensor(name, data.astype(np.float32))
            elif q == gguf.GGMLQuantizationType.F16:
                w.add_tensor(name, data.astype(np.float16))
            else:
                w.add_tensor(name, gguf.quants.quantize(data, q), raw_dtype=q)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    finally:
        w.close()
        tmp.unlink(missing_ok=True)
    return out


def _write_hparams(w: Any, cfg: Any, name: str, ftype: Any) -> None:
    """What llama.cpp's converter writes for DeepseekV3/V2ForCausalLM (conversion/deepseek.py + base.py)."""
    import gguf

    w.add_name(name)
    w.add_file_type(ftype)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(1)  # MLA runs as MQA over the latent: one KV "head" of kv_lora_rank + rope
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    if cfg.q_lora_rank is not None:
        w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_shared_count(cfg.n_shared_experts)
    if cfg.n_group > 1:
        if cfg.topk_method == "group_limited_greedy":  # V2's group score is the best expert; llama.cpp: top-2 sum
            raise ValueError("GGUF export: llama.cpp scores expert groups by their top-2 sum (V3's noaux_tc); "
                             "V2's group_limited_greedy (best expert) has no equivalent")
        w.add_expert_group_count(cfg.n_group)
        w.add_expert_group_used_count(cfg.topk_group)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    if cfg.norm_topk_prob and cfg.num_experts_per_tok > 1:
        w.add_expert_weights_norm(True)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if cfg.scoring_func == "sigmoid"
                             else gguf.ExpertGatingFuncType.SOFTMAX)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    rs = cfg.yarn
    if rs is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rs["factor"])
        w.add_rope_scaling_orig_ctx_len(rs["original_max_position_embeddings"])
        if rs.get("beta_fast") is not None:
            w.add_rope_scaling_yarn_beta_fast(rs["beta_fast"])
        if rs.get("beta_slow") is not None:
            w.add_rope_scaling_yarn_beta_slow(rs["beta_slow"])
        if rs.get("mscale_all_dim") is not None:  # the converter's legacy form (its TAG_DEEPSEEK2_YARN_LOG_MUL_FIX)
            w.add_rope_scaling_yarn_log_mul(0.1 * rs["mscale_all_dim"])
