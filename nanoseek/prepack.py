"""Prepacked linear weights for CPU inference: oneDNN's blocked weight layout, kept in step with live weights.

Why: a decode step multiplies a few rows by every weight matrix once, so it should stream the weights at the
memory's pace. `F.linear` on a CPU goes to MKL's GEMM, which on this machine (AMD Zen 4, two threads) streams a
5632 x 2048 fp32 weight from memory at 7-10 GB/s for 2-16 rows; oneDNN's matmul on the same weight reordered once
into its blocked layout (the layout Inductor's weight freezing gives it) at 18-28 GB/s (2.3-2.9x), and 1.1-1.7x
faster in bf16 (benchmarks/linear.py; docs/inference.md, "Prepacked weights"). Results agree with `F.linear` to rounding
(relative 1e-6 in fp32).

`prepack(model)` turns every `nn.Linear` of a model into a `PackedLinear` in place: the same class for everything
else (an nn.Linear subclass holding the same Parameter objects, so state dicts, `save_pretrained`, optimizers and
training are untouched). Its forward uses the packed copy only when no gradient is wanted, on a CPU, in fp32 or bf16;
it repacks when the weight changed since it was packed (the tensor's version counter: an optimizer step or a
`load_state_dict` bumps it) or since any optimizer stepped (fused optimizers, such as the trainers'
`AdamW(fused=True)`, write parameters without bumping their version: a global optimizer step hook counts steps), so a
training loop's rollouts (GRPO) see the current policy. Other writes that bypass the version counter (through
`param.data`) must call `invalidate()`. The cost: one more copy
of the linear weights in memory while packed, and one reorder pass over a weight after each change.

Eager calls run oneDNN directly. A compiled decode step (`infer.DecodeStep(compile=True)`) calls it as the custom
op `nanoseek::packed_linear` for products of several rows by weights of at least COMPILED_MIN_BYTES, and keeps
Inductor's own code for the others (one-row products: its reductions; small weights: its GEMM calls).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.optim.optimizer import register_optimizer_step_post_hook

from .model import widened

# products of at most this many rows are left to Inductor's reductions in a compiled step (infer._gemv_as_reductions)
DECOMPOSE_ROWS = int(os.environ.get("NANOSEEK_DECOMPOSE_ROWS", "1"))
# in a compiled graph the packed product is an opaque op whose call costs more than a small product: the demo's
# 3.4M model decoded at half the speed at batch 4 with every product packed (docs/benchmarks.md, "Decode"). Only
# weights that come from memory rather than the caches are worth it there
COMPILED_MIN_BYTES = 4 << 20
# eagerly, oneDNN's packed product loses to F.linear on small weights (2 threads, fp32, 4 and 32 rows: 1.3-2.6x
# slower up to 256 x 256, faster from 512 x 256; the demo model's batch-64 rollouts ran 12-15% slower with all its
# weights packed: its linear layers are below 200 KB but for the 512 KB output head; docs/LOG.md)
EAGER_MIN_BYTES = 512 << 10
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


# weight's data pointer -> (a weak reference to its storage, what the copy was made from, the packed copy). Global
# rather than on the module, so that a compiled graph (which sees the weight tensor, not the module) finds it too
_PACKED: dict[int, tuple[StorageWeakRef, tuple[object, ...], torch.Tensor]] = {}


def packed_weight(w: torch.Tensor) -> torch.Tensor:
    """oneDNN's packed copy of the (out, in) weight w, made at first use and again whenever w changed since: its
    version counter (in-place writes, load_state_dict), an optimizer step (`invalidate`), its storage (freed and
    another tensor allocated at the same address: the storage's weak reference has expired), dtype or shape."""
    # inference tensors (made under torch.inference_mode, e.g. a model loaded there) have no version counter
    version = -1 if w.is_inference() else w._version
    key = (version, w.dtype, tuple(w.shape), w.stride(), w.storage_offset(), _optimizer_steps)
    hit = _PACKED.get(w.data_ptr())
    if hit is None or hit[0].expired() or hit[1] != key:
        for ptr in [p for p, e in _PACKED.items() if e[0].expired()]:  # copies of freed weights
            del _PACKED[ptr]
        hit = (StorageWeakRef(w.untyped_storage()), key, torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS))
        _PACKED[w.data_ptr()] = hit
    return hit[2]


def packed_linear_eager(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) through the packed copy of `weight` (inference only: no autograd)."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed_weight(weight), bias, "none", [], "")


@torch.library.custom_op("nanoseek::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear through the packed copy of `weight`; an op a compiled graph calls as it is (its inputs are the
    live parameters, so the copy is looked up, and refreshed, at every call)."""
    return packed_linear_eager(x, weight, bias)


@packed_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def clear() -> None:
    """Free every packed copy (they are rebuilt at their next use)."""
    _PACKED.clear()


class PackedLinear(nn.Linear):
    """nn.Linear that multiplies through a oneDNN-packed copy of its weight when inference allows it: no gradient
    wanted, a CPU, fp32 or bf16, a weight of at least EAGER_MIN_BYTES; otherwise (training, small weights) plain
    F.linear. In a compiled graph: the packed op for products of more than DECOMPOSE_ROWS rows by weights of at least
    COMPILED_MIN_BYTES; one-row products stay Inductor's reductions (infer._gemv_as_reductions), smaller weights
    Inductor's GEMM calls."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if (w.device.type != "cpu" or w.dtype not in DTYPES or x.dtype != w.dtype
                or type(w.data) is not torch.Tensor or type(x) is not torch.Tensor  # DTensor (FSDP2), subclasses
                or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))):
            return F.linear(x, w, b)
        nbytes = w.numel() * w.element_size()
        if torch.compiler.is_compiling():
            rows = x.numel() // x.shape[-1]  # static: a decode bucket's rows
            if rows <= DECOMPOSE_ROWS and (xw := widened(x, nbytes)) is not x:
                y = (xw.unsqueeze(-2) * w).sum(-1).to(x.dtype)  # the reduction F.linear decomposes into
                return y if b is None else y + b
            if rows <= DECOMPOSE_ROWS or nbytes < COMPILED_MIN_BYTES:
                return F.linear(x, w, b)
            return torch.ops.nanoseek.packed_linear(x, w, b)
        if nbytes < EAGER_MIN_BYTES:
            return F.linear(x, w, b)
        return packed_linear_eager(x, w.detach(), None if b is None else b.detach())


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
    clear()
    for m in model.modules():
        if isinstance(m, PackedLinear):
            m.__class__ = nn.Linear
    return model
