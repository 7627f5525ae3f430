import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import audio

FIXTURE = Path(__file__).parent / "fixtures" / "fbank_kaldi.npz"  # torchaudio's values: tools/make_fbank_fixture.py


@pytest.fixture(scope="module")
def kaldi():
    return np.load(FIXTURE)


def _names(kaldi):
    return [k[len("wave_"):] for k in kaldi.files if k.startswith("wave_")]


def test_fbank_matches_torchaudio_kaldi(kaldi):
    names = _names(kaldi)
    assert len(names) >= 6
    for name in names:
        ours = audio.fbank(torch.from_numpy(kaldi[f"wave_{name}"]))
        ref = kaldi[f"fbank_{name}"]
        assert ours.shape == ref.shape, name
        np.testing.assert_allclose(ours.numpy(), ref, atol=1e-4, rtol=0, err_msg=name)


def test_dass_input_matches_official_pipeline(kaldi):
    target = int(kaldi["dass_target_length"])
    for name in ("chirp_dc", "long"):  # 98 frames zero-padded to 128; 199 frames cropped to 128
        ours = audio.dass_input(torch.from_numpy(kaldi[f"wave_{name}"]), target_length=target)
        np.testing.assert_allclose(ours.numpy(), kaldi[f"dass_{name}"], atol=1e-5, rtol=0, err_msg=name)


def test_dass_input_lengths_and_padding_value():
    w = torch.randn(16000 * 3)  # 298 frames
    full = audio.dass_input(w, target_length=None)
    assert full.shape == (298, 128)
    padded = audio.dass_input(w, target_length=400)
    assert torch.equal(padded[:298], full)
    pad_value = -audio.DASS_MEAN / (2 * audio.DASS_STD)  # a zero fbank value after normalisation, ~0.467
    assert torch.allclose(padded[298:], torch.full((102, 128), pad_value))
    assert torch.equal(audio.dass_input(w, target_length=100), full[:100])


def test_fbank_blocks_do_not_change_frames():
    # fbank works through blocks of 4096 frames; frames are independent, so any frame equals a short fbank of its
    # own samples, including frames on both sides of a block boundary.
    w = torch.randn(160 * 4200 + 240)
    full = audio.fbank(w)
    assert full.shape == (4200, 128)
    for f in (0, 4094, 4095, 4096, 4097, 4199):
        one = audio.fbank(w[f * 160: f * 160 + 400])
        torch.testing.assert_close(full[f:f + 1], one, atol=1e-5, rtol=0)


def test_fbank_rejects_bad_input():
    with pytest.raises(ValueError, match="shorter than one fbank frame"):
        audio.fbank(torch.zeros(399))
    with pytest.raises(ValueError, match="44100 Hz"):
        audio.fbank(torch.zeros(16000), sample_rate=44100)
    with pytest.raises(ValueError, match="mono"):
        audio.fbank(torch.zeros(2, 16000))
    x = torch.randn(16000)
    assert torch.equal(audio.fbank(x[None]), audio.fbank(x))  # torchaudio's (1, samples) is mono too
    for rates in ((0, 16000), (16000, -8000), (44100.5, 16000)):
        with pytest.raises(ValueError, match="positive integers"):
            audio.resample(x, *rates)


def _tone(freq, sr, seconds=1.0):
    t = np.arange(int(sr * seconds)) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _spectrum(y, sr):
    y = y[400:-400].double()  # drop the filter's edge transients
    spec = torch.fft.rfft(y * torch.hann_window(len(y), periodic=False, dtype=torch.float64)).abs()
    return torch.fft.rfftfreq(len(y), 1 / sr), spec


def test_load_audio_resamples_44k_tone_to_16k(tmp_path):
    path = tmp_path / "tone.wav"
    sf.write(path, _tone(1000, 44100), 44100, subtype="PCM_16")
    y = audio.load_audio(path)
    assert y.dtype == torch.float32 and y.shape == (16000,)
    freqs, spec = _spectrum(y, 16000)
    assert abs(freqs[spec.argmax()].item() - 1000) < 2
    amplitude = y[400:-400].abs().max().item()
    assert abs(amplitude - 0.5) < 0.01  # unit gain in the pass band


@pytest.mark.parametrize("freq", [8300, 10000, 15000])
def test_resampling_does_not_alias_tones_above_8k(freq):
    # Decimation without a proper low-pass folds a tone at f > 8 kHz to 16 kHz - f (to 7.7, 6 and 1 kHz here).
    y = audio.resample(torch.from_numpy(_tone(freq, 44100)), 44100, 16000)
    ref = audio.resample(torch.from_numpy(_tone(5000, 44100)), 44100, 16000)
    leak = y[400:-400].pow(2).mean().sqrt() / ref[400:-400].pow(2).mean().sqrt()
    assert 20 * math.log10(leak.item()) < -60


def test_upsampling_keeps_tone_and_has_no_images():
    y = audio.resample(torch.from_numpy(_tone(3000, 8000)), 8000, 16000)
    assert y.shape == (16000,)
    freqs, spec = _spectrum(y, 16000)
    assert abs(freqs[spec.argmax()].item() - 3000) < 2
    image = spec[(freqs - 5000).abs() < 200].max() / spec.max()  # the 8 kHz - 3 kHz mirror image
    assert image < 1e-3


@pytest.mark.parametrize("orig_sr, freqs", [
    (44100, (440, 3000, 6500)),    # few output phases: the strided convolution
    (44101, (440, 3000, 6500)),    # gcd 1: 16000 phases, the interpolated filter
    (192000, (440, 3000, 6500)),
    (200003, (440, 3000, 6500)),   # a prime
    (7919, (440, 3000)),           # a prime below 16 kHz: upsampling
])
def test_resampling_any_rate_gives_the_band_limited_signal(orig_sr, freqs):
    # A sum of tones inside both pass bands, resampled, must equal the same tones sampled at 16 kHz.
    def tones(sr, n):
        t = np.arange(n) / sr
        return sum(0.3 * np.sin(2 * np.pi * f * t + i) for i, f in enumerate(freqs))
    n = orig_sr // 2                                             # 0.5 s
    y = audio.resample(torch.from_numpy(tones(orig_sr, n).astype(np.float32)), orig_sr, 16000)
    assert y.shape == (math.ceil(n * 16000 / orig_sr),) and y.dtype == torch.float32
    ideal = tones(16000, len(y))
    np.testing.assert_allclose(y[400:-400].numpy(), ideal[400:-400], atol=5e-5, rtol=0)  # past 25 ms edges


def test_resampling_paths_agree():
    # 44.1 kHz -> 16 kHz goes through the strided convolution; a smaller block sends it through the interpolated
    # filter instead. Same filter, same outputs.
    x = torch.randn(44100)
    conv = audio.resample(x, 44100, 16000)
    interpolated = audio.resample(x, 44100, 16000, block=50_000)
    torch.testing.assert_close(interpolated, conv, atol=2e-5, rtol=0)
    torch.testing.assert_close(audio.resample(x, 44101, 16000, block=1 << 17), audio.resample(x, 44101, 16000),
                               atol=2e-5, rtol=0)  # a quarter of the memory, the same outputs


def test_odd_rates_resample_in_bounded_memory_and_time():
    # A 44,101 Hz clip once built a 16000 x 44382 float64 filter table (5.7 GB), a prime rate 25 GB. Peak memory
    # above the clips themselves and CPU time (one thread: what the algorithm costs, not how busy the machine is)
    # must stay small whatever the rates' common divisor. A fresh process measures its own peak.
    code = """if True:
        import resource, time, torch, audio
        torch.set_num_threads(1)
        x = torch.randn(44101 * 30)
        y = torch.randn(200003 * 5)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.process_time()
        a, b = audio.resample(x, 44101, 16000), audio.resample(y, 200003, 16000)
        seconds = time.process_time() - t0
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        assert a.shape == (16000 * 30,) and b.shape == (16000 * 5,)
        print(grown // 1024, seconds)"""
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    grown_mb, seconds = map(float, run.stdout.split())
    assert grown_mb < 100, f"resampling grew the peak memory by {grown_mb} MB"
    assert seconds < 20, f"resampling took {seconds} s of CPU"


def test_load_audio_refuses_clips_longer_than_max_seconds(tmp_path, monkeypatch):
    monkeypatch.setattr(audio, "MAX_SECONDS", 2)
    ok, long = tmp_path / "ok.wav", tmp_path / "long.flac"
    sf.write(ok, np.zeros(16000 * 2, dtype=np.float32), 16000)
    sf.write(long, np.zeros(48000 * 2 + 1, dtype=np.float32), 48000)
    assert audio.load_audio(ok).shape == (32000,)
    with pytest.raises(ValueError, match=r"long\.flac.*longer than 2 s"):
        audio.load_audio(long)


def test_huge_samples_give_a_value_error_naming_the_file(tmp_path):
    # 4e29 is finite, but its power spectrum is not: the fbank would be NaN/inf and so would every feature.
    with pytest.raises(ValueError, match="NaN or infinite"):
        audio.fbank(torch.full((16000,), 4e29))
    path = tmp_path / "huge.wav"
    signs = np.random.default_rng(0).choice([-1.0, 1.0], 16000)   # not constant: the clip's mean is removed
    sf.write(path, (4e29 * signs).astype(np.float32), 16000, subtype="FLOAT")
    with pytest.raises(ValueError, match=r"huge\.wav.*NaN or infinite.*e\+29"):
        audio.dass_input_from_file(path)


def test_load_audio_formats_and_first_channel(tmp_path):
    left, right = _tone(440, 16000), _tone(2000, 16000)
    stereo = np.stack([left, right], axis=1)
    for name, kw in (("a.wav", dict(subtype="FLOAT")), ("a.flac", {}), ("a.ogg", {}),
                     ("a.mp3", dict(format="MP3", subtype="MPEG_LAYER_III"))):
        sf.write(tmp_path / name, stereo, 16000, **kw)
        y = audio.load_audio(tmp_path / name)
        freqs, spec = _spectrum(y, 16000)
        assert abs(freqs[spec.argmax()].item() - 440) < 2, name  # the first channel, not a mix or the second
    np.testing.assert_allclose(audio.load_audio(tmp_path / "a.wav").numpy(), left, atol=1e-7)
    np.testing.assert_allclose(audio.load_audio(tmp_path / "a.flac").numpy(), left, atol=1e-4)


def test_load_audio_errors_name_file_and_reason(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        audio.load_audio(tmp_path / "nope.wav")
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"this is not audio" * 10)
    with pytest.raises(ValueError, match=r"garbage\.wav.*cannot be decoded"):
        audio.load_audio(garbage)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros((0, 1), dtype=np.float32), 16000)
    with pytest.raises(ValueError, match=r"empty\.wav.*no samples"):
        audio.load_audio(empty)
    short = tmp_path / "short.flac"
    sf.write(short, np.zeros(300, dtype=np.float32), 16000)
    with pytest.raises(ValueError, match=r"short\.flac.*too short"):
        audio.load_audio(short)
    short44 = tmp_path / "short44.wav"  # 1000 samples at 44.1 kHz = 22.7 ms < one 25 ms frame
    sf.write(short44, np.zeros(1000, dtype=np.float32), 44100)
    with pytest.raises(ValueError, match=r"short44\.wav.*too short"):
        audio.load_audio(short44)
    nan = tmp_path / "nan.wav"
    sf.write(nan, np.full(800, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    with pytest.raises(ValueError, match=r"nan\.wav.*NaN"):
        audio.load_audio(nan)


def test_dass_input_from_file(tmp_path):
    path = tmp_path / "clip.flac"
    sf.write(path, _tone(440, 16000, 2.0), 16000)
    x = audio.dass_input_from_file(path)
    assert x.shape == (1024, 128)
    torch.testing.assert_close(x, audio.dass_input(audio.load_audio(path)))
    assert audio.dass_input_from_file(path, target_length=None).shape == (198, 128)
