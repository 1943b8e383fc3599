"""Triton kernels for both directions of one logit matrix, each tile computed once.

    L = scale * x y^T            (R x C; never stored)
    lse_x_i = logsumexp_j L_ij   lse_y_j = logsumexp_i L_ij

Two users: CLIP (x images, y texts: both directions of the same logits) and NT-Xent
on one process (y is x: L = scale * Z Z^T is symmetric, with or without the diagonal,
so lse_x = lse_y and only the tiles on and above the diagonal are visited).

Forward: the program of row tile I walks its column tiles J and adds each tile's
exponentials to its rows' sums (in registers) and to the columns' sums (atomics), so
one pass over the tiles gives both log-sum-exps. Atomics rule out an online max, so
every row gets a fixed shift m_i chosen beforehand in O((R + C) D): with the bound
b_i = |scale| |x_i| max_j |y_j| >= |L_ij| (Cauchy-Schwarz) and an anchor logit
a_i = L_i,pi(i) <= lse_i (one included column), m_i = max(b_i - 60, min(b_i, a_i + 16)).
Then no term exceeds e^60 (no overflow), and the sum holds the anchor's term
e^(a_i - m_i) >= e^-16 unless b_i - a_i > 76 (only for |scale| > 38 on normalized
features). A finalize kernel turns (m, sum) into lse and, for any row whose sum is
below e^-50 (where flushed subnormal terms could matter) or infinite (fp32 rounding
of logits beyond ~1e8 can pass the bound), recomputes that row tile
with the online max of the one-direction kernel: exact in every case, and free when
no row needs it (the common case: one load per row).

Backward: P_ij = exp(L_ij - lse_x_i), P'_ij = exp(L_ij - lse_y_j) and
W = g_i P + h_j P' give dx = scale W y and dy = scale W^T x from the same tile: dx
accumulates in registers along the row tile's walk, dy by atomics per tile. On the
symmetric matrix (h = g, P' = P^T) one visit of the tile pair (I, J) gives both
dz_I += scale W z_J and dz_J += scale W^T z_I.

Work per step against the one-direction kernels (sslfast/kernels/dot_lse.py, which
visit every ordered tile), dots in R C D FLOPs and exponentials in R C: NT-Xent
forward 1 and 1 (was 2 and 1), backward 3 and 1 (was 4 and 2); CLIP forward 2 and 2
(was 4 and 2), backward 6 and 2 (was 8 and 4). Tiles whose shifts or lse lie close
together (the common case, see _ONE_EXP_SPREAD) take one exp2 per entry for both
directions, halving those exponentials. Atomic float adds make the
summation order vary run to run (results equal within rounding); under
torch.use_deterministic_algorithms(True) the launchers use the atomic-free
one-direction kernels instead.
"""

import torch
import triton
import triton.language as tl

from sslfast.kernels.dot_lse import (
    _INTERPRET,
    _LOG2E,
    _SIZE_KEY,
    _check_config,
    _check_qk,
    _check_splits,
    _ieee,
    _mm,
    _on_device,
    _online_lse,
    _pick_config,
    _prune_by_d,
    _resident_tile,
    _row_vector,
    _scale_tensor,
    _score_tile,
    _sm_count,
    dot_lse_backward,
    dot_lse_forward,
)

__all__ = ["dot_lse_pair_forward", "dot_lse_pair_backward"]

# Shift rule (natural-log units): terms stay below e^_SHIFT_CEIL, the anchor's term
# above e^-_ANCHOR_ROOM. (The finalize kernel recomputes a row whose sum is below 2^-48.)
_SHIFT_CEIL = 60.0
_ANCHOR_ROOM = 16.0
# A tile whose row and column shifts (forward) or lse (backward) lie within this many
# log2 units of each other takes one exp2 per entry for both directions
# (_tile_sums, _pair_weights). On normalized features NT-Xent's shifts lie within
# 2 |scale| - 16 nats of each other (forward: always at |scale| <= 16) and its lse within
# 2 |scale| (backward: always at |scale| <= 8; in practice the rows' lse are close).
_ONE_EXP_SPREAD = 24.0


@triton.jit
def _range(u, u_ok):
    """(largest, smallest) of a vector's valid entries (a row tile's: once per program)."""
    return (tl.max(tl.where(u_ok, u, float("-inf")), 0),
            tl.min(tl.where(u_ok, u, float("inf")), 0))


@triton.jit
def _spread(r_hi, r_lo, v, v_ok):
    """(largest, largest - smallest) over a row tile's range and a vector's valid entries."""
    v_hi, v_lo = _range(v, v_ok)
    hi = tl.maximum(r_hi, v_hi)
    return hi, hi - tl.minimum(r_lo, v_lo)


@triton.jit
def _tile_sums(s2, ok, m_row, m_col, row_ok, col_ok, r_hi, r_lo, one_exp_spread):
    """Row sums and column sums of exp2(s2 - shift) over a tile's included entries.
    Where the tile's shifts lie within one_exp_spread (log2 units) of each other: one
    exp2 per entry, 2^(s2 - c) with c the largest shift, scaled per row and column by
    2^(c - shift) (a term it flushes is below 2^(spread - 126) of its own shift:
    nothing a sum needs). Else one exp2 per entry and direction. (r_hi, r_lo): the
    range of m_row."""
    hi, spread = _spread(r_hi, r_lo, m_col, col_ok)
    if spread <= one_exp_spread:
        e = tl.where(ok, tl.exp2(s2 - hi), 0.0)
        row = tl.sum(e, 1) * tl.exp2(tl.where(row_ok, hi - m_row, 0.0))
        col = tl.sum(e, 0) * tl.exp2(tl.where(col_ok, hi - m_col, 0.0))
    else:
        row = tl.sum(tl.where(ok, tl.exp2(s2 - m_row[:, None]), 0.0), 1)
        col = tl.sum(tl.where(ok, tl.exp2(s2 - m_col[None, :]), 0.0), 0)
    return row, col


@triton.jit
def _pair_weights(s2, ok, lse2_r, lse2_c, g_r, g_c, row_ok, col_ok, r_hi, r_lo,
                  one_exp_spread):
    """W = g_i 2^(s2 - lse2_i) + g_j 2^(s2 - lse2_j) over a tile's included entries.
    Where the tile's lse lie within one_exp_spread of each other: one exp2 per entry,
    2^(s2 - c) (<= 1: c is the largest lse) times g_i 2^(c - lse2_i) + g_j 2^(c - lse2_j).
    Else (an empty row's lse is -inf, too) one exp2 per entry and direction, where()
    first: the exp2 of an excluded entry of an empty row overflows, unselected.
    (r_hi, r_lo): the range of lse2_r."""
    hi, spread = _spread(r_hi, r_lo, lse2_c, col_ok)
    if spread <= one_exp_spread:
        a_r = g_r * tl.exp2(tl.where(row_ok, hi - lse2_r, 0.0))
        a_c = g_c * tl.exp2(tl.where(col_ok, hi - lse2_c, 0.0))
        w = tl.where(ok, tl.exp2(s2 - hi), 0.0) * (a_r[:, None] + a_c[None, :])
    else:
        p = tl.where(ok, tl.exp2(s2 - lse2_r[:, None]), 0.0)
        p_t = tl.where(ok, tl.exp2(s2 - lse2_c[None, :]), 0.0)
        w = p * g_r[:, None] + p_t * g_c[None, :]
    return w


@triton.jit
def _row_tile(x_ptr, R, stride_x, D, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
              SINGLE_D: tl.constexpr):
    """This program's row tile: its index, its split index and the splits' count, rows,
    their mask, the D offsets, row pointers and the resident tile (when D is one chunk).
    The grid is one axis of row tiles x splits, a row tile's splits one after another
    (axis 0 holds 2^31 - 1 programs; axis 1 would cap the row tiles at 65535)."""
    n_split = tl.num_programs(0) // tl.cdiv(R, BLOCK)
    pid = tl.program_id(0) // n_split
    pid_s = tl.program_id(0) % n_split
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < R
    offs_d = tl.arange(0, BLOCK_D)
    x_rows_ptr = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    x_res = _resident_tile(x_rows_ptr, row_ok, offs_d, D,
                           tl.zeros([BLOCK, BLOCK_D], dtype=x_ptr.dtype.element_ty), SINGLE_D)
    return pid, pid_s, n_split, rows, row_ok, offs_d, x_rows_ptr, x_res


@triton.jit
def _dot_lse_pair_fwd_kernel(
    x_ptr, y_ptr, scale_ptr, shift_x_ptr, shift_y_ptr, sum_x_ptr, sum_y_ptr,
    R, C, stride_x, stride_y, one_exp_spread,
    D, SYMMETRIC: tl.constexpr, EXCLUDE_DIAG: tl.constexpr, IEEE: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr,
):
    """One program per (row tile I, split s of its column tiles). Adds sum_j exp2(s2_ij -
    shift_x_i) to sum_x and sum_i exp2(s2_ij - shift_y_j) to sum_y (zeroed by the caller).
    SYMMETRIC (y is x, sum_y is sum_x): split 0 takes the diagonal tile (rows only, the
    diagonal itself left out if EXCLUDE_DIAG), then the splits share the tiles J > I."""
    LOG2E: tl.constexpr = 1.4426950408889634
    pid, pid_s, n_split, rows, row_ok, offs_d, x_rows_ptr, x_res = _row_tile(
        x_ptr, R, stride_x, D, BLOCK, BLOCK_D, SINGLE_D)
    qk_scale = tl.load(scale_ptr).to(tl.float32) * LOG2E
    m_row = tl.load(shift_x_ptr + rows, mask=row_ok, other=0.0)
    r_hi, r_lo = _range(m_row, row_ok)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    j_first = pid_s
    if SYMMETRIC:
        if pid_s == 0:
            _, _, _, _, qk, ok = _score_tile(
                x_ptr, pid * BLOCK, R, stride_x, rows, row_ok, x_rows_ptr, x_res, offs_d, 0,
                D, EXCLUDE_DIAG, IEEE, BLOCK, BLOCK, BLOCK_D, SINGLE_D)
            acc += tl.sum(tl.where(ok, tl.exp2(qk * qk_scale - m_row[:, None]), 0.0), 1)
        j_first = pid + 1 + pid_s
    for jt in range(j_first, tl.cdiv(C, BLOCK), n_split):
        cols, col_ok, _, _, qk, ok = _score_tile(
            y_ptr, jt * BLOCK, C, stride_y, rows, row_ok, x_rows_ptr, x_res, offs_d, 0,
            D, False, IEEE, BLOCK, BLOCK, BLOCK_D, SINGLE_D)
        m_col = tl.load(shift_y_ptr + cols, mask=col_ok, other=0.0)
        row_part, col_part = _tile_sums(qk * qk_scale, ok, m_row, m_col, row_ok, col_ok,
                                        r_hi, r_lo, one_exp_spread)
        acc += row_part
        tl.atomic_add(sum_y_ptr + cols, col_part, mask=col_ok, sem="relaxed")
    tl.atomic_add(sum_x_ptr + rows, acc, mask=row_ok, sem="relaxed")


@triton.jit
def _dot_lse_pair_finalize_kernel(
    q_ptr, k_ptr, scale_ptr, shift_ptr, sum_ptr, lse_ptr,
    R, C, stride_q, stride_k,
    D, EXCLUDE_DIAG: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr,
):
    """lse = ln2 * (shift + log2(sum)) per row of q; a row tile holding a row whose sum
    is below 2^-48 or not finite is recomputed against all of k with an online max.
    2^-48: a one-exp tile (_tile_sums) flushes a term only below 2^(24 - 126) of its own
    shift, so even 2^24 flushed terms stay below 2^-78, 2^-30 of any sum kept."""
    LN2: tl.constexpr = 0.6931471805599453
    LOG2E: tl.constexpr = 1.4426950408889634
    FIX_BELOW: tl.constexpr = 3.552713678800501e-15  # 2^-48
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    total = tl.load(sum_ptr + rows, mask=row_ok, other=1.0)
    shift = tl.load(shift_ptr + rows, mask=row_ok, other=0.0)
    # Also an infinite sum: fp32 rounding of logits near 1e9 can exceed the shift's bound.
    bad = row_ok & ~((total >= FIX_BELOW) & (total < float("inf")))
    lse = (shift + tl.log2(total)) * LN2
    if tl.max(bad.to(tl.int32), 0) > 0:
        offs_d = tl.arange(0, BLOCK_D)
        q_rows_ptr = q_ptr + rows.to(tl.int64)[:, None] * stride_q
        q_res = _resident_tile(q_rows_ptr, row_ok, offs_d, D,
                               tl.zeros([BLOCK_R, BLOCK_D], dtype=q_ptr.dtype.element_ty),
                               SINGLE_D)
        qk_scale = tl.load(scale_ptr).to(tl.float32) * LOG2E
        m_i, l_i = _online_lse(k_ptr, 0, C, stride_k, rows, row_ok, q_rows_ptr, q_res, offs_d,
                               0, qk_scale, D, EXCLUDE_DIAG, IEEE,
                               BLOCK_R, BLOCK_C, BLOCK_D, SINGLE_D)
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        lse = tl.where(bad, (m_safe + tl.log2(l_i)) * LN2, lse)
    tl.store(lse_ptr + rows, lse, mask=row_ok)


@triton.jit
def _pair_grad_tile(w, x_res, y_res, x_rows_ptr, y_cols_ptr, dx_rows_ptr, dy_cols_ptr,
                    row_ok, col_ok, offs_d, out_mul, dx_acc, D, TO_DY: tl.constexpr,
                    IEEE: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr):
    """dx rows += W y_cols (into dx_acc when D is one chunk, else by atomics per chunk);
    if TO_DY, dy cols += W^T x_rows by atomics. Products scaled by out_mul."""
    if SINGLE_D:
        dx_acc += _mm(w.to(y_res.dtype), y_res, IEEE)
        if TO_DY:
            d_ok = offs_d[None, :] < D
            part = _mm(tl.trans(w).to(x_res.dtype), x_res, IEEE) * out_mul
            tl.atomic_add(dy_cols_ptr + offs_d[None, :], part, mask=col_ok[:, None] & d_ok,
                          sem="relaxed")
    else:
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            d_ok = dd[None, :] < D
            yc = tl.load(y_cols_ptr + dd[None, :], mask=col_ok[:, None] & d_ok, other=0.0)
            part = _mm(w.to(yc.dtype), yc, IEEE) * out_mul
            tl.atomic_add(dx_rows_ptr + dd[None, :], part, mask=row_ok[:, None] & d_ok,
                          sem="relaxed")
            if TO_DY:
                xc = tl.load(x_rows_ptr + dd[None, :], mask=row_ok[:, None] & d_ok, other=0.0)
                part_t = _mm(tl.trans(w).to(xc.dtype), xc, IEEE) * out_mul
                tl.atomic_add(dy_cols_ptr + dd[None, :], part_t, mask=col_ok[:, None] & d_ok,
                              sem="relaxed")
    return dx_acc


@triton.jit
def _dot_lse_pair_bwd_kernel(
    x_ptr, y_ptr, scale_ptr, lse_x_ptr, lse_y_ptr, g_x_ptr, g_y_ptr, g_norm_ptr,
    dx_ptr, dy_ptr, dscale_ptr,
    R, C, stride_x, stride_y, one_exp_spread,
    D, SYMMETRIC: tl.constexpr, EXCLUDE_DIAG: tl.constexpr, IEEE: tl.constexpr,
    NEED_DY: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr,
):
    """Gradients of sum_i g_i lse_x_i + sum_j h_j lse_y_j (g = g_x, h = g_y) into the
    zeroed float32 dx (R, D), dy (C, D) and per-row dscale partials dscale (R,), with the
    same walk as the forward (dy skipped unless NEED_DY; SYMMETRIC needs it: dy is dx).
    g and h are divided by g_norm (max |g|, |h|) inside the
    tile products, which keeps the low-precision operand W in [0, 2]."""
    LOG2E: tl.constexpr = 1.4426950408889634
    pid, pid_s, n_split, rows, row_ok, offs_d, x_rows_ptr, x_res = _row_tile(
        x_ptr, R, stride_x, D, BLOCK, BLOCK_D, SINGLE_D)
    dx_rows_ptr = dx_ptr + rows.to(tl.int64)[:, None] * D
    scale = tl.load(scale_ptr).to(tl.float32)
    qk_scale = scale * LOG2E
    g_norm = tl.load(g_norm_ptr).to(tl.float32)
    g_div = 1.0 / g_norm
    out_mul = scale * g_norm
    lse2_r = tl.load(lse_x_ptr + rows, mask=row_ok, other=0.0) * LOG2E
    g_r = tl.load(g_x_ptr + rows, mask=row_ok, other=0.0) * g_div
    r_hi, r_lo = _range(lse2_r, row_ok)
    dx_acc = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    ds_acc = tl.zeros([BLOCK], dtype=tl.float32)
    j_first = pid_s
    if SYMMETRIC:
        if pid_s == 0:
            # The diagonal tile holds both (i, j) and (j, i): rows only, and half of
            # sum W * qk (which counts every ordered pair twice).
            _, _, _, _, qk, ok = _score_tile(
                x_ptr, pid * BLOCK, R, stride_x, rows, row_ok, x_rows_ptr, x_res, offs_d, 0,
                D, EXCLUDE_DIAG, IEEE, BLOCK, BLOCK, BLOCK_D, SINGLE_D)
            w = _pair_weights(qk * qk_scale, ok, lse2_r, lse2_r, g_r, g_r, row_ok, row_ok,
                              r_hi, r_lo, one_exp_spread)
            ds_acc += 0.5 * tl.sum(w * qk, 1)
            dx_acc = _pair_grad_tile(w, x_res, x_res, x_rows_ptr, x_rows_ptr, dx_rows_ptr,
                                     dx_rows_ptr, row_ok, row_ok, offs_d, out_mul, dx_acc, D,
                                     False, IEEE, BLOCK_D, SINGLE_D)
        j_first = pid + 1 + pid_s
    for jt in range(j_first, tl.cdiv(C, BLOCK), n_split):
        cols, col_ok, y_cols_ptr, y_res, qk, ok = _score_tile(
            y_ptr, jt * BLOCK, C, stride_y, rows, row_ok, x_rows_ptr, x_res, offs_d, 0,
            D, False, IEEE, BLOCK, BLOCK, BLOCK_D, SINGLE_D)
        s2 = qk * qk_scale
        lse2_c = tl.load(lse_y_ptr + cols, mask=col_ok, other=0.0) * LOG2E
        g_c = tl.load(g_y_ptr + cols, mask=col_ok, other=0.0) * g_div
        w = _pair_weights(s2, ok, lse2_r, lse2_c, g_r, g_c, row_ok, col_ok, r_hi, r_lo,
                          one_exp_spread)
        ds_acc += tl.sum(w * qk, 1)
        dy_cols_ptr = dy_ptr + cols.to(tl.int64)[:, None] * D
        dx_acc = _pair_grad_tile(w, x_res, y_res, x_rows_ptr, y_cols_ptr, dx_rows_ptr,
                                 dy_cols_ptr, row_ok, col_ok, offs_d, out_mul, dx_acc, D,
                                 NEED_DY, IEEE, BLOCK_D, SINGLE_D)
    if SINGLE_D:
        tl.atomic_add(dx_rows_ptr + offs_d[None, :], dx_acc * out_mul,
                      mask=row_ok[:, None] & (offs_d[None, :] < D), sem="relaxed")
    tl.atomic_add(dscale_ptr + rows, ds_acc * g_norm, mask=row_ok, sem="relaxed")


# ----------------------------------------------------------------------------- configs

_INTERPRET_CONFIG = {"BLOCK": 32, "BLOCK_D": 64, "num_warps": 4, "num_stages": 1}
# SSLFAST_TRITON_AUTOTUNE=0 (the test suite): one config for the forward and the backward.
# 8 warps: the backward holds x and y tiles, a (64, BLOCK_D) fp32 accumulator and a
# W^T x product; 4 warps leave too few registers per thread for all of them.
_FIXED_GPU_CONFIG = {"BLOCK": 64, "BLOCK_D": 64, "num_warps": 8, "num_stages": 2}
# The finalize kernel runs its loop only for rows that need it: one fixed config.
_FINALIZE_CONFIG = {"BLOCK_R": 64, "BLOCK_C": 64, "num_warps": 4, "num_stages": 2}


def _cfg(b, bd, w, s):
    return triton.Config({"BLOCK": b, "BLOCK_D": bd}, num_warps=w, num_stages=s)


_FWD_CONFIGS = [
    _cfg(128, 64, 8, 3),
    _cfg(128, 128, 8, 2),
    _cfg(64, 64, 4, 3),
    _cfg(64, 128, 4, 3),
    _cfg(64, 128, 8, 2),
    _cfg(128, 32, 4, 4),
    _cfg(64, 256, 8, 2),  # D = 256 resident
]
# The backward holds a (BLOCK, BLOCK_D) fp32 accumulator and a W^T x product as well
# (no 128 x 128 tiles: their fp32 operands outgrow an A100's shared memory).
_BWD_CONFIGS = [
    _cfg(64, 64, 4, 2),
    _cfg(64, 128, 8, 2),
    _cfg(128, 64, 8, 2),
    _cfg(32, 128, 4, 3),
    _cfg(64, 32, 4, 3),
    _cfg(32, 256, 8, 2),  # D = 256 resident (no spills, Triton 3.6 for sm_90)
    _cfg(64, 256, 8, 1),
]
_single_d = triton.heuristics({"SINGLE_D": lambda a: a["D"] <= a["BLOCK_D"]})
# Outputs are atomically accumulated: the autotuner zeroes them before each trial.
# The problem size is in the key (R, C; the splits follow from them and the config).
_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=_SIZE_KEY + ["SYMMETRIC", "EXCLUDE_DIAG"],
                             reset_to_zero=["sum_x_ptr", "sum_y_ptr"],
                             prune_configs_by={"early_config_prune": _prune_by_d})(
    _single_d(_dot_lse_pair_fwd_kernel))
_bwd_tuned = triton.autotune(_BWD_CONFIGS,
                             key=_SIZE_KEY + ["SYMMETRIC", "EXCLUDE_DIAG", "NEED_DY"],
                             reset_to_zero=["dx_ptr", "dy_ptr", "dscale_ptr"],
                             prune_configs_by={"early_config_prune": _prune_by_d})(
    _single_d(_dot_lse_pair_bwd_kernel))

# Splits of each row tile's column tiles: enough programs for about four per SM, or
# eight on the symmetric triangle, whose row tile I holds T - I tiles: the grid is
# row tiles x splits on one axis, so programs are launched heaviest first (row tile
# 0's splits, then row tile 1's, ...) and the finer pieces fill the last wave
# (tools/grid_balance.py models it).
_PROGRAMS_PER_SM = 4
_PROGRAMS_PER_SM_SYMMETRIC = 8
_MAX_SPLITS = 64


def _auto_splits(row_tiles, col_tiles, sms, symmetric):
    """The splits of each row tile's column tiles, on a GPU with sms SMs."""
    per_sm = _PROGRAMS_PER_SM_SYMMETRIC if symmetric else _PROGRAMS_PER_SM
    return max(1, min(triton.cdiv(per_sm * sms, row_tiles), col_tiles, _MAX_SPLITS))


def _launch(kernel, tuned, config, R, C, D, splits, symmetric, *args):
    """Over a grid of row tiles x splits on axis 0; splits None: _auto_splits of the
    config's tiles (1 in the interpreter: tests pass splits explicitly). More splits
    than column tiles would only add idle programs: clamped."""
    config = _pick_config(config, _INTERPRET_CONFIG, _FIXED_GPU_CONFIG)
    sms = _sm_count(args[0].device)

    def grid(meta):
        rt, ct = triton.cdiv(R, meta["BLOCK"]), triton.cdiv(C, meta["BLOCK"])
        auto = 1 if sms is None else _auto_splits(rt, ct, sms, symmetric)
        return (max(1, min(splits or auto, ct)) * rt,)

    with _on_device(args[0]):
        if config is None:
            tuned[grid](*args)
            return
        _check_config(config, ("BLOCK", "BLOCK_D"))
        meta = {"BLOCK": config["BLOCK"], "BLOCK_D": config["BLOCK_D"]}
        kernel[grid(meta)](*args, **meta, SINGLE_D=D <= meta["BLOCK_D"],
                           num_warps=config.get("num_warps", 4),
                           num_stages=config.get("num_stages", 1))


def _use_atomics():
    return not torch.are_deterministic_algorithms_enabled()


# ----------------------------------------------------------------------------- launchers


def _shifts(x, y, scale_t, symmetric):
    """Per-row shifts (log2 units) of x's rows and y's rows; see the module docstring.
    O(R + C) float32 temporaries: no float32 copy of the features."""
    nx = torch.linalg.vector_norm(x, dim=1, dtype=torch.float32)
    s_abs = scale_t.abs()
    if symmetric:  # the anchor: the row half-way round (NT-Xent's positive)
        R, h = x.shape[0], x.shape[0] // 2
        dots = torch.cat([_row_dots(x[:R - h], x[h:]), _row_dots(x[R - h:], x[:h])])
        return _shift_rule(s_abs * nx * nx.max(), scale_t * dots), None
    ny = torch.linalg.vector_norm(y, dim=1, dtype=torch.float32)
    # the anchor: the matching row (CLIP's positive); 0 where there is none (R != C)
    m = min(x.shape[0], y.shape[0])
    diag = _row_dots(x[:m], y[:m])
    a_x = torch.zeros_like(nx)
    a_y = torch.zeros_like(ny)
    a_x[:m] = diag
    a_y[:m] = diag
    return (_shift_rule(s_abs * nx * ny.max(), scale_t * a_x),
            _shift_rule(s_abs * ny * nx.max(), scale_t * a_y))


def _row_dots(a, b):
    """a_i . b_i as float32 (rounded to the inputs' dtype: only a hint for the shift)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1).float()  # no (R, D) temporary


def _shift_rule(bound, anchor):
    m = torch.maximum(bound - _SHIFT_CEIL, torch.minimum(bound, anchor + _ANCHOR_ROOM))
    return (m * _LOG2E).contiguous()


def _finalize(q, k, scale_t, shift, total, exclude_diag):
    R, D = q.shape
    lse = torch.empty(R, dtype=torch.float32, device=q.device)
    block_d = _INTERPRET_CONFIG["BLOCK_D"] if _INTERPRET else min(
        128, max(16, triton.next_power_of_2(max(D, 1))))
    cfg = dict(_FINALIZE_CONFIG)
    if _INTERPRET:
        cfg["BLOCK_R"] = cfg["BLOCK_C"] = _INTERPRET_CONFIG["BLOCK"]
    with _on_device(q):
        _dot_lse_pair_finalize_kernel[(triton.cdiv(R, cfg["BLOCK_R"]),)](
            q, k, scale_t, shift, total, lse, R, k.shape[0], q.stride(0), k.stride(0),
            D, exclude_diag, _ieee(q.dtype),
            BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], BLOCK_D=block_d,
            SINGLE_D=D <= block_d, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return lse


def dot_lse_pair_forward(x, y, scale, *, exclude_diagonal=False, config=None, splits=None):
    """(lse_x (R,), lse_y (C,)) float32 over L = scale * x y^T: each row's and each
    column's log-sum-exp. y None: x against itself (symmetric L, lse_y is lse_x, the
    diagonal left out if exclude_diagonal; NT-Xent on one process). scale as in
    dot_lse_forward. config: None (autotune on GPU) or {"BLOCK", "BLOCK_D",
    "num_warps", "num_stages"}; splits: None or the number of programs sharing each
    row tile's column tiles. Deterministic mode: the one-direction kernels."""
    symmetric = y is None
    if not symmetric and exclude_diagonal:
        raise ValueError("exclude_diagonal needs y=None (the rows against themselves)")
    x, y = _check_qk(x, x if symmetric else y)
    _check_splits(splits)
    R, D = x.shape
    C = y.shape[0]
    scale_t = _scale_tensor(scale, x.device)
    if not _use_atomics() or R == 0 or C == 0:
        off = 0 if exclude_diagonal else None
        lse_x = dot_lse_forward(x, y, scale_t, off)
        return lse_x, (lse_x if symmetric else dot_lse_forward(y, x, scale_t))
    shift_x, shift_y = _shifts(x, y, scale_t, symmetric)
    sum_x = torch.zeros(R, dtype=torch.float32, device=x.device)
    sum_y = sum_x if symmetric else torch.zeros(C, dtype=torch.float32, device=x.device)
    _launch(
        _dot_lse_pair_fwd_kernel, _fwd_tuned, config, R, C, D, splits, symmetric,
        x, y, scale_t, shift_x, shift_x if symmetric else shift_y, sum_x, sum_y,
        R, C, x.stride(0), y.stride(0), _ONE_EXP_SPREAD,
        D, symmetric, bool(exclude_diagonal), _ieee(x.dtype),
    )
    lse_x = _finalize(x, y, scale_t, shift_x, sum_x, bool(exclude_diagonal))
    if symmetric:
        return lse_x, lse_x
    return lse_x, _finalize(y, x, scale_t, shift_y, sum_y, False)


def dot_lse_pair_backward(x, y, scale, lse_x, lse_y, grad_x, grad_y, *, exclude_diagonal=False,
                          need_dy=True, config=None, splits=None):
    """(dx, dy, dscale) float32 for sum(grad_x * lse_x) + sum(grad_y * lse_y), the
    log-sum-exps of dot_lse_pair_forward; dy None unless need_dy. y None (symmetric):
    lse_y and grad_y must be None (the rows' own are used), dx is the rows' whole
    gradient and dy is None."""
    symmetric = y is None
    if symmetric and (lse_y is not None or grad_y is not None):
        raise ValueError("y=None (symmetric) takes lse_y=None and grad_y=None")
    if not symmetric and exclude_diagonal:
        raise ValueError("exclude_diagonal needs y=None (the rows against themselves)")
    x, y = _check_qk(x, x if symmetric else y)
    _check_splits(splits)
    R, D = x.shape
    C = y.shape[0]
    dev = x.device
    scale_t = _scale_tensor(scale, dev)
    lse_x = _row_vector(lse_x, R, dev, "lse_x")
    g_x = _row_vector(grad_x, R, dev, "grad_x")
    lse_y = lse_x if symmetric else _row_vector(lse_y, C, dev, "lse_y")
    g_y = g_x if symmetric else _row_vector(grad_y, C, dev, "grad_y")
    if not _use_atomics() or R == 0 or C == 0:
        if symmetric:
            dx, _, ds = dot_lse_backward(x, x, scale_t, lse_x, g_x,
                                         0 if exclude_diagonal else None, symmetric=True)
            return dx, None, ds
        dx, _, ds = dot_lse_backward(x, y, scale_t, lse_x, g_x, col_lse=lse_y, col_grad=g_y)
        dy = None
        if need_dy:
            dy, _, _ = dot_lse_backward(y, x, scale_t, lse_y, g_y, col_lse=lse_x, col_grad=g_x)
        return dx, dy, ds
    # max|g| on device (no host sync), floored so that 1/max stays finite
    g_norm = torch.maximum(g_x.abs().amax(), g_y.abs().amax()).clamp_min(1e-30)
    dx = torch.zeros((R, D), dtype=torch.float32, device=dev)
    need_dy = bool(need_dy) and not symmetric
    dy = torch.zeros((C, D), dtype=torch.float32, device=dev) if need_dy else dx
    ds = torch.zeros(R, dtype=torch.float32, device=dev)
    _launch(
        _dot_lse_pair_bwd_kernel, _bwd_tuned, config, R, C, D, splits, symmetric,
        x, y, scale_t, lse_x, lse_y, g_x, g_y, g_norm, dx, dy, ds,
        R, C, x.stride(0), y.stride(0), _ONE_EXP_SPREAD,
        D, symmetric, bool(exclude_diagonal), _ieee(x.dtype), need_dy or symmetric,
    )
    return dx, (dy if need_dy else None), ds.sum()
