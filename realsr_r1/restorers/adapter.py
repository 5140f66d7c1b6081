"""A LoRA adapter of the diffusion upscaler's UNet: saved by training, fused in by inference.

The folder is diffusers' LoRA format, so `StableDiffusionUpscalePipeline.load_lora_weights` reads
it as it is:

    pytorch_lora_weights.safetensors   the UNet's LoRA tensors (keys `unet.…lora.down/up.weight`),
                                       with the LoraConfig in the file's `lora_adapter_metadata`
    restorer_adapter.json              what made it (training config, step, base model)

The LoraConfig travels in the file because without it diffusers guesses the config from the
tensors: the rank from their shapes, but the alpha (the LoRA scale alpha / rank) only from
`network_alphas`, which PEFT state dicts do not have, so an adapter trained with alpha ≠ rank
would load at the wrong strength. With the metadata, diffusers builds `LoraConfig(**metadata)`
(`utils/peft_utils.py: _create_lora_config`). The adapter's name is not part of the file, so one
trained under any name loads the same.

An adapter is trained on one stage (`config.stage` in its info, e.g. final) with the stages before
it made by the base weights, so inference applies it to that stage alone: the LoRA layers stay and
the restorer turns them on for that stage only (DiffusionStages). An adapter without a stage (made
elsewhere) applies to every stage: it is fused into the UNet's weights and its LoRA layers removed,
so the UNet runs as fast as the base one (fp16/bf16 pipelines fuse in their own dtype).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import warnings
from pathlib import Path

from ..imageio import atomic_write_text, new_temp_dir
from ..weights import CorruptWeightsError, file_hash

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
INFO_NAME = "restorer_adapter.json"
ADAPTER_NAME = "restorer"  # the name it is loaded under in inference (any name works: it is fused away)


@contextlib.contextmanager
def _quiet():
    """diffusers and PEFT log a mismatch in many lines (and warn that the adapter has no text encoder
    part); the check after loading turns a mismatch into our one-line error instead."""
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "…"


def save_restorer_adapter(unet, folder: str | Path, *, adapter_name: str = "default",
                          info: dict | None = None) -> Path:
    """Write `unet`'s LoRA adapter `adapter_name` (from `unet.add_adapter`) and `info` to `folder`.

    The files are written in a temp folder beside it first: a new folder appears complete or not
    at all; an existing one has each file replaced atomically, the weights before the info."""
    from diffusers import StableDiffusionUpscalePipeline
    from peft.utils import get_peft_model_state_dict

    folder = Path(folder)
    config = getattr(unet, "peft_config", {}).get(adapter_name)
    if config is None:
        raise ValueError(f"the UNet has no LoRA adapter named {adapter_name!r} "
                         f"(it has: {', '.join(getattr(unet, 'peft_config', {})) or 'none'})")
    # PEFT's own key names (`…to_q.lora_A.weight`), which `load_lora_weights` reads as they are. Not
    # `convert_state_dict_to_diffusers` (as diffusers' train_text_to_image_lora.py does): it renames
    # only the attention projections (to_q/k/v/out → lora.down/up) and leaves proj_in/proj_out in
    # PEFT names, and diffusers' loader then takes the file for the old format and drops the rest.
    layers = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    metadata = json.loads(json.dumps(config.to_dict(), default=_jsonable))  # sets → lists, enums → str
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp_dir(folder)
    try:
        StableDiffusionUpscalePipeline.save_lora_weights(
            tmp, unet_lora_layers={k: v.detach().contiguous() for k, v in layers.items()},
            unet_lora_adapter_metadata=metadata)
        # safetensors' save_file may write it owner-only; the temp folder has the umask's mode
        os.chmod(tmp / WEIGHTS_NAME, tmp.stat().st_mode & 0o666)
        atomic_write_text(tmp / INFO_NAME, json.dumps(info or {}, indent=2, ensure_ascii=False, default=str) + "\n")
        if not folder.exists():
            os.rename(tmp, folder)
        else:
            for name in (WEIGHTS_NAME, INFO_NAME):
                os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _jsonable(value):
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value, key=str)
    return str(value)


def read_info(folder: str | Path) -> dict:
    """The `info` saved beside an adapter ({} when there is none or it is unreadable)."""
    try:
        info = json.loads((Path(folder) / INFO_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def check_adapter_folder(folder: str | Path) -> Path:
    """The adapter's weights file, or a one-line CorruptWeightsError saying what the folder is."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CorruptWeightsError(f"restorer adapter not found: {folder}")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        hint = (f"; it holds a full pipeline (model_index.json): use --set restorer.model={folder}"
                if (folder / "model_index.json").is_file() else "")
        raise CorruptWeightsError(f"restorer adapter {folder}: no {WEIGHTS_NAME}, so not a LoRA adapter{hint}")
    return weights


def adapter_stage(folder: str | Path) -> str | None:
    """The stage the adapter was trained on (its info's config.stage), or None."""
    from ..cot import STAGES

    config = read_info(folder).get("config")
    stage = config.get("stage") if isinstance(config, dict) else None
    return stage if stage in STAGES else None


def load_restorer_adapter(pipe, folder: str | Path) -> dict:
    """Load the adapter in `folder` into `pipe.unet` as ADAPTER_NAME; one without a stage is fused
    and its LoRA layers dropped (module doc).

    Returns {path, sha256, stage} (12 hex digits of the weights file) for describe() and the sidecar.
    Call it before the pipeline is moved or cast: the LoRA tensors take the UNet's dtype and
    device when they are injected, and the fusing happens there."""
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    weights = check_adapter_folder(folder)
    sha256 = file_hash(weights)[:12]  # of the bytes about to be read
    try:
        with safe_open(str(weights), framework="pt") as f:
            keys = list(f.keys())
        if not keys or not all(k.startswith("unet.") and "lora" in k for k in keys):
            raise ValueError(f"its tensors are not all UNet LoRA weights (e.g. {next(iter(keys), 'none')})")
        with _quiet():
            pipe.load_lora_weights(str(folder), weight_name=WEIGHTS_NAME, adapter_name=ADAPTER_NAME)
        # diffusers only warns about keys that match no layer: every tensor of the file must have landed.
        loaded = get_peft_model_state_dict(pipe.unet, adapter_name=ADAPTER_NAME)
        if len(loaded) != len(keys):
            raise ValueError(f"{len(keys)} tensors in the file, {len(loaded)} fit this UNet's layers")
    except Exception as e:  # noqa: BLE001 - a mismatched or broken adapter: one line, not a traceback
        if hasattr(pipe.unet, "peft_config"):
            with contextlib.suppress(Exception):
                pipe.unload_lora_weights()  # leave the pipeline as it was
        raise CorruptWeightsError(f"restorer adapter {folder}: does not fit this upscaler's UNet "
                                  f"({_line(e)})") from e
    stage = adapter_stage(folder)
    if stage is not None:  # the restorer turns it on for that stage (DiffusionStages._weights_for)
        return {"path": str(folder), "sha256": sha256, "stage": stage}
    pipe.fuse_lora(components=["unet"], lora_scale=1.0, adapter_names=[ADAPTER_NAME])
    # fuse_lora merges each LoRA delta into its base layer's weight in place (peft `LoraLayer.merge`);
    # unload_lora_weights → `ModelMixin.unload_lora` → `recurse_remove_peft_layers` then puts each
    # base layer (`get_base_layer()`), fused weights and all, back in place of its LoRA wrapper.
    pipe.unload_lora_weights()
    return {"path": str(folder), "sha256": sha256, "stage": None}
