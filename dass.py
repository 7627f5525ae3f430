"""DASS: the state-space audio encoder of the paper (§III-B), a VMamba-v2 ("v05_noz") network over the fbank image.

Glossary (code name -> meaning; SS2D runs eqs. (3)-(6) through scan.selective_scan):
    x           the fbank image, H = frequency (128 mel bins), W = time (frames)      (B, 1, H, W)
    d           channels of a stage: dims = 96, 192, 384, 768
    H, W        the map size at a stage: H = 32, 16, 8, 4 and W = ceil(frames / 4 ... / 32)
    K = 4       scan directions over the L = H*W positions (the "cross scan"):
                  k0 row-major (time fastest), k1 column-major (frequency fastest), k2 = reverse(k0), k3 = reverse(k1)
    N, R        d_state, the SSM state size per channel (1 in DASS); dt_rank = ceil(d / 16), Δ's bottleneck
    x_proj      per direction: x_t -> (Δ_t before dt_proj (R), B_t (N), C_t (N))     x_proj_weight (K, R+2N, d)
    dt_projs    per direction: R -> d, bias used as the scan's delta_bias           dt_projs_weight (K, d, R)
    A_logs, Ds  A = -exp(A_logs) and the skip D, per direction and channel         (K*d, N), (K*d,)

Data flow: (B, T, 128) fbank -> patch_embed (stride 4) -> 4 stages of VSS blocks, a stride-2 conv between stages
-> classifier.norm -> `features` (B, 768, 4, ceil(T/32)); their mean -> classifier.head -> 527 AudioSet logits.

Differences from the official code (github.com/Saurabhbhati/DASS, VMamba), none of which changes the function:
activations stay channel-last (B, H, W, C) between the convolutions, so every norm and 1x1 projection is a plain
nn.LayerNorm / nn.Linear; cross-scan and cross-merge are flatten / transpose / flip, not Triton kernels (the four
directions still run as one grouped scan); fp32 unless the caller casts (the official model runs under fp16
autocast: ~1e-2 on logits); no stochastic depth (a training regulariser); long inputs go in windows (`features`).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from scan import init_A_and_delta_bias, selective_scan

WINDOW = 8192  # frames (81.92 s) per pass for long audio; see DASS.features


@dataclass
class DASSConfig:
    """Defaults are DASS-small as used in the paper; `medium()` only deepens stage 2."""
    dims: tuple[int, ...] = (96, 192, 384, 768)
    depths: tuple[int, ...] = (2, 2, 8, 2)
    d_state: int = 1          # N
    mlp_ratio: float = 4.0
    n_classes: int = 527      # AudioSet
    n_mels: int = 128

    def __post_init__(self):
        self.dims, self.depths = tuple(self.dims), tuple(self.depths)
        if len(self.dims) != len(self.depths) or not self.dims:
            raise ValueError(f"dims {self.dims} and depths {self.depths} must be non-empty and of equal length")

    @classmethod
    def small(cls) -> DASSConfig:
        return cls(depths=(2, 2, 8, 2))

    @classmethod
    def medium(cls) -> DASSConfig:
        return cls(depths=(2, 2, 20, 2))


class Permute(nn.Module):
    """Channel-first <-> channel-last in nn.Sequential, at the official indices (keys patch_embed.{0,2,5,7} ...)."""

    def __init__(self, *dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(*self.dims)


def cross_scan(x: Tensor) -> Tensor:
    """(B, d, H, W) -> (B, K=4, d, H*W): the four scan orders over the map."""
    k0 = x.flatten(2)                                     # row-major: along time within each frequency row
    k1 = x.transpose(2, 3).flatten(2)                     # column-major: along frequency within each frame
    return torch.stack([k0, k1, k0.flip(-1), k1.flip(-1)], dim=1)


def cross_merge(ys: Tensor, H: int, W: int) -> Tensor:
    """(B, 4, d, H*W) -> (B, d, H, W): each direction's outputs back at their (h, w) positions, summed."""
    B, _, d, _ = ys.shape
    row = ys[:, 0] + ys[:, 2].flip(-1)                    # k0 and reverse(k2), both row-major
    col = ys[:, 1] + ys[:, 3].flip(-1)                    # k1 and reverse(k3), both column-major
    return row.view(B, d, H, W) + col.view(B, d, W, H).transpose(2, 3)


class SS2D(nn.Module):
    """The 2-D selective scan: Mamba's selective SSM run along four scan orders of the feature map."""

    def __init__(self, d: int, d_state: int = 1):
        super().__init__()
        R, N, K = math.ceil(d / 16), d_state, 4
        self.dt_rank, self.d_state = R, N
        self.in_proj = nn.Linear(d, d, bias=False)
        self.conv2d = nn.Conv2d(d, d, kernel_size=3, padding=1, groups=d, bias=False)  # depthwise
        self.x_proj_weight = nn.Parameter(torch.empty(K, R + 2 * N, d))
        self.dt_projs_weight = nn.Parameter(torch.empty(K, d, R))
        self.dt_projs_bias = nn.Parameter(torch.empty(K, d))
        self.A_logs = nn.Parameter(torch.empty(K * d, N))
        self.Ds = nn.Parameter(torch.empty(K * d))
        self.out_norm = nn.LayerNorm(d)
        self.out_proj = nn.Linear(d, d, bias=False)
        with torch.no_grad():  # the official (Mamba / VMamba "v0") initialisation of the SSM parameters
            nn.init.uniform_(self.x_proj_weight, -d ** -0.5, d ** -0.5)  # nn.Linear's default, for K stacked Linears
            nn.init.uniform_(self.dt_projs_weight, -R ** -0.5, R ** -0.5)
            init_A_and_delta_bias(self.A_logs, self.dt_projs_bias)      # A = -(1..N), Δ log-uniform in [1e-3, 0.1]
            self.Ds.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, W, d) -> (B, H, W, d)."""
        B, H, W, d = x.shape
        L, R, N = H * W, self.dt_rank, self.d_state
        f32 = torch.promote_types(self.Ds.dtype, torch.float32)  # the SSM parameters in fp32 under bf16 (fp64 stays)
        x = self.in_proj(x).permute(0, 3, 1, 2)                        # (B, d, H, W)
        x = F.silu(self.conv2d(x))
        xs = cross_scan(x)                                             # (B, 4, d, L)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)  # (B, 4, R+2N, L)
        dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)  # (B, 4, d, L)   Δ before bias, softplus
        ys = selective_scan(                                           # eqs. (3)-(6), direction k = group k
            xs.reshape(B, 4 * d, L), dts.reshape(B, 4 * d, L),
            -torch.exp(self.A_logs.to(f32)), Bs, Cs, D=self.Ds.to(f32),
            delta_bias=self.dt_projs_bias.to(f32).reshape(-1), delta_softplus=True,
        )                                                              # (B, 4d, L)
        y = cross_merge(ys.view(B, 4, d, L), H, W)                     # (B, d, H, W)
        return self.out_proj(self.out_norm(y.permute(0, 2, 3, 1)))


class VSSBlock(nn.Module):
    """Pre-norm residual block: x + SS2D(LN(x)), then x + MLP(LN(x)). Channel-last (B, H, W, d)."""

    def __init__(self, d: int, d_state: int, mlp_ratio: float):
        super().__init__()
        self.norm, self.op, self.norm2 = nn.LayerNorm(d), SS2D(d, d_state), nn.LayerNorm(d)
        hidden = int(d * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(d, hidden), act=nn.GELU(), fc2=nn.Linear(hidden, d)))

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, d) -> (B, H, W, d)."""
        x = x + self.op(self.norm(x))
        return x + self.mlp(self.norm2(x))


class Stage(nn.Module):
    def __init__(self, d: int, depth: int, d_out: int | None, d_state: int, mlp_ratio: float):
        super().__init__()
        self.blocks = nn.ModuleList(VSSBlock(d, d_state, mlp_ratio) for _ in range(depth))
        self.downsample = None if d_out is None else nn.Sequential(   # stride-2 conv: H, W -> ceil(H/2), ceil(W/2)
            Permute(0, 3, 1, 2), nn.Conv2d(d, d_out, 3, stride=2, padding=1), Permute(0, 2, 3, 1), nn.LayerNorm(d_out))

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, d) -> (B, ceil(H/2), ceil(W/2), d_out), or (B, H, W, d) for the last stage."""
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class DASS(nn.Module):
    def __init__(self, config: DASSConfig | None = None):
        super().__init__()
        self.config = c = config or DASSConfig()
        d0 = c.dims[0]
        self.patch_embed = nn.Sequential(                              # (B, 1, H, W) -> (B, H/4, W/4, d0)
            nn.Conv2d(1, d0 // 2, 3, stride=2, padding=1), Permute(0, 2, 3, 1), nn.LayerNorm(d0 // 2),
            Permute(0, 3, 1, 2), nn.GELU(), nn.Conv2d(d0 // 2, d0, 3, stride=2, padding=1), Permute(0, 2, 3, 1),
            nn.LayerNorm(d0))
        self.layers = nn.ModuleList(
            Stage(d, depth, c.dims[i + 1] if i + 1 < len(c.dims) else None, c.d_state, c.mlp_ratio)
            for i, (d, depth) in enumerate(zip(c.dims, c.depths)))
        self.classifier = nn.ModuleDict(dict(norm=nn.LayerNorm(c.dims[-1]), head=nn.Linear(c.dims[-1], c.n_classes)))
        for m in self.modules():        # the official initialisation (SS2D sets its own SSM parameters)
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _features(self, x: Tensor) -> Tensor:
        """One pass. x: (B, T, n_mels) -> (B, dims[-1], ceil(n_mels/32), ceil(T/32))."""
        x = self.patch_embed(x.transpose(1, 2).unsqueeze(1))           # (B, 1, F, T) -> (B, F/4, T/4, d0)
        for stage in self.layers:
            x = stage(x)
        return self.classifier["norm"](x).permute(0, 3, 1, 2)          # (B, C, F/32, T/32)

    def features(self, x: Tensor, window: int | None = WINDOW) -> Tensor:
        """The feature map the LALM consumes: (B, T, 128) fbank -> (B, 768, 4, ceil(T/32)) (channels, freq, time).
        Inputs longer than `window` frames (a multiple of 32; None: one pass) go in windows encoded independently
        and concatenated along time: memory stays that of one window (one pass over an hour needs tens of GB)."""
        if x.dim() != 3 or x.shape[1] == 0 or x.shape[-1] != self.config.n_mels:
            raise ValueError(f"DASS expects a (batch, frames > 0, {self.config.n_mels}) fbank; got {tuple(x.shape)}")
        T = x.shape[1]
        if window is None or T <= window:
            return self._features(x)
        stride = 2 ** (len(self.config.dims) + 1)  # input frames per output time step: 4 x 2 per downsample
        if window % stride:
            raise ValueError(f"window must be a multiple of {stride} frames; got {window}")
        return torch.cat([self._features(x[:, s:s + window]) for s in range(0, T, window)], dim=-1)

    def forward(self, x: Tensor, window: int | None = WINDOW) -> Tensor:
        """(B, T, 128) fbank -> (B, n_classes) logits: mean of `features` over frequency and time, then the head."""
        return self.classifier["head"](self.features(x, window).mean(dim=(2, 3)))
