"""The launch matrix, vLLM column (plus Megatron DP=2 with HF generation): each cell trains 2 steps under torchrun
(or one process), resumes to a third, exports ``final/``; see ``launch_harness`` for what each cell asserts."""

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


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CELLS))
def test_launch_cell(name, tmp_path):
    nproc, overrides = CELLS[name]
    result = run_cell(tmp_path, overrides, nproc=nproc)
    report(name, result)
    check_cell(result)
