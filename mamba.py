"""Mamba: the selective state-space model of the paper's §III-A and the Mamba language model built on it.

Glossary (code name -> paper symbol, eqs. (1)-(6)):
    u       x_t      the input sequence, one scalar sequence per channel       (batch, D, L)
    delta   Δ_t      the time step; selective: it depends on the input         (batch, D, L)
    A       A        the (diagonal) evolution matrix, one row per channel     (D, N), negative
    B, C    B_t, C_t the input and output projections; selective              (batch, N, L) or (batch, G, N, L)
    dA      Ā_t      exp(Δ_t A), eq. (3)
    dBu     B̄_t x_t  Δ_t B_t x_t, eq. (4) in its Euler form (see below)
    h       h_t      the hidden state                                          (batch, D, N)
    D       D        the skip connection y_t += D x_t (not in the paper's equations; every Mamba has it)
    z       z        the gate y_t *= silu(z_t) of the Mamba block
    N       N        the state size (16 in Mamba-2.8B, 1 in DASS)

Eq. (4) is B̄ = (ΔA)^-1 (exp(ΔA) - I) ΔB (zero-order hold). Mamba (the official kernels, transformers, VMamba and so
DASS) uses the simpler Euler step B̄ = ΔB for B while keeping exp(ΔA) for A; the pretrained weights were trained with
that, so this code uses it too.

The scan has three implementations that compute the same thing:
    selective_scan_ref   the sequential loop of eqs. (3)-(6): slow, plain, the oracle;
    _scan_chunked        the PyTorch fallback: a parallel scan inside fixed-size chunks, state carried between them;
    triton_scan          Triton kernels (forward, backward, decode step) for CUDA tensors (module triton_scan.py).
`selective_scan` picks one; `selective_state_update` is the one-token step used when generating.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


# ----------------------------------------------------------------------------------------------------------------
# The selective scan, eqs. (3)-(6)
# ----------------------------------------------------------------------------------------------------------------

def _prepare(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, delta_bias: Tensor | None,
             delta_softplus: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Check shapes; return Δ in fp32 (bias and softplus applied) and B, C expanded per channel: (batch, D, N, L)."""
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (batch, D, L); got {tuple(u.shape)} and {tuple(delta.shape)}")
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (D, N) with D = {dim}; got {tuple(A.shape)}")
    dstate = A.shape[1]
    delta = delta.to(_state_dtype(u))
    if delta_bias is not None:
        delta = delta + delta_bias.to(delta.dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)  # softplus(x) = log(1 + e^x), linear above 20 like the kernels
    B, C = (_per_channel(M, name, batch, dim, dstate, length).to(delta.dtype) for M, name in ((B, "B"), (C, "C")))
    return delta, B, C, dstate


def _state_dtype(u: Tensor) -> torch.dtype:
    """State arithmetic is fp32 for fp16/bf16/fp32 inputs, fp64 for fp64 inputs (the ref is then an fp64 oracle)."""
    return torch.promote_types(u.dtype, torch.float32)


def _per_channel(M: Tensor, name: str, batch: int, dim: int, dstate: int, length: int) -> Tensor:
    """(batch, N, L) or grouped (batch, G, N, L) -> a (batch, D, N, L) view or copy, fp32."""
    if M.dim() == 3:
        M = M.unsqueeze(1)
    if M.dim() != 4 or M.shape[0] != batch or M.shape[2:] != (dstate, length) or dim % M.shape[1]:
        raise ValueError(f"{name} must be (batch, N, L) or (batch, G, N, L) with batch={batch}, N={dstate}, "
                         f"L={length} and G dividing D={dim}; got {tuple(M.shape)}")
    groups = M.shape[1]
    if groups == 1:
        return M.expand(batch, dim, dstate, length)  # a view: every channel reads the same B_t
    M = M.unsqueeze(2).expand(batch, groups, dim // groups, dstate, length)  # group g drives D/G channels
    return M.reshape(batch, dim, dstate, length)


def _finish(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    """y + D·u, then the gate y·silu(z); state-precision arithmetic, result in u's dtype."""
    if D is not None:
        y = y + D.to(y.dtype).view(-1, *[1] * (u.dim() - 2)) * u.to(y.dtype)  # D per channel (dim 1)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(u.dtype)


def selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                       z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                       return_last_state: bool = False, backend: str | None = None,
                       initial_state: Tensor | None = None):
    """The selective scan as the paper writes it: one step of eqs. (3)-(6) per time step.

    u, delta, z: (batch, D, L); A: (D, N); B, C: (batch, N, L) or (batch, G, N, L); D, delta_bias: (D,);
    initial_state: (batch, D, N) or None for h_0 = 0.
    Returns y (batch, D, L) in u's dtype, and the last state h_L (batch, D, N) if return_last_state;
    the state is kept in fp32 (fp64 for fp64 inputs).
    `backend` is accepted (and ignored) so that every implementation takes the same arguments.
    """
    delta, B, C, dstate = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    batch, dim, length = u.shape
    h = delta.new_zeros(batch, dim, dstate) if initial_state is None else initial_state.to(delta.dtype)
    A, x = A.to(delta.dtype), u.to(delta.dtype)
    ys = []
    for t in range(length):
        dA = torch.exp(delta[:, :, t, None] * A)                   # eq. (3)  Ā = exp(ΔA)          (batch, D, N)
        dBu = delta[:, :, t, None] * B[..., t] * x[:, :, t, None]  # eq. (4)  B̄x = ΔB x (Euler)    (batch, D, N)
        h = dA * h + dBu                                           # eq. (5)  h_t = Ā h_{t-1} + B̄ x_t
        ys.append((h * C[..., t]).sum(-1))                         # eq. (6)  y_t = C h_t          (batch, D)
    y = _finish(torch.stack(ys, dim=-1) if ys else x.new_zeros(batch, dim, 0), u, D, z)
    return (y, h) if return_last_state else y


def _scan_chunked(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                  z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                  return_last_state: bool = False, initial_state: Tensor | None = None, chunk: int = 64):
    """The PyTorch fallback: same arguments and results as `selective_scan_ref`, differentiable by autograd.

    Eq. (5) is a linear recurrence h_t = a_t h_{t-1} + b_t, and pairs (a, b) compose associatively:
    (a1, b1) then (a2, b2) = (a2 a1, a2 b1 + b2). Inside each chunk of `chunk` steps a Hillis-Steele scan combines
    them in log2(chunk) vectorised rounds; the state at the chunk's end is carried into the next one. Only products
    of the decays a_t = exp(Δ_t A) <= 1 appear, never their inverses, so nothing overflows however long L is.
    Memory: one chunk's (batch, D, N, chunk) at a time (plus what autograd keeps).
    """
    delta, B, C, dstate = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    batch, dim, length = u.shape
    h = delta.new_zeros(batch, dim, dstate) if initial_state is None else initial_state.to(delta.dtype)
    A, x = A.to(delta.dtype), u.to(delta.dtype)
    ys = []
    for s in range(0, length, chunk):
        dt = delta[:, :, None, s:s + chunk]                        # (batch, D, 1, T)
        a = torch.exp(dt * A[:, :, None])                          # eq. (3)               (batch, D, N, T)
        b = dt * B[..., s:s + chunk] * x[:, :, None, s:s + chunk]  # eq. (4), Euler form   (batch, D, N, T)
        step = 1
        while step < a.shape[-1]:                                  # inclusive scan of eq. (5) with h_0 = 0
            b = torch.cat([b[..., :step], a[..., step:] * b[..., :-step] + b[..., step:]], dim=-1)
            a = torch.cat([a[..., :step], a[..., step:] * a[..., :-step]], dim=-1)
            step *= 2
        hs = b + a * h[..., None]                                  # add the carried state: h_t for t in the chunk
        ys.append((hs * C[..., s:s + chunk]).sum(2))               # eq. (6)               (batch, D, T)
        h = hs[..., -1]
    y = _finish(torch.cat(ys, dim=-1) if ys else x.new_zeros(batch, dim, 0), u, D, z)
    return (y, h) if return_last_state else y


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False, backend: str | None = None,
                   initial_state: Tensor | None = None):
    """The selective scan of eqs. (3)-(6), as in `selective_scan_ref`, on the fastest available implementation.

    backend: None picks "triton" for CUDA tensors and "torch" (the chunked fallback) otherwise; "ref", "torch" and
    "triton" force one ("triton" on CPU tensors needs TRITON_INTERPRET=1 set before triton_scan is imported).
    """
    if backend is None:
        backend = "triton" if u.is_cuda else "torch"
    args = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                return_last_state=return_last_state, initial_state=initial_state)
    if backend == "ref":
        return selective_scan_ref(u, delta, A, B, C, **args)
    if backend == "torch":
        return _scan_chunked(u, delta, A, B, C, **args)
    if backend == "triton":
        import triton_scan
        return triton_scan.selective_scan(u, delta, A, B, C, **args)
    raise ValueError(f"unknown scan backend {backend!r}; use None, 'ref', 'torch' or 'triton'")


def selective_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Tensor | None = None, z: Tensor | None = None, dt_bias: Tensor | None = None,
                           dt_softplus: bool = False, backend: str | None = None) -> Tensor:
    """One time step of the scan for a whole layer, for decoding: eqs. (3)-(6) at a single t.

    state: (batch, D, N) fp32, updated in place; x, dt, z: (batch, D); A: (D, N); B, C: (batch, N) or
    (batch, G, N); D, dt_bias: (D,). Returns y (batch, D) in x's dtype.
    """
    if backend is None:
        backend = "triton" if x.is_cuda else "torch"
    if backend == "triton":
        import triton_scan
        return triton_scan.selective_state_update(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias,
                                                  dt_softplus=dt_softplus)
    if backend != "torch":
        raise ValueError(f"unknown decode backend {backend!r}; use None, 'torch' or 'triton'")
    batch, dim, dstate = state.shape
    dt, B, C = (t.unsqueeze(-1) for t in (dt, B, C))  # the scan's shapes with L = 1
    dt, B, C, _ = _prepare(x.unsqueeze(-1), dt, A, B, C, dt_bias, dt_softplus)
    dA = torch.exp(dt * A.to(dt.dtype))                       # eq. (3)   (batch, D, N)
    dBx = dt * B[..., 0] * x.to(dt.dtype)[:, :, None]         # eq. (4)   Euler form
    state.copy_(dA * state + dBx)                             # eq. (5)
    y = (state.to(dt.dtype) * C[..., 0]).sum(-1)              # eq. (6)   (batch, D)
    return _finish(y, x, D, z)
