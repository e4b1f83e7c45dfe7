"""The pane's curves: each run's loss (raw, and smoothed over it) and live score, as the data frames Gradio's
line plots draw."""

from __future__ import annotations

import pandas as pd

SMOOTHING = 0.9  # EMA factor of the loss curve drawn over the raw one
SERIES_COLORS = {"A": "#d9480f", "A raw": "#f8d3bf", "B": "#1c7ed6", "B raw": "#c3dcf5"}
SCORE_COLORS = {"A colour": "#d9480f", "A geometry": "#862e9c", "B colour": "#1c7ed6", "B geometry": "#0b7285"}


def smoothed(values: list[float], factor: float = SMOOTHING) -> list[float]:
    """Exponential moving average, debiased (as TensorBoard draws it): the first points are not pulled to 0."""
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        if v == v:  # NaN (a skipped step) leaves the average as it is
            avg, weight = factor * avg + (1 - factor) * v, factor * weight + (1 - factor)
        out.append(avg / weight if weight else float("nan"))
    return out


def loss_frame(runs, last: int = 2000) -> pd.DataFrame:
    """step, loss, series: each run's raw loss ("A raw", faint) and its EMA ("A") over its last points."""
    rows = []
    for run in runs:
        hist = run.history[-last:]
        steps, losses = [h[0] for h in hist], [h[1] for h in hist]
        rows += [(st, v, f"{run.name} raw") for st, v in zip(steps, losses)]
        rows += [(st, v, run.name) for st, v in zip(steps, smoothed(losses))]
    return pd.DataFrame(rows, columns=["step", "loss", "series"]).astype({"step": int, "loss": float, "series": str})


def loss_limits(frame: pd.DataFrame) -> list[float] | None:
    """The loss plot's y range: the smoothed curves' range after their first quarter, with room above, so the
    large losses of the first steps do not flatten the rest (raw points beyond it are clipped)."""
    smooth = frame[~frame["series"].str.endswith(" raw")].dropna()
    recent = smooth[smooth["step"] >= smooth["step"].quantile(0.25)]["loss"] if len(smooth) else smooth["loss"]
    if recent.empty:
        return None
    lo, hi = min(0.0, float(recent.min())), 1.5 * float(recent.max())
    return [lo, hi if hi > lo else lo + 1.0]


def score_frame(runs) -> pd.DataFrame:
    """step, R-Precision, series: each run's live colour and geometry scores."""
    rows = []
    for run in runs:
        for sc in run.scores:
            for key, word in (("color_r_precision", "colour"), ("geometry_r_precision", "geometry")):
                if sc.get(key) is not None:
                    rows.append((sc["step"], sc[key], f"{run.name} {word}"))
    return pd.DataFrame(rows, columns=["step", "R-Precision", "series"]).astype(
        {"step": int, "R-Precision": float, "series": str})


def placeholder(y: str, colors: dict) -> pd.DataFrame:
    """A plot's first value: one empty (NaN) point per series. Gradio's plot fixes its colour scale from the
    first value it gets, so a plot that starts empty would draw every later curve without a colour."""
    return pd.DataFrame([(0, float("nan"), k) for k in colors], columns=["step", y, "series"]).astype(
        {"step": int, y: float, "series": str})
