"""Prepacked linear weights for CPU inference: oneDNN's blocked weight layout, kept in step with live weights.

Why: a decode step multiplies a few rows by every weight matrix once, so it should stream the weights at the
memory's pace. `F.linear` on a CPU goes to MKL's GEMM, which on this machine (AMD Zen 4, two threads) streams a
2048 x 5632 fp32 weight at 8-9 GB/s for 2-16 rows; oneDNN's matmul on the same weight reordered once into its
blocked layout (the layout Inductor's weight freezing gives it) runs at 27-28 GB/s in fp32 and 2-4x faster in bf16
too (docs/inference.md, "Prepacked weights"). Results agree with `F.linear` to rounding (relative 1e-6 in fp32).

`prepack(model)` turns every `nn.Linear` of a model into a `PackedLinear` in place: the same class for everything
else (an nn.Linear subclass holding the same Parameter objects, so state dicts, `save_pretrained`, optimizers and
training are untouched). Its forward uses the packed copy only when no gradient is wanted, on a CPU, in fp32 or bf16;
it repacks when the weight changed since it was packed (the tensor's version counter: an optimizer step or a
`load_state_dict` bumps it) or since any optimizer stepped (fused optimizers, such as the trainers'
`AdamW(fused=True)`, write parameters without bumping their version: a global optimizer step hook counts steps), so a
training loop's rollouts (GRPO) see the current policy. Other writes that bypass the version counter (through
`param.data`) must call `invalidate()`. The cost: one more copy
of the linear weights in memory while packed, and one reorder pass over a weight after each change.

Eager steps only: a compiled decode step (`infer.DecodeStep(compile=True)`) keeps Inductor's own code for its
products (its traced graph sees plain `F.linear`).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

PACK_ROWS = 8  # oneDNN's batch-size hint for the reorder: decode steps run 1-16 rows (docs/inference.md)
DTYPES = (torch.float32, torch.bfloat16)
# NANOSEEK_PREPACK=0 turns it off: the packed copies double the memory of the linear weights
ENABLED = os.environ.get("NANOSEEK_PREPACK", "1") != "0"


@functools.cache
def available() -> bool:
    """oneDNN's packed linear exists in this PyTorch build and runs (x86 and Arm builds ship oneDNN)."""
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(16, 16), 1)
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 16), w, None, "none", [], "")
        return bool(torch.allclose(y, torch.full((1, 16), 16.0)))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


_optimizer_steps = 0  # bumped after every optimizer step anywhere: packed copies made before are stale


def invalidate(*_: object) -> None:
    """Mark every packed copy stale (rebuilt at its next use). Runs after each optimizer step, as a global hook."""
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(invalidate)


class PackedLinear(nn.Linear):
    """nn.Linear that multiplies through a oneDNN-packed copy of its weight when inference allows it."""

    _packed: torch.Tensor | None = None
    _packed_key: tuple[int, int, torch.dtype, int] | None = None

    def _weight_packed(self) -> torch.Tensor:
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, _optimizer_steps)
        if key != self._packed_key:  # first use, or the weight was updated / replaced / cast since
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), PACK_ROWS)
            self._packed_key = key
        assert self._packed is not None
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (torch.compiler.is_compiling() or w.device.type != "cpu" or w.dtype not in DTYPES or x.dtype != w.dtype
                or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))):
            return F.linear(x, w, self.bias)
        bias = None if self.bias is None else self.bias.detach()
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self._weight_packed(), bias, "none", [], "")

    def __getstate__(self) -> dict:  # copy.deepcopy / pickle: the packed copy is a cache, rebuilt on use
        state = self.__dict__.copy()
        state.pop("_packed", None)
        state.pop("_packed_key", None)
        return state

    def unpack(self) -> None:
        """Drop the packed copy (it is rebuilt at the next inference call)."""
        self._packed = self._packed_key = None


def prepack(model: nn.Module) -> nn.Module:
    """Make every nn.Linear of `model` a PackedLinear, in place (idempotent); returns the model. A no-op when
    this PyTorch has no oneDNN or NANOSEEK_PREPACK=0. The packed copies are built lazily, at each layer's first
    inference call."""
    if not (ENABLED and available()):
        return model
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = PackedLinear  # same object, same Parameters: optimizers and hooks keep their references
    return model


def unpack(model: nn.Module) -> nn.Module:
    """Undo `prepack`: plain nn.Linear layers again, packed copies freed."""
    for m in model.modules():
        if isinstance(m, PackedLinear):
            m.unpack()
            m.__class__ = nn.Linear
    return model
