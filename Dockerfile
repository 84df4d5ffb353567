# nemo-igrpo on NVIDIA's NGC vLLM container: CUDA, NCCL, an NGC PyTorch build and vLLM built against it.
# Megatron-Core (and the loggers) are installed on top; the container's torch is pinned so pip never replaces it
# (Transformer Engine and vLLM are compiled against that exact build).
#
#   docker build -t nemo-igrpo .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 --rm -it \
#       -v "$PWD/runs:/workspace/runs" nemo-igrpo nemo-igrpo train --config conf/quickstart.yaml
#
# For Slurm with pyxis/enroot: `enroot import dockerd://nemo-igrpo` (or push it to a registry) and pass the
# .sqsh file or image name as CONTAINER_IMAGE to scripts/slurm/igrpo.sbatch (see docs/launch.md).
FROM nvcr.io/nvidia/vllm:26.10-py3

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

WORKDIR /workspace/nemo-igrpo

# Metadata first: the dependency layer is rebuilt only when pyproject.toml changes.
COPY pyproject.toml README.md ./
COPY nemo_igrpo ./nemo_igrpo
COPY conf ./conf
# Keep the container's torch and vLLM builds: constrain pip to their installed versions.
RUN python -c "import torch, vllm; print(f'torch=={torch.__version__}\nvllm=={vllm.__version__}')" \
        > /tmp/container-constraints.txt \
    && pip install -c /tmp/container-constraints.txt ".[vllm,megatron,wandb,mlflow]" \
    && python -c "import nemo_igrpo.cli, megatron.core, vllm" \
    && rm /tmp/container-constraints.txt

COPY scripts ./scripts

CMD ["nemo-igrpo", "--help"]
