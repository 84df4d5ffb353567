"""Megatron-Core policy backend (``policy.backend=megatron``).

Importing this package imports no megatron code: ``convert`` is pure torch, and the other modules import
megatron-core (and Transformer Engine / Megatron-Bridge when present) inside functions.
"""
