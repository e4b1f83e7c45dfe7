"""The gallery's 3D view of each run's mesh: Google's `<model-viewer>` web component, vendored, offline.

`assets/model-viewer/model-viewer-umd.min.js` is `@google/model-viewer@4.4.0`'s `dist/model-viewer-umd.min.js`
(three.js and lit bundled; Apache-2.0, `model-viewer.LICENSE` beside it; `tools/vendor-js.sh` re-fetches it
and checks its sha256). The UMD build is a classic script, so it loads from file:// where an ES module would
be refused (a module script from a file:// page is a CORS request).

A file:// page cannot fetch its neighbours either (Chromium refuses, Firefox too), so next to each
`<run>/mesh.glb` the gallery writes `<run>/mesh.glb.js`, a classic script that hands the page the same bytes
in base64: over http the viewer loads the .glb itself, from a file it loads the script and shows a blob URL.
Either way a card's viewer loads only when it scrolls into view.
"""

from __future__ import annotations

import base64
import json
import shutil
from html import escape
from pathlib import Path

from engine.checkpoint import atomic_write

STATIC = Path(__file__).resolve().parents[2] / "assets" / "model-viewer"
ASSETS = ("model-viewer-umd.min.js", "model-viewer.LICENSE")  # copied beside index.html when a card has a mesh
SIDECAR = ".js"  # <run>/mesh.glb -> <run>/mesh.glb.js

STYLE = "model-viewer{width:100%;height:184px;background:#eee;display:block;margin-top:4px;--poster-color:#eee}"

SCRIPT = """window.galleryMesh=(id,b64)=>{const bytes=Uint8Array.from(atob(b64),c=>c.charCodeAt(0));
 const el=document.querySelector(`model-viewer[data-run="${CSS.escape(id)}"]`);
 if(el)el.src=URL.createObjectURL(new Blob([bytes],{type:'model/gltf-binary'}));};
function showMesh(el){if(location.protocol!=='file:'){el.src=el.dataset.glb;return;}
 const s=document.createElement('script');s.src=el.dataset.glb+'.js';document.head.appendChild(s);}
const meshSeen=new IntersectionObserver(es=>es.forEach(e=>{if(e.isIntersecting){meshSeen.unobserve(e.target);
 showMesh(e.target);}}));
document.querySelectorAll('model-viewer[data-glb]').forEach(el=>meshSeen.observe(el));"""


def viewer_tag(row: dict) -> str:
    """A card's orbitable view of its mesh, or "" when it has no .glb."""
    glb = dict(meshes([row])).get(row["run_id"])
    if glb is None:
        return ""
    return (f'<model-viewer data-run="{escape(row["run_id"])}" data-glb="{escape(glb)}" alt="{escape(row["prompt"])}" '
            'camera-controls interaction-prompt="none" shadow-intensity="0.6" exposure="1.1">'
            '<div slot="progress-bar"></div></model-viewer>')  # no loading bar left over the picture


def head(rows: list[dict]) -> str:
    """What the page's <head> needs when some card shows a mesh, else nothing."""
    return f'<style>{STYLE}</style><script src="{ASSETS[0]}"></script>' if meshes(rows) else ""


def tail(rows: list[dict]) -> str:
    """The loader script at the end of <body> when some card shows a mesh, else nothing."""
    return f"<script>{SCRIPT}</script>" if meshes(rows) else ""


def meshes(rows: list[dict]) -> list[tuple[str, str]]:
    """(run id, mesh path relative to the batch folder) of each row with a .glb."""
    out = []
    for r in rows:
        glb = (r.get("files") or {}).get("mesh", "")
        if glb.lower().endswith(".glb"):
            out.append((r["run_id"], glb))
    return out


def write_assets(out: str | Path, rows: list[dict]) -> list[Path]:
    """Copy the viewer script and its licence beside index.html and write each mesh's sidecar script, when
    missing or older than what they come from; each file atomically. The paths written."""
    out, written = Path(out), []
    found = [(run_id, out / glb) for run_id, glb in meshes(rows) if (out / glb).is_file()]
    if not found:
        return written
    for name in ASSETS:
        if _stale(out / name, STATIC / name):
            written.append(atomic_write(out / name, lambda p, n=name: shutil.copyfile(STATIC / n, p)))
    for run_id, glb in found:
        side = glb.with_name(glb.name + SIDECAR)
        if _stale(side, glb):
            data = base64.b64encode(glb.read_bytes()).decode("ascii")
            text = f"galleryMesh({json.dumps(run_id)},\"{data}\");\n"
            written.append(atomic_write(side, lambda p, t=text: Path(p).write_text(t, encoding="ascii")))
    return written


def _stale(target: Path, source: Path) -> bool:
    return not target.exists() or target.stat().st_mtime < source.stat().st_mtime \
        or (source.parent == STATIC and target.stat().st_size != source.stat().st_size)
