"""The Gradio demo, running as users start it (`python app.py`): driven through gradio_client and
in a real headless Chromium."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, photo
from realsr_r1.restorers.lite import DEFAULT_GATES
from realsr_r1.tiny import build_tiny_upscaler
from realsr_r1.tiny import build_tiny_vlm

ARTIFACTS = Path(os.environ.get("REALSR_R1_ARTIFACTS", REPO / "tests" / "artifacts"))
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_served(proc, url, log: Path, tries: int = 240) -> None:
    for _ in range(tries):
        if proc.poll() is not None:
            break
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            time.sleep(0.5)
    proc.kill()
    pytest.fail(f"app did not start: {log.read_text()[-2000:]}")


def stop_and_wait(proc, stop=signal.SIGTERM, timeout: float = 30) -> int:
    """Send `stop` and return the exit status; fail (and kill it) if it is still running after `timeout` s."""
    proc.send_signal(stop)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"still running {timeout:.0f} s after {signal.Signals(stop).name}")


def app_command(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "app.py"), *args]


def own_temp_env(tmp_path: Path) -> dict:
    """The app makes (and must delete) its own temp folder, here under tmp_path."""
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_TEMP_DIR"}
    return {**env, "TMPDIR": str(tmp_path), "REALSR_R1_WEIGHTS": str(tmp_path / "no-weights"), "HF_HUB_OFFLINE": "1",
            "GRADIO_ANALYTICS_ENABLED": "False"}


@pytest.fixture(scope="module")
def app(tmp_path_factory, weights_dir):
    """The demo on 127.0.0.1 with the lite profile and the tiny full profile (configs/tiny.yaml).
    Its weights folder shares the session's compiled models (the INT8 calibration runs once)."""
    from realsr_r1.restorers.esrgan import ESRGANRestorer

    root = tmp_path_factory.mktemp("app")
    # Where the CPU has no bf16 units DF2K runs in INT8 by default: calibrated here, once (minutes on
    # 2 cores), not inside the first page's wait for its result.
    ESRGANRestorer.from_pretrained("realsr-df2k", device="cpu")
    (weights_dir / "compiled").mkdir(exist_ok=True)
    (root / "weights").mkdir()
    (root / "weights" / "compiled").symlink_to(weights_dir / "compiled", target_is_directory=True)
    build_tiny_vlm(root / "weights" / "tiny-vlm")
    build_tiny_upscaler(root / "weights" / "tiny-upscaler")
    port = free_port()
    env = {**os.environ, "REALSR_R1_WEIGHTS": str(root / "weights"), "GRADIO_TEMP_DIR": str(root / "gradio"),
           "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    log = open(root / "app.log", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--port", str(port), "--profile",
                             str(REPO / "configs" / "tiny.yaml"), "--device", "cpu", "--concurrency", "2",
                             "--max-size", "200000"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    wait_until_served(proc, url, root / "app.log")
    yield {"url": url, "root": root, "log": root / "app.log"}
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stopped_by_a_signal_it_deletes_its_temp_folder(tmp_path, stop):
    """kill / systemd / docker stop send SIGTERM, a terminal Ctrl-C: both close the server and delete the folder."""
    port = free_port()
    log = tmp_path / "app.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(app_command("--port", str(port), "--profile", "lite"), cwd=REPO,
                                env=own_temp_env(tmp_path), stdout=out, stderr=subprocess.STDOUT)
    wait_until_served(proc, f"http://127.0.0.1:{port}/", log)
    made = list(tmp_path.glob("realsr-r1-demo-*"))
    assert len(made) == 1 and (made[0] / "results").is_dir()
    rc = stop_and_wait(proc, stop)
    assert rc == 0, log.read_text()[-2000:]
    assert not made[0].exists()
    assert "Traceback" not in log.read_text()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_that_gradio_swallows_still_ends_the_process(tmp_path, stop):
    """A KeyboardInterrupt that lands where launch() swallows it (here: a launch that ignores it and
    serves on) would leave the demo running after Ctrl-C or SIGTERM: the deadline of
    SHUTDOWN_GRACE_S (shortened here) ends the process anyway, exit 0, temp folder deleted."""
    code = ("import sys, time, gradio as gr, app\n"
            "def deaf_launch(self, **kw):\n"
            "    print('serving', flush=True)\n"
            "    while True:\n"
            "        try:\n"
            "            time.sleep(0.1)\n"
            "        except KeyboardInterrupt:\n"
            "            pass\n"
            "gr.Blocks.launch = deaf_launch\n"
            "app.SHUTDOWN_GRACE_S = 2.0\n"
            "sys.exit(app.main(['--profile', 'lite', '--port', sys.argv[1]]))\n")
    log = tmp_path / "app.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", code, str(free_port())], cwd=REPO, env=own_temp_env(tmp_path),
                                stdout=out, stderr=subprocess.STDOUT)
    for _ in range(240):
        if "serving" in log.read_text() or proc.poll() is not None:
            break
        time.sleep(0.25)
    made = list(tmp_path.glob("realsr-r1-demo-*"))
    assert "serving" in log.read_text() and len(made) == 1, log.read_text()[-2000:]
    t = time.monotonic()
    rc = stop_and_wait(proc, stop)
    assert rc == 0 and 1.5 < time.monotonic() - t < 15, log.read_text()[-2000:]
    assert not made[0].exists()
    assert "still running 2 s after the signal" in log.read_text()


def test_sigterm_during_a_restoration_exits_cleanly(tmp_path):
    """docker stop while someone's image is being restored: exit 0 and no folder left, not an abort
    from torch torn down mid-computation."""
    build_tiny_vlm(tmp_path / "no-weights" / "tiny-vlm")
    build_tiny_upscaler(tmp_path / "no-weights" / "tiny-upscaler")
    port = free_port()
    log = tmp_path / "app.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(app_command("--port", str(port), "--profile", str(REPO / "configs" / "tiny.yaml"),
                                            "--device", "cpu"), cwd=REPO, env=own_temp_env(tmp_path), stdout=out,
                                stderr=subprocess.STDOUT)
    wait_until_served(proc, f"http://127.0.0.1:{port}/", log)
    photo((240, 180)).save(tmp_path / "big.png")
    job = submit(f"http://127.0.0.1:{port}/", tmp_path / "big.png", steps=50)
    for _ in range(240):
        if "start big.png" in log.read_text():
            break
        time.sleep(0.25)
    time.sleep(1)
    assert not job.done(), "the restoration ended before the signal: make it slower"
    rc = stop_and_wait(proc)
    assert rc == 0, log.read_text()[-2000:]
    assert not list(tmp_path.glob("realsr-r1-demo-*"))


@pytest.mark.parametrize("profile, expected", [
    ("nosuch", "error: unknown profile 'nosuch'"),
    ("missing.yaml", "error: no profile config missing.yaml"),
])
def test_an_unknown_profile_is_an_error_before_launching(tmp_path, profile, expected):
    done = subprocess.run(app_command("--profile", profile, "--port", str(free_port())), cwd=tmp_path,
                          env=own_temp_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and done.stderr.startswith(expected), done.stderr
    assert not list(tmp_path.glob("realsr-r1-demo-*"))  # its temp folder is gone too


def test_profile_full_that_cannot_run_is_said_in_the_log_and_the_page(tmp_path):
    port = free_port()
    log = tmp_path / "app.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(app_command("--port", str(port), "--profile", "full"), cwd=REPO,
                                env=own_temp_env(tmp_path), stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_served(proc, f"http://127.0.0.1:{port}/", log)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=10) as r:
            config = json.load(r)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    reason = "its weights are not in"
    logged = [line for line in log.read_text().splitlines() if reason in line]
    assert len(logged) == 1 and "python -m realsr_r1.download full" in logged[0]
    assert "starting with lite" in logged[0]
    props = {c["props"].get("elem_id"): c["props"] for c in config["components"] if "props" in c}
    assert reason in props["warning"]["value"] and "starting with lite" in props["warning"]["value"]
    assert props["profile"]["value"] == "lite" and "full" not in [c[0] for c in props["profile"]["choices"]]


def test_start_profiles_without_a_cuda_gpu(monkeypatch):
    import torch

    import realsr_r1.download
    from realsr_r1.demo import start_profiles

    monkeypatch.setattr(realsr_r1.download, "full_profile_present", lambda *a: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    profiles, selected, warning = start_profiles("full")
    assert selected == "lite" and "full" in profiles  # still offered: it runs on the CPU, slowly
    assert "no CUDA GPU" in warning and "starting with lite" in warning
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert start_profiles("full") == ({"auto": "auto", "lite": "lite", "full": "full"}, "full", None)
    assert start_profiles("tiny")[:2] == ({"auto": "auto", "lite": "lite", "full": "full", "tiny": "tiny"}, "tiny")


def test_help_shows_every_default():
    from realsr_r1.imageio import DEFAULT_MAX_PIXELS

    done = subprocess.run(app_command("--help"), cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0
    options = re.split(r"\n  (?=-)", done.stdout.split("options:")[1].split("\n\n")[0])[1:]  # one per option
    assert len(options) == 9 and all("(default: " in o for o in options if not o.startswith("-h")), done.stdout
    for shown in ("(default: 7860)", "(default: 127.0.0.1)", "(default: auto)", "auto, lite, full, tiny",
                  f"(default: {DEFAULT_MAX_PIXELS})", "SIGTERM"):
        assert shown in done.stdout


def submit(url, path, profile="tiny", scale=4, steps=4, fidelity="auto"):
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    auto = fidelity == "auto"
    return client.submit(handle_file(str(path)), profile, scale, steps, 0, "wavelet", auto, 0.5 if auto else fidelity,
                         None, api_name="/restore")


OUTPUTS = ["status", "reasoning", "degradation", "understanding", "rough", "middle", "final", "compare", "files",
           "candidates", "choice"]


def states(job):
    """The page's state after each streamed update (the app sends only what changed; an update
    that also shows or hides a component carries its value)."""
    out, state = [], [None] * len(OUTPUTS)

    def merged(new, old):
        if isinstance(new, dict) and new.get("__type__") == "update":
            return new.get("value", old)
        return new

    for update in job:
        assert len(update) == len(OUTPUTS)
        state = [merged(new, old) for new, old in zip(update, state)]
        out.append(state)
    return out


def first_index(updates, test):
    return next((i for i, u in enumerate(updates) if test(u)), None)


def test_stream_order_and_files(app, tmp_path):
    photo((24, 16)).save(tmp_path / "dog.png")
    job = submit(app["url"], tmp_path / "dog.png")
    updates = states(job)
    status, reasoning, degradation, understanding, rough, middle, final, compare, files, strip, choice = updates[-1]
    assert status.startswith("Done"), status
    assert not strip and choice == ""  # one diffusion restorer: nothing was chosen
    text_at = first_index(updates, lambda u: u[1])
    stage_at = [first_index(updates, lambda u, k=k: u[k]) for k in (4, 5, 6)]
    assert text_at is not None and None not in stage_at
    assert text_at < stage_at[0] < stage_at[1] < stage_at[2]  # text first, then rough → middle → final
    assert first_index(updates, lambda u: "step" in u[0]) is not None  # diffusion previews streamed
    assert reasoning == json.loads(Path(files[1]).read_text())["policy_output"]
    assert sorted(Path(f).suffix for f in files) == [".json", ".png"]
    side = json.loads(Path(next(f for f in files if f.endswith(".json"))).read_text())
    assert side["input"] == "dog.png" and side["stages"]["final"]["size"] == [96, 64]
    assert compare is not None


def test_lite_profile_and_degradation_labels(app, tmp_path):
    photo((64, 48)).save(tmp_path / "p.png")  # ×2 gives 128×96: big enough for NIQE to score the candidates
    updates = states(submit(app["url"], tmp_path / "p.png", profile="lite", scale=2))
    status, _, degradation, *_, files, strip, choice = updates[-1]
    assert status.startswith("Done"), status
    labels = [d["token"] for d in degradation]  # HighlightedText over the API: [{"token", "class_or_confidence"}]
    assert {d["token"]: d["class_or_confidence"] for d in degradation}["downsample x2"] is None
    assert any(label.startswith("noise:") for label in labels) and "downsample x2" in labels
    # Two experts: the chooser's candidates, each with its scores, the winner starred and said why.
    side = json.loads(Path(next(f for f in files if f.endswith(".json"))).read_text())
    rows = side["choice"]["candidates"]
    captions = [item["caption"] for item in strip][1:]  # Gallery over the API: [{"image", "caption"}]; the map first
    assert strip[0]["caption"].startswith("position per region")
    winner, labels = side["choice"]["winner"], [r["label"] for r in rows]
    assert 1 <= len(rows) <= 2 + len(DEFAULT_GATES) and len(captions) == len(labels)
    assert all(c.split(" — ", 1)[1].startswith(label) for c, label in zip(captions, labels))
    starred = [c for c in captions if c.startswith("★")]
    assert starred == [captions[labels.index(winner)]]
    assert starred[0].startswith(f"★ reward {max(r['reward'] for r in rows):.2f} — {winner} (F ")
    assert all(Path(item["image"]).is_file() for item in strip)  # the client downloads each look
    assert choice.startswith(f"**Chosen: {winner}**") and "reward" in choice

    fixed = states(submit(app["url"], tmp_path / "p.png", profile="lite", scale=2, fidelity=1.0))[-1]
    assert fixed[0].startswith("Done") and not fixed[-2]  # a fixed mix: no strip
    assert fixed[-1].startswith("**Fidelity 1") and "no candidates" in fixed[-1]


def test_bad_upload_gets_a_message_and_the_app_keeps_serving(app, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really an image" * 10)
    updates = states(submit(app["url"], bad))
    status = updates[-1][0]
    assert "Error" in status and "broken" in status, status
    big = tmp_path / "big.png"
    photo((600, 400)).save(big)  # over the app's --max-size 200000
    assert "Error" in states(submit(app["url"], big))[-1][0]
    photo((16, 12)).save(tmp_path / "ok.png")
    assert states(submit(app["url"], tmp_path / "ok.png"))[-1][0].startswith("Done")


def test_four_clients_at_once_within_the_concurrency_bound(app, tmp_path):
    """--concurrency 2: four requests at once all finish; the server never runs more than two."""

    before = len(app["log"].read_text().splitlines())
    jobs = []
    for i in range(4):
        photo((40 + 4 * i, 32)).save(tmp_path / f"{i}.png")
        jobs.append(submit(app["url"], tmp_path / f"{i}.png"))
    finals = [states(j)[-1] for j in jobs]
    assert all(f[0].startswith("Done") for f in finals)
    lines = app["log"].read_text().splitlines()[before:]
    running = [int(m.group(1)) for line in lines if (m := re.search(r"start .* \((\d+) running\)", line))]
    assert len(running) == 4 and max(running) == 2  # two at once, and the bound held


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if shutil.which("apt-get") and os.geteuid() == 0:
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
        if subprocess.run(install, capture_output=True, timeout=900).returncode != 0:  # stale package lists
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=600)
            subprocess.run(install, capture_output=True, timeout=900)
        found = shutil.which("chromium")
    if not found:
        pytest.skip("Chromium is not installed and could not be installed with apt-get (needs root and apt)")
    return found


def test_in_a_real_browser(app, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    exe = chromium()
    photo((96, 64)).save(tmp_path / "dog.png")
    outside = []
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(("http://127.0.0.1", "data:", "blob:")) else None)
        page.goto(app["url"])
        page.locator("#profile input").click()
        page.get_by_role("option", name="lite").click()  # the analyser's text and Real-ESRGAN: a readable page
        page.locator("#input-file input[type=file]").set_input_files(str(tmp_path / "dog.png"))
        page.locator("#run").click()
        page.wait_for_function("document.querySelector('#status') && document.querySelector('#status').innerText.startsWith('Done')",
                               timeout=120_000)
        page.wait_for_timeout(500)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)  # kept even when a check below fails
        reasoning = page.locator("#reasoning textarea").input_value()
        assert reasoning.strip()
        for stage in ("rough", "middle", "final"):  # shown and actually decoded by the browser
            img = page.locator(f"#stage-{stage} img").first
            assert img.is_visible() and img.evaluate("i => i.complete && i.naturalWidth > 0")
        listed = page.locator("#files").inner_text().replace("\n", "")  # the name and extension are separate spans
        assert "dog.png" in listed and "dog.json" in listed
        # lite's two experts: the chooser's candidates with their scores, the winner starred, and why
        assert page.locator("#fidelity-auto input").is_checked() and page.locator("#fidelity input").first.is_disabled()
        assert page.locator("#candidates").is_visible() and "★" in page.locator("#candidates").inner_text()
        thumbs = page.locator("#candidates img")
        n = 3 + len(DEFAULT_GATES)  # the position map, x4plus, DF2K's low frequencies and its region blends
        assert thumbs.count() == n and all(thumbs.nth(i).evaluate("i => i.complete && i.naturalWidth > 0")
                                           for i in range(n))
        assert page.locator("#choice").inner_text().startswith("Chosen:")
        browser.close()
    assert (ARTIFACTS / "demo.png").stat().st_size > 10_000
    assert not outside, f"the page fetched from outside: {outside[:5]}"


def test_request_options_do_not_touch_the_shared_restorer():
    import numpy as np

    from realsr_r1.demo import to_display, with_options

    class Restorer:
        steps, color_fix = 20, "wavelet"
        request_options = ("steps", "color_fix")

    shared = Restorer()
    own = with_options(shared, steps=5, color_fix="none")
    assert (own.steps, own.color_fix) == (5, "none") and (shared.steps, shared.color_fix) == (20, "wavelet")
    assert with_options(shared) is shared and not hasattr(with_options(object(), steps=3), "steps")

    class Declares:  # an attribute of that name is not an option unless the restorer declares it
        steps = 20
        request_options = ()

    assert with_options(Declares(), steps=3).steps == 20

    class Lite:
        fidelity = "auto"
        request_options = ("fidelity",)

    lite = Lite()
    assert with_options(lite, fidelity="0.25", steps=3).fidelity.value == 0.25 and lite.fidelity == "auto"
    assert str(with_options(lite, fidelity="auto+0.1").fidelity) == "auto+0.1"
    assert with_options(shared, fidelity=0.5) is shared
    with pytest.raises(ValueError, match="auto, auto\\+X, auto-X or a number in"):
        with_options(lite, fidelity=1.5)

    rgb16 = np.full((2, 3, 3), 65535, np.uint16)
    alpha = np.array([[0.0, 0.5, 1.0]] * 2, np.float32)
    shown = to_display(rgb16, alpha)
    assert shown.dtype == np.uint8 and shown.shape == (2, 3, 4)
    assert shown[0, :, 3].tolist() == [0, 128, 255] and shown[..., :3].min() == 255


def test_only_the_apps_own_files_are_served(app):
    import urllib.error

    for path in ("/etc/passwd", str(REPO / "README.md")):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{app['url']}gradio_api/file={path}", timeout=10)
        assert e.value.code in (403, 404)


def test_a_model_failure_is_a_message_in_the_view(tmp_path, weights_dir):
    from realsr_r1.demo import DemoSession
    from realsr_r1.profiles import build_pipeline, load_config

    session = DemoSession({"lite": "lite"}, tmp_path / "out", device="cpu")
    pipe = build_pipeline(load_config("lite"), device="cpu")

    class Broken:
        name = "broken"

        def stages(self, *a, **k):
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

        def describe(self):
            return {}

    pipe.restorer = Broken()
    session._pipelines["lite"] = (pipe, "lite: test")
    photo((16, 12)).save(tmp_path / "a.png")
    views = list(session.restore(str(tmp_path / "a.png"), "lite"))
    assert views[-1].error.startswith("a.png: out of memory") and "Error" in views[-1].status
    assert session.running == 0  # the failed run is not counted as running any more
    ok = list(session.restore(str(tmp_path / "a.png"), "lite"))  # same session, next request
    assert ok[-1].error and ok[-1].files == []


def toy_lite_session(tmp_path):
    """A session whose lite profile is two stand-in experts and a chooser that likes dark images
    (tests/test_chooser.py's), so the choice is known and nothing heavy runs."""
    from test_chooser import toy_experts

    from realsr_r1.chooser import Chooser
    from realsr_r1.demo import DemoSession
    from realsr_r1.pipeline import RestorationPipeline
    from realsr_r1.policy import AnalyserPolicy
    from realsr_r1.restorers.lite import LiteStages

    stages = LiteStages(toy_experts(), Chooser({"tiny_rewards:darkness": {}}))
    session = DemoSession({"lite": "lite"}, tmp_path / "out", device="cpu")
    session._pipelines["lite"] = (RestorationPipeline(AnalyserPolicy(), stages, profile="lite"), "lite: test")
    # Stripes: texture where the region blends let the dark expert in, and no noise or JPEG to read
    # (a noisy reading would lower the ceiling towards the natural expert alone).
    stripes = np.where(np.arange(24) % 2 == 0, 60, 200).astype(np.uint8)[None, :, None] * np.ones((16, 1, 3), np.uint8)
    Image.fromarray(stripes).save(tmp_path / "a.png")
    return session, stages


def test_the_chooser_s_candidates_are_a_captioned_strip(tmp_path):
    session, stages = toy_lite_session(tmp_path)
    views = list(session.restore(str(tmp_path / "a.png"), "lite"))
    last = views[-1]
    assert last.status.startswith("Done") and not last.error
    assert all(v.candidates == () for v in views if v.stages["final"] is None)  # filled with the final image
    side = json.loads(Path(last.files[1]).read_text())
    labels = [r["label"] for r in side["choice"]["candidates"]]
    assert labels[0] == "bright" and labels[-1].startswith("dark where") and len(labels) == 2 + len(DEFAULT_GATES)
    overlay, *looks = [look for look, _ in last.candidates]
    caption, *captions = [caption for _, caption in last.candidates]
    assert caption.startswith("position per region (1×1)") and overlay.dtype == np.uint8 and overlay.shape[2] == 3
    assert all(look.dtype == np.uint8 and look.ndim == 3 and look.shape[2] == 3 for look in looks)
    assert looks[0].mean() > looks[-1].mean()  # bright expert first, the most faithful blend last
    rows = side["choice"]["candidates"]
    winner = side["choice"]["winner"]
    assert captions == [f"{'★ ' if r['label'] == winner else ''}reward {r['reward']:.2f} — {r['label']}"
                        for r in rows]  # a reward without F and Q parts: the reward alone
    best = max(r["reward"] for r in rows)  # ties go to the lower (more natural) position
    assert winner == next(r["label"] for r in rows if r["reward"] == best) != labels[0]
    assert last.choice.startswith(f"**Chosen: {winner}**") and "darkness reward" in last.choice


def test_fidelity_is_a_request_option_the_shared_restorer_never_sees(tmp_path):
    session, stages = toy_lite_session(tmp_path)
    views = list(session.restore(str(tmp_path / "a.png"), "lite", fidelity=0))
    last = views[-1]
    assert last.status.startswith("Done") and last.candidates == ()
    choice = json.loads(Path(last.files[1]).read_text())["choice"]
    assert choice["mode"] == "fidelity" and choice["position"] == 0 and choice["label"] == "bright"
    assert last.choice.startswith("**Fidelity 0** (set, not chosen)") and "bright" in last.choice
    assert str(stages.fidelity) == "auto" and session._pipelines["lite"][0].restorer is stages
    assert list(session.restore(str(tmp_path / "a.png"), "lite"))[-1].candidates  # the next request: auto again
    bad = list(session.restore(str(tmp_path / "a.png"), "lite", fidelity="very"))[-1]
    assert bad.error and "fidelity must be auto, auto+X, auto-X or a number in [0, 1]" in bad.status
    assert session.running == 0
