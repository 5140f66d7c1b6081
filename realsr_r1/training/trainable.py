"""The upscaler's UNet as RL trains it: the current model, an "old" model kept as its EMA, and the
reference (the starting weights) for the optional KL term.

LoRA (the default, as OARS trains it on the base model): two PEFT adapters on the one UNet, added
with diffusers' `ModelMixin.add_adapter` (loaders/peft.py): "default" is trained, "old" follows it
by EMA, and the reference is the UNet with adapters disabled (`disable_adapters`): the base model.
A run that continues another (`init_adapter`) starts from that adapter, so its reference is a third,
frozen adapter "reference" holding it: the KL term pulls towards where the run started, not back to
the base model. DiffusionNFT's code keeps its old model the same way. Switching adapters goes through PEFT's
`BaseTunerLayer.set_adapter`, which also sets `requires_grad` (True for the active adapter, False
for the rest; peft/tuners/tuners_utils.py), so the old and reference predictions are made first and
"default" is active again before the current prediction and its backward.

Full fine-tuning (`lora: null`): the UNet itself is trained in fp32; the old model and the reference
are frozen copies (the reference only when the KL term is on).

Trainable weights are fp32 whatever the base dtype (diffusers' `cast_training_params`, as its
training examples do): Adam steps of ~1e-4 relative size vanish in bf16.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from pathlib import Path

import torch

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out")  # attention and its projections
LORA_KEYS = ("r", "alpha", "dropout", "targets")


def lora_config(section: dict):
    from peft import LoraConfig

    unknown = [k for k in section if k not in LORA_KEYS]
    if unknown:
        raise ValueError(f"lora.{unknown[0]}: unknown key (known: {', '.join(LORA_KEYS)})")
    return LoraConfig(r=int(section.get("r", 32)), lora_alpha=int(section.get("alpha", 64)),
                      lora_dropout=float(section.get("dropout", 0.0)), init_lora_weights="gaussian",
                      target_modules=list(section.get("targets") or DEFAULT_TARGETS))


def read_lora_state(folder: str) -> dict[str, torch.Tensor]:
    """A saved restorer adapter's UNet weights with PEFT's key names (what set_peft_model_state_dict
    takes): the file diffusers' `save_lora_weights` wrote, its "unet." prefix off, keys converted
    back by diffusers' `convert_unet_state_dict_to_peft`."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors.torch import load_file

    path = Path(folder) / "pytorch_lora_weights.safetensors"
    if not path.is_file():
        raise ValueError(f"init_adapter {folder}: no pytorch_lora_weights.safetensors (not a restorer adapter)")
    state = {k.removeprefix("unet."): v for k, v in load_file(str(path)).items() if k.startswith("unet.")}
    return convert_unet_state_dict_to_peft(state)


class TrainableUpscaler:
    """Current / old / reference views of a StableDiffusionUpscalePipeline's UNet (module doc)."""

    def __init__(self, pipe, *, lora: dict | None, kl: bool = False, init_adapter: str | None = None,
                 gradient_checkpointing: bool = False):
        from diffusers.training_utils import cast_training_params

        self.pipe = pipe
        self.unet = pipe.unet
        self.lora = lora
        self.ref_adapter = False  # a frozen "reference" adapter (LoRA runs that continue another, with KL)
        self._views: list[str] = []  # use()'s nesting
        self.unet.requires_grad_(False)
        if lora is not None:
            cfg = lora_config(lora)
            self.unet.add_adapter(cfg, adapter_name="default")
            # B starts at 0: the adapter is a no-op, and the old adapter starts equal to it
            with warnings.catch_warnings():  # PEFT warns that a second adapter is added: that is the point
                warnings.filterwarnings("ignore", message=".*multiple adapters.*")
                self.unet.add_adapter(copy.deepcopy(cfg), adapter_name="old")
                if init_adapter and kl:
                    self.unet.add_adapter(copy.deepcopy(cfg), adapter_name="reference")
            self.ref_adapter = bool(init_adapter and kl)
            if init_adapter:
                self._load_lora(init_adapter)
            self.unet.set_adapter("default")
            self.old_unet = self.ref_unet = None
            cast_training_params(self.unet, dtype=torch.float32)
            self.keep_fp32()  # PEFT made "old" in the base's dtype and the cast above skips frozen weights
            self._copy_current_into_old()
        else:
            # the reference stays in the base dtype (it is only read); the old model is an EMA, whose
            # small steps vanish in bf16, so it is copied after the cast to fp32
            self.ref_unet = copy.deepcopy(self.unet).requires_grad_(False) if kl else None
            self.unet.requires_grad_(True)
            cast_training_params(self.unet, dtype=torch.float32)
            self.old_unet = copy.deepcopy(self.unet).requires_grad_(False)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()

    # parameters ------------------------------------------------------------------------------
    def keep_fp32(self) -> None:
        """The trained and old weights in fp32 (again: inference's NaN retry, `_place`, casts the
        whole pipeline back to its dtype, and would round them)."""
        params = self.trainable_parameters() + [o for o, _ in self._pairs()]
        for p in params:
            if p.dtype != torch.float32:
                p.data = p.data.float()

    def _named(self, adapter: str) -> dict[str, torch.nn.Parameter]:
        tag = f".{adapter}."
        return {n.replace(tag, ".ADAPTER."): p for n, p in self.unet.named_parameters() if "lora_" in n and tag in n}

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        if self.lora is None:
            return list(self.unet.parameters())
        return list(self._named("default").values())

    def _pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(old, current) tensors, in a fixed order."""
        if self.lora is None:
            return list(zip(self.old_unet.parameters(), self.unet.parameters()))
        cur, old = self._named("default"), self._named("old")
        return [(old[k], cur[k]) for k in sorted(cur)]

    @torch.no_grad()
    def _copy_current_into_old(self) -> None:
        for o, c in self._pairs():
            o.copy_(c.to(o.dtype))

    def ema_step(self, decay: float) -> None:
        from .nft import ema_update

        pairs = self._pairs()
        ema_update([o for o, _ in pairs], [c for _, c in pairs], decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint needs to resume: the trained weights and the old model's."""
        if self.lora is None:
            return {**{f"current.{k}": v for k, v in self.unet.state_dict().items()},
                    **{f"old.{k}": v for k, v in self.old_unet.state_dict().items()}}
        return {**{f"current.{k}": v.detach().clone() for k, v in self._named("default").items()},
                **{f"old.{k}": v.detach().clone() for k, v in self._named("old").items()}}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.lora is None:
            self.unet.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("current.")})
            self.old_unet.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("old.")})
            return
        for prefix, adapter in (("current.", "default"), ("old.", "old")):
            params = self._named(adapter)
            for k, v in state.items():
                if k.startswith(prefix):
                    params[k[len(prefix):]].copy_(v)

    def _load_lora(self, folder: str) -> None:
        """Start both adapters from a saved restorer adapter (restorer-nr continues restorer-fr)."""
        from peft.utils import set_peft_model_state_dict

        state = read_lora_state(folder)
        for adapter in ("default", "old", "reference") if self.ref_adapter else ("default", "old"):
            result = set_peft_model_state_dict(self.unet, state, adapter_name=adapter)
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"init_adapter {folder}: its keys do not match this UNet's LoRA "
                                 f"({result.unexpected_keys[0]}…); train with the same lora settings")

    # views -------------------------------------------------------------------------------------
    def _show(self, which: str):
        """Make the pipeline's UNet the `which` model; returns it."""
        if self.lora is not None:
            adapter = {"current": "default", "old": "old"}.get(which)
            if which == "reference" and self.ref_adapter:
                adapter = "reference"
            if adapter is None:  # the base model: "base", or the reference of a run from scratch
                self.unet.disable_adapters()
            else:
                self.unet.enable_adapters()
                self.unet.set_adapter(adapter)  # PEFT: requires_grad on this adapter alone
            return self.unet
        other = {"current": self.unet, "old": self.old_unet, "reference": self.ref_unet}.get(which)
        if other is None:
            raise ValueError("no reference model: full fine-tuning keeps one only with nft.kl_beta > 0"
                             if which == "reference" else f"full fine-tuning keeps no {which} model")
        self.pipe.unet = other  # the pipeline's denoising loop reads pipe.unet
        return other

    @contextlib.contextmanager
    def use(self, which: str):
        """The pipeline's UNet as the `which` model ("current", "old", "reference", and with LoRA
        "base", the adapters off) for a while; views nest, and the one outside comes back after."""
        self._views.append(which)
        try:
            yield self._show(which)
        finally:
            self._views.pop()
            self._show(self._views[-1] if self._views else "current")

    def save(self, folder: Path, info: dict) -> Path:
        """The trained result: a LoRA adapter folder (`infer --restorer-adapter`), or with full
        fine-tuning a whole pipeline folder (`--set restorer.model=DIR`)."""
        if self.lora is not None:
            from ..restorers.adapter import save_restorer_adapter

            return save_restorer_adapter(self.unet, folder, adapter_name="default", info=info)
        from ..imageio import new_temp_dir

        folder = Path(folder)
        tmp = new_temp_dir(folder)
        self.pipe.save_pretrained(str(tmp))
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        tmp.rename(folder)
        return folder
