"""`python -m realsr_r1.infer` end to end with the lite profile and the real Real-ESRGAN weights."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, photo
from realsr_r1 import infer
from realsr_r1.cot import matches_format, parse_cot
from realsr_r1.imageio import read_image
from realsr_r1.pipeline import (
    AnalysisReady,
    Done,
    Failed,
    PlanUpdate,
    StageImage,
    StageStarted,
    TextDelta,
    stage_sizes,
)
from realsr_r1.restorers.esrgan import choose_backend
from realsr_r1.restorers.lite import DEFAULT_EXPERTS
from realsr_r1.profiles import build_pipeline, load_config


@pytest.fixture(scope="module")
def lite(weights_dir):
    return build_pipeline(load_config("lite"), device="cpu")


def run_cli(capsys, *args):
    rc = infer.main([*map(str, args), "--quiet"])
    return rc, capsys.readouterr().err


def test_every_awkward_input(bad_inputs, tmp_path, capsys, weights_dir):
    folder, expect = bad_inputs
    out = tmp_path / "out"
    rc, err = run_cli(capsys, "--input", folder, "--output", out, "--max-pixels", 10_000_000)
    assert rc == 1  # some inputs are broken
    assert "Traceback" not in err
    error_lines = [l for l in err.splitlines() if l.startswith("error:")]
    for name, (kind, *rest) in expect.items():
        stem = name.rsplit(".", 1)[0]
        if kind == "error":
            lines = [l for l in error_lines if f"{name}:" in l]
            assert len(lines) == 1 and rest[0] in lines[0], (name, err)
            assert not list(out.glob(f"{stem}.*")), name
            continue
        (w, h), mode = rest
        outs = [p for p in out.glob(f"{stem}.*") if p.suffix != ".json"]
        assert len(outs) == 1, (name, outs)
        result = read_image(outs[0])
        assert result.size == (w, h), name
        if mode == "L":
            assert result.mode == "L"
        if mode.startswith("RGBA"):
            assert result.alpha is not None, name
        if mode == "RGBA16":
            assert result.bit_depth == 16 and outs[0].suffix == ".png"
            assert np.allclose(result.alpha, 40000 / 65535, atol=0.02)
        if name == "rgba.png":  # transparent left half stays transparent, the rest opaque
            assert result.alpha[:, :24].max() < 0.1 and result.alpha[:, 40:].min() > 0.9
        side = json.loads((out / f"{stem}.json").read_text(encoding="utf-8"))
        assert side["output"] == outs[0].name and side["input"] == name
        plan = parse_cot(side["chain_of_thought"])
        assert plan.problems == [] and matches_format(side["chain_of_thought"])
        assert [i.type for i in plan.degradation] == ["blur", "noise", "jpeg", "downsample"]
        # lite: the region analysis in plain words (rough, middle), what the choice did (final)
        assert all(plan.understanding[s] for s in ("rough", "middle", "final")), plan.understanding
        assert any(k in plan.understanding["rough"] for k in ("flat", "textured", "edges", "too small"))
        assert plan.understanding["final"] == (side.get("choice") or {}).get("summary", plan.understanding["final"])
        assert any("no VLM ran" in n for n in side["notes"])
        # each expert's own default (bf16, or fp32 for x4plus and int8 for DF2K), one word when they agree
        each = [choose_backend("cpu", model=m)[1] for m in DEFAULT_EXPERTS]
        assert side["profile"] == "lite" and side["precision"] == (each[0] if len(set(each)) == 1 else "+".join(each))
        assert [x["precision"] for x in side["experts"]] == each
        assert side["stages"]["final"]["size"] == [w, h]
        assert set(side["versions"]) >= {"realsr_r1", "torch", "numpy", "pillow"}


def test_resume_skips_finished_outputs(tmp_path, capsys, weights_dir):
    src = tmp_path / "in"
    src.mkdir()
    for i, name in enumerate(["a.png", "b.png", "c.png"]):
        photo((12 + i, 10)).save(src / name)
    out = tmp_path / "out"
    rc, err = run_cli(capsys, "-i", src, "-o", out)
    assert rc == 0 and "restored 3, skipped 0" in err
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (out / "b.json").unlink()  # as if the run had been killed while writing b
    rc, err = run_cli(capsys, "-i", src, "-o", out)
    assert rc == 0 and "restored 1, skipped 2" in err
    assert (out / "a.png").stat().st_mtime_ns == mtimes["a.png"]
    assert (out / "b.json").exists()
    rc, err = run_cli(capsys, "-i", src, "-o", out, "--overwrite")
    assert "restored 3, skipped 0" in err
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_stage_files_outscale_suffix_ext(tmp_path, capsys, weights_dir):
    src = tmp_path / "x.png"
    photo((20, 14)).save(src)
    out = tmp_path / "out"
    rc, _ = run_cli(capsys, "-i", src, "-o", out, "--save-stages", "--outscale", "2.5", "--suffix", "sr",
                    "--ext", "jpg")
    assert rc == 0
    sizes = {s: Image.open(out / f"x_sr_{s}.jpg").size for s in ("rough", "middle", "final")}
    assert sizes == {"rough": (20, 14), "middle": (40, 28), "final": (50, 35)}
    assert Image.open(out / "x_sr.jpg").size == (50, 35)
    side = json.loads((out / "x_sr.json").read_text())
    assert "<final_image>50x35</final_image>" in side["chain_of_thought"]  # sizes; files under "stages"
    assert side["stages"]["final"]["file"] == "x_sr_final.jpg"
    assert side["scale"] == 2.5


def test_same_name_different_extension_do_not_collide(tmp_path, capsys, weights_dir):
    src = tmp_path / "in"
    src.mkdir()
    photo((10, 10)).save(src / "a.png")
    photo((10, 10)).save(src / "a.jpg")
    rc, _ = run_cli(capsys, "-i", src, "-o", tmp_path / "out")
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_jpg.jpg", "a_jpg.json", "a_png.json",
                                                                     "a_png.png"]


def test_usage_errors_are_one_line(tmp_path, capsys):
    rc, err = run_cli(capsys, "-i", tmp_path / "missing", "-o", tmp_path / "o")
    assert rc == 2 and err.strip().count("\n") == 0 and "no such file or folder" in err
    (tmp_path / "empty").mkdir()
    rc, err = run_cli(capsys, "-i", tmp_path / "empty", "-o", tmp_path / "o")
    assert rc == 2 and "no images found" in err
    photo((8, 8)).save(tmp_path / "one.png")
    rc, err = run_cli(capsys, "-i", tmp_path / "one.png", "-o", tmp_path / "o", "--profile", "nope")
    assert rc == 2 and "unknown profile 'nope'" in err
    for scale in ("0", "-2", "17"):  # 0 is no scale, not the default
        rc, err = run_cli(capsys, "-i", tmp_path / "one.png", "-o", tmp_path / "o", "--outscale", scale)
        assert rc == 2 and err.strip().count("\n") == 0 and f"got {float(scale)}" in err, (scale, err)


def test_a_single_file_run_names_the_file_it_wrote(tmp_path, capsys, weights_dir):
    photo((12, 10)).save(tmp_path / "one.png")
    rc, err = run_cli(capsys, "-i", tmp_path / "one.png", "-o", tmp_path / "scratch" / "big.png", "--fidelity", "0")
    assert rc == 0 and (tmp_path / "scratch" / "big.png").is_file()
    assert err.strip().splitlines()[-1].endswith(f"→ {tmp_path / 'scratch' / 'big.png'}"), err
    rc, err = run_cli(capsys, "-i", tmp_path / "one.png", "-o", tmp_path / "one.png", "--fidelity", "0")
    assert rc == 2 and "--output names the input itself" in err and len(err.strip().splitlines()) == 1, err
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rc, err = run_cli(capsys, "-i", tmp_path / "broken.png", "-o", tmp_path / "scratch" / "fixed.png", "--fidelity", "0")
    assert rc == 1 and not (tmp_path / "scratch" / "fixed.png").exists()
    assert "→" not in err.strip().splitlines()[-1] and "failed 1" in err, err  # nothing was written there


def test_plan_is_parsed_as_the_text_arrives(lite):
    """Streamed one character at a time (as a VLM's tokens may split tags), each section is announced
    right after the delta that closes it, with the items parsed so far."""
    from realsr_r1.pipeline import RestorationPipeline

    cot = ("<degradation>noise: heavy; blur: light</degradation><rough_understand>a dog</rough_understand>"
           "<rough_image></rough_image><middle_understand>a dog on grass</middle_understand><middle_image>"
           "</middle_image><final_understand>fur</final_understand><final_image></final_image>")

    class CharPolicy:
        name = "chars"

        def stream(self, image, analysis, *, seed, scale):
            yield from cot

    pipe = RestorationPipeline(CharPolicy(), lite.restorer, profile="test")
    img = read_image(REPO / "examples" / "chip.png")
    img.rgb = img.rgb[:8, :8]
    text, seen = "", []
    for e in pipe.run(img):
        if isinstance(e, TextDelta):
            text += e.text
        elif isinstance(e, PlanUpdate):
            assert text.endswith(f"</{e.section}>")  # announced on the closing delta, not later
            seen.append((e.section, [i.level for i in e.plan.degradation], e.plan.understanding["rough"]))
    assert seen == [("degradation", ["heavy", "light"], ""), ("rough_understand", ["heavy", "light"], "a dog"),
                    ("middle_understand", ["heavy", "light"], "a dog"), ("final_understand", ["heavy", "light"], "a dog")]


def test_an_empty_final_understanding_is_filled_with_what_the_choice_did(lite):
    """A policy that leaves <final_understand> blank (or only spaces): the chain says in words what
    the restorer chose, in the tag where the format puts it."""
    from realsr_r1.pipeline import RestorationPipeline

    class Blank:
        name, last_stats = "blank", None

        def describe(self):
            return {}

        def stream(self, image, analysis, *, seed, scale):
            yield ("<degradation>noise: none</degradation><rough_understand></rough_understand><rough_image>"
                   "</rough_image><middle_understand></middle_understand><middle_image></middle_image>"
                   "<final_understand>  </final_understand><final_image></final_image>")

    img = read_image(REPO / "examples" / "chip.png")
    img.rgb = img.rgb[:16, :16]
    events = list(RestorationPipeline(Blank(), lite.restorer, profile="test").run(img))
    done = [e for e in events if isinstance(e, Done)]
    assert done, events[-1]
    done = done[0]
    summary = done.result.info["choice"]["summary"]
    assert summary and f"<final_understand>{summary}</final_understand>" in done.result.cot
    assert parse_cot(done.result.cot).understanding["final"] == summary


def test_pipeline_events_in_order(lite):
    img = read_image(REPO / "examples" / "chip.png")
    img.rgb = img.rgb[:16, :20]
    events = list(lite.run(img, seed=3))
    kinds = [type(e).__name__ for e in events]
    first_stage = kinds.index("StageStarted")
    assert kinds[0] == "AnalysisReady"
    assert set(kinds[1:first_stage - 1]) == {"TextDelta", "PlanUpdate"} and kinds[first_stage - 1] == "PlanReady"
    updates = [e for e in events if isinstance(e, PlanUpdate)]
    assert [u.section for u in updates] == ["degradation", "rough_understand", "middle_understand", "final_understand"]
    final_plan = events[first_stage - 1].plan
    assert updates[0].plan.degradation == final_plan.degradation and updates[0].plan.problems
    assert kinds[first_stage:] == ["StageStarted", "StageImage"] * 3 + ["Done"]
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert matches_format(text)
    stage_events = [e for e in events if isinstance(e, (StageStarted, StageImage))]
    assert [e.stage for e in stage_events] == ["rough", "rough", "middle", "middle", "final", "final"]
    sizes = stage_sizes(20, 16, 4)
    for e in stage_events:
        if isinstance(e, StageImage):
            assert (e.rgb.shape[1], e.rgb.shape[0]) == sizes[e.stage]
    done = events[-1].result
    assert done.seed == 3 and done.plan.images["final"] == "80x64"


def test_pipeline_failure_is_an_event(lite, monkeypatch):
    img = read_image(REPO / "examples" / "chip.png")

    def broken(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")

    for expert in lite.restorer.experts:  # one expert alone restores whole; several stream their rows
        monkeypatch.setattr(expert, "restore", broken)
        monkeypatch.setattr(expert, "stream", broken)
    events = list(lite.run(img))
    assert isinstance(events[-1], Failed) and "out of memory" in events[-1].message
    assert not any(isinstance(e, Done) for e in events)


def test_module_entry_point_runs(tmp_path, weights_dir):
    src = tmp_path / "in"
    src.mkdir()
    photo((12, 12)).save(src / "p.png")
    env = {**os.environ, "REALSR_R1_WEIGHTS": str(weights_dir)}
    proc = subprocess.run([sys.executable, "-m", "realsr_r1.infer", "-i", str(src), "-o", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "profile: lite (auto:" in proc.stderr
    assert (tmp_path / "o" / "p.png").exists() and (tmp_path / "o" / "p.json").exists()


def test_full_profile_without_weights_says_what_to_fetch(tmp_path, capsys, weights_dir):
    src = tmp_path / "in"
    src.mkdir()
    photo((8, 8)).save(src / "p.png")
    rc, err = run_cli(capsys, "-i", src, "-o", tmp_path / "o", "--profile", "full")
    assert rc == 2 and "Traceback" not in err
    line = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(line) == 1 and "python -m realsr_r1.download full" in line[0]
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_sharded_processes_split_the_files(tmp_path, weights_dir):
    """What `accelerate launch` / torchrun set (RANK, WORLD_SIZE, MASTER_ADDR/PORT): every file once, none
    missing, and one overall summary from the main process."""
    import socket

    src = tmp_path / "in"
    src.mkdir()
    for i in range(5):
        photo((8 + i, 8)).save(src / f"im{i}.png")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "REALSR_R1_WEIGHTS": str(weights_dir), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "realsr_r1.infer", "-i", str(src), "-o",
                                       str(tmp_path / "o"), "--quiet"], env=env, stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert "restored 5, skipped 0 (already done), failed 0" in errs[0] and "[process" not in errs[0]
    assert "restored" not in errs[1]  # one summary, from the main process
    assert sorted(p.name for p in (tmp_path / "o").glob("*.png")) == [f"im{i}.png" for i in range(5)]
    seeds = {json.loads(p.read_text())["input"]: json.loads(p.read_text())["seed"] for p in (tmp_path / "o").glob("*.json")}
    assert seeds == {f"im{i}.png": i for i in range(5)}  # seeds follow the global order, not the shard
