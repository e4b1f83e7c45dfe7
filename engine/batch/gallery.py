"""The gallery of a batch: DIR/index.html, one static page that works offline (no CDN, no server).

One card per run (its orbit GIF or snapshot, and its preview of four views, each at its own pixel size: never
stretched; its textured mesh in 3D (viewer3d.py); prompt, seed, settings, scores, links to its mesh and video),
grouped by prompt; a select sorts the cards inside each group, and the groups by their best card. A run whose field
came out empty (nothing covers its views) or translucent (a cloud of density, the boxy SDS failure) is flagged,
whatever its status.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

from engine.batch import viewer3d
from engine.checkpoint import atomic_write

SCORES = (("geometry_r_precision", "geometry R-P"), ("colour_r_precision", "colour R-P"),
          ("shape_score", "shape score"), ("shape_margin", "shape margin"))
IMAGE_ORDER = ("gif", "snapshot")  # the first a run has is its card's picture, above its preview
EMPTY_BELOW = 0.002  # foreground_share under which nothing formed
TRANSLUCENT_ABOVE = 0.5  # translucent_share over which the field is a cloud, not a solid

STYLE = """body{font:14px system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
h2{font-size:16px;margin:1.2em 0 .4em}.cards{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
.card{width:480px;background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px}
.card img{display:block;max-width:100%;height:auto;image-rendering:auto;background:#eee;margin:0 auto 6px}
.card.failed,.card.flagged{border-color:#c33}.flag{background:#c33;color:#fff;border-radius:3px;padding:1px 6px;font-size:12px}
.card.pending{opacity:.6}.meta{font-size:12px;color:#555;word-break:break-word}.err{color:#c33;font-size:12px}
table{font-size:12px;border-collapse:collapse}td{padding:0 6px 0 0}"""

SCRIPT = """function sortBy(key){const val=c=>parseFloat(c.dataset[key]??'-1');
const groups=[...document.querySelectorAll('section.group')];
for(const g of groups){const box=g.querySelector('.cards');
 [...box.children].sort((a,b)=>val(b)-val(a)).forEach(c=>box.appendChild(c));
 g.dataset.best=Math.max(-1,...[...box.children].map(val));}
groups.sort((a,b)=>b.dataset.best-a.dataset.best).forEach(g=>document.getElementById('groups').appendChild(g));}
document.getElementById('sort').addEventListener('change',e=>sortBy(e.target.value));sortBy('geometry_r_precision');"""


def flags(row: dict) -> list[str]:
    """What went wrong with a finished run's field, in words (none for a solid object)."""
    fg, tr = row.get("foreground_share"), row.get("translucent_share")
    if isinstance(fg, int | float) and fg < EMPTY_BELOW:
        return ["empty: nothing formed"]
    return [f"translucent ({tr:.2f} of its pixels)"] if isinstance(tr, int | float) and tr > TRANSLUCENT_ABOVE else []


def card(row: dict) -> str:
    """One run's card as HTML: its picture and preview at their own size (a browser scales down, never up)."""
    files, status, bad = row.get("files") or {}, row.get("status", "pending"), flags(row)
    image = next((files[k] for k in IMAGE_ORDER if k in files), None)
    pictures = "".join(f'<img src="{escape(src)}" alt="{escape(row["prompt"])}" loading="lazy">'
                       for src in (image, files.get("preview")) if src)
    data = " ".join(f'data-{k}="{row[k]}"' for k, _ in SCORES if isinstance(row.get(k), int | float))
    scores = "".join(f"<tr><td>{label}</td><td>{row[k]:.2f}</td></tr>" for k, label in SCORES
                     if isinstance(row.get(k), int | float))
    links = " ".join(f'<a href="{escape(files[k])}">{k}</a>' for k in ("mesh", "mp4") if k in files)
    settings = ", ".join(f"{k}={json.dumps(v)}" for k, v in (row.get("settings") or {}).items())
    its = f" · {row['its_per_s']:.1f} it/s" if row.get("its_per_s") else ""
    marks = "".join(f' <span class="flag">{escape(f)}</span>' for f in bad)
    return (f'<div class="card {escape(status)}{" flagged" if bad else ""}" id="{escape(row["run_id"])}" {data}>'
            + pictures + viewer3d.viewer_tag(row)
            + f'<div><b>seed {row["seed"]}</b> · {escape(row["prior"])} · {escape(status)}{marks}</div>'
            + f'<div class="meta">{escape(settings)}{" · " if settings else ""}step {row.get("step", 0)}{its}</div>'
            + (f'<div class="err">{escape(row["message"])}</div>' if row.get("message") else "")
            + f"<table>{scores}</table><div>{links}</div></div>")


def page(rows: list[dict], title: str = "Batch") -> str:
    """The whole page: runs grouped by prompt, in the order prompts first appear."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["prompt"], []).append(r)
    options = "".join(f'<option value="{k}">{label}</option>' for k, label in SCORES)
    sections = "".join(f'<section class="group"><h2>{escape(p)}</h2><div class="cards">'
                       + "".join(card(r) for r in rs) + "</div></section>" for p, rs in groups.items())
    done = sum(r.get("status") == "done" for r in rows)
    flagged = sum(bool(flags(r)) for r in rows)
    note = f", {flagged} flagged (empty or translucent)" if flagged else ""
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{STYLE}</style>{viewer3d.head(rows)}</head><body><h1>{escape(title)}</h1>"
            f"<p>{done} of {len(rows)} runs done{note}. Sort by <select id=\"sort\">{options}</select></p>"
            f'<div id="groups">{sections}</div><script>{SCRIPT}</script>{viewer3d.tail(rows)}</body></html>')


def write_gallery(out: str | Path, rows: list[dict], title: str = "Batch") -> Path:
    """Write DIR/index.html (atomically) for the manifest rows `rows`, and what its 3D views load."""
    viewer3d.write_assets(out, rows)
    return atomic_write(Path(out) / "index.html", lambda p: Path(p).write_text(page(rows, title), encoding="utf-8"))
