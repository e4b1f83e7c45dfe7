"""The pane's curves: each run's loss (raw, and smoothed over it) on a log scale, and its live score, as the data
frames Gradio's line plots draw, with the colours of the series that exist."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

SMOOTHING = 0.9  # EMA factor of the loss curve drawn over the raw one
LOSS_Y = "log₁₀ loss"  # the loss plot's y: two runs' losses may differ by orders of magnitude (SDS vs VSD)
SCORE_Y = "score"
SERIES_COLORS = {"A": "#d9480f", "A raw": "#f8d3bf", "B": "#1c7ed6", "B raw": "#c3dcf5"}
# R-Precision (colour, geometry) saturates at 1 once the object has formed; the silhouette IoU with the prompted
# solid keeps telling two formed runs apart
SCORES = (("color_r_precision", "colour R-P"), ("geometry_r_precision", "geometry R-P"), ("shape_score", "silhouette"))
SCORE_COLORS = {"A colour R-P": "#d9480f", "A geometry R-P": "#862e9c", "A silhouette": "#2f9e44",
                "B colour R-P": "#1c7ed6", "B geometry R-P": "#0b7285", "B silhouette": "#94d82d"}


def smoothed(values: list[float], factor: float = SMOOTHING) -> list[float]:
    """Exponential moving average, debiased (as TensorBoard draws it): the first points are not pulled to 0."""
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        if v == v:  # NaN (a skipped step) leaves the average as it is
            avg, weight = factor * avg + (1 - factor) * v, factor * weight + (1 - factor)
        out.append(avg / weight if weight else float("nan"))
    return out


def smoothed_loss(history: list, last: int = 200) -> float | None:
    """The EMA of a run's loss at its last step (what the status line shows: the raw loss jumps by 100x)."""
    values = smoothed([h[1] for h in history[-last:]])
    return values[-1] if values and math.isfinite(values[-1]) else None


def loss_frame(runs, last: int = 2000) -> pd.DataFrame:
    """step, loss, log₁₀ loss, series: each run's raw loss ("A raw", faint) and its EMA ("A") over its last
    points; a loss that is not positive has no log (left out of the plot)."""
    rows = []
    for run in runs:
        hist = run.history[-last:]
        steps, losses = [h[0] for h in hist], [h[1] for h in hist]
        rows += [(st, v, f"{run.name} raw") for st, v in zip(steps, losses)]
        rows += [(st, v, run.name) for st, v in zip(steps, smoothed(losses))]
    df = pd.DataFrame(rows, columns=["step", "loss", "series"]).astype({"step": int, "loss": float, "series": str})
    with np.errstate(divide="ignore", invalid="ignore"):
        df[LOSS_Y] = np.log10(df["loss"].where(df["loss"] > 0))
    return df


def loss_limits(frame: pd.DataFrame) -> list[float] | None:
    """The loss plot's y range (log₁₀): the smoothed curves' range after their first quarter, half a decade of
    room either side, so the large losses of the first steps do not flatten the rest (raw points beyond it are
    clipped)."""
    smooth = frame[~frame["series"].str.endswith(" raw")].dropna()
    recent = smooth[smooth["step"] >= smooth["step"].quantile(0.25)][LOSS_Y] if len(smooth) else smooth[LOSS_Y]
    if recent.empty:
        return None
    lo, hi = float(recent.min()), float(recent.max())
    return [math.floor(2 * lo - 1) / 2, math.ceil(2 * hi + 1) / 2]


def score_frame(runs) -> pd.DataFrame:
    """step, score, series: each run's live colour and geometry R-Precision and silhouette IoU."""
    rows = []
    for run in runs:
        for sc in run.scores:
            rows += [(sc["step"], sc[key], f"{run.name} {word}") for key, word in SCORES if sc.get(key) is not None]
    return pd.DataFrame(rows, columns=["step", SCORE_Y, "series"]).astype({"step": int, SCORE_Y: float, "series": str})


def present(frame: pd.DataFrame, colors: dict) -> list[str]:
    """The series of `colors` that `frame` holds points of: the legend lists these only."""
    have = set(frame.dropna()["series"])
    return [k for k in colors if k in have]


def placeholder(y: str, colors: dict) -> pd.DataFrame:
    """A plot's first value: one empty (NaN) point per series. Gradio's plot fixes its colour scale from the
    first value it gets, so a plot that starts empty would draw every later curve without a colour."""
    return pd.DataFrame([(0, float("nan"), k) for k in colors], columns=["step", y, "series"]).astype(
        {"step": int, y: float, "series": str})
