"""LoRA: low-rank adapters on the frozen LLM's linear layers (paper §III-C, "Low-rank Adapters").

    y = W0 x + (α/r)·B A dropout(x);  merged: W = W0 + (α/r)·B A
W0 is the frozen `weight` (out, in); A is `lora_A` (r, in), Kaiming-uniform at start; B is `lora_B` (out, r), zero
at start. The paper: r = 8, α = 16 (`PAPER_LORA`) on LLaMA's q_proj and k_proj (4,194,304 parameters for Vicuna-7B)
and on Mamba's in_proj (6,553,600 for Mamba-2.8B): `PAPER_TARGETS`. The adapter keys are PEFT's without the adapter
name. Written here rather than taken from PEFT (the test oracle): the layer shows the paper's update.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

PAPER_TARGETS = {"llama": ("q_proj", "k_proj"), "mamba": ("in_proj",)}
PAPER_LORA = dict(r=8, alpha=16, dropout=0.05)


class LoRALinear(nn.Linear):
    """An nn.Linear with a low-rank update; it takes over the base layer's weight and bias (no copy)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        kw = dict(bias=False, device=base.weight.device, dtype=torch.float32)  # fp32 on a bf16 model, as PEFT
        self.lora_A = nn.Linear(self.in_features, r, **kw)
        self.lora_B = nn.Linear(r, self.out_features, **kw)
        self.lora_dropout = nn.Dropout(dropout)
        self.r, self.alpha, self.dropout, self.scaling = r, alpha, dropout, alpha / r
        self.merged = False
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as PEFT
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> Tensor:
        """ΔW = (α/r)·B A, (out, in), fp32."""
        return self.lora_B.weight.float() @ self.lora_A.weight.float() * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out). When merged, W already holds ΔW and the adapter path is skipped."""
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))  # B A dropout(x)
        return y + (update * self.scaling).to(y.dtype)  # W0 x + (α/r)·B A dropout(x)


def is_target(name: str, targets: tuple[str, ...]) -> bool:
    """PEFT's rule for a list of target names: the module's full name is a target or ends with '.' + target."""
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model: nn.Module, targets: tuple[str, ...] = PAPER_TARGETS["llama"], r: int = PAPER_LORA["r"],
             alpha: float = PAPER_LORA["alpha"], dropout: float = PAPER_LORA["dropout"]) -> list[str]:
    """Wrap every nn.Linear named by targets (see is_target), freeze the rest of model -> the wrapped names."""
    found = [(name, m) for name, m in model.named_modules() if name and is_target(name, targets)]
    for name, m in found:
        if isinstance(m, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter")
        if type(m) is not nn.Linear:
            raise TypeError(f"{name} matches the LoRA targets {targets} but is a {type(m).__name__}, not nn.Linear")
    if not found:
        raise ValueError(f"no module of {type(model).__name__} is named {targets}")
    for name, m in found:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(m, r, alpha, dropout).train(m.training))
    model.requires_grad_(False)
    for p in lora_parameters(model):
        p.requires_grad_(True)
    return [name for name, _ in found]


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (A and B of every wrapped layer), e.g. for the optimiser."""
    return [p for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


@torch.no_grad()
def merge_lora(model: nn.Module, merged: bool = True) -> int:
    """W ← W + (α/r)·B A in every wrapped layer not merged yet (merged=False: W ← W - (α/r)·B A in every merged
    one); returns how many layers changed. In bf16/fp16 weights, merging and unmerging does not give back W exactly."""
    todo = [m for m in lora_modules(model).values() if m.merged != merged]
    for m in todo:
        m.weight.add_(m.delta_weight().to(m.weight.dtype), alpha=1 if merged else -1)
        m.merged = merged
    return len(todo)


def unmerge_lora(model: nn.Module) -> int:
    return merge_lora(model, merged=False)


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """{'<module>.lora_A.weight': (r, in), '<module>.lora_B.weight': (out, r)} for every wrapped layer."""
    return {f"{name}.lora_{ab}.weight": getattr(m, f"lora_{ab}").weight.detach()
            for name, m in lora_modules(model).items() for ab in "AB"}
