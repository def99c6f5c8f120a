"""The one fast decode path (infer.DecodeStep compiled with live weights) against its references: transformers'
greedy generate in fp32, the eager engine after an optimizer step, Janus' CFG image sampler's uncached reference."""

import copy
from dataclasses import replace

import pytest
import torch

from nanoseek import ModelConfig, build, save_pretrained
from nanoseek.infer import Engine, SamplingParams, generate_image_tokens
from nanoseek.janus import Janus, generate_image_tokens_reference, janus_preset

from .hf_ref import hf_model_from_dir, randomize_router_bias

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
PROMPTS = [[0, 5, 17, 99, 3], [0, 7], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one thread for tiny ops


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build("tiny").eval()
    randomize_router_bias(m)  # the V3 router's bias is part of what transformers must agree on
    return m


def test_compiled_greedy_equals_transformers_fp32(model, tmp_path):
    save_pretrained(model, tmp_path / "m")
    hf = hf_model_from_dir(tmp_path / "m")
    engine = Engine(model, max_batch=4, max_model_len=32, compile=True)
    outs = engine.generate(PROMPTS, GREEDY)
    for p, o in zip(PROMPTS, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=2)
        assert o.token_ids == ref[0, len(p):].tolist()


def test_an_optimizer_step_is_seen_without_recompiling(model):
    # GRPO's loop: sample with the engine, update the policy in place, sample again with the same engine. The
    # compiled graph takes the weights as inputs, so the second rollout must be the updated model's, not a copy's
    from torch._dynamo.utils import counters

    policy = copy.deepcopy(model)
    engine = Engine(policy, max_batch=2, max_model_len=32, compile=True)
    assert engine.warmup() == [1, 2]
    before = [o.token_ids for o in engine.generate(PROMPTS[:2], GREEDY)]
    compiled = dict(counters["stats"])
    opt = torch.optim.AdamW(policy.parameters(), lr=0.05)
    x = torch.randint(3, 512, (2, 12))
    policy.loss(x[:, :-1], x[:, 1:])["loss"].backward()
    opt.step()
    policy.eval()
    after = [o.token_ids for o in engine.generate(PROMPTS[:2], GREEDY)]
    fresh = [o.token_ids for o in Engine(policy, max_batch=2, max_model_len=32, compile=False)
             .generate(PROMPTS[:2], GREEDY)]
    assert after == fresh  # the updated weights, decoded by the compiled graph
    assert after != before  # the step changed the greedy tokens: the comparison can fail
    assert dict(counters["stats"]) == compiled  # nothing was compiled again (no re-freeze, no recompile)


def test_compiled_sampling_and_logprobs_equal_eager(model):
    # the compiled graph returns logits; sampling (seeded per request), penalties and logprobs run on them as in
    # the eager engine: same draws, same log-probs up to fused-kernel rounding
    sp = SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=3, logprobs=0, presence_penalty=0.5,
                        ignore_eos=True)
    a = Engine(model, max_batch=4, max_model_len=32, compile=True).generate(PROMPTS, sp)
    b = Engine(model, max_batch=4, max_model_len=32, compile=False).generate(PROMPTS, sp)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    for x, y in zip(a, b):
        assert torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-4)


def test_span_buckets_grow_with_the_context(model):
    # attention reads a static bucket of cache slots (256, 512, ...): a sequence crossing 256 slots moves to the
    # next bucket and still decodes exactly as the eager engine
    prompt = list(range(3, 250))
    sp = replace(GREEDY, max_tokens=12)
    a = Engine(model, max_batch=1, max_model_len=300, compile=True)
    out = a.generate([prompt], sp)[0].token_ids
    assert out == Engine(model, max_batch=1, max_model_len=300, compile=False).generate([prompt], sp)[0].token_ids
    assert {span for _, span in a._step._warm} == {256, 301}  # the second bucket is capped at the cache length


@pytest.mark.parametrize("attention", ["mha", "mla"])
def test_janus_image_sampling_on_the_compiled_path_equals_the_reference(attention):
    torch.manual_seed(0)
    cfg = janus_preset("janus-tiny")
    if attention == "mla":
        cfg = replace(cfg, text=ModelConfig.from_preset("tiny", num_nextn_predict_layers=0))
    model = Janus(cfg).eval()
    prompts = [[1, 5, 6, 7, 151], [1, 8, 151]]  # left-padded CFG rows
    for temperature, seed in ((0.0, 0), (1.0, 7)):
        fast = generate_image_tokens(model, prompts, temperature=temperature, seed=seed, num_tokens=12, compile=True)
        ref = generate_image_tokens_reference(model, prompts, temperature=temperature, seed=seed, num_tokens=12)
        assert torch.equal(fast, ref)
        if attention == "mha":  # the compiled step stays with the model: the next call compiles nothing
            from torch._dynamo.utils import counters

            compiled = dict(counters["stats"])
            again = generate_image_tokens(model, prompts, temperature=temperature, seed=seed, num_tokens=12,
                                          compile=True)
            assert torch.equal(again, fast) and dict(counters["stats"]) == compiled


def test_janus_bf16_image_sampling_after_a_dtype_change():
    # one kept step per dtype: a model cast after a compiled call gets a new step, not the fp32 graph; the bf16
    # decode attention (two products, not SDPA, for one query row) equals the uncached reference's SDPA up to rounding
    torch.manual_seed(0)
    model = Janus(janus_preset("janus-tiny")).eval()
    prompts = [[1, 5, 6, 7, 151], [1, 8, 151]]
    generate_image_tokens(model, prompts, temperature=0.0, num_tokens=4, compile=True)
    model.to(torch.bfloat16)
    fast = generate_image_tokens(model, prompts, temperature=0.0, num_tokens=8, compile=True)
    ref = generate_image_tokens_reference(model, prompts, temperature=0.0, num_tokens=8)
    assert fast.shape == ref.shape == (2, 8)
    assert (fast == ref).float().mean() >= 0.75  # bf16: near-ties may part, most greedy tokens agree


def test_widened_bf16_products_match_the_eager_step(model, monkeypatch):
    # one-row products by big 16-bit weights read an fp32 copy of the activation (model.materialize) instead of
    # converting it in every output row; with the size floor at 0 every product of the tiny model takes it (its
    # linear layers and routed experts): the compiled bf16 step gives the eager bf16 step's log-probs up to bf16
    # rounding, and the op really runs
    from torch.profiler import profile

    from nanoseek import model as model_module

    monkeypatch.setattr(model_module, "WIDEN_MIN_BYTES", 0)
    m = copy.deepcopy(model).to(torch.bfloat16)
    sp = SamplingParams(max_tokens=8, temperature=0.0, logprobs=0, ignore_eos=True)
    fast_engine = Engine(m, max_batch=1, max_model_len=32, compile=True)
    fast_engine.generate([PROMPTS[0]], replace(sp, max_tokens=2))  # compile outside the profiled call
    with profile() as prof:
        fast = fast_engine.generate([PROMPTS[0]], sp)[0]
    widened = sum(e.count for e in prof.key_averages() if e.key == "nanoseek::materialize")
    # per decode step (7 after the prefill): the inputs of q_a, q_b, kv_a and o_proj in each of the 2 layers (8),
    # of the dense MLP's gate, up and down (3), of the shared expert's (3), of the routed experts and their hidden
    # (2), of the head (1): 17 conversions
    assert widened == 7 * 17
    slow = Engine(copy.deepcopy(model).to(torch.bfloat16), max_batch=1, max_model_len=32,
                  compile=False).generate([PROMPTS[0]], sp)[0]
    n = next((i for i, (a, b) in enumerate(zip(fast.token_ids, slow.token_ids)) if a != b), len(slow.token_ids))
    assert n >= 4  # bf16: a near-tie may part the greedy paths later
    assert torch.allclose(torch.tensor(fast.logprobs[:n]), torch.tensor(slow.logprobs[:n]), atol=0.01)
