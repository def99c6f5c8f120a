"""Weight-only int8 for inference: `quantize_int8(model)` stores the linear layers and routed experts that a decode
step streams as int8 with one scale per output channel, and runs them through PyTorch's weight-only int8 matmul
(`torch._weight_int8pack_mm`, the op torchao's int8 weight-only layout lowers to on a CPU).

Why: decoding one token reads every weight it touches once, so a model that does not fit the caches decodes at the
memory's pace (docs/inference.md, "Weight-only int8"); int8 halves the bytes of a bf16 model. Activations, the KV
cache, norms, the router, the embedding and `kv_b_proj` (read as a matrix by the absorbed attention, V2 section
2.1.3) keep the model's dtype. Inference only: the int8 tensors are buffers, not parameters (nothing to train), and a
quantized model is not saved (`save_pretrained` would not write a checkpoint `load` reads back).

How each part runs:
- `Int8Linear`: eagerly and in compiled buckets of several rows, `torch._weight_int8pack_mm`; in a compiled
  one-row bucket (the batch-1 decode step of infer.DecodeStep) the product is written as `(W.to(dtype) * x).sum(-1)
  * scale` so that Inductor generates one reduction kernel that converts the int8 weights as it streams them, as the
  full-precision batch-1 step does with its matrix-vector products (infer._gemv_as_reductions): 1.4x the op's speed
  at two threads here, its input stored first, in fp32 (`model.materialize`; docs/inference.md).
- `Int8Experts`: eagerly, one `_weight_int8pack_mm` per projection of each expert that received tokens; compiled, the
  gather-reduce form of `model.Experts._gathered` over the int8 weights (the op takes one weight matrix per call,
  and gathering the chosen experts' matrices would copy them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .infer import DECOMPOSE_ROWS
from .model import Experts, Transformer, materialize

DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # activation dtypes _weight_int8pack_mm accepts
KEEP = ("kv_b_proj",)  # linear layers whose weight the model reads as a matrix (absorbed MLA): left as they are
# the op's CPU kernel (torch 2.13) returns inf/NaN for bf16 activations when the reduction dimension is not a
# multiple of 16 (K = 8, 24) and crashes at K = 5; layers with other widths keep the model's dtype
ALIGN = 16


def quantize_weight(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 of w (..., out, in): (int8 weights, scales (..., out) in `dtype`), with
    w ~= q * scale. The scale is rounded to `dtype` (the op multiplies in the activations' dtype) before the
    weights are rounded, so the rounding of the scale is not added to the error of every weight."""
    wf = w.detach().float()
    scale = (wf.abs().amax(dim=-1) / 127).clamp(min=torch.finfo(torch.float32).tiny).to(dtype)
    q = torch.round(wf / scale.float()[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """nn.Linear with int8 weights (out, in) and per-output-channel scales (out,) in the activations' dtype."""

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> Int8Linear:
        q, s = quantize_weight(lin.weight, lin.weight.dtype)
        return cls(q, s, None if lin.bias is None else lin.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if torch.compiler.is_compiling() and x2.shape[0] <= DECOMPOSE_ROWS:  # static: the bucket's rows
            x2 = materialize(x2)  # stored once, in fp32 (model.materialize)
            y = ((self.weight_int8.to(x2.dtype) * x2[:, None, :]).sum(-1) * self.scales).to(x.dtype)
        else:
            y = torch._weight_int8pack_mm(x2, self.weight_int8, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Experts(nn.Module):
    """model.Experts with int8 expert weights: (E, out, in) int8 and (E, out) scales per projection."""

    def __init__(self, experts: Experts):
        super().__init__()
        dt = experts.gate_proj.dtype
        for name in ("gate_proj", "up_proj", "down_proj"):
            q, s = quantize_weight(getattr(experts, name), dt)
            self.register_buffer(f"{name}_int8", q)
            self.register_buffer(f"{name}_scales", s)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x (N, D), expert indices idx (N, K), gate weights w (N, K) -> (N, D): as Experts.forward."""
        N, K = idx.shape
        flat = idx.flatten()
        order = flat.argsort(stable=True)  # token-expert pairs grouped by expert
        e, token = flat[order], order // K
        xs, ws = x[token], w.flatten()[order, None].to(x.dtype)
        if torch.compiler.is_compiling():  # static shapes (infer.DecodeStep): fused gather-reduce kernels
            xs = materialize(xs)  # stored once, in fp32 (model.materialize)

            def proj(name: str, v: torch.Tensor) -> torch.Tensor:
                q, s = getattr(self, f"{name}_int8"), getattr(self, f"{name}_scales")
                return ((q[e].to(v.dtype) * v[:, None, :]).sum(-1) * s[e]).to(x.dtype)

            h = F.silu(proj("gate_proj", xs)) * proj("up_proj", xs) * ws  # gate weight before the down projection
            y = proj("down_proj", materialize(h))  # (else SiLU would be recomputed for every weight read)
        else:
            counts = torch.bincount(flat, minlength=self.gate_proj_int8.shape[0]).tolist()
            outs, start = [], 0
            mm = torch._weight_int8pack_mm
            for ex, n in enumerate(counts):
                if n:
                    xe = xs[start: start + n]
                    g = mm(xe, self.gate_proj_int8[ex], self.gate_proj_scales[ex])
                    u = mm(xe, self.up_proj_int8[ex], self.up_proj_scales[ex])
                    h = F.silu(g) * u * ws[start: start + n]
                    outs.append(mm(h, self.down_proj_int8[ex], self.down_proj_scales[ex]))
                start += n
            y = torch.cat(outs)
        return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))

    def extra_repr(self) -> str:
        E, I, D = self.gate_proj_int8.shape
        return f"experts={E}, hidden={D}, intermediate={I}, int8"


def quantize_int8(model: Transformer) -> Transformer:
    """Weight-only int8, in place, for decoding on a CPU: every nn.Linear (attention projections but `kv_b_proj`,
    dense MLPs, shared experts, MTP projections, the output head) and the routed experts of `model` become
    `Int8Linear` / `Int8Experts`. Layers whose input width is not a multiple of 16 are left as they are (the op's
    kernel needs it). Returns the model, for `Engine(quantize_int8(model))`; Janus: quantize `model.language_model`.

    Raises ValueError before changing anything for a model that is not a nanoseek Transformer, is not on a CPU
    (the op has a CPU kernel only, torch 2.13), or whose dtype is not fp32, bf16 or fp16, and for a model that is
    already quantized. bf16 (or fp16) is the dtype to quantize: the op's fp32-activation kernel is not vectorised
    here (one thread, 1408 x 2048 weights: 1.1 GB/s against 9.2 GB/s with bf16 activations), so an fp32 model gains
    only in compiled batch-1 steps.
    """
    if not isinstance(model, Transformer):
        raise ValueError(f"quantize_int8 takes a nanoseek Transformer (a Janus model: its .language_model), "
                         f"got {type(model).__name__}")
    p = model.embed_tokens.weight
    if p.device.type != "cpu":
        raise ValueError(f"weight-only int8 runs on a CPU only (torch._weight_int8pack_mm has no {p.device.type} "
                         f"kernel): move the model to the CPU first")
    if p.dtype not in DTYPES:
        raise ValueError(f"weight-only int8 needs fp32, bf16 or fp16 activations; the model is {p.dtype}")
    if any(isinstance(m, (Int8Linear, Int8Experts)) for m in model.modules()):
        raise ValueError("the model is already quantized")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name not in KEEP and child.in_features % ALIGN == 0:
                setattr(parent, name, Int8Linear.from_linear(child))
            elif isinstance(child, Experts) and child.gate_proj.shape[-1] % ALIGN == 0 \
                    and child.down_proj.shape[-1] % ALIGN == 0:
                setattr(parent, name, Int8Experts(child))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (int8 weights at one byte each)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
