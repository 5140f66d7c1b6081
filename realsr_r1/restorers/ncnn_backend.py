"""Real-ESRGAN on the ncnn runtime (pip `ncnn`), running the very .param/.bin files the weights come from.

ncnn's convolutions are faster than PyTorch's fp32 ones on the same weights (0.75-0.8× the time
here, 0.73× on the AVX2 machine of issue 13), at the same fidelity: we switch ncnn's fp16 and bf16
storage and arithmetic off, so it computes in fp32 and matches our fp32 model to ~5e-6. The price
is memory (its winograd/sgemm workspaces: ~1.1 GB for a 128² tile), so it is opt-in
(`restorer.backend: ncnn`), not what `auto` picks (esrgan.py).

Only the network runs here: tiling, seam blending, alpha, grey, 16-bit and outscale stay in
ESRGANRestorer, which calls `__call__` on each tile as it would call the PyTorch model, so every
backend treats an image identically.
"""

from __future__ import annotations

import os

import numpy as np

from .. import weights

INPUT, OUTPUT = "data", "output"  # the blob names of both shipped models' .param files


class NcnnNet:
    """One shipped Real-ESRGAN model on ncnn's CPU path, fp32 throughout; `scale` 4."""

    scale = 4
    precision = "fp32"

    def __init__(self, name: str, threads: int | None = None):
        try:
            import ncnn
        except ImportError:
            raise ValueError("backend ncnn: the ncnn runtime is not installed (pip install ncnn)") from None
        param, bin_, _ = weights.source_files(name)
        self.name = name
        self.files = (param, bin_)
        self.net = ncnn.Net()
        opt = self.net.opt
        opt.use_vulkan_compute = False
        opt.use_fp16_storage = opt.use_fp16_packed = opt.use_fp16_arithmetic = False  # fp32, as our fp32 model
        opt.use_bf16_storage = False
        opt.num_threads = int(threads or os.cpu_count() or 1)
        if self.net.load_param(str(param)) != 0 or self.net.load_model(str(bin_)) != 0:
            raise weights.CorruptWeightsError(f"ncnn could not load {param.name}/{bin_.name}: reinstall {weights.DATA_PACKAGE}")
        self._mat = ncnn.Mat

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        """HxWx3 float32 in [0, 1] → (4H)x(4W)x3 float32 in [0, 1]."""
        chw = np.ascontiguousarray(tile.transpose(2, 0, 1), np.float32)
        ex = self.net.create_extractor()
        ex.input(INPUT, self._mat(chw))  # borrows chw, which lives until extract returns
        ret, out = ex.extract(OUTPUT)
        if ret != 0:
            raise RuntimeError(f"ncnn extract failed ({ret})")
        return np.clip(np.array(out).transpose(1, 2, 0), 0, 1)
