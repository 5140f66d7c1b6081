"""The one-step restorer's adapter file, in OSEDiff's checkpoint format (one format for the published
weights and for our own RL output).

The file is a `torch.save`d dict (OSEDiff's `OSEDiff_gen.save_model`, read by `OSEDiff_test.load_ckpt`):

    rank_unet, rank_vae                    LoRA ranks (ints)
    unet_lora_encoder_modules              module names of the UNet's down blocks (and conv_in) with a LoRA
    unet_lora_decoder_modules              … of its up blocks (and conv_out)
    unet_lora_others_modules               … of the rest (mid block)
    vae_lora_encoder_modules               module names of the VAE encoder (and quant_conv) with a LoRA
    state_dict_unet                        every UNet parameter whose name holds "lora" or "conv_in":
                                           the LoRA tensors and the whole retrained conv_in
    state_dict_vae                         every VAE parameter whose name holds "lora"

The three UNet lists are three PEFT adapters, `default_encoder`, `default_decoder`, `default_others`,
and the VAE's one `default_encoder`, so the tensor names carry those adapter names
(`…to_q.lora_A.default_encoder.weight`). OSEDiff builds each `LoraConfig(r=rank,
init_lora_weights="gaussian", target_modules=…)` without `lora_alpha`, so PEFT's default alpha 8
applies (a LoRA scale of 8 / rank); we pass it explicitly so a change of PEFT's default cannot change
the strength.

Reading uses `torch.load(weights_only=True)`: the file is ints, lists of strings and tensors, and no
pickled code runs. Every key, rank and tensor is checked against the model it goes into, and a
mismatch is a one-line CorruptWeightsError naming the key.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from ..imageio import new_temp_file
from ..weights import CorruptWeightsError, file_hash

ADAPTER_FILE = "osediff.pkl"  # the file's name where a folder is given (OSEDiff's own name for it)
LORA_ALPHA = 8  # PEFT's default, which OSEDiff's LoraConfig calls rely on (module doc)
UNET_ADAPTERS = {"default_encoder": "unet_lora_encoder_modules", "default_decoder": "unet_lora_decoder_modules",
                 "default_others": "unet_lora_others_modules"}
VAE_ADAPTERS = {"default_encoder": "vae_lora_encoder_modules"}
KEYS = ("rank_unet", "rank_vae", *UNET_ADAPTERS.values(), *VAE_ADAPTERS.values(), "state_dict_unet", "state_dict_vae")
# Which layers OSEDiff's training puts a LoRA on (its initialize_unet / initialize_vae): weights whose
# names hold one of these, never a norm or a bias.
UNET_LAYERS = ("to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut",
               "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj")
VAE_LAYERS = ("conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v", "to_out.0")


def _where(name: str) -> str:
    if "down_blocks" in name or "conv_in" in name:
        return "unet_lora_encoder_modules"
    if "up_blocks" in name or "conv_out" in name:
        return "unet_lora_decoder_modules"
    return "unet_lora_others_modules"


def unet_targets(unet) -> dict[str, list[str]]:
    """{list key: module names} of the UNet's LoRA layers, as OSEDiff's training chooses them."""
    out = {key: [] for key in UNET_ADAPTERS.values()}
    for name, _ in unet.named_parameters():
        if name.endswith(".weight") and "norm" not in name and any(p in name for p in UNET_LAYERS):
            out[_where(name)].append(name[: -len(".weight")])
    return out


def vae_targets(vae) -> list[str]:
    """The VAE encoder's LoRA layers (and quant_conv, not post_quant_conv), as OSEDiff chooses them."""
    names = [n[: -len(".weight")] for n, _ in vae.named_parameters()
             if n.endswith(".weight") and "norm" not in n and "encoder" in n and any(p in n for p in VAE_LAYERS)]
    return names + (["quant_conv"] if getattr(vae, "quant_conv", None) is not None else [])


def _config(rank: int, modules: list[str]):
    from peft import LoraConfig

    return LoraConfig(r=int(rank), lora_alpha=LORA_ALPHA, init_lora_weights="gaussian", target_modules=list(modules))


def add_adapters(unet, vae, rank_unet: int, rank_vae: int | None, lists: dict) -> None:
    """Inject OSEDiff's adapters (named as in the module doc) into `unet` and, with `rank_vae`, `vae`,
    and make them all active. `lists` maps the file's list keys to module names."""
    with warnings.catch_warnings():  # PEFT warns that a second adapter joins the first: that is the layout
        warnings.simplefilter("ignore", UserWarning)
        for name, key in UNET_ADAPTERS.items():
            if lists.get(key):
                unet.add_adapter(_config(rank_unet, lists[key]), adapter_name=name)
        unet.set_adapter([n for n, k in UNET_ADAPTERS.items() if lists.get(k)])
        if rank_vae and lists.get("vae_lora_encoder_modules"):
            vae.add_adapter(_config(rank_vae, lists["vae_lora_encoder_modules"]), adapter_name="default_encoder")
            vae.set_adapter(["default_encoder"])


def new_adapter(unet, vae, rank: int = 4, *, vae_rank: int | None = None) -> dict:
    """Put fresh OSEDiff-layout LoRA adapters on `unet` (and the VAE encoder unless `vae_rank` is 0):
    what training starts from. Returns the module lists."""
    lists = {**unet_targets(unet), "vae_lora_encoder_modules": vae_targets(vae)}
    vae_rank = rank if vae_rank is None else vae_rank
    add_adapters(unet, vae, rank, vae_rank, lists)
    return {"rank_unet": int(rank), "rank_vae": int(vae_rank), **lists}


def _saved(model, keep) -> dict:
    """In fp32 whatever the model's dtype, as OSEDiff's training saves them."""
    import torch

    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items() if keep(k)}


def adapter_state(unet, vae, lists: dict) -> dict:
    """The adapter file's dict for `unet`/`vae` carrying the adapters of `lists` (new_adapter's)."""
    return {**{k: lists[k] for k in KEYS[:6]},
            "state_dict_unet": _saved(unet, lambda k: "lora" in k or "conv_in" in k),
            "state_dict_vae": _saved(vae, lambda k: "lora" in k) if lists.get("rank_vae") else {}}


def save_adapter(state: dict, path: str | Path) -> Path:
    """Write an adapter dict (adapter_state's) to `path` atomically, with the umask's mode."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp_file(path)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def adapter_file(path: str | Path) -> Path:
    """The adapter file itself: `path`, or ADAPTER_FILE inside it when it is a folder (training's output)."""
    path = Path(path)
    return path / ADAPTER_FILE if path.is_dir() else path


def read_adapter(path: str | Path) -> dict:
    """The adapter dict, its keys and their types checked; a one-line CorruptWeightsError otherwise."""
    import torch

    path = adapter_file(path)
    if not path.is_file():
        raise CorruptWeightsError(f"one-step adapter not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - not a torch file, truncated, or pickled code
        raise CorruptWeightsError(f"one-step adapter {path}: not readable as an OSEDiff checkpoint "
                                  f"({' '.join(str(e).split())[:160]})") from None
    if not isinstance(data, dict):
        raise CorruptWeightsError(f"one-step adapter {path}: expected a dict of OSEDiff's keys, got {type(data).__name__}")
    for key in KEYS:
        if key not in data:
            raise CorruptWeightsError(f"one-step adapter {path}: no key {key!r} (OSEDiff's format has {', '.join(KEYS)})")
    for key in ("rank_unet", "rank_vae"):
        if isinstance(data[key], bool) or not isinstance(data[key], int) or data[key] < 0:
            raise CorruptWeightsError(f"one-step adapter {path}: {key} must be a whole number ≥ 0, got {data[key]!r}")
    for key in (*UNET_ADAPTERS.values(), *VAE_ADAPTERS.values()):
        if not isinstance(data[key], (list, tuple)) or not all(isinstance(m, str) for m in data[key]):
            raise CorruptWeightsError(f"one-step adapter {path}: {key} must be a list of module names")
    for key in ("state_dict_unet", "state_dict_vae"):
        if not isinstance(data[key], dict) or not all(isinstance(v, torch.Tensor) for v in data[key].values()):
            raise CorruptWeightsError(f"one-step adapter {path}: {key} must map parameter names to tensors")
    return data


def _copy(model, tensors: dict, keep, path: Path, what: str, rank_key: str, rank: int) -> None:
    """Copy `tensors` into `model`'s parameters selected by `keep`: every one present, same shapes."""
    import torch

    params = {n: p for n, p in model.named_parameters() if keep(n)}
    for name in params:
        if name not in tensors:
            raise CorruptWeightsError(f"one-step adapter {path}: state_dict_{what} has no {name!r}")
    for name, value in tensors.items():
        if name not in params:
            raise CorruptWeightsError(f"one-step adapter {path}: state_dict_{what}[{name!r}] fits no layer of this {what.upper()}")
        if tuple(value.shape) != tuple(params[name].shape):
            hint = f" ({rank_key} is {rank})" if "lora_" in name else ""
            raise CorruptWeightsError(f"one-step adapter {path}: state_dict_{what}[{name!r}] has shape "
                                      f"{tuple(value.shape)}, this {what.upper()} needs {tuple(params[name].shape)}{hint}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(p.dtype))


def load_adapter(unet, vae, path: str | Path, data: dict | None = None) -> dict:
    """Load the OSEDiff-format adapter at `path` into `unet` and `vae` (as OSEDiff_test.load_ckpt does).

    Returns {path, sha256 (12 hex digits), rank_unet, rank_vae} for the sidecar. Any mismatch is a
    one-line CorruptWeightsError naming the key; the models are then unusable (load them again).
    `data`: the file as read_adapter returned it, when the caller has read it already."""
    path = adapter_file(path)
    data = read_adapter(path) if data is None else data
    try:
        add_adapters(unet, vae, data["rank_unet"], data["rank_vae"], data)
    except (ValueError, KeyError, RuntimeError) as e:  # PEFT: a target module this model lacks
        key = next((k for k in KEYS[2:6] if any(str(m) in str(e) for m in data[k][:50])), "the module lists")
        raise CorruptWeightsError(f"one-step adapter {path}: {key} does not fit this model "
                                  f"({' '.join(str(e).split())[:160]})") from None
    _copy(unet, data["state_dict_unet"], lambda n: "lora" in n or "conv_in" in n, path, "unet", "rank_unet",
          data["rank_unet"])
    if data["rank_vae"] and data["vae_lora_encoder_modules"]:
        _copy(vae, data["state_dict_vae"], lambda n: "lora" in n, path, "vae", "rank_vae", data["rank_vae"])
    elif data["state_dict_vae"]:
        raise CorruptWeightsError(f"one-step adapter {path}: state_dict_vae has tensors but rank_vae or "
                                  f"vae_lora_encoder_modules is empty")
    return {"path": str(path), "sha256": file_hash(path)[:12], "rank_unet": data["rank_unet"],
            "rank_vae": data["rank_vae"]}
