"""trainer.py: the training loop's bookkeeping (schedule, resume, NaN stop, atomic checkpoints, per-rank random
states, data-parallel arithmetic with DistributedDataParallel) on a small stand-in model."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import data
import train
import trainer

# ----------------------------------------------------------------------------------------------------------------
# A small stand-in for SSLALM with the interface trainer.train uses
# ----------------------------------------------------------------------------------------------------------------

VOCAB = 40


@pytest.fixture(autouse=True)
def stand_in_saves_itself(monkeypatch):
    """The stand-in has no ssLALM config or base LLM: checkpoints hold its weights and an empty config."""
    monkeypatch.setattr(trainer.checkpoint, "save_checkpoint", lambda model, d: model.save_checkpoint(d))


class StandIn(nn.Module):
    """Audio summary + token embedding -> next-token logits; dropout so that random states matter."""

    def __init__(self, dropout: float = 0.2, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(128, 16)
        self.emb = nn.Embedding(VOCAB, 16)
        self.head = nn.Linear(16, VOCAB)
        self.drop = nn.Dropout(dropout)

    def forward(self, fbank, input_ids, labels, attention_mask):
        a = self.proj(fbank).mean(1, keepdim=True)                      # (B, 1, 16)
        h = self.drop(torch.tanh(self.emb(input_ids) + a))              # (B, L, 16)
        logits = self.head(h)[:, :-1]
        return F.cross_entropy(logits.reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)

    def trainable_state_dict(self):
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    def load_trainable_state_dict(self, sd):
        self.load_state_dict(sd)

    def save_checkpoint(self, d):
        save_file(self.trainable_state_dict(), str(Path(d) / "model.safetensors"))
        (Path(d) / "config.json").write_text("{}")


def pad_collate(examples, pad_id):
    T = max(x["fbank"].shape[0] for x in examples)
    L = max(len(x["input_ids"]) for x in examples)
    fb = torch.stack([F.pad(x["fbank"], (0, 0, 0, T - x["fbank"].shape[0])) for x in examples])
    ids = torch.tensor([x["input_ids"] + [pad_id] * (L - len(x["input_ids"])) for x in examples])
    lab = torch.tensor([x["labels"] + [-100] * (L - len(x["labels"])) for x in examples])
    mask = torch.tensor([[1] * len(x["input_ids"]) + [0] * (L - len(x["input_ids"])) for x in examples])
    return {"fbank": fb, "input_ids": ids, "labels": lab, "attention_mask": mask}


class MemoryData(torch.utils.data.Dataset):
    """n examples of different lengths; `nan_index` gets an infinite fbank value, `bad` entries are BadEntry."""

    def __init__(self, n: int, seed: int = 1, nan_index: int | None = None, bad: tuple[int, ...] = ()):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            L = 3 + i % 5
            ids = torch.randint(1, VOCAB, (L,), generator=g).tolist()
            fb = torch.randn(4 + i % 3, 128, generator=g)
            if i == nan_index:
                fb[0, 0] = float("inf")
            item = {"fbank": fb, "input_ids": ids, "labels": ids, "index": i}
            self.items.append(data.BadEntry(i, f"clip{i}.wav", "unreadable") if i in bad else item)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def small_cfg(**kw):
    base = dict(lr=1e-2, epochs=2, trainable=(), batch_size=4, micro_batch=2, warmup_steps=2, save_every=2,
                keep=5, num_workers=0, seed=3, name="test")
    base.update(kw)
    return trainer.TrainConfig(**base)


def params_of(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------
# Bad data
# ----------------------------------------------------------------------------------------------------------------

def entry(audio_id):
    return dict(instruction="What can you hear?", input="", audio_id=audio_id, dataset="d", task="open",
                output="A tone.")


def byte_encode(instruction, output, input=""):
    ids = [min(VOCAB - 1, 1 + b % (VOCAB - 1)) for b in (instruction + input + output).encode()][:20]
    return ids, ids


def write_clips(folder, n):
    """n clips of noise, clip{i}.wav at 16 kHz; returns their names."""
    rng = np.random.default_rng(0)
    for i in range(n):
        sf.write(str(folder / f"clip{i}.wav"), (0.1 * rng.standard_normal(3200)).astype(np.float32), 16000)
    return [f"clip{i}.wav" for i in range(n)]


def test_unreadable_audio_fails_naming_entry_or_is_skipped_and_reported(tmp_path, capsys):
    files = write_clips(tmp_path, 7)
    (tmp_path / "clip3.wav").write_bytes(b"RIFF....not audio at all")
    entries = [entry(f) for f in files]
    ds = data.OpenAQADataset(entries, byte_encode, roots=[tmp_path], audio_frames=None)
    ds.check_files(skip_bad=False)  # the file exists; only decoding finds the problem
    cfg = small_cfg(epochs=1, batch_size=8, micro_batch=4, num_workers=2, save_every=0, trainable=())
    with pytest.raises(data.DataError) as err:
        trainer.train(StandIn(), ds, pad_collate, 0, cfg, tmp_path / "run1")
    assert "entry 3" in str(err.value) and "clip3.wav" in str(err.value)
    assert not trainer.list_checkpoints(tmp_path / "run1")
    cfg.skip_bad = True
    res = trainer.train(StandIn(), ds, pad_collate, 0, cfg, tmp_path / "run2")
    assert [b.index for b in res.bad] == [3] and "clip3.wav" in res.bad[0].file
    log = [json.loads(x) for x in (tmp_path / "run2" / "log.jsonl").read_text().splitlines()]
    assert [r["samples"] for r in log] == [6]  # 7 entries, one skipped
    train.report_bad(res.bad)
    assert "skipped 1 bad entry" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Schedule and sharding arithmetic
# ----------------------------------------------------------------------------------------------------------------

def test_lr_schedule():
    lrs = [trainer.lr_at(s, 1.0, 4, 10) for s in range(1, 11)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and lrs[-1] == pytest.approx(1 / 6) and all(a > b for a, b in zip(lrs[4:], lrs[5:]))


def test_micro_batches_deal_the_global_batch():
    order = trainer.epoch_order(23, seed=5, epoch=1)
    assert sorted(order.tolist()) == list(range(23)) and not torch.equal(order, trainer.epoch_order(23, 5, 0))
    for step in range(3):  # 23 entries: 8 + 8 + 7
        one = trainer.micro_batches(order, step, 8, 3, world=1, rank=0)
        two = [trainer.micro_batches(order, step, 8, 3, world=2, rank=r) for r in range(2)]
        assert len(two[0]) == len(two[1]) and one[0::2] == two[0]  # rank 1 pads with zero passes
        assert [mb for mb in two[1] if mb is not None] == one[1::2]
        assert sum(one, []) == order[step * 8:(step + 1) * 8].tolist()


# ----------------------------------------------------------------------------------------------------------------
# Resume, NaN stop, atomic checkpoints
# ----------------------------------------------------------------------------------------------------------------

class Crash(Exception):
    pass


def test_resume_continues_exactly(tmp_path):
    data = MemoryData(11)                       # 3 steps per epoch (4 + 4 + 3), 2 epochs
    full_model = StandIn()
    full = trainer.train(full_model, data, pad_collate, 0, small_cfg(), tmp_path / "full")
    assert len(full.losses) == 6 and full.steps == 6

    def crash(step, loss):
        if step == 5:
            raise Crash()
    with pytest.raises(Crash):
        trainer.train(StandIn(), data, pad_collate, 0, small_cfg(), tmp_path / "cut", on_step=crash)
    assert [p.name for p in trainer.list_checkpoints(tmp_path / "cut")] == ["step-0000002", "step-0000004"]
    resumed_model = StandIn(seed=99)            # different init: everything must come from the checkpoint
    res = trainer.train(resumed_model, data, pad_collate, 0, small_cfg(), tmp_path / "cut", resume="latest")
    assert res.losses == full.losses[4:]        # exactly, dropout included
    a, b = params_of(full_model), params_of(resumed_model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    st = torch.load(tmp_path / "cut" / "checkpoints" / "step-0000004" / "trainer.pt", weights_only=True)
    assert (st["step"], st["order_epoch"]) == (4, 1) and torch.equal(st["order"], trainer.epoch_order(11, 3, 1))
    logged = [json.loads(x)["loss"] for x in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert logged == full.losses                # one line per step: the log was cut back to the checkpoint's step


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = small_cfg(epochs=1, save_every=1)
    bad = trainer.epoch_order(12, cfg.seed, 0)[9].item()  # in the global batch of step 3 (entries 8..11)
    with pytest.raises(trainer.NonFiniteLoss) as err:
        trainer.train(StandIn(), MemoryData(12, nan_index=bad), pad_collate, 0, cfg, tmp_path)
    assert "step 3" in str(err.value) and "step-0000002" in str(err.value)
    ckpts = trainer.list_checkpoints(tmp_path)
    assert [p.name for p in ckpts] == ["step-0000001", "step-0000002"]
    sd = torch.load(ckpts[-1] / "trainer.pt", weights_only=True)
    assert sd["step"] == 2
    assert all(torch.isfinite(v).all() for v in load_file(str(ckpts[-1] / "model.safetensors")).values())


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    class FailingSave(StandIn):
        fail = False

        def save_checkpoint(self, d):
            super().save_checkpoint(d)
            if self.fail:
                (Path(d) / "model.safetensors").write_bytes(b"half")
                raise OSError("disk full")

    m = FailingSave()
    synced, fsync, root = [], os.fsync, (tmp_path / "checkpoints").resolve()
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or fsync(fd))
    trainer.save_checkpoint(m, {"step": 1}, tmp_path, 1, keep=5)
    tmp = root / ".tmp-step-0000001"  # every file and the folder reach the disk before the rename, then the rename
    assert sorted(synced[:-2]) == sorted(str(tmp / n) for n in os.listdir(root / "step-0000001"))
    assert len(synced) == 6 and synced[-2:] == [str(tmp), str(root)]
    m.fail = True
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint(m, {"step": 2}, tmp_path, 2, keep=5)
    assert [p.name for p in trainer.list_checkpoints(tmp_path)] == ["step-0000001"]
    assert not (tmp_path / "checkpoints" / "step-0000002").exists()
    m.fail = False
    for s in (2, 3, 4):
        trainer.save_checkpoint(m, {"step": s}, tmp_path, s, keep=2)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] and \
        sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000003", "step-0000004"]


# ----------------------------------------------------------------------------------------------------------------
# Random states: each rank's own CUDA device only
# ----------------------------------------------------------------------------------------------------------------

def test_rng_state_keeps_this_ranks_gpu_only_and_restores_where_one_gpu_is_visible(tmp_path, monkeypatch):
    """A rank on cuda:2 of 4 visible GPUs saves its own device's state; resumed where each rank sees one GPU
    (CUDA_VISIBLE_DEVICES per rank), it restores that state on cuda:0. Saving every visible GPU's state (by index)
    and restoring them all would raise IndexError there."""
    visible = 4
    gpu_states = {i: torch.full((16,), i, dtype=torch.uint8) for i in range(visible)}

    def index(device):
        return device if isinstance(device, int) else torch.device(device).index

    def get_state(device="cuda"):
        return gpu_states[index(device)].clone()

    def set_state(state, device="cuda"):
        if index(device) >= visible:
            raise IndexError(f"no GPU {index(device)}: {visible} visible")
        gpu_states[index(device)] = state.clone()

    monkeypatch.setattr(torch.cuda, "get_rng_state", get_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [get_state(i) for i in range(visible)])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: [set_state(s, i) for i, s in enumerate(states)])
    torch.manual_seed(5)
    torch.save(trainer.rng_state(torch.device("cuda", 2)), tmp_path / "rng-rank2.pt")
    expect = torch.rand(3)
    saved = torch.load(tmp_path / "rng-rank2.pt", weights_only=True)  # plain tensors and lists only
    assert torch.equal(saved["cuda"], torch.full((16,), 2, dtype=torch.uint8))

    visible = 1
    gpu_states = {0: torch.zeros(16, dtype=torch.uint8)}
    with pytest.raises(IndexError):  # what restoring every saved GPU by index does
        torch.cuda.set_rng_state_all([saved["cuda"]] * 4)
    trainer.set_rng_state(saved, torch.device("cuda", 0))
    assert torch.equal(gpu_states[0], torch.full((16,), 2, dtype=torch.uint8))
    assert torch.equal(torch.rand(3), expect)
    assert "cuda" not in trainer.rng_state(torch.device("cpu"))


# ----------------------------------------------------------------------------------------------------------------
# Data parallel: 2 processes (gloo, DistributedDataParallel) = 1 process with the same global batch
# ----------------------------------------------------------------------------------------------------------------

def dp_cfg():
    return small_cfg(micro_batch=1, save_every=3, skip_bad=True)


def _dp_worker(rank, world, tmp, bad):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        model = StandIn(dropout=0.0, seed=rank)  # different inits: rank 0's weights are broadcast
        res = trainer.train(model, MemoryData(13, bad=bad), pad_collate, 0, dp_cfg(), f"{tmp}/run")
        if rank == 0:
            torch.save({"losses": res.losses, "params": params_of(model), "bad": sorted(b.index for b in res.bad)},
                       f"{tmp}/result.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("bad", [(), (2, 7)])
def test_two_process_data_parallel_equals_one_process(tmp_path, bad):
    """13 entries, global batch 4, micro-batch 1: in each epoch's last step (one entry) rank 1 makes a zero pass;
    a bad entry (skipped) turns its micro-batch into a zero pass inside a step."""
    one = StandIn(dropout=0.0, seed=0)
    ref = trainer.train(one, MemoryData(13, bad=bad), pad_collate, 0, dp_cfg(), tmp_path / "one")
    torch.multiprocessing.start_processes(_dp_worker, args=(2, str(tmp_path), bad), nprocs=2, start_method="fork")
    two = torch.load(tmp_path / "result.pt", weights_only=True)
    assert len(two["losses"]) == len(ref.losses) == 8 and two["bad"] == sorted(b.index for b in ref.bad) == list(bad)
    np.testing.assert_allclose(two["losses"], ref.losses, rtol=1e-5, atol=1e-6)
    p1 = params_of(one)
    assert not torch.equal(p1["head.weight"], StandIn(seed=0).head.weight)
    for k, v in two["params"].items():
        torch.testing.assert_close(v, p1[k], rtol=1e-4, atol=1e-5)
    ckpt = trainer.list_checkpoints(tmp_path / "run")[-1]
    assert (ckpt / "rng-rank0.pt").is_file() and (ckpt / "rng-rank1.pt").is_file()


def test_data_parallel_without_torchrun_says_what_is_missing(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="environment variable RANK expected, but not set"):
        trainer.init_distributed()


