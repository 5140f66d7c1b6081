"""Policies: what writes the chain of thought.

The lite profile has no VLM: `AnalyserPolicy` writes <degradation> from the classical analyser and
leaves the understanding tags empty (the sidecar says so). The VLM policy of the full profile
streams the same contract from a vision-language model.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

from .analyze import Analysis
from .cot import DegradationItem, level_for, render_cot
from .imageio import LoadedImage

# One generation at a time per process: sampling is seeded through torch's global RNG.
_GENERATE_LOCK = threading.Lock()
# generate() runs in one long-lived thread: a new thread per call pays for a new OpenMP team in torch.
_GENERATE_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="realsr-generate")

NO_VLM_NOTE = "no VLM ran (lite profile): understanding tags are empty; <degradation> is the classical analyser's"


class AnalyserPolicy:
    """Writes the VLCoT from pixel statistics alone; deterministic, no weights."""

    name = "analyser"
    note = NO_VLM_NOTE

    def stream(self, image: LoadedImage, analysis: Analysis, *, seed: int = 0, scale: float = 4.0) -> Iterator[str]:
        items = [i for i in analysis.items if i.type != "downsample"]
        items.append(DegradationItem("downsample", level_for("downsample", scale)))
        text = render_cot(items)
        # One line per tag, so a streaming view fills in the way a VLM's would.
        lines = text.split("\n")
        for i, line in enumerate(lines):
            yield line + ("\n" if i < len(lines) - 1 else "")


# --- Streaming text out of generate() ------------------------------------------------------------
class TokenStream:
    """A `generate(streamer=…)` target that hands token ids to the reading thread, which decodes them.

    transformers' TextIteratorStreamer decodes in the generating thread and re-decodes everything
    since the last newline at every token (quadratic on one-line chains of thought). Here put() only
    queues ids; the reader drains what has queued and decodes a short window incrementally (the
    prefix/read offset scheme of text-generation servers): text is emitted once a window decodes to
    more than its prefix and does not end inside a multi-byte character.
    """

    def __init__(self, tokenizer, timeout: float | None = None):
        self.tokenizer = tokenizer
        self.timeout = timeout
        self._queue: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first puts the prompt
            self._prompt_seen = True
            return
        self._queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self._queue.put(None)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def __iter__(self) -> Iterator[str]:
        ids: list[int] = []
        prefix = read = 0  # ids[prefix:read] decoded already; ids[read:] not yet emitted
        done = False
        while not done:
            item = self._queue.get(timeout=self.timeout)
            while item is not None:
                ids.extend(item)
                try:  # everything already queued: one decode for many tokens when behind
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            done = item is None
            seen = self._decode(ids[prefix:read])
            text = self._decode(ids[prefix:])
            if len(text) > len(seen) and (done or not text.endswith("\ufffd")):
                yield text[len(seen):]
                prefix, read = read, len(ids)


# --- The VLM policy (full profile) ----------------------------------------------------------------
class PolicyLoadError(RuntimeError):
    """A VLM policy that cannot be loaded; str() is one line naming what is missing."""


def _image_only_processor(model_path: str, config):
    """Build the model's processor without its video part (for machines without torchvision).

    transformers' AutoProcessor silently falls back to the tokenizer alone when the video processor
    cannot be built; SR needs no video, so we assemble image processor + tokenizer + chat template.
    """
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    import transformers

    try:
        image_processor = AutoImageProcessor.from_pretrained(model_path)
    except Exception as e:  # noqa: BLE001 - reported as one line
        raise PolicyLoadError(f"cannot build an image processor for {model_path}: {_line(e)}") from e
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    class_name = PROCESSOR_MAPPING_NAMES.get(getattr(config, "model_type", ""))
    base = getattr(transformers, class_name, None) if isinstance(class_name, str) else None
    if base is None:
        raise PolicyLoadError(
            f"no processor class known for model type {getattr(config, 'model_type', '?')!r} at {model_path}"
        )

    class ImageOnlyProcessor(base):  # type: ignore[misc, valid-type]
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None and argument_name == "video_processor":
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

        def save_pretrained(self, save_directory, **kwargs):  # the stock one expects every part
            Path(save_directory).mkdir(parents=True, exist_ok=True)
            self.image_processor.save_pretrained(save_directory)
            self.tokenizer.save_pretrained(save_directory)
            return [str(save_directory)]

    ImageOnlyProcessor.__name__ = f"{base.__name__}ImageOnly"
    chat_template = getattr(tokenizer, "chat_template", None)
    return ImageOnlyProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=chat_template
    )


def _line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def load_vlm(model_path, *, device: str = "auto", dtype="auto", load_in_4bit: bool = False,
         load_in_8bit: bool = False, max_pixels: int | None = None):
    """(model, processor, dtype, quantization) for any chat VLM transformers can load; used by the
    policy (inference) and by training. Errors are PolicyLoadError with one line."""
    import os

    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    model_path = str(model_path)
    looks_local = os.path.isabs(model_path) or model_path.startswith(".") or model_path.count("/") != 1
    if not os.path.isdir(model_path) and looks_local:
        raise PolicyLoadError(f"VLM model not found: {model_path}")
    if load_in_4bit and load_in_8bit:
        raise PolicyLoadError("choose one of load_in_4bit and load_in_8bit")
    from .device import PRECISIONS as names, resolve_device

    device = str(resolve_device(device))
    if dtype == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    elif isinstance(dtype, str):
        if dtype not in names and not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise PolicyLoadError(f"unknown dtype {dtype!r} (auto, fp32, fp16, bf16)")
        dtype = names.get(dtype) or getattr(torch, dtype)
    try:
        config = AutoConfig.from_pretrained(model_path)
    except Exception as e:  # noqa: BLE001
        raise PolicyLoadError(f"VLM model not found or unreadable: {model_path} ({_line(e)})") from e

    kwargs: dict = {"dtype": dtype}
    quantization = None
    if load_in_4bit or load_in_8bit:
        from transformers import BitsAndBytesConfig

        if load_in_4bit:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4"
            )
            quantization = "bnb-4bit-nf4"
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
            quantization = "bnb-8bit"
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForImageTextToText.from_pretrained(model_path, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise PolicyLoadError(f"cannot load the VLM at {model_path}: {_line(e)}") from e
    if quantization is None:
        model = model.to(device)
    try:
        processor = AutoProcessor.from_pretrained(model_path)
    except Exception:  # noqa: BLE001 - e.g. the video processor needs torchvision; SR needs no video
        processor = None  # the image-only build below raises a clear error if images cannot work
    if getattr(processor, "image_processor", None) is None:
        # No torchvision: AutoProcessor failed or silently returned only the tokenizer.
        # Never use a tokenizer-only processor for images: build one without the video part.
        processor = _image_only_processor(model_path, config)
    if max_pixels is not None:
        ip = processor.image_processor
        if isinstance(getattr(ip, "size", None), dict) and "longest_edge" in ip.size:
            ip.size["longest_edge"] = int(max_pixels)  # where the pixel budget lives in transformers 5
        else:
            ip.max_pixels = int(max_pixels)
    return model, processor, dtype, quantization


class VLMPolicy:
    """Streams the VLCoT from a vision-language model (transformers; default Qwen2.5-VL)."""

    name = "vlm"
    note = ""

    def __init__(self, model, processor, *, model_path: str, dtype, quantization: str | None = None,
                 adapter: str | None = None, generation: dict | None = None):
        self.model = model
        self.processor = processor
        self._local = threading.local()
        self.model_path = str(model_path)
        self.dtype = dtype
        self.quantization = quantization
        self.adapter = adapter
        self.generation = {"max_new_tokens": 256, "temperature": 0.7, "top_p": 0.9, "do_sample": True}
        self.generation.update(generation or {})

    @classmethod
    def from_pretrained(cls, model_path, *, device: str = "auto", dtype="auto", load_in_4bit: bool = False,
                        load_in_8bit: bool = False, adapter=None, max_pixels: int | None = None,
                        generation: dict | None = None) -> "VLMPolicy":
        import os

        model, processor, dtype, quantization = load_vlm(model_path, device=device, dtype=dtype,
                                                         load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit,
                                                         max_pixels=max_pixels)
        if adapter is not None:
            from peft import PeftModel

            if not os.path.isdir(str(adapter)):
                raise PolicyLoadError(f"LoRA adapter not found: {adapter}")
            model = PeftModel.from_pretrained(model, str(adapter))
        model.eval()
        return cls(model, processor, model_path=str(model_path), dtype=dtype, quantization=quantization,
                   adapter=None if adapter is None else str(adapter), generation=generation)

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
            "generation": dict(self.generation),
        }

    def _inputs(self, image: LoadedImage):
        import numpy as np
        from PIL import Image

        from .cot import build_messages

        pil = Image.fromarray((np.clip(image.rgb, 0, 1) * 255 + 0.5).astype("uint8"), "RGB")
        messages = build_messages(pil)
        prompt = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = self.processor(text=[prompt], images=[pil], return_tensors="pt")
        return inputs.to(self.model.device)

    def stream(self, image: LoadedImage, analysis: Analysis | None = None, *, seed: int = 0,
               scale: float = 4.0) -> Iterator[str]:
        import torch

        inputs = self._inputs(image)
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        streamer = TokenStream(tokenizer, timeout=600)
        gen = dict(self.generation)
        if not gen.get("do_sample", True):
            gen.pop("temperature", None)
            gen.pop("top_p", None)
        errors: list[BaseException] = []
        stop = threading.Event()  # set when the caller stops reading: generation ends early

        prompt_len = inputs["input_ids"].shape[1]
        stats = self._local.stats = {"new_tokens": 0, "seconds": 0.0}

        def stopped(input_ids, scores, **kwargs):
            stats["new_tokens"] = int(input_ids.shape[1] - prompt_len)  # for tokens/s in sidecars and benchmarks
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        def work() -> None:
            try:
                from transformers import StoppingCriteriaList

                torch.manual_seed(seed)
                with torch.no_grad():
                    self.model.generate(
                        **inputs, **gen, streamer=streamer, stopping_criteria=StoppingCriteriaList([stopped])
                    )
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
                stop.set()
                job.result()
                stats["seconds"] = time.perf_counter() - t0
        if errors:
            raise errors[0]

