"""LoRA: low-rank adapters on the frozen LLM's linear layers (paper §III-C, "Low-rank Adapters").

Glossary (code name -> LoRA paper symbol):
    weight   W0   the frozen pretrained weight                        (out, in)
    lora_A   A    down-projection, Kaiming-uniform at start           (r, in)
    lora_B   B    up-projection, zero at start, so W0 + ΔW = W0       (out, r)
    scaling  α/r  with alpha α = 16 and rank r = 8 in the paper
    y = W0 x + (α/r)·B A dropout(x);  merged: W = W0 + (α/r)·B A

The paper puts adapters on LLaMA's query and key projections (4,194,304 parameters for Vicuna-7B) and on Mamba's
input projection (6,553,600 for Mamba-2.8B): `PAPER_TARGETS`, `PAPER_LORA`. A wrapped layer keeps its own `weight`
(and `bias`) and gains `lora_A.weight`, `lora_B.weight`, so the model's state_dict keys are unchanged and the adapter
keys are those of PEFT without its adapter name; `export_peft` / `import_peft` read and write PEFT's adapter format
(`adapter_config.json` + `adapter_model.safetensors`, keys `base_model.model.<module>.lora_A.weight`).
Adapters are kept in fp32 by default, also on a bf16 model (PEFT does the same), and run in autocast's dtype.
"""
from __future__ import annotations

import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

PAPER_TARGETS = {"llama": ("q_proj", "k_proj"), "mamba": ("in_proj",)}
PAPER_LORA = dict(r=8, alpha=16, dropout=0.05)
PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Linear):
    """An nn.Linear with a low-rank update; it takes over the base layer's weight and bias (no copy)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, dtype: torch.dtype | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        kw = dict(bias=False, device=base.weight.device, dtype=dtype)
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
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return y + (update * self.scaling).to(y.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}, merged={self.merged}"


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    """PEFT's rule for a list of target names: the module's full name is a target or ends with '.' + target."""
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model: nn.Module, targets: tuple[str, ...] | str = PAPER_TARGETS["llama"], r: int = PAPER_LORA["r"],
             alpha: float = PAPER_LORA["alpha"], dropout: float = PAPER_LORA["dropout"],
             dtype: torch.dtype | None = torch.float32) -> list[str]:
    """Wrap every nn.Linear whose name is, or ends with, one of targets; freeze every other parameter of model.
    Returns the wrapped module names. dtype: the adapters' dtype (None: the base weight's)."""
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    found = [(name, m) for name, m in model.named_modules() if name and _matches(name, targets)]
    for name, m in found:
        if isinstance(m, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter")
        if type(m) is not nn.Linear:
            raise TypeError(f"{name} matches the LoRA targets {targets} but is a {type(m).__name__}, not nn.Linear")
    if not found:
        raise ValueError(f"no module of {type(model).__name__} is named {targets}")
    for name, m in found:
        parent, _, child = name.rpartition(".")
        wrapped = LoRALinear(m, r, alpha, dropout, dtype or m.weight.dtype).train(m.training)  # keep eval mode
        setattr(model.get_submodule(parent), child, wrapped)
    model.requires_grad_(False)
    for p in lora_parameters(model):
        p.requires_grad_(True)
    return [name for name, _ in found]


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (A and B of every wrapped layer), e.g. for the optimiser."""
    return [p for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """W ← W + (α/r)·B A in every wrapped layer (for inference); returns how many layers were merged.
    In bf16/fp16 weights, merge followed by unmerge does not give back W exactly (rounding)."""
    todo = [m for m in lora_modules(model).values() if not m.merged]
    for m in todo:
        m.weight += m.delta_weight().to(m.weight.dtype)
        m.merged = True
    return len(todo)


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> int:
    """Undo merge_lora: W ← W - (α/r)·B A; returns how many layers were unmerged."""
    todo = [m for m in lora_modules(model).values() if m.merged]
    for m in todo:
        m.weight -= m.delta_weight().to(m.weight.dtype)
        m.merged = False
    return len(todo)


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """{'<module>.lora_A.weight': (r, in), '<module>.lora_B.weight': (out, r)} for every wrapped layer."""
    return {f"{name}.lora_{ab}.weight": getattr(m, f"lora_{ab}").weight.detach()
            for name, m in lora_modules(model).items() for ab in "AB"}


def _hyper(model: nn.Module) -> dict:
    """The r, alpha, dropout shared by all adapters of model (an error if there are none or they differ)."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters (call add_lora first)")
    hyper = {(m.r, m.alpha, m.dropout) for m in mods.values()}
    if len(hyper) > 1:
        raise ValueError(f"adapters with different (r, alpha, dropout) cannot be described by one config: {hyper}")
    r, alpha, dropout = hyper.pop()
    return dict(r=r, alpha=alpha, dropout=dropout)


def _check_hyper(model: nn.Module, r: int, alpha: float, source: str):
    have = _hyper(model)
    if (have["r"], have["alpha"]) != (r, alpha):
        raise ValueError(f"{source}: adapters have r={r}, alpha={alpha}; the model's have r={have['r']}, "
                         f"alpha={have['alpha']}")


@torch.no_grad()
def _load_tensors(model: nn.Module, tensors: dict[str, Tensor], source: str):
    """Copy adapter tensors into model's adapters after checking that the keys and shapes agree exactly."""
    merged = [name for name, m in lora_modules(model).items() if m.merged]
    if merged:
        raise ValueError(f"{source}: the adapters of {merged[0]} (and {len(merged) - 1} more) are merged into the "
                         "weights; call unmerge_lora(model) before loading adapters")
    own = lora_state_dict(model)
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise KeyError(f"{source}: missing adapter keys {missing[:6]}{' ...' if len(missing) > 6 else ''}, "
                       f"unexpected keys {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
    for key, t in tensors.items():
        if t.shape != own[key].shape:
            raise ValueError(f"{source}: {key} has shape {tuple(t.shape)}, the model's adapter {tuple(own[key].shape)}")
    for key, t in tensors.items():
        own[key].copy_(t)


def save_lora(model: nn.Module, path: str):
    """Write the adapters alone to a safetensors file; r, alpha, dropout go into its metadata."""
    from safetensors.torch import save_file
    meta = {"format": "pt", "lora": json.dumps(_hyper(model))}
    save_file({k: v.contiguous() for k, v in lora_state_dict(model).items()}, path, metadata=meta)


def load_lora(model: nn.Module, path: str):
    """Load adapters written by save_lora into a model that add_lora has given the same adapters."""
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("lora", "null"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta is None:
        raise ValueError(f"{path}: no 'lora' metadata (not written by save_lora)")
    _check_hyper(model, meta["r"], meta["alpha"], path)
    _load_tensors(model, tensors, path)


# --- PEFT's adapter format -----------------------------------------------------------------------------------------

def export_peft(model: nn.Module, directory: str, base_model_name_or_path: str | None = None,
                task_type: str = "CAUSAL_LM"):
    """Write adapter_config.json + adapter_model.safetensors so that peft's PeftModel.from_pretrained(transformers
    model, directory) loads the adapters (our module names are the HF ones)."""
    from safetensors.torch import save_file
    hyper = _hyper(model)
    names = list(lora_modules(model))
    targets = sorted({n.rpartition(".")[2] for n in names})
    covered = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, tuple(targets))]
    if covered != names:
        raise ValueError(f"adapters sit on a subset of the layers named {targets}; PEFT's target_modules list "
                         f"would put them on all {len(covered)}")
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "r": hyper["r"], "lora_alpha": hyper["alpha"], "lora_dropout": hyper["dropout"],
        "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
    }
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tensors = {PEFT_PREFIX + k: v.contiguous() for k, v in lora_state_dict(model).items()}
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})


def import_peft(model: nn.Module, directory: str) -> list[str]:
    """Load a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors or adapter_model.bin).
    A model without adapters gets them (add_lora with the config's targets, r, alpha, dropout). Returns the names of
    the wrapped modules. Features of PEFT that this module does not implement are refused by name."""
    config_file = os.path.join(directory, "adapter_config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{directory}: no adapter_config.json")
    with open(config_file) as f:
        cfg = json.load(f)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{config_file}: peft_type {cfg.get('peft_type')!r} is not LORA")
    defaults = {"bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
                "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}
    for field, plain in defaults.items():
        if cfg.get(field, plain) not in (plain, None, [], {}):  # None, [] and {} also mean "not used"
            raise ValueError(f"{config_file}: {field} = {cfg[field]!r} is not supported (only {plain!r})")
    if not isinstance(cfg["target_modules"], list):
        raise ValueError(f"{config_file}: target_modules must be a list of names; got {cfg['target_modules']!r}")
    weights = [os.path.join(directory, n) for n in ("adapter_model.safetensors", "adapter_model.bin")]
    weights = [w for w in weights if os.path.isfile(w)]
    if not weights:
        raise FileNotFoundError(f"{directory}: no adapter_model.safetensors or adapter_model.bin")
    if weights[0].endswith(".safetensors"):
        from safetensors.torch import load_file
        tensors = load_file(weights[0])
    else:
        tensors = torch.load(weights[0], map_location="cpu", weights_only=True)
    foreign = [k for k in tensors if not k.startswith(PEFT_PREFIX)]
    if foreign:
        raise KeyError(f"{weights[0]}: keys without the PEFT prefix {PEFT_PREFIX!r}: {foreign[:6]}")
    if not lora_modules(model):
        add_lora(model, tuple(cfg["target_modules"]), cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0))
    _check_hyper(model, cfg["r"], cfg["lora_alpha"], config_file)
    _load_tensors(model, {k[len(PEFT_PREFIX):]: v for k, v in tensors.items()}, weights[0])
    return list(lora_modules(model))
