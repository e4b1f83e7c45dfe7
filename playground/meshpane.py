"""The pane's textured mesh: a face budget, a texture size, one button, and the .glb it writes shown in 3D.

The button submits the session's "textured" export of run A (playground/exports.py: the same worker thread,
the same rule when a reset races it: `ExportRefused`, nothing written) and waits for it off the training
thread; the mesh then shows in `gr.Model3D` (bundled with Gradio, so it works offline), orbitable with the
mouse and downloadable from its corner. A bad budget is a warning in the pane, not an error.
"""

from __future__ import annotations

import logging

import gradio as gr

from engine.texture import FACE_RANGE, TEXTURE_RANGE
from playground.exports import EXPORT_DEFAULTS, TEXTURED

log = logging.getLogger(__name__)
WAIT_S = 900.0  # longest wait for one export (a 2M-face mesh of a big lattice on a CPU)


class MeshPane:
    """The widgets and their one event, made by `build` inside the pane's Export accordion."""

    def __init__(self, session, private: dict):
        self.session, self.private = session, private  # private: the pane's own events stay out of the API

    def build(self) -> dict:
        """The widgets, wired, as {"mesh:<name>": component}."""
        d = EXPORT_DEFAULTS[TEXTURED]
        gr.Markdown("**Textured mesh** of run A: a .glb with a baked colour texture (UV atlas), for Blender or a "
                    "game engine.")
        with gr.Row():
            w = {"faces": gr.Number(d["faces"], label="Face budget", precision=0, step=1000, elem_id="mesh_faces",
                                    info=f"{FACE_RANGE[0]:,} to {FACE_RANGE[1]:,}"),
                 "texture": gr.Number(d["texture"], label="Texture size (texels a side)", precision=0, step=256,
                                      elem_id="mesh_texture", info=f"{TEXTURE_RANGE[0]} to {TEXTURE_RANGE[1]}")}
        w["button"] = gr.Button("Export textured mesh", size="sm", elem_id="export_textured")
        w["note"] = gr.Markdown(elem_id="textured_note")
        w["model"] = gr.Model3D(label="Textured mesh (drag to orbit)", height=320, elem_id="textured_model",
                                interactive=False)
        w["button"].click(self.export, [w["faces"], w["texture"]], [w["model"], w["note"]],
                          api_name="ui_textured_mesh", **{**self.private, "show_progress": "full"})
        return {f"mesh:{k}": v for k, v in w.items()}

    def export(self, faces, texture) -> tuple:
        """Submit the export and wait for its file (Model3D's own progress shows meanwhile); a refused budget, an
        idle session or a failed export is a warning. (A plain function: gradio 6's Model3D skips a value that a
        generator yields after a first update, so its canvas never appears.)"""
        try:
            future = self.session.export(TEXTURED, run="A", faces=_whole(faces), texture=_whole(texture))
            path = future.result(timeout=WAIT_S)["mesh"]
        except Exception as err:  # ValueError (a bad budget, nothing to mesh), ExportRefused (a reset won the race)
            log.warning("textured mesh refused or failed: %s", err)
            gr.Warning(str(err))
            return gr.skip(), f"⚠ {err}"
        return path, f"textured mesh: `{path}`"


def _whole(value):
    """A Number's float as an int when it is whole (the range check is the session's)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value
