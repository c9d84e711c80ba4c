"""AUP, the area under the accuracy-parallelism curve (d3LLM; hao-ai-lab blog "Who is the Most
Parallel Parallel-Decoder?", 2025, section "AUP score").

A policy's sweep gives points (rho, y): rho = parallelism, tokens per forward (TPF), y = accuracy
in percent. Sorted by rho, the curve starts at the point of lowest rho (rho_1, y_1); only points
with y >= y_1 - 5 count (a setting that loses more than five points is not a usable operating
point). Accuracy is weighted by W(y) = min(exp(-alpha (1 - y / y_max)), 1), alpha = 3, with y_max the
best accuracy any policy reaches on the task, so speed bought with accuracy is discounted:

    AUP = rho_1 y_1 + 1/2 sum_{i >= 2} (rho_i - rho_{i-1}) (y_i W(y_i) + y_{i-1} W(y_{i-1}))

(the first term is the area of the rectangle under the first point, unweighted, as in the blog's
formula). One token per step at accuracy 100 scores 100.
"""

from __future__ import annotations

import math
from typing import Iterable


def weight(y: float, y_max: float, alpha: float = 3.0) -> float:
    """W(y) = min(exp(-alpha (1 - y / y_max)), 1); 1 when y_max is 0 (every point scores 0 anyway)."""
    if y_max <= 0:
        return 1.0
    return min(math.exp(-alpha * (1.0 - y / y_max)), 1.0)


def aup(points: Iterable[tuple[float, float]], y_max: float, drop: float = 5.0, alpha: float = 3.0) -> float:
    """AUP of one policy's curve on one task; ``points``: (tokens per forward, accuracy in percent)."""
    pts = sorted((float(r), float(y)) for r, y in points)
    if not pts:
        raise ValueError("points: need at least one (rho, accuracy) point")
    for r, y in pts:
        if not (r > 0 and math.isfinite(r)) or not 0.0 <= y <= 100.0:
            raise ValueError(f"points: need rho > 0 and 0 <= accuracy <= 100, got ({r}, {y})")
    rho1, y1 = pts[0]
    kept = [p for p in pts if p[1] >= y1 - drop]
    total = rho1 * y1
    for (r0, a0), (r1, a1) in zip(kept, kept[1:]):
        total += 0.5 * (r1 - r0) * (a1 * weight(a1, y_max, alpha) + a0 * weight(a0, y_max, alpha))
    return total
