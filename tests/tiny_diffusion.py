"""The tiny random upscaler now lives in the package (realsr_r1/tiny.py); this name stays for tests."""

from realsr_r1.tiny import REAL_TEXT, REAL_UNET, REAL_VAE, build_tiny_upscaler  # noqa: F401
