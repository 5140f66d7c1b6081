"""The tiny random VLM now lives in the package (realsr_r1/tiny.py); this name stays for tests."""

from realsr_r1.tiny import QWEN_CHAT_TEMPLATE, QWEN_SPECIAL_TOKENS, build_tiny_tokenizer, build_tiny_vlm  # noqa: F401
