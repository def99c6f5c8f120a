"""Janus-Pro (arXiv 2501.17811; Janus: arXiv 2410.13848) around nanoseek's one trunk, read top to bottom.

Decoupled visual encoding (Janus section 3.1): understanding and generation see images through different encoders,
one autoregressive LLM (DeepSeek-LLM: `ModelConfig(attention="mha")`, or any nanoseek trunk) in the middle.

    understanding                                  generation
    pixels (3, 384, 384)                           text prompt ... <begin_of_image>
      | SigLIP-L ViT: 16x16 patches -> 576 x 1024    | VQ tokens t_0 .. t_{j-1}  (LlamaGen VQ-16, codebook 16,384)
      | aligner: Linear-GELU-Linear -> 576 x D       | generation_embeddings (16,384 x 8, own table, not the codebook)
      v                                              | generation_aligner: Linear-GELU-Linear -> D
    features replace the 576 <image_placeholder>     v
    tokens of the prompt                          [prompt embeddings ; image-token embeddings]
                 \\______________  LLM trunk (MHA + RoPE + SwiGLU + RMSNorm) ______________/
                 lm_head -> next text token          generation_head: Linear-GELU-Linear -> next image token
                                                     (576 tokens, classifier-free guidance) -> VQ decoder -> pixels

ConfigS -> SigLIP ViT -> aligner MLP -> VQ model (encoder, quantizer, decoder) -> generation head -> Janus (the model)
-> classifier-free guidance sampling. The math only, like model.py: module names follow transformers' checkpoint keys,
so that layout maps 1:1; the config.json and checkpoint layouts (transformers' JanusForConditionalGeneration and
DeepSeek's MultiModalityCausalLM), files, images and the CLI live in nanoseek/imagine.py. Where DeepSeek's code and
transformers differ, it is said where it matters (docs/janus.md): VQ *encoding* follows DeepSeek (cosine nearest
code, as LlamaGen trained it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .model import ModelConfig, Transformer

# ----------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class VisionConfig:
    """The understanding encoder (SigLIP-Large/16 at 384 px) and its aligner; transformers' JanusVisionConfig."""

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 384
    patch_size: int = 16
    layer_norm_eps: float = 1e-6
    mlp_ratio: float = 4.0
    attention_bias: bool = True
    projection_dim: int = 2048  # aligner output = the LLM width
    depth: int = 2  # aligner: Linear, then (GELU, Linear) x (depth - 1)
    num_image_tokens: int = 576

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class VQConfig:
    """LlamaGen's VQ-16 tokenizer plus the generation aligner and head; transformers' JanusVQVAEConfig."""

    embed_dim: int = 8  # code width
    num_embeddings: int = 16384  # codebook size = image vocabulary
    latent_channels: int = 256
    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_multiplier: tuple[int, ...] = (1, 1, 2, 2, 4)  # 4 downsamplings: 16x
    num_res_blocks: int = 2
    projection_dim: int = 2048  # generation aligner output = the LLM width
    num_hidden_layers: int = 2  # generation aligner depth
    image_token_embed_dim: int = 2048  # generation head input = the LLM width

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_multiplier) - 1)


@dataclass
class JanusConfig:
    """The whole model; its config.json forms (transformers' and DeepSeek's) are read and written by
    nanoseek.imagine (janus_config_from_hf, janus_config_to_hf, janus_config_from_original)."""

    text: ModelConfig = field(default_factory=lambda: ModelConfig.from_preset("janus-pro-1b-llm"))
    vision: VisionConfig = field(default_factory=VisionConfig)
    vq: VQConfig = field(default_factory=VQConfig)
    # token ids of the DeepSeek-LLM tokenizer as Janus extends it (checkpoints carry their own: config.json,
    # generation_config.json, tokenizer files)
    image_token_id: int = 100581  # <image_placeholder> (transformers' JanusConfig default)
    boi_token_id: int = 100016  # <begin_of_image>
    eoi_token_id: int = 100593  # <end_of_image>
    pad_token_id: int = 100015  # <｜▁pad▁｜>: the unconditional rows of classifier-free guidance

    def __post_init__(self) -> None:
        self.vq.channel_multiplier = tuple(self.vq.channel_multiplier)
        v, q, D = self.vision, self.vq, self.text.hidden_size
        errors = []
        if v.image_size % v.patch_size:
            errors.append(f"image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
        # the understanding features fill exactly the <image_placeholder> run of the prompt (one per patch)
        if v.num_image_tokens != v.grid ** 2:
            errors.append(f"num_image_tokens ({v.num_image_tokens}) must equal the ViT patch grid "
                          f"({v.grid}x{v.grid} = {v.grid ** 2})")
        # the same 384 px image is 24x24 ViT patches and 24x24 VQ tokens: one image-token count for both paths
        if v.image_size // q.downsample != v.grid:
            errors.append(f"the ViT patch grid ({v.grid}) must equal the VQ token grid (image_size / "
                          f"{q.downsample} = {v.image_size // q.downsample})")
        for name, width in (("vision projection_dim", v.projection_dim), ("vq projection_dim", q.projection_dim),
                            ("vq image_token_embed_dim", q.image_token_embed_dim)):
            if width != D:
                errors.append(f"{name} ({width}) must equal the LLM hidden_size ({D})")
        if v.hidden_size % v.num_attention_heads:
            errors.append(f"vision hidden_size {v.hidden_size} is not divisible by {v.num_attention_heads} heads")
        if any(q.base_channels * m % 32 for m in q.channel_multiplier):
            errors.append("VQ channels (base_channels x multiplier) must be multiples of 32 (GroupNorm(32))")
        if errors:
            raise ValueError("invalid JanusConfig: " + "; ".join(errors))

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_image_tokens


def _tiny_text() -> ModelConfig:
    return ModelConfig.from_preset("tiny-dense", vocab_size=160, hidden_size=64, bos_token_id=1, eos_token_id=2,
                                   pad_token_id=3)


def _mini_text() -> ModelConfig:
    """The mini Janus' LLM: nanoseek's DeepSeek-V3 block (MLA + DeepSeekMoE with a shared expert, sigmoid routing
    with the aux-loss-free bias) at the demo base's widths (docs/demo.md). No MTP module: transformers' Janus builds
    a DeepseekV3Model, which has none (tests/test_janus.py::test_parity_with_a_deepseek_v3_trunk). Untied head, as
    Janus-Pro. The special-token ids are the world tokenizer's (nanoseek.janus_train.world_tokenizer)."""
    return ModelConfig.from_preset(
        "tiny", vocab_size=512, hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
        num_hidden_layers=4, num_attention_heads=4, q_lora_rank=96, kv_lora_rank=64, n_routed_experts=8,
        num_experts_per_tok=2, n_group=4, topk_group=2, num_nextn_predict_layers=0, max_position_embeddings=256,
        rope_scaling=None, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=2)


def _mini() -> JanusConfig:
    # 32 x 32 images of the shapes world (nanoseek.shapes): an 8 x 8 grid for both paths, as transformers' Janus
    # requires (ViT patches of 4 px; a VQ with 2 downsamplings, `nanoseek janus train-vq`, whose own config wins)
    text = _mini_text()
    D = text.hidden_size
    return JanusConfig(
        text=text,
        vision=VisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=4,
                            projection_dim=D, num_image_tokens=64),
        vq=VQConfig(embed_dim=8, num_embeddings=512, latent_channels=64, base_channels=32,
                    channel_multiplier=(1, 1, 2), num_res_blocks=1, projection_dim=D, image_token_embed_dim=D),
        image_token_id=509, boi_token_id=510, eoi_token_id=511, pad_token_id=2)


JANUS_PRESETS: dict[str, Callable[[], JanusConfig]] = {
    # the mini Janus trained from scratch on a CPU (`nanoseek janus train`, docs/janus.md "Mini Janus")
    "janus-mini": _mini,
    # for tests: 16x16 images, 4x4 patches of 4 px, a VQ with 2 downsamplings, 16 image tokens
    "janus-tiny": lambda: JanusConfig(
        text=_tiny_text(),
        vision=VisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4,
                            projection_dim=64, num_image_tokens=16),
        vq=VQConfig(embed_dim=8, num_embeddings=48, latent_channels=32, base_channels=32,
                    channel_multiplier=(1, 1, 2), num_res_blocks=1, projection_dim=64, image_token_embed_dim=64),
        image_token_id=150, boi_token_id=151, eoi_token_id=152, pad_token_id=3),
    # deepseek-ai/Janus-Pro-1B and -7B: SigLIP-L/16 at 384 px, VQ-16, DeepSeek-LLM trunks (model.PRESETS)
    "janus-pro-1b": lambda: JanusConfig(text=ModelConfig.from_preset("janus-pro-1b-llm")),
    "janus-pro-7b": lambda: JanusConfig(
        text=ModelConfig.from_preset("janus-pro-7b-llm"), vision=VisionConfig(projection_dim=4096),
        vq=VQConfig(projection_dim=4096, image_token_embed_dim=4096)),
}


def janus_preset(name: str, **text_overrides: Any) -> JanusConfig:
    if name not in JANUS_PRESETS:
        raise ValueError(f"unknown Janus preset {name!r}; available: {', '.join(JANUS_PRESETS)}")
    cfg = JANUS_PRESETS[name]()
    if not text_overrides:
        return cfg
    text = replace(cfg.text, **text_overrides)
    D = text.hidden_size  # the aligners' outputs and the generation head's input follow the LLM's width
    return replace(cfg, text=text, vision=replace(cfg.vision, projection_dim=D),
                   vq=replace(cfg.vq, projection_dim=D, image_token_embed_dim=D))


# ----------------------------------------------------------------------------------------------------------------
# Understanding encoder: SigLIP ViT (pre-norm, learned positions, no class token, final LayerNorm) + aligner


class VisionEmbeddings(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(v.num_channels, v.hidden_size, v.patch_size, stride=v.patch_size)
        self.position_embedding = nn.Embedding(v.grid ** 2, v.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)  # (B, N, C)
        return x + self.position_embedding.weight


class VisionAttention(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        d, self.heads = v.hidden_size, v.num_attention_heads
        self.q_proj = nn.Linear(d, d, bias=v.attention_bias)
        self.k_proj = nn.Linear(d, d, bias=v.attention_bias)
        self.v_proj = nn.Linear(d, d, bias=v.attention_bias)
        self.projection_layer = nn.Linear(d, d)  # timm's `attn.proj`, always with a bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = (p(x).view(B, N, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.projection_layer(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


class VisionLayer(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)
        self.self_attn = VisionAttention(v)
        self.layer_norm2 = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(v.hidden_size, int(v.hidden_size * v.mlp_ratio))
        self.mlp.fc2 = nn.Linear(int(v.hidden_size * v.mlp_ratio), v.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.layer_norm2(x))))


class VisionModel(nn.Module):
    """pixels (B, 3, S, S) -> patch features (B, grid^2, hidden). DeepSeek keeps every block (select_layer -1)
    and the final norm; the checkpoint's attention-pooling head (timm `attn_pool`) is never used."""

    def __init__(self, v: VisionConfig):
        super().__init__()
        self.config = v
        self.embeddings = VisionEmbeddings(v)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([VisionLayer(v) for _ in range(v.num_hidden_layers)])
        self.post_layernorm = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        S = self.config.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (self.config.num_channels, S, S):
            raise ValueError(f"pixel_values must be (B, {self.config.num_channels}, {S}, {S}), "
                             f"got {tuple(pixels.shape)} (preprocess images with nanoseek.imagine.preprocess)")
        x = self.embeddings(pixels)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


class AlignerMLP(nn.Module):
    """Linear, then (GELU, Linear) x (depth - 1): DeepSeek's MlpProjector "mlp_gelu" (both aligners)."""

    def __init__(self, d_in: int, d_out: int, depth: int):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_out)
        self.hidden_layers = nn.ModuleList([nn.Linear(d_out, d_out) for _ in range(depth - 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        for layer in self.hidden_layers:
            x = layer(F.gelu(x))
        return x


# ----------------------------------------------------------------------------------------------------------------
# Generation tokenizer: LlamaGen VQ-16 (Sun et al. 2024, arXiv 2406.06525): a conv encoder/decoder (ResNet blocks,
# self-attention at the lowest resolution) around an l2-normalised 8-dim codebook


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, 1x1 convolutions for q, k, v and the output."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))  # (B, HW, C)
        o = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj_out(o.transpose(1, 2).reshape(B, C, H, W))


class MidBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def _level(blocks: list[nn.Module], attn: list[nn.Module]) -> nn.Module:
    m = nn.Module()
    m.block, m.attn = nn.ModuleList(blocks), nn.ModuleList(attn)
    return m


class VQEncoder(nn.Module):
    def __init__(self, q: VQConfig):
        super().__init__()
        ch, mult = q.base_channels, q.channel_multiplier
        self.conv_in = nn.Conv2d(q.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        c = ch
        for i, m in enumerate(mult):
            blocks, attn = [], []
            for _ in range(q.num_res_blocks):
                blocks.append(ResnetBlock(c, ch * m))
                c = ch * m
                if i == len(mult) - 1:
                    attn.append(AttnBlock(c))
            level = _level(blocks, attn)
            if i != len(mult) - 1:
                level.downsample = nn.Module()
                level.downsample.conv = nn.Conv2d(c, c, 3, stride=2)
            self.down.append(level)
        self.mid = MidBlock(c)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, q.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "downsample"):
                h = level.downsample.conv(F.pad(h, (0, 1, 0, 1)))  # asymmetric padding, as LlamaGen
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class VQDecoder(nn.Module):
    def __init__(self, q: VQConfig):
        super().__init__()
        ch, mult = q.base_channels, q.channel_multiplier
        c = ch * mult[-1]
        self.conv_in = nn.Conv2d(q.latent_channels, c, 3, padding=1)
        self.mid = MidBlock(c)
        self.up = nn.ModuleList()
        for i in reversed(range(len(mult))):  # up[0] is the lowest resolution
            blocks, attn = [], []
            for _ in range(q.num_res_blocks + 1):
                blocks.append(ResnetBlock(c, ch * mult[i]))
                c = ch * mult[i]
                if i == len(mult) - 1:
                    attn.append(AttnBlock(c))
            level = _level(blocks, attn)
            if i != 0:
                level.upsample = nn.Module()
                level.upsample.conv = nn.Conv2d(c, c, 3, padding=1)
            self.up.append(level)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, q.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in self.up:
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "upsample"):
                h = level.upsample.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


class VQModel(nn.Module):
    def __init__(self, q: VQConfig, grid: int):
        super().__init__()
        self.config, self.grid = q, grid
        self.encoder = VQEncoder(q)
        self.quant_conv = nn.Conv2d(q.latent_channels, q.embed_dim, 1)
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(q.num_embeddings, q.embed_dim)
        self.post_quant_conv = nn.Conv2d(q.embed_dim, q.latent_channels, 1)
        self.decoder = VQDecoder(q)

    def codebook(self) -> torch.Tensor:
        return F.normalize(self.quantize.embedding.weight, dim=-1)  # codebook_l2_norm: codes live on the sphere

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W) in [-1, 1] -> token ids (B, h*w), row-major.

        Nearest code by cosine (l2-normalised latent and codebook), as DeepSeek's vq_model.py and LlamaGen's
        training; transformers' JanusVQVAE.encode compares raw vectors, which agrees only for unit-norm codes."""
        z = F.normalize(self.quant_conv(self.encoder(pixels)).permute(0, 2, 3, 1), dim=-1)  # (B, h, w, C)
        return (z.flatten(1, 2) @ self.codebook().T.to(z.dtype)).argmax(-1)

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The training pass (LlamaGen's VQModel.forward with codebook_l2_norm): pixels (B, 3, H, W) in [-1, 1] ->
        reconstruction, token ids (as `encode`), the l2-normalised latents z (B*h*w, C, detached: dead codes
        restart from them) and the two VQ losses of VQ-VAE (van den Oord et al. 2017, eq. 3): the codebook loss
        ||sg[z] - e||^2 moves codes to the latents, the commitment loss ||z - sg[e]||^2 (weighted by the caller's
        beta) keeps the encoder near its codes. The straight-through estimator copies the decoder's gradient from
        the quantised latent to z."""
        z = F.normalize(self.quant_conv(self.encoder(pixels)), dim=1)  # (B, C, h, w), on the sphere
        B, C, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, C)  # (B*h*w, C)
        ids = (flat.detach() @ self.codebook().T.to(flat.dtype)).argmax(-1)  # cosine nearest, as encode()
        zq = self.codebook()[ids].to(flat.dtype)
        codebook_loss = F.mse_loss(zq, flat.detach())
        commitment_loss = F.mse_loss(flat, zq.detach())
        zq = flat + (zq - flat).detach()  # straight-through: forward value e, gradient of z
        zq = zq.view(B, h, w, C).permute(0, 3, 1, 2)
        recon = self.decoder(self.post_quant_conv(zq.to(self.post_quant_conv.weight.dtype)))
        return {"recon": recon, "ids": ids.view(B, h * w), "z": flat.detach(), "codebook_loss": codebook_loss,
                "commitment_loss": commitment_loss}

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """token ids (B, grid^2) -> pixels (B, 3, H, W), the decoder's raw output (about [-1, 1])."""
        if ids.dim() != 2 or ids.shape[1] != self.grid ** 2:
            raise ValueError(f"image token ids must be (B, {self.grid ** 2}), got {tuple(ids.shape)}")
        if int(ids.min()) < 0 or int(ids.max()) >= self.config.num_embeddings:
            raise ValueError(f"image token ids must be in [0, {self.config.num_embeddings})")
        z = self.codebook()[ids].view(ids.shape[0], self.grid, self.grid, -1).permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(z.to(self.post_quant_conv.weight.dtype)))


class GenerationHead(nn.Module):
    """LLM hidden -> image-token logits over the codebook (DeepSeek's `vision_head`): Linear, GELU, Linear."""

    def __init__(self, q: VQConfig):
        super().__init__()
        self.proj_out = nn.Linear(q.image_token_embed_dim, q.projection_dim)
        self.vision_head = nn.Linear(q.projection_dim, q.num_embeddings)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.vision_head(F.gelu(self.proj_out(h)))


# ----------------------------------------------------------------------------------------------------------------
# The model


class Janus(nn.Module):
    """Janus-Pro: `model(input_ids, pixel_values)` -> text logits; `image_logits(prompt_ids, image_ids)` -> image
    logits; `encode_image` / `decode_image` through the VQ tokenizer. The LLM is a nanoseek Transformer."""

    def __init__(self, cfg: JanusConfig):
        super().__init__()
        self.config = cfg
        v, q = cfg.vision, cfg.vq
        self.vision_model = VisionModel(v)
        self.aligner = AlignerMLP(v.hidden_size, v.projection_dim, v.depth)
        self.vqmodel = VQModel(q, v.grid)
        # generation inputs have their own embedding table (16,384 x 8), not the VQ codebook (Janus section 3.1)
        self.generation_embeddings = nn.Embedding(q.num_embeddings, q.embed_dim)
        self.generation_aligner = AlignerMLP(q.embed_dim, q.projection_dim, q.num_hidden_layers)
        self.generation_head = GenerationHead(q)
        self.language_model = Transformer(cfg.text)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Matrices and convolutions N(0, 0.02), norms one, biases zero (the trunk keeps its own init)."""
        for name, p in self.named_parameters():
            if name.startswith("language_model.") or p.device.type == "meta":
                continue
            if "norm" in name.rsplit(".", 2)[-2] and name.endswith(".weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)

    # ---- understanding -------------------------------------------------------------------------------------------
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n_images, 3, S, S) or (B, n, 3, S, S) -> aligned features (n_images, num_image_tokens, D)."""
        if pixel_values.dim() == 5:
            pixel_values = pixel_values.flatten(0, 1)
        return self.aligner(self.vision_model(pixel_values))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with image features written over the <image_placeholder> positions, in order."""
        x = self.language_model.embed_tokens(input_ids)
        is_image = input_ids == self.config.image_token_id
        n = int(is_image.sum())
        if pixel_values is None:
            if n:
                raise ValueError(f"input_ids hold {n} image tokens but no pixel_values were given")
            return x
        feats = self.image_features(pixel_values)
        if n != feats.shape[0] * feats.shape[1]:
            raise ValueError(f"input_ids hold {n} image tokens (id {self.config.image_token_id}) but the "
                             f"{feats.shape[0]} image(s) give {feats.shape[0] * feats.shape[1]} features "
                             f"({feats.shape[1]} per image)")
        return x.masked_scatter(is_image[..., None], feats.to(x.dtype))

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T), pixel_values (n_images, 3, S, S) -> text logits (B, T, vocab)."""
        h, _ = self.language_model.trunk(None, inputs_embeds=self.embed(input_ids, pixel_values),
                                         attention_mask=attention_mask)
        return self.language_model.lm_head(h)

    # ---- generation ----------------------------------------------------------------------------------------------
    def embed_image_tokens(self, image_ids: torch.Tensor) -> torch.Tensor:
        return self.generation_aligner(self.generation_embeddings(image_ids))

    def image_logits(self, prompt_ids: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced image-token logits (B, N, codebook): prompt_ids (B, T) end with <begin_of_image>; row j
        predicts image token j from the prompt and image tokens < j."""
        lm = self.language_model
        x = torch.cat([lm.embed_tokens(prompt_ids), self.embed_image_tokens(image_ids[:, :-1])], dim=1)
        h, _ = lm.trunk(None, inputs_embeds=x)
        return self.generation_head(h[:, prompt_ids.shape[1] - 1:])

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, S, S), normalised to [-1, 1] -> image token ids (B, grid^2)."""
        return self.vqmodel.encode(pixels.to(self.vqmodel.quant_conv.weight.dtype))

    def decode_image(self, image_ids: torch.Tensor) -> torch.Tensor:
        """image token ids (B, grid^2) -> pixels (B, 3, S, S): the VQ decoder's raw output, as transformers'
        `vqmodel.decode` (imagine.to_pil turns it into images)."""
        return self.vqmodel.decode(image_ids)


# ----------------------------------------------------------------------------------------------------------------
# Image generation with classifier-free guidance (Janus section 3.2; DeepSeek's generation_inference.py)


def unconditional_prompt(prompt: Sequence[int], pad_id: int) -> list[int]:
    """DeepSeek's unconditional row of a prompt: its first token (BOS) and last (<begin_of_image>) kept, every token
    in between the pad id. Sampling's unconditional rows (guidance_rows) and training's CFG dropout
    (nanoseek.janus_train) are both this."""
    return [prompt[0], *([pad_id] * (len(prompt) - 2)), prompt[-1]]


def guidance_rows(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditional rows (the prompts) then unconditional rows, left-padded: ids (2B, T), attention mask (2B, T).

    DeepSeek's rule for the unconditional row: keep the prompt's first token (BOS) and last (<begin_of_image>),
    replace every token in between with the pad id. transformers instead keeps every BOS and <begin_of_image>
    wherever it sits and pads the rest; the two agree on a prompt with one BOS first and one BOI last."""
    if not prompts or any(len(p) < 2 for p in prompts):
        raise ValueError("every prompt needs at least two tokens (BOS ... <begin_of_image>)")
    B, T = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((2 * B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(2 * B, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        n = len(p)
        ids[i, T - n:] = torch.tensor(list(p))
        ids[B + i, T - n:] = torch.tensor(unconditional_prompt(p, pad_id))
        mask[i, T - n:] = mask[B + i, T - n:] = 1
    return ids, mask


def guided_next_tokens(logits: torch.Tensor, B: int, cfg_weight: float, temperature: float,
                 generator: torch.Generator) -> torch.Tensor:
    cond, uncond = logits[:B].float(), logits[B:].float()
    x = uncond + cfg_weight * (cond - uncond)  # Janus eq. for CFG: l_g = l_u + s (l_c - l_u)
    if temperature < 1e-5:
        return x.argmax(-1)
    return torch.multinomial(torch.softmax(x / temperature, dim=-1), 1, generator=generator)[:, 0]


def check_guidance(cfg_weight: float, temperature: float) -> None:
    if not cfg_weight >= 1 or math.isinf(cfg_weight):
        raise ValueError(f"the guidance weight (--cfg) must be >= 1 (1 = no guidance), got {cfg_weight}")
    if not temperature >= 0 or math.isinf(temperature):
        raise ValueError(f"temperature must be >= 0, got {temperature}")


@torch.inference_mode()
def generate_image_tokens_reference(model: Janus, prompts: Sequence[Sequence[int]], *, cfg_weight: float = 5.0,
                                    temperature: float = 1.0, seed: int = 0, num_tokens: int | None = None
                                    ) -> torch.Tensor:
    """The slow reference of generate_image_tokens: every step re-runs the whole sequence, no cache."""
    cfg, lm = model.config, model.language_model
    N = num_tokens or cfg.num_image_tokens
    param = next(model.parameters())
    ids, mask = (t.to(param.device) for t in guidance_rows(prompts, cfg.pad_token_id))
    B = len(prompts)
    g = torch.Generator(param.device).manual_seed(seed)
    x = lm.embed_tokens(ids)
    out = torch.zeros(B, N, dtype=torch.long, device=param.device)
    for i in range(N):
        h, _ = lm.trunk(None, inputs_embeds=x, attention_mask=None if bool(mask.all()) else mask)
        out[:, i] = tok = guided_next_tokens(model.generation_head(h[:, -1]), B, cfg_weight, temperature, g)
        x = torch.cat([x, model.embed_image_tokens(tok.repeat(2))[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return out
