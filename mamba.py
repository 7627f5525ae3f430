"""The Mamba language model (Mamba-2.8B, the paper's ssLALM LLM) on the selective scan of scan.py.

Glossary (checkpoint names -> paper; defaults = Mamba-2.8B):
    d_model         the residual stream width (2560)
    d_inner         expand · d_model, the D channels the SSM runs on (5120)
    in_proj         d_model -> [x, z]: the SSM input and the gate, 2 · d_inner
    conv1d          depthwise causal conv over time (width d_conv = 4) on x, then SiLU
    x_proj          x -> [Δ in low rank (dt_rank = R), B_t (N), C_t (N)]: what makes the SSM selective
    dt_proj         R -> d_inner; Δ_t = softplus(dt_proj(.)), its bias added inside the scan in fp32
    A_log, D        A = -exp(A_log) (d_inner, N) and the skip D (d_inner,), both kept in fp32
    norm, norm_f    RMSNorm before each mixer and before the head; the head is the embedding matrix (tied)
    conv_state      the last d_conv inputs of the conv, per layer       (B, d_inner, d_conv)
    ssm_state       h_t of eq. (5), per layer                            (B, d_inner, N)

Differences from mamba_ssm (CUDA-only, its fused kernels hide the equations): the residual stream is always fp32;
the conv is plain PyTorch; left padding is masked by zeroing the conv's input and output (transformers zeroes the
mixer input: the same when in_proj has no bias). On CUDA each batch size's decode step is recorded once as a CUDA
graph and replayed, as gpt-fast does with torch.compile: at batch 1 kernel launches, not arithmetic, set the pace.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sampling
from scan import init_A_and_delta_bias, selective_scan, selective_state_update


@dataclass
class MambaConfig:
    d_model: int = 2560
    n_layer: int = 64
    vocab_size: int = 50280           # GPT-NeoX's 50277 tokens, padded up to pad_vocab_size_multiple
    d_state: int = 16                 # N
    expand: int = 2                   # d_inner = expand · d_model
    d_conv: int = 4
    dt_rank: int = 0                  # R; 0 means ceil(d_model / 16)
    rms_norm_eps: float = 1e-5
    pad_vocab_size_multiple: int = 8
    conv_bias: bool = True
    bias: bool = False                # bias of in_proj and out_proj
    # initialisation for training from scratch (mamba_ssm's defaults)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    initializer_range: float = 0.02   # std of the embedding

    def __post_init__(self):
        self.dt_rank = self.dt_rank or math.ceil(self.d_model / 16)
        self.vocab_size = -(-self.vocab_size // self.pad_vocab_size_multiple) * self.pad_vocab_size_multiple

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight in fp32. Each LLM rounds as its own code does: Mamba scales in fp32 and
    returns the weight's dtype; LLaMA (scale_in_fp32=False) casts back to x's dtype, then scales."""

    def __init__(self, dim: int, eps: float, scale_in_fp32: bool = True):
        super().__init__()
        self.eps, self.scale_in_fp32 = eps, scale_in_fp32
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., dim) any float dtype -> (..., dim)."""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.scale_in_fp32:
            return (h * self.weight.float()).to(self.weight.dtype)
        return self.weight * h.to(x.dtype)


class MambaMixer(nn.Module):
    """in_proj -> causal conv -> selective SSM (eqs. (3)-(6)) gated by silu(z) -> out_proj."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.d_inner, self.d_state, self.dt_rank, self.d_conv = cfg.d_inner, cfg.d_state, cfg.dt_rank, cfg.d_conv
        self.in_proj = nn.Linear(cfg.d_model, 2 * cfg.d_inner, bias=cfg.bias)          # -> [x, z]
        self.conv1d = nn.Conv1d(cfg.d_inner, cfg.d_inner, cfg.d_conv, groups=cfg.d_inner, bias=cfg.conv_bias)
        self.x_proj = nn.Linear(cfg.d_inner, cfg.dt_rank + 2 * cfg.d_state, bias=False)  # -> [Δ (low rank), B, C]
        self.dt_proj = nn.Linear(cfg.dt_rank, cfg.d_inner, bias=True)                    # Δ before softplus
        self.A_log = nn.Parameter(torch.empty(cfg.d_inner, cfg.d_state, dtype=torch.float32))  # A = -exp(A_log)
        self.D = nn.Parameter(torch.empty(cfg.d_inner, dtype=torch.float32))
        self.out_proj = nn.Linear(cfg.d_inner, cfg.d_model, bias=cfg.bias)

    def _ssm_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (..., d_inner) -> Δ before bias and softplus (..., d_inner), B (..., N), C (..., N)."""
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.linear(dt, self.dt_proj.weight), B, C  # dt_proj's bias is added in fp32 by the scan

    def forward(self, hidden: Tensor, mask: Tensor | None = None, conv_state: Tensor | None = None,
                ssm_state: Tensor | None = None) -> Tensor:
        """hidden (B, L, d_model) -> (B, L, d_model); mask (B, L): 1 at real positions, 0 at (left) padding, or None.
        conv_state (B, d_inner, d_conv) and ssm_state (B, d_inner, N), if given, are overwritten with the states
        after position L. Padding leaves both untouched: the conv sees zeros, and x = 0 gives Δ·B·x = 0 (eq. (5))."""
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)          # (B, d_inner, L) each
        keep = 1.0 if mask is None else mask[:, None, :].to(x.dtype)         # (B, 1, L)
        x = x * keep  # = HF's zeroing of the mixer input when in_proj has no bias
        if conv_state is not None:
            conv_state.copy_(F.pad(x, (self.d_conv - x.shape[-1], 0)))     # the last d_conv inputs (zeros before 0)
        x = F.silu(self.conv1d(F.pad(x, (self.d_conv - 1, 0)))) * keep       # causal depthwise conv; the bias kept out
        delta, B, C = self._ssm_inputs(x.transpose(1, 2))                    # (B, L, d_inner), (B, L, N), (B, L, N)
        A = -torch.exp(self.A_log.float())                                   # (d_inner, N), negative
        y = selective_scan(x, delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), self.D.float(), z=z,
                           delta_bias=self.dt_proj.bias.float(), delta_softplus=True,  # Δ = softplus(dt_proj(.))
                           return_last_state=ssm_state is not None)                     # eqs. (3)-(6), then the gate
        if ssm_state is not None:
            y, last = y
            ssm_state.copy_(last)
        return self.out_proj(y.transpose(1, 2))                              # (B, L, d_model)

    def step(self, hidden: Tensor, conv_state: Tensor, ssm_state: Tensor) -> Tensor:
        """One token: hidden (B, d_model) -> (B, d_model); conv_state (B, d_inner, d_conv) and ssm_state
        (B, d_inner, N) fp32 are advanced in place. Cost independent of how many tokens came before."""
        x, z = self.in_proj(hidden).chunk(2, dim=-1)                         # (B, d_inner) each
        conv_state.copy_(conv_state.roll(-1, dims=-1))
        conv_state[:, :, -1] = x
        x = (conv_state.float() * self.conv1d.weight[:, 0].float()).sum(-1)  # the conv at the newest position
        if self.conv1d.bias is not None:
            x = x + self.conv1d.bias.float()
        x = F.silu(x).to(hidden.dtype)
        delta, B, C = self._ssm_inputs(x)                                    # (B, d_inner), (B, N), (B, N)
        y = selective_state_update(ssm_state, x, delta, -torch.exp(self.A_log.float()), B, C, self.D.float(), z=z,
                                   dt_bias=self.dt_proj.bias.float(), dt_softplus=True)  # eqs. (3)-(6) at one t
        return self.out_proj(y)


class MambaBlock(nn.Module):
    """Pre-norm residual block: r <- r + mixer(RMSNorm(r)), the residual stream r kept in fp32."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.mixer = MambaMixer(cfg)

    def forward(self, residual: Tensor, mask: Tensor | None = None, conv_state: Tensor | None = None,
                ssm_state: Tensor | None = None) -> Tensor:
        """residual: (B, L, d_model) fp32 -> (B, L, d_model) fp32."""
        return residual + self.mixer(self.norm(residual), mask, conv_state, ssm_state).float()


@dataclass
class MambaCache:
    """The decoding state of every layer: its size does not depend on the sequence length."""
    conv: Tensor  # (n_layer, B, d_inner, d_conv) the last d_conv inputs of each layer's conv, model dtype
    ssm: Tensor   # (n_layer, B, d_inner, N) h_t of eq. (5), fp32
    length: int = 0  # positions consumed
    graph: "_GraphedDecode | None" = None  # the CUDA graph whose buffers conv and ssm now are

    @classmethod
    def allocate(cls, cfg: MambaConfig, batch: int, dtype: torch.dtype, device) -> "MambaCache":
        return cls(torch.zeros(cfg.n_layer, batch, cfg.d_inner, cfg.d_conv, dtype=dtype, device=device),
                   torch.zeros(cfg.n_layer, batch, cfg.d_inner, cfg.d_state, dtype=torch.float32, device=device))


class _GraphedDecode:
    """`MambaLM._step` for one batch size, recorded once as a CUDA graph and replayed for every token: it reads the
    token from a fixed buffer, steps its own cache buffers in place and writes the logits into a fixed buffer."""

    def __init__(self, model: "MambaLM", cache: MambaCache, key: tuple):
        if not cache.ssm.is_cuda or torch.is_grad_enabled():
            raise RuntimeError("recording the decode step as a CUDA graph needs CUDA tensors and torch.no_grad()")
        self.key, self.owner = key, None
        self.cache = MambaCache.allocate(model.config, cache.ssm.shape[1], cache.conv.dtype, cache.ssm.device)
        self.token = torch.zeros(cache.ssm.shape[1], dtype=torch.long, device=cache.ssm.device)
        side = torch.cuda.Stream(device=cache.ssm.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph: Triton compiles, cuBLAS gets its workspace
            model._step(self.token, self.cache)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # recorded, not run
            self.logits = model._step(self.token, self.cache)

    def bind(self, cache: MambaCache) -> None:
        """Move cache's state into the graph's buffers, which cache then uses; the cache bound before gets a copy."""
        if (old := self.owner) is not None and old is not cache:
            old.conv, old.ssm, old.graph = old.conv.clone(), old.ssm.clone(), None
        self.cache.conv.copy_(cache.conv)
        self.cache.ssm.copy_(cache.ssm)
        cache.conv, cache.ssm, cache.graph, self.owner = self.cache.conv, self.cache.ssm, self, cache

    def __call__(self, token: Tensor) -> Tensor:
        self.token.copy_(token)
        self.graph.replay()
        return self.logits


class MambaLM(nn.Module):
    """Embedding -> n_layer MambaBlocks -> norm_f -> logits with the tied embedding; the state_dict keys of
    transformers' MambaForCausalLM without lm_head.weight. cuda_graph: True (default) records each batch size's
    decode step once as a CUDA graph and replays it, on CUDA under no_grad, and a failed recording raises;
    "require" also raises where it cannot record (benchmarks); False: eager steps."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.config = config
        self.hidden_size = config.d_model
        self.gradient_checkpointing = False  # recompute each block in backward (long prefixes in training)
        self.cuda_graph: bool | str = True
        self._graphs: dict[tuple, _GraphedDecode] = {}  # batch size, dtype, device -> the recorded decode step
        self.backbone = nn.ModuleDict(dict(
            embeddings=nn.Embedding(config.vocab_size, config.d_model),
            layers=nn.ModuleList(MambaBlock(config) for _ in range(config.n_layer)),
            norm_f=RMSNorm(config.d_model, config.rms_norm_eps)))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """mamba_ssm's initialisation, for training from scratch (out_proj scaled as GPT-2's residual projections)."""
        cfg = self.config
        nn.init.normal_(self.backbone.embeddings.weight, std=cfg.initializer_range)
        for m in (block.mixer for block in self.backbone.layers):
            for layer in (m.in_proj, m.x_proj, m.conv1d, m.out_proj):
                layer.reset_parameters()
            m.out_proj.weight /= math.sqrt(cfg.n_layer)
            for lin in (m.in_proj, m.out_proj):
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            nn.init.uniform_(m.dt_proj.weight, -cfg.dt_rank ** -0.5, cfg.dt_rank ** -0.5)
            init_A_and_delta_bias(m.A_log, m.dt_proj.bias, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor)
            nn.init.ones_(m.D)

    def embed(self, input_ids: Tensor) -> Tensor:
        """input_ids (B, L) -> token embeddings (B, L, d_model)."""
        return self.backbone.embeddings(input_ids)

    def _logits(self, hidden: Tensor) -> Tensor:
        """Final residual (..., d_model) -> logits (..., V) fp32, through norm_f and the tied embedding."""
        return F.linear(self.backbone.norm_f(hidden), self.backbone.embeddings.weight).float()

    def forward(self, input_ids: Tensor | None = None, inputs_embeds: Tensor | None = None,
                attention_mask: Tensor | None = None) -> Tensor:
        """input_ids (B, L) and/or inputs_embeds (B, P, d_model) (audio tokens, then text) -> logits (B, P + L, V)
        fp32. attention_mask (B, P + L): 1 at real positions, 0 at (left or right) padding."""
        residual = sampling.join(self, input_ids, inputs_embeds).float()
        sampling.check_attention_mask(attention_mask, *residual.shape[:2])
        for block in self.backbone.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                residual = torch.utils.checkpoint.checkpoint(block, residual, attention_mask, use_reentrant=False)
            else:
                residual = block(residual, attention_mask)
        return self._logits(residual)

    def prefill(self, inputs_embeds: Tensor, attention_mask: Tensor | None = None,
                max_length: int | None = None) -> tuple[Tensor, MambaCache]:
        """The prompt inputs_embeds (B, L, d_model) -> the last position's logits (B, V) and the cache (each layer's
        final conv and SSM state). max_length is not needed: the state's size does not depend on it."""
        batch = inputs_embeds.shape[0]
        sampling.check_attention_mask(attention_mask, batch, inputs_embeds.shape[1], prompt=True)
        cache = MambaCache.allocate(self.config, batch, self.backbone.norm_f.weight.dtype, inputs_embeds.device)
        residual = inputs_embeds.float()
        for i, block in enumerate(self.backbone.layers):
            residual = block(residual, attention_mask, cache.conv[i], cache.ssm[i])
        cache.length = inputs_embeds.shape[1]
        return self._logits(residual[:, -1]), cache

    def decode_step(self, token: Tensor, cache: MambaCache) -> Tensor:
        """token (B,) -> logits (B, V) for the position after it; cache advances by one position in place.
        With a CUDA graph (see `cuda_graph`) the logits returned are overwritten by the next step."""
        graph = cache.graph or self._graph(token, cache)
        logits = graph(token) if graph is not None else self._step(token, cache)
        cache.length += 1
        return logits

    def _graph(self, token: Tensor, cache: MambaCache) -> _GraphedDecode | None:
        """The decode step recorded for cache's batch size, bound to cache; None to step eagerly. It is recorded
        again when a parameter has moved or a module's state (train/eval, LoRA merged) has changed."""
        if not (self.cuda_graph == "require" or (self.cuda_graph and token.is_cuda and not torch.is_grad_enabled())):
            return None
        key = (token.shape[0], cache.conv.dtype, token.device,
               tuple(p.data_ptr() for p in self.parameters()),
               tuple((m.training, getattr(m, "merged", None)) for m in self.modules()))
        graph = self._graphs.get(key[:3])
        if graph is None or graph.key != key:
            graph = self._graphs[key[:3]] = _GraphedDecode(self, cache, key)
        graph.bind(cache)
        return graph

    def _step(self, token: Tensor, cache: MambaCache) -> Tensor:
        residual = self.embed(token).float()                                 # (B, d_model)
        for i, block in enumerate(self.backbone.layers):
            residual = residual + block.mixer.step(block.norm(residual), cache.conv[i], cache.ssm[i]).float()
        return self._logits(residual)

    generate = sampling.generate  # generate(input_ids, inputs_embeds, attention_mask, max_new_tokens, ...) -> (B, T)
