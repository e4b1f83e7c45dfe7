"""The Gradio pane: prompt (with example prompts), prior and live controls, start / pause / reset, a fork
(run B beside run A), a streamed status, loss and score curves, preview, the embedded 3D viewer, exports, and
a scripting API with stable names.

Handlers only set values on the session or submit work; a `gr.Timer` streams progress. Every control
is also reachable through Gradio's API (`gradio_client`): /start, /pause, /resume, /reset,
/set_params (any subset of the live parameters, by keyword), /fork, /close_fork, /status, /export.
See docs/api.md.
"""

from __future__ import annotations

import contextlib
import html
import logging
from pathlib import Path

import gradio as gr

from engine.priors import PriorOptions
from playground import controls, texts
from playground.controls import CONTROLS, FOLLOWED, LIVE, keyword_api, prior_choices, to_session
from playground.fieldpane import FieldPane
from playground.meshpane import MeshPane
from playground.plots import (
    LOSS_Y,
    SCORE_COLORS,
    SCORE_Y,
    SERIES_COLORS,
    loss_frame,
    loss_limits,
    placeholder,
    present,
    score_frame,
)
from playground.plots import smoothed as smoothed  # noqa: F401  (tests use it from here)
from playground.session import EXPORTS, Session
from playground.texts import fork_markdown, score_text, status_markdown  # noqa: F401  (tests use them from here)

log = logging.getLogger(__name__)
# prompts that form well with the embedded prior at its defaults: colour and geometry R-Precision >= 0.88 on
# both seeds of the SDS protocol (BENCHMARKS.md)
EXAMPLES = ("a blue sphere", "a green cone", "a yellow cylinder", "a purple torus", "a pink snowman", "a blue cube")
PRIVATE = {"api_visibility": "private", "show_progress": "hidden"}  # the pane's own events: not in the API


def refuse(where: str, err: Exception) -> gr.Error:
    """A refused value: one line in the server's log (no traceback) and the message for the client."""
    log.warning("refused %s: %s", where, err)
    return gr.Error(str(err), print_exception=False)


def plot(frame, colors: dict, y_lim) -> gr.LinePlot:
    """A plot's new value; its legend lists only the series it draws (not run B's before a fork)."""
    return gr.LinePlot(value=frame, y_lim=y_lim, colors_in_legend=present(frame, colors) or None)


@contextlib.contextmanager
def refusing(where: str):
    """An API call's refused value (ValueError) as a concise gr.Error, and one line in the log."""
    try:
        yield
    except ValueError as err:
        raise refuse(where, err) from None


class Panel:
    """Builds the Blocks app around a session; `viewer_url` is embedded as an iframe.

    The UI handlers take {name: widget value} and return {name: new value}, names being the controls' (the
    table in playground/controls.py) and the pane's own components ("message", "status", ...); `_wire` turns
    them into Gradio events. A change is checked in one place, the session's `set_params`: the API passes
    its refusal on as an error, the pane as a warning.
    """

    def __init__(self, session: Session, viewer_url: str | None = None, timer_s: float = 1.0):
        self.session, self.viewer_url, self.timer_s = session, viewer_url, timer_s
        self._pending: list = []  # (what, Future) of exports asked for in the pane, until each is done
        self.fields = FieldPane(session, send=self._send, warn=self._warn)  # the field choice and the fork box

    # -- API functions (gradio builds the endpoints' inputs from the signatures, see `_register_api`) ----------
    def api_start(self, prior: str | None = None, backbone: str | None = None) -> dict:
        """Start training (or resume when paused). `prior` picks the prior for a new run; `backbone` its field:
        "nerf" or "gaussians" (Gaussian splats)."""
        with refusing("/start"):
            self.session.start(prior or None, {"field.backbone": backbone} if backbone else None)
        return self.session.status()

    def api_pause(self) -> dict:
        """Pause training after the current step."""
        self.session.pause()
        return self.session.status()

    def api_resume(self) -> dict:
        """Resume a paused run."""
        self.session.resume()
        return self.session.status()

    def api_reset(self, prior: str | None = None, backbone: str | None = None) -> dict:
        """A new field with the same settings (`backbone`: "nerf" or "gaussians" for another); keeps training if it was."""
        with refusing("/reset"):
            self.session.reset(prior or None, {"field.backbone": backbone} if backbone else None)
        return self.session.status()

    def api_status(self) -> dict:
        """state, step, its_per_s, loss and the live parameters as the last step used them."""
        return self.session.status()

    def api_set_params(self, run: str = "A", **changes) -> dict:
        """Change any subset of a run's live parameters (run "A", or "B" while forked); they take effect at
        its next step. `seed` is not live: it is the seed of the next new run (Start from idle, or Reset);
        `train_util` is the session's share of time spent training (0.05 to 1)."""
        with refusing("/set_params"):
            new = self.session.set_params(run=run or "A", **to_session(changes))
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in new.__dict__.items()}

    def api_fork(self, backbone: str | None = None, **changes) -> dict:
        """Start run B as a copy of run A (field, optimizer, step) with any of A's live parameters changed, or with
        backbone="gaussians" as Gaussian splats drawn from A's NeRF; A and B then train in turns. Returns /status."""
        with refusing("/fork"):
            self.session.fork(backbone=backbone or None, **to_session(changes))
        self.session.wait_idle_queue()
        return self.session.status()

    def api_close_fork(self) -> dict:
        """Close run B; run A goes on alone. Returns /status."""
        self.session.close_fork()
        self.session.wait_idle_queue()
        return self.session.status()

    def api_prior_options(self, perp_neg: bool = False, perp_neg_scale: float = PriorOptions.perp_neg_scale,
                          fp16: bool | None = None, cpu_offload: bool = False, attention_slicing: bool = False) -> dict:
        """How Stable Diffusion / IF load and guide, from the next Start or Reset that loads one."""
        with refusing("/prior_options"):
            options = PriorOptions(perp_neg=perp_neg, perp_neg_scale=perp_neg_scale, fp16=fp16,
                                   cpu_offload=cpu_offload, attention_slicing=attention_slicing)
        self.session.set_prior_options(options)
        self.session.wait_idle_queue()
        return self.session.status()

    def api_export(self, kind: str = "snapshot", run: str = "A") -> dict:
        """Submit an export (checkpoint, snapshot, video, mesh) of run A or B; the result shows in /status
        "exports"."""
        with refusing("/export"):
            self.session.export(kind, run=run or "A")
        return {"submitted": kind, "run": run or "A"}

    def _register_api(self) -> None:
        """The endpoints; /set_params and /fork take every live parameter by keyword (from the controls' table)."""
        for name in ("start", "pause", "resume", "reset", "status", "export", "close_fork", "prior_options"):
            gr.api(getattr(self, f"api_{name}"), api_name=name)
        gr.api(keyword_api(self.api_set_params, [*LIVE, "seed", "train_util"], {"run": (str, "A")}),
               api_name="set_params")
        gr.api(keyword_api(self.api_fork, LIVE, {"backbone": (str | None, None)}), api_name="fork")

    # -- UI handlers: {name: widget value} in, {name: new value} out -------------------------------------------
    @staticmethod
    def _warn(err: Exception) -> dict:
        gr.Warning(str(err))
        return {"message": f"⚠ {err}"}

    def _send(self, values: dict, run: str = "A") -> dict:
        """Widget values to a run (`Session.set_params` checks them); a refused one is a warning, the run goes on."""
        try:
            changes = to_session(values)
            if changes:
                self.session.set_params(run=run, **changes)
        except ValueError as err:
            return self._warn(err)
        return {"message": ""}

    def _on_change(self, values: dict) -> dict:
        """A control the user changed: sent when it differs from the session's value (leaving a field as it
        was does not count as setting it, so a prior picked later still brings its own value)."""
        return self._send(controls.typed(self.session, values))

    def _on_new_run(self, values: dict, action) -> dict:
        """Start / Reset: the picked prior, and only what the user changed. Changes made earlier reached the
        session as they were made (it keeps them for the next run); a value still being typed is sent now.
        The rest comes from the prior's preset when it is another kind of prior."""
        prior = values.pop("prior", None)
        out = self._on_change(values)
        if out["message"]:
            return out
        try:
            action(prior or None)
        except ValueError as err:
            return self._warn(err)
        return out

    def _on_example(self, prompt: str) -> dict:
        """One click: the example's prompt on a fresh run (a running run restarts on a new field)."""
        out = self._send({"prompt": prompt})
        if not out["message"]:
            self.session.reset()
            self.session.start()
        return {"prompt": prompt, **out}

    def _on_pause(self, _values: dict) -> dict:
        if self.session.state == "paused":
            self.session.resume()
        else:
            self.session.pause()
        return {}

    def _followed(self) -> dict:
        """The values the pane keeps in step with the session when something else changes them (the viewer moves
        the light; a prior switch brings its guidance, learning rate and steps; a new run its field)."""
        return {**controls.shown(self.session), "prior": self.session.prior_spec, "field": self.fields.field_value()}

    def _marks(self) -> dict:
        """What the page last saw besides the followed values: a prior switch failing (the dropdown goes back to
        the prior in use), a fork opening or closing (the export choice of runs), the exported files."""
        s = self.session
        return {"prior_failures": s.prior_failures, "forked": s.fork_run is not None, "files": len(s.worker.made)}

    def _controls(self, _values: dict) -> dict:
        """What a page shows when it (re)loads: the session's current settings, not those the app started with,
        so a page opened or reloaded mid-run shows the prompt, guidance, shading and light the run is using.
        Run B's controls show B's values (A's while no fork is open)."""
        s = self.session
        b = s.fork_run.live if s.fork_run is not None else s.a.live
        synced = {**self._followed(), **self._marks(), "forked": None, "files": -1}  # the first tick fills them
        return {**controls.shown(s, controls.BY_NAME), **self._followed(), "synced": synced,
                "fork_guidance": b.guidance_scale, "fork_loss": b.distillation}

    def _tick(self, values: dict) -> dict:
        """Streamed outputs; a followed control moves when the session's value changed since the page last saw it."""
        s, st = self.session, self.session.status()
        runs, seen = list(s.runs), values["synced"] or {}
        now = {**self._followed(), **self._marks()}
        df = loss_frame(runs)
        out = {"status": status_markdown(st), "plot": plot(df, SERIES_COLORS, loss_limits(df)),
               "vocab": texts.vocabulary_markdown(st, s.vocabulary()), "synced": now,
               "score_plot": plot(score_frame(runs), SCORE_COLORS, [0, 1]), "fork_info": fork_markdown(st),
               "export_note": self._export_note()}
        out |= {k: v for k, v in self._followed().items() if seen.get(k) != v}
        if seen.get("prior_failures") != now["prior_failures"]:
            out["prior"] = now["prior"]  # a failed switch: the dropdown shows the prior in use again
        if seen.get("forked") != now["forked"]:
            out["export_runs"] = gr.Radio(visible=now["forked"], value="A and B")
        if seen.get("files") != now["files"]:
            out |= self._downloads()
        pv = s.preview()
        if pv is not None and pv[0] != values["shown"]:
            out |= {"preview": pv[1], "shown": pv[0]}
        return out

    def _downloads(self) -> dict:
        """The session's exported files, newest first, each with what it is."""
        files = [f for f in self.session.worker.files() if Path(f["path"]).is_file()]
        listing = "\n".join(f"{i}. `{Path(f['path']).name}`: {html.escape(f['what'], quote=False)}"
                             for i, f in enumerate(files, 1))
        return {"downloads": [f["path"] for f in files] or None, "downloads_info": listing}

    def _export_note(self) -> str:
        """Exports being made, and the last one that failed or wrote nothing."""
        self._pending = [(what, f) for what, f in self._pending if not f.done()]
        lines = [f"{what}: working…" for what, _ in self._pending]
        last = self.session.exports[-1:]
        return "\n\n".join(lines + [f"⚠ {r}" for r in last if " failed: " in r or "nothing was written" in r])

    def _ui_export(self, kind: str, which: str | None) -> dict:
        """Export run A, or while forked the runs picked (each folder's name says which run it holds)."""
        names = [r.name for r in self.session.runs]
        if len(names) > 1 and which in names:
            names = [which]
        try:
            for name in names:
                what = kind if len(self.session.runs) == 1 else f"{kind} of run {name}"
                self._pending.append((what, self.session.export(kind, run=name)))
        except ValueError as err:
            return {"export_note": f"⚠ {err}"}
        return {"export_note": self._export_note()}

    # -- layout --------------------------------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        with gr.Blocks(title="DreamFusion Playground") as demo:
            gr.Markdown("# DreamFusion Playground\nType a prompt, press **Start** and watch the object form. "
                        "Guidance, shading and light change the run as it trains.")
            with gr.Row():
                with gr.Column(scale=2, min_width=320):
                    w = self._control_column()
                with gr.Column(scale=3, min_width=400):
                    w |= self._progress_column()
            w |= {"synced": gr.State({**self._followed(), **self._marks()}), "shown": gr.State(-1)}
            self._wire(demo, w)
            self._register_api()
        return demo

    def _group(self, group: str) -> dict:
        """The widgets of one group of the controls' table, showing the session's current values."""
        values = controls.shown(self.session, [c.name for c in CONTROLS if c.group == group])
        return {name: controls.widget(controls.BY_NAME[name], value) for name, value in values.items()}

    def _control_column(self) -> dict:
        s, w = self.session, self._group("prompt")
        gr.Markdown("Examples that form well with the embedded prior (a click starts a fresh run):")
        with gr.Row(elem_id="examples"):  # chips at their own width (page.CSS), wrapping as words do
            w |= {f"example:{p}": gr.Button(p, size="sm", min_width=0, scale=0) for p in EXAMPLES}
        w |= self._group("negative")
        w["vocab"] = gr.Markdown(elem_id="vocabulary")
        w["prior"] = gr.Dropdown(prior_choices(s.prior_spec), value=s.prior_spec, label="Prior", elem_id="prior",
                                 allow_custom_value=True, info="takes effect on Start of a new run or Reset; its own "
                                 "settings (steps, guidance, resolution...) come with it, but for what you set")
        w["field"] = self.fields.field_widget()
        with gr.Row():
            w |= {"start": gr.Button("Start", variant="primary", elem_id="start"),
                  "pause": gr.Button("Pause / resume", elem_id="pause"), "reset": gr.Button("Reset", elem_id="reset")}
        w["message"] = gr.Markdown(elem_id="message")
        w |= self.fields.fork_box()
        w |= self._group("main")
        with gr.Accordion("Light", open=True):
            w |= self._group("light")
        with gr.Accordion("Optimisation", open=False):
            w |= self._group("optimisation")
        with gr.Accordion("Export", open=True, elem_id="export"):
            w |= self._export_box()
        return w

    def _export_box(self) -> dict:
        w = {"export_runs": gr.Radio(["A and B", "A", "B"], value="A and B", label="Runs to export (while forked)",
                                     info="each run's files go to a folder ending in -A or -B", visible=False,
                                     elem_id="export_runs")}
        with gr.Row():
            w |= {f"export:{k}": gr.Button(label, size="sm", elem_id=f"export_{k}") for k, label in texts.EXPORT_LABELS.items()}
        w["export_note"] = gr.Markdown(elem_id="export_note")
        w["downloads"] = gr.Files(label="Downloads: this session's exports, newest first", interactive=False,
                                  elem_id="downloads")
        w["downloads_info"] = gr.Markdown(elem_id="downloads_info")
        w |= MeshPane(self.session, PRIVATE).build()  # the textured mesh: budget, button, 3D view
        return w

    def _progress_column(self) -> dict:
        w = {"status": gr.Markdown(status_markdown(self.session.status()), elem_id="status")}
        if self.viewer_url:
            url = html.escape(self.viewer_url)
            gr.HTML(f'<iframe src="{url}" title="3D viewer" style="width:100%;height:420px;border:0;border-radius:8px">'
                    f'</iframe><a href="{url}" target="_blank">Open the 3D viewer on its own</a>', elem_id="viewer")
        with gr.Row():
            w["plot"] = gr.LinePlot(placeholder(LOSS_Y, SERIES_COLORS), x="step", y=LOSS_Y, color="series",
                                    color_map=SERIES_COLORS, title="Loss, log scale (EMA over the raw)", height=240,
                                    y_title="loss (log₁₀: 1 = 10, 3 = 1000)", elem_id="loss_plot")
            w["score_plot"] = gr.LinePlot(placeholder(SCORE_Y, SCORE_COLORS), x="step", y=SCORE_Y, color="series",
                                          color_map=SCORE_COLORS, y_lim=[0, 1], height=240, elem_id="score_plot",
                                          title="Live score: R-Precision, and silhouette IoU (keeps rising)")
        w["preview"] = gr.Image(label="Fixed views: front, side / back, overhead (run B right of run A while forked)",
                                interactive=False, elem_id="preview", height=320, buttons=[])
        return w

    def _wire(self, demo: gr.Blocks, w: dict) -> None:
        """The pane's events: each handler gets {name: value} of its inputs and returns {name: value}."""
        def on(event, fn, inputs: list[str], outputs: list[str], name: str) -> None:
            def call(*values):
                out = {w[k]: v for k, v in fn(dict(zip(inputs, values))).items()}
                # Gradio reads an empty dict as a value, not as "no updates"
                return out or ({w[outputs[0]]: gr.skip()} if outputs else None)
            event(call, [w[k] for k in inputs], [w[k] for k in outputs], api_name=f"ui_{name}", **PRIVATE)

        names, s = [c.name for c in CONTROLS], self.session
        on(w["start"].click, lambda v: self._on_new_run(v, s.start), ["prior", *names], ["message"], "start")
        on(w["reset"].click, lambda v: self._on_new_run(v, s.reset), ["prior", *names], ["message"], "reset")
        on(w["pause"].click, self._on_pause, [], [], "pause")
        for c in CONTROLS:
            for ev in controls.EVENTS[c.kind]:
                on(getattr(w[c.name], ev), self._on_change, [c.name], ["message"], f"{c.name}_{ev}")
        self.fields.wire(on, w)  # the field choice and the fork box
        for text in EXAMPLES:
            on(w[f"example:{text}"].click, lambda v, t=text: self._on_example(t), [], ["prompt", "message"],
               f"example_{text.replace(' ', '_')}")
        for kind in EXPORTS:
            on(w[f"export:{kind}"].click, lambda v, k=kind: self._ui_export(k, v["export_runs"]), ["export_runs"],
               ["export_note"], f"export_{kind}")
        on(demo.load, self._controls, [], [*names, "prior", "field", "synced", "fork_guidance", "fork_loss"], "load")
        streamed = ["status", "plot", "preview", "vocab", "synced", "shown", "export_note", "score_plot", "fork_info",
                    "export_runs", "downloads", "downloads_info"]
        on(gr.Timer(self.timer_s).tick, self._tick, ["synced", "shown"], [*streamed, *FOLLOWED, "prior", "field"], "tick")
