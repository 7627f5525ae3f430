"""Write tests/fixtures/fbank_kaldi.npz: reference Kaldi fbank values for tests/test_audio.py.

torchaudio is not a dependency of this project, so its output is computed once, here, in a separate environment:

    python3 -m venv /tmp/ta && /tmp/ta/bin/pip install torch==2.9.1 torchaudio==2.9.1 numpy
    /tmp/ta/bin/python tools/make_fbank_fixture.py

For every test signal the file holds `wave_<name>` (float32, 16 kHz) and `fbank_<name>` (`kaldi_fbank`).
`dass_<name>` (two signals) is the full DASS input of the official README (mean removal, fbank, zero-pad or crop to
`dass_target_length` frames, (x + 4.2677393) / (4.5689974 * 2)).
"""
from pathlib import Path

import numpy as np
import torch
import torchaudio

SR = 16000
OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "fbank_kaldi.npz"
DASS_TARGET = 128  # short, to keep the file small
DASS_SIGNALS = ("chirp_dc", "long")  # 98 frames are zero-padded to 128, 199 are cropped


def kaldi_fbank(x: torch.Tensor) -> torch.Tensor:
    """x (1, samples) -> (frames, 128), with the settings DASS and LTU use."""
    return torchaudio.compliance.kaldi.fbank(x, htk_compat=True, sample_frequency=SR, use_energy=False,
                                             window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)


def dass_input(w: np.ndarray, target: int) -> np.ndarray:
    x = torch.from_numpy(w)[None]
    f = kaldi_fbank(x - x.mean())
    p = target - f.shape[0]
    f = torch.nn.functional.pad(f, (0, 0, 0, p)) if p > 0 else f[:target]
    return ((f + 4.2677393) / (4.5689974 * 2)).numpy()


def signals() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20240705)
    t = np.arange(SR) / SR
    chirp = 0.5 * np.sin(2 * np.pi * (100 * t + 3900 * t ** 2))  # 100 Hz -> 7.9 kHz in 1 s
    return {
        "noise": (0.1 * rng.standard_normal(8000)).astype(np.float32),  # 0.5 s white noise
        "chirp_dc": (chirp + 0.3 + 0.01 * rng.standard_normal(SR)).astype(np.float32),  # with a DC offset
        "tones_loud": (12000 * np.sin(2 * np.pi * 440 * t[:5000]) + 3000 * np.sin(2 * np.pi * 5000 * t[:5000])
                       ).astype(np.float32),  # int16-scale amplitudes
        "one_frame": rng.uniform(-1, 1, 400).astype(np.float32),  # exactly one 25 ms frame
        "odd_length": (0.2 * rng.standard_normal(1999)).astype(np.float32),  # 11 frames + 79 samples left over
        "silence": np.zeros(1200, dtype=np.float32),  # log floor at float32 eps
        "long": (0.05 * rng.standard_normal(SR * 2 + 123)).astype(np.float32),  # 199 frames, cropped for DASS
    }


def main() -> None:
    arrays = {"dass_target_length": np.array(DASS_TARGET)}
    for name, w in signals().items():
        arrays[f"wave_{name}"] = w
        arrays[f"fbank_{name}"] = kaldi_fbank(torch.from_numpy(w)[None]).numpy()
        if name in DASS_SIGNALS:
            arrays[f"dass_{name}"] = dass_input(w, DASS_TARGET)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} kB) with torch {torch.__version__}, "
          f"torchaudio {torchaudio.__version__}")


if __name__ == "__main__":
    main()
