"""The report page: one self-contained HTML file (PNGs inline as data URIs) plus the PNGs.

The page runs one small script on load that counts the images shown (``#image-check``), so that
a headless browser can check that every picture loaded.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from denovo3d.errors import InputError
from denovo3d.io.atomic import atomic_path, ensure_writable_dir
from denovo3d.io.star import read_star
from denovo3d.report._figures import (
    angular_figure,
    class_strip,
    convergence_figure,
    final_model_figure,
    fsc_figure,
    png_bytes,
)
from denovo3d.report._job import Job, convergence_table, find_job, read_blocks

__all__ = ["write_report"]


def _table_html(obj: object) -> str:
    if isinstance(obj, pd.DataFrame):
        more = f"<p class=note>first 50 of {len(obj)} rows</p>" if len(obj) > 50 else ""
        return (
            obj.head(50).to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="") + more
        )
    if isinstance(obj, list) and obj and all(isinstance(v, dict) for v in obj):
        return _table_html(pd.json_normalize(obj))
    if isinstance(obj, dict):
        flat = {k: v for k, v in obj.items() if not isinstance(v, dict | list | pd.DataFrame)}
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


def _figure(job: Job, draw: Callable[..., Figure | None], *args: object) -> Figure | None:
    """``draw(*args)``, or ``None`` with a note when a map or table in it is unreadable."""
    try:
        return draw(*args)
    except (InputError, ValueError, KeyError) as exc:
        job.notes.append(f"{draw.__name__}: {exc}")
        return None


def _sections(job: Job, table: pd.DataFrame, png_dir: Path) -> list[tuple[str, str]]:
    """(heading, HTML) of every section; each figure is also written to ``png_dir``."""

    def image(name: str, fig: Figure | None, alt: str, wide: bool = False) -> str:
        if fig is None:
            return f"<p class=note>{html.escape(alt)}: nothing to show</p>"
        data = png_bytes(fig)
        (png_dir / f"{name}.png").write_bytes(data)
        src = "data:image/png;base64," + base64.b64encode(data).decode()
        tag = f'<img src="{src}" alt="{html.escape(alt)}" title="{name}.png">'
        return f'<div class="wide">{tag}</div>' if wide else tag

    sections = []
    if job.initial_model:
        fig = _figure(job, final_model_figure, job.initial_model)
        sections.append(("Final initial model", image("initial_model", fig, "initial_model.mrc")))
    fractions = _last_fractions(table)
    strips = "".join(
        image(
            f"class{k:03d}_iterations",
            _figure(job, class_strip, job, k, fractions),
            f"class {k}",
            True,
        )
        for k in sorted({k for it in job.iterations for k in it.classes})
    )
    heading = "The model emerging: every class at every written iteration"
    sections.append((heading, strips or "<p class=note>no class maps</p>"))
    if len(table):
        fig = _figure(job, convergence_figure, table)
        sections.append(("Convergence", image("convergence", fig, "convergence")))
    last = next((it for it in reversed(job.iterations) if "data" in it.stars), None)
    data = read_blocks(last.stars["data"], job.notes).get("particles") if last else None
    fig = (
        _figure(job, angular_figure, data, last.number) if isinstance(data, pd.DataFrame) else None
    )
    heading = "Angular distribution of the final poses"
    sections.append((heading, image("angular_distribution", fig, "angular distribution")))
    fig = _figure(job, fsc_figure, job)
    heading = "FSC between successive iterations"
    sections.append((heading, image("fsc_successive", fig, "FSC between successive iterations")))
    sections.append(("Symmetry", _symmetry_html(job)))
    if len(table):
        shown = f'<div class="wide">{_table_html(_readable(table))}</div>'
        sections.append(("Numbers per written iteration", shown))
    return sections


def _last_fractions(table: pd.DataFrame) -> dict[int, float]:
    """Class number -> fraction of particles at the last written iteration."""
    cols = [c for c in table if re.fullmatch(r"class\d+_fraction", c)] if len(table) else []
    return {int(c[5:-9]): float(table[c].iloc[-1]) for c in cols if table[c].notna().iloc[-1]}


def write_report(
    job: Job | str | Path, out: str | Path | None = None, view_cxc: Path | None = None
) -> Path:
    """Write ``report.html`` (default in the job directory) and its PNGs in ``<stem>_files/``.

    ``job`` is a job directory or a :class:`Job` from :func:`find_job`; ``view_cxc`` is named
    on the page when given.
    """
    job = job if isinstance(job, Job) else find_job(job)
    out = Path(out) if out else job.directory / "report.html"
    png_dir = ensure_writable_dir(out.parent) / f"{out.stem}_files"
    png_dir.mkdir(exist_ok=True)
    table = convergence_table(job)
    body = "".join(f"<h2>{html.escape(t)}</h2>{s}" for t, s in _sections(job, table, png_dir))
    fractions = _last_fractions(table)
    resolution = table.get("resolution_a", pd.Series(dtype=float)).dropna()
    cxc = os.path.relpath(view_cxc.resolve(), out.parent.resolve()) if view_cxc else None
    facts = {
        "Job directory": str(job.directory.resolve()),
        "Output root": f"{job.root}_itNNN_*",
        "Written iterations": ", ".join(str(it.number) for it in job.iterations) or "none",
        "Classes": str(len({k for it in job.iterations for k in it.classes})),
        "Last resolution": f"{resolution.iloc[-1]:.1f} Å" if len(resolution) else "—",
        "Last class fractions": ", ".join(f"{k}: {100 * v:.0f} %" for k, v in fractions.items())
        or "—",
        "Open in ChimeraX": f"chimerax {cxc}" if cxc else "—",
    }
    facts_html = "".join(f"<b>{k}</b><span>{html.escape(v)}</span>" for k, v in facts.items())
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in dict.fromkeys(job.notes))
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
    out.chmod(0o644)  # atomic_path's temporary file is private (0600); a report is to be shared
    return out
