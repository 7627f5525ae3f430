"""Triton kernels for the selective scan of eqs. (3)-(6): forward, backward and the one-token decode step.

Same arguments and results as `scan.selective_scan_ref`. The tensors arrive checked by `scan.selective_scan` (shapes,
dtypes; B and C grouped as (batch, G, N, L)): this module trusts them and adds only speed. Glossary of the kernels:
    h       h_t        the N states of a block of channels after step t, eq. (5)    (BLOCK_N, BLOCK_D) fp32
    a       Ā_t        exp(Δ_t A), eq. (3), computed as exp2(Δ_t log2(e) A)         (BLOCK_N, BLOCK_D)
    x, dt   x_t, Δ_t   one step's input and time step (after bias and softplus)     (BLOCK_D,)
    Bt, Ct  B_t, C_t   one step's projections, the same for the block's channels   (BLOCK_N,)
    ds      ∂L/∂s_t    the gradient reaching s_t = C_t h_t, eq. (6), through the gate and skip
    dh      ∂L/∂h_t    through eq. (6) at t and eq. (5) at t + 1                    (BLOCK_N, BLOCK_D)
    g       Ā_t ∂L/∂h_t, what step t hands back to step t - 1                     (BLOCK_N, BLOCK_D)
    chunk   CHUNK time steps unrolled in the code (their loads issued together)
    seg     SEG time steps between two states kept for the backward (a multiple of CHUNK)
    span    the SPAN time steps one program walks (a multiple of SEG); span s covers [s·SPAN, (s+1)·SPAN)

How it is organised:
- One program is one warp: BLOCK_D = 32 channels of one batch element, one per thread. A thread keeps the N states of
  its channel in registers and walks time step by step, so eq. (5) is one multiply-add per state and step and the
  sum over N of eq. (6) stays inside the thread: no shuffles, no shared memory, no barriers in the forward. B_t, C_t
  are the same for every channel of the warp (one broadcast load). The steps of a chunk are unrolled, so the
  compiler issues their loads ahead of the arithmetic.
- The channel strides are run-time arguments that Triton does not specialise (`do_not_specialize`), and so is the
  `unit` (= 1) that the channel and state offsets of the other buffers are multiplied by: Triton then never learns
  which axis is contiguous, and every tensor keeps the one layout above (a channel per thread, N in its registers)
  instead of the layouts its coalescing pass would pick per tensor, with shared-memory conversions between them.
  So strided views (the Mamba mixer's Δ, z and incoming gradient are transposes) are read in place, without copies.
- Parallelism: batch · D / 32 warps. When that is below WARPS_PER_SM per multiprocessor, time is split into spans
  that run in parallel: a first launch (`LOCAL`) walks each span from a zero state and keeps its end state and its
  Σ Δ; then each program folds the spans before it into its starting state (Π_t Ā_t over a span is
  exp(A Σ_t Δ_t)) and walks its own span. The backward does the same from the other end with the gradient g.
- Training memory: the forward keeps the state at every SEG-th step only, (batch, L / SEG - 1, N, D) fp32 (below
  N / SEG of u's size). The backward walks each segment twice: forward from its kept state, writing the state at each chunk's
  start to a per-program scratch (one segment's worth, reused, so bounded by the number of programs), then
  backward chunk by chunk, recomputing the chunk's states in registers. No reverse `associative_scan` is used
  (Triton's lowering of one with a non-commutative combine has been reported wrong on GPUs): time runs backwards
  in the loop itself.
- dB, dC are summed over the warp's channels and added with relaxed fp32 atomics into (batch, G, N, L) buffers;
  dA, dD and d(delta_bias) are summed over time in registers and written per program, summed by PyTorch.
- N is padded to BLOCK_N, a power of two, with masks (A = 0 there, so the padded states stay 0). A block of channels
  lies inside one group of B, C: BLOCK_D is a power of two dividing D / G.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError as e:  # scan.py imports this module only when the Triton backend is asked for
    raise ImportError("the Triton scan backend (backend='triton') needs the triton package "
                      "(`pip install triton`); use backend='torch' without it") from e

LOG2E = tl.constexpr(1.4426950408889634)
WARPS_PER_SM = 8        # split time into spans while batch · D / 32 is below this many warps per multiprocessor
SMS_WITHOUT_GPU = 132   # the multiprocessors assumed under TRITON_INTERPRET=1 (an H100 / H200), to plan as on one

# The channel strides (and `unit`) stay run-time values: see the module docstring.
_CHANNEL_STRIDES = ["su_d", "sv_d", "sz_d", "sy_d", "sg_d", "sr_d", "sq_d", "unit"]


# ----------------------------------------------------------------------------------------------------------------
# Pieces shared by the kernels
# ----------------------------------------------------------------------------------------------------------------

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


@triton.jit
def _program(A_ptr, D_ptr, bias_ptr, unit, channels_per_group, DSTATE: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr):
    """A program's channels and states: their offsets (cd, cn: times `unit`), the group of B, C they read, and their
    A (BLOCK_N, BLOCK_D), D and delta_bias (zeros where absent)."""
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    cd, cn = offs_d * unit, offs_n * unit
    mask_n = offs_n < DSTATE
    A = tl.load(_dn(A_ptr, cn, cd, DSTATE), mask=mask_n[:, None], other=0.0)  # padded states: A = 0, h stays 0
    Dskip = tl.load(D_ptr + cd) if HAS_D else tl.zeros((BLOCK_D,), dtype=tl.float32)
    bias = tl.load(bias_ptr + cd) if HAS_BIAS else tl.zeros((BLOCK_D,), dtype=tl.float32)
    return offs_d, cd, offs_n, cn, mask_n, tl.program_id(1) * BLOCK_D // channels_per_group, A, Dskip, bias


@triton.jit
def _nd(ptr, offs_n, cd, dim):
    """Pointers to a (BLOCK_N, BLOCK_D) block of an (N, D) fp32 work buffer at ptr."""
    return ptr + offs_n[:, None] * dim + cd[None, :]


@triton.jit
def _dn(ptr, cn, cd, DSTATE: tl.constexpr):
    """Pointers to a (BLOCK_N, BLOCK_D) block of a (D, N) tensor at ptr (A, the states of the interface)."""
    return ptr + cd[None, :] * DSTATE + cn[:, None]


@triton.jit
def _at(ptr, pid_b, s_b, offs, s_i, t0, s_t):
    """Pointers to step t0 of rows offs (channels, or states of B, C) of a batch element pid_b."""
    return ptr + pid_b * s_b + offs * s_i + tl.cast(t0, tl.int64) * s_t


@triton.jit
def _inputs(u_t, delta_t, bias, live, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """x_t, Δ_t and delta_t + bias of one step in fp32; past L (not live) Δ = 0: Ā = 1, B̄x = 0, the identity."""
    x = tl.load(u_t, mask=live, other=0.0).to(tl.float32)
    raw = tl.load(delta_t, mask=live, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += bias
    return x, tl.where(live, _delta(raw, SOFTPLUS), 0.0), raw


@triton.jit
def _advance(h, A, dt, x, Bt):
    """Eqs. (3)-(5), one step: h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t, for every state of the block."""
    return tl.exp2((dt * LOG2E)[None, :] * A) * h + (dt * x)[None, :] * Bt[:, None]


@triton.jit
def _fold(h, A, part, dtsum, s, offs_n, cd, dim, DSTATE: tl.constexpr):
    """Carry h across span s whose own result is part[s]: h <- Π_t Ā_t h + part[s], Π_t Ā_t = exp(A Σ_t Δ_t)."""
    decay = tl.exp2(A * (tl.load(dtsum + s * dim + cd) * LOG2E)[None, :])
    return decay * h + tl.load(_nd(part + s * DSTATE * dim, offs_n, cd, dim), mask=offs_n[:, None] < DSTATE,
                               other=0.0)


# ----------------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=_CHANNEL_STRIDES)
def _scan_fwd(u_ptr, delta_ptr, z_ptr, y_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, h0_ptr,
              states_ptr, part_ptr, dtsum_ptr, last_ptr,
              su_b, su_d, su_t, sv_b, sv_d, sv_t, sz_b, sz_d, sz_t, sy_b, sy_d, sy_t,
              sB_b, sB_g, sB_n, sB_t, sC_b, sC_g, sC_n, sC_t, unit,
              dim, length, channels_per_group, n_seg, n_span,
              DSTATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
              SEG: tl.constexpr, SPAN: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
              HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr, SOFTPLUS: tl.constexpr, LOCAL: tl.constexpr,
              STORE_STATES: tl.constexpr):
    """LOCAL: walk span pid_s from h = 0; keep its end state and Σ Δ (part, dtsum: (batch, n_span, ...)).
    Else: start from h0 and the spans before; write y; keep the state at every SEG-th step (STORE_STATES) and,
    in the last span, the last state. Strides: u (su), delta (sv), z (sz), y (sy), B (sB), C (sC)."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(2)
    offs_d, cd, offs_n, cn, mask_n, group, A, Dskip, bias = _program(
        A_ptr, D_ptr, bias_ptr, unit, channels_per_group, DSTATE, BLOCK_N, BLOCK_D, HAS_D, HAS_BIAS)
    part = part_ptr + pid_b * n_span * DSTATE * dim                        # (n_span, N, D) of this batch element
    dtsum = dtsum_ptr + pid_b * n_span * dim                               # (n_span, D)

    h = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    if not LOCAL:
        if HAS_H0:
            h = tl.load(_dn(h0_ptr + pid_b * dim * DSTATE, cn, cd, DSTATE), mask=mask_n[:, None], other=0.0)
        for s in range(0, pid_s):                                          # the spans before
            h = _fold(h, A, part, dtsum, s, offs_n, cd, dim, DSTATE)
    dt_total = tl.zeros((BLOCK_D,), dtype=tl.float32)

    t_begin = pid_s * SPAN
    for t0 in range(t_begin, tl.minimum(t_begin + SPAN, length), CHUNK):
        if STORE_STATES:
            if (t0 % SEG == 0) & (t0 > 0):                                 # h_{t0-1}, where segment t0 / SEG starts
                kept = states_ptr + (pid_b * (n_seg - 1) + t0 // SEG - 1) * DSTATE * dim
                tl.store(_nd(kept, offs_n, cd, dim), h, mask=mask_n[:, None])
        u_t0 = _at(u_ptr, pid_b, su_b, offs_d, su_d, t0, su_t)
        delta_t0 = _at(delta_ptr, pid_b, sv_b, offs_d, sv_d, t0, sv_t)
        z_t0 = _at(z_ptr, pid_b, sz_b, offs_d, sz_d, t0, sz_t)
        y_t0 = _at(y_ptr, pid_b, sy_b, offs_d, sy_d, t0, sy_t)
        B_t0 = _at(B_ptr + group * sB_g, pid_b, sB_b, offs_n, sB_n, t0, sB_t)
        C_t0 = _at(C_ptr + group * sC_g, pid_b, sC_b, offs_n, sC_n, t0, sC_t)
        for k in tl.static_range(CHUNK):                                   # step t = t0 + k
            live = offs_d * 0 + t0 + k < length                           # (tensors: t0 may be an int, interpreted)
            live_n = mask_n & (offs_n * 0 + t0 + k < length)
            x, dt, _ = _inputs(u_t0 + k * su_t, delta_t0 + k * sv_t, bias, live, HAS_BIAS, SOFTPLUS)
            Bt = tl.load(B_t0 + k * sB_t, mask=live_n, other=0.0).to(tl.float32)
            h = _advance(h, A, dt, x, Bt)                                  # eqs. (3)-(5)
            dt_total += dt
            if not LOCAL:
                Ct = tl.load(C_t0 + k * sC_t, mask=live_n, other=0.0).to(tl.float32)
                y = tl.sum(h * Ct[:, None], axis=0)                        # eq. (6)  y = C h
                if HAS_D:
                    y += Dskip * x                                         # skip D x
                if HAS_Z:
                    z = tl.load(z_t0 + k * sz_t, mask=live, other=0.0).to(tl.float32)
                    y *= z * tl.sigmoid(z)                                 # gate y silu(z)
                tl.store(y_t0 + k * sy_t, y.to(y_ptr.dtype.element_ty), mask=live)

    if LOCAL:
        tl.store(_nd(part + pid_s * DSTATE * dim, offs_n, cd, dim), h, mask=mask_n[:, None])
        tl.store(dtsum + pid_s * dim + cd, dt_total)
    elif pid_s == n_span - 1:
        tl.store(_dn(last_ptr + pid_b * dim * DSTATE, cn, cd, DSTATE), h, mask=mask_n[:, None])


# ----------------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=_CHANNEL_STRIDES)
def _scan_bwd(u_ptr, delta_ptr, z_ptr, dy_ptr, du_ptr, ddelta_ptr, dz_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr,
              h0_ptr, dlast_ptr, states_ptr, part_ptr, dtsum_ptr, scratch_ptr,
              dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, dh0_ptr,
              su_b, su_d, su_t, sv_b, sv_d, sv_t, sz_b, sz_d, sz_t, sy_b, sy_d, sy_t,
              sg_b, sg_d, sg_t, sr_b, sr_d, sr_t, sq_b, sq_d, sq_t,
              sB_b, sB_g, sB_n, sB_t, sC_b, sC_g, sC_n, sC_t, unit,
              dim, length, n_groups, channels_per_group, n_seg, n_span,
              DSTATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
              SEG: tl.constexpr, SPAN: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
              HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr, SOFTPLUS: tl.constexpr, LOCAL: tl.constexpr,
              HAS_DLAST: tl.constexpr):
    """LOCAL: walk span pid_s + 1 backwards from g = 0; keep the g it hands to the span before, and its Σ Δ.
    Else: start from dlast and the spans after, and compute every gradient of span pid_s.
    Strides: u (su), delta (sv), z (sz), dy (sy), du (sg), ddelta (sr), dz (sq), B (sB), C (sC)."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(2) + (1 if LOCAL else 0)
    offs_d, cd, offs_n, cn, mask_n, group, A, Dskip, bias = _program(
        A_ptr, D_ptr, bias_ptr, unit, channels_per_group, DSTATE, BLOCK_N, BLOCK_D, HAS_D, HAS_BIAS)
    offs_t = tl.arange(0, CHUNK)
    part = part_ptr + pid_b * n_span * DSTATE * dim
    dtsum = dtsum_ptr + pid_b * n_span * dim
    t_begin = pid_s * SPAN
    t_end = tl.minimum(t_begin + SPAN, length)

    g = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)                     # Ā_{t+1} ∂L/∂h_{t+1}
    if not LOCAL:
        if HAS_DLAST:  # the last state's gradient enters at t = L - 1, as if from a step with Ā = 1
            g = tl.load(_dn(dlast_ptr + pid_b * dim * DSTATE, cn, cd, DSTATE), mask=mask_n[:, None], other=0.0)
        for i in range(0, n_span - 1 - pid_s):                             # the spans after, last first
            g = _fold(g, A, part, dtsum, n_span - 1 - i, offs_n, cd, dim, DSTATE)
    h_init = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    if HAS_H0:
        h_init = tl.load(_dn(h0_ptr + pid_b * dim * DSTATE, cn, cd, DSTATE), mask=mask_n[:, None], other=0.0)
    slot = (pid_b * tl.num_programs(1) + tl.program_id(1)) * n_span + pid_s
    scratch = scratch_ptr + slot * (SEG // CHUNK) * BLOCK_N * BLOCK_D     # one segment's chunk-start states
    scratch_nd = offs_n[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :] * unit
    dA_acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dt_total = tl.zeros((BLOCK_D,), dtype=tl.float32)

    for i in range(0, tl.cdiv(t_end, SEG) - t_begin // SEG):              # the span's segments, last first
        seg = tl.cdiv(t_end, SEG) - 1 - i
        s_begin = seg * SEG
        n_chunks = tl.cdiv(tl.minimum(s_begin + SEG, t_end) - s_begin, CHUNK)
        if not LOCAL:                                                      # forward: each chunk's start state
            kept = states_ptr + (pid_b * (n_seg - 1) + tl.maximum(seg - 1, 0)) * DSTATE * dim
            later = offs_n[:, None] * 0 + seg > 0
            h = tl.load(_nd(kept, offs_n, cd, dim), mask=mask_n[:, None] & later, other=0.0)
            h = tl.where(later, h, h_init)
            for c in range(0, n_chunks):
                t0 = s_begin + c * CHUNK
                tl.store(scratch + c * BLOCK_N * BLOCK_D + scratch_nd, h)
                u_t0 = _at(u_ptr, pid_b, su_b, offs_d, su_d, t0, su_t)
                delta_t0 = _at(delta_ptr, pid_b, sv_b, offs_d, sv_d, t0, sv_t)
                B_t0 = _at(B_ptr + group * sB_g, pid_b, sB_b, offs_n, sB_n, t0, sB_t)
                for k in tl.static_range(CHUNK):
                    live = offs_d * 0 + t0 + k < length
                    x, dt, _ = _inputs(u_t0 + k * su_t, delta_t0 + k * sv_t, bias, live, HAS_BIAS, SOFTPLUS)
                    Bt = tl.load(B_t0 + k * sB_t, mask=mask_n & (offs_n * 0 + t0 + k < length), other=0.0)
                    h = _advance(h, A, dt, x, Bt.to(tl.float32))

        for j in range(0, n_chunks):                                       # backward, chunk by chunk
            t0 = s_begin + (n_chunks - 1 - j) * CHUNK
            u_t0 = _at(u_ptr, pid_b, su_b, offs_d, su_d, t0, su_t)
            delta_t0 = _at(delta_ptr, pid_b, sv_b, offs_d, sv_d, t0, sv_t)
            z_t0 = _at(z_ptr, pid_b, sz_b, offs_d, sz_d, t0, sz_t)
            dy_t0 = _at(dy_ptr, pid_b, sy_b, offs_d, sy_d, t0, sy_t)
            du_t0 = _at(du_ptr, pid_b, sg_b, offs_d, sg_d, t0, sg_t)
            ddelta_t0 = _at(ddelta_ptr, pid_b, sr_b, offs_d, sr_d, t0, sr_t)
            dz_t0 = _at(dz_ptr, pid_b, sq_b, offs_d, sq_d, t0, sq_t)
            B_t0 = _at(B_ptr + group * sB_g, pid_b, sB_b, offs_n, sB_n, t0, sB_t)
            C_t0 = _at(C_ptr + group * sC_g, pid_b, sC_b, offs_n, sC_n, t0, sC_t)
            dB_t0 = dB_ptr + ((pid_b * n_groups + group) * DSTATE + offs_n) * length + t0  # (batch, G, N, L)
            dC_t0 = dC_ptr + ((pid_b * n_groups + group) * DSTATE + offs_n) * length + t0
            if not LOCAL:                                                  # the chunk's states, eq. (5) again
                h = tl.load(scratch + (n_chunks - 1 - j) * BLOCK_N * BLOCK_D + scratch_nd)
                hs = tl.zeros((CHUNK, BLOCK_N, BLOCK_D), dtype=tl.float32)
                for k in tl.static_range(CHUNK):
                    live = offs_d * 0 + t0 + k < length
                    x, dt, _ = _inputs(u_t0 + k * su_t, delta_t0 + k * sv_t, bias, live, HAS_BIAS, SOFTPLUS)
                    Bt = tl.load(B_t0 + k * sB_t, mask=mask_n & (offs_n * 0 + t0 + k < length), other=0.0)
                    h = _advance(h, A, dt, x, Bt.to(tl.float32))
                    hs = tl.where(offs_t[:, None, None] == k, h[None, :, :], hs)
            for r in tl.static_range(CHUNK - 1, -1, -1):                   # step t = t0 + r, backwards
                live = offs_d * 0 + t0 + r < length
                live_n = mask_n & (offs_n * 0 + t0 + r < length)
                x, dt, raw = _inputs(u_t0 + r * su_t, delta_t0 + r * sv_t, bias, live, HAS_BIAS, SOFTPLUS)
                dy = tl.load(dy_t0 + r * sy_t, mask=live, other=0.0).to(tl.float32)
                ds = dy                                                    # ∂L/∂s, s = C h: through the gate
                if HAS_Z:
                    z = tl.load(z_t0 + r * sz_t, mask=live, other=0.0).to(tl.float32)
                    sig = tl.sigmoid(z)
                    ds = dy * z * sig
                Ct = tl.load(C_t0 + r * sC_t, mask=live_n, other=0.0).to(tl.float32)
                a = tl.exp2((dt * LOG2E)[None, :] * A)                     # eq. (3)
                dh = g + Ct[:, None] * ds[None, :]                         # ∂L/∂h_t
                g = a * dh                                                 # handed to h_{t-1} through eq. (5)
                if LOCAL:
                    dt_total += dt
                else:
                    Bt = tl.load(B_t0 + r * sB_t, mask=live_n, other=0.0).to(tl.float32)
                    h = tl.sum(tl.where(offs_t[:, None, None] == r, hs, -0.0), axis=0)  # row r: free in registers
                    ah = dh * (h - (dt * x)[None, :] * Bt[:, None])        # ∂L/∂Ā · Ā; Ā h_{t-1} = h_t - B̄x
                    dA_acc += ah * dt[None, :]                             # ∂/∂A of eq. (3)
                    dhB = tl.sum(dh * Bt[:, None], axis=0)                 # Σ_n ∂L/∂h B
                    du = dt * dhB                                          # ∂/∂x of eq. (4)
                    if HAS_D:
                        du += Dskip * ds
                        dD_acc += ds * x
                    ddt = tl.where(live, (dhB * x + tl.sum(ah * A, axis=0)) * _delta_grad(raw, SOFTPLUS), 0.0)
                    dbias_acc += ddt
                    tl.store(du_t0 + r * sg_t, du.to(du_ptr.dtype.element_ty), mask=live)
                    tl.store(ddelta_t0 + r * sr_t, ddt.to(ddelta_ptr.dtype.element_ty), mask=live)
                    if HAS_Z:
                        y = tl.sum(h * Ct[:, None], axis=0)                # eq. (6) again, for the gate's gradient
                        if HAS_D:
                            y += Dskip * x
                        dz = dy * y * sig * (1.0 + z * (1.0 - sig))        # silu'(z)
                        tl.store(dz_t0 + r * sq_t, dz.to(dz_ptr.dtype.element_ty), mask=live)
                    tl.atomic_add(dB_t0 + r, tl.sum(dh * (dt * x)[None, :], axis=1), mask=live_n,
                                  sem="relaxed")                           # ∂/∂B of eq. (4), Σ over channels
                    tl.atomic_add(dC_t0 + r, tl.sum(h * ds[None, :], axis=1), mask=live_n,
                                  sem="relaxed")                           # ∂/∂C of eq. (6)

    if LOCAL:
        tl.store(_nd(part + pid_s * DSTATE * dim, offs_n, cd, dim), g, mask=mask_n[:, None])
        tl.store(dtsum + pid_s * dim + cd, dt_total)
    else:
        program = pid_b * n_span + pid_s                                   # per program; summed outside
        tl.store(_dn(dA_ptr + program * dim * DSTATE, cn, cd, DSTATE), dA_acc, mask=mask_n[:, None])
        if HAS_D:
            tl.store(dD_ptr + program * dim + cd, dD_acc)
        if HAS_BIAS:
            tl.store(dbias_ptr + program * dim + cd, dbias_acc)
        if HAS_H0:
            if pid_s == 0:
                tl.store(_dn(dh0_ptr + pid_b * dim * DSTATE, cn, cd, DSTATE), g, mask=mask_n[:, None])


# ----------------------------------------------------------------------------------------------------------------
# The plan of a call, and the autograd wrapper
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """How a scan is cut: CHUNK steps per register tile, SEG per kept state, SPAN per program; channel blocks."""
    chunk: int
    seg: int
    span: int
    block_d: int
    block_n: int


def plan(batch: int, dim: int, dstate: int, groups: int, length: int, device: torch.device,
         chunk: int | None = None, seg: int | None = None, span: int | None = None) -> Plan:
    """The default tiles; chunk, seg, span may be overridden (small in tests). A chunk is 4 steps (the backward
    holds a chunk's states in registers, 4 N per thread); a state is kept every 128 steps (for N = 16 below 1/8 of
    u's size in fp32); spans: as few as give WARPS_PER_SM warps per SM."""
    block_n = 1 << max(dstate - 1, 0).bit_length()
    block_d = 32
    while (dim // groups) % block_d:
        block_d //= 2
    chunk = chunk or 4
    seg = seg or 128
    if span is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" \
            else SMS_WITHOUT_GPU
        n_span = min(triton.cdiv(length, seg), max(1, math.ceil(WARPS_PER_SM * sms / (batch * dim // block_d))))
        span = triton.cdiv(triton.cdiv(length, seg), n_span) * seg
    if chunk & (chunk - 1) or seg % chunk or span % seg:
        raise ValueError(f"chunk must be a power of two dividing seg, and seg divide span; got {chunk}, {seg}, {span}")
    return Plan(chunk, seg, span, block_d, block_n)


def _strides(t: Tensor | None) -> tuple[int, ...]:
    return (0, 0, 0) if t is None else t.stride()


def _given(tensors: list[Tensor | None], ref: Tensor) -> list[Tensor]:
    """The tensors, with a 1-element placeholder for each absent one (its kernel flag says not to read it)."""
    placeholder = ref.new_empty(1)
    return [placeholder if t is None else t for t in tensors]


def _on(device: torch.device):
    """Launch on the tensors' GPU, whichever is current (Triton launches on the current one)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, tiles, need_grad):
        batch, dim, length = u.shape
        dstate = A.shape[1]
        n_seg, n_span = triton.cdiv(length, tiles.seg), triton.cdiv(length, tiles.span)
        f32 = dict(dtype=torch.float32, device=u.device)
        y = torch.empty_like(delta, dtype=u.dtype)                         # laid out like Δ (Mamba: (B, L, D))
        last = torch.empty(batch, dim, dstate, **f32)
        states = torch.empty(batch, n_seg - 1 if need_grad else 0, dstate, dim, **f32)  # kept for the backward
        part, dtsum = torch.empty(batch, n_span, dstate, dim, **f32), torch.empty(batch, n_span, dim, **f32)
        flags = dict(DSTATE=dstate, BLOCK_N=tiles.block_n, BLOCK_D=tiles.block_d, CHUNK=tiles.chunk,
                     SEG=tiles.seg, SPAN=tiles.span, HAS_D=D is not None, HAS_Z=z is not None,
                     HAS_BIAS=delta_bias is not None, HAS_H0=initial_state is not None,
                     SOFTPLUS=bool(delta_softplus), num_warps=1)
        args = (*_given([u, delta, z, y, A, B, C, D, delta_bias, initial_state, states, part, dtsum, last], u),
                *u.stride(), *delta.stride(), *_strides(z), *y.stride(), *B.stride(), *C.stride(), 1,
                dim, length, dim // B.shape[1], n_seg, n_span)
        with _on(u.device):
            if n_span > 1:                                                 # spans 0 ... n_span - 2 from h = 0
                _scan_fwd[(batch, dim // tiles.block_d, n_span - 1)](*args, **flags, LOCAL=True, STORE_STATES=False)
            _scan_fwd[(batch, dim // tiles.block_d, n_span)](*args, **flags, LOCAL=False, STORE_STATES=need_grad)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, states)
        ctx.flags, ctx.tiles = flags, tiles
        return y, last

    @staticmethod
    def backward(ctx, dy, dlast):
        u, delta, A, B, C, D, z, delta_bias, initial_state, states = ctx.saved_tensors
        tiles, flags = ctx.tiles, ctx.flags
        batch, dim, length = u.shape
        dstate, blocks = A.shape[1], dim // tiles.block_d
        n_seg, n_span = triton.cdiv(length, tiles.seg), triton.cdiv(length, tiles.span)
        f32 = dict(dtype=torch.float32, device=u.device)
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dz = torch.empty_like(z) if z is not None else None
        dA = torch.empty(batch * n_span, dim, dstate, **f32)               # per program, summed below
        dB, dC = torch.zeros(B.shape, **f32), torch.zeros(C.shape, **f32)  # added to by every channel block
        dD = torch.empty(batch * n_span, dim, **f32) if D is not None else None
        dbias = torch.empty(batch * n_span, dim, **f32) if delta_bias is not None else None
        dh0 = torch.empty(batch, dim, dstate, **f32) if initial_state is not None else None
        part, dtsum = torch.empty(batch, n_span, dstate, dim, **f32), torch.empty(batch, n_span, dim, **f32)
        scratch = torch.empty(batch * blocks * n_span, tiles.seg // tiles.chunk, tiles.block_n, tiles.block_d, **f32)
        args = (*_given([u, delta, z, dy, du, ddelta, dz, A, B, C, D, delta_bias, initial_state,
                         None if dlast is None else dlast.contiguous(), states, part, dtsum, scratch,
                         dA, dB, dC, dD, dbias, dh0], u),
                *u.stride(), *delta.stride(), *_strides(z), *dy.stride(), *du.stride(), *ddelta.stride(),
                *_strides(dz), *B.stride(), *C.stride(), 1, dim, length, B.shape[1], dim // B.shape[1], n_seg, n_span)
        with _on(u.device):
            if n_span > 1:                                                 # spans 1 ... n_span - 1 from g = 0
                _scan_bwd[(batch, blocks, n_span - 1)](*args, **flags, LOCAL=True, HAS_DLAST=dlast is not None)
            _scan_bwd[(batch, blocks, n_span)](*args, **flags, LOCAL=False, HAS_DLAST=dlast is not None)
        return (du, ddelta, dA.sum(0).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
                None if D is None else dD.sum(0).to(D.dtype), dz,
                None if delta_bias is None else dbias.sum(0).to(delta_bias.dtype),
                None if initial_state is None else dh0, None, None, None)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False, initial_state: Tensor | None = None,
                   chunk: int | None = None, seg: int | None = None, span: int | None = None):
    """The selective scan of eqs. (3)-(6) with Triton kernels; inputs as checked by `scan.selective_scan`.

    u, delta, z: (batch, D, L), any strides, fp32/fp16/bf16; A: (D, N); B, C: (batch, G, N, L), any strides;
    D, delta_bias: (D,); initial_state: (batch, D, N). Returns y (batch, D, L) in u's dtype (laid out like delta)
    and, if return_last_state, the last state (batch, D, N) fp32. Differentiable in every tensor argument.
    chunk, seg, span override the plan (see `plan`).
    """
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                for t in (u, delta, A, B, C, D, z, delta_bias, initial_state))
    batch, dim, length = u.shape
    tiles = plan(batch, dim, A.shape[1], B.shape[1], length, u.device, chunk, seg, span)
    small = lambda t: None if t is None else t.float().contiguous()  # noqa: E731  A, D, delta_bias, h0: tiny
    y, last = _SelectiveScan.apply(u, delta, small(A), B, C, small(D), z, small(delta_bias), small(initial_state),
                                   bool(delta_softplus), tiles, need_grad)
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
    """One decode step of eqs. (3)-(6) with a Triton kernel; inputs as checked by `scan.selective_state_update`.

    state: (batch, D, N) fp32 contiguous, updated in place; x, dt, z: (batch, D); A: (D, N); B, C: (batch, G, N);
    D, dt_bias: (D,). Returns y (batch, D) in x's dtype. Not differentiable (inference only).
    """
    batch, dim = x.shape
    dstate = A.shape[1]
    block_n = 1 << max(dstate - 1, 0).bit_length()
    block_d = 32 if block_n <= 16 else max(1, 512 // block_n)  # 32 channels x N for N <= 16
    y = torch.empty_like(x)
    tensors = [None if t is None else t.contiguous() for t in (x, dt, A, B, C, D, z, dt_bias)]  # (batch, D): small
    with _on(x.device):
        _state_update_kernel[(triton.cdiv(dim, block_d), batch)](
            state, *_given(tensors, x), y, dim, B.shape[1], dim // B.shape[1], DSTATE=dstate, HAS_D=D is not None,
            HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), BLOCK_D=block_d,
            BLOCK_N=block_n)
    return y
