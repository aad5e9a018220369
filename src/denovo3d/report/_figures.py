"""The pictures of a report: maps as sections and projections, convergence, poses, FSC.

Drawn on matplotlib ``Figure`` objects (Agg canvas, no pyplot state, no display needed). Maps are
``(z, y, x)`` arrays as ``read_mrc`` returns them; every view is shown with its first in-plane axis
to the right and the second up, as in ChimeraX looking down the viewing axis.
"""

from __future__ import annotations

import io
import itertools
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from denovo3d.errors import InputError
from denovo3d.fsc import fsc_volumes
from denovo3d.io.mrc import read_mrc
from denovo3d.report._job import Job

__all__ = [
    "MAX_ANGULAR_MARKERS",
    "MAX_STRIP_ITERATIONS",
    "angular_figure",
    "class_strip",
    "convergence_figure",
    "final_model_figure",
    "fsc_figure",
    "png_bytes",
    "views",
]

_VIEWS = ["z", "y", "x"]  # view along this axis; in-plane axes below, shown right and up
_IN_PLANE = {"z": "x→ y↑", "y": "x→ z↑", "x": "y→ z↑"}


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes (100 dpi, white background, trimmed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def views(volume: np.ndarray) -> list[np.ndarray]:
    """Central sections then projections along z, y, x of ``(z, y, x)``, each with rows going up."""
    c = [n // 2 for n in volume.shape]
    sections = [volume[c[0]], volume[:, c[1], :], volume[:, :, c[2]]]
    projections = [volume.sum(axis=a) for a in range(3)]
    return [np.flipud(v) for v in sections + projections]


def _normalise(tile: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(tile, [0.5, 99.5])
    return np.clip((tile - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(tile)


def _mosaic_figure(
    tiles: list[list[np.ndarray | None]],
    rows: list[str],
    cols: list[str],
    title: str,
    inch: float = 1.0,
) -> Figure:
    """A grid of grey images (each contrast-stretched alone) in one axes, labelled by row/column."""
    h = max(t.shape[0] for r in tiles for t in r if t is not None)
    w = max(t.shape[1] for r in tiles for t in r if t is not None)
    gap = max(1, w // 16)
    grid = np.full((len(rows) * (h + gap) - gap, len(cols) * (w + gap) - gap), np.nan)
    for i, r in enumerate(tiles):
        for j, t in enumerate(r):
            if t is not None:
                y0, x0 = i * (h + gap), j * (w + gap)
                grid[y0 : y0 + t.shape[0], x0 : x0 + t.shape[1]] = _normalise(t)
    fig = Figure(figsize=(1.3 + inch * len(cols), 0.6 + inch * len(rows)))
    ax = fig.add_subplot()
    cmap = colormaps["gray"].with_extremes(bad="white")
    ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, interpolation="antialiased")
    ax.set_xticks([j * (w + gap) + w / 2 for j in range(len(cols))], cols, fontsize=9)
    ax.set_yticks([i * (h + gap) + h / 2 for i in range(len(rows))], rows, fontsize=9)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title, fontsize=11, loc="left")
    return fig


_ROW_LABELS = [f"section along {a}  ({_IN_PLANE[a]})" for a in _VIEWS] + [
    f"projection along {a}" for a in _VIEWS
]
MAX_STRIP_ITERATIONS = 25  # RELION's default 200 iterations, written every 10: all 21


def _spread(items: list, n: int) -> list:
    """At most ``n`` items evenly spread over ``items``, the first and last included."""
    if len(items) <= n:
        return items
    return [items[i] for i in sorted(set(np.linspace(0, len(items) - 1, n).round().astype(int)))]


def _read_or_note(path: Path, job: Job) -> tuple[np.ndarray, float] | None:
    """``read_mrc(path)``, or ``None`` with a note in ``job.notes`` when it is unreadable."""
    try:
        return read_mrc(path)
    except InputError as exc:
        job.notes.append(str(exc))
        return None


def class_strip(job: Job, k: int, fractions: dict[int, float]) -> Figure | None:
    """Sections and projections of class ``k`` at every written iteration, left to right.

    An unreadable map leaves its column blank (and a note); ``None`` if none is readable.
    """
    written = [it for it in job.iterations if k in it.classes]
    its = _spread(written, MAX_STRIP_ITERATIONS)
    maps = [_read_or_note(it.classes[k], job) for it in its]
    if not any(maps):
        return None
    columns = [views(m[0]) if m else [None] * 6 for m in maps]
    tiles = [[col[v] for col in columns] for v in range(6)]
    title = f"Class {k}" + (
        f" — {100 * fractions[k]:.0f} % of particles at the last iteration"
        if k in fractions
        else ""
    )
    if len(its) < len(written):
        title += f" ({len(its)} of {len(written)} written iterations, evenly spread)"
    return _mosaic_figure(tiles, _ROW_LABELS, [f"it {it.number}" for it in its], title, inch=0.95)


def final_model_figure(path: Path) -> Figure:
    """The map at ``path`` in three orthogonal views: central sections and projections."""
    volume, voxel = read_mrc(path)
    v = views(volume)
    cols = [f"along {a}  ({_IN_PLANE[a]})" for a in _VIEWS]
    info = f"{path.name}: box {'×'.join(map(str, volume.shape[::-1]))} voxels of {voxel:.3g} Å"
    return _mosaic_figure([v[:3], v[3:]], ["central section", "projection"], cols, info, inch=2.2)


def convergence_figure(table: pd.DataFrame) -> Figure:
    """Six panels of :func:`convergence_table` columns against iteration; absent ones say so."""
    fig = Figure(figsize=(13, 7), layout="constrained")
    axes = fig.subplots(2, 3, sharex=True).ravel()
    x = table["iteration"]
    cls_cols = sorted(c for c in table if re.fullmatch(r"class\d+_fraction", c))

    def line(ax, col: str, label: str | None = None, **kw) -> bool:
        if col in table and table[col].notna().any():
            ax.plot(x, table[col], marker="o", ms=4, label=label, **kw)
            return True
        return False

    panels = [
        (
            "Resolution (Å; better ↑)",
            ["resolution_a"] + [c.replace("fraction", "resolution_a") for c in cls_cols],
        ),
        ("Class distribution", cls_cols),
        ("Mean max. posterior ⟨Pmax⟩", ["pmax"]),
        ("Orientation change (°)", ["orientation_change_deg", "relion_orientation_change_deg"]),
        ("Step size", ["step_size"]),
        ("Regularisation T (τ² fudge)", ["tau2_fudge"]),
    ]
    names = {
        "resolution_a": "current",
        "orientation_change_deg": "mean, from data.star",
        "relion_orientation_change_deg": "RELION (optimiser.star)",
    }
    for ax, (title, cols) in zip(axes, panels, strict=True):
        drawn = [
            line(ax, c, names.get(c, c.split("_")[0].replace("class", "class "))) for c in cols
        ]
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration", fontsize=9)
        ax.xaxis.set_tick_params(labelbottom=True)
        ax.grid(alpha=0.3)
        if not any(drawn):
            ax.text(
                0.5,
                0.5,
                "not in the files",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="grey",
            )
        elif sum(drawn) > 1:
            ax.legend(fontsize=8)
    axes[0].invert_yaxis()
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    span = max(float(x.max() - x.min()), 1.0)
    axes[0].set_xlim(x.min() - 0.05 * span, x.max() + 0.05 * span)
    changes = table.get("class_change_pct")
    if changes is not None and changes.fillna(0).max() > 0:
        twin = axes[3].twinx()
        twin.plot(x, changes, color="grey", ls="--", marker=".")
        twin.set_ylim(bottom=0)
        twin.tick_params(labelsize=8, colors="grey")
        axes[3].set_title("Orientation change (°); grey: % changing class", fontsize=10)
    return fig


MAX_ANGULAR_MARKERS = 400


def angular_figure(data: pd.DataFrame, iteration: int) -> Figure | None:
    """Mollweide map of the projection directions (longitude rot, latitude 90° − tilt).

    Up to ``MAX_ANGULAR_MARKERS`` distinct directions (to 0.5°): one marker per direction and
    class, of area ∝ its particles. More: counts in equal-area bins, about 10 particles per bin.
    """
    if not {"rlnAngleRot", "rlnAngleTilt"} <= set(data.columns):
        return None
    lon = (data["rlnAngleRot"].to_numpy(float) + 180) % 360 - 180
    lat = 90 - data["rlnAngleTilt"].to_numpy(float)
    cls = data["rlnClassNumber"].to_numpy(int) if "rlnClassNumber" in data else 1
    table = pd.DataFrame({"lon": np.round(2 * lon) / 2, "lat": np.round(2 * lat) / 2, "cls": cls})
    points = table.groupby(["lon", "lat", "cls"]).size().rename("n").reset_index()
    fig = Figure(figsize=(8.4, 4.6), layout="constrained")
    ax = fig.add_subplot(projection="mollweide")
    if len(points) <= MAX_ANGULAR_MARKERS:
        base = min(float(np.clip(2000 / len(data), 4, 24)), 600.0 / points["n"].max())
        for k, group in points.groupby("cls"):
            ax.scatter(
                *np.deg2rad([group["lon"], group["lat"]]),
                s=base * group["n"],
                alpha=0.6,
                lw=0,
                label=f"class {k} ({group['n'].sum()})",
            )
        if points["cls"].nunique() > 1:
            ax.legend(loc="lower right", fontsize=8)
        how = "marker area ∝ particles"
    else:
        m = int(np.clip(np.sqrt(len(data) / 20), 6, 36))  # about 10 particles per bin
        lon_edges = np.linspace(-180, 180, 2 * m + 1)
        lat_edges = np.rad2deg(np.arcsin(np.linspace(-1, 1, m + 1)))  # equal-area bins
        counts, _, _ = np.histogram2d(lon, lat, bins=(lon_edges, lat_edges))
        mesh = ax.pcolormesh(*np.deg2rad(np.meshgrid(lon_edges, lat_edges)), counts.T, vmin=0)
        fig.colorbar(mesh, ax=ax, shrink=0.6, label="particles per bin (all classes)")
        how = f"{2 * m * m} equal-area bins"
    ax.grid(alpha=0.4)
    ax.tick_params(labelsize=8)
    ax.set_title(
        f"Projection directions of {len(data)} particles at iteration {iteration} ({how});"
        " longitude: rot, tilt 0° at the top",
        fontsize=10,
    )
    return fig


def fsc_figure(job: Job) -> Figure | None:
    """FSC between successive written iterations of each class (last 8 pairs)."""
    classes = sorted({k for it in job.iterations for k in it.classes})
    if not classes or len(job.iterations) < 2:
        return None
    ncol = min(len(classes), 3)
    fig = Figure(figsize=(4.4 * ncol, 3.4 * -(-len(classes) // ncol)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(-(-len(classes) // ncol), ncol)).ravel()
    for ax, k in zip(axes, classes, strict=False):
        for level in (0.5, 0.143):
            ax.axhline(level, color="grey", lw=0.8, ls=":")
        its = [it for it in job.iterations if k in it.classes][-9:]
        colours = colormaps["viridis"](np.linspace(0, 0.9, max(len(its) - 1, 1)))
        for c, (a, b) in zip(colours, itertools.pairwise(its), strict=False):
            pair = _read_or_note(a.classes[k], job), _read_or_note(b.classes[k], job)
            if pair[0] is None or pair[1] is None:
                continue
            (va, voxel), (vb, _) = pair
            if va.shape != vb.shape or len(set(va.shape)) != 1:
                continue
            f = fsc_volumes(torch.as_tensor(np.array(va)), torch.as_tensor(np.array(vb))).numpy()
            ax.plot(
                np.arange(f.size) / (va.shape[0] * voxel),
                f,
                color=c,
                label=f"it {a.number} → {b.number}",
            )
        ax.xaxis.set_major_formatter(FuncFormatter(lambda f, _: f"{1 / f:.0f}" if f > 0 else "∞"))
        ax.set(title=f"Class {k}", xlabel="resolution (Å)", ylabel="FSC", ylim=(-0.2, 1.05))
        ax.grid(alpha=0.3)
        if ax.lines[2:]:  # two threshold lines, then the curves
            ax.legend(fontsize=7)
    for ax in axes[len(classes) :]:
        ax.set_visible(False)
    return fig
