"""Tiny random models for tests, built offline in well under a second.

`build_tiny_vlm(path)` writes a tiny random Qwen2.5-VL (model, tokenizer, image processor, chat
template) to `path` with `save_pretrained`, so tests load it back through the same code users run.
"""

from __future__ import annotations

from pathlib import Path

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


if __name__ == "__main__":  # pragma: no cover
    import sys

    print(build_tiny_vlm(sys.argv[1]))
