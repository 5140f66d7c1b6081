"""`python -m realsr_r1.infer --input DIR --output DIR`: restore a folder, chain of thought beside each image.

For every input NAME.ext it writes NAME.png (the result) and NAME.json (the chain of thought, the
parsed plan, profile, timings, versions). Outputs that already exist are skipped, so an
interrupted run resumes; a bad file is reported in one line and the rest still finish.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from tqdm import tqdm

from .imageio import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageReadError,
    atomic_write_text,
    list_images,
    read_image,
    write_image,
)
from .pipeline import Done, Failed
from .sidecar import build_sidecar


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m realsr_r1.infer",
        description="Restore low-quality images: reason about the degradation (VLCoT), then restore "
        "coarse to fine. Writes NAME.png and NAME.json (the chain of thought) per input.",
    )
    p.add_argument("--input", "-i", required=True, help="an image file or a folder of images")
    p.add_argument("--output", "-o", required=True, help="output folder (created if missing)")
    p.add_argument("--profile", default="auto", help="auto (default), lite, or a YAML config path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set restorer.tile_pad=32 (repeatable)")
    p.add_argument("--adapter", default=None,
                   help="a LoRA adapter folder from python -m realsr_r1.train (profiles with a VLM policy)")
    p.add_argument("--scale", type=float, default=None,
                   help="final stage scale (default: the profile's, 4)")
    p.add_argument("--outscale", type=float, default=None,
                   help="final output scale, any float (alias of --scale, as in Real-ESRGAN)")
    p.add_argument("--tile", type=int, default=None,
                   help="tile size, 0 = no tiling: input pixels for Real-ESRGAN (restorer.tile); latent pixels "
                   "(= input pixels at the final x4 stage) for the diffusion restorer (restorer.tile)")
    p.add_argument("--tile-pad", type=int, default=None,
                   help="overlap between tiles, in the same unit: restorer.tile_pad for Real-ESRGAN, "
                   "restorer.tile_overlap for the diffusion restorer")
    p.add_argument("--ext", default="auto", choices=["auto", "png", "jpg", "webp"],
                   help="output format; auto keeps png for alpha/16-bit, else the input's (png for others)")
    p.add_argument("--suffix", default="", help="appended to output names: NAME_SUFFIX.png")
    p.add_argument("--seed", type=int, default=None,
                   help="base seed (default 0); image i uses seed + i (profiles with a VLM or diffusion)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, …")
    p.add_argument("--fp32", action="store_true", help="full precision (default: bf16/fp16 where fast)")
    p.add_argument("--save-stages", action="store_true",
                   help="also write NAME_rough.png, NAME_middle.png, NAME_final.png")
    p.add_argument("--overwrite", action="store_true", help="redo outputs that already exist")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse inputs larger than this many pixels (default {DEFAULT_MAX_PIXELS:,})")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="print tracebacks for failures")
    return p


def _output_ext(requested: str, src: Path, has_alpha: bool, bit_depth: int) -> str:
    if has_alpha or bit_depth == 16:
        if requested == "jpg":
            return "png"  # JPEG cannot hold alpha or 16 bits (Real-ESRGAN does the same)
        if requested == "auto":
            return "png"
    if requested != "auto":
        return requested
    ext = src.suffix.lower().lstrip(".")
    return {"jpeg": "jpg"}.get(ext, ext) if ext in ("png", "jpg", "jpeg", "webp") else "png"


def _output_stems(files: list[Path], suffix: str) -> dict[Path, str]:
    """NAME[_suffix]; inputs sharing a name (a.png, a.jpg) keep their extension to stay apart."""
    stems: dict[Path, str] = {}
    counts: dict[str, int] = {}
    for f in files:
        counts[f.stem.lower()] = counts.get(f.stem.lower(), 0) + 1
    for f in files:
        stem = f.stem if counts[f.stem.lower()] == 1 else f"{f.stem}_{f.suffix.lstrip('.').lower()}"
        stems[f] = f"{stem}_{suffix}" if suffix else stem
    return stems


def _shard() -> tuple[int, int, int]:
    """(rank, world size, local rank) under `accelerate launch` / torchrun; (0, 1, 0) otherwise."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), max(1, world), int(os.environ.get("LOCAL_RANK", "0"))


class UsageError(Exception):
    """A command line that cannot run; str() is one line."""


def _input_files(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise UsageError(f"{src}: no such file or folder")
    files = list_images(src)
    if not files:
        raise UsageError(f"{src}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return files


def profile_config(args: argparse.Namespace) -> tuple[str, str, dict, list[str]]:
    """(profile, why it was chosen, its config with --set and the flags applied, notes for the user).

    Each flag lands on the chosen profile's own keys (--tile-pad is `tile_pad` for Real-ESRGAN and
    `tile_overlap` for the diffusion restorer) or is a one-line error saying it does not apply."""
    from .profiles import DEFAULT_TYPE, ConfigError, check_profile, choose_profile, component, load_config, valid_keys

    if args.profile.endswith((".yaml", ".yml")):
        profile, reason = Path(args.profile).stem, "config file"
        cfg = load_config(args.profile, args.overrides)
    else:
        profile, reason = choose_profile(args.profile)
        cfg = load_config(profile, args.overrides)
    check_profile(cfg)
    scale = args.outscale or args.scale
    if scale is not None:
        if not 0 < scale <= 16:
            raise ConfigError(f"--scale/--outscale must be in (0, 16], got {scale}")
        cfg["scale"] = scale
    policy, restorer = cfg.get("policy") or {}, cfg.get("restorer") or {}
    policy_type = policy.get("type", DEFAULT_TYPE["policy"])
    restorer_type = restorer.get("type", DEFAULT_TYPE["restorer"])
    parts = component("policy", policy_type), component("restorer", restorer_type)
    for flag in ("tile", "tile_pad"):
        if getattr(args, flag) is not None:
            if flag not in parts[1].flags:
                raise ConfigError(f"--{flag.replace('_', '-')} does not apply to the {restorer_type} restorer")
            restorer[parts[1].flags[flag]] = getattr(args, flag)
    if args.adapter:
        if "adapter" not in valid_keys(parts[0]):
            raise ConfigError(f"--adapter does not apply to the {profile} profile: it needs a profile with a "
                              f"VLM policy ({profile}'s is the {policy_type})")
        policy["adapter"] = str(Path(args.adapter))
    cfg["policy"], cfg["restorer"] = policy, restorer
    notes = []
    if args.seed is not None and not any(p.seeded for p in parts):
        notes.append(f"--seed has no effect on the {profile} profile: its {policy_type} policy and "
                     f"{restorer_type} restorer are deterministic")
    return profile, reason, cfg, notes


def _device(requested: str, world: int, local_rank: int) -> str:
    """Under accelerate launch with `auto`, each process takes its own GPU."""
    if world > 1 and requested == "auto":
        import torch

        if torch.cuda.is_available():
            return f"cuda:{local_rank % torch.cuda.device_count()}"
    return requested


class _Folder:
    """Restores files into one output folder: skip what is done, one line per failure."""

    def __init__(self, pipeline, args: argparse.Namespace, files: list[Path], reason: str):
        self.pipeline = pipeline
        self.args = args
        self.out_dir = Path(args.output)
        self.stems = _output_stems(files, args.suffix)
        self.reason = reason
        self.seed = args.seed or 0

    def finished(self, path: Path) -> bool:
        """The sidecar is written last, so an existing one whose image exists marks a finished output."""
        sidecar = self.out_dir / f"{self.stems[path]}.json"
        if self.args.overwrite or not sidecar.exists():
            return False
        try:
            return (self.out_dir / json.loads(sidecar.read_text(encoding="utf-8"))["output"]).exists()
        except (OSError, ValueError, KeyError, TypeError):
            return False  # unreadable sidecar: redo this image

    def restore(self, index: int, path: Path) -> str | None:
        """Restore one file: None when its outputs are written, else why not (one line)."""
        try:
            loaded = read_image(path, max_pixels=self.args.max_pixels)
        except ImageReadError as e:
            return str(e)
        result = None
        for event in self.pipeline.run(loaded, seed=self.seed + index):
            if isinstance(event, Done):
                result = event.result
            elif isinstance(event, Failed):
                if self.args.debug and event.error is not None:
                    traceback.print_exception(event.error)
                return event.message
        if result is None:
            return "the pipeline ended without a result"
        try:
            self._write(path, loaded, result)
        except (OSError, ValueError) as e:
            return f"cannot write output ({' '.join(str(e).split())})"
        return None

    def _write(self, path: Path, loaded, result) -> None:
        stem = self.stems[path]
        ext = _output_ext(self.args.ext, path, result.alpha is not None, loaded.bit_depth)
        write_kw = {"mode": loaded.mode, "bit_depth": loaded.bit_depth if ext == "png" else 8,
                    "icc_profile": loaded.icc_profile}
        stage_files: dict[str, str] = {}
        if self.args.save_stages:
            for stage, img in result.stages.items():
                stage_files[stage] = f"{stem}_{stage}.{ext}"
                write_image(self.out_dir / stage_files[stage], img.rgb, img.alpha, **write_kw)
        write_image(self.out_dir / f"{stem}.{ext}", result.rgb, result.alpha, **write_kw)
        notes = [n for n in [*loaded.notes, self.pipeline.policy.note] if n]
        sidecar = build_sidecar(path.name, f"{stem}.{ext}", result, self.reason, stage_files, notes, loaded)
        atomic_write_text(self.out_dir / f"{stem}.json", json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n")


def _restore_all(folder: _Folder, indexed: list[tuple[int, Path]], quiet: bool) -> tuple[int, int, int]:
    """(restored, skipped, failed) over this process's share of the files."""
    done = skipped = failed = 0
    bar = tqdm(indexed, disable=quiet, unit="img", dynamic_ncols=True, file=sys.stderr)
    for index, path in bar:
        bar.set_postfix_str(path.name[:30])
        if folder.finished(path):
            skipped += 1
            continue
        error = folder.restore(index, path)
        if error is None:
            done += 1
        else:
            failed += 1
            tqdm.write(f"error: {path}: {error}", file=sys.stderr)
    bar.close()
    return done, skipped, failed


def run(args: argparse.Namespace) -> int:
    from .profiles import ConfigError, build_pipeline

    try:
        files = _input_files(Path(args.input))
        # Under accelerate launch every process takes every world-th file: no file twice, none
        # missing. Seeds stay tied to the file's place in the whole list, so sharding changes nothing.
        rank, world, local_rank = _shard()
        device = _device(args.device, world, local_rank)
        profile, reason, cfg, notes = profile_config(args)
        pipeline = build_pipeline(cfg, device=device, fp32=args.fp32)
    except (UsageError, ConfigError, OSError, ValueError, RuntimeError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        if args.debug:
            traceback.print_exc()
        return 2
    desc = pipeline.restorer.describe()
    if rank == 0:
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        if not args.quiet:
            print(f"profile: {profile} ({reason}); device {desc.get('device')}, precision {desc.get('precision')}"
                  + (f"; {world} processes" if world > 1 else ""), file=sys.stderr)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = _Folder(pipeline, args, files, reason)
    done, skipped, failed = _restore_all(folder, list(enumerate(files))[rank::world], args.quiet or rank > 0)
    summary = f"restored {done}, skipped {skipped} (already done), failed {failed} → {out_dir}"
    print((f"[process {rank}/{world}] " if world > 1 else "") + summary, file=sys.stderr)
    return 0 if not failed else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted: finished outputs are kept; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
