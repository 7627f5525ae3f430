"""The training loop of LTU's four-stage recipe (paper §III-E, STAGES): data-parallel and resumable. A step's loss is
the mean of its micro-batches' losses (as Hugging Face's Trainer, which LTU used), so 1 or N processes train alike.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import checkpoint
from checkpoint import CorruptCheckpoint, check_model_files, fsync, read_plain
from data import BadEntry, DataError, collate_checked

STAGES = {  # stage -> (trainable parts, learning rate, epochs): LTU's recipe, paper §III-E
    1: (("projector",), 1e-3, 2),                 # on classification
    2: (("dass", "projector", "lora"), 1e-4, 2),  # on classification
    3: (("dass", "projector", "lora"), 1e-4, 1),  # on all closed-ended questions
    4: (("dass", "projector", "lora"), 1e-4, 1),  # on all of OpenAQA, open- and closed-ended
}
RUN_FILES = ("checkpoints", "log.jsonl", "config.json", "model.safetensors")  # what a run leaves
TRAINER_KEYS = {"step", "order_epoch", "order", "optimizer", "n_entries", "world", "config", "bad"}  # in trainer.pt


class NonFiniteLoss(RuntimeError):
    """The loss or the gradient norm of a step became NaN or infinite."""


class OutputInUse(ValueError):
    """A new run was asked to start in a folder that holds another run's checkpoints, log or final model."""


@dataclass
class TrainConfig:
    """One training run. Defaults: LTU's recipe (§III-E); `for_stage` fills lr, epochs and trainable."""
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
    log_every: int = 10            # steps between progress lines
    name: str = "train"            # shown in the progress line ("stage 1")

    def __post_init__(self):
        at_least = {"batch_size": 1, "micro_batch": 1, "epochs": 1, "max_steps": 1, "warmup_steps": 0,
                    "save_every": 0, "keep": 1, "num_workers": 0, "log_every": 1}
        for key, low in at_least.items():
            value = getattr(self, key)
            if not (isinstance(value, int) and value >= low or key == "max_steps" and value is None):
                raise ValueError(f"{key} must be an integer >= {low}; got {value!r}")
        for key, low in (("lr", ">"), ("grad_clip", ">"), ("weight_decay", ">=")):
            value = getattr(self, key)
            if not (math.isfinite(value) and (value > 0 if low == ">" else value >= 0)):
                raise ValueError(f"{key} must be a finite number {low} 0; got {value!r}")

    @classmethod
    def for_stage(cls, stage: int, **overrides) -> "TrainConfig":
        if stage not in STAGES:
            raise ValueError(f"--stage must be one of {sorted(STAGES)}; got {stage}")
        trainable, lr, epochs = STAGES[stage]
        kw = dict(lr=lr, epochs=epochs, trainable=trainable, name=f"stage {stage}")
        return cls(**{**kw, **{k: v for k, v in overrides.items() if v is not None}})


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)   # per step of this invocation
    steps: int = 0                                      # global steps done in all (resumed ones included)
    bad: list[BadEntry] = field(default_factory=list)
    checkpoint: Path | None = None


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The shuffled order of epoch `epoch`: a permutation of range(n) that depends on (seed, epoch) only."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def micro_batches(order: Tensor, step: int, batch_size: int, micro_batch: int, world: int, rank: int) -> list:
    """The passes `rank` makes in step `step` of the epoch: micro-batch j of order[step*B : (step+1)*B] goes to rank
    j % world; a rank with fewer than rank 0 pads with zero passes (None: no data, zero gradients)."""
    chunk = order[step * batch_size:(step + 1) * batch_size].tolist()
    mbs = [chunk[j:j + micro_batch] for j in range(0, len(chunk), micro_batch)]
    return mbs[rank::world] + [None] * (len(mbs[0::world]) - len(mbs[rank::world]))


def lr_at(step: int, lr: float, warmup: int, total: int) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warm-up over `warmup` steps to `lr`, then a
    linear decay that reaches lr / (total - warmup) at the last step."""
    if step <= warmup:
        return lr * step / warmup
    return lr * (total - step + 1) / max(1, total - warmup)


def count_parameters(params) -> int:
    return sum(p.numel() for p in params)


def init_distributed() -> int:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPU) if WORLD_SIZE > 1; returns the local rank (the caller
    makes its GPU current before any collective)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0 and 1 without a process group)."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class LossOf(nn.Module):
    """What DistributedDataParallel wraps: the model's loss; for batch None (a zero pass) a zero with zero gradients,
    so that a rank without data still joins the all-reduce."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict | None) -> Tensor:
        if batch is None:
            return sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0
        return self.model(**batch)


def rng_state(device: torch.device) -> dict:
    """This process's random states: torch's (dropout, the data order) and its own GPU's only (a resume may see one)."""
    s = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(device)
    return s


def set_rng_state(s: dict, device: torch.device) -> None:
    torch.set_rng_state(s["torch"])
    if "cuda" in s and device.type == "cuda":
        torch.cuda.set_rng_state(s["cuda"], device)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first (temporary folders of unfinished writes excluded)."""
    return sorted(p for p in (Path(output_dir) / "checkpoints").glob("step-*") if (p / "trainer.pt").is_file())


def save_checkpoint(model: nn.Module, trainer_state: dict, output_dir: str | Path, step: int, keep: int,
                    device: torch.device = torch.device("cpu")) -> Path:
    """Write checkpoint `step` into a temporary folder, flushed to disk and then renamed (a crash or a power loss
    leaves no checkpoint that looks whole); keep the newest `keep`."""
    rank = rank_world()[0]
    root = Path(output_dir) / "checkpoints"
    final, tmp = root / f"step-{step:07d}", root / f".tmp-step-{step:07d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(device), tmp / f"rng-rank{rank}.pt")
    barrier()
    if rank == 0:
        checkpoint.save_checkpoint(model, tmp)
        torch.save(trainer_state, tmp / "trainer.pt")
        fsync(*tmp.iterdir(), tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        fsync(root)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
    barrier()
    return final


def claim_output(out: Path, resume: str | Path | None, overwrite: bool) -> None:
    """A new run (resume None) refuses a folder holding another run's files (RUN_FILES; an empty log.jsonl does not
    count): its checkpoints would be rotated with the new ones and its log mixed in. overwrite deletes them first."""
    if resume is not None and overwrite:
        raise ValueError("--resume continues the run in the output folder, --overwrite starts afresh: pass one")
    held = [n for n in RUN_FILES if resume is None and (out / n).exists()
            and (n != "log.jsonl" or (out / n).stat().st_size)]
    if held and not overwrite:
        raise OutputInUse(f"{out} holds another run ({', '.join(held)}): pass --resume to continue it, --overwrite "
                          "to start afresh (deletes them), or another --output-dir")
    if held:
        barrier()  # every rank has looked before rank 0 deletes
        if rank_world()[0] == 0:
            print(f"--overwrite: deleting {', '.join(held)} in {out}", file=sys.stderr)
            for path in (out / name for name in held):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        barrier()


def _open_log(out: Path, start: int):
    """<out>/log.jsonl cut back to the steps up to `start` (and without a line torn by a stop), opened to append."""
    log, kept = out / "log.jsonl", []
    for line in log.read_text(encoding="utf-8").splitlines() if log.is_file() else []:
        with suppress(json.JSONDecodeError, KeyError, TypeError):
            if json.loads(line)["step"] <= start:
                kept.append(line)
    log.with_suffix(".tmp").write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(log.with_suffix(".tmp"), log)
    return open(log, "a", encoding="utf-8")


def train(model: nn.Module, dataset: torch.utils.data.Dataset, collate: Callable[[list[dict], int], dict],
          pad_id: int, cfg: TrainConfig, output_dir: str | Path, *, resume: str | Path | None = None,
          overwrite: bool = False, device: torch.device | str = "cpu",
          on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train `model`'s parameters that require grad (model(**batch) -> a micro-batch's mean loss) on `dataset`.
    resume: a checkpoint folder, or "latest" (the newest readable one in output_dir); on_step(step, loss) runs after
    every step. Raises NonFiniteLoss at a NaN/inf loss or gradient norm, DataError at a bad entry unless skip_bad."""
    (rank, world), device, out = rank_world(), torch.device(device), Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    claim_output(out, resume, overwrite)
    params = [p for p in model.parameters() if p.requires_grad]  # none: AdamW's "empty parameter list"
    n = len(dataset)
    if n == 0:
        raise DataError("no training entries left")
    per_epoch = math.ceil(n / cfg.batch_size)  # the last, smaller global batch is kept
    total = per_epoch * cfg.epochs if cfg.max_steps is None else cfg.max_steps
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    result = TrainResult()
    data_id = {"sha256": dataset.fingerprint() if hasattr(dataset, "fingerprint") else None,
               "file": getattr(dataset, "source", None)}
    if resume is None:
        step, order_epoch, order = 0, 0, epoch_order(n, cfg.seed, 0)
        torch.manual_seed(cfg.seed + 7919 * rank)  # the CPU and every CUDA device
    else:
        step, order_epoch, order, result.bad = _resume(resume, out, model, opt, cfg, n, data_id, device)
    net: nn.Module = LossOf(model)
    if world > 1:  # rank 0's weights are broadcast to every rank; gradients are averaged in the last pass
        net = DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None,
                                      broadcast_buffers=False)

    def state() -> dict:
        return {"step": step, "order_epoch": order_epoch, "order": order, "optimizer": opt.state_dict(),
                "n_entries": n, "data": data_id, "world": world, "config": dataclasses.asdict(cfg),
                "bad": [dataclasses.asdict(b) for b in result.bad]}

    model.train()
    start, t0, seen = step, time.time(), 0
    with (_open_log(out, step) if rank == 0 else nullcontext()) as log:  # log.jsonl on rank 0
        while step < total:
            epoch = step // per_epoch
            if order_epoch != epoch:
                order_epoch, order = epoch, epoch_order(n, cfg.seed, epoch)
            first = step - epoch * per_epoch
            plan = [micro_batches(order, s, cfg.batch_size, cfg.micro_batch, world, rank)
                    for s in range(first, min(per_epoch, first + total - step))]
            batches = iter(torch.utils.data.DataLoader(  # this epoch's micro-batches; zero passes read nothing
                dataset, batch_sampler=[mb for passes in plan for mb in passes if mb is not None],
                num_workers=cfg.num_workers, collate_fn=partial(collate_checked, collate=collate, pad_id=pad_id),
                generator=torch.Generator().manual_seed(cfg.seed), pin_memory=device.type == "cuda"))
            for passes in plan:
                loss, gnorm, samples = _gradient(net, params, batches, passes, cfg, device, result.bad, step + 1, out)
                lr = lr_at(step + 1, cfg.lr, cfg.warmup_steps, total)
                for g in opt.param_groups:
                    g["lr"] = lr
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                result.losses.append(loss)
                seen, dt = seen + samples, max(time.time() - t0, 1e-9)
                if log is not None:
                    print(json.dumps({"step": step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": gnorm,
                                      "samples": samples, "samples_per_s": round(seen / dt, 2)}), file=log, flush=True)
                if log is not None and (step % cfg.log_every == 0 or step in (start + 1, total)):
                    eta = int(dt / (step - start) * (total - step))
                    print(f"{cfg.name} | step {step}/{total} | loss {loss:.4f} | lr {lr:.2e} | {seen / dt:.1f} "
                          f"samples/s | ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}", file=sys.stderr)
                if cfg.save_every and step % cfg.save_every == 0 and step < total:
                    result.checkpoint = save_checkpoint(model, state(), out, step, cfg.keep, device)
                if on_step is not None:
                    on_step(step, loss)
            del batches  # the loader's worker processes end with the epoch
        result.checkpoint = save_checkpoint(model, state(), out, step, cfg.keep, device)
    result.steps = step
    if world > 1:  # the bad entries met by every rank
        parts = [None] * world
        dist.all_gather_object(parts, result.bad)
        result.bad = [b for part in parts for b in part]
    result.bad = list({b.index: b for b in result.bad}.values())
    return result


def _resume(resume: str | Path, out: Path, model: nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig,
            n: int, data_id: dict, device: torch.device) -> tuple[int, int, Tensor, list[BadEntry]]:
    """Load checkpoint `resume` ("latest": the newest whose files all read, the same on every rank) into the model,
    the optimizer and the random states; returns (step, order_epoch, order, bad entries). Later ones are deleted."""
    (rank, world), latest = rank_world(), str(resume) == "latest"
    found = list_checkpoints(out)[::-1] if latest else [Path(resume)]
    if not found:
        raise FileNotFoundError(f"--resume: no checkpoint in {out / 'checkpoints'}")
    for ckpt in found:
        try:
            st = read_plain(ckpt / "trainer.pt")
            if not isinstance(st, dict) or not TRAINER_KEYS <= set(st):
                raise CorruptCheckpoint(f"{ckpt / 'trainer.pt'}: not the trainer state trainer.py writes")
            rng = [read_plain(ckpt / f"rng-rank{r}.pt") for r in range(st["world"])]
            check_model_files(ckpt)
            break
        except CorruptCheckpoint as e:
            if not latest:
                raise
            if rank == 0:
                print(f"warning: {e}; falling back to the checkpoint before it", file=sys.stderr)
    else:
        raise CorruptCheckpoint(f"--resume: none of the {len(found)} checkpoints in {out / 'checkpoints'} can be read")
    if st["n_entries"] != n:
        raise DataError(f"--resume {ckpt}: the checkpoint was trained on {st['n_entries']} entries, the data now "
                        f"has {n}; resume with the same data (and --skip-bad setting)")
    saved = st.get("data") or {}
    if saved.get("sha256") and data_id["sha256"] and saved["sha256"] != data_id["sha256"]:
        raise DataError(f"--resume {ckpt / 'trainer.pt'} was trained on other data of the same length: "
                        f"{saved.get('file')} then (sha256 {saved['sha256'][:16]}), {data_id['file']} now (sha256 "
                        f"{data_id['sha256'][:16]}); resume with the data it was trained on")
    for key in ("batch_size", "seed", "epochs", "max_steps"):
        if st["config"][key] != getattr(cfg, key):
            raise ValueError(f"--resume {ckpt}: it was trained with {key} {st['config'][key]}, now {key} is "
                             f"{getattr(cfg, key)}; the data order and the schedule depend on it")
    later = [p for p in list_checkpoints(out) if int(p.name[len("step-"):]) > st["step"]]
    if later and rank == 0:  # a continuation that is replaced: "latest" and the rotation must not pick them up
        print(f"note: resuming at step {st['step']}, the later {', '.join(p.name for p in later)} are deleted",
              file=sys.stderr)
        for p in later:
            shutil.rmtree(p)
    barrier()
    checkpoint.load_trainable(model, ckpt)
    opt.load_state_dict(st["optimizer"])
    if st["world"] == world:
        set_rng_state(rng[rank], device)
    else:  # the data order and the weights continue exactly; dropout's random states start afresh
        torch.manual_seed(cfg.seed + st["step"] + 7919 * rank)
    if rank == 0:
        print(f"resumed from {ckpt} at step {st['step']}", file=sys.stderr)
    return st["step"], st["order_epoch"], st["order"], [BadEntry(**b) for b in st["bad"]]


def _gradient(net: nn.Module, params: list[nn.Parameter], batches, passes: list, cfg: TrainConfig,
              device: torch.device, bad: list[BadEntry], step: int, out: Path) -> tuple[float, float, int]:
    """This rank's passes of step `step` (an all-bad micro-batch becomes a zero pass), leaving the step's clipped
    gradient in .grad. Returns the loss, the gradient norm before clipping and the entries, over all ranks."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    sums = torch.zeros(3, dtype=torch.float64)  # sum of micro-batch losses, micro-batches, entries
    for j, mb in enumerate(passes):
        batch = None
        if mb is not None:
            got = next(batches)
            for b in got.pop("bad"):
                if not cfg.skip_bad:
                    raise DataError(f"{b}; pass --skip-bad to skip such entries")
                bad.append(b)
            if k := got.pop("n"):
                batch = {key: v.to(device, non_blocking=True) for key, v in got.items()}
                sums[1:] += torch.tensor([1, k], dtype=torch.float64)
        last = j == len(passes) - 1  # DDP all-reduces in the backward of the last pass only
        with net.no_sync() if isinstance(net, DistributedDataParallel) and not last else nullcontext():
            with autocast:
                loss = net(batch)
            loss.backward()
        if batch is not None:
            sums[0] += loss.detach().double().cpu()
    world = rank_world()[1]
    if world > 1:
        sums = sums.to(params[0].device)
        dist.all_reduce(sums)
    loss_sum, n_mb, samples = sums.tolist()
    if n_mb == 0:
        raise DataError(f"step {step}: every entry of the global batch was bad")
    # The step's loss is the mean of its micro-batch losses, so its gradient is the sum of theirs / n_mb. DDP left
    # (sum over all ranks) / world in .grad (a single process: its own sum), hence the factor world / n_mb.
    for p in params:
        if p.grad is not None:
            p.grad.mul_(world / n_mb)
    gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
    loss = loss_sum / n_mb
    if not (math.isfinite(loss) and math.isfinite(gnorm)):
        last = list_checkpoints(out)
        raise NonFiniteLoss(f"step {step}: loss {loss} / gradient norm {gnorm} is not finite; stopped without "
                            f"updating. Last good checkpoint: {last[-1] if last else 'none yet'}")
    return loss, gnorm, int(samples)
