"""Tiny models that reproduce the mechanisms of the reports in ``cases.py`` (hidden size <= 64).

Each builder returns ``(model, inputs)`` and seeds everything it draws. The reports' code is not copied:
each class reproduces one mechanism, switched between the buggy and the fixed version by its arguments.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
DIM, HEADS, SEQ = 16, 2, 8
# bitsandbytes' CPU kernels pack 4-bit weights in blocks of up to 64 output features where the CPU has
# AVX512-BF16 (``N % block_n == 0``, an AMD EPYC among CI's machines): a width every x86 CPU accepts.
BNB_DIM = 64


def randn(*shape: int, dtype: torch.dtype = F32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def tokens(seq: int = SEQ, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(0))


def split_heads(x: torch.Tensor) -> torch.Tensor:
    return x.view(x.shape[0], x.shape[1], HEADS, -1).transpose(1, 2)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


def rope_angles(positions: torch.Tensor, dim: int, dtype: torch.dtype = F32) -> torch.Tensor:
    """The (positions, dim) rotary angles, computed in ``dtype``."""
    inv_freq = (1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=F32) / dim)).to(dtype)
    freqs = positions.to(dtype)[:, None] * inv_freq[None]
    return torch.cat([freqs, freqs], -1)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cast_probs: bool = True) -> torch.Tensor:
    probs = torch.softmax((q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1]), -1)
    return (probs.to(v.dtype) if cast_probs else probs) @ v


# Mechanism 1: checks made before any aten op -----------------------------------------------------------


class SdpaAttention(nn.Module):
    """q/k/v projections (each in its own dtype) into ``F.scaled_dot_product_attention``; ``align`` casts
    q/k/v and the mask to the key's dtype first (the fix)."""

    def __init__(self, q_dtype: torch.dtype, kv_dtype: torch.dtype, align: bool = False,
                 backends: list[SDPBackend] | None = None) -> None:
        super().__init__()
        self.q_proj = nn.Linear(DIM, DIM).to(q_dtype)
        self.k_proj = nn.Linear(DIM, DIM).to(kv_dtype)
        self.v_proj = nn.Linear(DIM, DIM).to(kv_dtype)
        self.align = align
        self.backends = backends  # the SDPA kernels the code enables (``sdpa_kernel``), None: torch's choice

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        q = split_heads(self.q_proj(x.to(self.q_proj.weight.dtype)))
        k, v = (split_heads(proj(x.to(proj.weight.dtype))) for proj in (self.k_proj, self.v_proj))
        if self.align:
            q = q.to(k.dtype)
            attn_bias = None if attn_bias is None else attn_bias.to(k.dtype)
        with sdpa_kernel(self.backends) if self.backends else contextlib.nullcontext():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)


class AttentionBlock(nn.Module):
    def __init__(self, **kwargs) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = SdpaAttention(**kwargs).eval()

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.attn(x, attn_bias)


def sdpa_mixed_qkv(align: bool = False):
    """q projection left in float32 next to a float16 key/value."""
    return AttentionBlock(q_dtype=F32, kv_dtype=F16, align=align).eval(), (randn(1, SEQ, DIM, dtype=F16),)


def sdpa_float_mask(align: bool = False, backends: list[SDPBackend] | None = None):
    """A float32 additive attention bias next to a bfloat16 query."""
    bias = torch.zeros(1, HEADS, SEQ, SEQ).masked_fill(torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1), -1e4)
    block = AttentionBlock(q_dtype=BF16, kv_dtype=BF16, align=align, backends=backends)
    return block.eval(), (randn(1, SEQ, DIM, dtype=BF16), bias)


class ConvHead(nn.Module):
    """A convolution whose weight and bias dtypes may differ from its input; ``align`` casts the input (and
    the bias) to the weight's dtype (the fix)."""

    def __init__(self, weight_dtype: torch.dtype, bias_dtype: torch.dtype, align: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3).to(weight_dtype)
        self.conv.bias.data = self.conv.bias.data.to(bias_dtype)
        self.align = align

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.align:
            return self.conv(x)  # the module call, as in the reports: the failure is located in ``conv``
        weight, bias = self.conv.weight, self.conv.bias
        return F.conv2d(x.to(weight.dtype), weight, bias.to(weight.dtype))


def conv_input(input_dtype: torch.dtype, weight_dtype: torch.dtype, bias_dtype: torch.dtype, align: bool = False):
    return ConvHead(weight_dtype, bias_dtype, align).eval(), (randn(1, 3, 8, 8, dtype=input_dtype),)


# Mechanism 2: tables derived from buffers, positions and masks -----------------------------------------------


class CachedRotary(nn.Module):
    """A float32 cos/sin table (``buffer``) indexed by positions, vLLM and GPT-J style; ``cast`` casts the
    gathered rows to the query dtype (vLLM's ``_match_cos_sin_cache_dtype``)."""

    def __init__(self, buffer: str, cast: bool, max_positions: int = 64) -> None:
        super().__init__()
        head_dim = DIM // HEADS
        angles = rope_angles(torch.arange(max_positions), head_dim)[:, : head_dim // 2]
        self.register_buffer(buffer, torch.cat([angles.cos(), angles.sin()], -1), persistent=False)
        self.buffer, self.cast = buffer, cast

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos_sin = getattr(self, self.buffer)[positions]
        if self.cast:
            cos_sin = cos_sin.to(q.dtype)
        cos, sin = (torch.cat([half, half], -1)[:, None] for half in cos_sin.chunk(2, -1))
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class ForwardRotary(nn.Module):
    """RoPE built in forward from ``arange`` and a float32 ``inv_freq``; ``cast`` casts cos/sin to the
    activation dtype (transformers' fix)."""

    def __init__(self, cast: bool) -> None:
        super().__init__()
        head_dim = DIM // HEADS
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=F32) / head_dim), persistent=False)
        self.cast = cast

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[0].float()[:, None] * self.inv_freq[None]
        emb = torch.cat([freqs, freqs], -1)
        cos, sin = emb.cos(), emb.sin()
        if self.cast:
            cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class RotaryAttention(nn.Module):
    """Half-precision q/k/v, a rotary module on q/k, eager attention; ``key_cache`` stores the keys in a
    KV cache of the model's dtype (vLLM's paged cache, transformers' static cache) before attention."""

    def __init__(self, rotary: nn.Module, dtype: torch.dtype = F16, key_cache: bool = False) -> None:
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM).to(dtype)
        self.rotary_emb = rotary
        self.key_cache = key_cache

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(t) for t in self.qkv(x).chunk(3, -1))
        q, k = self.rotary_emb(positions, q, k)
        if self.key_cache:
            k = k.to(v.dtype)
        return eager_attention(q, k, v)


class Decoder(nn.Module):
    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.self_attn = attn

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.self_attn(x, positions)


def rotary_decoder(rotary: nn.Module, dtype: torch.dtype = F16, key_cache: bool = False):
    torch.manual_seed(0)
    model = Decoder(RotaryAttention(rotary, dtype, key_cache)).eval()
    return model, (randn(1, SEQ, DIM, dtype=dtype), torch.arange(SEQ)[None])


def cached_rotary(buffer: str, cast: bool):
    return rotary_decoder(CachedRotary(buffer, cast), key_cache=True)


def forward_rotary(cast: bool):
    return rotary_decoder(ForwardRotary(cast))


class PaddingMaskAttention(nn.Module):
    """float16 scores plus an additive mask built from ``attention_mask`` and ``finfo(mask_dtype).min``."""

    def __init__(self, mask_dtype: torch.dtype | None) -> None:
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM).half()
        self.mask_dtype = mask_dtype  # None: the scores' dtype (the fix)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(t) for t in self.qkv(x).chunk(3, -1))
        scores = q @ k.transpose(-1, -2)
        dtype = self.mask_dtype or scores.dtype
        bias = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
        probs = torch.softmax((scores + bias).float(), -1).to(v.dtype)
        return probs @ v


class Encoder(nn.Module):
    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.attn(x, attention_mask)


def padding_mask(mask_dtype: torch.dtype | None):
    torch.manual_seed(0)
    attention_mask = torch.ones(1, SEQ, dtype=torch.long)
    attention_mask[0, :2] = 0
    return Encoder(PaddingMaskAttention(mask_dtype)).eval(), (randn(1, SEQ, DIM, dtype=F16), attention_mask)


class RelativePositionAttention(nn.Module):
    """timm ConViT's gated positional attention: the ``rel_indices`` buffer is rebuilt in forward from
    ``arange`` (float32, whatever the model's dtype) for a new sequence length and goes through a half
    ``pos_proj``; ``cast`` casts it to the input dtype first."""

    def __init__(self, cast: bool) -> None:
        super().__init__()
        self.pos_proj = nn.Linear(3, HEADS).half()
        self.register_buffer("rel_indices", torch.zeros(1, 1, 1, 3), persistent=False)
        self.cast = cast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        if self.rel_indices.shape[1] != n:
            offsets = (torch.arange(n)[None] - torch.arange(n)[:, None]).float()
            self.rel_indices = torch.stack([offsets, offsets**2, torch.zeros_like(offsets)], -1)[None]
        pos_score = self.rel_indices.expand(x.shape[0], -1, -1, -1)
        if self.cast:
            pos_score = pos_score.to(x.dtype)
        return torch.softmax(self.pos_proj(pos_score).float(), -2).to(x.dtype).permute(0, 3, 1, 2) @ x[:, None]


def relative_positions(cast: bool):
    torch.manual_seed(0)
    return nn.Sequential(RelativePositionAttention(cast)).eval(), (randn(1, SEQ, DIM, dtype=F16),)


# Mechanism 3: explicit casts that leak -------------------------------------------------------------------


class UpcastNorm(nn.LayerNorm):
    """A LayerNorm computed in float32 (``x.float()``); ``restore`` casts the result back (the fix)."""

    def __init__(self, dim: int, restore: bool) -> None:
        super().__init__(dim)
        self.restore = restore

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype) if self.restore else y


class QkNormAttention(nn.Module):
    """q/k norms (xformers, Qwen3 style) before ``F.scaled_dot_product_attention``."""

    def __init__(self, restore: bool) -> None:
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM).to(BF16)
        self.q_norm = UpcastNorm(DIM // HEADS, restore)
        self.k_norm = UpcastNorm(DIM // HEADS, restore)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = (split_heads(t) for t in self.qkv(x).chunk(3, -1))
        return F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)


def qk_norm_attention(restore: bool):
    torch.manual_seed(0)
    return Decoder(QkNormAttention(restore)).eval(), (randn(1, SEQ, DIM, dtype=BF16), torch.arange(SEQ)[None])


class DiTBlock(nn.Module):
    """A bfloat16 DiT block whose ``norm1`` runs in float32 before the attention projection."""

    def __init__(self, restore: bool) -> None:
        super().__init__()
        self.norm1 = UpcastNorm(DIM, restore).to(BF16)
        self.qkv = nn.Linear(DIM, 3 * DIM).to(BF16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(t) for t in self.qkv(self.norm1(x)).chunk(3, -1))
        return x + eager_attention(q, k, v).transpose(1, 2).flatten(2)


def dit_block(restore: bool):
    torch.manual_seed(0)
    return nn.Sequential(DiTBlock(restore)).eval(), (randn(1, SEQ, DIM, dtype=BF16),)


class UpcastSoftmaxAttention(nn.Module):
    """ipex-llm's ``native_sdp``: softmax upcast to float32, then ``probs @ value``; ``cast`` casts the
    probabilities back to the value's dtype (ipex-llm's fix)."""

    def __init__(self, cast: bool) -> None:
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM).to(BF16)
        self.cast = cast

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = (split_heads(t) for t in self.qkv(x).chunk(3, -1))
        return eager_attention(q, k, v, cast_probs=self.cast)


def upcast_softmax(cast: bool):
    torch.manual_seed(0)
    return Decoder(UpcastSoftmaxAttention(cast)).eval(), (randn(1, SEQ, DIM, dtype=BF16), torch.arange(SEQ)[None])


# Mechanism 4: intended-float32 computations run in half precision ----------------------------------------------


def causal_lm_cast(config_name: str, keep_inv_freq_fp32: bool, first_position: int = 2000):
    """A tiny transformers causal LM cast with ``model.to(torch.bfloat16)``, which also casts the rotary
    ``inv_freq``; ``keep_inv_freq_fp32`` restores it in float32 as ``from_pretrained(dtype=...)`` keeps it."""
    import transformers

    config = getattr(transformers, f"{config_name}Config")(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    model = getattr(transformers, f"{config_name}ForCausalLM")(config).eval()
    inv_freq = model.model.rotary_emb.inv_freq.clone()
    model.to(BF16)
    if keep_inv_freq_fp32:
        model.model.rotary_emb.inv_freq = inv_freq
    positions = torch.arange(first_position, first_position + SEQ)[None]
    return model, {"input_ids": tokens(), "position_ids": positions}


class AngleRotary(nn.Module):
    """Rotary angles ``positions * inv_freq`` computed in ``angle_dtype`` (gpt-neox: the model's half dtype;
    Modalities: ``inv_freq`` cast to the activation dtype first), applied to a half query."""

    def __init__(self, angle_dtype: torch.dtype) -> None:
        super().__init__()
        self.angle_dtype = angle_dtype

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = rope_angles(positions[0], q.shape[-1], self.angle_dtype)
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def angle_rotary(angle_dtype: torch.dtype, dtype: torch.dtype):
    model, (x, _) = rotary_decoder(AngleRotary(angle_dtype), dtype)
    return model, (x, torch.arange(2000, 2000 + SEQ)[None])


# Mechanism 5: non-finite values -------------------------------------------------------------------------


def t5_config(**kwargs):
    from transformers import T5Config

    return T5Config(d_model=DIM, d_ff=32, num_heads=HEADS, d_kv=DIM // HEADS, num_layers=1, vocab_size=64,
                    feed_forward_proj="relu", **kwargs)


class T5FeedForwardStack(nn.Module):
    """``blocks`` residual T5 feed-forward blocks (transformers' ``T5DenseActDense`` and ``T5LayerNorm``)
    without T5's float16 clamp: an overflow in ``wo`` reaches the output as inf (one block) or NaN (the
    next block's norm)."""

    def __init__(self, blocks: int) -> None:
        super().__init__()
        from transformers.models.t5.modeling_t5 import T5DenseActDense, T5LayerNorm

        config = t5_config()
        self.norms = nn.ModuleList([T5LayerNorm(DIM) for _ in range(blocks)])
        self.ffs = nn.ModuleList([T5DenseActDense(config) for _ in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, ff in zip(self.norms, self.ffs, strict=True):
            x = x + ff(norm(x))
        return x


def t5_overflow(blocks: int):
    torch.manual_seed(0)
    model = T5FeedForwardStack(blocks)
    with torch.no_grad():
        for ff in model.ffs:
            ff.wi.weight.abs_().mul_(300)
            ff.wo.weight.abs_().mul_(300)
    return model.half().eval(), (randn(1, SEQ, DIM, dtype=F16).abs() + 1,)


def t5_encoder(overflow: bool, keep_wo_fp32: bool):
    """A tiny real ``T5EncoderModel`` in float16, with T5's clamp of inf values; ``keep_wo_fp32`` keeps
    ``wo`` in float32 as ``_keep_in_fp32_modules`` does in ``from_pretrained``."""
    from transformers import T5EncoderModel

    torch.manual_seed(0)
    model = T5EncoderModel(t5_config()).eval()
    ff = model.encoder.block[0].layer[1].DenseReluDense
    if overflow:
        with torch.no_grad():
            ff.wi.weight.mul_(300)
            ff.wo.weight.mul_(300)
    model.half()
    if keep_wo_fp32:
        ff.wo.float()
    return model, {"input_ids": tokens()}


class UncastT5DenseActDense(nn.Module):
    """``T5DenseActDense`` as before transformers PR #21281: no cast to ``wo``'s dtype."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.models.t5.modeling_t5 import T5DenseActDense

        self.ff = T5DenseActDense(t5_config())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff.wo(self.ff.act(self.ff.wi(x)))


def t5_wo_fp32_uncast():
    torch.manual_seed(0)
    model = UncastT5DenseActDense().half().eval()
    model.ff.wo.float()
    model._keep_in_fp32_modules = ["wo"]
    return model, (randn(1, SEQ, DIM, dtype=F16),)


class CausalPaddingAttention(nn.Module):
    """bfloat16 attention with a causal plane and a padding plane of ``finfo.min``: ``compose="where"``
    selects (NeMo's fix), ``"masked_fill"`` fills a boolean mask (the torchbenchmark fix)."""

    def __init__(self, compose: str) -> None:
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM).to(BF16)
        self.compose = compose

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(t) for t in self.qkv(x).chunk(3, -1))
        scores = q @ k.transpose(-1, -2)
        blocked = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1) | (attention_mask[:, None, None, :] == 0)
        low = torch.finfo(scores.dtype).min
        if self.compose == "where":
            scores = torch.where(blocked, torch.full_like(scores, low), scores)
        else:
            scores = scores.masked_fill(blocked, low)
        return torch.softmax(scores.float(), -1).to(v.dtype) @ v


def causal_padding(compose: str):
    torch.manual_seed(0)
    attention_mask = torch.ones(1, SEQ, dtype=torch.long)
    attention_mask[0, -2:] = 0
    return Encoder(CausalPaddingAttention(compose)).eval(), (randn(1, SEQ, DIM, dtype=BF16), attention_mask)


# Mechanism 6: intended conventions --------------------------------------------------------------------------


class LoraLinear(nn.Module):
    """A half base linear with float32 LoRA factors (PEFT's default ``autocast_adapter_dtype``);
    ``cast_input`` casts the input to the adapter dtype and the result back, as PEFT does."""

    def __init__(self, cast_input: bool, rank: int = 4) -> None:
        super().__init__()
        self.base_layer = nn.Linear(DIM, DIM).half()
        self.lora_A = nn.Linear(DIM, rank, bias=False)
        self.lora_B = nn.Linear(rank, DIM, bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.02)
        self.cast_input = cast_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.cast_input:
            return result + self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))).to(result.dtype)
        return result + self.lora_B(self.lora_A(x))


def lora(cast_input: bool):
    torch.manual_seed(0)
    return nn.Sequential(LoraLinear(cast_input), nn.GELU(), LoraLinear(cast_input)).eval(), (randn(1, SEQ, DIM, dtype=F16),)


def gptj(dtype: torch.dtype = F16):
    """A tiny real ``GPTJForCausalLM`` (float32 ``embed_positions`` sin/cos table, cast since PR #34799)."""
    from transformers import GPTJConfig, GPTJForCausalLM

    config = GPTJConfig(n_embd=32, n_layer=1, n_head=2, rotary_dim=8, vocab_size=64, n_positions=64)
    torch.manual_seed(0)
    model = GPTJForCausalLM(config).eval()
    model.to(dtype)
    for module in model.modules():  # the table is float32 by design (computed, not loaded)
        if hasattr(module, "embed_positions"):
            module.embed_positions = module.embed_positions.float()
    return model, {"input_ids": tokens()}


# Mechanism 7: autocast ----------------------------------------------------------------------------------


class RmsNorm(nn.Module):
    """Qwen3's q/k RMSNorm: computed in float32, returns ``weight * x.to(input_dtype)``, which a float32
    weight (mixed-precision training keeps parameters in float32) promotes back to float32."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(x.dtype)


def elementwise_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """An attention kernel that autocast does not cover (flex_attention, xformers): it runs in whatever
    dtype it receives."""
    scores = (q[..., :, None, :] * k[..., None, :, :]).sum(-1)
    return (torch.softmax(scores, -1)[..., None] * v[..., None, :, :]).sum(-2)


class FlexQkNormAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(DIM, DIM) for _ in range(3))
        self.q_norm, self.k_norm = RmsNorm(DIM // HEADS), RmsNorm(DIM // HEADS)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        q = self.q_norm(split_heads(self.q_proj(x)))
        k = self.k_norm(split_heads(self.k_proj(x)))
        return elementwise_attention(q, k, split_heads(self.v_proj(x)))


def flex_qk_norm():
    torch.manual_seed(0)
    return Decoder(FlexQkNormAttention()).eval(), (randn(1, SEQ, DIM), torch.arange(SEQ)[None])


def memory_efficient_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """xformers' entry point checks dtypes in Python, before any kernel runs (and autocast does not cover it)."""
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"Query/Key/Value should all have the same dtype: {q.dtype}, {k.dtype}, {v.dtype}")
    return eager_attention(q, k, v)


class NormedQueryAttention(nn.Module):
    """A diffusers attention processor with a ``norm_q`` LayerNorm after the query projection, calling
    xformers: under CUDA autocast the projections run in the autocast dtype and the norm in float32 (it is on
    autocast's float32 list), and xformers is not autocast-aware. ``norm_k`` adds the key norm (NATTEN's
    qk_norm); ``cast_back`` casts the normed q/k to the value's dtype (the fix)."""

    def __init__(self, norm_k: bool = False, cast_back: bool = False) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(DIM)
        self.norm_k = nn.LayerNorm(DIM) if norm_k else nn.Identity()
        self.to_q, self.to_k, self.to_v = (nn.Linear(DIM, DIM) for _ in range(3))
        self.cast_back = cast_back

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.norm_q(self.to_q(x)), self.norm_k(self.to_k(x)), self.to_v(x)
        if self.cast_back:
            q, k = q.to(v.dtype), k.to(v.dtype)
        return memory_efficient_attention(split_heads(q), split_heads(k), split_heads(v))


def normed_query(norm_k: bool = False, cast_back: bool = False):
    torch.manual_seed(0)
    return Decoder(NormedQueryAttention(norm_k, cast_back)).eval(), (randn(1, SEQ, DIM), torch.arange(SEQ)[None])


class PaddedEncoderLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(DIM, HEADS, 32, batch_first=True)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        return self.layer(x, src_key_padding_mask=padding_mask)


def transformer_encoder_layer():
    """torch's ``TransformerEncoderLayer`` with a float key-padding mask (autocast's CPU mask dtype, fixed)."""
    torch.manual_seed(0)
    mask = torch.zeros(1, SEQ)
    mask[0, -2:] = float("-inf")
    return PaddedEncoderLayer().eval(), (randn(1, SEQ, DIM), mask)


def linear4bit(compute_dtype: torch.dtype):
    """bitsandbytes' ``Linear4bit`` with ``bnb_4bit_compute_dtype`` (float32 by default) on float16 input."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(BNB_DIM, BNB_DIM, compute_dtype=compute_dtype, quant_type="nf4")
    # bitsandbytes quantizes the weight when it is moved to a device; the bias in the activation dtype, as
    # from_pretrained(quantization_config=..., dtype=torch.float16) loads it.
    model = nn.Sequential(layer.half().to("cpu")).eval()
    return model, (randn(1, SEQ, BNB_DIM, dtype=F16),)


# Plain conflicts the tracer sees ------------------------------------------------------------------------------


def half_model_float_input(cast_input: bool):
    """A float16 model (DeepSpeed's fp16 engine) fed float32 inputs; DeepSpeed's fix casts the inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 5)).half().eval()
    x = randn(4, 10)
    return model, (x.half() if cast_input else x,)


def layer_norm_fp32_weight():
    """A float16 stream through a LayerNorm left in float32 (torch's CPU kernel accepts it, CUDA's does not)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(DIM, DIM).half(), nn.LayerNorm(DIM)).eval()
    model._keep_in_fp32_modules = ["1"]
    return model, (randn(1, SEQ, DIM, dtype=F16),)


def per_layer_rotary_llama(dtype: torch.dtype):
    """A transformers Llama with the per-layer rotary layout ipex-llm dispatches (``inv_freq`` cast too)."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    for layer in model.model.layers:
        layer.self_attn.rotary_emb = copy.deepcopy(model.model.rotary_emb)
    return model.to(dtype), {"input_ids": tokens()}
