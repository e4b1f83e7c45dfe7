"""DreamFusion engine: a NeRF optimised by Score Distillation Sampling from a frozen 2D prior.

UI-free: nothing here imports gradio, viser or playground/.
"""

from engine.config import Config, LiveParams

__all__ = ["Config", "LiveParams"]
