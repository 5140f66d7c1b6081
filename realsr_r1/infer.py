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
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .cot import STAGES
from .imageio import DEFAULT_MAX_PIXELS, ImageReadError, atomic_write_text, read_image, write_image
from .outputs import (Layout, UsageError, check_no_collision, find_inputs, own_results, plan_layout, read_sidecar,
                      recorded_files, remove_stale, settings_difference)
from .pipeline import Done, Failed
from .sidecar import build_sidecar


EXIT_CODES = "exit status: 0 when every file succeeded, 1 when some failed (or were kept from other settings), " \
    "2 for a usage error (nothing was done), 130 when interrupted"


def build_parser() -> argparse.ArgumentParser:
    from .weights import SHORT_NAMES

    from .cli import Parser

    p = Parser(
        prog="python -m realsr_r1.infer",
        description="Restore low-quality images: reason about the degradation (VLCoT), then restore "
        "coarse to fine. Writes NAME.png and NAME.json (the chain of thought) per input.",
        epilog=EXIT_CODES,
    )
    p.add_argument("--input", "-i", required=True, help="an image file or a folder of images")
    p.add_argument("--output", "-o", required=True,
                   help="output folder (created if missing); with a single --input file, also a file name "
                   "such as out.png (out.json is written beside it)")
    p.add_argument("--recursive", "-r", action="store_true",
                   help="also restore the images in subfolders, mirroring the folder tree in the output")
    p.add_argument("--profile", default="auto",
                   help="auto, lite, full, tiny, or a YAML config path (default auto: full where its weights "
                   "and a CUDA GPU are present, else lite)")
    p.add_argument("--model", choices=sorted(SHORT_NAMES), default=None,
                   help="one expert for the lite profile instead of its chooser: x4plus (photos, clean), df2k (photos, "
                   "faithful) or animevideov3 (anime, fast); sets restorer.path (default: the profile's experts, "
                   "x4plus and df2k)")
    p.add_argument("--fidelity", default=None, metavar="auto|auto+X|0..1",
                   help="a position on the lite profile's fidelity ladder: 0 = the most natural-looking (x4plus "
                   "alone), 1 = the most faithful (DF2K alone), between = DF2K's low frequencies, then its detail "
                   "where x4plus has texture; auto = a reward picks per region, reading the degradation; auto+0.2 / "
                   "auto-0.2 = auto's positions moved towards faithful / natural (restorer.fidelity; default auto)")
    p.add_argument("--fidelity-map", default=None, metavar="FILE",
                   help="a grey image painting the ladder position per pixel (white = faithful, black = "
                   "natural), resized to each input; replaces --fidelity (restorer.fidelity_map)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set restorer.tile_pad=32 (repeatable)")
    p.add_argument("--adapter", default=None,
                   help="a LoRA adapter folder from python -m realsr_r1.train (profiles with a VLM policy; "
                   "default none)")
    p.add_argument("--restorer-adapter", default=None, metavar="PATH",
                   help="the diffusion restorer's adapter: the x4 upscaler's LoRA folder from training (on for the stage it "
                   "was trained on), or the one-step restorer's OSEDiff-format file (sets restorer.adapter)")
    p.add_argument("--scale", type=float, default=None,
                   help="final stage scale (default: the profile's, 4)")
    p.add_argument("--outscale", type=float, default=None,
                   help="final output scale, any float (alias of --scale, as in Real-ESRGAN; default 4)")
    p.add_argument("--tile", type=int, default=None,
                   help="tile size, 0 = no tiling: input pixels for Real-ESRGAN (restorer.tile; default 256 on "
                   "CPU, 512 on CUDA); latent pixels (= input pixels at the final x4 stage) for the diffusion "
                   "restorer (restorer.tile)")
    p.add_argument("--tile-pad", type=int, default=None,
                   help="overlap between tiles, in the same unit: restorer.tile_pad for Real-ESRGAN (default "
                   "16), restorer.tile_overlap for the diffusion restorer")
    p.add_argument("--ext", default="auto", choices=["auto", "png", "jpg", "webp"],
                   help="output format (default auto: the input's, png for alpha/16-bit and other formats); "
                   "jpg cannot hold alpha or 16 bits, so such inputs are written as png, and the run says so")
    p.add_argument("--suffix", default="", help="appended to output names: NAME_SUFFIX.png (default none)")
    p.add_argument("--seed", type=int, default=None,
                   help="base seed (default 0); image i uses seed + i (profiles with a VLM or diffusion)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, … (default auto)")
    p.add_argument("--fp32", action="store_true",
                   help="full precision (default: bf16/fp16 where the hardware has it)")
    p.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16", "fp16", "int8"],
                   help="the restorer's precision (restorer.precision; default auto: the fastest that keeps "
                   "quality on this machine: bf16 on CPUs with bf16 units, else fp32, and int8 for DF2K, "
                   "which keeps its quality in it). int8 for all: OpenVINO, about 1.7x faster than fp32 but "
                   "x4plus is 0.2 dB lower on real camera pairs; calibrated once on shipped images "
                   "(restorer.calibration: a folder of your own)")
    p.add_argument("--save-stages", action="store_true",
                   help="also write NAME_rough.png, NAME_middle.png, NAME_final.png")
    p.add_argument("--overwrite", action="store_true",
                   help="redo outputs that exist (default: keep them; a result made with these settings "
                   "counts as done, so an interrupted run resumes)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse inputs larger than this many pixels (default {DEFAULT_MAX_PIXELS:,})")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="print tracebacks for failures (and --verbose)")
    p.add_argument("--verbose", action="store_true", help="also show the libraries' logs and warnings")
    return p


def _output_ext(requested: str, src: Path, has_alpha: bool, bit_depth: int) -> tuple[str, str | None]:
    """(the format written, why it differs from the one asked for, or None)."""
    if has_alpha or bit_depth == 16:
        if requested == "jpg":  # JPEG cannot hold alpha or 16 bits (Real-ESRGAN writes png too)
            return "png", f"JPEG cannot hold {'alpha' if has_alpha else '16 bits'}: written as PNG"
        if requested == "auto":
            return "png", None
    if requested == "webp" and bit_depth == 16:
        return "webp", "WebP cannot hold 16 bits: written as 8-bit WebP"
    if requested != "auto":
        return requested, None
    ext = src.suffix.lower().lstrip(".")
    return ({"jpeg": "jpg"}.get(ext, ext) if ext in ("png", "jpg", "jpeg", "webp") else "png"), None


def _shard() -> tuple[int, int, int]:
    """(rank, world size, local rank) under `accelerate launch` / torchrun; (0, 1, 0) otherwise."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), max(1, world), int(os.environ.get("LOCAL_RANK", "0"))


def plan_outputs(args: argparse.Namespace) -> tuple[list[Path], Layout]:
    """The inputs and where their results go, or a UsageError before any work (data safety first)."""
    src, output = Path(args.input), Path(args.output)
    nested = src.is_dir() and output.resolve() != src.resolve() and output.resolve().is_relative_to(src.resolve())
    files = find_inputs(src, args.recursive, skip=output if nested else None)
    if src.is_dir() and output.resolve() == src.resolve():
        # In place with a suffix: results of earlier runs are not inputs.
        own = own_results(output, args.recursive)
        files = [f for f in files if f.resolve() not in own]
        if not files:
            raise UsageError(f"{src}: the only images are results of earlier runs")
    layout = plan_layout(src, output, files, suffix=args.suffix, ext=args.ext)
    check_no_collision(layout, files, args.save_stages)
    return files, layout


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
    scale = args.outscale if args.outscale is not None else args.scale
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
    if args.precision is not None:
        if args.fp32 and args.precision != "fp32":
            raise ConfigError(f"--fp32 and --precision {args.precision} contradict each other: give one")
        if args.precision == "int8" and restorer_type != "realesrgan":
            raise ConfigError(f"--precision int8 runs Real-ESRGAN on OpenVINO; the {profile} profile's restorer "
                              f"is the {restorer_type} one")
        restorer[parts[1].precision] = args.precision
    if args.model:
        from .weights import SHORT_NAMES

        if restorer_type != "realesrgan":
            raise ConfigError(f"--model chooses Real-ESRGAN weights; the {profile} profile's restorer is the "
                              f"{restorer_type} one (set its model with --set restorer.model=…)")
        restorer["path"] = SHORT_NAMES[args.model]
    if args.fidelity is not None:
        from .restorers.lite import parse_fidelity

        if "fidelity" not in valid_keys(parts[1]):
            raise ConfigError(f"--fidelity does not apply to the {profile} profile: it dials between the lite "
                              f"profile's experts ({profile}'s restorer is the {restorer_type} one)")
        try:
            restorer["fidelity"] = str(parse_fidelity(args.fidelity))
        except ValueError as e:
            raise ConfigError(f"--{e}") from None
    if args.fidelity_map is not None:
        if "fidelity_map" not in valid_keys(parts[1]):
            raise ConfigError(f"--fidelity-map does not apply to the {profile} profile: it paints positions on the "
                              f"lite profile's ladder ({profile}'s restorer is the {restorer_type} one)")
        restorer["fidelity_map"] = str(Path(args.fidelity_map))
    if args.adapter:
        if "adapter" not in valid_keys(parts[0]):
            raise ConfigError(f"--adapter does not apply to the {profile} profile: it needs a profile with a "
                              f"VLM policy ({profile}'s is the {policy_type})")
        policy["adapter"] = str(Path(args.adapter))
    if args.restorer_adapter:
        if "adapter" not in valid_keys(parts[1]):
            raise ConfigError(f"--restorer-adapter does not apply to the {profile} profile: it needs a profile "
                              f"with the diffusion restorer ({profile}'s is the {restorer_type} one)")
        restorer["adapter"] = str(Path(args.restorer_adapter))
    if restorer.get("adapter") and restorer_type == "diffusion":
        from .restorers.adapter import check_adapter_folder

        check_adapter_folder(restorer["adapter"])  # a wrong folder is said before any model loads
    cfg["policy"], cfg["restorer"] = policy, restorer
    notes = []
    if args.seed is not None and not any(p.seeded for p in parts):
        notes.append(f"--seed has no effect on the {profile} profile: its {policy_type} policy and "
                     f"{restorer_type} restorer are deterministic")
    from .tiny import note_for

    if note_for(cfg):
        notes.append(note_for(cfg))
    return profile, reason, cfg, notes


def _device(requested: str, world: int, local_rank: int) -> str:
    """Under accelerate launch with `auto`, each process takes its own GPU."""
    if world > 1 and requested == "auto":
        import torch

        if torch.cuda.is_available():
            return f"cuda:{local_rank % torch.cuda.device_count()}"
    return requested


def _check_runnable(profile: str, device: str) -> None:
    """The full profile on a machine without a CUDA GPU: say so, rather than load a 3B VLM on the CPU."""
    if profile != "full" or device != "auto":
        return
    import torch

    if torch.cuda.is_available():
        return
    from .download import full_profile_present
    from .profiles import ConfigError

    missing = "" if full_profile_present() else \
        "; its weights are not here either (python -m realsr_r1.download full)"
    raise ConfigError("the full profile needs a CUDA GPU and torch sees none (torch.cuda.is_available() is "
                      f"False){missing}; use --profile lite, or --device cpu to run it on the CPU, very slowly")


class _Folder:
    """Restores files into one output layout: skip what is done, keep what other settings made,
    one line per failure."""

    def __init__(self, pipeline, args: argparse.Namespace, files: list[Path], layout: Layout, reason: str,
                 settings: dict, model_note: str | None = None):
        self.pipeline = pipeline
        self.model_note = model_note  # what every sidecar says of the models (the tiny ones' random weights)
        self.args = args
        self.layout = layout
        self.reason = reason
        self.seed = args.seed or 0
        self.settings = settings
        self.inputs = {f.resolve() for f in files}
        self.format_notes: set[str] = set()  # each format change is said once per run

    def name(self, path: Path) -> str:
        """The input as the sidecar and the summary name it: relative to the input folder."""
        return Path(self.layout.names[path]).parent.joinpath(path.name).as_posix()

    def status(self, index: int, path: Path) -> tuple[str, str | None]:
        """("todo" | "done" | "other", how the settings differ). The sidecar is written last, so one
        whose image exists (and stage images, with --save-stages) marks a finished result."""
        sidecar = self.layout.sidecar(path)
        if self.args.overwrite or not sidecar.exists():
            return "todo", None
        record = read_sidecar(sidecar)
        if record is None or not all(p.is_file() for p in recorded_files(sidecar, record)[:1]):
            return "todo", None  # unreadable sidecar, or its image is gone: redo this image
        difference = settings_difference(record.get("settings"), self.settings)
        if difference is None and "seed" in self.settings and record.get("seed") != self.seed + index:
            difference = f"seed {record.get('seed')} → {self.seed + index} (files were added or removed)"
        if difference is not None:
            return "other", difference
        files = [(record.get("stages", {}).get(s) or {}).get("file") for s in STAGES]
        if self.args.save_stages and not all(f and (sidecar.parent / f).is_file() for f in files):
            return "todo", None  # done before without --save-stages (or they were deleted): make them now
        return "done", None

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
        layout = self.layout
        sidecar_path = layout.sidecar(path)
        old = read_sidecar(sidecar_path) if sidecar_path.exists() else None
        ext, change = _output_ext(layout.ext, path, result.alpha is not None, loaded.bit_depth)
        notes = [n for n in [self.model_note, *loaded.notes, self.pipeline.policy.note] if n]
        if change:
            notes.append(change)
            if change not in self.format_notes:
                self.format_notes.add(change)
                tqdm.write(f"note: {path.name}: {change} (the same for any other such input in this run)",
                           file=sys.stderr)
        write_kw = {"mode": loaded.mode, "bit_depth": loaded.bit_depth if ext == "png" else 8,
                    "icc_profile": loaded.icc_profile}
        sidecar_path.parent.mkdir(parents=True, exist_ok=True)
        written = [layout.image(path, ext)]
        stage_files: dict[str, str] = {}
        if self.args.save_stages:
            for stage, img in result.stages.items():
                target = layout.stage(path, stage, ext)
                write_image(target, img.rgb, img.alpha, **write_kw)
                stage_files[stage] = target.name
                written.append(target)
        write_image(written[0], result.rgb, result.alpha, **write_kw)
        record = build_sidecar(self.name(path), written[0].name,
                               result, self.reason, stage_files, notes, loaded, settings=self.settings)
        atomic_write_text(sidecar_path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        if old is not None:  # --overwrite: the old sidecar's files that this result does not replace
            remove_stale(sidecar_path, old, {p.resolve() for p in written}, self.inputs)


@dataclass
class Counts:
    """One process's tally; under `accelerate launch` the main process adds up every process's."""

    restored: int = 0
    skipped: int = 0
    failed: int = 0
    other: list[tuple[str, str]] = field(default_factory=list)  # (input, how its settings differ)

    def add(self, more: "Counts") -> None:
        self.restored += more.restored
        self.skipped += more.skipped
        self.failed += more.failed
        self.other += more.other

    def summary(self, target: Path) -> str:
        where = f" → {target}" if self.restored or self.skipped else ""  # nothing written: no file to name
        lines = [f"restored {self.restored}, skipped {self.skipped} (already done), failed {self.failed}{where}"]
        if self.other:
            reasons = sorted({why for _, why in self.other})
            names = ", ".join(name for name, _ in self.other[:5]) + (", …" if len(self.other) > 5 else "")
            lines.append(f"{len(self.other)} made with other settings ({'; '.join(reasons[:2])}"
                         f"{'; …' if len(reasons) > 2 else ''}), kept: {names}; --overwrite to redo them")
        return "\n".join(lines)


def _restore_all(folder: _Folder, indexed: list[tuple[int, Path]], quiet: bool) -> Counts:
    """The tally over this process's share of the files."""
    counts = Counts()
    bar = tqdm(indexed, disable=quiet, unit="img", dynamic_ncols=True, file=sys.stderr)
    for index, path in bar:
        bar.set_postfix_str(path.name[:30])
        state, difference = folder.status(index, path)
        if state == "done":
            counts.skipped += 1
            continue
        if state == "other":
            counts.other.append((folder.name(path), difference))
            continue
        error = folder.restore(index, path)
        if error is None:
            counts.restored += 1
        else:
            counts.failed += 1
            tqdm.write(f"error: {path}: {error}", file=sys.stderr)
    bar.close()
    return counts


def _gather(counts: Counts, world: int) -> Counts | None:
    """Every process's tally on the main process (None elsewhere), through torch.distributed as
    `accelerate launch` / torchrun set it up (MASTER_ADDR/PORT). Without it each process reports its own."""
    import os

    if world == 1 or not os.environ.get("MASTER_ADDR"):
        return counts
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        # gloo works on every machine and only carries a few numbers; a process that dies makes the
        # launcher stop the others, so the long timeout only covers shards finishing at different times.
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=12))
    tallies: list = [None] * world
    dist.all_gather_object(tallies, counts)
    main_process = dist.get_rank() == 0
    dist.destroy_process_group()
    if not main_process:
        return None
    total = Counts()
    for t in tallies:
        total.add(t)
    return total


def _settings(profile: str, cfg: dict, layout: Layout, pipeline, args: argparse.Namespace, seeded: bool) -> dict:
    """What makes a result what it is; a result counts as done only when its sidecar records these."""
    from .profiles import without_defaults

    config = without_defaults(cfg)
    config.pop("scale", None)
    described = pipeline.restorer.describe()
    ran = described.get("weights")  # the file that ran and its hash, as one value
    lora = described.get("adapter")  # a fused UNet LoRA: retrained in the same folder is other settings
    settings = {"profile": profile, "scale": pipeline.scale, "ext": layout.ext,
                "weights": f"{ran['file']} ({ran['sha256']})" if ran else None,
                "restorer_adapter": f"{lora['path']} ({lora['sha256']})" if lora else None,
                "precision": described.get("precision"),
                "chain": pipeline.policy.describe().get("mode")}  # one-pass or reflect (VLM policies)
    if seeded:
        settings["seed"] = args.seed or 0
    return {**settings, "config": config}


def run(args: argparse.Namespace) -> int:
    from .profiles import ConfigError, build_pipeline, seeded

    try:
        files, layout = plan_outputs(args)
        # Under accelerate launch every process takes every world-th file: no file twice, none
        # missing. Seeds stay tied to the file's place in the whole list, so sharding changes nothing.
        rank, world, local_rank = _shard()
        device = _device(args.device, world, local_rank)
        profile, reason, cfg, notes = profile_config(args)
        _check_runnable(profile, args.device)
        pipeline = build_pipeline(cfg, device=device, fp32=args.fp32)
        layout.out_dir.mkdir(parents=True, exist_ok=True)
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
    settings = _settings(profile, cfg, layout, pipeline, args, seeded(cfg))
    from .tiny import note_for

    folder = _Folder(pipeline, args, files, layout, reason, settings, note_for(cfg))
    counts = _restore_all(folder, list(enumerate(files))[rank::world], args.quiet or rank > 0)
    total = _gather(counts, world)
    if total is not None:
        shard = f"[process {rank}/{world}] " if total is counts and world > 1 else ""
        print("\n".join(shard + line for line in total.summary(layout.target).splitlines()), file=sys.stderr)
    incomplete = any(c is not None and (c.failed or c.other) for c in (counts, total))
    return 1 if incomplete else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import quiet

    quiet.configure(args.verbose or args.debug)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted: finished outputs are kept; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
