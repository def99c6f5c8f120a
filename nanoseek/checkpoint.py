"""Pickle-free, atomic training checkpoints (the trainer-state format of docs/architecture.md).

    RUN/
      latest                      text file: the name of the newest *complete* checkpoint ("step_00000100")
      step_00000100/
        config.json, model.safetensors, generation_config.json   the HF model directory (nanoseek.weights)
        optimizer.safetensors     optimizer tensors, keys "<param name>/<state key>" (e.g. "lm_head.weight/exp_avg")
        rng.safetensors           torch CPU (and CUDA) generator states as uint8 tensors
        trainer_state.json        step, optimizer hyper-parameters and non-tensor state, scheduler and data
                                  position, Python RNG state, free-form metadata

A checkpoint is written to a temporary directory and renamed into place; `latest` moves (an atomic write) only
after that, so a crash at any point leaves the previous checkpoint intact and pointed to (nanoseek.files).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .files import atomic_dir, atomic_write
from .model import Transformer
from .weights import config_from_hf, from_hf_state_dict, load_state_dict, read_hf_state_dict, save_pretrained

FORMAT_VERSION = 1


def named_optimizer_state(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict[str, Any]:
    """Optimizer state keyed by parameter name: {"state": {name: {key: value}}, "param_groups": [...]}, each group
    listing its parameters by name and the index of the optimizer it belongs to. The same shape as
    torch.distributed.checkpoint's full optimizer state dict, so FSDP and plain runs share one format."""
    names = {id(p): n for n, p in model.named_parameters()}
    state: dict[str, dict[str, Any]] = {}
    groups: list[dict[str, Any]] = []
    for oi, opt in enumerate(optimizers):
        sd = opt.state_dict()
        index_to_name = [names[id(p)] for g in opt.param_groups for p in g["params"]]
        for idx, st in sd["state"].items():
            state[index_to_name[idx]] = st
        for g in sd["param_groups"]:
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "optimizer": oi,
                           "params": [index_to_name[j] for j in g["params"]]})
    return {"state": state, "param_groups": groups}


def load_named_optimizer_state(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
                               named: dict[str, Any]) -> None:
    """Inverse of named_optimizer_state for unsharded models."""
    own = {id(p): n for n, p in model.named_parameters()}
    for oi, opt in enumerate(optimizers):
        current = [own[id(p)] for g in opt.param_groups for p in g["params"]]
        groups = [g for g in named["param_groups"] if g.get("optimizer", 0) == oi]
        saved = [n for g in groups for n in g["params"]]
        if saved != current:
            diff = sorted(set(saved) ^ set(current))[:3]
            raise ValueError(f"optimizer {oi} in the checkpoint is for different parameters "
                             f"(e.g. {', '.join(diff) or 'a different order'}): was it saved with another "
                             "optimizer setting or model config?")
        pos = {n: i for i, n in enumerate(saved)}
        state = {pos[n]: named["state"][n] for n in saved if n in named["state"]}
        pg = [{**{k: v for k, v in g.items() if k != "optimizer"}, "params": [pos[n] for n in g["params"]]}
              for g in groups]
        opt.load_state_dict({"state": state, "param_groups": pg})


def _flatten_named(named: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, st in named["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{name}/{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(name, {})[k] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in named["param_groups"]]
    return tensors, {"param_groups": groups, "scalar_state": scalars}


def _unflatten_named(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        name, k = key.rsplit("/", 1)
        state.setdefault(name, {})[k] = t
    for name, kv in meta["scalar_state"].items():
        state.setdefault(name, {}).update(kv)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    v, internal, gauss = random.getstate()
    return tensors, {"python": [v, list(internal), gauss]}


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    if "python" in meta:
        v, internal, gauss = meta["python"]
        random.setstate((v, tuple(internal), gauss))


def save_checkpoint(run_dir: str | Path, step: int, model: Transformer,
                    optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer] | None = None,
                    *, optimizer_state: dict[str, Any] | None = None, scheduler: dict[str, Any] | None = None,
                    data: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                    keep_last: int | None = None, tokenizer: str | Path | None = None,
                    save_model: Callable[[Any, Path], Any] | None = None) -> Path:
    """Write RUN/step_XXXXXXXX atomically, then move RUN/latest to it. Returns the checkpoint directory.

    `optimizer_state` (a named state, e.g. gathered from FSDP) replaces `optimizer` when given. `tokenizer`: a
    tokenizer directory whose files are copied in, so every checkpoint is a complete, servable model directory.
    `save_model(model, dir)` writes a model that is not a Transformer (e.g. imagine.write_vq for a VQ tokenizer).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final = run_dir / name
    with atomic_dir(final) as tmp:  # re-saving the same step replaces it whole
        if save_model is not None:
            save_model(model, tmp)
        else:
            save_pretrained(model, tmp / "model", tokenizer=tokenizer)
            for f in (tmp / "model").iterdir():
                os.replace(f, tmp / f.name)
            (tmp / "model").rmdir()
        state: dict[str, Any] = {"format": FORMAT_VERSION, "step": step, "scheduler": scheduler or {},
                                 "data": data or {}, "extra": extra or {}}
        if optimizer is not None and optimizer_state is None:
            optimizer_state = named_optimizer_state(model, optimizer if isinstance(optimizer, list) else [optimizer])
        if optimizer_state is not None:
            tensors, opt_meta = _flatten_named(optimizer_state)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            state["optimizer"] = opt_meta
        rng_t, rng_meta = _rng_state()
        save_file(rng_t, str(tmp / "rng.safetensors"))
        state["rng"] = rng_meta
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n")
    atomic_write(run_dir / "latest", name + "\n")
    if keep_last:
        for old in sorted(run_dir.glob("step_*"))[:-keep_last]:
            if old.name != name:
                shutil.rmtree(old)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    pointer = Path(run_dir) / "latest"
    if not pointer.exists():
        return None
    ckpt = Path(run_dir) / pointer.read_text().strip()
    return ckpt if (ckpt / "trainer_state.json").exists() else None


def load_checkpoint(path: str | Path, model: Transformer,
                    optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer] | None = None,
                    restore_rng: bool = True, load_model: Callable[[Path, Any], None] | None = None) -> dict[str, Any]:
    """Restore model (and optimizer, RNG) in place from a checkpoint or a run directory (follows `latest`).
    Returns trainer_state.json's content (step, scheduler, data position, extra); with the optimizer state under
    "optimizer_state" (named) when `optimizer` is None but the checkpoint has one (FSDP loads it itself).
    `load_model(dir, model)` restores a model that is not a Transformer (the counterpart of save_model)."""
    path = Path(path)
    if (path / "latest").exists():
        resolved = latest_checkpoint(path)
        if resolved is None:
            raise FileNotFoundError(f"{path}/latest points to a missing or incomplete checkpoint")
        path = resolved
    state_file = path / "trainer_state.json"
    if not state_file.exists():
        raise FileNotFoundError(f"no trainer_state.json in {path}: not a nanoseek checkpoint")
    state = json.loads(state_file.read_text())
    if load_model is not None:
        load_model(path, model)
    else:
        saved_cfg = config_from_hf(path / "config.json")
        if saved_cfg != model.config:
            diff = {k: (v, getattr(model.config, k)) for k, v in saved_cfg.to_dict().items()
                    if getattr(model.config, k) != v}
            raise ValueError("checkpoint was saved from a different model config: " + ", ".join(
                f"{k}={a} in the checkpoint vs {b} in the model" for k, (a, b) in diff.items()))
        sd, unexpected = from_hf_state_dict(model.config, read_hf_state_dict(path))
        load_state_dict(model, sd, unexpected, strict_mtp=True)
    if "optimizer" in state:
        named = _unflatten_named(load_file(str(path / "optimizer.safetensors")), state["optimizer"])
        if optimizer is None:
            state["optimizer_state"] = named
        else:
            load_named_optimizer_state(model, optimizer if isinstance(optimizer, list) else [optimizer], named)
    elif optimizer is not None:
        raise ValueError(f"checkpoint {path} has no optimizer state")
    if restore_rng:
        _set_rng_state(load_file(str(path / "rng.safetensors")), state.get("rng", {}))
    return state
