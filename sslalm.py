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
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

import audio
import lora
import sampling
from dass import DASS, DASSConfig
from llama import LlamaConfig, LlamaLM
from mamba import MambaConfig, MambaLM

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"  # LTU's alpaca_short template
PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"  # when `input` is set
IGNORE_INDEX = -100
LLMS = {"mamba": (MambaLM, MambaConfig), "llama": (LlamaLM, LlamaConfig)}  # the ssLALM, the hybrid LALM


@dataclass
class SSLALMConfig:
    """Everything needed to rebuild the model (a checkpoint's config.json). Defaults: the paper's small ssLALM."""
    size: str = "small"                     # DASS size: "small" or "medium" (or "custom": see `dass`)
    llm: str = "mamba"                      # "mamba" (ssLALM) or "llama" (hybrid LALM)
    dass: dict = field(default_factory=dict)        # DASSConfig fields; empty = DASSConfig.<size>()
    llm_config: dict = field(default_factory=dict)  # LLM config fields, used when there are no llm_weights
    llm_weights: str | None = None          # folder of the pretrained LLM (HF or original format)
    dass_weights: str | None = None         # DASS checkpoint (.pth with module.v. keys, or safetensors)
    tokenizer: str | None = None            # tokenizer.json / tokenizer.model; default: found in llm_weights
    lora_r: int = lora.PAPER_LORA["r"]
    lora_alpha: float = lora.PAPER_LORA["alpha"]
    lora_dropout: float = lora.PAPER_LORA["dropout"]
    lora_targets: tuple[str, ...] = ()      # empty = the paper's: LLaMA q_proj + k_proj, Mamba in_proj
    audio_frames: int = audio.DASS_FRAMES   # fbank frames per training clip (pad/crop): 1024 -> 32 tokens
    text_cutoff: int = 108                  # text tokens kept (LTU's cutoff); audio tokens come on top
    response_only_loss: bool = False        # False: loss on instruction and response, as LTU and the paper

    def __post_init__(self):
        if self.llm not in LLMS:
            raise ValueError(f"unknown LLM {self.llm!r}: use 'mamba' (the ssLALM) or 'llama' (the hybrid LALM)")
        if self.size not in ("small", "medium") and not self.dass:
            raise ValueError(f"unknown DASS size {self.size!r}: the paper has 'small' and 'medium' (or give `dass`)")
        self.lora_targets = tuple(self.lora_targets)

    @classmethod
    def paper(cls, size: str = "small", llm: str = "mamba", **kw) -> SSLALMConfig:
        return cls(size=size, llm=llm, **kw)

    @classmethod
    def from_dict(cls, d: dict) -> SSLALMConfig:
        if unknown := set(d) - {f.name for f in fields(cls)}:
            raise ValueError(f"unknown SSLALM config fields {sorted(unknown)}")
        return cls(**d)


class SSLALM(nn.Module):
    """Fig. 1's model; parts not given are built with random weights (pretrained ones: checkpoint.build)."""

    PARTS = ("dass", "projector", "lora")  # trainable (green in Fig. 1); the LLM stays frozen

    def __init__(self, config: SSLALMConfig, dass: DASS | None = None, llm: nn.Module | None = None,
                 tokenizer=None):
        super().__init__()
        self.config, self.tokenizer = config, tokenizer
        LM, LMConfig = LLMS[config.llm]
        dass_config = DASSConfig(**config.dass) if config.dass else getattr(DASSConfig, config.size)()
        self.dass = dass if dass is not None else DASS(dass_config)
        if "head" in self.dass.classifier:  # the LALM uses DASS "with the classification layer removed" (§III-B)
            del self.dass.classifier["head"]
        self.llm = llm if llm is not None else LM(LMConfig(**config.llm_config))
        width = self.dass.config.dims[-1]  # 768 for DASS small and medium
        self.audio_conv = nn.Conv2d(width, width, kernel_size=3, stride=2, padding=1)
        self.audio_proj = nn.Linear(width, self.llm.hidden_size)
        targets = config.lora_targets or lora.PAPER_TARGETS[config.llm]
        lora.add_lora(self.llm, targets, config.lora_r, config.lora_alpha, config.lora_dropout)  # freezes the LLM

    def audio_tokens(self, fbank: Tensor) -> Tensor:
        """fbank (B, T, 128) DASS input -> audio tokens (B, 2 ceil(T/64), d): 32 tokens for T = 1024."""
        feats = self.dass.features(fbank)                     # (B, 768, 4, ceil(T/32))  channels, freq, time
        feats = self.audio_conv(feats)                        # (B, 768, 2, ceil(T/64))
        tokens = feats.permute(0, 3, 2, 1).flatten(1, 2)      # (B, n_audio, 768)  time-major, 2 freq bands each
        return self.audio_proj(tokens)                        # (B, n_audio, d)

    def forward(self, fbank: Tensor, input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None = None
                ) -> Tensor:
        """fbank (B, T, 128); input_ids, labels (B, L) right-padded, labels IGNORE_INDEX where there is no loss (the
        attention_mask is not needed: causal) -> the mean next-token cross-entropy of the labelled tokens (§III-D)."""
        audio_emb = self.audio_tokens(fbank)                            # (B, n, d)
        embeds = sampling.join(self.llm, input_ids, audio_emb)          # audio prefix, then the prompt (B, n + L, d)
        logits = self.llm(inputs_embeds=embeds)                         # (B, n + L, V)
        # text position i predicts text token i + 1 (as in LTU): audio positions have no loss, the first token is given
        pred = logits[:, audio_emb.shape[1]:-1]                          # (B, L - 1, V)
        return F.cross_entropy(pred.float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)

    def encode_prompt(self, instruction: str, input: str = "") -> list[int]:
        """The prompt for answering, whole: text_cutoff applies to training text only (as in LTU)."""
        return self.tokenizer.encode(prompt_text(instruction, input))

    def encode_example(self, instruction: str, output: str, input: str = "") -> tuple[list[int], list[int]]:
        """LTU's training text: prompt + answer + EOS (if it fits), cut at text_cutoff tokens -> (ids, labels);
        labels are IGNORE_INDEX where there is no loss (the prompt, with response_only_loss)."""
        prompt = self.encode_prompt(instruction, input)
        ids = self.tokenizer.encode(prompt_text(instruction, input) + output)[:self.config.text_cutoff]
        if len(ids) < self.config.text_cutoff:
            ids = ids + [self.tokenizer.eos_token_id]
        n = min(len(prompt), len(ids)) if self.config.response_only_loss else 0
        return ids, [IGNORE_INDEX] * n + ids[n:]

    def part_parameters(self, part: str) -> list[nn.Parameter]:
        if part == "lora":
            return lora.lora_parameters(self.llm)
        modules = {"dass": [self.dass], "projector": [self.audio_conv, self.audio_proj]}[part]
        return [p for m in modules for p in m.parameters()]

    def set_trainable(self, parts) -> None:
        """Exactly the given parts (of PARTS) require gradients; the LLM never."""
        self.requires_grad_(False)
        for part in parts:
            for p in self.part_parameters(part):
                p.requires_grad_(True)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The weights a checkpoint holds: DASS, projector and LoRA, whatever the current stage trains."""
        keep = {id(p) for part in self.PARTS for p in self.part_parameters(part)}
        return {n: p.detach() for n, p in self.named_parameters() if id(p) in keep}

    def answer(self, clips: list, instructions: list[str], **kw) -> list[str]:
        """Answer one instruction per clip (see `prepare_audio`) in one batch; keyword arguments as `generate`."""
        eos = self.tokenizer.eos_token_id
        return [self.tokenizer.decode(ids[:ids.index(eos)] if eos in ids else ids).strip()
                for ids in self.generate(clips, instructions, **kw)]

    @torch.no_grad()
    def generate(self, clips: list, instructions: list[str], *, max_new_tokens: int = sampling.MAX_NEW_TOKENS,
                 greedy: bool = False, crop: bool = False, **settings) -> list[list[int]]:
        """The answer tokens for one instruction per clip, batched with left padding. Sampling: PAPER_SAMPLING but
        for `settings` (temperature, top_k, top_p, repetition_penalty, generator); greedy=True: the argmax."""
        if len(clips) != len(instructions):
            raise ValueError(f"got {len(clips)} clips and {len(instructions)} instructions")
        settings = {**sampling.PAPER_SAMPLING, **settings, **({"do_sample": False} if greedy else {})}
        device, dtype = self.audio_proj.weight.device, self.audio_proj.weight.dtype
        rows, prompts = [], []
        for clip, instruction in zip(clips, instructions):
            audio_emb = self.audio_tokens(self.prepare_audio(clip, crop).to(device, dtype)[None])  # (1, n, d)
            prompts.append(self.encode_prompt(instruction))
            rows.append(sampling.join(self.llm, torch.tensor([prompts[-1]], device=device), audio_emb)[0])
        embeds, mask, seen = sampling.left_pad(rows, prompts)
        new = sampling.generate(self.llm, inputs_embeds=embeds, attention_mask=mask, seen_ids=seen,
                                max_new_tokens=max_new_tokens, eos_token_id=self.tokenizer.eos_token_id, **settings)
        return new.tolist()

    def prepare_audio(self, clip, crop: bool = False) -> Tensor:
        """A path, a waveform (S,) at 16 kHz or a DASS input (T, 128) -> the DASS input (T', 128): padded with silence
        to audio_frames as in training; a longer clip kept whole, or cut there with crop=True (LTU's evaluation)."""
        if isinstance(clip, (str, os.PathLike)):
            clip = audio.dass_input_from_file(clip, target_length=None)  # errors name the file
        if clip.dim() == 1:
            clip = audio.dass_input(clip, target_length=None)
        if clip.dim() != 2 or clip.shape[1] != audio.N_MELS:
            raise ValueError(f"a clip must be a path, a waveform (S,) or a DASS input (T, {audio.N_MELS}); "
                             f"got shape {tuple(clip.shape)}")
        frames = self.config.audio_frames
        clip = F.pad(clip, (0, 0, 0, max(0, frames - len(clip))), value=audio.SILENT_FRAME)
        return clip[:frames] if crop else clip


def prompt_text(instruction: str, input: str = "") -> str:
    """The prompt before the answer; `input` (OpenAQA's field, empty for non-speech audio) adds a section."""
    return (PROMPT_WITH_INPUT if input else PROMPT_TEMPLATE).format(instruction=instruction, input=input)


def collate(examples: list[dict], pad_id: int) -> dict[str, Tensor]:
    """Examples {"fbank": (T, 128), "input_ids": list, "labels": list} -> fbank (B, T, 128) padded at the end with
    silent frames; input_ids (B, L) right-padded with pad_id, labels with IGNORE_INDEX; attention_mask (B, L)."""
    def pad(rows: list, value: float, dtype: torch.dtype = torch.long) -> Tensor:
        return pad_sequence([torch.as_tensor(r, dtype=dtype) for r in rows], batch_first=True, padding_value=value)

    ids = [e["input_ids"] for e in examples]
    return {"fbank": pad([e["fbank"] for e in examples], audio.SILENT_FRAME, torch.float32),
            "input_ids": pad(ids, pad_id), "labels": pad([e["labels"] for e in examples], IGNORE_INDEX),
            "attention_mask": pad([[1] * len(i) for i in ids], 0)}


def parameter_table(model: SSLALM) -> dict[str, dict[str, int]]:
    """Trainable and total parameters per part of Fig. 1 (trainable as in training stages 2-4)."""
    parts = {"DASS": model.dass.parameters(), "conv": model.audio_conv.parameters(),
             "linear": model.audio_proj.parameters(), "LoRA": model.part_parameters("lora")}
    rows = {name: sum(p.numel() for p in ps) for name, ps in parts.items()}
    trainable = sum(rows.values())
    rows["LLM"] = sum(p.numel() for p in model.llm.parameters()) - rows["LoRA"]
    return {"parts": rows, "trainable": trainable, "total": trainable + rows["LLM"]}


def build_meta(size: str, llm: str) -> SSLALM:
    """The paper's full-size model on the meta device: shapes only, no weights, no memory."""
    _, LMConfig = LLMS[llm]
    with torch.device("meta"):
        return SSLALM(SSLALMConfig.paper(size, llm, llm_config=asdict(LMConfig())))
