"""Profile configs cannot be silently wrong: unknown keys, flags that do not apply, defaults that
disagree, and where the YAML files live."""

import inspect

import pytest
import yaml

from conftest import REPO, photo
from realsr_r1 import infer, profiles
from realsr_r1.profiles import ConfigError, check_profile, load_config


def run_cli(capsys, *args):
    rc = infer.main([*map(str, args), "--quiet"])
    return rc, capsys.readouterr().err


@pytest.fixture
def one_image(tmp_path):
    photo((8, 8)).save(tmp_path / "p.png")
    return tmp_path / "p.png"


@pytest.mark.parametrize("profile,override,words", [
    ("lite", "restorer.tiel=64", "restorer.tiel: unknown key for the realesrgan restorer (did you mean tile?)"),
    ("lite", "restorer.tile_pda=8", "(did you mean tile_pad?)"),
    ("full", "restorer.tiel=64", "restorer.tiel: unknown key for the diffusion restorer (did you mean tile?)"),
    ("full", "restorer.stpes=4", "(did you mean steps?)"),
    ("full", "policy.load_in_4bti=1", "policy.load_in_4bti: unknown key for the vlm policy (did you mean load_in_4bit"),
    ("full", "policy.generation.temprature=1", "policy.generation.temprature: unknown key (did you mean temperature?)"),
    ("lite", "policy.model=x", "policy.model: unknown key for the analyser policy"),
    ("lite", "scael=2", "scael: unknown key (did you mean scale?)"),
    ("lite", "restorer.type=esrgan", "restorer.type: unknown restorer type 'esrgan' (did you mean realesrgan?"),
    ("lite", "restorer.tile=abc", "restorer.tile: expected int, got 'abc'"),
    ("full", "restorer.cpu_offload=3", "restorer.cpu_offload: expected bool, got 3"),
    ("lite", "restorer=5", "restorer: expected a section"),
])
def test_unknown_keys_are_one_line_errors_before_any_model_loads(profile, override, words, one_image, tmp_path,
                                                                 capsys, monkeypatch):
    empty = tmp_path / "no-weights"
    monkeypatch.setenv("REALSR_R1_WEIGHTS", str(empty))
    rc, err = run_cli(capsys, "-i", one_image, "-o", tmp_path / "o", "--profile", profile, "--set", override)
    assert rc == 2 and "Traceback" not in err
    assert err.strip().count("\n") == 0 and err.startswith("error: "), err
    assert words in err, err
    assert not empty.exists()  # nothing was loaded, converted or built


def test_training_restorer_sections_are_checked_too():
    """train.py builds its reward restorer from `restorer.profile` plus overrides via build_restorer."""
    with pytest.raises(ConfigError, match=r"restorer\.stpes: unknown key .*did you mean steps"):
        profiles.check_section("restorer", {"type": "diffusion", "model": "m", "stpes": 2})
    profiles.check_section("restorer", {**load_config("tiny")["restorer"], "steps": 2, "rough": "diffusion"})


def test_every_shipped_profile_is_valid():
    for name in profiles.PROFILES:
        check_profile(load_config(name))


@pytest.mark.parametrize("profile,flag,key", [
    ("lite", ("--tile", "64"), ("tile", 64)),
    ("lite", ("--tile-pad", "8"), ("tile_pad", 8)),
    ("full", ("--tile", "64"), ("tile", 64)),
    ("full", ("--tile-pad", "8"), ("tile_overlap", 8)),  # the diffusion restorer's overlap, in latent px
])
def test_tile_flags_set_the_chosen_restorers_keys(profile, flag, key):
    args = infer.build_parser().parse_args(["-i", "x", "-o", "y", "--profile", profile, *flag])
    _, _, cfg, _ = infer.profile_config(args)
    assert cfg["restorer"][key[0]] == key[1]
    check_profile(cfg)


@pytest.mark.parametrize("profile,flags,key", [
    ("lite", ("--precision", "int8"), ("precision", "int8")),
    ("lite", ("--precision", "fp32", "--fp32"), ("precision", "fp32")),
    ("full", ("--precision", "bf16"), ("dtype", "bf16")),  # the diffusion restorer's keyword
])
def test_the_precision_flag_sets_the_restorers_key(profile, flags, key):
    args = infer.build_parser().parse_args(["-i", "x", "-o", "y", "--profile", profile, *flags])
    _, _, cfg, _ = infer.profile_config(args)
    assert cfg["restorer"][key[0]] == key[1]
    check_profile(cfg)


@pytest.mark.parametrize("profile,flags,message", [
    ("full", ("--precision", "int8"), "--precision int8 runs Real-ESRGAN on OpenVINO"),
    ("lite", ("--precision", "bf16", "--fp32"), "--fp32 and --precision bf16 contradict"),
])
def test_precision_flags_that_cannot_apply_are_one_line_errors(profile, flags, message):
    args = infer.build_parser().parse_args(["-i", "x", "-o", "y", "--profile", profile, *flags])
    with pytest.raises(ConfigError) as e:
        infer.profile_config(args)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_tile_pad_on_the_diffusion_profile_reaches_the_restorer(one_image, tmp_path, capsys, weights_dir):
    """An overlap as large as the tile is refused by the diffusion restorer: the flag is not ignored."""
    rc, err = run_cli(capsys, "-i", one_image, "-o", tmp_path / "o", "--profile", "tiny", "--tile", "16",
                      "--tile-pad", "16")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "tile_overlap" in errors[0], err


def test_adapter_needs_a_vlm(one_image, tmp_path, capsys):
    rc, err = run_cli(capsys, "-i", one_image, "-o", tmp_path / "o", "--profile", "lite", "--adapter", tmp_path)
    assert rc == 2 and "--adapter does not apply to the lite profile" in err, err


def _defaults(kind: str, type_: str) -> dict:
    params = {}
    for fn in profiles.component(kind, type_).parts():
        for p in inspect.signature(fn).parameters.values():
            if p.default is not p.empty:
                params[p.name] = p.default
    return params


def test_profile_yaml_repeats_no_constructor_default():
    """Each default has one home, the constructor: a YAML key equal to it is a second copy that can drift."""
    scale = inspect.signature(profiles.RestorationPipeline).parameters["scale"].default
    for name in profiles.PROFILES:
        cfg = load_config(name)
        assert cfg.get("scale") != scale, f"{name}.yaml scale repeats the default"
        for kind in ("policy", "restorer"):
            section = cfg.get(kind) or {}
            comp = profiles.component(kind, section.get("type", profiles.DEFAULT_TYPE[kind]))
            defaults = _defaults(kind, section.get("type", profiles.DEFAULT_TYPE[kind]))
            for key, value in section.items():
                keyword = comp.renames.get(key, key)
                if keyword in defaults:
                    assert value != defaults[keyword], f"{name}.yaml {kind}.{key} repeats the default {value!r}"
            for key, make in comp.sections.items():
                sub_defaults = {p.name: p.default for p in inspect.signature(make()).parameters.values()}
                for sub, value in (section.get(key) or {}).items():
                    assert value != sub_defaults[sub], f"{name}.yaml {kind}.{key}.{sub} repeats the default"
    from realsr_r1.restorers.diffusion import DEFAULT_NEGATIVE, DiffusionStages

    assert "negative_prompt" not in load_config("full")["restorer"]
    assert inspect.signature(DiffusionStages).parameters["negative_prompt"].default == DEFAULT_NEGATIVE


def test_esrgan_default_tile_is_the_one_used(monkeypatch, weights_dir):
    from realsr_r1.restorers import esrgan

    monkeypatch.setitem(esrgan.DEFAULT_TILE, "cpu", 200)
    monkeypatch.setitem(esrgan.BACKEND_TILE, "ncnn", 96)
    for backend, tile in (("auto", 200), ("torch", 200), ("openvino", 200), ("ncnn", 96)):
        restorer = profiles.build_restorer({**load_config("lite")["restorer"], "backend": backend}, device="cpu")
        assert (restorer.esrgan.tile, restorer.esrgan.tile_pad) == (tile, 16), backend


def test_profiles_ship_inside_the_package():
    import realsr_r1

    pkg = REPO / "realsr_r1"
    assert profiles.CONFIG_DIR.resolve() == (pkg / "configs").resolve()
    assert (REPO / "configs" / "lite.yaml").resolve() == (pkg / "configs" / "lite.yaml").resolve()
    assert sorted(p.name for p in (REPO / "configs").glob("*.yaml")) == sorted(
        p.name for p in profiles.CONFIG_DIR.glob("*.yaml"))
    assert realsr_r1.__file__.startswith(str(pkg))
    for path in profiles.CONFIG_DIR.rglob("*.yaml"):
        yaml.safe_load(path.read_text())  # training and accelerate configs parse too


def test_unknown_profile_names_the_closest(capsys, one_image, tmp_path):
    rc, err = run_cli(capsys, "-i", one_image, "-o", tmp_path / "o", "--profile", "ful")
    assert rc == 2 and "unknown profile 'ful' (did you mean full?" in err, err


def test_seed_on_a_deterministic_profile_says_so(one_image, tmp_path, capsys, weights_dir):
    rc, err = run_cli(capsys, "-i", one_image, "-o", tmp_path / "o", "--profile", "lite", "--seed", "3")
    assert rc == 0 and "note: --seed has no effect on the lite profile" in err, err
    rc, err = run_cli(capsys, "-i", one_image, "-o", tmp_path / "o2", "--profile", "lite")
    assert rc == 0 and "note:" not in err, err


def test_sidecar_names_the_real_esrgan_weights_in_use(weights_dir):
    restorer = profiles.build_restorer({"type": "realesrgan", "path": "realesr-animevideov3"}, device="cpu")
    assert restorer.describe()["restorer"] == "realesr-animevideov3"


def test_the_profiles_page_documents_every_profile_key():
    page = (REPO / "docs" / "profiles.md").read_text(encoding="utf-8")
    section = page[:page.index("## Many GPUs")]
    for kind, type_ in (("policy", "vlm"), ("restorer", "diffusion"), ("restorer", "realesrgan")):
        for key in profiles.valid_keys(profiles.component(kind, type_)):
            if key not in ("type", "model", "hub"):
                forms = (f"`{kind}.{key}`", f"`{key}`", f"`{kind}.{key}.*`")
                assert any(f in section for f in forms), f"{kind}.{key} ({type_}) is not in docs/profiles.md"


def test_exponent_numbers_are_numbers():
    """PyYAML reads `2e-6` as a string (YAML 1.1); a learning rate or threshold written so must be a number."""
    from realsr_r1.profiles import apply_overrides

    cfg = apply_overrides({}, ["trainer.learning_rate=2e-6", "g.mean_above=-1e9", "name=1e", "x=1.5e+3"])
    assert cfg["trainer"]["learning_rate"] == 2e-6 and cfg["g"]["mean_above"] == -1e9
    assert cfg["name"] == "1e" and cfg["x"] == 1500.0


def test_auto_names_the_full_download_only_where_a_gpu_could_run_it(monkeypatch):
    """Without a CUDA GPU the full profile cannot run: its missing 20 GB is not mentioned. With one,
    and without the weights, the reason says how to get them."""
    import torch

    from realsr_r1 import device, download
    from realsr_r1.profiles import choose_profile

    monkeypatch.setattr(download, "full_profile_present", lambda: False)
    monkeypatch.setattr(device, "gpu_possible", lambda: False)
    profile, reason = choose_profile("auto")
    assert profile == "lite" and "download" not in reason and "no CUDA GPU" in reason
    monkeypatch.setattr(device, "gpu_possible", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    profile, reason = choose_profile("auto")
    assert profile == "lite" and "python -m realsr_r1.download full" in reason
    monkeypatch.setattr(download, "full_profile_present", lambda: True)
    assert choose_profile("auto")[0] == "full"
