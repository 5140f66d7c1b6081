"""Reflective GRPO rollouts: the policy trained is the one that runs with `policy.reflect: true`.

Each rollout is generated as inference does it (`realsr_r1/reflect.py`): the completion stops where
it opens `<stage_image>` for a stage in `reflect_stages`, that stage is made (batched over the
completions of one input image), its image tokens and `WxH</stage_image>` are appended, and the
completion continues with the image in context. The inserted tokens sit in the forward pass and
are masked out of the loss; the log-probabilities cover only what the policy wrote.

Why a subclass and not TRL's tools: TRL 1.16's tool loop parses tool calls after `generate` ends
(no stop mid-completion), needs a chat template with tool calling (Qwen2.5-VL's has none:
`supports_tool_calling` is False), and renders results as a new `tool` turn, which would close the
assistant turn and break the VLCoT tag format. What TRL does have is the forward path for images
inside completions (`_generate_and_score_completions`: when `self.tools` is set and `tool_images`
is not empty, it runs the image processor over every sample's images in order and rebuilds
`mm_token_type_ids` from the full ids) and `tool_mask` (`loss_mask = completion_mask * tool_mask`).
So this class overrides only `_generate` (same return contract as 1.16's) and makes `self.tools`
truthy for the scoring pass of a batch that holds stage images. Both are private: `check_trl`
(filtered_grpo.py) pins the tested TRL version.
"""

from __future__ import annotations

import copy

import torch

from ..cot import STAGES, parse_cot
from .filtered_grpo import GroupFilteredGRPOTrainer
from ..imageio import to_pil
from ..reflect import opens_image_tag, stage_image_tokens, trim_at_tag
from ..rewards.visual import as_rgb, image_key


def written_mask(generated: list[int], kept: list[int]) -> list[int]:
    """The loss mask of `kept` (trim_at_tag's ids for what the policy `generated`): 1 where the
    policy sampled the token, 0 for tokens trim_at_tag spelled anew after a merged token at the tag's
    end, which the policy never sampled."""
    same = 0
    while same < min(len(generated), len(kept)) and generated[same] == kept[same]:
        same += 1
    return [1] * same + [0] * (len(kept) - same)


def _stage_image_marker():
    """Stands in `self.tools` while a batch's stage images are scored (never called)."""


class ReflectiveGRPOTrainer(GroupFilteredGRPOTrainer):
    """GRPO whose rollouts see the stage images in `reflect_stages` (group filter included)."""

    def __init__(self, *args, stage_images=None, reflect_stages=("rough",), logits_processors=None, **kwargs):
        self._plain_tools: list = []
        self._stage_images_in_batch = False
        if tuple(reflect_stages) not in (("rough",), ("rough", "middle")):  # inference feeds them in order
            raise ValueError(f"reflect_stages: {list(reflect_stages)} (use [rough] or [rough, middle])")
        self.reflect_stages = tuple(s for s in STAGES if s in reflect_stages)
        self.stage_images = stage_images  # (lq rgb, stage, plans, previous stage images | None) -> one image per plan
        self.logits_processors = list(logits_processors or [])  # tests make a tiny random model write tags
        super().__init__(*args, **kwargs)
        if self.use_vllm:
            raise ValueError("reflective rollouts run on transformers' generate, not vLLM (use_vllm: false)")
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if self.is_fsdp_enabled or (plugin is not None and getattr(plugin, "zero_stage", 0) == 3):
            # Ranks pause a different number of times; sharded generation is collective and would hang.
            raise ValueError("reflective rollouts run under DDP or ZeRO-1/2, not FSDP or ZeRO-3")
        self.reflect_counts: dict[str, int] = {}

    @property
    def tools(self):
        return [_stage_image_marker] if self._stage_images_in_batch else self._plain_tools

    @tools.setter
    def tools(self, value):
        self._plain_tools = value

    def _generate_and_score_completions(self, inputs):
        self._stage_images_in_batch = False
        try:
            return super()._generate_and_score_completions(inputs)
        finally:
            self._stage_images_in_batch = False

    # --- rollouts ---------------------------------------------------------------------------------
    def _generate(self, prompts: list):
        if not self.reflect_stages:
            return super()._generate(prompts)
        prompt_ids, images, _ = self._tokenize_prompts(prompts)
        if images is None:
            raise ValueError("reflective rollouts need the LQ image in each prompt")
        tokenizer = self._tokenizer
        n = len(prompt_ids)
        completion = [[] for _ in range(n)]
        mask = [[] for _ in range(n)]
        row_images = [list(images[i]) for i in range(n)]
        stage_images: list[list] = [[] for _ in range(n)]
        made: list[list] = [[] for _ in range(n)]  # each row's stage images as arrays: the next stage starts there
        open_rows, one_pass = list(range(n)), []  # rows still writing; rows that went astray
        counts = {"opened": 0, "astray": 0}
        for segment, stage in enumerate((*self.reflect_stages, None)):
            rows = sorted(open_rows + one_pass) if stage is None else open_rows
            if not rows:
                continue
            new = self._segment([list(prompt_ids[i]) + completion[i] for i in rows], [row_images[i] for i in rows],
                                [self._budget(mask[i]) for i in rows], stop_at_tags=stage is not None,
                                segment=segment)
            waiting = []
            for i, ids in zip(rows, new):
                kept, opened = trim_at_tag(tokenizer, ids) if stage is not None else (ids, None)
                completion[i] += kept
                mask[i] += written_mask(ids, kept)
                if stage is None or not self._unfinished(kept, mask[i]):
                    continue  # its chain ended (end of turn, or the token budget)
                if opened == stage:
                    waiting.append(i)
                else:  # a tag out of turn (or none): the rest of its chain in one pass
                    counts["astray"] += 1
                    one_pass.append(i)
            counts["opened"] += len(waiting)
            if waiting:
                self._add_stage_images(stage, waiting, completion, mask, row_images, stage_images, made)
            open_rows = waiting
        self.reflect_counts = counts
        mode = "train" if self.model.training else "eval"
        # Per rollout, this process's share: stage images seen, and how often a rollout paused or went astray.
        self._metrics[mode]["reflect/stage_images"].append(sum(len(s) for s in stage_images) / max(1, n))
        self._metrics[mode]["reflect/paused"].append(counts["opened"] / max(1, n))
        self._metrics[mode]["reflect/astray"].append(counts["astray"] / max(1, n))
        # The text part of the chain, as the rewards read it: what the policy wrote and the inserted
        # `WxH</stage_image>`; the image's own tokens are special tokens and drop out.
        texts = tokenizer.batch_decode(completion, skip_special_tokens=True)
        completions = [[{"role": "assistant", "content": t}] for t in texts]
        self._stage_images_in_batch = any(stage_images)
        all_images = [row_images[i] for i in range(n)]
        return list(map(list, prompt_ids)), completion, mask, completions, None, {}, all_images, stage_images

    def _budget(self, mask: list[int]) -> int:
        """New tokens a row may still write: the restorer's inserted tokens do not count."""
        return self.max_completion_length - sum(mask)

    def _unfinished(self, kept: list[int], mask: list[int]) -> bool:
        return self._budget(mask) > 0 and bool(kept) and kept[-1] not in self.eos_token_ids

    def _add_stage_images(self, stage, rows, completion, mask, row_images, stage_images, made):
        """Make `stage` for the rows that opened its tag, batched over the rows that share an LQ image;
        a stage after the first starts from the row's previous stage image, as inference does."""
        groups: dict[str, list[int]] = {}
        for i in rows:
            groups.setdefault(image_key(as_rgb(row_images[i][0])), []).append(i)
        for members in groups.values():
            rgb = as_rgb(row_images[members[0]][0])
            plans = [parse_cot(self._tokenizer.decode(completion[i], skip_special_tokens=True)) for i in members]
            previous = [made[i][-1] for i in members] if made[members[0]] else None
            outs = self.stage_images(rgb, stage, plans, previous)
            for i, out in zip(members, outs, strict=True):
                made[i].append(out)
                ids, _, _ = stage_image_tokens(self.processing_class, out, stage, f"{out.shape[1]}x{out.shape[0]}")
                completion[i] += ids
                mask[i] += [0] * len(ids)  # the restorer's tokens: in the forward pass, not in the loss
                pil = to_pil(out)
                row_images[i].append(pil)
                stage_images[i].append(pil)

    def _segment(self, sequences: list[list[int]], images: list[list], budgets: list[int], *, stop_at_tags: bool,
                 segment: int = 0):
        """One generation over rows of different lengths and images; returns each row's new ids
        (up to its EOS, or to the image tag that stopped it)."""
        from transformers import StoppingCriteria, StoppingCriteriaList
        from trl.models import unwrap_model_for_generation
        from trl.trainer.utils import pad

        tokenizer = self._tokenizer
        device = self.accelerator.device
        tensors = [torch.tensor(s) for s in sequences]
        ids = pad(tensors, padding_value=tokenizer.pad_token_id, padding_side="left").to(device)
        attention = pad([torch.ones_like(t) for t in tensors], padding_value=0, padding_side="left").to(device)
        flat = [im for row in images for im in row]
        image_inputs = self.processing_class.image_processor(images=flat, return_tensors="pt")
        inputs = {"input_ids": ids, "attention_mask": attention, **{k: v.to(device) for k, v in image_inputs.items()}}
        if self._image_pad_token_id is not None:
            inputs["mm_token_type_ids"] = (ids == self._image_pad_token_id).long()
        start = ids.shape[1]

        class TagStop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.tensor([opens_image_tag(tokenizer, row.tolist(), start) for row in input_ids],
                                    device=input_ids.device)

        config = copy.deepcopy(self.generation_config)
        config.max_new_tokens = max(budgets)
        if segment:  # a floor on the whole chain applies to its first segment only, as in inference (reflect.py)
            config.min_new_tokens = 0
        for p in self.logits_processors:
            if hasattr(p, "begin"):
                p.begin(segment)
        with (unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                          gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                                          generation_kwargs=self.generation_kwargs,
                                          gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs)
              as model, torch.no_grad()):
            out = model.generate(**inputs, generation_config=config,
                                 stopping_criteria=StoppingCriteriaList([TagStop()] if stop_at_tags else []),
                                 logits_processor=self.logits_processors or None)
        rows = []
        for row, limit in zip(out[:, start:].tolist(), budgets):
            cut = next((k + 1 for k, t in enumerate(row) if t in self.eos_token_ids), len(row))
            row = row[:min(cut, limit)]
            while row and row[-1] == tokenizer.pad_token_id and row[-1] not in self.eos_token_ids:
                row.pop()  # a row stopped by its tag is padded until the others stop
            rows.append(row)
        return rows
