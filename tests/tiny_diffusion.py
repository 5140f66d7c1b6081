"""A tiny random StableDiffusionUpscalePipeline (the x4 upscaler's layout), built offline in < 1 s."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
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


def build_tiny_upscaler(path: str | Path, seed: int = 0, real_size: bool = False, device: str = "cpu",
                        dtype=None) -> Path:
    """Write a random StableDiffusionUpscalePipeline to `path`: tiny, or the x4 upscaler's real sizes."""
    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(path)
    tok_dir = path.parent / (path.name + "-tokenizer-src")
    vocab_size = _write_tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)

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
    text_cfg = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
                    projection_dim=16)
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
    pipe = StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        low_res_scheduler=DDPMScheduler(num_train_timesteps=1000),
        scheduler=DDIMScheduler(num_train_timesteps=1000, prediction_type="v_prediction"),
        safety_checker=None, feature_extractor=None, watermarker=None, max_noise_level=350,
    )
    pipe.save_pretrained(str(path))
    return path
