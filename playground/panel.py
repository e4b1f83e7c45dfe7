"""The Gradio pane: prompt (with example prompts), prior and live controls, start / pause / reset, a fork
(run B beside run A), a streamed status, loss and score curves, preview, the embedded 3D viewer, exports, and
a scripting API with stable names.

Handlers only set values on the session or submit work; a `gr.Timer` streams progress. Every control
is also reachable through Gradio's API (`gradio_client`): /start, /pause, /resume, /reset,
/set_params (any subset of the live parameters, by keyword), /fork, /close_fork, /status, /export.
See docs/api.md.
"""

from __future__ import annotations

import html
import importlib.util
import logging

import gradio as gr
import pandas as pd

from engine.config import DISTILLATIONS, LIGHT_MODES, SHADING_MODES, LiveParams, quoted
from engine.priors import PriorOptions
from engine.world import SHAPES
from playground.session import EXPORTS, Session

log = logging.getLogger(__name__)
LIGHT_LABELS = {"random": "random as in training", "camera": "follows the camera", "fixed": "fixed position"}
PRIORS = ["embedded", *(f"oracle:{s}" for s in SHAPES), "gaussian"]
# prompts that form well with the embedded prior at its defaults: colour and geometry R-Precision >= 0.88 on
# both seeds of the SDS protocol (BENCHMARKS.md)
EXAMPLES = ("a blue sphere", "a green cone", "a yellow cylinder", "a purple torus", "a pink snowman", "a blue cube")
SMOOTHING = 0.9  # EMA factor of the loss curve drawn over the raw one
SERIES_COLORS = {"A": "#d9480f", "A raw": "#f8d3bf", "B": "#1c7ed6", "B raw": "#c3dcf5"}
SCORE_COLORS = {"A colour": "#d9480f", "A geometry": "#862e9c", "B colour": "#1c7ed6", "B geometry": "#0b7285"}
D = LiveParams()


def smoothed(values: list[float], factor: float = SMOOTHING) -> list[float]:
    """Exponential moving average, debiased (as TensorBoard draws it): the first points are not pulled to 0."""
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        if v == v:  # NaN (a skipped step) leaves the average as it is
            avg, weight = factor * avg + (1 - factor) * v, factor * weight + (1 - factor)
        out.append(avg / weight if weight else float("nan"))
    return out


def loss_frame(runs, last: int = 2000) -> pd.DataFrame:
    """step, loss, series: each run's raw loss ("A raw", faint) and its EMA ("A") over its last points."""
    rows = []
    for run in runs:
        hist = run.history[-last:]
        steps, losses = [h[0] for h in hist], [h[1] for h in hist]
        rows += [(st, v, f"{run.name} raw") for st, v in zip(steps, losses)]
        rows += [(st, v, run.name) for st, v in zip(steps, smoothed(losses))]
    return pd.DataFrame(rows, columns=["step", "loss", "series"]).astype({"step": int, "loss": float, "series": str})


def loss_limits(frame: pd.DataFrame) -> list[float] | None:
    """The loss plot's y range: the smoothed curves' range after their first quarter, with room above, so the
    large losses of the first steps do not flatten the rest (raw points beyond it are clipped)."""
    smooth = frame[~frame["series"].str.endswith(" raw")].dropna()
    recent = smooth[smooth["step"] >= smooth["step"].quantile(0.25)]["loss"] if len(smooth) else smooth["loss"]
    if recent.empty:
        return None
    lo, hi = min(0.0, float(recent.min())), 1.5 * float(recent.max())
    return [lo, hi if hi > lo else lo + 1.0]


def score_frame(runs) -> pd.DataFrame:
    """step, R-Precision, series: each run's live colour and geometry scores."""
    rows = []
    for run in runs:
        for sc in run.scores:
            for key, word in (("color_r_precision", "colour"), ("geometry_r_precision", "geometry")):
                if sc.get(key) is not None:
                    rows.append((sc["step"], sc[key], f"{run.name} {word}"))
    return pd.DataFrame(rows, columns=["step", "R-Precision", "series"]).astype(
        {"step": int, "R-Precision": float, "series": str})


def placeholder(y: str, colors: dict) -> pd.DataFrame:
    """A plot's first value: one empty (NaN) point per series. Gradio's plot fixes its colour scale from the
    first value it gets, so a plot that starts empty would draw every later curve without a colour."""
    return pd.DataFrame([(0, float("nan"), k) for k in colors], columns=["step", y, "series"]).astype(
        {"step": int, y: float, "series": str})


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


def parse_color(value) -> tuple[float, float, float]:
    """"#rrggbb", "rgb(r, g, b)" / "rgba(...)" (0-255) or three floats in [0, 10] -> an RGB tuple."""
    if isinstance(value, (list, tuple)):
        if len(value) != 3:
            raise ValueError(f"light_color needs three numbers; got {quoted(value)}")
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
    raise ValueError(f"light_color must be '#rrggbb', 'rgb(r, g, b)' or three numbers; got {quoted(value)}")


def followed(session: Session) -> tuple:
    """The controls the pane keeps in step with the session when something else changes them (the viewer
    moves the light; a prior switch brings its guidance, learning rate and steps): light mode, azimuth,
    elevation, distance, guidance, learning rate, steps, prior."""
    live = session.a.live
    return (live.light_mode, live.light_azimuth, live.light_elevation, live.light_distance, live.guidance_scale,
            live.learning_rate, session.max_steps, session.prior_spec)


def to_hex(rgb) -> str:
    return "#" + "".join(f"{max(0, min(255, round(c * 255))):02x}" for c in rgb)


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
            raise refuse("/start", err) from None
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
            raise refuse("/reset", err) from None
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
                       steps: int | None = None, run: str = "A", distillation: str | None = None) -> dict:
        """Change any subset of a run's live parameters (run "A", or "B" while forked); they take effect at
        its next step."""
        kw = {k: v for k, v in locals().items() if k not in ("self", "run") and v is not None}
        try:
            new = self.session.set_params(run=run or "A", **self._live_kwargs(kw))
        except ValueError as err:
            raise refuse("/set_params", err) from None
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in new.__dict__.items()}

    def api_fork(self, prompt: str | None = None, negative_prompt: str | None = None,
                 guidance_scale: float | None = None, shading: str | None = None,
                 light_mode: str | None = None, light_azimuth: float | None = None,
                 light_elevation: float | None = None, light_distance: float | None = None,
                 light_color: str | list[float] | None = None, ambient: float | None = None,
                 learning_rate: float | None = None, distillation: str | None = None) -> dict:
        """Start run B as a copy of run A (field, optimizer, step) with any of A's live parameters changed;
        A and B then train in turns. Returns /status."""
        kw = {k: v for k, v in locals().items() if k != "self" and v is not None}
        try:
            self.session.fork(**self._live_kwargs(kw))
        except ValueError as err:
            raise refuse("/fork", err) from None
        self.session.wait_idle_queue()
        return self.session.status()

    def api_close_fork(self) -> dict:
        """Close run B; run A goes on alone. Returns /status."""
        self.session.close_fork()
        self.session.wait_idle_queue()
        return self.session.status()

    @staticmethod
    def _live_kwargs(kw: dict) -> dict:
        """API values as LiveParams takes them: a colour string parsed, whole floats as ints for seed / steps."""
        if "light_color" in kw:
            kw["light_color"] = parse_color(kw["light_color"])
        for name in ("seed", "steps"):
            if name in kw and isinstance(kw[name], float) and kw[name].is_integer():
                kw[name] = int(kw[name])
        return kw

    def api_prior_options(self, perp_neg: bool = False, perp_neg_scale: float = PriorOptions.perp_neg_scale,
                          fp16: bool | None = None, cpu_offload: bool = False, attention_slicing: bool = False) -> dict:
        """How Stable Diffusion / IF load and guide, from the next Start or Reset that loads one."""
        try:
            options = PriorOptions(perp_neg=perp_neg, perp_neg_scale=perp_neg_scale, fp16=fp16,
                                   cpu_offload=cpu_offload, attention_slicing=attention_slicing)
        except ValueError as err:
            raise refuse("/prior_options", err) from None
        self.session.set_prior_options(options)
        self.session.wait_idle_queue()
        return self.session.status()

    def api_export(self, kind: str = "snapshot", run: str = "A") -> dict:
        """Submit an export (checkpoint, snapshot, video, mesh) of run A or B; the result shows in /status
        "exports"."""
        try:
            self.session.export(kind, run=run or "A")
        except ValueError as err:
            raise refuse("/export", err) from None
        return {"submitted": kind, "run": run or "A"}

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

    def _on_fork(self, guidance, distillation):
        changes = {k: v for k, v in (("guidance_scale", guidance), ("distillation", distillation)) if v is not None}
        try:
            self.session.fork(**changes)
            return ""
        except ValueError as err:
            log.warning("refused fork: %s", err)
            gr.Warning(str(err))
            return f"⚠ {err}"

    def _on_fork_param(self, name: str, value):
        """B's controls: change run B live while a fork is open (before, they are what Fork uses)."""
        if self.session.fork_run is None or value is None:
            return ""
        return self._apply(**{name: value}, run="B")

    def _on_example(self, prompt: str):
        """One click: the example's prompt on a fresh run (a running run restarts on a new field)."""
        msg = self._apply(prompt=prompt)
        if not msg:
            self.session.reset()
            self.session.start()
        return prompt, msg

    def _on_pause(self):
        if self.session.state == "paused":
            self.session.resume()
        else:
            self.session.pause()

    def _controls(self) -> list:
        """What a page shows when it (re)loads: the session's current settings, not those the app started with,
        so a page opened or reloaded mid-run shows the prompt, guidance, shading and light the run is using.
        Order: prompt, negative prompt, prior, guidance, shading, distillation loss, light mode, azimuth, elevation,
        distance, colour, ambient, learning rate, seed, steps, the tuple the timer compares against (`followed`),
        and run B's guidance and loss (A's while no fork is open)."""
        s, live = self.session, self.session.a.live
        b = s.fork_run.live if s.fork_run is not None else live
        return [live.prompt, live.negative_prompt, s.prior_spec, live.guidance_scale, live.shading, live.distillation,
                *followed(s)[:4], to_hex(live.light_color), live.ambient, live.learning_rate,
                s.pending.get("seed", s.cfg.seed), s.max_steps,
                followed(s), b.guidance_scale, b.distillation]

    def _tick(self, synced: tuple, shown_preview: int):
        """Streamed outputs; the followed controls move when the session's values changed elsewhere."""
        s, st = self.session, self.session.status()
        runs = list(s.runs)
        df, scores = loss_frame(runs), score_frame(runs)
        limits = loss_limits(df)
        df = gr.LinePlot(value=df, y_lim=limits) if limits else df
        pv = s.preview()
        preview = pv[1] if pv is not None and pv[0] != shown_preview else gr.skip()
        now = followed(s)
        ui = [gr.skip()] * len(now) if tuple(synced or ()) == now else list(now)
        exports = "\n".join(f"- {e}" for e in s.exports[-5:])
        return [status_markdown(st), df, preview, vocabulary_markdown(s), *ui, now,
                pv[0] if pv is not None else shown_preview, exports, scores, fork_markdown(st)]

    # -- layout --------------------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        s, live = self.session, self.session.a.live
        private = {"api_visibility": "private", "show_progress": "hidden"}
        with gr.Blocks(title="DreamFusion Playground") as demo:
            gr.Markdown("# DreamFusion Playground\nType a prompt, press **Start** and watch the object form. "
                        "Guidance, shading and light change the run as it trains.")
            with gr.Row():
                with gr.Column(scale=2, min_width=320):
                    prompt = gr.Textbox(live.prompt, label="Prompt", elem_id="prompt")
                    gr.Markdown("Examples that form well with the embedded prior (a click starts a fresh run):")
                    with gr.Row(elem_id="examples"):
                        example_buttons = {p: gr.Button(p, size="sm", min_width=80) for p in EXAMPLES}
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
                    with gr.Accordion("Compare: fork run B", open=True):
                        gr.Markdown("Run B starts as a copy of run A (field, optimizer, step) with its own guidance "
                                    "and loss; A and B train in turns and the viewer shows both side by side.")
                        fork_guidance = gr.Slider(0, 200, live.guidance_scale, step=0.5, label="Guidance of run B",
                                                  elem_id="fork_guidance")
                        fork_loss = gr.Radio(list(DISTILLATIONS), value=live.distillation, label="Loss of run B",
                                             elem_id="fork_loss")
                        with gr.Row():
                            fork = gr.Button("Fork B", elem_id="fork")
                            close_fork = gr.Button("Close B", elem_id="close_fork")
                        fork_info = gr.Markdown(elem_id="fork_info")
                    guidance = gr.Slider(0, 200, live.guidance_scale, step=0.5, label="Guidance scale",
                                         elem_id="guidance")
                    shading = gr.Radio(list(SHADING_MODES), value=live.shading, label="Shading",
                                       info="random: the paper's mix of albedo, lambertian and textureless")
                    distill = gr.Radio(list(DISTILLATIONS), value=live.distillation, label="Distillation loss",
                                       info="sds: the paper's; switching keeps the field and the optimizer",
                                       elem_id="distillation")
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
                        seed = gr.Number(s.cfg.seed, label="Seed (takes effect on Reset)", precision=0, minimum=0)
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
                    preview = gr.Image(label="Fixed views: front, side, back, overhead (run B below run A while forked)",
                                       interactive=False,
                                       elem_id="preview", height=180)
                    with gr.Row():
                        plot = gr.LinePlot(placeholder("loss", SERIES_COLORS), x="step", y="loss",
                                           color="series", color_map=SERIES_COLORS, title="Loss (EMA over the raw)",
                                           height=220, elem_id="loss_plot")
                        score_plot = gr.LinePlot(placeholder("R-Precision", SCORE_COLORS), x="step",
                                                 y="R-Precision", color="series", color_map=SCORE_COLORS,
                                                 title="Live score (toy R-Precision)", y_lim=[0, 1], height=220,
                                                 elem_id="score_plot")
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
            for comp, name in ((shading, "shading"), (distill, "distillation"), (light_mode, "light_mode"),
                               (color, "light_color"), (lr, "learning_rate"), (seed, "seed"), (steps, "steps")):
                conv = int if name in ("seed", "steps") else (lambda v: v)
                comp.input(lambda v, n=name, c=conv: self._apply(**{n: c(v)}) if v is not None else "", comp, message,
                           api_name=f"ui_{name}", **private)
            fork.click(self._on_fork, [fork_guidance, fork_loss], message, api_name="ui_fork", **private)
            close_fork.click(lambda: self.session.close_fork(), None, None, api_name="ui_close_fork", **private)
            for comp, name in ((fork_guidance, "guidance_scale"), (fork_loss, "distillation")):
                comp.input(lambda v, n=name: self._on_fork_param(n, v), comp, message, api_name=f"ui_fork_{name}",
                           **private)
            for text, button in example_buttons.items():
                button.click(lambda t=text: self._on_example(t), None, [prompt, message],
                             api_name=f"ui_example_{text.replace(' ', '_')}", **private)
            for kind, button in export_buttons.items():
                button.click(lambda k=kind: self._ui_export(k), None, exports, api_name=f"ui_export_{kind}", **private)

            demo.load(self._controls, None, [prompt, negative, prior, guidance, shading, distill, light_mode, az, el, dist,
                                             color, ambient, lr, seed, steps, synced, fork_guidance, fork_loss],
                      api_name="ui_load", **private)
            gr.Timer(self.timer_s).tick(self._tick, [synced, shown],
                                        [status, plot, preview, vocab, light_mode, az, el, dist, guidance, lr, steps,
                                         prior, synced, shown, exports, score_plot, fork_info],
                                        api_name="ui_tick", **private)

            gr.api(self.api_start, api_name="start")
            gr.api(self.api_pause, api_name="pause")
            gr.api(self.api_resume, api_name="resume")
            gr.api(self.api_reset, api_name="reset")
            gr.api(self.api_set_params, api_name="set_params")
            gr.api(self.api_status, api_name="status")
            gr.api(self.api_export, api_name="export")
            gr.api(self.api_fork, api_name="fork")
            gr.api(self.api_close_fork, api_name="close_fork")
            gr.api(self.api_prior_options, api_name="prior_options")
        return demo

    def _ui_export(self, kind: str) -> str:
        """Export every run (A, and B while forked): each folder's name says which run it holds."""
        try:
            for run in list(self.session.runs):
                self.session.export(kind, run=run.name)
            return f"{kind}: working…"
        except ValueError as err:
            return f"⚠ {err}"
