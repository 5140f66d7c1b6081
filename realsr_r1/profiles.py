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
PROFILES = ("lite",)  # the full VLM + diffusion profile arrives with its own config


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
    if not (CONFIG_DIR / "full.yaml").is_file():
        return "lite", "auto: the full VLM + diffusion profile is not installed, using lite"
    return "lite", "auto: using lite"


def build_pipeline(cfg: dict, *, device: str = "auto", fp32: bool = False) -> RestorationPipeline:
    policy_cfg = cfg.get("policy") or {}
    restorer_cfg = cfg.get("restorer") or {}
    if policy_cfg.get("type", "analyser") != "analyser":
        raise ConfigError(f"policy type {policy_cfg.get('type')!r} is not available in this build")
    if restorer_cfg.get("type", "realesrgan") != "realesrgan":
        raise ConfigError(f"restorer type {restorer_cfg.get('type')!r} is not available in this build")

    from .policy import AnalyserPolicy
    from .restorers.esrgan import ESRGANRestorer
    from .restorers.lite import LiteStages

    esrgan = ESRGANRestorer.from_pretrained(
        restorer_cfg.get("path"),
        device=device,
        precision="fp32" if fp32 else restorer_cfg.get("precision", "auto"),
        tile=int(restorer_cfg.get("tile", 256)),
        tile_pad=int(restorer_cfg.get("tile_pad", 16)),
    )
    return RestorationPipeline(AnalyserPolicy(), LiteStages(esrgan), profile=cfg.get("profile", "lite"),
                               scale=float(cfg.get("scale", 4)))
