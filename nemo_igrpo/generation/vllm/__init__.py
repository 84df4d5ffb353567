"""Every use of vLLM's API in nemo-igrpo, in one package: the colocated engine (``colocated``), the weight-transfer
engines (``transfer``), the generation server's command line and RL routes (``routes``), the guards (``guards``) and
the supported-version check (``version``). Nothing outside this package imports vLLM.

* **Colocated engine** (:class:`VLLMGeneration`): an in-process ``vllm.LLM`` on the trainer's devices, token ids in
  and out (``skip_tokenizer_init``), so the trainer scores exactly the tokens vLLM sampled; the reported log-probs are
  vLLM's *processed* log-probs (after temperature / top-p), the distribution each token was drawn from.
* **Weight sync on vLLM's RL API.** Weights go through vLLM's weight-transfer engines, driven init → start → update →
  finish: in process through ``LLM``'s RL mixin (colocated), over the server's RL routes (``/start_weight_update``
  ...) from the trainer-side engine (:class:`ServerControl` is the client). Two engines are ours, registered with
  ``WeightTransferEngineFactory`` by :func:`register_weight_transfer` (the ``vllm.general_plugins`` entry point, so
  the server's workers load them too): ``nemo_igrpo_shm`` (same host, the CPU path CI runs: safetensors buckets under
  /dev/shm) and ``nemo_igrpo_local`` (colocated: the tensors are handed over by reference). Across hosts, vLLM's own
  ``nccl`` engine. Both of ours receive in checkpoint format through vLLM's layerwise reload, which re-applies the
  weight processing (fused q/k/v, CPU repacking) that a plain ``load_weights`` after start-up would skip. Buckets of
  ``weight_bucket_mb`` bound the memory a sync holds; a bucket always holds whole q/k/v and gate/up groups.
* **Streaming Stage 2** (``stream_refinements``): we drive ``llm_engine.add_request`` / ``step`` ourselves and add a
  prompt's refinement request the moment its own drafts finish, so slow drafts of other prompts do not hold it back.
* Prefix caching is on by default: all drafts of a prompt share its prefix, all refinements of a prompt+draft too.
  No request started after a weight update reuses blocks computed on older weights (the cache is reset at each
  update; see :class:`ServerControl` for the server's two in-flight modes).
* Sampling is seeded per prompt (``SamplingParams(seed=key)``, completion j uses key + j inside vLLM), with the keys
  of the HF backend (a per-call seed from torch's global RNG, the prompt's tokens, its repeat index): what a prompt
  samples does not depend on the other prompts of the batch or on the rank it lands on (docs/vllm.md says exactly
  what holds). On CPU this needs chunked prefill off (see ``VLLMGeneration.__init__``).
* **Guards** around vLLM's side effects on the trainer's process-global state (torch's global RNG, the default
  process group): :func:`engine_rng`, :func:`keep_default_group`.

vLLM is imported lazily (it is an optional extra), and only after :func:`check_vllm_version` passed: an unsupported
vLLM fails at start with the supported range, not with an import error from deep inside. The colocated engine runs
in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``).
"""

from __future__ import annotations

from nemo_igrpo.generation.model_folder import write_model_folder
from nemo_igrpo.generation.vllm.colocated import PromptTooLongError, VLLMGeneration
from nemo_igrpo.generation.vllm.guards import engine_rng, keep_default_group
from nemo_igrpo.generation.vllm.routes import ServerControl, api_server_command, resolve_weight_sync
from nemo_igrpo.generation.vllm.transfer import LOCAL_BACKEND, SHM_BACKEND, register_weight_transfer
from nemo_igrpo.generation.vllm.version import SUPPORTED_VLLM, UnsupportedVLLMError, check_vllm_version
from nemo_igrpo.generation.weight_buckets import weight_buckets

# write_model_folder and weight_buckets are re-exported: this package was their home before they moved out.
__all__ = ["LOCAL_BACKEND", "PromptTooLongError", "SHM_BACKEND", "SUPPORTED_VLLM", "ServerControl",
           "UnsupportedVLLMError", "VLLMGeneration", "api_server_command", "check_vllm_version", "engine_rng",
           "keep_default_group", "register_weight_transfer", "resolve_weight_sync", "weight_buckets",
           "write_model_folder"]
