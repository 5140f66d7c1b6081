"""Every command block of the README and docs/ runs as written, in order, in a fresh copy of the
repository's tracked files, with the environment the README's install command makes (its Python
first on PATH, as `source .venv/bin/activate` puts it); then the README's Train block runs again, as
a newcomer repeating it would, and everything the commands wrote is ignored by git. A block that
cannot run here says why, in an HTML comment on the line before it: `<!-- not run: REASON -->` (the
install, a server, a GPU, the model hub)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from test_quiet import _foreign

MARK = re.compile(r"^<!-- not run: (.+\S) -->$")
# README first, then the pages in the order its documentation table lists them
PAGES = ["README.md"] + re.findall(r"^\| \[(docs/[\w.-]+\.md)\]", (REPO / "README.md").read_text(encoding="utf-8"), re.M)
PLACEHOLDERS = re.compile(r"photos/|HR_DIR|LQ_DIR|\[--|\bDIR\b|runs/restorer-nr|configs/grpo\.yaml")


def command_blocks() -> list[tuple[str, int, str, str | None]]:
    """(page, line, script, why it is not run or None) for each ```bash block, in reading order."""
    found = []
    for page in PAGES:
        text = (REPO / page).read_text(encoding="utf-8")
        for m in re.finditer(r"^[ \t]*```bash\n(.*?)^[ \t]*```", text, re.S | re.M):
            line = text.count("\n", 0, m.start()) + 1
            before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
            mark = MARK.match(before)
            found.append((page, line, m.group(1), mark.group(1) if mark else None))
    return found


def test_every_page_is_listed_and_every_block_runs_or_says_why():
    """The README lists every page of docs/; a block that is run has no placeholder (photos/,
    HR_DIR, [--optional]) and calls no bare python3 or .venv path (the environment is active)."""
    assert sorted(PAGES[1:]) == sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md"))
    blocks = command_blocks()
    assert len(blocks) > 10
    for page, line, script, why in blocks:
        if why is None:
            assert not PLACEHOLDERS.search(script), f"{page}:{line}: a placeholder in a block that runs"
            assert ".venv/bin" not in script, f"{page}:{line}: the docs' commands run in the active environment"


def _copy_of_the_repository(dest: Path) -> None:
    """What a clone has: the tracked files as they are in the working tree, nothing else (a run of
    the README's commands here leaves outputs that must not decide this test), as a git repository
    of its own with one commit, so that `git status` shows what the commands add."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = REPO / name
        if src.is_file() or src.is_symlink():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            if src.is_symlink():
                os.symlink(os.readlink(src), dest / name)
            else:
                shutil.copy2(src, dest / name)
    git = ["git", "-c", "user.name=docs", "-c", "user.email=docs@localhost", "-c", "commit.gpgsign=false"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "clone"]):
        subprocess.run(git + cmd, cwd=dest, capture_output=True, check=True)


def test_the_documented_commands_run_as_written(tmp_path, weights_dir):
    clone = tmp_path / "clone"
    _copy_of_the_repository(clone)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "HF_HUB_OFFLINE": "1", "REALSR_R1_WEIGHTS": str(weights_dir)}  # converted weights: shared, not hub
    for var in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS"):
        env.pop(var, None)  # set by an in-process quiet.configure of another test: the commands must set them
    ran = 0
    blocks = [b for b in command_blocks() if b[3] is None]
    train = [b for b in blocks if b[0] == "README.md" and "realsr_r1.train " in b[2]]
    assert len(train) == 1, "the README has one Train block"
    for page, line, script, why in blocks + [(page, line, script, "again") for page, line, script, _ in train]:
        r = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=clone, env=env, capture_output=True,
                           text=True, timeout=900)
        again = " (run again)" if why == "again" else ""
        assert r.returncode == 0, (f"{page}:{line}{again} failed ({r.returncode}):\n{script}\n{r.stdout[-1500:]}\n"
                                   f"{r.stderr[-3000:]}")
        commands = [c for c in script.splitlines() if c.strip() and not c.lstrip().startswith("#")]
        quiet = ("python -m realsr_r1.infer ", "python -m realsr_r1.train ", "python -m realsr_r1.data ")
        if all(c.startswith(quiet) for c in commands):  # quiet by default (test_quiet.py): training too
            lines = [x.strip() for x in re.split(r"[\r\n]", r.stdout + r.stderr) if x.strip()]
            assert not _foreign(lines), f"{page}:{line}{again}: lines from the libraries: {_foreign(lines)[:5]}"
        ran += 1
    assert ran >= 9
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=clone,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    assert not status, f"the commands wrote what .gitignore does not cover, or changed tracked files: {status[:10]}"


def test_the_cli_page_documents_every_option():
    """docs/cli.md names every option `python -m realsr_r1.infer --help` lists."""
    from realsr_r1.infer import build_parser

    page = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    missing = [a.option_strings[0] for a in build_parser()._actions
               if a.option_strings and a.option_strings[0] != "-h"
               and not any(f"`{o}" in page for o in a.option_strings)]
    assert not missing, f"not in docs/cli.md: {missing}"
