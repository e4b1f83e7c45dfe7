"""The playground: a local web app (Gradio pane + viser viewer) around one training session."""

from playground.session import STATES, Session
from playground.snapshot import RENDER_MODES, Snapshot

__all__ = ["STATES", "RENDER_MODES", "Session", "Snapshot"]
