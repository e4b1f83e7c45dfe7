"""VSD's trainable copy of a prior (ProlificDreamer): the score of the renders' own distribution.

The copy never modifies the frozen network: it holds parameters of its own and evaluates the network with them
through `torch.func.functional_call`, so the prior's predictions stay exactly what they were. Two kinds:

- `LoRA` (U-Nets of SD and IF): W + B A on the attention projections (to_q, to_k, to_v, to_out.0), rank 4;
  B starts at zero, so the copy starts as the prior. Parameters: rank * (in + out) per projection.
- `FullCopy` (the embedded prior's 2M-parameter U-Net): a trainable clone of every weight.

Memory is the copy's parameters, Adam's two moments and, while fitting, one U-Net forward's activations with
graph (`TrainableCopy.parameter_count`; docs/priors.md gives the numbers).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class LoRA(nn.Module):
    """Low-rank deltas on the attention projections of `net` (weights W [out, in] -> W + B A)."""

    def __init__(self, net: nn.Module, rank: int = 4):
        super().__init__()
        self.names = [n for n, m in net.named_modules() if isinstance(m, nn.Linear) and n.endswith(LORA_TARGETS)]
        if not self.names:
            raise ValueError("LoRA found no attention projections (to_q, to_k, to_v, to_out.0) in the network")
        gen = torch.Generator().manual_seed(0)  # the copy's init never draws from the run's generator
        shapes = [net.get_submodule(n).weight.shape for n in self.names]
        self.down = nn.ParameterList([nn.Parameter(torch.randn(rank, i, generator=gen) / rank) for _, i in shapes])
        self.up = nn.ParameterList([nn.Parameter(torch.zeros(o, rank)) for o, _ in shapes])

    def weights(self, net: nn.Module) -> dict[str, Tensor]:
        out = {}
        for name, a, b in zip(self.names, self.down, self.up, strict=True):
            w = net.get_submodule(name).weight
            out[f"{name}.weight"] = w + (b @ a).to(w.dtype)
        return out


class FullCopy(nn.Module):
    """A trainable clone of every parameter of `net`."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.names = [n for n, _ in net.named_parameters()]
        self.params = nn.ParameterList([nn.Parameter(p.detach().clone().float()) for _, p in net.named_parameters()])

    def weights(self, net: nn.Module) -> dict[str, Tensor]:
        return {n: p for n, p in zip(self.names, self.params, strict=True)}


class TrainableCopy:
    """A copy (LoRA / FullCopy / a prior's own module with `weights`) and its optimizer; owned by the run."""

    def __init__(self, delta: nn.Module, lr: float):
        self.delta = delta
        self.optimizer = torch.optim.Adam(delta.parameters(), lr=lr)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.delta.parameters())

    def forward(self, net: nn.Module, *args, **kwargs):
        """net(*args, **kwargs) evaluated with the copy's weights (the frozen net is not changed)."""
        return functional_call(net, self.delta.weights(net), args, kwargs)
