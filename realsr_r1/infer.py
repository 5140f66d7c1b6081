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
from .pipeline import Done, Failed, StageImage
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
    p.add_argument("--tile", type=int, default=None, help="tile size in input pixels, 0 = no tiling")
    p.add_argument("--tile-pad", type=int, default=None, help="overlap between tiles in input pixels")
    p.add_argument("--ext", default="auto", choices=["auto", "png", "jpg", "webp"],
                   help="output format; auto keeps png for alpha/16-bit, else the input's (png for others)")
    p.add_argument("--suffix", default="", help="appended to output names: NAME_SUFFIX.png")
    p.add_argument("--seed", type=int, default=0, help="base seed; image i uses seed + i")
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


def run(args: argparse.Namespace) -> int:
    from .profiles import ConfigError, build_pipeline, choose_profile, load_config
    from .weights import WeightsNotFoundError

    src = Path(args.input)
    out_dir = Path(args.output)
    if src.is_file():
        files = [src]
    elif src.is_dir():
        files = list_images(src)
    else:
        print(f"error: {src}: no such file or folder", file=sys.stderr)
        return 2
    if not files:
        print(f"error: {src}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})", file=sys.stderr)
        return 2

    # Under accelerate launch every process takes every world-th file: no file twice, none missing.
    # Seeds stay tied to the file's place in the whole list, so sharding does not change results.
    rank, world, local_rank = _shard()
    indexed = list(enumerate(files))[rank::world]
    if world > 1 and args.device == "auto":
        import torch

        if torch.cuda.is_available():
            args.device = f"cuda:{local_rank % torch.cuda.device_count()}"
    overrides = list(args.overrides)
    scale = args.outscale or args.scale
    if scale is not None:
        if not 0 < scale <= 16:
            print(f"error: --scale/--outscale must be in (0, 16], got {scale}", file=sys.stderr)
            return 2
        overrides.append(f"scale={scale}")
    if args.tile is not None:
        overrides.append(f"restorer.tile={args.tile}")
    if args.tile_pad is not None:
        overrides.append(f"restorer.tile_pad={args.tile_pad}")
    try:
        if args.profile.endswith((".yaml", ".yml")):
            profile, reason = Path(args.profile).stem, "config file"
            cfg = load_config(args.profile, overrides)
        else:
            profile, reason = choose_profile(args.profile)
            cfg = load_config(profile, overrides)
        if args.adapter:
            if (cfg.get("policy") or {}).get("type") != "vlm":
                raise ConfigError(f"--adapter needs a profile with a VLM policy; {profile} has none")
            cfg["policy"]["adapter"] = str(Path(args.adapter))
        pipeline = build_pipeline(cfg, device=args.device, fp32=args.fp32)
    except (ConfigError, WeightsNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        if args.debug:
            traceback.print_exc()
        return 2
    desc = pipeline.restorer.describe()
    if not args.quiet and rank == 0:
        print(f"profile: {profile} ({reason}); device {desc.get('device')}, precision {desc.get('precision')}"
              + (f"; {world} processes" if world > 1 else ""), file=sys.stderr)

    out_dir.mkdir(parents=True, exist_ok=True)
    stems = _output_stems(files, args.suffix)
    done = skipped = 0
    failed: list[tuple[Path, str]] = []
    bar = tqdm(indexed, disable=args.quiet or rank > 0, unit="img", dynamic_ncols=True, file=sys.stderr)
    for index, path in bar:
        bar.set_postfix_str(path.name[:30])
        sidecar_path = out_dir / f"{stems[path]}.json"
        if sidecar_path.exists() and not args.overwrite:
            try:  # the sidecar is written last, so it marks a finished output
                prev = json.loads(sidecar_path.read_text(encoding="utf-8"))
                if (out_dir / prev["output"]).exists():
                    skipped += 1
                    continue
            except (OSError, ValueError, KeyError):
                pass  # unreadable sidecar: redo this image
        try:
            loaded = read_image(path, max_pixels=args.max_pixels)
        except ImageReadError as e:
            failed.append((path, str(e)))
            tqdm.write(f"error: {path}: {e}", file=sys.stderr)
            continue
        result = None
        for event in pipeline.run(loaded, seed=args.seed + index):
            if isinstance(event, Done):
                result = event.result
            elif isinstance(event, Failed):
                failed.append((path, event.message))
                tqdm.write(f"error: {path}: {event.message}", file=sys.stderr)
                if args.debug and event.error is not None:
                    traceback.print_exception(event.error)
        if result is None:
            continue
        try:
            ext = _output_ext(args.ext, path, result.alpha is not None, loaded.bit_depth)
            out_name = f"{stems[path]}.{ext}"
            write_kw = {"mode": loaded.mode, "bit_depth": loaded.bit_depth if ext == "png" else 8,
                        "icc_profile": loaded.icc_profile}
            stage_files: dict[str, str] = {}
            if args.save_stages:
                for stage, img in result.stages.items():
                    name = f"{stems[path]}_{stage}.{ext}"
                    write_image(out_dir / name, img.rgb, img.alpha, **write_kw)
                    stage_files[stage] = name
            write_image(out_dir / out_name, result.rgb, result.alpha, **write_kw)
            notes = list(loaded.notes) + [getattr(pipeline.policy, "note", "")]
            sidecar = build_sidecar(path.name, out_name, result, reason, stage_files, [n for n in notes if n], loaded)
            atomic_write_text(sidecar_path, json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n")
            done += 1
        except (OSError, ValueError) as e:
            failed.append((path, f"cannot write output ({' '.join(str(e).split())})"))
            tqdm.write(f"error: {path}: cannot write output ({e})", file=sys.stderr)
    bar.close()
    summary = f"restored {done}, skipped {skipped} (already done), failed {len(failed)} → {out_dir}"
    if world > 1:
        summary = f"[process {rank}/{world}] " + summary
    print(summary, file=sys.stderr)
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
