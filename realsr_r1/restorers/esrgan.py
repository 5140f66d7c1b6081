"""Real-ESRGAN as a restorer: its network (esrgan_nets.py, or another runtime's) run tiled in flat memory.

Tiling. No window the network sees is larger than tile + 2·tile_pad input pixels on a side
(`tile` 0 = the whole image): an axis up to that long is computed whole; a longer one in the fewest
windows of that bound, all of one size, which overlap by 2·tile_pad, so every tile's core has
`tile_pad` of context on each inner side. Time then grows with pixels: an axis of length L costs
L + 2·tile_pad·(tiles − 1), not a whole window per tile (with windows of a fixed 288², a 280² input
took 4x a 256² one). All tiles of an image share one input shape, which OpenVINO compiles statically
for images of many tiles (STATIC_TILES: fewer buffers beside a large output). Neighbours are
cross-faded over ±tile_pad/2 around each cut with linear ramps that sum to exactly 1, so no weight
map is needed and seams are continuous. Output is accumulated in float32 one band (row of tiles) at
a time; rows no later band touches go to the output dtype straight away. Peak memory is one tile's
activations (the 4x tail runs in strips), one band, and the output in its final dtype: ask for
uint8/uint16 (`out_dtype`) for large images, as the pipeline does — a 2048² input gives an 8192²
output, 201 MB in uint8 against 805 MB in float32.

Backends (`backend`): the network of each tile runs on PyTorch (`torch`), on OpenVINO (`openvino`,
openvino_backend.py: fp32, bf16 or INT8, converted once and cached under the weights folder) or on
the ncnn runtime (`ncnn`, ncnn_backend.py, the shipped .param/.bin in fp32); everything else above
is shared, so every backend treats tiling, alpha, grey, 16-bit and outscale alike. `auto`
(choose_backend) takes PyTorch on GPUs and OpenVINO on CPUs, in the fastest precision that keeps
quality on real camera pairs (bf16, else fp32; INT8 is opt-in: benchmarks/real_pairs.py). ncnn stays opt-in,
on 128² tiles: its trunk alone takes about 1 GB for a 288² window (the 4x tail runs on row strips,
ncnn_backend.py), against 0.5-0.6 GB for PyTorch and 0.7-1.1 GB for OpenVINO (bf16, INT8, fp32) at
256². PyTorch is imported only where it runs the network (or converts it for OpenVINO, once): a run
on the cached OpenVINO model starts without it, 1.1 s sooner.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .. import weights
from ..device import device_type

log = logging.getLogger(__name__)

DEFAULT_TILE = {"cuda": 512, "cpu": 256}  # input pixels per tile side; other devices take the CPU's
MIN_TILE = 32  # CUDA OOM halving stops here
FINALIZE_ROWS = 256  # output rows converted to the output dtype at a time
# Input pixels from which a runtime gives back its tile buffers after the image (0.6-1 GB for a 276²
# tile), so that encoding the large output does not add to them; below, they are small and
# re-allocating them costs more (about 13 ms a 128² image) than it saves.
RELEASE_AREA = 256 * 256
GRAY = (0.299, 0.587, 0.114)  # alpha comes back through the RGB net; Real-ESRGAN takes it as grey
BACKENDS = ("auto", "torch", "openvino", "ncnn")
# Windows per image from which a runtime compiles the image's window shape statically (fix_shape):
# OpenVINO's buffers are then 0.15-0.3 GB smaller, which counts beside a large output, and its
# compile (about 1.25 s, uncached: one shape per image size) is small against that many windows
# (16: about a minute on 2 cores). Fewer run on the dynamic model: about 0.4 s more on a new shape.
STATIC_TILES = 16
# Input pixels, where a backend needs smaller tiles than DEFAULT_TILE: ncnn's memory grows with the
# tile's area (module doc). Others share DEFAULT_TILE, since the tile changes the image: RRDBNet sees
# far beyond tile_pad, and 128² tiles cost 0.4 dB PSNR at 256² against 256² tiles.
BACKEND_TILE = {"ncnn": 128}


@dataclass
class _Span:
    """One tile along one axis: context to compute (input px), contribution and its weights (output px)."""

    ctx0: int
    ctx1: int
    out0: int
    out1: int
    weight: np.ndarray  # float32, length out1 - out0


def _spans(length: int, tile: int, pad: int, scale: int) -> list[_Span]:
    """Tiles along one axis: the fewest windows of at most tile + 2·pad (the memory bound) that cover
    it, all of one size (one input shape per image), overlapping by ≥ 2·pad. Each cut lies mid-overlap,
    so every core has ≥ `pad` of context; ramps cross-fade ±pad/2 around it. An axis that fits in one
    window is computed whole. So the pixels computed are length + 2·pad·(n − 1), plus < n of rounding."""
    n = 1 if tile <= 0 or length <= tile + 2 * pad else -(-(length - 2 * pad) // tile)
    window = -(-(length + 2 * pad * (n - 1)) // n)
    # Windows spread evenly from one border to the other (rounded half up: steps ≤ window − 2·pad).
    starts = [(2 * i * (length - window) + n - 1) // (2 * n - 2) for i in range(n)] if n > 1 else [0]
    cuts = [0] + [(starts[i] + starts[i - 1] + window) // 2 for i in range(1, n)] + [length]
    # Cross-fade zones must not overlap each other, and keep ≥ pad/2 of context outside them.
    blend = min(pad // 2, min(b - a for a, b in zip(cuts, cuts[1:])) // 2)
    ramp = (np.arange(2 * scale * blend, dtype=np.float32) + 0.5) / (2 * scale * blend) if blend else None
    spans = []
    for i in range(n):
        lo = cuts[i] - (blend if i > 0 else 0)
        hi = cuts[i + 1] + (blend if i < n - 1 else 0)
        w = np.ones(scale * (hi - lo), np.float32)
        if ramp is not None and i > 0:
            w[: ramp.size] = ramp
        if ramp is not None and i < n - 1:
            w[-ramp.size:] = ramp[::-1]
        spans.append(_Span(starts[i], starts[i] + window, scale * lo, scale * hi, w))
    return spans


def _quantize(x: np.ndarray, dtype) -> np.ndarray:
    """Float in [0, 1] → `dtype` (integers rounded to the full range)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return np.clip(x, 0, 1).astype(dtype)
    x = np.clip(x, 0, 1)  # a copy: scaled in place to keep one temporary
    x *= np.iinfo(dtype).max
    x += 0.5
    return x.astype(dtype)


def _to_float(x: np.ndarray) -> np.ndarray:
    if x.dtype.kind == "u":
        return x.astype(np.float32) / np.iinfo(x.dtype).max
    return x.astype(np.float32, copy=False)


def _resize(arr: np.ndarray, size: tuple[int, int], dtype) -> np.ndarray:
    """Lanczos resize of HxW or HxWxC to (h, w), one float channel at a time (PIL mode 'F')."""
    h, w = size
    if arr.shape[:2] == (h, w):
        return arr if arr.dtype == dtype else _quantize(_to_float(arr), dtype)
    src = arr[..., None] if arr.ndim == 2 else arr
    out = np.empty((h, w, src.shape[2]), dtype)
    for c in range(src.shape[2]):
        chan = Image.fromarray(np.ascontiguousarray(_to_float(src[..., c])))
        out[..., c] = _quantize(np.asarray(chan.resize((w, h), Image.LANCZOS)), dtype)
    return out[..., 0] if arr.ndim == 2 else out


class ESRGANRestorer:
    """Real-ESRGAN ×4 on numpy images: `upscale` (×4) and `restore` (any outscale, alpha)."""

    def __init__(self, model, device="cpu", precision: str = "fp32",
                 tile: int | None = None, tile_pad: int = 16, name: str = "realesrgan-x4plus",
                 weights_file: Path | None = None, net=None, backend: str = "torch"):
        """`model`: a PyTorch network (esrgan_nets.py) on `device`; or `net`, another runtime's network
        on the CPU (ncnn_backend, openvino_backend), named by `backend`, and then no torch is imported."""
        self.backend = "torch" if net is None else backend
        self.net = net
        if net is None:
            import torch

            from ..device import check_precision

            self.device = torch.device(device)
            self.precision = check_precision(self.device, precision)
            # channels_last: oneDNN's and cuDNN's fast convolution layout (≈15-35% faster on CPU here).
            self.model = model.to(self.device, memory_format=torch.channels_last)
        else:
            self.device, self.precision, self.model = "cpu", net.precision, None
        kind = getattr(self.device, "type", self.device)
        self.tile = DEFAULT_TILE.get(kind, DEFAULT_TILE["cpu"]) if tile is None else int(tile)
        self.tile_pad = int(tile_pad)
        if self.tile < 0 or self.tile_pad < 0:
            raise ValueError(f"tile and tile_pad must be ≥ 0, got {self.tile} and {self.tile_pad}")
        self.name = name
        self.weights_file = weights_file
        self._weights_hash: str | None = None
        self.scale = (net or model).scale

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str = "auto", precision: str = "auto",
                        tile: int | None = None, tile_pad: int = 16, backend: str = "auto",
                        calibration: str | Path | None = None) -> "ESRGANRestorer":
        """Load converted weights: a file, a model name from weights.MODELS, or None for x4plus;
        `backend` auto | torch | openvino | ncnn (module doc; ncnn runs only the shipped models);
        `precision` auto | fp32 | bf16 | fp16 (CUDA) | int8 (OpenVINO, calibrated on `calibration`,
        a folder of images, or the shipped crops)."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r} (use {', '.join(BACKENDS)})")
        shipped = path is None or str(path) in weights.MODELS
        name = str(path or "realesrgan-x4plus")
        backend, precision = choose_backend(device_type(device), backend, precision, name if shipped else None)
        tile = BACKEND_TILE.get(backend) if tile is None else tile
        if backend == "ncnn":
            if not shipped:
                raise ValueError(f"backend ncnn runs the shipped models ({', '.join(weights.MODELS)}), not {path}")
            if precision not in ("auto", "fp32"):
                raise ValueError(f"backend ncnn runs on CPU in fp32, not in {precision}")
            from .ncnn_backend import NcnnNet

            net = NcnnNet(name)
            return cls(None, "cpu", "fp32", tile, tile_pad, name=name, weights_file=net.files[1], net=net, backend="ncnn")
        if shipped:
            path = weights.pretrained(name)
        if backend == "openvino":
            from .openvino_backend import OpenVINONet

            if not Path(path).is_file():
                raise weights.WeightsNotFoundError(f"{path}: no such weights file")
            digest = weights.file_hash(Path(path))
            net = OpenVINONet(lambda: _nets().load_model(path), Path(path), precision, calibration=calibration,
                              sha256=digest)
            r = cls(None, "cpu", precision, tile, tile_pad, name=Path(path).stem, weights_file=Path(path), net=net,
                    backend="openvino")
            r._weights_hash = digest[:12]
            return r
        if precision == "int8":
            raise ValueError("precision int8 runs on backend openvino (restorer.backend: openvino or auto)")
        from ..device import resolve_device

        return cls(_nets().load_model(path), resolve_device(device), precision, tile, tile_pad, name=Path(path).stem,
                   weights_file=Path(path))

    def weights(self) -> dict | None:
        """The weights that run: file name and a short content hash (computed once), for the sidecar."""
        if self.weights_file is None:
            return None
        if self._weights_hash is None:
            self._weights_hash = weights.file_hash(self.weights_file)[:12]
        return {"file": self.weights_file.name, "sha256": self._weights_hash}

    def upscale(self, rgb: np.ndarray, out_dtype=np.float32) -> np.ndarray:
        """HxWx3 in [0, 1] (or uint8/uint16) → (4H)x(4W)x3 in `out_dtype`."""
        return self._run(_to_float(_check_rgb(rgb)), out_dtype, gray=False)

    def restore(self, rgb: np.ndarray, alpha: np.ndarray | None = None, outscale: float = 4.0,
                out_dtype=np.float32) -> tuple[np.ndarray, np.ndarray | None]:
        """(rgb, alpha) at round(H·outscale) x round(W·outscale) in `out_dtype`.

        Alpha goes through the network too (replicated to RGB, read back as grey), as Real-ESRGAN
        does: a sharper edge than interpolation. Other scales than ×4 are a Lanczos resize of the ×4
        result, kept in uint16 (or float) until then so the resize adds no quantisation of its own.
        """
        rgb = _to_float(_check_rgb(rgb))
        h, w = rgb.shape[:2]
        if not outscale > 0:
            raise ValueError(f"outscale must be > 0, got {outscale}")
        size = (max(1, round(h * outscale)), max(1, round(w * outscale)))
        exact = size == (h * self.scale, w * self.scale)
        mid = out_dtype if exact or np.dtype(out_dtype).kind == "f" else np.uint16
        rgb_out = _resize(self._run(rgb, mid, gray=False), size, out_dtype)
        if alpha is None:
            return rgb_out, None
        alpha = _to_float(np.asarray(alpha))
        if alpha.shape != (h, w):
            raise ValueError(f"alpha must be {h}x{w} like the image, got {alpha.shape}")
        alpha3 = np.broadcast_to(alpha[..., None], (h, w, 3))  # a view: tiles copy what they need
        return rgb_out, _resize(self._run(alpha3, mid, gray=True)[..., 0], size, out_dtype)

    def _run(self, img: np.ndarray, out_dtype, gray: bool) -> np.ndarray:
        h, w = img.shape[:2]
        out = np.empty((h * self.scale, w * self.scale, 1 if gray else 3), out_dtype)
        if self.net is not None:  # other runtimes run on the CPU: no GPU memory to run out of
            self._tiled(img, out, gray)
            if hasattr(self.net, "release") and h * w >= RELEASE_AREA:
                self.net.release()  # its tile buffers, while this large image is written
            return out
        import torch

        from .memory import OutOfMemoryError

        while True:
            try:
                self._tiled(img, out, gray)
                return out
            except OutOfMemoryError:  # portable: torch.OutOfMemoryError is torch ≥ 2.5
                tile = self.tile or max(h, w)
                if self.device.type != "cuda" or tile <= MIN_TILE:
                    raise
                self.tile = max(MIN_TILE, tile // 2)
                torch.cuda.empty_cache()
                log.warning("out of GPU memory: retrying with tile %d", self.tile)

    def _tiled(self, img: np.ndarray, out: np.ndarray, gray: bool) -> None:
        for r, rows in self._bands(img, out.dtype, gray):
            out[r:r + rows.shape[0]] = rows

    def stream(self, img: np.ndarray, out_dtype=np.uint8, gray: bool = False, skip=None, turns: bool = False):
        """The ×4 output of an HxWx3 image as (first row, rows) chunks from top to bottom, equal to
        `upscale` but never whole: a caller that composes several experts row by row (regions.py)
        holds a few bands of each instead of their full outputs.

        `skip(rows, cols)`, given a tile's output rows and columns (each a (start, end) pair), may
        say that nothing of the tile will be used: it is not run, and its pixels stay 0. `turns`:
        other experts stream beside this one, so on a large image the runtime gives its buffers
        back after every band and the experts take turns with one set of them (two OpenVINO
        runtimes at a 288² window: 1.14 GB peak instead of 1.78, at the same speed). The buffers
        are given back at the end for a large image in any case, as `upscale` does."""
        img = _to_float(_check_rgb(img)) if not gray else img
        h, w = img.shape[:2]
        release = turns and h * w >= RELEASE_AREA
        sent = 0  # rows handed over: a retry with smaller tiles resumes after them
        while True:
            try:
                for r, rows in self._bands(img, out_dtype, gray, skip=skip, release=release):
                    if r + rows.shape[0] > sent:
                        rows, r = rows[max(0, sent - r):], max(r, sent)
                        yield r, rows
                        sent = r + rows.shape[0]
                break
            except Exception as e:  # CUDA out of memory: halve the tile, as _run does
                if self.net is not None or not self._halve_on_oom(e, max(h, w)):
                    raise
        if self.net is not None and hasattr(self.net, "release") and h * w >= RELEASE_AREA:
            self.net.release()

    def _halve_on_oom(self, error: Exception, side: int) -> bool:
        """After an out-of-memory error on CUDA: a smaller tile for the retry (False: give up)."""
        import torch

        from .memory import OutOfMemoryError

        tile = self.tile or side
        if not isinstance(error, OutOfMemoryError) or self.device.type != "cuda" or tile <= MIN_TILE:
            return False
        self.tile = max(MIN_TILE, tile // 2)
        torch.cuda.empty_cache()
        log.warning("out of GPU memory: retrying with tile %d", self.tile)
        return True

    def _bands(self, img: np.ndarray, out_dtype, gray: bool, skip=None, release: bool = False):
        """Generator of (first output row, finished rows in `out_dtype`), top to bottom (module doc);
        `skip` and `release` as `stream` takes them."""
        s = self.scale
        width, chans = img.shape[1] * s, 1 if gray else 3
        ys = _spans(img.shape[0], self.tile, self.tile_pad, s)
        xs = _spans(img.shape[1], self.tile, self.tile_pad, s)
        if hasattr(self.net, "fix_shape"):  # every window of the image has this one shape
            shape = (ys[0].ctx1 - ys[0].ctx0, xs[0].ctx1 - xs[0].ctx0)
            self.net.fix_shape(shape if len(ys) * len(xs) >= STATIC_TILES else None)
        carry = None  # rows of the previous band that this band still blends into
        for i, y in enumerate(ys):
            band = np.zeros((y.out1 - y.out0, width, chans), np.float32)
            if carry is not None:
                band[: len(carry)] = carry
            for x in xs:
                if skip is not None and skip((y.out0, y.out1), (x.out0, x.out1)):
                    continue
                pred = self._forward(img[y.ctx0:y.ctx1, x.ctx0:x.ctx1], gray)
                pred = pred[y.out0 - s * y.ctx0:y.out1 - s * y.ctx0, x.out0 - s * x.ctx0:x.out1 - s * x.ctx0]
                band[:, x.out0:x.out1] += pred * (y.weight[:, None, None] * x.weight[None, :, None])
            if release and self.net is not None and hasattr(self.net, "release"):
                self.net.release()  # the next expert's band runs in the same memory
            done = band.shape[0] if i == len(ys) - 1 else ys[i + 1].out0 - y.out0
            carry = band[done:].copy()
            for r in range(0, done, FINALIZE_ROWS):  # in chunks: no band-sized temporary
                r1 = min(done, r + FINALIZE_ROWS)
                yield y.out0 + r, _quantize(band[r:r1], out_dtype)
            del band  # before the next band is allocated: one band alive at a time

    def _forward(self, tile: np.ndarray, gray: bool) -> np.ndarray:
        if self.net is not None:
            y = self.net(tile)
            return (y @ np.asarray(GRAY, np.float32))[..., None] if gray else y
        import torch

        from ..device import PRECISIONS

        # HWC numpy permuted to NCHW is already channels_last in memory: no copy on CPU.
        x = torch.from_numpy(np.ascontiguousarray(tile)).permute(2, 0, 1)[None].to(self.device)
        with torch.inference_mode():
            with torch.autocast(self.device.type, dtype=PRECISIONS[self.precision], enabled=self.precision != "fp32"):
                y = self.model(x)
            y = y.float().clamp_(0, 1)[0]
            if gray:
                y = (y * y.new_tensor(GRAY)[:, None, None]).sum(0, keepdim=True)
            return y.permute(1, 2, 0).cpu().numpy()


def _nets():
    from . import esrgan_nets  # PyTorch, imported when PyTorch runs or converts the network

    return esrgan_nets


def choose_backend(device: str, backend: str = "auto", precision: str = "auto",
                   model: str | None = None) -> tuple[str, str]:
    """(backend, precision) that `auto` means on this machine for a shipped `model` (its
    weights.MODELS name; None for another file) (module doc); explicit choices pass, checked where
    they run. On CPU, auto is OpenVINO in bf16 where the CPU has bf16 units, else fp32, or INT8 for
    the models that keep their quality in it (openvino_backend.auto_precision): 0.5x ncnn's time at
    128² in bf16, against 0.6x for PyTorch bf16 (docs/precision-and-speed.md); without OpenVINO
    installed, PyTorch."""
    from . import openvino_backend as ov

    if backend == "auto":
        backend = "openvino" if device == "cpu" and ov.available() else "torch"
    if backend in ("ncnn", "openvino") and device != "cpu":
        raise ValueError(f"backend {backend} runs on CPU, not on {device}")
    if backend == "openvino" and precision == "auto":
        precision = ov.auto_precision(model)
    return backend, precision


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {rgb.shape}")
    return rgb
