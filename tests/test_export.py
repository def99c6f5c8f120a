"""GGUF export (nanoseek.export): what llama.cpp reads, read back with the gguf package's own reader.

llama.cpp itself is not a test dependency: benchmarks/decode.py runs the exported files and compares its greedy
tokens and tokenization with nanoseek's (docs/benchmarks.md). Here: tensors and metadata round-trip, the MLA split
reassembles kv_b_proj, q8_0 stays within its rounding, the pre-tokenizer claim is checked by encoding with
llama.cpp's split rules, and what llama.cpp could not run is refused before anything is written.
"""

import json
import shutil

import gguf  # the `export` extra, and `dev`: nanoseek's core does not need it
import pytest
import torch

from nanoseek import ModelConfig, build, load, save_pretrained
from nanoseek.export import _rope_halves_to_pairs, export_gguf, pretokenizer
from nanoseek.model import apply_rope

from .hf_ref import make_tiny_model_dir

TEXT = "Question: what is 123 + 4567? Answer: 4690.\n\n  x  日本語 abc 7x8=56 (99) don't\tend "


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("export"))


def field(reader, key):
    f = reader.fields[key]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode()
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        return [bytes(f.parts[i]).decode() if f.types[-1] == gguf.GGUFValueType.STRING else f.parts[i][0]
                for i in f.data]
    return f.parts[f.data[0]][0]


def tensors(reader):
    return {t.name: t for t in reader.tensors}


def test_f32_round_trip_tensors_metadata_and_vocabulary(model_dir, tmp_path):
    out = export_gguf(model_dir, tmp_path / "m.gguf")
    r = gguf.GGUFReader(out)
    model, cfg = load(model_dir).eval(), load(model_dir).config
    ts = tensors(r)
    assert field(r, "general.architecture") == "deepseek2"
    assert field(r, "deepseek2.block_count") == cfg.num_hidden_layers  # MTP modules are not exported
    assert field(r, "deepseek2.expert_count") == 8 and field(r, "deepseek2.expert_used_count") == 2
    assert field(r, "deepseek2.expert_group_count") == 4 and field(r, "deepseek2.expert_group_used_count") == 2
    assert field(r, "deepseek2.attention.kv_lora_rank") == 32 and field(r, "deepseek2.attention.q_lora_rank") == 48
    assert field(r, "deepseek2.expert_gating_func") == gguf.ExpertGatingFuncType.SIGMOID
    assert not any(n.startswith("blk.2.") for n in ts)  # layer 2 would be the MTP module
    # weights: llama.cpp's (in, out) shape order of the HF (out, in) matrices, fp32 copies of nanoseek's
    emb = torch.from_numpy(ts["token_embd.weight"].data.copy())
    assert torch.equal(emb, model.embed_tokens.weight)
    exps = torch.from_numpy(ts["blk.1.ffn_gate_exps.weight"].data.copy())
    assert torch.equal(exps, model.layers[1].mlp.experts.gate_proj)  # (E, I, D) stacked as llama.cpp wants
    assert torch.equal(torch.from_numpy(ts["blk.1.exp_probs_b.bias"].data.copy()),
                       model.layers[1].mlp.gate.e_score_correction_bias)
    # kv_b_proj split for llama.cpp's absorbed MLA: k_b transposed (H, C, nope), v_b (H, v, C)
    k_b = torch.from_numpy(ts["blk.0.attn_k_b.weight"].data.copy())
    v_b = torch.from_numpy(ts["blk.0.attn_v_b.weight"].data.copy())
    H, nope = cfg.num_attention_heads, cfg.qk_nope_head_dim
    kv = torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(H * (nope + cfg.v_head_dim), -1)
    assert torch.equal(kv, model.layers[0].self_attn.kv_b_proj.weight)
    # the tokenizer: every id's string, special tokens as control tokens, merges, ids of BOS/EOS/PAD
    tj = json.loads((model_dir / "tokenizer.json").read_text())
    tokens = field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size
    assert all(tokens[i] == t for t, i in tj["model"]["vocab"].items())
    types = field(r, "tokenizer.ggml.token_type")
    assert types[0] == gguf.TokenType.CONTROL and types[300] == gguf.TokenType.NORMAL
    assert field(r, "tokenizer.ggml.pre") == "deepseek-v3"
    assert (field(r, "tokenizer.ggml.bos_token_id"), field(r, "tokenizer.ggml.eos_token_id")) == (0, 1)
    assert len(field(r, "tokenizer.ggml.merges")) == len(tj["model"]["merges"])


def test_q8_0_and_bf16_stay_within_their_rounding(model_dir, tmp_path):
    model = load(model_dir).eval()
    w = model.layers[0].mlp.gate_proj.weight
    for ft, qt, tol in (("q8_0", gguf.GGMLQuantizationType.Q8_0, 1 / 127), ("bf16", gguf.GGMLQuantizationType.BF16,
                                                                           2**-8)):
        r = gguf.GGUFReader(export_gguf(model_dir, tmp_path / f"{ft}.gguf", file_type=ft))
        t = tensors(r)["blk.0.ffn_gate.weight"]
        assert t.tensor_type == qt
        deq = torch.from_numpy(gguf.quants.dequantize(t.data, qt).copy()).reshape(w.shape)
        scale = w.abs().view(w.shape[0], -1, 32).amax(-1, keepdim=True).expand(-1, -1, 32).reshape(w.shape)
        assert ((deq - w).abs() <= tol * scale + 1e-7).all()
        assert tensors(r)["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # norms stay f32
        assert tensors(r)["blk.1.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # the router


def test_nanoseek_pretokenizer_splits_like_llama_cpp_deepseek_v3(model_dir):
    # llama.cpp's "deepseek-v3" splits digit runs of 1-3 (\p{N}{1,3}); nanoseek splits every digit. The export
    # declares the former for the latter because BPE, never having seen two digits in one piece, has no merge that
    # joins them: encode with llama.cpp's rules (the same regexes, in `tokenizers`) and compare.
    from tokenizers import Regex, Tokenizer, pre_tokenizers

    from nanoseek.export import _CJK, _MAIN, _V3_DIGITS
    from nanoseek.tokenizer import Tokenizer as NanoTokenizer

    ours = NanoTokenizer.load(model_dir).tok
    theirs = Tokenizer.from_str(ours.to_str())
    theirs.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_V3_DIGITS), behavior="isolated"),
        pre_tokenizers.Split(Regex(_CJK), behavior="isolated"),
        pre_tokenizers.Split(Regex(_MAIN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    from nanoseek.synthetic import generate, to_text

    corpus = [TEXT] + [to_text(it) for it in generate("arithmetic", 50, seed=3)]
    for text in corpus:
        assert ours.encode(text).ids == theirs.encode(text).ids
    assert pretokenizer(json.loads(ours.to_str())) == "deepseek-v3"
    # with a multi-digit token in the vocabulary the two would differ: refused
    tj = json.loads(ours.to_str())
    tj["model"]["vocab"]["12"] = max(tj["model"]["vocab"].values()) + 1
    with pytest.raises(ValueError, match="multi-digit tokens"):
        pretokenizer(tj)


def test_refuses_what_llama_cpp_would_run_differently(model_dir, tmp_path):
    tj = json.loads((model_dir / "tokenizer.json").read_text())
    other = dict(tj, pre_tokenizer={"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                    "use_regex": True})
    with pytest.raises(ValueError, match="no llama.cpp pre-tokenizer"):
        pretokenizer(other)
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    (bad / "tokenizer.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="no llama.cpp pre-tokenizer"):
        export_gguf(bad, tmp_path / "bad.gguf")
    assert not (tmp_path / "bad.gguf").exists() and not list(tmp_path.glob(".bad.gguf*"))
    torch.manual_seed(0)
    save_pretrained(build("tiny-dense"), tmp_path / "dense", tokenizer=model_dir)
    with pytest.raises(ValueError, match="MLA \\+ DeepSeekMoE"):
        export_gguf(tmp_path / "dense", tmp_path / "dense.gguf")
    save_pretrained(build(ModelConfig.from_preset("tiny", q_lora_rank=None)), tmp_path / "noq", tokenizer=model_dir)
    with pytest.raises(ValueError, match="without q-LoRA"):  # llama.cpp would fail to load it
        export_gguf(tmp_path / "noq", tmp_path / "noq.gguf")
    save_pretrained(build("tiny"), tmp_path / "notok")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        export_gguf(tmp_path / "notok", tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="unknown GGUF file type"):
        export_gguf(model_dir, tmp_path / "x.gguf", file_type="q4_k")


def test_rotate_half_rope_is_reordered_to_llama_cpp_adjacent_pairs():
    # nanoseek with rope_interleave=False rotates (i, i + R/2); llama.cpp's deepseek2 rotates (2i, 2i + 1). The export
    # reorders the rope rows of the projections: q.k after rope must be unchanged.
    cfg = ModelConfig.from_preset("tiny", rope_interleave=False)
    R = cfg.qk_rope_head_dim
    torch.manual_seed(0)
    w_q, w_k, x = torch.randn(R, 16), torch.randn(R, 16), torch.randn(1, 5, 16)
    pos = torch.arange(5)[None].float()
    freqs = pos[..., None] * (1.0 / 10000 ** (torch.arange(0, R, 2) / R))
    cos, sin = freqs.cos(), freqs.sin()

    def scores(wq, wk, interleave):
        q = apply_rope((x @ wq.T)[:, :, None], cos, sin, interleave)[:, :, 0]
        k = apply_rope((x @ wk.T)[:, :, None], cos, sin, interleave)[:, :, 0]
        return q @ k.transpose(1, 2)

    ref = scores(w_q, w_k, False)
    moved = scores(_rope_halves_to_pairs(w_q, R), _rope_halves_to_pairs(w_k, R), True)
    assert torch.allclose(ref, moved, atol=1e-5)
    assert not torch.allclose(ref, scores(w_q, w_k, True), atol=1e-3)  # without the reorder they differ


def test_cli_export(model_dir, tmp_path, capsys):
    from nanoseek.cli import main

    assert main(["export", "--format", "gguf", "--model", str(model_dir), "--out", str(tmp_path / "m.gguf"),
                 "--type", "bf16"]) == 0
    assert "m.gguf" in capsys.readouterr().out
    assert field(gguf.GGUFReader(tmp_path / "m.gguf"), "general.file_type") == gguf.LlamaFileType.MOSTLY_BF16
