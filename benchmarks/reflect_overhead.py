"""What reflection costs: reflect against one-pass, with the tiny full-profile models on CPU.

Both modes write the same chain (the tiny random VLM is made to write it by `tiny.ScriptedChain`,
so every forward pass is real), and the same three diffusion stages run. Reflect adds a pause at
each image tag, the rough and middle images entering the VLM's context, and two continuations.
"reflect, cache" re-uses the prefix's key/value cache (only the new image's tokens and the text
after it are prefilled); "reflect, re-encode" prefills the whole sequence with every image again,
the fallback. Models load once; the modes alternate --repeats times; the ratio is the median over
rounds of (mode / one-pass), as runs side by side share the machine's load.

    python benchmarks/reflect_overhead.py [--size 64] [--words 40] [--repeats 3] [--max-pixels 12544]
    python benchmarks/reflect_overhead.py --grpo [--steps 3]

--grpo times GRPO steps of configs/grpo-tiny-reflect.yaml (G 2, batch 2) with the rollouts made to
write the same chain: once with the rough image tag (each rollout pauses, the rough stage is made
for the group and enters the context and the forward pass) and once with the tag written empty
misspelt (`<rough_imag>`: the same length, no pause, no stage image). Median seconds per step after a warm-up step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def chain(words: int) -> list[str]:
    text = lambda stage: " ".join(f"{stage}{i}" for i in range(words))  # noqa: E731
    return ["<degradation>noise: light; blur: medium; jpeg: none; downsample: x4</degradation>"
            f"<rough_understand>{text('r')}</rough_understand><rough_image>",
            f"<middle_understand>{text('m')}</middle_understand><middle_image>",
            f"<final_understand>{text('f')}</final_understand><final_image>"]


def grpo(args) -> None:
    import json
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    from PIL import Image

    from realsr_r1.training import grpo
    from realsr_r1.training.data import build_dataset
    from realsr_r1.profiles import load_config
    from realsr_r1.tiny import ScriptedChain

    scripts = chain(args.words)
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        os.environ["REALSR_R1_WEIGHTS"] = str(root / "weights")
        (root / "hr").mkdir()
        for i, name in enumerate(["dog.png", "chip.png"]):
            Image.open(REPO / "examples" / name).convert("RGB").resize((4 * args.size, 4 * args.size)).save(
                root / "hr" / f"{i}.png")
        build_dataset(root / "hr", root / "data", log=lambda *a: None)
        rows = {}
        for mode, segments in [("reflect", [scripts[0], "".join(scripts[1:])]),
                               ("one chain, no pause", [scripts[0].replace("<rough_image>", "<rough_imag>")
                                                        + "".join(scripts[1:])])]:
            out = root / mode.replace(" ", "_").replace(",", "")
            cfg = load_config("grpo-tiny-reflect", [f"data={root / 'data'}", f"output_dir={out}",
                                                    "generation.max_new_tokens=2000",
                                                    f"trainer.max_steps={args.steps + 1}", "trainer.save_steps=1000"])
            out.mkdir()
            (out / "realsr_decoding.json").write_text(json.dumps(grpo.decoding(cfg).to_dict()))
            trainer = grpo.build_trainer(cfg, out)
            trainer.logits_processors = [ScriptedChain(trainer._tokenizer, segments, trainer.eos_token_ids[0])]
            times = []
            plain_step = trainer.training_step

            def step(*a, **k):
                t = time.perf_counter()
                result = plain_step(*a, **k)
                times.append(time.perf_counter() - t)
                return result

            trainer.training_step = step
            trainer.train()
            rows[mode] = (statistics.median(times[1:]), dict(trainer.reflect_counts))
    base = rows["one chain, no pause"][0]
    print(f"GRPO steps of grpo-tiny-reflect.yaml (G 2, batch 2), LQ {args.size}², {args.words} words per "
          f"understanding, tiny models on CPU, median of {args.steps} steps after one warm-up\n")
    print("| rollouts | s/step | ratio | rollouts that paused at <rough_image> |")
    print("|---|---|---|---|")
    for mode, (sec, counts) in rows.items():
        print(f"| {mode} | {sec:.3f} | {sec / base:.2f} | {counts.get('opened', 0)} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grpo", action="store_true", help="time GRPO steps instead of inference")
    p.add_argument("--steps", type=int, default=3, help="--grpo: steps timed after a warm-up step")
    p.add_argument("--size", type=int, default=64, help="LQ side in pixels (final = ×4)")
    p.add_argument("--words", type=int, default=40, help="words per understanding section")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-pixels", type=int, default=12544, help="the VLM's image budget (policy.max_pixels)")
    args = p.parse_args()
    if args.grpo:
        return grpo(args)

    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    from realsr_r1 import reflect
    from realsr_r1.decoding import Decoding
    from realsr_r1.imageio import LoadedImage
    from realsr_r1.profiles import build_pipeline, load_config
    from realsr_r1.tiny import ScriptedChain

    scripts = chain(args.words)
    one_pass = "".join(s + f"</{s[s.rindex('<') + 1:-1]}>" for s in scripts)  # image tags left empty
    with tempfile.TemporaryDirectory() as weights:
        os.environ["REALSR_R1_WEIGHTS"] = weights
        overrides = ["policy.generation.max_new_tokens=2000", f"policy.max_pixels={args.max_pixels}",
                     "restorer.preview_every=0"]
        pipes = {"one-pass": build_pipeline(load_config("tiny", overrides), device="cpu"),
                 "reflect": build_pipeline(load_config("tiny", [*overrides, "policy.reflect=true"]), device="cpu")}
        tokenizer = pipes["one-pass"].policy.processor.tokenizer
        eos = pipes["one-pass"].policy.model.generation_config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        current: list = [None]
        plain = Decoding.generate_kwargs
        Decoding.generate_kwargs = lambda self, model=None: {**plain(self, model),
                                                                  "logits_processor": [current[0].begin()]}
        rgb = np.random.default_rng(0).random((args.size, args.size, 3), dtype=np.float32)

        def once(mode: str) -> tuple[float, dict, float]:
            pipe = pipes["one-pass" if mode == "one-pass" else "reflect"]
            current[0] = ScriptedChain(tokenizer, [one_pass] if mode == "one-pass" else scripts, eos)
            reflect.VLMReflection.reuse_cache = mode != "reflect, re-encode"
            t = time.perf_counter()
            events = list(pipe.run(LoadedImage(rgb=rgb), seed=0))
            seconds = time.perf_counter() - t
            result = events[-1].result
            return seconds, result.info.get("reflect", {}), result.timings.get("reason", 0.0)

        modes = ["one-pass", "reflect, cache", "reflect, re-encode"]
        once("one-pass"), once("reflect, cache")  # warm-up
        times = {m: [] for m in modes}
        reason = {m: [] for m in modes}
        records = {}
        for _ in range(args.repeats):
            for m in modes:
                s, record, r = once(m)
                times[m].append(s)
                reason[m].append(r)
                records[m] = record
        Decoding.generate_kwargs = plain

    print(f"LQ {args.size}² → {4 * args.size}², {args.words} words per understanding, VLM image budget "
          f"{args.max_pixels} px, tiny models on CPU, medians of {args.repeats} alternating rounds\n")
    print("| mode | end-to-end s | ratio to one-pass | VLM s | prefill tokens rough / middle / final | cache |")
    print("|---|---|---|---|---|---|")
    for m in modes:
        ratio = statistics.median(t / b for t, b in zip(times[m], times["one-pass"]))
        prefill = records[m].get("prefill_tokens", {})
        fills = " / ".join(str(prefill.get(s, "–")) for s in ("rough", "middle", "final")) if prefill else "–"
        print(f"| {m} | {statistics.median(times[m]):.3f} | {ratio:.2f} | {statistics.median(reason[m]):.3f} "
              f"| {fills} | {', '.join(records[m].get('cache', [])) or '–'} |")
    seen = records["reflect, cache"].get("seen", {})
    print(f"\nimages in the VLM's context (as it saw them): {seen}")


if __name__ == "__main__":
    main()
