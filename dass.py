"""DASS: the state-space audio encoder of the paper (§III-B), a VMamba-v2 ("v05_noz") network over the fbank image.

Glossary (code name -> meaning; SS2D follows eqs. (3)-(6) through scan.selective_scan):
    x           the fbank image, H = frequency (128 mel bins), W = time (frames)      (B, 1, H, W)
    d           channels of a stage: dims = 96, 192, 384, 768
    H, W        the map size at a stage: H = 32, 16, 8, 4 and W = ceil(frames / 4 ... / 32)
    K = 4       scan directions over the H*W positions (the "cross scan"):
                  k0 row-major (time fastest), k1 column-major (frequency fastest), k2 = reverse(k0), k3 = reverse(k1)
    L = H*W     the length of each directional sequence
    N           d_state, the SSM state size per channel (1 in DASS)
    R           dt_rank = ceil(d / 16): Δ is produced through a rank-R bottleneck
    x_proj      per direction: x_t -> (Δ_t before dt_proj (R), B_t (N), C_t (N))     x_proj_weight (K, R+2N, d)
    dt_projs    per direction: R -> d, bias used as the scan's delta_bias           dt_projs_weight (K, d, R)
    A_logs, Ds  A = -exp(A_logs) and the skip D, per direction and channel         (K*d, N), (K*d,)

Data flow: (B, T, 128) fbank -> (B, 1, 128, T) -> patch_embed (stride 4) -> 4 stages of VSS blocks with a stride-2
conv between stages -> (B, 768, 4, ceil(T/32)) -> classifier.norm -> `features`; mean over (freq, time) ->
classifier.head -> 527 AudioSet logits.

Differences from the official code (github.com/Saurabhbhati/DASS, VMamba), none of which changes the function:
  * activations are kept channel-last (B, H, W, C) between the convolutions, so every LayerNorm and 1x1 projection
    is a plain nn.LayerNorm / nn.Linear; the official "LN2D" variant permutes inside each norm instead;
  * the four directions run as ONE grouped selective_scan call, as in the official v05 path; the cross-scan and
    cross-merge are written with flatten / transpose / flip instead of Triton kernels;
  * fp32 throughout unless the caller casts (the official model runs under fp16 autocast; ~1e-2 on logits);
  * stochastic depth (drop_path 0.2 / 0.3 in the official AudioSet training) is not implemented;
  * inputs longer than `window` frames are processed in independent windows (see `DASS.features`).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from scan import selective_scan

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
    """Channel-first <-> channel-last inside nn.Sequential (it keeps the official module indices, so the
    checkpoint keys patch_embed.{0,2,5,7} and downsample.{1,3} line up)."""

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


def _fp32(t: Tensor) -> Tensor:
    """The SSM parameters go to the scan in fp32 even when the model runs in bf16/fp16 (fp64 stays fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class SS2D(nn.Module):
    """The 2-D selective scan: Mamba's selective SSM run along four scan orders of the feature map."""

    def __init__(self, d: int, d_state: int = 1):
        super().__init__()
        R, N, K = math.ceil(d / 16), d_state, 4
        self.d, self.dt_rank, self.d_state = d, R, N
        self.in_proj = nn.Linear(d, d, bias=False)
        self.conv2d = nn.Conv2d(d, d, kernel_size=3, padding=1, groups=d, bias=False)  # depthwise
        self.x_proj_weight = nn.Parameter(torch.empty(K, R + 2 * N, d))
        self.dt_projs_weight = nn.Parameter(torch.empty(K, d, R))
        self.dt_projs_bias = nn.Parameter(torch.empty(K, d))
        self.A_logs = nn.Parameter(torch.empty(K * d, N))
        self.Ds = nn.Parameter(torch.empty(K * d))
        self.out_norm = nn.LayerNorm(d)
        self.out_proj = nn.Linear(d, d, bias=False)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4) -> None:
        """The official (Mamba / VMamba "v0") initialisation of the SSM parameters."""
        d, R, N = self.d, self.dt_rank, self.d_state
        nn.init.uniform_(self.x_proj_weight, -d ** -0.5, d ** -0.5)     # nn.Linear's default for K stacked Linears
        nn.init.uniform_(self.dt_projs_weight, -R ** -0.5, R ** -0.5)
        dt = torch.exp(torch.rand(self.dt_projs_bias.shape) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_floor)         # Δ log-uniform in [1e-3, 0.1] ...
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))   # ... through the inverse of softplus
        self.A_logs.copy_(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).expand(self.A_logs.shape))  # S4D
        self.Ds.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, W, d) -> (B, H, W, d)."""
        B, H, W, d = x.shape
        L, R, N = H * W, self.dt_rank, self.d_state
        x = self.in_proj(x).permute(0, 3, 1, 2)                        # (B, d, H, W)
        x = F.silu(self.conv2d(x))
        xs = cross_scan(x)                                             # (B, 4, d, L)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)  # (B, 4, R+2N, L)
        dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)  # (B, 4, d, L)   Δ before bias, softplus
        ys = selective_scan(                                           # eqs. (3)-(6), direction k = group k
            xs.reshape(B, 4 * d, L), dts.reshape(B, 4 * d, L),
            -torch.exp(_fp32(self.A_logs)), Bs.contiguous(), Cs.contiguous(), D=_fp32(self.Ds),
            delta_bias=_fp32(self.dt_projs_bias).reshape(-1), delta_softplus=True,
        )                                                              # (B, 4d, L)
        y = cross_merge(ys.view(B, 4, d, L), H, W)                     # (B, d, H, W)
        return self.out_proj(self.out_norm(y.permute(0, 2, 3, 1)))


class MLP(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))                           # exact (erf) GELU


class VSSBlock(nn.Module):
    """Pre-norm residual block: x + SS2D(LN(x)), then x + MLP(LN(x)). Channel-last (B, H, W, d)."""

    def __init__(self, d: int, d_state: int, mlp_ratio: float):
        super().__init__()
        self.norm, self.op = nn.LayerNorm(d), SS2D(d, d_state)
        self.norm2, self.mlp = nn.LayerNorm(d), MLP(d, int(d * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.op(self.norm(x))
        return x + self.mlp(self.norm2(x))


class Stage(nn.Module):
    def __init__(self, d: int, depth: int, d_out: int | None, d_state: int, mlp_ratio: float):
        super().__init__()
        self.blocks = nn.ModuleList(VSSBlock(d, d_state, mlp_ratio) for _ in range(depth))
        self.downsample = None if d_out is None else nn.Sequential(   # stride-2 conv: H, W -> ceil(H/2), ceil(W/2)
            Permute(0, 3, 1, 2), nn.Conv2d(d, d_out, 3, stride=2, padding=1), Permute(0, 2, 3, 1), nn.LayerNorm(d_out))

    def forward(self, x: Tensor) -> Tensor:
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

    @property
    def stride(self) -> int:
        """Input frames per output time step: 4 (patch embed) x 2 per downsample = 32."""
        return 2 ** (len(self.config.dims) + 1)

    def _features(self, x: Tensor) -> Tensor:
        """One pass. x: (B, T, n_mels) -> (B, dims[-1], ceil(n_mels/32), ceil(T/32))."""
        x = self.patch_embed(x.transpose(1, 2).unsqueeze(1))           # (B, 1, F, T) -> (B, F/4, T/4, d0)
        for stage in self.layers:
            x = stage(x)
        return self.classifier["norm"](x).permute(0, 3, 1, 2)          # (B, C, F/32, T/32)

    def features(self, x: Tensor, window: int | None = WINDOW) -> Tensor:
        """The feature map the LALM consumes: (B, T, 128) fbank -> (B, 768, 4, ceil(T/32)) (channels, freq, time).

        It is the last stage's output after classifier.norm (the map whose mean the head classifies).
        Inputs of at most `window` frames (or window=None) go through in one pass. Longer inputs are cut into
        consecutive windows of `window` frames (the last one shorter) that are encoded independently and
        concatenated along time; `window` must be a multiple of 32, so window i gives exactly time steps
        [i*window/32, (i+1)*window/32) and the total is still ceil(T/32). Compared with one pass over the whole
        input, the four scans restart from a zero state at every window and never see the other windows, and the
        3x3 convolutions see zero padding at window edges. Memory is then that of one `window`-frame pass
        (O(window), independent of T); the default 8192 frames keeps the largest scan at H*W = 32 x 2048 per
        direction. One pass over 60 minutes (360k frames) would need H*W = 32 x 90000 per direction at stage 0,
        several GB for each (B, 4*96, H*W) fp32 tensor, and tens of GB in total.
        """
        if x.dim() != 3 or x.shape[-1] != self.config.n_mels:
            raise ValueError(f"DASS expects a (batch, frames, {self.config.n_mels}) fbank; got {tuple(x.shape)}")
        T = x.shape[1]
        if T == 0:
            raise ValueError("DASS got an input with 0 frames")
        if window is None or T <= window:
            return self._features(x)
        if window % self.stride:
            raise ValueError(f"window must be a multiple of {self.stride} frames; got {window}")
        return torch.cat([self._features(x[:, s:s + window]) for s in range(0, T, window)], dim=-1)

    def forward(self, x: Tensor, window: int | None = WINDOW) -> Tensor:
        """(B, T, 128) fbank -> (B, n_classes) logits: mean of `features` over frequency and time, then the head."""
        return self.classifier["head"](self.features(x, window).mean(dim=(2, 3)))

    # ------------------------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path, config: DASSConfig | None = None,
                        map_location: str | torch.device = "cpu") -> DASS:
        """Load DASS weights from any of:
          * an official checkpoint (`DASS_small.pth`, a DataParallel state_dict, keys `module.v.*`);
          * a safetensors file written by `save_pretrained` (our keys; the config is in its metadata);
          * the Hugging Face port (keys `dass.*` and `head.*`): its `model.safetensors` / `pytorch_model.bin`,
            or the directory holding it.
        The config is taken from the file (ours) or inferred from the tensor shapes unless given. Every missing,
        unexpected or mis-shaped key raises ValueError naming the key and the file.
        """
        path = Path(path)
        state, meta_config = _read_checkpoint(path, map_location)
        config = config or meta_config or _infer_config(state, path)
        model = cls(config)
        model.load_checkpoint(state, path)
        return model

    def load_checkpoint(self, state: dict[str, Tensor], source: str | Path = "<state_dict>") -> None:
        """Strictly load a state dict in our key layout; errors list every bad key and name `source`."""
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in own.items() if k in state and state[k].shape != v.shape]
        if missing or unexpected or shapes:
            problems = [f"{what} ({len(keys)}): {', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''}"
                        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                           ("shape mismatches", shapes)) if keys]
            raise ValueError(f"DASS checkpoint {source} does not fit the model {self.config}: " + "; ".join(problems))
        self.load_state_dict(state)

    def save_pretrained(self, path: str | Path) -> None:
        """Write the weights (our key layout) and the config (in the metadata) to one safetensors file."""
        from safetensors.torch import save_file
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path), metadata={"format": "dass", "config": json.dumps(asdict(self.config))})


def _read_checkpoint(path: Path, map_location) -> tuple[dict[str, Tensor], DASSConfig | None]:
    """Any supported file -> (state dict in our key layout, config if the file carries one)."""
    if path.is_dir():
        found = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
        if not found:
            raise FileNotFoundError(f"DASS weights: directory {path} has no model.safetensors or pytorch_model.bin")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"DASS weights {path}: no such file (the official DASS_small.pth / DASS_medium.pth "
                                "are on the DASS GitHub releases page)")
    config = None
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path), device=str(map_location))
        if "config" in meta:
            config = DASSConfig(**json.loads(meta["config"]))
    else:
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:
            raise ValueError(f"DASS weights {path}: not a readable PyTorch checkpoint ({e})") from e
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"DASS weights {path}: expected a flat state_dict of tensors, got {type(state).__name__}")
    if state and all(k.startswith("module.v.") for k in state):        # official DataParallel checkpoint
        state = {k[len("module.v."):]: v for k, v in state.items()}
    elif any(k.startswith("dass.") for k in state):                    # Hugging Face port
        state = _from_hf_keys(state)
    return state, config


_HF_PATCH = {"0": "0", "1": "2", "3": "5", "4": "7"}  # HF patch_embeddings.projection.i -> official patch_embed.j


def _from_hf_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The HF port's names (Saurabhbhati/transformers-DASS, modeling_dass.py) -> ours.

    Its conversion script renames module.v.X -> dass.X with: patch_embed.{0,2,5,7} -> patch_embeddings.projection.
    {0,1,3,4}, downsample.{1,3} -> downsample.{down,norm}, classifier.norm -> norm, classifier.head -> head (no
    prefix); x_proj_weight (K, R+2N, d) and dt_projs_weight (K, d, R) become grouped 1x1 convs x_proj.weight
    (K(R+2N), d) and dt_projs.weight (K d, R). dt_projs_bias, A_logs, Ds keep their names and shapes.
    """
    out = {}
    for k, v in state.items():
        k = re.sub(r"^head\.", "classifier.head.", k)
        k = re.sub(r"^dass\.norm\.", "classifier.norm.", k)
        k = re.sub(r"^dass\.", "", k)
        k = re.sub(r"^patch_embeddings\.projection\.(\d)\.", lambda m: f"patch_embed.{_HF_PATCH.get(m[1], m[1])}.", k)
        k = k.replace("downsample.down.", "downsample.1.").replace("downsample.norm.", "downsample.3.")
        if k.endswith("op.x_proj.weight"):
            k, v = k.replace("x_proj.weight", "x_proj_weight"), v.reshape(4, -1, v.shape[-1])
        elif k.endswith("op.dt_projs.weight"):
            k, v = k.replace("dt_projs.weight", "dt_projs_weight"), v.reshape(4, -1, v.shape[-1])
        out[k] = v
    return out


def _infer_config(state: dict[str, Tensor], path: Path) -> DASSConfig:
    """Stage widths and depths, N, MLP ratio and class count from the tensor shapes of a state dict (our keys)."""
    blocks: dict[int, int] = {}
    for k in state:
        m = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", k)
        if m:
            blocks[int(m[1])] = max(blocks.get(int(m[1]), 0), int(m[2]) + 1)
    try:
        n_stages = len(blocks)
        dims = tuple(state[f"layers.{s}.blocks.0.norm.weight"].shape[0] for s in range(n_stages))
        return DASSConfig(dims=dims, depths=tuple(blocks[s] for s in range(n_stages)),
                          d_state=state["layers.0.blocks.0.op.A_logs"].shape[1],
                          mlp_ratio=state["layers.0.blocks.0.mlp.fc1.weight"].shape[0] / dims[0],
                          n_classes=state["classifier.head.weight"].shape[0])
    except (KeyError, ValueError) as e:
        raise ValueError(f"DASS weights {path}: cannot infer the model size (missing or odd key {e}); "
                         "is this a DASS checkpoint?") from e


# ----------------------------------------------------------------------------------------------------------------
# Command line: top-5 AudioSet labels of a clip
# ----------------------------------------------------------------------------------------------------------------

def read_labels(path: str | Path) -> list[str]:
    """AudioSet class_labels_indices.csv (columns index,mid,display_name) -> display names by index."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label file {path}: no such file")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"index", "mid", "display_name"} <= set(rows[0]):
        raise ValueError(f"label file {path}: expected the columns index,mid,display_name")
    names = {int(r["index"]): r["display_name"] for r in rows}
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"label file {path}: indices are not 0..{len(names) - 1}")
    return [names[i] for i in range(len(names))]


def main(argv: list[str] | None = None) -> None:
    import audio
    p = argparse.ArgumentParser(description="Tag an audio clip with DASS: print the top AudioSet labels.")
    p.add_argument("audio", help="audio file (any format and sample rate soundfile reads)")
    p.add_argument("--weights", required=True, help="DASS_small.pth / DASS_medium.pth, our .safetensors, or the HF port")
    p.add_argument("--labels", help="class_labels_indices.csv (index,mid,display_name); default: print indices")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    try:
        model = DASS.from_pretrained(args.weights).to(args.device).eval()
        labels = read_labels(args.labels) if args.labels else [f"class {i}" for i in range(model.config.n_classes)]
        if len(labels) != model.config.n_classes:
            raise ValueError(f"label file {args.labels} has {len(labels)} labels; the model has "
                             f"{model.config.n_classes} classes")
        wave = audio.load_audio(args.audio)
        frames = 1 + (wave.numel() - audio.FRAME_LENGTH) // audio.FRAME_SHIFT
        x = audio.dass_input(wave, audio.DASS_FRAMES if frames <= audio.DASS_FRAMES else None)  # pad short clips
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    with torch.no_grad():
        scores = torch.sigmoid(model(x[None].to(args.device)))[0].float().cpu()  # multi-label: independent sigmoids
    for s, i in zip(*scores.topk(min(args.top, len(labels)))):
        print(f"{s.item():.3f}  {labels[i]}")


if __name__ == "__main__":
    main()
