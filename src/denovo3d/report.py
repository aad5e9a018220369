"""Pictures and plots of a run: one self-contained HTML page (images inline) plus its PNGs.

Reads what RELION's VDAM and ``denovo3d refine`` write in a job directory:
``ROOT_itNNN_classKKK.mrc`` and ``ROOT_itNNN_{model,data,optimiser}.star`` for each written
iteration, ``initial_model.mrc``, and any ``*symmetry*.star``/``*symmetry*.json``. Every file and
label is optional: what is missing becomes a note on the page, never an error. Plots are drawn
with matplotlib's Agg canvas (no pyplot, no display needed).
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from denovo3d.errors import InputError
from denovo3d.geometry.euler import euler_to_matrix
from denovo3d.io.atomic import atomic_path
from denovo3d.io.mrc import read_mrc
from denovo3d.io.star import read_star

__all__ = ["Iteration", "Job", "convergence_table", "find_job", "pose_changes", "write_report"]

_FILE_RE = re.compile(
    r"^(?P<root>.+?)_it(?P<it>\d{3,})_(?:class(?P<cls>\d{3})\.mrc|(?P<kind>model|data|optimiser)\.star)$"
)
_VIEWS = ["z", "y", "x"]  # view along this axis; in-plane axes below, shown right and up
_IN_PLANE = {"z": "x→ y↑", "y": "x→ z↑", "x": "y→ z↑"}


@dataclass
class Iteration:
    """Files of one written iteration: class maps by class number, STAR files by kind."""

    number: int
    classes: dict[int, Path] = field(default_factory=dict)
    stars: dict[str, Path] = field(default_factory=dict)


@dataclass
class Job:
    """A job directory as found on disk, with notes on what is missing."""

    directory: Path
    root: str
    iterations: list[Iteration]
    initial_model: Path | None
    symmetry_files: list[Path]
    notes: list[str] = field(default_factory=list)


def find_job(directory: str | Path) -> Job:
    """Glob the iterations of a job directory (the output root with most files wins)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(directory, "not a directory")
    by_root: dict[str, dict[int, Iteration]] = {}
    for path in sorted(directory.iterdir()):
        m = _FILE_RE.match(path.name)
        if m is None or path.name.startswith("."):
            continue
        it = by_root.setdefault(m["root"], {}).setdefault(int(m["it"]), Iteration(int(m["it"])))
        if m["cls"]:
            it.classes[int(m["cls"])] = path
        else:
            it.stars[m["kind"]] = path
    initial = directory / "initial_model.mrc"
    sym = sorted(p for ext in ("star", "json") for p in directory.glob(f"*symmetry*.{ext}"))
    if not by_root and not initial.is_file():
        raise InputError(directory, "no run_itNNN_* files and no initial_model.mrc found")
    notes = []
    root = max(
        by_root,
        key=lambda r: sum(len(i.classes) + len(i.stars) for i in by_root[r].values()),
        default="run",
    )
    if len(by_root) > 1:
        notes.append(
            f"several output roots; showing {root!r}, ignoring {sorted(set(by_root) - {root})}"
        )
    iterations = [by_root.get(root, {})[k] for k in sorted(by_root.get(root, {}))]
    for kind in ("model", "data", "optimiser"):
        missing = [f"{i.number:03d}" for i in iterations if kind not in i.stars]
        if missing:
            notes.append(f"no {root}_itNNN_{kind}.star for iteration(s) {', '.join(missing)}")
    if not initial.is_file():
        notes.append("no initial_model.mrc (symmetry alignment not run yet)")
    return Job(directory, root, iterations, initial if initial.is_file() else None, sym, notes)


def _read(path: Path | None, notes: list[str]) -> dict:
    if path is None:
        return {}
    try:
        return read_star(path)
    except InputError as exc:
        notes.append(str(exc))
        return {}


def pose_changes(before: pd.DataFrame, after: pd.DataFrame) -> tuple[float, float] | None:
    """Mean rotation angle (degrees) between two poses per particle and % changing class.

    Particles are matched by ``rlnTomoParticleName`` or ``rlnImageName`` when unique, else by row
    when both tables have the same length. ``None`` when they cannot be matched.
    """
    angles = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    if not set(angles) <= set(before.columns) & set(after.columns):
        return None
    key = next(
        (k for k in ("rlnTomoParticleName", "rlnImageName") if k in before and k in after), None
    )
    if key and before[key].is_unique and after[key].is_unique:
        pair = before.merge(after, on=key, suffixes=("_a", "_b"))
    elif len(before) == len(after):
        pair = before.reset_index(drop=True).join(
            after.reset_index(drop=True), lsuffix="_a", rsuffix="_b"
        )
    else:
        return None
    if pair.empty:
        return None
    mats = [
        euler_to_matrix(*(torch.tensor(pair[f"{a}_{s}"].to_numpy(float)) for a in angles))
        for s in "ab"
    ]
    cos = ((mats[0] @ mats[1].transpose(-1, -2)).diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    mean_deg = float(torch.rad2deg(torch.arccos(cos.clamp(-1, 1))).mean())
    cls = "rlnClassNumber"
    changed = (
        100.0 * float((pair[f"{cls}_a"] != pair[f"{cls}_b"]).mean()) if f"{cls}_a" in pair else 0.0
    )
    return mean_deg, changed


def convergence_table(job: Job) -> pd.DataFrame:
    """One row per written iteration: resolution, class fractions, ⟨Pmax⟩, pose changes, step, T."""
    rows, previous = [], None
    for it in job.iterations:
        row: dict[str, float] = {"iteration": it.number}
        model = _read(it.stars.get("model"), job.notes)
        general = model.get("model_general", {})
        for label, name in (
            ("rlnCurrentResolution", "resolution_a"),
            ("rlnAveragePmax", "pmax"),
            ("rlnTau2FudgeFactor", "tau2_fudge"),
        ):
            if isinstance(general, dict) and label in general:
                row[name] = float(general[label])
        classes = model.get("model_classes")
        if isinstance(classes, pd.DataFrame):
            for k, rec in enumerate(classes.to_dict("records"), start=1):
                for label, name in (
                    ("rlnClassDistribution", "fraction"),
                    ("rlnEstimatedResolution", "resolution_a"),
                ):
                    if label in rec:
                        row[f"class{k}_{name}"] = float(rec[label])
        opt = _read(it.stars.get("optimiser"), job.notes).get("optimiser_general", {})
        for label, name in (
            ("rlnGradCurrentStepsize", "step_size"),
            ("rlnChangesOptimalOrientations", "relion_orientation_change_deg"),
        ):
            if isinstance(opt, dict) and label in opt:
                row[name] = float(opt[label])
        data = _read(it.stars.get("data"), job.notes).get("particles")
        if isinstance(data, pd.DataFrame):
            change = pose_changes(previous, data) if previous is not None else None
            if change is not None:
                row["orientation_change_deg"], row["class_change_pct"] = change
            previous = data
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- pictures


def _png(fig: Figure) -> bytes:
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
    ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
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
MAX_STRIP_ITERATIONS = 16


def _spread(items: list, n: int) -> list:
    """At most ``n`` items evenly spread over ``items``, the first and last included."""
    if len(items) <= n:
        return items
    return [items[i] for i in sorted(set(np.linspace(0, len(items) - 1, n).round().astype(int)))]


def class_strip(job: Job, k: int, fractions: dict[int, float]) -> Figure:
    """Sections and projections of class ``k`` at every written iteration, left to right."""
    its = _spread([it for it in job.iterations if k in it.classes], MAX_STRIP_ITERATIONS)
    columns = [views(read_mrc(it.classes[k])[0]) for it in its]
    tiles = [[col[v] for col in columns] for v in range(6)]
    title = f"Class {k}" + (
        f" — {100 * fractions[k]:.0f} % of particles at the last iteration"
        if k in fractions
        else ""
    )
    return _mosaic_figure(tiles, _ROW_LABELS, [f"it {it.number}" for it in its], title, inch=0.95)


def final_model_figure(path: Path) -> tuple[Figure, str]:
    volume, voxel = read_mrc(path)
    v = views(volume)
    cols = [f"along {a}  ({_IN_PLANE[a]})" for a in _VIEWS]
    info = f"{path.name}: box {'×'.join(map(str, volume.shape[::-1]))} voxels of {voxel:.3g} Å"
    return _mosaic_figure(
        [v[:3], v[3:]], ["central section", "projection"], cols, info, inch=2.2
    ), info


def convergence_figure(table: pd.DataFrame) -> Figure:
    fig = Figure(figsize=(13, 7), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
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
    changes = table.get("class_change_pct")
    if changes is not None and changes.fillna(0).max() > 0:
        twin = axes[3].twinx()
        twin.plot(x, changes, color="grey", ls="--", marker=".")
        twin.set_ylim(bottom=0)
        twin.tick_params(labelsize=8, colors="grey")
        axes[3].set_title("Orientation change (°); grey: % changing class", fontsize=10)
    return fig


def angular_figure(data: pd.DataFrame, iteration: int) -> Figure | None:
    """Mollweide map of the projection directions (longitude rot, latitude 90° − tilt)."""
    if not {"rlnAngleRot", "rlnAngleTilt"} <= set(data.columns):
        return None
    rot = np.deg2rad((data["rlnAngleRot"].to_numpy(float) + 180) % 360 - 180)
    lat = np.deg2rad(90 - data["rlnAngleTilt"].to_numpy(float))
    cls = (
        data["rlnClassNumber"].to_numpy(int)
        if "rlnClassNumber" in data
        else np.ones(len(data), int)
    )
    fig = Figure(figsize=(8, 4.6), layout="constrained")
    ax = fig.add_subplot(projection="mollweide")
    alpha = float(np.clip(400 / max(len(data), 1), 0.08, 0.8))
    size = float(np.clip(2000 / max(len(data), 1), 4, 24))
    for k in np.unique(cls):
        sel = cls == k
        ax.scatter(rot[sel], lat[sel], s=size, alpha=alpha, label=f"class {k} ({sel.sum()})", lw=0)
    ax.grid(alpha=0.4)
    ax.set_title(
        f"Projection directions of {len(data)} particles at iteration {iteration}"
        " (longitude: rot; tilt 0° at the top)",
        fontsize=10,
    )
    if len(np.unique(cls)) > 1:
        ax.legend(loc="lower right", fontsize=8, markerscale=2)
    return fig


def shell_fsc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """RELION's FSC of two cubic maps: integer shells ``round(|k|)``, ``s//2 + 1`` of them."""
    fa, fb = np.fft.rfftn(a), np.fft.rfftn(b)
    s = a.shape[0]
    k = np.fft.fftfreq(s, 1 / s)
    kz, ky, kx = np.meshgrid(k, k, np.arange(s // 2 + 1), indexing="ij")
    shell = np.rint(np.sqrt(kx**2 + ky**2 + kz**2)).astype(int).ravel()
    n = s // 2 + 1
    keep = shell < n

    def total(w: np.ndarray) -> np.ndarray:
        return np.bincount(shell[keep], weights=w.ravel()[keep], minlength=n)[:n]

    num = total(np.real(fa * np.conj(fb)))
    den = np.sqrt(total(np.abs(fa) ** 2) * total(np.abs(fb) ** 2))
    fsc = np.divide(num, den, out=np.zeros(n), where=den > 0)
    fsc[0] = 1.0
    return fsc


def fsc_figure(job: Job) -> Figure | None:
    """FSC between successive written iterations of each class (last 8 pairs)."""
    classes = sorted({k for it in job.iterations for k in it.classes})
    if not classes or len(job.iterations) < 2:
        return None
    ncol = min(len(classes), 3)
    fig = Figure(figsize=(4.4 * ncol, 3.4 * -(-len(classes) // ncol)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(-(-len(classes) // ncol), ncol)).ravel()
    for ax, k in zip(axes, classes, strict=False):
        its = [it for it in job.iterations if k in it.classes][-9:]
        colours = colormaps["viridis"](np.linspace(0, 0.9, max(len(its) - 1, 1)))
        for c, (a, b) in zip(colours, itertools.pairwise(its), strict=False):
            (va, voxel), (vb, _) = read_mrc(a.classes[k]), read_mrc(b.classes[k])
            if va.shape != vb.shape or len(set(va.shape)) != 1:
                continue
            f = shell_fsc(va, vb)
            ax.plot(
                np.arange(f.size) / (va.shape[0] * voxel),
                f,
                color=c,
                label=f"it {a.number} → {b.number}",
            )
        for level in (0.5, 0.143):
            ax.axhline(level, color="grey", lw=0.8, ls=":")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda f, _: f"{1 / f:.0f}" if f > 0 else "∞"))
        ax.set(title=f"Class {k}", xlabel="resolution (Å)", ylabel="FSC", ylim=(-0.2, 1.05))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(classes) :]:
        ax.set_visible(False)
    return fig


# ---------------------------------------------------------------- page


def _table_html(obj: object) -> str:
    if isinstance(obj, pd.DataFrame):
        more = f"<p class=note>first 50 of {len(obj)} rows</p>" if len(obj) > 50 else ""
        return (
            obj.head(50).to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="") + more
        )
    if isinstance(obj, list) and obj and all(isinstance(v, dict) for v in obj):
        return _table_html(pd.json_normalize(obj))
    if isinstance(obj, dict):
        flat = {k: v for k, v in obj.items() if not isinstance(v, dict | list)}
        out = pd.DataFrame({"": list(flat), "value": list(flat.values())}).to_html(index=False)
        nested = {k: v for k, v in obj.items() if k not in flat}
        return (out if flat else "") + "".join(
            f"<h4>{html.escape(str(k))}</h4>{_table_html(v)}" for k, v in nested.items()
        )
    return f"<pre>{html.escape(json.dumps(obj, indent=1, default=str))}</pre>"


def _readable(table: pd.DataFrame) -> pd.DataFrame:
    """The convergence table with the headers a user reads (fractions in %)."""
    names = {
        "resolution_a": "resolution (Å)",
        "pmax": "⟨Pmax⟩",
        "tau2_fudge": "T",
        "step_size": "step",
        "orientation_change_deg": "Δ pose (°)",
        "relion_orientation_change_deg": "RELION Δ pose (°)",
        "class_change_pct": "Δ class (%)",
    }
    out = table.copy()
    for col in table:
        m = re.fullmatch(r"class(\d+)_(fraction|resolution_a)", col)
        if m and m[2] == "fraction":
            out[col] = 100 * table[col]
            names[col] = f"class {m[1]} (%)"
        elif m:
            names[col] = f"class {m[1]} res. (Å)"
    return out.round(3).rename(columns=names)


def _symmetry_html(job: Job) -> str:
    if not job.symmetry_files:
        return (
            "<p>not run (no <code>*symmetry*.star</code> or <code>*symmetry*.json</code> here)</p>"
        )
    parts = []
    for path in job.symmetry_files:
        try:
            obj = json.loads(path.read_text()) if path.suffix == ".json" else read_star(path)
            parts.append(f"<h3>{html.escape(path.name)}</h3>{_table_html(obj)}")
        except (InputError, ValueError, OSError) as exc:
            text = f"<p class=note>unreadable: {html.escape(str(exc))}</p>"
            parts.append(f"<h3>{html.escape(path.name)}</h3>{text}")
    return "".join(parts)


_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1280px; color: #222;
       padding: 0 24px 40px }
h1 { font-size: 22px; margin: 20px 0 4px }
h2 { font-size: 17px; border-bottom: 1px solid #ddd; padding-bottom: 3px; margin-top: 30px }
img { max-width: 100%; height: auto; display: block; margin: 8px 0 }
.wide { overflow-x: auto } .wide img { max-width: none }
table { border-collapse: collapse; font-size: 12px; margin: 6px 0 }
td, th { border: 1px solid #ddd; padding: 2px 8px; text-align: right } th { background: #f4f4f4 }
.note { color: #666; font-size: 12px } code { background: #f4f4f4; padding: 0 3px }
.facts { display: grid; grid-template-columns: max-content auto; gap: 2px 14px }
"""

_CHECK_JS = """
window.addEventListener("load", () => {
  const all = [...document.images];
  const ok = all.filter((m) => m.complete && m.naturalWidth > 0).length;
  const e = document.getElementById("image-check");
  e.dataset.loaded = ok; e.dataset.total = all.length;
  e.textContent = ok + " of " + all.length + " images shown";
});
"""


def write_report(
    job: Job | str | Path, out: str | Path | None = None, view_cxc: Path | None = None
) -> Path:
    """Write ``report.html`` (default in the job directory) and its PNGs in ``<stem>_files/``.

    ``job`` is a job directory or a :class:`Job` from :func:`find_job`; ``view_cxc`` is named
    on the page when given.
    """
    job = job if isinstance(job, Job) else find_job(job)
    out = Path(out) if out else job.directory / "report.html"
    png_dir = out.parent / f"{out.stem}_files"
    png_dir.mkdir(parents=True, exist_ok=True)
    table = convergence_table(job)
    fractions = (
        {
            int(c[5:-9]): float(table[c].iloc[-1])
            for c in table
            if re.fullmatch(r"class\d+_fraction", c)
        }
        if len(table)
        else {}
    )
    sections: list[tuple[str, str]] = []

    def image(name: str, fig: Figure | None, alt: str, wide: bool = False) -> str:
        if fig is None:
            return f"<p class=note>{html.escape(alt)}: nothing to show</p>"
        data = _png(fig)
        (png_dir / f"{name}.png").write_bytes(data)
        src = "data:image/png;base64," + base64.b64encode(data).decode()
        tag = f'<img src="{src}" alt="{html.escape(alt)}" title="{name}.png">'
        return f'<div class="wide">{tag}</div>' if wide else tag

    if job.initial_model:
        fig, info = final_model_figure(job.initial_model)
        sections.append(("Final initial model", image("initial_model", fig, info)))
    classes = sorted({k for it in job.iterations for k in it.classes})
    strips = "".join(
        image(f"class{k:03d}_iterations", class_strip(job, k, fractions), f"class {k}", wide=True)
        for k in classes
    )
    sections.append(
        (
            "The model emerging: every class at every written iteration",
            strips or "<p class=note>no class maps</p>",
        )
    )
    if len(table):
        sections.append(
            ("Convergence", image("convergence", convergence_figure(table), "convergence"))
        )
    data_it = next((it for it in reversed(job.iterations) if "data" in it.stars), None)
    data = _read(data_it.stars["data"], job.notes).get("particles") if data_it else None
    ang = angular_figure(data, data_it.number) if isinstance(data, pd.DataFrame) else None
    sections.append(
        (
            "Angular distribution of the final poses",
            image("angular_distribution", ang, "angular distribution"),
        )
    )
    sections.append(
        (
            "FSC between successive iterations",
            image("fsc_successive", fsc_figure(job), "FSC between successive iterations"),
        )
    )
    sections.append(("Symmetry", _symmetry_html(job)))
    if len(table):
        shown = f'<div class="wide">{_table_html(_readable(table))}</div>'
        sections.append(("Numbers per written iteration", shown))

    facts = {
        "Job directory": str(job.directory.resolve()),
        "Output root": f"{job.root}_itNNN_*",
        "Written iterations": ", ".join(str(it.number) for it in job.iterations) or "none",
        "Classes": str(len(classes)),
        "Last resolution": f"{table['resolution_a'].iloc[-1]:.1f} Å"
        if "resolution_a" in table
        else "—",
        "Last class fractions": ", ".join(f"{k}: {100 * v:.0f} %" for k, v in fractions.items())
        or "—",
        "ChimeraX": f"<code>chimerax {html.escape(view_cxc.name)}</code>" if view_cxc else "—",
    }
    facts_html = "".join(
        f"<b>{k}</b><span>{v if k == 'ChimeraX' else html.escape(v)}</span>"
        for k, v in facts.items()
    )
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in dict.fromkeys(job.notes))
    body = "".join(f"<h2>{html.escape(t)}</h2>{s}" for t, s in sections)
    name = html.escape(job.directory.resolve().name)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = (
        f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>denovo3d report: {name}"
        f"</title><style>{_CSS}</style></head><body><h1>denovo3d report — {name}</h1>"
        f"<div class=facts>{facts_html}</div>"
        + (f"<h2>Notes</h2><ul class=note>{notes}</ul>" if notes else "")
        + f"{body}<p class=note>Written {stamp} by denovo3d report; <span id=image-check></span>. "
        f"PNGs in {html.escape(png_dir.name)}/.</p><script>{_CHECK_JS}</script></body></html>\n"
    )
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out
