"""Triton kernels for the selective scan of eqs. (3)-(6): forward, backward and the one-token decode step.

Same arguments and results as `scan.selective_scan_ref` (see its docstring and the glossary in scan.py); this module
adds only speed. Glossary of the kernels (code name -> symbol):
    dt      Δ_t       delta after the bias and softplus, fp32                   (CHUNK, BLOCK_D)
    a       Ā_t       exp(Δ_t A), eq. (3)                                        (CHUNK, BLOCK_N, BLOCK_D)
    b       B̄_t x_t   Δ_t B_t u_t, eq. (4) in its Euler form                     (CHUNK, BLOCK_N, BLOCK_D)
    hs      h_t       the state after step t, eq. (5)                            (CHUNK, BLOCK_N, BLOCK_D)
    s       C_t h_t   the scan's output before the skip and gate, eq. (6)        (CHUNK, BLOCK_D)
    ds      ∂/∂s_t    the loss gradient reaching eq. (6)
    dh      ∂/∂h_t    the loss gradient reaching the state (through eq. (6) now and eq. (5) later)
    g       ∂/∂h_{t0-1}  what one chunk hands the chunk before it in the backward pass

How it is organised (the plan of mamba_ssm's CUDA kernel, written for Triton):
- One program per (batch, block of BLOCK_D channels) walks the sequence in chunks of CHUNK time steps. A chunk of
  u, Δ, z is a (CHUNK, BLOCK_D) tile, contiguous along L. Inside a chunk the linear recurrence h_t = a_t h_{t-1} + b_t
  is a `tl.associative_scan` over time on (a, b) pairs, composed as (a1, b1) then (a2, b2) = (a1 a2, a2 b1 + b2);
  the state carried in from the previous chunk is added afterwards: h_t = S_t + P_t h_{t0-1} with (P_t, S_t) the
  scanned pairs. State arithmetic is fp32, whatever the input dtype.
- Tiles are (time, state, channel) with channels fastest, so Triton spreads the channels over the threads and keeps
  each thread's time steps in its registers: the scan is a sequential loop inside a thread, no shuffles (see
  `_tiles`; for N = 1 the tile is long in time and the threads spread along time instead).
- The forward stores only the state at each chunk end: (batch, n_chunks, N, D) fp32, CHUNK times smaller than all
  the states. The last of them is the returned last state.
- The backward walks the chunks from last to first. In each it re-runs the forward from the stored state of the
  chunk before, then runs the reverse recurrence dh_t = C_t ds_t + Ā_{t+1} dh_{t+1} as a reverse scan.
  dA, dD and d(delta_bias) are summed over time in registers and written per batch element (summed over the batch
  by PyTorch: no atomics, deterministic); dB and dC are summed over the block's channels and added with fp32
  atomics into (batch, G, N, L) buffers, as mamba_ssm does.
- N is padded to BLOCK_N, a power of two, with masks (A = 0 there, so the padded states stay 0). Every block of
  channels lies inside one group of B, C: BLOCK_D is a power of two dividing D / G.

Differences from mamba_ssm's kernel: a chunk is one register tile, so chunks are short (8 steps for N = 16) and the
stored states larger (for N = 16 twice the size of u in fp32; mamba_ssm keeps 1 in 2048 steps) but still linear in
L; the backward computes Ā_{t+1} by loading Δ one step ahead instead of shuffling Ā_t between threads.
"""
from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError as e:  # scan.py imports this module only when the Triton backend is asked for
    raise ImportError("the Triton scan backend (backend='triton') needs the triton package "
                      "(`pip install triton`); use backend='torch' without it") from e


# ----------------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _compose(a1, b1, a2, b2):
    """Step (a1, b1) then step (a2, b2) of h -> a h + b: h -> a2 (a1 h + b1) + b2. With reverse=True the same
    function computes s_t = a_t s_{t+1} + b_t from the end (Triton scans the flipped axis with it)."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _delta(raw, SOFTPLUS: tl.constexpr):
    """Δ from delta + delta_bias: softplus(x) = log1p(e^x) for x <= 20, x above (as mamba_ssm's kernels do)."""
    if SOFTPLUS:
        e = tl.exp(tl.minimum(raw, 20.0))
        one_e = 1.0 + e
        log1p = tl.where(one_e == 1.0, e, tl.log(one_e) * (e / (one_e - 1.0)))  # log1p to full precision
        return tl.where(raw <= 20.0, log1p, raw)
    else:
        return raw


@triton.jit
def _delta_grad(raw, SOFTPLUS: tl.constexpr):
    """dΔ / d(delta + delta_bias): sigmoid(x) for x <= 20, 1 above."""
    if SOFTPLUS:
        return tl.where(raw <= 20.0, tl.sigmoid(raw), 1.0)
    else:
        return tl.full(raw.shape, 1.0, tl.float32)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _tiles(dstate: int, channels_per_group: int, length: int, chunk: int | None) -> tuple[int, int, int, int]:
    """(CHUNK, BLOCK_N, BLOCK_D of the forward, BLOCK_D of the backward) for 4 warps.

    The 3D tiles are (CHUNK, BLOCK_N, BLOCK_D), channels fastest, so Triton lays the channels across the threads
    and keeps time (and most of N) inside each thread: the scan over time is then a sequential loop in registers
    and the sum over N of eq. (6) mostly is too. N >= 2: 32 channels (16 in the heavier backward) x N x CHUNK with
    CHUNK * N = 128 (N = 16: 8 steps). N = 1 (DASS, few channels): 1-2 channels x 1024 steps, which puts the threads
    along time instead (a parallel scan across them), else there would be too few programs.
    BLOCK_D is a power of two dividing D / G, so that a block reads one group's B_t, C_t and needs no channel mask.
    """
    block_n = _next_pow2(dstate)
    if chunk is None:
        chunk = 1024 if block_n == 1 else min(64, max(2, 128 // block_n))
        chunk = min(chunk, max(2, _next_pow2(length)))
    if chunk < 2 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two >= 2; got {chunk}")
    block_d_fwd, block_d_bwd = (2, 1) if block_n == 1 else (32, 16)
    while channels_per_group % block_d_fwd:
        block_d_fwd //= 2
    while channels_per_group % block_d_bwd:
        block_d_bwd //= 2
    return chunk, block_n, block_d_fwd, block_d_bwd


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(name: str, t: Tensor | None, shape: tuple[int, ...]) -> None:
    if t is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}; got {tuple(t.shape)}")


def _check_bc(name: str, M: Tensor, batch: int, dim: int, dstate: int, tail: tuple[int, ...]) -> Tensor:
    """(batch, N, *tail) or grouped (batch, G, N, *tail) -> (batch, G, N, *tail) contiguous, G dividing D."""
    if M.dim() == 2 + len(tail):
        M = M.unsqueeze(1)
    if M.dim() != 3 + len(tail) or M.shape[0] != batch or tuple(M.shape[2:]) != (dstate, *tail) or dim % M.shape[1]:
        raise ValueError(f"{name} must be (batch, N{', L' if tail else ''}) or (batch, G, N{', L' if tail else ''}) "
                         f"with batch={batch}, N={dstate}{f', L={tail[0]}' if tail else ''} and G dividing "
                         f"D={dim}; got {tuple(M.shape)}")
    return M.contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _scan_fwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, y_ptr, states_ptr,
                     dim, length, n_groups, channels_per_group, n_chunks,
                     DSTATE: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_H0: tl.constexpr, SOFTPLUS: tl.constexpr, STORE_ALL: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    """STORE_ALL: store the state at every chunk end (for the backward), else only the last one."""
    pid_b = tl.program_id(0).to(tl.int64)
    d0 = tl.program_id(1) * BLOCK_D
    offs_t = tl.arange(0, CHUNK)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = d0 + tl.arange(0, BLOCK_D)                                    # channels, all < D
    group = d0 // channels_per_group
    row = (pid_b * dim + d0) * length                                      # this block's rows of (batch, D, L)
    td = offs_t[:, None] + tl.arange(0, BLOCK_D)[None, :] * length        # (CHUNK, BLOCK_D) offsets in a chunk
    tn = (pid_b * n_groups + group) * DSTATE * length + offs_t[:, None] + offs_n[None, :] * length  # (CHUNK, BLOCK_N)
    mask_nd = (offs_n[:, None] < DSTATE) & (offs_d[None, :] < dim)         # (BLOCK_N, BLOCK_D)
    nd = offs_n[:, None] + offs_d[None, :] * DSTATE                        # offsets in (D, N)
    state_nd = offs_n[:, None] * dim + offs_d[None, :]                     # offsets in one (N, D) chunk-end state

    A = tl.load(A_ptr + nd, mask=mask_nd, other=0.0).to(tl.float32)      # padded n: A = 0, so h stays 0
    Dskip = tl.load(D_ptr + offs_d).to(tl.float32) if HAS_D else None
    bias = tl.load(bias_ptr + offs_d).to(tl.float32) if HAS_BIAS else None
    if HAS_H0:
        h = tl.load(h0_ptr + pid_b * dim * DSTATE + nd, mask=mask_nd, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)

    for c in range(0, n_chunks):
        t0 = c * CHUNK
        mask_t = (t0 + offs_t) < length
        mask = mask_t[:, None] & (offs_d[None, :] < dim)                   # (CHUNK, BLOCK_D)
        u = tl.load(u_ptr + row + t0 + td, mask=mask, other=0.0).to(tl.float32)
        raw = tl.load(delta_ptr + row + t0 + td, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            raw += bias[None, :]
        dt = tl.where(mask, _delta(raw, SOFTPLUS), 0.0)                    # Δ = 0 past L: a = 1, b = 0 (identity)
        mask_tn = mask_t[:, None] & (offs_n[None, :] < DSTATE)
        Bt = tl.load(B_ptr + tn + t0, mask=mask_tn, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + tn + t0, mask=mask_tn, other=0.0).to(tl.float32)

        a = tl.exp(dt[:, None, :] * A[None, :, :])                         # eq. (3)  Ā = exp(ΔA)
        b = (dt * u)[:, None, :] * Bt[:, :, None]                          # eq. (4)  B̄x = ΔB x (Euler)
        P, S = tl.associative_scan((a, b), axis=0, combine_fn=_compose)   # eq. (5) within the chunk, h_{t0-1} = 0
        hs = S + P * h[None, :, :]                                         # eq. (5)  add the carried state
        y = tl.sum(hs * Ct[:, :, None], axis=1)                            # eq. (6)  y = C h
        if HAS_D:
            y += Dskip[None, :] * u                                        # skip D x
        if HAS_Z:
            z = tl.load(z_ptr + row + t0 + td, mask=mask, other=0.0).to(tl.float32)
            y *= z * tl.sigmoid(z)                                         # gate y silu(z)
        tl.store(y_ptr + row + t0 + td, y, mask=mask)

        h = tl.sum(tl.where(offs_t[:, None, None] == CHUNK - 1, hs, 0.0), axis=0)  # the state at the chunk's end
        if STORE_ALL:
            tl.store(states_ptr + (pid_b * n_chunks + c) * DSTATE * dim + state_nd, h, mask=mask_nd)
    if not STORE_ALL:
        tl.store(states_ptr + pid_b * DSTATE * dim + state_nd, h, mask=mask_nd)


# ----------------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _scan_bwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, states_ptr,
                     dy_ptr, dlast_ptr,
                     du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr, dh0_ptr,
                     dim, length, n_groups, channels_per_group, n_chunks,
                     DSTATE: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_H0: tl.constexpr, HAS_DLAST: tl.constexpr, SOFTPLUS: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)
    d0 = tl.program_id(1) * BLOCK_D
    offs_t = tl.arange(0, CHUNK)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = d0 + tl.arange(0, BLOCK_D)
    group = d0 // channels_per_group
    row = (pid_b * dim + d0) * length
    td = offs_t[:, None] + tl.arange(0, BLOCK_D)[None, :] * length
    tn = (pid_b * n_groups + group) * DSTATE * length + offs_t[:, None] + offs_n[None, :] * length
    mask_nd = (offs_n[:, None] < DSTATE) & (offs_d[None, :] < dim)
    nd = offs_n[:, None] + offs_d[None, :] * DSTATE
    state_nd = offs_n[:, None] * dim + offs_d[None, :]
    batch_nd = pid_b * dim * DSTATE + nd                                   # offsets in a (batch, D, N) tensor

    A = tl.load(A_ptr + nd, mask=mask_nd, other=0.0).to(tl.float32)
    Dskip = tl.load(D_ptr + offs_d).to(tl.float32) if HAS_D else None
    bias = tl.load(bias_ptr + offs_d).to(tl.float32) if HAS_BIAS else None
    if HAS_H0:
        h_init = tl.load(h0_ptr + batch_nd, mask=mask_nd, other=0.0).to(tl.float32)
    else:
        h_init = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    if HAS_DLAST:  # the last state's gradient enters at t = L - 1, as if from a step with Ā = 1
        g = tl.load(dlast_ptr + batch_nd, mask=mask_nd, other=0.0).to(tl.float32)
    else:
        g = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dA_acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)

    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        t0 = c * CHUNK
        mask_t = (t0 + offs_t) < length
        mask = mask_t[:, None] & (offs_d[None, :] < dim)
        mask_tn = mask_t[:, None] & (offs_n[None, :] < DSTATE)

        # Re-run the forward of this chunk from the state stored at the end of the chunk before.
        h_prev = tl.load(states_ptr + (pid_b * n_chunks + tl.maximum(c - 1, 0)) * DSTATE * dim + state_nd,
                         mask=mask_nd, other=0.0)
        h_prev = tl.where(c > 0, h_prev, h_init)
        u = tl.load(u_ptr + row + t0 + td, mask=mask, other=0.0).to(tl.float32)
        raw = tl.load(delta_ptr + row + t0 + td, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            raw += bias[None, :]
        dt = tl.where(mask, _delta(raw, SOFTPLUS), 0.0)
        Bt = tl.load(B_ptr + tn + t0, mask=mask_tn, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + tn + t0, mask=mask_tn, other=0.0).to(tl.float32)
        a = tl.exp(dt[:, None, :] * A[None, :, :])                         # eq. (3)
        b = (dt * u)[:, None, :] * Bt[:, :, None]                          # eq. (4)
        P, S = tl.associative_scan((a, b), axis=0, combine_fn=_compose)
        hs = S + P * h_prev[None, :, :]                                    # eq. (5)  h_t

        # Gate and skip: y = (s + D u) silu(z), s = C h.
        dy = tl.load(dy_ptr + row + t0 + td, mask=mask, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + row + t0 + td, mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(z)
            pre = tl.sum(hs * Ct[:, :, None], axis=1)                      # eq. (6)  s = C h
            if HAS_D:
                pre += Dskip[None, :] * u
            tl.store(dz_ptr + row + t0 + td, dy * pre * sig * (1.0 + z * (1.0 - sig)), mask=mask)  # silu'
            ds = dy * z * sig
        else:
            ds = dy

        # Reverse recurrence dh_t = C_t ds_t + Ā_{t+1} dh_{t+1}; Ā_{t+1} is read one step ahead. At the chunk's
        # last step (and at t = L - 1) it is 1 and the carry g = Ā_{t0+CHUNK} dh_{t0+CHUNK} enters instead.
        mask_next = mask & (offs_t[:, None] < CHUNK - 1) & ((t0 + offs_t + 1) < length)[:, None]
        raw_next = tl.load(delta_ptr + row + t0 + 1 + td, mask=mask_next, other=0.0).to(tl.float32)
        if HAS_BIAS:
            raw_next += bias[None, :]
        dt_next = tl.where(mask_next, _delta(raw_next, SOFTPLUS), 0.0)
        a_next = tl.exp(dt_next[:, None, :] * A[None, :, :])               # Ā_{t+1}
        Q, R = tl.associative_scan((a_next, Ct[:, :, None] * ds[:, None, :]), axis=0, combine_fn=_compose,
                                   reverse=True)
        dh = R + Q * g[None, :, :]                                         # ∂L/∂h_t

        # Gradients of eqs. (3)-(5). Ā_t h_{t-1} = h_t - b_t avoids the state one step back.
        ah = hs - b
        dhB = tl.sum(dh * Bt[:, :, None], axis=1)                          # Σ_n dh B
        ddt = dhB * u + tl.sum(dh * ah * A[None, :, :], axis=1)            # ∂/∂Δ of eqs. (3), (4)
        du = dt * dhB
        if HAS_D:
            du += Dskip[None, :] * ds
            dD_acc += tl.sum(ds * u, axis=0)
        dA_acc += tl.sum(dh * ah * dt[:, None, :], axis=0)                 # ∂/∂A of eq. (3)
        dB = tl.sum(dh * (dt * u)[:, None, :], axis=2)                     # (CHUNK, BLOCK_N), summed over channels
        dC = tl.sum(hs * ds[:, None, :], axis=2)                           # ∂/∂C of eq. (6)
        tl.atomic_add(dB_ptr + tn + t0, dB, mask=mask_tn)
        tl.atomic_add(dC_ptr + tn + t0, dC, mask=mask_tn)
        ddt = tl.where(mask, ddt * _delta_grad(raw, SOFTPLUS), 0.0)
        dbias_acc += tl.sum(ddt, axis=0)
        tl.store(du_ptr + row + t0 + td, du, mask=mask)
        tl.store(ddelta_ptr + row + t0 + td, ddt, mask=mask)

        g = tl.sum(tl.where(offs_t[:, None, None] == 0, a * dh, 0.0), axis=0)  # ∂L/∂h_{t0-1} = Ā_{t0} dh_{t0}

    tl.store(dA_ptr + batch_nd, dA_acc, mask=mask_nd)                     # per batch element; summed outside
    if HAS_D:
        tl.store(dD_ptr + pid_b * dim + offs_d, dD_acc)
    if HAS_BIAS:
        tl.store(dbias_ptr + pid_b * dim + offs_d, dbias_acc)
    if HAS_H0:
        tl.store(dh0_ptr + batch_nd, g, mask=mask_nd)


# ----------------------------------------------------------------------------------------------------------------
# autograd wrapper
# ----------------------------------------------------------------------------------------------------------------

def _dummy(ref: Tensor) -> Tensor:
    """A placeholder pointer for an absent optional tensor (the kernel never reads it)."""
    return ref.new_empty(1)


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk, need_grad):
        batch, dim, length = u.shape
        dstate, groups = A.shape[1], B.shape[1]
        chunk, block_n, block_d, block_d_bwd = _tiles(dstate, dim // groups, length, chunk)
        n_chunks = triton.cdiv(length, chunk)
        y = torch.empty_like(u)
        states = u.new_empty(batch, n_chunks if need_grad else 1, dstate, dim, dtype=torch.float32)
        flags = dict(DSTATE=dstate, HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                     HAS_H0=initial_state is not None, SOFTPLUS=delta_softplus,
                     BLOCK_D=block_d, BLOCK_N=block_n, CHUNK=chunk)
        x = _dummy(u)
        opt = lambda t: x if t is None else t  # noqa: E731
        _scan_fwd_kernel[(batch, dim // block_d)](
            u, delta, A, B, C, opt(D), opt(z), opt(delta_bias), opt(initial_state), y, states,
            dim, length, groups, dim // groups, n_chunks, STORE_ALL=need_grad, **flags, num_warps=4)
        flags["BLOCK_D"] = block_d_bwd
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, states)
        ctx.flags, ctx.n_chunks = flags, n_chunks
        return y, states[:, -1].transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx, dy, dlast):
        u, delta, A, B, C, D, z, delta_bias, initial_state, states = ctx.saved_tensors
        batch, dim, length = u.shape
        dstate, groups = A.shape[1], B.shape[1]
        flags = ctx.flags
        f32 = dict(dtype=torch.float32, device=u.device)
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dz = torch.empty_like(z) if z is not None else None
        dA = torch.empty(batch, dim, dstate, **f32)
        dB, dC = torch.zeros(B.shape, **f32), torch.zeros(C.shape, **f32)
        dD = torch.empty(batch, dim, **f32) if D is not None else None
        dbias = torch.empty(batch, dim, **f32) if delta_bias is not None else None
        dh0 = torch.empty(batch, dim, dstate, **f32) if initial_state is not None else None
        x = _dummy(u)
        opt = lambda t: x if t is None else t  # noqa: E731
        _scan_bwd_kernel[(batch, dim // flags["BLOCK_D"])](
            u, delta, A, B, C, opt(D), opt(z), opt(delta_bias), opt(initial_state), states,
            dy.contiguous(), opt(None if dlast is None else dlast.contiguous()),
            du, ddelta, dA, dB, dC, opt(dD), opt(dz), opt(dbias), opt(dh0),
            dim, length, groups, dim // groups, ctx.n_chunks, HAS_DLAST=dlast is not None, **flags, num_warps=4)
        return (du, ddelta, dA.sum(0).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
                None if D is None else dD.sum(0).to(D.dtype), dz,
                None if delta_bias is None else dbias.sum(0).to(delta_bias.dtype),
                None if initial_state is None else dh0.to(initial_state.dtype), None, None, None)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False, initial_state: Tensor | None = None, chunk: int | None = None):
    """The selective scan of eqs. (3)-(6) with Triton kernels; arguments and results as `scan.selective_scan_ref`.

    u, delta, z: (batch, D, L) fp32/fp16/bf16; A: (D, N); B, C: (batch, N, L) or (batch, G, N, L); D, delta_bias:
    (D,); initial_state: (batch, D, N). Returns y (batch, D, L) in u's dtype and, if return_last_state, the last
    state (batch, D, N) fp32. Differentiable in every tensor argument. `chunk` (a power of two) overrides the
    number of time steps per chunk (the default depends on N; tests make it small to exercise many chunks).
    """
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, D, L); got {tuple(u.shape)}")
    if u.dtype not in _DTYPES:
        raise TypeError(f"u must be float32, float16 or bfloat16 for the Triton scan; got {u.dtype}")
    batch, dim, length = u.shape
    if length == 0:
        raise ValueError("u must have at least one time step (L >= 1)")
    _check("delta", delta, (batch, dim, length))
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (D, N) with D = {dim}; got {tuple(A.shape)}")
    dstate = A.shape[1]
    B = _check_bc("B", B, batch, dim, dstate, (length,))
    C = _check_bc("C", C, batch, dim, dstate, (length,))
    if B.shape[1] != C.shape[1]:
        raise ValueError(f"B and C must have the same number of groups; got {B.shape[1]} and {C.shape[1]}")
    _check("D", D, (dim,))
    _check("z", z, (batch, dim, length))
    _check("delta_bias", delta_bias, (dim,))
    _check("initial_state", initial_state, (batch, dim, dstate))
    tensors = [u, delta, A, B, C, D, z, delta_bias, initial_state]
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    y, last = _SelectiveScan.apply(*[None if t is None else t.contiguous() for t in tensors],
                                   bool(delta_softplus), chunk, need_grad)
    return (y, last) if return_last_state else y


# ----------------------------------------------------------------------------------------------------------------
# Decode step
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _state_update_kernel(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
                         dim, n_groups, channels_per_group,
                         DSTATE: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                         SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_b = tl.program_id(1).to(tl.int64)
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_dn = mask_d[:, None] & (offs_n < DSTATE)[None, :]
    dn = offs_d[:, None] * DSTATE + offs_n[None, :]
    group = offs_d // channels_per_group                                   # a tile may straddle groups
    bc = (pid_b * n_groups + group)[:, None] * DSTATE + offs_n[None, :]

    h = tl.load(state_ptr + pid_b * dim * DSTATE + dn, mask=mask_dn, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + pid_b * dim + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    raw = tl.load(dt_ptr + pid_b * dim + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    dt = _delta(raw, SOFTPLUS)
    A = tl.load(A_ptr + dn, mask=mask_dn, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + bc, mask=mask_dn, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + bc, mask=mask_dn, other=0.0).to(tl.float32)

    h = tl.exp(dt[:, None] * A) * h + (dt * x)[:, None] * Bv               # eqs. (3)-(5)
    tl.store(state_ptr + pid_b * dim * DSTATE + dn, h, mask=mask_dn)
    y = tl.sum(h * Cv, axis=1)                                             # eq. (6)
    if HAS_D:
        y += tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) * x
    if HAS_Z:
        z = tl.load(z_ptr + pid_b * dim + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(y_ptr + pid_b * dim + offs_d, y, mask=mask_d)


def selective_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Tensor | None = None, z: Tensor | None = None, dt_bias: Tensor | None = None,
                           dt_softplus: bool = False) -> Tensor:
    """One decode step of eqs. (3)-(6) with a Triton kernel; as `scan.selective_state_update`.

    state: (batch, D, N) fp32 contiguous, updated in place; x, dt, z: (batch, D); A: (D, N); B, C: (batch, N) or
    (batch, G, N); D, dt_bias: (D,). Returns y (batch, D) in x's dtype. Not differentiable (inference only).
    """
    if x.dim() != 2:
        raise ValueError(f"x must be (batch, D); got {tuple(x.shape)}")
    batch, dim = x.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (D, N) with D = {dim}; got {tuple(A.shape)}")
    dstate = A.shape[1]
    _check("state", state, (batch, dim, dstate))
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"state must be a contiguous float32 tensor (it is updated in place); got {state.dtype}"
                         f"{'' if state.is_contiguous() else ', not contiguous'}")
    _check("dt", dt, (batch, dim))
    _check("z", z, (batch, dim))
    _check("D", D, (dim,))
    _check("dt_bias", dt_bias, (dim,))
    B = _check_bc("B", B, batch, dim, dstate, ())
    C = _check_bc("C", C, batch, dim, dstate, ())
    if B.shape[1] != C.shape[1]:
        raise ValueError(f"B and C must have the same number of groups; got {B.shape[1]} and {C.shape[1]}")
    block_n = _next_pow2(dstate)
    block_d = 32 if block_n <= 16 else max(1, 512 // block_n)  # 32 channels x N for N <= 16
    y = torch.empty_like(x)
    c = lambda t: _dummy(x) if t is None else t.contiguous()  # noqa: E731
    _state_update_kernel[(triton.cdiv(dim, block_d), batch)](
        state, x.contiguous(), dt.contiguous(), A.contiguous(), B, C, c(D), c(z), c(dt_bias), y,
        dim, B.shape[1], dim // B.shape[1], DSTATE=dstate, HAS_D=D is not None, HAS_Z=z is not None,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), BLOCK_D=block_d, BLOCK_N=block_n)
    return y
