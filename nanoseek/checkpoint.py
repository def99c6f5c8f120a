"""Pickle-free, atomic training checkpoints (the trainer-state format of docs/architecture.md).

    RUN/
      latest                      text file: the name of the newest *complete* checkpoint ("step_00000100")
      step_00000100/
        config.json, model.safetensors, generation_config.json   the HF model directory (nanoseek.weights)
        optimizer.safetensors     optimizer tensors, keys "<param name>/<state key>" (e.g. "lm_head.weight/exp_avg")
        rng.safetensors           torch CPU (and CUDA) generator states as uint8 tensors
        trainer_state.json        step, optimizer hyper-parameters and non-tensor state, scheduler and data
                                  position, Python RNG state, free-form metadata

A checkpoint is written to a temporary directory and renamed into place; `latest` moves (write + os.replace) only
after that, so a crash at any point leaves the previous checkpoint intact and pointed to.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .model import ModelConfig, Transformer
from .weights import from_hf_state_dict, load_state_dict, read_hf_state_dict, save_pretrained

FORMAT_VERSION = 1


def _flatten_optimizer(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    names = {id(p): n for n, p in model.named_parameters()}
    sd = opt.state_dict()
    index_to_name: dict[int, str] = {}
    i = 0
    for group in opt.param_groups:
        for p in group["params"]:
            index_to_name[i] = names[id(p)]
            i += 1
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        name = index_to_name[idx]
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{name}/{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(name, {})[k] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
              | {"params": [index_to_name[j] for j in g["params"]]} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalar_state": scalars}


def _unflatten_optimizer(model: torch.nn.Module, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         meta: dict) -> None:
    names = [n for g in meta["param_groups"] for n in g["params"]]
    own = {id(p): n for n, p in model.named_parameters()}
    current = [own[id(p)] for g in opt.param_groups for p in g["params"]]
    if names != current:
        diff = sorted(set(names) ^ set(current))[:3]
        raise ValueError(f"optimizer checkpoint is for different parameters (e.g. {', '.join(diff) or 'order'}): "
                         "was it saved from a different model config?")
    pos = {n: i for i, n in enumerate(names)}
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        name, k = key.rsplit("/", 1)
        state.setdefault(pos[name], {})[k] = t
    for name, kv in meta["scalar_state"].items():
        state.setdefault(pos[name], {}).update(kv)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        g["params"] = [pos[n] for n in g["params"]]
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    opt.load_state_dict({"state": state, "param_groups": groups})


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


def save_checkpoint(run_dir: str | Path, step: int, model: Transformer, optimizer: torch.optim.Optimizer | None = None,
                    *, scheduler: dict[str, Any] | None = None, data: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None, keep_last: int | None = None) -> Path:
    """Write RUN/step_XXXXXXXX atomically, then move RUN/latest to it. Returns the checkpoint directory."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final = run_dir / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=run_dir))
    try:
        save_pretrained(model, tmp / "model")
        for f in (tmp / "model").iterdir():
            os.replace(f, tmp / f.name)
        (tmp / "model").rmdir()
        state: dict[str, Any] = {"format": FORMAT_VERSION, "step": step, "scheduler": scheduler or {},
                                 "data": data or {}, "extra": extra or {}}
        if optimizer is not None:
            tensors, opt_meta = _flatten_optimizer(model, optimizer)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            state["optimizer"] = opt_meta
        rng_t, rng_meta = _rng_state()
        save_file(rng_t, str(tmp / "rng.safetensors"))
        state["rng"] = rng_meta
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n")
        if final.exists():  # re-saving the same step: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    pointer_tmp = run_dir / ".latest.tmp"
    pointer_tmp.write_text(name + "\n")
    os.replace(pointer_tmp, run_dir / "latest")
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


def load_checkpoint(path: str | Path, model: Transformer, optimizer: torch.optim.Optimizer | None = None,
                    restore_rng: bool = True) -> dict[str, Any]:
    """Restore model (and optimizer, RNG) in place from a checkpoint or a run directory (follows `latest`).
    Returns trainer_state.json's content (step, scheduler, data position, extra)."""
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
    saved_cfg = ModelConfig.from_hf(path / "config.json")
    if saved_cfg != model.config:
        diff = {k: (v, getattr(model.config, k)) for k, v in saved_cfg.to_dict().items()
                if getattr(model.config, k) != v}
        raise ValueError("checkpoint was saved from a different model config: "
                         + ", ".join(f"{k}={a} in the checkpoint vs {b} in the model" for k, (a, b) in diff.items()))
    sd, unexpected = from_hf_state_dict(model.config, read_hf_state_dict(path))
    load_state_dict(model, sd, unexpected, strict_mtp=True)
    if optimizer is not None:
        if "optimizer" not in state:
            raise ValueError(f"checkpoint {path} has no optimizer state")
        _unflatten_optimizer(model, optimizer, load_file(str(path / "optimizer.safetensors")), state["optimizer"])
    if restore_rng:
        _set_rng_state(load_file(str(path / "rng.safetensors")), state.get("rng", {}))
    return state
