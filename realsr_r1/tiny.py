"""Tiny random models, built offline in seconds: the tiny profile (configs/tiny.yaml), the smoke
training config (configs/grpo-tiny.yaml), tests and benchmarks use them (as diffusers keeps its
dummy components in `diffusers.utils.testing_utils`).

- `build_tiny_vlm(path)`: a tiny random Qwen2.5-VL (model, tokenizer, image processor, chat
  template) saved with `save_pretrained`, so it loads back through the code users run.
- `build_tiny_upscaler(path)`: a random StableDiffusionUpscalePipeline with the x4 upscaler's
  layout: tiny, or the real sizes (`real_size=True`, for benchmarks with random weights).
- `build_tiny_sd21(path)`: a random SD 2.1-base (UNet, VAE, CLIP, scheduler) with a random
  OSEDiff-format adapter, for the one-step restorer: tiny, or the real sizes.
- `ensure(name, weights_dir)`: the model folder, built there on first use when a profile names it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL's chat template, trimmed to what images + text need.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "<degradation>blur: medium; noise: heavy; jpeg: light; downsample: x4</degradation>",
    "<rough_understand>a dog lying on grass</rough_understand><rough_image></rough_image>",
    "<middle_understand>a brown short-haired dog on a green lawn, a fence behind</middle_understand>",
    "<middle_image></middle_image><final_understand>fur texture, grass blades</final_understand>",
    "<final_image></final_image> none light medium heavy blur noise jpeg downsample x2 x4",
    "You are an expert in image restoration. Perceive the degradation of this low-quality image.",
    "system user assistant the a of and to in is it that with for on as",
]


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer with Qwen's special tokens, trained offline on a few lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=QWEN_SPECIAL_TOKENS[1:],
    )
    fast.chat_template = QWEN_CHAT_TEMPLATE
    return fast


def build_tiny_vlm(path, text: dict | None = None, vision: dict | None = None, device: str = "cpu",
                   dtype=None) -> Path:
    """Write a tiny random Qwen2.5-VL checkpoint (model + processor) to `path`; return the path.

    All Linear input sizes are multiples of 64 so bitsandbytes 4-bit also works on CPU. `text` and
    `vision` override config entries (benchmarks build the real 3B architecture this way; token ids
    the tiny tokenizer does not know decode to nothing), `device`/`dtype` where it is built.
    """
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
    )

    try:
        from transformers import Qwen2VLImageProcessorPil as ImageProcessor
    except ImportError:  # older transformers
        from transformers import Qwen2VLImageProcessor as ImageProcessor

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    vocab = len(tokenizer)
    text_config = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},  # sums to head_dim/2 = 8
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        tie_word_embeddings=False,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision_config = dict(
        depth=2,
        hidden_size=64,
        intermediate_size=128,
        num_heads=4,
        out_hidden_size=64,
        fullatt_block_indexes=[1],
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,
        in_channels=3,
    )
    text_config.update(text or {})
    vision_config.update(vision or {})
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.bos_token_id = ids["<|endoftext|>"]
    config.eos_token_id = ids["<|im_end|>"]
    config.pad_token_id = ids["<|endoftext|>"]
    torch.manual_seed(0)
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.float32)
    try:
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(old_dtype)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(path)

    # Saved part by part: without torchvision a full Qwen2_5_VLProcessor (with its video part)
    # cannot be built, and this is how such a checkpoint looks to the loader anyway.
    image_processor = ImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    image_processor.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --- The upscaler --------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _write_tokenizer_files(folder: Path) -> int:
    """CLIP-style vocab (every byte char, alone and word-final) with no merges. Returns its size."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return len(tokens)


# The stabilityai/stable-diffusion-x4-upscaler architecture (for benchmarks with random weights).
REAL_UNET = dict(
    sample_size=128, in_channels=7, out_channels=4, layers_per_block=2,
    block_out_channels=(256, 512, 512, 1024), norm_num_groups=32,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    only_cross_attention=(True, True, True, False),  # no self-attention in the high-resolution levels
    cross_attention_dim=1024, attention_head_dim=(4, 8, 8, 16), use_linear_projection=True,
    num_class_embeds=1000,
)
REAL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512),
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    sample_size=256, scaling_factor=0.08333,
)
REAL_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                 hidden_act="gelu", projection_dim=512)


def _sd_parts(unet_cfg: dict, vae_cfg: dict, real_size: bool, seed: int, device: str, dtype):
    """(tokenizer, text encoder, UNet, VAE) of a Stable Diffusion pipeline with random weights: a
    CLIP-style tokenizer, the OpenCLIP ViT-H text encoder's sizes with `real_size` (else tiny)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tok_dir:  # CLIPTokenizer reads files; the pipeline saves its own
        vocab_size = _write_tokenizer_files(Path(tok_dir))
        tokenizer = CLIPTokenizer(f"{tok_dir}/vocab.json", f"{tok_dir}/merges.txt", model_max_length=77)
    text_cfg = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2, projection_dim=16)
    text_cfg.update(REAL_TEXT if real_size else {})
    torch.manual_seed(seed)
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.float32)
    try:
        with torch.device(device):
            unet = UNet2DConditionModel(**unet_cfg)
            vae = AutoencoderKL(**vae_cfg)
            text_encoder = CLIPTextModel(CLIPTextConfig(
                vocab_size=vocab_size, max_position_embeddings=77, **text_cfg,
                bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
            ))
    finally:
        torch.set_default_dtype(old_dtype)
    return tokenizer, text_encoder, unet, vae


def build_tiny_upscaler(path: str | Path, seed: int = 0, real_size: bool = False, device: str = "cpu",
                        dtype=None) -> Path:
    """Write a random StableDiffusionUpscalePipeline to `path`: tiny, or the x4 upscaler's real sizes."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline

    unet_cfg = REAL_UNET if real_size else dict(
        sample_size=8, in_channels=7, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, use_linear_projection=True,
        num_class_embeds=351,  # noise levels 0..max_noise_level (350)
    )
    vae_cfg = REAL_VAE if real_size else dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=(8, 8, 16), norm_num_groups=8,  # 3 blocks → VAE factor 4
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        scaling_factor=0.08333,
    )
    tokenizer, text_encoder, unet, vae = _sd_parts(unet_cfg, vae_cfg, real_size, seed, device, dtype)
    pipe = StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        low_res_scheduler=DDPMScheduler(num_train_timesteps=1000),
        # the checkpoint's scheduler_config.json (the SD 2 family's DDIM): v-prediction, no clipping
        scheduler=DDIMScheduler(num_train_timesteps=1000, prediction_type="v_prediction", beta_schedule="scaled_linear",
                                beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=False,
                                steps_offset=1),
        safety_checker=None, feature_extractor=None, watermarker=None, max_noise_level=350,
    )
    pipe.save_pretrained(str(path))
    return Path(path)


# stabilityai/stable-diffusion-2-1-base's architecture (for benchmarks with random weights); its text
# encoder is the x4 upscaler's (OpenCLIP ViT-H), REAL_TEXT.
REAL_SD21_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), norm_num_groups=32,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
)
REAL_SD21_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=512, scaling_factor=0.18215,
)
# Its scheduler_config.json: a PNDMScheduler config, which OSEDiff and we load as a DDPMScheduler;
# its `clip_sample: false` (not a PNDM argument) keeps DDPM from clamping the x_0 latent.
SD21_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon", set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)


def build_tiny_sd21(path: str | Path, seed: int = 0, real_size: bool = False, device: str = "cpu", dtype=None,
                    adapter_rank: int | None = 4) -> Path:
    """Write a random SD 2.1-base-shaped pipeline (the hub's folder layout) to `path`, tiny or at real
    sizes, and with `adapter_rank` a random OSEDiff-format adapter inside (onestep_adapter.ADAPTER_FILE)."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from .restorers.onestep_adapter import ADAPTER_FILE, adapter_state, new_adapter, save_adapter

    unet_cfg = REAL_SD21_UNET if real_size else dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=(2, 4),
        use_linear_projection=True,
    )
    vae_cfg = REAL_SD21_VAE if real_size else dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(8, 8, 16, 16),
        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=0.18215,  # 4 blocks: SD's factor 8
    )
    tokenizer, text_encoder, unet, vae = _sd_parts(unet_cfg, vae_cfg, real_size, seed, device, dtype)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler(**SD21_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(path))
    config = Path(path) / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text(encoding="utf-8")), "clip_sample": False}, indent=2),
                      encoding="utf-8")
    if adapter_rank:
        lists = new_adapter(unet, vae, adapter_rank)
        with torch.no_grad():  # PEFT starts lora_B at zero: make the adapter change the output;
            for name, p in [*unet.named_parameters(), *vae.named_parameters()]:  # and "retrain" conv_in
                if "lora_B" in name or name.startswith("conv_in.base_layer."):
                    p.add_(torch.randn_like(p) * 0.02)
        save_adapter(adapter_state(unet, vae, lists), Path(path) / ADAPTER_FILE)
    return Path(path)


# The folder names profiles use (configs/tiny.yaml, configs/grpo-tiny.yaml) → their builders.
class ScriptedChain:
    """A logits processor that makes a (tiny random) VLM write given text: each generate() call
    writes the next script, then ends its turn. Every forward pass still runs on the real inputs,
    images included, so tests and benchmarks see real prefill and decode costs and inputs. Call
    `begin()` before each generate() (a continuation can look like the same call going on). It
    records the logits the model gave at each call's first step."""

    def __init__(self, tokenizer, scripts: list, eos: int):
        # A script is one text for every row of the batch, or a list of texts (row r writes text r % n).
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        self.scripts = [[encode(t) for t in (s if isinstance(s, list) else [s])] for s in scripts]
        self.eos = int(eos)
        self.call = -1  # index of the current generate() call
        self._start = None
        self.first_logits: list = []

    def begin(self, call: int | None = None) -> "ScriptedChain":
        """A new generate() call: the next script, or script `call` (a rollout's segment index)."""
        self.call = self.call + 1 if call is None else call
        self._start = None
        return self

    def __call__(self, input_ids, scores):
        import torch

        if self._start is None:
            self._start = input_ids.shape[1]
            self.first_logits.append(scores[0].detach().clone())
        step = input_ids.shape[1] - self._start
        texts = self.scripts[self.call] if 0 <= self.call < len(self.scripts) else [[]]
        forced = torch.full_like(scores, float("-inf"))
        for row in range(scores.shape[0]):
            script = texts[row % len(texts)]
            forced[row, script[step] if step < len(script) else self.eos] = 0
        return forced


BUILDERS = {"tiny-vlm": build_tiny_vlm, "tiny-upscaler": build_tiny_upscaler, "tiny-sd21": build_tiny_sd21}
NOTE = ("tiny models with random weights (for tests and smoke runs): the chain of thought is gibberish "
        "and the images are noise, not restorations")


def note_for(cfg: dict) -> str | None:
    """NOTE when a profile config runs one of the tiny models, else None."""
    sections = (cfg.get("policy") or {}, cfg.get("restorer") or {})
    return NOTE if any(str(s.get("model")) in BUILDERS for s in sections) else None


@contextlib.contextmanager
def _no_progress_bars():
    """save_pretrained shows a bar per shard: noise for a model built in a second."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def ensure(name: str, weights_dir: str | Path) -> Path:
    """`weights_dir/name`, building the tiny model `name` (a key of BUILDERS) there if it is missing.

    The build goes into a temporary folder that is renamed into place: an interrupted build leaves
    nothing half-written, and when two processes build at once the first rename wins and the other
    copy is dropped."""
    from .imageio import new_temp_dir

    dest = Path(weights_dir) / name
    if dest.is_dir():
        return dest
    tmp = new_temp_dir(dest)
    try:
        with _no_progress_bars():
            BUILDERS[name](tmp)
        try:
            tmp.rename(dest)
        except OSError:
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.warning("built the tiny random model %s (first use)", dest)
    return dest
