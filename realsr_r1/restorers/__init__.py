"""Restorers: the models that turn a stage plan into pixels."""
