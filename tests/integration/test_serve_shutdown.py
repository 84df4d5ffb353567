"""`nemo-igrpo serve` stops within its shutdown timeout (plus its kill grace) after SIGTERM to its process group, even
with a request in flight whose engine process the same signal ended (vLLM's HTTP server alone waits for such a
request forever)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from nemo_igrpo.config import load_config
from nemo_igrpo.models import load_model, load_tokenizer
from nemo_igrpo.serve import KILL_GRACE_S, wait_until_healthy

REPO = Path(__file__).resolve().parents[2]
TOKEN = "test-token-shutdown"
SHUTDOWN_TIMEOUT_S = 5
TINY = ["model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "model.tiny.num_layers=2",
        "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1"]


def _descendants(pid: int) -> list[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            pass
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        children = [c for c, p in parents.items() if p == current]
        found += children
        frontier += children
    return found


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def _engine_core(pid: int) -> int:
    for candidate in _descendants(pid):
        try:
            if "EngineCore" in Path(f"/proc/{candidate}/cmdline").read_text() + Path(
                    f"/proc/{candidate}/comm").read_text():
                return candidate
        except OSError:
            continue
    pytest.fail("no EngineCore process under the server")


def _running_requests(url: str) -> float:
    """vLLM's ``vllm:num_requests_running`` gauge (summed over engines) from the server's /metrics."""
    request = urllib.request.Request(f"{url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        text = answer.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:num_requests_running"))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigterm_stops_the_server_within_its_timeout_with_a_request_in_flight(tmp_path):
    config = load_config(REPO / "conf" / "quickstart.yaml", TINY)
    load_model(config.model, load_tokenizer(config.model)).save_pretrained(tmp_path / "model")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "nemo_igrpo.cli", "serve", str(tmp_path / "model"), "--port", str(port),
             "--enforce-eager", "--dtype", "float32", "--max-model-len", "512",
             "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S)],
            env={**os.environ, "NEMO_IGRPO_SERVER_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process, timeout_s=600, log=log_path)

        outcome, finished = {}, threading.Event()

        def long_request():  # a request that is still generating when the engine dies
            body = json.dumps({"model": str(tmp_path / "model"), "prompt": [1, 2, 3], "max_tokens": 500, "n": 32,
                               "min_tokens": 500, "temperature": 1.0}).encode()
            request = urllib.request.Request(f"{url}/v1/completions", body, {
                "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=600) as answer:
                    outcome["answer"] = (answer.status, len(json.loads(answer.read())["choices"]))
            except OSError as error:  # the server went away mid-request (what the SIGTERM below must cause)
                outcome["error"] = repr(error)
            finally:
                finished.set()

        thread = threading.Thread(target=long_request, daemon=True)
        thread.start()
        # The request is in the engine's running batch (vLLM's own gauge; 32 × 500 tokens take far longer than
        # this), not merely sent: the SIGTERM below arrives while it runs.
        deadline = time.monotonic() + 120
        while _running_requests(url) < 1:
            assert time.monotonic() < deadline and not finished.is_set(), ("request not running", outcome)
            time.sleep(0.2)
        tree = _descendants(process.pid)
        assert _engine_core(process.pid) in tree
        # As Slurm, a terminal or a test stops a job: SIGTERM to the whole process group, so the engine process
        # ends at once while the HTTP server still holds the request that waits for it.
        assert not finished.is_set(), outcome  # still running when the signal arrives
        os.killpg(process.pid, signal.SIGTERM)
        start = time.monotonic()
        process.wait(timeout=SHUTDOWN_TIMEOUT_S + KILL_GRACE_S + 60)  # a hang fails here, clearly
        elapsed = time.monotonic() - start
        # vLLM's HTTP server never lets go of the request (its engine is gone), so `serve` kills it KILL_GRACE_S after
        # the --shutdown-timeout of 5 s, i.e. 20 s after the signal. +10 s: the supervisor's 0.5 s polling, the kill
        # and the exit on a loaded machine; the default --shutdown-timeout (30 s) would take 45 s.
        assert elapsed <= SHUTDOWN_TIMEOUT_S + KILL_GRACE_S + 10, elapsed  # measured: 23.7 s
        # Usually vLLM's HTTP server holds the dead engine's request and `serve` kills it on --shutdown-timeout; on
        # some runs it lets go by itself first. Either way the bound above holds; a kill must be reported as one.
        kill_message = f"the server did not stop within {SHUTDOWN_TIMEOUT_S + KILL_GRACE_S:.0f} s of the signal"
        killed = kill_message in log_path.read_text(errors="replace")
        assert (process.returncode == 128 + signal.SIGKILL) == killed, (process.returncode, killed)
        thread.join(timeout=30)
        # Ended by the shutdown: cut off (a connection error), or drained whole within --shutdown-timeout (all 32
        # choices; CI saw vLLM finish it in time), never a partial or failed answer and never still pending.
        assert finished.is_set() and ("error" in outcome or outcome.get("answer") == (200, 32)), outcome
        for _ in range(20):  # helpers such as multiprocessing's resource tracker exit once their pipes close
            left = [pid for pid in tree if Path(f"/proc/{pid}").exists() and not _zombie(pid)]
            if not left:
                break
            time.sleep(0.5)
        assert left == [], [Path(f"/proc/{pid}/cmdline").read_bytes()[:200] for pid in left]  # nothing left
        with socket.socket() as probe:  # nothing listens on the port (REUSEADDR: closed connections may linger)
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", port))
            probe.listen()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
