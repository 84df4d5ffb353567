"""The generation-server client keeps its token to itself and cleans up after a SIGKILLed trainer (issue 26 item 12)."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from nemo_igrpo.generation import server_weights, weight_buckets
from nemo_igrpo.generation.server_http import ServerHTTPClient, ServerRequestError


def serve(handler_cls):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_cls)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_the_bearer_token_is_not_forwarded_on_a_redirect():
    seen = []

    class Elsewhere(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            body = json.dumps({"data": [{"id": "m"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    other, other_url = serve(Elsewhere)

    class Redirecting(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(307)
            self.send_header("Location", f"{other_url}{self.path}")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server, url = serve(Redirecting)
    try:
        client = ServerHTTPClient(url, "secret-token", retry_budget_s=1.0)
        with pytest.raises(ServerRequestError, match="redirect"):
            client.model_name()
        assert "Bearer secret-token" not in seen
    finally:
        server.shutdown(), other.shutdown()


def test_a_weight_bucket_left_in_dev_shm_by_a_killed_trainer_is_removed_by_the_next_client(tmp_path, monkeypatch):
    monkeypatch.setattr(weight_buckets, "SHM_DIR", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{weight_buckets.BUCKET_PREFIX}{dead.pid}-abc.safetensors"
    live = tmp_path / f"{weight_buckets.BUCKET_PREFIX}{os.getppid()}-abc.safetensors"
    unrelated = tmp_path / "someone-elses-file"
    for path in (stale, live, unrelated):
        path.write_bytes(b"x" * 10)
    server_weights.ServerWeightSync("http://127.0.0.1:1", "token", weight_sync="shm")
    assert not stale.exists() and live.exists() and unrelated.exists()


def test_the_shm_engine_loads_bucket_files_only(tmp_path, monkeypatch):
    """The server's shm engine loads the file an /update_weights request names: only a bucket file of ours, in the
    bucket folder, is accepted (not /etc/passwd, not a look-alike elsewhere, not a ../ escape)."""
    monkeypatch.setattr(weight_buckets, "SHM_DIR", str(tmp_path))
    bucket = weight_buckets.write_bucket([("w", torch.ones(2))])
    assert bucket.parent == tmp_path and weight_buckets.bucket_path(str(bucket)) == bucket.resolve()
    assert bucket.stat().st_mode & 0o777 == 0o600  # weights readable by their owner only
    elsewhere = tmp_path / "sub"
    elsewhere.mkdir()
    for path in ("/etc/passwd", str(elsewhere / bucket.name), str(tmp_path / "sub" / ".." / ".." / bucket.name)):
        with pytest.raises(PermissionError, match="is not a weight bucket file"):
            weight_buckets.bucket_path(path)


def test_a_full_bucket_folder_names_itself_and_the_bucket_size_key(tmp_path, monkeypatch):
    """/dev/shm full: safetensors says only "File too large"; the error names the folder and the key to lower, and
    leaves no partial file."""
    monkeypatch.setattr(weight_buckets, "SHM_DIR", str(tmp_path))

    def full(tensors, path):
        Path(path).write_bytes(b"partial")
        raise OSError(27, "File too large")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    with pytest.raises(OSError, match=rf"to {tmp_path} .*File too large.*generation.vllm.weight_bucket_mb"):
        weight_buckets.write_bucket([("w", torch.ones(2))])
    assert list(tmp_path.iterdir()) == []
