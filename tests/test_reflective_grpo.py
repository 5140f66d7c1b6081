"""Reflective GRPO rollouts on CPU: the tiny random VLM is made to write the tags (tiny.ScriptedChain),
the rough stage enters each rollout's context, and the loss covers only what the policy wrote."""

import json

import numpy as np
import pytest
import torch

from conftest import REPO, weights_env
from realsr_r1.training import grpo
from realsr_r1.cot import matches_format
from realsr_r1.reflect import stage_image_tokens
from realsr_r1.tiny import ScriptedChain
from test_train import setup  # noqa: F401 - the module fixture: tiny models and a dataset

CONFIG = str(REPO / "configs" / "grpo-tiny-reflect.yaml")
SCRIPTS = [[f"<degradation>noise: {level}; blur: none; jpeg: none; downsample: x4</degradation>"  # rewards differ
            "<rough_understand>a dog</rough_understand><rough_image>" for level in ("light", "heavy")],
           "<middle_understand>a dog on grass</middle_understand><middle_image></middle_image>"
           "<final_understand>fur</final_understand><final_image></final_image>"]


@pytest.fixture
def trainer(setup, tmp_path):  # noqa: F811
    from realsr_r1.profiles import load_config

    cfg = load_config(CONFIG, [f"data={setup / 'data'}", f"output_dir={tmp_path}", "generation.max_new_tokens=120",
                               "trainer.max_steps=1"])
    (tmp_path / "realsr_decoding.json").write_text(json.dumps(grpo.decoding(cfg).to_dict()))  # as train() does
    with weights_env(setup / "weights"):
        trainer = grpo.build_trainer(cfg, tmp_path)
        eos = trainer.eos_token_ids[0]
        trainer.logits_processors = [ScriptedChain(trainer._tokenizer, SCRIPTS, eos)]
        yield trainer


def test_reflective_rollouts_put_the_rough_image_in_the_forward_pass_and_out_of_the_loss(trainer, monkeypatch):
    from realsr_r1.training.reflective_grpo import ReflectiveGRPOTrainer

    assert isinstance(trainer, ReflectiveGRPOTrainer)
    forwards, losses = [], []
    plain_logps = trainer._get_per_token_logps_and_entropies

    def logps(model, input_ids, *args, **kw):
        forwards.append({"input_ids": input_ids.clone(), "num_images": kw.get("num_images"),
                         "grids": None if kw.get("image_grid_thw") is None else kw["image_grid_thw"].clone()})
        return plain_logps(model, input_ids, *args, **kw)

    plain_loss = trainer._compute_loss

    def loss(model, inputs):
        losses.append({k: inputs[k].clone() for k in ("completion_ids", "completion_mask", "tool_mask",
                                                      "num_items_in_batch") if inputs.get(k) is not None})
        return plain_loss(model, inputs)

    rewarded = []
    plain_rewards = trainer._calculate_rewards

    def rewards(inputs, prompts, completions, completion_ids_list):
        rewarded.extend(c[0]["content"] for c in completions)
        return plain_rewards(inputs, prompts, completions, completion_ids_list)

    monkeypatch.setattr(trainer, "_calculate_rewards", rewards)
    monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies", logps)
    monkeypatch.setattr(trainer, "_compute_loss", loss)
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    trainer.train()

    assert trainer.reflect_counts["opened"] == 2  # both rollouts of the group stopped at <rough_image>
    # The forward pass holds two images per rollout (LQ, rough), each with its image tokens.
    pad = trainer._image_pad_token_id
    grids = [f for f in forwards if f["grids"] is not None]
    assert grids and all(f["num_images"] == [2, 2] for f in grids)
    merge = trainer.processing_class.image_processor.merge_size ** 2
    for f in grids:
        assert int((f["input_ids"] == pad).sum()) == int(f["grids"].prod(dim=1).sum()) // merge
    # The loss mask leaves out exactly the tokens the restorer inserted: the rough image's placeholder
    # and its size, and every image token of the completion.
    batch = losses[0]
    ids, completion_mask, tool_mask = batch["completion_ids"], batch["completion_mask"], batch["tool_mask"]
    lq = trainer.train_dataset[0]["image"]
    w, h = lq.size
    inserted = len(stage_image_tokens(trainer.processing_class, np.zeros((h, w, 3), np.float32), "rough",
                                      f"{w}x{h}")[0])
    for row in range(ids.shape[0]):
        live = completion_mask[row].bool()
        assert int((~tool_mask[row].bool() & live).sum()) == inserted
        assert not bool((tool_mask[row].bool() & live & (ids[row] == pad)).any())  # no image token in the loss
        assert int((live & (ids[row] == pad)).sum()) > 0  # but the rough image is in the completion
    # The rewards read the chain's text, the inserted size included, and the format reward applies to it.
    assert len(rewarded) == 2 and all(matches_format(t) and f"<rough_image>{w}x{h}</rough_image>" in t for t in rewarded)
    # Token-normalised losses divide by the tokens the policy wrote, not the inserted ones.
    assert int(batch["num_items_in_batch"]) == int((completion_mask * tool_mask).sum())
    lora_after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(lora_before[n], lora_after[n].detach()) for n in lora_before)


def test_reflect_stages_are_checked(setup, tmp_path):  # noqa: F811
    from realsr_r1.profiles import ConfigError, load_config

    for stages in ("[final]", "[middle]"):  # middle alone: the policy writes <rough_image> first
        cfg = load_config(CONFIG, [f"data={setup / 'data'}", f"reflect_stages={stages}"])
        with pytest.raises(ConfigError, match="reflect_stages"):
            with weights_env(setup / "weights"):
                grpo.build_trainer(cfg, tmp_path)


def test_the_documented_smoke_run_reflects_and_its_log_says_so(setup, tmp_path):  # noqa: F811
    """docs/training.md's reflective smoke run, as written (its config's script makes the tiny VLM
    write the tags): rollouts pause at <rough_image> and take the rough image in."""
    from realsr_r1 import train
    from realsr_r1.profiles import ConfigError, load_config

    with weights_env(setup / "weights"):
        rc = train.main(["--config", CONFIG, "--set", f"data={setup / 'data'}", "--set", f"output_dir={tmp_path}",
                         "--set", "trainer.max_steps=1"])
    assert rc == 0
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reflect/paused" in r]
    assert steps and all(r["reflect/paused"] > 0 and r["reflect/stage_images"] > 0 for r in steps)
    cfg = load_config(CONFIG, [f"data={setup / 'data'}", "model=Qwen/Qwen2.5-VL-3B-Instruct"])
    with pytest.raises(ConfigError, match="script: only for a reflective smoke run of a tiny"):
        grpo.check_config(cfg)


class _MergingTokenizer:
    """A tokenizer with a merge across the tag's end (`></`), as real BPE vocabularies have."""

    vocab = ["<", "rough", "_", "image", ">", "></", "/", "a", " "]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.vocab[i] for i in ids)

    def __call__(self, text, add_special_tokens=False):
        ids = []
        while text:
            best = max((t for t in self.vocab if text.startswith(t)), key=len)
            ids.append(self.vocab.index(best))
            text = text[len(best):]
        return {"input_ids": ids}


def test_tag_tokens_spelled_anew_are_out_of_the_loss():
    """trim_at_tag drops a token that completes the tag and carries more (`></`) and spells the tag's
    end with its own tokens: the policy never sampled those, so their loss mask is 0."""
    from realsr_r1.reflect import trim_at_tag
    from realsr_r1.training.reflective_grpo import written_mask

    tok = _MergingTokenizer()
    generated = tok("a <rough_image></")["input_ids"]
    kept, stage = trim_at_tag(tok, generated)
    assert stage == "rough" and tok.decode(kept) == "a <rough_image>"
    assert written_mask(generated, kept) == [1] * (len(kept) - 1) + [0]  # the re-spelled `>`
    plain = tok("a <rough_image>")["input_ids"]
    assert written_mask(plain, trim_at_tag(tok, plain)[0]) == [1] * len(plain)


def test_min_new_tokens_holds_for_the_first_segment_only(trainer, monkeypatch):
    """As inference (reflect.py): a floor on the chain's length applies to its first segment; a
    continuation after a stage image may end at once."""
    from transformers import GenerationMixin

    seen = []
    real = GenerationMixin.generate

    def generate(self, *a, generation_config=None, **kw):
        seen.append(generation_config.min_new_tokens)
        return real(self, *a, generation_config=generation_config, **kw)

    monkeypatch.setattr(GenerationMixin, "generate", generate)
    trainer.generation_config.min_new_tokens = 4
    trainer.train()
    assert seen[:2] == [4, 0]  # the rollout's first segment, then its continuation after the rough image
