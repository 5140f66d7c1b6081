"""Reward functions for VLCoT-GRPO, by name (see `registry`): text rewards in `text`, image rewards in `visual`."""
