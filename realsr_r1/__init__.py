"""realsr-r1: real-world super-resolution that reasons (VLCoT) before it restores."""

__version__ = "0.1.0"
