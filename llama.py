"""LLaMA / Vicuna-7B: the frozen language model of the paper's hybrid LALM (DASS + Vicuna-7B, §III-C).

Glossary (code name -> meaning; defaults = Vicuna-7B v1.5, i.e. LLaMA-2-7B):
    d       hidden_size, the model width (4096)            H, Hkv  query heads (32), key/value heads (32; fewer for GQA)
    hd      head_dim = d / H (128)                         T       cache length (prompt + new tokens)
    B, L    batch, sequence length                         V       vocabulary size (32000)
    pos     position ids cumsum(attention_mask) - 1 (as HF): a left-padded row sees the positions it would see alone

A block is x + attn(RMSNorm(x)), then x + mlp(RMSNorm(x)); attn is causal self-attention with RoPE on q and k in
Hugging Face's rotate_half convention (the HF checkpoints' q/k weights are permuted for it); mlp is SwiGLU.

Differences from transformers' LlamaForCausalLM (the tests' oracle): without padding, attention is PyTorch's SDPA
with is_causal=True and no mask, so the flash / memory-efficient kernels can run; a padding query attends to itself,
so no softmax row is empty (no NaN on any backend); logits are fp32, as in mamba.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import sampling
from mamba import RMSNorm  # the same norm; LLaMA rounds where transformers does (scale_in_fp32=False)


@dataclass
class LlamaConfig:
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: = num_attention_heads (no grouped-query attention)
    intermediate_size: int = 11008
    vocab_size: int = 32000
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        d, h, kv = self.hidden_size, self.num_attention_heads, self.num_key_value_heads
        if d % h or h % kv:
            raise ValueError(f"hidden_size {d} must be divisible by num_attention_heads {h}, and num_attention_heads "
                             f"{h} must be divisible by num_key_value_heads {kv}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def rope_cos_sin(pos: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """pos (B, L) -> cos, sin (B, 1, L, hd) in fp32; frequency i = theta^(-2i/hd), each repeated for both halves."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.int64).float() / head_dim)
    angles = pos.float()[..., None] * inv_freq  # (B, L, hd/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, L, hd)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, heads, L, hd) rotated by its positions: x·cos + rotate_half(x)·sin, rotate_half(x) = (-x2, x1)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


@dataclass
class KVCache:
    """Keys and values preallocated for T positions, and what a decode step needs to know about each row."""
    valid: Tensor  # (B, T) bool: True where a real (not padding) token sits
    pos: Tensor    # (B,) the position id of the next token
    padded: bool   # whether any prompt slot is padding (if not, decode steps need no mask)
    k: dict[int, Tensor] = field(default_factory=dict)  # layer -> (B, Hkv, T, hd), in the dtype of the first keys
    v: dict[int, Tensor] = field(default_factory=dict)
    length: int = 0  # slots filled

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, Hkv, L, hd) at slots [length, length + L) -> all filled slots (B, Hkv, length + L, hd)."""
        if layer not in self.k:
            shape = (*k.shape[:2], self.valid.shape[1], k.shape[3])
            self.k[layer], self.v[layer] = k.new_zeros(shape), v.new_zeros(shape)
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None = None,
                layer: int = 0) -> Tensor:
        """x (B, L, d); cos, sin (B, 1, L, hd); mask (B, 1, L, S) bool (True: may attend) or None -> (B, L, d).
        With a cache, the new keys go in at slot cache.length and S = cache.length + L. mask None means causal
        without padding: is_causal for a prompt (L = S), every key for a decode step (L = 1)."""
        B, L, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, L, self.n_heads, self.hd).transpose(1, 2), cos, sin)  # (B, H, L, hd)
        k = apply_rope(self.k_proj(x).view(B, L, self.n_kv, self.hd).transpose(1, 2), cos, sin)  # (B, Hkv, L, hd)
        v = self.v_proj(x).view(B, L, self.n_kv, self.hd).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hkv, S, hd)
        if self.n_kv != self.n_heads:  # grouped-query attention: query head h reads key/value head h // (H / Hkv)
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and L > 1)  # (B, H, L, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, self.n_heads * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, L, d) -> (B, L, d): SwiGLU."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, scale_in_fp32=False)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, scale_in_fp32=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None = None,
                layer: int = 0) -> Tensor:
        """x (B, L, d) -> (B, L, d); the other arguments as in `Attention.forward`."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


def _positions(attention_mask: Tensor | None, batch: int, length: int, device) -> tuple[Tensor, Tensor | None]:
    """attention_mask (B, L) of 0/1 or None -> pos (B, L), mask (B, 1, L, L) bool or None (no padding: is_causal).
    With padding: causal, padding keys hidden, a padding query sees itself (an empty softmax row would give NaN)."""
    if attention_mask is None or attention_mask.bool().all():
        return torch.arange(length, device=device).expand(batch, length), None
    valid = attention_mask.bool()
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    mask = (causal & valid[:, None, :]) | torch.eye(length, dtype=torch.bool, device=device)
    return pos, mask[:, None]


class LlamaLM(nn.Module):
    """LLaMA causal LM; module names (`model.layers.{i}.self_attn.q_proj` ...) as in transformers' LlamaForCausalLM."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps, scale_in_fp32=False)))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)  # untied from embed_tokens
        self.hidden_size = config.hidden_size
        self.gradient_checkpointing = False  # True: recompute each block in backward (training memory)

    def embed(self, input_ids: Tensor) -> Tensor:
        """input_ids (B, L) -> (B, L, d)."""
        return self.model.embed_tokens(input_ids)

    def _blocks(self, x: Tensor, pos: Tensor, mask: Tensor | None, cache: KVCache | None = None) -> Tensor:
        """x (B, L, d) through all blocks and the final norm -> (B, L, d)."""
        cos, sin = rope_cos_sin(pos, self.config.head_dim, self.config.rope_theta)
        for i, block in enumerate(self.model.layers):
            if self.gradient_checkpointing and torch.is_grad_enabled() and cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, i)
        return self.model.norm(x)

    def forward(self, input_ids: Tensor | None = None, inputs_embeds: Tensor | None = None,
                attention_mask: Tensor | None = None) -> Tensor:
        """input_ids (B, L) and/or inputs_embeds (B, P, d) (embeds first, then ids); attention_mask (B, P + L) with
        0 at padding, or None -> logits (B, P + L, V), fp32."""
        x = sampling.join(self, input_ids, inputs_embeds)
        B, L, _ = x.shape
        if L > self.config.max_position_embeddings:
            raise ValueError(f"length {L} exceeds max_position_embeddings {self.config.max_position_embeddings}")
        sampling.check_attention_mask(attention_mask, B, L)
        pos, mask = _positions(attention_mask, B, L, x.device)
        return self.lm_head(self._blocks(x, pos, mask)).float()

    def prefill(self, inputs_embeds: Tensor, attention_mask: Tensor | None, max_length: int) -> tuple[Tensor, KVCache]:
        """inputs_embeds (B, L, d), left-padded rows marked by attention_mask (B, L) -> (logits of the last position
        (B, V), a cache with room for max_length positions)."""
        B, L, _ = inputs_embeds.shape
        if not L <= max_length <= self.config.max_position_embeddings:
            raise ValueError(f"max_length {max_length} must lie between the prompt's length {L} and "
                             f"max_position_embeddings {self.config.max_position_embeddings}")
        sampling.check_attention_mask(attention_mask, B, L, prompt=True)
        pos, mask = _positions(attention_mask, B, L, inputs_embeds.device)
        valid = torch.zeros(B, max_length, dtype=torch.bool, device=inputs_embeds.device)
        valid[:, :L] = True if mask is None else attention_mask.bool()
        cache = KVCache(valid, pos[:, -1] + 1, padded=mask is not None)
        h = self._blocks(inputs_embeds, pos, mask, cache)
        cache.length = L
        return self.lm_head(h[:, -1]).float(), cache

    def decode_step(self, token: Tensor, cache: KVCache) -> Tensor:
        """token (B,) -> logits (B, V); the token goes into the cache at slot cache.length."""
        if cache.length >= cache.valid.shape[1]:
            raise ValueError(f"the cache is full ({cache.length} positions)")
        cache.valid[:, cache.length] = True
        mask = cache.valid[:, None, None, :cache.length + 1] if cache.padded else None  # (B, 1, 1, S)
        h = self._blocks(self.embed(token[:, None]), cache.pos[:, None], mask, cache)
        cache.length += 1
        cache.pos += 1
        return self.lm_head(h[:, -1]).float()

    generate = sampling.generate  # generate(input_ids, inputs_embeds, attention_mask, max_new_tokens, ...) -> (B, T)
