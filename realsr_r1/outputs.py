"""Where each input's results go, which results are already done, and what must never be overwritten.

Three rules protect a user's files:
- no output path may be an input file (checked for every input before any work starts);
- a result counts as done only when its sidecar records the settings of this run; one made with
  other settings is kept, not silently replaced, and reported;
- `--overwrite` replaces a result together with the files its old sidecar recorded (stage images,
  an output of another format), so no stale file is left that the new sidecar does not describe.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .cot import STAGES
from .imageio import IMAGE_EXTENSIONS, list_images

OUTPUT_EXTENSIONS = ("png", "jpg", "webp")
# Config keys that change how a result is computed but not its pixels: a resume ignores them.
EXECUTION_ONLY_KEYS = ("cpu_offload", "preview_every", "preview_size", "vae_slicing")


class UsageError(Exception):
    """A command line that cannot run; str() is one line."""


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def find_inputs(src: Path, recursive: bool, skip: Path | None = None) -> list[Path]:
    """The input files: `src` itself, or the images in it (in its subfolders too with `recursive`).

    `skip` (the output folder, when it lies inside the input folder) is never walked: its results
    would otherwise be read back as inputs."""
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise UsageError(f"{src}: no such file or folder")
    folders = [src]
    if recursive:
        skip_resolved = skip.resolve() if skip is not None else None
        folders = []
        for root, dirs, _ in os.walk(src):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                             and (skip_resolved is None or (Path(root) / d).resolve() != skip_resolved))
            folders.append(Path(root))
    files = [f for folder in folders for f in list_images(folder)]
    if not files:
        where = f"{src} or its subfolders" if recursive else str(src)
        hint = "" if recursive or not any(p.is_dir() for p in src.iterdir()) else " (--recursive walks subfolders)"
        raise UsageError(f"{where}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}){hint}")
    return files


@dataclass
class Layout:
    """Output paths: `names[input]` is the result's path without extension, relative to `out_dir`."""

    out_dir: Path
    names: dict[Path, str]
    ext: str  # auto, png, jpg, webp
    single: Path | None = None  # `--output NAME.png`: the one file the run writes

    @property
    def target(self) -> Path:
        """What a run's summary names: the file of a single-file run, else the folder."""
        return self.single or self.out_dir

    def sidecar(self, src: Path) -> Path:
        return self.out_dir / f"{self.names[src]}.json"

    def image(self, src: Path, ext: str) -> Path:
        return self.out_dir / f"{self.names[src]}.{ext}"

    def stage(self, src: Path, stage: str, ext: str) -> Path:
        return self.out_dir / f"{self.names[src]}_{stage}.{ext}"

    def possible(self, src: Path, save_stages: bool) -> list[Path]:
        """Every path a result for `src` may be written to, for each format it may end up in."""
        exts = {self.ext} if self.ext != "auto" else {src.suffix.lower().lstrip(".").replace("jpeg", "jpg")}
        exts = {e if e in OUTPUT_EXTENSIONS else "png" for e in exts} | {"png"}  # alpha/16-bit → png
        paths = [self.sidecar(src)] + [self.image(src, e) for e in sorted(exts)]
        if save_stages:
            paths += [self.stage(src, s, e) for s in STAGES for e in sorted(exts)]
        return paths


def _stems(files: list[Path], root: Path, suffix: str) -> dict[Path, str]:
    """DIR/NAME[_suffix]; inputs sharing a name in one folder (a.png, a.jpg) keep their extension."""
    counts: dict[tuple[Path, str], int] = {}
    rel = {f: f.relative_to(root) if f != root else Path(f.name) for f in files}
    for f in files:
        key = (rel[f].parent, f.stem.lower())
        counts[key] = counts.get(key, 0) + 1
    names = {}
    for f in files:
        stem = f.stem if counts[(rel[f].parent, f.stem.lower())] == 1 else f"{f.stem}_{f.suffix.lstrip('.').lower()}"
        stem = f"{stem}_{suffix}" if suffix else stem
        names[f] = (rel[f].parent / stem).as_posix()
    return names


def plan_layout(src: Path, output: Path, files: list[Path], *, suffix: str, ext: str) -> Layout:
    """Where results go. `--input FILE --output NAME.png` names the result itself (NAME.json beside it)."""
    if is_image_name(output) and not output.is_dir():
        if not src.is_file():
            raise UsageError(f"--output {output} names a file, but --input {src} is a folder: give an output folder")
        out_ext = output.suffix.lower().lstrip(".").replace("jpeg", "jpg")
        if out_ext not in OUTPUT_EXTENSIONS:
            raise UsageError(f"--output {output}: cannot write {out_ext} (use {', '.join(OUTPUT_EXTENSIONS)})")
        if ext not in ("auto", out_ext):
            raise UsageError(f"--ext {ext} contradicts --output {output.name}: give one of them")
        if suffix:
            raise UsageError(f"--suffix does not apply when --output names the file ({output.name})")
        return Layout(output.parent, {src: output.stem}, out_ext, single=output)
    root = src if src.is_dir() else src.parent
    return Layout(output, _stems(files, root, suffix), ext)


def _identity(path: Path):
    try:
        st = path.stat()
        return st.st_dev, st.st_ino
    except OSError:
        return None


def own_results(out_dir: Path, recursive: bool) -> set[Path]:
    """Files that sidecars in `out_dir` record as results of this tool (so an in-place run with a
    suffix does not restore its own results again on the next run)."""
    found: set[Path] = set()
    if not out_dir.is_dir():
        return found
    for side in (out_dir.rglob("*.json") if recursive else out_dir.glob("*.json")):
        record = read_sidecar(side)
        if record is not None:
            found |= {p.resolve() for p in recorded_files(side, record)}
    return found


def check_no_collision(layout: Layout, files: list[Path], save_stages: bool) -> None:
    """Refuse, before any work, any output path that is one of the inputs (same path or same file)."""
    by_path = {f.resolve(): f for f in files}
    by_identity = {_identity(f): f for f in files}
    planned: dict[Path, Path] = {}
    for f in files:
        for target in layout.possible(f, save_stages):
            other = planned.setdefault(target.resolve(), f)
            if other != f:  # e.g. a.png's stage image a_rough.png and the result of input a_rough.png
                raise UsageError(f"{target}: the results of {other.name} and {f.name} would both be written "
                                 "here; rename one of them, or leave out --save-stages")
            hit = by_path.get(target.resolve())
            if hit is None and target.exists():
                hit = by_identity.get(_identity(target))  # a hard link, or a case-insensitive file system
            if hit is None:
                continue
            if layout.single is not None and hit == f:
                raise UsageError(f"{hit}: --output names the input itself, which the result would overwrite; "
                                 "choose another file name")
            if layout.out_dir.resolve() == hit.parent.resolve() and hit == f:
                raise UsageError(f"{hit}: its result would overwrite it (--output is the input's folder); "
                                 "choose another --output, or a --suffix")
            raise UsageError(f"{hit}: the result for {f.name} would overwrite this input; "
                             "choose another --output, --suffix or --ext")


# --- Resume ----------------------------------------------------------------------------------------
def read_sidecar(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "output" in record and "chain_of_thought" in record else None


def recorded_files(sidecar: Path, record: dict) -> list[Path]:
    """The result and stage images a sidecar names, resolved beside it (names that leave the folder are ignored)."""
    names = [record.get("output")] + [(s or {}).get("file") for s in (record.get("stages") or {}).values()
                                      if isinstance(s, dict)]
    out = []
    for name in names:
        if isinstance(name, str) and name and Path(name).name == name:
            out.append(sidecar.parent / name)
    return out


def settings_key(settings: dict) -> dict:
    """The settings as compared on resume: nested keys flattened, execution-only keys left out."""
    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif prefix.rsplit(".", 1)[-1] not in EXECUTION_ONLY_KEYS:
            flat[prefix] = value

    walk("", json.loads(json.dumps(settings, default=str)))  # the values as a sidecar stores them
    return flat


def settings_difference(old: dict | None, new: dict) -> str | None:
    """None when `old` (a sidecar's settings) matches `new`, else a short account such as "scale 4 → 3.5"."""
    if not isinstance(old, dict):
        return "settings not recorded (an older version)"
    a, b = settings_key(old), settings_key(new)
    changed = [k for k in dict.fromkeys([*b, *a]) if a.get(k) != b.get(k)]
    if not changed:
        return None
    # A different profile or scale explains its config's differences: name those first, alone.
    top = [k for k in changed if not k.startswith("config.")]
    changed = top or changed
    return ", ".join(f"{k.removeprefix('config.')} {_show(a.get(k))} → {_show(b.get(k))}" for k in changed[:3]) + \
        (f", and {len(changed) - 3} more" if len(changed) > 3 else "")


def _show(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def remove_stale(sidecar: Path, record: dict | None, keep: set[Path], inputs: set[Path]) -> list[Path]:
    """After `--overwrite` wrote a new result: delete what the old sidecar recorded and the new one does not."""
    removed = []
    for path in recorded_files(sidecar, record or {}):
        resolved = path.resolve()
        if resolved in keep or resolved in inputs or not path.is_file():
            continue
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass  # a file we cannot remove is left, as it was
    return removed
