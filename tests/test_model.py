"""Model numbers against transformers' DeepseekV3/V2 and the model's own slow reference paths."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanoseek import KVCache, ModelConfig, build, load, save_pretrained
from nanoseek.model import PRESETS, Router
from nanoseek.weights import config_from_hf, config_to_hf

from .hf_ref import hf_model_from_dir, random_hf_model, randomize_router_bias

TINY = PRESETS["tiny"]
V2_STYLE = ModelConfig(
    model_type="deepseek_v2", vocab_size=320, hidden_size=64, intermediate_size=160, moe_intermediate_size=24,
    num_hidden_layers=3, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=12, n_shared_experts=2, n_routed_experts=12, num_experts_per_tok=3,
    first_k_dense_replace=1, scoring_func="softmax", topk_method="group_limited_greedy", n_group=4, topk_group=2,
    norm_topk_prob=False, routed_scaling_factor=16.0, aux_loss_alpha=0.001, num_nextn_predict_layers=0,
    max_position_embeddings=512, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                                                "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                                                "mscale_all_dim": 0.707},
)
CONFIGS = {
    "v3-yarn-qlora-group": TINY,
    "v3-no-interleave-no-yarn": replace(TINY, rope_interleave=False, rope_scaling=None, q_lora_rank=None),
    "v2-softmax-group-limited": V2_STYLE,
    "v2-lite-greedy": replace(V2_STYLE, topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers_both_directions(name, tmp_path):
    cfg = CONFIGS[name]
    x = torch.randint(0, cfg.vocab_size, (2, 40))
    # nanoseek -> HF
    ours = build(cfg).eval()
    randomize_router_bias(ours)
    save_pretrained(ours, tmp_path / "a")
    ref = hf_model_from_dir(tmp_path / "a")
    with torch.no_grad():
        assert (ours(x) - ref(x).logits).abs().max().item() < 1e-4
    # HF -> nanoseek
    ref = random_hf_model(cfg)
    ref.save_pretrained(tmp_path / "b")
    ours = load(tmp_path / "b").eval()
    with torch.no_grad():
        diff = (ours(x) - ref(x).logits).abs().max().item()
    assert diff < 1e-4


def test_hf_padding_mask_matches(tmp_path):
    model = build("tiny").eval()
    save_pretrained(model, tmp_path)
    ref = hf_model_from_dir(tmp_path)
    x = torch.randint(0, 512, (2, 24))
    am = torch.ones_like(x)
    am[0, :7] = 0  # left padding
    with torch.no_grad():
        ours = model(x, attention_mask=am)
        theirs = ref(x, attention_mask=am, position_ids=(am.cumsum(1) - 1).clamp(min=0)).logits
    assert (ours[am.bool()] - theirs[am.bool()]).abs().max() < 1e-4


def test_cached_decode_equals_full_forward():
    model = build("tiny").eval()
    x = torch.randint(0, 512, (3, 30))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.config, 3, 64)
        steps = [model(x[:, :11], cache=cache)]  # prefill (decompressed SDPA path)
        for t in range(11, 30):  # decode (absorbed path)
            steps.append(model(x[:, t: t + 1], cache=cache))
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    assert cache.lengths.tolist() == [30, 30, 30]


def test_absorbed_and_decompressed_attention_agree():
    model = build("tiny").eval()
    x = torch.randint(0, 512, (2, 25))
    with torch.no_grad():
        plain = model(x)
        absorbed = model(x, cache=KVCache(model.config, 2, 32, absorb=True))
        decompressed = model(x, cache=KVCache(model.config, 2, 32, absorb=False))
    assert torch.allclose(plain, absorbed, atol=1e-5)
    assert torch.allclose(plain, decompressed, atol=1e-5)


def test_cache_holds_only_latent_and_rope_key():
    cfg = TINY
    cache = KVCache(cfg, 1, 10)
    per_token = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert cache.bytes_per_token() == per_token


def test_left_padded_batch_matches_single_sequences():
    model = build("tiny").eval()
    a, b = torch.randint(0, 512, (1, 12)), torch.randint(0, 512, (1, 7))
    x = torch.cat([a, torch.cat([torch.full((1, 5), 2), b], 1)])
    am = torch.ones_like(x)
    am[1, :5] = 0
    with torch.no_grad():
        batched = model(x, attention_mask=am)
        assert torch.allclose(batched[0], model(a)[0], atol=1e-5)
        assert torch.allclose(batched[1, 5:], model(b)[0], atol=1e-5)
        # the same through the cache, then one decode step per row
        cache = KVCache(model.config, 2, 20)
        pre = model(x, attention_mask=am, cache=cache)
        assert torch.allclose(pre[1, 5:], model(b)[0], atol=1e-5)
        nxt = torch.tensor([[5], [9]])
        step = model(nxt, cache=cache)
        assert torch.allclose(step[1, 0], model(torch.cat([b, nxt[1:]], 1))[0, -1], atol=1e-5)


def test_rows_of_different_lengths_in_one_cache():
    """Continuous batching: a row can be reset and refilled while another keeps decoding."""
    model = build("tiny").eval()
    a, b = torch.randint(0, 512, (1, 9)), torch.randint(0, 512, (1, 4))
    with torch.no_grad():
        cache = KVCache(model.config, 2, 32)
        model(torch.cat([a, a]), cache=cache)
        cache.reset_rows([1])
        am = torch.ones(2, 4, dtype=torch.long)
        am[0] = 0  # row 0 only holds a slot this step... (its tokens are padding)
        am[0, -1] = 1
        x = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), a[:, :1]], 1), b])
        out = model(x, attention_mask=am, cache=cache)
    with torch.no_grad():
        ref_b = model(b)
        ref_a = model(torch.cat([a, a[:, :1]], 1))
    assert torch.allclose(out[1], ref_b[0], atol=1e-5)
    assert torch.allclose(out[0, -1], ref_a[0, -1], atol=1e-5)


def test_document_ids_isolate_packed_documents():
    model = build("tiny").eval()
    a, b = torch.randint(0, 512, (1, 10)), torch.randint(0, 512, (1, 6))
    packed = torch.cat([a, b], 1)
    docs = torch.tensor([[0] * 10 + [1] * 6])
    with torch.no_grad():
        out = model(packed, document_ids=docs)
        assert torch.allclose(out[0, :10], model(a)[0], atol=1e-5)
        assert torch.allclose(out[0, 10:], model(b)[0], atol=1e-5)


def test_grouped_experts_match_per_expert_loop():
    model = build("tiny")
    moe = model.layers[1].mlp
    x = torch.randn(2, 16, 64, requires_grad=True)
    y1, _ = moe(x)
    g1 = torch.autograd.grad(y1.square().sum(), [x, moe.experts.gate_proj])
    moe.experts.use_grouped_mm = False
    y2, _ = moe(x)
    g2 = torch.autograd.grad(y2.square().sum(), [x, moe.experts.gate_proj])
    assert torch.allclose(y1, y2, atol=1e-5)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-5)


def test_padded_inference_experts_match_the_loop_and_fall_back_on_skew():
    experts = build("small").layers[1].mlp.experts
    for p in (experts.gate_proj, experts.up_proj, experts.down_proj):
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(32, 256)
    idx = torch.stack([torch.randperm(32)[:4] for _ in range(32)])  # a decode step: batch 32, top-4 of 32
    w = torch.rand(32, 4)
    with torch.no_grad():
        counts = torch.bincount(idx.flatten(), minlength=32)
        order = idx.flatten().argsort(stable=True)
        xs, ws = x[order // 4], w.flatten()[order, None]
        padded = experts._padded(xs, ws, idx.flatten()[order], counts, experts.gate_proj, experts.up_proj,
                                 experts.down_proj)
        ref = experts._loop(xs, ws, counts, experts.gate_proj, experts.up_proj, experts.down_proj)
        assert padded is not None and torch.allclose(padded, ref, atol=1e-5)
        y_inference = experts(x, idx, w)
    experts.use_grouped_mm = False
    assert torch.allclose(y_inference, experts(x, idx, w), atol=1e-5)  # grad enabled: the loop path
    one = idx[:1]  # batch 1: 4 rows would be padded to 32 -> the padded path declines
    assert experts._padded(x[:4], w[:1].T, one.flatten().sort().values, torch.bincount(one.flatten(), minlength=32),
                           experts.gate_proj, experts.up_proj, experts.down_proj) is None


def test_router_bias_stays_fp32_and_only_affects_selection():
    model = build("tiny").to(torch.bfloat16)
    r = model.layers[1].mlp.gate
    assert r.e_score_correction_bias.dtype == torch.float32
    assert r.weight.dtype == torch.bfloat16
    r.e_score_correction_bias += 1e-3  # survives: would round away in bf16 around 1.0
    assert r.e_score_correction_bias[0].item() == pytest.approx(1e-3)
    # a large bias on expert 0 forces its selection, but gating weights still come from unbiased scores
    r = Router(TINY)
    torch.nn.init.normal_(r.weight, std=0.02)
    x = torch.randn(5, 64)
    w0, idx0, scores = r(x)
    r.e_score_correction_bias[0] = 10.0
    w1, idx1, _ = r(x)
    assert (idx1 == 0).any(dim=1).all()
    sel = scores.gather(1, idx1)
    expected = sel / sel.sum(-1, keepdim=True) * TINY.routed_scaling_factor
    assert torch.allclose(w1, expected)


def test_group_limited_routing_stays_within_topk_groups():
    cfg = replace(TINY, n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    r = Router(cfg)
    torch.nn.init.normal_(r.weight, std=1.0)
    _, idx, _ = r(torch.randn(64, 64))
    groups = idx // 4
    assert max(len(set(g.tolist())) for g in groups) <= 2


@pytest.mark.parametrize("cfg", [TINY, V2_STYLE, replace(TINY, topk_method="greedy", n_group=1, topk_group=1)],
                         ids=["v3-noaux-group", "v2-group-greedy", "greedy"])
def test_compiled_decode_routing_picks_what_topk_picks(cfg):
    """The compiled decode step routes by ranks (no topk calls): same experts, same order, same weights as the eager
    topk routing. On exact ties (all logits 0) topk's choice among equals is unspecified: the ranks' picks must then
    be equally good ones (same biased scores), with the same weights."""
    torch.manual_seed(0)
    r = Router(cfg)
    torch.nn.init.normal_(r.weight, std=1.0)
    x = torch.randn(16, cfg.hidden_size)
    x[8:] = 0.0
    ranked = torch.compile(r, backend="eager", fullgraph=True)
    bias = torch.arange(cfg.n_routed_experts) % 2 * 0.5  # ties between the odd experts, and between groups
    for biased in (False, True):
        if biased and r.e_score_correction_bias is not None:
            r.e_score_correction_bias.copy_(bias)
        with torch.no_grad():
            (w, idx, scores), (w2, idx2, scores2) = r(x), ranked(x)
        assert torch.equal(idx2[:8], idx[:8]) and torch.allclose(w2, w) and torch.allclose(scores2, scores)
        b = r.e_score_correction_bias if r.e_score_correction_bias is not None else torch.zeros_like(bias)
        assert torch.equal(b[idx2[8:]].sort(-1).values, b[idx[8:]].sort(-1).values)
        assert all(len(set(row)) == cfg.num_experts_per_tok for row in idx2.tolist())
    torch._dynamo.reset()


def test_bias_update_moves_toward_balance_and_reports_maxvio():
    model = build("tiny")
    x = torch.randint(0, 512, (4, 32))
    model(x)
    load = model.expert_load()
    assert load.shape == (2, 8) and load[0].sum().item() == 4 * 32 * 2  # tokens x top-k
    before = [r.e_score_correction_bias.clone() for r in model.routers()]
    maxvio = model.update_router_bias(gamma=1e-3)
    for r, b, l in zip(model.routers(), before, load):
        delta = r.e_score_correction_bias - b
        over, under = l > l.mean(), l < l.mean()
        assert (delta[over] < 0).all() and (delta[under] > 0).all()  # V3 eq. 16 sign rule
        assert r.expert_load.sum() == 0
    assert torch.allclose(maxvio[0], load[0].amax() / load[0].mean() - 1)
    assert maxvio[1] == 0  # the MTP layer saw no tokens in a plain forward


def test_sequence_maxvio_hand_example():
    """Batch-wise balance can hide sequence-wise imbalance (V3 §4.5.3): two sequences that each use half the experts
    balance the batch perfectly (batch MaxVio 0) while each sequence has MaxVio 1."""
    cfg = replace(TINY, n_routed_experts=4, num_experts_per_tok=1, n_group=1, topk_group=1, topk_method="greedy")
    model = build(cfg)
    moe = model.layers[1].mlp
    idx = torch.tensor([[0], [0], [1], [1], [2], [2], [3], [3]])  # B=2, T=4, K=1: row 0 -> experts 0,1; row 1 -> 2,3
    routed = (torch.ones(8, 1), idx, torch.full((8, 4), 0.25))
    moe.gate.forward = lambda x: routed
    x = torch.randn(2, 4, cfg.hidden_size)
    moe.eval()
    moe(x)  # inference forwards are not training tokens: counted neither per sequence nor for the bias update
    assert moe.gate.sequence_vio.tolist() == [0.0, 0.0] and moe.gate.expert_load.sum() == 0
    moe.train()
    moe(x)
    # row loads [2, 2, 0, 0] and [0, 0, 2, 2]: max / mean - 1 = 2 / 1 - 1 = 1 each; batch loads [2, 2, 2, 2]: MaxVio 0
    assert moe.gate.sequence_vio.tolist() == [2.0, 2.0]
    assert model.sequence_max_violation().tolist() == [1.0, 0.0]  # the MTP layer saw no sequence
    row = torch.tensor([[0], [0], [0], [1]])  # one more row: loads [3, 1, 0, 0], max / mean - 1 = 3 / 1 - 1 = 2
    moe.gate.forward = lambda x: (torch.ones(4, 1), row, torch.full((4, 4), 0.25))
    moe(torch.randn(1, 4, cfg.hidden_size))
    assert model.sequence_max_violation()[0].item() == pytest.approx((1 + 1 + 2) / 3)
    maxvio = model.update_router_bias(gamma=1e-3)
    assert maxvio[0].item() == pytest.approx(5 / 3 - 1)  # batch loads [5, 3, 2, 2] over the two training forwards
    assert model.sequence_max_violation().tolist() == [0.0, 0.0]  # reset with the loads


def test_balance_loss_hand_example():
    cfg = replace(TINY, n_routed_experts=4, num_experts_per_tok=1, n_group=1, topk_group=1, topk_method="greedy")
    moe = build(cfg).layers[1].mlp
    idx = torch.tensor([[[0], [0], [1], [2]]])  # one sequence, T=4, K=1
    scores = torch.tensor([[[0.5, 0.5, 0.0, 0.0]] * 4])
    # f = E/(K T) * counts = 4/4 * [2,1,1,0]; P = mean normalised scores = [0.5,0.5,0,0]
    assert moe._balance_loss(idx, scores).item() == pytest.approx(2 * 0.5 + 1 * 0.5)


def test_loss_terms_and_mtp_targets():
    model = build("tiny")
    x = torch.randint(0, 512, (2, 20))
    inp, tgt = x[:, :-1], x[:, 1:]
    out = model.loss(inp, tgt, mtp_lambda=0.0, balance_alpha=0.0)
    assert torch.allclose(out["loss"], F.cross_entropy(model(inp).flatten(0, 1), tgt.flatten()))
    full = model.loss(inp, tgt, mtp_lambda=0.3, balance_alpha=1e-4)
    assert torch.allclose(full["loss"], full["main"] + 0.3 * full["mtp"] + 1e-4 * full["balance"])
    # MTP depth 1 at position t is scored against targets[:, t+1] (= x[:, t+2])
    h = model.trunk(inp)[0]
    mod = model.mtp[0]
    n = inp.shape[1] - 1
    _, hn, _ = mod.forward_mtp(h[:, :n], model.embed_tokens(inp[:, 1:]), model.rotary(torch.arange(n)[None]), None)
    manual = F.cross_entropy(model.lm_head(hn).flatten(0, 1), tgt[:, 1:].flatten())
    assert torch.allclose(full["mtp"], manual)
    full["loss"].backward()
    assert model.mtp[0].eh_proj.weight.grad.abs().sum() > 0


def test_ignore_index_masks_targets():
    model = build("tiny")
    x = torch.randint(0, 512, (1, 12))
    tgt = x[:, 1:].clone()
    tgt[:, :5] = -100
    out = model.loss(x[:, :-1], tgt, mtp_lambda=0.0, balance_alpha=0.0)
    logits = model(x[:, :-1])
    assert torch.allclose(out["main"], F.cross_entropy(logits[0, 5:], tgt[0, 5:]))


GOLDEN = Path(__file__).parent / "golden" / "tiny_loss.json"


def _golden_run() -> list[float]:
    torch.manual_seed(1234)
    model = build("tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 64, (8, 33), generator=g)  # small alphabet: learnable quickly
    losses = []
    for _ in range(12):
        out = model.loss(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        model.update_router_bias(1e-3)
        losses.append(round(out["loss"].item(), 5))
    return losses


def test_golden_loss_curve_and_learning():
    losses = _golden_run()
    assert losses[-1] < losses[0] - 1.0  # it learns
    # the file is written only on purpose (`python -m tests.test_model --write-golden`), never by the test itself
    assert GOLDEN.exists(), f"{GOLDEN} is missing: restore it from git, or write it on purpose with " \
        "`python -m tests.test_model --write-golden` after a change that must change the curve"
    assert losses == pytest.approx(json.loads(GOLDEN.read_text()), abs=2e-4)


def test_config_errors_and_round_trips(tmp_path):
    with pytest.raises(ValueError, match="available presets: tiny, small"):
        ModelConfig.from_preset("huge")
    with pytest.raises(ValueError, match="did you mean 'hidden_size'"):
        ModelConfig.from_dict({"hiden_size": 3})
    with pytest.raises(ValueError, match="n_group"):
        replace(TINY, n_group=3)
    with pytest.raises(ValueError, match="unsupported model_type 'mistral'"):
        config_from_hf({"model_type": "mistral"})
    # llama is DeepSeek-LLM's dense MHA trunk (tests/test_janus.py compares it with transformers' LlamaForCausalLM)
    assert config_from_hf({"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
                                "num_hidden_layers": 2, "num_attention_heads": 4}).attention == "mha"
    with pytest.raises(ValueError, match="rope type 'llama3' is not supported"):
        config_from_hf({**config_to_hf(PRESETS["tiny-dense"]), "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        ModelConfig.from_preset("tiny-dense", num_key_value_heads=3)
    for cfg in (TINY, V2_STYLE, PRESETS["deepseek-v3"], PRESETS["deepseek-v2"], PRESETS["deepseek-v2-lite"],
                PRESETS["tiny-dense"], PRESETS["deepseek-llm-7b"],
                replace(PRESETS["tiny-dense"], num_key_value_heads=2)):
        assert config_from_hf(config_to_hf(cfg)) == cfg
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    # transformers 5 writes rope_parameters instead of rope_theta + rope_scaling
    hf = config_to_hf(TINY)
    hf["rope_parameters"] = {"rope_type": "yarn", "rope_theta": hf.pop("rope_theta"), **{
        k: v for k, v in hf.pop("rope_scaling").items() if k != "type"}}
    assert config_from_hf(hf) == TINY


if __name__ == "__main__":  # python -m tests.test_model --write-golden: the one way to (re)write the golden file
    import sys

    if sys.argv[1:] != ["--write-golden"]:
        sys.exit("usage: python -m tests.test_model --write-golden")
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(_golden_run()) + "\n")
    print(f"wrote {GOLDEN}")
