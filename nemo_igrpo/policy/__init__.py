"""Policy backends: score sequences, take optimizer steps, hand weights to the generator.

Backends are imported lazily by ``nemo_igrpo.assembly`` so that the interface costs no framework import.
"""

from nemo_igrpo.policy.base import LossFn, PolicyBackend, TokenStats

__all__ = ["LossFn", "PolicyBackend", "TokenStats"]
