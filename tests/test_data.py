"""The GRPO data builder: LQ synthesis, labels, prompt, tags, resume, errors (all offline, tiny images)."""

import contextlib
import io
import json

import datasets
import numpy as np
import pytest
from PIL import Image

from conftest import photo
from realsr_r1 import cot, degrade
from realsr_r1.training import data
from realsr_r1.imageio import read_image

CAPTION = "A photo of a brown dog lying on the green grass; the dog's fur is wet, 2 ears."
CAPTION_TAGS = ["brown", "dog", "lying", "green", "grass", "fur", "wet", "ears"]


def make_hr(folder, names=("a.png", "b.png", "c.png"), corrupt=True):
    folder.mkdir()
    for i, (name, src) in enumerate(zip(names, ["dog.png", "frog.png", "chip.png", "building.png"])):
        photo((64, 48), src).rotate(180 * i).save(folder / name)
    if corrupt:
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def cli(*args):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = data.main(["build", *map(str, args)])
    return rc, err.getvalue()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    hr = make_hr(root / "hr")
    caps = write_jsonl(root / "captions.jsonl", [{"file": "a.png", "caption": CAPTION},
                                                  {"file": "b.png", "caption": "a frog on a leaf"}])
    tags = write_jsonl(root / "tags.jsonl", [{"file": "b.png", "tags": ["frog", "pond"]}])
    rc, err = cli("--hr", hr, "--out", root / "out", "--captions", caps, "--tags", tags, "--seed", 7)
    return {"root": root, "hr": hr, "out": root / "out", "rc": rc, "err": err, "caps": caps, "tags": tags,
            "ds": datasets.load_from_disk(str(root / "out" / "dataset"))}


def test_columns_types_and_sizes(built):
    ds = built["ds"]
    assert len(ds) == 3
    f = ds.features
    assert isinstance(f["image"], datasets.Image) and f["seed"] == datasets.Value("int64")
    for col in ("degradation_text", "caption", "hr_path", "lq_path"):
        assert f[col] == datasets.Value("string")
    for i, row in enumerate(ds):
        hr = built["hr"] / f"{'abc'[i]}.png"
        assert row["hr_path"] == str(hr.resolve()) and hr.is_file()
        assert row["lq_path"] == str((built["out"] / "lq" / f"{'abc'[i]}.png").resolve())
        assert row["image"].size == (16, 12)  # HR 64x48 / 4
        assert row["seed"] == degrade.image_seed(7, hr.name) and isinstance(row["seed"], int)
        assert isinstance(row["tags"], list) and isinstance(row["caption"], str)


def test_degradation_is_the_recorded_ground_truth(built):
    for row in built["ds"]:
        ref = degrade.degrade(read_image(row["hr_path"]).rgb, 4, row["seed"])
        assert row["degradation"] == [i.to_dict() for i in ref.items]
        assert [cot.DegradationItem.from_dict(d) for d in row["degradation"]] == ref.items  # round-trips
        assert row["degradation_text"] == cot.render_degradation(ref.items)
        assert np.array_equal(np.asarray(row["image"].convert("RGB")), np.round(ref.lq * 255).astype(np.uint8))
    labels = [json.loads(line) for line in (built["out"] / "labels.jsonl").read_text().splitlines()]
    assert [r["source"] for r in labels] == ["a.png", "b.png", "c.png"]
    assert [r["items"] for r in labels] == built["ds"]["degradation"]
    assert all({"file", "seed", "params", "degradation"} <= r.keys() for r in labels)


def test_prompt_is_the_vlcot_conversation(built):
    for row in built["ds"]:
        assert row["prompt"] == cot.build_messages()  # no None-filled keys from Arrow structs
        user = row["prompt"][1]["content"]
        # exactly one unfilled placeholder, first, as TRL's prepare_multimodal_messages counts them
        assert [p for p in user if p["type"] == "image" and "image" not in p] == [user[0]]
        assert user[1] == {"type": "text", "text": cot.USER_PROMPT}


def test_tags_and_captions(built):
    a, b, c = built["ds"]
    assert data.caption_tags(CAPTION) == CAPTION_TAGS
    assert a["tags"] == CAPTION_TAGS and a["caption"] == CAPTION
    assert b["tags"] == ["frog", "pond"] and b["caption"] == "a frog on a leaf"  # --tags wins
    assert c["tags"] == [] and c["caption"] == ""


def test_corrupt_image_is_reported_and_the_rest_finishes(built):
    assert built["rc"] == 1
    lines = built["err"].splitlines()
    bad = [line for line in lines if "broken.png" in line]
    assert len(bad) == 1 and bad[0].startswith("broken.png: ") and "Traceback" not in built["err"]
    assert lines[-1] == f"wrote 3 examples to {built['out'] / 'dataset'}; 1 failed"


def test_rerun_reuses_records_and_gives_the_same_dataset(tmp_path, monkeypatch):
    hr = make_hr(tmp_path / "hr", corrupt=False)
    caps = write_jsonl(tmp_path / "c.jsonl", [{"file": "a.png", "caption": CAPTION}])
    out = tmp_path / "out"
    first = data.load_dataset(data.build_dataset(hr, out, captions=caps, seed=5, log=lambda *a: None)).to_list()
    lq = out / "lq" / "a.png"
    before = lq.stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("degraded again")

    monkeypatch.setattr(data, "degrade", boom)
    rc, err = cli("--hr", hr, "--out", out, "--captions", caps, "--seed", 5)
    assert rc == 0 and err == f"wrote 3 examples to {out / 'dataset'} (3 reused)\n"
    assert lq.stat().st_mtime_ns == before
    assert data.load_dataset(out).to_list() == first
    # new tags are joined without degrading anything again
    tags = write_jsonl(tmp_path / "t.jsonl", [{"file": "a.png", "tags": ["puppy"]}])
    assert cli("--hr", hr, "--out", out, "--captions", caps, "--tags", tags, "--seed", 5)[0] == 0
    assert data.load_dataset(out)["tags"][0] == ["puppy"]
    # another seed, a changed HR file or --overwrite must not reuse them
    assert cli("--hr", hr, "--out", out, "--seed", 6)[1].count("degraded again") == 3
    assert cli("--hr", hr, "--out", out, "--seed", 5, "--overwrite")[1].count("degraded again") == 3
    photo((64, 48), "frog.png").save(hr / "a.png")
    rc, err = cli("--hr", hr, "--out", out, "--seed", 5)
    assert rc == 1 and err.count("degraded again") == 1 and err.startswith("a.png: ")
    assert data.load_dataset(out).to_list() == first[1:]  # the others reused, unchanged


def test_deterministic_for_a_seed(tmp_path):
    hr = make_hr(tmp_path / "hr", names=("a.png",), corrupt=False)
    outs = {}
    for name, seed in (("x", 3), ("y", 3), ("z", 4)):
        data.build_dataset(hr, tmp_path / name, seed=seed, log=lambda *a: None)
        outs[name] = (tmp_path / name / "lq" / "a.png").read_bytes()
    assert outs["x"] == outs["y"] and outs["x"] != outs["z"]


def test_load_dataset_accepts_both_folders(built, tmp_path):
    top, inner = data.load_dataset(built["out"]), data.load_dataset(built["out"] / "dataset")
    assert top["hr_path"] == inner["hr_path"] == built["ds"]["hr_path"]
    with pytest.raises(FileNotFoundError, match="holds no dataset"):
        data.load_dataset(tmp_path)


@pytest.mark.parametrize("kind,bad,words", [
    ("--captions", '{"file": "a.png", "caption": ', "not valid JSON"),
    ("--tags", '{"file": "a.png", "tags": "dog"}', "list of strings"),
])
def test_malformed_jsonl_line_is_one_line_error(tmp_path, kind, bad, words):
    hr = make_hr(tmp_path / "hr", names=("a.png",), corrupt=False)
    good = {"file": "b.png", "caption": "x"} if kind == "--captions" else {"file": "b.png", "tags": []}
    src = write_jsonl(tmp_path / "side.jsonl", [good, bad])
    rc, err = cli("--hr", hr, "--out", tmp_path / "out", kind, src)
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("error: ") and f"{src} line 2" in err and words in err
    assert not (tmp_path / "out").exists()  # checked before any work


def test_usage_errors_and_name_collisions(tmp_path):
    rc, err = cli("--hr", tmp_path / "missing", "--out", tmp_path / "out")
    assert rc == 2 and err == f"error: --hr {tmp_path / 'missing'} is not a folder\n"
    hr = make_hr(tmp_path / "hr", names=("a.png",), corrupt=False)
    Image.open(hr / "a.png").save(hr / "a.jpg", quality=95)
    rc, err = cli("--hr", hr, "--out", tmp_path / "out")
    assert rc == 1 and "a.png: name collision: a.jpg also becomes a.png" in err
    assert len(data.load_dataset(tmp_path / "out")) == 1
