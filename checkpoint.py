"""Our checkpoints: the ssLALM built from pretrained parts; a trained model's folder, config.json ({"sslalm": the
SSLALMConfig fields, "llm_fingerprint": samples of the base LLM}) + model.safetensors (the trainable weights only, the
base LLM read again from where the config names); LoRA adapter files (ours, and PEFT's adapter folder).
"""
from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

import lora
import weights
from dass import DASSConfig
from sslalm import SSLALM, SSLALMConfig

FINGERPRINT_SAMPLES = 32  # values per fingerprinted tensor, at positions i · SPREAD mod size (i < 32): a prime step
SPREAD = 2654435761       # (Knuth's multiplicative hash) lands on every column of a matrix, unlike an even stride
PEFT_PREFIX = "base_model.model."


class CorruptCheckpoint(ValueError):
    """A checkpoint file that is truncated or corrupt, or holds objects this code never writes (refused unread)."""


def build(config: SSLALMConfig, device=None, dtype: torch.dtype | None = None, load_dass: bool = True) -> SSLALM:
    """The model of Fig. 1 from pretrained parts: DASS from config.dass_weights (unless not load_dass), the LLM (in
    `dtype`) and its tokenizer from config.llm_weights. A missing path says what to download."""
    needed = [("--llm-weights", config.llm_weights, config.llm), ("--dass-weights", config.dass_weights, "dass")]
    for flag, path, kind in needed[:1 + load_dass]:
        if not path or not Path(path).exists():
            raise FileNotFoundError(f"{flag} {path or '(not given)'}: not found; {weights.WHERE_TO_GET[kind]}")
    dass = None
    if load_dass:
        dass = weights.load_dass(config.dass_weights, config=DASSConfig(**config.dass) if config.dass else None)
        config.dass = config.dass or dass_fields(dass.config, config.size, config.dass_weights)
    llm = weights.LOADERS[config.llm](config.llm_weights, dtype=dtype, device=device)
    model = SSLALM(config, dass=dass, llm=llm, tokenizer=weights.load_tokenizer(config))
    return model.to(device) if device is not None else model


def dass_fields(found: DASSConfig, size: str, path: str) -> dict:
    """The config's `dass` fields for a DASS file of shapes `found`: {} for DASS `size` (the official DASS_small.pth /
    DASS_medium.pth), its own shapes, with a warning, for a DASS of no paper size. The other paper size is an error."""
    paper = {name: getattr(DASSConfig, name)() for name in ("small", "medium")}
    if found == paper.get(size):
        return {}
    other = [name for name, c in paper.items() if c == found]
    if other:
        raise ValueError(f"{path} holds DASS {other[0]}, not DASS {size}: pass --size {other[0]}, or the "
                         f"DASS_{size}.pth checkpoint")
    warnings.warn(f"{path} is no DASS of the paper (dims {found.dims}, depths {found.depths}); the model takes its "
                  "shapes", stacklevel=2)
    return asdict(found)


def save_checkpoint(model: SSLALM, path: str | os.PathLike) -> None:
    """config.json (written last) + model.safetensors, each flushed to disk before it replaces the old file. The
    config names the base weights by absolute path, or relative to `path` when they lie inside it (so that the folder
    can be moved as a whole)."""
    path = Path(path)
    home = path.resolve()
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in model.trainable_state_dict().items()}, str(path / "model.tmp"))
    config = asdict(model.config)
    for key in ("llm_weights", "dass_weights", "tokenizer"):
        if config[key]:
            where = Path(config[key]).resolve()
            config[key] = where.relative_to(home).as_posix() if where.is_relative_to(home) else str(where)
    meta = {"sslalm": config, "llm_fingerprint": llm_fingerprint(model.llm)}
    (path / "config.tmp").write_text(json.dumps(meta, indent=2))
    fsync(path / "model.tmp", path / "config.tmp")
    os.replace(path / "model.tmp", path / "model.safetensors")
    os.replace(path / "config.tmp", path / "config.json")
    fsync(path)


def fsync(*paths: Path) -> None:
    """Flush files to disk, or a folder's entries (a rename in it)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, device=None, dtype: torch.dtype | None = None,
                    llm_weights: str | None = None, tokenizer: str | None = None) -> SSLALM:
    """The trained model, in eval mode: the base LLM from where its config names (or `llm_weights`: the same weights,
    in any dtype), then the checkpoint's DASS, projector and LoRA weights on top."""
    path = Path(path)
    check_model_files(path)
    meta = json.loads((path / "config.json").read_text())
    if "sslalm" not in meta:
        raise ValueError(f"{path / 'config.json'} is not an ssLALM checkpoint config (no 'sslalm' entry)")
    config = SSLALMConfig.from_dict(meta["sslalm"])
    config.llm_weights = llm_weights or _resolve(config.llm_weights, path)
    config.tokenizer = tokenizer or _resolve(config.tokenizer, path)
    model = build(config, device=device, dtype=dtype, load_dass=False)
    expected = meta.get("llm_fingerprint")
    if not isinstance(expected, dict):
        warnings.warn(f"{path / 'config.json'} has no fingerprint of this kind: the base LLM weights are not checked")
    elif (differs := fingerprint_mismatch(expected, llm_fingerprint(model.llm))) is not None:
        raise ValueError(f"the LLM weights in {config.llm_weights} are not those {path} was trained on "
                         f"({differs} differs)")
    load_trainable(model, path)
    return model.eval()


def load_trainable(model: SSLALM, folder: str | os.PathLike) -> None:
    """Strictly load a checkpoint's trainable weights (folder/model.safetensors) into model, in place."""
    file = str(Path(folder) / "model.safetensors")
    tensors = ((key, tensor, file) for key, tensor in weights.read_tensors(file))
    weights.load_state(model, tensors, file, names=model.trainable_state_dict())


def _resolve(path: str | None, base: Path) -> str | None:
    """A path from a checkpoint's config: relative ones are relative to the checkpoint folder."""
    if path is None or Path(path).is_absolute():
        return path
    return str(base / path) if (base / path).exists() or not Path(path).exists() else path


def check_model_files(folder: Path) -> None:
    """config.json and model.safetensors are there and whole, or FileNotFoundError / CorruptCheckpoint names one."""
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not an ssLALM checkpoint: {name} is missing")
    try:
        json.loads((folder / "config.json").read_text(encoding="utf-8"))
        with safe_open(str(folder / "model.safetensors"), framework="pt"):
            pass
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCheckpoint(f"{folder / 'config.json'}: truncated or corrupt ({e})") from None
    except SafetensorError as e:
        raise CorruptCheckpoint(f"{folder / 'model.safetensors'}: truncated or corrupt ({e})") from None


def read_plain(file: Path):
    """trainer.pt or rng-rank{r}.pt, read with weights_only=True; truncated, or holding objects: CorruptCheckpoint."""
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file; a checkpoint folder is checkpoints/step-N of a run")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = "".join(f" ({line.strip()})" for line in str(e).splitlines() if "GLOBAL" in line)
        raise CorruptCheckpoint(f"{file}: refused unread: it holds objects other than tensors and plain containers"
                                f"{detail}, which trainer.py never writes; the file is corrupt or not ours") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CorruptCheckpoint(f"{file}: truncated or corrupt ({(str(e) or 'empty').splitlines()[0]})") from None


# ---- the base LLM's fingerprint ----------------------------------------------------------------------------------

def llm_fingerprint(llm: nn.Module) -> dict[str, list[float]]:
    """Samples of the base LLM's weights (the token embedding, every tensor of the last block and what follows it),
    rounded to bf16 so that they are the same whether the base is loaded in fp32 or bf16 (in fp16, up to one rounding
    step: see `fingerprint_mismatch`). Empty on the meta device."""
    adapters = {id(p) for p in lora.lora_parameters(llm)}
    params = [(n, p) for n, p in llm.named_parameters() if id(p) not in adapters]
    if not params or params[0][1].is_meta:
        return {}
    last = max(int(m[1]) for name, _ in params if (m := re.search(r"layers\.(\d+)\.", name)))
    start = next(i for i, (name, _) in enumerate(params) if f"layers.{last}." in name)
    samples = {}
    for name, p in [params[0], *params[start:]]:
        flat = p.detach().flatten()
        index = torch.tensor([i * SPREAD % flat.numel() for i in range(FINGERPRINT_SAMPLES)], device=flat.device)
        samples[name] = flat[index].to(torch.bfloat16).double().tolist()
    return samples


def fingerprint_mismatch(expected: dict[str, list[float]], found: dict[str, list[float]]) -> str | None:
    """The first tensor whose samples differ, or None. Two samples agree within one bf16 rounding step (2^-7 of
    the value: fp16 weights are rounded twice on their way to bf16) plus fp16's smallest step (2^-24)."""
    if not found:
        return None  # a model on the meta device has nothing to compare
    for name in sorted(expected.keys() | found.keys()):
        a, b = expected.get(name, []), found.get(name, [])
        if len(a) != len(b) or any(abs(x - y) > 2 ** -7 * max(abs(x), abs(y)) + 2 ** -24 for x, y in zip(a, b)):
            return name
    return None


# ---- LoRA adapter files ------------------------------------------------------------------------------------------

def _lora_settings(model: nn.Module) -> dict:
    """The r, alpha, dropout shared by all adapters of model (an error if there are none or they differ)."""
    settings = {(m.r, m.alpha, m.dropout) for m in lora.lora_modules(model).values()}
    if not settings:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters (call add_lora first)")
    if len(settings) > 1:
        raise ValueError(f"adapters with different (r, alpha, dropout) cannot be described by one config: {settings}")
    return dict(zip(("r", "alpha", "dropout"), settings.pop()))


def _load_adapters(model: nn.Module, tensors: dict, r: int, alpha: float, file: str) -> None:
    """Strictly copy adapter tensors into model's adapters, which must have this r and alpha and not be merged."""
    have = _lora_settings(model)
    if (have["r"], have["alpha"]) != (r, alpha):
        raise ValueError(f"{file}: adapters have r={r}, alpha={alpha}; the model's have r={have['r']}, "
                         f"alpha={have['alpha']}")
    merged = [name for name, m in lora.lora_modules(model).items() if m.merged]
    if merged:
        raise ValueError(f"{file}: the adapters of {merged[0]} (and {len(merged) - 1} more) are merged into the "
                         "weights; call unmerge_lora(model) before loading adapters")
    weights.load_state(model, ((k, v, file) for k, v in tensors.items()), file, names=lora.lora_state_dict(model))


def save_lora(model: nn.Module, path: str) -> None:
    """Write the adapters alone to a safetensors file; r, alpha, dropout go into its metadata."""
    meta = {"format": "pt", "lora": json.dumps(_lora_settings(model))}
    save_file({k: v.contiguous() for k, v in lora.lora_state_dict(model).items()}, str(path), metadata=meta)


def load_lora(model: nn.Module, path: str) -> None:
    """Load adapters written by save_lora into a model that add_lora has given the same adapters."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("lora", "null"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta is None:
        raise ValueError(f"{path}: no 'lora' metadata (not written by save_lora)")
    _load_adapters(model, tensors, meta["r"], meta["alpha"], str(path))


def export_peft(model: nn.Module, directory: str, base_model_name_or_path: str | None = None) -> None:
    """Write adapter_config.json + adapter_model.safetensors so that peft's PeftModel.from_pretrained(transformers
    model, directory) loads the adapters."""
    settings = _lora_settings(model)
    names = list(lora.lora_modules(model))
    targets = sorted({n.rpartition(".")[2] for n in names})
    covered = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and lora.is_target(n, tuple(targets))]
    if covered != names:
        raise ValueError(f"adapters sit on a subset of the layers named {targets}; PEFT's target_modules list "
                         f"would put them on all {len(covered)}")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
              "r": settings["r"], "lora_alpha": settings["alpha"], "lora_dropout": settings["dropout"],
              "target_modules": targets, "bias": "none", "inference_mode": True}  # PEFT's defaults for the rest
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    tensors = {PEFT_PREFIX + k: v.contiguous() for k, v in lora.lora_state_dict(model).items()}
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})


def import_peft(model: nn.Module, directory: str) -> list[str]:
    """Load a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors or .bin), adding the adapters
    to a model without them; PEFT features lora.py lacks are refused by name. Returns the wrapped modules' names."""
    directory = Path(directory)
    config_file = directory / "adapter_config.json"
    cfg = json.loads(config_file.read_text())  # FileNotFoundError names it
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{config_file}: peft_type {cfg.get('peft_type')!r} is not LORA")
    plain = {"bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
             "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}
    for field, value in plain.items():
        if cfg.get(field, value) not in (value, None, [], {}):  # None, [] and {} also mean "not used"
            raise ValueError(f"{config_file}: {field} = {cfg[field]!r} is not supported (only {value!r})")
    if not isinstance(cfg["target_modules"], list):
        raise ValueError(f"{config_file}: target_modules must be a list of names; got {cfg['target_modules']!r}")
    files = [str(p) for p in (directory / "adapter_model.safetensors", directory / "adapter_model.bin") if p.is_file()]
    if not files:
        raise FileNotFoundError(f"{directory}: no adapter_model.safetensors or adapter_model.bin")
    if not lora.lora_modules(model):
        lora.add_lora(model, tuple(cfg["target_modules"]), cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0))
    tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in weights.read_tensors(files[0])}  # others: unexpected keys
    _load_adapters(model, tensors, cfg["r"], cfg["lora_alpha"], files[0])
    return list(lora.lora_modules(model))
