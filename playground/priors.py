"""The session's prior cache: each prior loaded once, and at most one large prior (Stable Diffusion, IF) in memory.

A large prior takes gigabytes, so before one loads, every prior no run uses is dropped; after a new run, large
priors other than its own are dropped. How SD and IF load (`PriorOptions`) is part of the cache: new options drop
the large priors loaded with the old ones, so the next Start or Reset that needs one loads it again.
The session holds one `PriorCache` (`session.priors`) and calls it from its thread only.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from engine.config import quoted
from engine.presets import prior_kind
from engine.priors import load_prior

LARGE_PRIORS = ("sd", "if")  # gigabytes each: only one stays loaded


class PriorUnavailable(RuntimeError):
    """A prior could not be loaded; the session keeps its current run."""


class PriorCache:
    """spec -> loaded prior. `loader(spec, device=..., [options=...])` loads one (engine.priors.load_prior)."""

    def __init__(self, loader=load_prior, *, device="cpu", options=None):
        self.loader, self.device = loader, device
        self.options = options  # engine.priors.PriorOptions for SD / IF, or None for the loader's defaults
        self.loaded: dict = {}  # spec -> prior

    def get(self, spec: str, *, in_use: Iterable = ()):
        """The prior of `spec`, loaded once. Before a large prior loads, the loaded priors not `in_use` (the
        priors of the current runs) are dropped. PriorUnavailable says why one cannot load."""
        if spec in self.loaded:
            return self.loaded[spec]
        if prior_kind(spec) in LARGE_PRIORS:
            self._keep(lambda k, p: any(p is q for q in in_use))
        kwargs = {"options": self.options} if self.options is not None else {}
        try:
            prior = self.loader(spec, device=self.device, **kwargs)
        except (FileNotFoundError, ImportError, OSError, ValueError, RuntimeError) as err:
            # the loader's own words are the fix (a command, a folder to point to): they are shown whole; the
            # user's value in them is quoted short by the loader, and the spec here
            raise PriorUnavailable(f"prior {quoted(spec)} is not available: {str(err).rstrip('.')}. "
                                   "Pick another prior (e.g. oracle:cube) and press Reset.") from None
        self.loaded[spec] = prior
        return prior

    def keep_large(self, prior) -> None:
        """After a new run with `prior`: drop every other large prior, and give its GPU memory back."""
        self._keep(lambda k, p: p is prior or prior_kind(k) not in LARGE_PRIORS)
        if str(self.device) != "cpu" and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def set_options(self, options) -> bool:
        """Use `options` for the next large prior loaded; the large ones loaded with others are dropped.
        False if they are the options in use already."""
        if options == self.options:
            return False
        self.options = options
        self._keep(lambda k, p: prior_kind(k) not in LARGE_PRIORS)
        return True

    def name(self, spec: str) -> str:
        """The loaded prior's name (what a trainer of it reports), or a name no prior has."""
        prior = self.loaded.get(spec)
        return prior.name if prior is not None else f"<not loaded: {spec}>"

    def vocabulary(self, spec: str) -> list[str] | None:
        """The prior's vocabulary if it has a fixed one (the embedded prior), loaded or not."""
        prior = self.loaded.get(spec)
        tokenizer = getattr(getattr(prior, "model", None), "tokenizer", None)
        vocab = getattr(prior, "vocabulary", None) or getattr(tokenizer, "vocab", None)
        if vocab is None and prior_kind(spec) == "embedded":  # not loaded yet: the shipped list
            from engine.priors.embedded import vocabulary

            vocab = vocabulary()
        return list(vocab) if vocab else None

    def _keep(self, wanted) -> None:
        self.loaded = {k: p for k, p in self.loaded.items() if wanted(k, p)}
