"""Audio front end: read a file, resample to 16 kHz, Kaldi log-mel filterbank, the DASS input normalisation.

Glossary (code name -> meaning; paper Fig. 1: "audio (16 kHz) -> fbank (1024 x 128)"):
    waveform    mono float32 samples at SAMPLE_RATE                           (samples,)
    frame       25 ms = 400 samples, one every 10 ms = 160 samples (Kaldi snip_edges: only whole frames)
    fbank       log mel energies, one row per frame                           (frames, 128)
    dass input  fbank - mean-removed audio, padded/cropped to 1024 frames, normalised with AudioSet statistics

`fbank` reproduces `torchaudio.compliance.kaldi.fbank(w, htk_compat=True, sample_frequency=16000, use_energy=False,
window_type='hanning', num_mel_bins=128, dither=0.0, frame_shift=10)` (what DASS and LTU train with) without
torchaudio; tests/fixtures/fbank_kaldi.npz holds torchaudio's values (made by tools/make_fbank_fixture.py).
Unlike the official pipeline, a file at another sample rate is resampled (band-limited) instead of being read as if
it were 16 kHz.
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


# ----------------------------------------------------------------------------------------------------------------
# Reading and resampling
# ----------------------------------------------------------------------------------------------------------------

def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> Tensor:
    """Read any file soundfile can (wav, flac, ogg, mp3, ...): first channel, float32, resampled to `sample_rate`.

    Returns (samples,). Raises FileNotFoundError for a missing file and ValueError, naming the file, for one that
    cannot be decoded, has no samples, holds NaN/inf, or is shorter than one 25 ms fbank frame.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file {path}: no such file")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # (samples, channels)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError depending on the format
        raise ValueError(f"audio file {path}: cannot be decoded by soundfile ({e})") from e
    if data.shape[0] == 0:
        raise ValueError(f"audio file {path}: contains no samples")
    wave = torch.from_numpy(np.ascontiguousarray(data[:, 0]))
    if not torch.isfinite(wave).all():
        raise ValueError(f"audio file {path}: contains NaN or infinite samples")
    if sr != sample_rate:
        wave = resample(wave, sr, sample_rate)
    if wave.numel() < FRAME_LENGTH * sample_rate // SAMPLE_RATE:
        raise ValueError(f"audio file {path}: too short ({data.shape[0]} samples at {sr} Hz = "
                         f"{1000 * data.shape[0] / sr:.1f} ms); one fbank frame needs 25 ms")
    return wave


def _sinc_kernels(up: int, down: int, zeros: int, rolloff: float, beta: float) -> tuple[Tensor, int]:
    """Polyphase windowed-sinc filters: (up, K) with row p the taps of output phase p; and the left padding.

    Resampling by up/down puts output sample j = i*up + p at input time i*down + p*down/up. A low-pass at
    `rolloff` x the lower Nyquist frequency, h(t) = c sinc(c t) with c = rolloff * min(1, up/down) (in input
    samples), Kaiser-windowed over `zeros` sinc zero crossings on each side, is evaluated at those fractional offsets.
    """
    c = rolloff * min(1.0, up / down)
    half = math.ceil(zeros / c)                                  # half-length in input samples
    K = down + 2 * half + 1
    k = torch.arange(K, dtype=torch.float64)
    p = torch.arange(up, dtype=torch.float64)[:, None]
    t = p * down / up + half - k                                 # filter argument for tap k of phase p  (up, K)
    window = torch.special.i0(beta * torch.sqrt((1 - (t / half) ** 2).clamp(min=0))) / torch.special.i0(
        torch.tensor(beta, dtype=torch.float64))
    h = c * torch.sinc(c * t) * window * (t.abs() <= half)
    return h, half


def resample(waveform: Tensor, orig_sr: int, new_sr: int, zeros: int = 48, rolloff: float = 0.95,
             beta: float = 8.0) -> Tensor:
    """Band-limited resampling of a 1-D signal (windowed-sinc, polyphase): (samples,) -> (ceil(samples*new/orig),).

    The pass band ends at `rolloff` x the lower Nyquist frequency; with the defaults the response is flat to
    ~7.2 kHz and below -70 dB from 8 kHz when going to 16 kHz, so tones above 8 kHz do not alias.
    """
    if waveform.dim() != 1:
        raise ValueError(f"resample expects a 1-D waveform; got shape {tuple(waveform.shape)}")
    if orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be positive; got {orig_sr} -> {new_sr}")
    g = math.gcd(int(orig_sr), int(new_sr))
    up, down = new_sr // g, orig_sr // g
    if up == down:
        return waveform
    h, half = _sinc_kernels(up, down, zeros, rolloff, beta)
    if h.numel() > 2 ** 25:
        raise ValueError(f"cannot resample {orig_sr} Hz -> {new_sr} Hz: the ratio {up}/{down} needs "
                         f"{h.numel()} filter taps; convert the file to a common rate first")
    weight = h.to(waveform.device, torch.float32)[:, None, :]    # (up, 1, K) one output channel per phase
    n_out = -(-waveform.numel() * up // down)
    n_blocks = -(-n_out // up)                                   # outputs per phase
    right = max(0, (n_blocks - 1) * down + weight.shape[-1] - half - waveform.numel())
    x = F.pad(waveform.float()[None, None], (half, right))
    out, step = [], 1 << 14                                      # bounded memory: 16k conv steps at a time
    for i0 in range(0, n_blocks, step):
        i1 = min(i0 + step, n_blocks)
        seg = x[..., i0 * down: (i1 - 1) * down + weight.shape[-1]]
        out.append(F.conv1d(seg, weight, stride=down)[0].T.reshape(-1))  # (steps, up) -> interleaved phases
    return torch.cat(out)[:n_out].to(waveform.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Kaldi filterbank
# ----------------------------------------------------------------------------------------------------------------

def _mel(f: float | Tensor) -> float | Tensor:
    """HTK mel scale, 1127 ln(1 + f/700): float64 for the scalar band edges, float32 for the FFT bins (Kaldi and
    torchaudio round it that way; log1p or float64 everywhere moves the log energies by up to 1e-4)."""
    return 1127.0 * (math.log(1.0 + f / 700.0) if isinstance(f, float) else (1.0 + f / 700.0).log())


def mel_filterbank(n_mels: int = N_MELS, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT,
                   low_freq: float = LOW_FREQ) -> Tensor:
    """Kaldi's triangular mel filters: (n_mels, n_fft // 2 + 1) float32; the Nyquist bin always gets weight 0.

    Filter b rises from mel_low + b*delta to a peak at mel_low + (b+1)*delta and falls to mel_low + (b+2)*delta,
    delta = (mel(nyquist) - mel(low_freq)) / (n_mels + 1); the triangles are linear in mel, not in Hz.
    """
    mel_low, mel_high = _mel(float(low_freq)), _mel(sample_rate / 2.0)
    delta = (mel_high - mel_low) / (n_mels + 1)
    b = torch.arange(n_mels, dtype=torch.float32)[:, None]
    left, center, right = mel_low + b * delta, mel_low + (b + 1) * delta, mel_low + (b + 2) * delta
    mel = _mel(sample_rate / n_fft * torch.arange(n_fft // 2, dtype=torch.float32))[None]  # bins 0 .. n_fft/2 - 1
    tri = torch.minimum((mel - left) / (center - left), (right - mel) / (right - center)).clamp(min=0)
    return F.pad(tri, (0, 1))


def fbank(waveform: Tensor, sample_rate: int = SAMPLE_RATE) -> Tensor:
    """Kaldi log-mel filterbank, torchaudio-compatible (see the module docstring): (samples,) -> (frames, 128).

    frames = 1 + (samples - 400) // 160. Per frame: remove the DC offset, pre-emphasis 0.97, symmetric Hann
    window, zero-pad to 512, power spectrum, 128 mel filters, log with a floor at float32 eps.
    Computed in blocks of frames, so a 60-minute waveform needs no more than a few tens of MB of work memory.
    """
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"fbank expects {SAMPLE_RATE} Hz audio; got {sample_rate} Hz (use resample first)")
    if waveform.dim() == 2 and waveform.shape[0] == 1:
        waveform = waveform[0]
    if waveform.dim() != 1:
        raise ValueError(f"fbank expects a mono waveform (samples,); got shape {tuple(waveform.shape)}")
    n = waveform.numel()
    if n < FRAME_LENGTH:
        raise ValueError(f"waveform of {n} samples is shorter than one fbank frame ({FRAME_LENGTH} samples, 25 ms)")
    frames = 1 + (n - FRAME_LENGTH) // FRAME_SHIFT
    wave = waveform.float()
    window = torch.hann_window(FRAME_LENGTH, periodic=False, dtype=torch.float32, device=wave.device)
    mel_fb = mel_filterbank().to(wave.device)                                # (128, 257)
    eps = torch.finfo(torch.float32).eps
    out = []
    for f0 in range(0, frames, 4096):
        f1 = min(f0 + 4096, frames)
        x = wave[f0 * FRAME_SHIFT: (f1 - 1) * FRAME_SHIFT + FRAME_LENGTH]
        x = x.unfold(0, FRAME_LENGTH, FRAME_SHIFT)                          # (frames, 400)
        x = x - x.mean(dim=1, keepdim=True)                                  # DC offset
        x = x - PREEMPHASIS * torch.cat([x[:, :1], x[:, :-1]], dim=1)        # x[i] -= 0.97 x[i-1]; x[0] -= 0.97 x[0]
        x = F.pad(x * window, (0, N_FFT - FRAME_LENGTH))
        power = torch.fft.rfft(x).abs().pow(2)                              # (frames, 257)
        out.append((power @ mel_fb.T).clamp(min=eps).log())                 # (frames, 128)
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------------------
# DASS input
# ----------------------------------------------------------------------------------------------------------------

def dass_input(waveform: Tensor, target_length: int | None = DASS_FRAMES) -> Tensor:
    """16 kHz waveform (samples,) -> normalised fbank (T, 128), as DASS was trained.

    The clip's mean is removed, the fbank is zero-padded at the end or cropped to `target_length` frames (None:
    keep every frame, for long audio), then normalised (x - DASS_MEAN) / (2 DASS_STD). Padded frames therefore
    equal SILENT_FRAME = -DASS_MEAN / (2 DASS_STD) ≈ 0.467, not 0, exactly as in the official pipeline.
    """
    x = fbank(waveform - waveform.mean())
    if target_length is not None:
        if target_length < 1:
            raise ValueError(f"target_length must be positive or None; got {target_length}")
        x = F.pad(x, (0, 0, 0, max(0, target_length - x.shape[0])))[:target_length]
    return (x - DASS_MEAN) / (2 * DASS_STD)


def dass_input_from_file(path: str | Path, target_length: int | None = DASS_FRAMES) -> Tensor:
    """Audio file -> the DASS input (T, 128): `load_audio` then `dass_input`."""
    return dass_input(load_audio(path), target_length)
