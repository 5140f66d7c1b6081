"""Loading a chat VLM and streaming its text: shared by the policy (inference), GRPO training and
the VLM judge reward.

`load_vlm` takes any model `AutoModelForImageTextToText` loads (default Qwen2.5-VL) with its
processor, in the precision `device.weight_dtype` picks, optionally 4/8-bit (bitsandbytes), with the
image budget set through the processor's current `size` API. `TokenStream` carries generated ids
to a reading thread that decodes them incrementally.
"""

from __future__ import annotations

import os
import queue
from pathlib import Path
from typing import Iterator


class PolicyLoadError(RuntimeError):
    """A VLM that cannot be loaded; str() is one line naming what is missing."""


def _line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


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


# --- Loading -----------------------------------------------------------------------------------
def _image_only_processor(model_path: str, config):
    """Build the model's processor without its video part (for machines without torchvision).

    transformers' AutoProcessor silently falls back to the tokenizer alone when the video processor
    cannot be built; SR needs no video, so we assemble image processor + tokenizer + chat template.
    """
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

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


def set_image_budget(image_processor, max_pixels: int) -> None:
    """Cap the pixels an image is resized to before the vision tower (Qwen2-VL-style processors).

    transformers 5 keeps the budget in `size` ({shortest_edge: min_pixels, longest_edge: max_pixels},
    both pixel counts: `Qwen2VLImageProcessor.resize` → `smart_resize`). The older `min_pixels`/
    `max_pixels` attributes reach `_standardize_kwargs` on every call, which warns (FutureWarning)
    and, once that path goes, would leave the checkpoint's 12.8 MP `size` in force. So we write
    `size` and drop the attributes.
    """
    size = getattr(image_processor, "size", None)
    if size is None or "longest_edge" not in size or not hasattr(image_processor, "merge_size"):
        raise PolicyLoadError(f"max_pixels: {type(image_processor).__name__} has no pixel budget "
                              "(Qwen2-VL-style processors only); remove max_pixels")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 28 * 28:
        raise PolicyLoadError(f"max_pixels: expected a pixel count ≥ 784 (one 28×28 patch), got {max_pixels!r}")
    budget = max_pixels
    values = dict(size)
    values.update(longest_edge=budget, shortest_edge=min(int(values.get("shortest_edge") or budget), budget))
    image_processor.size = type(size)(**values)  # SizeDict or dict, as the processor keeps it
    for stale in ("max_pixels", "min_pixels"):
        if stale in vars(image_processor):
            delattr(image_processor, stale)


def _check_path(model_path: str) -> None:
    looks_local = os.path.isabs(model_path) or model_path.startswith(".") or model_path.count("/") != 1
    if not os.path.isdir(model_path) and looks_local:
        raise PolicyLoadError(f"VLM model not found: {model_path}")


def _quantization(load_in_4bit: bool, load_in_8bit: bool, dtype, device: str) -> tuple[dict, str | None]:
    """from_pretrained kwargs for bitsandbytes, and the name recorded in sidecars."""
    if load_in_4bit and load_in_8bit:
        raise PolicyLoadError("choose one of load_in_4bit and load_in_8bit")
    if not (load_in_4bit or load_in_8bit):
        return {}, None
    from transformers import BitsAndBytesConfig

    if load_in_4bit:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4")
        name = "bnb-4bit-nf4"
    else:
        config, name = BitsAndBytesConfig(load_in_8bit=True), "bnb-8bit"
    return {"quantization_config": config, "device_map": {"": device}}, name


def load_processor(model_path: str, config):
    """The model's processor; without torchvision, one built without its video part."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(model_path)
    except Exception:  # noqa: BLE001 - e.g. the video processor needs torchvision; SR needs no video
        processor = None  # the image-only build below raises a clear error if images cannot work
    if getattr(processor, "image_processor", None) is None:
        # No torchvision: AutoProcessor failed or silently returned only the tokenizer.
        # Never use a tokenizer-only processor for images: build one without the video part.
        processor = _image_only_processor(model_path, config)
    return processor


def load_vlm(model_path, *, device: str = "auto", dtype="auto", load_in_4bit: bool = False,
             load_in_8bit: bool = False, max_pixels: int | None = None):
    """(model, processor, dtype, quantization) for any chat VLM transformers can load.
    Errors are PolicyLoadError with one line."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from .device import resolve_device, weight_dtype

    model_path = str(model_path)
    _check_path(model_path)
    try:
        device = str(resolve_device(device))
        dtype = weight_dtype(device, dtype)
    except ValueError as e:
        raise PolicyLoadError(str(e)) from None
    kwargs, quantization = _quantization(load_in_4bit, load_in_8bit, dtype, device)
    try:
        config = AutoConfig.from_pretrained(model_path)
    except Exception as e:  # noqa: BLE001
        raise PolicyLoadError(f"VLM model not found or unreadable: {model_path} ({_line(e)})") from e
    try:
        model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=dtype, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise PolicyLoadError(f"cannot load the VLM at {model_path}: {_line(e)}") from e
    if quantization is None:
        model = model.to(device)
    processor = load_processor(model_path, config)
    if max_pixels is not None:
        set_image_budget(processor.image_processor, max_pixels)
    return model, processor, dtype, quantization
