"""Real-ESRGAN on OpenVINO's CPU runtime, in fp32, bf16 or INT8, with its converted models cached.

Only the network runs here (like ncnn_backend.py): ESRGANRestorer keeps tiling, seam blending,
alpha, grey, 16-bit and outscale, and calls `__call__` on each tile as it calls the PyTorch model.

Conversion. `openvino.convert_model` traces the PyTorch network once (about 13 s for x4plus on
2 cores) into an IR with a dynamic spatial input, [1, 3, H, W], so every tile shape runs on one
model. The IR keeps the weights' fp32 (`save_model(compress_to_fp16=False)`: the biases are fp32
and would round). Precision is then a compile-time choice: `INFERENCE_PRECISION_HINT` f32 or bf16
(bf16 only where the CPU reports a BF16 capability: avx512_bf16 or AMX).

INT8, what `auto` runs for DF2K on CPUs without bf16 units (INT8_BY_DEFAULT). NNCF's post-training
quantisation (`nncf.quantize`, preset MIXED:
symmetric weights, asymmetric activations, which suits leaky-ReLU outputs; no bias correction)
over calibration tiles: by default crops of the photos shipped in data/int8_calibration.npz, or a
user's folder (`calibration=`). What costs quality stays in float (`INT8_KEEP_FLOAT`): the first
convolution, the last two, the upsamplings and the residual adds, so the trunk never passes
through int8 (no residual add reads a quantised tensor: tests/test_openvino_backend.py).
benchmarks/int8_quality.py measures what this costs against fp32 (README: within the bar).
On a CPU without VNNI (AVX2 only) oneDNN runs the INT8 convolutions on its AVX2 kernels: for
x4plus they give the same image to within one 8-bit level on a few values, bit for bit on most
inputs (tests/test_openvino_backend.py, with oneDNN capped at AVX2), at about 0.6x ncnn's time
rather than 0.3x.

Cache. Everything converted lands under `<weights dir>/compiled/<weights stem>-<sha12>/`, one
folder per runtime version and precision of the IR (`openvino-<version>-fp32`, which fp32 and bf16
share, and `...-int8-nncf<version>-<hash of the calibration tiles and the layers kept in float>`):
the IR (model.xml/.bin, meta.json) and OpenVINO's compiled-model cache of the dynamic model
(`CACHE_DIR`, blobs/), which OpenVINO keys by device and compile options (so by the precision hint)
itself; static shapes, one per large image size, are compiled afresh (`_compile`). Compiling from
the IR's path (`Core.compile_model(path, ...)`) lets a cache hit skip reading the model: a second run
loads in about 0.4 s on 2 cores instead of tracing (13 s) and compiling (0.8 s). Folders are written under a temporary
name and renamed into place, so an interrupted conversion leaves nothing that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from .. import weights
from ..device import bf16_capped

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "int8")
HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # INFERENCE_PRECISION_HINT of each precision
CALIBRATION_FILE = "int8_calibration.npz"  # crops of examples/ (RealSRSet, Apache-2.0), data/NOTICE.md
CALIBRATION_TILE = 96  # input pixels: crops of a user's calibration folder
# NNCF ignored-scope patterns over the IR's node names (the torch module paths are kept in them):
# x4plus's first conv, its last two (conv_hr, conv_last, at output resolution), its two nearest
# upsamplings, and its residual adds (x + 0.2·block(x), 93 of them): quantising their inputs sends
# the trunk itself through int8 at every block, and that alone cost 0.058 dB Y-PSNR and 0.0032
# SSIM over the 20 photos of benchmarks/int8_quality.py. conv_up1/up2 run in INT8: in float they
# took 12 % of an INT8 run on VNNI, and with them quantised NNCF no longer merges the trunk's
# quantisers onto the residual path (README, "INT8"); conv_hr in INT8 cost 0.0025 SSIM on the
# photos not calibrated on. The compact net: its first and last convs.
INT8_KEEP_FLOAT = {"RRDBNet": (r".*conv_(first|hr|last)/.*", r".*aten::add/Add(_\d+)?",
                               r".*aten::upsample_nearest2d/Interpolate.*"),
                   "SRVGGNetCompact": (r".*body\.0/.*", r".*body\.34/.*")}
# NNCF's (fast) bias correction shifts each quantised conv's bias to undo its mean error on the
# calibration tiles; on x4plus it made things worse (-0.21 dB Y-PSNR with it, -0.05 without, both
# with the adds still quantised: benchmarks/int8_quality.py), so it is off.
INT8_BIAS_CORRECTION = False
META = "meta.json"  # {"format", "arch", "scale"} of the network, written beside its IR
# What a cached folder holds, by this project's version of the conversion; a folder of another
# format (same runtime, older realsr-r1) is converted again rather than run as if it were this one.
CACHE_FORMAT = 1


# INT8 by default, per expert, where the CPU has no bf16 units: the shipped models whose INT8 model
# (this recipe, calibrated on the shipped crops of other photos) stays within 0.05 dB Y-PSNR and 0.002
# SSIM of fp32 on real camera pairs, on every fold (benchmarks/int8_quality.py --pairs, the 93 DRealSR
# test pairs, none of them used for calibration or for choosing the recipe). DF2K does: +0.037 and
# −0.018 dB, −0.0017 SSIM on each of two folds. x4plus does not: −0.23 dB and −0.0034 SSIM (−0.30
# and −0.16 dB on the two folds, one image −4.5 dB). Neither calibration crops picked for colour and
# texture (−0.22 dB), nor ranges over every tile rather than their mean (−0.46 dB), nor wider or
# narrower ranges, nor any one block kept in float brought it near: the loss is spread over its
# trunk (92 % of the work), which would have to stay in float.
# Where the CPU has bf16 units bf16 is the default for both (within 0.02 dB of fp32 on the pairs).
INT8_BY_DEFAULT = frozenset({"realsr-df2k"})


def auto_precision(model: str | None = None) -> str:
    """What precision `auto` means on this CPU for a shipped `model` (weights.MODELS name, None for
    another file): bf16 where the CPU has bf16 units, else int8 for the models in INT8_BY_DEFAULT
    (where NNCF is installed to calibrate them), else fp32."""
    import importlib.util

    if cpu_has_bf16(_openvino().Core()):
        return "bf16"
    if model in INT8_BY_DEFAULT and importlib.util.find_spec("nncf") is not None:
        return "int8"
    return "fp32"


def available() -> bool:
    """Whether OpenVINO is installed (found, not imported: auto decides before anything loads)."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def _openvino():
    try:
        import openvino as ov
    except ImportError:
        raise ValueError("backend openvino: the OpenVINO runtime is not installed (pip install openvino)") from None
    return ov


def cpu_has_bf16(core) -> bool:
    # The plugin lists BF16 even under an ONEDNN_MAX_CPU_ISA cap that leaves its kernels without it.
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES") and not bf16_capped()


def runtime_version(ov=None) -> str:
    """'2026.4.1' from OpenVINO's long build string: the part that decides the IR and blobs."""
    return (ov or _openvino()).get_version().split("-")[0]


def _traceable(model):
    """The network's forward without the row strips of RRDBNet's tail: tracing would freeze that
    Python loop to one input height. (Splitting the IR there, to run the 4x convs over strips as
    RRDBNet does, was tried: OpenVINO's peak for a 288² tile stayed at 1.2 GB in fp32.)"""
    import torch
    import torch.nn.functional as F

    from .esrgan_nets import RRDBNet

    if not isinstance(model, RRDBNet):
        return model  # SRVGGNetCompact's forward has no shape-dependent loop

    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            m = self.m
            feat = m.conv_first(x)
            feat = feat + m.conv_body(m.body(feat))
            feat = F.leaky_relu(m.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
            feat = F.leaky_relu(m.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
            return m.conv_last(F.leaky_relu(m.conv_hr(feat), 0.2))

    return Plain().eval()


def _complete(folder: Path) -> bool:
    """A finished cache folder of this CACHE_FORMAT (an IR whose own damage compile_model reports)."""
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == CACHE_FORMAT and (folder / "model.xml").is_file()


def _publish(tmp: Path, final: Path) -> None:
    """Rename a finished folder into place, moving a stale one (another format, no meta) aside
    first; if another process won the race with a complete folder, keep theirs."""
    from ..imageio import new_temp_dir

    if final.exists() and not _complete(final):
        stale = new_temp_dir(final)
        try:
            os.replace(final, stale / "old")
        except FileNotFoundError:  # another process moved it already
            pass
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError:
        if not _complete(final):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def calibration_tiles(folder: str | Path | None = None, limit: int = 64) -> tuple[list[np.ndarray], str]:
    """(NCHW float32 tiles in [0, 1], a short hash of them) for INT8 calibration: the shipped crops,
    or CALIBRATION_TILE² crops (corners and centre) of the images in `folder`."""
    if folder is None:
        from importlib.resources import files

        with (files("realsr_r1") / "data" / CALIBRATION_FILE).open("rb") as f:
            crops = list(np.load(f)["crops"])
    else:
        from ..imageio import ImageReadError, read_image

        folder = Path(folder).expanduser()
        paths = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
        crops, t = [], CALIBRATION_TILE
        for p in paths:
            try:
                rgb = np.round(read_image(p).rgb * 255).astype(np.uint8)  # as the shipped crops
            except ImageReadError:
                continue  # not an image: calibration uses the rest
            h, w = rgb.shape[:2]
            if min(h, w) < t:
                continue
            for y, x in ((0, 0), (0, w - t), (h - t, 0), (h - t, w - t), ((h - t) // 2, (w - t) // 2)):
                crops.append(rgb[y:y + t, x:x + t])
        if not crops:
            raise ValueError(f"calibration {folder}: no readable image of at least {t}x{t} pixels there")
    crops = crops[:limit]
    digest = hashlib.sha256(b"".join(c.tobytes() for c in crops)).hexdigest()[:12]
    return [np.ascontiguousarray(c.transpose(2, 0, 1)[None], np.float32) / 255 for c in crops], digest


class OpenVINONet:
    """One converted Real-ESRGAN network compiled for OpenVINO's CPU plugin; `scale` as the model's."""

    def __init__(self, load_model, weights_file: Path, precision: str = "fp32", calibration: str | Path | None = None,
                 cache_root: str | Path | None = None, threads: int | None = None, sha256: str | None = None):
        """`load_model()` gives the PyTorch network, called only when no converted IR is cached;
        `sha256`: the weights file's, if the caller has it already."""
        ov = _openvino()
        if precision not in PRECISIONS:
            raise ValueError(f"backend openvino: unknown precision {precision!r} (use {', '.join(PRECISIONS)})")
        self.core = ov.Core()
        if precision == "bf16" and not cpu_has_bf16(self.core):
            raise ValueError("backend openvino: this CPU has no bf16 units (avx512_bf16 or AMX); use fp32 or int8")
        self.precision = precision
        self.weights_file = Path(weights_file)
        root = Path(cache_root) if cache_root is not None else weights.default_dir() / "compiled"
        self.home = root / f"{self.weights_file.stem}-{(sha256 or weights.file_hash(self.weights_file))[:12]}"
        runtime = runtime_version(ov)
        fp32_dir = self._ensure(self.home / f"openvino-{runtime}-fp32", lambda d: self._convert(ov, load_model(), d))
        folder = fp32_dir
        if precision == "int8":
            from importlib.metadata import version  # not `import nncf`: that takes 2 s and imports torch

            tiles, digest = calibration_tiles(calibration)
            keep = INT8_KEEP_FLOAT.get(json.loads((fp32_dir / META).read_text())["arch"], ())
            recipe_key = [digest, list(keep)] + ([] if INT8_BIAS_CORRECTION else ["no-bc"])
            recipe = hashlib.sha256(json.dumps(recipe_key).encode()).hexdigest()[:12]
            folder = self._ensure(self.home / f"openvino-{runtime}-int8-nncf{version('nncf')}-{recipe}",
                                  lambda d: self._quantize(ov, fp32_dir, tiles, keep, d))
        self.folder = folder
        self.config = {"INFERENCE_PRECISION_HINT": HINTS[precision], "PERFORMANCE_HINT": "LATENCY",
                       "CACHE_DIR": str(folder / "blobs")}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        self.static_shape: tuple[int, int] | None = None  # ESRGANRestorer's window for this image (fix_shape)
        try:
            self.scale = int(json.loads((folder / META).read_text())["scale"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise self._corrupt(e) from None
        self._compile(None)  # the dynamic model, now: a damaged cache fails here, not on the first image

    def _corrupt(self, e: Exception) -> Exception:
        return weights.CorruptWeightsError(f"{self.folder}: OpenVINO cannot load this cached model "
                                           f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                                           f"delete the folder to convert again")

    def _compile(self, shape: tuple[int, int] | None) -> None:
        """Hold one compiled model: the dynamic [1, 3, H, W] one (shape None) or one reshaped to a
        static input. Each holds its own repacked weights, so the other is dropped first. Static
        models are not cached: their shape follows the image's size, and a blob per size (20-70 MB)
        would fill the disk."""
        self.compiled = self.request = None
        try:
            if shape is None:
                # From a path, OpenVINO hashes the file for its compiled-model cache, not the graph.
                self.compiled = self.core.compile_model(str(self.folder / "model.xml"), "CPU", self.config)
            else:
                model = self.core.read_model(str(self.folder / "model.xml"))
                model.reshape([1, 3, *shape])
                config = {k: v for k, v in self.config.items() if k != "CACHE_DIR"}
                self.compiled = self.core.compile_model(model, "CPU", config)
        except (RuntimeError, OSError, ValueError) as e:
            raise self._corrupt(e) from None
        self.shape = shape
        self.request = self.compiled.create_infer_request()

    def fix_shape(self, shape: tuple[int, int] | None) -> None:
        """Tiles of exactly this input shape (height, width) run on a model compiled for it (the
        others on the dynamic one), until another shape is fixed. ESRGANRestorer gives the window
        that every tile of a large image shares (esrgan._spans, STATIC_TILES), None otherwise.
        Static shapes let the CPU plugin plan its buffers: a 276² fp32 tile peaks at 0.63 GB of
        them instead of 0.97 GB (README, "Precision and speed")."""
        self.static_shape = tuple(shape) if shape else None

    @staticmethod
    def _ensure(final: Path, build) -> Path:
        if _complete(final):
            return final
        from ..imageio import new_temp_dir  # next to `final`, with the usual mode for the umask

        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = new_temp_dir(final)
        try:
            build(tmp)
            _publish(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    @staticmethod
    def _convert(ov, model, dest: Path) -> None:
        import torch

        log.info("converting %s to OpenVINO (once, cached in %s)", type(model).__name__, dest.parent)
        with torch.inference_mode(False), torch.no_grad():
            ir = ov.convert_model(_traceable(model.float()), example_input=torch.rand(1, 3, 32, 32), input=[1, 3, -1, -1])
        ov.save_model(ir, str(dest / "model.xml"), compress_to_fp16=False)
        (dest / META).write_text(json.dumps({"format": CACHE_FORMAT, "arch": type(model).__name__, "scale": model.scale}))

    @staticmethod
    def _quantize(ov, fp32_dir: Path, tiles: list[np.ndarray], keep, dest: Path) -> None:
        import nncf

        from ..quiet import hushed, settle

        settle("nncf")  # it sets its logger to INFO when imported: a line per operation it leaves in float

        log.warning("calibrating INT8 for %s on %d tiles: once, 1.5-4 min on 2 cores, cached in %s "
                    "(--precision fp32 runs without it)", dest.parent.name.rsplit("-", 1)[0], len(tiles), dest.parent)
        ir = ov.Core().read_model(str(fp32_dir / "model.xml"))
        with hushed():  # its progress bars go to stdout, where a run's output may be piped
            q = nncf.quantize(ir, nncf.Dataset(tiles), subset_size=len(tiles), preset=nncf.QuantizationPreset.MIXED,
                              ignored_scope=nncf.IgnoredScope(patterns=list(keep), validate=False),
                              advanced_parameters=nncf.AdvancedQuantizationParameters(
                                  disable_bias_correction=not INT8_BIAS_CORRECTION))
        ov.save_model(q, str(dest / "model.xml"))
        shutil.copyfile(fp32_dir / META, dest / META)

    def release(self) -> None:
        """Give back the intermediate buffers, which are sized by the largest tile run so far and
        stay allocated otherwise (`CompiledModel.release_memory`): ESRGANRestorer calls this after
        each image, so that the encoder of a large output does not need memory on top of them."""
        self.compiled.release_memory()

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        """HxWx3 float32 in [0, 1] → (sH)x(sW)x3 float32 in [0, 1]."""
        x = np.ascontiguousarray(tile.transpose(2, 0, 1)[None], np.float32)
        want = x.shape[2:] if x.shape[2:] == self.static_shape else None
        if want != self.shape:
            self._compile(want)  # from the blob cache after the first time: ~0.35 s on 2 cores
        y = self.request.infer({0: x})[0][0]  # a copy (share_outputs=False): safe across calls
        return np.clip(y.transpose(1, 2, 0), 0, 1)
