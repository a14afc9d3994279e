"""Ramps from a start to an end value over progress 0 -> 1, shared by schedules and objectives."""

from __future__ import annotations

import math


def cosine_ramp(start: float, end: float, progress: float) -> float:
    """start -> end along a half cosine as progress goes 0 -> 1; clamped outside."""
    progress = min(max(progress, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear_ramp(start: float, end: float, progress: float) -> float:
    progress = min(max(progress, 0.0), 1.0)
    return start + (end - start) * progress
