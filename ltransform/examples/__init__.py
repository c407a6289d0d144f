"""Runnable examples: ``python -m ltransform.examples.gpt``."""
