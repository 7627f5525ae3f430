"""Reading and writing checkpoint folders in the Hugging Face layout, for the language models (mamba.py, llama.py).

A folder holds config.json and the weights in one of four layouts, tried in this order (as transformers does):
    model.safetensors                 one file
    model.safetensors.index.json      shards: its weight_map names the file of every key
    pytorch_model.bin                 one torch.save'd state dict (older checkpoints)
    pytorch_model.bin.index.json      shards of those

Loading is strict (as in nanoGPT / llama2.c): every key of the model must be read exactly once with the right shape,
and each missing, unexpected, repeated or mis-shaped key is an error that names the key and the file. Tensors are
read one at a time and put into a model built on the meta device, so the weights are never held twice.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch
from torch import Tensor, nn

LAYOUTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def config_file(path: str, what: str) -> str:
    """path/config.json, or FileNotFoundError saying that `what` (e.g. "a Mamba checkpoint folder") was expected."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: no config.json ({what} is expected)")
    return file


def weight_files(path: str) -> list[str]:
    """The folder's weight files in the first layout found: a single file, or the shards its index lists."""
    for name in LAYOUTS:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        if not name.endswith(".index.json"):
            return [file]
        with open(file) as f:
            shards = [os.path.join(path, s) for s in sorted(set(json.load(f)["weight_map"].values()))]
        absent = [s for s in shards if not os.path.isfile(s)]
        if absent:
            raise FileNotFoundError(f"{file} lists shard(s) that do not exist: {absent}")
        return shards
    raise FileNotFoundError(f"{path}: no weights (expected {', '.join(LAYOUTS[:-1])} or {LAYOUTS[-1]})")


def read_tensors(file: str, device: torch.device | str | None = None) -> Iterator[tuple[str, Tensor]]:
    """Yield (key, tensor) from one .safetensors or .bin file, one tensor at a time, on device (default: CPU).

    A .bin file is memory-mapped and each tensor leaves the mapping as it is yielded (moved to device if given).
    """
    device = torch.device("cpu" if device is None else device)
    if file.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(file, framework="pt", device=str(device)) as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
    else:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        while state:
            key, tensor = state.popitem()
            yield key, tensor.to(device)


def load_weights(model: nn.Module, path: str, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, rename: dict[str, str] | None = None,
                 skip: tuple[str, ...] = (), fp32: tuple[str, ...] = (),
                 aside: tuple[str, ...] = ()) -> dict[str, tuple[str, Tensor]]:
    """Put every parameter of `model` (built on the meta device) in place from the weight files of folder `path`.

    dtype: None keeps the stored dtype, else every tensor is cast to it except those whose name ends with one of
    `fp32`, which become fp32. rename: {checkpoint prefix: model prefix}, for checkpoints that name a module
    differently. Keys ending with one of `skip` are ignored (stored buffers the model computes itself); keys in
    `aside` are not parameters but are returned as {key: (file, tensor)} for the caller to check.
    Raises, naming the key and the file, on an unexpected, repeated, mis-shaped or missing key.
    """
    params = {name: tuple(p.shape) for name, p in model.named_parameters()}
    files = weight_files(path)
    seen: dict[str, str] = {}  # parameter name -> the file it was read from
    extra: dict[str, tuple[str, Tensor]] = {}
    for file in files:
        for key, tensor in read_tensors(file, device):
            if key.endswith(skip):
                continue
            if key in aside:
                extra[key] = (file, tensor)
                continue
            name = next((new + key[len(old):] for old, new in (rename or {}).items() if key.startswith(old)), key)
            if name not in params:
                raise KeyError(f"{file}: unexpected key {key!r} (not a parameter of {type(model).__name__})")
            if name in seen:
                raise KeyError(f"{file}: key {key!r} appears twice in the checkpoint (also in {seen[name]})")
            if tuple(tensor.shape) != params[name]:
                raise ValueError(f"{file}: {key!r} has shape {tuple(tensor.shape)}, expected {params[name]} from "
                                 f"{os.path.join(path, 'config.json')}")
            target = torch.float32 if name.endswith(fp32) else dtype or tensor.dtype
            module, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(module), leaf, nn.Parameter(tensor.to(target)))
            seen[name] = file
    missing = [name for name in params if name not in seen]
    if missing:
        raise KeyError(f"{path}: missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)} in "
                       f"all; read {[os.path.basename(f) for f in files]})")
    return extra


def save_weights(state: dict[str, Tensor], path: str, config: dict) -> None:
    """Write the folder `path`: config.json (the dict `config`) and model.safetensors (the tensors of `state`)."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
