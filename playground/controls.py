"""The pane's controls as one table: a row per field of `engine.config.LiveParams` (and one for the next run's
seed) says which widget shows it, its range, label and help. The pane builds its widgets, the events that send
a change to the session, and the keyword parameters of its API endpoints (/set_params, /fork) from this
table, so a new live parameter is one row here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
from dataclasses import dataclass

import gradio as gr

from engine.config import DISTILLATIONS, LIGHT_MODES, SHADING_MODES, LiveParams, quoted
from engine.world import SHAPES

LIGHT_LABELS = {"random": "random as in training", "camera": "follows the camera", "fixed": "fixed position"}
LIVE = tuple(f.name for f in dataclasses.fields(LiveParams))  # the API's order of live parameters


@dataclass(frozen=True)
class Control:
    """How the pane shows one parameter."""

    name: str  # a field of LiveParams, "seed" (the next new run's) or "train_util" (the session's)
    kind: str  # "text", "slider", "number", "radio" or "color"
    label: str
    group: str  # where it sits: "prompt", "negative", "main", "light", "optimisation"
    range: tuple = ()  # (minimum, maximum, step) of a slider or number; step 1: an integer
    choices: tuple = ()  # values of a radio, or (label, value) pairs
    info: str | None = None  # help under the label
    follow: bool = False  # the pane moves it when the session's value changes elsewhere (viewer, prior switch)

    @property
    def integer(self) -> bool:
        return self.kind == "number" and self.range[2:] == (1,)


CONTROLS = (
    Control("prompt", "text", "Prompt", "prompt"),
    Control("negative_prompt", "text", "Negative prompt", "negative"),
    Control("guidance_scale", "slider", "Guidance scale", "main", (0, 200, 0.5), follow=True),
    Control("shading", "radio", "Shading", "main", choices=SHADING_MODES,
            info="random: the paper's mix of albedo, lambertian and textureless"),
    Control("distillation", "radio", "Distillation loss", "main", choices=DISTILLATIONS,
            info="sds: the paper's; switching keeps the field and the optimizer"),
    Control("light_mode", "radio", "Light position", "light", choices=tuple((LIGHT_LABELS[m], m) for m in LIGHT_MODES),
            follow=True),
    Control("light_azimuth", "slider", "Azimuth (°)", "light", (-180, 180, 1), follow=True),
    Control("light_elevation", "slider", "Elevation (°)", "light", (-90, 90, 1), follow=True),
    Control("light_distance", "slider", "Distance", "light", (0.5, 10, 0.1), follow=True),
    Control("light_color", "color", "Colour", "light"),
    Control("ambient", "slider", "Ambient", "light", (0, 1, 0.01)),
    Control("learning_rate", "number", "Learning rate", "optimisation", (1e-6, 1.0, None), follow=True),
    Control("seed", "number", "Seed of the next run (Start from idle, or Reset)", "optimisation", (0, None, 1),
            follow=True),
    Control("steps", "number", "Steps", "main", (1, 10**7, 1), follow=True,
            info="the run's length; raising it extends a finished run"),
    Control("train_util", "slider", "Training share", "optimisation", (0.05, 1, 0.05), follow=True,
            info="of the machine's time; lower it to keep the viewer smooth (same steps, later)"),
)
SESSION_ROWS = {"seed", "train_util"}  # rows of the session, not of a run's LiveParams
BY_NAME = {c.name: c for c in CONTROLS}
FOLLOWED = tuple(c.name for c in CONTROLS if c.follow)
if set(LIVE) != set(BY_NAME) - SESSION_ROWS:  # a new live parameter without a row would be missing from the pane
    odd = sorted(set(LIVE) ^ (set(BY_NAME) - SESSION_ROWS))
    raise ImportError(f"playground/controls.py needs one row per field of LiveParams, no other: {odd}")
# how a change reaches the session: text and numbers when typed out (Enter or leaving the field), sliders
# when let go, choices at once
EVENTS = {"text": ("submit", "blur"), "number": ("submit", "blur"), "slider": ("release",), "radio": ("input",),
          "color": ("input",)}


PRIORS = ["embedded", *(f"oracle:{s}" for s in SHAPES), "gaussian"]


def prior_choices(current: str) -> list[str]:
    """Priors to offer: the analytic ones always, SD / IF when diffusers is installed."""
    out = list(PRIORS)
    if importlib.util.find_spec("diffusers") is not None:
        out += ["sd", "if"]
    return out if current in out else [current, *out]


def widget(c: Control, value, **overrides) -> gr.components.Component:
    """The Gradio widget of a row, showing `value` (as `to_widget` gives it)."""
    kw = {"label": c.label, "info": c.info, "elem_id": c.name, **overrides}
    lo, hi, step = (*c.range, None, None, None)[:3]
    if c.kind == "text":
        return gr.Textbox(value, **kw)
    if c.kind == "slider":
        return gr.Slider(lo, hi, value, step=step, **kw)
    if c.kind == "number":
        return gr.Number(value, minimum=lo, maximum=hi, precision=0 if c.integer else None, **kw)
    if c.kind == "radio":
        return gr.Radio(list(c.choices), value=value, **kw)
    return gr.ColorPicker(value, **kw)


def to_hex(rgb) -> str:
    return "#" + "".join(f"{max(0, min(255, round(c * 255))):02x}" for c in rgb)


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


def current(session, name: str):
    """The session's value of a row: run A's next-step value, the seed the next new run gets, or the session's."""
    if name == "seed":
        return session.pending.get("seed", session.cfg.seed)
    return session.train_util if name == "train_util" else getattr(session.a.live, name)


def to_widget(name: str, value):
    """A session value as its widget shows it (a colour as "#rrggbb")."""
    return to_hex(value) if BY_NAME[name].kind == "color" else value


def to_session(changes: dict) -> dict:
    """Values from a widget or an API call as the session takes them: a colour string parsed, a whole float
    as an int where the row is an integer (seed, steps). Values of None are left out."""
    out = {}
    for name, value in changes.items():
        c = BY_NAME.get(name)
        if value is None or c is None:  # an unknown name: the session names it in its refusal
            out[name] = value
        elif c.kind == "color":
            out[name] = parse_color(value)
        elif c.integer and isinstance(value, float) and value.is_integer():
            out[name] = int(value)
        else:
            out[name] = value
    return {k: v for k, v in out.items() if v is not None}


def shown(session, names=FOLLOWED) -> dict:
    """{name: widget value} of the session's current values."""
    return {name: to_widget(name, current(session, name)) for name in names}


def typed(session, values: dict) -> dict:
    """The widget values that differ from the session's current ones: what the user changed and the session
    may not have heard yet (a number typed but not yet submitted)."""
    def same(name, a, b):
        if BY_NAME[name].kind in ("slider", "number") and isinstance(a, (int, float)):
            return float(a) == float(b)
        return str(a).lower() == str(b).lower() if BY_NAME[name].kind == "color" else a == b

    now = shown(session, [n for n in values if n in BY_NAME])
    return {n: v for n, v in values.items() if n in now and v is not None and not same(n, v, now[n])}


def api_type(c: Control):
    """The type hint of a row's API parameter (gradio_client documents the endpoint from it)."""
    if c.kind == "color":
        return str | list[float] | None
    if c.kind in ("slider", "number"):
        return int | None if c.integer else float | None
    return str | None


def keyword_api(fn, names, extra: dict | None = None, doc: str | None = None):
    """`fn(**kwargs)` with a typed signature gradio can read: a parameter per row in `names` (default None),
    then `extra` ({name: (type, default)}). Callable by position or keyword, as gradio_client calls it."""
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=api_type(BY_NAME[n]))
              for n in names]
    params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d, annotation=t)
               for n, (t, d) in (extra or {}).items()]
    sig = inspect.Signature(params, return_annotation=dict)

    def call(*args, **kwargs):
        return fn(**sig.bind(*args, **kwargs).arguments)

    call.__signature__, call.__name__, call.__doc__ = sig, fn.__name__, doc or fn.__doc__
    call.__annotations__ = {p.name: p.annotation for p in params} | {"return": dict}
    return call
