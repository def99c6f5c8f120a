"""Prepacked linear weights (nanoseek.prepack): the packed product against F.linear, live weights (an optimizer
step, load_state_dict, a dtype change are seen by the next call), training untouched, copies and state dicts
unchanged, and the engine's greedy tokens the same packed or not."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nanoseek import build
from nanoseek import prepack as pp
from nanoseek.infer import Engine, SamplingParams

from .hf_ref import sharp_tiny

pytestmark = pytest.mark.skipif(not pp.available(), reason="this PyTorch build has no oneDNN")


@pytest.fixture(autouse=True)
def pack_small_weights(monkeypatch):
    """The tests' tiny layers are below EAGER_MIN_BYTES: pack them anyway, so the packed path is what runs."""
    monkeypatch.setattr(pp, "EAGER_MIN_BYTES", 0)


def test_small_weights_stay_on_f_linear_by_default(monkeypatch):
    monkeypatch.undo()
    assert pp.EAGER_MIN_BYTES > 64 * 48 * 4
    lin = pp.prepack(nn.Linear(64, 48))
    big = pp.prepack(nn.Linear(512, 256, bias=False))
    with torch.inference_mode():
        lin(torch.randn(3, 64)), big(torch.randn(3, 512))
    assert lin.weight.data_ptr() not in pp._PACKED and big.weight.data_ptr() in pp._PACKED


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64), (3, 64), (2, 5, 64), (40, 64)])
def test_packed_product_equals_f_linear(dtype, shape):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=True).to(dtype)
    ref_w, ref_b = lin.weight.detach().clone(), lin.bias.detach().clone()
    pp.prepack(lin)
    assert type(lin) is pp.PackedLinear
    x = torch.randn(*shape, dtype=dtype)
    with torch.inference_mode():
        y = lin(x)
    assert lin.weight.data_ptr() in pp._PACKED  # the packed path ran
    ref = F.linear(x.double(), ref_w.double(), ref_b.double())
    assert y.shape == (*shape[:-1], 48) and y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # bf16: the output is rounded to bf16 (8 bits of mantissa)
    assert torch.allclose(y.double(), ref, atol=tol, rtol=tol)


def test_live_weights_optimizer_step_load_state_dict_and_dtype():
    torch.manual_seed(0)
    lin = pp.prepack(nn.Linear(32, 16, bias=False))
    x = torch.randn(4, 32)
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    with torch.no_grad():
        before = lin(x)
    lin(x).pow(2).sum().backward()  # a training step: grad enabled, plain F.linear
    opt.step()
    with torch.no_grad():
        after = lin(x)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, F.linear(x, lin.weight.detach()), atol=1e-5)  # the updated weight, not the old

    new = {"weight": torch.randn(16, 32)}
    lin.load_state_dict(new)
    with torch.no_grad():
        assert torch.allclose(lin(x), x @ new["weight"].T, atol=1e-5)

    lin.to(torch.bfloat16)
    with torch.no_grad():
        y = lin(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), x @ new["weight"].bfloat16().float().T, atol=5e-2, rtol=2e-2)


def test_training_is_plain_f_linear_with_the_same_gradients():
    torch.manual_seed(0)
    a = nn.Linear(32, 16)
    b = pp.prepack(copy.deepcopy(a))
    x = torch.randn(4, 32)
    a(x).square().sum().backward()
    b(x).square().sum().backward()
    assert b.weight.data_ptr() not in pp._PACKED  # no packed copy was made for a step that wants gradients
    assert torch.equal(a.weight.grad, b.weight.grad) and torch.equal(a.bias.grad, b.bias.grad)


def test_copies_pickles_state_dicts_and_unpack():
    torch.manual_seed(0)
    m = build("tiny").eval()
    keys = list(m.state_dict())
    pp.prepack(m)
    assert pp.prepack(m) is m  # idempotent
    with torch.no_grad():
        m(torch.tensor([[0, 5, 17]]))  # packed copies now exist
    assert list(m.state_dict()) == keys
    c = pickle.loads(pickle.dumps(copy.deepcopy(m)))
    with torch.no_grad():  # the copy packs its own weights
        assert torch.equal(c(torch.tensor([[0, 5, 17]])), m(torch.tensor([[0, 5, 17]])))
    pp.unpack(m)
    assert not pp._PACKED
    assert not any(isinstance(x, pp.PackedLinear) for x in m.modules())
    assert sum(type(x) is nn.Linear for x in m.modules()) > 0


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setattr(pp, "ENABLED", False)
    lin = pp.prepack(nn.Linear(8, 8))
    assert type(lin) is nn.Linear


def test_engine_greedy_tokens_packed_or_not():
    plain = sharp_tiny()
    prompts = [[0, 5, 17, 99, 3], [0, 7, 300, 41]]
    sp = SamplingParams(max_tokens=12, temperature=0.0)
    pp.ENABLED = False
    try:
        ref = Engine(copy.deepcopy(plain), max_batch=2, max_model_len=64).generate(prompts, sp)
    finally:
        pp.ENABLED = True
    m = copy.deepcopy(plain)
    out = Engine(m, max_batch=2, max_model_len=64).generate(prompts, sp)
    assert any(isinstance(x, pp.PackedLinear) and x.weight.data_ptr() in pp._PACKED for x in m.modules())
    assert [o.token_ids for o in out] == [o.token_ids for o in ref] and len(ref[0].token_ids) == 12


@pytest.mark.parametrize("kind", ["fused", "foreach", "data"])
def test_writes_that_skip_the_version_counter(kind):
    """A fused AdamW writes parameters without bumping their version (torch 2.13): the optimizer hook repacks."""
    torch.manual_seed(0)
    lin = pp.prepack(nn.Linear(32, 16, bias=False))
    x = torch.randn(4, 32)
    with torch.no_grad():
        lin(x)
    if kind == "data":
        lin.weight.data.mul_(2.0)  # no version bump, no optimizer: the caller says so
        pp.invalidate()
    else:
        opt = torch.optim.AdamW(lin.parameters(), lr=0.1, **{kind: True})
        lin(x).sum().backward()
        opt.step()
    with torch.no_grad():
        assert torch.allclose(lin(x), F.linear(x, lin.weight.detach()), atol=1e-5)


def test_weights_made_under_inference_mode():
    # a model loaded or cast inside torch.inference_mode holds inference tensors: no version counter to read
    with torch.inference_mode():
        lin = pp.prepack(nn.Linear(16, 8))
        x = torch.randn(2, 16)
        assert torch.allclose(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-5)


def test_compiled_step_calls_the_packed_op_and_sees_an_optimizer_step(monkeypatch):
    # the test model's weights are small: let every product of the compiled batch-2 step take the packed op
    monkeypatch.setattr(pp, "COMPILED_MIN_BYTES", 0)
    rows_seen: list[int] = []
    eager = pp.packed_linear_eager

    def counting(x, weight, bias=None):
        rows_seen.append(x.numel() // x.shape[-1])
        return eager(x, weight, bias)

    monkeypatch.setattr(pp, "packed_linear_eager", counting)
    policy = sharp_tiny()
    prompts = [[0, 5, 17, 99, 3], [0, 7, 300, 41]]
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    engine = Engine(policy, max_batch=2, max_model_len=32, compile=True)
    before = [o.token_ids for o in engine.generate(prompts, sp)]
    assert 2 in rows_seen  # decode steps of 2 rows went through the op (prefill runs 9 rows, eagerly)
    opt = torch.optim.AdamW(policy.parameters(), lr=0.05, fused=True)  # writes without bumping versions
    x = torch.randint(3, 512, (2, 12))
    policy.loss(x[:, :-1], x[:, 1:])["loss"].backward()
    opt.step()
    policy.eval()
    after = [o.token_ids for o in engine.generate(prompts, sp)]
    monkeypatch.setattr(pp, "ENABLED", False)
    fresh = [o.token_ids for o in Engine(pp.unpack(copy.deepcopy(policy)), max_batch=2, max_model_len=32,
                                         compile=False).generate(prompts, sp)]
    assert after == fresh and after != before
