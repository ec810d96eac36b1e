"""PNG plots of an audit: both replicas' metric curves, and how far the replicas drift per step.

Drawn with matplotlib's object API on an Agg canvas (no pyplot, no global figure state, no
display needed), written atomically. Each function returns None when the result has nothing to
draw, so callers can log whatever exists.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from ..atomic import atomic_write
from .config import PublishError
from .findings import best_checkpoint, early_stop_epoch
from .naming import target_slug

_RESERVED = ("step", "epoch")
_MAX_METRIC_PANELS = 8
_CLAIM_COLOR = "magenta"  # the checkpoint's claim: unlike any replica, best-epoch or early-stop colour
_REPLICA_STYLES = [
    dict(color="tab:blue", linestyle="-", marker="o", markersize=5),
    dict(color="tab:orange", linestyle="--", marker="x", markersize=7),
    dict(color="tab:purple", linestyle=":", marker="s", markersize=4),
]


def ensure_plots_dir(out_dir) -> Path:
    """``out_dir``, created if only its last part is missing (never a whole missing tree)."""
    out_dir = Path(out_dir)
    if out_dir.is_dir():
        return out_dir
    if not out_dir.parent.is_dir():
        raise PublishError(f"cannot write plots into {out_dir}: its folder {out_dir.parent} does not exist")
    try:
        out_dir.mkdir(exist_ok=True)
    except OSError as e:
        raise PublishError(f"cannot create the plots folder {out_dir}: {e}") from e
    return out_dir


def _save(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100), fsync=False)
    except OSError as e:
        raise PublishError(f"cannot write the plot {path}: {e}") from e
    return path


def _finite(v) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _metric_names(replicas) -> list:
    names: list = []
    for r in replicas:
        for row in r.metrics:
            for k, v in row.items():
                if k not in _RESERVED and k not in names and _finite(v) is not None:
                    names.append(k)
    return names


def plot_metrics(result, out_dir, *, stem: Optional[str] = None) -> Optional[Path]:
    """Both replicas' metric curves, one panel per metric, best epoch and early-stop epoch marked.

    X is the epoch when every logged row has one, else the step, else the row index. ``stem`` names
    the file (default: the target's slug; a session auditing a target twice passes each audit's own,
    see ``naming.audit_names``). Returns None when no replica logged a numeric metric.
    """
    fig = metrics_figure(result)
    if fig is None:
        return None
    return _save(fig, ensure_plots_dir(out_dir) / f"{stem or target_slug(result.target)}-metrics.png")


def metrics_figure(result):
    """The ``matplotlib.figure.Figure`` behind ``plot_metrics`` (None when there is nothing to draw)."""
    replicas = [r for r in result.replicas if r.metrics]
    names = _metric_names(replicas)
    if not names:
        return None
    from matplotlib.figure import Figure

    rows = [row for r in replicas for row in r.metrics]
    if all(row.get("epoch") is not None for row in rows):
        xkey, xlabel = "epoch", "epoch"
    elif all(row.get("step") is not None for row in rows):
        xkey, xlabel = "step", "training step"
    else:
        xkey, xlabel = None, "logged row"
    best = best_checkpoint(result)
    stop = early_stop_epoch(result)
    mark_epochs = xkey == "epoch"

    shown = names[:_MAX_METRIC_PANELS]
    fig = Figure(figsize=(8, 2.8 * len(shown) + 0.6))
    axes = fig.subplots(len(shown), 1, squeeze=False, sharex=True)[:, 0]
    for ax, name in zip(axes, shown):
        for r in replicas:
            xs, ys = [], []
            for i, row in enumerate(r.metrics):
                y = _finite(row.get(name))
                if y is None:
                    continue
                xs.append(row[xkey] if xkey else i)
                ys.append(y)
            if xs:
                style = _REPLICA_STYLES[r.index % len(_REPLICA_STYLES)]
                # Long series: a marker every ~40th point, staggered per replica, so equal curves stay
                # distinguishable instead of one replica's markers burying the other's line.
                every = max(1, len(xs) // 40)
                markevery = (min(r.index * every // 2, len(xs) - 1), every) if every > 1 else None
                ax.plot(xs, ys, label=f"replica {r.index}", linewidth=1.6, markevery=markevery, **style)
        if mark_epochs and best is not None:
            _mark_best(ax, name, best)
        if mark_epochs and stop is not None:
            ax.axvline(stop, color="tab:red", linestyle="-.", linewidth=2, label=f"early stop at epoch {stop}")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[-1].set_xlabel(xlabel)
    if xkey in ("epoch", "step"):
        from matplotlib.ticker import MaxNLocator

        axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    title = f"{result.target}: {result.verdict}"
    if len(names) > len(shown):
        title += f" (first {len(shown)} of {len(names)} metrics)"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _mark_best(ax, name: str, best) -> None:
    """The history's best epoch and value; when the checkpoint's claim is disputed, the claim too.

    A failing best checkpoint records another epoch or other values than the history logged; drawing
    only the history would hide the very failure, so the claim gets its own marker and legend entry.
    """
    disputed = best.disputed
    monitor = f" ({best.monitor}, {best.mode or '?'})" if best.monitor else ""
    label = f"logged history: best epoch {best.best_epoch}" if disputed else f"best epoch {best.best_epoch}"
    ax.axvline(best.best_epoch, color="tab:green", linestyle=":", linewidth=2, label=label + monitor)
    y = _finite(best.recorded_metrics.get(name))
    if y is not None:
        star = f"logged history: {name} at best epoch {best.best_epoch}" if disputed else f"recorded {name} at best epoch"
        ax.plot([best.best_epoch], [y], linestyle="none", marker="*", markersize=16, color="tab:green",
                markeredgecolor="black", zorder=5, label=star)
    if not disputed:
        return
    epoch = best.checkpoint_epoch
    if epoch != best.best_epoch:
        ax.axvline(epoch, color=_CLAIM_COLOR, linestyle="--", linewidth=1.5,
                   label=f"claimed by checkpoint: best epoch {epoch}")
    c = _finite(best.claimed_metrics.get(name))
    if c is not None:
        ax.plot([epoch], [c], linestyle="none", marker="X", markersize=13, color=_CLAIM_COLOR,
                markeredgecolor="black", zorder=6, label=f"claimed by checkpoint: {name}={c:.4g} at epoch {epoch}")


def plot_step_divergence(result, out_dir, *, stem: Optional[str] = None) -> Optional[Path]:
    """Per-step divergence between replicas on a log scale, with the count of differing tensors.

    ``result.step_divergence`` rows are ``{"step", "max_abs_diff_sampled", "tensors_differing"}``; a zero
    (the replicas agree at that step) cannot sit on a log axis, so zeros are drawn at the bottom
    edge with their own marker and legend entry. ``stem`` names the file as in ``plot_metrics``.
    Returns None without rows.
    """
    fig = step_divergence_figure(result)
    if fig is None:
        return None
    return _save(fig, ensure_plots_dir(out_dir) / f"{stem or target_slug(result.target)}-step-divergence.png")


def step_divergence_figure(result):
    """The ``matplotlib.figure.Figure`` behind ``plot_step_divergence`` (None without rows)."""
    rows = [r for r in result.step_divergence if isinstance(r, dict) and r.get("step") is not None]
    if not rows:
        return None
    from matplotlib.figure import Figure

    rows.sort(key=lambda r: r["step"])
    steps = [r["step"] for r in rows]
    vals = [_finite(r.get("max_abs_diff_sampled")) for r in rows]
    pos = [(s, v) for s, v in zip(steps, vals) if v is not None and v > 0]
    zero = [s for s, v in zip(steps, vals) if v is not None and v == 0]
    floor = min(v for _, v in pos) / 10 if pos else 1e-12

    fig = Figure(figsize=(8, 6))
    ax, ax2 = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    if pos:
        ax.plot([s for s, _ in pos], [v for _, v in pos], color="tab:red", marker="o", markersize=5,
                linewidth=1.5, label="replicas differ")
    if zero:
        ax.plot(zero, [floor] * len(zero), linestyle="none", marker="v", markersize=7, color="tab:gray",
                label="bitwise equal (0; a log axis cannot show 0, drawn at the bottom)")
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor / 2)
    fd = result.first_divergence
    if fd is not None and fd.step is not None:
        where = f"first divergence: step {fd.step}" + (f", {fd.tensor}" if fd.tensor else "")
        ax.axvline(fd.step, color="black", linestyle="--", linewidth=1.2, label=where)
        ax2.axvline(fd.step, color="black", linestyle="--", linewidth=1.2)
    ax.set_ylabel("max |Δ| over sampled elements\nreplica 0 vs 1 (max_abs_diff_sampled, log)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax2.bar(steps, [int(r.get("tensors_differing") or 0) for r in rows], color="tab:blue", width=0.8)
    ax2.set_ylabel("tensors\ndiffering")
    ax2.set_xlabel("optimizer step")
    from matplotlib.ticker import MaxNLocator

    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"{result.target}: per-step divergence", fontsize=10)
    fig.tight_layout()
    return fig
