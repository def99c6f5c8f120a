"""The inference engine: batching, continuous batching, sampling knobs, stops, logprobs, abort, MTP speculation."""

import random
from dataclasses import replace

import pytest
import torch

from nanoseek import ModelConfig, build, save_pretrained
from nanoseek.infer import (
    Engine,
    SamplingParams,
    SamplingTensors,
    _Text,
    generate,
    process_logits,
    sample_from,
    verify_drafts,
)

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = [[0, 5, 17, 99, 3], [0, 7], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [0, 42, 43], [0, 300, 301, 302, 303]]


# decode-sized ops gain nothing from a second thread (this file: ~5 s with one thread, ~35 s with two under load)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build("tiny").eval()


@pytest.fixture(scope="module")
def ref(model):
    """Greedy output of each prompt run alone (20 tokens; a shorter max_tokens gives a prefix)."""
    return [alone(model, p, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)).token_ids
            for p in PROMPTS]


def alone(model, prompt, params=GREEDY, **kw):
    return Engine(model, max_batch=1, **kw).generate([prompt], params)[0]


def full_recompute(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


# ---- batching --------------------------------------------------------------------------------------------------


def test_batched_greedy_equals_each_request_alone_and_full_recompute(model, ref):
    assert ref[0][:12] == full_recompute(model, PROMPTS[0], 12)
    # prompts of lengths 2..11 share prefill forwards (right-padded, rolled back) and one decode forward per step
    outs = Engine(model, max_batch=8).generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == [r[:12] for r in ref]
    assert all(o.finish_reason == "length" and o.completion_tokens == 12 and o.prompt_tokens == len(p)
               for o, p in zip(outs, PROMPTS))


def test_continuous_batching_requests_join_and_leave_mid_run(model, ref):
    lengths = [3, 9, 5, 12, 7]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
    ref = [r[:n] for r, n in zip(ref, lengths)]
    engine = Engine(model, max_batch=2)
    ids = [engine.add_request(PROMPTS[i], params[i]) for i in range(2)]
    tokens: dict[str, list[int]] = {}
    running_sizes, step = [], 0
    while engine.has_work():
        if step == 2:  # added while two requests decode: they wait for a free row
            ids += [engine.add_request(PROMPTS[i], params[i]) for i in range(2, 5)]
        for d in engine.step():
            tokens.setdefault(d.request_id, []).extend(d.token_ids)
        running_sizes.append(len(engine.rows))
        step += 1
    assert [tokens[i] for i in ids] == ref
    assert max(running_sizes) == 2 and engine.rows == []
    assert (engine.cache.lengths == 0).all() and not engine.cache.valid.any()  # every row freed


def test_seeded_sampling_is_reproducible(model):
    sp = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    a, b = alone(model, PROMPTS[0], sp).token_ids, alone(model, PROMPTS[0], sp).token_ids
    assert a == b
    assert alone(model, PROMPTS[0], SamplingParams(max_tokens=10, seed=8, ignore_eos=True)).token_ids != a
    # the module-level convenience keeps its old contract
    assert generate(model, [0, 1, 2], 10, temperature=1.0, top_p=0.9, seed=7) == \
        generate(model, [0, 1, 2], 10, temperature=1.0, top_p=0.9, seed=7)


@pytest.mark.parametrize("k", [0, 2])
def test_repeated_prompts_share_one_prefill(model, ref, k):
    """GRPO's groups: requests with the same prompt are prefilled once and the cache rows copied. Every request
    still samples its own tokens (its seed), exactly as when run alone; greedy ones match the reference, also with
    MTP speculation (the MTP cache is filled for every row) and next to prompts of other lengths."""
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[0], PROMPTS[1]]
    sampled = [SamplingParams(max_tokens=10, temperature=1.0, seed=s, ignore_eos=True) for s in range(6)]
    engine = Engine(model, max_batch=8, num_speculative_tokens=k)
    outs = engine.generate(prompts, sampled)
    assert engine.stats.shared_prefill_tokens == 2 * len(PROMPTS[0]) + len(PROMPTS[1])
    assert engine.stats.prefill_tokens == sum(map(len, prompts))
    for p, sp, o in zip(prompts, sampled, outs):
        assert o.token_ids == alone(model, p, sp, num_speculative_tokens=k).token_ids
    greedy = Engine(model, max_batch=8, num_speculative_tokens=k).generate(prompts, GREEDY)
    assert [o.token_ids for o in greedy] == [ref[PROMPTS.index(p)][:12] for p in prompts]


def test_generate_convenience_matches_full_recompute_and_stops_at_eos(model, ref):
    assert generate(model, PROMPTS[0], 12) == ref[0][:12]
    first = generate(model, [0, 1, 2], 1)[0]
    assert generate(model, [0, 1, 2], 10, eos_token_id=first) == [first]


# ---- sampling knobs, hand-checked on small logits vectors ------------------------------------------------------


def st(n=1, V=4, **kw):
    return SamplingTensors.from_params([SamplingParams(**kw)] * n, V)


def kept(x):
    return set(torch.isfinite(x[0]).nonzero().flatten().tolist())


def test_temperature_top_k_top_p_min_p():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5, 2.5]])
    assert torch.allclose(process_logits(logits, st(V=5, temperature=0.5)), logits / 0.5)
    assert kept(process_logits(logits, st(V=5, top_k=2))) == {1, 4}
    assert kept(process_logits(logits, st(V=5, top_k=1))) == {1}
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    lp = probs.log()
    # top_p: the smallest set whose mass reaches top_p (a token is kept if the mass before it is < top_p)
    assert kept(process_logits(lp, st(top_p=0.45))) == {0}
    assert kept(process_logits(lp, st(top_p=0.7))) == {0, 1}
    assert kept(process_logits(lp, st(top_p=0.85))) == {0, 1, 2}
    assert kept(process_logits(lp, st(top_p=1.0))) == {0, 1, 2, 3}
    # top_p renormalises after top_k: among {0.5, 0.3} the first holds 62.5%
    assert kept(process_logits(lp, st(top_k=2, top_p=0.6))) == {0}
    assert kept(process_logits(lp, st(top_k=2, top_p=0.65))) == {0, 1}
    # min_p: keep p >= min_p * max p
    assert kept(process_logits(lp, st(min_p=0.2))) == {0, 1, 2}  # threshold 0.1
    assert kept(process_logits(lp, st(min_p=0.5))) == {0, 1}  # threshold 0.25
    # surviving logits are unchanged: the distribution is renormalised over them
    out = process_logits(lp, st(top_p=0.7)).softmax(-1)
    assert torch.allclose(out[0, :2], torch.tensor([0.5, 0.3]) / 0.8)


def test_top_p_falls_back_to_a_full_sort_when_the_nucleus_is_wide():
    torch.manual_seed(1)
    x = torch.randn(3, 2000) * 0.01  # nearly uniform: the 0.9 nucleus holds ~1800 tokens, more than the candidates
    params = [SamplingParams(top_p=0.9), SamplingParams(top_k=5, top_p=0.5), SamplingParams()]
    out = process_logits(x, SamplingTensors.from_params(params, 2000))
    sorted_p = x[0].softmax(-1).sort(descending=True).values
    expected = int(((sorted_p.cumsum(0) - sorted_p) < 0.9).sum())
    assert int(torch.isfinite(out[0]).sum()) == expected > 256
    assert int(torch.isfinite(out[1]).sum()) <= 5 and torch.isfinite(out[2]).all()


def test_penalties_follow_openai_and_vllm_formulas():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    counts = torch.tensor([[0, 2, 1, 0]])  # output so far: token 1 twice, token 2 once
    prompt = torch.tensor([[True, False, False, False]])  # the prompt holds token 0
    # repetition (prompt + output tokens): positive logits divided, negative multiplied
    out = process_logits(logits, st(repetition_penalty=2.0), counts, prompt)
    assert torch.allclose(out, torch.tensor([[1.0, -2.0, 0.25, 3.0]]))
    # frequency/presence: output tokens only, -= f * count + p * (count > 0)
    out = process_logits(logits, st(frequency_penalty=0.5, presence_penalty=0.25), counts, prompt)
    assert torch.allclose(out, torch.tensor([[2.0, -1.0 - 1.25, 0.5 - 0.75, 3.0]]))
    # all three, then temperature
    out = process_logits(logits, st(repetition_penalty=2.0, frequency_penalty=0.5, temperature=0.5), counts, prompt)
    assert torch.allclose(out, torch.tensor([[1.0, -2.0 - 1.0, 0.25 - 0.5, 3.0]]) / 0.5)


def test_per_row_parameters_in_one_batch():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(3, 1)
    params = [SamplingParams(top_k=1), SamplingParams(top_p=0.7), SamplingParams(temperature=0.0)]
    out = process_logits(logits, SamplingTensors.from_params(params, 4))
    assert [int(torch.isfinite(r).sum()) for r in out] == [1, 2, 4]
    assert torch.allclose(out[2], logits[2])  # greedy rows are processed at temperature 1


def test_sample_from_matches_the_distribution():
    p = torch.tensor([0.5, 0.3, 0.0, 0.2]).repeat(40000, 1)
    g = torch.Generator().manual_seed(0)
    freq = torch.bincount(sample_from(p, [None] * len(p), g), minlength=4).float() / len(p)
    assert freq[2] == 0 and torch.allclose(freq, p[0], atol=0.01)


# ---- stops, lengths, logprobs, abort ---------------------------------------------------------------------------


def test_stop_token_ids_eos_and_max_tokens(model, ref):
    ref = ref[0][:12]
    stop = ref[4]
    out = alone(model, PROMPTS[0], SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stop]))
    cut = ref.index(stop) + 1
    assert out.token_ids == ref[:cut] and out.finish_reason == "stop" and out.stop_reason == stop
    # EOS from the model config stops unless ignore_eos
    torch.manual_seed(0)
    with_eos = build(ModelConfig.from_preset("tiny", eos_token_id=stop)).eval()
    out = alone(with_eos, PROMPTS[0], SamplingParams(max_tokens=12, temperature=0.0))
    assert out.token_ids == ref[:cut] and out.finish_reason == "stop"
    out = alone(model, PROMPTS[0], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    assert out.token_ids == ref[:3] and out.finish_reason == "length" and out.completion_tokens == 3


class CharTokenizer:
    """Stand-in tokenizer: token i decodes to a 1-3 letter piece, so stop strings straddle token boundaries."""

    eos_id = None

    def decode(self, ids, skip_special_tokens=False):
        return "".join("abcde"[i % 5] * (1 + i % 3) for i in ids)


def test_stop_strings_never_leak_a_partial_stop_string(model):
    tok = CharTokenizer()
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=3, ignore_eos=True)
    full = Engine(model, tok, max_batch=1).generate([PROMPTS[0]], params)[0]
    assert full.text == tok.decode(full.token_ids)
    stop = full.text[10:14]  # ends somewhere inside the output
    first = full.text.find(stop)
    for stops, expect_text, reason in (([stop], full.text[:first], "stop"),
                                       ([stop[:3] + "#"], full.text, "length")):  # a prefix that never completes
        engine = Engine(model, tok, max_batch=1)
        engine.add_request(PROMPTS[0], SamplingParams(max_tokens=40, temperature=1.0, seed=3, ignore_eos=True,
                                                      stop=stops))
        sent, last = "", None
        while engine.has_work():
            for d in engine.step():
                sent += d.text
                last = d
                assert expect_text.startswith(sent)  # nothing sent is ever cut later: no partial stop string leaks
        assert sent == expect_text and last.finish_reason == reason
    out = Engine(model, tok, max_batch=1).generate(
        [PROMPTS[0]], SamplingParams(max_tokens=40, temperature=1.0, seed=3, ignore_eos=True, stop=[stop],
                                     include_stop_str_in_output=True))[0]
    assert out.text == full.text[: first + len(stop)] and out.stop_reason == stop


def test_detokenize_false_returns_the_same_ids_without_decoding(model):
    """vLLM's detokenize=False: the same tokens, no text, and no tokenizer call per token (GRPO, eval and
    distillation decode the ids themselves)."""
    calls = []

    class Counting(CharTokenizer):
        def decode(self, ids, skip_special_tokens=False):
            calls.append(len(ids))
            return super().decode(ids, skip_special_tokens)

    params = dict(max_tokens=12, temperature=1.0, seed=5, ignore_eos=True)
    with_text = Engine(model, Counting(), max_batch=2).generate(PROMPTS[:2], SamplingParams(**params))
    assert len(calls) >= 2 * 12 and all(o.text for o in with_text)
    calls.clear()
    ids_only = Engine(model, Counting(), max_batch=2).generate(PROMPTS[:2], SamplingParams(**params, detokenize=False))
    assert calls == [] and [o.text for o in ids_only] == ["", ""]
    assert [o.token_ids for o in ids_only] == [o.token_ids for o in with_text]


def test_text_deltas_with_a_real_byte_level_tokenizer(tmp_path):
    from nanoseek.data import train_tokenizer

    (tmp_path / "c.txt").write_text("The café serves 中文 text and emoji 🙂 daily. Then END here.\n" * 30)
    tok = train_tokenizer([tmp_path / "c.txt"], 300, tmp_path / "tok")
    text = "café 中文 🙂 ENDING"
    t = _Text(tok, SamplingParams(stop=["END"]))
    deltas = []
    for i in tok.encode(text):
        hit = t.add(i)
        deltas.append(t.delta(final=hit is not None))
        if hit:
            break
    assert "".join(deltas) == "café 中文 🙂 " and "\ufffd" not in "".join(deltas)
    assert any(d == "" for d in deltas[:-1])  # bytes of a multi-byte character wait for the rest


def test_logprobs_are_the_models_log_softmax_at_temperature_1(model):
    prompt = PROMPTS[0]
    out = alone(model, prompt, SamplingParams(max_tokens=6, temperature=1.0, seed=0, logprobs=3, ignore_eos=True))
    assert len(out.logprobs) == len(out.top_logprobs) == 6
    with torch.no_grad():
        lp = model(torch.tensor([prompt + out.token_ids]))[0].float().log_softmax(-1)
    for t, tok in enumerate(out.token_ids):
        ref = lp[len(prompt) - 1 + t]
        assert abs(out.logprobs[t] - float(ref[tok])) < 1e-4
        vals, idx = ref.topk(3)
        assert list(out.top_logprobs[t]) == idx.tolist()
        assert torch.allclose(torch.tensor(list(out.top_logprobs[t].values())), vals, atol=1e-4)
    # logprobs=0: the sampled token only; None: nothing
    out = alone(model, prompt, SamplingParams(max_tokens=3, logprobs=0, ignore_eos=True))
    assert len(out.logprobs) == 3 and out.top_logprobs is None
    assert alone(model, prompt, SamplingParams(max_tokens=3, ignore_eos=True)).logprobs is None


def test_abort_frees_the_row(model):
    engine = Engine(model, max_batch=1)
    a = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=50, ignore_eos=True))
    b = engine.add_request(PROMPTS[1], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    c = engine.add_request(PROMPTS[2], SamplingParams(max_tokens=4, ignore_eos=True))
    engine.step()
    engine.step()
    assert [r.id for r in engine.rows] == [a] and int(engine.cache.lengths[0]) > len(PROMPTS[0])
    engine.abort(a)
    engine.abort(c)  # still waiting
    outs = {d.request_id: d for d in engine.step()}
    assert outs[a].finish_reason == "abort" and outs[c].finish_reason == "abort"
    assert [r.id for r in engine.rows] == [b] and int(engine.cache.lengths[0]) == len(PROMPTS[1])
    tokens = list(outs[b].token_ids)
    while engine.has_work():
        tokens += [t for d in engine.step() for t in d.token_ids]
    assert tokens == alone(model, PROMPTS[1], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)).token_ids
    assert not engine.cache.valid.any()


def test_bad_params_are_rejected(model):
    for kw, msg in ((dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
                    (dict(top_k=0), "top_k"), (dict(top_k=-2), "top_k"), (dict(min_p=1.5), "min_p"),
                    (dict(max_tokens=0), "max_tokens"), (dict(repetition_penalty=0.0), "repetition_penalty"),
                    (dict(presence_penalty=3.0), "presence_penalty"), (dict(frequency_penalty=-2.5), "frequency"),
                    (dict(logprobs=-1), "logprobs"), (dict(stop=[""]), "stop"),
                    (dict(stop=["x"], detokenize=False), "need detokenize")):
        with pytest.raises(ValueError, match=msg):
            SamplingParams(**kw)
    engine = Engine(model, max_batch=2, max_model_len=32)
    with pytest.raises(ValueError, match="longer than max_model_len"):
        engine.add_request(list(range(40)), SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="exceeds max_model_len"):
        engine.add_request(list(range(20)), SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request([0, 512], SamplingParams())
    with pytest.raises(ValueError, match="need a tokenizer"):
        engine.add_request([0, 1], SamplingParams(stop="x"))
    with pytest.raises(ValueError, match="exceeds max_model_len"):  # all or nothing
        engine.generate([[0, 1], list(range(30))], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        Engine(model, max_model_len=10**6)
    with pytest.raises(ValueError, match="MTP"):
        Engine(build(ModelConfig.from_preset("tiny", num_nextn_predict_layers=0)), num_speculative_tokens=1)
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        generate(model, [], 3)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [1], 3, top_p=0)
    assert not engine.has_work()


# ---- speculative decoding with MTP (V3 section 5.4.3) ----------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
def test_mtp_speculative_greedy_equals_plain_greedy(model, ref, k):
    lengths = (12, 5, 9, 12, 7)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
    ref = [r[:n] for r, n in zip(ref, lengths)]
    engine = Engine(model, max_batch=3, num_speculative_tokens=k)  # 5 requests: rows are refilled mid-run
    assert [o.token_ids for o in engine.generate(PROMPTS, params)] == ref
    s = engine.stats
    assert s.drafted > 0 and 0 <= s.acceptance_rate <= 1 and s.tokens_per_verify >= 1


class OracleDrafts(Engine):
    """Replaces the MTP drafts with a known continuation: a random number of correct tokens, then wrong ones,
    so that partial acceptance and cache rollback are exercised on an untrained model."""

    reference: dict[str, list[int]] = {}
    rng = random.Random(0)

    def _speculative_step(self, n):
        for i, r in enumerate(self.rows[:n]):
            nxt = self.reference[r.id][len(r.output):] + [0] * self.k  # the tokens after `last` = output[-1]
            good = self.rng.randint(0, self.k)
            drafts = nxt[:good] + [(t + 1) % self.vocab_size for t in nxt[good: self.k]]
            self._drafts[i, : self.k] = torch.tensor(drafts)
        return super()._speculative_step(n)


def test_speculative_rollback_with_partial_acceptance(model, ref):
    k, lengths = 3, (20, 9, 14, 20, 11)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
    ref = [r[:n] for r, n in zip(ref, lengths)]
    engine = OracleDrafts(model, max_batch=3, num_speculative_tokens=k)
    engine.reference = {str(i): r for i, r in enumerate(ref)}
    assert [o.token_ids for o in engine.generate(PROMPTS, params)] == ref
    s = engine.stats
    assert 0.2 < s.acceptance_rate < 0.8 and s.tokens_per_verify > 1.5  # k/2 = 1.5 accepted on average
    # the target at draft position j has seen d_1..d_j: with penalties the logprobs of the processed distribution
    # (whose normaliser depends on the counts) match plain decoding's
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, repetition_penalty=1.5,
                        frequency_penalty=2.0, presence_penalty=1.0, logprobs=0)
    plain = alone(model, PROMPTS[0], sp)
    engine = OracleDrafts(model, max_batch=1, num_speculative_tokens=k)
    engine.reference = {"0": plain.token_ids}
    spec = engine.generate([PROMPTS[0]], sp)[0]
    assert spec.token_ids == plain.token_ids and engine.stats.accepted > 0
    assert torch.allclose(torch.tensor(spec.logprobs), torch.tensor(plain.logprobs), atol=2e-5, rtol=0)
    unpenalised = alone(model, PROMPTS[0], replace(sp, repetition_penalty=1.0, frequency_penalty=0.0,
                                                   presence_penalty=0.0))
    assert not torch.allclose(torch.tensor(unpenalised.logprobs), torch.tensor(plain.logprobs), atol=2e-4, rtol=0)


def test_speculative_sampling_emits_the_target_distribution():
    """Monte Carlo on verify_drafts: with drafts drawn from q, every emitted first token follows p."""
    torch.manual_seed(0)
    N, k, V = 40000, 2, 5
    p_logits = torch.randn(k + 1, V) * 1.5
    q = (torch.randn(k, V) * 1.5).softmax(-1)
    g = torch.Generator().manual_seed(0)
    drafts = torch.stack([sample_from(q[j].expand(N, V), [None] * N, g) for j in range(k)], dim=1)
    st_ = SamplingTensors.from_params([SamplingParams()] * N, V)
    n_acc, tokens = verify_drafts(p_logits.expand(N, k + 1, V), drafts, q.expand(N, k, V), st_, g)
    p0 = p_logits[0].softmax(-1)
    freq = torch.bincount(tokens[:, 0], minlength=V).float() / N
    assert torch.allclose(freq, p0, atol=0.012)
    expected_acc = torch.minimum(p0, q[0]).sum()  # P(accept d_1) = sum_x min(p, q)
    assert abs(float((n_acc >= 1).float().mean()) - float(expected_acc)) < 0.012
    # given d_1 accepted, the second token follows p_1
    sel = n_acc >= 1
    freq1 = torch.bincount(tokens[sel, 1], minlength=V).float() / int(sel.sum())
    assert torch.allclose(freq1, p_logits[1].softmax(-1), atol=0.02)


def test_speculative_sampling_end_to_end_is_seeded(model):
    sp = SamplingParams(max_tokens=10, temperature=0.8, top_k=40, seed=5, ignore_eos=True, logprobs=0)
    a = Engine(model, max_batch=2, num_speculative_tokens=2).generate(PROMPTS[:3], sp)
    b = Engine(model, max_batch=2, num_speculative_tokens=2).generate(PROMPTS[:3], sp)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert all(len(o.token_ids) == len(o.logprobs) == 10 for o in a)


# ---- CLI ---------------------------------------------------------------------------------------------------------


def test_cli_generate_with_prompt_ids(model, ref, tmp_path, capsys):
    from nanoseek.cli import main

    save_pretrained(model, tmp_path / "m")
    ref = ref[0][:5]
    for extra in ([], ["--speculative"], ["--compile"], ["--dtype", "float32"]):
        assert main(["generate", "--model", str(tmp_path / "m"), "--prompt-ids", "0,5,17,99,3", "--max-tokens", "5",
                     "--temperature", "0", "--ignore-eos", *extra]) == 0
        out = capsys.readouterr()
        assert out.out.split() == [str(t) for t in ref]
        assert "tok/s" in out.err
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "hi"]) == 2  # no tokenizer in the dir


def test_compiled_decode_step_matches_eager_as_the_batch_shrinks(model, ref):
    # Engine(compile=True): a static-shape decode graph (weights as inputs) per power-of-two bucket of rows.
    # warmup() compiles the buckets (1, 2, 4) up front; then 4 rows finishing at different lengths run as 4 -> 4
    # (3 rows + 1 padding row) -> 2 -> 1 with no further compilation. Greedy outputs must equal each prompt run alone
    # (fp32).
    from torch._dynamo.utils import counters

    engine = Engine(model, max_batch=4, max_model_len=64, compile=True)
    assert engine.warmup() == [1, 2, 4]
    compiled = dict(counters["stats"])
    lengths = [4, 8, 12, 16]
    outs = engine.generate(PROMPTS[:4], [replace(GREEDY, max_tokens=n, ignore_eos=True) for n in lengths])
    assert [o.token_ids for o in outs] == [r[:n] for r, n in zip(ref, lengths)]
    assert dict(counters["stats"]) == compiled  # no frame was compiled again
    with pytest.raises(RuntimeError, match="before adding requests"):
        engine.add_request([0, 1])
        engine.warmup()


def test_compiled_bf16_decode_stays_close_to_fp32(model):
    # bf16 weights and cache through the compiled graph (gathered experts, matrix-vector products as Inductor
    # reductions at bucket 1): each decoded token's log-prob must match the fp32 model's on the same text
    # (teacher-forced, no cache) up to bf16 rounding, and be (nearly) the fp32 argmax
    import copy

    bf16 = Engine(copy.deepcopy(model), max_batch=4, max_model_len=64, compile=True, dtype=torch.bfloat16)
    outs = bf16.generate(PROMPTS[:4], replace(GREEDY, max_tokens=8, logprobs=0))
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    for p, o in zip(PROMPTS[:4], outs):
        with torch.no_grad():
            lp = model(torch.tensor([p + o.token_ids])).float().log_softmax(-1)[0, len(p) - 1: -1]  # (8, V)
        ref = lp.gather(1, torch.tensor(o.token_ids)[:, None])[:, 0]
        assert (torch.tensor(o.logprobs) - ref).abs().max() < 0.05
        assert (lp.max(-1).values - ref).max() < 0.05


