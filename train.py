"""Training: LTU's four-stage recipe on OpenAQA-format data (REFERENCE §7), data-parallel and resumable.

    python train.py --size small --llm mamba        # the four stages in turn, on the default layout (layout.py)
    python train.py --size small --llm mamba --stage 1 --data stage1.json --audio-root /data \\
        --dass-weights DASS_small.pth --llm-weights mamba-2.8b-hf --output-dir runs/stage1
    python train.py ... --stage 2 --data stage2.json --init-from runs/stage1 --output-dir runs/stage2
    torchrun --nproc_per_node 8 train.py ...        # the same training, data-parallel over 8 GPUs
    python train.py ... --resume                    # continue the run in --output-dir exactly where it stopped
    python train.py --demo --output-dir demo        # CPU, minutes: synthetic sounds -> a tiny ssLALM

The recipe (paper §III-C, following LTU; global batch 256, AdamW without weight decay, 100 warm-up steps then a
linear decay, gradient clipping at 1.0, bf16 autocast on GPU):
    stage  data                          trains                       lr     epochs
    1      classification                projector                    1e-3   2
    2      classification                DASS, projector, LoRA        1e-4   2
    3      all closed-ended questions    DASS, projector, LoRA        1e-4   1
    4      all of OpenAQA (open+closed)  DASS, projector, LoRA        1e-4   1
`--stage` picks what trains, the learning rate and the epochs; it selects nothing from the data. LTU published a
separate JSON file for each stage; pass the stage's file with --data, and the previous stage's output directory
with --init-from.

Glossary (code name -> meaning):
    entry          one OpenAQA question-answer pair: {instruction, input, audio_id, dataset, task, output}
    order          the shuffled entry indices of one epoch (a seeded permutation, stored in every checkpoint)
    step           one optimizer update on `batch_size` (256) entries: the global batch
    micro-batch    the entries one process puts through the model at once (`micro_batch`); the global batch's
                   micro-batches are dealt to the ranks round-robin and their gradients summed (accumulation)
    rank, world    this process's index among `world` data-parallel processes (torchrun)

Loss of a step = the mean over its micro-batches of the model's loss (mean cross-entropy over a micro-batch's
labelled tokens), as with Hugging Face's Trainer that LTU used. Because micro-batches are cut from the global
order the same way whatever the number of processes, 1 or N GPUs with the same batch size and micro-batch size
train the same model up to float summation order (and dropout masks, which are per process).

Unlike LTU: the data loader fails, naming the entry and the file, on a missing or unreadable audio file (LTU
replaced the features with constants); `--skip-bad` skips such entries, counts them and reports them at the end.

What --output-dir receives: config.json + model.safetensors, the trained DASS, projector and LoRA weights (what
`sslalm.load_checkpoint`, `evaluate.py` and `sslalm.py ask` read; the config names the base weights); log.jsonl,
one line per step; loss.png if matplotlib is installed; checkpoints/step-NNNNNNN/ every --save-every steps and at
the end, the newest --keep kept, each written into a temporary directory and renamed when complete. A checkpoint
holds the model files, trainer.pt (optimizer, step, epoch, the epoch's shuffled order) and rng-rank{r}.pt (each
process's torch/numpy/python random states), so --resume continues exactly: on CPU the losses after a resume are
bit-identical to those of an uninterrupted run. A NaN or infinite loss stops the run at that step, unsaved.

`--demo` runs the embedded demo (demo.py): the whole pipeline on a CPU in about three minutes, stages 1 and 2 of
the recipe through the same `train` loop and model code as the real run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

import audio
import layout

OPENAQA_KEYS = ("instruction", "input", "audio_id", "dataset", "task", "output")

# stage -> (trainable parts, learning rate, epochs)                                                 REFERENCE §7
STAGES = {
    1: (("projector",), 1e-3, 2),
    2: (("dass", "projector", "lora"), 1e-4, 2),
    3: (("dass", "projector", "lora"), 1e-4, 1),
    4: (("dass", "projector", "lora"), 1e-4, 1),
}


class DataError(ValueError):
    """Bad training data: a malformed JSON entry, a missing or unreadable audio file."""


class NonFiniteLoss(RuntimeError):
    """The loss or the gradient norm of a step became NaN or infinite."""


# ----------------------------------------------------------------------------------------------------------------
# OpenAQA data
# ----------------------------------------------------------------------------------------------------------------

def load_openaqa(path: str | Path) -> list[dict]:
    """Read and validate an OpenAQA JSON file: a list of objects with the six string keys `OPENAQA_KEYS`.

    Raises DataError naming the file, the entry index and the problem for the first malformed entry, so a bad
    file fails before any training starts. Extra keys are allowed (and ignored).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of entries, got a {type(data).__name__}")
    if not data:
        raise DataError(f"{path}: contains no entries")
    for i, e in enumerate(data):
        if not isinstance(e, dict):
            raise DataError(f"{path}: entry {i} is a {type(e).__name__}, not an object with keys {OPENAQA_KEYS}")
        where = f"{path}: entry {i}" + (f" (audio_id {e['audio_id']!r})" if isinstance(e.get("audio_id"), str) else "")
        missing = [k for k in OPENAQA_KEYS if k not in e]
        if missing:
            raise DataError(f"{where}: missing key(s) {missing}; an OpenAQA entry has {list(OPENAQA_KEYS)}")
        for k in OPENAQA_KEYS:
            if not isinstance(e[k], str):
                raise DataError(f"{where}: {k!r} must be a string, got {type(e[k]).__name__}")
        for k in ("instruction", "audio_id", "output"):
            if not e[k].strip():
                raise DataError(f"{where}: {k!r} is empty")
    return data


def parse_prefixes(specs: Sequence[str]) -> list[tuple[str, str]]:
    """['OLD=NEW', ...] -> [(OLD, NEW), ...] for `resolve_audio`."""
    out = []
    for s in specs:
        if "=" not in s:
            raise DataError(f"--audio-prefix expects OLD=NEW, got {s!r}")
        old, new = s.split("=", 1)
        out.append((old, new))
    return out


def resolve_audio(audio_id: str, audio_root: str | Path | None, prefixes: Sequence[tuple[str, str]] = ()) -> Path:
    """Where an entry's audio is on this disk: the first matching prefix rewrite OLD -> NEW is applied, then a
    relative path is taken relative to `audio_root`."""
    for old, new in prefixes:
        if audio_id.startswith(old):
            audio_id = new + audio_id[len(old):]
            break
    p = Path(audio_id)
    if not p.is_absolute() and audio_root is not None:
        p = Path(audio_root) / p
    return p


@dataclass
class BadEntry:
    index: int
    file: str
    reason: str

    def __str__(self) -> str:
        return f"entry {self.index} ({self.file}): {self.reason}"


class OpenAQADataset(torch.utils.data.Dataset):
    """OpenAQA entries -> training examples {"fbank": (T, 128), "input_ids": list, "labels": list, "index": int}.

    encode(instruction, output, input) -> (input_ids, labels) tokenizes an entry (the model's prompt format and text
    cutoff: `SSLALM.encode_example`). The audio is read with `audio.load_audio` (soundfile, resampled to 16 kHz)
    and turned into the DASS input (`audio.dass_input`: `audio_frames` frames, or all of them when None).
    A file that is missing or cannot be decoded gives a `BadEntry` instead of an example; the training loop raises
    it as a DataError or, with skip_bad, skips and counts it. Missing files are found up front by `check_files`.
    """

    def __init__(self, entries: list[dict], encode: Callable[[str, str, str], tuple[list[int], list[int]]],
                 audio_root: str | Path | None = None, prefixes: Sequence[tuple[str, str]] = (),
                 audio_frames: int | None = audio.DASS_FRAMES, cache: bool = False):
        self.entries, self.encode, self.audio_frames = entries, encode, audio_frames
        self.cache = {} if cache else None  # path -> DASS input; in this process only (use with num_workers=0)
        self.paths = [str(resolve_audio(e["audio_id"], audio_root, prefixes)) for e in entries]
        self.index = list(range(len(entries)))  # dataset position -> entry index in the JSON file

    def check_files(self, skip_bad: bool) -> list[BadEntry]:
        """Stat every audio file. A missing one raises DataError naming the entry and the file, or with skip_bad is
        dropped from the dataset; returns the dropped entries."""
        bad, seen = [], {}
        for i, p in zip(self.index, self.paths):
            if p not in seen:
                seen[p] = os.path.isfile(p)
            if not seen[p]:
                bad.append(BadEntry(i, p, "no such audio file"))
                if not skip_bad:
                    raise DataError(f"entry {i} (audio_id {self.entries[i]['audio_id']!r}): audio file {p} does not "
                                    "exist; set --audio-root (relative paths) or --audio-prefix OLD=NEW (absolute "
                                    "paths), or pass --skip-bad to skip such entries")
        if bad:
            drop = {b.index for b in bad}
            keep = [k for k, i in enumerate(self.index) if i not in drop]
            self.index = [self.index[k] for k in keep]
            self.paths = [self.paths[k] for k in keep]
        return bad

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> dict | BadEntry:
        i, path = self.index[k], self.paths[k]
        e = self.entries[i]
        fb = self.cache.get(path) if self.cache is not None else None
        if fb is None:
            try:
                fb = audio.dass_input(audio.load_audio(path), self.audio_frames)  # (T, 128)
            except (OSError, ValueError) as err:
                return BadEntry(i, path, str(err))
            if self.cache is not None:
                self.cache[path] = fb
        input_ids, labels = self.encode(e["instruction"], e["output"], e["input"])
        return {"fbank": fb, "input_ids": input_ids, "labels": labels, "index": i}


def collate_checked(items: list, collate: Callable[[list[dict], int], dict], pad_id: int) -> dict:
    """The model's collate on the good items; bad ones travel along in batch["bad"] (a list of BadEntry)."""
    good = [x for x in items if not isinstance(x, BadEntry)]
    batch = collate([{k: v for k, v in x.items() if k != "index"} for x in good], pad_id) if good else {}
    batch["bad"] = [x for x in items if isinstance(x, BadEntry)]
    batch["n"] = len(good)
    return batch


# ----------------------------------------------------------------------------------------------------------------
# Data order, sharding and the learning-rate schedule
# ----------------------------------------------------------------------------------------------------------------

def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The shuffled order of epoch `epoch`: a permutation of range(n) that depends on (seed, epoch) only."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def steps_per_epoch(n: int, batch_size: int) -> int:
    return -(-n // batch_size)  # the last, smaller global batch is kept


def micro_batches(order: Tensor, step: int, batch_size: int, micro_batch: int, world: int, rank: int) -> list[list[int]]:
    """The micro-batches that `rank` runs for step `step` (0-based, within the epoch).

    The step's global batch order[step*B : (step+1)*B] is cut into consecutive micro-batches of `micro_batch`
    entries; micro-batch j goes to rank j % world. With world = 1 a process runs them all, so 1 and N processes
    see the same micro-batches.
    """
    chunk = order[step * batch_size:(step + 1) * batch_size].tolist()
    mbs = [chunk[j:j + micro_batch] for j in range(0, len(chunk), micro_batch)]
    return mbs[rank::world]


def lr_at(step: int, lr: float, warmup: int, total: int) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warm-up over `warmup` steps to `lr`, then a
    linear decay that reaches lr / (total - warmup) at the last step."""
    if step <= warmup:
        return lr * step / warmup
    return lr * (total - step + 1) / max(1, total - warmup)


# ----------------------------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_sum(self, t: Tensor) -> Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t


def init_distributed() -> Dist:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK); a single process otherwise.
    NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        raise ValueError(f"WORLD_SIZE={world} but RANK or MASTER_ADDR is not set: launch data-parallel runs with "
                         "torchrun (or set RANK, MASTER_ADDR, MASTER_PORT for every process), or unset WORLD_SIZE")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(rank, world, local)


def all_reduce_grads(params: list[nn.Parameter], d: Dist, divide_by: float) -> None:
    """grad <- (sum over ranks of grad) / divide_by, one flat buffer for all parameters (trainable ones only)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if d.world > 1:
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        d.all_sum(flat)
        off = 0
        for p, g in zip(params, grads):
            p.grad = flat[off:off + g.numel()].view_as(p).to(p.dtype)
            off += g.numel()
    else:
        for p, g in zip(params, grads):
            p.grad = g
    for p in params:
        p.grad.div_(divide_by)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: <output_dir>/checkpoints/step-0000123/{config.json, model.safetensors, trainer.pt, rng-rank0.pt}
# ----------------------------------------------------------------------------------------------------------------

def rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first (temporary directories of unfinished writes excluded)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "trainer.pt").is_file())


def save_checkpoint(model: nn.Module, trainer_state: dict, output_dir: str | Path, step: int, d: Dist,
                    keep: int) -> Path:
    """Write checkpoint `step` atomically: everything goes into a temporary directory that is renamed when
    complete, so a crash mid-write leaves no checkpoint that looks whole. Keeps the newest `keep` checkpoints."""
    root = Path(output_dir) / "checkpoints"
    final, tmp = root / f"step-{step:07d}", root / f".tmp-step-{step:07d}"
    if d.main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    d.barrier()
    torch.save(rng_state(), tmp / f"rng-rank{d.rank}.pt")
    d.barrier()
    if d.main:
        model.save_checkpoint(tmp)
        torch.save(trainer_state, tmp / "trainer.pt")
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    d.barrier()
    return final


def _fsync_dir(p: Path) -> None:
    for f in p.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_final(model: nn.Module, output_dir: str | Path) -> None:
    """The finished model in `output_dir` itself (config.json + model.safetensors, what `sslalm.load_checkpoint`
    reads), written into a temporary directory first and moved into place file by file."""
    out = Path(output_dir)
    tmp = out / ".tmp-final"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_checkpoint(tmp, home=out)
    _fsync_dir(tmp)
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):  # config.json last
        os.replace(f, out / f.name)
    tmp.rmdir()


# ----------------------------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """One training run. Defaults: LTU's recipe (REFERENCE §7); `for_stage` fills lr, epochs and trainable."""
    lr: float = 1e-4
    epochs: int = 1
    trainable: tuple[str, ...] = ("dass", "projector", "lora")
    batch_size: int = 256          # global (effective) batch: micro_batch x accumulation x processes
    micro_batch: int = 4
    warmup_steps: int = 100
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    max_steps: int | None = None   # train exactly this many steps, overriding epochs (as HF's Trainer)
    seed: int = 0
    save_every: int = 1000         # steps; 0: only at the end
    keep: int = 2                  # checkpoints kept
    num_workers: int = 4
    skip_bad: bool = False
    log_every: int = 10            # progress lines when stderr is not a terminal
    name: str = "train"            # shown in the progress line ("stage 1")

    @classmethod
    def for_stage(cls, stage: int, **overrides) -> "TrainConfig":
        if stage not in STAGES:
            raise ValueError(f"--stage must be one of {sorted(STAGES)}; got {stage}")
        trainable, lr, epochs = STAGES[stage]
        kw = dict(lr=lr, epochs=epochs, trainable=trainable, name=f"stage {stage}")
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)   # per step of this invocation
    steps: int = 0                                      # global steps done in all (resumed ones included)
    bad: list[BadEntry] = field(default_factory=list)
    checkpoint: Path | None = None


class Progress:
    """A live line on stderr (rewritten in place on a terminal) and a JSON line per step in <output_dir>/log.jsonl."""

    def __init__(self, output_dir: Path, name: str, total: int, start: int, every: int, enabled: bool):
        self.name, self.total, self.start, self.every, self.enabled = name, total, start, every, enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.time()
        self.samples = 0
        self.log = open(output_dir / "log.jsonl", "a", encoding="utf-8") if enabled else None

    def step(self, rec: dict) -> None:
        if not self.enabled:
            return
        self.samples += rec["samples"]
        dt = time.time() - self.t0
        rec["samples_per_s"] = round(self.samples / max(dt, 1e-9), 2)
        self.log.write(json.dumps(rec) + "\n")
        self.log.flush()
        s = rec["step"]
        eta = dt / max(1, s - self.start) * (self.total - s)
        line = (f"{self.name} | step {s}/{self.total} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
                f"{rec['samples_per_s']:.1f} samples/s | ETA {_hms(eta)}")
        if self.tty:
            print("\r" + line, end="\n" if s == self.total else "", file=sys.stderr, flush=True)
        elif s % self.every == 0 or s == self.total or s == self.start + 1:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.log:
            self.log.close()
            if self.tty:
                print(file=sys.stderr)


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def train(model: nn.Module, dataset: torch.utils.data.Dataset, collate: Callable[[list[dict], int], dict],
          pad_id: int, cfg: TrainConfig, output_dir: str | Path, *, resume: str | Path | None = None,
          d: Dist | None = None, device: torch.device | str = "cpu",
          on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train `model`'s parameters that require grad on `dataset`; checkpoints and logs go to `output_dir`.

    model(**batch) must return the scalar loss of a micro-batch; model.save_checkpoint(dir) and
    model.trainable_state_dict() / load_trainable_state_dict(sd) save and restore the trained weights.
    resume: a checkpoint directory (or "latest": the newest in output_dir/checkpoints) to continue from exactly.
    on_step(step, loss) is called after every optimizer step (tests use it to simulate a crash).
    Raises NonFiniteLoss at the first step whose loss or gradient norm is NaN/inf (nothing of it is saved) and
    DataError at the first bad entry unless cfg.skip_bad.
    """
    d = d or Dist()
    device = torch.device(device)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no parameter requires grad: nothing to train")
    if d.world > 1:  # every rank starts from rank 0's weights
        for p in params:
            dist.broadcast(p.data, src=0)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    n = len(dataset)
    if n == 0:
        raise DataError("no training entries left")
    per_epoch = steps_per_epoch(n, cfg.batch_size)
    total = per_epoch * cfg.epochs if cfg.max_steps is None else cfg.max_steps
    result = TrainResult()
    step, order_epoch, order = 0, 0, epoch_order(n, cfg.seed, 0)

    if resume is not None:
        ckpt = Path(resume)
        if str(resume) == "latest":
            found = list_checkpoints(out)
            if not found:
                raise FileNotFoundError(f"--resume: no checkpoint in {out / 'checkpoints'}")
            ckpt = found[-1]
        st = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=False)
        if st["n_entries"] != n:
            raise DataError(f"--resume {ckpt}: the checkpoint was trained on {st['n_entries']} entries, the data "
                            f"now has {n}; resume with the same data (and --skip-bad setting)")
        for key in ("batch_size", "seed", "epochs", "max_steps"):
            if st["config"][key] != getattr(cfg, key):
                raise ValueError(f"--resume {ckpt}: it was trained with {key} {st['config'][key]}, now {key} is "
                                 f"{getattr(cfg, key)}; the data order and the schedule depend on it")
        _load_trainable(model, ckpt)
        opt.load_state_dict(st["optimizer"])
        step, order_epoch, order = st["step"], st["order_epoch"], st["order"]
        result.bad = [BadEntry(**b) for b in st["bad"]]
        rng_file = ckpt / f"rng-rank{d.rank}.pt"
        if st["world"] != d.world:
            print(f"note: {ckpt} was written by {st['world']} processes, resuming with {d.world}; the data order "
                  "and weights continue exactly, random states (dropout) start afresh", file=sys.stderr)
            torch.manual_seed(cfg.seed + 7919 * d.rank + step)
        else:
            set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
        if d.main:
            print(f"resumed from {ckpt} at step {step}/{total}", file=sys.stderr)
    else:
        torch.manual_seed(cfg.seed + 7919 * d.rank)
        np.random.seed(cfg.seed + d.rank)
        random.seed(cfg.seed + d.rank)

    def state() -> dict:
        return {"step": step, "epoch": step // per_epoch, "step_in_epoch": step % per_epoch,
                "order_epoch": order_epoch, "order": order,
                "optimizer": opt.state_dict(), "n_entries": n, "world": d.world, "total_steps": total,
                "config": dataclasses.asdict(cfg), "bad": [dataclasses.asdict(b) for b in result.bad]}

    prog = Progress(out, cfg.name, total, step, cfg.log_every, d.main)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    model.train()
    try:
        while step < total:
            epoch = step // per_epoch
            if order_epoch != epoch:
                order_epoch, order = epoch, epoch_order(n, cfg.seed, epoch)
            first = step - epoch * per_epoch
            last = min(per_epoch, first + (total - step))
            plan = [micro_batches(order, s, cfg.batch_size, cfg.micro_batch, d.world, d.rank)
                    for s in range(first, last)]
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=[mb for mbs in plan for mb in mbs], num_workers=cfg.num_workers,
                collate_fn=_Collate(collate, pad_id), generator=torch.Generator().manual_seed(cfg.seed),
                pin_memory=device.type == "cuda")
            batches = iter(loader)
            for mbs in plan:
                t0 = time.time()
                loss_sum = torch.zeros((), dtype=torch.float64)
                n_mb, n_samples = 0, 0
                for _ in mbs:
                    batch = next(batches)
                    for b in batch.pop("bad"):
                        if not cfg.skip_bad:
                            raise DataError(f"{b}; pass --skip-bad to skip such entries")
                        result.bad.append(b)
                    k = batch.pop("n")
                    if k == 0:
                        continue
                    batch = {key: v.to(device, non_blocking=True) for key, v in batch.items()}
                    with autocast:
                        loss = model(**batch)
                    loss.backward()
                    loss_sum += loss.detach().double().cpu()
                    n_mb += 1
                    n_samples += k
                tot = d.all_sum(torch.tensor([loss_sum.item(), n_mb, n_samples], dtype=torch.float64,
                                             device=device if d.world > 1 else "cpu")).cpu()
                if tot[1] == 0:
                    raise DataError(f"step {step + 1}: every entry of the global batch was bad")
                step_loss = (tot[0] / tot[1]).item()
                all_reduce_grads(params, d, tot[1].item())
                gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
                if not (math.isfinite(step_loss) and math.isfinite(gnorm)):
                    last_ckpt = list_checkpoints(out)
                    raise NonFiniteLoss(
                        f"step {step + 1}: loss {step_loss} / gradient norm {gnorm} is not finite; stopped without "
                        f"updating. Last good checkpoint: {last_ckpt[-1] if last_ckpt else 'none yet'}")
                lr = lr_at(step + 1, cfg.lr, cfg.warmup_steps, total)
                for g in opt.param_groups:
                    g["lr"] = lr
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                result.losses.append(step_loss)
                prog.step({"step": step, "epoch": epoch, "loss": step_loss, "lr": lr, "grad_norm": gnorm,
                           "samples": int(tot[2].item()), "time": round(time.time() - t0, 4)})
                if cfg.save_every and step % cfg.save_every == 0 and step < total:
                    result.checkpoint = save_checkpoint(model, state(), out, step, d, cfg.keep)
                if on_step is not None:
                    on_step(step, step_loss)
            del batches, loader
        result.checkpoint = save_checkpoint(model, state(), out, step, d, cfg.keep)
    finally:
        prog.close()
    result.steps = step
    result.bad = gather_bad(result.bad, d)
    return result


def gather_bad(bad: list[BadEntry], d: Dist) -> list[BadEntry]:
    """The bad entries met by all ranks, each once, by entry index."""
    if d.world > 1:
        parts = [None] * d.world
        dist.all_gather_object(parts, bad)
        bad = [b for p in parts for b in p]
    return list({b.index: b for b in bad}.values())


def report_bad(bad: list[BadEntry], file=None, limit: int = 20) -> None:
    """The end-of-run report of --skip-bad: how many entries were skipped, and which."""
    if not bad:
        return
    file = file or sys.stderr
    print(f"skipped {len(bad)} bad entr{'y' if len(bad) == 1 else 'ies'} (--skip-bad):", file=file)
    for b in sorted(bad, key=lambda b: b.index)[:limit]:
        print(f"  {b}", file=file)
    if len(bad) > limit:
        print(f"  ... and {len(bad) - limit} more", file=file)


class _Collate:
    """Picklable collate_fn for the DataLoader's worker processes."""

    def __init__(self, collate: Callable, pad_id: int):
        self.collate, self.pad_id = collate, pad_id

    def __call__(self, items: list) -> dict:
        return collate_checked(items, self.collate, self.pad_id)


def count_parameters(params) -> int:
    return sum(p.numel() for p in params)


def _load_trainable(model: nn.Module, ckpt: str | Path) -> None:
    from safetensors.torch import load_file
    model.load_trainable_state_dict(load_file(str(Path(ckpt) / "model.safetensors")))


# ----------------------------------------------------------------------------------------------------------------
# The real run and the command line
# ----------------------------------------------------------------------------------------------------------------

def run_stage(args: argparse.Namespace) -> TrainResult:
    """One stage of the recipe on the real model (see the module docstring); the final checkpoint in --output-dir."""
    import sslalm
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the loader's worker processes tokenize
    d = init_distributed()
    device = torch.device(args.device or (f"cuda:{d.local_rank}" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else None  # the frozen LLM in bf16 on GPU; trained parts fp32
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if d.main else (lambda s: None)
    entries = load_openaqa(args.data)                          # malformed data fails before any model is built
    out = Path(args.output_dir)
    if args.init_from:
        say(f"stage {args.stage}: starting from {args.init_from} (its config names the base weights; "
            "--llm-weights overrides it)")
        model = sslalm.load_checkpoint(args.init_from, device=device, dtype=dtype, llm_weights=args.llm_weights,
                                       tokenizer=args.tokenizer)
    else:
        if args.stage > 1:
            say(f"note: stage {args.stage} without --init-from starts from a new projector and new LoRA adapters")
        overrides = {k: v for k, v in dict(tokenizer=args.tokenizer, audio_frames=args.audio_frames,
                                           dass=layout.dass_shape(args.dass_weights, args.size, say)).items()
                     if v is not None}
        config = sslalm.SSLALMConfig.paper(args.size, args.llm, dass_weights=args.dass_weights,
                                           llm_weights=args.llm_weights, **overrides)
        model = sslalm.SSLALM.build(config, device=device, dtype=dtype)
    cfg = TrainConfig.for_stage(
        args.stage, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, micro_batch=args.micro_batch,
        warmup_steps=args.warmup_steps, grad_clip=args.grad_clip, weight_decay=args.weight_decay,
        max_steps=args.max_steps, seed=args.seed, save_every=args.save_every, keep=args.keep,
        num_workers=args.num_workers, skip_bad=args.skip_bad, log_every=args.log_every,
        trainable=tuple(args.trainable.split(",")) if args.trainable else None)
    model.set_trainable(cfg.trainable)
    if args.grad_checkpointing:
        model.llm.gradient_checkpointing = True
    table = sslalm.parameter_table(model)
    say(f"stage {args.stage}: trains {' + '.join(cfg.trainable)} "
        f"({count_parameters(p for p in model.parameters() if p.requires_grad):,} of {table['total']:,} parameters), "
        f"lr {cfg.lr:g}, {cfg.epochs} epoch(s), batch {cfg.batch_size} = {d.world} process(es) x micro-batch "
        f"{cfg.micro_batch} x accumulation, {len(entries):,} entries from {args.data}")
    ds = OpenAQADataset(entries, model.encode_example, args.audio_root or Path(args.data).resolve().parent,
                        parse_prefixes(args.audio_prefix), model.config.audio_frames)
    missing = ds.check_files(args.skip_bad)
    pad_id = getattr(model.tokenizer, "pad_token_id", None)
    pad_id = model.tokenizer.eos_token_id if pad_id is None else pad_id
    res = train(model, ds, sslalm.collate, pad_id, cfg, out, resume=args.resume, d=d, device=device)
    res.bad = missing + res.bad
    if d.main:
        save_final(model, out)
        report_bad(res.bad)
        plot_losses(out)
        say(f"done: {res.steps} steps; the model is in {out} (config.json + model.safetensors)")
    return res


def plot_losses(output_dir: str | Path) -> Path | None:
    """loss.png from log.jsonl, if matplotlib is installed (it is not a dependency)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    log = Path(output_dir) / "log.jsonl"
    recs = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.is_file() else []
    if not recs:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    path = Path(output_dir) / "loss.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="See the module docstring for the recipe.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", action="store_true", help="synthetic sounds -> a tiny ssLALM on CPU in minutes")
    p.add_argument("--output-dir", help="checkpoints, log.jsonl and the final model go here (default: "
                   "runs/SIZE-LLM/stageN; without --stage the run folder runs/SIZE-LLM, one stageN folder per stage)")
    p.add_argument("--seed", type=int, default=0)
    m = p.add_argument_group("model")
    m.add_argument("--size", choices=("small", "medium"), default="small", help="DASS size")
    m.add_argument("--llm", choices=("mamba", "llama"), default="mamba", help="mamba: ssLALM; llama: hybrid LALM")
    m.add_argument("--dass-weights", help="DASS checkpoint (DASS_small.pth / DASS_medium.pth)")
    m.add_argument("--llm-weights", help="folder of the LLM (state-spaces/mamba-2.8b-hf or lmsys/vicuna-7b-v1.5)")
    m.add_argument("--tokenizer", help="tokenizer.json / tokenizer.model (default: in --llm-weights)")
    m.add_argument("--init-from", help="the previous stage's output dir (its config names the base weights)")
    m.add_argument("--audio-frames", type=int, help="fbank frames per clip (default 1024)")
    m.add_argument("--grad-checkpointing", action="store_true", help="recompute LLM blocks in backward")
    d = p.add_argument_group("data")
    d.add_argument("--data", help="the stage's OpenAQA JSON file (default: DATA_DIR/stageN.json)")
    d.add_argument("--data-dir", default=str(layout.OPENAQA), help="the curriculum's OpenAQA files stage1.json ... "
                   "stage4.json (default: %(default)s)")
    d.add_argument("--audio-root", help="relative audio_id paths are under this folder (default: the JSON's folder)")
    d.add_argument("--audio-prefix", action="append", default=[], metavar="OLD=NEW",
                   help="rewrite audio_id paths starting with OLD (repeatable)")
    d.add_argument("--skip-bad", action="store_true", help="skip (and report) entries whose audio is missing/bad")
    d.add_argument("--num-workers", type=int, default=4, help="data loader processes")
    t = p.add_argument_group("recipe (defaults: REFERENCE §7 for the --stage)")
    t.add_argument("--stage", type=int, choices=sorted(STAGES), help="train this stage only (default: 1 with --data, "
                   "--init-from or --resume; without them the four stages in turn, each from the previous one's "
                   "model, skipping finished ones and resuming a stopped one)")
    t.add_argument("--trainable", help="override the stage's parts, e.g. dass,projector,lora")
    t.add_argument("--lr", type=float)
    t.add_argument("--epochs", type=int)
    t.add_argument("--max-steps", type=int, help="train exactly this many steps, overriding --epochs as Hugging "
                   "Face's Trainer does (the lr schedule ends there)")
    t.add_argument("--batch-size", type=int, help="global batch (default 256)")
    t.add_argument("--micro-batch", type=int, help="entries per forward pass per process (default 4)")
    t.add_argument("--warmup-steps", type=int)
    t.add_argument("--grad-clip", type=float)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--device", help="default: cuda:LOCAL_RANK if available, else cpu")
    c = p.add_argument_group("checkpoints and logs")
    c.add_argument("--save-every", type=int, help="steps between checkpoints (default 1000; 0: only at the end)")
    c.add_argument("--keep", type=int, help="checkpoints kept (default 2)")
    c.add_argument("--resume", nargs="?", const="latest", help="continue from the newest checkpoint in "
                   "--output-dir (or the one given)")
    c.add_argument("--log-every", type=int, default=10, help="progress lines when stderr is not a terminal")
    e = p.add_argument_group("demo")
    e.add_argument("--demo-clips", type=int, help="training clips per class")
    e.add_argument("--demo-lm-steps", type=int, help="pretraining steps of the tiny LM")
    e.add_argument("--demo-epochs", type=int, help="epochs of demo stage 2")
    args = p.parse_args(argv)
    if args.demo and not args.output_dir:
        p.error("--demo needs --output-dir")
    if args.stage is None and (args.data or args.init_from or args.resume):
        args.stage = 1  # one stage's flags: stage 1 unless --stage says otherwise
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.demo:
            import demo
            kw = dict(clips_per_class=args.demo_clips, lm_steps=args.demo_lm_steps, stage2_epochs=args.demo_epochs)
            demo.run_demo(args.output_dir, demo.DemoConfig(**{k: v for k, v in kw.items() if v is not None}),
                          args.seed)
        else:
            layout.training_defaults(args)
            if args.stage is not None:
                run_stage(args)
            else:
                def stage(n: int, out: Path, init_from: Path | None) -> TrainResult:
                    resume = "latest" if list_checkpoints(out) else None
                    return run_stage(layout.stage_args(args, n, out, init_from, resume))
                layout.run_curriculum(stage, args.output_dir)
    except (DataError, NonFiniteLoss, FileNotFoundError, ValueError) as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; continue with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
