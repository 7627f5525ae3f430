"""Write tests/fixtures/fbank_kaldi.npz: torchaudio's Kaldi fbank of test signals (`wave_<name>`, `fbank_<name>`)
and, for two of them, the official DASS input (`dass_<name>`: mean removed, fbank, padded or cropped to
`dass_target_length` frames, normalised). torchaudio is not a dependency here, so this runs in its own environment:

    python3 -m venv /tmp/ta && /tmp/ta/bin/pip install torch==2.9.1 torchaudio==2.9.1 numpy
    /tmp/ta/bin/python tools/make_fbank_fixture.py
"""
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "fbank_kaldi.npz"
DASS_TARGET = 128  # short, to keep the file small: chirp_dc's 98 frames are zero-padded, long's 199 cropped


def kaldi_fbank(x: torch.Tensor) -> torch.Tensor:
    """x (samples,) -> (frames, 128), with the settings DASS and LTU use."""
    return torchaudio.compliance.kaldi.fbank(x[None], htk_compat=True, sample_frequency=16000, use_energy=False,
                                             window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)


def main() -> None:
    rng = np.random.default_rng(20240705)
    t = np.arange(16000) / 16000
    chirp = 0.5 * np.sin(2 * np.pi * (100 * t + 3900 * t ** 2))  # 100 Hz -> 7.9 kHz in 1 s
    signals = {
        "noise": 0.1 * rng.standard_normal(8000),  # 0.5 s white noise
        "chirp_dc": chirp + 0.3 + 0.01 * rng.standard_normal(16000),  # with a DC offset
        "tones_loud": 12000 * np.sin(2 * np.pi * 440 * t[:5000]) + 3000 * np.sin(2 * np.pi * 5000 * t[:5000]),
        "one_frame": rng.uniform(-1, 1, 400),  # exactly one 25 ms frame
        "odd_length": 0.2 * rng.standard_normal(1999),  # 11 frames + 79 samples left over
        "silence": np.zeros(1200),  # log floor at float32 eps
        "long": 0.05 * rng.standard_normal(16000 * 2 + 123),  # 199 frames
    }
    arrays = {"dass_target_length": np.array(DASS_TARGET)}
    for name, w in signals.items():
        x = torch.from_numpy(w.astype(np.float32))
        arrays[f"wave_{name}"], arrays[f"fbank_{name}"] = x.numpy(), kaldi_fbank(x).numpy()
        if name in ("chirp_dc", "long"):
            f = kaldi_fbank(x - x.mean())
            f = F.pad(f, (0, 0, 0, max(0, DASS_TARGET - len(f))))[:DASS_TARGET]
            arrays[f"dass_{name}"] = ((f + 4.2677393) / (4.5689974 * 2)).numpy()
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} with torch {torch.__version__}, torchaudio {torchaudio.__version__}")


if __name__ == "__main__":
    main()
