"""Run a test file's ``worker(mode, out)`` in fresh processes, one per rank, joined over gloo on loopback.

Megatron's global parallel state and the CPU patch (tests/megatron_cpu_patch.py) must not leak into the pytest
process, so such tests run ``python THEIR_FILE MODE RANK WORLD PORT OUT`` per rank and end with
``if __name__ == "__main__": worker_main(worker)``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable


def launch(script: str | Path, mode: str, world: int, out: Path, timeout_s: float) -> None:
    """Run ``script``'s worker for ``mode`` on ``world`` ranks; fails with the output of a rank that failed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The script runs from tests/integration/ (its own folder is on sys.path); its top-level
    # `from worker_launch import ...` needs tests/, where the shared helpers live.
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tests), os.environ.get("PYTHONPATH")]))}
    procs = [subprocess.Popen([sys.executable, str(script), mode, str(rank), str(world), str(port), str(out)],
                              env=env, cwd=tests.parent, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for rank in range(world)]
    try:
        outputs = [p.communicate(timeout=timeout_s)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, f"{mode} worker failed:\n{text[-4000:]}"


def worker_main(worker: Callable[[str, Path], None]) -> None:
    """The rank's side: ``MODE RANK WORLD PORT OUT`` from the command line, torch.distributed's variables set."""
    mode, rank, world, port, out = sys.argv[1:]
    os.environ.update(RANK=rank, WORLD_SIZE=world, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, LOCAL_RANK=rank)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    worker(mode, Path(out))
