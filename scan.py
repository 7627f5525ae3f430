"""The selective scan: the state-space model of the paper's §III-A, eqs. (1)-(6), shared by Mamba and DASS.

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
    _scan_chunked        the PyTorch fallback: eqs. (3), (4), (6) on many t at once, eq. (5) in ~sqrt(L) chunks;
    triton_scan          Triton kernels (forward, backward, decode step) for CUDA tensors (module triton_scan.py).
`selective_scan` picks one; `selective_state_update` is the one-token step used when generating.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# ----------------------------------------------------------------------------------------------------------------
# The selective scan, eqs. (3)-(6)
# ----------------------------------------------------------------------------------------------------------------

def _check(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
           z: Tensor | None = None, delta_bias: Tensor | None = None,
           initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Every backend's shape checks (loud, naming the argument); return B and C as (batch, G, N, L) views."""
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (batch, D, L); got {tuple(u.shape)} and {tuple(delta.shape)}")
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (D, N) with D = {dim}; got {tuple(A.shape)}")
    dstate = A.shape[1]
    for name, t, shape in (("D", D, (dim,)), ("delta_bias", delta_bias, (dim,)), ("z", z, tuple(u.shape)),
                           ("initial_state", initial_state, (batch, dim, dstate))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}; got {tuple(t.shape)}")
    B, C = _grouped(B, "B", batch, dim, dstate, length), _grouped(C, "C", batch, dim, dstate, length)
    if B.shape[1] != C.shape[1]:
        raise ValueError(f"B and C must have the same number of groups; got {B.shape[1]} and {C.shape[1]}")
    return B, C


def _check_step(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                z: Tensor | None, dt_bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """`selective_state_update`'s checks, naming its arguments; return B and C as (batch, G, N) views."""
    if x.dim() != 2:
        raise ValueError(f"x must be (batch, D); got {tuple(x.shape)}")
    batch, dim = x.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (D, N) with D = {dim}; got {tuple(A.shape)}")
    for name, t, shape in (("dt", dt, (batch, dim)), ("z", z, (batch, dim)), ("D", D, (dim,)),
                           ("dt_bias", dt_bias, (dim,)), ("state", state, (batch, dim, A.shape[1]))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}; got {tuple(t.shape)}")
    B, C = _check(x.unsqueeze(-1), dt.unsqueeze(-1), A, B.unsqueeze(-1), C.unsqueeze(-1))
    return B[..., 0], C[..., 0]


def _prepare(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, delta_bias: Tensor | None,
             delta_softplus: bool, D: Tensor | None = None, z: Tensor | None = None,
             initial_state: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, int]:
    """Check shapes; return Δ in state precision (bias and softplus applied) and B, C as (batch, G, N, L) in it."""
    B, C = _check(u, delta, A, B, C, D, z, delta_bias, initial_state)
    delta = delta.to(_state_dtype(u))
    if delta_bias is not None:
        delta = delta + delta_bias.to(delta.dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)  # softplus(x) = log(1 + e^x), linear above 20 like the kernels
    return delta, B.to(delta.dtype), C.to(delta.dtype), A.shape[1]


def _state_dtype(u: Tensor) -> torch.dtype:
    """State arithmetic is fp32 for fp16/bf16/fp32 inputs, fp64 for fp64 inputs (the ref is then an fp64 oracle)."""
    return torch.promote_types(u.dtype, torch.float32)


def _grouped(M: Tensor, name: str, batch: int, dim: int, dstate: int, length: int) -> Tensor:
    """Check B or C: (batch, N, L) or grouped (batch, G, N, L), G dividing D; return it as (batch, G, N, L)."""
    if M.dim() == 3:
        M = M.unsqueeze(1)
    if M.dim() != 4 or M.shape[0] != batch or M.shape[2:] != (dstate, length) or dim % M.shape[1]:
        raise ValueError(f"{name} must be (batch, N, L) or (batch, G, N, L) with batch={batch}, N={dstate}, "
                         f"L={length} and G dividing D={dim}; got {tuple(M.shape)}")
    return M


def _per_channel(M: Tensor, dim: int) -> Tensor:
    """(batch, G, N, L) -> (batch, D, N, L): group g drives channels g·D/G ... (g+1)·D/G - 1."""
    batch, groups, dstate, length = M.shape
    return M.unsqueeze(2).expand(batch, groups, dim // groups, dstate, length).reshape(batch, dim, dstate, length)


def _finish(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    """y + D·u, then the gate y·silu(z); state-precision arithmetic, result in u's dtype."""
    if D is not None:
        y = y + D.to(y.dtype).view(-1, *[1] * (u.dim() - 2)) * u.to(y.dtype)  # D per channel (dim 1)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(u.dtype)


def selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                       z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                       return_last_state: bool = False, initial_state: Tensor | None = None):
    """The selective scan as the paper writes it: one step of eqs. (3)-(6) per time step.

    u, delta, z: (batch, D, L); A: (D, N); B, C: (batch, N, L) or (batch, G, N, L); D, delta_bias: (D,);
    initial_state: (batch, D, N) or None for h_0 = 0.
    Returns y (batch, D, L) in u's dtype, and the last state h_L (batch, D, N) if return_last_state;
    the state is kept in fp32 (fp64 for fp64 inputs).
    """
    delta, B, C, dstate = _prepare(u, delta, A, B, C, delta_bias, delta_softplus, D, z, initial_state)
    batch, dim, length = u.shape
    B, C = _per_channel(B, dim), _per_channel(C, dim)              # (batch, D, N, L)
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


def _scan_recurrence_(a: Tensor, b: Tensor, h0: Tensor, reverse: bool = False, chunk: int | None = None) -> None:
    """Solve h_t = a_t h_{t-1} + b_t (eq. (5)) in place of b, from h_{-1} = h0.

    a, b: (L, M), time-major and contiguous; h0: (M,). reverse=True runs backwards in time: h_t = a_t h_{t+1} + b_t
    from h_L = h0 (the adjoint recurrence of the backward pass). All L steps are sequential, but they are cut into
    ~sqrt(L) chunks of T steps and every chunk takes its step t at once, in three passes:
      1. each chunk's end state from a zero start, and the chunk's decay prod(a_t) over its T steps;
      2. the state entering each chunk, carried chunk to chunk (L/T small steps);
      3. the chunks again, in place, now started from their true entering state.
    So 2T + L/T vectorised steps (3·sqrt(L) by default) instead of L. Only products of decays a_t = exp(Δ_t A) <= 1
    appear, never their inverses, so nothing overflows however long L is. Rows past the last whole chunk run one by
    one.
    """
    length, width = a.shape
    T = chunk or max(1, math.isqrt(length))
    chunks = length // T
    main = chunks * T
    rows = range(length - main, length) if reverse else range(main)  # the rows in whole chunks
    av = a[rows.start:rows.stop].view(chunks, T, width)
    bv = b[rows.start:rows.stop].view(chunks, T, width)
    steps = range(T - 1, -1, -1) if reverse else range(T)
    h = h0
    if chunks:
        end = bv[:, steps[0]]                                      # pass 1          (chunks, M)
        for t in steps[1:]:
            end = torch.addcmul(bv[:, t], av[:, t], end)
        decay = av.prod(1)                                         # (chunks, M)
        enter = b.new_empty(chunks, width)                         # pass 2
        for c in (range(chunks - 1, -1, -1) if reverse else range(chunks)):
            enter[c] = h
            h = torch.addcmul(end[c], decay[c], h)
        prev = enter                                               # pass 3
        for t in steps:
            bv[:, t].addcmul_(av[:, t], prev)
            prev = bv[:, t]
    for t in (range(length - main - 1, -1, -1) if reverse else range(main, length)):
        b[t].addcmul_(a[t], h)                                     # the leftover rows
        h = b[t]


class _Recurrence(torch.autograd.Function):
    """Eqs. (4)-(5) for all t: b_t = (Δ_t x_t) B_t, then h_t = a_t h_{t-1} + b_t from h0, with a hand-written
    backward (autograd through the in-place passes would keep every step).
    a: (L, batch, G, D/G, N); dtx: (L, batch, G, D/G, 1); B: (L, batch, G, 1, N); h0: (batch, D, N).
    Returns hs, every h_t: (L, batch, G, D/G, N)."""

    @staticmethod
    def forward(ctx, a: Tensor, dtx: Tensor, B: Tensor, h0: Tensor, chunk: int | None) -> Tensor:
        hs = dtx * B                                               # eq. (4)  B̄_t x_t = Δ_t B_t x_t
        width = h0.numel()                                         # batch · D · N
        _scan_recurrence_(a.view(-1, width), hs.view(-1, width), h0.reshape(width), chunk=chunk)  # eq. (5)
        ctx.chunk = chunk
        ctx.save_for_backward(a, dtx, B, h0, hs)
        return hs

    @staticmethod
    def backward(ctx, grad_hs: Tensor):
        a, dtx, B, h0, hs = ctx.saved_tensors
        length = len(a)
        g = grad_hs.contiguous().clone()  # becomes g_t = dL/dh_t in total: g_t = grad_t + a_{t+1} g_{t+1}
        flat = g.view(length, h0.numel())
        _scan_recurrence_(a[1:].view(length - 1, flat.shape[1]), flat[:-1], flat[-1], reverse=True, chunk=ctx.chunk)
        grad_a = torch.empty_like(a)      # dL/da_t = g_t h_{t-1}
        torch.mul(g[1:], hs[:-1], out=grad_a[1:])
        torch.mul(g[:1], h0.view(a.shape[1:]), out=grad_a[:1])
        grad_dtx = grad_B = grad_h0 = None
        if ctx.needs_input_grad[1]:       # dL/d(Δx)_t = Σ_n g_t B_t
            grad_dtx = (g @ B.transpose(-1, -2))
        if ctx.needs_input_grad[2]:       # dL/dB_t = Σ_channels g_t (Δx)_t
            grad_B = (dtx.transpose(-1, -2) @ g)
        if ctx.needs_input_grad[3]:
            grad_h0 = (a[0] * g[0]).view(h0.shape)
        return grad_a, grad_dtx, grad_B, grad_h0, None


def _scan_chunked(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                  z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                  return_last_state: bool = False, initial_state: Tensor | None = None, chunk: int | None = None,
                  block: int = 1 << 20):
    """The PyTorch fallback: same arguments and results as `selective_scan_ref`, differentiable.

    Everything is laid out time-major, (L, batch, G, D/G, N), so that one time step is one contiguous block.
    The sequence is cut into blocks of about `block` state numbers (a few MB, so that a block stays in cache),
    the state carried from block to block. In a block, eqs. (3), (4) and (6) are elementwise over all its steps;
    eq. (5), the only sequential part, is `_scan_recurrence_` (chunks of `chunk` steps, default ~sqrt(steps)).
    For backward, autograd keeps each block's Ā_t and h_t: 2 · batch · D · N · L numbers in all.
    """
    delta, B, C, dstate = _prepare(u, delta, A, B, C, delta_bias, delta_softplus, D, z, initial_state)
    batch, dim, length = u.shape
    groups = B.shape[1]
    shape = (length, batch, groups, dim // groups, dstate)
    time_major = lambda t: t.reshape(-1, length).t().contiguous().view(length, *t.shape[:-1])  # noqa: E731
    dt = time_major(delta).view(*shape[:4], 1)                                 # (L, batch, G, D/G, 1)
    dtx = time_major(delta * u.to(delta.dtype)).view(*shape[:4], 1)
    B, C = time_major(B).unsqueeze(3), time_major(C)                           # (L, batch, G, 1, N), (L, batch, G, N)
    A = A.to(delta.dtype).view(*shape[2:])                                    # (G, D/G, N)
    h = delta.new_zeros(batch, dim, dstate) if initial_state is None else initial_state.to(delta.dtype)
    steps = max(1, block // h.numel())                                         # time steps per block
    ys = []
    for s in range(0, length, steps):                                          # blocks of time, state carried
        t = slice(s, s + steps)
        a = (dt[t] * A).exp_()                                                 # eq. (3)  Ā_t = exp(Δ_t A)
        hs = _Recurrence.apply(a, dtx[t], B[t], h, chunk)                      # eqs. (4), (5) for every t
        ys.append(torch.bmm(hs.view(-1, dim // groups, dstate), C[t].reshape(-1, dstate, 1)))  # eq. (6)
        h = hs[-1].view(batch, dim, dstate)
    y = torch.cat(ys).view(length, batch * dim).t().contiguous() if ys else h.new_zeros(batch * dim, 0)
    y = _finish(y.view(batch, dim, length), u, D, z)
    return (y, h) if return_last_state else y


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False, backend: str | None = None,
                   initial_state: Tensor | None = None):
    """The selective scan of eqs. (3)-(6), as in `selective_scan_ref`, on the fastest available implementation.

    backend: None picks "triton" for CUDA tensors and "torch" (the chunked fallback) otherwise; "ref", "torch" and
    "triton" force one ("triton" on CPU tensors needs TRITON_INTERPRET=1 set before triton_scan is imported).
    Every input may be a strided view (the Triton kernels read them in place).
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
        B, C = _check(u, delta, A, B, C, D, z, delta_bias, initial_state)
        if u.dtype not in _TRITON_DTYPES:
            raise TypeError(f"u must be float32, float16 or bfloat16 for the Triton scan; got {u.dtype}")
        if u.shape[2] == 0:
            raise ValueError("u must have at least one time step (L >= 1) for the Triton scan")
        import triton_scan
        return triton_scan.selective_scan(u, delta, A, B, C, **args)
    raise ValueError(f"unknown scan backend {backend!r}; use None, 'ref', 'torch' or 'triton'")


_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def selective_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Tensor | None = None, z: Tensor | None = None, dt_bias: Tensor | None = None,
                           dt_softplus: bool = False, backend: str | None = None) -> Tensor:
    """One time step of the scan for a whole layer, for decoding: eqs. (3)-(6) at a single t.

    state: (batch, D, N) fp32, updated in place; x, dt, z: (batch, D); A: (D, N); B, C: (batch, N) or
    (batch, G, N); D, dt_bias: (D,). Returns y (batch, D) in x's dtype.
    """
    if backend is None:
        backend = "triton" if x.is_cuda else "torch"
    if backend not in ("torch", "triton"):
        raise ValueError(f"unknown decode backend {backend!r}; use None, 'torch' or 'triton'")
    B, C = _check_step(state, x, dt, A, B, C, D, z, dt_bias)
    if backend == "triton":
        if state.dtype != torch.float32 or not state.is_contiguous():
            raise ValueError(f"state must be a contiguous float32 tensor (it is updated in place); got "
                             f"{state.dtype}{'' if state.is_contiguous() else ', not contiguous'}")
        import triton_scan
        return triton_scan.selective_state_update(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias,
                                                  dt_softplus=dt_softplus)
    step = lambda t: None if t is None else t.unsqueeze(-1)  # noqa: E731  the scan's shapes with L = 1
    dt, B, C, _ = _prepare(step(x), step(dt), A, step(B), step(C), dt_bias, dt_softplus, D, step(z), state)
    B, C = _per_channel(B, x.shape[1]), _per_channel(C, x.shape[1])   # (batch, D, N, 1)
    dA = torch.exp(dt * A.to(dt.dtype))                       # eq. (3)   (batch, D, N)
    dBx = dt * B[..., 0] * x.to(dt.dtype)[:, :, None]         # eq. (4)   Euler form
    state.copy_(dA * state + dBx)                             # eq. (5)
    y = (state.to(dt.dtype) * C[..., 0]).sum(-1)              # eq. (6)   (batch, D)
    return _finish(y, x, D, z)


# ----------------------------------------------------------------------------------------------------------------
# Initialising A and Δ for training from scratch (Mamba's defaults; DASS/VMamba use the same)
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def init_A_and_delta_bias(A_log: Tensor, delta_bias: Tensor, dt_min: float = 1e-3, dt_max: float = 0.1,
                          dt_floor: float = 1e-4) -> None:
    """Set, in place, A_log (..., N) so that A = -exp(A_log) = -(1, 2, ..., N) in every channel (S4D-real), and
    delta_bias (any shape) so that Δ = softplus(delta_bias) starts log-uniform in [dt_min, dt_max], floored at
    dt_floor: delta_bias = softplus⁻¹(Δ) = Δ + log(1 - e^-Δ)."""
    n = torch.arange(1, A_log.shape[-1] + 1, dtype=torch.float32, device=A_log.device)
    A_log.copy_(torch.log(n).expand(A_log.shape))
    log_dt = torch.empty(delta_bias.shape, device=delta_bias.device).uniform_(math.log(dt_min), math.log(dt_max))
    dt = log_dt.exp().clamp(min=dt_floor)
    delta_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
