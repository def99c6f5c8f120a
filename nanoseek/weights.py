"""HF-format model directories: load and save DeepSeek-V3/V2 (and DeepSeek-LLM) checkpoints, the config.json
adapter (`config_from_hf`, `config_to_hf`), key mapping, FP8 dequantisation. Janus directories: nanoseek.imagine.

Directory layout (docs/architecture.md): `config.json` (official keys; nanoseek's own extras under the
`"nanoseek"` key, which transformers ignores), `model.safetensors` or shards + `model.safetensors.index.json`,
`generation_config.json`, and the tokenizer files when a tokenizer is saved alongside. Reads `pytorch_model*.bin`
files (DeepSeek's Janus repositories ship them) only through `torch.load(weights_only=True)`, which restores plain
tensors and refuses any pickled code.

Key mapping (nanoseek -> HF), the only non-identity parts:
  embed_tokens / layers / norm       -> model.embed_tokens / model.layers / model.norm
  layers.i.mlp.experts.{gate,up,down}_proj (E, out, in)  <->  model.layers.i.mlp.experts.{e}.{...}.weight
  mtp.k.*                            -> model.layers.{num_hidden_layers + k}.*   (official V3 MTP layout)
  + model.layers.{L+k}.embed_tokens.weight and .shared_head.head.weight: copies of the shared embedding/head that
    the official files carry; written on save, ignored on load.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ._version import __version__
from .model import ModelConfig, Transformer

log = logging.getLogger(__name__)

FP8_BLOCK = 128  # official V3 checkpoints: one fp32 scale per 128x128 weight block
_EXPERT_RE = re.compile(r"^(layers\.\d+|mtp\.\d+)\.mlp\.experts\.(gate_proj|up_proj|down_proj)$")
_HF_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class CheckpointError(ValueError):
    """A checkpoint directory does not match what nanoseek expects; the message names the problem."""


# ---------------------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def config_from_hf(src: dict[str, Any] | str | Path) -> ModelConfig:
    """Read an HF `config.json` (dict, file or model directory) of DeepseekV3/DeepseekV2ForCausalLM, or of
    LlamaForCausalLM (DeepSeek-LLM: the dense MHA trunk).

    Accepts both the official `rope_theta` + `rope_scaling` keys and the `rope_parameters` dict that
    transformers 5 writes.
    """
    if not isinstance(src, dict):
        p = Path(src)
        p = p / "config.json" if p.is_dir() else p
        if not p.exists():
            raise FileNotFoundError(f"no config.json at {p}")
        src = json.loads(p.read_text())
    hf = dict(src)
    mt = hf.get("model_type")
    if mt not in ("deepseek_v3", "deepseek_v2", "llama"):
        raise ValueError(f"unsupported model_type {mt!r} in config.json (supported: deepseek_v3, deepseek_v2, "
                         "llama)")
    if mt == "llama":
        return _config_from_llama(hf)
    if hf.get("moe_layer_freq", 1) != 1:
        raise ValueError(f"moe_layer_freq={hf['moe_layer_freq']} is not supported (only 1, as in V2/V3)")
    nkv = hf.get("num_key_value_heads")
    if nkv is not None and nkv != hf["num_attention_heads"]:
        raise ValueError(f"num_key_value_heads ({nkv}) must equal num_attention_heads for MLA")
    # RoPE: official form (rope_theta + rope_scaling) or transformers 5 (rope_parameters)
    rope_theta = hf.get("rope_theta")
    rope_scaling = hf.get("rope_scaling")
    rp = hf.get("rope_parameters")
    if rp:
        rp = dict(rp)
        rope_theta = rp.pop("rope_theta", rope_theta)
        kind = rp.pop("rope_type", rp.pop("type", "default"))
        rp.pop("partial_rotary_factor", None)
        rope_scaling = None if kind == "default" else {"type": kind, **rp}
    elif rope_scaling:
        rope_scaling = dict(rope_scaling)
        if "rope_type" in rope_scaling and "type" not in rope_scaling:
            rope_scaling["type"] = rope_scaling.pop("rope_type")
    v2 = mt == "deepseek_v2"
    defaults = ModelConfig()
    out: dict[str, Any] = {"model_type": mt, "rope_theta": float(rope_theta or 10000.0),
                           "rope_scaling": rope_scaling}
    for f in fields(ModelConfig):
        if f.name in out or f.name not in hf or hf[f.name] is None and f.name != "q_lora_rank" \
                or f.name in ("attention", "num_key_value_heads", "head_dim"):  # MHA-only (MLA: checked above)
            continue
        out[f.name] = hf[f.name]
    if "num_mtp_layers" in hf and "num_nextn_predict_layers" not in hf:
        out["num_nextn_predict_layers"] = hf["num_mtp_layers"]
    if v2:
        out.setdefault("scoring_func", "softmax")
        out.setdefault("topk_method", "greedy")
        out.setdefault("num_nextn_predict_layers", 0)
        out["norm_topk_prob"] = False  # transformers' V2 router never renormalises (DeepSeek's V2 code: optional)
        out.setdefault("rope_interleave", True)  # V2 always rotates interleaved pairs
        out.setdefault("aux_loss_alpha", 0.0)
        out.setdefault("first_k_dense_replace", 0)
    else:
        out["scoring_func"] = "sigmoid"  # transformers' V3 router is sigmoid-only
        out["topk_method"] = "noaux_tc"
        out.setdefault("num_nextn_predict_layers", 0)
    if out.get("topk_method") == "greedy" or not hf.get("n_group"):
        out["n_group"], out["topk_group"] = 1, 1
    if "q_lora_rank" in hf:
        out["q_lora_rank"] = hf["q_lora_rank"]
    if "max_position_embeddings" not in out:
        out["max_position_embeddings"] = defaults.max_position_embeddings
    return ModelConfig(**out)


def _config_from_llama(hf: dict[str, Any]) -> ModelConfig:
    """DeepSeek-LLM's LlamaForCausalLM config: MHA, dense SwiGLU MLPs, rotate-half RoPE, no MTP."""
    for key, ok in (("hidden_act", "silu"), ("mlp_bias", False), ("pretraining_tp", 1)):
        if hf.get(key, ok) not in (ok, None):
            raise ValueError(f"{key}={hf[key]!r} is not supported for a llama config (only {ok!r})")
    rp = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rp.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
    kind = rp.pop("rope_type", rp.pop("type", "default"))
    if kind not in ("default", "yarn"):
        raise ValueError(f"rope type {kind!r} is not supported (accepted: default, yarn)")
    rp.pop("partial_rotary_factor", None)
    L, H = hf["num_hidden_layers"], hf["num_attention_heads"]
    out: dict[str, Any] = dict(
        model_type="llama", attention="mha", vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_hidden_layers=L, num_attention_heads=H,
        num_key_value_heads=hf.get("num_key_value_heads") or H, head_dim=hf.get("head_dim"),
        n_routed_experts=0, n_shared_experts=0, first_k_dense_replace=L, num_nextn_predict_layers=0,
        n_group=1, topk_group=1, q_lora_rank=None, aux_loss_alpha=0.0, rope_theta=float(theta),
        rope_scaling={"type": kind, **rp} if kind == "yarn" else None,
        rope_interleave=False,  # Llama rotates halves (rotate_half), not interleaved pairs
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), initializer_range=hf.get("initializer_range", 0.02),
        attention_bias=bool(hf.get("attention_bias", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if k in hf:
            out[k] = hf[k]
    if out["head_dim"] == out["hidden_size"] // H:
        out["head_dim"] = None
    if out["num_key_value_heads"] == H:
        out["num_key_value_heads"] = None
    return ModelConfig(**out)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The official config.json form (`rope_theta` + `rope_scaling`), readable by transformers 4 and 5."""
    if cfg.model_type == "llama":
        if cfg.attention != "mha" or cfg.has_moe or cfg.n_routed_experts:
            raise ValueError("a llama config.json describes a dense MHA model (attention='mha', no experts)")
        return _config_to_llama(cfg)
    if cfg.attention != "mla":
        raise ValueError(f"{cfg.model_type} checkpoints use MLA: attention='mha' needs model_type='llama'")
    v3 = cfg.model_type == "deepseek_v3"
    d: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        "model_type": cfg.model_type,
        "num_key_value_heads": cfg.num_attention_heads,
        "hidden_act": "silu",
        "moe_layer_freq": 1,
        "use_cache": True,
        "attention_dropout": 0.0,
        "pretraining_tp": 1,
    }
    for f in fields(cfg):
        if f.name not in ("attention", "num_key_value_heads", "head_dim"):  # MHA-only fields
            d[f.name] = getattr(cfg, f.name)
    d["rope_scaling"] = dict(cfg.rope_scaling) if cfg.yarn else None
    d["seq_aux"] = True
    if v3:
        d["ep_size"] = 1
    else:
        d.pop("num_nextn_predict_layers")
        d.pop("rope_interleave")
        if cfg.num_nextn_predict_layers:
            raise ValueError("DeepSeek-V2 checkpoints have no MTP modules; set num_nextn_predict_layers=0")
    return d


def _config_to_llama(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.attn_head_dim, "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.yarn else None,
        "attention_bias": cfg.attention_bias, "mlp_bias": False, "attention_dropout": 0.0,
        "initializer_range": cfg.initializer_range, "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
        "use_cache": True, "pretraining_tp": 1,
    }


# ---------------------------------------------------------------------------------------------------------------
# key mapping


def _to_hf_prefix(name: str, n_layers: int) -> str:
    if name.startswith("mtp."):
        k, rest = name[4:].split(".", 1)
        return f"model.layers.{n_layers + int(k)}.{rest}"
    if name.startswith("lm_head."):
        return name
    return "model." + name


def _from_hf_prefix(name: str, n_layers: int) -> str | None:
    """HF key -> nanoseek key (experts still per-expert); None for keys to skip (MTP copies)."""
    if name.startswith("lm_head."):
        return name
    if not name.startswith("model."):
        return name  # unknown: reported as unexpected by the caller
    name = name[6:]
    m = re.match(r"^layers\.(\d+)\.(.*)$", name)
    if m and int(m.group(1)) >= n_layers:
        k, rest = int(m.group(1)) - n_layers, m.group(2)
        if rest in ("embed_tokens.weight", "shared_head.head.weight"):
            return None  # duplicated shared embedding/head in official files
        return f"mtp.{k}.{rest}"
    return name


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights under official HF key names, experts split per expert, MTP at layer L+k."""
    cfg = model.config
    L = cfg.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        m = _EXPERT_RE.match(name.removesuffix(".weight"))
        if m:
            base = _to_hf_prefix(m.group(1) + ".x", L)[:-2]
            for e in range(t.shape[0]):
                out[f"{base}.mlp.experts.{e}.{m.group(2)}.weight"] = t[e].contiguous()
            continue
        out[_to_hf_prefix(name, L)] = t.contiguous()
    for k in range(cfg.num_nextn_predict_layers):
        out[f"model.layers.{L + k}.embed_tokens.weight"] = model.embed_tokens.weight.detach().clone()
        out[f"model.layers.{L + k}.shared_head.head.weight"] = model.lm_head.weight.detach().clone()
    return out


# ---------------------------------------------------------------------------------------------------------------
# reading


def _shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if not index.exists() and not (path / "model.safetensors").exists() and not any(path.glob("*.safetensors")):
        index = path / "pytorch_model.bin.index.json"  # the older layout: only through weights_only loading
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise CheckpointError(f"missing shard file(s) listed in {index.name}: {', '.join(missing)}")
        return [path / f for f in files]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    if (path / "pytorch_model.bin").exists():
        return [path / "pytorch_model.bin"]
    others = sorted(p.name for p in path.glob("*.pt")) + sorted(p.name for p in path.glob("*.bin"))
    hint = f" (found {', '.join(others)}: only model.safetensors* or pytorch_model.bin* are read)" if others else ""
    raise CheckpointError(f"no model.safetensors, model.safetensors.index.json or pytorch_model.bin in {path}{hint}")


def _read_bin(f: Path) -> dict[str, torch.Tensor]:
    try:  # weights_only: tensors, dicts and primitive types only; a pickle that asks for anything else is refused
        sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a corrupt or unsafe file
        raise CheckpointError(f"{f.name} could not be read with torch.load(weights_only=True), which accepts plain "
                              f"tensors only: {str(e).splitlines()[0]}") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{f.name} is not a state dict of tensors")
    return sd


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for f in _shard_files(path):
        if f.suffix == ".bin":
            yield from _read_bin(f).items()
            continue
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                yield k, fh.get_tensor(k)


def dequant_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Official V3/R1 weights: float8_e4m3fn values x one fp32 scale per 128x128 block (`weight_scale_inv`)."""
    rows, cols = weight.shape
    br, bc = -(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)
    if tuple(scale_inv.shape) != (br, bc):
        raise CheckpointError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {(br, bc)} for a "
                              f"{rows}x{cols} weight with {FP8_BLOCK}x{FP8_BLOCK} blocks")
    s = scale_inv.float().repeat_interleave(FP8_BLOCK, 0)[:rows].repeat_interleave(FP8_BLOCK, 1)[:, :cols]
    return (weight.float() * s).to(dtype)


def read_hf_state_dict(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint with FP8 weights dequantised (scales consumed)."""
    raw = dict(iter_tensors(path))
    out: dict[str, torch.Tensor] = {}
    for k, t in raw.items():
        if k.endswith(".weight_scale_inv"):
            if k.removesuffix("_scale_inv") not in raw:
                raise CheckpointError(f"{k} has no matching weight tensor")
            continue
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale = raw.get(k + "_scale_inv")
            if scale is None:
                raise CheckpointError(f"{k} is stored as {t.dtype} but has no {k}_scale_inv block scales")
            t = dequant_fp8(t, scale, dtype or torch.bfloat16)
        out[k] = t
    return out


def from_hf_state_dict(cfg: ModelConfig, hf: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """HF tensors -> nanoseek state dict (experts stacked). Returns (state dict, unexpected HF keys)."""
    L = cfg.num_hidden_layers
    sd: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    unexpected = []
    for k, t in hf.items():
        m = _HF_EXPERT_RE.match(k)
        if m:
            base = _from_hf_prefix(m.group(1) + ".x", L)
            if base is None:
                continue
            experts.setdefault((base[:-2], m.group(3)), {})[int(m.group(2))] = t
            continue
        if k.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
            # transformers 5 in-memory layout (E, 2I, D) / (E, D, I), should a checkpoint carry it
            base = _from_hf_prefix(k.rsplit(".", 1)[0] + ".x", L)
            if base is None:
                continue
            if k.endswith("gate_up_proj"):
                g, u = t.chunk(2, dim=1)
                sd[f"{base[:-2]}.gate_proj"], sd[f"{base[:-2]}.up_proj"] = g, u
            else:
                sd[f"{base[:-2]}.down_proj"] = t
            continue
        name = _from_hf_prefix(k, L)
        if name is None:
            continue
        if not (k.startswith("model.") or k.startswith("lm_head.")):
            unexpected.append(k)
            continue
        sd[name] = t
    for (base, proj), per in experts.items():
        n = cfg.n_routed_experts
        missing = [e for e in range(n) if e not in per]
        if missing:
            raise CheckpointError(f"missing tensor {_to_hf_prefix(base, L)}.{missing[0]}.{proj}.weight "
                                  f"({len(missing)} of {n} experts missing for {proj})")
        sd[f"{base}.{proj}"] = torch.stack([per[e] for e in range(n)])
    return sd, unexpected


def load_state_dict(model: Transformer, sd: dict[str, torch.Tensor], unexpected_hf: list[str] | None = None,
                    strict_mtp: bool = False) -> None:
    """Copy `sd` into `model`, naming any missing/unexpected tensor or shape mismatch."""
    cfg = model.config
    L = cfg.num_hidden_layers
    own = model.state_dict()
    if cfg.tie_word_embeddings:
        own.pop("lm_head.weight", None)
        sd.pop("lm_head.weight", None)

    def hf_name(n: str) -> str:
        m = _EXPERT_RE.match(n)
        if not m:
            return _to_hf_prefix(n, L)
        return _to_hf_prefix(m.group(1) + ".x", L)[:-2] + f".mlp.experts.*.{m.group(2)}.weight"

    unexpected = sorted((unexpected_hf or []) + [hf_name(k) for k in sd if k not in own])
    if unexpected:
        raise CheckpointError(f"unexpected tensor(s) in checkpoint: {', '.join(unexpected[:5])}"
                              + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
                              + f" (config: {cfg.num_hidden_layers} layers, "
                              f"{cfg.num_nextn_predict_layers} MTP module(s))")
    missing = [k for k in own if k not in sd]
    mtp_missing = [k for k in missing if k.startswith("mtp.")]
    other_missing = [k for k in missing if not k.startswith("mtp.")]
    if other_missing:
        raise CheckpointError(f"missing tensor(s) in checkpoint: {', '.join(hf_name(k) for k in other_missing[:5])}"
                              + (f" and {len(other_missing) - 5} more" if len(other_missing) > 5 else ""))
    if mtp_missing:
        if strict_mtp or len(mtp_missing) != sum(1 for k in own if k.startswith("mtp.")):
            raise CheckpointError(f"missing MTP tensor(s): {', '.join(hf_name(k) for k in mtp_missing[:5])}")
        log.warning("config declares %d MTP module(s) but the checkpoint has no MTP weights "
                    "(transformers saves them that way): MTP initialised fresh", cfg.num_nextn_predict_layers)
    copy_checked(own, sd, hf_name)


def dominant_dtype(sd: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype most tensors of a state dict have (a checkpoint's dtype; fp32 when it has none)."""
    floats = [t.dtype for t in sd.values() if t.is_floating_point()]
    return max(set(floats), key=floats.count) if floats else torch.float32


def copy_checked(own: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], hf_name: Any, where: str = "") -> None:
    """Copy `sd` into the model's own tensors after checking every shape (the whole check first: nothing is
    half-copied when one tensor does not fit); `hf_name` names a tensor as the checkpoint calls it."""
    for k, t in sd.items():
        if tuple(t.shape) != tuple(own[k].shape):
            raise CheckpointError(f"shape mismatch for {hf_name(k)}{where}: expected {tuple(own[k].shape)}, "
                                  f"found {tuple(t.shape)}")
    with torch.no_grad():
        for k, t in sd.items():
            own[k].copy_(t)


# ---------------------------------------------------------------------------------------------------------------
# public API


def read_nanoseek_meta(path: str | Path) -> dict[str, Any]:
    cfg_file = Path(path) / "config.json"
    return json.loads(cfg_file.read_text()).get("nanoseek", {}) if cfg_file.exists() else {}


JANUS_MODEL_TYPES = ("janus", "multi_modality")  # transformers' and DeepSeek's Janus layouts (nanoseek.imagine)


def open_model_dir(path: str | Path, device: torch.device | str | None = None, *,
                   revision: str | None = None) -> tuple[Path, torch.device, str | None]:
    """(local directory, device, config.json's model_type) of a model directory or Hugging Face Hub id (fetched
    into the shared cache once, at `revision`), checked before a tensor is read: a directory with a readable
    config.json, and a device that can hold weights. device None: nanoseek.device.default_device()."""
    from .device import resolve_device
    from .hub import resolve_model_dir

    path = resolve_model_dir(path, revision, flag="model")
    device = resolve_device(device)
    if device.type == "meta":  # to_empty + copy_ would "succeed" and return a model without weights
        raise CheckpointError(f"cannot load {path} onto the meta device: it holds shapes, not weights "
                              "(`nanoseek params --model DIR` counts a model without loading it)")
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {path} does not exist")
    if not (path / "config.json").exists():
        raise CheckpointError(f"no config.json in {path}: not an HF model directory")
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'config.json'} is not valid JSON ({e})") from e
    return path, device, model_type


def load(path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
         revision: str | None = None) -> Transformer:
    """Load an HF-format DeepseekV3/V2 (or DeepSeek-LLM) directory, nanoseek's own or an official checkpoint, as a
    nanoseek Transformer. `path` may also be a Hugging Face Hub id (`deepseek-ai/DeepSeek-V2-Lite`, at `revision`):
    nanoseek.hub fetches it into the shared cache once. A Janus directory is refused with a CheckpointError:
    `nanoseek.load` loads any model directory, a Janus one through nanoseek.imagine.load_janus.

    device None: nanoseek.device.default_device() (CUDA if available, else CPU). Tensors are read on the host and
    copied into the model's storage on `device`. dtype None keeps the checkpoint's floating dtype (fp32 for
    nanoseek's own files, bf16 for FP8 checkpoints).
    """
    path, device, model_type = open_model_dir(path, device, revision=revision)
    if model_type in JANUS_MODEL_TYPES:
        raise CheckpointError(f"{path} is a Janus directory (model_type {model_type!r}), not a DeepSeek LLM: "
                              "load it with nanoseek.load (or nanoseek.imagine.load_janus)")
    cfg = config_from_hf(path / "config.json")
    hf = read_hf_state_dict(path, dtype)
    sd, unexpected = from_hf_state_dict(cfg, hf)
    if dtype is None:
        dtype = dominant_dtype(sd)
    with torch.device("meta"):
        model = Transformer(cfg)
    # allocated on `device` directly in `dtype` (the router bias stays fp32: Router._apply): loading a bf16 model
    # onto a GPU never holds an fp32 copy there; the checkpoint's tensors are cast by copy_
    model = model.to(dtype).to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty gives each module its own new tensor: tie again
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary.__init__(cfg)  # non-persistent buffers are not in the checkpoint: recompute
    model.to(device)
    model.init_weights()  # anything not in the checkpoint (fresh MTP) gets a proper init
    load_state_dict(model, sd, unexpected)
    return model.to(dtype)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def save_pretrained(model: Transformer, path: str | Path, *, dtype: torch.dtype | None = None,
                    max_shard_bytes: int = 5 * 2**30, meta: dict[str, Any] | None = None,
                    tokenizer: str | Path | None = None) -> Path:
    """Write an HF-format directory that transformers' AutoModelForCausalLM loads; written to a temp directory
    and renamed into place, so an interrupted save never leaves a half-written model at `path`.
    `nanoseek.save_pretrained` is the entry point for every model (a Janus goes to nanoseek.imagine.save_janus).
    `tokenizer`: a tokenizer directory whose files are copied alongside (a complete, servable directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() and "e_score_correction_bias" not in k
              else v).detach().cpu().contiguous() for k, v in to_hf_state_dict(model).items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        main_dtype = dominant_dtype(sd)
        hf_cfg = config_to_hf(cfg)
        hf_cfg["torch_dtype"] = str(main_dtype).removeprefix("torch.")
        hf_cfg["nanoseek"] = {"version": __version__, **(meta or {})}
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": True,
               "temperature": 0.6, "top_p": 0.95}  # R1's recommended sampling
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer is not None:
            found = [Path(tokenizer) / f for f in TOKENIZER_FILES if (Path(tokenizer) / f).exists()]
            if not found:
                raise CheckpointError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {tokenizer}")
            for f in found:
                shutil.copyfile(f, tmp / f.name)
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for k in sorted(sd):
            nbytes = sd[k].numel() * sd[k].element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = sd[k]
            size += nbytes
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(v.numel() * v.element_size() for v in sd.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        if path.exists():  # keep files we do not own (tokenizer, README); replace ours, then drop stale shards
            ours = {f.name for f in tmp.iterdir()}
            for f in tmp.iterdir():
                os.replace(f, path / f.name)
            for stale in [*path.glob("model*.safetensors"), path / "model.safetensors.index.json"]:
                if stale.exists() and stale.name not in ours:
                    stale.unlink()
            tmp.rmdir()
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
    return path
