"""RL of the one-step restorer (`python -m realsr_r1.train restorer` with `restorer.type: onestep`):
DiffusionNFT's objective on a one-step policy, the loss in image space, LoRA in OSEDiff's layout.

The policy. The one-step model maps its start latent z to x_0 deterministically; GDPO-SR and DNF-SR
make it stochastic by noise on that latent. Here each of the K samples of an input starts from
z₀ + σ·ε_k (σ = the restorer's `noise`, ε_k from the sample's seed), so a group is K images of
one input that differ where the model is unsure, and the group-normalised rewards rank them.

The loss. DiffusionNFT (nft.py) needs only clean samples and a way to present them to the model
again: the forward process of a diffusion model. A one-step model's only input is the perturbed
start latent, so each kept sample k is presented again at a fresh perturbation z' = z₀ + σ·ε'. With
the current model G_θ and the old one G_old (its EMA) at z':

    positive: β·G_θ(z') + (1−β)·G_old(z')     negative: (1+β)·G_old(z') − β·G_θ(z')

and each is pulled towards the sample's own image y_k by its share r_k / (1 − r_k) (r from the
advantage), each term normalised by its mean distance, as nft.py computes it (`prediction_type`
"sample": the model's output is the clean image itself). So the model moves towards what its good
samples show and away from its bad ones, from any perturbation of the start. DNF-SR reports that
this objective in latent space gives grid artefacts and that image space fixes them: by default
(`onestep.loss_space: image`) G's latents are decoded by the frozen VAE decoder with gradients and
the terms are compared as images in [−1, 1]; `latent` compares latents (cheaper, for ablation).
The optional KL term (`nft.kl_beta`) pulls G_θ(z') towards the starting weights' output.

The weights. Training starts from the restorer's adapter (`restorer.adapter`, OSEDiff's or an
earlier run's) or, without one, from a fresh adapter of rank `lora.r` with OSEDiff's module lists.
Trained: the UNet's LoRA and its conv_in (as OSEDiff trains them), and with `onestep.train_vae` the
VAE encoder's LoRA. The old model and the reference are copies of those tensors, swapped in for
their predictions. The result is one file in OSEDiff's format (`output_dir/adapter/osediff.pkl`),
which `infer --restorer-adapter` and OSEDiff's own loader read. The LoRA scale is the format's
(alpha 8 / rank), so `lora.alpha` does not apply.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..profiles import ConfigError
from .restorer_rl import RestorerRL

LOSS_SPACES = ("image", "latent")
DEFAULT_RANK = 4  # OSEDiff's rank, for a run without a starting adapter and without lora.r


class TrainableOneStep:
    """Current / old / reference views of the one-step restorer's adapter tensors (module doc)."""

    def __init__(self, stages, *, init_adapter: str | None, rank: int, train_vae: bool,
                 gradient_checkpointing: bool = False):
        from ..restorers.onestep_adapter import KEYS, load_adapter, new_adapter, read_adapter

        self.stages = stages
        self.unet, self.vae = stages.unet, stages.vae
        data = None
        if init_adapter:
            data = read_adapter(init_adapter)
            load_adapter(self.unet, self.vae, init_adapter, data=data)
            self.lists = {k: data[k] for k in KEYS[:6]}  # the ranks and the module lists
        else:
            # the VAE encoder's LoRA too, trained or not (its B starts at 0): OSEDiff's loader builds it
            # from rank_vae whatever, and LoraConfig(r=0) fails there
            self.lists = new_adapter(self.unet, self.vae, rank)
        if train_vae and not self.lists["rank_vae"]:
            raise ConfigError("onestep.train_vae: the starting adapter has no VAE encoder LoRA to train")
        self.unet.requires_grad_(False)
        self.vae.requires_grad_(False)
        self.params = {f"unet.{n}": p for n, p in self.unet.named_parameters() if "lora" in n or "conv_in" in n}
        if train_vae:
            self.params.update({f"vae.{n}": p for n, p in self.vae.named_parameters() if "lora" in n})
        for p in self.params.values():
            p.requires_grad_(True)
        self.keep_fp32()
        if data is not None:  # LoRA layers were made in the restorer's dtype: the file's values again, unrounded
            self._load({**{f"unet.{k}": v for k, v in data["state_dict_unet"].items()},
                        **{f"vae.{k}": v for k, v in data["state_dict_vae"].items()}})
        # what is not trained is saved as the file had it (the model holds it in its own dtype)
        self.untrained = {} if data is None else {
            f"{m}.{k}": v for m in ("unet", "vae") for k, v in data[f"state_dict_{m}"].items()
            if f"{m}.{k}" not in self.params}
        self.old = {k: p.detach().clone() for k, p in self.params.items()}
        self.reference = {k: p.detach().clone() for k, p in self.params.items()}
        self._views: list[str] = []
        self.lora = True
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            self.vae.enable_gradient_checkpointing()

    def keep_fp32(self) -> None:
        """Trained tensors in fp32 whatever the restorer's dtype (Adam's small steps vanish in bf16), and
        trainable (again, after inference's fp32 retry recast and froze the whole model)."""
        for p in self.params.values():
            if p.dtype != torch.float32:
                p.data = p.data.float()
            p.requires_grad_(True)

    def modules(self) -> list:
        return [self.unet] + ([self.vae] if any(k.startswith("vae.") for k in self.params) else [])

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.params.values())

    @torch.no_grad()
    def _load(self, tensors: dict) -> None:
        for k, p in self.params.items():
            if k in tensors:
                p.copy_(tensors[k].to(p.dtype))  # copy_ bumps the version: autograd refuses a stale graph

    @contextlib.contextmanager
    def use(self, which: str):
        """The restorer's weights as the `which` model ("current", "old", "reference") for a while."""
        if which not in ("current", "old", "reference"):
            raise ValueError(f"no {which} model (the one-step restorer keeps current, old and reference)")
        saved = None
        if which in ("old", "reference"):
            saved = {k: p.detach().clone() for k, p in self.params.items()}
            self._load(self.old if which == "old" else self.reference)
        try:
            yield self.unet
        finally:
            if saved is not None:
                self._load(saved)

    def ema_step(self, decay: float) -> None:
        from .nft import ema_update

        keys = sorted(self.params)
        ema_update([self.old[k] for k in keys], [self.params[k] for k in keys], decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**{f"current.{k}": p.detach().clone() for k, p in self.params.items()},
                **{f"old.{k}": v.clone() for k, v in self.old.items()}}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self._load({k[len("current."):]: v for k, v in state.items() if k.startswith("current.")})
        for k, v in state.items():
            if k.startswith("old."):
                self.old[k[len("old."):]].copy_(v)

    def save(self, folder: Path, info: dict) -> Path:
        """The adapter in OSEDiff's format, `folder/osediff.pkl`, with what made it under `realsr_r1`."""
        from ..restorers.onestep_adapter import ADAPTER_FILE, adapter_state, save_adapter

        state = adapter_state(self.unet, self.vae, self.lists)
        for key, value in self.untrained.items():
            model, _, name = key.partition(".")
            state[f"state_dict_{model}"][name] = value
        state["realsr_r1"] = json.dumps(info, default=str)  # OSEDiff's loader reads only its own keys
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_adapter(state, folder / ADAPTER_FILE)
        return folder


@dataclass
class OneStepRollout:
    """K samples of one input: what the loss needs to present them to the model again."""

    start: torch.Tensor  # 1×4×h×w the unperturbed start latent z₀
    pixels: torch.Tensor  # 1×3×H×W the start image in [−1, 1] (padded): z₀ again when the encoder trains
    embeds: torch.Tensor  # 1×77×D the prompt's embeddings
    latents: torch.Tensor  # K×4×h×w the samples' x_0 latents
    targets: torch.Tensor  # K×3×H×W the samples decoded, in [−1, 1] (padded as the latents)
    images: list[np.ndarray]  # the K stage images as inference returns them

    def __len__(self) -> int:
        return len(self.images)


@torch.no_grad()
def sample_onestep(stages, lq: np.ndarray, plan, *, stage: str, scale: float, seeds: list[int],
                   batch: int | None = None) -> OneStepRollout:
    """len(seeds) samples of `stage` for one LQ image: its start made as inference makes it, then
    one step from z₀ + noise·ε per seed (module doc), `batch` samples per UNet call."""
    from ..imageio import to_float
    from ..pipeline import stage_sizes
    from ..restorers.color import color_fix
    from ..restorers.diffusion import _pad
    from ..restorers.onestep import stage_prompt, upscale

    inp = to_float(lq)
    h, w = inp.shape[:2]
    sizes = stage_sizes(w, h, scale)
    previous = stages.start_image(inp, plan, stage, sizes)
    tw, th = sizes[stage]
    m = stages.multiple
    start = _pad(upscale(previous, (tw, th)), -(-th // m) * m, -(-tw // m) * m)
    z0 = stages.codec.encode(start, stages.device).float()
    embeds = stages.encode_prompts([stage_prompt(plan, stage)])
    latents, targets, images = [], [], []
    for i in range(0, len(seeds), batch or len(seeds)):
        chunk = seeds[i:i + (batch or len(seeds))]
        x0 = stages.predict_x0(stages.start_latents(z0, chunk), embeds.expand(len(chunk), -1, -1))
        decoded = stages.codec.decode(x0)
        latents.append(x0.float().cpu())
        targets.append(torch.from_numpy(np.nan_to_num(decoded, nan=0.5) * 2 - 1).permute(0, 3, 1, 2))
        images += [color_fix(np.clip(o[:th, :tw], 0, 1), inp, stages.color_fix, device=stages.device)
                   for o in np.nan_to_num(decoded, nan=0.5)]
    pixels = torch.from_numpy(np.ascontiguousarray(start * 2 - 1, dtype=np.float32)).permute(2, 0, 1)[None]
    return OneStepRollout(start=z0.float().cpu(), pixels=pixels, embeds=embeds.float().cpu(), latents=torch.cat(latents),
                          targets=torch.cat(targets), images=images)


class OneStepRL(RestorerRL):
    """RestorerRL with the one-step restorer's model, rollouts and loss (module doc)."""

    def __init__(self, cfg: dict, **kw):
        self._rank = int((cfg.get("lora") or {}).get("r", DEFAULT_RANK)) if "lora" in cfg else DEFAULT_RANK
        super().__init__(cfg, **kw)

    def _setup_model(self, restorer_cfg: dict) -> None:
        from ..profiles import build_restorer

        cfg = self.cfg
        opts = cfg["onestep"]
        if opts["loss_space"] not in LOSS_SPACES:
            raise ConfigError(f"onestep.loss_space: {opts['loss_space']!r} is not one of {', '.join(LOSS_SPACES)}")
        if cfg["lora"] is None:
            raise ConfigError("lora: null (full fine-tuning) is not offered for the one-step restorer: its result "
                              "is an adapter file in OSEDiff's format")
        if cfg["stage"] == "rough":
            raise ConfigError("stage: rough is made by the lite experts (or is the input) in the one-step restorer; "
                              "train final (or middle with restorer.middle: true)")
        if cfg["stage"] == "middle" and not restorer_cfg.get("middle"):
            raise ConfigError("stage: middle is the rough image resized unless restorer.middle: true")
        if opts["train_vae"] and self.accelerator.num_processes > 1:
            raise ConfigError("onestep.train_vae: the VAE encoder trains in one process only (its encoding runs "
                              "outside the UNet's DDP wrapper)")
        if cfg.get("init_adapter"):
            raise ConfigError("init_adapter: the one-step restorer starts from its own adapter (restorer.adapter)")
        if float(restorer_cfg.get("fidelity", 0) or 0) != 0:
            raise ConfigError("restorer.fidelity: training sees the one-step images themselves; train at 0 and "
                              "dial in inference")
        init = restorer_cfg.get("adapter")
        section = {k: v for k, v in restorer_cfg.items() if k != "adapter"}
        self.stages = build_restorer(section, device=self.device)  # the base: the adapter goes in unfused
        if self.stages.dtype != torch.float32 and cfg["mixed_precision"] == "no":
            raise ConfigError(f"mixed_precision: no trains fp32 weights (conv_in among them) over a "
                              f"{self.stages.precision} restorer: set mixed_precision: {self.stages.precision} "
                              f"(or restorer.dtype: fp32)")
        if init is not None:
            from ..profiles import _adapter_path

            init = _adapter_path(restorer_cfg)
        self.prediction_type = "sample"
        self.model = TrainableOneStep(self.stages, init_adapter=init, rank=self._rank,
                                      train_vae=bool(opts["train_vae"]),
                                      gradient_checkpointing=bool(cfg["gradient_checkpointing"]))
        self.stages.tile = 0  # the loss runs the UNet on whole latents (tiles would blend gradients)

    def _modules(self) -> list:
        return self.model.modules()

    def _rollout(self, row: dict, seeds: list[int], index: int, which: str = "old"):
        from ..restorers.memory import OutOfMemoryError

        rgb = self._rgb(row)
        plan = self._plan(row, rgb)
        retries = self.stages.fp32_retries
        while True:
            try:
                with self.model.use(which), self.accelerator.autocast():
                    out = sample_onestep(self.stages, rgb, plan, stage=self.cfg["stage"], scale=self.scale,
                                         seeds=seeds, batch=self.rollout_batch)
                break
            except OutOfMemoryError:
                self.rollout_batch = self._halve("rollout_batch", self.rollout_batch)
        if self.stages.fp32_retries != retries:  # the NaN retry recast and froze the model: trainable again
            self.model.keep_fp32()
        return rgb, out

    def _present(self, x0: torch.Tensor, image_space: bool, grad: bool) -> torch.Tensor:
        """What the loss compares: the latents, or their images in [−1, 1] by the frozen decoder."""
        if not image_space:
            return x0.float()
        vae = self.stages.vae
        with contextlib.nullcontext() if grad else torch.no_grad():
            return vae.decode(x0.to(next(vae.post_quant_conv.parameters()).dtype) / vae.config.scaling_factor,
                              return_dict=False)[0].float()

    def _start(self, ro: OneStepRollout, grad: bool) -> torch.Tensor:
        """z₀: the rollout's, or encoded again by the (trained) VAE encoder, with gradients if `grad`."""
        if not self.cfg["onestep"]["train_vae"]:
            return ro.start.to(self.stages.device)
        vae = self.stages.vae
        with contextlib.nullcontext() if grad else torch.no_grad():
            x = ro.pixels.to(self.stages.device, next(vae.quant_conv.parameters()).dtype)
            return vae.encode(x).latent_dist.mode() * vae.config.scaling_factor

    def _update_once(self, rollouts, indices: list[int], r: torch.Tensor, keep: torch.Tensor) -> dict:
        """One optimizer step of the loss (module doc) over the kept samples, then the old model's EMA."""
        from .nft import nft_loss

        cfg, nft, acc = self.cfg, self.cfg["nft"], self.accelerator
        stages = self.stages
        image_space = cfg["onestep"]["loss_space"] == "image"
        weight, denom, batches = self._micro_batches(rollouts, indices, keep)
        dev = stages.device
        sums = {"loss": 0.0, "loss_positive": 0.0, "loss_negative": 0.0, "kl": 0.0}
        trained_unet = self.unet  # accelerate's (DDP-wrapped under several processes)
        for n, (ro, idx, offset, gen) in enumerate(batches):
            w = weight[offset + idx] / denom
            eps = torch.randn((len(idx), *ro.start.shape[1:]), generator=gen).to(dev) * stages.noise
            embeds = ro.embeds.to(dev, stages.current_dtype).expand(len(idx), -1, -1)
            target = (ro.targets if image_space else ro.latents)[idx].to(dev).float()

            def x0(grad: bool) -> torch.Tensor:  # the viewed model's output at the fresh perturbation
                z = self._start(ro, grad).float() + eps
                return self._present(stages.predict_x0(z, embeds), image_space, grad=grad)

            with torch.no_grad(), acc.autocast():
                with self.model.use("old"):
                    old = x0(False)
                ref = None
                if float(nft["kl_beta"]) > 0:
                    with self.model.use("reference"):
                        ref = x0(False)
            last = n == len(batches) - 1
            sync = acc.no_sync(trained_unet) if (acc.num_processes > 1 and not last) else contextlib.nullcontext()
            raw_unet, stages.unet = stages.unet, trained_unet
            with sync, acc.autocast():
                try:
                    current = x0(True)
                finally:
                    stages.unet = raw_unet
                out = nft_loss(current, old, None, target, None, r[offset + idx], prediction_type="sample",
                               beta=float(nft["beta"]), adv_clip=float(nft["adv_clip"]), reference=ref,
                               kl_beta=float(nft["kl_beta"]), weights=w)
                acc.backward(out.total)
            share = float(w.sum())
            for key, value in out.terms().items():
                sums[key] += value if key == "loss" else value * share
        return self._optimizer_step(sums)
