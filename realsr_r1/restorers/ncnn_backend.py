"""Real-ESRGAN on the ncnn runtime (pip `ncnn`), running the very .param/.bin files the weights come from.

ncnn's convolutions are faster than PyTorch's fp32 ones on the same weights (0.75-0.8× the time
here, 0.73× on an AVX2-only machine), at the same fidelity: we switch ncnn's fp16 and bf16
storage and arithmetic off, so it computes in fp32 and matches our fp32 model to ~5e-6. The price
is memory, so it is opt-in (`restorer.backend: ncnn`), not what `auto` picks (esrgan.py), and runs
128² tiles: ncnn's buffers grow with the blobs it computes, about 55 kB per input pixel of a tile
run in one pass, most of it x4plus's 4x tail. So the tail runs on row strips of the trunk's output
(an Extractor given an inner blob computes only the layers after it): a 160² window (128 + 2·16)
then peaks at 0.9 GB instead of 1.7. Our own pool allocators are emptied after every pass; the
net's default ones hold on to their largest buffers between tiles and after the image.

Only the network runs here: tiling, seam blending, alpha, grey, 16-bit and outscale stay in
ESRGANRestorer, which calls `__call__` on each tile as it would call the PyTorch model, so every
backend treats an image identically.
"""

from __future__ import annotations

import os

import numpy as np

from .. import weights

INPUT, OUTPUT = "data", "output"  # the blob names of both shipped models' .param files
# x4plus's 4x tail (two nearest-neighbour 2x upsamplings, four 3x3 convolutions) runs on row strips
# of the trunk's output of at most this many feature pixels: its buffers grow with the tile's output
# area (about 55 kB per input pixel: 1.4 GB for a 160² window at once), a strip's stay near 0.25 GB.
TAIL_STRIP_AREA = 64 * 64
# Feature rows of context above and below a strip: the tail's convolutions reach 1.25 feature pixels
# (one 3x3 at 2x, three at 4x), so rows further than 2 from a strip's edge are computed as in one go.
TAIL_CONTEXT = 2


def tail_input(param_text: str) -> str | None:
    """The blob the upsampling tail starts from, where the net is x4plus's RRDBNet (its first Interp
    upsamples the trunk's 64-channel features, the sum of a BinaryOp); None for others (the compact
    net upsamples its 3-channel input)."""
    layers = [line.split() for line in param_text.splitlines()[2:] if line.strip()]
    produced_by = {blob: layer[0] for layer in layers for blob in layer[4 + int(layer[2]):4 + int(layer[2]) + int(layer[3])]}
    for layer in layers:
        if layer[0] == "Interp":
            blob = layer[4]
            return blob if produced_by.get(blob) == "BinaryOp" else None
    return None


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
            raise weights.CorruptWeightsError(f"ncnn could not load {param.name}/{bin_.name}: reinstall {weights.MODELS[name].package}")
        self._mat = ncnn.Mat
        self._tail = tail_input(param.read_text(errors="replace"))
        # Our own pools, emptied after every pass: the net's default ones keep their largest buffers
        # (RSS after a 384² image: 1.6 GB with them, 0.57 GB with these), which the encoder of the
        # large output would then need on top.
        self._blobs, self._workspace = ncnn.PoolAllocator(), ncnn.UnlockedPoolAllocator()

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        """HxWx3 float32 in [0, 1] → (4H)x(4W)x3 float32 in [0, 1]."""
        chw = np.ascontiguousarray(tile.transpose(2, 0, 1), np.float32)
        if self._tail is None or chw.shape[1] * chw.shape[2] <= TAIL_STRIP_AREA:
            return np.clip(self._extract(INPUT, chw, OUTPUT).transpose(1, 2, 0), 0, 1)
        features = self._extract(INPUT, chw, self._tail)  # 64 x H x W, the trunk's output
        h, w = features.shape[1:]
        rows = max(1, TAIL_STRIP_AREA // w)
        out = np.empty((self.scale * h, self.scale * w, 3), np.float32)
        for top in range(0, h, rows):
            bottom = min(h, top + rows)
            a, b = max(0, top - TAIL_CONTEXT), min(h, bottom + TAIL_CONTEXT)
            strip = self._extract(self._tail, np.ascontiguousarray(features[:, a:b]), OUTPUT)
            keep = strip[:, self.scale * (top - a):self.scale * (bottom - a)]
            out[self.scale * top:self.scale * bottom] = keep.transpose(1, 2, 0)
        return np.clip(out, 0, 1, out=out)

    def _extract(self, name: str, chw: np.ndarray, output: str) -> np.ndarray:
        """Run the net from blob `name` (set to `chw`) to blob `output`, as a C x H x W array; ncnn
        computes only the layers between them."""
        ex = self.net.create_extractor()
        ex.set_blob_allocator(self._blobs)
        ex.set_workspace_allocator(self._workspace)
        try:
            ex.input(name, self._mat(chw))  # borrows chw, which lives until extract returns
            ret, out = ex.extract(output)
            if ret != 0:
                raise RuntimeError(f"ncnn extract failed ({ret})")
            return np.array(out)  # a copy: the pools are emptied below
        finally:
            del ex
            out = None  # the extractor and its output Mat go before their buffers are freed
            self._blobs.clear()
            self._workspace.clear()
