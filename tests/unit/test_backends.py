"""Backends declare what they can do in their registry entries (``nemo_igrpo.backends``), and config validation and
the recipe planner read those capabilities, never the backend's name: a backend of one's own with the same
capabilities as a built-in one is accepted and refused exactly where the built-in one is."""

from __future__ import annotations

from pathlib import Path

import pytest

from nemo_igrpo.backends import GENERATION_BACKENDS, POLICY_BACKENDS, GenerationBackendEntry, PolicyBackendEntry
from nemo_igrpo.config import ConfigError, load_config
from nemo_igrpo.recipes import batch_plan

QUICKSTART = Path(__file__).resolve().parents[2] / "conf" / "quickstart.yaml"


@pytest.fixture
def registered():
    """Register entries for the test, and remove them afterwards (the registries are process-wide)."""
    added = []

    def register(registry, name, entry):
        registry.register(name, entry)
        added.append((registry, name))

    yield register
    for registry, name in added:
        del registry[name]


def test_the_built_in_backends_declare_their_capabilities():
    assert (POLICY_BACKENDS["hf"].lora, POLICY_BACKENDS["hf"].model_parallel) == (True, False)
    assert (POLICY_BACKENDS["megatron"].lora, POLICY_BACKENDS["megatron"].model_parallel) == (False, True)
    assert [n for n, e in GENERATION_BACKENDS.items() if e.overlaps_training] == ["server"]
    assert [n for n, e in GENERATION_BACKENDS.items() if e.own_nodes] == ["server"]
    assert [n for n, e in GENERATION_BACKENDS.items() if e.vllm_context] == ["vllm", "server"]
    # builders are named, and imported only when a run builds the backend
    assert POLICY_BACKENDS["hf"].build == "nemo_igrpo.assembly:_hf_policy"
    assert callable(POLICY_BACKENDS["megatron"].checker()) and POLICY_BACKENDS["hf"].checker() is None


def test_draft_ahead_follows_the_generation_backends_capability(registered):
    registered(GENERATION_BACKENDS, "remote_test", GenerationBackendEntry(lambda *a: None, overlaps_training=True))
    registered(GENERATION_BACKENDS, "local_test", GenerationBackendEntry(lambda *a: None))
    assert load_config(QUICKSTART, ["rollout.draft_ahead=true", "generation.backend=remote_test"]).rollout.draft_ahead
    with pytest.raises(ConfigError, match=r"rollout\.draft_ahead: generation\.backend=local_test generates in the "
                                          r"trainer's process"):
        load_config(QUICKSTART, ["rollout.draft_ahead=true", "generation.backend=local_test"])


def test_lora_and_model_parallel_sizes_follow_the_policy_backends_capabilities(registered):
    registered(POLICY_BACKENDS, "split_test", PolicyBackendEntry(lambda *a: None, model_parallel=True))
    with pytest.raises(ConfigError, match=r"policy\.lora\.rank > 0: LoRA is only supported with policy\.backend=hf; "
                                          r"set policy\.lora\.rank=0 for split_test"):
        load_config(QUICKSTART, ["policy.backend=split_test", "policy.lora.rank=4"])
    sizes = ["policy.megatron.tensor_model_parallel_size=2", "policy.megatron.pipeline_model_parallel_size=2"]
    split = batch_plan(load_config(QUICKSTART, ["policy.backend=split_test", *sizes]), gpus_per_node=8)
    whole = batch_plan(load_config(QUICKSTART, ["policy.backend=hf", *sizes]), gpus_per_node=8)
    assert (split.model_parallel_size, split.data_parallel_size) == (4, 2)
    assert (whole.model_parallel_size, whole.data_parallel_size) == (1, 8)  # hf keeps a whole model per GPU


def test_a_named_builder_is_imported_when_it_is_used():
    entry = GenerationBackendEntry("nemo_igrpo.assembly:_hf_generation")
    from nemo_igrpo import assembly

    assert entry.builder() is assembly._hf_generation
