"""Audio front end: read a file, resample to 16 kHz, Kaldi log-mel filterbank, the DASS input normalisation.

Glossary (code name -> meaning; paper Fig. 1: "audio (16 kHz) -> fbank (1024 x 128)"):
    waveform    mono float32 samples at SAMPLE_RATE                           (samples,)
    frame       25 ms = 400 samples, one every 10 ms = 160 samples (Kaldi snip_edges: only whole frames)
    fbank       log mel energies, one row per frame                           (frames, 128)
    dass input  fbank - mean-removed audio, padded/cropped to 1024 frames, normalised with AudioSet statistics

`fbank` reproduces `torchaudio.compliance.kaldi.fbank(w, htk_compat=True, sample_frequency=16000, use_energy=False,
window_type='hanning', num_mel_bins=128, dither=0.0, frame_shift=10)` (what DASS and LTU train with) without
torchaudio, a heavy dependency tied to each torch version. Unlike the official pipeline, a file at another sample
rate is resampled instead of being read as if it were 16 kHz.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from torch import Tensor

SAMPLE_RATE = 16000
FRAME_LENGTH = 400    # 25 ms
FRAME_SHIFT = 160     # 10 ms
N_FFT = 512           # the frame zero-padded to the next power of two
N_MELS = 128
PREEMPHASIS = 0.97
LOW_FREQ = 20.0       # Hz; the top of the mel range is the Nyquist frequency
DASS_MEAN, DASS_STD = -4.2677393, 4.5689974  # AudioSet fbank statistics used by AST and DASS
SILENT_FRAME = -DASS_MEAN / (2 * DASS_STD)  # a zero (padded) fbank frame after normalisation, ≈ 0.467
DASS_FRAMES = 1024    # 10.24 s: the length DASS was trained on
MAX_SECONDS = 3600    # longer files are refused by load_audio (see there)


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> Tensor:
    """Read any file soundfile can (wav, flac, ogg, mp3, ...) -> (samples,): first channel, float32, resampled to
    `sample_rate`. Every error names the file. A file longer than MAX_SECONDS is refused from its header, or once
    that much is read, so memory stays bounded (an hour at 48 kHz peaks at about 2 GB)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file {path}: no such file")
    try:
        with sf.SoundFile(str(path)) as f:
            sr, limit = f.samplerate, MAX_SECONDS * f.samplerate
            too_long = f.frames > limit                               # from the header: nothing is read
            chunks = [] if too_long else [b[:, 0].copy() for b in f.blocks(  # (samples, channels) blocks
                blocksize=1 << 20, frames=limit + 1, dtype="float32", always_2d=True)]
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError depending on the format
        raise ValueError(f"audio file {path}: cannot be decoded by soundfile ({e})") from e
    n = sum(len(c) for c in chunks)
    if too_long or n > limit:
        raise ValueError(f"audio file {path}: longer than {MAX_SECONDS} s (audio.MAX_SECONDS), the longest we read")
    if n == 0:
        raise ValueError(f"audio file {path}: contains no samples")
    wave = torch.from_numpy(np.concatenate(chunks))
    del chunks                                                        # `wave` is now the only copy of the samples
    if not torch.isfinite(wave).all():
        raise ValueError(f"audio file {path}: contains NaN or infinite samples")
    wave = resample(wave, sr, sample_rate)                            # unchanged if sr == sample_rate
    if wave.numel() < FRAME_LENGTH * sample_rate // SAMPLE_RATE:
        raise ValueError(f"audio file {path}: too short ({n} samples at {sr} Hz = {1000 * n / sr:.1f} ms); "
                         "one fbank frame needs 25 ms")
    return wave


def resample(waveform: Tensor, orig_sr: int, new_sr: int, zeros: int = 48, rolloff: float = 0.95,
             beta: float = 8.0, block: int = 1 << 18) -> Tensor:
    """Band-limited resampling of a 1-D signal: (samples,) -> (ceil(samples * new_sr / orig_sr),).
    Output j is the input at time t = j * orig_sr / new_sr through a Kaiser-windowed sinc low-pass at `rolloff` x
    the lower Nyquist frequency (to 16 kHz: flat to ~7.2 kHz, below -70 dB from 8 kHz). Few output phases (44.1,
    48, 8 kHz): each phase's filter is tabulated exactly and a block of outputs is one matmul; else (44,101 Hz,
    primes) it is interpolated between tabulated fractions (error ~1e-7). Work tensors hold ~`block` floats (1 MB)."""
    if waveform.dim() != 1:
        raise ValueError(f"resample expects a 1-D waveform; got shape {tuple(waveform.shape)}")
    if min(orig_sr, new_sr) <= 0 or int(orig_sr) != orig_sr or int(new_sr) != new_sr:
        raise ValueError(f"sample rates must be positive integers; got {orig_sr} Hz -> {new_sr} Hz")
    orig_sr, new_sr = int(orig_sr), int(new_sr)
    g = math.gcd(orig_sr, new_sr)
    up, down = new_sr // g, orig_sr // g
    n = waveform.numel()
    if up == down or n == 0:
        return waveform
    c = rolloff * min(1.0, up / down)                           # the cut-off, in units of the input Nyquist
    half = math.ceil(zeros / c)                                 # the filter reaches `half` inputs on each side
    taps, n_out = 2 * half + 1, -(-n * up // down)
    x = waveform.float()

    def h(d: Tensor) -> Tensor:                                 # the filter at distances d (float64, in inputs)
        r = c * d / zeros
        kaiser = torch.special.i0(beta * (1 - r ** 2).clamp(min=0).sqrt()) / float(np.i0(beta))
        return (c * torch.sinc(c * d) * kaiser * (r.abs() <= 1)).float().to(x.device)

    k = torch.arange(down + taps, dtype=torch.float64)
    if up * len(k) <= block:  # output i*up + p sits at input i*down + p*down/up: window i, weights of phase p
        weight = h(torch.arange(up, dtype=torch.float64)[:, None] * down / up + half - k)      # (up, down + taps)
        steps = -(-n_out // up)
        windows = F.pad(x, (half, max(0, (steps - 1) * down + len(k) - half - n))).unfold(0, len(k), down)
        y = torch.cat([w @ weight.T for w in windows[:steps].split(max(1, block // len(k)))])  # (steps, up)
        return y.reshape(-1)[:n_out].to(waveform.dtype)
    n_frac = max(1, block // taps)                              # tabulated fractions
    grid = h(torch.arange(n_frac + 1, dtype=torch.float64)[:, None] / n_frac + half - k[:taps])  # (n_frac + 1, taps)
    slope = grid[1:] - grid[:-1]
    windows = F.pad(x, (half, half)).unfold(0, taps, 1)        # (samples, taps): row i = inputs i-half .. i+half
    out = []
    for j0 in range(0, n_out, n_frac):
        j = torch.arange(j0, min(j0 + n_frac, n_out), device=x.device)
        base, pos = j * down // up, (j * down % up).double() * (n_frac / up)  # t = base + pos / n_frac
        q = pos.long()
        xs = windows.index_select(0, base)                      # (outputs, taps)
        # xs · (grid[q] + (pos - q) slope[q]) without forming the interpolated weights
        out.append(torch.linalg.vecdot(xs, grid[q]) + (pos - q).float() * torch.linalg.vecdot(xs, slope[q]))
    return torch.cat(out).to(waveform.dtype)


def mel_filterbank() -> Tensor:
    """Kaldi's triangular mel filters: (N_MELS, N_FFT // 2 + 1) float32; the Nyquist bin always gets weight 0.
    Filter b rises from mel_low + b*delta to a peak at mel_low + (b+1)*delta and falls to mel_low + (b+2)*delta,
    delta = (mel(nyquist) - mel(LOW_FREQ)) / (N_MELS + 1), with the HTK mel scale mel(f) = 1127 ln(1 + f/700): in
    float64 for the band edges, float32 for the FFT bins, as Kaldi rounds (else the log energies move by 1e-4)."""
    mel_low, mel_high = (1127.0 * math.log(1.0 + f / 700.0) for f in (LOW_FREQ, SAMPLE_RATE / 2))
    delta = (mel_high - mel_low) / (N_MELS + 1)
    b = torch.arange(N_MELS, dtype=torch.float32)[:, None]
    left, center, right = mel_low + b * delta, mel_low + (b + 1) * delta, mel_low + (b + 2) * delta
    hz = SAMPLE_RATE / N_FFT * torch.arange(N_FFT // 2, dtype=torch.float32)   # bins 0 .. N_FFT/2 - 1
    mel = 1127.0 * (1.0 + hz / 700.0).log()
    tri = torch.minimum((mel - left) / (center - left), (right - mel) / (right - center)).clamp(min=0)
    return F.pad(tri, (0, 1))


def fbank(waveform: Tensor, sample_rate: int = SAMPLE_RATE) -> Tensor:
    """Kaldi log-mel filterbank (see the module docstring): (samples,) -> (frames, 128), frames = 1 + (samples -
    400) // 160, in blocks of frames (an hour needs a few tens of MB). A ValueError if any value is NaN or infinite
    (NaN/inf samples, or samples such as 4e29 whose power overflows float32): every feature would be NaN."""
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"fbank expects {SAMPLE_RATE} Hz audio; got {sample_rate} Hz (use resample first)")
    if waveform.dim() == 2 and waveform.shape[0] == 1:
        waveform = waveform[0]                                               # (1, samples), as torchaudio's
    if waveform.dim() != 1:
        raise ValueError(f"fbank expects a mono waveform (samples,); got shape {tuple(waveform.shape)}")
    if waveform.numel() < FRAME_LENGTH:
        raise ValueError(f"waveform of {waveform.numel()} samples is shorter than one fbank frame (25 ms)")
    wave = waveform.float()
    window = torch.hann_window(FRAME_LENGTH, periodic=False, dtype=torch.float32, device=wave.device)
    mel_fb = mel_filterbank().to(wave.device)                                # (128, 257)
    out = []
    for x in wave.unfold(0, FRAME_LENGTH, FRAME_SHIFT).split(4096):         # views (frames, 400), 4096 at a time
        x = x - x.mean(dim=1, keepdim=True)                                  # DC offset
        x = x - PREEMPHASIS * torch.cat([x[:, :1], x[:, :-1]], dim=1)        # x[i] -= 0.97 x[i-1]; x[0] -= 0.97 x[0]
        x = F.pad(x * window, (0, N_FFT - FRAME_LENGTH))
        power = torch.fft.rfft(x).abs().pow(2)                              # (frames, 257)
        out.append((power @ mel_fb.T).clamp(min=torch.finfo(torch.float32).eps).log())  # (frames, 128)
    x = torch.cat(out)
    if not torch.isfinite(x).all():
        raise ValueError(f"the fbank has NaN or infinite values; the largest |sample| is {wave.abs().max():.3g}")
    return x


def dass_input(waveform: Tensor, target_length: int | None = DASS_FRAMES) -> Tensor:
    """16 kHz waveform (samples,) -> normalised fbank (T, 128), as DASS was trained: the clip's mean removed, the
    fbank zero-padded at the end or cropped to `target_length` frames (None: every frame, for long audio), then
    (x - DASS_MEAN) / (2 DASS_STD). Padded frames are thus SILENT_FRAME ≈ 0.467, as in the official pipeline."""
    x = fbank(waveform - waveform.mean())
    if target_length is not None:
        x = F.pad(x, (0, 0, 0, max(0, target_length - x.shape[0])))[:target_length]
    return (x - DASS_MEAN) / (2 * DASS_STD)


def dass_input_from_file(path: str | Path, target_length: int | None = DASS_FRAMES) -> Tensor:
    """Audio file -> the DASS input (T, 128): `load_audio` then `dass_input`; every ValueError names the file."""
    wave = load_audio(path)
    try:
        return dass_input(wave, target_length)
    except ValueError as e:
        raise ValueError(f"audio file {path}: {e}") from e
