"""Triton kernels for the row-wise log-sum-exp of scaled dot products (the core of
InfoNCE / NT-Xent / CLIP), flash-attention style.

    lse_i = logsumexp({scale * q_i.k_j : j != i + exclude_offset} U {extra_i})

The R x C similarity matrix is never stored: the forward keeps an online max/sum per
row and writes one float32 lse per row; the backward recomputes the similarities tile
by tile from q, k and lse. Launchers take plain tensors; autograd lives in the ops layer.
"""

import contextlib
import inspect
import os

import torch
import triton
import triton.language as tl

__all__ = ["dot_lse_forward", "dot_lse_backward"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Full-precision fp32 dot: `input_precision="ieee"` on Triton >= 3.0 builds that have it,
# `allow_tf32=False` before. Chosen once here so the kernels stay version-agnostic.
_HAS_INPUT_PRECISION = "input_precision" in inspect.signature(tl.dot).parameters


def _tf32_allowed():
    """Whether torch's own fp32 matmuls may use TF32 (its precision "tf32", set by
    torch.backends.cuda.matmul.fp32_precision = "tf32", allow_tf32 = True or
    torch.set_float32_matmul_precision("high")); read at each launch, as torch reads
    it at each matmul, backward included."""
    matmul = torch.backends.cuda.matmul
    try:
        return matmul.fp32_precision == "tf32"
    except AttributeError:  # pragma: no cover - torch before the fp32_precision API
        return bool(matmul.allow_tf32)


def _ieee(dtype):
    """The IEEE flag of the kernels: fp32 inputs are multiplied in full fp32 (FMA
    dots), or on TF32 tensor cores where torch's fp32 matmuls would be too."""
    return dtype == torch.float32 and not _tf32_allowed()


if _INTERPRET:
    # The interpreter's dot multiplies bfloat16 tiles as their raw uint16 bits (Triton 3.8);
    # upcast first. bf16/fp16 products are exact in fp32, as on tensor cores. fp32 tiles
    # of a TF32 dot (not IEEE) lose their low 13 mantissa bits, as the tensor cores
    # read them when not rounded first: the interpreter's tests see TF32's error.
    @triton.jit
    def _mm(a, b, IEEE: tl.constexpr):
        a32 = a.to(tl.float32)
        b32 = b.to(tl.float32)
        if not IEEE and a.dtype == tl.float32:
            a32 = (a32.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
            b32 = (b32.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
        return tl.dot(a32, b32)

elif _HAS_INPUT_PRECISION:

    @triton.jit
    def _mm(a, b, IEEE: tl.constexpr):
        if IEEE:
            out = tl.dot(a, b, input_precision="ieee")
        else:
            out = tl.dot(a, b)
        return out

else:  # pragma: no cover - old Triton

    @triton.jit
    def _mm(a, b, IEEE: tl.constexpr):
        if IEEE:
            out = tl.dot(a, b, allow_tf32=False)
        else:
            out = tl.dot(a, b)
        return out


@triton.jit
def _qk_tile(q_rows_ptr, k_cols_ptr, row_ok, col_ok, offs_d, q_res, k_res,
             D, IEEE: tl.constexpr, BLOCK_R: tl.constexpr,
             BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr):
    """(BLOCK_R, BLOCK_C) float32 raw dot products q_rows . k_cols. When D <= BLOCK_D the
    caller passes the resident tiles q_res (BLOCK_R, BLOCK_D) and k_res (BLOCK_C, BLOCK_D);
    otherwise D is walked in BLOCK_D chunks from memory."""
    if SINGLE_D:
        qk = _mm(q_res, tl.trans(k_res), IEEE)
    else:
        qk = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            d_ok = dd < D
            qc = tl.load(q_rows_ptr + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            kc = tl.load(k_cols_ptr + dd[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            qk += _mm(qc, tl.trans(kc), IEEE)
    return qk


@triton.jit
def _resident_tile(rows_ptr, ok, offs_d, D, unused, SINGLE_D: tl.constexpr):
    """The (n, BLOCK_D) tile of the rows at rows_ptr, loaded once and kept in registers
    when D fits one chunk (SINGLE_D); otherwise ``unused`` is passed through (the
    caller walks D from memory and never reads it)."""
    if SINGLE_D:
        tile = tl.load(rows_ptr + offs_d[None, :], mask=ok[:, None] & (offs_d[None, :] < D),
                       other=0.0)
    else:
        tile = unused
    return tile


@triton.jit
def _score_tile(k_ptr, c0, c_end, stride_k, rows, row_ok, q_rows_ptr, q_res, offs_d,
                exclude_offset, D, HAS_EXCLUDE: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                SINGLE_D: tl.constexpr):
    """The column tile from c0 (columns below c_end) against a row tile: its columns,
    their mask, row pointers and resident tile, the raw dots (BLOCK_R, BLOCK_C) and the
    mask of included pairs (in range, j != i + exclude_offset when HAS_EXCLUDE)."""
    cols = c0 + tl.arange(0, BLOCK_C)
    col_ok = cols < c_end
    k_cols_ptr = k_ptr + cols.to(tl.int64)[:, None] * stride_k
    k_res = _resident_tile(k_cols_ptr, col_ok, offs_d, D, q_res, SINGLE_D)
    qk = _qk_tile(q_rows_ptr, k_cols_ptr, row_ok, col_ok, offs_d, q_res, k_res,
                  D, IEEE, BLOCK_R, BLOCK_C, BLOCK_D, SINGLE_D)
    ok = row_ok[:, None] & col_ok[None, :]
    if HAS_EXCLUDE:
        ok = ok & (cols[None, :] != rows[:, None] + exclude_offset)
    return cols, col_ok, k_cols_ptr, k_res, qk, ok


@triton.jit
def _online_lse(k_ptr, c_begin, c_end, stride_k, rows, row_ok, q_rows_ptr, q_res, offs_d,
                exclude_offset, qk_scale, D, HAS_EXCLUDE: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                SINGLE_D: tl.constexpr):
    """Running (max, sum) in log2 units of a row tile over the columns [c_begin, c_end):
    lse = ln(2) * (max + log2(sum)); max -inf and sum 0 for an empty set."""
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(c_begin, c_end, BLOCK_C):
        cols, col_ok, k_cols_ptr, k_res, qk, ok = _score_tile(
            k_ptr, c0, c_end, stride_k, rows, row_ok, q_rows_ptr, q_res, offs_d, exclude_offset,
            D, HAS_EXCLUDE, IEEE, BLOCK_R, BLOCK_C, BLOCK_D, SINGLE_D)
        s = tl.where(ok, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # An all -inf row so far: shift by 0 instead of -inf so that -inf - -inf never occurs.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    return m_i, l_i


@triton.jit
def _dot_lse_fwd_kernel(
    q_ptr, k_ptr, scale_ptr, extra_ptr, lse_ptr, part_m_ptr, part_l_ptr,
    R, C, stride_q, stride_k, exclude_offset, cols_per_split,
    D, HAS_EXCLUDE: tl.constexpr, HAS_EXTRA: tl.constexpr, IEEE: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr,
):
    """One program per (row tile, column split). SPLIT: the columns are cut into
    splits of cols_per_split (grid axis 1) so that few rows still fill the GPU; each
    program stores its running max (log2 units) and sum in part_m / part_l (splits, R)
    and the launcher combines them (and the extra logit). Else it stores lse itself."""
    LOG2E: tl.constexpr = 1.4426950408889634
    LN2: tl.constexpr = 0.6931471805599453
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    c_begin = pid_s * cols_per_split
    c_end = tl.minimum(C, c_begin + cols_per_split)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    offs_d = tl.arange(0, BLOCK_D)
    q_rows_ptr = q_ptr + rows.to(tl.int64)[:, None] * stride_q
    # Work in log2 units: s2 = scale * log2(e) * q.k, lse = ln(2) * (m + log2(l)).
    qk_scale = tl.load(scale_ptr).to(tl.float32) * LOG2E

    # the q tile stays resident across column tiles when D fits one chunk
    q_res = _resident_tile(q_rows_ptr, row_ok, offs_d, D,
                           tl.zeros([BLOCK_R, BLOCK_D], dtype=q_ptr.dtype.element_ty), SINGLE_D)
    m_i, l_i = _online_lse(k_ptr, c_begin, c_end, stride_k, rows, row_ok, q_rows_ptr, q_res,
                           offs_d, exclude_offset, qk_scale, D, HAS_EXCLUDE, IEEE,
                           BLOCK_R, BLOCK_C, BLOCK_D, SINGLE_D)
    if SPLIT:
        tl.store(part_m_ptr + pid_s * R + rows, m_i, mask=row_ok)
        tl.store(part_l_ptr + pid_s * R + rows, l_i, mask=row_ok)
        return
    if HAS_EXTRA:
        e = tl.load(extra_ptr + rows, mask=row_ok, other=float("-inf")).to(tl.float32) * LOG2E
        m_new = tl.maximum(m_i, e)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.exp2(e - m_safe)
        m_i = m_new
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    lse = (m_safe + tl.log2(l_i)) * LN2  # empty set: l_i == 0 -> -inf
    tl.store(lse_ptr + rows, lse, mask=row_ok)


@triton.jit
def _dot_lse_bwd_dq_kernel(
    q_ptr, k_ptr, scale_ptr, lse_ptr, g_ptr, g_norm_ptr, col_lse_ptr, col_g_ptr,
    dq_ptr, dscale_part_ptr,
    R, C, stride_q, stride_k, stride_dq, exclude_offset, cols_per_split, split_stride_dq,
    D, HAS_EXCLUDE: tl.constexpr, IEEE: tl.constexpr, STORE_DQ: tl.constexpr,
    TWO_SIDED: tl.constexpr, DS_BOTH: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr,
):
    """One program per (row tile, column split): the split's share of the dq rows (if
    STORE_DQ; split s writes dq + s * split_stride_dq) and of the per-row dscale
    partials (dscale_part + s * R); the launcher sums the splits.

    TWO_SIDED: the columns have a log-sum-exp of their own over the same tile
    (col_lse, with upstream gradient col_g), so with P'_ij = exp(s q_i.k_j - col_lse_j)
    dq_i = scale * sum_j (g_i P_ij + col_g_j P'_ij) k_j: the rows' whole gradient in
    one pass. NT-Xent on one process (q is k: col_lse = lse, col_g = g, P'_ij = P_ji)
    and CLIP (col_lse = the other direction's lse) use it. g and col_g are divided by
    g_norm inside the product and multiplied back at the end. DS_BOTH: the dscale
    partials include the column term (CLIP); else only the rows' (NT-Xent)."""
    LOG2E: tl.constexpr = 1.4426950408889634
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    c_begin = pid_s * cols_per_split
    c_end = tl.minimum(C, c_begin + cols_per_split)
    dq_ptr += pid_s.to(tl.int64) * split_stride_dq
    dscale_part_ptr += pid_s * R
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    offs_d = tl.arange(0, BLOCK_D)
    q_rows_ptr = q_ptr + rows.to(tl.int64)[:, None] * stride_q
    dq_rows_ptr = dq_ptr + rows.to(tl.int64)[:, None] * stride_dq
    dq_acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    scale = tl.load(scale_ptr).to(tl.float32)
    qk_scale = scale * LOG2E
    lse2 = tl.load(lse_ptr + rows, mask=row_ok, other=0.0) * LOG2E
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    if TWO_SIDED:
        g_norm = tl.load(g_norm_ptr).to(tl.float32)
        g_div = 1.0 / g_norm
        g_in = g * g_div  # row weights inside the product
        row_mul = tl.zeros([BLOCK_R], dtype=tl.float32) + scale * g_norm
    else:
        g_div = 1.0
        g_in = g  # unused
        row_mul = g * scale

    # the q tile stays resident across column tiles when D fits one chunk
    q_res = _resident_tile(q_rows_ptr, row_ok, offs_d, D,
                           tl.zeros([BLOCK_R, BLOCK_D], dtype=q_ptr.dtype.element_ty), SINGLE_D)
    if not SINGLE_D:
        if STORE_DQ:
            # dq is accumulated in place (read-modify-write) chunk by chunk; start from 0.
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                tl.store(dq_rows_ptr + dd[None, :], dq_acc,
                         mask=row_ok[:, None] & (dd[None, :] < D))
            tl.debug_barrier()
    ds_acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(c_begin, c_end, BLOCK_C):
        cols, col_ok, k_cols_ptr, k_res, qk, ok = _score_tile(
            k_ptr, c0, c_end, stride_k, rows, row_ok, q_rows_ptr, q_res, offs_d, exclude_offset,
            D, HAS_EXCLUDE, IEEE, BLOCK_R, BLOCK_C, BLOCK_D, SINGLE_D)
        # where() first: on an empty row lse = -inf and the exp overflows, but is not selected.
        p = tl.where(ok, tl.exp2(qk * qk_scale - lse2[:, None]), 0.0)
        if TWO_SIDED:
            lse2_c = tl.load(col_lse_ptr + cols, mask=col_ok, other=0.0) * LOG2E
            g_c = tl.load(col_g_ptr + cols, mask=col_ok, other=0.0) * g_div
            p_t = tl.where(ok, tl.exp2(qk * qk_scale - lse2_c[None, :]), 0.0)
            w = p * g_in[:, None] + p_t * g_c[None, :]
        else:
            w = p
        if DS_BOTH:
            ds_acc += tl.sum(w * qk, 1)
        else:
            ds_acc += tl.sum(p * qk, 1)
        if STORE_DQ:
            # g is per row, so it is applied after the product: the low-precision operand
            # is p in [0, 1] (no fp16 overflow/underflow from g's magnitude).
            if SINGLE_D:
                dq_acc += _mm(w.to(k_res.dtype), k_res, IEEE)
            else:
                for d0 in range(0, D, BLOCK_D):
                    dd = d0 + offs_d
                    d_ok = dd[None, :] < D
                    kc = tl.load(k_cols_ptr + dd[None, :], mask=col_ok[:, None] & d_ok, other=0.0)
                    part = _mm(w.to(kc.dtype), kc, IEEE) * row_mul[:, None]
                    msk = row_ok[:, None] & d_ok
                    cur = tl.load(dq_rows_ptr + dd[None, :], mask=msk, other=0.0)
                    tl.store(dq_rows_ptr + dd[None, :], cur + part, mask=msk)
                # Next column tile re-reads these dq rows, maybe from other threads.
                tl.debug_barrier()
    if STORE_DQ:
        if SINGLE_D:
            tl.store(dq_rows_ptr + offs_d[None, :], dq_acc * row_mul[:, None],
                     mask=row_ok[:, None] & (offs_d[None, :] < D))
    if DS_BOTH:
        tl.store(dscale_part_ptr + rows, ds_acc * g_norm, mask=row_ok)
    else:
        tl.store(dscale_part_ptr + rows, ds_acc * g, mask=row_ok)


@triton.jit
def _dot_lse_bwd_dk_kernel(
    q_ptr, k_ptr, scale_ptr, lse_ptr, g_ptr, g_norm_ptr, dk_ptr,
    R, C, stride_q, stride_k, stride_dk, exclude_offset,
    D, HAS_EXCLUDE: tl.constexpr, IEEE: tl.constexpr, NORM_G: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr,
):
    """One program per column tile: dk rows, looping over row tiles (transposed view).

    g varies along the reduction here, so g * p is the low-precision operand; for fp16,
    NORM_G divides g by max|g| (g_norm_ptr) first so that g * p neither overflows nor
    flushes to zero, and multiplies the result back."""
    LOG2E: tl.constexpr = 1.4426950408889634
    pid = tl.program_id(0)
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    offs_d = tl.arange(0, BLOCK_D)
    k_cols_ptr = k_ptr + cols.to(tl.int64)[:, None] * stride_k
    dk_cols_ptr = dk_ptr + cols.to(tl.int64)[:, None] * stride_dk
    dk_acc = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
    scale = tl.load(scale_ptr).to(tl.float32)
    qk_scale = scale * LOG2E
    if NORM_G:
        g_norm = tl.load(g_norm_ptr).to(tl.float32)
        g_div = 1.0 / g_norm
        out_mul = scale * g_norm
    else:
        g_div = 1.0
        out_mul = scale

    # the k tile stays resident across row tiles when D fits one chunk
    k_res = _resident_tile(k_cols_ptr, col_ok, offs_d, D,
                           tl.zeros([BLOCK_C, BLOCK_D], dtype=k_ptr.dtype.element_ty), SINGLE_D)
    if not SINGLE_D:
        for d0 in range(0, D, BLOCK_D):  # dk accumulates in place: start from 0
            dd = d0 + offs_d
            tl.store(dk_cols_ptr + dd[None, :], dk_acc, mask=col_ok[:, None] & (dd[None, :] < D))
        tl.debug_barrier()
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        q_rows_ptr = q_ptr + rows.to(tl.int64)[:, None] * stride_q
        lse2 = tl.load(lse_ptr + rows, mask=row_ok, other=0.0) * LOG2E
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0) * g_div
        q_res = _resident_tile(q_rows_ptr, row_ok, offs_d, D, k_res, SINGLE_D)
        # Transposed tile: (BLOCK_C, BLOCK_R) = k_cols . q_rows
        qkT = _qk_tile(k_cols_ptr, q_rows_ptr, col_ok, row_ok, offs_d, k_res, q_res,
                       D, IEEE, BLOCK_C, BLOCK_R, BLOCK_D, SINGLE_D)
        ok = col_ok[:, None] & row_ok[None, :]
        if HAS_EXCLUDE:
            ok = ok & (cols[:, None] != rows[None, :] + exclude_offset)
        pT = tl.where(ok, tl.exp2(qkT * qk_scale - lse2[None, :]), 0.0)
        dsT = pT * g[None, :]
        if SINGLE_D:
            dk_acc += _mm(dsT.to(q_res.dtype), q_res, IEEE)
        else:
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                d_ok = dd[None, :] < D
                qc = tl.load(q_rows_ptr + dd[None, :], mask=row_ok[:, None] & d_ok, other=0.0)
                part = _mm(dsT.to(qc.dtype), qc, IEEE) * out_mul
                msk = col_ok[:, None] & d_ok
                cur = tl.load(dk_cols_ptr + dd[None, :], mask=msk, other=0.0)
                tl.store(dk_cols_ptr + dd[None, :], cur + part, mask=msk)
            tl.debug_barrier()
    if SINGLE_D:
        tl.store(dk_cols_ptr + offs_d[None, :], dk_acc * out_mul,
                 mask=col_ok[:, None] & (offs_d[None, :] < D))


# ----------------------------------------------------------------------------- configs

# Under the interpreter: one small config (tile dims >= 16 as tl.dot needs on GPU).
_INTERPRET_CONFIG = {"BLOCK_R": 32, "BLOCK_C": 32, "BLOCK_D": 64, "num_warps": 4, "num_stages": 1}
# On a GPU with SSLFAST_TRITON_AUTOTUNE=0 (the test suite sets it: every new D and dtype
# would otherwise autotune): one config that fits both the forward and the backward.
_FIXED_GPU_CONFIG = {"BLOCK_R": 64, "BLOCK_C": 64, "BLOCK_D": 64, "num_warps": 4, "num_stages": 2}


def _cfg(br, bc, bd, w, s):
    return triton.Config({"BLOCK_R": br, "BLOCK_C": bc, "BLOCK_D": bd}, num_warps=w, num_stages=s)


_FWD_CONFIGS = [
    _cfg(128, 64, 64, 4, 3),
    _cfg(128, 128, 64, 8, 3),
    _cfg(64, 64, 128, 4, 3),
    _cfg(128, 64, 128, 8, 2),
    _cfg(64, 128, 32, 4, 4),
    _cfg(64, 32, 64, 4, 4),
    _cfg(64, 64, 256, 8, 2),  # D = 256 resident (the chunked path re-reads q per tile)
]
# The backward holds a (BLOCK, BLOCK_D) fp32 accumulator as well: smaller tiles.
_BWD_CONFIGS = [
    _cfg(64, 64, 64, 4, 2),
    _cfg(64, 64, 128, 8, 2),
    _cfg(128, 64, 64, 8, 2),
    _cfg(32, 64, 128, 4, 3),
    _cfg(64, 32, 128, 4, 3),
    _cfg(32, 32, 64, 4, 4),
    _cfg(64, 32, 256, 8, 2),  # D = 256: dq/dk in registers, not read-modify-written per tile
]


def _prune_by_d(configs, named_args, **kwargs):
    """Configs worth timing for this D: none whose BLOCK_D only pads (above
    max(64, next power of two of D)), and for fp32 none above 128 (Triton 3.6 for sm_90
    spills such fp32 tiles heavily to the stack). The features are the first argument."""
    D, fp32 = named_args["D"], next(iter(named_args.values())).dtype == torch.float32
    cap = min(max(64, triton.next_power_of_2(max(D, 1))), 128 if fp32 else 1 << 30)
    return [c for c in configs if c.kwargs["BLOCK_D"] <= cap] or configs


def _prune(configs, named_args, **kwargs):
    """_prune_by_d; and with column splits (cols_per_split < C), whose count was planned
    for row tiles of _NOMINAL_BLOCK_R, none taller (half the planned programs)."""
    configs = _prune_by_d(configs, named_args)
    if named_args["cols_per_split"] >= named_args["C"]:
        return configs
    return [c for c in configs if c.kwargs["BLOCK_R"] <= _NOMINAL_BLOCK_R] or configs


# D <= BLOCK_D: q (or k) tile resident, dq (or dk) accumulated in registers; else D is
# walked in BLOCK_D chunks and the gradient accumulated in place in its output rows.
_single_d = triton.heuristics({"SINGLE_D": lambda a: a["D"] <= a["BLOCK_D"]})
# All args are passed positionally, so the key args are in the autotuner's named args
# on every Triton version; tensor dtypes are added to the key by Triton itself. The
# problem size (R, C and the column split) is in the key: a config tuned at one size
# is not reused at another, nor a split launch's for an unsplit one.
_SIZE_KEY = ["R", "C", "D", "IEEE"]
_fwd_tuned = triton.autotune(
    _FWD_CONFIGS, key=_SIZE_KEY + ["cols_per_split", "HAS_EXCLUDE", "HAS_EXTRA", "SPLIT"],
    prune_configs_by={"early_config_prune": _prune})(_single_d(_dot_lse_fwd_kernel))
_bwd_dq_tuned = triton.autotune(
    _BWD_CONFIGS,
    key=_SIZE_KEY + ["cols_per_split", "HAS_EXCLUDE", "STORE_DQ", "TWO_SIDED", "DS_BOTH"],
    prune_configs_by={"early_config_prune": _prune})(_single_d(_dot_lse_bwd_dq_kernel))
_bwd_dk_tuned = triton.autotune(
    _BWD_CONFIGS, key=_SIZE_KEY + ["HAS_EXCLUDE", "NORM_G"],
    prune_configs_by={"early_config_prune": _prune_by_d})(_single_d(_dot_lse_bwd_dk_kernel))


def _pick_config(config, interpret_config, fixed_config):
    """The config to launch with: the caller's; else the interpreter's under
    TRITON_INTERPRET; else the fixed one when SSLFAST_TRITON_AUTOTUNE=0 (the test
    suite) or under torch.use_deterministic_algorithms (a config autotuned from timings
    could differ between processes, and with it the order of the sums); else None
    (autotune)."""
    if config is None and _INTERPRET:
        return interpret_config
    if config is None and (os.environ.get("SSLFAST_TRITON_AUTOTUNE", "1") == "0"
                           or torch.are_deterministic_algorithms_enabled()):
        return fixed_config
    return config


def _on_device(t):
    """Triton launches on the current CUDA device: make it t's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _launch(kernel, tuned, config, grid_dim, n, D, *args, splits=1):
    """Launch with the given config dict, the interpreter config, or the autotuner,
    over a (tiles of n, splits) grid. args: every kernel argument up to (not
    including) BLOCK_R, positionally."""
    config = _pick_config(config, _INTERPRET_CONFIG, _FIXED_GPU_CONFIG)
    with _on_device(args[0]):
        if config is None:
            tuned[lambda meta: (triton.cdiv(n, meta[grid_dim]), splits)](*args)
            return
        config = _check_config(config)
        blocks = {k: config[k] for k in ("BLOCK_R", "BLOCK_C", "BLOCK_D")}
        kernel[(triton.cdiv(n, blocks[grid_dim]), splits)](
            *args, **blocks, SINGLE_D=D <= blocks["BLOCK_D"],
            num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 1),
        )


# Column splits: the tiles of rows alone must give every SM about two programs, or the
# columns are cut (as flash-decoding does). A split keeps at least _MIN_SPLIT_COLS
# columns, so that its partial results stay small next to the work.
_NOMINAL_BLOCK_R = 64
_MIN_SPLIT_COLS = 1024
_MAX_SPLITS = 32


def _sm_count(device):
    """The device's SM count; None off CUDA (the interpreter)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def _auto_splits(R, C, device):
    sms = _sm_count(device)
    if sms is None:
        return 1  # the interpreter: tests pass splits explicitly
    tiles = triton.cdiv(R, _NOMINAL_BLOCK_R)
    if tiles >= 2 * sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, tiles), C // _MIN_SPLIT_COLS, _MAX_SPLITS))


def _split_plan(R, C, splits, device):
    """(splits, columns per split): columns per split a multiple of 128 (every
    BLOCK_C divides it), no split empty."""
    splits = _auto_splits(R, C, device) if _check_splits(splits) is None else splits
    per = triton.cdiv(triton.cdiv(max(C, 1), splits), 128) * 128
    return triton.cdiv(max(C, 1), per), per


def _check_splits(splits):
    """splits, if None or a positive int; else a ValueError naming it."""
    if splits is not None and (isinstance(splits, bool) or not isinstance(splits, int)
                               or splits < 1):
        raise ValueError(f"splits must be None or a positive int, got {splits!r}")
    return splits


def _check_config(config, keys=("BLOCK_R", "BLOCK_C", "BLOCK_D")):
    """config, if a dict whose tile sizes (keys) are powers of two >= 16."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict or None, got {type(config).__name__}")
    for k in keys:
        v = config.get(k)
        if isinstance(v, bool) or not isinstance(v, int) or v < 16 or v & (v - 1):
            raise ValueError(f"config[{k!r}] must be a power of two >= 16, got {v!r}")
    return config


# ----------------------------------------------------------------------------- launchers


def _check_qk(q, k):
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must have the same dtype, got {q.dtype} and {k.dtype}")
    if q.device != k.device:
        raise ValueError(f"q and k must be on the same device, got {q.device} and {k.device}")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"q and k must have the same last dim, got {q.shape[1]} and {k.shape[1]}")
    if q.device.type != "cuda" and not _INTERPRET:
        raise ValueError(
            f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got q on {q.device}")
    q = q if q.stride(1) == 1 or q.shape[1] <= 1 else q.contiguous()
    k = k if k.stride(1) == 1 or k.shape[1] <= 1 else k.contiguous()
    return q, k


def _row_vector(t, n, device, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    return t.contiguous()


def _scale_tensor(scale, device):
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1 or not scale.dtype.is_floating_point:
            raise ValueError(f"scale must be a 0-dim floating tensor, got {scale.dtype} "
                             f"of shape {tuple(scale.shape)}")
        return scale.detach().reshape(()).to(device=device, dtype=torch.float32)
    if isinstance(scale, (int, float)):
        # a fill, not torch.tensor: that would be a host-to-device copy on every call
        return torch.full((), float(scale), dtype=torch.float32, device=device)
    raise TypeError(f"scale must be a 0-dim float32 tensor, got {type(scale).__name__}")


def _offset(exclude_offset, n_rows, n_cols):
    if exclude_offset is None:
        return False, 0
    if isinstance(exclude_offset, bool) or not isinstance(exclude_offset, int):
        raise TypeError(
            f"exclude_offset must be None or an int, got {type(exclude_offset).__name__}")
    if exclude_offset >= n_cols or exclude_offset <= -n_rows:
        return False, 0  # i + offset never lands in [0, C): nothing to exclude
    return True, exclude_offset


def dot_lse_forward(q, k, scale, exclude_offset=None, extra=None, *, config=None, splits=None):
    """lse (R,) float32: lse_i = logsumexp({scale * q_i.k_j : j != i + exclude_offset} U {extra_i}).

    q (R, D), k (C, D) in float32/bfloat16/float16; scale a 0-dim float32 tensor (read on
    device, may be negative); extra None or (R,) float32. A row with an empty set gets -inf.
    config: None (autotune on GPU, a fixed small config under the interpreter) or a dict
    {"BLOCK_R", "BLOCK_C", "BLOCK_D", "num_warps", "num_stages"}. splits: None (cut the
    columns when the row tiles alone cannot fill the GPU) or the number of column splits.
    """
    q, k = _check_qk(q, k)
    R, D = q.shape
    C = k.shape[0]
    scale_t = _scale_tensor(scale, q.device)
    has_excl, off = _offset(exclude_offset, R, C)
    if extra is not None:
        extra = _row_vector(extra, R, q.device, "extra")
    lse = torch.empty(R, dtype=torch.float32, device=q.device)
    if R == 0:
        return lse
    n_splits, per = _split_plan(R, C, splits, q.device)
    part_m = part_l = lse  # unused without splits
    if n_splits > 1:
        part_m = torch.empty((n_splits, R), dtype=torch.float32, device=q.device)
        part_l = torch.empty((n_splits, R), dtype=torch.float32, device=q.device)
    _launch(
        _dot_lse_fwd_kernel, _fwd_tuned, config, "BLOCK_R", R, D,
        q, k, scale_t, extra if extra is not None else lse, lse, part_m, part_l,
        R, C, q.stride(0), k.stride(0), off, per,
        # HAS_EXCLUDE, HAS_EXTRA, IEEE, SPLIT
        D, has_excl, extra is not None, _ieee(q.dtype), n_splits > 1,
        splits=n_splits,
    )
    if n_splits > 1:
        lse = _combine_splits(part_m, part_l, extra)
    return lse


def _combine_splits(part_m, part_l, extra):
    """lse from the splits' running (max in log2 units, sum) and the extra logit."""
    m = part_m.amax(dim=0)
    if extra is not None:
        extra2 = extra * _LOG2E
        m = torch.maximum(m, extra2)
    m_safe = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    total = (part_l * torch.exp2(part_m - m_safe)).sum(dim=0)
    if extra is not None:
        total = total + torch.exp2(extra2 - m_safe)
    return (m_safe + torch.log2(total)) * _LN2


def dot_lse_backward(q, k, scale, lse, grad_lse, exclude_offset=None, need_dq=True, need_dk=True,
                     *, symmetric=False, col_lse=None, col_grad=None, config=None, splits=None):
    """(dq, dk, dscale) for lse = dot_lse_forward(q, k, scale, exclude_offset, extra).

    With P_ij = exp(scale * q_i.k_j - lse_i) on row i's included set and g = grad_lse:
    dq = scale * (g P) k (R, D) float32 or None; dk = scale * (g P)^T q (C, D) float32 or
    None; dscale = sum_ij g_i P_ij q_i.k_j, a 0-dim float32 tensor. extra's own gradient
    (g * exp(extra - lse)) is the caller's.

    symmetric=True: q and k hold the same rows and the exclusion is None or 0 (NT-Xent on
    one process). Then dq is the rows' whole gradient (dq + dk of the general case),
    computed in one pass, and dk is None.

    col_lse, col_grad ((C,) float32): the columns' own log-sum-exp over the same logits
    (CLIP's other direction, lse of k against q) and its upstream gradient. Then dq
    includes that direction's gradient for the rows, dscale both directions', and dk is
    None: call again with the roles swapped for k's gradient (ignoring its dscale).

    splits: as in dot_lse_forward, for the dq pass (each split's partial dq is summed).
    """
    two_sided = symmetric or col_lse is not None
    if symmetric:
        if q.shape != k.shape or exclude_offset not in (None, 0):
            raise ValueError("symmetric=True needs q and k of the same shape (the same rows) "
                             "and exclude_offset None or 0")
        if col_lse is not None:
            raise ValueError("symmetric=True takes no col_lse (the rows' lse is used)")
    if two_sided:
        need_dq, need_dk = True, False
    q, k = _check_qk(q, k)
    R, D = q.shape
    C = k.shape[0]
    dev = q.device
    scale_t = _scale_tensor(scale, dev)
    has_excl, off = _offset(exclude_offset, R, C)
    lse = _row_vector(lse, R, dev, "lse")
    g = _row_vector(grad_lse, R, dev, "grad_lse")
    ieee = _ieee(q.dtype)
    if col_lse is not None:
        if exclude_offset is not None:
            raise ValueError("col_lse takes no exclude_offset")
        col_lse = _row_vector(col_lse, C, dev, "col_lse")
        col_g = _row_vector(col_grad, C, dev, "col_grad")
    elif symmetric:
        col_lse, col_g = lse, g

    n_splits, per = _split_plan(R, C, splits, dev)
    dq = torch.empty((n_splits, R, D), dtype=torch.float32, device=dev) if need_dq else None
    dk = torch.empty((C, D), dtype=torch.float32, device=dev) if need_dk else None
    dscale_part = torch.empty((n_splits, R), dtype=torch.float32, device=dev)
    if R == 0 or C == 0:  # no included pairs: all gradients are zero
        dq = dq[0].zero_() if need_dq else None
        if dk is not None:
            dk.zero_()
        return dq, dk, torch.zeros((), dtype=torch.float32, device=dev)

    if two_sided:  # max|g| on device (no host sync), floored so that 1/max stays finite
        g_norm = torch.maximum(g.abs().amax(), col_g.abs().amax()).clamp_min(1e-30)
    else:
        g_norm, col_lse, col_g = scale_t, lse, g  # unused by the kernel
    _launch(
        _dot_lse_bwd_dq_kernel, _bwd_dq_tuned, config, "BLOCK_R", R, D,
        q, k, scale_t, lse, g, g_norm, col_lse, col_g, dq if need_dq else dscale_part, dscale_part,
        R, C, q.stride(0), k.stride(0), D if need_dq else 0, off, per, R * D if need_dq else 0,
        # HAS_EXCLUDE, IEEE, STORE_DQ, TWO_SIDED, DS_BOTH
        D, has_excl, ieee, bool(need_dq), two_sided, two_sided and not symmetric,
        splits=n_splits,
    )
    if need_dq:
        dq = dq[0] if n_splits == 1 else dq.sum(dim=0)
    if need_dk:
        norm_g = q.dtype == torch.float16
        # fp16 only: max|g| on device (no host sync); floored so that 1/max stays finite.
        g_norm = g.abs().amax().clamp_min(1e-30) if norm_g else scale_t
        _launch(
            _dot_lse_bwd_dk_kernel, _bwd_dk_tuned, config, "BLOCK_C", C, D,
            q, k, scale_t, lse, g, g_norm, dk,
            R, C, q.stride(0), k.stride(0), D, off,
            D, has_excl, ieee, norm_g,  # HAS_EXCLUDE, IEEE, NORM_G
        )
    return dq, dk, dscale_part.sum()
