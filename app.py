"""The realsr-r1 demo in your browser: upload a photo, watch the chain of thought stream in and each
stage's image appear, see the candidates the reward chose from, compare before and after, and
download the result with its JSON record. Open the address it prints (http://127.0.0.1:7860 by
default).

The page is laid out here; what it shows comes from `realsr_r1.demo`, which turns the pipeline's
event stream into views (no restoration logic lives in this file).

    python app.py [--host 127.0.0.1] [--port 7860] [--profile auto] [--max-size PIXELS] [--concurrency 1]

Fully offline: analytics off, system fonts only (no font or script from the network), temp files
in a folder the app owns and deletes at exit, and only the app's results and examples are served.
Ctrl-C and SIGTERM (kill, systemd, docker stop) both shut it down that way.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
_OWN_TEMP = None
if "GRADIO_TEMP_DIR" not in os.environ:  # before gradio is imported: it reads this once
    _OWN_TEMP = tempfile.mkdtemp(prefix="realsr-r1-demo-")
    os.environ["GRADIO_TEMP_DIR"] = _OWN_TEMP
    atexit.register(shutil.rmtree, _OWN_TEMP, ignore_errors=True)

import gradio as gr  # noqa: E402

from realsr_r1.demo import LEVEL_COLOURS, DemoSession, start_profiles  # noqa: E402
from realsr_r1.imageio import DEFAULT_MAX_PIXELS  # noqa: E402
from realsr_r1.profiles import PROFILES, ConfigError  # noqa: E402

HERE = Path(__file__).resolve().parent
EXAMPLES = sorted((HERE / "examples").glob("*.png"))
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
SYSTEM_MONO = ["ui-monospace", "monospace"]


def _same(a, b) -> bool:
    return a is b or (isinstance(a, (str, list)) and type(a) is type(b) and a == b)


def build_app(session: DemoSession, default_profile: str = "auto", warning: str | None = None) -> gr.Blocks:
    profiles = list(session.profiles)
    with gr.Blocks(title="realsr-r1", analytics_enabled=False, delete_cache=(1800, 3600)) as demo:
        gr.Markdown("# realsr-r1 — reason, then restore\nUpload a low-quality photo: the model writes what "
                    "degrades it and what it shows, then restores it rough → middle → final.")
        if warning:  # what the log says at start, for whoever only sees the page
            gr.Markdown(f"**Warning:** {warning}", elem_id="warning")
        with gr.Row():
            with gr.Column(scale=1):
                # A file, not gr.Image: our reader decodes it (16-bit, EXIF, CMYK…) and reports problems.
                image = gr.File(label="Low-quality image", file_types=["image"], type="filepath",
                                elem_id="input-file")
                preview = gr.Image(label="Input", interactive=False, height=220, elem_id="input-preview")
                if EXAMPLES:
                    gr.Examples([[str(p)] for p in EXAMPLES], inputs=[image], label="Examples")
                profile = gr.Dropdown(profiles, value=default_profile if default_profile in profiles else profiles[0],
                                      label="Profile", elem_id="profile")
                with gr.Row():
                    scale = gr.Slider(1, 8, value=4, step=0.5, label="Scale")
                    seed = gr.Number(0, precision=0, label="Seed")
                with gr.Accordion("Natural or faithful (lite profile)", open=True):
                    auto_fidelity = gr.Checkbox(True, label="Auto: the chooser picks a position per region of the photo",
                                                elem_id="fidelity-auto")
                    fidelity = gr.Slider(0, 1, value=0.5, step=0.05, interactive=False, elem_id="fidelity",
                                         label="Fidelity: 0 natural-looking … 1 faithful to the input",
                                         info="A fixed position on the ladder x4plus → DF2K's low frequencies → "
                                              "region blends → DF2K, used when auto is off")
                    fidelity_map = gr.File(label="Fidelity map (optional): a grey image painting the position, "
                                                 "white = faithful; replaces the two above",
                                           file_types=["image"], type="filepath", elem_id="fidelity-map")
                with gr.Accordion("Diffusion options (full profile)", open=False):
                    steps = gr.Slider(1, 50, value=20, step=1, label="Steps per stage")
                    color_fix = gr.Radio(["wavelet", "adain", "none"], value="wavelet", label="Colour fix")
                run = gr.Button("Restore", variant="primary", elem_id="run")
            with gr.Column(scale=2):
                status = gr.Markdown("Ready.", elem_id="status")
                reasoning = gr.Textbox(label="Reasoning (streamed)", lines=8, max_lines=16, elem_id="reasoning")
                degradation = gr.HighlightedText(label="Degradation", color_map=LEVEL_COLOURS, elem_id="degradation")
                understanding = gr.Markdown(elem_id="understanding")
        with gr.Row():
            rough = gr.Image(label="rough", interactive=False, elem_id="stage-rough")
            middle = gr.Image(label="middle", interactive=False, elem_id="stage-middle")
            final = gr.Image(label="final", interactive=False, elem_id="stage-final")
        # Hidden until a restorer reports the candidates it chose among (the lite profile's chooser).
        strip = gr.Gallery(label="Candidates (the chooser's scores)", columns=5, height=260, object_fit="contain",
                           format="png", interactive=False, visible=False, elem_id="candidates")
        choice = gr.Markdown(elem_id="choice")
        with gr.Row():
            compare = gr.ImageSlider(label="Before / after (input upscaled vs result)", elem_id="compare")
            files = gr.File(label="Downloads: result and JSON sidecar", file_count="multiple", elem_id="files")

        outputs = [status, reasoning, degradation, understanding, rough, middle, final, compare, files, strip, choice]

        def strip_update(items):  # shown only when there are candidates
            return gr.update(value=list(items) or None, visible=bool(items))

        def restore(path, profile_label, scale_value, steps_value, seed_value, color, auto, fidelity_value,
                    map_path=None):
            sent: list = [object()] * len(outputs)
            # The restorer takes the options it declares (demo.with_options): fidelity for lite,
            # steps and colour fix for diffusion. Auto keeps the profile's own setting.
            for view in session.restore(path, profile_label, scale=scale_value, seed=int(seed_value or 0),
                                        steps=int(steps_value), color_fix=color,
                                        fidelity=None if auto else float(fidelity_value),
                                        fidelity_map=map_path or None):
                values = [view.status, view.reasoning, view.degradation, view.understanding, view.stages["rough"],
                          view.stages["middle"], view.stages["final"], view.compare, view.files or None,
                          view.candidates, view.choice]
                # Only what changed goes to the browser: images are not re-encoded for every token.
                yield [gr.skip() if _same(v, old) else strip_update(v) if out is strip else v
                       for out, v, old in zip(outputs, values, sent)]
                sent = values

        image.change(session.preview, [image], [preview, status], api_name="preview")
        # The slider means something only when auto is off.
        auto_fidelity.change(lambda auto: gr.update(interactive=not auto), [auto_fidelity], [fidelity], queue=False,
                             api_visibility="private")
        run.click(restore, [image, profile, scale, steps, seed, color_fix, auto_fidelity, fidelity, fidelity_map], outputs,
                  api_name="restore")
    return demo


# Seconds a stop may take before the process leaves anyway: gradio's own shutdown joins its server
# thread for up to 5 s, and a KeyboardInterrupt that lands inside launch() where something swallows
# it would otherwise leave the demo serving, deaf to the signal that asked it to stop.
SHUTDOWN_GRACE_S = 10.0


def _stop_on_signals() -> None:
    """SIGTERM (kill, systemd, docker stop) and SIGINT (Ctrl-C) stop the demo the same way: gradio's
    launch() closes the server on KeyboardInterrupt and returns, then atexit deletes the temp
    folder. If that has not ended the process SHUTDOWN_GRACE_S later, it deletes the folder and
    exits at once (_leave_now). A second signal of the same kind during the shutdown kills at once."""

    def stop(signum, frame):
        signal.signal(signum, signal.SIG_DFL)
        logging.getLogger("app").info("%s: shutting down", signal.Signals(signum).name)
        why = f"still running {SHUTDOWN_GRACE_S:.0f} s after the signal"
        deadline = threading.Timer(SHUTDOWN_GRACE_S, _leave_now, (why,))
        deadline.daemon = True
        deadline.start()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def build_parser() -> argparse.ArgumentParser:
    from realsr_r1.cli import Parser

    p = Parser(prog="python app.py", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter,
               epilog="Exit status: 0 when stopped (Ctrl-C or SIGTERM), 2 for a usage error. "
                      "Either way the temp folder it made is deleted.")
    p.add_argument("--host", default="127.0.0.1", metavar="ADDRESS",
                   help="the address to serve on; 0.0.0.0 to serve your network")
    p.add_argument("--port", type=int, default=7860, metavar="N", help="the port to serve on")
    p.add_argument("--profile", default="auto", metavar="NAME|YAML",
                   help=f"the profile selected first: {', '.join(('auto', *PROFILES))}, or a YAML config "
                        "(added to the list); auto takes the best this machine runs")
    p.add_argument("--max-size", type=int, default=DEFAULT_MAX_PIXELS, metavar="PIXELS",
                   help="refuse larger inputs, in pixels")
    p.add_argument("--concurrency", type=int, default=1, metavar="N",
                   help="restorations running at once (they share the models)")
    p.add_argument("--queue-size", type=int, default=16, metavar="N",
                   help="requests waiting beyond that are turned away")
    p.add_argument("--device", default="auto", metavar="DEVICE", help="auto, cpu, cuda, cuda:1, …")
    p.add_argument("--verbose", action="store_true", help="also show the libraries' logs and warnings")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from realsr_r1 import quiet

    quiet.configure(args.verbose)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        profiles, default, warning = start_profiles(args.profile)
    except (ConfigError, OSError) as e:  # before launching: the user sees it, not the first request
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if warning:
        logging.getLogger("app").warning("warning: %s", warning)
    _stop_on_signals()
    session = DemoSession(profiles, Path(os.environ["GRADIO_TEMP_DIR"]) / "results", device=args.device,
                          max_pixels=args.max_size)
    demo = build_app(session, default, warning)
    demo.queue(default_concurrency_limit=args.concurrency, max_size=args.queue_size)
    theme = gr.themes.Default(font=SYSTEM_FONTS, font_mono=SYSTEM_MONO)
    logging.getLogger("app").info("serving on http://%s:%d (Ctrl-C stops it)", args.host, args.port)
    try:
        demo.launch(server_name=args.host, server_port=args.port, theme=theme, footer_links=[],
                    allowed_paths=[str(session.out_root), str(HERE / "examples")], show_error=True,
                    quiet=not args.verbose)
    except KeyboardInterrupt:  # stopped while starting: no traceback, and the temp folder still goes
        # launch() can be interrupted after its server and queue started but before block_thread(),
        # whose own KeyboardInterrupt handler closes the server; close them here, or interpreter exit
        # can wait on their threads (gradio Blocks.close: a no-op when nothing runs).
        demo.close(verbose=False)
    if session.busy:
        _leave_now("stopped with a restoration unfinished")
    return 0


def _leave_now(why: str) -> None:
    """End the process now, exit status 0, after deleting the temp folder. For a stop with a
    restoration (or model build) still running in a worker thread: tearing the interpreter down
    under torch there aborts the process ("terminate called without an active exception", exit
    -6). And for a shutdown that overran SHUTDOWN_GRACE_S."""
    logging.getLogger("app").info(why)
    for _ in range(3):  # the worker may write its result while the folder goes
        if _OWN_TEMP is None or not os.path.exists(_OWN_TEMP):
            break
        shutil.rmtree(_OWN_TEMP, ignore_errors=True)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
