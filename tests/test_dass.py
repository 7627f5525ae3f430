import math
import re

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

import audio
import cli
import dass
from dass import DASS, SS2D, DASSConfig
from safetensors.torch import save_file
from scan import selective_scan_ref
from weights import load_dass, save_dass

TINY = DASSConfig(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return DASS(TINY).eval()


def test_parameter_counts():
    for config, expected in ((DASSConfig.small(), 29_884_463), (DASSConfig.medium(), 48_648_239)):
        with torch.device("meta"):
            model = DASS(config)
        assert sum(p.numel() for p in model.parameters()) == expected
        head = sum(p.numel() for p in model.classifier["head"].parameters())
        assert head == 405_263


def test_official_key_layout():
    with torch.device("meta"):
        state = DASS(DASSConfig.small()).state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    blk = "layers.2.blocks.0."
    assert shapes[blk + "op.x_proj_weight"] == (4, 26, 384)
    assert shapes[blk + "op.dt_projs_weight"] == (4, 384, 24)
    assert shapes[blk + "op.dt_projs_bias"] == (4, 384)
    assert shapes[blk + "op.A_logs"] == (1536, 1)
    assert shapes[blk + "op.Ds"] == (1536,)
    assert shapes[blk + "op.conv2d.weight"] == (384, 1, 3, 3)
    assert shapes[blk + "op.in_proj.weight"] == shapes[blk + "op.out_proj.weight"] == (384, 384)
    assert shapes[blk + "mlp.fc1.weight"] == (1536, 384)
    assert shapes["patch_embed.0.weight"] == (48, 1, 3, 3) and shapes["patch_embed.5.weight"] == (96, 48, 3, 3)
    assert {k for k in shapes if "downsample" in k} == {f"layers.{s}.downsample.{i}.{p}" for s in range(3)
                                                        for i in (1, 3) for p in ("weight", "bias")}
    assert shapes["classifier.norm.weight"] == (768,) and shapes["classifier.head.weight"] == (527, 768)
    assert max(int(re.match(r"layers\.2\.blocks\.(\d+)", k)[1]) for k in shapes if k.startswith("layers.2.b")) == 7


@pytest.mark.parametrize("T", [1, 31, 32, 33, 100])
def test_shapes_any_duration(tiny, T):
    x = torch.randn(2, T, 128)
    with torch.no_grad():
        f = tiny.features(x)
        logits = tiny(x)
    assert f.shape == (2, 64, 4, math.ceil(T / 32))
    assert logits.shape == (2, 527)
    assert torch.isfinite(f).all() and torch.isfinite(logits).all()
    # the batch does not mix clips
    torch.testing.assert_close(tiny.features(x[1:]).detach(), f[1:], atol=1e-5, rtol=1e-5)


def test_forward_is_head_of_pooled_features(tiny):
    x = torch.randn(1, 70, 128)
    with torch.no_grad():
        f = tiny.features(x)
        expected = F.linear(f.mean(dim=(2, 3)), tiny.classifier["head"].weight, tiny.classifier["head"].bias)
        torch.testing.assert_close(tiny(x), expected)
    # features end with classifier.norm: unit variance over channels at every position
    torch.testing.assert_close(f.var(dim=1, unbiased=False), torch.ones(1, 4, 3), atol=1e-3, rtol=0)


def test_bad_input_shape(tiny):
    with pytest.raises(ValueError, match=r"\(batch, frames > 0, 128\) fbank; got \(1, 100, 64\)"):
        tiny.features(torch.randn(1, 100, 64))
    with pytest.raises(ValueError, match=r"frames > 0.*got \(1, 0, 128\)"):
        tiny.features(torch.randn(1, 0, 128))
    with pytest.raises(ValueError, match="equal length"):
        DASSConfig(dims=(8, 16), depths=(1, 1, 1))


# ---------------------------------------------------------------------------------------------------------------
# SS2D against a slow version written per direction with the sequential reference scan
# ---------------------------------------------------------------------------------------------------------------

def _orders(H, W):
    row = [(h, w) for h in range(H) for w in range(W)]     # k0: time (w) fastest
    col = [(h, w) for w in range(W) for h in range(H)]     # k1: frequency (h) fastest
    return [row, col, row[::-1], col[::-1]]


def ss2d_per_direction(op: SS2D, x, orders):
    """SS2D, one direction at a time: gather the sequence by explicit (h, w) positions, scan it with the plain loop,
    add each output back at its position."""
    B, H, W, d = x.shape
    R, N = op.dt_rank, op.d_state
    u = F.silu(op.conv2d(op.in_proj(x).permute(0, 3, 1, 2)))  # (B, d, H, W)
    y = torch.zeros_like(u)
    for k, order in enumerate(orders):
        seq = torch.stack([u[:, :, h, w] for h, w in order], dim=-1)  # (B, d, L)
        dbl = torch.einsum("bdl,cd->bcl", seq, op.x_proj_weight[k])
        dt, Bk, Ck = dbl[:, :R], dbl[:, R:R + N], dbl[:, R + N:]
        delta = torch.einsum("brl,dr->bdl", dt, op.dt_projs_weight[k])
        out = selective_scan_ref(seq, delta, -torch.exp(op.A_logs[k * d:(k + 1) * d]), Bk, Ck,
                                 D=op.Ds[k * d:(k + 1) * d], delta_bias=op.dt_projs_bias[k], delta_softplus=True)
        for l, (h, w) in enumerate(order):
            y[:, :, h, w] += out[:, :, l]
    return op.out_proj(op.out_norm(y.permute(0, 2, 3, 1)))


@pytest.mark.parametrize("d_state", [1, 2])
def test_ss2d_matches_per_direction_reference(d_state):
    torch.manual_seed(1)
    op = SS2D(8, d_state).double()
    with torch.no_grad():  # make the four directions' parameters clearly different
        for p in (op.x_proj_weight, op.dt_projs_weight, op.dt_projs_bias, op.A_logs, op.Ds):
            p.copy_(torch.randn_like(p))
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)  # H != W, so a transposed order cannot go unnoticed
    ours = op(x)
    ref = ss2d_per_direction(op, x, _orders(3, 5))
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-10)
    # the comparison is sensitive to the scan orders: swapping k1 and k3, or using row-major for k1, is far off
    row, col, rrow, rcol = _orders(3, 5)
    for wrong in ([row, rcol, rrow, col], [row, row, rrow, rcol]):
        assert (ss2d_per_direction(op, x, wrong) - ours).abs().max() > 1e-2


def test_ss2d_initialisation():
    torch.manual_seed(0)
    op = SS2D(96)
    dt = F.softplus(op.dt_projs_bias)
    assert dt.min() >= 1e-4 * 0.999 and dt.max() <= 0.1 * 1.001 and dt.std() > 0.01  # Δ log-uniform in [1e-3, 0.1]
    assert torch.all(op.A_logs == 0) and torch.all(op.Ds == 1)                      # A = -1 (N = 1), D = 1
    assert op.x_proj_weight.abs().max() <= 96 ** -0.5 and op.dt_projs_weight.abs().max() <= 6 ** -0.5
    model = DASS(TINY)
    fc1 = model.layers[0].blocks[0].mlp.fc1
    assert fc1.weight.std() < 0.03 and torch.all(fc1.bias == 0)                       # trunc-normal(0.02)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = DASS(TINY).train()
    x = torch.randn(2, 40, 128)
    logits = model(x)
    F.binary_cross_entropy_with_logits(logits, torch.rand_like(logits)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


# ---------------------------------------------------------------------------------------------------------------
# Long audio: windows
# ---------------------------------------------------------------------------------------------------------------

def test_windowed_features_are_concatenated_independent_windows(tiny):
    x = torch.randn(1, 200, 128)
    with torch.no_grad():
        windowed = tiny.features(x, window=64)
        pieces = torch.cat([tiny.features(x[:, s:s + 64], window=None) for s in (0, 64, 128, 192)], dim=-1)
        one_pass = tiny.features(x, window=None)
        assert windowed.shape == one_pass.shape == (1, 64, 4, 7)
        torch.testing.assert_close(windowed, pieces, atol=0, rtol=0)
        assert (windowed - one_pass).abs().max() > 1e-3            # it is not a one-pass result ...
        torch.testing.assert_close(tiny.features(x, window=256), one_pass, atol=0, rtol=0)  # ... unless T <= window
        torch.testing.assert_close(tiny(x, window=64), tiny.classifier["head"](windowed.mean(dim=(2, 3))))
    with pytest.raises(ValueError, match="multiple of 32"):
        tiny.features(x, window=48)


def _recorded_passes(monkeypatch):
    """Replace the one-pass encoder by a stub that records each pass's length and returns window numbers, so that
    hours of input cost nothing; the real computation per window is covered by the test above."""
    seen = []

    def one_pass(self, x):
        seen.append(x.shape[1])
        return torch.full((x.shape[0], self.config.dims[-1], 4, math.ceil(x.shape[1] / 32)), float(len(seen)))

    monkeypatch.setattr(DASS, "_features", one_pass)
    return seen


def test_ten_minute_clip_goes_through_in_windows(tiny, monkeypatch, tmp_path):
    path = tmp_path / "ten_minutes.wav"
    sf.write(path, (0.1 * np.random.default_rng(0).standard_normal(16000 * 600)).astype(np.float32), 16000,
             subtype="PCM_16")
    x = audio.dass_input_from_file(path, target_length=None)
    assert x.shape == (59998, 128)
    seen = _recorded_passes(monkeypatch)
    f = tiny.features(x[None])
    assert f.shape == (1, 64, 4, math.ceil(59998 / 32))
    assert seen == [dass.WINDOW] * 7 + [59998 - 7 * dass.WINDOW]


def test_sixty_minutes_passes_are_bounded(tiny, monkeypatch):
    # 60 min = 360k frames. One pass would make stage-0 scans of H*W = 32 x 90000 per direction (tens of GB for
    # DASS-small); windows keep every pass at <= WINDOW frames whatever the duration.
    seen = _recorded_passes(monkeypatch)
    f = tiny.features(torch.zeros(1, 360_000 - 2, 128))
    assert f.shape == (1, 64, 4, 11250)
    assert seen == [dass.WINDOW] * 43 + [359998 - 43 * dass.WINDOW]
    assert torch.equal(f[0, 0, 0, ::dass.WINDOW // 32], torch.arange(1.0, 45.0))  # windows in order, none dropped


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------

def _same_model(a: DASS, b: DASS):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    x = torch.randn(1, 50, 128)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)


def test_safetensors_round_trip(tmp_path):
    torch.manual_seed(0)
    config = DASSConfig(dims=(8, 16, 32), depths=(1, 2, 1), d_state=2, n_classes=10)
    model = DASS(config)
    save_dass(model, tmp_path / "m.safetensors")
    loaded = load_dass(tmp_path / "m.safetensors")
    assert loaded.config == config
    _same_model(model, loaded)


def test_official_pth_with_module_v_prefix(tmp_path):
    torch.manual_seed(0)
    model = DASS(TINY)
    torch.save({"module.v." + k: v for k, v in model.state_dict().items()}, tmp_path / "DASS_tiny.pth")
    loaded = load_dass(tmp_path / "DASS_tiny.pth")  # config inferred from the shapes
    assert loaded.config == TINY
    _same_model(model, loaded)


def _hf_port_keys(state):
    """Our (= official minus `module.v.`) names -> the HF port's, following its conversion script's renames."""
    out = {}
    for k, v in state.items():
        if k.startswith("classifier.head."):
            out[k.replace("classifier.", "")] = v
            continue
        k = "dass." + k
        k = re.sub(r"patch_embed\.(\d)", lambda m: "patch_embeddings.projection." + {"0": "0", "2": "1", "5": "3",
                                                                                    "7": "4"}[m[1]], k)
        k = k.replace("downsample.1", "downsample.down").replace("downsample.3", "downsample.norm")
        k = k.replace("classifier.", "")
        if k.endswith("x_proj_weight"):
            k, v = k.replace("x_proj_weight", "x_proj.weight"), v.reshape(-1, v.shape[-1])
        if k.endswith("dt_projs_weight"):
            k, v = k.replace("dt_projs_weight", "dt_projs.weight"), v.reshape(-1, v.shape[-1])
        out[k] = v
    return out


def test_hf_port_layout(tmp_path):
    torch.manual_seed(0)
    model = DASS(TINY)
    hf = _hf_port_keys(model.state_dict())
    assert "dass.patch_embeddings.projection.3.weight" in hf and "head.weight" in hf and "dass.norm.weight" in hf
    assert hf["dass.layers.0.blocks.0.op.x_proj.weight"].shape == (4 * (1 + 2), 8)
    assert hf["dass.layers.0.blocks.0.op.dt_projs.weight"].shape == (4 * 8, 1)
    (tmp_path / "hf").mkdir()
    save_file({k: v.contiguous() for k, v in hf.items()}, tmp_path / "hf" / "model.safetensors")
    _same_model(model, load_dass(tmp_path / "hf"))


def test_checkpoint_key_errors_name_key_and_file(tmp_path):
    torch.manual_seed(0)
    state = {"module.v." + k: v for k, v in DASS(TINY).state_dict().items()}

    def save(name, sd):
        torch.save(sd, tmp_path / name)
        return tmp_path / name

    missing = dict(state)
    del missing["module.v.layers.1.blocks.0.op.Ds"]
    with pytest.raises(ValueError, match=r"missing\.pth.*missing keys \(1\): layers\.1\.blocks\.0\.op\.Ds"):
        load_dass(save("missing.pth", missing))
    extra = dict(state, **{"module.v.layers.0.blocks.0.op.bogus": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"extra\.pth.*unexpected keys \(1\): layers\.0\.blocks\.0\.op\.bogus"):
        load_dass(save("extra.pth", extra))
    shaped = dict(state, **{"module.v.layers.0.blocks.0.mlp.fc1.weight": torch.zeros(30, 8)})
    with pytest.raises(ValueError, match=r"shaped\.pth.*layers\.0\.blocks\.0\.mlp\.fc1\.weight: file \(30, 8\) "
                                         r"vs model \(32, 8\) \(in shaped\.pth\)"):
        load_dass(save("shaped.pth", shaped), config=TINY)
    with pytest.raises(ValueError, match=r"missing keys \(\d+\): layers\.2\.blocks\.1\."):  # config says deeper
        load_dass(tmp_path / "extra.pth", config=DASSConfig(dims=(8, 16, 32, 64), depths=(1, 1, 2, 1)))
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_dass(tmp_path / "nothere.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        load_dass(tmp_path / "junk.pth")


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

def test_cli_top5(tmp_path, capsys):
    torch.manual_seed(0)
    model = DASS(TINY)
    with torch.no_grad():  # make class 7 win clearly
        model.classifier["head"].bias[7] = 20.0
    torch.save({"module.v." + k: v for k, v in model.state_dict().items()}, tmp_path / "w.pth")
    labels = tmp_path / "class_labels_indices.csv"
    labels.write_text("index,mid,display_name\n" + "".join(f'{i},/m/{i:04d},"Sound, {i}"\n' for i in range(527)))
    clip = tmp_path / "clip.wav"
    sf.write(clip, (0.1 * np.random.default_rng(0).standard_normal(22050)).astype(np.float32), 44100)
    assert cli.main(["tag", str(clip), "--weights", str(tmp_path / "w.pth"), "--labels", str(labels)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5
    assert lines[0].split(None, 1) == ["1.000", "Sound, 7"]
    scores = [float(line.split()[0]) for line in lines]
    assert scores == sorted(scores, reverse=True)
    assert cli.main(["tag", str(clip), "--weights", str(tmp_path / "missing.pth")]) == 1
    assert re.search("DASS weights .*missing.pth: no such file", capsys.readouterr().err)
