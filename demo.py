"""The embedded demo: the whole pipeline of the paper on a CPU in a few minutes, with nothing downloaded.

    python train.py --demo --output-dir demo       # (train.py hands --demo to `run_demo`)
    python evaluate.py --task demo --checkpoint demo
    python cli.py ask --checkpoint demo demo/data/eval/am_tone_000.wav "What can you hear?"

What it does, and what stands in for what in the paper:
    1. data        synthetic sounds of 12 kinds (tones, noises, chirps, clicks, modulated tones, silence) at two
                   loudness levels, with captions, class questions and open questions in OpenAQA's JSON format,
                   and a held-out split in LTU's evaluation format (`make_demo_data`)              <- OpenAQA
    2. tokenizer   a byte-level BPE learnt from the demo's text (`train_demo_tokenizer`)        <- GPT-NeoX's
    3. LLM         a tiny Mamba LM pretrained from scratch on the demo's text, each QA pair after a description
                   of its clip (`pretrain_demo_lm`)                                              <- Mamba-2.8B
    4. DASS        a tiny DASS pretrained to tag the clips with their class and loudness
                   (`pretrain_demo_dass`)                                                        <- DASS on AudioSet
    5. ssLALM      stages 1 and 2 of LTU's recipe through `trainer.train` and `sslalm.SSLALM`, the same code as
                   the real run: the projector alone, then DASS + projector + LoRA on a frozen LM
    6. check       answers to LTU's classification prompt on the held-out clips (the paper's sampling)
`DemoConfig` holds the sizes and steps; the JSON files name audio relative to their own folder, so the output
folder can be moved as a whole.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor, nn

import audio
import checkpoint
import sslalm
import weights
from dass import DASS, DASSConfig
from data import CLASSIFY_PROMPT, OpenAQADataset, load_eval_json, load_openaqa
from mamba import MambaConfig, MambaLM
from trainer import TrainConfig, count_parameters, lr_at, train

# ---- The demo, part 1: a synthetic sound question-answer set in OpenAQA format -----------------------------------

class Sound(NamedTuple):
    display: str  # the class's display name, the answer to the classification prompt
    kind: str     # a tone, a noise, a sweep, clicks or silence
    caption: str  # what it sounds like ("A loud ...")


DEMO_CLASSES = {  # name (its mid in the label CSV: /demo/<name>) -> Sound
    "low_tone": Sound("Low tone", "a tone", "steady low-pitched tone"),
    "middle_tone": Sound("Middle tone", "a tone", "steady tone of middle pitch"),
    "high_tone": Sound("High tone", "a tone", "steady high-pitched tone"),
    "white_noise": Sound("White noise", "a noise", "bright hiss of white noise"),
    "pink_noise": Sound("Pink noise", "a noise", "soft rushing pink noise"),
    "brown_noise": Sound("Brown noise", "a noise", "deep rumbling brown noise"),
    "rising_chirp": Sound("Rising chirp", "a sweep", "tone sweeping upward in pitch"),
    "falling_chirp": Sound("Falling chirp", "a sweep", "tone sweeping downward in pitch"),
    "click_train": Sound("Click train", "clicks", "regular train of sharp clicks"),
    "am_tone": Sound("Amplitude-modulated tone", "a tone", "tone pulsing on and off"),
    "fm_tone": Sound("Frequency-modulated tone", "a tone", "warbling tone whose pitch wobbles"),
    "silence": Sound("Silence", "silence", "silence"),
}
TONE_BANDS = {"low_tone": (150.0, 300.0), "middle_tone": (600.0, 1000.0), "high_tone": (2500.0, 4000.0)}
LEVELS_DB = {"quiet": (-44.0, -32.0), "loud": (-20.0, -12.0)}  # RMS in dB re full scale; two apart for clear answers
CLICK_PEAK_DB = {"quiet": (-30.0, -18.0), "loud": (-6.0, -1.0)}  # click trains: peak level instead of RMS


def synth_clip(cls: str, rng: np.random.Generator, sr: int = audio.SAMPLE_RATE) -> tuple[np.ndarray, dict]:
    """One random clip of class `cls` (a name of DEMO_CLASSES): float32 samples (n,) and its parameters.
    Durations 1-3 s, random phases, levels, frequencies within the class's band, so every clip is new."""
    dur = float(rng.uniform(1.0, 3.0))
    n = int(dur * sr)
    t = np.arange(n) / sr
    p: dict[str, Any] = {"class": cls, "duration": round(dur, 3)}
    phase = rng.uniform(0, 2 * np.pi)
    if cls in TONE_BANDS:
        f = p["freq"] = float(rng.uniform(*TONE_BANDS[cls]))
        x = np.sin(2 * np.pi * f * t + phase)
    elif cls.endswith("_noise"):
        spec = np.fft.rfft(rng.standard_normal(n))
        f = np.fft.rfftfreq(n, 1 / sr)
        f[0] = f[1]
        spec *= {"white": 1.0, "pink": f ** -0.5, "brown": f ** -1.0}[cls.split("_")[0]]  # power ~ 1/f^0, 1/f, 1/f^2
        x = np.fft.irfft(spec, n)
    elif cls.endswith("_chirp"):
        lo, hi = float(rng.uniform(200, 400)), float(rng.uniform(2000, 4000))
        f0, f1 = (lo, hi) if cls == "rising_chirp" else (hi, lo)
        p["freq_start"], p["freq_end"] = f0, f1
        k = math.log(f1 / f0)
        x = np.sin(2 * np.pi * f0 * dur / k * (np.exp(k * t / dur) - 1) + phase)  # exponential sweep f0 -> f1
    elif cls == "click_train":
        rate = p["rate"] = float(rng.uniform(4, 12))
        x = np.zeros(n)
        burst = rng.standard_normal(24) * np.exp(-np.arange(24) / 4)
        for c in np.arange(rng.uniform(0, 1 / rate), dur, 1 / rate):
            i = int(c * sr)
            x[i:i + 24] += burst[:n - i]
    elif cls in ("am_tone", "fm_tone"):
        fc = p["freq"] = float(rng.uniform(500, 1200))
        fm = p["mod_rate"] = float(rng.uniform(2, 4) if cls == "am_tone" else rng.uniform(3, 6))
        if cls == "am_tone":  # the tone switched on and off (square-wave modulation, 10 ms ramps): pulses
            gate = np.sin(2 * np.pi * fm * t + rng.uniform(0, 2 * np.pi))
            x = np.clip(gate * 0.5 / (2 * np.pi * fm * 0.01) + 0.5, 0, 1) * np.sin(2 * np.pi * fc * t + phase)
        else:
            dev = p["freq_deviation"] = float(rng.uniform(0.35, 0.5) * fc)
            x = np.sin(2 * np.pi * fc * t + dev / fm * np.sin(2 * np.pi * fm * t) + phase)
    elif cls == "silence":
        x = rng.standard_normal(n)
    else:
        raise ValueError(f"unknown demo class {cls!r}")
    if cls == "silence":
        p["loudness"], level = "silent", float(rng.uniform(-80, -70))
    else:
        p["loudness"] = str(rng.choice(list(LEVELS_DB)))
        level = float(rng.uniform(*(CLICK_PEAK_DB if cls == "click_train" else LEVELS_DB)[p["loudness"]]))
    p["level_db"] = round(level, 2)
    if cls == "click_train":  # sparse clicks: a peak level (their RMS is ~20 dB lower)
        x = x / np.abs(x).max() * 10 ** (level / 20)
    else:
        x = x / max(np.sqrt(np.mean(x ** 2)), 1e-12) * 10 ** (level / 20)
    fade = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.01 * sr))  # 10 ms fades
    return np.clip(x * fade, -1, 1).astype(np.float32), p


def demo_questions(sound: Sound, loudness: str, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(task, instruction, output) for one clip: the classification prompt, an open description, two closed ones."""
    described = f"A {loudness} {sound.caption}." if loudness != "silent" else "Silence: nothing can be heard."
    return [
        ("cla_label", CLASSIFY_PROMPT, sound.display),
        ("open-ended question", str(rng.choice(["What can you hear?", "Describe the sound."])), described),
        ("closed-ended question", "Is the sound loud or quiet?",
         {"loud": "Loud.", "quiet": "Quiet.", "silent": "There is no sound."}[loudness]),
        ("closed-ended question", "What kind of sound is it: a tone, a noise, a sweep or clicks?",
         f"{sound.kind.capitalize()}." if sound.kind != "silence" else "None of them: it is silence."),
    ]


def make_demo_data(out_dir: str | Path, clips_per_class: int = 32, eval_per_class: int = 10, seed: int = 0,
                   verbose: bool = True) -> dict[str, Path]:
    """Write the demo's data set into out_dir; returns the paths written.

    data/train/*.wav, data/eval/*.wav     the clips (16 kHz, 16-bit)
    data/demo_train.json                  OpenAQA-format QA pairs on the training clips (4 per clip)
    data/demo_cla.json                    only the classification pairs (stage 1 data)
    data/demo_clips.json                  every clip's class and synthesis parameters
    demo_eval.json, demo_labels.csv       the held-out clips with LTU's classification prompt, and the labels
                                          (index,mid,display_name) for `evaluate.py --task demo`
    """
    out = Path(out_dir).resolve()
    rng = np.random.default_rng(seed)
    paths = {"train": out / "data" / "demo_train.json", "cla": out / "data" / "demo_cla.json",
             "clips": out / "data" / "demo_clips.json", "eval": out / "demo_eval.json",
             "labels": out / "demo_labels.csv"}
    clips, train, cla, evals = [], [], [], []
    for split, per_class in (("train", clips_per_class), ("eval", eval_per_class)):
        (out / "data" / split).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            for cls, sound in DEMO_CLASSES.items():
                x, p = synth_clip(cls, rng)
                f = out / "data" / split / f"{cls}_{j:03d}.wav"
                sf.write(str(f), x, audio.SAMPLE_RATE, subtype="PCM_16")
                in_data = f.relative_to(out / "data").as_posix()  # as data/*.json name it
                clips.append({"file": in_data, "split": split, **p})
                if split == "eval":
                    evals.append(dict(instruction=CLASSIFY_PROMPT, input="", audio_id=f"data/{in_data}",
                                      dataset="demo", task="cla_label", output=sound.display))
                    continue
                for task, q, a in demo_questions(sound, p["loudness"], rng):
                    e = dict(instruction=q, input="", audio_id=in_data, dataset="demo", task=task, output=a)
                    train.append(e)
                    if task == "cla_label":
                        cla.append(e)
    order = rng.permutation(len(train))  # interleave classes and question types in the file
    for key, obj in (("train", [train[i] for i in order]), ("cla", cla), ("clips", clips), ("eval", evals)):
        paths[key].write_text(json.dumps(obj, indent=1))
    with open(paths["labels"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "mid", "display_name"])
        for i, (cls, sound) in enumerate(DEMO_CLASSES.items()):
            w.writerow([i, f"/demo/{cls}", sound.display])
    if verbose:
        print(f"  {len(DEMO_CLASSES)} classes x {clips_per_class} training clips -> {len(train)} QA pairs "
              f"({len(cla)} classification); {len(evals)} held-out clips -> {paths['eval'].name}")
    return paths


# ---- The demo, part 2: a tokenizer, a tiny Mamba LM and a tiny DASS pretrained on its data, then the recipe ----

@dataclass
class DemoConfig:
    """Sizes and lengths of `python train.py --demo`; the defaults take a few minutes on 2 CPU cores."""
    clips_per_class: int = 96          # training clips per class (4 QA pairs each)
    eval_per_class: int = 10           # held-out clips per class
    vocab_size: int = 512              # byte-level BPE: 256 bytes + <|endoftext|> + merges
    lm_d_model: int = 64
    lm_layers: int = 2
    lm_d_state: int = 4                # N (16 in Mamba-2.8B): the CPU scan's cost grows with it
    lm_steps: int = 1200               # text-only pretraining of the tiny LM
    lm_lr: float = 3e-3
    dass_dims: tuple[int, ...] = (8, 16, 32, 64)
    dass_depths: tuple[int, ...] = (0, 1, 1, 1)  # no blocks at the first (longest-scan) stage: CPU time
    dass_steps: int = 600              # classifier pretraining of the tiny DASS
    dass_lr: float = 3e-3
    audio_frames: int = 304            # 3.04 s: every demo clip fits, so training and answering see the same input
    batch_size: int = 32               # also the batch of the two pretrainings
    micro_batch: int = 16
    stage1_epochs: int = 5             # projector only, classification pairs
    stage1_lr: float = 3e-3
    stage2_epochs: int = 3             # DASS + projector + LoRA, all pairs
    stage2_lr: float = 3e-4
    response_only_loss: bool = True    # the loss on the answers only (the paper: on the whole text)
    warmup_steps: int = 10
    check_clips: int | None = None     # held-out clips answered at the end (None: all)


def demo_texts(entries: list[dict]) -> list[str]:
    """The LM's pretraining text. Each QA pair in the ssLALM's prompt format, preceded by a description of its clip
    (the answer to "What can you hear?") and ended by EOS: the LM learns to answer questions about a description
    that comes before the prompt, the place where the ssLALM will put its audio tokens."""
    described = {e["audio_id"]: e["output"] for e in entries if e["task"] == "open-ended question"}
    return [f"{described[e['audio_id']]}\n{sslalm.prompt_text(e['instruction'])}{e['output']}<|endoftext|>"
            for e in entries]


def train_demo_tokenizer(texts: list[str], path: str | Path, vocab_size: int) -> None:
    """A byte-level BPE like GPT-NeoX's (the Mamba tokenizer): no prefix space, <|endoftext|> = id 0."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))


def _pretrain(model: nn.Module, loss_fn: Callable[[list[int]], Tensor], n: int, steps: int, lr: float,
              batch: int, warmup: int, seed: int, name: str) -> None:
    """A plain training loop for the demo's two pretrainings: random batches of indices into n examples, AdamW,
    warm-up then linear decay, clipping at 1.0."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    t0, avg = time.time(), None
    for step in range(1, steps + 1):
        loss = loss_fn(torch.randint(n, (batch,), generator=g).tolist())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr, warmup, steps)
        opt.step()
        avg = loss.item() if avg is None else 0.9 * avg + 0.1 * loss.item()
        if step % 100 == 0 or step == steps:
            print(f"      {name} step {step}/{steps}  loss {avg:.3f}  ({time.time() - t0:.0f} s)", file=sys.stderr)
    model.eval()


def pretrain_demo_lm(texts: list[str], tokenizer, cfg: DemoConfig, seed: int, out: Path) -> nn.Module:
    """Next-token training of a tiny Mamba LM from scratch on `texts`; saved in the HF format in `out`."""
    torch.manual_seed(seed)
    lm = MambaLM(MambaConfig(d_model=cfg.lm_d_model, n_layer=cfg.lm_layers, d_state=cfg.lm_d_state,
                             vocab_size=tokenizer.tokenizer.get_vocab_size()))
    seqs = [tokenizer.encode(t) for t in texts]

    def loss_fn(idx: list[int]) -> Tensor:
        L = max(len(seqs[i]) for i in idx)
        ids = torch.full((len(idx), L), tokenizer.eos_token_id)
        labels = torch.full((len(idx), L), -100)
        for r, i in enumerate(idx):
            ids[r, :len(seqs[i])] = labels[r, :len(seqs[i])] = torch.tensor(seqs[i])
        logits = lm(ids)[:, :-1]                                                    # (B, L - 1, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)

    _pretrain(lm, loss_fn, len(seqs), cfg.lm_steps, cfg.lm_lr, cfg.batch_size, cfg.warmup_steps, seed, "LM")
    weights.save_mamba(lm, str(out))
    return lm


def lm_check(lm: nn.Module, tokenizer, texts: list[str]) -> int:
    """How many of `texts` (description, prompt, answer, EOS) the LM completes exactly, greedily, from the prompt."""
    right = 0
    with torch.no_grad():
        for text in texts:
            context, answer = text.removesuffix("<|endoftext|>").rsplit("### Response:\n", 1)
            ids = torch.tensor([tokenizer.encode(context + "### Response:\n")])
            new = lm.generate(ids, max_new_tokens=24, eos_token_id=tokenizer.eos_token_id)[0].tolist()
            new = new[:new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
            right += tokenizer.decode(new) == answer
    return right


def pretrain_demo_dass(clips: list[dict], cfg: DemoConfig, seed: int, path: Path) -> nn.Module:
    """A tiny DASS trained from scratch to tag the demo's training clips with their class and their loudness (as
    DASS was trained to tag AudioSet clips); saved with `weights.save_dass`, head included, like a published
    DASS checkpoint. The head's first 12 outputs score the classes, the last 2 the loudness (a softmax each)."""
    torch.manual_seed(seed)
    tags, k = demo_tags(), len(DEMO_CLASSES)
    model = DASS(DASSConfig(dims=cfg.dass_dims, depths=cfg.dass_depths, n_classes=len(tags)))
    x = torch.stack([audio.dass_input_from_file(c["file"], cfg.audio_frames) for c in clips])  # (n, T, 128)
    cls = torch.tensor([tags.index(c["class"]) for c in clips])
    loud = torch.tensor([tags.index(c["loudness"]) - k if c["loudness"] in tags else -100 for c in clips])

    def loss_fn(idx: list[int]) -> Tensor:
        logits = model(x[idx])                                                      # (B, 14)
        return F.cross_entropy(logits[:, :k], cls[idx]) + F.cross_entropy(logits[:, k:], loud[idx], ignore_index=-100)

    _pretrain(model, loss_fn, len(clips), cfg.dass_steps, cfg.dass_lr, cfg.batch_size, cfg.warmup_steps, seed, "DASS")
    weights.save_dass(model, path)
    return model


def demo_tags() -> list[str]:
    """The demo DASS's output tags: the 12 classes, then the two loudness levels."""
    return list(DEMO_CLASSES) + list(LEVELS_DB)


def dass_accuracy(model: nn.Module, clips: list[dict], frames: int) -> float:
    """How often the DASS's best class tag is the clip's class."""
    x = torch.stack([audio.dass_input_from_file(c["file"], frames) for c in clips])
    with torch.no_grad():
        best = model.eval()(x)[:, :len(DEMO_CLASSES)].argmax(-1).tolist()
    return sum(demo_tags()[b] == c["class"] for b, c in zip(best, clips)) / len(clips)


def run_demo(output_dir: str | Path, cfg: DemoConfig | None = None, seed: int = 0) -> dict:
    """The whole demo (data, tokenizer, LM and DASS pretraining, stages 1 and 2 of the recipe), the final
    checkpoint in output_dir. Returns the timings and the exact-match accuracy of answers (the paper's sampling)
    on the held-out clips."""
    cfg = cfg or DemoConfig()
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    times, t_all = {}, time.time()
    say = lambda s="": print(s, file=sys.stderr, flush=True)

    say(f"[1/6] Data: synthetic sounds with questions and answers, in OpenAQA's JSON format -> {out}/data")
    t = time.time()
    paths = make_demo_data(out, cfg.clips_per_class, cfg.eval_per_class, seed, verbose=False)
    entries, cla = load_openaqa(paths["train"]), load_openaqa(paths["cla"])
    all_clips = [{**c, "file": str(paths["clips"].parent / c["file"])} for c in json.loads(paths["clips"].read_text())]
    clips = [c for c in all_clips if c["split"] == "train"]
    say(f"      {len(DEMO_CLASSES)} classes: {', '.join(c.display for c in DEMO_CLASSES.values())}")
    say(f"      {len(clips)} training clips x 4 questions = {len(entries)} QA pairs, e.g. {entries[0]['instruction']!r}"
        f" -> {entries[0]['output']!r}; {cfg.eval_per_class * len(DEMO_CLASSES)} held-out clips in demo_eval.json")
    times["data"] = time.time() - t

    t = time.time()
    say("[2/6] Tokenizer: a byte-level BPE (the kind GPT-NeoX's is, which Mamba uses) learnt from the demo's text")
    llm_dir = out / "llm"
    llm_dir.mkdir(exist_ok=True)
    texts = demo_texts(entries)
    train_demo_tokenizer(texts, llm_dir / "tokenizer.json", cfg.vocab_size)
    tok = weights.MambaTokenizer(str(llm_dir / "tokenizer.json"))
    say(f"      {tok.tokenizer.get_vocab_size()} tokens, <|endoftext|> = {tok.eos_token_id}; "
        f"{cla[0]['output']!r} -> {tok.tokenizer.encode(cla[0]['output']).tokens}")
    say(f"[3/6] Language model: Mamba-2.8B was pretrained on the Pile; here a tiny Mamba (d_model {cfg.lm_d_model}, "
        f"{cfg.lm_layers} layers, N {cfg.lm_d_state}) learns the demo's text from scratch, each QA pair after a "
        "description of its clip:")
    say("      " + texts[0].replace("\n", "\\n"))
    lm = pretrain_demo_lm(texts, tok, cfg, seed, llm_dir)
    say(f"      {count_parameters(lm.parameters()):,} parameters, saved in Hugging Face's format in {llm_dir}; with "
        f"the description in front it answers {lm_check(lm, tok, texts[:24])} of 24 of its training questions (the "
        "ssLALM will have to answer from the sound alone)")
    times["lm"] = time.time() - t

    t = time.time()
    dass_file = out / "dass" / "dass_demo.safetensors"
    say(f"[4/6] Audio encoder: DASS was trained to tag AudioSet clips; no DASS this small exists, so a tiny one "
        f"(dims {cfg.dass_dims}, depths {cfg.dass_depths}) learns to tag the demo's training clips with their class "
        "and loudness")
    dass_model = pretrain_demo_dass(clips, cfg, seed, dass_file)
    held_out = [c for c in all_clips if c["split"] == "eval"]
    say(f"      saved in {dass_file}; on its own it tags {dass_accuracy(dass_model, held_out, cfg.audio_frames):.0%} "
        "of the held-out clips with the right class")
    times["dass"] = time.time() - t

    say("[5/6] ssLALM, the paper's recipe: DASS -> Conv2d + Linear projector -> audio tokens before the prompt -> "
        "frozen LM + LoRA")
    dass_cfg = DASSConfig(dims=cfg.dass_dims, depths=cfg.dass_depths, n_classes=len(demo_tags()))
    config = sslalm.SSLALMConfig(size="custom", llm="mamba", dass=dataclasses.asdict(dass_cfg),
                                 llm_weights=str(llm_dir), dass_weights=str(dass_file),
                                 audio_frames=cfg.audio_frames, response_only_loss=cfg.response_only_loss)
    torch.manual_seed(seed)
    model = checkpoint.build(config)                      # the same loading code as the real model
    table = sslalm.parameter_table(model)
    say("      parameters: " + ", ".join(f"{k} {v:,}" for k, v in table["parts"].items()) +
        f"; a clip's {cfg.audio_frames} fbank frames -> {2 * math.ceil(cfg.audio_frames / 64)} audio tokens")
    ds_all, ds_cla = (OpenAQADataset(e, model.encode_example, [paths["train"].parent], audio_frames=cfg.audio_frames,
                                     cache=True) for e in (entries, cla))
    common = dict(batch_size=cfg.batch_size, micro_batch=cfg.micro_batch, warmup_steps=cfg.warmup_steps, seed=seed,
                  save_every=0, keep=1, num_workers=0, log_every=25)
    for stage, ds, parts, lr, epochs in ((1, ds_cla, ("projector",), cfg.stage1_lr, cfg.stage1_epochs),
                                         (2, ds_all, ("dass", "projector", "lora"), cfg.stage2_lr, cfg.stage2_epochs)):
        if epochs <= 0:
            continue
        t = time.time()
        model.set_trainable(parts)
        what = "the classification pairs" if stage == 1 else "all QA pairs"
        say(f"      stage {stage}: {what} ({len(ds)}); trains {' + '.join(parts)} "
            f"({count_parameters(p for p in model.parameters() if p.requires_grad):,} parameters), the rest is frozen; "
            f"lr {lr:g}, {epochs} epochs of batches of {cfg.batch_size} ({cfg.micro_batch} per forward pass)")
        tc = TrainConfig(lr=lr, epochs=epochs, trainable=parts, name=f"stage {stage}", **common)
        train(model, ds, sslalm.collate, tok.eos_token_id, tc, out / f"stage{stage}", overwrite=True)
        times[f"stage{stage}"] = time.time() - t
    checkpoint.save_checkpoint(model, out)
    say(f"      the trained DASS, projector and LoRA weights: {out / 'model.safetensors'} (+ config.json naming "
        "the base LM and DASS)")

    t = time.time()
    model.eval()
    evals = load_eval_json(paths["eval"])
    evals = evals[::max(1, len(evals) // cfg.check_clips)][:cfg.check_clips] if cfg.check_clips else evals
    say(f"[6/6] Check: answers to LTU's classification prompt on {len(evals)} held-out clips (the paper's sampling)")
    right, generator = 0, torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in range(0, len(evals), 24):
            chunk = evals[s:s + 24]
            answers = model.answer([c.path for c in chunk], [c.instruction for c in chunk],
                                   max_new_tokens=24, generator=generator)  # the paper's sampling
            right += sum(a == c.reference for a, c in zip(answers, chunk))
        clip = evals[-1].path
        for q in ("What can you hear?", "Is the sound loud or quiet?"):
            a = model.answer([clip], [q], max_new_tokens=24, generator=generator)[0]
            say(f"      {Path(clip).name}: {q!r} -> {a!r}")
    acc = right / len(evals)
    times["check"] = time.time() - t
    times["total"] = time.time() - t_all
    say(f"      exact answers: {right}/{len(evals)} = {acc:.1%}")
    say(f"done in {times['total']:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in times.items() if k != "total") +
        f"). Next:\n  python evaluate.py --task demo --checkpoint {out}\n"
        f"  python cli.py ask --checkpoint {out} {clip} \"What can you hear?\"")
    result = {"accuracy": acc, "times": times, "checkpoint": str(out), "config": dataclasses.asdict(cfg)}
    (out / "demo_result.json").write_text(json.dumps(result, indent=1))
    return result
