"""Policies: what writes the chain of thought.

The lite profile has no VLM: `AnalyserPolicy` writes <degradation> from the classical analyser and
leaves the understanding tags empty (the sidecar says so). The VLM policy of the full profile
streams the same contract from a vision-language model.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

from .analyze import Analysis, region_words
from .cot import DegradationItem, level_for, render_cot
from .decoding import Decoding
from .imageio import LoadedImage, to_float
from .vlm import PolicyLoadError, TokenStream, _line, load_vlm

# One generation at a time per process: sampling is seeded through torch's global RNG.
_GENERATE_LOCK = threading.Lock()
# generate() runs in one long-lived thread: a new thread per call pays for a new OpenMP team in torch.
_GENERATE_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="realsr-generate")

REFLECT_STAGES = ("rough", "middle")  # the stage images a reflective chain can see (the final one ends it)
NO_VLM_NOTE = ("no VLM ran (lite profile): <degradation> is the classical analyser's, and the understanding tags "
               "say in plain words what the region choice saw (rough, middle) and chose (final)")


class AnalyserPolicy:
    """Writes the VLCoT from pixel statistics alone; deterministic, no weights."""

    name = "analyser"
    note = NO_VLM_NOTE
    last_stats: dict = {}  # nothing is generated

    def describe(self) -> dict:
        return {"policy": self.name}

    def stream(self, image: LoadedImage, analysis: Analysis, *, seed: int = 0, scale: float = 4.0) -> Iterator[str]:
        items = [i for i in analysis.items if i.type != "downsample"]
        items.append(DegradationItem("downsample", level_for("downsample", scale)))
        # rough and middle: the regions the choice will see; final: what it chose (the pipeline fills
        # it from the restorer's record, since it is known only after the restorer ran).
        text = render_cot(items, region_words(to_float(image.rgb)))
        # One line per tag, so a streaming view fills in the way a VLM's would.
        lines = text.split("\n")
        for i, line in enumerate(lines):
            yield line + ("\n" if i < len(lines) - 1 else "")


# --- The VLM policy (full profile) ----------------------------------------------------------------
class VLMPolicy:
    """Streams the VLCoT from a vision-language model (transformers; default Qwen2.5-VL)."""

    name = "vlm"
    note = ""

    def __init__(self, model, processor, *, model_path: str, dtype, quantization: str | None = None,
                 adapter: str | None = None, generation: Decoding | dict | None = None, reflect: bool = False,
                 reflect_stages: tuple[str, ...] = REFLECT_STAGES):
        self.model = model
        self.reflect_mode = bool(reflect)
        self.reflect_stages = tuple(reflect_stages) if reflect else ()  # the stage images fed back
        self.processor = processor
        self._local = threading.local()
        self.model_path = str(model_path)
        self.dtype = dtype
        self.quantization = quantization
        self.adapter = adapter
        self.decoding = generation if isinstance(generation, Decoding) else Decoding.from_config(generation)

    @classmethod
    def from_pretrained(cls, model_path, *, device: str = "auto", dtype="auto", load_in_4bit: bool = False,
                        load_in_8bit: bool = False, adapter=None, max_pixels: int | None = None,
                        generation: dict | None = None, reflect: bool | None = None) -> "VLMPolicy":
        """`reflect`: None runs the chain as the model was trained (`realsr_decoding.json`): one pass for
        a policy GRPO trained one-pass, reflect for one trained with reflective rollouts and for a
        model this project did not train; True/False force the mode."""
        model, processor, dtype, quantization = load_vlm(model_path, device=device, dtype=dtype,
                                                         load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit,
                                                         max_pixels=max_pixels)
        if adapter is not None:
            model = _with_adapter(model, str(adapter))
        # A model or adapter from `python -m realsr_r1.train` samples as its rollouts did, under the
        # profile's explicit `generation` settings.
        trained, trained_stages = _trained_decoding(str(adapter or model_path))
        decoding = Decoding.from_config(generation, trained)
        stages = REFLECT_STAGES if trained is None or reflect else trained_stages
        if reflect is None:
            reflect = bool(stages)
        model.eval()
        return cls(model, processor, model_path=str(model_path), dtype=dtype, quantization=quantization,
                   adapter=None if adapter is None else str(adapter), generation=decoding, reflect=reflect,
                   reflect_stages=stages)

    @property
    def last_stats(self) -> dict:
        """Tokens and seconds of the last stream() read in this thread (requests run in their own)."""
        return getattr(self._local, "stats", {})

    def describe(self) -> dict:
        return {
            "policy": self.name,
            "model": self.model_path,
            "dtype": str(self.dtype).replace("torch.", ""),
            "quantization": self.quantization,
            "adapter": self.adapter,
            "processor": type(self.processor).__name__,
            "generation": self.decoding.to_dict(),
            "mode": "reflect" if self.reflect_mode else "one-pass",
            "reflect_stages": list(self.reflect_stages),
        }

    def _inputs(self, image: LoadedImage):
        from .cot import build_messages
        from .imageio import to_pil

        pil = to_pil(image.rgb)
        messages = build_messages(pil)
        prompt = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = self.processor(text=[prompt], images=[pil], return_tensors="pt")
        return inputs.to(self.model.device)

    def stream(self, image: LoadedImage, analysis: Analysis | None = None, *, seed: int = 0,
               scale: float = 4.0) -> Iterator[str]:
        """The whole chain in one generation (one-pass mode)."""
        inputs = self._inputs(image)
        yield from self.generate_streamed(dict(inputs), self.decoding.generate_kwargs(self.model), seed=seed)

    def reflect(self, image: LoadedImage, analysis: Analysis | None = None, *, seed: int = 0, scale: float = 4.0):
        """A reflective chain: generation pauses at each stage's image tag and resumes with that
        stage's image in context (`realsr_r1/reflect.py`); None when this policy runs one-pass."""
        if not self.reflect_mode:
            return None
        from .reflect import VLMReflection

        return VLMReflection(self, image, seed=seed)

    def generate_streamed(self, inputs: dict, gen: dict, *, seed: int, stop=None, stats: dict | None = None):
        """Generator: run `model.generate(**inputs, **gen)` in the generation thread and yield its text
        as it arrives; returns generate's output. `stop(input_ids) -> bool` ends it early (batch 1)."""
        import torch

        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        streamer = TokenStream(tokenizer, timeout=600)
        errors: list[BaseException] = []
        output: list = []
        halt = threading.Event()  # set when the caller stops reading: generation ends early

        prompt_len = inputs["input_ids"].shape[1]
        if stats is None:
            stats = self._local.stats = {"new_tokens": 0, "seconds": 0.0}
        before = stats["new_tokens"]  # a reflective chain adds up its segments

        def stopped(input_ids, scores, **kwargs):
            stats["new_tokens"] = before + int(input_ids.shape[1] - prompt_len)  # tokens/s in sidecars, benchmarks
            end = halt.is_set() or (stop is not None and stop(input_ids))
            return torch.full((input_ids.shape[0],), end, dtype=torch.bool, device=input_ids.device)

        def work() -> None:
            try:
                from transformers import StoppingCriteriaList

                torch.manual_seed(seed)
                with torch.no_grad():
                    output.append(self.model.generate(
                        **inputs, **gen, streamer=streamer, stopping_criteria=StoppingCriteriaList([stopped])
                    ))
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(e)
                streamer.end()

        # Seed in the worker (where sampling runs) and hold the lock so concurrent streams
        # cannot interleave their RNG use.
        with _GENERATE_LOCK:
            t0 = time.perf_counter()
            job = _GENERATE_THREAD.submit(work)
            try:
                for delta in streamer:
                    if delta:
                        yield delta
            finally:
                halt.set()
                job.result()
                stats["seconds"] = stats.get("seconds", 0.0) + time.perf_counter() - t0
        if errors:
            raise errors[0]
        return output[0] if output else None


def _with_adapter(model, adapter: str):
    """The model with a LoRA adapter from `python -m realsr_r1.train`; one-line errors."""
    if not os.path.isdir(adapter):
        raise PolicyLoadError(f"LoRA adapter not found: {adapter}")
    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        hint = (f"; it holds a full model: use --set policy.model={adapter}"
                if os.path.isfile(os.path.join(adapter, "config.json")) else "")
        raise PolicyLoadError(f"--adapter {adapter}: no adapter_config.json, so not a LoRA adapter{hint}")
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter)
    except Exception as e:  # noqa: BLE001 - a mismatched adapter: one line, not PEFT's traceback
        raise PolicyLoadError(f"--adapter {adapter}: cannot apply it to this model ({_line(e)})") from e


def _trained_decoding(folder: str) -> tuple[Decoding | None, tuple[str, ...]]:
    """The decoding GRPO training (training/grpo.py) recorded beside a trained model or adapter (None if there is none), and
    the stage images its rollouts were shown (none: trained one-pass, or recorded before that was)."""
    import json

    from .decoding import TRAINED_DECODING_FILE

    path = os.path.join(folder, TRAINED_DECODING_FILE)
    if not os.path.isfile(path):
        return None, ()
    try:
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f)
        stages = recorded.pop("reflect_stages", None) or []
        if not isinstance(stages, list) or any(s not in REFLECT_STAGES for s in stages):
            raise ValueError(f"reflect_stages: {stages!r}")
        return Decoding.from_config(recorded), tuple(stages)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise PolicyLoadError(f"{path}: unreadable decoding settings ({' '.join(str(e).split())})") from None
