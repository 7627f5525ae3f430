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

Three implementations compute the same thing: `selective_scan_ref` (the sequential loop: slow, plain, the oracle),
`_scan_chunked` (the PyTorch fallback for CPU) and the Triton kernels of triton_scan.py (CUDA). `selective_scan`
checks the shapes and picks one; `selective_state_update` is the one-token step used when generating.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


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
    B, C = (M.unsqueeze(1) if M.dim() == 3 else M for M in (B, C))
    for name, M in (("B", B), ("C", C)):
        if (M.dim() != 4 or M.shape[0] != batch or M.shape[2:] != (dstate, length) or dim % M.shape[1]
                or M.shape[1] != B.shape[1]):
            raise ValueError(f"{name} must be (batch, N, L) or (batch, G, N, L) with batch={batch}, N={dstate}, "
                             f"L={length} and the same number of groups G in B and C, dividing D={dim}; "
                             f"got {tuple(M.shape)}")
    return B, C


def _prepare(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, delta_bias: Tensor | None,
             delta_softplus: bool, D: Tensor | None = None, z: Tensor | None = None,
             initial_state: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, int]:
    """Check shapes; return Δ in state precision (bias and softplus applied) and B, C as (batch, G, N, L) in it.
    The state precision is fp32 for fp16/bf16/fp32 inputs, fp64 for fp64 ones (the ref is then an fp64 oracle)."""
    B, C = _check(u, delta, A, B, C, D, z, delta_bias, initial_state)
    delta = delta.to(torch.promote_types(u.dtype, torch.float32))
    if delta_bias is not None:
        delta = delta + delta_bias.to(delta.dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)  # softplus(x) = log(1 + e^x), linear above 20 like the kernels
    return delta, B.to(delta.dtype), C.to(delta.dtype), A.shape[1]


def _per_channel(M: Tensor, dim: int) -> Tensor:
    """(batch, G, N, L) -> (batch, D, N, L): group g drives channels g·D/G ... (g+1)·D/G - 1."""
    batch, groups, dstate, length = M.shape
    return M.unsqueeze(2).expand(batch, groups, dim // groups, dstate, length).reshape(batch, dim, dstate, length)


def _finish(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    """y + D·u, then the gate y·silu(z); state-precision arithmetic, result in u's dtype."""
    if D is not None:
        y = y + D.to(y.dtype)[:, None] * u.to(y.dtype)
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


def _scan_recurrence_(a: Tensor, b: Tensor, h: Tensor, chunk: int | None = None) -> None:
    """Solve h_t = a_t h_{t-1} + b_t (eq. (5)) in place of b, from h_{-1} = h; a, b: (L, M) contiguous, h: (M,).

    The L sequential steps are cut into chunks of T ≈ sqrt(L), and every chunk takes its step t at once, in three
    passes: (1) each chunk's end state from a zero start, and its decay Π_t a_t; (2) the state entering each chunk,
    carried chunk to chunk; (3) the chunks again, in place, from their true entering state. So 2T + L/T vectorised
    steps instead of L. Only products of decays a_t = exp(Δ_t A) <= 1 appear, never their inverses, so nothing
    overflows however long L is. Rows past the last whole chunk run one by one.
    """
    length, width = a.shape
    T = chunk or max(1, math.isqrt(length))
    chunks = length // T
    av, bv = a[:chunks * T].view(chunks, T, width), b[:chunks * T].view(chunks, T, width)
    if chunks:
        end = bv[:, 0]                                             # pass 1      (chunks, M)
        for t in range(1, T):
            end = torch.addcmul(bv[:, t], av[:, t], end)
        decay = av.prod(1)                                         # (chunks, M)
        enter = b.new_empty(chunks, width)                         # pass 2
        for c in range(chunks):
            enter[c] = h
            h = torch.addcmul(end[c], decay[c], h)
        for t in range(T):                                         # pass 3
            enter = bv[:, t].addcmul_(av[:, t], enter)
    for t in range(chunks * T, length):                            # the leftover rows
        h = b[t].addcmul_(a[t], h)


class _Recurrence(torch.autograd.Function):
    """Eq. (5) for all t, h_t = a_t h_{t-1} + b_t from h0, with a hand-written backward: autograd through a chunked
    scan keeps about twice the memory and takes about five times as long.
    a, b: (L, batch, G, D/G, N); h0: (batch, D, N). Returns hs, every h_t, shaped like b."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, h0: Tensor, chunk: int | None) -> Tensor:
        hs = b.clone()
        _scan_recurrence_(a.view(len(a), -1), hs.view(len(a), -1), h0.reshape(-1), chunk)
        ctx.chunk = chunk
        ctx.save_for_backward(a, h0, hs)
        return hs

    @staticmethod
    def backward(ctx, grad_hs: Tensor):
        a, h0, hs = ctx.saved_tensors
        # g_t = dL/dh_t in total = grad_t + a_{t+1} g_{t+1} = dL/db_t: eq. (5) again, backwards in time
        g = grad_hs.flip(0)
        flat = g.view(len(a), -1)
        _scan_recurrence_(a[1:].flip(0).view(len(a) - 1, flat.shape[1]), flat[1:], flat[0], ctx.chunk)
        g = g.flip(0)
        grad_a = g * torch.cat([h0.reshape(1, *a.shape[1:]), hs[:-1]])  # dL/da_t = g_t h_{t-1}
        return grad_a, g, (a[0] * g[0]).view(h0.shape), None


def _scan_chunked(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                  z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                  return_last_state: bool = False, initial_state: Tensor | None = None, chunk: int | None = None,
                  block: int = 1 << 20):
    """The PyTorch fallback: same arguments and results as `selective_scan_ref`, differentiable.

    Time first, (L, batch, G, D/G, N), so that one time step is one contiguous block. The sequence is cut into
    blocks of about `block` state numbers (a few MB, so that a block stays in cache and memory stays bounded without
    autograd), the state carried from block to block. In a block, eqs. (3), (4) and (6) are elementwise over all its
    steps; eq. (5) is `_scan_recurrence_`. For backward, autograd keeps Ā_t and h_t: 2 · batch · D · N · L numbers.
    """
    delta, B, C, dstate = _prepare(u, delta, A, B, C, delta_bias, delta_softplus, D, z, initial_state)
    batch, dim, length = u.shape
    groups = B.shape[1]
    shape = (length, batch, groups, dim // groups, 1)
    dt = delta.movedim(-1, 0).contiguous().view(shape)                         # (L, batch, G, D/G, 1)
    dtx = (delta * u.to(delta.dtype)).movedim(-1, 0).contiguous().view(shape)
    B, C = B.movedim(-1, 0).unsqueeze(3).contiguous(), C.movedim(-1, 0).unsqueeze(4).contiguous()  # (L, b, G, ., .)
    A = A.to(delta.dtype).view(groups, dim // groups, dstate)                 # (G, D/G, N)
    h = delta.new_zeros(batch, dim, dstate) if initial_state is None else initial_state.to(delta.dtype)
    y = delta.new_empty(shape)
    steps = max(1, block // h.numel())                                         # time steps per block
    for s in range(0, length, steps):                                          # blocks of time, state carried
        t = slice(s, s + steps)
        a = torch.exp(dt[t] * A)                                               # eq. (3)  Ā_t = exp(Δ_t A)
        hs = _Recurrence.apply(a, dtx[t] * B[t], h, chunk)                     # eqs. (4), (5): b_t = Δ_t x_t B_t
        y[t] = hs @ C[t]                                                       # eq. (6)  y_t = C h_t
        h = hs[-1].view(batch, dim, dstate)
    y = _finish(y.view(length, batch, dim).permute(1, 2, 0).contiguous(), u, D, z)  # (batch, D, L)
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
        if u.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"u must be float32, float16 or bfloat16 for the Triton scan; got {u.dtype}")
        if u.shape[2] == 0:
            raise ValueError("u must have at least one time step (L >= 1) for the Triton scan")
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
    if backend not in ("torch", "triton"):
        raise ValueError(f"unknown decode backend {backend!r}; use None, 'torch' or 'triton'")
    if x.dim() != 2:
        raise ValueError(f"x must be (batch, D); got {tuple(x.shape)}")
    batch, dim = x.shape
    for name, t, shape in (("dt", dt, (batch, dim)), ("z", z, (batch, dim)), ("D", D, (dim,)),
                           ("dt_bias", dt_bias, (dim,)), ("state", state, (batch, dim, A.shape[-1]))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}; got {tuple(t.shape)}")
    B, C = _check(x[..., None], dt[..., None], A, B[..., None], C[..., None])  # the scan's shapes with L = 1
    if backend == "torch":
        y, h = selective_scan_ref(x[..., None], dt[..., None], A, B, C, D, None if z is None else z[..., None],
                                  dt_bias, dt_softplus, return_last_state=True, initial_state=state)
        state.copy_(h)
        return y[..., 0]
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"state must be a contiguous float32 tensor (it is updated in place); got "
                         f"{state.dtype}{'' if state.is_contiguous() else ', not contiguous'}")
    import triton_scan
    return triton_scan.selective_state_update(state, x, dt, A, B[..., 0], C[..., 0], D=D, z=z, dt_bias=dt_bias,
                                              dt_softplus=dt_softplus)


@torch.no_grad()
def init_A_and_delta_bias(A_log: Tensor, delta_bias: Tensor, dt_min: float = 1e-3, dt_max: float = 0.1,
                          dt_floor: float = 1e-4) -> None:
    """Initialise for training from scratch (Mamba's defaults; DASS/VMamba use the same). Set, in place, A_log (..., N)
    so that A = -exp(A_log) = -(1, 2, ..., N) in every channel (S4D-real), and delta_bias (any shape) so that
    Δ = softplus(delta_bias) starts log-uniform in [dt_min, dt_max], floored at dt_floor:
    delta_bias = softplus⁻¹(Δ) = Δ + log(1 - e^-Δ)."""
    n = torch.arange(1, A_log.shape[-1] + 1, dtype=torch.float32, device=A_log.device)
    A_log.copy_(torch.log(n).expand(A_log.shape))
    log_dt = torch.empty(delta_bias.shape, device=delta_bias.device).uniform_(math.log(dt_min), math.log(dt_max))
    dt = log_dt.exp().clamp(min=dt_floor)
    delta_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
