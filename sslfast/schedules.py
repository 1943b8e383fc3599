"""Schedules for momentum and learning rate (lightly.utils.scheduler semantics)."""

import warnings

import numpy as np


def cosine_schedule(
    step: int,
    max_steps: int,
    start_value: float,
    end_value: float,
    period: int | None = None,
) -> float:
    """Cosine from ``start_value`` at step 0 to ``end_value`` at ``max_steps - 1``.

    With ``period`` the cosine cycles every ``period`` steps instead. Same
    results, warnings and errors as ``lightly.utils.scheduler.cosine_schedule``.
    """
    if step < 0:
        raise ValueError(f"Current step number {step} can't be negative.")
    if max_steps < 0:
        raise ValueError(f"Total step number {max_steps} can't be negative.")
    if period is None and step > max_steps:
        warnings.warn(
            f"Current step number {step} exceeds max_steps {max_steps}.",
            category=RuntimeWarning,
            stacklevel=2,
        )
    if period is not None and period <= 0:
        raise ValueError(f"Period {period} must be >= 1")

    if period is not None:
        value = end_value - (end_value - start_value) * (np.cos(2 * np.pi * step / period) + 1) / 2
    elif max_steps <= 1 or step >= max_steps - 1:
        # The last step (and past it, as PyTorch Lightning steps once more) ends the schedule.
        value = end_value
    else:
        value = (
            end_value
            - (end_value - start_value) * (np.cos(np.pi * step / (max_steps - 1)) + 1) / 2
        )
    return float(value)
