"""RL of the diffusion restorer (train_restorer.py) on the tiny random upscaler, offline on CPU.

Rewards that the tiny random model can move come from tests/tiny_rewards.py (`module:function`
rewards of images): brightness (learnable), perfect (flat groups), noise_paying (anti-correlated
with fidelity: what the guard is for)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, photo, weights_env
from realsr_r1 import train
from realsr_r1.tiny import build_tiny_upscaler

CONFIG = str(REPO / "configs" / "restorer-tiny.yaml")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from realsr_r1.training.data import build_dataset

    root = tmp_path_factory.mktemp("restorer-rl")
    weights = root / "weights"
    build_tiny_upscaler(weights / "tiny-upscaler")
    hr = root / "hr"
    hr.mkdir()
    for i, name in enumerate(["dog.png", "chip.png", "dog.png", "chip.png", "dog.png"]):
        photo((64, 48), name).rotate(90 * i).save(hr / f"{i}.png")
    with weights_env(weights):
        build_dataset(hr, root / "data", log=lambda *a: None)
        yield root


def run(root, out, *sets, resume=False, overwrite=False):
    args = ["restorer", "--config", CONFIG, "--set", f"data={root / 'data'}", "--set", f"output_dir={out}"]
    for s in sets:
        args += ["--set", s]
    return train.main(args + (["--resume"] if resume else []) + (["--overwrite"] if overwrite else []))


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("how, sets, margin", [
    ("full fine-tuning", ["lora=null", "optimizer.learning_rate=3e-3"], 2.0),
    ("LoRA", ["optimizer.learning_rate=3e-2", "lora.targets=[to_q,to_k,to_v,to_out.0,proj_in,proj_out,conv_in,conv_out]"], 1.0),
    ("LoRA, guided inference", [
        "optimizer.learning_rate=3e-2", "lora.targets=[to_q,to_k,to_v,to_out.0,proj_in,proj_out,conv_in,conv_out]",
        "restorer.guidance_scale=3.0"], 1.0),
    ("LoRA, from the middle stage", [
        "optimizer.learning_rate=1e-2", "lora.targets=[to_q,to_k,to_v,to_out.0,proj_in,proj_out,conv_in,conv_out]",
        "restorer.strength=0.5", "max_steps=40", "eval.steps=40"], 0.5),
])
def test_a_tiny_run_learns_a_reward_it_can_move(setup, tmp_path, how, sets, margin):
    """Brightness on the training inputs, fixed seeds: after 20 steps the evaluated mean reward is
    above step 0's by more than `margin` times the spread (std) of the rewards of the samples one
    step draws, so the model moved its output distribution, not one lucky sample. Measured: full
    fine-tuning +3.0 spreads (seed 0; +2.6 with seed 2), LoRA +2.2; with guided inference (the
    rollouts are not) +2; img2img from the middle stage (strength 0.5: the rollouts start at
    t ≈ 500, where the tiny model moves brightness little) +0.8 in 40 steps at a third of the
    learning rate, which at 3e-2 rose for 10 steps and then fell. The LoRA includes the UNet's
    first and last convolutions here: the tiny UNet's attention alone barely moves brightness
    (0.5204 → 0.5198 in 20 steps), the real one's attention carries far more of the model."""
    out = tmp_path / "learn"
    assert run(setup, out, "rewards={tiny_rewards:brightness: 1.0}", "max_steps=20", "eval.steps=20", *sets,
               f"eval.data={setup / 'data'}", "eval.count=5", "eval.metrics=[psnr]") == 0
    ev = rows(out / "eval.jsonl")
    assert [r["step"] for r in ev] == [0, 40 if "max_steps=40" in sets else 20]
    spread = rows(out / "log.jsonl")[0]["rewards/brightness/std"]
    assert ev[1]["reward"] - ev[0]["reward"] > margin * spread > 0
    assert (out / ("model" if how.startswith("full") else "adapter")).is_dir()
    assert (out / "eval.md").read_text().count("\n") == 4 and (out / "eval.png").stat().st_size > 1000


def test_lora_changes_the_old_model_follows_by_ema_and_resume_continues(setup, tmp_path):
    sets = ["rewards={tiny_rewards:brightness: 1.0}", "nft.ema={rate: 0.2, max_decay: 0.5}", "save_steps=2",
            "eval.steps=0"]
    straight = tmp_path / "straight"
    assert run(setup, straight, *sets, "max_steps=4") == 0
    split = tmp_path / "split"
    assert run(setup, split, *sets, "max_steps=2") == 0
    assert run(setup, split, *sets, "max_steps=4") == 2  # an existing run is not overwritten
    assert run(setup, split, *sets, "max_steps=4", resume=True) == 0
    assert [r["step"] for r in rows(split / "log.jsonl")] == [1, 2, 3, 4]
    a = load_file(str(straight / "adapter" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(split / "adapter" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    ups = [v for k, v in a.items() if "lora.up" in k or "lora_B" in k]
    assert ups and all(float(v.abs().max()) > 0 for v in ups)  # B starts at 0: every adapter layer trained

    state = torch.load(straight / "checkpoint-4" / "state.pt", weights_only=False)["model"]
    current = {k[len("current."):]: v for k, v in state.items() if k.startswith("current.")}
    old = {k[len("old."):]: v for k, v in state.items() if k.startswith("old.")}
    assert current.keys() == old.keys()
    b_keys = [k for k in current if "lora_B" in k]
    # the old model moved (it started at B = 0) but lags the current one (EMA decay 0.2 … 0.6 → 0.5)
    assert all(float(old[k].abs().max()) > 0 for k in b_keys)
    assert any(not torch.allclose(old[k], current[k]) for k in b_keys)
    # --overwrite: the same command again starts from step 0, the earlier checkpoints and log gone
    assert run(setup, straight, *sets, "max_steps=2", overwrite=True) == 0
    assert [r["step"] for r in rows(straight / "log.jsonl")] == [1, 2]
    assert sorted(p.name for p in straight.glob("checkpoint-*")) == ["checkpoint-2"]


def test_the_ema_step_mixes_old_and_current_by_the_decay(setup):
    from diffusers import StableDiffusionUpscalePipeline

    from realsr_r1.training.trainable import TrainableUpscaler

    pipe = StableDiffusionUpscalePipeline.from_pretrained(str(setup / "weights" / "tiny-upscaler"))
    model = TrainableUpscaler(pipe, lora={"r": 4, "alpha": 8})
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p))
    pairs = model._pairs()
    before = [(o.clone(), c.clone()) for o, c in pairs]
    model.ema_step(0.25)
    for (o, c), (o0, c0) in zip(pairs, before):
        assert torch.allclose(o, 0.25 * o0 + 0.75 * c0) and torch.equal(c, c0)
    # the old adapter's prediction differs from the current one's, the reference's from both
    x = torch.randn(1, 7, 8, 8)
    kw = dict(encoder_hidden_states=torch.randn(1, 77, 16), class_labels=torch.tensor([20]), return_dict=False)
    with torch.no_grad():
        preds = {}
        for which in ("current", "old", "reference"):
            with model.use(which) as unet:
                preds[which] = unet(x, torch.tensor([500]), **kw)[0]
    assert not torch.allclose(preds["current"], preds["old"])
    assert not torch.allclose(preds["old"], preds["reference"])
    assert all(p.requires_grad for p in model.trainable_parameters())  # back on the trained adapter


def test_flat_groups_are_dropped_and_nothing_is_learned_from_them(setup, tmp_path):
    out = tmp_path / "flat"
    assert run(setup, out, "rewards={tiny_rewards:perfect: 1.0}", "max_steps=2", "eval.steps=0") == 0
    log = rows(out / "log.jsonl")
    assert [(r["group_filter/dropped"], r["groups"], r["loss"]) for r in log] == [(2, 2, None)] * 2
    weights = load_file(str(out / "adapter" / "pytorch_lora_weights.safetensors"))
    assert all(float(v.abs().max()) == 0 for k, v in weights.items() if "lora.up" in k or "lora_B" in k)


GUARDED = ["lora=null", "optimizer.learning_rate=3e-3", "samples=8", "inputs_per_step=4", "micro_batch=16",
           "max_steps=12", "eval.steps=2", "eval.metrics=[psnr]", "guard={metric: psnr, max_drop: 0.1}"]


def test_the_guard_stops_a_run_that_pays_for_noise_and_keeps_the_best_model(setup, tmp_path):
    """Held-out PSNR with fixed seeds. Paying for pixel variance (noise) costs it 0.18 dB in two
    steps and the guard (max_drop 0.1) stops the run; the same run paying for smoothness instead
    (the control) moves it by at most 0.02 dB down before it rises, and runs to the end."""
    control = tmp_path / "control"
    assert run(setup, control, "rewards={tiny_rewards:smoothness: 1.0}", *GUARDED, "max_steps=6") == 0
    ev = rows(control / "eval.jsonl")
    assert json.loads((control / "result.json").read_text())["guard"]["tripped_at"] is None
    assert [r["step"] for r in ev] == [0, 2, 4, 6] and ev[-1]["psnr"] > ev[0]["psnr"]
    assert (control / "model" / "unet").is_dir()  # not tripped: the last model is the result

    out = tmp_path / "hacked"
    assert run(setup, out, "rewards={tiny_rewards:noise_paying: 1.0}", *GUARDED) == 0
    result = json.loads((out / "result.json").read_text())
    guard = result["guard"]
    assert guard["tripped_at"] is not None and result["step"] == guard["tripped_at"] < 12
    ev = rows(out / "eval.jsonl")
    assert ev[-1]["guard"] == "tripped" and ev[-1]["psnr"] < guard["best"] - 0.1
    assert ev[-1]["reward"] > ev[0]["reward"]  # the reward it was paid rose meanwhile
    assert guard["best"] == max(r["psnr"] for r in ev)
    assert result["best"] == f"best-{guard['best_step']}" and len(list(out.glob("best-*"))) == 1
    kept = load_file(str(out / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    best = load_file(str(out / result["best"] / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(kept[k], best[k]) for k in best)
    trained = torch.load(out / f"checkpoint-{result['step']}" / "state.pt", weights_only=False)["model"]
    name = next(k for k in best if k.endswith("conv_in.weight"))
    assert not torch.equal(trained[f"current.{name}"], best[name])  # the kept model is not the last one


def test_the_trained_adapter_changes_inference(setup, tmp_path):
    from realsr_r1 import infer

    out = tmp_path / "use"
    assert run(setup, out, "rewards={tiny_rewards:brightness: 1.0}", "max_steps=2", "eval.steps=0",
               "optimizer.learning_rate=3e-2") == 0
    src = tmp_path / "in"
    src.mkdir()
    photo((16, 12), "dog.png").save(src / "a.png")
    with weights_env(setup / "weights"):
        results = {}
        for name, extra in (("base", []), ("tuned", ["--restorer-adapter", str(out / "adapter")])):
            assert infer.main(["--profile", "tiny", "--input", str(src), "--output", str(tmp_path / name),
                               "--quiet", "--save-stages", *extra]) == 0
            from PIL import Image

            results[name] = {stage: np.asarray(Image.open(tmp_path / name / f"a{suffix}.png"), dtype=np.float32)
                             for stage, suffix in (("rough", "_rough"), ("middle", "_middle"), ("final", ""))}
    # trained on the final stage (the stages before it made by the base weights): on for that stage only
    assert np.abs(results["base"]["final"] - results["tuned"]["final"]).mean() > 0.1
    for stage in ("rough", "middle"):
        assert np.array_equal(results["base"][stage], results["tuned"][stage]), stage
    sidecar = json.loads((tmp_path / "tuned" / "a.json").read_text())
    assert sidecar["adapter"]["path"] == str(out / "adapter") and sidecar["adapter"]["stage"] == "final"


@pytest.mark.parametrize("sets, message", [
    (["nosuch=1"], "nosuch: unknown restorer training key"),
    (["rewards={format: 1.0}"], "rewards.format: scores the chain of thought"),
    (["samples=1"], "samples: need ≥ 2"),
    (["guard={metric: lpips, max_drop: 1}"], "guard.metric"),
    (["nft.betta=1"], "nft.betta: unknown key"),
    (["conditioning=vlm"], "conditioning: 'vlm' is not one of"),
])
def test_config_errors_are_one_line(setup, tmp_path, capsys, sets, message):
    assert run(setup, tmp_path / "bad", *sets) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_init_adapter_starts_both_adapters_from_a_trained_one(setup, tmp_path):
    """restorer-nr continues restorer-fr: the current and the old adapter start as the saved one."""
    from diffusers import StableDiffusionUpscalePipeline

    from realsr_r1.training.trainable import TrainableUpscaler, read_lora_state

    out = tmp_path / "fr"
    assert run(setup, out, "rewards={tiny_rewards:brightness: 1.0}", "max_steps=1", "eval.steps=0",
               "optimizer.learning_rate=3e-2") == 0
    saved = read_lora_state(str(out / "adapter"))
    pipe = StableDiffusionUpscalePipeline.from_pretrained(str(setup / "weights" / "tiny-upscaler"))
    model = TrainableUpscaler(pipe, lora={"r": 8, "alpha": 16}, init_adapter=str(out / "adapter"))
    state = model.state_dict()
    for name, value in saved.items():
        key = name.replace(".weight", "").replace("lora_A", "lora_A.ADAPTER").replace("lora_B", "lora_B.ADAPTER") + ".weight"
        assert torch.equal(state[f"current.{key}"], value) and torch.equal(state[f"old.{key}"], value)
    assert any(float(v.abs().max()) > 0 for k, v in saved.items() if "lora_B" in k)
    with pytest.raises(ValueError, match="do not match"):
        TrainableUpscaler(StableDiffusionUpscalePipeline.from_pretrained(str(setup / "weights" / "tiny-upscaler")),
                          lora={"r": 8, "alpha": 16, "targets": ["to_q"]}, init_adapter=str(out / "adapter"))


def test_the_kl_reference_of_a_continued_run_is_where_it_started(setup, tmp_path):
    """restorer-nr continues restorer-fr with a KL term: the reference is the adapter it starts from
    (a frozen third adapter), not the base model. So the first step's KL is 0, and the reference's
    prediction is the saved adapter's, not the base UNet's."""
    from diffusers import StableDiffusionUpscalePipeline

    from realsr_r1.training.trainable import TrainableUpscaler

    fr = tmp_path / "fr"
    assert run(setup, fr, "rewards={tiny_rewards:brightness: 1.0}", "max_steps=1", "eval.steps=0",
               "optimizer.learning_rate=3e-2") == 0
    nr = tmp_path / "nr"
    assert run(setup, nr, "rewards={tiny_rewards:brightness: 1.0}", "max_steps=2", "eval.steps=0",
               f"init_adapter={fr / 'adapter'}", "nft.kl_beta=0.5", "optimizer.learning_rate=3e-2") == 0
    log = rows(nr / "log.jsonl")
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-12) and log[1]["kl"] > 0
    pipe = StableDiffusionUpscalePipeline.from_pretrained(str(setup / "weights" / "tiny-upscaler"))
    model = TrainableUpscaler(pipe, lora={"r": 8, "alpha": 16}, kl=True, init_adapter=str(fr / "adapter"))
    x = torch.randn(1, 7, 8, 8)
    kw = dict(encoder_hidden_states=torch.randn(1, 77, 16), class_labels=torch.tensor([20]), return_dict=False)
    with torch.no_grad():
        preds = {}
        for which in ("current", "reference"):
            with model.use(which) as unet:
                preds[which] = unet(x, torch.tensor([500]), **kw)[0]
        pipe.unet.disable_adapters()
        base = pipe.unet(x, torch.tensor([500]), **kw)[0]
        pipe.unet.enable_adapters()
        pipe.unet.set_adapter("default")
    assert torch.allclose(preds["reference"], preds["current"]) and not torch.allclose(preds["reference"], base)
    assert all(p.requires_grad for p in model.trainable_parameters())
    assert not any(p.requires_grad for n, p in pipe.unet.named_parameters() if ".reference." in n)


def test_conditioning_by_caption_and_by_a_cached_policy(setup, tmp_path, monkeypatch):
    from realsr_r1.training import restorer_rollouts as R
    from realsr_r1.training.data import load_dataset
    from realsr_r1.tiny import build_tiny_vlm

    row = load_dataset(setup / "data")[0]
    rgb = np.asarray(row["image"].convert("RGB"))
    plan = R.plan_for("caption", {"caption": "a dog on grass"}, rgb)
    assert plan.understanding == {"rough": "a dog on grass", "middle": "a dog on grass", "final": "a dog on grass"}
    assert not plan.degradation
    analysed = R.plan_for("analyser", row, rgb)
    assert all(v == "" for v in analysed.understanding.values()) and analysed.degradation

    build_tiny_vlm(setup / "weights" / "tiny-vlm")
    policy = {"type": "vlm", "model": "tiny-vlm", "dtype": "fp32", "max_pixels": 12544, "generation": {"max_new_tokens": 8}}
    cache = tmp_path / "conditioning.jsonl"
    with weights_env(setup / "weights"):
        first = R.PolicyTexts(policy, cache, "cpu").text("a.png", rgb, 0)
        assert first and json.loads(cache.read_text())["text"] == first
        built = []
        monkeypatch.setattr("realsr_r1.profiles.build_policy", lambda *a, **k: built.append(1))
        assert R.PolicyTexts(policy, cache, "cpu").text("a.png", rgb, 0) == first and not built  # from the cache
        other = R.PolicyTexts({**policy, "generation": {"max_new_tokens": 9}}, cache, "cpu")
        assert "a.png" not in other.texts  # another policy's texts are not reused


def test_the_shipped_configs_are_valid():
    from realsr_r1.profiles import load_config
    from realsr_r1.rewards.registry import build_image_rewards
    from realsr_r1.training.restorer_rl import _section, resolve_config

    for name in ("restorer-fr", "restorer-nr", "restorer-tiny"):
        cfg = resolve_config({**load_config(name), "data": "somewhere"})
        section, render = _section(cfg, "restorer")
        assert section["type"] == "diffusion" and render["scale"] == 4
        funcs, weights = build_image_rewards(cfg["rewards"])
        assert funcs and weights == [1.0]
    nr = load_config("restorer-nr")
    assert nr["init_adapter"].endswith("restorer-fr/adapter") and nr["guard"]["metric"] == "psnr"
    assert load_config("restorer-fr")["guard"]["metric"] == "niqe"


def test_compass_without_hr_scores_fidelity_against_the_input():
    from realsr_r1.restorers.lite import resize
    from realsr_r1.rewards.registry import image_score

    rng = np.random.default_rng(0)
    lq = rng.random((32, 32, 3)).astype(np.float32)
    faithful = resize(lq, (128, 128))
    unfaithful = rng.random((128, 128, 3)).astype(np.float32)
    score = image_score("compass", {"quality": "analyser", "fidelity": "input"})
    good, bad = score([faithful, unfaithful], [lq, lq], [None, None])
    assert good is not None and bad is not None and good > bad
    with pytest.raises(ValueError, match="compass.fidelity"):
        image_score("compass", {"fidelity": "gt"})


def test_inputs_of_different_sizes_share_a_step(setup, tmp_path):
    """Each input's samples are trained in their own micro-batches: latents of two sizes in one step."""
    from realsr_r1.training.data import build_dataset

    hr = tmp_path / "hr"
    hr.mkdir()
    photo((64, 48), "dog.png").save(hr / "a.png")
    photo((48, 64), "chip.png").save(hr / "b.png")
    photo((64, 64), "dog.png").save(hr / "c.png")
    with weights_env(setup / "weights"):
        build_dataset(hr, tmp_path / "data", log=lambda *a: None)
    out = tmp_path / "run"
    assert train.main(["restorer", "--config", CONFIG, "--set", f"data={tmp_path / 'data'}", "--set", f"output_dir={out}",
                       "--set", "max_steps=1", "--set", "eval.steps=0", "--set", "inputs_per_step=2",
                       "--set", "rewards={tiny_rewards:brightness: 1.0}"]) == 0
    (row,) = rows(out / "log.jsonl")
    assert row["groups"] == 2 and row["loss"] is not None and row["grad_norm"] > 0


def test_joint_training_alternates_and_each_side_uses_the_others_current_weights(setup, tmp_path, monkeypatch):
    from realsr_r1.training import joint as train_joint, restorer_rl as train_restorer
    from realsr_r1.rewards.visual import Restorations
    from realsr_r1.tiny import build_tiny_vlm

    build_tiny_vlm(setup / "weights" / "tiny-vlm")
    seen = {"rl": [], "rendered_by": [], "written_by": []}
    init = train_restorer.RestorerRL.__init__

    def spy_init(self, *a, **k):
        init(self, *a, **k)
        seen["rl"].append(self)

    final, text = Restorations.final, train_joint.LivePolicyTexts.text

    def spy_final(self, images, texts):
        seen["rendered_by"].append(self.restorer)
        return final(self, images, texts)

    def spy_text(self, name, rgb, seed):
        seen["written_by"].append(self.trainer.model)
        return text(self, name, rgb, seed)

    monkeypatch.setattr(train_restorer.RestorerRL, "__init__", spy_init)
    monkeypatch.setattr(Restorations, "final", spy_final)
    monkeypatch.setattr(train_joint.LivePolicyTexts, "text", spy_text)
    out = tmp_path / "joint"
    args = ["joint", "--config", str(REPO / "configs" / "joint-tiny.yaml"), "--set", f"data={setup / 'data'}",
            "--set", f"output_dir={out}", "--set", "restorer.eval.steps=0"]
    with weights_env(setup / "weights"):
        assert train.main(args + ["--set", "policy.trainer.max_steps=2"]) == 0
        (rl,) = seen["rl"]
        # the policy's image rewards were rendered by the restorer being trained, and the restorer's
        # inputs conditioned by the policy being trained
        assert seen["rendered_by"] and all(r is rl.stages for r in seen["rendered_by"])
        assert len(seen["written_by"]) == 2 * 2 and all(m is seen["written_by"][0] for m in seen["written_by"])
        assert seen["written_by"][0].__class__.__name__.startswith("Peft")
        table = rows(out / "joint.jsonl")
        assert [r["step"] for r in table] == [1, 2]
        assert all(r["policy/reward"] is not None and r["restorer/reward"] is not None for r in table)
        assert "restorer/rewards/generation/mean" in (out / "joint.md").read_text()
        assert [r["step"] for r in rows(out / "restorer" / "log.jsonl")] == [1, 2]
        assert (out / "policy" / "adapter_config.json").is_file()
        assert (out / "restorer" / "adapter" / "pytorch_lora_weights.safetensors").is_file()
        # --resume continues both sides from the policy's last checkpoint
        assert train.main(args + ["--set", "policy.trainer.max_steps=3"]) == 2
        assert train.main(args + ["--set", "policy.trainer.max_steps=3", "--resume"]) == 0
    assert [r["step"] for r in rows(out / "joint.jsonl")] == [1, 2, 3]
    assert [r["step"] for r in rows(out / "restorer" / "log.jsonl")] == [1, 2, 3]


def test_two_processes_train_as_one_with_their_inputs_together(setup, tmp_path):
    """DDP over gloo (torchrun, CPU): 2 processes with 1 input each per step end with the weights of
    1 process with 2 inputs per step: the same samples, the loss normalised over both, gradients averaged."""
    import os
    import subprocess
    import sys

    sets = ["rewards={tiny_rewards:brightness: 1.0}", "max_steps=2", "eval.steps=0", "save_steps=2",
            "optimizer.learning_rate=3e-2"]
    one = tmp_path / "one"
    assert run(setup, one, *sets, "inputs_per_step=2") == 0
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "realsr_r1.train", "restorer",
           "--config", CONFIG, "--set", f"data={setup / 'data'}", "--set", f"output_dir={two}", "--set", "inputs_per_step=1"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "REALSR_R1_WEIGHTS": str(setup / "weights"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count("adapter saved in") == 1  # one process speaks for the run
    log_one, log_two = rows(one / "log.jsonl"), rows(two / "log.jsonl")
    assert [r["groups"] for r in log_two] == [2, 2]
    for key in ("reward", "loss", "grad_norm"):  # step 2's rewards come from the weights after step 1
        assert [r[key] for r in log_one] == pytest.approx([r[key] for r in log_two], rel=1e-5), key
    # Adam's first steps are ±lr wherever a gradient is non-zero, so float noise in a near-zero
    # gradient can move a weight by up to 2·lr: the weights agree to that, the gradients above to 1e-5
    a = load_file(str(one / "adapter" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(two / "adapter" / "pytorch_lora_weights.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 2 * 3e-2
    assert np.mean([float((a[k] - b[k]).abs().mean()) for k in a]) < 1e-4
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)


def test_an_img2img_rollout_starts_where_inference_starts(setup):
    """Fewer sampler steps at the same strength would start at a lower noise level (DDIM's 3-step grid
    at 0.5 starts at 334, its 4-step grid at 501): the rollout's grid is made finer instead."""
    from realsr_r1.training.data import load_dataset
    from realsr_r1.profiles import build_restorer, load_config
    from realsr_r1.training.restorer_rollouts import analyser_plan, rollout_schedule, sample_stage
    from realsr_r1.restorers.denoise import img2img_skip

    with weights_env(setup / "weights"):
        stages = build_restorer({**load_config("tiny")["restorer"], "rough": "diffusion"}, device="cpu")
    assert stages.strength == 0.5 and stages.steps == 4
    sched = stages.pipe.scheduler
    sched.set_timesteps(4)
    inference_start = int(sched.timesteps[img2img_skip(4, 0.5)])
    steps, skip = rollout_schedule(sched, 4, 0.5, 3)
    sched.set_timesteps(steps)
    assert int(sched.timesteps[skip]) == inference_start and len(sched.timesteps) - skip >= 3
    rgb = np.asarray(load_dataset(setup / "data")[0]["image"].convert("RGB"))
    ro = sample_stage(stages, rgb, analyser_plan(rgb), stage="final", scale=4.0, seeds=[1, 2, 3], steps=3,
                      previous_seed=0, batch=2)
    assert ro.t_max == inference_start
    assert len(ro) == 3 and ro.latents.shape[0] == ro.image.shape[0] == ro.embeds.shape[0] == 3
    assert not torch.equal(ro.latents[0], ro.latents[1])  # each sample its own noise


def test_trained_and_old_weights_stay_fp32_over_a_bf16_base(setup):
    from diffusers import StableDiffusionUpscalePipeline

    from realsr_r1.training.trainable import TrainableUpscaler

    pipe = StableDiffusionUpscalePipeline.from_pretrained(str(setup / "weights" / "tiny-upscaler")).to(dtype=torch.bfloat16)
    model = TrainableUpscaler(pipe, lora={"r": 4, "alpha": 8})
    dtypes = lambda: {p.dtype for pair in model._pairs() for p in pair}  # noqa: E731
    assert dtypes() == {torch.float32} and pipe.unet.conv_in.weight.dtype == torch.bfloat16
    pipe.to(dtype=torch.bfloat16)  # what inference's NaN retry does to the whole pipeline afterwards
    assert torch.bfloat16 in dtypes()
    model.keep_fp32()
    assert dtypes() == {torch.float32}
    full = TrainableUpscaler(StableDiffusionUpscalePipeline.from_pretrained(
        str(setup / "weights" / "tiny-upscaler")).to(dtype=torch.bfloat16), lora=None, kl=True)
    assert {p.dtype for p in full.old_unet.parameters()} == {torch.float32}  # the EMA of fp32 weights
    assert {p.dtype for p in full.ref_unet.parameters()} == {torch.bfloat16}  # read only


@pytest.mark.parametrize("sets, message", [
    (["lora=null", "restorer.dtype=bf16"], "lora: null trains the UNet in fp32 over a bf16 pipeline"),
    (["stage=rough", "restorer.rough=realesrgan"], "stage: rough is made by Real-ESRGAN"),
])
def test_combinations_that_cannot_train_are_one_line(setup, tmp_path, capsys, sets, message):
    with weights_env(setup / "weights"):
        assert run(setup, tmp_path / "bad", *sets) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and message in err[0], err


def test_a_sample_that_diverged_is_left_out(setup, tmp_path, monkeypatch):
    from realsr_r1.training import restorer_rollouts

    real = restorer_rollouts.sample_stage

    def one_nan(*args, **kwargs):
        ro = real(*args, **kwargs)
        ro.latents[0] = float("nan")
        return ro

    monkeypatch.setattr(restorer_rollouts, "sample_stage", one_nan)
    out = tmp_path / "nan"
    assert run(setup, out, "rewards={tiny_rewards:brightness: 1.0}", "max_steps=2", "eval.steps=0") == 0
    log = rows(out / "log.jsonl")
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) and not r.get("skipped") for r in log)
    weights = load_file(str(out / "adapter" / "pytorch_lora_weights.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


def _restorer_rl(setup, out, *sets):
    from realsr_r1.profiles import load_config
    from realsr_r1.training.restorer_rl import RestorerRL

    return RestorerRL(load_config(CONFIG, [f"data={setup / 'data'}", f"output_dir={out}", *sets]))


def _fp16_scaler(rl, init_scale=65536.0):
    """What Accelerator(mixed_precision="fp16") sets up on a GPU, with torch's CPU GradScaler:
    backward scales the loss, clip_grad_norm_ unscales, AcceleratedOptimizer.step steps the scaler."""
    from accelerate.optimizer import patch_optimizer_step

    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    acc, opt = rl.accelerator, rl.optimizer
    acc.scaler, acc.native_amp = scaler, True
    opt.scaler = scaler
    opt._accelerate_step_called = False
    opt._optimizer_original_step_method = opt.optimizer.step
    opt._optimizer_patched_step_method = patch_optimizer_step(opt, opt.optimizer.step)
    return scaler


def test_fp16_overflow_skips_the_step_halves_the_scale_and_training_goes_on(setup, tmp_path, fresh_accelerator):
    """Infinite gradients at step 1 under an fp16 GradScaler: the scaler skips the step (weights
    unchanged, no EMA step) and halves its scale; step 2 then runs (no "unscale_() has already been
    called") and moves the weights."""
    with weights_env(setup / "weights"):
        rl = _restorer_rl(setup, tmp_path / "fp16", "rewards={tiny_rewards:brightness: 1.0}", "eval.steps=0",
                          "group_filter=null", "mixed_precision=fp16", "samples=3", "inputs_per_step=1")
        scaler = _fp16_scaler(rl)
        params = rl.model.trainable_parameters()
        hook = params[0].register_hook(lambda g: g * float("inf"))
        before = [p.detach().clone() for p in params]
        old_before = [o.detach().clone() for o, _ in rl.model._pairs()]
        row1 = rl.train_step()
        hook.remove()
        assert row1["skipped"] and scaler.get_scale() == 32768.0
        assert all(torch.equal(p, b) for p, b in zip(params, before))
        assert all(torch.equal(o, b) for (o, _), b in zip(rl.model._pairs(), old_before))  # no EMA step either
        row2 = rl.train_step()
        assert not row2.get("skipped") and np.isfinite(row2["grad_norm"])
        assert any(not torch.equal(p, b) for p, b in zip(params, before))
        assert scaler.get_scale() == 32768.0  # a good step keeps the scale (growth comes after 2000)


def test_rollouts_sample_with_the_prediction_the_loss_takes_as_p_old(setup, tmp_path, monkeypatch):
    """The profile guides inference (guidance 4 here); the trained stage's rollouts sample without
    guidance, with the old model. So the prediction the sampler stepped with, at the rollout's own
    timestep and inputs, is what the NFT loss takes as p_old: the old model's conditional prediction
    on the rollout's stored image, embeddings and noise level. (Guided rollouts, or rollouts with the
    current model, which differs from the old one here, fail it.)"""
    from realsr_r1.training import restorer_rollouts as R

    with weights_env(setup / "weights"):
        rl = _restorer_rl(setup, tmp_path / "g", "rewards={tiny_rewards:brightness: 1.0}", "eval.steps=0",
                          "restorer.guidance_scale=4.0", "samples=2", "inputs_per_step=1")
    assert rl.stages.guidance_scale == 4.0
    with torch.no_grad():
        for p in rl.model.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))  # the current model moves away from the old one
    captured = []
    real_previous = R._previous

    def previous(*a, **k):  # the stages before the trained one run as inference; then spy on the sampler
        out = real_previous(*a, **k)
        sched = rl.stages.pipe.scheduler
        real_step = sched.step

        def step(model_output, t, sample, *args, **kwargs):
            captured.append((model_output.detach().clone(), int(t), sample.detach().clone()))
            return real_step(model_output, t, sample, *args, **kwargs)

        monkeypatch.setattr(sched, "step", step)
        return out

    monkeypatch.setattr(R, "_previous", previous)
    _, ro = rl._rollout(rl.train_rows[0], [1, 2], 0)
    stepped, t, sample = captured[0]
    assert t == ro.t_max and stepped.shape[0] == 2  # one branch: no unconditional half
    sched = rl.stages.pipe.scheduler
    inp = torch.cat([sched.scale_model_input(sample, t), ro.image], dim=1)
    with torch.no_grad(), rl.model.use("old") as old:
        p_old = old(inp, torch.tensor([t, t]), encoder_hidden_states=ro.embeds, class_labels=ro.level,
                    return_dict=False)[0]
    assert torch.allclose(p_old, stepped, atol=1e-5)


def test_full_fine_tuning_in_bf16_runs_its_rollouts(setup, tmp_path, fresh_accelerator):
    """lora: null over a bf16 pipeline with mixed_precision bf16 (what the config error recommends):
    the fp32 trained UNet and its fp32 old copy sample under the run's autocast, and a step trains."""
    out = tmp_path / "bf16"
    with weights_env(setup / "weights"):
        assert run(setup, out, "rewards={tiny_rewards:brightness: 1.0}", "lora=null", "restorer.dtype=bf16",
                   "mixed_precision=bf16", "max_steps=1", "eval.steps=0", "samples=3", "inputs_per_step=1") == 0
    (row,) = rows(out / "log.jsonl")
    assert not row.get("skipped") and np.isfinite(row["loss"]) and row["grad_norm"] > 0
    assert (out / "model" / "unet").is_dir()


def test_out_of_memory_halves_the_rollout_batch_and_the_micro_batch(setup, tmp_path, monkeypatch, caplog):
    """A UNet that runs out of memory above 2 samples per call: the rollouts' batch and the loss's
    micro-batch are halved until they fit (6 → 3 → 1, 12 → 6 → 3 → 1), each said once, and the step
    trains on all its samples."""
    import logging

    from diffusers import UNet2DConditionModel

    from realsr_r1.restorers.memory import OutOfMemoryError

    with weights_env(setup / "weights"):
        rl = _restorer_rl(setup, tmp_path / "oom", "rewards={tiny_rewards:brightness: 1.0}", "eval.steps=0",
                          "group_filter=null", "samples=6", "inputs_per_step=1", "micro_batch=12")
    real = UNet2DConditionModel.forward
    sizes = []

    def forward(self, sample, *a, **kw):
        sizes.append(sample.shape[0])
        if sample.shape[0] > 2:
            raise OutOfMemoryError("CUDA out of memory (a test)")
        return real(self, sample, *a, **kw)

    monkeypatch.setattr(UNet2DConditionModel, "forward", forward)
    with caplog.at_level(logging.WARNING):
        row = rl.train_step()
        rl.train_step()
    assert rl.rollout_batch == 1 and rl.micro_batch == 1
    assert not row.get("skipped") and np.isfinite(row["loss"])
    notes = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(notes) == 2 and any("rollout_batch 6 → 3" in n for n in notes) and any("micro_batch 12 → 6" in n for n in notes)
    assert max(sizes[-10:]) <= 2  # the second step ran within the limit from the start


@pytest.mark.parametrize("rewards, inside, first", [
    ({"compass": {"quality": "niqe", "fidelity": "input"}}, {"niqe"}, "psnr"),  # restorer-nr
    ({"compass": {"quality": "niqe"}}, {"niqe", "psnr", "ssim"}, "piqe"),  # F from the HR too
    ({"generation": {"expert": "fidelity"}}, {"psnr", "ssim"}, "niqe"),  # restorer-fr
    ({"niqe": 1.0, "irpo_general": 1.0}, {"niqe", "psnr", "ssim"}, "piqe"),
    ({"compass": {"quality": "analyser", "fidelity": "input"}, "tiny_rewards:brightness": 1.0}, set(), "psnr"),
])
def test_the_guard_never_watches_a_metric_inside_the_reward(rewards, inside, first):
    from realsr_r1.training.reward_guard import check_guard_metric, default_metrics, metrics_in

    assert metrics_in(rewards) == inside
    outside = default_metrics(rewards)
    assert outside[0] == first and not set(outside) & inside and check_guard_metric(None, rewards) == first
    for metric in inside:
        with pytest.raises(ValueError, match=f"guard.metric: {metric} is inside the reward"):
            check_guard_metric(metric, rewards)


def test_a_guard_on_the_reward_s_own_metric_is_refused_in_one_line(setup, tmp_path, capsys):
    assert run(setup, tmp_path / "bad", "rewards={compass: {quality: niqe, fidelity: input}}",
               "guard={metric: niqe, max_drop: 0.5}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "guard.metric: niqe is inside the reward" in err[0] and "psnr" in err[0], err


def test_group_filter_thresholds_are_on_the_reward_s_range():
    """COMPASS spans about −0.45 … 5 at γ 7, the others 0 … 1: `mean_above: 0.9` is 90 % of the way up
    either range (so a COMPASS group at 0.95 is not "high"); thresholds outside [0, 1], or a reward
    without a known range, are one-line errors."""
    from realsr_r1.training.group_filter import thresholds
    from realsr_r1.rewards.registry import build_image_rewards
    from realsr_r1.rewards.text import compass_range, compass_reward_value

    lo, hi = compass_range(7.0)
    assert -0.5 < lo < -0.4 and hi == pytest.approx(5.0)
    rng = np.random.default_rng(0)
    values = [compass_reward_value(*x, 7.0) for x in zip(rng.random(2000), rng.uniform(1, 5, 2000), rng.uniform(1, 5, 2000))]
    assert lo - 1e-3 <= min(values) and max(values) <= hi + 1e-9
    funcs, weights = build_image_rewards({"compass": {"quality": "niqe", "fidelity": "input"}})
    mean, std = thresholds(0.9, 0.05, funcs, weights)
    assert mean == pytest.approx(lo + 0.9 * (hi - lo)) and std == pytest.approx(0.05 * (hi - lo))
    funcs, weights = build_image_rewards({"generation": {"weight": 2.0, "expert": "fidelity"},
                                          "tiny_rewards:smoothness": 1.0})
    mean, std = thresholds(0.5, 0.1, funcs, weights)  # weighted: (2·[0, 1] + [−0.5, 0]) / 3
    assert mean == pytest.approx((-0.5 / 3) + 0.5 * (2.5 / 3)) and std == pytest.approx(0.25 / 3)
    with pytest.raises(ValueError, match="group_filter.mean_above: 1.5 is outside the reward's range"):
        thresholds(1.5, 0.05, funcs, weights)
    unknown = lambda images, lq, hr: images  # noqa: E731
    with pytest.raises(ValueError, match="has no known range"):
        thresholds(0.9, 0.05, [unknown], [1.0])
