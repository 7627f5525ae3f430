"""Triton kernels for the selective scan of eqs. (3)-(6): forward, backward and the one-token decode step.

Same arguments and results as `scan.selective_scan_ref`; the tensors arrive checked by `scan.selective_scan` (B and C
grouped as (batch, G, N, L)), and this module trusts them. Glossary of the kernels:
    h       h_t        the N states of a block of channels after step t, eq. (5)    (BLOCK_N, BLOCK_D) fp32
    a       Ā_t        exp(Δ_t A), eq. (3), computed as exp2(Δ_t log2(e) A)         (BLOCK_N, BLOCK_D)
    x, dt   x_t, Δ_t   one step's input and time step (after bias and softplus)     (BLOCK_D,)
    Bt, Ct  B_t, C_t   one step's projections, the same for the block's channels   (BLOCK_N,)
    ds      ∂L/∂s_t    the gradient reaching s_t = C_t h_t, eq. (6), through the gate and skip
    dh      ∂L/∂h_t    through eq. (6) at t and eq. (5) at t + 1                    (BLOCK_N, BLOCK_D)
    g       Ā_t ∂L/∂h_t, what step t hands back to step t - 1                     (BLOCK_N, BLOCK_D)

The design, argued from the compiled code in BENCHMARKS.md: a program is one warp, 32 channels of one batch element,
one per thread, each keeping its channel's N states in registers and walking time step by step, CHUNK steps
unrolled. The channel strides and `unit` (= 1) are not specialised, so Triton keeps that one layout for every tensor
and reads strided views in place. With few warps, time is cut into spans run in parallel: a LOCAL launch keeps each
span's end state and Σ Δ (Π_t Ā_t over a span is exp(A Σ_t Δ_t)), folded into the start of the spans after it. For
training one state is kept per SEG steps; the backward recomputes a segment's chunk-start states into a scratch, then
walks back chunk by chunk (no reverse `associative_scan`: its lowering with a non-commutative combine has been
reported wrong on GPUs). N is padded to BLOCK_N (A = 0 there: the padded states stay 0); BLOCK_D divides D / G.
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
# Run-time values, never specialised: Triton then cannot tell which axis is contiguous (see the module docstring).
_CHANNEL_STRIDES = ["su_d", "sv_d", "sz_d", "sy_d", "sg_d", "sr_d", "sq_d", "unit"]


@triton.jit
def _delta(raw, SOFTPLUS: tl.constexpr):
    """Δ from delta + delta_bias: softplus(x) = log1p(e^x) for x <= 20, x above (as mamba_ssm's kernels do)."""
    if SOFTPLUS:
        e = tl.exp(tl.minimum(raw, 20.0))
        one_e = 1.0 + e
        log1p = tl.where(one_e == 1.0, e, tl.log(one_e) * (e / (one_e - 1.0)))  # log1p to full precision
        raw = tl.where(raw <= 20.0, log1p, raw)
    return raw


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
def _rows(u_ptr, delta_ptr, z_ptr, y_ptr, B_ptr, C_ptr, pid_b, offs_d, offs_n, group,
          su_b, su_d, sv_b, sv_d, sz_b, sz_d, sy_b, sy_d, sB_b, sB_g, sB_n, sC_b, sC_g, sC_n):
    """A program's rows at t = 0: its channels of u, delta, z and y (or dy); its group's states of B and C."""
    return (u_ptr + pid_b * su_b + offs_d * su_d, delta_ptr + pid_b * sv_b + offs_d * sv_d,
            z_ptr + pid_b * sz_b + offs_d * sz_d, y_ptr + pid_b * sy_b + offs_d * sy_d,
            B_ptr + pid_b * sB_b + group * sB_g + offs_n * sB_n, C_ptr + pid_b * sC_b + group * sC_g + offs_n * sC_n)


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
def _walk(h, A, bias, u_p, delta_p, B_p, t0, su_t, sv_t, sB_t, length, offs_d, offs_n, mask_n,
          CHUNK: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """Eqs. (3)-(5) over the CHUNK steps from t0: the state after them, and their states (CHUNK, BLOCK_N, BLOCK_D)."""
    t = tl.cast(t0, tl.int64)
    hs = tl.zeros((CHUNK, h.shape[0], h.shape[1]), dtype=tl.float32)
    for k in tl.static_range(CHUNK):
        live = offs_d * 0 + t0 + k < length
        x, dt, _ = _inputs(u_p + t * su_t + k * su_t, delta_p + t * sv_t + k * sv_t, bias, live, HAS_BIAS, SOFTPLUS)
        Bt = tl.load(B_p + t * sB_t + k * sB_t, mask=mask_n & (offs_n * 0 + t0 + k < length), other=0.0)
        h = _advance(h, A, dt, x, Bt.to(tl.float32))
        hs = tl.where(tl.arange(0, CHUNK)[:, None, None] == k, h[None, :, :], hs)
    return h, hs


@triton.jit
def _fold(h, A, part, dtsum, s, offs_n, cd, dim, DSTATE: tl.constexpr):
    """Carry h across span s whose own result is part[s]: h <- Π_t Ā_t h + part[s], Π_t Ā_t = exp(A Σ_t Δ_t)."""
    decay = tl.exp2(A * (tl.load(dtsum + s * dim + cd) * LOG2E)[None, :])
    return decay * h + tl.load(_nd(part + s * DSTATE * dim, offs_n, cd, dim), mask=offs_n[:, None] < DSTATE,
                               other=0.0)


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
    u_p, delta_p, z_p, y_p, B_p, C_p = _rows(u_ptr, delta_ptr, z_ptr, y_ptr, B_ptr, C_ptr, pid_b, offs_d, offs_n, group,
                                             su_b, su_d, sv_b, sv_d, sz_b, sz_d, sy_b, sy_d, sB_b, sB_g, sB_n, sC_b,
                                             sC_g, sC_n)
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
        t = tl.cast(t0, tl.int64)                                          # 64-bit offsets along time
        for k in tl.static_range(CHUNK):                                   # step t = t0 + k
            live = offs_d * 0 + t0 + k < length                           # (tensors: t0 may be an int, interpreted)
            live_n = mask_n & (offs_n * 0 + t0 + k < length)
            x, dt, _ = _inputs(u_p + t * su_t + k * su_t, delta_p + t * sv_t + k * sv_t, bias, live, HAS_BIAS,
                               SOFTPLUS)
            Bt = tl.load(B_p + t * sB_t + k * sB_t, mask=live_n, other=0.0).to(tl.float32)
            h = _advance(h, A, dt, x, Bt)                                  # eqs. (3)-(5)
            dt_total += dt
            if not LOCAL:
                Ct = tl.load(C_p + t * sC_t + k * sC_t, mask=live_n, other=0.0).to(tl.float32)
                y = tl.sum(h * Ct[:, None], axis=0)                        # eq. (6)  y = C h
                if HAS_D:
                    y += Dskip * x                                         # skip D x
                if HAS_Z:
                    z = tl.load(z_p + t * sz_t + k * sz_t, mask=live, other=0.0).to(tl.float32)
                    y *= z * tl.sigmoid(z)                                 # gate y silu(z)
                tl.store(y_p + t * sy_t + k * sy_t, y.to(y_ptr.dtype.element_ty), mask=live)

    if LOCAL:
        tl.store(_nd(part + pid_s * DSTATE * dim, offs_n, cd, dim), h, mask=mask_n[:, None])
        tl.store(dtsum + pid_s * dim + cd, dt_total)
    elif pid_s == n_span - 1:
        tl.store(_dn(last_ptr + pid_b * dim * DSTATE, cn, cd, DSTATE), h, mask=mask_n[:, None])


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
    u_p, delta_p, z_p, dy_p, B_p, C_p = _rows(u_ptr, delta_ptr, z_ptr, dy_ptr, B_ptr, C_ptr, pid_b, offs_d, offs_n,
                                              group, su_b, su_d, sv_b, sv_d, sz_b, sz_d, sy_b, sy_d, sB_b, sB_g, sB_n,
                                              sC_b, sC_g, sC_n)
    du_p = du_ptr + pid_b * sg_b + offs_d * sg_d
    ddelta_p = ddelta_ptr + pid_b * sr_b + offs_d * sr_d
    dz_p = dz_ptr + pid_b * sq_b + offs_d * sq_d
    dB_p = dB_ptr + ((pid_b * n_groups + group) * DSTATE + offs_n) * length  # (batch, G, N, L)
    dC_p = dC_ptr + ((pid_b * n_groups + group) * DSTATE + offs_n) * length
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
                tl.store(scratch + c * BLOCK_N * BLOCK_D + scratch_nd, h)
                h, _ = _walk(h, A, bias, u_p, delta_p, B_p, s_begin + c * CHUNK, su_t, sv_t, sB_t, length, offs_d,
                             offs_n, mask_n, CHUNK, HAS_BIAS, SOFTPLUS)

        for j in range(0, n_chunks):                                       # backward, chunk by chunk
            t0 = s_begin + (n_chunks - 1 - j) * CHUNK
            t = tl.cast(t0, tl.int64)
            if not LOCAL:                                                  # the chunk's states, eq. (5) again
                h = tl.load(scratch + (n_chunks - 1 - j) * BLOCK_N * BLOCK_D + scratch_nd)
                _, hs = _walk(h, A, bias, u_p, delta_p, B_p, t0, su_t, sv_t, sB_t, length, offs_d, offs_n, mask_n,
                              CHUNK, HAS_BIAS, SOFTPLUS)
            for r in tl.static_range(CHUNK - 1, -1, -1):                   # step t = t0 + r, backwards
                live = offs_d * 0 + t0 + r < length
                live_n = mask_n & (offs_n * 0 + t0 + r < length)
                x, dt, raw = _inputs(u_p + t * su_t + r * su_t, delta_p + t * sv_t + r * sv_t, bias, live, HAS_BIAS,
                                     SOFTPLUS)
                dy = tl.load(dy_p + t * sy_t + r * sy_t, mask=live, other=0.0).to(tl.float32)
                ds = dy                                                    # ∂L/∂s, s = C h: through the gate
                if HAS_Z:
                    z = tl.load(z_p + t * sz_t + r * sz_t, mask=live, other=0.0).to(tl.float32)
                    sig = tl.sigmoid(z)
                    ds = dy * z * sig
                Ct = tl.load(C_p + t * sC_t + r * sC_t, mask=live_n, other=0.0).to(tl.float32)
                a = tl.exp2((dt * LOG2E)[None, :] * A)                     # eq. (3)
                dh = g + Ct[:, None] * ds[None, :]                         # ∂L/∂h_t
                g = a * dh                                                 # handed to h_{t-1} through eq. (5)
                if LOCAL:
                    dt_total += dt
                else:
                    Bt = tl.load(B_p + t * sB_t + r * sB_t, mask=live_n, other=0.0).to(tl.float32)
                    h = tl.sum(tl.where(offs_t[:, None, None] == r, hs, -0.0), axis=0)  # row r: free in registers
                    ah = dh * (h - (dt * x)[None, :] * Bt[:, None])        # ∂L/∂Ā · Ā; Ā h_{t-1} = h_t - B̄x
                    dA_acc += ah * dt[None, :]                             # ∂/∂A of eq. (3)
                    dhB = tl.sum(dh * Bt[:, None], axis=0)                 # Σ_n ∂L/∂h B
                    du = dt * dhB                                          # ∂/∂x of eq. (4)
                    if HAS_D:
                        du += Dskip * ds
                        dD_acc += ds * x
                    ddt = dhB * x + tl.sum(ah * A, axis=0)                 # ∂L/∂Δ
                    if SOFTPLUS:
                        ddt *= tl.where(raw <= 20.0, tl.sigmoid(raw), 1.0)  # softplus', 1 above 20
                    ddt = tl.where(live, ddt, 0.0)
                    dbias_acc += ddt
                    tl.store(du_p + t * sg_t + r * sg_t, du.to(du_ptr.dtype.element_ty), mask=live)
                    tl.store(ddelta_p + t * sr_t + r * sr_t, ddt.to(ddelta_ptr.dtype.element_ty), mask=live)
                    if HAS_Z:
                        y = tl.sum(h * Ct[:, None], axis=0)                # eq. (6) again, for the gate's gradient
                        if HAS_D:
                            y += Dskip * x
                        dz = dy * y * sig * (1.0 + z * (1.0 - sig))        # silu'(z)
                        tl.store(dz_p + t * sq_t + r * sq_t, dz.to(dz_ptr.dtype.element_ty), mask=live)
                    tl.atomic_add(dB_p + t + r, tl.sum(dh * (dt * x)[None, :], axis=1), mask=live_n,
                                  sem="relaxed")                           # ∂/∂B of eq. (4), Σ over channels
                    tl.atomic_add(dC_p + t + r, tl.sum(h * ds[None, :], axis=1), mask=live_n,
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


@dataclass(frozen=True)
class Plan:
    """How a scan is cut along time (span s covers [s·SPAN, (s+1)·SPAN)) and along channels and states."""
    chunk: int  # CHUNK steps unrolled in the code (their loads issued together)
    seg: int    # SEG steps between two states kept for the backward, a multiple of CHUNK
    span: int   # SPAN steps walked by one program, a multiple of SEG
    block_d: int
    block_n: int


def plan(batch: int, dim: int, dstate: int, groups: int, length: int, device: torch.device,
         chunk: int | None = None, seg: int | None = None, span: int | None = None) -> Plan:
    """The default tiles; chunk, seg, span may be overridden (small in tests). A chunk is 4 steps (the backward
    holds a chunk's states in registers, 4 N per thread); a state is kept every 128 steps (for N = 16 below 1/8 of
    u's size in fp32); spans: as few as give WARPS_PER_SM warps per SM."""
    block_n = triton.next_power_of_2(dstate)
    block_d = math.gcd(32, dim // groups)  # a power of two dividing D / G: a block reads one group of B, C
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
    return [ref.new_empty(1) if t is None else t for t in tensors]


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
        dD, dbias = torch.empty(batch * n_span, dim, **f32), torch.empty(batch * n_span, dim, **f32)
        dh0 = torch.empty(batch, dim, dstate, **f32)
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


@triton.jit
def _state_update_kernel(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
                         dim, n_groups, channels_per_group,
                         DSTATE: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                         SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Eqs. (3)-(6) at one step for the block of channels of program (batch element, block); state updated in place."""
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d, cd, offs_n, cn, mask_n, group, A, Dskip, bias = _program(
        A_ptr, D_ptr, bias_ptr, 1, channels_per_group, DSTATE, BLOCK_N, BLOCK_D, HAS_D, HAS_BIAS)
    state = _dn(state_ptr + pid_b * dim * DSTATE, cn, cd, DSTATE)
    x, dt, _ = _inputs(x_ptr + pid_b * dim + offs_d, dt_ptr + pid_b * dim + offs_d, bias, offs_d < dim, HAS_BIAS,
                       SOFTPLUS)
    bc = (pid_b * n_groups + group) * DSTATE + offs_n
    Bt = tl.load(B_ptr + bc, mask=mask_n, other=0.0).to(tl.float32)
    h = _advance(tl.load(state, mask=mask_n[:, None], other=0.0), A, dt, x, Bt)  # eqs. (3)-(5)
    tl.store(state, h, mask=mask_n[:, None])
    Ct = tl.load(C_ptr + bc, mask=mask_n, other=0.0).to(tl.float32)
    y = tl.sum(h * Ct[:, None], axis=0) + Dskip * x                        # eq. (6), skip D x
    if HAS_Z:
        z = tl.load(z_ptr + pid_b * dim + offs_d).to(tl.float32)
        y *= z * tl.sigmoid(z)                                             # gate y silu(z)
    tl.store(y_ptr + pid_b * dim + offs_d, y.to(y_ptr.dtype.element_ty))


def selective_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Tensor | None = None, z: Tensor | None = None, dt_bias: Tensor | None = None,
                           dt_softplus: bool = False) -> Tensor:
    """One decode step of eqs. (3)-(6) with a Triton kernel; inputs as checked by `scan.selective_state_update`.

    state: (batch, D, N) fp32 contiguous, updated in place; x, dt, z: (batch, D); A: (D, N); B, C: (batch, G, N);
    D, dt_bias: (D,). Returns y (batch, D) in x's dtype. Not differentiable (inference only).
    """
    batch, dim = x.shape
    tiles = plan(batch, dim, A.shape[1], B.shape[1], 1, x.device)
    y = torch.empty_like(x)
    tensors = [None if t is None else t.contiguous() for t in (x, dt, A, B, C, D, z, dt_bias)]  # (batch, D): small
    with _on(x.device):
        _state_update_kernel[(batch, dim // tiles.block_d)](
            state, *_given(tensors, x), y, dim, B.shape[1], dim // B.shape[1], DSTATE=A.shape[1], HAS_D=D is not None,
            HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), BLOCK_D=tiles.block_d,
            BLOCK_N=tiles.block_n, num_warps=1)
    return y
