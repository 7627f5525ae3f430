"""The Mamba language model (Mamba-2.8B, the paper's ssLALM LLM), built on the selective scan of scan.py.

The language model (MambaLM; defaults = Mamba-2.8B), names as in the checkpoints:
    d_model             the residual stream width (2560); D in the scan is d_inner
    d_inner             expand · d_model, the channels the SSM runs on (5120)
    in_proj             d_model -> [x, z], the SSM input and the gate, 2 · d_inner
    conv1d              depthwise causal conv over time (width d_conv = 4) on x, then SiLU
    x_proj              x -> [Δ in low rank (dt_rank = R), B_t (N), C_t (N)]: what makes the SSM selective
    dt_proj             R -> d_inner; Δ_t = softplus(dt_proj(.)), its bias added inside the scan in fp32
    A_log               A = -exp(A_log), (d_inner, N); kept in fp32 like D
    out_proj            d_inner -> d_model
    norm, norm_f        RMSNorm before each mixer and before the head; the head is the embedding matrix (tied)
    conv_state          the last d_conv inputs of the conv, per layer           (batch, d_inner, d_conv)
    ssm_state           h_t, per layer                                           (batch, d_inner, N)

Where it differs from the official code: the residual stream is always fp32 and the RMSNorm multiplies by its
weight in fp32 before casting (mamba_ssm's fused kernel does the same; transformers casts first); the
depthwise conv is plain PyTorch (no causal-conv1d kernel); left padding is masked by zeroing the conv's input
and output (transformers zeroes the mixer input, the same thing when in_proj has no bias). On CUDA, a decode
step is recorded once per generation as a CUDA graph and replayed (`_GraphedDecode`; `cuda_graph = False` turns it
off), as gpt-fast does with torch.compile: at batch 1 the launches, not the arithmetic, would set the pace.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import checkpoint
import sampling
from scan import selective_scan, selective_state_update


# ----------------------------------------------------------------------------------------------------------------
# The Mamba language model (state-spaces/mamba-*): config, blocks, decode cache, checkpoints, tokenizer, CLI
# ----------------------------------------------------------------------------------------------------------------

_PRESETS = {"130m": (768, 24), "370m": (1024, 48), "790m": (1536, 48), "1.4b": (2048, 48), "2.8b": (2560, 64)}


@dataclass
class MambaConfig:
    """The Mamba LM's shape. Defaults: mamba-2.8b, the paper's ssLALM language model."""
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
        m = self.pad_vocab_size_multiple
        self.vocab_size = -(-self.vocab_size // m) * m

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @classmethod
    def preset(cls, name: str) -> "MambaConfig":
        """The public sizes: "130m", "370m", "790m", "1.4b", "2.8b"."""
        if name not in _PRESETS:
            raise ValueError(f"unknown Mamba size {name!r}; choose one of {list(_PRESETS)}")
        d_model, n_layer = _PRESETS[name]
        return cls(d_model=d_model, n_layer=n_layer)

    @classmethod
    def from_json(cls, path: str) -> "MambaConfig":
        """Read config.json in either format: HF (hidden_size, num_hidden_layers, ...) or mamba_ssm (d_model, ...)."""
        with open(path) as f:
            c = json.load(f)
        if "hidden_size" in c:  # transformers' MambaConfig
            checks = {"tie_word_embeddings": True, "hidden_act": "silu"}
            d, expand = c["hidden_size"], c.get("expand", 2)
            if c.get("intermediate_size", expand * d) != expand * d:
                raise ValueError(f"{path}: intermediate_size {c['intermediate_size']} != expand {expand} × "
                                 f"hidden_size {d}")
            rank = c.get("time_step_rank", "auto")
            cfg = cls(d_model=d, n_layer=c["num_hidden_layers"], vocab_size=c["vocab_size"],
                      d_state=c.get("state_size", 16), expand=expand, d_conv=c.get("conv_kernel", 4),
                      dt_rank=0 if rank == "auto" else rank, rms_norm_eps=c.get("layer_norm_epsilon", 1e-5),
                      pad_vocab_size_multiple=1, conv_bias=c.get("use_conv_bias", True),
                      bias=c.get("use_bias", False), dt_min=c.get("time_step_min", 0.001),
                      dt_max=c.get("time_step_max", 0.1), dt_init_floor=c.get("time_step_floor", 1e-4))
        elif "d_model" in c:  # mamba_ssm's MambaConfig
            checks = {"rms_norm": True, "tie_embeddings": True, "d_intermediate": 0, "attn_layer_idx": []}
            ssm = dict(c.get("ssm_cfg") or {})
            if ssm.pop("layer", "Mamba1") != "Mamba1":
                raise ValueError(f"{path}: only Mamba-1 layers are supported; ssm_cfg is {c['ssm_cfg']}")
            known = {"d_state", "d_conv", "expand", "dt_rank", "conv_bias", "bias", "dt_min", "dt_max",
                     "dt_init_floor", "dt_init", "dt_scale", "use_fast_path"}
            if set(ssm) - known:
                raise ValueError(f"{path}: unsupported ssm_cfg entries {sorted(set(ssm) - known)}")
            cfg = cls(d_model=c["d_model"], n_layer=c["n_layer"], vocab_size=c["vocab_size"],
                      d_state=ssm.get("d_state", 16), expand=ssm.get("expand", 2), d_conv=ssm.get("d_conv", 4),
                      dt_rank=0 if ssm.get("dt_rank", "auto") == "auto" else ssm["dt_rank"],
                      rms_norm_eps=c.get("norm_epsilon", 1e-5),
                      pad_vocab_size_multiple=c.get("pad_vocab_size_multiple", 8),
                      conv_bias=ssm.get("conv_bias", True), bias=ssm.get("bias", False),
                      dt_min=ssm.get("dt_min", 0.001), dt_max=ssm.get("dt_max", 0.1),
                      dt_init_floor=ssm.get("dt_init_floor", 1e-4))
        else:
            raise ValueError(f"{path}: neither an HF Mamba config (hidden_size, ...) nor a mamba_ssm one "
                             f"(d_model, ...)")
        for key, want in checks.items():
            if c.get(key) not in (None, want):
                raise ValueError(f"{path}: {key} = {c[key]!r} is not supported (need {want!r})")
        return cfg

    def to_hf_dict(self) -> dict:
        """config.json in transformers' MambaConfig field names (what MambaForCausalLM.from_pretrained reads)."""
        return dict(architectures=["MambaForCausalLM"], model_type="mamba", hidden_size=self.d_model,
                    intermediate_size=self.d_inner, expand=self.expand, state_size=self.d_state,
                    num_hidden_layers=self.n_layer, vocab_size=self.vocab_size, conv_kernel=self.d_conv,
                    time_step_rank=self.dt_rank, layer_norm_epsilon=self.rms_norm_eps, use_bias=self.bias,
                    use_conv_bias=self.conv_bias, hidden_act="silu", residual_in_fp32=True,
                    tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                    time_step_min=self.dt_min, time_step_max=self.dt_max, time_step_floor=self.dt_init_floor)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight, normalised in fp32 (both LLMs of the paper use it).

    The checkpoints' own code differs in where it rounds, and each model follows its own: Mamba (mamba_ssm) scales
    in fp32 and returns the weight's dtype; LLaMA (transformers) casts back to x's dtype, then scales.
    """

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
    """The Mamba block's mixer: in_proj -> causal conv -> selective SSM (eqs. (3)-(6)) gated by silu(z) -> out_proj.

    Parameter names are the checkpoints' (backbone.layers.{i}.mixer.*). A_log and D stay fp32 when the rest of the
    model is loaded in bf16/fp16, as in mamba_ssm.
    """
    backend: str | None = None  # scan backend passed to selective_scan / selective_state_update (None: automatic)

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
        """hidden: (B, L, d_model); mask: (B, L), 1 at real positions, 0 at (left) padding, or None.

        Returns (B, L, d_model). If conv_state (B, d_inner, d_conv) and ssm_state (B, d_inner, N) are given they are
        overwritten with the states after position L (the last d_conv conv inputs, h_L) for decoding to go on from.
        Padded positions leave both states untouched: the conv sees zeros there, and with x = 0 also B = C = 0,
        so Δ·B·x = 0 and h stays 0 (eq. (5)).
        """
        length = hidden.shape[1]
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)          # (B, d_inner, L) each
        if mask is not None:
            x = x * mask[:, None, :].to(x.dtype)  # = HF's zeroing of the mixer input when in_proj has no bias
        if conv_state is not None:
            conv_state.copy_(F.pad(x, (self.d_conv - length, 0)))           # the last d_conv inputs (zeros before 0)
        x = F.silu(self.conv1d(F.pad(x, (self.d_conv - 1, 0))))              # causal depthwise conv  (B, d_inner, L)
        if mask is not None:
            x = x * mask[:, None, :].to(x.dtype)                             # the conv's bias must not leak in
        delta, B, C = self._ssm_inputs(x.transpose(1, 2))                    # (B, L, d_inner), (B, L, N), (B, L, N)
        A = -torch.exp(self.A_log.float())                                   # (d_inner, N), negative
        y = selective_scan(x, delta.transpose(1, 2), A, B.transpose(1, 2).contiguous(),
                           C.transpose(1, 2).contiguous(), self.D.float(), z=z,
                           delta_bias=self.dt_proj.bias.float(), delta_softplus=True,  # Δ = softplus(dt_proj(.))
                           return_last_state=ssm_state is not None, backend=self.backend)  # eqs. (3)-(6), gate
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
        A = -torch.exp(self.A_log.float())
        y = selective_state_update(ssm_state, x, delta, A, B, C, self.D.float(), z=z,
                                   dt_bias=self.dt_proj.bias.float(), dt_softplus=True,
                                   backend=self.backend)                     # eqs. (3)-(6) at one t
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
    """The decoding state of every layer, allocated once: its size does not depend on the sequence length."""
    conv: Tensor  # (n_layer, B, d_inner, d_conv) the last d_conv inputs of each layer's conv, model dtype
    ssm: Tensor   # (n_layer, B, d_inner, N) h_t of eq. (5), fp32
    length: int = 0  # positions consumed
    graph: "_GraphedDecode | None" = None  # the decode step recorded as a CUDA graph for this cache

    @classmethod
    def allocate(cls, cfg: MambaConfig, batch: int, dtype: torch.dtype, device) -> "MambaCache":
        return cls(torch.zeros(cfg.n_layer, batch, cfg.d_inner, cfg.d_conv, dtype=dtype, device=device),
                   torch.zeros(cfg.n_layer, batch, cfg.d_inner, cfg.d_state, dtype=torch.float32, device=device))


class _GraphedDecode:
    """`MambaLM.decode_step` recorded once as a CUDA graph and replayed for every token. At batch 1 the ~15 kernel
    launches per layer cost more than their work; a replay is one launch. The graph reads the token from a fixed
    buffer, steps the cache in place and writes the logits into a fixed buffer (valid until the next replay)."""

    def __init__(self, model: "MambaLM", cache: MambaCache, batch: int):
        self.token = torch.zeros(batch, dtype=torch.long, device=cache.ssm.device)
        saved = cache.conv.clone(), cache.ssm.clone()
        try:
            side = torch.cuda.Stream(device=cache.ssm.device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the graph: Triton compiles, cuBLAS gets its workspace
                model._step(self.token, cache)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # recorded, not run
                self.logits = model._step(self.token, cache)
        finally:
            cache.conv.copy_(saved[0])  # undo the warm-up's step
            cache.ssm.copy_(saved[1])

    def __call__(self, token: Tensor) -> Tensor:
        self.token.copy_(token)
        self.graph.replay()
        return self.logits


class MambaLM(nn.Module):
    """Mamba language model: embedding -> n_layer MambaBlocks -> RMSNorm (norm_f) -> logits with the tied embedding.

    state_dict keys are exactly those of transformers' MambaForCausalLM (backbone.embeddings.weight, ...), without
    lm_head.weight: the head is the embedding matrix itself.
    """

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.config = config
        self.hidden_size = config.d_model
        self.gradient_checkpointing = False  # recompute each block in backward (long prefixes in training)
        self.cuda_graph = True  # decode steps on CUDA replay a CUDA graph (False: launch every kernel each step)
        self.backbone = nn.ModuleDict(dict(
            embeddings=nn.Embedding(config.vocab_size, config.d_model),
            layers=nn.ModuleList(MambaBlock(config) for _ in range(config.n_layer)),
            norm_f=RMSNorm(config.d_model, config.rms_norm_eps)))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """mamba_ssm's initialisation, for training from scratch.

        Embedding N(0, 0.02²); in_proj, x_proj, conv1d: PyTorch's defaults; out_proj: PyTorch's default scaled by
        1/sqrt(n_layer) (GPT-2's residual rescaling); Linear biases 0; dt_proj.weight U(±dt_rank^-0.5);
        dt_proj.bias = softplus⁻¹(Δ) with Δ log-uniform in [dt_min, dt_max] (floored at dt_init_floor), so that
        Δ starts in that range; A = -(1, 2, ..., N) in every channel (S4D-real); D = 1; norm weights 1.
        """
        cfg = self.config
        nn.init.normal_(self.backbone.embeddings.weight, std=cfg.initializer_range)
        for block in self.backbone.layers:
            m = block.mixer
            m.in_proj.reset_parameters()
            m.x_proj.reset_parameters()
            m.conv1d.reset_parameters()
            m.out_proj.reset_parameters()
            m.out_proj.weight /= math.sqrt(cfg.n_layer)
            for lin in (m.in_proj, m.out_proj):
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            nn.init.uniform_(m.dt_proj.weight, -cfg.dt_rank ** -0.5, cfg.dt_rank ** -0.5)
            log_dt = torch.empty(cfg.d_inner, device=m.A_log.device).uniform_(math.log(cfg.dt_min),
                                                                               math.log(cfg.dt_max))
            dt = log_dt.exp().clamp(min=cfg.dt_init_floor)
            m.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(Δ) = Δ + log(1 - e^-Δ)
            m.A_log.copy_(torch.log(torch.arange(1, cfg.d_state + 1, dtype=torch.float32, device=m.A_log.device))
                          .expand(cfg.d_inner, -1))
            nn.init.ones_(m.D)
            nn.init.ones_(block.norm.weight)
        nn.init.ones_(self.backbone.norm_f.weight)

    # -- the forward pass -----------------------------------------------------------------------------------------

    def embed(self, input_ids: Tensor) -> Tensor:
        """input_ids (B, L) -> token embeddings (B, L, d_model)."""
        return self.backbone.embeddings(input_ids)

    def _logits(self, hidden: Tensor) -> Tensor:
        """Final residual (..., d_model) -> logits (..., V) fp32, through norm_f and the tied embedding."""
        return F.linear(self.backbone.norm_f(hidden), self.backbone.embeddings.weight).float()

    def _prompt(self, input_ids: Tensor | None, inputs_embeds: Tensor | None) -> Tensor:
        parts = ([inputs_embeds] if inputs_embeds is not None else []) + \
                ([self.embed(input_ids)] if input_ids is not None else [])
        if not parts:
            raise ValueError("pass input_ids, inputs_embeds or both")
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def forward(self, input_ids: Tensor | None = None, inputs_embeds: Tensor | None = None,
                attention_mask: Tensor | None = None) -> Tensor:
        """input_ids (B, L) and/or inputs_embeds (B, P, d_model) -> logits (B, P + L, V) fp32.

        With both, the sequence is inputs_embeds followed by the embedded input_ids (audio tokens, then text).
        attention_mask (B, P + L): 1 at real positions, 0 at padding (left padding for prompts; right padding in
        training batches only affects the padded positions themselves).
        """
        residual = self._prompt(input_ids, inputs_embeds).float()
        sampling.check_attention_mask(attention_mask, *residual.shape[:2])
        for block in self.backbone.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                residual = torch.utils.checkpoint.checkpoint(block, residual, attention_mask, use_reentrant=False)
            else:
                residual = block(residual, attention_mask)
        return self._logits(residual)

    # -- generation: the protocol of sampling.py -------------------------------------------------------------------

    def prefill(self, inputs_embeds: Tensor, attention_mask: Tensor | None = None,
                max_length: int | None = None) -> tuple[Tensor, MambaCache]:
        """Run the prompt inputs_embeds (B, L, d_model) once, keeping each layer's final conv and SSM state.

        Returns the logits of the last position (B, V) and the cache. max_length is not needed: the state has the
        same size whatever the length.
        """
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
        On CUDA (with self.cuda_graph) the step is a CUDA graph recorded at the first call for this cache; the
        logits it returns are then overwritten by the next step."""
        if cache.graph is None and token.is_cuda and self.cuda_graph and not torch.is_grad_enabled():
            try:
                cache.graph = _GraphedDecode(self, cache, token.shape[0])
            except RuntimeError as e:  # e.g. a kernel that cannot be captured: say so, and step eagerly
                warnings.warn(f"decoding without a CUDA graph: recording the decode step failed ({e})")
                self.cuda_graph = False
        logits = cache.graph(token) if cache.graph is not None else self._step(token, cache)
        cache.length += 1
        return logits

    def _step(self, token: Tensor, cache: MambaCache) -> Tensor:
        residual = self.embed(token).float()                                 # (B, d_model)
        for i, block in enumerate(self.backbone.layers):
            residual = residual + block.mixer.step(block.norm(residual), cache.conv[i], cache.ssm[i]).float()
        return self._logits(residual)

    generate = sampling.generate  # generate(input_ids, inputs_embeds, attention_mask, max_new_tokens, ...) -> (B, T)

    # -- checkpoints -----------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype | None = None, device=None) -> "MambaLM":
        """Load a Mamba checkpoint folder: HF format (state-spaces/mamba-2.8b-hf) or mamba_ssm's (mamba-2.8b).

        Weights: model.safetensors, pytorch_model.bin or their shards, read strictly by checkpoint.load_weights
        (a missing, unexpected or mis-shaped key raises an error naming the key and the file). dtype: None keeps
        the stored dtype, otherwise every tensor is cast to it except A_log and D, which stay fp32 (as mamba_ssm
        keeps them). lm_head.weight may be absent; if present it must equal the embedding (the head is tied), else
        it is an error. The result is in eval mode, parameters trainable (freeze them yourself).
        """
        config = MambaConfig.from_json(checkpoint.config_file(path, "a Mamba checkpoint folder"))
        with torch.device("meta"):
            model = cls(config)
        extra = checkpoint.load_weights(model, path, dtype=dtype, device=device,
                                        rename={"backbone.embedding.": "backbone.embeddings."},  # mamba_ssm -> HF
                                        fp32=(".A_log", ".D"), aside=("lm_head.weight",))
        if "lm_head.weight" in extra:
            file, head = extra["lm_head.weight"]
            emb = model.backbone.embeddings.weight
            if head.shape != emb.shape or not torch.equal(head.to(emb.device, emb.dtype), emb):
                raise ValueError(f"{file}: 'lm_head.weight' differs from the embedding; this model ties them")
        return model.eval()

    def save_pretrained(self, path: str):
        """Write the HF format: config.json (transformers' field names) and model.safetensors."""
        config = self.config.to_hf_dict()
        config["dtype"] = str(self.backbone.embeddings.weight.dtype).removeprefix("torch.")
        checkpoint.save_weights(self.state_dict(), path, config)


class MambaTokenizer:
    """GPT-NeoX's byte-level BPE, read from the tokenizer.json that ships with the Mamba checkpoints.

    encode adds no BOS (Mamba was trained without one); <|endoftext|> (id 0) is the end-of-sequence token.
    """

    def __init__(self, path: str):
        from tokenizers import Tokenizer
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file}: no tokenizer.json (the GPT-NeoX-20B tokenizer that ships with "
                                    f"state-spaces/mamba-*-hf; copy it next to the weights)")
        self.tokenizer = Tokenizer.from_file(file)
        self.eos_token_id = self.tokenizer.token_to_id("<|endoftext|>")
        if self.eos_token_id is None:
            raise ValueError(f"{file}: the vocabulary has no <|endoftext|> token")

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


def main(argv: list[str] | None = None) -> str:
    """Command line: generate a continuation of --prompt with the Mamba checkpoint in --model; prints and returns it."""
    p = argparse.ArgumentParser(description="Generate text with a Mamba language model checkpoint.")
    p.add_argument("--model", required=True, help="folder with config.json, the weights and tokenizer.json")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    paper = sampling.PAPER_SAMPLING
    p.add_argument("--temperature", type=float, default=paper["temperature"])
    p.add_argument("--top-k", type=int, default=paper["top_k"])
    p.add_argument("--top-p", type=float, default=paper["top_p"])
    p.add_argument("--repetition-penalty", type=float, default=paper["repetition_penalty"])
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not os.path.isdir(args.model):
        raise SystemExit(f"--model {args.model}: not a folder")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    try:
        tokenizer = MambaTokenizer(args.model)
        model = MambaLM.from_pretrained(args.model, dtype=dtype, device=args.device)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    ids = torch.tensor([tokenizer.encode(args.prompt)], device=args.device)
    if ids.numel() == 0:
        raise SystemExit("--prompt is empty")
    generator = torch.Generator(args.device).manual_seed(args.seed)
    new = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=not args.greedy,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         repetition_penalty=args.repetition_penalty, eos_token_id=tokenizer.eos_token_id,
                         generator=generator)[0].tolist()
    if tokenizer.eos_token_id in new:
        new = new[:new.index(tokenizer.eos_token_id)]
    text = tokenizer.decode(new)
    print(args.prompt + text)
    return text


if __name__ == "__main__":
    main()
