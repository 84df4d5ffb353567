"""The launch matrix, vLLM column (plus Megatron DP=2 with HF generation): each cell trains 2 steps under torchrun
(or one process), resumes to a third, exports ``final/``; see ``launch_harness`` for what each cell asserts.

Seconds per cell on the shared 2-core development machine (both launches; two measurements): hf DP=2 + vllm
138-166, megatron 1 process + vllm 72, megatron DP=2 + vllm 113-138, megatron DP=2 + hf 116-130, megatron TP=2+SP +
vllm 158-172, megatron PP=2 + vllm 148-160; the rank-independence check adds a 1-process hf + vllm run (92-109).
The whole module: ≈ 900 s.
"""

from __future__ import annotations

import pytest

from launch_harness import check_cell, report, run_cell

VLLM = ["generation.backend=vllm", "generation.vllm.enforce_eager=true"]
MEGATRON = ["policy.backend=megatron"]

# name: (processes, overrides)
CELLS = {
    "hf-dp2-vllm": (2, VLLM),
    "megatron-1proc-vllm": (1, [*MEGATRON, *VLLM]),  # bug 1: closing vLLM destroyed Megatron's process group
    "megatron-dp2-vllm": (2, [*MEGATRON, *VLLM]),  # bug 2: rank 1's engine folder was empty
    "megatron-dp2-hf": (2, MEGATRON),
    # TP=2 needs the KV heads to split; the char vocabulary (101) is padded to 102 rows (bug 3)
    "megatron-tp2sp-vllm": (2, [*MEGATRON, *VLLM, "policy.megatron.tensor_model_parallel_size=2",
                                "policy.megatron.sequence_parallel=true", "model.tiny.num_kv_heads=2"]),
    "megatron-pp2-vllm": (2, [*MEGATRON, *VLLM, "policy.megatron.pipeline_model_parallel_size=2"]),
}


@pytest.fixture(scope="module")
def finished():
    """Results of the cells run so far in this module (the rank-independence check reuses hf DP=2 + vllm)."""
    return {}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CELLS))
def test_launch_cell(name, tmp_path, finished):
    nproc, overrides = CELLS[name]
    result = run_cell(tmp_path, overrides, nproc=nproc)
    report(name, result)
    check_cell(result)
    finished[name] = result


@pytest.mark.slow
def test_two_ranks_of_vllm_sample_what_one_rank_samples(tmp_path, finished):
    # Per-prompt seeds (generation/vllm/colocated.py): rank r's engine samples for its prompts exactly what one engine samples
    # for them inside the whole batch, so every reward and length of the 2-rank run is the 1-rank run's.
    nproc, overrides = CELLS["hf-dp2-vllm"]
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    two = finished.get("hf-dp2-vllm") or run_cell(tmp_path / "two", overrides, nproc=nproc)
    one = run_cell(tmp_path / "one", overrides, nproc=1)
    report("hf-1proc-vllm", one)
    assert [r["step"] for r in one.records] == [r["step"] for r in two.records] == [1, 2, 3]
    for a, b in zip(one.records, two.records):
        exact = sorted(k for k in a if k.startswith(("reward/", "response_length/", "tokens")))
        assert exact and set(exact) <= set(b)
        # Means of rank means in float32: equal up to rounding.
        assert {k: b[k] for k in exact} == pytest.approx({k: a[k] for k in exact}, rel=1e-6, abs=1e-9), a["step"]
    assert len({r["reward/refinement_mean"] for r in one.records}) > 1  # not a constant reward
