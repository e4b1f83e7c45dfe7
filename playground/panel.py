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
import importlib.util
import logging

import gradio as gr

from engine.priors import PriorOptions
from engine.world import SHAPES
from playground import controls
from playground.controls import CONTROLS, FOLLOWED, LIVE, keyword_api, to_session
from playground.meshpane import MeshPane
from playground.plots import SCORE_COLORS, SERIES_COLORS, loss_frame, loss_limits, placeholder, score_frame
from playground.plots import smoothed as smoothed  # noqa: F401  (tests use it from here)
from playground.session import EXPORTS, Session

log = logging.getLogger(__name__)
PRIORS = ["embedded", *(f"oracle:{s}" for s in SHAPES), "gaussian"]
# prompts that form well with the embedded prior at its defaults: colour and geometry R-Precision >= 0.88 on
# both seeds of the SDS protocol (BENCHMARKS.md)
EXAMPLES = ("a blue sphere", "a green cone", "a yellow cylinder", "a purple torus", "a pink snowman", "a blue cube")
PRIVATE = {"api_visibility": "private", "show_progress": "hidden"}  # the pane's own events: not in the API


def refuse(where: str, err: Exception) -> gr.Error:
    """A refused value: one line in the server's log (no traceback) and the message for the client."""
    log.warning("refused %s: %s", where, err)
    return gr.Error(str(err), print_exception=False)


def prior_choices(current: str) -> list[str]:
    """Priors to offer: the analytic ones always, SD / IF when diffusers is installed."""
    out = list(PRIORS)
    if importlib.util.find_spec("diffusers") is not None:
        out += ["sd", "if"]
    return out if current in out else [current, *out]


def score_text(score: dict | None) -> str:
    if not score:
        return "score –"
    names = (("color_r_precision", "colour"), ("geometry_r_precision", "geometry"))
    parts = [f"{word} {score[k]:.2f}" for k, word in names if score.get(k) is not None]
    return f"score {' · '.join(parts)} (step {score['step']})"


def fork_markdown(st: dict) -> str:
    """Run A against run B: step, loss, score, and what differs (empty while no fork is open)."""
    b = st.get("fork")
    if not b:
        return ""
    lines = ["| run | step | loss | live score |", "|---|---|---|---|"]
    for r in st["runs"]:
        loss = "–" if r["loss"] is None else f"{r['loss']:.4g}"
        lines.append(f"| **{r['name']}** | {r['step']} | {loss} | {score_text(r['score']).removeprefix('score ')} |")
    diff = "; ".join(f"{k}: A {html.escape(str(v[0]))} → B {html.escape(str(v[1]))}" for k, v in b["differs"].items())
    return "\n".join(lines) + f"\n\nB differs in: {diff or 'nothing (yet)'}"


def status_markdown(st: dict) -> str:
    icon = {"running": "▶", "paused": "⏸", "done": "✓", "error": "⚠", "idle": "○"}.get(st["state"], "")
    loss = "–" if st["loss"] is None else f"{st['loss']:.4g}"
    lines = [f"**{icon} {st['state']}** · step **{st['step']}** / {st['steps']} · **{st['its_per_s']:.2f}** it/s · "
             f"loss {loss} · {score_text(st.get('score'))} · prior `{st['prior']}`", ""]
    if st.get("skipped_steps") or st.get("rollbacks"):
        lines[0] += f" · skipped {st.get('skipped_steps', 0)} non-finite steps, {st.get('rollbacks', 0)} rollbacks"
    if st["error"]:
        lines.append(f"**Error:** {html.escape(st['error'], quote=False)}")
    elif st["message"]:
        lines.append(html.escape(st["message"], quote=False))
    if st.get("settings_note"):
        lines += ["", html.escape(st["settings_note"], quote=False)]
    return "\n".join(lines)


def vocabulary_markdown(session: Session) -> str:
    """The embedded prior's words, and the prompt words it does not know."""
    st, vocab = session.status(), session.vocabulary()
    parts = []
    if st["warnings"]:
        parts.append("**⚠ " + html.escape("; ".join(st["warnings"]), quote=False) + "**")
    if vocab:
        parts.append("Words this prior knows: " + ", ".join(f"`{w}`" for w in vocab))
    return "\n\n".join(parts)


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

    # -- API functions (gradio builds the endpoints' inputs from the signatures, see `_register_api`) ----------
    def api_start(self, prior: str | None = None) -> dict:
        """Start training (or resume when paused). `prior` picks the prior for a new run."""
        with refusing("/start"):
            self.session.start(prior or None)
        return self.session.status()

    def api_pause(self) -> dict:
        """Pause training after the current step."""
        self.session.pause()
        return self.session.status()

    def api_resume(self) -> dict:
        """Resume a paused run."""
        self.session.resume()
        return self.session.status()

    def api_reset(self, prior: str | None = None) -> dict:
        """A new field with the same settings; keeps training if it was."""
        with refusing("/reset"):
            self.session.reset(prior or None)
        return self.session.status()

    def api_status(self) -> dict:
        """state, step, its_per_s, loss and the live parameters as the last step used them."""
        return self.session.status()

    def api_set_params(self, run: str = "A", **changes) -> dict:
        """Change any subset of a run's live parameters (run "A", or "B" while forked); they take effect at
        its next step. `seed` is not live: it is the seed of the next new run (Start from idle, or Reset)."""
        with refusing("/set_params"):
            new = self.session.set_params(run=run or "A", **to_session(changes))
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in new.__dict__.items()}

    def api_fork(self, **changes) -> dict:
        """Start run B as a copy of run A (field, optimizer, step) with any of A's live parameters changed;
        A and B then train in turns. Returns /status."""
        with refusing("/fork"):
            self.session.fork(**to_session(changes))
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
        gr.api(keyword_api(self.api_set_params, [*LIVE, "seed"], {"run": (str, "A")}), api_name="set_params")
        gr.api(keyword_api(self.api_fork, LIVE), api_name="fork")

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

    def _on_fork(self, values: dict) -> dict:
        changes = {"guidance_scale": values["fork_guidance"], "distillation": values["fork_loss"]}
        try:
            self.session.fork(**{k: v for k, v in changes.items() if v is not None})
        except ValueError as err:
            log.warning("refused fork: %s", err)
            return self._warn(err)
        return {"message": ""}

    def _on_fork_param(self, name: str, value) -> dict:
        """B's controls: change run B live while a fork is open (before, they are what Fork uses)."""
        if self.session.fork_run is None or value is None:
            return {}
        return self._send({name: value}, run="B")

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
        the light; a prior switch brings its guidance, learning rate and steps)."""
        return {**controls.shown(self.session), "prior": self.session.prior_spec}

    def _controls(self, _values: dict) -> dict:
        """What a page shows when it (re)loads: the session's current settings, not those the app started with,
        so a page opened or reloaded mid-run shows the prompt, guidance, shading and light the run is using.
        Run B's controls show B's values (A's while no fork is open)."""
        s = self.session
        b = s.fork_run.live if s.fork_run is not None else s.a.live
        return {**controls.shown(s, controls.BY_NAME), **self._followed(), "synced": self._followed(),
                "fork_guidance": b.guidance_scale, "fork_loss": b.distillation}

    def _tick(self, values: dict) -> dict:
        """Streamed outputs; a followed control moves when the session's value changed since the page last saw it."""
        s, st = self.session, self.session.status()
        runs = list(s.runs)
        df = loss_frame(runs)
        limits = loss_limits(df)
        now = self._followed()
        out = {"status": status_markdown(st), "plot": gr.LinePlot(value=df, y_lim=limits) if limits else df,
               "vocab": vocabulary_markdown(s), "synced": now, "exports": "\n".join(f"- {e}" for e in s.exports[-5:]),
               "score_plot": score_frame(runs), "fork_info": fork_markdown(st)}
        out |= {k: v for k, v in now.items() if (values["synced"] or {}).get(k) != v}
        pv = s.preview()
        if pv is not None and pv[0] != values["shown"]:
            out |= {"preview": pv[1], "shown": pv[0]}
        return out

    def _ui_export(self, kind: str) -> dict:
        """Export every run (A, and B while forked): each folder's name says which run it holds."""
        try:
            for run in list(self.session.runs):
                self.session.export(kind, run=run.name)
            return {"exports": f"{kind}: working…"}
        except ValueError as err:
            return {"exports": f"⚠ {err}"}

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
            w |= {"synced": gr.State(self._followed()), "shown": gr.State(-1)}
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
        with gr.Row(elem_id="examples"):
            w |= {f"example:{p}": gr.Button(p, size="sm", min_width=80) for p in EXAMPLES}
        w |= self._group("negative")
        w["vocab"] = gr.Markdown(elem_id="vocabulary")
        w["prior"] = gr.Dropdown(prior_choices(s.prior_spec), value=s.prior_spec, label="Prior", elem_id="prior",
                                 allow_custom_value=True, info="takes effect on Start of a new run or Reset; its own "
                                 "settings (steps, guidance, resolution...) come with it, but for what you set")
        with gr.Row():
            w |= {"start": gr.Button("Start", variant="primary", elem_id="start"),
                  "pause": gr.Button("Pause / resume", elem_id="pause"), "reset": gr.Button("Reset", elem_id="reset")}
        w["message"] = gr.Markdown(elem_id="message")
        with gr.Accordion("Compare: fork run B", open=True):
            gr.Markdown("Run B starts as a copy of run A (field, optimizer, step) with its own guidance "
                        "and loss; A and B train in turns and the viewer shows both side by side.")
            row = controls.BY_NAME
            w["fork_guidance"] = controls.widget(row["guidance_scale"], s.a.live.guidance_scale, label="Guidance of run B",
                                                 elem_id="fork_guidance")
            w["fork_loss"] = controls.widget(row["distillation"], s.a.live.distillation, label="Loss of run B", info=None,
                                             elem_id="fork_loss")
            with gr.Row():
                w |= {"fork": gr.Button("Fork B", elem_id="fork"), "close_fork": gr.Button("Close B", elem_id="close_fork")}
            w["fork_info"] = gr.Markdown(elem_id="fork_info")
        w |= self._group("main")
        with gr.Accordion("Light", open=True):
            w |= self._group("light")
        with gr.Accordion("Optimisation", open=False):
            w |= self._group("optimisation")
        with gr.Accordion("Export", open=False):
            with gr.Row():
                w |= {f"export:{k}": gr.Button(k.capitalize(), size="sm") for k in EXPORTS}
            w["exports"] = gr.Markdown()
            w |= MeshPane(self.session, PRIVATE).build()  # the textured mesh: budget, button, 3D view
        return w

    def _progress_column(self) -> dict:
        w = {"status": gr.Markdown(status_markdown(self.session.status()), elem_id="status")}
        if self.viewer_url:
            url = html.escape(self.viewer_url)
            gr.HTML(f'<iframe src="{url}" title="3D viewer" style="width:100%;height:420px;border:0;border-radius:8px">'
                    f'</iframe><a href="{url}" target="_blank">Open the 3D viewer on its own</a>', elem_id="viewer")
        w["preview"] = gr.Image(label="Fixed views: front, side, back, overhead (run B below run A while forked)",
                                interactive=False, elem_id="preview", height=180)
        with gr.Row():
            w["plot"] = gr.LinePlot(placeholder("loss", SERIES_COLORS), x="step", y="loss", color="series",
                                    color_map=SERIES_COLORS, title="Loss (EMA over the raw)", height=220,
                                    elem_id="loss_plot")
            w["score_plot"] = gr.LinePlot(placeholder("R-Precision", SCORE_COLORS), x="step", y="R-Precision",
                                          color="series", color_map=SCORE_COLORS, title="Live score (toy R-Precision)",
                                          y_lim=[0, 1], height=220, elem_id="score_plot")
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
        on(w["fork"].click, self._on_fork, ["fork_guidance", "fork_loss"], ["message"], "fork")
        on(w["close_fork"].click, lambda v: s.close_fork() or {}, [], [], "close_fork")
        for key, name in (("fork_guidance", "guidance_scale"), ("fork_loss", "distillation")):
            on(w[key].input, lambda v, k=key, n=name: self._on_fork_param(n, v[k]), [key], ["message"], key)
        for text in EXAMPLES:
            on(w[f"example:{text}"].click, lambda v, t=text: self._on_example(t), [], ["prompt", "message"],
               f"example_{text.replace(' ', '_')}")
        for kind in EXPORTS:
            on(w[f"export:{kind}"].click, lambda v, k=kind: self._ui_export(k), [], ["exports"], f"export_{kind}")
        on(demo.load, self._controls, [], [*names, "prior", "synced", "fork_guidance", "fork_loss"], "load")
        streamed = ["status", "plot", "preview", "vocab", "synced", "shown", "exports", "score_plot", "fork_info"]
        on(gr.Timer(self.timer_s).tick, self._tick, ["synced", "shown"], [*streamed, *FOLLOWED, "prior"], "tick")
