"""Write tests/fixtures/dass_*: what the official DASS code and its Hugging Face port compute on fixed inputs, with
deterministic weights in each one's own checkpoint layout (for tests/test_dass_official.py). Neither is a
dependency of this project: they run once, from checkouts OUTSIDE the repository.

    git clone https://github.com/Saurabhbhati/DASS /tmp/DASS
    git clone https://github.com/Saurabhbhati/transformers-DASS /tmp/hf-DASS
    pip install einops transformers        # besides this project's requirements
    python tools/make_dass_fixture.py /tmp/DASS /tmp/hf-DASS

dass_official.npz: per configuration c of CONFIGS `c_input` (B, T, 128), `c_logits` and `c_features` (what the head
pools), the port's `hf_tiny_*` on tiny_input, `small_keys` / `small_shapes` (for `seeded_weights`); the official
state_dicts dass_official_{tiny,tiny_n2}.pth (keys `module.v.*`, as DASS_small.pth); the port's folder dass_hf_tiny/.
"""
from __future__ import annotations

import ast
import functools
import importlib
import os
import sys
import types
import zlib
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the official code imports triton

import numpy as np
import torch
import torch.nn as nn

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
SEED = 20240705
CONFIGS = {  # name: (dims, depths, d_state, mlp_ratio, classes, input (B, T))
    "tiny": ((4, 8, 16, 32), (2, 2, 8, 2), 1, 4.0, 10, (2, 70)),    # DASS-small's structure, narrow
    "tiny_n2": ((12, 24), (1, 2), 2, 2.0, 7, (1, 75)),             # N = 2 and two stages: the general case
    "small": ((96, 192, 384, 768), (2, 2, 8, 2), 1, 4.0, 527, (1, 100)),  # DASS-small itself
}
# the last part of a key -> (centre, half-width) of its uniform weights: A = -exp(A_logs) in [-4.5, -0.37],
# Δ = softplus(. + dt_projs_bias) from about 0.02 to 0.7; LayerNorm weights and others: see seeded_weights
SCALES = {"A_logs": (0.25, 1.25), "dt_projs_bias": (-2.0, 2.0), "Ds": (0.0, 1.0), "bias": (0.0, 0.2)}
HF_RENAMES = (  # official -> the port's names, in this order, as its convert_dass_original_pytorch_... script does
    ("module.v.", "dass."), ("dass.classifier.head.", "head."), ("classifier.", ""),
    ("patch_embed.0.", "patch_embeddings.projection.0."), ("patch_embed.2.", "patch_embeddings.projection.1."),
    ("patch_embed.5.", "patch_embeddings.projection.3."), ("patch_embed.7.", "patch_embeddings.projection.4."),
    ("downsample.1.", "downsample.down."), ("downsample.3.", "downsample.norm."),
    ("x_proj_weight", "x_proj.weight"), ("dt_projs_weight", "dt_projs.weight"),
)


def seeded_weights(keys_and_shapes, seed: int = SEED) -> dict[str, torch.Tensor]:
    """Deterministic fp32 weights, each tensor from its own stream (seed, crc32(key)): uniform noise around a value
    and at a scale that keep activations O(1) and make every tensor matter (LayerNorm weights are not all 1,
    biases not 0, A and Δ vary per channel)."""
    out = {}
    for key, shape in keys_and_shapes:
        shape = tuple(int(s) for s in shape)
        u = 2 * np.random.default_rng([seed, zlib.crc32(key.encode())]).random(shape) - 1  # U(-1, 1)
        fan_in = shape[-1] if len(shape) == 3 else int(np.prod(shape[1:]))
        other = (1.0, 0.5) if len(shape) == 1 else (0.0, np.sqrt(3.0 / fan_in))  # LayerNorm; linear / conv
        centre, half_width = SCALES.get(key.rsplit(".", 1)[-1], other)
        out[key] = torch.from_numpy((centre + half_width * u).astype(np.float32))
    return out


def _module(name: str, **attrs) -> types.ModuleType:
    sys.modules[name] = m = types.ModuleType(name)
    m.__dict__.update(attrs)
    return m


def _stand_ins(official: Path) -> None:
    """What the official code (written for CUDA) imports but cannot have on a CPU: its selective-scan extension
    becomes the loop `selective_scan_ref` of its kernels/selective_scan/test_selective_scan.py; timm, torchvision,
    fvcore and wget serve only DropPath (identity at inference), initialisation and functions never called here."""
    layers = _module("timm.models.layers", DropPath=lambda drop_prob=0.0: nn.Identity(),
                     trunc_normal_=nn.init.trunc_normal_, to_2tuple=lambda x: (x, x))
    vit = _module("timm.models.vision_transformer")
    _module("timm", models=_module("timm.models", layers=layers, vision_transformer=vit))
    _module("torchvision", models=_module("torchvision.models", VisionTransformer=None))
    _module("fvcore", nn=_module("fvcore.nn", **dict.fromkeys(["FlopCountAnalysis", "flop_count_str", "flop_count",
                                                               "parameter_count"])))
    _module("wget")
    # Importing test_selective_scan.py rebinds `selective_scan_ref` to a CUDA wrapper: run the function's source.
    text = (official / "kernels" / "selective_scan" / "test_selective_scan.py").read_text()
    node = next(n for n in ast.parse(text).body if isinstance(n, ast.FunctionDef) and n.name == "selective_scan_ref")
    einops = importlib.import_module("einops")
    namespace = dict(torch=torch, F=torch.nn.functional, rearrange=einops.rearrange, repeat=einops.repeat)
    exec(ast.get_source_segment(text, node), namespace)

    def fwd(u, delta, A, B, C, D, delta_bias, delta_softplus, nrows, oflex):
        out = namespace["selective_scan_ref"](u, delta, A, B, C, D, None, delta_bias, delta_softplus)
        return out.float() if oflex else out, None         # (out, states only the backward pass reads)

    _module("selective_scan_cuda_oflex", fwd=fwd)


def official_model(models: types.ModuleType, name: str) -> nn.Module:
    """The official `DASS` (ast_models.py) in DataParallel (keys `module.v.*`). Its constructor knows only DASS's
    widths; for others `v` is the VSSM it would build (with VSSM's own 1-channel stem and label head)."""
    dims, depths, d_state, mlp_ratio, classes, _ = CONFIGS[name]
    if name == "small":
        net = models.DASS(label_dim=classes, imagenet_pretrain=False, audioset_pretrain=False, model_size="small",
                          verbose=False)
    else:
        net = models.DASS.__new__(models.DASS)
        nn.Module.__init__(net)
        net.v = models.vmamba.VSSM(
            in_chans=1, num_classes=classes, dims=list(dims), depths=list(depths), ssm_d_state=d_state,
            mlp_ratio=mlp_ratio, drop_path_rate=0.2, ssm_ratio=1.0, ssm_conv_bias=False, forward_type="v05_noz",
            downsample_version="v3", patchembed_version="v2", norm_layer="LN2D")
    return nn.DataParallel(net).eval()


def run(model: nn.Module, norm: nn.Module, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits, the output of `norm`: the feature map the head pools)."""
    seen = []
    hook = norm.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        out = model(torch.from_numpy(x))
    hook.remove()
    return getattr(out, "logits", out).numpy(), seen[0].numpy()


def main(official: Path, hf_port: Path) -> None:
    """official, hf_port: the checkouts of Saurabhbhati/DASS and Saurabhbhati/transformers-DASS."""
    _stand_ins(official)
    sys.path.insert(0, str(official / "src"))
    models = importlib.import_module("models")             # src/models: ast_models.DASS and its vmamba
    torch.manual_seed(0)                                   # the constructors' initialisation, overwritten below
    arrays, weights = {}, {}
    for name, (*_, (B, T)) in CONFIGS.items():
        model = official_model(models, name)
        shapes = [(k, v.shape) for k, v in model.state_dict().items()]
        weights[name] = seeded_weights(shapes)
        model.load_state_dict(weights[name], strict=True)
        x = np.random.default_rng([SEED, B, T]).standard_normal((B, T, 128)).astype(np.float32)
        logits, features = run(model, model.module.v.classifier.norm, x)
        arrays.update({f"{name}_input": x, f"{name}_logits": logits, f"{name}_features": features})
        if name == "small":
            arrays["small_keys"] = np.array([k for k, _ in shapes])
            arrays["small_shapes"] = np.array([",".join(map(str, s)) for _, s in shapes])
        else:
            torch.save(weights[name], OUT / f"dass_official_{name}.pth")

    # the port's modeling_dass.py as transformers.models.dass.modeling_dass, so its relative imports find transformers
    _module("transformers.models.dass").__path__ = [str(hf_port / "src" / "transformers" / "models" / "dass")]
    port = importlib.import_module("transformers.models.dass.modeling_dass")
    dims, depths, *_, classes, _ = CONFIGS["tiny"]
    hf = port.DASSForAudioClassification(port.DASSConfig(dims=list(dims), depths=list(depths), num_classes=classes))
    renamed = {functools.reduce(lambda k, r: k.replace(*r), HF_RENAMES, k): v for k, v in weights["tiny"].items()}
    hf.load_state_dict(renamed, strict=True)  # its DASSLinear2d reshapes the stacked x_proj / dt_projs weights
    logits, features = run(hf.eval(), hf.dass.norm, arrays["tiny_input"])  # the tests hold both to dass.py
    arrays.update({"hf_tiny_logits": logits, "hf_tiny_features": features})
    type(hf.config)._get_generation_parameters = lambda self: {}  # the port overrides this under its v4 name
    hf.save_pretrained(OUT / "dass_hf_tiny")
    np.savez_compressed(OUT / "dass_official.npz", **arrays)
    print(f"wrote {OUT}/dass_* with torch {torch.__version__}")


if __name__ == "__main__":
    main(*map(Path, sys.argv[1:]))
