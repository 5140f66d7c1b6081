"""VLCoT-GRPO end to end on CPU: tiny random VLM + upscaler, a dataset built from repo photos,
TRL's GRPOTrainer through `python -m realsr_r1.train` as users run it."""

import json
import math
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file

from conftest import REPO, photo, weights_env
from realsr_r1 import infer, train
from realsr_r1.training import common, grpo
from realsr_r1.tiny import build_tiny_upscaler
from realsr_r1.tiny import build_tiny_vlm

CONFIG = str(REPO / "configs" / "grpo-tiny.yaml")
REWARDS = ("format", "degradation", "understanding", "generation", "letter_fraction")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from realsr_r1.training.data import build_dataset

    root = tmp_path_factory.mktemp("grpo")
    weights = root / "weights"
    build_tiny_vlm(weights / "tiny-vlm")
    build_tiny_upscaler(weights / "tiny-upscaler")
    hr = root / "hr"
    hr.mkdir()
    for i, name in enumerate(["dog.png", "chip.png", "dog.png"]):
        photo((64, 48), name).rotate(90 * i, expand=False).save(hr / f"{i}.png")
    tags = root / "tags.jsonl"
    tags.write_text("".join(json.dumps({"file": f"{i}.png", "tags": ["dog", "grass"]}) + "\n" for i in range(3)))
    with weights_env(weights):
        build_dataset(hr, root / "data", tags=tags, log=lambda *a: None)
        yield root


def run(root, out, *extra, command=()):
    return train.main([*command, "--config", CONFIG, "--set", f"data={root / 'data'}",
                       "--set", "rewards.tiny_rewards:letter_fraction=1.0", *extra,
                       *([] if command else ["--set", f"output_dir={out}"])])


def log_rows(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_train_resume_and_use_the_adapter(setup, tmp_path, capsys):
    out = setup / "run"
    t = time.perf_counter()
    assert run(setup, out) == 0, capsys.readouterr().err
    assert time.perf_counter() - t < 120

    steps = [r for r in log_rows(out) if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:  # every configured reward is logged, with its spread, and the filter's count
        for name in REWARDS:
            assert f"rewards/{name}/mean" in r and f"rewards/{name}/std" in r
        assert r["group_filter/dropped"] == 0
        assert 0 <= r["rewards/generation/mean"] <= 1
    assert (out / "checkpoint-1" / "optimizer.pt").is_file() and (out / "checkpoint-2" / "trainer_state.json").is_file()

    card = (out / "README.md").read_text(encoding="utf-8")  # TRL's model card names the base model
    assert "fine-tuned version of `tiny-vlm`" in card and "huggingface.co/None" not in card
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and not any("visual" in k for k in adapter)  # the vision tower stays frozen
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())  # B starts at 0: it learned

    assert run(setup, out) == 2 and "pass --resume" in capsys.readouterr().err  # no silent overwrite
    assert run(setup, out, "--resume", "--set", "trainer.max_steps=3") == 0, capsys.readouterr().err
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert [r["step"] for r in log_rows(out) if "reward" in r] == [1, 2, 3]  # continued, not restarted
    # the linear schedule over the new length: step 3 of 3 learns at 1/3 of the rate, not at the 0
    # the first run's schedule ended on
    rate = {r["step"]: r["learning_rate"] for r in log_rows(out) if "learning_rate" in r}
    assert rate[1] == pytest.approx(1e-2) and rate[3] == pytest.approx(1e-2 / 3)
    assert run(setup, out, "--overwrite") == 0, capsys.readouterr().err  # the same command again, from 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert [r["step"] for r in log_rows(out) if "reward" in r] == [1, 2]

    src = tmp_path / "in"
    src.mkdir()
    photo((16, 12)).save(src / "p.png")
    with weights_env(setup / "weights"):
        rc = infer.main(["-i", str(src), "-o", str(tmp_path / "o"), "--profile", str(REPO / "configs" / "tiny.yaml"),
                         "--adapter", str(out), "--quiet", "--set", "restorer.rough=diffusion"])
        assert rc == 0, capsys.readouterr().err
        side = json.loads((tmp_path / "o" / "p.json").read_text())
        assert side["policy_info"]["adapter"] == str(out)
        rc = infer.main(["-i", str(src), "-o", str(tmp_path / "o2"), "--profile", "lite", "--adapter", str(out)])
        assert rc == 2 and "needs a profile with a VLM policy" in capsys.readouterr().err


def test_group_filter_drops_flat_groups(setup, capsys):
    out = setup / "filtered"
    rc = run(setup, out, "--set", "trainer.max_steps=1", "--set", "group_filter.mean_above=0",
             "--set", "group_filter.std_below=1")  # the ends of the reward's range: every group drops
    assert rc == 0, capsys.readouterr().err
    (row,) = [r for r in log_rows(out) if "reward" in r]
    assert row["group_filter/dropped"] == 1 and row["group_filter/frac_dropped"] == 1  # one group per step
    assert row["grad_norm"] == 0  # masked out of the loss: nothing to learn from it


def test_irpo_keeps_the_hardest_inputs(setup, capsys):
    out = setup / "hard"
    assert run(setup, None, "--keep", "0.5", "--out", str(out), command=("filter",)) == 0, capsys.readouterr().err
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert sorted(s["index"] for s in scores) == [0, 1, 2]
    from realsr_r1.training.data import load_dataset

    kept = load_dataset(out)
    assert len(kept) == math.ceil(0.5 * 3)
    lowest = sorted(scores, key=lambda s: (s["reward"], s["index"]))[:2]
    original = load_dataset(setup / "data")
    assert sorted(kept["hr_path"]) == sorted(original[s["index"]]["hr_path"] for s in lowest)
    assert run(setup, None, "--keep", "0.5", "--out", str(out), command=("filter",)) == 0
    assert len((out / "scores.jsonl").read_text().splitlines()) == 3  # resumed: nothing scored twice


def test_qlora_trains_on_a_4bit_base(setup, capsys):
    import bitsandbytes as bnb

    from realsr_r1.profiles import load_config

    cfg = load_config(CONFIG, ["load_in_4bit=true"])
    with weights_env(setup / "weights"):
        model, _ = grpo.load_policy_model(cfg, "cpu")
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        del model
    out = setup / "qlora"
    assert run(setup, out, "--set", "load_in_4bit=true", "--set", "trainer.max_steps=1") == 0, capsys.readouterr().err
    adapter = load_file(out / "adapter_model.safetensors")
    assert any("lora_A" in k for k in adapter) and [r["step"] for r in log_rows(out) if "reward" in r] == [1]
    import torch  # TRL casts QLoRA adapters to bf16, where lr-sized steps round away: trained in fp32

    assert {v.dtype for v in adapter.values()} == {torch.float32}


@pytest.mark.parametrize("overrides,words", [
    (["--set", "data=null"], "needs `data`"),
    (["--set", "trainer.no_such_option=1"], "trainer:"),
    (["--set", "dtype=fp8"], "dtype: unknown precision"),
    (["--set", "lora=null", "--set", "dtype=fp8"], "dtype: unknown precision"),
    (["--set", "model=no-such-model"], "weights not found"),
    (["--set", "rewards.beauty=1"], "unknown reward"),
    (["--set", "lr=0.1"], "lr: unknown training config key"),
    (["--set", "generaton.temperature=0.5"], "generaton: unknown training config key (did you mean generation?)"),
    (["--set", "lora.rank=8"], "lora.rank: unknown key (valid: r, alpha"),
    (["--set", "restorer.tiel=8"], "restorer.tiel: unknown key for the diffusion restorer (did you mean tile?)"),
    (["--set", "generation.temprature=0.5"], "generation.temprature: unknown decoding setting"),
    (["--set", "generation.top_k=abc"], "generation.top_k: expected int, got 'abc'"),
    (["--set", "generation=5"], "generation: expected a section"),
    (["--set", "restorer=5"], "restorer: expected a section"),
    (["--set", "rewards=5"], "rewards: expected a section"),
    (["--set", "max_pixels=abc"], "max_pixels: expected a pixel count"),
    (["--set", "group_filter.mean_above=abc"], "group_filter.mean_above: expected a number"),
    (["--set", "trainer.generation_kwargs={top_k: 5}"], "trainer.generation_kwargs.top_k: decoding is set in"),
])
def test_config_mistakes_are_one_line_errors(setup, tmp_path, capsys, overrides, words):
    assert run(setup, tmp_path / "run", *overrides) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and words in err[-1] and "Traceback" not in "\n".join(err)


# --- Issue 10: precision, decoding, group filter ------------------------------------------------------
def _changed_fraction(before, after):
    """Share of weights an optimizer step changed, compared at the precision they were stored in."""
    import torch

    names = [k for k in after if "layers.0.self_attn.q_proj.weight" in k or "layers.0.mlp.up_proj.weight" in k]
    assert names
    changed = total = 0
    for k in names:
        b = before[k].to(after[k].dtype)
        changed += int((after[k] != b).sum())
        total += b.numel()
    return changed / total, {str(after[k].dtype) for k in names} == {str(torch.float32)}


def test_full_finetuning_learns_at_a_small_learning_rate(setup, capsys, tmp_path):
    """dtype bf16 (what auto gives on a GPU) with lora: null used to round 2e-6 AdamW steps away."""
    import yaml

    out = setup / "full"
    rc = run(setup, out, "--set", "lora=null", "--set", "dtype=bf16", "--set", "trainer.learning_rate=2.0e-6",
             "--set", "trainer.max_steps=1", "--set", "group_filter=null", "--set", "generation.temperature=0.7")
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"model saved in {out}" in err and f"--set policy.model={out}" in err and "--adapter" not in err
    fraction, fp32 = _changed_fraction(load_file(setup / "weights" / "tiny-vlm" / "model.safetensors"),
                                       load_file(out / "model.safetensors"))
    assert fp32 and fraction > 0.5

    src = tmp_path / "in"
    src.mkdir()
    photo((16, 12)).save(src / "p.png")
    # a profile that sets no decoding of its own: the model's recorded one applies
    profile = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    del profile["policy"]["generation"]
    (tmp_path / "trained.yaml").write_text(yaml.safe_dump(profile))
    with weights_env(setup / "weights"):
        rc = infer.main(["-i", str(src), "-o", str(tmp_path / "o"), "--profile", str(tmp_path / "trained.yaml"),
                         "--quiet", "--set", f"policy.model={out}", "--adapter", str(out)])
        assert rc == 2 and "holds a full model: use --set policy.model=" in capsys.readouterr().err
        rc = infer.main(["-i", str(src), "-o", str(tmp_path / "o"), "--profile", str(tmp_path / "trained.yaml"),
                         "--quiet", "--set", f"policy.model={out}"])
        assert rc == 0, capsys.readouterr().err
    used = json.loads((tmp_path / "o" / "p.json").read_text())["policy_info"]["generation"]
    # the sidecar records the decoding that ran: the one the rollouts used, recorded beside the model
    assert used["temperature"] == 0.7 and used["max_new_tokens"] == 16
    assert used["top_k"] == 0 and used["repetition_penalty"] == 1.0


def test_lora_run_says_adapter_and_records_its_decoding(setup):
    out = setup / "run"  # from test_train_resume_and_use_the_adapter (same module fixture)
    if not (out / "adapter_config.json").is_file():
        pytest.skip("runs after test_train_resume_and_use_the_adapter")
    from realsr_r1.decoding import TRAINED_DECODING_FILE

    recorded = json.loads((out / TRAINED_DECODING_FILE).read_text())
    assert recorded["max_new_tokens"] == 16 and recorded["top_k"] == 0 and recorded["repetition_penalty"] == 1.0
    for checkpoint in ("checkpoint-1", "checkpoint-2"):  # `--adapter DIR/checkpoint-N` samples alike
        assert json.loads((out / checkpoint / TRAINED_DECODING_FILE).read_text()) == recorded
    assert grpo.saved_message({"lora": {"r": 4}}, out).startswith(f"adapter saved in {out}")


def test_rollouts_sample_with_the_one_decoding(setup, tmp_path):
    from realsr_r1.profiles import ConfigError, load_config

    cfg = load_config(CONFIG, ["generation.top_p=0.8"])
    args = grpo.grpo_args(cfg, tmp_path, [1.0])
    assert (args.temperature, args.top_p, args.top_k, args.repetition_penalty, args.max_completion_length) == \
        (1.0, 0.8, 0, 1.0, 16)
    with pytest.raises(ConfigError, match=r"trainer\.temperature: decoding is set in `generation:`"):
        grpo.grpo_args(load_config(CONFIG, ["trainer.temperature=0.5"]), tmp_path, [1.0])
    with pytest.raises(ConfigError, match="GRPO, which samples"):
        grpo.grpo_args(load_config(CONFIG, ["generation.do_sample=false"]), tmp_path, [1.0])
    args = grpo.grpo_args(load_config(CONFIG, ["generation.min_new_tokens=4"]), tmp_path, [1.0])
    assert args.generation_kwargs == {"min_new_tokens": 4}  # GRPOConfig has no field of its own
    from realsr_r1.decoding import Decoding

    assert Decoding(min_new_tokens=4).grpo_fields(vllm=True)["generation_kwargs"] == {"min_tokens": 4}


def _emitter(filename: str):
    """A function that warns as code in `filename` does."""
    scope = {"warnings": warnings, "__name__": "emitter"}
    exec(compile("def emit():\n    warnings.warn('`old` is deprecated; use `new`', FutureWarning)\n", filename, "exec"),
         scope)
    return scope["emit"]


def _shown_over_steps(install: bool, steps: int = 5) -> list[str]:
    """The files whose warnings are shown over `steps` training steps, each resetting the warnings
    registry as transformers' Trainer does (catch_warnings), as Python shows them by default."""
    library = _emitter("/venv/lib/python3.11/site-packages/transformers/modeling_utils.py")
    ours = _emitter(str(REPO / "realsr_r1" / "somewhere.py"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        if install:
            common.show_library_warnings_once()
        for _ in range(steps):
            library()
            ours()
            with warnings.catch_warnings():
                pass
    return [w.filename for w in seen]


def test_library_future_warnings_show_once_per_message(monkeypatch):
    monkeypatch.setattr(sys, "warnoptions", [])
    before = _shown_over_steps(install=False)
    assert sum("transformers" in f for f in before) == 5  # what flooded the log: once per step
    after = _shown_over_steps(install=True)
    assert sum("transformers" in f for f in after) == 1  # the first occurrence is still shown
    assert sum("realsr_r1" in f for f in after) == 5  # only the libraries' warnings are thinned
    monkeypatch.setattr(sys, "warnoptions", ["default"])  # python -W / PYTHONWARNINGS: the user's choice wins
    assert sum("transformers" in f for f in _shown_over_steps(install=True)) == 5


ON_POLICY = SimpleNamespace(num_iterations=1, beta=0.0, use_vllm=False, steps_per_generation=2,
                            gradient_accumulation_steps=2)


def test_a_zero_loss_on_policy_is_explained_once():
    lines = []
    callback = grpo._callbacks(Path("/dev/null"), Path("/dev/null"), say=lines.append)[0]
    for step, loss in enumerate([-0.07, 0.0, 0.0, -0.4, 0.0], start=1):
        state = SimpleNamespace(is_world_process_zero=True, global_step=step)
        callback.on_log(ON_POLICY, state, None, logs={"loss": loss, "grad_norm": 0.18})
    assert lines == ["loss 0.0 is expected on purely on-policy steps (num_iterations 1, beta 0): the gradient is "
                     "not zero (grad_norm 0.18); the importance ratio is exactly 1, so the loss's value is minus "
                     "the mean advantage, which cancels within groups"]


@pytest.mark.parametrize("change", [{"beta": 0.01}, {"num_iterations": 2}, {"steps_per_generation": 4},
                                    {"use_vllm": True}])
def test_a_zero_loss_off_policy_gets_no_note(change):
    args = SimpleNamespace(**{**vars(ON_POLICY), **change})
    assert grpo.ZeroLossNotes().check(args, 1, {"loss": 0.0, "grad_norm": 0.18}) == []


def test_a_zero_gradient_is_not_called_expected_on_policy():
    """Tiny random models often score every completion of a group alike: then the gradient is zero too."""
    notes = grpo.ZeroLossNotes()
    said = [n for step in (1, 2, 3) for n in notes.check(ON_POLICY, step, {"loss": 0.0, "grad_norm": 0.0,
                                                                           "frac_reward_zero_std": 1.0})]
    assert len(said) == 1 and said[0].startswith("loss 0.0 and grad_norm 0.0 at step 1: no completion")
    assert "each group's rewards were all equal" in said[0] and "gradient is not zero" not in said[0]


def test_group_mean_uses_only_the_rewards_present():
    import torch

    from realsr_r1.training.group_filter import group_drop

    nan = float("nan")
    # rewards [1, None] with weights [1, 1]: the mean is 1, not 0.5, so the flat group goes
    drop = group_drop(torch.tensor([[1.0, nan], [1.0, nan]]), torch.tensor([1.0, 1.0]), 2, 0.9, 0.05)
    assert drop.tolist() == [True]
    rewards = torch.tensor([[1.0, nan], [1.0, nan], [1.0, 0.0], [1.0, 0.0]])
    assert group_drop(rewards, torch.tensor([1.0, 1.0]), 2, 0.9, 0.05).tolist() == [True, False]
    # a row with no reward at all is never judged flat
    assert group_drop(torch.tensor([[nan], [nan]]), torch.tensor([1.0]), 2, -1.0, 1.0).tolist() == [False]


def test_trl_version_guard():
    from realsr_r1.training.filtered_grpo import check_trl

    check_trl()  # the installed TRL is one the overrides were written for
    with pytest.raises(ValueError, match="TRL 1.18.0 is installed"):
        check_trl("1.18.0")

    class Changed:
        def _calculate_rewards(self, inputs, prompts, completions):
            pass

        _generate_and_score_completions = _compute_loss = _calculate_rewards

    with pytest.raises(ValueError, match="changed GRPOTrainer._calculate_rewards"):
        check_trl(cls=Changed)


@pytest.fixture(scope="module")
def filtered_trainer(setup, tmp_path_factory):
    from realsr_r1.training.filtered_grpo import GroupFilteredGRPOTrainer
    from realsr_r1.profiles import load_config

    cfg = load_config(CONFIG, [f"data={setup / 'data'}", f"output_dir={tmp_path_factory.mktemp('gf')}"])
    with weights_env(setup / "weights"):
        trainer = grpo.build_trainer(cfg, tmp_path_factory.mktemp("gf_out"))
    assert isinstance(trainer, GroupFilteredGRPOTrainer)
    return trainer


def _generation_batch(n_rows: int, dropped: slice):
    """A hand-made generation batch as the filter leaves it: rows of `dropped` masked, advantage 0."""
    import torch

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(20, 300, (n_rows, 6), generator=g)
    completion = torch.randint(20, 300, (n_rows, 5), generator=g)
    lengths = torch.randint(1, 6, (n_rows,), generator=g)
    mask = (torch.arange(5)[None] < lengths[:, None]).long()
    advantages = torch.randn(n_rows, generator=g)
    mask[dropped], advantages[dropped] = 0, 0.0
    return {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt), "completion_ids": completion,
            "completion_mask": mask, "advantages": advantages, "num_items_in_batch": mask.sum()}


def _loss(trainer, batch, micro_batches: int, monkeypatch, seed: int = 0):
    """The loss of one generation batch as TRL trains on it: shuffled, split into micro-batches,
    each divided by the accumulation steps (`_prepare_inputs`, `_compute_loss`), summed."""
    import torch
    from trl.trainer.utils import shuffle_sequence_dict, split_tensor_dict

    monkeypatch.setattr(trainer, "current_gradient_accumulation_steps", micro_batches, raising=False)
    monkeypatch.setattr(trainer.args, "steps_per_generation", micro_batches)
    torch.manual_seed(seed)
    parts = split_tensor_dict(shuffle_sequence_dict(batch), micro_batches)
    with torch.no_grad():
        return sum(trainer._compute_loss(trainer.model, part) for part in parts)


def test_on_policy_loss_is_zero_and_its_gradient_is_not(filtered_trainer, monkeypatch):
    """What the zero-loss note says, checked on TRL's own loss: no old log-probs (on policy), beta 0,
    advantages that cancel within each group."""
    import torch

    trainer = filtered_trainer
    monkeypatch.setattr(trainer, "loss_type", "grpo")
    monkeypatch.setattr(trainer, "current_gradient_accumulation_steps", 1, raising=False)
    assert trainer.beta == 0 and trainer.num_iterations == 1
    batch = _generation_batch(4, slice(0, 0))
    batch["advantages"] = torch.tensor([1.0, -1.0, 0.5, -0.5])  # two groups of two
    trainer.model.train()
    try:
        loss = trainer._compute_loss(trainer.model, batch)
        loss.backward()
        grads = [p.grad for p in trainer.model.parameters() if p.requires_grad and p.grad is not None]
        assert loss.item() == 0.0 and sum(g.abs().sum().item() for g in grads) > 0
    finally:
        trainer.model.zero_grad(set_to_none=True)
        trainer.model.eval()


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "luspo"])
def test_partial_drop_leaves_the_kept_groups_loss_unchanged(filtered_trainer, loss_type, monkeypatch):
    """Two groups of four, the second dropped, split into four shuffled micro-batches: the loss is
    that of the first group alone, wherever the shuffle puts the dropped rows."""
    from realsr_r1.training.filtered_grpo import SCALE
    from realsr_r1.training.group_filter import kept_scale

    import torch

    trainer = filtered_trainer
    trainer.model.train()
    monkeypatch.setattr(trainer, "loss_type", loss_type)
    batch = _generation_batch(8, slice(4, 8))
    batch[SCALE] = kept_scale(torch.tensor([False] * 4 + [True] * 4))
    kept = {k: v[:4] for k, v in batch.items() if k not in (SCALE, "num_items_in_batch")}
    kept["num_items_in_batch"] = kept["completion_mask"].sum()
    alone = _loss(trainer, kept, 1, monkeypatch)
    for seed in range(4):
        assert torch.allclose(_loss(trainer, batch, 4, monkeypatch, seed), alone, atol=1e-5), seed
    trainer.model.eval()


def test_a_group_filter_batch_keeps_token_normalised_losses(filtered_trainer, monkeypatch):
    """bnpo divides by the tokens still in the mask: without a scale its kept loss is unchanged."""
    from realsr_r1.training.filtered_grpo import SCALE
    from realsr_r1.training.group_filter import kept_scale

    import torch

    trainer = filtered_trainer
    monkeypatch.setattr(trainer, "loss_type", "bnpo")
    batch = _generation_batch(4, slice(2, 4))
    batch[SCALE] = kept_scale(torch.tensor([False, False, True, True]))
    kept = {k: v[:2] for k, v in batch.items() if k not in (SCALE, "num_items_in_batch")}
    assert torch.allclose(_loss(trainer, batch, 1, monkeypatch), _loss(trainer, kept, 1, monkeypatch), atol=1e-6)


def test_the_training_package_imports_in_no_circle():
    """realsr_r1/training: one module per idea, the shared helpers in common.py, and no module that
    imports (at the top or inside a function) one that imports it back, directly or not."""
    import ast

    root = REPO / "realsr_r1"
    graph = {}
    for path in [*sorted((root / "training").glob("*.py")), root / "train.py", root / "data.py"]:
        name = "realsr_r1." + ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
                found |= {f"{target}.{a.name}" for a in node.names} | {target}
        graph[name] = {t for t in found if t.startswith("realsr_r1.training") or t in ("realsr_r1.train", "realsr_r1.data")}
    graph = {k: {t for t in v if t in graph and t != k} for k, v in graph.items()}

    def cycle_from(node, path):
        for nxt in graph[node]:
            if nxt in path:
                return path[path.index(nxt):] + [nxt]
            found = cycle_from(nxt, path + [nxt])
            if found:
                return found
        return None

    for start in graph:
        assert cycle_from(start, [start]) is None, " → ".join(cycle_from(start, [start]))
    assert "realsr_r1.training.common" in graph["realsr_r1.training.restorer_rl"]  # shared helpers, not grpo's


def test_the_saved_messages_name_the_profile_that_uses_the_result():
    """The hint at the end of a run restores with the profile the result was trained for: the tiny
    configs' results work with the tiny profile, the real ones' with full."""
    from realsr_r1.profiles import load_config
    from realsr_r1.training import joint

    tiny = load_config(str(REPO / "configs" / "grpo-tiny.yaml"))
    assert "--profile tiny --adapter runs/x " in grpo.saved_message(tiny, Path("runs/x"))
    assert "--profile full --adapter runs/x " in grpo.saved_message(load_config(str(REPO / "configs" / "grpo.yaml")),
                                                                     Path("runs/x"))
    cfg = joint.expand(load_config(str(REPO / "configs" / "joint-tiny.yaml")))
    assert "--profile tiny --adapter p --restorer-adapter r " in joint.main_message(cfg, Path("p"), Path("r"))
