"""Out of GPU memory, portably: what the restorers catch to shrink their work and retry."""

from __future__ import annotations

import torch

# torch.OutOfMemoryError exists from torch 2.5 (as the same class); torch.cuda.OutOfMemoryError from
# 1.13, and requirements allow torch 2.4.
OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def free_cached() -> None:
    """Return cached GPU blocks before a smaller retry (the failed attempt's are free by then)."""
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
