"""Generation backends: sample completions (token ids and their log-probs) for token-id prompts.

Only the interface is imported here; each backend module (``hf``, ``vllm``, ``server``) is imported when a run
builds it, so the interface costs no engine import.
"""

from nemo_igrpo.generation.base import Completion, GenerationBackend, SamplingParams

__all__ = ["Completion", "GenerationBackend", "SamplingParams"]
