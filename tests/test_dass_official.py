"""dass.py against code outside this project: the official DASS implementation and its Hugging Face port.

tests/fixtures/dass_official.npz holds what they compute (logits and the feature map before the head's pooling) on
fixed inputs with deterministic weights; tools/make_dass_fixture.py ran them on CPU and wrote the weights in each
one's own checkpoint layout. Here those checkpoints go through the project's loader, as a user's DASS_small.pth or
HF folder would, and the model must give the same numbers.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dass
import weights

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import make_dass_fixture  # noqa: E402  (seeded_weights rebuilds the DASS-small checkpoint the fixture was made with)

ATOL = 5e-5  # fp32; measured gaps are <= 1.3e-5 (features) and 3e-6 (logits)


@pytest.fixture(scope="module")
def ref():
    return np.load(FIXTURES / "dass_official.npz")


def _assert_same_outputs(model: dass.DASS, ref, name: str, input_name: str | None = None) -> None:
    x = torch.from_numpy(ref[f"{input_name or name}_input"])
    with torch.no_grad():
        features, logits = model.features(x), model(x)
    assert features.shape == ref[f"{name}_features"].shape, name
    np.testing.assert_allclose(features.numpy(), ref[f"{name}_features"], rtol=0, atol=ATOL, err_msg=name)
    np.testing.assert_allclose(logits.numpy(), ref[f"{name}_logits"], rtol=0, atol=ATOL, err_msg=name)


def _config(name: str) -> dass.DASSConfig:
    dims, depths, d_state, mlp_ratio, classes, _ = make_dass_fixture.CONFIGS[name]
    return dass.DASSConfig(dims=dims, depths=depths, d_state=d_state, mlp_ratio=mlp_ratio, n_classes=classes)


@pytest.mark.parametrize("name", ["tiny", "tiny_n2"])
def test_official_checkpoint_gives_the_official_outputs(ref, name):
    path = FIXTURES / f"dass_official_{name}.pth"
    assert all(k.startswith("module.v.") for k in torch.load(path, weights_only=True))  # the official layout
    model = weights.load_dass(path).eval()
    assert model.config == _config(name)              # inferred from the tensor shapes
    _assert_same_outputs(model, ref, name)


def test_dass_small_gives_the_official_outputs(ref, tmp_path):
    keys, shapes = ref["small_keys"].tolist(), [s.split(",") for s in ref["small_shapes"].tolist()]
    path = tmp_path / "DASS_small.pth"
    torch.save(make_dass_fixture.seeded_weights(zip(keys, shapes)), path)
    model = weights.load_dass(path).eval()
    assert model.config == _config("small") == dass.DASSConfig.small()
    assert sum(p.numel() for p in model.parameters()) == 29_884_463
    _assert_same_outputs(model, ref, "small")


def test_hf_port_folder_gives_the_port_outputs(ref):
    folder = FIXTURES / "dass_hf_tiny"
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    model = weights.load_dass(folder).eval()
    assert model.config == _config("tiny")
    _assert_same_outputs(model, ref, "hf_tiny", input_name="tiny")


def test_fixture_weights_make_each_part_visible(ref):
    """Under the official initialisation (A_logs = log 1 = 0, D = 1, LayerNorms 1 and 0) a wrong use of A or D
    could go unseen; with the fixture's weights, scaling one block's A_logs (eq. 3) or D by 0.5 moves the
    features far beyond ATOL."""
    path = FIXTURES / "dass_official_tiny.pth"
    x = torch.from_numpy(ref["tiny_input"])
    for key in ("module.v.layers.2.blocks.3.op.A_logs", "module.v.layers.0.blocks.1.op.Ds"):
        state = torch.load(path, weights_only=True)
        state[key] = state[key] * 0.5
        model = dass.DASS(_config("tiny")).eval()
        model.load_state_dict({k[len("module.v."):]: v for k, v in state.items()}, strict=True)
        with torch.no_grad():
            gap = np.abs(model.features(x).numpy() - ref["tiny_features"]).max()
        assert gap > 100 * ATOL, key
