"""Profiles: YAML configs in configs/ that say which policy and restorer a pipeline uses.

A profile is data, not a code branch: `load_config` reads configs/NAME.yaml (or any YAML path),
applies `key.sub=value` overrides from the command line, and `build_pipeline` turns it into a
RestorationPipeline. `choose_profile("auto")` says which profile can run here and why.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from .pipeline import RestorationPipeline

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
PROFILES = ("lite", "full")


class ConfigError(ValueError):
    """A profile or override that cannot be used; the message is one line."""


def load_config(name_or_path: str, overrides: list[str] | None = None) -> dict:
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"no profile config {path.name} (looked in {path.parent})")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path.name}: invalid YAML ({' '.join(str(e).split())})") from None
    return apply_overrides(cfg, overrides or [])


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """`restorer.tile=128` style overrides; values are parsed as YAML scalars."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not KEY=VALUE")
        node = cfg
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return cfg


def choose_profile(requested: str) -> tuple[str, str]:
    """(profile, reason). `auto` takes the best profile this machine can run."""
    if requested != "auto":
        if requested not in PROFILES and not (CONFIG_DIR / f"{requested}.yaml").is_file():
            raise ConfigError(f"unknown profile {requested!r} (available: {', '.join(PROFILES)})")
        return requested, "requested"
    from .download import full_profile_present
    from .weights import default_dir

    if not full_profile_present():
        return "lite", (f"auto: the full profile's weights are not in {default_dir()} "
                        "(python -m realsr_r1.download full), using lite")
    import torch

    if not torch.cuda.is_available():
        return "lite", "auto: the full profile's weights are here but there is no CUDA GPU, using lite"
    return "full", "auto: full profile weights and a CUDA GPU are present"


def _model_path(section: dict, what: str) -> Path:
    """A model folder: an absolute/relative path as given, else a folder under the weights dir."""
    from .weights import WeightsNotFoundError, default_dir

    name = section.get("model")
    if not name:
        raise ConfigError(f"{what}: no `model` set in the profile")
    path = Path(name).expanduser()
    if not path.is_dir():
        path = default_dir() / str(name)
    if not path.is_dir():
        hub = section.get("hub", "the model")
        raise WeightsNotFoundError(f"{what} weights not found at {path}: run `python -m realsr_r1.download full` "
                                   f"or put {hub} there")
    return path


def build_pipeline(cfg: dict, *, device: str = "auto", fp32: bool = False) -> RestorationPipeline:
    policy = build_policy(cfg.get("policy") or {}, device=device, fp32=fp32)
    restorer = build_restorer(cfg.get("restorer") or {}, device=device, fp32=fp32)
    return RestorationPipeline(policy, restorer, profile=cfg.get("profile", "lite"), scale=float(cfg.get("scale", 4)))


def build_policy(policy_cfg: dict, *, device: str = "auto", fp32: bool = False):
    """What writes the chain of thought: the classical analyser, or a VLM (with its adapter)."""
    policy_type = policy_cfg.get("type", "analyser")
    if policy_type == "analyser":
        from .policy import AnalyserPolicy

        return AnalyserPolicy()
    if policy_type != "vlm":
        raise ConfigError(f"unknown policy type {policy_type!r} (analyser, vlm)")
    from .policy import VLMPolicy

    return VLMPolicy.from_pretrained(
        _model_path(policy_cfg, "policy"), device=device, dtype="fp32" if fp32 else policy_cfg.get("dtype", "auto"),
        load_in_4bit=bool(policy_cfg.get("load_in_4bit")), load_in_8bit=bool(policy_cfg.get("load_in_8bit")),
        adapter=policy_cfg.get("adapter"), max_pixels=policy_cfg.get("max_pixels"),
        generation=policy_cfg.get("generation") or {})


def build_restorer(restorer_cfg: dict, *, device: str = "auto", fp32: bool = False):
    """What makes the stage images: Real-ESRGAN (lite) or the diffusion upscaler (full)."""
    restorer_type = restorer_cfg.get("type", "realesrgan")
    if restorer_type == "realesrgan":
        from .restorers.esrgan import ESRGANRestorer
        from .restorers.lite import LiteStages

        return LiteStages(ESRGANRestorer.from_pretrained(
            restorer_cfg.get("path"), device=device,
            precision="fp32" if fp32 else restorer_cfg.get("precision", "auto"),
            tile=int(restorer_cfg.get("tile", 256)), tile_pad=int(restorer_cfg.get("tile_pad", 16))))
    if restorer_type != "diffusion":
        raise ConfigError(f"unknown restorer type {restorer_type!r} (realesrgan, diffusion)")
    from .restorers.diffusion import DiffusionStages

    extra = {"negative_prompt": restorer_cfg["negative_prompt"]} if restorer_cfg.get("negative_prompt") else {}
    return DiffusionStages.from_pretrained(
        _model_path(restorer_cfg, "restorer"), device=device,
        dtype="fp32" if fp32 else restorer_cfg.get("dtype", "auto"),
        rough=restorer_cfg.get("rough", "realesrgan"),
        num_inference_steps=int(restorer_cfg.get("steps", 20)),
        guidance_scale=float(restorer_cfg.get("guidance_scale", 7.5)), **extra,
        color_fix=restorer_cfg.get("color_fix", "wavelet"),
        cpu_offload=bool(restorer_cfg.get("cpu_offload")),
        preview_every=int(restorer_cfg.get("preview_every", 5)),
        strength=float(restorer_cfg.get("strength", 0.8)),
        tile=int(restorer_cfg.get("tile", 128)), tile_overlap=int(restorer_cfg.get("tile_overlap", 32)),
        vae_tile=int(restorer_cfg.get("vae_tile", 512) or 0))
