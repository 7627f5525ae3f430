"""The embedded demo (README: "Set up, run the demo, test"), the paper's pipeline on a CPU in minutes in six steps:
synthetic sound QA data in OpenAQA's format, a byte-level BPE, a tiny Mamba LM and a tiny DASS pretrained on it (each
step says what it stands in for), stages 1 and 2 of LTU's recipe through the real run's code, a held-out check.
"""
from __future__ import annotations

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
from trainer import TrainConfig, lr_at, train


def say(text: str = "") -> None:
    print(text, file=sys.stderr, flush=True)


# ---- part 1: a synthetic sound question-answer set in OpenAQA format ----------------------------------------------
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
DEMO_TAGS = list(DEMO_CLASSES) + list(LEVELS_DB)  # the demo DASS's outputs: the 12 classes, then the loudness


def synth_clip(cls: str, rng: np.random.Generator, sr: int = audio.SAMPLE_RATE) -> tuple[np.ndarray, dict]:
    """One random 1-3 s clip of class `cls` (a key of DEMO_CLASSES): float32 samples (n,) and its parameters."""
    dur = float(rng.uniform(1.0, 3.0))
    n = int(dur * sr)
    t = np.arange(n) / sr
    p: dict[str, Any] = {"class": cls, "duration": round(dur, 3)}
    phase = rng.uniform(0, 2 * np.pi)
    if cls in TONE_BANDS:
        p["freq"] = float(rng.uniform(*TONE_BANDS[cls]))
        x = np.sin(2 * np.pi * p["freq"] * t + phase)
    elif cls.endswith("_noise"):
        f = np.maximum(np.fft.rfftfreq(n, 1 / sr), sr / n)
        slope = {"white": 0.0, "pink": -0.5, "brown": -1.0}[cls.split("_")[0]]  # power ~ 1/f^0, 1/f, 1/f^2
        x = np.fft.irfft(np.fft.rfft(rng.standard_normal(n)) * f ** slope, n)
    elif cls.endswith("_chirp"):
        lo, hi = float(rng.uniform(200, 400)), float(rng.uniform(2000, 4000))
        f0, f1 = p["freq_start"], p["freq_end"] = (lo, hi) if cls == "rising_chirp" else (hi, lo)
        k = math.log(f1 / f0)
        x = np.sin(2 * np.pi * f0 * dur / k * (np.exp(k * t / dur) - 1) + phase)  # exponential sweep f0 -> f1
    elif cls == "click_train":
        rate = p["rate"] = float(rng.uniform(4, 12))
        x = np.zeros(n)
        burst = rng.standard_normal(24) * np.exp(-np.arange(24) / 4)
        for c in np.arange(rng.uniform(0, 1 / rate), dur, 1 / rate):
            i = int(c * sr)
            x[i:i + 24] += burst[:n - i]
    elif cls == "am_tone":  # the tone switched on and off (square-wave modulation, 10 ms ramps): pulses
        fc, fm = p["freq"], p["mod_rate"] = float(rng.uniform(500, 1200)), float(rng.uniform(2, 4))
        gate = np.sin(2 * np.pi * fm * t + rng.uniform(0, 2 * np.pi))
        x = np.clip(gate * 0.5 / (2 * np.pi * fm * 0.01) + 0.5, 0, 1) * np.sin(2 * np.pi * fc * t + phase)
    elif cls == "fm_tone":
        fc, fm = p["freq"], p["mod_rate"] = float(rng.uniform(500, 1200)), float(rng.uniform(3, 6))
        dev = p["freq_deviation"] = float(rng.uniform(0.35, 0.5) * fc)
        x = np.sin(2 * np.pi * fc * t + dev / fm * np.sin(2 * np.pi * fm * t) + phase)
    else:  # silence: a faint hiss
        x = rng.standard_normal(n)
    p["loudness"] = "silent" if cls == "silence" else str(rng.choice(list(LEVELS_DB)))
    levels = CLICK_PEAK_DB if cls == "click_train" else {**LEVELS_DB, "silent": (-80.0, -70.0)}
    level = p["level_db"] = round(float(rng.uniform(*levels[p["loudness"]])), 2)
    scale = np.abs(x).max() if cls == "click_train" else np.sqrt(np.mean(x ** 2))  # sparse clicks: by their peak
    fade = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.01 * sr))  # 10 ms fades
    return np.clip(x / max(scale, 1e-12) * 10 ** (level / 20) * fade, -1, 1).astype(np.float32), p


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
    """Write the demo's data into out_dir: data/{train,eval}/*.wav, data/demo_train.json (4 OpenAQA QA pairs a clip),
    data/demo_cla.json (its classification pairs), data/demo_clips.json (the clips' parameters), demo_eval.json and
    demo_labels.csv (the held-out clips and labels for `evaluate.py --task demo`). Returns those paths by key."""
    out = Path(out_dir).resolve()
    rng = np.random.default_rng(seed)
    paths = {k: out / "data" / f"demo_{k}.json" for k in ("train", "cla", "clips")}
    paths |= {"eval": out / "demo_eval.json", "labels": out / "demo_labels.csv"}
    clips, train, evals = [], [], []
    for split, per_class in (("train", clips_per_class), ("eval", eval_per_class)):
        (out / "data" / split).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            for cls, sound in DEMO_CLASSES.items():
                x, p = synth_clip(cls, rng)
                in_data = f"{split}/{cls}_{j:03d}.wav"  # as data/*.json name it
                sf.write(str(out / "data" / in_data), x, audio.SAMPLE_RATE, subtype="PCM_16")
                clips.append({"file": in_data, "split": split, **p})
                if split == "eval":
                    evals.append(dict(instruction=CLASSIFY_PROMPT, input="", audio_id=f"data/{in_data}",
                                      dataset="demo", task="cla_label", output=sound.display))
                    continue
                for task, q, a in demo_questions(sound, p["loudness"], rng):
                    train.append(dict(instruction=q, input="", audio_id=in_data, dataset="demo", task=task, output=a))
    train = [train[i] for i in rng.permutation(len(train))]  # interleave classes and question types in the file
    cla = [e for e in train if e["task"] == "cla_label"]
    for key, obj in (("train", train), ("cla", cla), ("clips", clips), ("eval", evals)):
        paths[key].write_text(json.dumps(obj, indent=1))
    paths["labels"].write_text("index,mid,display_name\n" + "".join(  # the display names have no comma or quote
        f"{i},/demo/{cls},{s.display}\n" for i, (cls, s) in enumerate(DEMO_CLASSES.items())))
    if verbose:
        say(f"      {len(DEMO_CLASSES)} classes: {', '.join(s.display for s in DEMO_CLASSES.values())}")
        say(f"      {len(train) // 4} training clips x 4 questions = {len(train)} QA pairs, {len(evals)} held out")
    return paths


# ---- part 2: a tokenizer, a tiny Mamba LM and a tiny DASS pretrained on the demo's data, then the recipe ----------
@dataclass
class DemoConfig:
    """Sizes and lengths of `python train.py --demo`; the defaults take about eight minutes on 2 CPU cores."""
    clips_per_class: int = 96          # training clips per class (4 QA pairs each)
    eval_per_class: int = 10           # held-out clips per class
    vocab_size: int = 512              # byte-level BPE: 256 bytes + <|endoftext|> + merges
    lm_d_model: int = 64
    lm_layers: int = 2
    lm_d_state: int = 4                # N (16 in Mamba-2.8B): the CPU scan's cost grows with it
    lm_steps: int = 1200               # text-only pretraining of the tiny LM
    dass_dims: tuple[int, ...] = (8, 16, 32, 64)
    dass_depths: tuple[int, ...] = (0, 1, 1, 1)  # no blocks at the first (longest-scan) stage: CPU time
    dass_steps: int = 600              # classifier pretraining of the tiny DASS
    pretrain_lr: float = 3e-3          # of the tiny LM and DASS
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


def train_demo_tokenizer(texts: list[str], path: str | Path, vocab_size: int) -> None:
    """A byte-level BPE like GPT-NeoX's (the Mamba tokenizer): no prefix space, <|endoftext|> = id 0."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))


def pretrain(model: nn.Module, loss_fn: Callable[[list[int]], Tensor], n: int, steps: int, lr: float,
             cfg: DemoConfig, seed: int, name: str) -> None:
    """The pretrainings' loop: random batches of n examples, AdamW, warm-up then linear decay, gradient norm <= 1."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(1, steps + 1):
        loss = loss_fn(torch.randint(n, (cfg.batch_size,), generator=g).tolist())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr, cfg.warmup_steps, steps)
        opt.step()
        if step % 100 == 0 or step == steps:
            say(f"      {name} step {step}/{steps}  loss {loss.item():.3f}  ({time.time() - t0:.0f} s)")


def run_demo(output_dir: str | Path, cfg: DemoConfig | None = None, seed: int = 0) -> dict:
    """The whole demo, the final checkpoint in output_dir. Returns (and writes to demo_result.json) the timings and
    the exact-match accuracy of the answers (the paper's sampling) on the held-out clips."""
    cfg = cfg or DemoConfig()
    out = Path(output_dir).resolve()  # made by make_demo_data
    stamps = [("start", time.time())]  # (the step that ends, when)
    say(f"[1/6] Data: synthetic sounds with questions and answers, in OpenAQA's JSON format -> {out}/data")
    paths = make_demo_data(out, cfg.clips_per_class, cfg.eval_per_class, seed)
    entries, cla = load_openaqa(paths["train"]), load_openaqa(paths["cla"])
    clips = [{**c, "file": str(paths["clips"].parent / c["file"])} for c in json.loads(paths["clips"].read_text())]
    fbank = {Path(c["file"]): audio.dass_input_from_file(c["file"], cfg.audio_frames) for c in clips}  # (T, 128)
    stamps.append(("data", time.time()))

    say("[2/6] Tokenizer: a byte-level BPE (the kind GPT-NeoX's is, which Mamba uses) learnt from the demo's text")
    llm_dir = out / "llm"
    llm_dir.mkdir(exist_ok=True)
    described = {e["audio_id"]: e["output"] for e in entries if e["task"] == "open-ended question"}
    texts = [f"{described[e['audio_id']]}\n{sslalm.prompt_text(e['instruction'])}{e['output']}<|endoftext|>"
             for e in entries]  # each QA pair after a description of its clip, where the ssLALM puts audio tokens
    train_demo_tokenizer(texts, llm_dir / "tokenizer.json", cfg.vocab_size)
    tok = weights.MambaTokenizer(str(llm_dir / "tokenizer.json"))
    say(f"[3/6] Language model: Mamba-2.8B was pretrained on the Pile; here a tiny Mamba (d_model {cfg.lm_d_model}, "
        f"{cfg.lm_layers} layers, N {cfg.lm_d_state}) learns the demo's text from scratch: {texts[0]!r}")
    torch.manual_seed(seed)
    lm = MambaLM(MambaConfig(d_model=cfg.lm_d_model, n_layer=cfg.lm_layers, d_state=cfg.lm_d_state,
                             vocab_size=tok.tokenizer.get_vocab_size()))
    seqs = [torch.tensor(tok.encode(text)) for text in texts]

    def lm_loss(idx: list[int]) -> Tensor:  # next-token prediction
        labels = nn.utils.rnn.pad_sequence([seqs[i] for i in idx], batch_first=True, padding_value=-100)  # (B, L)
        logits = lm(labels.masked_fill(labels < 0, tok.eos_token_id))[:, :-1]                          # (B, L-1, V)
        return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten())

    pretrain(lm, lm_loss, len(seqs), cfg.lm_steps, cfg.pretrain_lr, cfg, seed, "LM")
    weights.save_mamba(lm, str(llm_dir))                 # in Hugging Face's format
    stamps.append(("lm", time.time()))

    say(f"[4/6] Audio encoder: DASS was trained to tag AudioSet clips; here a tiny one (dims {cfg.dass_dims}, depths "
        f"{cfg.dass_depths}) learns to tag the demo's training clips with their class and loudness")
    torch.manual_seed(seed)
    dass = DASS(DASSConfig(dims=cfg.dass_dims, depths=cfg.dass_depths, n_classes=len(DEMO_TAGS)))
    tagged = [c for c in clips if c["split"] == "train"]
    x = torch.stack([fbank[Path(c["file"])] for c in tagged])                       # (n, T, 128)
    k = len(DEMO_CLASSES)  # a softmax over the first k outputs (the class), one over the rest (the loudness)
    cls = torch.tensor([DEMO_TAGS.index(c["class"]) for c in tagged])
    loud = torch.tensor([DEMO_TAGS.index(c["loudness"]) - k if c["loudness"] in DEMO_TAGS else -100 for c in tagged])

    def dass_loss(idx: list[int]) -> Tensor:
        logits = dass(x[idx])                                                       # (B, 14)
        return F.cross_entropy(logits[:, :k], cls[idx]) + F.cross_entropy(logits[:, k:], loud[idx])

    pretrain(dass, dass_loss, len(tagged), cfg.dass_steps, cfg.pretrain_lr, cfg, seed, "DASS")
    dass_file = out / "dass" / "dass_demo.safetensors"
    weights.save_dass(dass, dass_file)                    # head included, like a published DASS
    stamps.append(("dass", time.time()))

    say("[5/6] ssLALM, the paper's recipe: DASS -> Conv2d + Linear projector -> audio tokens before the prompt -> "
        "frozen LM + LoRA")
    config = sslalm.SSLALMConfig(size="custom", llm="mamba", dass=dataclasses.asdict(dass.config),
                                 llm_weights=str(llm_dir), dass_weights=str(dass_file),
                                 audio_frames=cfg.audio_frames, response_only_loss=cfg.response_only_loss)
    torch.manual_seed(seed)
    model = checkpoint.build(config)                      # the same loading code as the real model
    say("      parameters: " + ", ".join(f"{k} {v:,}" for k, v in sslalm.parameter_table(model)["parts"].items()) +
        f"; a clip's {cfg.audio_frames} fbank frames -> {2 * math.ceil(cfg.audio_frames / 64)} audio tokens")
    common = dict(batch_size=cfg.batch_size, micro_batch=cfg.micro_batch, warmup_steps=cfg.warmup_steps, seed=seed,
                  save_every=0, keep=1, num_workers=0, log_every=25)
    for stage, qa, parts, lr, epochs in ((1, cla, ("projector",), cfg.stage1_lr, cfg.stage1_epochs),
                                         (2, entries, ("dass", "projector", "lora"), cfg.stage2_lr, cfg.stage2_epochs)):
        if epochs > 0:
            model.set_trainable(parts)
            ds = OpenAQADataset(qa, model.encode_example, [out / "data"], audio_frames=cfg.audio_frames, cache=fbank)
            say(f"      stage {stage}: {len(ds)} QA pairs train {' + '.join(parts)}, lr {lr:g}, the rest is frozen")
            tc = TrainConfig(lr=lr, epochs=epochs, trainable=parts, name=f"stage {stage}", **common)
            train(model, ds, sslalm.collate, tok.eos_token_id, tc, out / f"stage{stage}", overwrite=True)
            stamps.append((f"stage{stage}", time.time()))
    checkpoint.save_checkpoint(model, out)

    evals = load_eval_json(paths["eval"])
    evals = evals[::max(1, len(evals) // cfg.check_clips)][:cfg.check_clips] if cfg.check_clips else evals
    say(f"[6/6] Check: answers to LTU's classification prompt on {len(evals)} held-out clips (the paper's sampling)")
    generator = torch.Generator().manual_seed(seed)
    answers = model.eval().answer([c.path for c in evals], [c.instruction for c in evals], max_new_tokens=24,
                                  generator=generator)
    right = sum(a == c.reference for a, c in zip(answers, evals))
    clip = evals[-1].path
    for q in ("What can you hear?", "Is the sound loud or quiet?"):
        a = model.answer([clip], [q], max_new_tokens=24, generator=generator)[0]
        say(f"      {Path(clip).name}: {q!r} -> {a!r}")
    stamps.append(("check", time.time()))
    times = {k: t - t0 for (_, t0), (k, t) in zip(stamps, stamps[1:])}
    times["total"] = sum(times.values())
    say(f"      exact answers: {right}/{len(evals)} = {right / len(evals):.1%}")
    say(f"done in {times['total']:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in times.items() if k != "total") +
        f"). Next:\n  python evaluate.py --task demo --checkpoint {out}\n"
        f"  python cli.py ask --checkpoint {out} {clip} \"What can you hear?\"")
    result = {"accuracy": right / len(evals), "times": times, "checkpoint": str(out), "config": dataclasses.asdict(cfg)}
    (out / "demo_result.json").write_text(json.dumps(result, indent=1))
    return result
