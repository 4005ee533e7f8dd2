"""The report's plots (matplotlib, Agg: no display needed), each returned as PNG bytes."""

from __future__ import annotations

import io

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"]


def _figure(width: float = 6.4, height: float = 3.4, ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols if ncols > 1 else width, height), squeeze=False)
    return fig, list(axes[0])


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def _label(ax, title: str, xlabel: str, ylabel: str, grid: bool = True) -> None:
    """Title, axis labels, a light grid and a legend when anything is labelled."""
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if grid:
        ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _iteration_axis(ax, iterations) -> None:
    """One tick per iteration present, half a step of margin (a single iteration is not a fraction axis)."""
    its = sorted(set(iterations))
    if its:
        ax.set_xticks(its)
        ax.set_xlim(its[0] - 0.5, its[-1] + 0.5)


def rate_series_plot(series: dict[str, list[tuple[int, float, list[float] | None]]], title: str,
                     ylabel: str = "unsafe rate", ax=None) -> bytes | None:
    """Lines of (iteration, rate, [lo, hi] or None) per name, with 95% interval bars."""
    own = ax is None
    if own:
        fig, (ax,) = _figure()
    every_x = []
    for i, (name, points) in enumerate(sorted(series.items())):
        points = [p for p in points if p[1] is not None]
        if not points:
            continue
        xs = [p[0] for p in points]
        every_x += xs
        ys = [p[1] for p in points]
        lo = [p[1] - p[2][0] if p[2] else 0.0 for p in points]
        hi = [p[2][1] - p[1] if p[2] else 0.0 for p in points]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=name, color=COLOURS[i % len(COLOURS)])
    ax.set_ylim(-0.03, 1.03)
    _iteration_axis(ax, every_x)
    _label(ax, title, "iteration (codebook version)", ylabel)
    return _png(fig) if own else None


def per_category_plot(by_judge: dict[str, dict[str, list[tuple[int, float, list[float] | None]]]]) -> bytes:
    """One panel per judge, one line per category (the paper's figure: unsafe share per category per iteration)."""
    judges = sorted(by_judge)
    fig, axes = _figure(4.2, 3.4, max(1, len(judges)))
    for ax, judge in zip(axes, judges):
        rate_series_plot(by_judge[judge], f"judge: {judge}", ax=ax)
    return _png(fig)


def quality_plot(iterations: list[int], fidelity: list[float | None], pairs: list[int | None]) -> bytes:
    fig, (ax,) = _figure()
    ax.bar(iterations, [p or 0 for p in pairs], color="#c7c7c7", label="pairs")
    ax.set_xlabel("iteration")
    ax.set_ylabel("pairs")
    _iteration_axis(ax, iterations)
    if any(f is not None for f in fidelity):
        twin = ax.twinx()
        points = [(i, f) for i, f in zip(iterations, fidelity) if f is not None]
        twin.plot([p[0] for p in points], [p[1] for p in points], "o-", color=COLOURS[2], label="benign fidelity")
        twin.set_ylabel("benign fidelity")
        twin.set_ylim(0, 1.02)
        twin.legend(loc="lower right", fontsize=8)
    ax.set_title("pairs found and benign fidelity", fontsize=10)
    return _png(fig)


def kappa_plot(series: dict[str, list[tuple[int, float | None]]]) -> bytes:
    fig, (ax,) = _figure()
    for i, (name, points) in enumerate(sorted(series.items())):
        points = [p for p in points if p[1] is not None]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=f"self vs {name}",
                    color=COLOURS[i % len(COLOURS)])
    ax.axhline(0, color="black", lw=0.5)
    ax.set_ylim(-1.02, 1.02)
    _iteration_axis(ax, [p[0] for points in series.values() for p in points])
    _label(ax, "self-judge agreement with each external judge", "iteration", "Cohen's kappa")
    return _png(fig)


def movement_plot(movement: dict[int, list[float]]) -> bytes:
    """Histogram of how far each code moved from v0, per version (log count axis)."""
    fig, (ax,) = _figure()
    top = max((max(v) for v in movement.values() if v), default=1.0) or 1.0
    bins = [top * i / 30 for i in range(31)]
    for i, (version, values) in enumerate(sorted(movement.items())):
        ax.hist(values, bins=bins, histtype="step", lw=1.5, label=f"v{version:04d}", color=COLOURS[i % len(COLOURS)])
    ax.set_yscale("log")
    _label(ax, "how far the codes moved", "distance moved from v0 (normalised codes)", "codes", grid=False)
    return _png(fig)


def spectrum_plot(spectra: dict[int, list[float]]) -> bytes:
    fig, (ax,) = _figure()
    for i, (iteration, values) in enumerate(sorted(spectra.items())):
        ax.plot(range(1, len(values) + 1), values, "o-", label=f"iteration {iteration}", color=COLOURS[i % len(COLOURS)])
    ax.set_yscale("log")
    _label(ax, "Harmful Space: singular values of the pair differences", "index", "singular value")
    return _png(fig)
