"""The public checkpoint formats of the pretrained parts, loaded strictly into models built on the meta device:
    Mamba      a Hugging Face folder (state-spaces/mamba-2.8b-hf) or a mamba_ssm one (state-spaces/mamba-2.8b)
    LLaMA      a Hugging Face folder (lmsys/vicuna-7b-v1.5), transformers 4.x or 5.x config names
    DASS       the official DASS_small.pth / DASS_medium.pth (keys module.v.*), the Hugging Face port (keys dass.*,
               head.*) or our safetensors file (the config in its metadata)
    tokenizers GPT-NeoX's tokenizer.json (Mamba) and LLaMA's tokenizer.model, by the libraries that made them
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path

import sentencepiece
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer
from torch import Tensor, nn

from dass import DASS, DASSConfig
from llama import LlamaConfig, LlamaLM
from mamba import MambaConfig, MambaLM

LAYOUTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
WHERE_TO_GET = {
    "mamba": "the Mamba-2.8B folder: `huggingface-cli download state-spaces/mamba-2.8b-hf --local-dir DIR`",
    "llama": "the Vicuna-7B folder: `huggingface-cli download lmsys/vicuna-7b-v1.5 --local-dir DIR`",
    "dass": "a DASS checkpoint: DASS_small.pth or DASS_medium.pth from github.com/Saurabhbhati/DASS's releases",
}


def load_state(model: nn.Module, tensors: Iterable[tuple[str, Tensor, str]], source: str, *,
               names: Iterable[str] | None = None, dtype: torch.dtype | None = None, fp32: tuple = ()) -> None:
    """Put tensors (key, tensor, its file) into the parameters of `model` named `names` (default: all), each once
    with its shape, else one ValueError listing every bad key. A meta parameter becomes the tensor in dtype (None: as
    stored; fp32 for names ending with one of `fp32`), never held twice; any other is copied into."""
    params = dict(model.named_parameters())
    wanted = set(params) if names is None else set(names)
    seen: dict[str, str] = {}  # key -> the file it was read from
    problems: dict[str, list[str]] = {"unexpected keys": [], "repeated keys": [], "shape mismatches": []}
    for key, tensor, file in tensors:
        where = os.path.basename(file)
        if key not in wanted:
            problems["unexpected keys"].append(f"{key} (in {where})")
        elif key in seen:
            problems["repeated keys"].append(f"{key} (in {where} and {seen[key]})")
        elif tensor.shape != params[key].shape:
            problems["shape mismatches"].append(f"{key}: file {tuple(tensor.shape)} vs model "
                                                f"{tuple(params[key].shape)} (in {where})")
        elif params[key].is_meta:
            seen[key] = where
            module, _, leaf = key.rpartition(".")
            target = torch.float32 if key.endswith(fp32) else dtype or tensor.dtype
            value = tensor.to(target, copy=True)  # its own memory, not a view into a file's buffer or mapping
            setattr(model.get_submodule(module), leaf, nn.Parameter(value, requires_grad=params[key].requires_grad))
        else:
            seen[key] = where
            params[key].detach().copy_(tensor)
    problems = {"missing keys": sorted(wanted - set(seen)), **problems}
    listed = [f"{what} ({len(keys)}): {', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''}"
              for what, keys in problems.items() if keys]
    if listed:
        raise ValueError(f"{source} does not fit {type(model).__name__}: " + "; ".join(listed))


def config_file(path: str, what: str) -> str:
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: no config.json ({what} is expected)")
    return file


def refuse_unsupported(config: dict, need: dict, source: str) -> None:
    for key, want in need.items():
        if config.get(key, want) != want:
            raise ValueError(f"{source}: {key} = {config[key]!r} is not supported (only {want!r})")


def weight_files(path: str) -> list[str]:
    for name in LAYOUTS:
        file = os.path.join(path, name)
        if os.path.isfile(file) and name.endswith(".index.json"):
            shards = json.loads(Path(file).read_text())["weight_map"].values()
            return [os.path.join(path, s) for s in sorted(set(shards))]  # a missing one: FileNotFoundError on reading
        if os.path.isfile(file):
            return [file]
    raise FileNotFoundError(f"{path}: no weights (expected {', '.join(LAYOUTS[:-1])} or {LAYOUTS[-1]})")


def read_tensors(file: str, device: torch.device | str = "cpu") -> Iterator[tuple[str, Tensor]]:
    """Yield (key, tensor) from one .safetensors or .bin file, one tensor at a time, on device. A .bin file is
    memory-mapped and each tensor leaves the mapping as it is yielded."""
    if file.endswith(".safetensors"):
        with safe_open(file, framework="pt", device=str(device)) as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
    else:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        while state:
            key, tensor = state.popitem()
            yield key, tensor.to(device)


def folder_tensors(path: str, device=None) -> Iterator[tuple[str, Tensor, str]]:
    for file in weight_files(path):
        for key, tensor in read_tensors(file, device or "cpu"):
            yield key, tensor, file


def save_weights(state: dict[str, Tensor], path: str, config: dict) -> None:
    os.makedirs(path, exist_ok=True)
    Path(path, "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.detach().contiguous() for k, v in state.items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})


# transformers' MambaConfig fields -> ours; mamba_ssm's config.json uses our names (the SSM's inside ssm_cfg)
HF_MAMBA = {"hidden_size": "d_model", "num_hidden_layers": "n_layer", "vocab_size": "vocab_size",
            "state_size": "d_state", "expand": "expand", "conv_kernel": "d_conv", "time_step_rank": "dt_rank",
            "layer_norm_epsilon": "rms_norm_eps", "use_conv_bias": "conv_bias", "use_bias": "bias",
            "time_step_min": "dt_min", "time_step_max": "dt_max", "time_step_floor": "dt_init_floor"}


def mamba_config(path: str) -> MambaConfig:
    c = json.loads(Path(path).read_text())
    if "hidden_size" in c:  # transformers' names -> ours; the vocabulary is stored padded
        c = {HF_MAMBA.get(k, k): v for k, v in c.items()} | {"pad_vocab_size_multiple": 1}
        d_inner = c.get("expand", 2) * c["d_model"]
        need = {"tie_word_embeddings": True, "hidden_act": "silu", "intermediate_size": d_inner}
    elif "d_model" in c:  # mamba_ssm's: the SSM's fields inside ssm_cfg
        c = c | (c.get("ssm_cfg") or {}) | {"rms_norm_eps": c.get("norm_epsilon", 1e-5)}
        need = {"layer": "Mamba1", "rms_norm": True, "tie_embeddings": True, "d_intermediate": 0, "attn_layer_idx": []}
    else:
        raise ValueError(f"{path}: neither an HF Mamba config (hidden_size, ...) nor a mamba_ssm one (d_model, ...)")
    refuse_unsupported(c, need, path)
    keep = {*HF_MAMBA.values(), "pad_vocab_size_multiple"}
    return MambaConfig(**{k: 0 if v == "auto" else v for k, v in c.items() if k in keep})  # dt_rank "auto": 0


def load_mamba(path: str, dtype: torch.dtype | None = None, device=None) -> MambaLM:
    """A Mamba checkpoint folder (either format) -> MambaLM in eval mode, in dtype (None: as stored; A_log and D stay
    fp32, as in mamba_ssm). A stored lm_head.weight must equal the embedding (the head is tied)."""
    with torch.device("meta"):
        model = MambaLM(mamba_config(config_file(path, "a Mamba checkpoint folder")))
    heads = []

    def tensors():
        for key, tensor, file in folder_tensors(path, device):
            if key == "lm_head.weight":
                heads.append((file, tensor))  # not a parameter: compared with the embedding below
            else:
                yield key.replace("backbone.embedding.", "backbone.embeddings.", 1), tensor, file  # mamba_ssm -> HF

    load_state(model, tensors(), path, dtype=dtype, fp32=(".A_log", ".D"))
    emb = model.backbone.embeddings.weight
    for file, head in heads:
        if head.shape != emb.shape or not torch.equal(head.to(emb.device, emb.dtype), emb):
            raise ValueError(f"{file}: 'lm_head.weight' differs from the embedding; this model ties them")
    return model.eval()


def mamba_hf_config(c: MambaConfig) -> dict:
    return {hf: getattr(c, ours) for hf, ours in HF_MAMBA.items()} | dict(
        architectures=["MambaForCausalLM"], model_type="mamba", intermediate_size=c.d_inner, hidden_act="silu",
        residual_in_fp32=True, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def save_mamba(model: MambaLM, path: str) -> None:
    dtype = str(model.backbone.embeddings.weight.dtype).removeprefix("torch.")
    save_weights(model.state_dict(), path, mamba_hf_config(model.config) | {"dtype": dtype})


def llama_config(path: str) -> LlamaConfig:
    cfg = json.loads(Path(path).read_text())
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    need = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
            "rope type": "default", "head_dim": cfg["hidden_size"] // cfg["num_attention_heads"]}
    refuse_unsupported(cfg | {"rope type": rope.get("rope_type", rope.get("type", "default"))}, need, path)
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    return LlamaConfig(**{k: cfg[k] for k in required}, num_key_value_heads=cfg.get("num_key_value_heads"),
                       rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                       rope_theta=float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0))),
                       max_position_embeddings=cfg.get("max_position_embeddings", 2048))


def load_llama(path: str, dtype: torch.dtype | None = None, device=None) -> LlamaLM:
    """A Hugging Face LLaMA checkpoint folder -> LlamaLM in eval mode, parameters trainable. dtype None keeps the
    stored dtype. Old checkpoints store RoPE's `...rotary_emb.inv_freq`, computed here from rope_theta: ignored."""
    with torch.device("meta"):
        model = LlamaLM(llama_config(config_file(path, "a LLaMA checkpoint folder")))
    tensors = (t for t in folder_tensors(path, device) if not t[0].endswith("rotary_emb.inv_freq"))
    load_state(model, tensors, path, dtype=dtype)
    return model.eval()


def llama_hf_config(c: LlamaConfig) -> dict:
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2, **asdict(c))


def save_llama(model: LlamaLM, path: str) -> None:
    save_weights(model.state_dict(), path, llama_hf_config(model.config))


LOADERS = {"mamba": load_mamba, "llama": load_llama}


def llm_kind(path: str) -> str:
    """'mamba' or 'llama': which language model a checkpoint folder holds, from its config.json."""
    c = json.loads(Path(config_file(path, "a language model checkpoint folder")).read_text())
    kind = c.get("model_type") or ("mamba" if "d_model" in c else None)  # mamba_ssm's config has no model_type
    if kind not in LOADERS:
        raise ValueError(f"{path}/config.json: model_type {kind!r} is neither 'mamba' nor 'llama'")
    return kind


def tokenizer_file(path: str, name: str, llm: str) -> str:
    file = os.path.join(path, name) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"tokenizer {file} not found: the LLM folder should hold {name} "
                                f"({WHERE_TO_GET[llm]}), or pass its path")
    return file


class MambaTokenizer:
    """GPT-NeoX's byte-level BPE (tokenizer.json, shipped with the Mamba checkpoints). No BOS (Mamba was trained
    without one); <|endoftext|> (id 0) ends a sequence."""

    def __init__(self, path: str):
        file = tokenizer_file(path, "tokenizer.json", "mamba")
        self.tokenizer = Tokenizer.from_file(file)
        self.eos_token_id = self.tokenizer.token_to_id("<|endoftext|>")
        if self.eos_token_id is None:
            raise ValueError(f"{file}: the vocabulary has no <|endoftext|> token")

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


class LlamaTokenizer:
    """LLaMA's sentencepiece tokenizer (tokenizer.model): unk 0, <s> 1, </s> 2; BOS is prepended by default."""

    def __init__(self, path: str):
        self.sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer_file(path, "tokenizer.model", "llama"))
        self.bos_token_id, self.eos_token_id = self.sp.bos_id(), self.sp.eos_id()
        self.vocab_size = self.sp.vocab_size()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return [self.bos_token_id] * bos + self.sp.encode(text) + [self.eos_token_id] * eos

    def decode(self, ids) -> str:  # <s> and </s> give no text
        return self.sp.decode([int(i) for i in ids])


TOKENIZERS = {"mamba": MambaTokenizer, "llama": LlamaTokenizer}


def load_tokenizer(config) -> MambaTokenizer | LlamaTokenizer:
    """The tokenizer of an SSLALMConfig (.llm, .tokenizer, .llm_weights): config.tokenizer, or the LLM folder's."""
    return TOKENIZERS[config.llm](config.tokenizer or config.llm_weights or ".")


# the Hugging Face port's key names -> ours (its conversion script's renames of the official module.v.*, undone)
HF_PATCH = {"0": "0", "1": "2", "3": "5", "4": "7"}  # patch_embeddings.projection.i -> patch_embed.j
HF_DASS = {r"^head\.": "classifier.head.", r"^dass\.norm\.": "classifier.norm.", r"^dass\.": "",
           r"^patch_embeddings\.projection\.(\d)\.": lambda m: f"patch_embed.{HF_PATCH[m[1]]}.",
           r"downsample\.down\.": "downsample.1.", r"downsample\.norm\.": "downsample.3.",
           r"op\.x_proj\.weight$": "op.x_proj_weight", r"op\.dt_projs\.weight$": "op.dt_projs_weight"}


def load_dass(path: str | Path, config: DASSConfig | None = None) -> DASS:
    """DASS weights in any of the three formats (a file, or the HF port's folder) -> DASS in fp32, train mode. The
    config is `config`, else the file's (ours), else inferred from the tensor shapes."""
    state, file, file_config = _read_dass(Path(path))
    with torch.device("meta"):
        model = DASS(config or file_config or _infer_dass_config(state, file))
    load_state(model, ((k, v, str(file)) for k, v in state.items()), f"DASS checkpoint {file}", dtype=torch.float32)
    return model


def save_dass(model: DASS, path: str | Path) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "dass", "config": json.dumps(asdict(model.config))})


def _read_dass(path: Path) -> tuple[dict[str, Tensor], Path, DASSConfig | None]:
    """-> (state dict in our key layout, the file read, the config if the file carries one)."""
    if path.is_dir():
        path = Path(weight_files(str(path))[0])  # the HF port's folder
    if not path.is_file():
        raise FileNotFoundError(f"DASS weights {path}: no such file ({WHERE_TO_GET['dass']})")
    meta = {}
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            state, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"DASS weights {path}: not a readable PyTorch checkpoint ({e})") from e
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"DASS weights {path}: expected a flat state_dict of tensors, got {type(state).__name__}")
    if state and all(k.startswith("module.v.") for k in state):  # the official DataParallel checkpoint
        state = {k.removeprefix("module.v."): v for k, v in state.items()}
    elif any(k.startswith("dass.") for k in state):  # the Hugging Face port
        port, state = state, {}
        for key, value in port.items():
            for pattern, ours in HF_DASS.items():
                key = re.sub(pattern, ours, key)
            grouped = key.endswith(("op.x_proj_weight", "op.dt_projs_weight"))  # the port's 1x1 convs (K rows, cols)
            state[key] = value.reshape(4, -1, value.shape[-1]) if grouped else value  # (K, rows, cols), K = 4 scans
    return state, path, DASSConfig(**json.loads(meta["config"])) if "config" in meta else None


def _infer_dass_config(state: dict[str, Tensor], path: Path) -> DASSConfig:
    """Stage widths and depths, N, MLP ratio and class count from the tensor shapes of a state dict (our keys)."""
    depths = Counter(int(m[1]) for k in state if (m := re.fullmatch(r"layers\.(\d+)\.blocks\.\d+\.norm\.weight", k)))
    try:
        dims = [state[f"layers.{s}.blocks.0.norm.weight"].shape[0] for s in range(len(depths))]
        return DASSConfig(dims=dims, depths=[depths[s] for s in range(len(depths))],
                          d_state=state["layers.0.blocks.0.op.A_logs"].shape[1],
                          mlp_ratio=state["layers.0.blocks.0.mlp.fc1.weight"].shape[0] / dims[0],
                          n_classes=state["classifier.head.weight"].shape[0])
    except (KeyError, ValueError, IndexError) as e:
        raise ValueError(f"DASS weights {path}: cannot infer the model size (missing or odd key {e}); "
                         "is this a DASS checkpoint?") from e
