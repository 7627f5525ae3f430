"""train.py: OpenAQA data checks, the training loop's bookkeeping (resume, NaN stop, atomic checkpoints,
data-parallel arithmetic) on a small stand-in model, and the demo's synthetic data."""
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import train


# ----------------------------------------------------------------------------------------------------------------
# A small stand-in for SSLALM with the interface train.train uses
# ----------------------------------------------------------------------------------------------------------------

VOCAB = 40


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
    def __init__(self, n: int, seed: int = 1, bad_index: int | None = None):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            L = 3 + i % 5
            ids = torch.randint(1, VOCAB, (L,), generator=g).tolist()
            fb = torch.randn(4 + i % 3, 128, generator=g)
            if i == bad_index:
                fb[0, 0] = float("inf")
            self.items.append({"fbank": fb, "input_ids": ids, "labels": ids, "index": i})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def small_cfg(**kw):
    base = dict(lr=1e-2, epochs=2, trainable=(), batch_size=4, micro_batch=2, warmup_steps=2, save_every=2,
                keep=5, num_workers=0, seed=3, name="test")
    base.update(kw)
    return train.TrainConfig(**base)


def params_of(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------
# OpenAQA data
# ----------------------------------------------------------------------------------------------------------------

def entry(audio_id="a.wav", **kw):
    e = dict(instruction="What can you hear?", input="", audio_id=audio_id, dataset="d", task="open-ended question",
             output="A tone.")
    e.update(kw)
    return e


@pytest.mark.parametrize("bad, message", [
    ({"drop": "output"}, "missing key(s) ['output']"),
    ({"task": 3}, "'task' must be a string"),
    ({"instruction": "  "}, "'instruction' is empty"),
    ({"input": None}, "'input' must be a string"),
])
def test_openaqa_validation_names_entry_and_file(tmp_path, bad, message):
    e = entry("x/clip7.wav")
    if "drop" in bad:
        del e[bad["drop"]]
    else:
        e.update(bad)
    f = tmp_path / "data.json"
    f.write_text(json.dumps([entry(), entry(), e, entry()]))
    with pytest.raises(train.DataError) as err:
        train.load_openaqa(f)
    msg = str(err.value)
    assert str(f) in msg and "entry 2" in msg and message in msg
    if "audio_id" in e:
        assert "x/clip7.wav" in msg


def test_openaqa_validation_whole_file(tmp_path):
    f = tmp_path / "d.json"
    f.write_text('{"instruction": "x"}')
    with pytest.raises(train.DataError, match="expected a JSON list"):
        train.load_openaqa(f)
    f.write_text("[{]")
    with pytest.raises(train.DataError, match="not valid JSON"):
        train.load_openaqa(f)
    f.write_text(json.dumps([entry(), "oops"]))
    with pytest.raises(train.DataError, match="entry 1 is a str"):
        train.load_openaqa(f)


def test_resolve_audio_prefix_and_root(tmp_path):
    prefixes = train.parse_prefixes(["/data/sls/audioset=/mnt/as"])
    assert train.resolve_audio("/data/sls/audioset/x/1.flac", None, prefixes) == Path("/mnt/as/x/1.flac")
    assert train.resolve_audio("/other/1.flac", tmp_path, prefixes) == Path("/other/1.flac")
    assert train.resolve_audio("x/1.flac", tmp_path, prefixes) == tmp_path / "x" / "1.flac"
    with pytest.raises(train.DataError, match="OLD=NEW"):
        train.parse_prefixes(["/data/sls"])


def byte_encode(instruction, output, input=""):
    ids = [min(VOCAB - 1, 1 + b % (VOCAB - 1)) for b in (instruction + input + output).encode()][:20]
    return ids, ids


def write_clips(tmp_path, n):
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        f = tmp_path / f"clip{i}.wav"
        sf.write(str(f), (0.1 * rng.standard_normal(3200)).astype(np.float32), 16000)
        files.append(f.name)
    return files


def test_missing_audio_is_an_error_or_skipped(tmp_path):
    files = write_clips(tmp_path, 3)
    entries = [entry(files[0]), entry("missing.wav"), entry(files[2])]
    ds = train.OpenAQADataset(entries, byte_encode, audio_root=tmp_path, audio_frames=64)
    with pytest.raises(train.DataError) as err:
        ds.check_files(skip_bad=False)
    assert "entry 1" in str(err.value) and str(tmp_path / "missing.wav") in str(err.value)
    bad = ds.check_files(skip_bad=True)
    assert [b.index for b in bad] == [1] and len(ds) == 2 and ds[1]["index"] == 2
    assert ds[0]["fbank"].shape == (64, 128)


def test_unreadable_audio_fails_naming_entry_or_is_skipped_and_reported(tmp_path, capsys):
    files = write_clips(tmp_path, 7)
    (tmp_path / "clip3.wav").write_bytes(b"RIFF....not audio at all")
    entries = [entry(f) for f in files]
    ds = train.OpenAQADataset(entries, byte_encode, audio_root=tmp_path, audio_frames=None)
    ds.check_files(skip_bad=False)  # the file exists; only decoding finds the problem
    cfg = small_cfg(epochs=1, batch_size=8, micro_batch=4, num_workers=2, save_every=0, trainable=())
    with pytest.raises(train.DataError) as err:
        train.train(StandIn(), ds, pad_collate, 0, cfg, tmp_path / "run1")
    assert "entry 3" in str(err.value) and "clip3.wav" in str(err.value)
    assert not train.list_checkpoints(tmp_path / "run1")
    cfg.skip_bad = True
    res = train.train(StandIn(), ds, pad_collate, 0, cfg, tmp_path / "run2")
    assert [b.index for b in res.bad] == [3] and "clip3.wav" in res.bad[0].file
    log = [json.loads(x) for x in (tmp_path / "run2" / "log.jsonl").read_text().splitlines()]
    assert [r["samples"] for r in log] == [6]  # 7 entries, one skipped
    train.report_bad(res.bad)
    assert "skipped 1 bad entry" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Schedule and sharding arithmetic
# ----------------------------------------------------------------------------------------------------------------

def test_lr_schedule():
    lrs = [train.lr_at(s, 1.0, 4, 10) for s in range(1, 11)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and lrs[-1] == pytest.approx(1 / 6) and all(a > b for a, b in zip(lrs[4:], lrs[5:]))


def test_micro_batches_deal_the_global_batch():
    order = train.epoch_order(23, seed=5, epoch=1)
    assert sorted(order.tolist()) == list(range(23)) and not torch.equal(order, train.epoch_order(23, 5, 0))
    for step in range(train.steps_per_epoch(23, 8)):
        one = train.micro_batches(order, step, 8, 3, world=1, rank=0)
        two = [train.micro_batches(order, step, 8, 3, world=2, rank=r) for r in range(2)]
        assert one[0::2] == two[0] and one[1::2] == two[1]
        assert sum(one, []) == order[step * 8:(step + 1) * 8].tolist()


# ----------------------------------------------------------------------------------------------------------------
# Resume, NaN stop, atomic checkpoints
# ----------------------------------------------------------------------------------------------------------------

class Crash(Exception):
    pass


def test_resume_continues_exactly(tmp_path):
    data = MemoryData(11)                       # 3 steps per epoch (4 + 4 + 3), 2 epochs
    full_model = StandIn()
    full = train.train(full_model, data, pad_collate, 0, small_cfg(), tmp_path / "full")
    assert len(full.losses) == 6 and full.steps == 6

    def crash(step, loss):
        if step == 5:
            raise Crash()
    with pytest.raises(Crash):
        train.train(StandIn(), data, pad_collate, 0, small_cfg(), tmp_path / "cut", on_step=crash)
    assert [p.name for p in train.list_checkpoints(tmp_path / "cut")] == ["step-0000002", "step-0000004"]
    resumed_model = StandIn(seed=99)            # different init: everything must come from the checkpoint
    res = train.train(resumed_model, data, pad_collate, 0, small_cfg(), tmp_path / "cut", resume="latest")
    assert res.losses == full.losses[4:]        # exactly, dropout included
    a, b = params_of(full_model), params_of(resumed_model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    st = torch.load(tmp_path / "cut" / "checkpoints" / "step-0000004" / "trainer.pt", weights_only=False)
    assert (st["epoch"], st["step_in_epoch"]) == (1, 1) and torch.equal(st["order"], train.epoch_order(11, 3, 1))
    logged = [json.loads(x)["loss"] for x in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert logged == full.losses[:5] + full.losses[4:]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = small_cfg(epochs=1, save_every=1)
    bad = train.epoch_order(12, cfg.seed, 0)[9].item()  # in the global batch of step 3 (entries 8..11)
    with pytest.raises(train.NonFiniteLoss) as err:
        train.train(StandIn(), MemoryData(12, bad_index=bad), pad_collate, 0, cfg, tmp_path)
    assert "step 3" in str(err.value) and "step-0000002" in str(err.value)
    ckpts = train.list_checkpoints(tmp_path)
    assert [p.name for p in ckpts] == ["step-0000001", "step-0000002"]
    sd = train.torch.load(ckpts[-1] / "trainer.pt", weights_only=False)
    assert sd["step"] == 2
    from safetensors.torch import load_file
    assert all(torch.isfinite(v).all() for v in load_file(str(ckpts[-1] / "model.safetensors")).values())


def test_checkpoint_write_is_atomic(tmp_path):
    class FailingSave(StandIn):
        fail = False

        def save_checkpoint(self, d):
            super().save_checkpoint(d)
            if self.fail:
                (Path(d) / "model.safetensors").write_bytes(b"half")
                raise OSError("disk full")

    m = FailingSave()
    opt_state = {"step": 1}
    train.save_checkpoint(m, opt_state, tmp_path, 1, train.Dist(), keep=5)
    m.fail = True
    with pytest.raises(OSError, match="disk full"):
        train.save_checkpoint(m, {"step": 2}, tmp_path, 2, train.Dist(), keep=5)
    assert [p.name for p in train.list_checkpoints(tmp_path)] == ["step-0000001"]
    assert not (tmp_path / "checkpoints" / "step-0000002").exists()
    m.fail = False
    for s in (2, 3, 4):
        train.save_checkpoint(m, {"step": s}, tmp_path, s, train.Dist(), keep=2)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] and \
        sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000003", "step-0000004"]


# ----------------------------------------------------------------------------------------------------------------
# Data parallel: 2 processes (gloo) = 1 process with the same global batch
# ----------------------------------------------------------------------------------------------------------------

def _dp_worker(rank, world, tmp):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        model = StandIn(dropout=0.0, seed=rank)  # different inits: rank 0's weights are broadcast
        res = train.train(model, MemoryData(13), pad_collate, 0, small_cfg(micro_batch=1, save_every=3),
                          f"{tmp}/run", d=train.Dist(rank, world))
        if rank == 0:
            torch.save({"losses": res.losses, "params": params_of(model)}, f"{tmp}/result.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_process_data_parallel_equals_one_process(tmp_path):
    one = StandIn(dropout=0.0, seed=0)
    ref = train.train(one, MemoryData(13), pad_collate, 0, small_cfg(micro_batch=1, save_every=3), tmp_path / "one")
    torch.multiprocessing.start_processes(_dp_worker, args=(2, str(tmp_path)), nprocs=2, start_method="fork")
    two = torch.load(tmp_path / "result.pt", weights_only=False)
    assert len(two["losses"]) == len(ref.losses) == 8
    np.testing.assert_allclose(two["losses"], ref.losses, rtol=1e-5, atol=1e-6)
    p1 = params_of(one)
    for k, v in two["params"].items():
        torch.testing.assert_close(v, p1[k], rtol=1e-4, atol=1e-5)
    ckpt = train.list_checkpoints(tmp_path / "run")[-1]
    assert (ckpt / "rng-rank0.pt").is_file() and (ckpt / "rng-rank1.pt").is_file()


def test_data_parallel_without_torchrun_says_what_is_missing(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="RANK or MASTER_ADDR is not set: launch data-parallel runs with torchrun"):
        train.init_distributed()


# ----------------------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------------------

def test_cli_missing_weights_is_a_clean_error(tmp_path):
    import subprocess
    import sys
    data = tmp_path / "d.json"
    data.write_text(json.dumps([entry("a.wav")]))
    r = subprocess.run([sys.executable, "train.py", "--size", "small", "--llm", "mamba", "--stage", "1",
                        "--data", str(data), "--dass-weights", str(tmp_path / "DASS_small.pth"),
                        "--llm-weights", str(tmp_path / "mamba-2.8b-hf"), "--output-dir", str(tmp_path / "run")],
                       cwd=Path(train.__file__).parent, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and "error:" in r.stderr
    assert "state-spaces/mamba-2.8b" in r.stderr and "download" in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([entry("a.wav"), {"instruction": "x"}]))
    r = subprocess.run([sys.executable, "train.py", "--data", str(bad), "--output-dir", str(tmp_path / "run")],
                       cwd=Path(train.__file__).parent, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "entry 1" in r.stderr
