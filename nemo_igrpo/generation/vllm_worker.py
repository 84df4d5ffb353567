"""Weight updates for an out-of-process vLLM engine (the generation server), as a vLLM worker extension.

``nemo-igrpo serve`` starts vLLM with ``--worker-extension-cls nemo_igrpo.generation.vllm_worker.WeightSyncExtension``;
vLLM mixes this class into every worker, so its methods run inside the worker processes and are called by name
through ``collective_rpc`` (over HTTP: the dev endpoint ``POST /collective_rpc``, whose arguments must be strings).

Two transports:
* ``shm`` (same host; the CPU path tested here): the client writes a bucket of tensors as a safetensors file under
  ``/dev/shm`` and passes its path; the worker memory-maps it and reloads those weights in place.
* ``nccl`` (GPUs; written for the paper's layout, NOT tested here — there is no GPU on the development machines):
  trainer rank 0 and the server's workers form a stateless NCCL group; the client announces each bucket's names,
  dtypes and shapes, then broadcasts the tensors from rank 0.

The methods are deliberately not called ``update_weights`` (that name clashes with a vLLM built-in).
Weights are reloaded with ``reload_weights(weights_iterator=..., is_checkpoint_format=True)``: vLLM's
``load_weights`` cannot be used after start-up on CPU, where linear weights are repacked after loading.
"""

from __future__ import annotations

import hmac
import json
import os

TOKEN_ENV = "VLLM_API_KEY"  # the server's shared token, set by `nemo-igrpo serve` for vLLM and for us


class WeightSyncExtension:
    """Mixed into vLLM's worker class: ``self`` is the worker (it has ``reload_weights`` and ``model_runner``)."""

    def _nemo_igrpo_check_token(self, token: str) -> None:
        # /collective_rpc is a dev endpoint that vLLM's --api-key does not guard; `nemo-igrpo serve` adds a
        # middleware that does, and this check keeps a bare vLLM server with this extension from taking weights
        # from anyone.
        expected = os.environ.get(TOKEN_ENV, "")
        if not expected or not hmac.compare_digest(expected.encode(), str(token).encode()):
            raise PermissionError("nemo-igrpo weight update refused: wrong or missing token")

    def nemo_igrpo_load_weights_file(self, path: str, token: str) -> int:
        """Reload the weights stored in the safetensors file ``path`` (HF names); returns how many were loaded."""
        self._nemo_igrpo_check_token(token)
        from safetensors.torch import load_file

        tensors = load_file(path, device="cpu")
        self.reload_weights(weights_iterator=list(tensors.items()), is_checkpoint_format=True)
        return len(tensors)

    def nemo_igrpo_set_weights_version(self, version: str, token: str) -> str:
        """Label the weights just loaded; a restarted server has no label, which the client detects."""
        self._nemo_igrpo_check_token(token)
        self._nemo_igrpo_weights_version = version
        return version

    def nemo_igrpo_weights_version(self, token: str) -> str:
        self._nemo_igrpo_check_token(token)
        return getattr(self, "_nemo_igrpo_weights_version", "")

    # ---------------------------------------------------------------------------------------------- NCCL (GPU)

    def nemo_igrpo_init_nccl(self, master_address: str, master_port: str, rank_offset: str, world_size: str,
                             token: str) -> str:
        """Join the trainer's weight-broadcast group as rank ``rank_offset + this worker's rank``."""
        self._nemo_igrpo_check_token(token)
        import torch
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.parallel_state import get_world_group
        from vllm.distributed.utils import StatelessProcessGroup

        rank = get_world_group().rank + int(rank_offset)
        group = StatelessProcessGroup.create(host=master_address, port=int(master_port), rank=rank,
                                             world_size=int(world_size))
        self._nemo_igrpo_nccl = PyNcclCommunicator(group, device=torch.cuda.current_device())
        return f"rank {rank}"

    def nemo_igrpo_receive_nccl(self, metadata: str, token: str) -> int:
        """Receive one bucket broadcast from rank 0: ``metadata`` is JSON [[name, dtype, shape], ...] in send order."""
        self._nemo_igrpo_check_token(token)
        import torch

        communicator = getattr(self, "_nemo_igrpo_nccl", None)
        if communicator is None:
            raise RuntimeError("nemo_igrpo_init_nccl was not called on this worker")
        received = []
        for name, dtype, shape in json.loads(metadata):
            tensor = torch.empty(shape, dtype=getattr(torch, dtype), device="cuda")
            communicator.broadcast(tensor, src=0, stream=torch.cuda.current_stream())
            received.append((name, tensor))
        torch.cuda.synchronize()
        self.reload_weights(weights_iterator=received, is_checkpoint_format=True)
        return len(received)
