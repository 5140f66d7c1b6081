"""GRPO training data: HR photos → synthetic LQ inputs with their ground truth (design.md §4).

    python -m realsr_r1.data build --hr HR_DIR --out DATA_DIR [--captions captions.jsonl]
        [--tags tags.jsonl] [--scale 4] [--seed 0] [--overwrite]

Each HR image `NAME.ext` goes through the recorded second-order degradation of `degrade.py` (seed
from --seed and the file name) into DATA_DIR/lq/NAME.png, its labels into DATA_DIR/records/NAME.json.
The records then become DATA_DIR/labels.jsonl (as degrade.py's CLI writes it) and the `datasets`
dataset DATA_DIR/dataset (`datasets.load_from_disk` or `load_dataset`), one row per image by name:

- image: the LQ picture (its PNG bytes are embedded, so the dataset stands alone)
- prompt: the VLCoT conversation of `cot.build_messages()`: system + user, the user content an
  `{"type": "image"}` placeholder (TRL's GRPOTrainer puts `image` there) and the task text
- degradation: the ground-truth items as `DegradationItem.to_dict()` dicts;
  degradation_text: the same, rendered (`blur: medium (sigma 1.4); ...`)
- tags: content words for the understanding reward: the --tags entry of the file, else the content
  words of its caption, else []; caption: the --captions entry ("" when none)
- hr_path, lq_path: absolute paths of the reference and of the LQ file; seed: the image's seed

`prompt` and `degradation` are `datasets.Json` values: as Arrow structs every dict would get the
union of all keys (`text: None` in the image placeholder, `quality: None` in a blur item's params).
Resumable: an image whose LQ PNG and record exist, from the same HR bytes, seed and scale, is not
degraded again unless --overwrite; tags and captions are joined at the end and cost nothing to change.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

from ..cot import build_messages
from ..degrade import degrade, image_seed, one_line
from ..imageio import atomic_write_text, list_images, read_image, write_image

# Small on purpose: captions are short, and every dropped word is one the policy is not asked to
# name. "photo"/"image"/"picture" are caption boilerplate ("a photo of ..."), not content.
STOP_WORDS = frozenset(
    "the and for with from into onto over under near its his her their there this that these those "
    "are was were has have had not but you your our they them she him who what which while where when "
    "some any all very can will been being also than then out off just more most other such only own "
    "same too each few both about above below between through during before after again here "
    "photo image picture".split()
)
_WORD = re.compile(r"[^\W\d_]+")  # runs of letters, any script


class DataError(ValueError):
    """A usage problem (missing folder, malformed JSONL line, nothing to build): one line, exit 2."""


def caption_tags(caption: str) -> list[str]:
    """A caption's content words: lowercase, alphabetic, >= 3 letters, no stop words, first seen first."""
    words = (w for w in _WORD.findall(caption.lower()) if len(w) >= 3 and w not in STOP_WORDS)
    return list(dict.fromkeys(words))


def read_jsonl(path: str | Path, key: str) -> dict[str, object]:
    """{file: value} from lines {"file": NAME, key: value}; a bad line is a DataError naming it."""
    path = Path(path)
    want = "a list of strings" if key == "tags" else "a string"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    out: dict[str, object] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n}: not valid JSON ({e.msg})") from None
        value = row.get(key) if isinstance(row, dict) else None
        ok = (isinstance(value, list) and all(isinstance(t, str) for t in value)) if key == "tags" \
            else isinstance(value, str)
        if not ok or not isinstance(row.get("file"), str):  # ok is False for a non-object line
            raise DataError(f'{path} line {n}: expected {{"file": "<HR file name>", "{key}": {want}}}')
        if row["file"] in out:  # two answers for one image: which one was meant is a guess
            raise DataError(f"{path} line {n}: {row['file']} is listed twice")
        out[row["file"]] = value
    return out


def _features():
    import datasets

    if not hasattr(datasets, "Json"):
        raise DataError(f"datasets {datasets.__version__} has no Json feature: install a newer one (5.x has it)")
    text = datasets.Value("string")
    return datasets.Features({
        "image": datasets.Image(), "prompt": datasets.Json(), "degradation": datasets.List(datasets.Json()),
        "degradation_text": text, "tags": datasets.List(text), "caption": text,
        "hr_path": text, "lq_path": text, "seed": datasets.Value("int64"),
    })


def _record(path: Path, name: str, out: Path, scale: int, seed: int, overwrite: bool) -> tuple[dict, bool]:
    """The labels of one image, degrading it only when no matching record exists. (record, reused)"""
    lq, rec_path = out / "lq" / name, out / "records" / f"{Path(name).stem}.json"
    # What the LQ depends on: a changed HR file, seed or scale must not reuse the old one.
    key = {"source": path.name, "hr_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
           "scale": scale, "seed": image_seed(seed, path.name)}
    if not overwrite and lq.is_file() and rec_path.is_file():
        try:
            rec = json.loads(rec_path.read_text(encoding="utf-8"))
            if all(rec.get(k) == v for k, v in key.items()):
                return rec, True
        except (OSError, ValueError):
            pass  # a damaged record is simply made again
    result = degrade(read_image(path).rgb, scale, key["seed"])
    write_image(lq, result.lq)  # before the record: a record always has its image
    rec = {"file": name, **key, "items": [i.to_dict() for i in result.items],
           "degradation": result.degradation, "params": result.params}
    atomic_write_text(rec_path, json.dumps(rec))
    return rec, False


def _build(hr_dir, out_dir, captions, tags, scale, seed, overwrite, log, err) -> tuple[Path | None, int]:
    hr_dir, out = Path(hr_dir), Path(out_dir)
    if not hr_dir.is_dir():
        raise DataError(f"--hr {hr_dir} is not a folder")
    if scale < 1:
        raise DataError(f"--scale must be a positive integer, got {scale}")
    caps = read_jsonl(captions, "caption") if captions else {}
    tag_map = read_jsonl(tags, "tags") if tags else {}
    features = _features()  # fail before the slow part
    images = list_images(hr_dir)
    if not images:
        raise DataError(f"no images in {hr_dir}")
    names = {p.name for p in images}
    for src, entries in ((captions, caps), (tags, tag_map)):
        unknown = sorted(set(entries) - names)
        if unknown:  # likely a typo or a path instead of a file name: those images get no tags
            log(f"{src}: {len(unknown)} entr{'y names' if len(unknown) == 1 else 'ies name'} no image "
                f"in {hr_dir} (e.g. {unknown[0]})")
    out.mkdir(parents=True, exist_ok=True)
    taken: dict[str, str] = {}
    rows, records, failed, reused = [], [], 0, 0
    for path in images:
        name = path.stem + ".png"
        try:
            if name in taken:
                raise DataError(f"name collision: {taken[name]} also becomes {name}; rename one")
            taken[name] = path.name
            rec, was_reused = _record(path, name, out, scale, seed, overwrite)
        except Exception as e:  # one bad image must not end the batch
            err(f"{path.name}: {e if isinstance(e, DataError) else one_line(e)}")
            failed += 1
            continue
        reused += was_reused
        records.append(rec)
        caption, lq = caps.get(path.name, ""), str((out / "lq" / name).resolve())
        rows.append({
            "image": lq, "prompt": build_messages(), "degradation": rec["items"],
            "degradation_text": rec["degradation"], "caption": caption,
            "tags": tag_map[path.name] if path.name in tag_map else caption_tags(caption),
            "hr_path": str(path.resolve()), "lq_path": lq, "seed": rec["seed"],
        })
    if not rows:  # leave an earlier dataset and its labels.jsonl as they were
        return None, failed
    target = _save(rows, features, out)
    atomic_write_text(out / "labels.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    log(f"wrote {len(rows)} examples to {target}" + (f" ({reused} reused)" if reused else "")
        + (f"; {failed} failed" if failed else ""))
    return target, failed


def _save(rows: list[dict], features, out: Path) -> Path:
    import datasets

    target, tmp = out / "dataset", out / ".dataset.part"
    shutil.rmtree(tmp, ignore_errors=True)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one summary line says it; a bar per save is noise
    try:
        datasets.Dataset.from_list(rows, features=features).save_to_disk(str(tmp))
    finally:
        if bars:
            datasets.enable_progress_bars()
    # Swap in whole, so an interrupted build never leaves a half-written dataset behind.
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def build_dataset(hr_dir, out_dir, captions=None, tags=None, scale: int = 4, seed: int = 0,
                  overwrite: bool = False, log=print) -> Path:
    """Build DATA_DIR/dataset; returns its path. Bad images are reported on stderr and left out;
    DataError for usage problems or when no image could be used."""
    target, _ = _build(hr_dir, out_dir, captions, tags, int(scale), int(seed), overwrite, log, _stderr)
    if target is None:
        raise DataError(f"no example could be built from {hr_dir}")
    return target


def load_dataset(data_dir):
    """The dataset of a `build` (DATA_DIR or DATA_DIR/dataset)."""
    import datasets

    path = Path(data_dir)
    if not (path / "dataset_info.json").is_file() and (path / "dataset" / "dataset_info.json").is_file():
        path = path / "dataset"
    if not (path / "dataset_info.json").is_file():
        raise FileNotFoundError(f"{data_dir} holds no dataset (make one with: python -m realsr_r1.data build)")
    return datasets.load_from_disk(str(path))


def main(argv: list[str] | None = None) -> int:
    from ..cli import Parser

    p = Parser(prog="python -m realsr_r1.data", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="HR images → LQ images, labels.jsonl and DATA_DIR/dataset")
    b.add_argument("--hr", required=True, help="folder of HR images")
    b.add_argument("--out", required=True, help="output folder DATA_DIR (created if missing)")
    b.add_argument("--captions", help='JSONL, one {"file": NAME, "caption": "..."} per line')
    b.add_argument("--tags", help='JSONL, one {"file": NAME, "tags": [...]} per line (wins over captions)')
    b.add_argument("--scale", type=int, default=4, help="downsampling factor HR → LQ (default 4)")
    b.add_argument("--seed", type=int, default=0, help="base seed; per image it is mixed with the file name")
    b.add_argument("--overwrite", action="store_true", help="degrade again images that have a record")
    b.add_argument("--verbose", action="store_true", help="also show the libraries' logs and warnings")
    args = p.parse_args(argv)
    from .. import quiet

    quiet.configure(args.verbose)
    try:
        target, failed = _build(args.hr, args.out, args.captions, args.tags, args.scale, args.seed,
                                args.overwrite, log=_stderr, err=_stderr)
    except DataError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if target is None:
        print(f"error: no example could be built from {args.hr}", file=sys.stderr)
    return 1 if failed or target is None else 0


if __name__ == "__main__":
    sys.exit(main())
