"""``--check``: every op against its reference on this device, before any timing.

Each check runs the op as users call it (``sslfast.functional.<op>``, looked up
at call time) on fresh random inputs at a small and a large shape and compares
values and gradients with the float64 reference (``sslfast.reference``) on the
same inputs. A case passes when its error, measured against the largest
magnitude of the expected result, is within the dtype's tolerance. An op that
raises fails its case with the error. The benchmark of an op with a failing
case does not run.
"""

from functools import partial

import torch
import torch.nn.functional as F

from sslfast import functional
from sslfast.reference import (
    augment_reference,
    clip_reference,
    dino_reference,
    ema_reference,
    enqueue_reference,
    info_nce_reference,
    ntxent_reference,
)

# Error allowed, relative to the largest magnitude of the expected tensor.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def _rel_error(actual, expected):
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    if actual.shape != expected.shape:
        return float("inf")
    if not bool(torch.isfinite(actual).all()):
        return float("inf")
    scale = max(float(expected.abs().max()), 1e-12) if expected.numel() else 1.0
    return float((actual - expected).abs().max()) / scale if expected.numel() else 0.0


def _row(op, case, errors, tol):
    err = max(errors) if errors else 0.0
    return {"op": op, "case": case, "ok": err <= tol, "error": err, "tolerance": tol,
            "detail": ""}


def _guard(op, case, fn):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - any failure of the op fails its check
        return {"op": op, "case": case, "ok": False, "error": float("inf"), "tolerance": None,
                "detail": f"{type(exc).__name__}: {exc}"[:160]}


# ---- the contrastive losses ------------------------------------------------------------


def _loss_case(op, case, fn, ref, inputs, dtype):
    """fn and ref on the same inputs (ref in float64); values and input gradients."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves)
    leaves64 = [x.detach().double().requires_grad_() for x in inputs]
    expected = ref(*leaves64)
    ref_grads = torch.autograd.grad(expected, leaves64)
    errors = [_rel_error(out, expected)] + [_rel_error(g, r) for g, r in zip(grads, ref_grads)]
    return _row(op, case, errors, TOLERANCE[dtype])


def _queue_loss(queue, x, y, t):
    return functional.info_nce_loss(x, y, queue, t)


def _queue_reference(queue, x, y, t):
    return info_nce_reference(x, y, queue.double(), t)


def _contrastive_specs(a, b, queue, device):
    """(op, fn, reference, inputs) of each loss on the given features."""
    def temp(v):
        return torch.tensor(v, device=device)

    return [
        ("ntxent_loss", lambda x, y, t: functional.ntxent_loss(x, y, t), ntxent_reference,
         [a, b, temp(0.3)]),
        ("info_nce_loss (queue)", partial(_queue_loss, queue), partial(_queue_reference, queue),
         [a, b, temp(0.2)]),
        ("info_nce_loss (keys)", lambda x, y, t: functional.info_nce_loss(x, y, None, t),
         lambda x, y, t: info_nce_reference(x, y, None, t), [a, b, temp(0.2)]),
        ("clip_loss", lambda x, y, s: functional.clip_loss(x, y, s), clip_reference,
         [a, b, temp(14.0)]),
    ]


def check_contrastive(device, quick=False):
    n_large = 256 if quick else (4096 if device.type == "cuda" else 1024)
    dtypes = [torch.float32, torch.bfloat16] if device.type == "cuda" else [torch.float32]
    rows = []
    for dtype in dtypes:
        for n, d, k in ((7, 13, 50), (n_large, 128, 8 * n_large)):
            case = f"N={n} D={d} {str(dtype)[6:]}"
            a, b = (torch.randn(n, d, device=device).to(dtype) for _ in range(2))
            queue = F.normalize(torch.randn(k, d, device=device), dim=1).to(dtype)
            for op, fn, ref, inputs in _contrastive_specs(a, b, queue, device):
                rows.append(_guard(op, case, partial(_loss_case, op, case, fn, ref, inputs, dtype)))
    return rows


# ---- DINO ---------------------------------------------------------------------------------


def _dino_case(case, n, k, dtype, device):
    """The loss and the student gradients against the float64 definition."""
    teacher = [torch.randn(n, k, device=device).to(dtype) for _ in range(2)]
    student = [torch.randn(n, k, device=device).to(dtype).requires_grad_() for _ in range(10)]
    center = 0.1 * torch.randn(1, 1, k, device=device)
    out = functional.dino_loss(teacher, student, center, 0.04, 0.1)
    grads = torch.autograd.grad(out, student)
    s64 = [x.detach().double().requires_grad_() for x in student]
    expected = dino_reference([x.double() for x in teacher], s64, center.double(), 0.04, 0.1)
    ref_grads = torch.autograd.grad(expected, s64)
    errors = [_rel_error(out, expected), _rel_error(torch.stack(grads), torch.stack(ref_grads))]
    return _row("dino_loss", case, errors, TOLERANCE[dtype])


def check_dino(device, quick=False):
    large = (64, 65536) if device.type == "cuda" else (32, 16384)
    n_large, k_large = (16, 8192) if quick else large
    dtypes = [torch.float32, torch.bfloat16] if device.type == "cuda" else [torch.float32]
    rows = []
    for dtype in dtypes:
        for n, k in ((3, 77), (n_large, k_large)):
            case = f"T=2 S=10 N={n} K={k} {str(dtype)[6:]}"
            rows.append(_guard("dino_loss", case, partial(_dino_case, case, n, k, dtype, device)))
    return rows


# ---- EMA ----------------------------------------------------------------------------------


def _ema_case(case, shapes, t_dtype, s_dtype, device):
    targets = [torch.randn(sh, device=device).to(t_dtype) for sh in shapes]
    sources = [torch.randn(sh, device=device).to(s_dtype) for sh in shapes]
    expected = ema_reference(targets, sources, 0.9)
    # Relative to the terms' size, not the result's: 0.9 t + 0.1 s can cancel to near 0
    # (a 1-element tensor then showed a few ulps of its operands as a large error).
    terms = [(0.9 * t.double().abs() + 0.1 * s.double().abs()).max() for t, s in
             zip(targets, sources)]
    functional.ema_(targets, sources, 0.9)
    errors = [float((t.double() - e.double()).abs().max() / max(float(m), 1e-12))
              if torch.isfinite(t).all() else float("inf")
              for t, e, m in zip(targets, expected, terms)]
    tol = 2e-7 if t_dtype == torch.float32 else 2**-7  # one rounding into the target's dtype
    return _row("ema_", case, errors, tol)


def check_ema(device, quick=False):
    large = 1 << (18 if quick else 22)
    rows = []
    for t_dtype, s_dtype in ((torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                             (torch.bfloat16, torch.bfloat16)):
        for shapes in ([(7,), (3, 5), (1,)], [(large,), (1000, 33)]):
            n = sum(torch.Size(sh).numel() for sh in shapes)
            case = f"{str(t_dtype)[6:]}<-{str(s_dtype)[6:]} {len(shapes)} tensors, {n} elements"
            rows.append(_guard("ema_", case, partial(_ema_case, case, shapes, t_dtype, s_dtype,
                                                     device)))
    return rows


# ---- the queue ----------------------------------------------------------------------------


def _queue_case(case, size, dim, batches, normalize, device):
    queue = torch.randn(size, dim, device=device)
    ptr = torch.zeros(1, dtype=torch.int64, device=device)
    exp_q, exp_p = queue.clone(), 0
    errors = []
    for n in batches:
        keys = torch.randn(n, dim, device=device)
        exp_q, exp_p = enqueue_reference(exp_q, exp_p, keys, normalize)
        functional.enqueue_(queue, ptr, keys, normalize=normalize)
        errors.append(_rel_error(queue, exp_q))
        errors.append(0.0 if int(ptr) == exp_p else float("inf"))
    return _row("enqueue_", case, errors, 1e-6 if normalize else 0.0)


def check_queue(device, quick=False):
    rows = []
    for size, dim, batches in ((10, 3, [3, 4, 12, 0, 7]), (65536, 128, [4096, 30000, 70000])):
        for normalize in (False, True):
            case = f"K={size} D={dim} batches {batches}" + (" normalized" if normalize else "")
            rows.append(_guard("enqueue_", case, partial(_queue_case, case, size, dim, batches,
                                                         normalize, device)))
    return rows


# ---- augmentation -------------------------------------------------------------------------


def _augment_case(case, n, size, source, device):
    from sslfast.augment import sample_params, simclr_config

    cfg = simclr_config(size).replace(solarize_p=0.5)
    g = torch.Generator().manual_seed(n)
    sizes = [(int(h), int(w)) for h, w in torch.randint(source // 2, source, (n, 2), generator=g)]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]
    params = sample_params(n, sizes, cfg, torch.Generator().manual_seed(n))
    out = functional.augment([x.to(device) for x in images], params.to(device), cfg)
    expected = augment_reference(images, params, cfg)
    std = torch.tensor(cfg.std)[None, :, None, None]
    # on the [0, 1] scale, relative to 1: SEMANTICS.md's 2e-3
    err = float(((out.float().cpu() - expected.float()) * std).abs().max())
    return _row("augment", case, [err], 2e-3)


def check_augment(device, quick=False):
    rows = []
    for n, size, source in ((4, 24, 40), (16 if quick else 64, 64 if quick else 224, 256)):
        case = f"B={n} {source // 2}-{source}px -> {size}px, SimCLR + solarize"
        rows.append(_guard("augment", case, partial(_augment_case, case, n, size, source, device)))
    return rows


def check_pretrain(device, quick=False):
    from sslfast.bench.pretrain import check  # it uses this module's helpers

    return check(device, quick)


CHECKS = {"augment": check_augment, "contrastive": check_contrastive, "dino": check_dino,
          "ema": check_ema, "queue": check_queue, "pretrain": check_pretrain}


def run_checks(ops, device, quick=False, progress=None):
    """{op: [result rows]} for the named benchmark ops."""
    out = {}
    for op in ops:
        if progress:
            progress(f"check {op}")
        fn = CHECKS.get(op)
        out[op] = fn(device, quick) if fn else [
            {"op": op, "case": "-", "ok": False, "error": float("inf"), "tolerance": None,
             "detail": "no check defined for this op"}]
    return out


def print_table(results):
    """A pass/fail table of every case; returns the ops that failed."""
    failed = []
    print(f"{'op':24} {'case':52} {'result':6} {'error':>9} {'tolerance':>9}")
    for op, rows in results.items():
        for r in rows:
            tol = "-" if r["tolerance"] is None else f"{r['tolerance']:.1e}"
            print(f"{r['op']:24} {r['case'][:52]:52} {'pass' if r['ok'] else 'FAIL':6} "
                  f"{r['error']:9.2e} {tol:>9} {r['detail']}")
        if not all(r["ok"] for r in rows):
            failed.append(op)
    return failed
