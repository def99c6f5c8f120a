"""GRPO: hand-worked loss/advantage numbers, a real learning signal on a tiny model, resume, and bad input."""

import json

import pytest
import torch

from nanoseek.model import ModelConfig, build
from nanoseek.rl import (
    RLConfig,
    completion_logprobs,
    group_advantages,
    kimi_length_rewards,
    overlong_penalty,
    policy_loss,
    rl,
)

from .hf_ref import make_tiny_model_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("rlmodel"))


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    a = group_advantages(r, 4)
    # group 1: mean 0.25, unbiased std 0.5 -> (0.75 / 0.5, -0.25 / 0.5 ...); group 2 flat -> 0
    assert torch.allclose(a, torch.tensor([1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0]), atol=1e-3)
    assert torch.allclose(group_advantages(r, 4, scale=False), torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))


def test_policy_loss_by_hand():
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.5, 1.0, 0.5], [1.0, 1.0, 1.0]]))  # ratios
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    # seq 0 (A=+1): min(r, clip(r, .8, 1.2)) = [1.2, 1.0, 0.5] -> -[1.2, 1, .5]; seq 1 (A=-2): -(-2) = [2, 2]
    tok0, tok1 = [-1.2, -1.0, -0.5], [2.0, 2.0]
    grpo, st = policy_loss(logp, old, adv, mask, loss_type="grpo", eps_low=0.2, eps_high=0.2, max_new_tokens=4)
    assert grpo.item() == pytest.approx((sum(tok0) / 3 + sum(tok1) / 2) / 2)
    assert st["clip_frac"] == pytest.approx(1 / 5)  # only the 1.5 ratio with A > 0 is clipped
    dr, _ = policy_loss(logp, old, adv, mask, loss_type="dr_grpo", eps_low=0.2, eps_high=0.2, max_new_tokens=4)
    assert dr.item() == pytest.approx((sum(tok0) / 4 + sum(tok1) / 4) / 2)
    dapo, _ = policy_loss(logp, old, adv, mask, loss_type="dapo", eps_low=0.2, eps_high=0.28, max_new_tokens=4)
    assert dapo.item() == pytest.approx((-1.28 - 1.0 - 0.5 + 4.0) / 5)
    ref = torch.zeros(2, 3)
    kl_loss, st = policy_loss(logp, old, adv, mask, loss_type="grpo", eps_low=0.2, eps_high=0.2, max_new_tokens=4,
                              ref_logp=ref, beta=0.1)
    d = ref - logp
    k3 = torch.exp(d) - d - 1
    assert st["kl"] == pytest.approx(float((k3 * mask).sum() / 5), rel=1e-5)
    assert kl_loss.item() > grpo.item()


@pytest.mark.parametrize("preset", ["tiny", "tiny-dense"])
def test_shared_prompts_give_the_rowwise_logprobs_and_gradients(preset):
    """GRPO batches repeat each prompt G times: the shared-prompt pass (each distinct prompt through the trunk once)
    must give every row's log-probs, entropies and parameter gradients as prompt + completion per row does, for
    groups in any order, prompts and completions of different lengths (padding), a prompt seen once and one-token
    completions; and it must really run each prompt once."""
    torch.manual_seed(0)
    model = build(ModelConfig.from_preset(preset, vocab_size=64, num_nextn_predict_layers=0)).train()
    g = torch.Generator().manual_seed(1)
    distinct = [torch.randint(3, 64, (n,), generator=g).tolist() for n in (5, 9, 2, 7)]
    rows = [0, 1, 0, 2, 1, 0, 3, 1, 2]  # interleaved groups; prompt 3 appears once
    prompts = [distinct[r] for r in rows]
    comps = [torch.randint(3, 64, (n,), generator=g).tolist() for n in (6, 1, 4, 6, 3, 5, 2, 6, 1)]
    adv = torch.randn(len(rows), generator=g)
    seen: list[int] = []
    hook = model.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(i[0].numel()))
    out = {}
    for share in (False, True):
        model.zero_grad(set_to_none=True)
        logp, mask, ent = completion_logprobs(model, prompts, comps, 0.7, 2, with_entropy=True, share_prompts=share)
        ((logp * mask).sum(1) * adv).sum().backward()
        out[share] = (logp * mask, ent * mask, mask, {n: p.grad.clone() for n, p in model.named_parameters()
                                                      if p.grad is not None})
    hook.remove()
    assert seen == [len(rows) * max(len(p) + len(c) for p, c in zip(prompts, comps)),  # row-wise: one pass
                    len(distinct) * 9, len(rows) * 5]  # shared: the 4 prompts (padded to 9), the completions but last
    (lp0, e0, m0, g0), (lp1, e1, m1, g1) = out[False], out[True]
    assert torch.equal(m0, m1) and m0.sum() == sum(map(len, comps))
    assert torch.allclose(lp0, lp1, atol=1e-5) and torch.allclose(e0, e1, atol=1e-5)
    assert g0.keys() == g1.keys() and len(g0) == len(list(model.parameters()))
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-5, rtol=1e-4), name


def test_length_shaping():
    assert kimi_length_rewards([10, 20, 30], [True, True, False]) == [0.5, 0.0, -0.5]
    assert kimi_length_rewards([5, 5], [True, False]) == [0.0, 0.0]
    assert overlong_penalty(80, 100, 20) == 0.0 and overlong_penalty(100, 100, 20) == -1.0
    assert overlong_penalty(90, 100, 20) == pytest.approx(-0.5)


def test_grpo_raises_a_learnable_reward(tiny_dir, tmp_path):
    cfg = RLConfig(model=str(tiny_dir), task="arithmetic", rewards=["tests.reward_plugins:digit_fraction"],
                   replace_rewards=True, out=str(tmp_path), steps=40, group_size=8, batch_prompts=2,
                   max_new_tokens=16, lr=5e-3, loss="dapo", eval_n=0, save_every=0, sample_every=10,
                   progress=False)
    summary = rl(cfg)
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first = sum(r["reward_mean"] for r in recs[:5]) / 5
    last = sum(r["reward_mean"] for r in recs[-5:]) / 5
    assert last > first + 0.1 and last > 3 * first, (first, last)  # digits went from rare to common
    assert (tmp_path / "rl.png").stat().st_size > 1000 and (tmp_path / "samples.jsonl").exists()
    for key in ("kl", "clip_frac", "entropy", "zero_var_frac", "len_mean", "rollout_tok_s", "logprob_mismatch"):
        assert key in recs[-1]
    assert recs[-1]["logprob_mismatch"] < 1e-3  # the trainer recomputes what the sampler saw
    from nanoseek import load

    assert load(summary["final_model"]) is not None


def test_resume_continues_from_checkpoint(tiny_dir, tmp_path):
    common = dict(model=str(tiny_dir), task="arithmetic", out=str(tmp_path), group_size=4, batch_prompts=2,
                  max_new_tokens=8, eval_n=0, save_every=2, progress=False, lr=1e-3)
    rl(RLConfig(steps=4, **common))
    ref = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    (tmp_path / "latest").write_text("step_00000002\n")  # as if killed after step 2's checkpoint
    rl(RLConfig(steps=4, resume=True, **common))
    again = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    assert [r["reward_mean"] for r in again] == [r["reward_mean"] for r in ref]


def test_resume_restores_the_prompt_cursor_under_dynamic_sampling(tiny_dir, tmp_path):
    # an untrained model fails every problem: every group is flat, so DAPO's dynamic sampling draws P prompts and
    # refills 3 times per step (4P); a resumed run must continue from the saved cursor, not from step * P
    common = dict(model=str(tiny_dir), task="arithmetic", out=str(tmp_path), group_size=2, batch_prompts=2,
                  max_new_tokens=4, eval_n=0, save_every=1, progress=False, dynamic_sampling=True)
    rl(RLConfig(steps=3, **common))
    ref = [json.loads(x)["prompts_drawn"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert ref == [8, 16, 24]
    (tmp_path / "latest").write_text("step_00000001\n")  # as if killed after step 1's checkpoint
    rl(RLConfig(steps=3, resume=True, **common))
    again = [json.loads(x)["prompts_drawn"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert again == ref


def test_bad_input_fails_before_compute(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        RLConfig(model=str(tiny_dir), group_size=1)
    with pytest.raises(ValueError, match="does not split into 3 equal mini-batches"):
        RLConfig(model=str(tiny_dir), group_size=4, batch_prompts=2, mini_batches=3)
    with pytest.raises(ValueError, match="cannot import reward module"):
        rl(RLConfig(model=str(tiny_dir), rewards=["not_a_module:fn"], out=str(tmp_path)))
    f = tmp_path / "t.jsonl"
    f.write_text('{"question": "x", "answer": "1"}\n')
    with pytest.raises(ValueError, match="missing the 'prompt' column"):
        rl(RLConfig(model=str(tiny_dir), task=str(f), out=str(tmp_path)))
    f.write_text("")
    with pytest.raises(ValueError, match="has no rows"):
        rl(RLConfig(model=str(tiny_dir), task=str(f), out=str(tmp_path)))


def test_max_time_stops_before_a_step_that_would_not_fit(tiny_dir, tmp_path):
    # a clock that advances 0.01 s per read: a step reads it 6 times (start, rollout start/end, end, elapsed,
    # budget check), so every step "takes" 0.06 s whatever the machine's load. With 0.3 s, the run stops at the
    # start of the step that would end past the budget, after saving the steps it finished
    class Clock:
        t = 0.0

        def __call__(self):
            self.t += 0.01
            return self.t

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model's steps: one thread is faster on a shared machine
    try:
        summary = rl(RLConfig(model=str(tiny_dir), task="arithmetic", out=str(tmp_path), steps=50, group_size=2,
                              batch_prompts=2, max_new_tokens=4, eval_n=0, save_every=0, progress=False,
                              max_time=0.3), clock=Clock())
    finally:
        torch.set_num_threads(threads)
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert summary["stopped"] == "time_budget" and summary["steps"] == len(recs) < 50
    assert recs[-1]["elapsed"] <= 0.3 < recs[-1]["elapsed"] + 2 * recs[-1]["step_time"]  # stopped, not early
    assert (tmp_path / "latest").read_text().strip() == f"step_{summary['steps']:08d}"
