#!/usr/bin/env bash
# GPU check of the Hugging Face backends (run through the device tool on one H100/H200, no network):
# installs the package from the working tree (omegaconf carried as wheels in .device_wheels/), runs the GPU-capable
# tests, then times GRPO 8 vs iGRPO 4+4 steps of a random ~0.5B Qwen2-shaped model in bf16 and writes the table.
#   usage: bash scripts/device_check_hf.sh    (writes $OUT/bench_step_gpu.json when $OUT is set)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp}
python3 -m pip install -q --no-index --find-links .device_wheels omegaconf 2>&1 | tail -1 || true
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/unit/test_hf_logprobs.py tests/unit/test_hf_policy.py \
    tests/unit/test_hf_generation.py tests/unit/test_igrpo_rollout.py tests/unit/test_microbatch_invariance.py \
    2>&1 | tail -3
# ~0.5B parameters in the Qwen2-0.5B shape (hidden 896, 24 layers, 14 heads, 2 KV heads), bf16 autocast, 256 new
# tokens per sample, 32 problems x 8 samples per step; random weights, so every sample runs to the token limit.
timeout 420 python3 scripts/bench_step.py --steps 2 --output "$out/bench_step_gpu.json" \
    model.tiny.hidden_size=896 model.tiny.intermediate_size=4864 model.tiny.num_layers=24 model.tiny.num_heads=14 \
    model.tiny.num_kv_heads=2 model.tiny.max_position_embeddings=2048 warm_start.steps=0 \
    generation.max_new_tokens=256 generation.batch_size=256 trainer.prompts_per_step=32 \
    policy.micro_batch_size=32 policy.precision=bf16 model.dtype=bfloat16 data.arithmetic.num_train=500 \
    data.arithmetic.num_heldout=10 2>&1 | tail -20
