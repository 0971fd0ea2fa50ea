"""Plots of the image experiment: quality against cost per method, and sample grids."""

from __future__ import annotations

import math
import os

import numpy as np

from mlem_jax.plotting import pyplot


def plot_curves(result, out, name):
    """Quality against cost: each method's cost-quality front as a line, its runs as dots;
    the baseline in black."""
    plt = pyplot(required=False)
    if plt is None:
        return
    for part, ode in (("sde", False), ("ode", True)):
        rs = [r for r in result["runs"] if r["ode"] == ode]
        if not rs:
            continue
        methods = list(dict.fromkeys(r["method"] for r in rs))
        colors = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(methods), 2)))
        metrics = [(m, n) for m, n in (("fid", "Fréchet distance (classifier features)"), ("rms", "coupled RMS error"))
                   if any(r.get(m) is not None for r in rs)]
        fig, axes = plt.subplots(len(metrics), 2, figsize=(13, 5.5 * len(metrics)), squeeze=False)
        for i, (metric, mname) in enumerate(metrics):
            for j, (cost, cname) in enumerate((("flops", "GFLOP per sample"), ("seconds", "wall s per 1000 samples"))):
                ax = axes[i, j]
                for m, color in zip(methods, colors):
                    pts = sorted((r[cost] / (1e9 if cost == "flops" else 1), r[metric], r.get(metric + "_se", 0))
                                 for r in rs if r["method"] == m and r.get(metric) is not None)
                    if not pts:
                        continue
                    c, e, se = np.array(pts).T
                    front = np.minimum.accumulate(e)
                    keep = np.r_[True, front[1:] < front[:-1]]
                    style = dict(lw=2.5, color="k", zorder=5) if m == methods[0] else dict(lw=1.2, color=color)
                    ax.plot(c[keep], front[keep], "-", label=m, **style)
                    ax.errorbar(c, e, yerr=se, fmt="o", ms=3, color=style["color"], alpha=0.6)
                ax.set(xscale="log", yscale="log", xlabel=cname, ylabel=mname)
                ax.grid(alpha=0.3)
        for i in range(len(metrics)):
            axes[i, 0].legend(fontsize=6)
        fig.suptitle(f"{result['dataset']}: quality against cost ({'probability-flow ODE' if ode else 'reverse SDE'}); "
                     f"lines: fronts, dots: runs ± 1 s.e.\n{result['device']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"{name}_{part}.png"), dpi=90)
        plt.close(fig)


def plot_samples(result, samples, out, name, em_method, steps):
    """Sample grids of every SDE method at about the wall time of the baseline at `steps`."""
    plt = pyplot(required=False)
    if plt is None:
        return
    runs = [r for r in result["runs"] if not r["ode"]]
    target = next((r["seconds"] for r in runs if r["method"] == em_method and r["steps"] == steps), None)
    if target is None:
        return
    chosen = [min((r for r in runs if r["method"] == m), key=lambda r: abs(math.log(r["seconds"] / target)))
              for m in dict.fromkeys(r["method"] for r in runs)]
    cols, rows = 4, math.ceil(len(chosen) / 4)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.5 * rows), squeeze=False)
    for ax in np.ravel(axes):
        ax.axis("off")
    from mlem_jax.diffusion.images import to_grid

    for ax, r in zip(np.ravel(axes), chosen):
        grid = to_grid(samples[r["label"]], ncols=4)
        ax.imshow(np.squeeze(grid), cmap="gray" if grid.shape[-1] == 1 else None)
        ax.set_title(f"{r['label']}\n{r['seconds']:.1f} s/1000, rms {r['rms']:.3f}", fontsize=6)
    fig.suptitle(f"samples at about the wall time of {em_method} with {steps} steps (same noise)", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{name}_samples.png"), dpi=90)
    plt.close(fig)
