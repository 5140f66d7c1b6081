"""Policies: what writes the chain of thought.

The lite profile has no VLM: `AnalyserPolicy` writes <degradation> from the classical analyser and
leaves the understanding tags empty (the sidecar says so). The VLM policy of the full profile
streams the same contract from a vision-language model.
"""

from __future__ import annotations

from typing import Iterator

from .analyze import Analysis
from .cot import DegradationItem, level_for, render_cot
from .imageio import LoadedImage

NO_VLM_NOTE = "no VLM ran (lite profile): understanding tags are empty; <degradation> is the classical analyser's"


class AnalyserPolicy:
    """Writes the VLCoT from pixel statistics alone; deterministic, no weights."""

    name = "analyser"
    note = NO_VLM_NOTE

    def stream(self, image: LoadedImage, analysis: Analysis, *, seed: int = 0, scale: float = 4.0) -> Iterator[str]:
        items = [i for i in analysis.items if i.type != "downsample"]
        items.append(DegradationItem("downsample", level_for("downsample", scale)))
        text = render_cot(items)
        # One line per tag, so a streaming view fills in the way a VLM's would.
        lines = text.split("\n")
        for i, line in enumerate(lines):
            yield line + ("\n" if i < len(lines) - 1 else "")
