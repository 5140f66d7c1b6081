"""The user's files: no output replaces an input, resume keeps only results made with the same
settings, --overwrite leaves no stale file, and the CLI conveniences (single files, --recursive,
--model, format notes, help) of `python -m realsr_r1.infer`."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from conftest import photo
from realsr_r1 import infer, weights
from realsr_r1.outputs import settings_difference


def run_cli(capsys, *args):
    rc = infer.main([*map(str, args), "--quiet"])
    return rc, capsys.readouterr().err


def digest(folder):
    """Every file under `folder` with its content hash: inputs must come out byte-identical."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def photos(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    photo((12, 10)).save(src / "a.png")
    photo((10, 12)).convert("RGB").save(src / "b.jpg", quality=90)
    return src


@pytest.mark.parametrize("case", ["in place", "single file in place", "suffix and extension", "file onto itself"])
def test_an_output_over_an_input_is_refused_before_any_work(photos, capsys, weights_dir, case):
    before = digest(photos)
    if case == "suffix and extension":  # a.png → a_sr.jpg, which is an input
        photo((10, 10)).save(photos / "a_sr.jpg", quality=90)
        before = digest(photos)
        args = ("-i", photos, "-o", photos, "--suffix", "sr", "--ext", "jpg")
        colliding = "a_sr.jpg"
    elif case == "in place":
        args, colliding = ("-i", photos, "-o", photos), "a.png"
    elif case == "single file in place":
        args, colliding = ("-i", photos / "b.jpg", "-o", photos), "b.jpg"
    else:
        args, colliding = ("-i", photos / "a.png", "-o", photos / "a.png"), "a.png"
    rc, err = run_cli(capsys, *args)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and f"{colliding}:" in lines[0], err
    assert "overwrite" in lines[0]
    assert digest(photos) == before  # byte-identical, and nothing was added


def test_in_place_with_a_suffix_never_reads_its_own_results_back(photos, capsys, weights_dir):
    before = digest(photos)
    rc, err = run_cli(capsys, "-i", photos, "-o", photos, "--suffix", "sr")
    assert rc == 0 and "restored 2" in err
    rc, err = run_cli(capsys, "-i", photos, "-o", photos, "--suffix", "sr")
    assert rc == 0 and "restored 0, skipped 2" in err  # a_sr.png is not a new input
    assert {k: v for k, v in digest(photos).items() if k in before} == before
    assert not list(photos.glob("*_sr_sr*"))


def test_a_nested_output_inside_the_input_is_not_walked(photos, capsys, weights_dir):
    before = digest(photos)
    out = photos / "restored"
    for _ in range(2):
        rc, err = run_cli(capsys, "-i", photos, "-o", out, "--recursive")
        assert rc == 0, err
    assert "restored 0, skipped 2" in err
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "a.png", "b.jpg", "b.json"]
    assert {k: v for k, v in digest(photos).items() if not k.startswith("restored/")} == before


def test_resume_counts_a_result_as_done_only_with_the_same_settings(photos, tmp_path, capsys, weights_dir):
    out = tmp_path / "out"
    rc, _ = run_cli(capsys, "-i", photos, "-o", out)
    assert rc == 0
    made = digest(out)
    rc, err = run_cli(capsys, "-i", photos, "-o", out, "--outscale", "3.5")
    assert rc == 1
    assert "2 made with other settings (scale 4 → 3.5), kept: a.png, b.jpg; --overwrite to redo them" in err
    assert digest(out) == made  # kept, not silently replaced
    for flags, what in [(("--ext", "png"), "ext auto → png"), (("--model", "animevideov3"),
                                                                       "weights realesrgan-x4plus.safetensors ("),
                        (("--profile", "tiny"), "profile lite → tiny")]:
        rc, err = run_cli(capsys, "-i", photos, "-o", out, *flags)
        assert rc == 1 and "made with other settings" in err and what in err, (flags, err)
    # The same settings written out (a default, the same scale) still count as done.
    rc, err = run_cli(capsys, "-i", photos, "-o", out, "--set", "restorer.tile_pad=16", "--outscale", "4")
    assert rc == 0 and "skipped 2 (already done)" in err and "other settings" not in err
    rc, err = run_cli(capsys, "-i", photos, "-o", out, "--outscale", "3.5", "--overwrite")
    assert rc == 0 and "restored 2" in err
    assert Image.open(out / "a.png").size == (42, 35)
    assert json.loads((out / "a.json").read_text())["settings"]["scale"] == 3.5


def test_settings_difference_names_each_changed_key():
    base = {"profile": "tiny", "scale": 4.0, "ext": "auto", "seed": 0, "config": {"restorer": {"steps": 2}}}
    assert settings_difference(base, json.loads(json.dumps(base))) is None
    assert settings_difference(base, {**base, "seed": 7}) == "seed 0 → 7"
    assert settings_difference(base, {**base, "config": {"restorer": {"steps": 4}}}) == "restorer.steps 2 → 4"
    assert settings_difference(base, {**base, "config": {"restorer": {"steps": 2, "preview_every": 1}}}) is None
    assert "older version" in settings_difference(None, base)


def test_overwrite_removes_the_stale_stage_images_of_an_earlier_run(photos, tmp_path, capsys, weights_dir):
    out = tmp_path / "out"
    rc, _ = run_cli(capsys, "-i", photos / "a.png", "-o", out, "--save-stages")
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "a.png", "a_final.png", "a_middle.png", "a_rough.png"]
    (out / "notes.txt").write_text("mine")  # not ours: never touched
    rc, err = run_cli(capsys, "-i", photos / "a.png", "-o", out, "--ext", "jpg", "--overwrite")
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["a.jpg", "a.json", "notes.txt"]
    side = json.loads((out / "a.json").read_text())
    assert side["output"] == "a.jpg" and all(s["file"] is None for s in side["stages"].values())


def test_save_stages_does_not_change_the_chain_of_thought(photos, tmp_path, capsys, weights_dir):
    cots = []
    for flags in [(), ("--save-stages",)]:
        out = tmp_path / f"out{len(cots)}"
        assert run_cli(capsys, "-i", photos / "a.png", "-o", out, *flags)[0] == 0
        side = json.loads((out / "a.json").read_text())
        cots.append(side["chain_of_thought"])
    assert cots[0] == cots[1] and "<final_image>48x40</final_image>" in cots[0]
    assert side["stages"]["final"]["file"] == "a_final.png" and side["plan"]["images"]["final"] == "48x40"


def test_the_sidecar_records_the_weights_that_ran(photos, tmp_path, capsys, weights_dir):
    hashes = {}
    for model, file in [("animevideov3", "realesr-animevideov3.safetensors"),
                        ("x4plus", "realesrgan-x4plus.safetensors")]:
        out = tmp_path / model
        assert run_cli(capsys, "-i", photos / "a.png", "-o", out, "--model", model)[0] == 0
        side = json.loads((out / "a.json").read_text())
        assert side["restorer"] == file.removesuffix(".safetensors")
        assert side["weights"]["file"] == file
        assert side["weights"]["sha256"] == weights.file_hash(weights_dir / file)[:12]
        hashes[model] = side["weights"]["sha256"]
    assert hashes["animevideov3"] != hashes["x4plus"]


def test_model_does_not_apply_to_a_diffusion_profile(photos, tmp_path, capsys):
    rc, err = run_cli(capsys, "-i", photos, "-o", tmp_path / "o", "--profile", "tiny", "--model", "x4plus")
    assert rc == 2 and err.strip().count("\n") == 0 and "--model" in err and "diffusion" in err


def test_a_single_file_output_names_the_file(photos, tmp_path, capsys, weights_dir):
    out = tmp_path / "res" / "out.png"
    rc, err = run_cli(capsys, "-i", photos / "b.jpg", "-o", out)
    assert rc == 0, err
    assert out.is_file() and Image.open(out).format == "PNG" and Image.open(out).size == (40, 48)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.json", "out.png"]
    side = json.loads((out.parent / "out.json").read_text())
    assert side["input"] == "b.jpg" and side["output"] == "out.png"
    rc, err = run_cli(capsys, "-i", photos / "b.jpg", "-o", out)
    assert rc == 0 and "skipped 1" in err
    for args, words in [(("-i", photos, "-o", tmp_path / "x.png"), "names a file"),
                        (("-i", photos / "b.jpg", "-o", tmp_path / "x.png", "--ext", "jpg"), "contradicts"),
                        (("-i", photos / "b.jpg", "-o", tmp_path / "x.png", "--suffix", "s"), "--suffix")]:
        rc, err = run_cli(capsys, *args)
        assert rc == 2 and err.strip().count("\n") == 0 and words in err, err
    assert not (tmp_path / "x.png").exists()


def test_recursive_mirrors_the_folder_tree(tmp_path, capsys, weights_dir):
    src = tmp_path / "in"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / ".hidden").mkdir()
    for rel in ["a.png", "sub/b.png", "sub/deeper/c.png", ".hidden/d.png"]:
        photo((8, 8)).save(src / rel)
    out = tmp_path / "out"
    rc, err = run_cli(capsys, "-i", src, "-o", out, "--recursive")
    assert rc == 0 and "restored 3" in err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == \
        ["a.png", "sub/b.png", "sub/deeper/c.png"]
    assert json.loads((out / "sub/deeper/c.json").read_text())["input"] == "sub/deeper/c.png"
    assert run_cli(capsys, "-i", src, "-o", out, "--recursive")[1].count("skipped 3") == 1
    only_folders = tmp_path / "nested"
    (only_folders / "x").mkdir(parents=True)
    photo((8, 8)).save(only_folders / "x" / "e.png")
    rc, err = run_cli(capsys, "-i", only_folders, "-o", tmp_path / "o2")
    assert rc == 2 and "--recursive" in err


def test_jpg_for_alpha_or_16_bit_writes_png_and_says_so_once(tmp_path, capsys, weights_dir):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.png", "b.png"):
        im = photo((8, 8), mode="RGBA")
        im.putalpha(Image.fromarray(np.tile(np.arange(8, dtype=np.uint8) * 30, (8, 1))))
        im.save(src / name)
    photo((8, 8)).save(src / "c.png")
    out = tmp_path / "out"
    rc, err = run_cli(capsys, "-i", src, "-o", out, "--ext", "jpg")
    assert rc == 0, err
    notes = [l for l in err.splitlines() if "written as PNG" in l]
    assert len(notes) == 1 and notes[0].startswith("note: a.png: JPEG cannot hold alpha"), err
    assert sorted(p.name for p in out.glob("*.*g")) == ["a.png", "b.png", "c.jpg"]
    assert any("written as PNG" in n for n in json.loads((out / "b.json").read_text())["notes"])


def test_help_shows_every_default_and_the_exit_codes(capsys):
    with pytest.raises(SystemExit) as exit_:
        infer.main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for words in ["default auto", "full", "tiny", "default 256 on CPU, 512 on CUDA", "default 16", "x4plus",
                  "animevideov3", "--recursive", "exit status: 0 when every file succeeded, 1 when some failed",
                  "2 for a usage error", "default 4"]:
        assert words in text, words


def test_full_profile_without_a_cuda_gpu_says_so(photos, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, err = run_cli(capsys, "-i", photos, "-o", tmp_path / "o", "--profile", "full")
    assert rc == 2 and err.strip().count("\n") == 0
    assert "needs a CUDA GPU" in err and "--device cpu" in err
    assert not (tmp_path / "o").exists()


def test_every_usage_error_exits_2(photos, tmp_path, capsys):
    for args in [("-i", photos, "-o", tmp_path / "o", "--ext", "gif"),  # argparse's own
                 ("-i", photos, "-o", tmp_path / "o", "--set", "restorer.tiel=3"),
                 ("-i", tmp_path / "missing", "-o", tmp_path / "o")]:
        try:
            rc = infer.main([*map(str, args), "--quiet"])
        except SystemExit as e:
            rc = e.code
        assert rc == 2, args
    capsys.readouterr()
    assert not (tmp_path / "o").exists()


def test_two_inputs_whose_results_would_share_a_file_are_refused(photos, tmp_path, capsys, weights_dir):
    photo((8, 8)).save(photos / "a_rough.png")  # a.png's stage image would be a_rough.png's result
    rc, err = run_cli(capsys, "-i", photos, "-o", tmp_path / "out", "--save-stages")
    assert rc == 2 and err.strip().count("\n") == 0 and "would both be written" in err, err
    assert not (tmp_path / "out").exists()
    assert run_cli(capsys, "-i", photos, "-o", tmp_path / "out")[0] == 0  # without stage images they do not


def test_resume_redoes_deleted_stage_images_and_knows_fp32(photos, tmp_path, capsys, weights_dir):
    out = tmp_path / "out"
    assert run_cli(capsys, "-i", photos / "a.png", "-o", out, "--save-stages")[0] == 0
    (out / "a_middle.png").unlink()
    rc, err = run_cli(capsys, "-i", photos / "a.png", "-o", out, "--save-stages")
    assert rc == 0 and "restored 1" in err and (out / "a_middle.png").is_file()
    precision = json.loads((out / "a.json").read_text())["precision"]
    rc, err = run_cli(capsys, "-i", photos / "a.png", "-o", out, "--save-stages", "--fp32")
    if precision == "fp32":  # a CPU without bf16: auto is fp32 already
        assert rc == 0 and "skipped 1" in err
    else:
        assert rc == 1 and f"precision {precision} → fp32" in err
