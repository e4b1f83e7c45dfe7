"""The pane's fields: the choice of field for a new run (NeRF or Gaussian splats), and the fork box (run B: its
guidance, its loss, and "as splats": Gaussians drawn from run A's NeRF).

The field is a setting of the next new run, as the seed is: a change is queued on the session (`next_run`,
shown in /status `pending`) and Start from idle, done or error, or Reset, builds the run with it; "nerf" is the
NeRF backbone the prior's preset gives on this device (grid on a CPU; hash for SD and IF on CUDA). A refused
value is a warning in the pane, never a traceback.
"""

from __future__ import annotations

import logging

import gradio as gr

from playground import controls
from playground.lifecycle import FIELDS, field_of

log = logging.getLogger(__name__)
FIELD_CHOICES = [(label, value) for value, label in FIELDS.items()]  # [("NeRF", "nerf"), ("Gaussian splats", ...)]


class FieldPane:
    """Builds the field choice and the fork box inside the pane's Blocks, and wires their events.

    `send(values, run)` and `warn(err)` are the pane's (`Panel._send`, `Panel._warn`): a change to run B goes
    through the same checks as any other."""

    def __init__(self, session, send, warn):
        self.session, self.send, self.warn = session, send, warn

    def field_value(self) -> str:
        """What the next new run's field is: the one picked since this run began, else this run's."""
        s = self.session
        return field_of(s.pending.get("field.backbone") or s.cfg.field.backbone)

    def field_widget(self) -> gr.Radio:
        return gr.Radio(FIELD_CHOICES, value=self.field_value(), label="Field", elem_id="field",
                        info="NeRF: the paper's field (the default). Gaussian splats: 3D Gaussians the viewer draws in "
                             "the browser. For the next run: Start a new one, or Reset")

    def fork_box(self) -> dict:
        """The fork accordion's widgets."""
        s, row = self.session, controls.BY_NAME
        with gr.Accordion("Compare: fork run B", open=True):
            gr.Markdown("Run B starts as a copy of run A (field, optimizer, step) with its own guidance and loss, or "
                        "as Gaussian splats drawn from A's NeRF; A and B train in turns and the viewer shows both "
                        "side by side.")
            w = {"fork_guidance": controls.widget(row["guidance_scale"], s.a.live.guidance_scale,
                                                  label="Guidance of run B", elem_id="fork_guidance"),
                 "fork_loss": controls.widget(row["distillation"], s.a.live.distillation, label="Loss of run B",
                                              info=None, elem_id="fork_loss"),
                 "fork_splats": gr.Checkbox(False, label="as splats", elem_id="fork_splats",
                                            info="run B: Gaussian splats drawn from run A's NeRF (A goes on as it is)")}
            with gr.Row():
                w |= {"fork": gr.Button("Fork B", elem_id="fork"), "close_fork": gr.Button("Close B", elem_id="close_fork")}
            w["fork_info"] = gr.Markdown(elem_id="fork_info")
        return w

    # -- handlers: {name: widget value} in, {name: new value} out --------------------------------------------
    def on_field(self, values: dict) -> dict:
        try:
            self.session.next_run({"field.backbone": values["field"]})
        except ValueError as err:
            log.warning("refused field: %s", err)
            return self.warn(err)
        return {"message": ""}

    def on_fork(self, values: dict) -> dict:
        changes = {"guidance_scale": values["fork_guidance"], "distillation": values["fork_loss"]}
        try:
            self.session.fork(backbone="gaussians" if values.get("fork_splats") else None,
                              **{k: v for k, v in changes.items() if v is not None})
        except ValueError as err:
            log.warning("refused fork: %s", err)
            return self.warn(err)
        return {"message": ""}

    def on_fork_param(self, name: str, value) -> dict:
        """B's controls: change run B live while a fork is open (before, they are what Fork uses)."""
        if self.session.fork_run is None or value is None:
            return {}
        return self.send({name: value}, run="B")

    def wire(self, on, w: dict) -> None:
        """The events, through the pane's `on(event, fn, inputs, outputs, name)`."""
        on(w["field"].input, self.on_field, ["field"], ["message"], "field")
        on(w["fork"].click, self.on_fork, ["fork_guidance", "fork_loss", "fork_splats"], ["message"], "fork")
        on(w["close_fork"].click, lambda v: self.session.close_fork() or {}, [], [], "close_fork")
        for key, name in (("fork_guidance", "guidance_scale"), ("fork_loss", "distillation")):
            on(w[key].input, lambda v, k=key, n=name: self.on_fork_param(n, v[k]), [key], ["message"], key)
