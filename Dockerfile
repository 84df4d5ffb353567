# nemo-igrpo on an NVIDIA NGC container: CUDA, NCCL, an NGC PyTorch build and (in the vLLM image) vLLM built against
# it. Megatron-Core (and the loggers) are installed on top; the container's torch, vLLM and transformers are pinned
# so pip never replaces them (Transformer Engine and vLLM are compiled against that exact torch build).
#
#   docker build -t nemo-igrpo .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 --rm -it \
#       -v "$PWD/runs:/workspace/runs" nemo-igrpo nemo-igrpo train --config conf/quickstart.yaml
#
# BASE_IMAGE picks the image; docs/launch.md ("Container") lists the tags, the versions each ships and whether our
# ranges admit them. The vLLM image has no Transformer Engine (policy.megatron.fp8 needs it): for FP8 training build
# on the NGC PyTorch image, without the vllm extra (generation then runs on HF or on a separate vLLM server):
#
#   docker build --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:26.10-py3 \
#       --build-arg EXTRAS=megatron,wandb,mlflow -t nemo-igrpo:te .
#
# For Slurm with pyxis/enroot: `enroot import dockerd://nemo-igrpo` (or push it to a registry) and pass the
# .sqsh file or image name as CONTAINER_IMAGE to scripts/slurm/igrpo.sbatch (see docs/launch.md).
ARG BASE_IMAGE=nvcr.io/nvidia/vllm:26.10-py3
FROM ${BASE_IMAGE}

ARG EXTRAS=vllm,megatron,wandb,mlflow

# PIP_BREAK_SYSTEM_PACKAGES: the images' Python is the system one (/usr/local/lib/python3.12/dist-packages); where it
# carries a PEP 668 EXTERNALLY-MANAGED marker pip would refuse to install, elsewhere the variable does nothing.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

WORKDIR /workspace/nemo-igrpo

# Metadata first: the dependency layer is rebuilt only when pyproject.toml changes.
COPY pyproject.toml README.md ./
COPY nemo_igrpo ./nemo_igrpo
COPY conf ./conf
# Keep the container's torch, vLLM and transformers: constrain pip to the installed versions of those it has (read
# from their metadata, the versions pip compares). Then fail the build here if the vLLM is outside our range.
RUN python -c "import importlib.metadata as m; names = {d.metadata['Name'].lower(): d.version for d in m.distributions()}; print('\n'.join(f'{n}=={names[n]}' for n in ('torch', 'vllm', 'transformers') if n in names))" \
        > /tmp/container-constraints.txt \
    && cat /tmp/container-constraints.txt \
    && pip install -c /tmp/container-constraints.txt ".[${EXTRAS}]" \
    && python -c "import nemo_igrpo.cli, megatron.core" \
    && case ",${EXTRAS}," in *,vllm,*) python -c "from nemo_igrpo.generation.vllm import check_vllm_version as c; print('vllm', c())" ;; esac \
    && rm /tmp/container-constraints.txt

COPY scripts ./scripts

CMD ["nemo-igrpo", "--help"]
