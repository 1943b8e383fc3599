"""Triton kernels for the DINO loss (SEMANTICS.md §7): one pass over K per row n,
for all the crops at once.

Teacher crops t (T, N, K), student crops s (S, N, K) (given as one tensor or as two
groups (S0, N, K) and (S - S0, N, K), e.g. one per crop resolution: not stacked),
center c (K,):

    P_a = softmax((t_a - c) / tau_t),  x_b = s_b / tau_s,  Q_b = sum_{a != b} P_a,
    count_b = T - [b < T]
    term_bn = count_b * lse(x_bn) - Q_bn . x_bn        loss = sum(term) / (n_terms N)
    d loss / d s_b = (count_b * softmax(x_b) - Q_b) / (tau_s n_terms N)

(because sum_k P_a = 1). Q is rebuilt from the teacher rows and their lse in every
pass and never stored, once per block of columns for all the student crops (the
sum over all T teachers, and for the crops b < T the sum without teacher b):
T + S + min(S, T) (T - 1) exponentials per block column and row, not about S T.
Nothing per crop pair exists. All math in float32, in log2 units; the lse handed
from the forward to the backward stay in log2 units (a round trip through ln 2
would shift a one-hot row's top probability at large logits).
Launchers take plain tensors; autograd lives in the ops layer.
"""

import torch
import triton
import triton.language as tl

from sslfast.kernels.dot_lse import (
    _INTERPRET,
    _check_config,
    _check_splits,
    _on_device,
    _pick_config,
    _sm_count,
)

__all__ = ["dino_forward", "dino_backward"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# A row of K = 65536 is walked in 32 blocks; 8 warps keep 8 fp32 lanes per thread per
# operand in flight. The interpreter's small block exercises the masking.
_GPU_CONFIG = {"BLOCK_K": 2048, "num_warps": 8}
_INTERPRET_CONFIG = {"BLOCK_K": 32, "num_warps": 4}
_MERGE_BLOCK = 32  # column blocks merged per step


@triton.jit
def _teacher_q(t_ptr, c_ptr, lse_t_ptr, b, n, T, N, K, offs, ok, t_scale):
    """Q_b on the columns offs: the sum over teachers a != b of P_a (0 off the mask);
    t_scale = log2(e) / tau_t, lse_t in log2 units."""
    c = tl.load(c_ptr + offs, mask=ok, other=0.0)
    q = tl.zeros_like(c)  # float32: the launcher converts the center
    for a in range(0, T):
        if a != b:
            row = (a * N + n).to(tl.int64)
            t = tl.load(t_ptr + row * K + offs, mask=ok, other=float("-inf")).to(tl.float32)
            q += tl.exp2((t - c) * t_scale - tl.load(lse_t_ptr + row))
    return q


@triton.jit
def _student_row(s0_ptr, s1_ptr, S0, b, n, N, K):
    """Student crop b's row n: in the first group (crops 0..S0-1) or in the second."""
    if b < S0:
        row = s0_ptr + (b * N + n).to(tl.int64) * K
    else:
        row = s1_ptr + ((b - S0) * N + n).to(tl.int64) * K
    return row


@triton.jit
def _dino_teacher_lse_kernel(t_ptr, c_ptr, inv_tt_ptr, lse_ptr, K, BLOCK_K: tl.constexpr):
    """One program per teacher row (a * N + n): lse((t - c) / tau_t), in log2 units."""
    LOG2E: tl.constexpr = 1.4426950408889634
    row = tl.program_id(0)
    t_row = t_ptr + row.to(tl.int64) * K
    t_scale = tl.load(inv_tt_ptr) * LOG2E
    m = tl.full([], float("-inf"), tl.float32)
    l_sum = tl.zeros([], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        ok = offs < K
        t = tl.load(t_row + offs, mask=ok, other=float("-inf")).to(tl.float32)
        c = tl.load(c_ptr + offs, mask=ok, other=0.0)
        z = (t - c) * t_scale
        # every block holds a column (k0 < K): m_new is finite, m - m_new never -inf - -inf
        m_new = tl.maximum(m, tl.max(z, 0))
        l_sum = l_sum * tl.exp2(m - m_new) + tl.sum(tl.exp2(z - m_new), 0)
        m = m_new
    tl.store(lse_ptr + row, m + tl.log2(l_sum))


@triton.jit
def _dino_pass_kernel(t_ptr, s0_ptr, s1_ptr, c_ptr, inv_tt_ptr, lse_t_ptr, lse_s_ptr, g_ptr,
                      out_ptr, T, S, S0, N, K, inv_ts, coef, blocks_per_split,
                      BACKWARD: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per (row n, column split), walking its column blocks: Q is built once
    per block for all the student crops (from all T teachers, and for the crops b < T
    without teacher b). Forward: each crop's block stores (max m, sum 2^(x - m),
    D = sum Q (x - m), sum Q) in log2 units to out (blocks, S, N, 4), merged by
    _dino_merge_kernel (lse_s_ptr, g_ptr, coef unread). BACKWARD: each crop's block of
    ds = g * coef * (count_b * softmax(x_b) - Q_b), coef = 1 / (tau_s n_terms N), in the
    student's dtype to out (S, N, K)."""
    LOG2E: tl.constexpr = 1.4426950408889634
    n = tl.program_id(0)
    split = tl.program_id(1)
    blk_begin = split * blocks_per_split
    blk_end = tl.minimum(tl.cdiv(K, BLOCK_K), blk_begin + blocks_per_split)
    t_scale = tl.load(inv_tt_ptr) * LOG2E
    x_scale = inv_ts * LOG2E
    scale = 0.0
    if BACKWARD:
        scale = tl.load(g_ptr).to(tl.float32) * coef
    for blk in range(blk_begin, blk_end):
        offs = blk * BLOCK_K + tl.arange(0, BLOCK_K)
        ok = offs < K
        for b in range(0, tl.minimum(S, T)):  # Q_b without teacher b; count_b = T - 1
            q = _teacher_q(t_ptr, c_ptr, lse_t_ptr, b, n, T, N, K, offs, ok, t_scale)
            _crop_block(s0_ptr, s1_ptr, S0, b, n, S, N, K, blk, offs, ok, q, x_scale,
                        (T - 1) * 1.0, lse_s_ptr, scale, out_ptr, BACKWARD)
        q = _teacher_q(t_ptr, c_ptr, lse_t_ptr, -1, n, T, N, K, offs, ok, t_scale)
        for b in range(T, S):  # count_b = T
            _crop_block(s0_ptr, s1_ptr, S0, b, n, S, N, K, blk, offs, ok, q, x_scale,
                        T * 1.0, lse_s_ptr, scale, out_ptr, BACKWARD)


@triton.jit
def _crop_block(s0_ptr, s1_ptr, S0, b, n, S, N, K, blk, offs, ok, q, x_scale, count,
                lse_s_ptr, scale, out_ptr, BACKWARD: tl.constexpr):
    """Crop b's row n on one block of columns: its gradient (BACKWARD) or statistics."""
    if BACKWARD:
        _block_grad(s0_ptr, s1_ptr, S0, b, n, N, K, offs, ok, q, x_scale, lse_s_ptr, scale,
                    count, out_ptr)
    else:
        _block_stats(s0_ptr, s1_ptr, S0, b, n, N, K, offs, ok, q, x_scale,
                     # int64 (blk may be a Python int): blocks x S x N x 4 may pass 2^31
                     out_ptr + (((tl.zeros([], tl.int64) + blk) * S + b) * N + n) * 4)


@triton.jit
def _block_stats(s0_ptr, s1_ptr, S0, b, n, N, K, offs, ok, q, x_scale, out):
    """Crop b's row n on one block of columns: (m, l, D, sum Q) to out[0:4]."""
    s_row = _student_row(s0_ptr, s1_ptr, S0, b, n, N, K)
    x = tl.load(s_row + offs, mask=ok, other=float("-inf")).to(tl.float32) * x_scale
    m = tl.max(x, 0)  # finite: the block holds a column
    tl.store(out, m)
    tl.store(out + 1, tl.sum(tl.exp2(x - m), 0))
    tl.store(out + 2, tl.sum(tl.where(ok, q * (x - m), 0.0), 0))
    tl.store(out + 3, tl.sum(q, 0))


@triton.jit
def _dino_merge_kernel(part_ptr, lse_s_ptr, term_ptr, T, S, N, n_blocks,
                       BLOCK_P: tl.constexpr):
    """One program per student row (b * N + n): its blocks' (m, l, D, sum Q) merged at
    the row's max m into lse_s (log2 units) and term = count lse - Q.x (natural units):
    count (m + log2 l) - (D + m sum Q) = count log2 l - D, as sum Q = count; the max
    cancels unrounded."""
    LN2: tl.constexpr = 0.6931471805599453
    row = tl.program_id(0)
    base = part_ptr + row.to(tl.int64) * 4  # int64 offsets: blocks x S x N x 4 may pass 2^31
    m = tl.full([], float("-inf"), tl.float32)
    for p0 in range(0, n_blocks, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        ok = p < n_blocks
        m_i = tl.load(base + p.to(tl.int64) * S * N * 4, mask=ok, other=float("-inf"))
        m = tl.maximum(m, tl.max(m_i, 0))
    l_sum = tl.zeros([], dtype=tl.float32)
    d = tl.zeros([], dtype=tl.float32)
    for p0 in range(0, n_blocks, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        ok = p < n_blocks
        blk = base + p.to(tl.int64) * S * N * 4
        m_i = tl.load(blk, mask=ok, other=0.0)
        shift = tl.where(ok, m - m_i, 0.0)
        l_sum += tl.sum(tl.load(blk + 1, mask=ok, other=0.0) * tl.exp2(-shift), 0)
        # each block's D moved from its own max to the row's
        d += tl.sum(tl.load(blk + 2, mask=ok, other=0.0)
                    - shift * tl.load(blk + 3, mask=ok, other=0.0), 0)
    count = T - (row // N < T).to(tl.int32)
    tl.store(lse_s_ptr + row, m + tl.log2(l_sum))
    tl.store(term_ptr + row, (count * tl.log2(l_sum) - d) * LN2)


@triton.jit
def _block_grad(s0_ptr, s1_ptr, S0, b, n, N, K, offs, ok, q, x_scale, lse_s_ptr, scale, count,
                ds_ptr):
    """Crop b's row n of ds on one block of columns."""
    row = (b * N + n).to(tl.int64)
    s_row = _student_row(s0_ptr, s1_ptr, S0, b, n, N, K)
    x = tl.load(s_row + offs, mask=ok, other=0.0).to(tl.float32) * x_scale
    ds = scale * (count * tl.exp2(x - tl.load(lse_s_ptr + row)) - q)
    tl.store(ds_ptr + row * K + offs, ds.to(ds_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- launchers


def _config(config):
    """The caller's config, checked, else the interpreter's or the GPU's (no autotuning)."""
    config = _pick_config(config, _INTERPRET_CONFIG, _GPU_CONFIG)
    config = _check_config(_GPU_CONFIG if config is None else config, ("BLOCK_K",))
    return {"BLOCK_K": config["BLOCK_K"], "num_warps": config.get("num_warps", 4)}


def _split_plan(N, n_blocks, splits, device):
    """(splits, column blocks per split): enough (row, split) programs for about four
    per SM, none empty."""
    if _check_splits(splits) is None:
        sms = _sm_count(device)
        splits = 1 if sms is None else triton.cdiv(4 * sms, N)
    per = triton.cdiv(n_blocks, min(splits, n_blocks, 65535))  # grid axis 1: < 2^16
    return triton.cdiv(n_blocks, per), per


def _check(teacher, student, center):
    """(teacher, the student's one or two groups, center as float32), contiguous, and
    the student crops' count S. With one group the kernels get it as both groups."""
    groups = list(student) if isinstance(student, (list, tuple)) else [student]
    if not 1 <= len(groups) <= 2:
        raise ValueError(f"student must be a tensor or one or two crop groups, got "
                         f"{len(groups)} groups")
    named = [("teacher", teacher)] + [
        ("student" if len(groups) == 1 else f"student[{i}]", g) for i, g in enumerate(groups)]
    for name, x in named:
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"{name} must be a 3-D tensor (crops, N, K)")
        if x.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
        if x.shape[1:] != teacher.shape[1:] or x.shape[0] == 0:
            raise ValueError(f"teacher {tuple(teacher.shape)} and {name} {tuple(x.shape)} "
                             "must be (T, N, K) and (S, N, K) with T, S >= 1")
        if x.device != center.device:
            raise ValueError("teacher, student and center must be on one device")
    if groups[-1].dtype != groups[0].dtype:
        raise TypeError(f"the student groups must share a dtype, got {groups[0].dtype} and "
                        f"{groups[-1].dtype}")
    if center.device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got "
                         f"{center.device}")
    if center.numel() != teacher.shape[2]:
        raise ValueError(f"center has {center.numel()} elements, expected K={teacher.shape[2]}")
    groups = [g.contiguous() for g in groups]
    return (teacher.contiguous(), groups, center.reshape(-1).to(torch.float32).contiguous(),
            sum(g.shape[0] for g in groups))


def _scalar(x, device):
    if isinstance(x, torch.Tensor):
        return x.detach().reshape(()).to(device=device, dtype=torch.float32)
    return torch.full((), float(x), dtype=torch.float32, device=device)  # no copy, no sync


def dino_forward(teacher, student, center, inv_teacher_temp, student_temp, *, config=None,
                 splits=None):
    """(lse_t (T, N), lse_s (S, N), term (S, N)), float32, with
    loss = term.sum() / (n_terms N), n_terms = T S - min(T, S); lse_t and lse_s (for
    dino_backward) in log2 units: log2 sum_k 2^(z_k log2 e) = lse(z) log2 e.

    teacher (T, N, K), student (S, N, K) or a list of two crop groups (S0, N, K) and
    (S - S0, N, K) read where they are (no stack): float32/bfloat16/float16 (the student
    groups of one dtype); center: K elements;
    inv_teacher_temp: 1 / tau_t, a float or a 0-dim tensor (read on the device);
    student_temp: a float. config: None or {"BLOCK_K", "num_warps"}; splits: programs
    per row, each walking an equal share of the column blocks: None (about four
    programs per SM) or a count. The result does not depend on it: each block's
    statistics are stored and merged in one order.
    """
    teacher, groups, center, S = _check(teacher, student, center)
    T, N, K = teacher.shape
    dev = teacher.device
    cfg = _config(config)
    inv_tt = _scalar(inv_teacher_temp, dev)
    lse_t = torch.empty((T, N), dtype=torch.float32, device=dev)
    n_blocks = triton.cdiv(K, cfg["BLOCK_K"])
    n_splits, per = _split_plan(N, n_blocks, splits, dev)
    part = torch.empty((n_blocks, S, N, 4), dtype=torch.float32, device=dev)
    lse_s, term = torch.empty((2, S, N), dtype=torch.float32, device=dev).unbind(0)
    with _on_device(teacher):
        _dino_teacher_lse_kernel[(T * N,)](teacher, center, inv_tt, lse_t, K,
                                           BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"])
        _dino_pass_kernel[(N, n_splits)](
            teacher, groups[0], groups[-1], center, inv_tt, lse_t, lse_t, inv_tt, part,
            T, S, groups[0].shape[0], N, K, 1.0 / float(student_temp), 0.0, per,
            BACKWARD=False, BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"])
        _dino_merge_kernel[(S * N,)](part, lse_s, term, T, S, N, n_blocks,
                                     BLOCK_P=_MERGE_BLOCK, num_warps=1)
    return lse_t, lse_s, term


def dino_backward(teacher, student, center, inv_teacher_temp, student_temp, lse_t, lse_s, grad,
                  *, config=None, splits=None):
    """d (grad * loss) / d student, one (S, N, K) tensor in the student's dtype (student
    as in dino_forward); lse_t, lse_s from dino_forward; grad: the upstream gradient, a
    float or a 0-dim tensor (read on the device)."""
    teacher, groups, center, S = _check(teacher, student, center)
    T, N, K = teacher.shape
    dev = teacher.device
    cfg = _config(config)
    for name, x, shape in (("lse_t", lse_t, (T, N)), ("lse_s", lse_s, (S, N))):
        if x.shape != shape or x.dtype != torch.float32 or x.device != dev:
            raise ValueError(f"{name} must be float32 of shape {shape} on {dev}")
    n_terms = T * S - min(T, S)
    ds = torch.empty((S, N, K), dtype=groups[0].dtype, device=dev)
    n_splits, per = _split_plan(N, triton.cdiv(K, cfg["BLOCK_K"]), splits, dev)
    args = (teacher, groups[0], groups[-1], center, _scalar(inv_teacher_temp, dev),
            lse_t.contiguous(), lse_s.contiguous(), _scalar(grad, dev), ds,
            T, S, groups[0].shape[0], N, K, 1.0 / float(student_temp),
            1.0 / (float(student_temp) * n_terms * N), per)
    with _on_device(teacher):
        _dino_pass_kernel[(N, n_splits)](*args, BACKWARD=True, BLOCK_K=cfg["BLOCK_K"],
                                         num_warps=cfg["num_warps"])
    return ds
