"""Reflective VLCoT: the VLM sees each stage's image before it writes the next stage.

RealSR-R1's model writes text and image tokens in one sequence, so its <middle_understand> is
written with the rough image in context. Here the VLM writes the text and the restorer makes the
images, so generation pauses where the VLM opens `<rough_image>`: the pipeline makes the rough
stage, its image enters the conversation at that point (resized to the policy's pixel budget by
the processor), the text `WxH</rough_image>` follows, and generation resumes with
`<middle_understand>`. The same for middle; the chain ends at `<final_image>`.

    prompt · LQ image ─► <degradation>…<rough_understand>…<rough_image>  ◄─ pause: rough stage
           [rough image] 64x64</rough_image><middle_understand>…<middle_image>  ◄─ pause: middle
           [middle image] 128x128</middle_image><final_understand>…<final_image>  ◄─ pause: final

The sequence is built at the token level (re-rendering the chat template would re-tokenize the
generated text differently at the boundaries). Each continuation re-uses the key/value cache of
everything before the new image: the uncached suffix (the image's tokens and a few text tokens)
is all that is prefilled. Qwen2.5-VL's vision tower must then encode only the new image while its
3-D rotary positions are computed over every image's grid; transformers 5.24 supports that through
`mm_encoder_outputs` (`Qwen2_5_VLModel.forward` uses precomputed image features instead of
`pixel_values`, and `_prepare_position_ids_for_generation` re-runs `get_rope_index` over the full
ids and all grids). Where that path fails (another VLM family, another transformers), the
continuation re-encodes the whole sequence with every image instead, and the sidecar says which ran.
"""

from __future__ import annotations

import re
import time
from typing import Iterator

import numpy as np

from .cot import STAGES
from .imageio import to_pil

IMAGE_TAG = re.compile(r"<(rough|middle|final)_image>")
TAIL_TOKENS = 24  # decoded at each step to spot an image tag (a tag is < 16 characters)


def opens_image_tag(tokenizer, ids, start: int) -> bool:
    """Whether the ids generated since `start` (a row of a generate() batch) have opened an image tag."""
    tail = ids[max(start, len(ids) - TAIL_TOKENS):]
    return bool(IMAGE_TAG.search(tokenizer.decode(list(map(int, tail)), skip_special_tokens=True)))


def _image_placeholder(processor) -> str:
    """The text the chat template writes for one image (Qwen: <|vision_start|><|image_pad|><|vision_end|>)."""
    messages = [{"role": "user", "content": [{"type": "text", "text": "\x01"}, {"type": "image"},
                                             {"type": "text", "text": "\x02"}]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    return text[text.index("\x01") + 1:text.index("\x02")]


def trim_at_tag(tokenizer, new: list[int]) -> tuple[list[int], str | None]:
    """(the generated ids up to the end of the first image tag, that tag's stage), or (`new`, None).

    The token that completes a tag may carry more characters (a BPE merge such as `></`): it is
    dropped and the tag's missing characters are spelled with their own tokens."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    match = IMAGE_TAG.search(decode(new))
    if not match:
        return new, None
    k = len(new)
    while k > 1 and IMAGE_TAG.search(decode(new[:k - 1])):
        k -= 1  # the shortest prefix that holds the tag
    text = decode(new[:k])
    tag_end = IMAGE_TAG.search(text).end()
    if len(text) == tag_end:
        return new[:k], match.group(1)
    head = decode(new[:k - 1])
    return new[:k - 1] + tokenizer(text[len(head):tag_end], add_special_tokens=False)["input_ids"], match.group(1)


def stage_image_tokens(processor, rgb: np.ndarray, stage: str, size_text: str) -> tuple[list[int], dict, list[int]]:
    """(ids of the image placeholder expanded to its token count + `WxH</stage_image>`, the image's
    processor inputs, its size as the VLM sees it after the pixel budget)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    image_inputs = processor.image_processor(images=[to_pil(rgb)], return_tensors="pt")
    grid = image_inputs["image_grid_thw"]
    merge = int(getattr(processor.image_processor, "merge_size", 1))
    patch = int(getattr(processor.image_processor, "patch_size", 14))
    count = int(grid.prod()) // merge ** 2
    placeholder = _image_placeholder(processor).replace(processor.image_token, processor.image_token * count)
    ids = tokenizer(placeholder + size_text + f"</{stage}_image>", add_special_tokens=False)["input_ids"]
    return ids, dict(image_inputs), [int(grid[0, 2]) * patch, int(grid[0, 1]) * patch]


class VLMReflection:
    """One reflective chain of a VLMPolicy: `until_image()` streams the text up to the next image tag,
    `see(stage, rgb, size)` puts that stage's image (and `WxH</stage_image>`) into the context."""

    reuse_cache = True  # False: every continuation re-encodes the whole sequence (benchmarks compare)

    def __init__(self, policy, image, *, seed: int):
        import torch

        self.policy = policy
        self.model = policy.model
        self.processor = policy.processor
        self.tokenizer = getattr(policy.processor, "tokenizer", policy.processor)
        self.seed = int(seed)
        inputs = policy._inputs(image)
        self.ids: list[int] = inputs["input_ids"][0].tolist()
        self.pixel_values = [inputs["pixel_values"]]
        self.grids = [inputs["image_grid_thw"]]
        self.new_image: dict | None = None  # the image added since the last generation (not yet encoded)
        self.cache = None
        self.cached = 0  # tokens of self.ids the cache holds
        self.budget = policy.decoding.max_new_tokens  # shared by every segment of the chain
        self.segment = 0
        self.opened: str | None = None  # the image tag the last segment stopped at (None: it never did)
        self.ended = False  # the model closed its turn, or the budget ran out
        self.stages = policy.reflect_stages  # the stage images it sees; after the last, the chain runs in one pass
        self.record: dict = {"mode": "reflect", "stages": list(self.stages), "seen": {}, "prefill_tokens": {},
                             "cache": [], "problems": []}
        self.stats = policy._local.stats = {"new_tokens": 0, "seconds": 0.0}
        self._device = torch.device(getattr(self.model, "device", "cpu"))

    # --- generation ---------------------------------------------------------------------------
    def until_image(self, stop_at_tags: bool = True) -> Iterator[str]:
        """Stream the chain's next text: up to and including the next `<stage_image>` (or to the end
        of the chain with `stop_at_tags=False`). Sets `opened`."""
        self.opened = None
        if self.ended or self.budget <= 0:
            self.ended = True
            return
        gen = self.policy.decoding.generate_kwargs(self.model)
        gen.update(max_new_tokens=self.budget, return_dict_in_generate=True)
        if self.segment:
            gen["min_new_tokens"] = 0  # a floor on the whole chain applies to its first segment only
        start = len(self.ids)
        stop = self._tag_stop(start) if stop_at_tags else None
        label = STAGES[min(self.segment, len(STAGES) - 1)]
        shown = [""]  # the text passed on so far (a failed attempt must not have shown any)
        t0 = time.perf_counter()
        # A text-only continuation re-encodes: Qwen keeps its rotary offsets (rope_deltas) on the model,
        # and another request may have run between two segments of this chain.
        cached = self.cache is not None and self.reuse_cache and self.new_image is not None
        for attempt in ("cache", "re-encode") if cached else ("re-encode",):
            try:
                inputs = self._inputs(attempt)
                self.record["prefill_tokens"][label] = len(self.ids) - (self.cached if attempt == "cache" else 0)
                steps = self.policy.generate_streamed(inputs, gen, seed=self.seed + 7919 * self.segment,
                                                      stop=stop, stats=self.stats)
                output = yield from (self._cut_at_tag(steps, shown) if stop_at_tags else self._passed(steps, shown))
            except Exception as e:  # noqa: BLE001 - the cached path failed before any text: re-encode
                if attempt != "cache" or shown[0]:
                    raise
                self.record["problems"].append(f"prefix cache not usable ({type(e).__name__}: "
                                               f"{' '.join(str(e).split())[:120]}); re-encoding each stage")
                self.reuse_cache = False
                continue
            self.record["cache"].append(attempt)
            break
        self.record.setdefault("seconds", {})[label] = round(time.perf_counter() - t0, 4)
        self.segment += 1
        self._keep(output, start, trim=stop_at_tags)

    @staticmethod
    def _passed(steps, holder: list) -> Iterator[str]:
        """Pass every delta through (the rest of a chain, written in one pass); returns generate's output."""
        while True:
            try:
                delta = next(steps)
            except StopIteration as done:
                return done.value
            holder[0] += delta
            yield delta

    def _cut_at_tag(self, steps, holder: list) -> Iterator[str]:
        """Pass the text through, ending it right after the first image tag (the token that completes
        a tag may carry more characters: they are not shown, and `_keep` drops them)."""
        text = ""
        while True:
            try:
                delta = next(steps)
            except StopIteration as done:
                return done.value
            match = IMAGE_TAG.search(text + delta)
            if match and match.end() > len(text):
                delta = (text + delta)[len(text):match.end()]
            if delta and not IMAGE_TAG.search(text):
                text += delta
                holder[0] = text
                yield delta

    def _tag_stop(self, start: int):
        tokenizer = self.tokenizer

        def stop(input_ids) -> bool:
            return opens_image_tag(tokenizer, input_ids[0].tolist(), start)

        return stop

    def _inputs(self, attempt: str) -> dict:
        """generate()'s inputs: the cached suffix with the new image's features, or everything re-encoded."""
        import torch

        ids = torch.tensor([self.ids], device=self._device)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                  "image_grid_thw": torch.cat(self.grids).to(self._device)}
        image_token = getattr(self.processor, "image_token_id", None)
        if image_token is not None:
            inputs["mm_token_type_ids"] = (ids == int(image_token)).long()
        if attempt == "re-encode":
            self.cache, self.cached = None, 0
            inputs["pixel_values"] = torch.cat(self.pixel_values).to(self._device, self._vision_dtype())
            return inputs
        inputs["cache"] = self.cache
        if self.new_image is None:  # text only since the cached part (a chain finished in one pass)
            return inputs
        # Only the new image goes through the vision tower; the rotary positions use every grid.
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        with torch.no_grad():
            features = base.get_image_features(self.new_image["pixel_values"].to(self._device, self._vision_dtype()),
                                               self.new_image["image_grid_thw"].to(self._device), return_dict=True)
        inputs["mm_encoder_outputs"] = {"image": features}
        return inputs

    def _vision_dtype(self):
        return next(self.model.parameters()).dtype if not self.policy.quantization else self.policy.dtype

    def _keep(self, output, start: int, trim: bool = True) -> None:
        """Keep the generated ids up to the end of the tag (or all of them) and the cache that matches."""
        sequence = output.sequences[0].tolist()
        new = sequence[start:]
        kept, self.opened = trim_at_tag(self.tokenizer, new) if trim else (new, None)
        match = self.opened is not None
        eos = set(np.atleast_1d(self.model.generation_config.eos_token_id or []).tolist())
        if not match and (not new or new[-1] in eos or len(new) >= self.budget):
            self.ended = True
        self.budget -= len(new)
        self.ids = sequence[:start] + kept
        cache = getattr(output, "cache", None)
        common = start + next((i for i, (a, b) in enumerate(zip(kept, new)) if a != b), min(len(kept), len(new)))
        if cache is not None:
            held = cache.get_seq_length()
            keep = min(held, common)
            if held > keep:
                cache.crop(-(held - keep))
            self.cache, self.cached = cache, keep
        self.new_image = None

    # --- images ---------------------------------------------------------------------------------
    def see(self, stage: str, rgb: np.ndarray, size_text: str) -> list[int]:
        """Put the stage image into the conversation after its opening tag, then `WxH</stage_image>`.
        Returns the image's size as the VLM sees it (after the processor's pixel budget)."""
        ids, image_inputs, seen = stage_image_tokens(self.processor, rgb, stage, size_text)
        self.ids = self.ids + ids
        image_inputs = {k: v.to(self._device) for k, v in image_inputs.items()}  # beside the LQ's (GPU)
        self.pixel_values.append(image_inputs["pixel_values"])
        self.grids.append(image_inputs["image_grid_thw"])
        self.new_image = image_inputs
        self.record["seen"][stage] = seen
        return seen
