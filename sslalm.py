"""The state-space large audio language model of the paper's Fig. 1, end to end.

Fig. 1, box by box (B = batch, T = fbank frames, d = the LLM's width):
    audio -> log-mel fbank (T, 128)                          audio.dass_input            (B, T, 128)
    DASS, the state-space audio encoder (§III-B)             SSLALM.audio_tokens: dass   (B, 768, 4, ceil(T/32))
    down-sampling Conv2d(768, 768, k 3, s 2, p 1)            audio_conv                  (B, 768, 2, ceil(T/64))
    32 audio tokens (for T = 1024), in time order            flatten                     (B, 2 ceil(T/64), 768)
    Linear(768 -> d): 4096 for LLaMA, 2560 for Mamba         audio_proj                  (B, n_audio, d)
    audio tokens prefixed to the prompt's embeddings         SSLALM.forward / answer     (B, n_audio + L, d)
    the frozen LLM with LoRA adapters (§III-C)               llm (mamba.MambaLM or llama.LlamaLM + lora.py)
    next-token cross-entropy on the text tokens (§III-D)     SSLALM.forward

Trainable (green in Fig. 1): DASS, the conv + linear projector and the LoRA adapters; the LLM is frozen.
The four variants of Table I: size in {small, medium} (DASS) x llm in {llama ("hybrid LALM"), mamba ("ssLALM")}.
The prompt and the loss follow LTU, which the paper builds on: "### Instruction:\\n{question}\\n\\n### Response:\\n"
then the answer and EOS (LLaMA puts BOS first); the loss covers every text token (instruction and response), or
only the response with `response_only_loss`; the text is cut at 108 tokens; audio positions have no labels.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import audio
import lora
import sampling
from dass import DASS, DASSConfig

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"  # LTU's alpaca_short template
PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"  # when `input` is set
IGNORE_INDEX = -100
WHERE_TO_GET = {
    "mamba": "the Mamba-2.8B checkpoint: download the Hugging Face repository state-spaces/mamba-2.8b-hf "
             "(or state-spaces/mamba-2.8b) into a folder, e.g. `huggingface-cli download state-spaces/mamba-2.8b-hf "
             "--local-dir weights/mamba-2.8b-hf`, and pass that folder",
    "llama": "the Vicuna-7B checkpoint: download the Hugging Face repository lmsys/vicuna-7b-v1.5 into a folder, "
             "e.g. `huggingface-cli download lmsys/vicuna-7b-v1.5 --local-dir weights/vicuna-7b-v1.5`, and pass "
             "that folder",
    "dass": "a DASS checkpoint: download DASS_small.pth or DASS_medium.pth (AudioSet-2M) from the DASS "
            "repository's releases (github.com/Saurabhbhati/DASS) and pass the file",
}


def _llm_module(llm: str):
    if llm == "mamba":
        import mamba
        return mamba.MambaLM, mamba.MambaConfig
    if llm == "llama":
        import llama
        return llama.LlamaLM, llama.LlamaConfig
    raise ValueError(f"unknown LLM {llm!r}: use 'mamba' (the ssLALM) or 'llama' (the hybrid LALM)")


@dataclass
class SSLALMConfig:
    """Everything needed to rebuild the model; saved as config.json beside a checkpoint's trainable weights.

    Defaults are the paper's small ssLALM. Paths that are relative are resolved against the checkpoint folder
    when a checkpoint is loaded.
    """
    size: str = "small"                     # DASS size: "small" or "medium" (or "custom": see `dass`)
    llm: str = "mamba"                      # "mamba" (ssLALM) or "llama" (hybrid LALM)
    dass: dict = field(default_factory=dict)        # DASSConfig fields; empty = DASSConfig.<size>()
    llm_config: dict = field(default_factory=dict)  # LLM config fields, used when there are no llm_weights
    llm_weights: str | None = None          # folder of the pretrained LLM (HF or original format)
    dass_weights: str | None = None         # DASS checkpoint (.pth with module.v. keys, or safetensors)
    tokenizer: str | None = None            # tokenizer.json / tokenizer.model; default: found in llm_weights
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ()      # empty = the paper's: LLaMA q_proj + k_proj, Mamba in_proj
    audio_frames: int = audio.DASS_FRAMES   # fbank frames per training clip (pad/crop): 1024 -> 32 tokens
    text_cutoff: int = 108                  # text tokens kept (LTU's cutoff); audio tokens come on top
    response_only_loss: bool = False        # False: loss on instruction and response, as LTU and the paper

    @classmethod
    def paper(cls, size: str = "small", llm: str = "mamba", **kw) -> "SSLALMConfig":
        if size not in ("small", "medium"):
            raise ValueError(f"unknown DASS size {size!r}: the paper has 'small' and 'medium'")
        _llm_module(llm)
        return cls(size=size, llm=llm, **kw)

    def dass_config(self) -> DASSConfig:
        if self.dass:
            return DASSConfig(**self.dass)
        if self.size not in ("small", "medium"):
            raise ValueError(f"DASS size {self.size!r} needs explicit `dass` fields")
        return getattr(DASSConfig, self.size)()

    def targets(self) -> tuple[str, ...]:
        return tuple(self.lora_targets) or lora.PAPER_TARGETS[self.llm]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SSLALMConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SSLALM config fields {sorted(unknown)}")
        d = dict(d)
        d["lora_targets"] = tuple(d.get("lora_targets", ()))
        return cls(**d)


class SSLALM(nn.Module):
    def __init__(self, config: SSLALMConfig, dass: DASS | None = None, llm: nn.Module | None = None,
                 tokenizer=None):
        """Assemble the model of Fig. 1 from its parts; parts left out are built with random weights."""
        super().__init__()
        self.config = config
        LM, LMConfig = _llm_module(config.llm)
        self.dass = dass if dass is not None else DASS(config.dass_config())
        if "head" in self.dass.classifier:  # the LALM uses DASS "with the classification layer removed" (§III-B)
            del self.dass.classifier["head"]
        self.llm = llm if llm is not None else LM(LMConfig(**config.llm_config))
        width = self.dass.config.dims[-1]  # 768 for DASS small and medium
        self.audio_conv = nn.Conv2d(width, width, kernel_size=3, stride=2, padding=1)
        self.audio_proj = nn.Linear(width, self.llm.hidden_size)
        for p in self.llm.parameters():
            p.requires_grad_(False)
        lora.add_lora(self.llm, targets=config.targets(), r=config.lora_r, alpha=config.lora_alpha,
                      dropout=config.lora_dropout)
        self.tokenizer = tokenizer

    # ---- building ------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, config: SSLALMConfig, device=None, dtype: torch.dtype | None = None,
              load_dass: bool = True) -> "SSLALM":
        """Build from pretrained parts: DASS from config.dass_weights, the LLM (in `dtype`) and its tokenizer from
        config.llm_weights. A missing path is an error that says what to download and where."""
        LM, _ = _llm_module(config.llm)
        if not config.llm_weights:
            raise FileNotFoundError(f"no LLM weights given: pass --llm-weights, {WHERE_TO_GET[config.llm]}")
        if not Path(config.llm_weights).is_dir():
            raise FileNotFoundError(f"LLM weights folder {config.llm_weights} not found: {WHERE_TO_GET[config.llm]}")
        dass = None
        if load_dass and config.dass_weights:
            if not Path(config.dass_weights).is_file():
                raise FileNotFoundError(f"DASS weights {config.dass_weights} not found: {WHERE_TO_GET['dass']}")
            dass = DASS.from_pretrained(config.dass_weights, config=config.dass_config())
        elif load_dass:
            raise FileNotFoundError(f"no DASS weights given: pass --dass-weights, {WHERE_TO_GET['dass']}")
        llm = LM.from_pretrained(config.llm_weights, dtype=dtype, device=device)
        tokenizer = load_tokenizer(config)
        model = cls(config, dass=dass, llm=llm, tokenizer=tokenizer)
        return model.to(device) if device is not None else model

    # ---- Fig. 1 --------------------------------------------------------------------------------------------
    def audio_tokens(self, fbank: Tensor) -> Tensor:
        """fbank (B, T, 128) DASS input -> audio tokens (B, 2 ceil(T/64), d): 32 tokens for T = 1024."""
        feats = self.dass.features(fbank)                     # (B, 768, 4, ceil(T/32))  channels, freq, time
        feats = self.audio_conv(feats)                        # (B, 768, 2, ceil(T/64))
        tokens = feats.permute(0, 3, 2, 1).flatten(1, 2)      # (B, n_audio, 768)  time-major, 2 freq bands each
        return self.audio_proj(tokens)                        # (B, n_audio, d)

    def forward(self, fbank: Tensor, input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None = None
                ) -> Tensor:
        """Mean next-token cross-entropy over the labelled text tokens, given the audio (§III-D).

        fbank (B, T, 128); input_ids, labels (B, L) right-padded (labels IGNORE_INDEX where there is no loss);
        attention_mask is accepted for symmetry with the data: right padding needs no mask in a causal model.
        """
        audio_emb = self.audio_tokens(fbank)                            # (B, n, d)
        text_emb = self.llm.embed(input_ids)                            # (B, L, d)
        embeds = torch.cat([audio_emb.to(text_emb.dtype), text_emb], 1)  # audio prefix, then the prompt
        logits = self.llm(inputs_embeds=embeds)                         # (B, n + L, V)
        # Only text positions make predictions (as in LTU): text position i predicts text token i + 1, so the audio
        # positions have neither logits nor labels, and the first text token is given, not predicted.
        pred = logits[:, audio_emb.shape[1]:-1]                          # (B, L - 1, V)
        return F.cross_entropy(pred.float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)

    # ---- text ----------------------------------------------------------------------------------------------
    def encode_prompt(self, instruction: str, input: str = "") -> list[int]:
        """The prompt for answering, whole: text_cutoff applies to training text only (as in LTU), and cutting
        here would drop the template's '### Response:' from a long instruction."""
        return self.tokenizer.encode(prompt_text(instruction, input))

    def encode_example(self, instruction: str, output: str, input: str = "") -> tuple[list[int], list[int]]:
        """LTU's training text: prompt + answer + EOS, cut at text_cutoff tokens; labels IGNORE_INDEX where no loss
        (the prompt, with response_only_loss). EOS is appended only when the text fits, as LTU does."""
        prompt = self.tokenizer.encode(prompt_text(instruction, input))
        full = self.tokenizer.encode(prompt_text(instruction, input) + output)
        ids = full[:self.config.text_cutoff]
        if len(ids) < self.config.text_cutoff:
            ids = ids + [self.tokenizer.eos_token_id]
        labels = list(ids)
        if self.config.response_only_loss:
            labels[:min(len(prompt), len(labels))] = [IGNORE_INDEX] * min(len(prompt), len(labels))
        return ids, labels

    # ---- training parts ------------------------------------------------------------------------------------
    PARTS = ("dass", "projector", "lora")

    def part_parameters(self, part: str) -> list[nn.Parameter]:
        if part == "dass":
            return list(self.dass.parameters())
        if part == "projector":
            return list(self.audio_conv.parameters()) + list(self.audio_proj.parameters())
        if part == "lora":
            return lora.lora_parameters(self.llm)
        raise ValueError(f"unknown part {part!r}; parts are {self.PARTS}")

    def set_trainable(self, parts) -> None:
        """Exactly the given parts (subset of "dass", "projector", "lora") require gradients; the LLM never."""
        for p in self.parameters():
            p.requires_grad_(False)
        for part in parts:
            for p in self.part_parameters(part):
                p.requires_grad_(True)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The weights a checkpoint holds: DASS, projector and LoRA, whatever the current stage trains."""
        keep = {id(p) for part in self.PARTS for p in self.part_parameters(part)}
        return {n: p.detach() for n, p in self.named_parameters() if id(p) in keep}

    def load_trainable_state_dict(self, sd: dict[str, Tensor], source: str = "checkpoint") -> None:
        own = dict(self.named_parameters())
        expected = set(self.trainable_state_dict())
        missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
        if missing or unexpected:
            raise ValueError(f"{source} does not match this model: missing {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                             f"{' ...' if len(unexpected) > 5 else ''} (was it trained with another size or LLM?)")
        for name, value in sd.items():
            if value.shape != own[name].shape:
                raise ValueError(f"{source}: {name} has shape {tuple(value.shape)}, the model expects "
                                 f"{tuple(own[name].shape)}")
            with torch.no_grad():
                own[name].copy_(value)

    def save_checkpoint(self, path: str | os.PathLike, home: str | os.PathLike | None = None) -> None:
        """config.json + model.safetensors with the trainable weights only; the base LLM stays where it is.

        The config names the base weights by absolute path, or relative to the checkpoint's folder when they lie
        inside it (then the folder can be moved as a whole). That folder is `path`, or `home` if the files are
        written elsewhere first and moved there."""
        path = Path(path)
        home = Path(home or path).resolve()
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / "model.safetensors.tmp"
        save_file({k: v.contiguous().cpu() for k, v in self.trainable_state_dict().items()}, str(tmp))
        os.replace(tmp, path / "model.safetensors")
        config = self.config.to_dict()
        for key in ("llm_weights", "dass_weights", "tokenizer"):
            if config[key]:
                where = Path(config[key]).resolve()
                config[key] = where.relative_to(home).as_posix() if where.is_relative_to(home) else str(where)
        meta = {"sslalm": config, "llm_fingerprint": llm_fingerprint(self.llm)}
        (path / "config.tmp").write_text(json.dumps(meta, indent=2))
        os.replace(path / "config.tmp", path / "config.json")

    # ---- answering -----------------------------------------------------------------------------------------
    def answer(self, clips: list, instructions: list[str], **kw) -> list[str]:
        """Answer one instruction per clip (a file path, a 16 kHz waveform, or a (T, 128) DASS input) in one
        batch; keyword arguments as `generate` (the paper's sampling by default, greedy=True for the argmax)."""
        eos = self.tokenizer.eos_token_id
        return [self.tokenizer.decode(ids[:ids.index(eos)] if eos in ids else ids).strip()
                for ids in self.generate(clips, instructions, **kw)]

    @torch.no_grad()
    def generate(self, clips: list, instructions: list[str], *, max_new_tokens: int = 400, greedy: bool = False,
                 temperature: float = 0.1, top_k: int = 500, top_p: float = 0.95, repetition_penalty: float = 1.1,
                 generator: torch.Generator | None = None, crop: bool = False) -> list[list[int]]:
        """The answer tokens for one instruction per clip, batched with left padding and the LLM's decode cache.

        Defaults are the paper's sampling settings (§III-D); greedy=True takes the argmax instead. Clips shorter
        than the training length are padded to it; longer ones are kept whole (more audio tokens), or cut to it
        with crop=True (LTU's evaluation does that). See `prepare_audio`.
        """
        if len(clips) != len(instructions):
            raise ValueError(f"got {len(clips)} clips and {len(instructions)} instructions")
        device = self.audio_proj.weight.device
        rows, prompts = [], []
        for clip, instruction in zip(clips, instructions):
            fb = self.prepare_audio(clip, crop).to(device)
            prompt = self.encode_prompt(instruction)
            tokens = self.audio_tokens(fb[None].to(self.audio_proj.weight.dtype))[0]
            text = self.llm.embed(torch.tensor([prompt], device=device))[0]
            rows.append(torch.cat([tokens.to(text.dtype), text]))
            prompts.append(prompt)
        width = max(r.shape[0] for r in rows)
        embeds = rows[0].new_zeros(len(rows), width, rows[0].shape[1])
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
        seen = torch.full((len(rows), max(map(len, prompts))), -1, dtype=torch.long, device=device)
        for i, (r, p) in enumerate(zip(rows, prompts)):  # left padding
            embeds[i, width - r.shape[0]:], mask[i, width - r.shape[0]:] = r, 1
            seen[i, seen.shape[1] - len(p):] = torch.tensor(p, device=device)
        new = sampling.generate(self.llm, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                do_sample=not greedy, temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty, eos_token_id=self.tokenizer.eos_token_id,
                                generator=generator, seen_ids=seen)
        return new.tolist()

    def prepare_audio(self, clip, crop: bool = False) -> Tensor:
        """A path, a waveform (S,) at 16 kHz or a DASS input (T, 128) -> the DASS input (T', 128).

        T' = audio_frames (the training length) for shorter clips, which are padded with silence as in training;
        longer clips keep all their frames (T' = T: audio tokens in proportion to the duration), or their first
        audio_frames frames with crop=True.
        """
        if isinstance(clip, (str, os.PathLike)):
            clip = audio.load_audio(clip)
        if clip.dim() == 1:
            clip = audio.dass_input(clip, target_length=None)
        if clip.dim() != 2 or clip.shape[1] != audio.N_MELS:
            raise ValueError(f"a clip must be a path, a waveform (S,) or a DASS input (T, {audio.N_MELS}); "
                             f"got shape {tuple(clip.shape)}")
        frames = self.config.audio_frames
        if clip.shape[0] < frames:
            return F.pad(clip, (0, 0, 0, frames - clip.shape[0]), value=audio.SILENT_FRAME)
        return clip[:frames] if crop else clip


def prompt_text(instruction: str, input: str = "") -> str:
    """The prompt before the answer; `input` (OpenAQA's field, empty for non-speech audio) adds a section."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_TEMPLATE.format(instruction=instruction)


def collate(examples: list[dict], pad_id: int) -> dict[str, Tensor]:
    """Batch examples {"fbank": (T, 128), "input_ids": list, "labels": list}: fbanks padded at the end to the
    longest T with the value a silent (zero) frame takes after normalisation, text right-padded with pad_id, labels
    with IGNORE_INDEX. Returns fbank (B, T, 128), input_ids, labels, attention_mask (B, L)."""
    frames = max(e["fbank"].shape[0] for e in examples)
    length = max(len(e["input_ids"]) for e in examples)
    silent = audio.SILENT_FRAME
    batch = {
        "fbank": torch.full((len(examples), frames, audio.N_MELS), silent),
        "input_ids": torch.full((len(examples), length), pad_id, dtype=torch.long),
        "labels": torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long),
        "attention_mask": torch.zeros(len(examples), length, dtype=torch.long),
    }
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        batch["fbank"][i, :e["fbank"].shape[0]] = e["fbank"]
        batch["input_ids"][i, :n] = torch.tensor(e["input_ids"])
        batch["labels"][i, :n] = torch.tensor(e["labels"])
        batch["attention_mask"][i, :n] = 1
    return batch


# ---- checkpoints --------------------------------------------------------------------------------------------
def llm_fingerprint(llm: nn.Module) -> list[float]:
    """A few numbers that identify the base LLM's weights, so a checkpoint refuses another base model."""
    adapters = {id(p) for p in lora.lora_parameters(llm)}
    w = next(p for p in llm.parameters() if id(p) not in adapters)  # the token embedding
    if w.is_meta:
        return []
    w = w.detach().double()
    return [float(w.sum()), float(w.abs().sum()), float(w.flatten()[:: max(1, w.numel() // 1000)].sum())]


def _resolve(path: str | None, base: Path) -> str | None:
    if path is None or Path(path).is_absolute():
        return path
    return str(base / path) if (base / path).exists() or not Path(path).exists() else path


def load_tokenizer(config: SSLALMConfig):
    """The LLM's tokenizer: GPT-NeoX tokenizer.json for Mamba, sentencepiece tokenizer.model for LLaMA."""
    name = "tokenizer.json" if config.llm == "mamba" else "tokenizer.model"
    path = Path(config.tokenizer) if config.tokenizer else Path(config.llm_weights or ".") / name
    if path.is_dir():
        path = path / name
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path} not found: the LLM folder should hold {name} "
                                f"({WHERE_TO_GET[config.llm]}), or pass its path")
    if config.llm == "mamba":
        from mamba import MambaTokenizer
        return MambaTokenizer(str(path))
    from llama import Tokenizer
    return Tokenizer(str(path))  # puts BOS first, as LTU's prompts have it


def load_checkpoint(path: str | os.PathLike, device=None, dtype: torch.dtype | None = None,
                    llm_weights: str | None = None, tokenizer: str | None = None) -> SSLALM:
    """Rebuild a trained model: the base LLM from the path its config names (or from `llm_weights`, if the base
    weights have moved; they must be the same weights), then the checkpoint's DASS, projector and LoRA weights on
    top. The result is the trained model exactly."""
    path = Path(path)
    for name in ("config.json", "model.safetensors"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not an ssLALM checkpoint: {name} is missing")
    meta = json.loads((path / "config.json").read_text())
    if "sslalm" not in meta:
        raise ValueError(f"{path / 'config.json'} is not an ssLALM checkpoint config (no 'sslalm' entry)")
    config = SSLALMConfig.from_dict(meta["sslalm"])
    config.llm_weights = llm_weights or _resolve(config.llm_weights, path)
    config.tokenizer = tokenizer or _resolve(config.tokenizer, path)
    model = SSLALM.build(config, device=device, dtype=dtype, load_dass=False)
    expected = meta.get("llm_fingerprint") or []
    found = llm_fingerprint(model.llm)
    if expected and found and not all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-3) for a, b in zip(expected, found)):
        raise ValueError(f"the LLM weights in {config.llm_weights} are not those {path} was trained on")
    sd = load_file(str(path / "model.safetensors"), device=str(device) if device is not None else "cpu")
    model.load_trainable_state_dict(sd, source=str(path / "model.safetensors"))
    return model.eval()


# ---- parameter counts ---------------------------------------------------------------------------------------
def parameter_table(model: SSLALM) -> dict[str, dict[str, int]]:
    """Trainable and total parameters per part of Fig. 1 (trainable as in training stages 2-4)."""
    count = lambda ps: sum(p.numel() for p in ps)
    lora_params = model.part_parameters("lora")
    lora_ids = {id(p) for p in lora_params}
    rows = {
        "DASS": count(model.dass.parameters()),
        "conv": count(model.audio_conv.parameters()),
        "linear": count(model.audio_proj.parameters()),
        "LoRA": count(lora_params),
        "LLM": count(p for p in model.llm.parameters() if id(p) not in lora_ids),
    }
    trainable = rows["DASS"] + rows["conv"] + rows["linear"] + rows["LoRA"]
    return {"parts": rows, "trainable": trainable, "total": trainable + rows["LLM"]}


def build_meta(size: str, llm: str) -> SSLALM:
    """The paper's full-size model on the meta device: shapes only, no weights, no memory."""
    _, LMConfig = _llm_module(llm)
    with torch.device("meta"):
        return SSLALM(SSLALMConfig.paper(size, llm, llm_config=asdict(LMConfig())))


# ---- command line -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="The state-space audio LLM (ssLALM) of Fig. 1.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("params", help="trainable and total parameters per part, as in the paper (§III-E)")
    p.add_argument("--size", choices=("small", "medium"), default="small")
    p.add_argument("--llm", choices=("mamba", "llama"), default="mamba")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = sub.add_parser("ask", help="answer a question about a clip with a trained checkpoint")
    a.add_argument("--checkpoint", required=True, help="a folder written by train.py")
    a.add_argument("clip", help="an audio file (any length; resampled to 16 kHz)")
    a.add_argument("question", nargs="+", help="the question (e.g. 'What can you hear?')")
    a.add_argument("--llm-weights", help="the base LLM's folder, if it has moved since training")
    a.add_argument("--greedy", action="store_true", help="argmax decoding instead of the paper's sampling")
    a.add_argument("--max-new-tokens", type=int, default=400)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    if args.command == "params":
        table = parameter_table(build_meta(args.size, args.llm))
        if args.json:
            print(json.dumps({"size": args.size, "llm": args.llm, **table["parts"],
                              "trainable": table["trainable"], "total": table["total"]}))
        else:
            for part, n in table["parts"].items():
                print(f"{part:>9}: {n:>13,}  ({n / 1e6:,.2f}M)")
            print(f"trainable: {table['trainable']:>13,}  ({table['trainable'] / 1e6:,.1f}M)")
            print(f"    total: {table['total']:>13,}  ({table['total'] / 1e9:,.2f}B)")
        return 0

    try:
        dtype = torch.bfloat16 if args.device.startswith("cuda") else None
        model = load_checkpoint(args.checkpoint, device=args.device, dtype=dtype, llm_weights=args.llm_weights)
        generator = torch.Generator(device=args.device).manual_seed(args.seed)
        print(model.answer([args.clip], [" ".join(args.question)], greedy=args.greedy,
                           max_new_tokens=args.max_new_tokens, generator=generator)[0])
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
