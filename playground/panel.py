"""The Gradio pane: prompt, prior and live controls, start / pause / reset, a streamed status, loss
plot and preview, the embedded 3D viewer, exports, and a scripting API with stable names.

Handlers only set values on the session or submit work; a `gr.Timer` streams progress. Every control
is also reachable through Gradio's API (`gradio_client`): /start, /pause, /resume, /reset,
/set_params (any subset of the live parameters, by keyword), /status, /export. See docs/api.md.
"""

from __future__ import annotations

import html
import importlib.util

import gradio as gr
import pandas as pd

from engine.config import LIGHT_MODES, SHADING_MODES, LiveParams
from engine.priors import PriorOptions
from playground.session import EXPORTS, Session

LIGHT_LABELS = {"random": "random as in training", "camera": "follows the camera", "fixed": "fixed position"}
PRIORS = ["embedded", "oracle:sphere", "oracle:cube", "oracle:cylinder", "oracle:cone", "oracle:torus", "gaussian"]
D = LiveParams()


def prior_choices(current: str) -> list[str]:
    """Priors to offer: the analytic ones always, SD / IF when diffusers is installed."""
    out = list(PRIORS)
    if importlib.util.find_spec("diffusers") is not None:
        out += ["sd", "if"]
    return out if current in out else [current, *out]


def parse_color(value) -> tuple[float, float, float]:
    """"#rrggbb", "rgb(r, g, b)" / "rgba(...)" (0-255) or three floats in [0, 10] -> an RGB tuple."""
    if isinstance(value, (list, tuple)):
        if len(value) != 3:
            raise ValueError(f"light_color needs three numbers; got {value!r}")
        return tuple(float(c) for c in value)
    s = str(value).strip().lower()
    try:
        if s.startswith("#") and len(s) == 7:
            return tuple(int(s[i:i + 2], 16) / 255.0 for i in (1, 3, 5))
        if s.startswith("rgb"):
            parts = s[s.index("(") + 1:s.index(")")].split(",")[:3]
            return tuple(float(p) / 255.0 for p in parts)
    except ValueError:
        pass
    raise ValueError(f"light_color must be '#rrggbb', 'rgb(r, g, b)' or three numbers; got {value!r}")


def followed(session: Session) -> tuple:
    """The controls the pane keeps in step with the session when something else changes them (the viewer
    moves the light; a prior switch brings its guidance, learning rate and steps): light mode, azimuth,
    elevation, distance, guidance, learning rate, steps, prior."""
    live = session.live
    return (live.light_mode, live.light_azimuth, live.light_elevation, live.light_distance, live.guidance_scale,
            live.learning_rate, session.max_steps, session.prior_spec)


def to_hex(rgb) -> str:
    return "#" + "".join(f"{max(0, min(255, round(c * 255))):02x}" for c in rgb)


def status_markdown(st: dict) -> str:
    icon = {"running": "▶", "paused": "⏸", "done": "✓", "error": "⚠", "idle": "○"}.get(st["state"], "")
    loss = "–" if st["loss"] is None else f"{st['loss']:.4g}"
    lines = [f"**{icon} {st['state']}** · step **{st['step']}** / {st['steps']} · **{st['its_per_s']:.2f}** it/s · "
             f"loss {loss} · prior `{st['prior']}`", ""]
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


class Panel:
    """Builds the Blocks app around a session; `viewer_url` is embedded as an iframe."""

    def __init__(self, session: Session, viewer_url: str | None = None, timer_s: float = 1.0):
        self.session, self.viewer_url, self.timer_s = session, viewer_url, timer_s

    # -- API functions (typed: gradio builds the endpoints' inputs from the signatures) -----------------
    def api_start(self, prior: str | None = None) -> dict:
        """Start training (or resume when paused). `prior` picks the prior for a new run."""
        try:
            self.session.start(prior or None)
        except ValueError as err:
            raise gr.Error(str(err)) from None
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
        try:
            self.session.reset(prior or None)
        except ValueError as err:
            raise gr.Error(str(err)) from None
        return self.session.status()

    def api_status(self) -> dict:
        """state, step, its_per_s, loss and the live parameters as the last step used them."""
        return self.session.status()

    def api_set_params(self, prompt: str | None = None, negative_prompt: str | None = None,
                       guidance_scale: float | None = None, shading: str | None = None,
                       light_mode: str | None = None, light_azimuth: float | None = None,
                       light_elevation: float | None = None, light_distance: float | None = None,
                       light_color: str | list[float] | None = None, ambient: float | None = None,
                       learning_rate: float | None = None, seed: int | None = None,
                       steps: int | None = None) -> dict:
        """Change any subset of the live parameters; they take effect at the next step."""
        kw = {k: v for k, v in locals().items() if k != "self" and v is not None}
        try:
            if "light_color" in kw:
                kw["light_color"] = parse_color(kw["light_color"])
            for name in ("seed", "steps"):
                if name in kw and isinstance(kw[name], float) and kw[name].is_integer():
                    kw[name] = int(kw[name])
            new = self.session.set_params(**kw)
        except ValueError as err:
            raise gr.Error(str(err)) from None
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in new.__dict__.items()}

    def api_prior_options(self, perp_neg: bool = False, perp_neg_scale: float = PriorOptions.perp_neg_scale,
                          fp16: bool | None = None, cpu_offload: bool = False, attention_slicing: bool = False) -> dict:
        """How Stable Diffusion / IF load and guide, from the next Start or Reset that loads one."""
        try:
            options = PriorOptions(perp_neg=perp_neg, perp_neg_scale=perp_neg_scale, fp16=fp16,
                                   cpu_offload=cpu_offload, attention_slicing=attention_slicing)
        except ValueError as err:
            raise gr.Error(str(err)) from None
        self.session.set_prior_options(options)
        self.session.wait_idle_queue()
        return self.session.status()

    def api_export(self, kind: str = "snapshot") -> dict:
        """Submit an export (checkpoint, snapshot, video, mesh); the result shows in /status "exports"."""
        try:
            self.session.export(kind)
        except ValueError as err:
            raise gr.Error(str(err)) from None
        return {"submitted": kind}

    # -- UI handlers ---------------------------------------------------------------------------------
    def _apply(self, **kw) -> str:
        try:
            self.api_set_params(**kw)
            return ""
        except gr.Error as err:
            gr.Warning(err.message)
            return f"⚠ {err.message}"

    def _on_start(self, prior, prompt, negative_prompt, guidance, shading, lr, seed, steps):
        msg = self._apply(prompt=prompt, negative_prompt=negative_prompt, guidance_scale=guidance, shading=shading,
                          learning_rate=lr, seed=int(seed) if seed is not None else None,
                          steps=int(steps) if steps else None)
        if not msg:
            try:
                self.session.start(prior)
            except ValueError as err:
                gr.Warning(str(err))
                return f"⚠ {err}"
        return msg

    def _on_reset(self, prior):
        try:
            self.session.reset(prior)
        except ValueError as err:
            gr.Warning(str(err))

    def _on_pause(self):
        if self.session.state == "paused":
            self.session.resume()
        else:
            self.session.pause()

    def _controls(self) -> list:
        """What a page shows when it (re)loads: the session's current settings, not those the app started with,
        so a page opened or reloaded mid-run shows the prompt, guidance, shading and light the run is using.
        Order: prompt, negative prompt, prior, guidance, shading, light mode, azimuth, elevation, distance,
        colour, ambient, learning rate, seed, steps, and the tuple the timer compares against (`followed`)."""
        s, live = self.session, self.session.live
        return [live.prompt, live.negative_prompt, s.prior_spec, live.guidance_scale, live.shading,
                *followed(s)[:4], to_hex(live.light_color), live.ambient, live.learning_rate, live.seed, s.max_steps,
                followed(s)]

    def _tick(self, synced: tuple, shown_preview: int):
        """Streamed outputs; the followed controls move when the session's values changed elsewhere."""
        s, st = self.session, self.session.status()
        df = pd.DataFrame(s.history[-2000:], columns=["step", "loss"])
        pv = s.preview()
        preview = pv[1] if pv is not None and pv[0] != shown_preview else gr.skip()
        now = followed(s)
        ui = [gr.skip()] * len(now) if tuple(synced or ()) == now else list(now)
        exports = "\n".join(f"- {e}" for e in s.exports[-5:])
        return [status_markdown(st), df, preview, vocabulary_markdown(s), *ui, now,
                pv[0] if pv is not None else shown_preview, exports]

    # -- layout --------------------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        s, live = self.session, self.session.live
        private = {"api_visibility": "private", "show_progress": "hidden"}
        with gr.Blocks(title="DreamFusion Playground") as demo:
            gr.Markdown("# DreamFusion Playground\nType a prompt, press **Start** and watch the object form. "
                        "Guidance, shading and light change the run as it trains.")
            with gr.Row():
                with gr.Column(scale=2, min_width=320):
                    prompt = gr.Textbox(live.prompt, label="Prompt", elem_id="prompt")
                    negative = gr.Textbox(live.negative_prompt, label="Negative prompt", elem_id="negative_prompt")
                    vocab = gr.Markdown(elem_id="vocabulary")
                    prior = gr.Dropdown(prior_choices(s.prior_spec), value=s.prior_spec, label="Prior",
                                        allow_custom_value=True, info="takes effect on Start of a new run or Reset; "
                                        "its own settings (resolution, guidance...) come with it")
                    with gr.Row():
                        start = gr.Button("Start", variant="primary", elem_id="start")
                        pause = gr.Button("Pause / resume", elem_id="pause")
                        reset = gr.Button("Reset", elem_id="reset")
                    message = gr.Markdown(elem_id="message")
                    guidance = gr.Slider(0, 200, live.guidance_scale, step=0.5, label="Guidance scale",
                                         elem_id="guidance")
                    shading = gr.Radio(list(SHADING_MODES), value=live.shading, label="Shading",
                                       info="random: the paper's mix of albedo, lambertian and textureless")
                    with gr.Accordion("Light", open=True):
                        light_mode = gr.Radio([(LIGHT_LABELS[m], m) for m in LIGHT_MODES], value=live.light_mode,
                                              label="Light position")
                        az = gr.Slider(-180, 180, live.light_azimuth, step=1, label="Azimuth (°)")
                        el = gr.Slider(-90, 90, live.light_elevation, step=1, label="Elevation (°)")
                        dist = gr.Slider(0.5, 10, live.light_distance, step=0.1, label="Distance")
                        color = gr.ColorPicker(to_hex(live.light_color), label="Colour")
                        ambient = gr.Slider(0, 1, live.ambient, step=0.01, label="Ambient")
                    with gr.Accordion("Optimisation", open=False):
                        lr = gr.Number(live.learning_rate, label="Learning rate", minimum=1e-6, maximum=1.0)
                        seed = gr.Number(live.seed, label="Seed (takes effect on Reset)", precision=0, minimum=0)
                        steps = gr.Number(s.max_steps, label="Steps", precision=0, minimum=1)
                    with gr.Accordion("Export", open=False):
                        with gr.Row():
                            export_buttons = {k: gr.Button(k.capitalize(), size="sm") for k in EXPORTS}
                        exports = gr.Markdown()
                with gr.Column(scale=3, min_width=400):
                    status = gr.Markdown(status_markdown(s.status()), elem_id="status")
                    if self.viewer_url:
                        gr.HTML(f'<iframe src="{html.escape(self.viewer_url)}" title="3D viewer" '
                                'style="width:100%;height:420px;border:0;border-radius:8px"></iframe>'
                                f'<a href="{html.escape(self.viewer_url)}" target="_blank">Open the 3D viewer '
                                'on its own</a>', elem_id="viewer")
                    preview = gr.Image(label="Fixed views: front, side, back, overhead", interactive=False,
                                       elem_id="preview", height=180)
                    plot = gr.LinePlot(pd.DataFrame({"step": [], "loss": []}), x="step", y="loss",
                                       title="Loss", height=220, elem_id="loss_plot")
            synced = gr.State(followed(s))
            shown = gr.State(-1)

            start.click(self._on_start, [prior, prompt, negative, guidance, shading, lr, seed, steps], message,
                        api_name="ui_start", **private)
            pause.click(self._on_pause, None, None, api_name="ui_pause", **private)
            reset.click(self._on_reset, prior, None, api_name="ui_reset", **private)
            for comp, name in ((prompt, "prompt"), (negative, "negative_prompt")):
                for ev in ("submit", "blur"):
                    getattr(comp, ev)(lambda v, n=name: self._apply(**{n: v}), comp, message,
                                      api_name=f"ui_{name}_{ev}", **private)
            for comp, name in ((guidance, "guidance_scale"), (az, "light_azimuth"), (el, "light_elevation"),
                               (dist, "light_distance"), (ambient, "ambient")):
                comp.release(lambda v, n=name: self._apply(**{n: v}), comp, message, api_name=f"ui_{name}", **private)
            for comp, name in ((shading, "shading"), (light_mode, "light_mode"), (color, "light_color"),
                               (lr, "learning_rate"), (seed, "seed"), (steps, "steps")):
                conv = int if name in ("seed", "steps") else (lambda v: v)
                comp.input(lambda v, n=name, c=conv: self._apply(**{n: c(v)}) if v is not None else "", comp, message,
                           api_name=f"ui_{name}", **private)
            for kind, button in export_buttons.items():
                button.click(lambda k=kind: self._ui_export(k), None, exports, api_name=f"ui_export_{kind}", **private)

            demo.load(self._controls, None, [prompt, negative, prior, guidance, shading, light_mode, az, el, dist,
                                             color, ambient, lr, seed, steps, synced], api_name="ui_load", **private)
            gr.Timer(self.timer_s).tick(self._tick, [synced, shown],
                                        [status, plot, preview, vocab, light_mode, az, el, dist, guidance, lr, steps,
                                         prior, synced, shown, exports], api_name="ui_tick", **private)

            gr.api(self.api_start, api_name="start")
            gr.api(self.api_pause, api_name="pause")
            gr.api(self.api_resume, api_name="resume")
            gr.api(self.api_reset, api_name="reset")
            gr.api(self.api_set_params, api_name="set_params")
            gr.api(self.api_status, api_name="status")
            gr.api(self.api_export, api_name="export")
            gr.api(self.api_prior_options, api_name="prior_options")
        return demo

    def _ui_export(self, kind: str) -> str:
        try:
            self.session.export(kind)
            return f"{kind}: working…"
        except ValueError as err:
            return f"⚠ {err}"
