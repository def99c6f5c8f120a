"""Where models run and in which precision: the one place that picks the default device and resolves `--dtype`.

Every command that loads a model takes `--device` (default: `default_device()`) and `--dtype`; the stages keep
both as strings in their config dataclasses (so configs stay JSON-serialisable and a saved config says what was
asked for) and resolve them here, so the rules below are the only ones.

    resolve_device(None)                       -> default_device(): cuda if available, else cpu
    resolve_device("cuda")                     -> ValueError on a machine without CUDA (one line, no traceback)
    resolve_dtype("auto", device)              -> bf16 on a CUDA GPU that supports it, fp32 elsewhere
    resolve_dtype("auto", cpu, amx_hidden_size=512) -> bf16 on an AMX CPU (training: measured, train.py)
    autocast(device, dtype)()                  -> torch.autocast(device.type, dtype) or a no-op for fp32
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

# canonical --dtype names; "auto" resolves per device (resolve_dtype)
DTYPES: dict[str, torch.dtype | None] = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
                                         "float16": torch.float16}
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DTYPE_CHOICES = (*DTYPES, *ALIASES)
DEVICE_HELP = "cpu | cuda | cuda:N | mps (default: cuda if available, else cpu)"


def default_device() -> torch.device:
    """CUDA when available, else the CPU.

    MPS (Apple GPUs) is deliberately not picked by default: no nanoseek path has run on it, the MoE's grouped GEMM
    (torch._grouped_mm) is a CUDA/CPU kernel, and MPS lacks some ops (float64, parts of bf16), so silently moving Mac
    users from the tested CPU path to an untested one would trade a known speed for unknown failures. `--device mps`
    asks for it explicitly.
    """
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """None or "auto": default_device(); otherwise the named device, checked to exist on this machine, so that
    `--device cuda` without a GPU fails here with one line rather than deep inside the first kernel. Other device
    types (e.g. "meta") pass through: the loaders reject those that cannot hold weights."""
    if device is None or device == "auto":
        return default_device()
    if isinstance(device, torch.device):
        dev = device
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"unknown device {device!r}: use {DEVICE_HELP}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"device {str(device)!r} is not available: {why} (torch {torch.__version__}); "
                             "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} is not available: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r} is not available: MPS needs an Apple-silicon Mac; use --device cpu")
    elif dev.type not in ("cpu", "meta"):  # xpu, hpu, ...: the backend module tells whether it is usable
        backend: Any = getattr(torch, dev.type, None)
        if backend is not None and hasattr(backend, "is_available") and not backend.is_available():
            raise ValueError(f"device {str(device)!r} is not available on this machine; use --device cpu")
    return dev


def dtype_name(name: str, *, training: bool = False) -> str:
    """The canonical name ("auto", "float32", "bfloat16", "float16") of a --dtype value or alias (fp32, bf16,
    fp16); ValueError naming the accepted values otherwise. training=True also rejects float16: fp16 gradients
    underflow without loss scaling, which nanoseek does not implement (bf16 has fp32's exponent range)."""
    canon = ALIASES.get(name, name) if isinstance(name, str) else name
    if canon not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use one of auto, float32 (fp32), bfloat16 (bf16), float16 (fp16)")
    if training and canon == "float16":
        raise ValueError("dtype float16 is for inference only: training in fp16 needs loss scaling, which nanoseek "
                         "does not implement; use bfloat16 (bf16) or float32 (fp32)")
    return canon


def resolve_dtype(name: str, device: str | torch.device, *, training: bool = False,
                  amx_hidden_size: int | None = None) -> torch.dtype:
    """A --dtype value as a torch dtype on `device`. Explicit names map to themselves; "auto" picks:

    - CUDA: bfloat16 when the GPU has native bf16 (Ampere and later: what DeepSeek trains and serves in), else
      float32 (emulated bf16 is slow, and fp16 training would need loss scaling);
    - CPU: float32, except bfloat16 for training a model of hidden size >= 512 on a CPU with AMX tiles, when the
      caller passes amx_hidden_size (train.py: measured, see below). Eager bf16 decode and RL updates on a CPU are
      slower than fp32 (docs/inference.md, docs/rl.md), so inference and RL stay fp32;
    - anything else (mps, ...): float32 (untested: take bf16 explicitly).
    """
    canon = dtype_name(name, training=training)
    explicit = DTYPES[canon]
    if explicit is not None:
        return explicit
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.bfloat16 if _cuda_native_bf16() else torch.float32
    if dev.type == "cpu" and amx_hidden_size is not None:
        # bf16 autocast pays where bf16 matmuls run on AMX and are wide enough to amortise the casts. Measured
        # (oneDNN primitive cache 16,384 as nanoseek sets it; docs/LOG.md): `wide` (hidden 512) bf16 is faster with
        # one thread (2.05 vs 2.80 s per step) and two (1.55 vs 1.64 s; compiled 1.22 vs 1.55 s); `small` (hidden
        # 256) only with one thread (0.73 vs 0.86 s; two threads: 0.66 vs 0.51 s); the demo's hidden 128 never.
        # Without AMX, bf16 matmuls are emulated or AVX-512-BF16 only: keep fp32.
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        return torch.bfloat16 if amx and amx_hidden_size >= 512 else torch.float32
    return torch.float32


def _cuda_native_bf16() -> bool:
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.4 has no including_emulation (and reports native support only)
        return torch.cuda.is_bf16_supported()


def autocast(device: torch.device, dtype: torch.dtype) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """A factory of mixed-precision contexts on `device`'s type (weights stay fp32; matmuls run in `dtype`), or of
    no-op contexts for float32. A factory because loops enter it many times."""
    if dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's parameters (nanoseek models live on one device)."""
    return next(model.parameters()).device


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (timings); a no-op on the CPU, whose ops are synchronous."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


__all__ = ["ALIASES", "DEVICE_HELP", "DTYPES", "DTYPE_CHOICES", "autocast", "default_device", "dtype_name",
           "model_device", "resolve_device", "resolve_dtype", "synchronize"]
