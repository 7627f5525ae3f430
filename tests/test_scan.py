"""The selective scan of eqs. (3)-(6): every backend against an fp64 reference and against independent oracles
(transformers' Mamba scan, mambapy's parallel scan), values and gradients of every input.

The Triton kernels run in Triton's CPU interpreter here (tests/conftest.py sets TRITON_INTERPRET=1): small shapes
with small tiles (chunk, seg, span) so that several of each, and partial last ones, are exercised, and two cases at
the default tiles. On a machine with a GPU, `TRITON_INTERPRET=0 python -m pytest tests/test_scan.py` runs the same
tests on the compiled kernels (DEVICE).
"""
import functools
import importlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from mambapy.pscan import pscan

import scan
import triton_scan

F64 = torch.float64
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
LOW = {"u", "delta", "z", "B", "C"}  # the activations: in the input dtype; A, D, delta_bias, initial_state: fp32


def make_inputs(batch=2, dim=8, dstate=16, length=7, groups=0, opts="mamba", seed=0):
    """fp64 inputs for a scan, and its flags. groups=0: B, C are (batch, N, L); else (batch, G, N, L).

    opts: "plain" (u, delta, A, B, C only), "mamba" (+ D, z, delta_bias, softplus, last state, as the LM uses it),
    "state" (+ D, softplus, initial and last state, no bias or gate).
    """
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    bc = (batch, dstate, length) if groups == 0 else (batch, groups, dstate, length)
    t = dict(u=rnd(batch, dim, length), A=-torch.exp(rnd(dim, dstate) * 0.5),  # A = -exp(A_log), as in Mamba
             B=rnd(*bc), C=rnd(*bc))
    if opts == "plain":
        t["delta"] = 0.05 + 0.5 * torch.rand(batch, dim, length, generator=g, dtype=F64)
        return t, dict(delta_softplus=False, return_last_state=False)
    t["delta"] = rnd(batch, dim, length) - 1.0  # softplus of it: about 0.05 ... 1.5
    t["D"] = rnd(dim)
    if opts == "mamba":
        t.update(z=rnd(batch, dim, length), delta_bias=0.5 * rnd(dim))
    else:
        t["initial_state"] = rnd(batch, dim, dstate)
    return t, dict(delta_softplus=True, return_last_state=True)


def run(fn, tensors, flags, dtype=torch.float32):
    """Run fn on the inputs cast to dtype (A, D, delta_bias, initial_state stay fp32 unless dtype is fp64), backprop
    fixed random output gradients; return {name: fp64 result} for the outputs and every input's gradient."""
    inputs = {k: v.detach().to(dtype if k in LOW or dtype == F64 else torch.float32).requires_grad_()
              for k, v in tensors.items()}
    out = fn(**inputs, **flags)
    y, h = out if flags["return_last_state"] else (out, None)
    assert y.dtype == inputs["u"].dtype and y.shape == inputs["u"].shape
    g = torch.Generator().manual_seed(123)
    loss = (y.to(F64) * torch.randn(y.shape, generator=g, dtype=F64)).sum()
    res = {"y": y.detach().to(F64)}
    if h is not None:
        assert h.dtype == torch.float32 or dtype == F64
        assert h.shape == (y.shape[0], *tensors["A"].shape)
        loss = loss + (h.to(F64) * torch.randn(h.shape, generator=g, dtype=F64)).sum()
        res["last_state"] = h.detach().to(F64)
    loss.backward()
    for k, v in inputs.items():
        assert v.grad is not None and v.grad.shape == v.shape, k
        res["d" + k] = v.grad.to(F64)
    return res, inputs


def reference(tensors, flags, dtype=torch.float32):
    """The fp64 oracle: the sequential loop on fp64 copies of exactly the (rounded) inputs the backend sees."""
    rounded = {k: v.to(dtype if k in LOW else torch.float32).to(F64) for k, v in tensors.items()}
    return run(scan.selective_scan_ref, rounded, flags, F64)[0]


@functools.lru_cache(maxsize=None)
def reference_for(*case):
    """reference() of make_inputs(*case), computed once for all backends."""
    return reference(*make_inputs(*case))


def assert_all_close(got, want, rtol, atol):
    """Element-wise |got - want| <= atol * max|want| + rtol * |want|, for every output and gradient."""
    assert got.keys() == want.keys()
    for k in want:
        scale = want[k].abs().max().item() if want[k].numel() else 1.0
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=atol * scale + 1e-12, msg=lambda m: f"{k}: {m}")


def on_device(fn):
    """fn with its tensor arguments copied to DEVICE and its results copied back (autograd flows through)."""
    def wrapped(**kw):
        out = fn(**{k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
        return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()
    return wrapped


def backend_fn(backend, **tiles):
    """The scan on one backend; for "triton", tiles (chunk, seg, span) override the plan's defaults."""
    if backend == "triton" and tiles:
        def tiled(**kw):
            kw["B"], kw["C"] = scan._check(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"])  # as scan.py hands them
            return triton_scan.selective_scan(**kw, **tiles)
        return on_device(tiled)
    if backend == "triton":
        return on_device(lambda **kw: scan.selective_scan(**kw, backend=backend))
    return lambda **kw: scan.selective_scan(**kw, backend=backend)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: intra-op threads only add synchronisation (and stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# fp32 against the fp64 loop: 6x (rtol) and 200x (atol) tighter than the tolerances of mamba_ssm's tests.
FP32_TOL = dict(rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Every backend against the fp64 reference
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["ref", "torch"])
@pytest.mark.parametrize("dstate", [1, 16])
@pytest.mark.parametrize("length", [1, 7, 300])
@pytest.mark.parametrize("groups", [0, 2])
@pytest.mark.parametrize("opts", ["plain", "mamba", "state"])
def test_pytorch_backends_match_fp64(backend, dstate, length, groups, opts):
    case = (2, 8 if length < 100 else 4, dstate, length, groups, opts)
    got, _ = run(backend_fn(backend), *make_inputs(*case))
    assert_all_close(got, reference_for(*case), **FP32_TOL)


# (batch, D, N, L, groups, opts, tiles): N = 1 (DASS), 3 (padded to 4), 16 (Mamba); L = 1, odd; several chunks,
# segments (a kept state each) and spans (a parallel pass each), with partial last ones.
SMALL_TILES = [
    (2, 8, 1, 1, 0, "plain", {}),
    (1, 8, 1, 23, 2, "mamba", dict(chunk=4, seg=8, span=16)),
    (1, 8, 3, 23, 2, "state", dict(chunk=4, seg=8, span=16)),
    (2, 4, 16, 13, 0, "plain", dict(chunk=4, seg=8, span=8)),
    (1, 4, 16, 13, 2, "mamba", dict(chunk=2, seg=4, span=12)),
]
# The default tiles (plan()): N = 16 with grouped B, C and two 32-channel blocks, crossing a kept state (every 128
# steps); N = 1 crossing chunks (4 steps), kept states and spans, from an initial state.
DEFAULT_TILES = [(1, 64, 16, 130, 2, "mamba", {}), (1, 32, 1, 301, 0, "state", {})]


@pytest.mark.parametrize("batch, dim, dstate, length, groups, opts, tiles", SMALL_TILES + DEFAULT_TILES)
def test_triton_matches_fp64(batch, dim, dstate, length, groups, opts, tiles):
    tensors, flags = make_inputs(batch, dim, dstate, length, groups, opts, seed=length)
    got, _ = run(backend_fn("triton", **tiles), tensors, flags)
    assert_all_close(got, reference(tensors, flags), **FP32_TOL)


def test_default_tiles_cross_their_boundaries():
    """The DEFAULT_TILES cases exercise what they claim: the default plan, several chunks, kept states and spans."""
    for batch, dim, dstate, length, groups, _, _ in DEFAULT_TILES:
        tiles = triton_scan.plan(batch, dim, dstate, max(groups, 1), length, torch.device("cpu"))
        assert tiles.block_d == 32 and length > tiles.seg and length % tiles.chunk and length % tiles.seg
        assert length > tiles.span, tiles


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, dict(rtol=2e-2, atol=1e-2)),
                                        (torch.float16, dict(rtol=5e-3, atol=2e-3))])
@pytest.mark.parametrize("backend, dstate, length, tiles", [("torch", 16, 100, {}),
                                                            ("triton", 16, 13, dict(chunk=4, seg=8, span=8)),
                                                            ("triton", 1, 13, dict(chunk=2, seg=4, span=8))])
def test_low_precision_inputs_match_fp64(backend, dstate, length, tiles, dtype, tol):
    """bf16/fp16 u, delta, z, B, C with fp32 state arithmetic: only the rounding of y and the gradients remains."""
    tensors, flags = make_inputs(2, 4, dstate, length, groups=0, opts="mamba", seed=3)
    got, inputs = run(backend_fn(backend, **tiles), tensors, flags, dtype)
    assert inputs["u"].grad.dtype == inputs["B"].grad.dtype == dtype and inputs["A"].grad.dtype == torch.float32
    assert_all_close(got, reference(tensors, flags, dtype), **tol)


def mamba_layout(t):
    """The inputs laid out as the Mamba mixer hands them over: x (batch, D, L) contiguous; Δ and z transposes of
    (batch, L, D) tensors (z half of a wider one); B, C transposes of (batch, L, N) slices of a wider one."""
    batch, dim, length = t["u"].shape
    out = dict(t)
    out["delta"] = t["delta"].transpose(1, 2).contiguous().transpose(1, 2)
    out["z"] = torch.cat([t["z"].transpose(1, 2), t["z"].transpose(1, 2)], dim=2)[..., :dim].transpose(1, 2)
    bc = torch.cat([t["B"].transpose(1, 2), t["C"].transpose(1, 2)], dim=2)  # (batch, L, 2N), as x_proj's output
    out["B"], out["C"] = (m.transpose(1, 2) for m in bc.split(t["B"].shape[1], dim=2))
    return out


def test_triton_reads_strided_views_in_place(monkeypatch):
    """Inputs that are strided views (the Mamba mixer's transposes, and an incoming gradient laid out like y) give
    the same numbers bit for bit as contiguous ones, and none of them is copied on the way."""
    tensors, flags = make_inputs(2, 8, 4, 11, 0, opts="mamba", seed=8)
    t = {k: v.float().to(DEVICE) for k, v in tensors.items()}
    dy = torch.randn(t["u"].shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    copied = []
    contiguous = torch.Tensor.contiguous

    def recording(self, *args, **kwargs):
        if not self.is_contiguous():
            copied.append(tuple(self.shape))
        return contiguous(self, *args, **kwargs)

    def outputs_and_grads(inputs, dy):
        leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
        y, h = backend_fn("triton", chunk=4, seg=8, span=8)(**leaves, **flags)
        y.backward(dy)
        return y, [y, h] + [leaves[k].grad for k in sorted(leaves)]

    _, plain = outputs_and_grads(t, dy)
    strided = mamba_layout(t)
    assert not any(strided[k].is_contiguous() for k in ("delta", "z", "B", "C"))
    dy_strided = dy.transpose(1, 2).contiguous().transpose(1, 2)               # what out_proj's backward hands back
    monkeypatch.setattr(torch.Tensor, "contiguous", recording)
    y, views = outputs_and_grads(strided, dy_strided)
    assert copied == []
    assert y.stride() == strided["delta"].stride()  # y is laid out like Δ: (batch, L, D), what out_proj reads
    for a, b in zip(plain, views):
        assert torch.equal(a, b)


def test_triton_inference_keeps_nothing():
    """Without autograd no state is kept; the numbers are those of the autograd path."""
    tensors, flags = make_inputs(1, 8, 16, 19, 0, opts="state", seed=8)
    t = {k: v.float().to(DEVICE) for k, v in tensors.items()}
    fn = backend_fn("triton", chunk=4, seg=8, span=8)
    saved = []
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        y, h = fn(**t, **flags)
    y2, h2 = fn(**{k: v.clone().requires_grad_() for k, v in t.items()}, **flags)
    assert saved == [] and torch.equal(y, y2.detach()) and torch.equal(h, h2.detach())


def test_triton_training_memory_is_an_eighth_of_u():
    """With gradients, the autograd node keeps its inputs and one state per 128 steps, nothing per step: at the
    default tiles and N = 16, the bytes kept beyond the inputs are below 1/8 of u's in fp32 (mamba_ssm keeps one
    state per 2048 steps; a state per 8 steps would be 2x u)."""
    batch, dim, dstate, length = 1, 32, 16, 130
    tensors, flags = make_inputs(batch, dim, dstate, length, opts="mamba")
    inputs = {k: v.float().to(DEVICE).requires_grad_() for k, v in tensors.items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        scan.selective_scan(**inputs, **flags, backend="triton")
    given = {v.data_ptr() for v in inputs.values()}
    beyond = sum(x.numel() * x.element_size() for x in saved if x.data_ptr() not in given)
    assert 0 < beyond <= inputs["u"].numel() * 4 / 8, beyond  # (batch, L / 128 - 1, N, D) fp32: one state here


def test_torch_backend_gradcheck():
    """Autograd through the chunked fallback (several chunks, a partial last one) against finite differences."""
    tensors, flags = make_inputs(batch=1, dim=2, dstate=3, length=5, groups=0, opts="mamba", seed=1)
    tensors["initial_state"] = torch.randn(1, 2, 3, dtype=F64)
    names = list(tensors)

    def fn(*args):
        y, h = scan._scan_chunked(**dict(zip(names, args)), **flags, chunk=2)
        return y, h

    assert torch.autograd.gradcheck(fn, [tensors[k].clone().requires_grad_() for k in names])
    grouped, flags = make_inputs(batch=1, dim=4, dstate=2, length=3, groups=2, opts="plain", seed=2)
    names = list(grouped)
    assert torch.autograd.gradcheck(lambda *a: scan.selective_scan(**dict(zip(names, a)), **flags, backend="torch"),
                                    [grouped[k].clone().requires_grad_() for k in names])


# ----------------------------------------------------------------------------------------------------------------
# Independent oracles
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["ref", "torch", "triton"])
def test_matches_transformers_scan(backend):
    """transformers' `mamba_selective_scan` (its PyTorch loop; ungrouped B, C), values and autograd gradients.
    Imported here: an older transformers (without it) must not stop this file's other tests from running."""
    from transformers.models.mamba.modeling_mamba import mamba_selective_scan
    tensors, flags = make_inputs(2, 4, 16, 19, groups=0, opts="mamba", seed=7)
    want, _ = run(lambda u, delta, **kw: mamba_selective_scan(u, delta, **kw), tensors, flags, F64)
    got, _ = run(backend_fn(backend, **(dict(chunk=4, seg=8, span=8) if backend == "triton" else {})), tensors,
                 flags)
    assert_all_close(got, want, **FP32_TOL)


def _mambapy_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    """The scan with mambapy's parallel scan for eq. (5); eqs. (3), (4), (6) written out here."""
    dt = delta + delta_bias[:, None]
    dt = F.softplus(dt) if delta_softplus else dt                          # (batch, D, L)
    a = torch.exp(dt.transpose(1, 2)[..., None] * A)                       # (batch, L, D, N), mambapy's layout
    x = (dt * u).transpose(1, 2)[..., None] * B.permute(0, 2, 1)[:, :, None, :]
    hs = pscan(a, x)                                                       # h_t = a_t h_{t-1} + x_t
    y = (hs * C.permute(0, 2, 1)[:, :, None, :]).sum(-1).transpose(1, 2) + D[:, None] * u
    y = y * F.silu(z)
    return (y, hs[:, -1]) if return_last_state else y


@pytest.mark.parametrize("backend", ["ref", "torch", "triton"])
@pytest.mark.parametrize("length", [1, 13])
def test_matches_mambapy_pscan(backend, length):
    """mambapy's Blelloch scan and its hand-written backward (pads L to a power of two)."""
    tensors, flags = make_inputs(2, 4, 4, length, groups=0, opts="mamba", seed=11)
    want, _ = run(_mambapy_scan, tensors, flags, F64)
    got, _ = run(backend_fn(backend, **(dict(chunk=2, seg=4, span=8) if backend == "triton" else {})), tensors,
                 flags)
    assert_all_close(got, want, **FP32_TOL)


# ----------------------------------------------------------------------------------------------------------------
# The decode step
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dstate, groups", [(16, 0), (3, 2), (1, 4)])
def test_decode_steps_equal_full_scan(backend, dstate, groups):
    """selective_state_update applied L times from an initial state = the scan's y and last state."""
    batch, dim, length = 2, 40, 6  # 40 channels: two tiles of 32, the second partial
    tensors, flags = make_inputs(batch, dim, dstate, length, groups, opts="mamba", seed=5)
    h0 = torch.randn(batch, dim, dstate, dtype=F64)
    y_ref, h_ref = scan.selective_scan_ref(**tensors, **flags, initial_state=h0)
    device = DEVICE if backend == "triton" else "cpu"
    t = {k: v.float().to(device) for k, v in tensors.items()}
    state = h0.float().to(device)
    ys = [scan.selective_state_update(state, t["u"][..., i], t["delta"][..., i], t["A"], t["B"][..., i],
                                       t["C"][..., i], D=t["D"], z=t["z"][..., i], dt_bias=t["delta_bias"],
                                       dt_softplus=True, backend=backend) for i in range(length)]
    assert all(y.dtype == torch.float32 and y.shape == (batch, dim) for y in ys)
    want = dict(y=y_ref, last_state=h_ref)
    assert_all_close(dict(y=torch.stack(ys, -1).cpu().to(F64), last_state=state.cpu().to(F64)), want, **FP32_TOL)


def test_triton_decode_low_precision():
    """bf16 x, dt, z, B, C: y comes back in bf16; the fp32 state matches the fp64 step."""
    tensors, flags = make_inputs(2, 32, 16, 1, 0, opts="mamba", seed=9)
    t = {k: (v.bfloat16() if k in LOW else v.float()).to(DEVICE) for k, v in tensors.items()}
    state = torch.randn(2, 32, 16).to(DEVICE)
    y_ref, h_ref = scan.selective_scan_ref(**{k: v.double().cpu() for k, v in t.items()}, **flags,
                                            initial_state=state.double().cpu())
    y = scan.selective_state_update(state, t["u"][..., 0], t["delta"][..., 0], t["A"], t["B"][..., 0],
                                    t["C"][..., 0], D=t["D"], z=t["z"][..., 0], dt_bias=t["delta_bias"],
                                    dt_softplus=True, backend="triton")
    assert y.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert_all_close(dict(y=y.double().cpu(), h=state.double().cpu()), dict(y=y_ref[..., 0], h=h_ref),
                     rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------------------------------------------
# Long sequences, errors, import
# ----------------------------------------------------------------------------------------------------------------

def test_torch_fallback_long_sequence_is_stable():
    """L = 20000 with decays exp(Δ A) that underflow to 0 (Δ|A| up to ~200): finite, equal to the fp64 loop; and
    splitting the sequence in two with initial_state gives the same result."""
    batch, dim, dstate, length = 1, 2, 2, 20000
    g = torch.Generator().manual_seed(4)
    t = dict(u=torch.randn(batch, dim, length, generator=g), delta=4.0 * torch.rand(batch, dim, length, generator=g),
             A=torch.tensor([[-0.01, -50.0], [-1.0, -5.0]]), B=torch.randn(batch, dstate, length, generator=g),
             C=torch.randn(batch, dstate, length, generator=g))
    assert (t["delta"][0, :, :, None] * t["A"][:, None, :]).min() < -150  # exp() of it is 0 in fp32
    y, h = scan.selective_scan(**t, return_last_state=True, backend="torch")
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    y_ref, h_ref = scan.selective_scan_ref(**{k: v.double() for k, v in t.items()}, return_last_state=True)
    assert_all_close(dict(y=y.double(), h=h.double()), dict(y=y_ref, h=h_ref), **FP32_TOL)
    half = length // 2
    first = {k: (v[..., :half] if v.dim() == 3 else v) for k, v in t.items()}
    second = {k: (v[..., half:] if v.dim() == 3 else v) for k, v in t.items()}
    y1, h1 = scan.selective_scan(**first, return_last_state=True, backend="torch")
    y2, h2 = scan.selective_scan(**second, return_last_state=True, backend="torch", initial_state=h1)
    assert_all_close(dict(y=torch.cat([y1, y2], -1).double(), h=h2.double()), dict(y=y_ref, h=h_ref), **FP32_TOL)


@pytest.mark.parametrize("backend", ["ref", "torch", "triton"])
@pytest.mark.parametrize("name, bad", [("delta", lambda t: t["delta"][..., :-1]), ("A", lambda t: t["A"][:-1]),
                                       ("B", lambda t: t["B"][:, :-1]), ("C", lambda t: t["C"][..., :-1]),
                                       ("B", lambda t: torch.zeros(2, 3, 16, 7)),
                                       ("groups", lambda t: t["B"][:, None].expand(2, 2, 16, 7))])  # C: 1 group
def test_wrong_shapes_name_the_argument(backend, name, bad):
    tensors, flags = make_inputs(2, 8, 16, 7, opts="plain")
    tensors["B" if name == "groups" else name] = bad(tensors)
    with pytest.raises(ValueError, match=name):
        scan.selective_scan(**{k: v.float() for k, v in tensors.items()}, **flags, backend=backend)


@pytest.mark.parametrize("backend", ["ref", "torch", "triton"])
@pytest.mark.parametrize("name, shape", [("D", (7,)), ("D", (1,)), ("z", (2, 8, 6)), ("z", (2, 1, 7)),
                                         ("delta_bias", (8, 1)), ("delta_bias", (1,)), ("initial_state", (2, 8, 15)),
                                         ("initial_state", (2, 8, 1)), ("initial_state", (8, 16))])
def test_wrong_optional_shapes_name_the_argument(backend, name, shape):
    """No backend may broadcast a wrongly shaped optional input silently."""
    tensors, flags = make_inputs(2, 8, 16, 7, opts="plain")
    tensors[name] = torch.zeros(shape)
    with pytest.raises(ValueError, match=name):
        scan.selective_scan(**{k: v.float() for k, v in tensors.items()}, **flags, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name, shape", [("state", (2, 8, 15)), ("state", (8, 16)), ("dt", (2, 7)), ("x", (2, 8, 1)),
                                         ("A", (9, 16)), ("B", (2, 3, 16)), ("C", (2, 15)), ("z", (2, 9)), ("D", (9,)),
                                         ("dt_bias", (1,))])
def test_decode_wrong_shapes_name_the_argument(backend, name, shape):
    args = dict(state=torch.zeros(2, 8, 16), x=torch.zeros(2, 8), dt=torch.zeros(2, 8), A=-torch.ones(8, 16),
                B=torch.zeros(2, 16), C=torch.zeros(2, 16))
    args[name] = torch.zeros(shape)
    with pytest.raises(ValueError, match=name):
        scan.selective_state_update(**args, backend=backend)


def test_triton_rejects_fp64_empty_and_non_fp32_state():
    tensors, flags = make_inputs(1, 2, 2, 3, opts="plain")
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        scan.selective_scan(**tensors, **flags, backend="triton")
    with pytest.raises(ValueError, match="at least one time step"):
        scan.selective_scan(**{k: (v[..., :0] if v.dim() == 3 else v).float() for k, v in tensors.items()}, **flags,
                            backend="triton")
    with pytest.raises(ValueError, match="state must be a contiguous float32"):
        scan.selective_state_update(torch.zeros(1, 2, 2, dtype=torch.bfloat16), torch.zeros(1, 2),
                                    torch.zeros(1, 2), -torch.ones(2, 2), torch.zeros(1, 2), torch.zeros(1, 2),
                                    backend="triton")


def test_every_launch_is_on_the_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: every launch (forward, backward, decode step) is made under the
    tensors' device, so that tensors on cuda:1 work whichever device is current."""
    assert isinstance(triton_scan._on(torch.device("cuda", 1)), torch.cuda.device)
    assert triton_scan._on(torch.device("cuda", 1)).idx == 1
    entered = []
    on = triton_scan._on
    monkeypatch.setattr(triton_scan, "_on", lambda device: entered.append(device) or on(device))
    tensors, flags = make_inputs(1, 4, 2, 5, opts="state")
    t = {k: v.float().to(DEVICE).requires_grad_() for k, v in tensors.items()}
    y, h = scan.selective_scan(**t, **flags, backend="triton")
    (y.sum() + h.sum()).backward()
    state = torch.zeros(1, 4, 2, device=DEVICE)
    scan.selective_state_update(state, t["u"][..., 0], t["delta"][..., 0], t["A"], t["B"][..., 0], t["C"][..., 0],
                                backend="triton")
    assert entered == [t["u"].device] * 3


def test_import_without_triton_says_what_is_missing(monkeypatch):
    monkeypatch.delitem(sys.modules, "triton_scan")
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    with pytest.raises(ImportError, match="Triton scan backend .* needs the triton package"):
        importlib.import_module("triton_scan")


def test_triton_kernels_compile_for_an_h100():
    """Beyond the interpreter: Triton's compiler and ptxas turn every kernel variant the models launch (Mamba's and
    DASS's tiles and strides; forward, backward, their span passes, decode step) into a cubin for sm_90, with no GPU
    needed; and the forward is what its design says: no shared memory (so no layout conversions), no spills."""
    tool = os.path.join(os.path.dirname(__file__), "..", "tools", "compile_kernels.py")
    run = subprocess.run([sys.executable, tool, "--arch", "90", "--dtypes", "bf16", "--quick"], capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {cells[0]: cells[2:5] for cells in ([c.strip() for c in line.strip("|").split("|")]
                                                 for line in run.stdout.splitlines()) if cells[1:2] == ["bf16"]}
    assert len(rows) == 12, run.stdout  # Mamba (B, C two layouts) 7 kernels, DASS 5
    for kernel in ("Mamba B, C views: forward", "Mamba B, C contiguous: forward", "DASS: forward"):
        registers, stack, shared = rows[kernel]
        assert int(registers) <= 255 and stack == "0" and shared == "0", (kernel, rows[kernel])
