"""Stage 1 of Q-Tuning on one pool: the quadrant triage of the Error-Uncertainty plane (numpy, on CPU).

Pure numpy, no torch: a pool holds a few dozen samples, and the same function triages a whole scored data set
(static arms, the EU-plane figures of `qtuning.report`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def keep_count(pool: int, ratio: float) -> int:
    """K = max(1, round(b * r_s)): rows a pool keeps."""
    return max(1, round(pool * ratio))


# Quadrant codes of the EU plane. 0: between the thresholds, in no quadrant.
Q1_NOISE, Q2_MISCONCEPTION, Q3_MASTERED, Q4_CALIBRATION = 1, 2, 3, 4


@dataclass
class Triage:
    """Quadrant triage of one pool (numpy, on CPU: b is small)."""

    keep: np.ndarray  # (b,) bool
    q2: np.ndarray  # (b,) bool, kept rows whose tokens are pruned (Q2 and Q2-like fill-ins)
    quadrant: np.ndarray  # (b,) int, 1..4 or 0: the geometric quadrant at the final thresholds, before fill-in
    alpha: float  # alpha = beta reached by the bisection
    filled: int  # rows added by the fill-in rule
    fill_in: np.ndarray  # (b,) bool, those rows (their `quadrant` says where they lie, `q2` what they count as)

    @property
    def role(self) -> np.ndarray:
        """(b,) int: the quadrant each row is treated as: Q2 for token-pruned kept rows, Q4 for kept rows trained
        whole, the geometric quadrant otherwise (a fill-in counts as Q2 or Q4, wherever it lies)."""
        return np.where(self.keep, np.where(self.q2, Q2_MISCONCEPTION, Q4_CALIBRATION), self.quadrant)


def _quadrants(ppl: np.ndarray, ent: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    beta = alpha
    q2 = (ppl > np.quantile(ppl, 1 - alpha)) & (ent <= np.quantile(ent, beta))
    q4 = (ppl <= np.quantile(ppl, alpha)) & (ent > np.quantile(ent, 1 - beta))
    q1 = (ppl > np.quantile(ppl, 1 - alpha)) & (ent > np.quantile(ent, 1 - beta))
    q3 = (ppl <= np.quantile(ppl, alpha)) & (ent <= np.quantile(ent, beta))
    return q1, q2, q3, q4


def triage(ppl, ent, ratio: float, *, iters: int = 10, tol: float = 0.01) -> Triage:
    """Stage 1 of Q-Tuning: keep the misconception (Q2) and calibration (Q4) quadrants.

    alpha = beta is bisected in [0, 0.49] until the kept share is within `tol` of
    `ratio` (at most `iters` steps; the last masks are used). If fewer than
    K = max(1, round(b * ratio)) are kept, the rest is filled with the samples
    furthest from the diagonal of the min-max normalised plane; a kept set larger
    than K is not cut.
    """
    ppl = np.asarray(ppl, dtype=np.float64)
    ent = np.asarray(ent, dtype=np.float64)
    b = len(ppl)
    lo, hi = 0.0, 0.49
    for _ in range(iters):
        alpha = (lo + hi) / 2
        q1, q2, q3, q4 = _quadrants(ppl, ent, alpha)
        share = (q2 | q4).sum() / b
        if abs(share - ratio) <= tol:
            break
        lo, hi = (alpha, hi) if share < ratio else (lo, alpha)

    quadrant = np.zeros(b, dtype=np.int64)
    for code, mask in ((Q1_NOISE, q1), (Q3_MASTERED, q3), (Q2_MISCONCEPTION, q2), (Q4_CALIBRATION, q4)):
        quadrant[mask] = code
    keep = q2 | q4
    q2_rows = q2.copy()
    k = keep_count(b, ratio)
    fill_in = np.zeros(b, dtype=bool)
    if keep.sum() < k:
        ppl_n = _minmax(ppl)
        ent_n = _minmax(ent)
        gap = np.abs(ppl_n - ent_n)
        gap[keep] = -np.inf
        order = np.argsort(-gap, kind="stable")
        for i in order[: k - keep.sum()]:
            keep[i] = fill_in[i] = True
            q2_rows[i] = ppl_n[i] >= ent_n[i]  # counts as Q2 (token-pruned), else as Q4 (kept whole)
    return Triage(keep=keep, q2=q2_rows, quadrant=quadrant, alpha=float(alpha), filled=int(fill_in.sum()), fill_in=fill_in)


def _minmax(x: np.ndarray) -> np.ndarray:
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)
