"""Generation backends: sample completions (token ids and their log-probs) for token-id prompts.

Backends are imported lazily by ``nemo_igrpo.backends`` so that the interface costs no engine import.
"""

from nemo_igrpo.generation.base import Completion, GenerationBackend, SamplingParams

__all__ = ["Completion", "GenerationBackend", "SamplingParams"]
