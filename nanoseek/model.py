"""DeepSeek-V3 (and V2, and the dense DeepSeek-LLM) in one file, read top to bottom.

ModelConfig -> RMSNorm / YaRN RoPE -> MLA (or MHA) -> MLP -> Router -> Experts -> MoE -> Block -> MTP -> Transformer.

References: DeepSeek-V2 report (arXiv 2405.04434) for MLA, DeepSeek-V3 report (arXiv 2412.19437) for the
aux-loss-free router, the sequence-wise balance loss and multi-token prediction. DeepSeek-LLM (arXiv 2401.02954,
the LLM of Janus-Pro) is the same trunk with `attention="mha"` (Llama layout: MHA + RoPE + SwiGLU + RMSNorm) and
dense MLPs everywhere (`n_routed_experts=0`): HF `model_type: llama`. Parameter names follow the
official HF checkpoints (`q_a_proj`, `kv_a_proj_with_mqa`, ...) so that `nanoseek.weights` maps keys almost 1:1;
the only structural difference is that routed experts are stored stacked (E, out, in) for grouped matmuls.
Where DeepSeek's inference code and transformers differ, transformers' behaviour on the same config.json is
followed (see docs/architecture.md, "Deviations").
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class ModelConfig:
    """Hyper-parameters, named like the official HF `config.json` so the JSON maps 1:1 onto this dataclass."""

    model_type: str = "deepseek_v3"  # deepseek_v3 | deepseek_v2 | llama (DeepSeek-LLM, dense)
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense FFN of the first `first_k_dense_replace` layers
    moe_intermediate_size: int = 2048  # one fine-grained expert
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    # "mla" (V2/V3) or "mha" (DeepSeek-LLM: plain multi-head attention, one rotated key and one value per KV head)
    attention: str = "mla"
    num_key_value_heads: int | None = None  # mha: None = num_attention_heads (DeepSeek-LLM 7B has no GQA)
    head_dim: int | None = None  # mha: None = hidden_size // num_attention_heads
    # MLA (V2 report section 2.1): q_lora_rank None means a plain q projection (V2-Lite)
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # DeepSeekMoE (V3 report section 2.1.2)
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    scoring_func: str = "sigmoid"  # sigmoid (V3) | softmax (V2)
    topk_method: str = "noaux_tc"  # noaux_tc (V3, bias-corrected) | greedy | group_limited_greedy (V2)
    n_group: int = 8
    topk_group: int = 4
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    aux_loss_alpha: float = 0.0001  # sequence-wise balance loss weight (V3 eq. 17-20); 0 disables it
    # multi-token prediction (V3 report section 2.2)
    num_nextn_predict_layers: int = 1
    # positions
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(
        default_factory=lambda: {
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        }
    )
    rope_interleave: bool = True
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        errors = []

        def need(cond: bool, msg: str) -> None:
            if not cond:
                errors.append(msg)

        need(self.model_type in ("deepseek_v3", "deepseek_v2", "llama"),
             f"model_type {self.model_type!r} is not supported (accepted: 'deepseek_v3', 'deepseek_v2', 'llama')")
        need(self.attention in ("mla", "mha"),
             f"attention {self.attention!r} is not supported (accepted: 'mla', 'mha')")
        if self.attention == "mha":
            kv = self.kv_heads
            need(kv > 0 and self.num_attention_heads % kv == 0,
                 f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads ({kv})")
            need(self.attn_head_dim > 0 and self.attn_head_dim % 2 == 0,
                 f"head_dim must be a positive even number, got {self.attn_head_dim}")
            need(self.num_nextn_predict_layers == 0, "MTP modules need MLA blocks: set num_nextn_predict_layers=0")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
            need(int(getattr(self, name)) > 0, f"{name} must be a positive integer, got {getattr(self, name)}")
        need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        need(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank must be positive or null")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers,
             f"first_k_dense_replace must be in [0, num_hidden_layers], got {self.first_k_dense_replace}")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers must be >= 0")
        need(self.scoring_func in ("sigmoid", "softmax"),
             f"scoring_func {self.scoring_func!r} is not supported (accepted: 'sigmoid', 'softmax')")
        need(self.topk_method in ("noaux_tc", "greedy", "group_limited_greedy"),
             f"topk_method {self.topk_method!r} is not supported "
             "(accepted: 'noaux_tc', 'greedy', 'group_limited_greedy')")
        if self.has_moe:
            need(self.n_routed_experts > 0, "n_routed_experts must be positive when MoE layers exist")
            need(0 < self.num_experts_per_tok <= max(self.n_routed_experts, 1),
                 f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, n_routed_experts]")
            need(self.n_group >= 1 and self.n_routed_experts % self.n_group == 0,
                 f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})")
            need(1 <= self.topk_group <= self.n_group,
                 f"topk_group ({self.topk_group}) must be in [1, n_group={self.n_group}]")
            if self.topk_method == "noaux_tc":
                need(self.n_routed_experts // self.n_group >= 2,
                     "noaux_tc routing scores a group by its top-2 experts: need >= 2 experts per group")
                per_group = self.n_routed_experts // max(self.n_group, 1)
                need(self.topk_group * per_group >= self.num_experts_per_tok,
                     "topk_group groups must hold at least num_experts_per_tok experts")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            need(kind in ("yarn", "default", None),
                 f"rope_scaling type {kind!r} is not supported (accepted: 'yarn')")
        if errors:
            raise ValueError("invalid ModelConfig: " + "; ".join(errors))

    # derived sizes
    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width: nope + rope (MLA) or head_dim (MHA)."""
        return self.attn_head_dim if self.attention == "mha" else self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def value_head_dim(self) -> int:
        return self.attn_head_dim if self.attention == "mha" else self.v_head_dim

    @property
    def rope_dim(self) -> int:
        """Rotated width per head: the decoupled RoPE key (MLA) or the whole head (MHA)."""
        return self.attn_head_dim if self.attention == "mha" else self.qk_rope_head_dim

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def has_moe(self) -> bool:
        return self.n_routed_experts > 0 and (self.first_k_dense_replace < self.num_hidden_layers
                                              or self.num_nextn_predict_layers > 0)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """MTP modules use indices num_hidden_layers.. and follow the same rule, as in the official checkpoint."""
        return self.n_routed_experts > 0 and layer_idx >= self.first_k_dense_replace

    @property
    def yarn(self) -> dict[str, Any] | None:
        rs = self.rope_scaling
        if rs is None or rs.get("type", rs.get("rope_type")) in (None, "default"):
            return None
        return rs

    # serialisation (the HF config.json form is nanoseek.weights' config_from_hf / config_to_hf) ---------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            import difflib

            hints = [f"{k!r}" + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, names, 1)) else "")
                     for k in unknown]
            raise ValueError(f"unknown ModelConfig field(s): {', '.join(hints)}")
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available presets: {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides) if overrides else replace(PRESETS[name])


def _preset_small_moe(**kw: Any) -> ModelConfig:
    base = dict(
        model_type="deepseek_v3", q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_shared_experts=1, first_k_dense_replace=1, scoring_func="sigmoid", topk_method="noaux_tc",
        norm_topk_prob=True, routed_scaling_factor=2.5, aux_loss_alpha=0.0001, num_nextn_predict_layers=1,
        rope_theta=10000.0, rope_scaling=None, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    base.update(kw)
    return ModelConfig(**base)


def _preset_dense(**kw: Any) -> ModelConfig:
    """DeepSeek-LLM (arXiv 2401.02954, section 2.2): the Llama layout, MHA, dense SwiGLU, vocab 102,400."""
    base = dict(
        model_type="llama", attention="mha", vocab_size=102400, n_routed_experts=0, n_shared_experts=0,
        num_nextn_predict_layers=0, n_group=1, topk_group=1, q_lora_rank=None, aux_loss_alpha=0.0,
        rope_theta=10000.0, rope_scaling=None, rope_interleave=False, rms_norm_eps=1e-6,
        bos_token_id=100000, eos_token_id=100001, pad_token_id=None,
    )
    base.update(kw)
    base["first_k_dense_replace"] = base["num_hidden_layers"]
    return ModelConfig(**base)


PRESETS: dict[str, ModelConfig] = {
    # ~1M parameters: for tests. Every feature on (q_lora, group routing, YaRN, MTP) so tests exercise them.
    "tiny": _preset_small_moe(
        vocab_size=512, hidden_size=64, intermediate_size=192, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32, n_routed_experts=8, num_experts_per_tok=2,
        n_group=4, topk_group=2, max_position_embeddings=1024,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    ),
    # ~20M parameters (~6M activated): trainable on a 2-core CPU in minutes.
    "small": _preset_small_moe(
        vocab_size=4096, hidden_size=256, intermediate_size=768, moe_intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=8, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, n_routed_experts=32, num_experts_per_tok=4, n_group=4, topk_group=2,
        max_position_embeddings=2048,
    ),
    # official hyper-parameters (HF config.json of deepseek-ai/DeepSeek-V2-Lite, -V2, -V3; R1 shares V3's)
    "deepseek-v2-lite": ModelConfig(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, q_lora_rank=None,
        n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6, first_k_dense_replace=1,
        scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
        routed_scaling_factor=1.0, aux_loss_alpha=0.001, num_nextn_predict_layers=0,
        max_position_embeddings=163840, bos_token_id=100000, eos_token_id=100001,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    ),
    "deepseek-v2": ModelConfig(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=5120, intermediate_size=12288,
        moe_intermediate_size=1536, num_hidden_layers=60, num_attention_heads=128, q_lora_rank=1536,
        n_shared_experts=2, n_routed_experts=160, num_experts_per_tok=6, first_k_dense_replace=1,
        scoring_func="softmax", topk_method="group_limited_greedy", n_group=8, topk_group=3,
        norm_topk_prob=False, routed_scaling_factor=16.0, aux_loss_alpha=0.001, num_nextn_predict_layers=0,
        max_position_embeddings=163840, bos_token_id=100000, eos_token_id=100001,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    ),
    # aux_loss_alpha: the released config.json says 0.001; the V3 report's pretraining used 0.0001
    "deepseek-v3": ModelConfig(aux_loss_alpha=0.001),
    # the dense trunk (attention="mha"): a test size, then DeepSeek-LLM 7B (its HF config.json, model_type llama)
    # and the LLMs of Janus-Pro-1B / -7B (language_config of deepseek-ai/Janus-Pro-1B / -7B: same widths, a 16K
    # context; Janus-Pro-1B's LLM is the 24-layer, 2048-wide one of DeepSeek-VL-1.3B)
    "tiny-dense": _preset_dense(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=1024, bos_token_id=0,
                                eos_token_id=1, pad_token_id=2),
    "deepseek-llm-7b": _preset_dense(hidden_size=4096, intermediate_size=11008, num_hidden_layers=30,
                                     num_attention_heads=32, max_position_embeddings=4096),
    "janus-pro-1b-llm": _preset_dense(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                                      num_attention_heads=16, max_position_embeddings=16384),
    "janus-pro-7b-llm": _preset_dense(hidden_size=4096, intermediate_size=11008, num_hidden_layers=30,
                                      num_attention_heads=32, max_position_embeddings=16384),
}


# ----------------------------------------------------------------------------------------------------------------
# Norm and rotary embeddings


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # the same arithmetic as below in one kernel (identical fp32 outputs on every shape checked); forward +
            # backward of a (32, 127, 256) call on a CPU: 3.9 vs 5.4 ms (docs/LOG.md)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # statistics in fp32 whatever the activation dtype; weight applied after casting back (as transformers)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the rotated width (MLA: the decoupled RoPE key, qk_rope_head_dim; MHA: the whole
    head) and the cos/sin attention factor.

    YaRN (Peng et al. 2023, eq. 19-20 / DeepSeek-V2 appendix): dims that rotate fewer than `beta_slow` times over
    the original context are interpolated by `factor`, those faster than `beta_fast` are kept, with a linear ramp
    between. Applied whenever rope_scaling says yarn (transformers' rule; DeepSeek's code only when the run's
    max_seq_len exceeds the original context).
    """
    dim, base = cfg.rope_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    rs = cfg.yarn
    if rs is None:
        return inv_freq, 1.0
    orig = rs["original_max_position_embeddings"]
    factor = rs.get("factor") or cfg.max_position_embeddings / orig
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(n_rot: float) -> float:
        return dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    attn_factor = rs.get("attention_factor")
    if attn_factor is None:
        m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
        attn_factor = yarn_get_mscale(factor, m) / yarn_get_mscale(factor, m_all) if m and m_all \
            else yarn_get_mscale(factor)
    return inv_freq, float(attn_factor)


def softmax_scale(cfg: ModelConfig) -> float:
    # YaRN's "mscale" correction of the softmax temperature (V2 report appendix; transformers: mscale_all_dim)
    scale = cfg.qk_head_dim**-0.5
    rs = cfg.yarn
    if rs is not None and rs.get("mscale_all_dim"):
        m = yarn_get_mscale(rs.get("factor") or cfg.max_position_embeddings / rs["original_max_position_embeddings"],
                            rs["mscale_all_dim"])
        scale = scale * m * m
    return scale


class Rotary(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq, self.attn_factor = rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.interleave = cfg.rope_interleave

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # (B, T, R/2)
        return freqs.cos() * self.attn_factor, freqs.sin() * self.attn_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x (B, T, H, R). Interleaved: pairs (x0, x1), (x2, x3)... as DeepSeek's complex-number code.

    The output is laid out [rotated evens, rotated odds] (as transformers does): q and k share the permutation,
    so q.k is unchanged, and the cache only ever holds already-rotated keys.
    """
    x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleave else x.chunk(2, dim=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    x1f, x2f = x1.float(), x2.float()
    return torch.cat([x1f * c - x2f * s, x2f * c + x1f * s], dim=-1).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Multi-head Latent Attention (V2 report section 2.1)


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h, d = cfg.num_attention_heads, cfg.hidden_size
        self.n_heads, self.nope, self.rope, self.v_dim = h, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * cfg.qk_head_dim, bias=False)
        else:  # eq. 12-13: low-rank query compression reduces activation memory in training
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, bias=False)
        # eq. 9 + 14: one down-projection gives the KV latent c_kv and the decoupled RoPE key shared by all heads
        self.kv_a_proj_with_mqa = nn.Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        # eq. 10-11: up-projections W_UK, W_UV stacked per head as (H * (nope + v), kv_lora_rank)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * cfg.v_head_dim, d, bias=cfg.attention_bias)
        self.scale = softmax_scale(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                cache: KVCache | None = None, layer_idx: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        cos, sin = rope
        q = self.q_proj(x) if self.cfg.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.n_heads, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin, self.cfg.rope_interleave)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # (B, T, C)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin, self.cfg.rope_interleave).squeeze(2)  # (B, T, R)

        if cache is not None:
            c_kv, k_pe = cache.write(layer_idx, c_kv, k_pe)  # (B, S, C), (B, S, R): everything visible so far
            if cache.use_absorbed(T):
                return self.o_proj(self._absorbed(q_nope, q_pe, c_kv, k_pe, mask).flatten(2))

        # decompressed path (training and prefill): materialise per-head keys/values, use fused SDPA
        S = c_kv.shape[1]
        kv = self.kv_b_proj(c_kv).view(B, S, self.n_heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(B, S, self.n_heads, self.rope)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        pad = self.nope + self.rope - self.v_dim
        if pad > 0:  # fused (flash) SDPA kernels need equal q/k/v head dims; zero columns leave the output exact
            v = F.pad(v, (0, pad))
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, H, T|S, hs)
            attn_mask=mask, is_causal=mask is None and T > 1, scale=self.scale,
        )[..., : self.v_dim]
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.n_heads * self.v_dim))

    def _absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                  mask: torch.Tensor | None) -> torch.Tensor:
        """Attention in latent space (V2 report section 2.1.3): W_UK is absorbed into the query and W_UV into the
        output, so keys/values are never materialised and the cache holds only c_kv + k_pe per token."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_rank)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope:]  # (H, nope, C), (H, v, C)
        q_c = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)  # (B, T, H, C)
        scores = (torch.einsum("bthc,bsc->bhts", q_c, c_kv) + torch.einsum("bthr,bsr->bhts", q_pe, k_pe)) * self.scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        p = scores.softmax(dim=-1, dtype=torch.float32).to(c_kv.dtype)
        o_c = torch.einsum("bhts,bsc->bthc", p, c_kv)
        return torch.einsum("bthc,hvc->bthv", o_c, w_uv)  # (B, T, H, v)


class MHA(nn.Module):
    """Multi-head attention of DeepSeek-LLM (arXiv 2401.02954 section 2.2, the Llama layout): per head a query, a
    key and a value of head_dim, RoPE over the whole head (rotate-half), o_proj back to the model width.
    num_key_value_heads < num_attention_heads shares each key/value head among a group of query heads (GQA)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.attn_head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.kv_heads, hd
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, self.n_kv * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=cfg.attention_bias)
        self.scale = softmax_scale(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                cache: KVCache | None = None, layer_idx: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        cos, sin = rope
        q = apply_rope(self.q_proj(x).view(B, T, self.n_heads, self.head_dim), cos, sin, self.cfg.rope_interleave)
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv, self.head_dim), cos, sin, self.cfg.rope_interleave)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        if cache is not None:  # the classic cache: rotated keys and values of every KV head, (B, S, n_kv * hd)
            k, v = (t.view(B, t.shape[1], self.n_kv, self.head_dim) for t in cache.write(layer_idx, k.flatten(2),
                                                                                        v.flatten(2)))
        if self.n_kv != self.n_heads:
            k, v = (t.repeat_interleave(self.n_heads // self.n_kv, dim=2) for t in (k, v))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T|S, hd)
        if T == 1 and q.dtype != torch.float32 and q.device.type == "cpu":
            # a decode step's one query row in bf16/fp16: SDPA's CPU flash kernel is ~4x slower here than two
            # batched products (8 rows x 16 heads x 600 keys: 8.8 vs 2.3 ms), and a compiled step fuses the two
            # over the cache's layout (Janus' bf16 image sampling 44.8 -> 120 tokens/s; docs/inference.md).
            # Softmax in fp32, as in the absorbed MLA path
            scores = (q @ k.transpose(-1, -2)) * self.scale
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            o = scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype) @ v
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                               scale=self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class KVCache:
    """The absorbed-MLA cache: per layer and token only c_kv (kv_lora_rank) and the rotated k_pe (qk_rope_head_dim).
    With attention="mha" (DeepSeek-LLM) the same two per-token slots hold the classic MHA cache instead: the rotated
    keys (`c_kv`, num_key_value_heads x head_dim) and the values (`k_pe`, same width); everything else (rows, slots,
    masks, positions) is shared, so the engine and Janus' image sampler drive both alike.

    Rows are independent sequences that may have different lengths (continuous batching): new tokens of row b go
    to slots lengths[b]..; `valid` marks real (non-padding) slots. Preallocated: (layers, B, max_len, C + R).
    The main model and the MTP modules (speculative decoding) keep separate caches: `mtp=True` allocates the
    layers num_hidden_layers.. of the MTP modules, whose sequences run one token behind the main model's.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, absorb: bool | None = None, mtp: bool = False):
        n_layers = cfg.num_nextn_predict_layers if mtp else cfg.num_hidden_layers
        self.layer_offset = cfg.num_hidden_layers if mtp else 0
        self.max_len, self.batch_size = max_len, batch_size
        first, second = (cfg.kv_lora_rank, cfg.qk_rope_head_dim) if cfg.attention == "mla" else \
            (cfg.kv_heads * cfg.attn_head_dim,) * 2
        self.c_kv = torch.zeros(n_layers, batch_size, max_len, first, device=device, dtype=dtype)
        self.k_pe = torch.zeros(n_layers, batch_size, max_len, second, device=device, dtype=dtype)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # slots used per row
        self.absorb = absorb  # None: absorbed for decode steps (T == 1), decompressed SDPA for prefill chunks
        self._slots: torch.Tensor | None = None
        self._end = 0

    def use_absorbed(self, T: int) -> bool:
        return self.absorb if self.absorb is not None else T == 1

    def next_positions(self, attention_mask: torch.Tensor | None, T: int) -> torch.Tensor:
        """RoPE positions of T new tokens: count of real tokens before them (left padding gets position 0)."""
        seen = self.valid.sum(dim=1, keepdim=True)  # (B, 1)
        if attention_mask is None:
            return seen + torch.arange(T, device=seen.device)
        return seen + (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)

    def begin(self, T: int, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Reserve slots for T new tokens per row; returns the bool attention mask (B, 1, T, S)."""
        end = int(self.lengths.max()) + T
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} tokens needed, max_len={self.max_len}")
        ar = torch.arange(T, device=self.lengths.device)
        self._slots = self.lengths[:, None] + ar  # (B, T)
        new_valid = torch.ones_like(self._slots, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        self.valid.scatter_(1, self._slots, new_valid)
        self._end = end
        key_pos = torch.arange(end, device=self.lengths.device)
        mask = (key_pos[None, None, :] <= self._slots[:, :, None]) & self.valid[:, None, :end]  # (B, T, S)
        mask |= key_pos[None, None, :] == self._slots[:, :, None]  # a padding query sees itself: no NaN rows
        return mask[:, None]

    def write(self, layer: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._slots is not None, "KVCache.begin() must be called before write()"
        b = torch.arange(self.batch_size, device=c_kv.device)[:, None]
        layer -= self.layer_offset
        self.c_kv[layer, b, self._slots] = c_kv.to(self.c_kv.dtype)
        self.k_pe[layer, b, self._slots] = k_pe.to(self.k_pe.dtype)
        return self.c_kv[layer, :, : self._end], self.k_pe[layer, :, : self._end]

    def commit(self) -> None:
        assert self._slots is not None
        self.lengths.copy_(self._slots[:, -1] + 1)  # in place: views of `lengths` (engine row views) stay valid
        self._slots = None

    def reset_rows(self, rows: torch.Tensor | list[int]) -> None:
        """Free rows for new requests (continuous batching)."""
        self.lengths[rows] = 0
        self.valid[rows] = False

    def bytes_per_token(self) -> int:
        """Cache bytes per token across all layers: (kv_lora_rank + qk_rope_head_dim) x layers x dtype size (MLA),
        2 x num_key_value_heads x head_dim x layers x dtype size (MHA)."""
        n_layers = self.c_kv.shape[0]
        return n_layers * (self.c_kv.shape[-1] + self.k_pe.shape[-1]) * self.c_kv.element_size()


class SharedPrefix:
    """A differentiable cache for training on many sequences that share prompts (GRPO's G samples per prompt): each
    distinct prompt runs through the trunk once, and every continuation attends to its prompt's keys/values, with
    gradients flowing back into the one prompt pass (they sum over the group). Same outputs and gradients as running
    prompt + continuation for every row, up to float rounding, with the prompt's share of the work divided by the
    group size ("Prefix Grouper", arXiv 2506.05433).

    Two passes through `trunk(..., cache=this)`, duck-typing KVCache's protocol (next_positions / begin / write /
    use_absorbed / commit): first the distinct prompts, (P, Tp) right-padded, whose per-layer latents (MLA: c_kv and
    k_pe; MHA: keys and values) are kept with their autograd graph; then the continuations, (B, T) right-padded,
    row b continuing prompt `rows[b]`: their positions start after that prompt and they attend to its real tokens
    plus their own causal past. Nothing is written in place, so autograd sees plain tensors (a KVCache's in-place
    writes into shared buffers cannot be differentiated through)."""

    def __init__(self, lengths: torch.Tensor, rows: torch.Tensor):
        self.lengths, self.rows = lengths, rows  # (P,) real prompt tokens; (B,) prompt of each continuation
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.prefilled = False

    def use_absorbed(self, T: int) -> bool:
        return False  # decompressed keys/values and fused SDPA, as a training forward

    def next_positions(self, attention_mask: torch.Tensor | None, T: int) -> torch.Tensor:
        ar = torch.arange(T, device=self.lengths.device)
        return self.lengths[self.rows][:, None] + ar if self.prefilled else ar[None]

    def begin(self, T: int, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        if attention_mask is not None:
            raise ValueError("SharedPrefix takes right-padded rows without an attention mask")
        if not self.prefilled:
            return None  # the prompts: plain causal (right padding is never attended by a real token)
        dev = self.lengths.device
        Tp = next(iter(self.layers.values()))[0].shape[1]
        prompt = torch.arange(Tp, device=dev)[None, :] < self.lengths[self.rows][:, None]  # (B, Tp) real tokens
        causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        return torch.cat([prompt[:, None, :].expand(-1, T, -1), causal.expand(len(self.rows), -1, -1)], -1)[:, None]

    def write(self, layer: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.prefilled:
            self.layers[layer] = (c_kv, k_pe)
            return c_kv, k_pe
        pc, pk = self.layers[layer]  # gathered per row: the backward of the gather sums the group's gradients
        return torch.cat([pc[self.rows], c_kv], 1), torch.cat([pk[self.rows], k_pe], 1)

    def commit(self) -> None:
        self.prefilled = True


# ----------------------------------------------------------------------------------------------------------------
# Feed-forward: dense MLP and DeepSeekMoE (V3 report section 2.1.2)


class MLP(nn.Module):
    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=False)
        self.up_proj = nn.Linear(dim, inter, bias=False)
        self.down_proj = nn.Linear(inter, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Rank of each entry of x along its last dim in descending order (0 = largest), ties to the lower index:
    `x.topk(k)` picks the entries of rank < k, in rank order. O(n^2) compares, for small n (experts, groups)."""
    xi, xj = x[..., :, None], x[..., None, :]
    before = torch.ones(x.shape[-1], x.shape[-1], dtype=torch.bool, device=x.device).tril(-1)  # j < i
    return ((xj > xi) | ((xj == xi) & before)).sum(-1)


class Router(nn.Module):
    """Scores, selects and weights experts for each token (saved as `mlp.gate` in HF checkpoints)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if cfg.topk_method == "noaux_tc":
            # V3 eq. 16: b_i is added for top-k selection only. Kept fp32 whatever the model dtype (_apply below):
            # 1e-3 updates vanish in bf16.
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))
        else:
            self.e_score_correction_bias = None
        # training tokens routed to each expert since the last bias update (not saved; eval forwards do not count)
        self.register_buffer("expert_load", torch.zeros(cfg.n_routed_experts), persistent=False)
        # training forwards since the last bias update: [sum over sequences of their MaxVio, sequences] (not saved)
        self.register_buffer("sequence_vio", torch.zeros(2), persistent=False)

    def _apply(self, fn, recurse=True):  # keep the bias and load counters in fp32 through .to(bf16) / .half()
        bias, load, seq = self.e_score_correction_bias, self.expert_load, self.sequence_vio
        super()._apply(fn, recurse)
        if bias is not None and self.e_score_correction_bias.dtype != torch.float32:
            self.e_score_correction_bias = bias.to(device=self.e_score_correction_bias.device, dtype=torch.float32)
        if self.expert_load.dtype != torch.float32:
            self.expert_load = load.to(device=self.expert_load.device, dtype=torch.float32)
        if self.sequence_vio.dtype != torch.float32:
            self.sequence_vio = seq.to(device=self.sequence_vio.device, dtype=torch.float32)
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, D) -> weights (N, K) fp32, expert indices (N, K), scores (N, E) fp32."""
        cfg = self.cfg
        with torch.autocast(x.device.type, enabled=False):  # autocast would recast linear to bf16: route in fp32
            logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        # a compiled decode step selects by ranks (elementwise compares and sums Inductor fuses with the scores)
        # instead of topk calls: each topk is a library call that splits the step's fused kernels (with the sort and
        # load count below, the demo model's batch-1 step went from 8 kernels + 15 calls to one kernel;
        # docs/inference.md). Same picks and order; ties to the lower index. O(E^2) compares: decode-sized batches
        ranked = torch.compiler.is_compiling() and not torch.is_grad_enabled() and x.shape[0] <= 256
        if cfg.topk_method != "greedy" and cfg.n_group > 1:
            # node-limited routing (V3 section 2.1.2 / V2 "device-limited"): keep the topk_group best groups,
            # a group scored by its top-2 biased scores (V3) or its best expert (V2)
            g = choice.view(-1, cfg.n_group, cfg.n_routed_experts // cfg.n_group)
            if cfg.topk_method != "noaux_tc":
                group_score = g.amax(-1)
            elif ranked:
                group_score = torch.where(_ranks(g) < 2, g, 0.0).sum(-1)
            else:
                group_score = g.topk(2, dim=-1).values.sum(-1)
            if ranked:
                keep = _ranks(group_score) < cfg.topk_group
            else:
                keep = torch.zeros_like(group_score, dtype=torch.bool)
                keep.scatter_(1, group_score.topk(cfg.topk_group, dim=-1).indices, True)
            choice = g.masked_fill(~keep[..., None], float("-inf")).flatten(1)
        if ranked:  # the expert of rank r in column r: the order topk returns (descending)
            K = torch.arange(cfg.num_experts_per_tok, device=choice.device)
            idx = (_ranks(choice)[:, None, :] == K[None, :, None]).int().argmax(-1)
        else:
            idx = choice.topk(cfg.num_experts_per_tok, dim=-1).indices
        w = scores.gather(1, idx)  # V3 eq. 13: gating values come from the unbiased scores
        if cfg.norm_topk_prob and cfg.num_experts_per_tok > 1:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * cfg.routed_scaling_factor, idx, scores


# ----------------------------------------------------------------------------------------------------------------
# fp32 inputs for compiled one-row products (used by Experts below, nanoseek.prepack and nanoseek.quant)

# one-row products of a compiled step by 16-bit weights of at least this size read an fp32 copy of the activation
# (`materialize`): Inductor's reduction otherwise converts the bf16 activation to fp32 again in every output row's inner
# loop, and the conversion, not the memory, sets the pace (a 102,400 x 2048 bf16 head: 46 GB/s converting in the
# loop, 62 GB/s reading fp32, interleaved in one process; docs/LOG.md). The copy is an opaque op whose call costs
# ~15 us from the generated C++: below ~16 MB the product saves less than that
WIDEN_MIN_BYTES = 16 << 20


@torch.library.custom_op("nanoseek::materialize", mutates_args=())
def materialize(x: torch.Tensor) -> torch.Tensor:
    """x stored once, as fp32, by an op Inductor cannot see into. A compiled step's one-row products are Inductor
    reductions that read their input inside every output row's loop: a pointwise producer (the RMSNorm before a
    projection, with its embedding lookup; the SiLU before a down projection) would be recomputed for every weight
    row (5.7x slower int8 steps, nanoseek.quant), and a 16-bit input converted to fp32 again for every row (the
    conversion, not the memory, then sets the pace: WIDEN_MIN_BYTES). Values are those of the inline conversion.
    Always a copy: a custom op's output must not alias its input (an fp32 x included)."""
    return x.to(torch.float32, copy=True)


@materialize.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, dtype=torch.float32)


def widened(x: torch.Tensor, weight_bytes: int) -> torch.Tensor:
    """`materialize(x)` for a 16-bit activation on a CPU feeding products that read at least WIDEN_MIN_BYTES of
    weights, x itself otherwise (fp32 needs no conversion; other devices' kernels are not Inductor's C++ loops)."""
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16) or weight_bytes < WIDEN_MIN_BYTES:
        return x
    return materialize(x)


class Experts(nn.Module):
    """Fine-grained routed experts stored stacked, (E, out, in), and run as one grouped matmul per projection."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(E, I, D))
        self.up_proj = nn.Parameter(torch.empty(E, I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))
        self.use_grouped_mm = hasattr(torch, "_grouped_mm")

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            if not torch.is_grad_enabled():  # the engine's compiled decode step (live weights, static shapes)
                return self._gathered(x, idx, w)
            # a compiled training step: the sort-based dispatch runs eagerly between two graphs (its shapes depend
            # on the routing, and the fake-tensor kernel of _grouped_mm rejects fp32)
            return self._dispatch_eager(x, idx, w)
        return self._dispatch(x, idx, w)

    def _dispatch(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Token-expert pairs sorted by expert, one grouped matmul (or padded bmm, or loop) per projection."""
        N, K = idx.shape
        flat = idx.flatten()
        order = flat.argsort(stable=True)  # token-expert pairs grouped by expert
        token = order // K
        counts = torch.bincount(flat, minlength=self.gate_proj.shape[0])
        xs = x.index_select(0, token)  # (N*K, D) sorted by expert; backward is an index_add_, not an index_put_
        dt = xs.dtype
        if torch.is_autocast_enabled(xs.device.type):  # autocast does not cover _grouped_mm: cast by hand
            dt = torch.get_autocast_dtype(xs.device.type)
        w_gate, w_up, w_down = (p.to(dt) for p in (self.gate_proj, self.up_proj, self.down_proj))
        xs = xs.to(dt)
        # the gate weight g_i,t (V3 eq. 12) scales h before the down projection (linear, so the same sum): a multiply
        # over I columns instead of D, and its backward likewise (~2% of a GRPO update on `small`, docs/LOG.md)
        ws = w.flatten()[order, None].to(dt)
        ys = None
        if xs.device.type == "cpu" and not torch.is_grad_enabled():  # inference: one bmm when it pays
            ys = self._padded(xs, ws, flat[order], counts, w_gate, w_up, w_down)
        if ys is None:
            run = self._grouped if self.use_grouped_mm and self._grouped_ok(xs) else self._loop
            ys = run(xs, ws, counts, w_gate, w_up, w_down)
        return torch.zeros_like(x).index_add_(0, token, ys.to(x.dtype))

    _dispatch_eager = torch.compiler.disable(_dispatch)

    def _gathered(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The routed experts without a data-dependent shape, for the compiled decode step: token-expert pairs sorted
        by expert, and each pair's three matrix-vector products written as broadcast products and sums over its
        expert's weights, `(W[e] * x).sum(-1)`. Inductor fuses the expert index into the loads of one reduction
        kernel per projection, so nothing is copied (a gathered `bmm` copied N*K expert matrices), and since
        consecutive pairs share an expert its weights are re-read from cache: memory traffic is that of the distinct
        experts, as a grouped GEMM's, without a kernel call per expert (docs/inference.md). Eagerly it would
        materialise the products: only for compiled inference."""
        N, K = idx.shape
        flat, wf = idx.flatten(), w.flatten()
        if N > 1:  # one token's K experts are distinct: nothing to share, and no sort call in the graph
            order = flat.argsort(stable=True)
            flat, wf = flat[order], wf[order]
        else:
            order = torch.arange(K, device=idx.device)
        e, token = flat, order // K  # (N*K,) pairs sorted by expert
        dt = x.dtype
        # large experts' 16-bit activations are read as fp32 copies (`widened`: converted once, not in every
        # output row of each product)
        nbytes = token.shape[0] * self.gate_proj[0].numel() * self.gate_proj.element_size()  # per projection
        xs = widened(x, nbytes)[token]  # (N*K, D)
        g = (self.gate_proj[e].to(dt) * xs[:, None, :]).sum(-1).to(dt)  # (N*K, I)
        u = (self.up_proj[e].to(dt) * xs[:, None, :]).sum(-1).to(dt)
        h = widened(F.silu(g) * u * wf[:, None].to(dt), nbytes)  # gate weight before the down projection (linear)
        y = (self.down_proj[e].to(dt) * h[:, None, :]).sum(-1).to(dt)  # (N*K, D)
        return torch.zeros_like(x).index_add_(0, token, y)

    @staticmethod
    def _padded(xs: torch.Tensor, ws: torch.Tensor, expert: torch.Tensor, counts: torch.Tensor,
                w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor | None:
        """All experts as one zero-padded batch, (E, max count, D), through `bmm`. A CPU grouped GEMM is one small
        matmul per expert; with the few tokens per expert of a decode step (batch 32, top-4 of 32 experts: ~4 rows
        each) their fixed cost dominates: one bmm per projection took 140 us against 244 us for `_grouped_mm`
        (E 32, D 256, I 128). Padding rows are zeros and are never read back, so the result equals the grouped
        path. None below 4 rows per expert on average (batch 16 of `small`: 5% slower; of `wide`: 9% slower) or when
        padding would exceed 3x the real rows (skewed routing): the caller falls back."""
        E = counts.shape[0]
        if xs.shape[0] < 4 * E:  # measured: a win from ~4 rows per expert on average, a loss below (docs/inference.md)
            return None
        cap = int(counts.max())
        if E * cap > 3 * xs.shape[0]:
            return None
        # row of each (sorted) token-expert pair inside its expert's block
        slot = torch.arange(xs.shape[0], device=xs.device) - (counts.cumsum(0) - counts)[expert]
        xp = xs.new_zeros(E, cap, xs.shape[1])
        xp[expert, slot] = xs
        wp = ws.new_zeros(E, cap, 1)
        wp[expert, slot] = ws
        h = F.silu(torch.bmm(xp, w_gate.transpose(1, 2))) * torch.bmm(xp, w_up.transpose(1, 2)) * wp
        return torch.bmm(h, w_down.transpose(1, 2))[expert, slot]

    @staticmethod
    def _grouped(xs: torch.Tensor, ws: torch.Tensor, counts: torch.Tensor, w_gate: torch.Tensor,
                 w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
        """One grouped GEMM per projection over the expert-sorted rows (ws: their gate weights)."""
        offs = counts.cumsum(0).to(torch.int32)
        gmm = torch._grouped_mm
        h = F.silu(gmm(xs, w_gate.transpose(1, 2), offs=offs)) * gmm(xs, w_up.transpose(1, 2), offs=offs) * ws
        return gmm(h, w_down.transpose(1, 2), offs=offs)

    @staticmethod
    def _grouped_ok(xs: torch.Tensor) -> bool:
        # CUDA grouped GEMM wants bf16 (and 16-byte aligned rows); CPU accepts any float dtype
        return xs.device.type == "cpu" or xs.dtype == torch.bfloat16

    @staticmethod
    def _loop(xs: torch.Tensor, ws: torch.Tensor, counts: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
              w_down: torch.Tensor) -> torch.Tensor:
        """Reference path: one matmul per expert that received tokens (no per-token loop)."""
        outs, start = [], 0
        # unbind, not w[e]: indexing a stacked parameter makes each expert's backward write a full (E, out, in)
        # zero gradient (O(E^2) memory traffic)
        gates, ups, downs = w_gate.unbind(0), w_up.unbind(0), w_down.unbind(0)
        for e, n in enumerate(counts.tolist()):
            if n:
                xe = xs[start: start + n]
                outs.append((F.silu(xe @ gates[e].T) * (xe @ ups[e].T) * ws[start: start + n]) @ downs[e].T)
            start += n
        return torch.cat(outs) if outs else xs.new_zeros(0, w_down.shape[1])


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) \
            if cfg.n_shared_experts else None

    def forward(self, x: torch.Tensor, want_balance: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        w, idx, scores = self.gate(flat)
        if self.training:  # expert load of training tokens only: the bias update and MaxVio reporting
            with torch.no_grad():  # (evaluation and sampling forwards are not training tokens)
                load = self.gate.expert_load
                load.scatter_add_(0, idx.flatten(), torch.ones(idx.numel(), dtype=load.dtype, device=load.device))
                # sequence-wise MaxVio: each row's own load (the unit the sequence-wise balance loss, V3 eq. 17,
                # balances); V3 §4.5.3 contrasts balance per sequence with balance per batch
                seq = torch.zeros(B, load.numel(), dtype=load.dtype, device=load.device).scatter_add_(
                    1, idx.view(B, -1), torch.ones(B, idx.numel() // B, dtype=load.dtype, device=load.device))
                vio = seq.amax(dim=-1) / seq.mean(dim=-1) - 1  # (B,): every row routes T*K > 0 assignments
                self.gate.sequence_vio += torch.stack([vio.sum(), vio.new_tensor(float(B))])
        y = self.experts(flat, idx, w).view(B, T, D)  # V3 eq. 12: h' = u + sum shared + sum g_i routed_i
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        balance = self._balance_loss(idx.view(B, T, -1), scores.view(B, T, -1)) if want_balance else None
        return y, balance

    def _balance_loss(self, idx: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Complementary sequence-wise balance loss, V3 eq. 17-20 (unweighted: alpha is applied by the caller)."""
        E, K = self.cfg.n_routed_experts, self.cfg.num_experts_per_tok
        T = idx.shape[1]
        hits = torch.zeros(idx.shape[0], E, device=idx.device).scatter_add_(
            1, idx.flatten(1), torch.ones(idx.shape[0], T * K, device=idx.device))
        f = hits * E / (K * T)  # eq. 18
        p = (scores / scores.sum(-1, keepdim=True)).mean(dim=1)  # eq. 19-20: normalised affinities
        return (f * p).sum(-1).mean()  # eq. 17, averaged over sequences


# ----------------------------------------------------------------------------------------------------------------
# Transformer block, multi-token prediction module, full model


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn: MLA | MHA = MHA(cfg) if cfg.attention == "mha" else MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: MLP | MoE = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                cache: KVCache | None = None, want_balance: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache, self.layer_idx)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            y, balance = self.mlp(h, want_balance)
            return x + y, balance
        return x + self.mlp(h), None


class MTPModule(Block):
    """One multi-token-prediction depth (V3 eq. 21-23): h'_i = M [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)],
    then one transformer block; embedding and output head are shared with the main model.

    The concatenation puts the embedding first (`enorm`, then `hnorm`), as the official weights expect.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward_mtp(self, h_prev: torch.Tensor, emb: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                    mask: torch.Tensor | None, cache: KVCache | None = None,
                    want_balance: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Returns (hidden for the next depth, normed hidden for the shared head, balance loss)."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        x, balance = self.forward(x, rope, mask, cache, want_balance)
        return x, self.shared_head.norm(x), balance


class Transformer(nn.Module):
    """DeepSeek-V3/V2 causal LM. `model(input_ids)` -> logits (B, T, vocab)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Block(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        L = cfg.num_hidden_layers
        self.mtp = nn.ModuleList([MTPModule(cfg, L + k) for k in range(cfg.num_nextn_predict_layers)])
        self.rotary = Rotary(cfg)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Every weight initialised here: N(0, initializer_range) for matrices, ones for norms, zero bias."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if p.device.type == "meta":
                continue
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std)
        for m in self.modules():
            if isinstance(m, Router) and not m.expert_load.is_meta:
                if m.e_score_correction_bias is not None:
                    m.e_score_correction_bias.zero_()
                m.expert_load.zero_()
                m.sequence_vio.zero_()

    # ---- masks and positions -----------------------------------------------------------------------------------
    @staticmethod
    def _mask(T: int, attention_mask: torch.Tensor | None, document_ids: torch.Tensor | None,
              device: torch.device) -> torch.Tensor | None:
        """Bool (B, 1, T, T) mask: causal, within the same document, to non-padding keys. None = plain causal."""
        if attention_mask is None and document_ids is None:
            return None
        ar = torch.arange(T, device=device)
        mask = (ar[None, :] <= ar[:, None])[None]  # (1, T, T)
        if document_ids is not None:
            mask = mask & (document_ids[:, :, None] == document_ids[:, None, :])
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, :]
            mask = mask | torch.eye(T, dtype=torch.bool, device=device)[None]  # padding queries see themselves
        return mask[:, None]

    @staticmethod
    def _positions(T: int, attention_mask: torch.Tensor | None, document_ids: torch.Tensor | None,
                   device: torch.device) -> torch.Tensor:
        if document_ids is not None:  # restart at every document boundary of a packed row
            start = torch.ones_like(document_ids, dtype=torch.bool)
            start[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
            idx = torch.arange(T, device=device).expand_as(document_ids)
            first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
            return idx - first
        if attention_mask is not None:  # left padding: first real token at position 0
            return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        return torch.arange(T, device=device)[None]

    # ---- forward ---------------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
                cache: KVCache | None = None, return_hidden: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """input_ids (B, T) -> logits (B, T, vocab); with return_hidden, (logits, final normed hidden (B, T, D)).

        attention_mask (B, T): 1 for real tokens, 0 for (left) padding. document_ids (B, T): packed rows, tokens
        attend only within their document. cache: a KVCache, filled with these tokens (incremental decoding).
        """
        h, _ = self.trunk(input_ids, position_ids=position_ids, attention_mask=attention_mask,
                          document_ids=document_ids, cache=cache)
        logits = self.lm_head(h)
        return (logits, h) if return_hidden else logits

    def trunk(self, input_ids: torch.Tensor | None, *, position_ids: torch.Tensor | None = None,
              attention_mask: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
              cache: KVCache | None = None, want_balance: bool = False,
              inputs_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Main model without the head: (final normed hidden, summed balance loss or None).

        inputs_embeds (B, T, D) replaces the embedding lookup (Janus: image features and image-token embeddings
        in the sequence); give it or input_ids.
        """
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        device = x.device
        if cache is not None:
            if position_ids is None:
                position_ids = cache.next_positions(attention_mask, T)
            mask = cache.begin(T, attention_mask)
        else:
            if position_ids is None:
                position_ids = self._positions(T, attention_mask, document_ids, device)
            mask = self._mask(T, attention_mask, document_ids, device)
        rope = self.rotary(position_ids.expand(B, T))
        balance = None
        for layer in self.layers:
            x, bal = layer(x, rope, mask, cache, want_balance)
            if bal is not None:
                balance = bal if balance is None else balance + bal
        if cache is not None:
            cache.commit()
        return self.norm(x), balance

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, *, mtp_lambda: float = 0.3,
             balance_alpha: float | None = None, position_ids: torch.Tensor | None = None,
             attention_mask: torch.Tensor | None = None, document_ids: torch.Tensor | None = None
             ) -> dict[str, torch.Tensor]:
        """All training losses from one forward pass.

        targets (B, T) are the next tokens (targets[:, t] = input_ids[:, t+1]), -100 = ignored (prompt, padding).
        MTP depth k predicts targets[:, t+k] from position t (V3 eq. 24-25): loss = main + mtp_lambda / D * sum_k
        L_k + balance_alpha * sum over MoE layers of the sequence-wise balance loss (V3 eq. 17).
        Returns {"loss", "main", "mtp" (mean over depths, unweighted), "balance" (unweighted)}.
        """
        alpha = self.config.aux_loss_alpha if balance_alpha is None else balance_alpha
        want_balance = alpha > 0
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = self._positions(T, attention_mask, document_ids, input_ids.device).expand(B, T)
        h, balance = self.trunk(input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                document_ids=document_ids, want_balance=want_balance)
        main = _ce(self.lm_head(h), targets)
        out = {"main": main}
        total = main
        if self.mtp and mtp_lambda > 0:
            mtp_losses = []
            for k, module in enumerate(self.mtp, start=1):
                if T - k < 1:
                    break
                n = T - k
                am = attention_mask[:, :n] if attention_mask is not None else None
                di = document_ids[:, :n] if document_ids is not None else None
                rope = self.rotary(position_ids[:, :n])
                mask = self._mask(n, am, di, input_ids.device)
                h, hn, bal = module.forward_mtp(h[:, :n], self.embed_tokens(input_ids[:, k:]), rope, mask,
                                                want_balance=want_balance)
                mtp_losses.append(_ce(self.lm_head(hn), targets[:, k:]))
                if bal is not None:
                    balance = bal if balance is None else balance + bal
            if mtp_losses:
                out["mtp"] = torch.stack(mtp_losses).mean()
                total = total + mtp_lambda * out["mtp"]
        if want_balance and balance is not None:
            out["balance"] = balance
            total = total + alpha * balance
        out["loss"] = total
        return out

    def mtp_step(self, k: int, h_prev: torch.Tensor, next_ids: torch.Tensor, position_ids: torch.Tensor,
                 cache: KVCache | None = None, attention_mask: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run MTP depth k (1-based) for speculative drafting: (logits of token i+k+1, hidden for depth k+1)."""
        module = self.mtp[k - 1]
        T = next_ids.shape[1]
        mask = cache.begin(T, attention_mask) if cache is not None else \
            self._mask(T, attention_mask, None, next_ids.device)
        h, hn, _ = module.forward_mtp(h_prev, self.embed_tokens(next_ids), self.rotary(position_ids), mask, cache)
        if cache is not None:
            cache.commit()
        return self.lm_head(hn), h

    # ---- router statistics and the aux-loss-free bias update (V3 eq. 16 and section 2.1.2) -------------------------
    def routers(self) -> list[Router]:
        return [m for m in self.modules() if isinstance(m, Router)]

    @torch.no_grad()
    def expert_load(self, sync: bool = True) -> torch.Tensor:
        """(n_moe_layers, E) tokens routed per expert since the last update, summed over data-parallel ranks."""
        routers = self.routers()
        if not routers:
            return torch.zeros(0, 0)
        load = torch.stack([r.expert_load for r in routers])
        if sync and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)
        return load

    @staticmethod
    def max_violation(load: torch.Tensor) -> torch.Tensor:
        """MaxVio per layer (Wang et al. 2024, used in the V3 report): max_i load_i / mean load - 1."""
        mean = load.mean(dim=-1)
        return torch.where(mean > 0, load.amax(dim=-1) / mean.clamp(min=1e-9) - 1, torch.zeros_like(mean))

    @torch.no_grad()
    def sequence_max_violation(self, sync: bool = True) -> torch.Tensor:
        """(n_moe_layers,) sequence-wise MaxVio since the last bias update: each training sequence's (batch row's)
        max expert load / its mean load - 1, averaged over the sequences (all data-parallel ranks'). Batch-wise
        MaxVio (update_router_bias) asks whether a whole batch is balanced; this asks it of every sequence, which
        the sequence-wise balance loss enforces and the aux-loss-free bias does not (V3 report §4.5.3). 0 for a
        layer that saw no training sequence."""
        routers = self.routers()
        if not routers:
            return torch.zeros(0)
        acc = torch.stack([r.sequence_vio for r in routers])  # (layers, 2): sum of MaxVio, sequences
        if sync and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(acc)
        return torch.where(acc[:, 1] > 0, acc[:, 0] / acc[:, 1].clamp(min=1), torch.zeros_like(acc[:, 0]))

    @torch.no_grad()
    def update_router_bias(self, gamma: float, sync: bool = True) -> torch.Tensor:
        """b_i += gamma * sign(mean load - load_i) per MoE layer, then reset the counters (loads and the
        sequence-wise MaxVio). Returns MaxVio per layer.

        Call once per optimizer step on every rank: loads are all-reduced so all replicas keep identical biases.
        """
        load = self.expert_load(sync)
        if load.numel() == 0:
            return load
        for r, l in zip(self.routers(), load):
            if r.e_score_correction_bias is not None and gamma > 0 and l.sum() > 0:
                r.e_score_correction_bias += gamma * torch.sign(l.mean() - l)
            r.expert_load.zero_()
            r.sequence_vio.zero_()
        return self.max_violation(load)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """All parameters, MTP modules included (nanoseek.accounting has the per-component/activated counts)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed_tokens.weight.numel() if exclude_embeddings else n


def _ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def build(cfg: ModelConfig | str, device: torch.device | str | None = None,
          dtype: torch.dtype | None = None) -> Transformer:
    """Build a model from a config or preset name. device='meta' gives a shape-only model (accounting); None builds
    on torch's current default device (the CPU unless torch.set_default_device says otherwise)."""
    if isinstance(cfg, str):
        cfg = ModelConfig.from_preset(cfg)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = Transformer(cfg)
    return model.to(dtype) if dtype is not None else model
