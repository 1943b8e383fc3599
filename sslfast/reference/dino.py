"""DINO loss — SEMANTICS.md §7, lightly.loss.DINOLoss without the center update."""

import torch.nn.functional as F


def dino_reference(teacher_out, student_out, center, teacher_temp=0.04, student_temp=0.1):
    """Mean over crop pairs (a, b) with a != b of
    mean_n -sum_k softmax((t_a - center) / teacher_temp)_nk log_softmax(s_b / student_temp)_nk.

    teacher_out, student_out: lists of (N, K) tensors; center: K elements.
    (The definition: gradients flow to every input, the teacher's included.)
    """
    center = center.reshape(-1)
    total, n_terms = 0.0, 0
    for a, t in enumerate(teacher_out):
        p = F.softmax((t - center) / teacher_temp, dim=-1)
        for b, s in enumerate(student_out):
            if a != b:
                total = total - (p * F.log_softmax(s / student_temp, dim=-1)).sum(-1).mean()
                n_terms += 1
    return total / n_terms
