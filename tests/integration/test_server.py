"""The generation-server backend against a real ``nemo-igrpo serve`` (vLLM's API server) over loopback.

The server starts once for the module (≈25 s on an idle machine) on the tiny Llama of the training tests, and is
stopped with SIGTERM in a finalizer. The last test kills it in the middle of a training step: the client retries
for its budget, then the run fails with a clear error and the newest checkpoint is untouched.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from helpers import make_policy

from nemo_igrpo.algorithms.batch import RolloutBatch, pad_sequences
from nemo_igrpo.checkpoint import find_latest
from nemo_igrpo.assembly import build_generation
from nemo_igrpo.config import ConfigError, load_config
from nemo_igrpo.generation.base import SamplingParams
from nemo_igrpo.generation.server import (
    ServerGeneration,
    ServerRequestError,
    ServerRestartedError,
    ServerUnavailableError,
)
from nemo_igrpo.models import load_model, load_tokenizer
from nemo_igrpo.rewards import BoxedMatchReward, register_reward
from nemo_igrpo.serve import wait_until_healthy

REPO = Path(__file__).resolve().parents[2]
TOKEN = "test-token-0123456789"
# max |log p_vLLM − log p_trainer| per token, fp32 on both sides: different attention/matmul kernels and
# reduction orders give up to ~3e-5 on log-probs of magnitude ≲ 10 (≈ 30 float32 ulps); a wrong weight or
# temperature is off by ≥ 1e-2.
TOLERANCE = 1e-4
TINY_TRAIN = [
    "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "model.tiny.num_layers=2",
    "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1", "data.arithmetic.num_train=200",
    "data.arithmetic.num_heldout=8", "data.arithmetic.max_operand=9", "warm_start.steps=0",
    "trainer.prompts_per_step=4", "generation.max_new_tokens=12", "eval.samples_per_problem=1",
    "trainer.progress=false", "trainer.loggers=[]", "policy.micro_batch_size=16", "trainer.eval_every=0",
]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model, folder: Path, request) -> tuple[str, subprocess.Popen]:
    """Serve ``model`` (saved into ``folder``) with ``nemo-igrpo serve`` on a free port until the requesting scope
    ends (SIGTERM in a finalizer); returns (URL, process) once healthy."""
    model.save_pretrained(folder)
    port = _free_port()
    env = {**os.environ, "NEMO_IGRPO_SERVER_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
    log = open(folder / "server.log", "w")  # noqa: SIM115  (open until the finalizer stops the server)
    process = subprocess.Popen(
        [sys.executable, "-m", "nemo_igrpo.cli", "serve", str(folder), "--port", str(port), "--enforce-eager",
         "--dtype", "float32", "--max-model-len", "512"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop():
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
        log.close()

    request.addfinalizer(stop)
    url = f"http://127.0.0.1:{port}"
    # ≈25 s idle; far longer when other jobs share the two cores
    wait_until_healthy(url, process, timeout_s=600, log=folder / "server.log")
    return url, process


FRESH_CHECKSUMS: dict[str, dict[str, str]] = {}  # url -> the server's weight checksums before any push


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    """(url, process, config) of a running server whose model has the tiny training architecture."""
    config = load_config(REPO / "conf" / "quickstart.yaml", TINY_TRAIN)
    tokenizer = load_tokenizer(config.model)
    torch.manual_seed(123)  # a model the trainer never builds: every test syncs the weights it means
    url, process = start_server(load_model(config.model, tokenizer), tmp_path_factory.mktemp("served"), request)
    FRESH_CHECKSUMS[url] = _client(url).control().weight_checksums()  # a fresh engine on the folder's weights
    return url, process, config


def _client(url: str, **options) -> ServerGeneration:
    return ServerGeneration(url, TOKEN, **{"retry_budget_s": 30.0, **options})


def _max_error(model, prompts, completions) -> float:
    policy = make_policy(model, temperature=1.0)
    ids, attention, mask, gen = pad_sequences(prompts, [c.token_ids for c in completions], 0,
                                              [c.logprobs for c in completions])
    batch = RolloutBatch(ids, attention, mask, torch.zeros(len(prompts)), torch.zeros(len(prompts), dtype=torch.long),
                         gen)
    assert mask.sum() > 0
    return float(((policy.compute_logprobs(batch).logprobs - gen) * mask).abs().max())


def _tiny_model(server, seed: int):
    _, _, config = server
    torch.manual_seed(seed)
    return load_model(config.model, load_tokenizer(config.model))


@pytest.mark.slow  # the module's server
def test_weight_sync_over_shared_memory_then_generation_matches_the_trainer(server):
    url = server[0]
    client = _client(url, weight_bucket_mb=1)
    assert client.weight_sync == "shm"  # auto, for a server on this host
    prompts = [[1, 2, 3, 4], [5, 6, 7]]
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=10)
    for seed in (0, 1):
        model = _tiny_model(server, seed)
        client.update_weights(make_policy(model).export_weights())
        groups = client.generate(prompts, params)
        flat = [c for g in groups for c in g]
        rows = [p for p in prompts for _ in range(2)]
        assert [len(g) for g in groups] == [2, 2] and all(len(c.token_ids) == 10 for c in flat)
        assert _max_error(model, rows, flat) < TOLERANCE
        assert _max_error(_tiny_model(server, 1 - seed), rows, flat) > 0.05  # the other weights do not fit


@pytest.mark.slow  # the module's server
def test_a_server_that_no_longer_holds_the_synced_weights_is_refused(server):
    """A restarted server serves its model folder's weights again; the client must not train on those samples."""
    client = _client(server[0])
    client.update_weights(make_policy(_tiny_model(server, 0)).export_weights())
    params = SamplingParams(n=1, temperature=1.0, max_new_tokens=4)
    assert len(client.generate([[1, 2, 3]], params)[0][0].token_ids) == 4
    assert client.control().weight_version() == client._weights_version
    client.control().set_weight_version("default")  # what a restarted server reports: vLLM's initial label
    with pytest.raises(ServerRestartedError, match="restarted and lost the trained weights"):
        client.generate([[1, 2, 3]], params)
    with pytest.raises(ServerRestartedError):  # the streamed path checks too
        client.generate_chained([[1, 2], [3, 4]], params, lambda i, d: [5, 6], params)
    client.update_weights(make_policy(_tiny_model(server, 0)).export_weights())  # a fresh sync heals it
    assert len(client.generate([[1, 2, 3]], params)[0][0].token_ids) == 4


@pytest.mark.slow  # the module's server
def test_streamed_stages_over_http(server):
    client = _client(server[0])
    model = _tiny_model(server, 0)
    client.update_weights(model.state_dict().items())
    prompts = [[1 + i, 2 + i] for i in range(4)]
    calls = []

    def follow_up(index, drafts):
        calls.append(index)
        return prompts[index] + drafts[0].token_ids + [9]

    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=6)
    drafts, stage2, refinements = client.generate_chained(prompts, params, follow_up, params)
    assert sorted(calls) == [0, 1, 2, 3] and [len(r) for r in refinements] == [2] * 4
    assert all(stage2[i] == prompts[i] + drafts[i][0].token_ids + [9] for i in range(4))
    rows = [stage2[i] for i in range(4) for _ in range(2)]
    assert _max_error(model, rows, [c for r in refinements for c in r]) < TOLERANCE


@pytest.mark.slow  # the module's server
def test_the_weight_checker_shows_the_server_holds_exactly_the_pushed_weights(server):
    """vLLM's /weight_checker hashes every parameter as the workers hold it: after a push of the model folder's
    weights the server matches a fresh engine on them byte for byte; other weights do not. On CPU it sees the
    embeddings, norms and head only: vLLM-CPU repacks each linear layer into its kernel's own buffer and leaves an
    empty ``weight`` parameter (their hashes never change), so the linear layers are checked by log-probs instead
    (test_weight_sync_over_shared_memory_then_generation_matches_the_trainer)."""
    url, _, config = server
    client, fresh = _client(url), FRESH_CHECKSUMS[url]
    client.update_weights(make_policy(_tiny_model(server, 0)).export_weights())
    changed = set(client.control().weight_mismatches(fresh))
    seen = {name for name in fresh if name.endswith(("embed_tokens.weight", "lm_head.weight"))}  # norms: ones
    assert changed == seen and any(name.endswith("embed_tokens.weight") for name in seen)
    client.update_weights(make_policy(_tiny_model(server, 123)).export_weights())  # the folder's weights again
    assert client.control().weight_mismatches(fresh) == []


def _prefix_cache_hits(control, at_least: float = 0.0) -> float:
    """The server's prefix-cache hits (tokens), once its counter reached ``at_least`` (metrics lag the answers)."""
    deadline = time.monotonic() + 10
    while True:
        hits = control.prefix_cache_counters()[0]
        if hits >= at_least or time.monotonic() > deadline:
            return hits
        time.sleep(0.1)


@pytest.mark.slow  # the module's server
@pytest.mark.parametrize("inflight", ["wait", "keep"])
def test_no_request_after_a_push_reuses_a_prefix_cached_on_the_old_weights(server, inflight):
    """A long prompt cached on the old weights is sent again after a push: no cached block is reused, and its
    completion's log-probs are the new weights' (a stale prompt KV would be off by ≫ TOLERANCE). The same repeat
    without a push is served from the cache, so the check is not vacuous."""
    client = _client(server[0], inflight_updates=inflight)
    control = client.control()
    old, new = _tiny_model(server, 0), _tiny_model(server, 1)
    prompt = [3 + (7 * i) % 40 for i in range(300)]  # several KV blocks (ids below the tiny vocabulary's size)
    params = SamplingParams(n=1, temperature=1.0, max_new_tokens=4)
    client.update_weights(make_policy(old).export_weights())
    client.generate([prompt], params)
    hits = _prefix_cache_hits(control)
    client.generate([prompt], params)
    assert _prefix_cache_hits(control, hits + 128) - hits >= 128  # the repeat hit the cache
    client.update_weights(make_policy(new).export_weights())
    hits = _prefix_cache_hits(control)
    completion = client.generate([prompt], params)[0]
    time.sleep(0.5)
    assert _prefix_cache_hits(control) == hits
    assert _max_error(new, [prompt], completion) < TOLERANCE


def _generated_tokens(client) -> float:
    """The server's count of generated tokens (vLLM's Prometheus counter, updated at every engine step)."""
    text = client._request("GET", "/metrics", text=True)
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:generation_tokens_total"))


@pytest.mark.slow  # the module's server
def test_keep_lets_a_request_in_flight_go_on_under_the_new_weights(server):
    """rollout.inflight_updates=keep: a push pauses the engine with the request in flight instead of waiting for
    it; the request finishes after the push, as a partial rollout: its first tokens were sampled from the old
    weights, the rest from the new ones (each token's log-prob is one model's, to TOLERANCE)."""
    from concurrent.futures import ThreadPoolExecutor

    client = _client(server[0], inflight_updates="keep")
    old, new = _tiny_model(server, 0), _tiny_model(server, 1)
    client.update_weights(make_policy(old).export_weights())
    prompt, length = [1, 2, 3, 4], 400
    params = SamplingParams(n=1, temperature=1.0, max_new_tokens=length)
    with ThreadPoolExecutor(max_workers=1) as pool:
        before = _generated_tokens(client)
        running = pool.submit(client._generate, [prompt], params, [7])
        while _generated_tokens(client) == before:  # push as soon as the request has sampled a token
            assert not running.done()
            time.sleep(0.01)
        client.update_weights(make_policy(new).export_weights())
        completion = running.result()[0][0]
    assert len(completion.token_ids) == length
    errors = {}
    for name, model in (("old", old), ("new", new)):
        policy = make_policy(model, temperature=1.0)
        ids, attention, mask, gen = pad_sequences([prompt], [completion.token_ids], 0, [completion.logprobs])
        batch = RolloutBatch(ids, attention, mask, torch.zeros(1), torch.zeros(1, dtype=torch.long), gen)
        errors[name] = ((policy.compute_logprobs(batch).logprobs - gen).abs())[mask.bool()]
    switch = int((errors["old"] < TOLERANCE).long().cumprod(0).sum())  # the old weights' tokens come first
    assert 0 < switch < length
    assert bool((errors["new"][switch:] < TOLERANCE).all())


def _post(url: str, path: str, body: dict, token: str | None) -> int:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.mark.slow  # the module's server
def test_every_endpoint_but_health_needs_the_token(server):
    url = server[0]
    completion = {"prompt": [[1, 2]], "max_tokens": 2}
    assert _post(url, "/v1/completions", completion, None) == 401
    # vLLM's own --api-key leaves its RL routes open; require_token guards them
    for route, body in (("/init_weight_transfer_engine", {"init_info": {}}), ("/start_weight_update", {}),
                        ("/update_weights", {"update_info": {"path": "/etc/passwd", "names": []}}),
                        ("/finish_weight_update", {}), ("/pause", {}), ("/resume", {}),
                        ("/update_weight_version", {"new_version": "x"}), ("/weight_checker", {"action": "reset"}),
                        ("/collective_rpc", {"method": "reset_weights"})):
        assert _post(url, route, body, None) == 401, route
        assert _post(url, route, body, "wrong") == 401, route
    assert _post(url, "/reset_prefix_cache", {}, "wrong") == 401
    assert _post(url, "/reset_prefix_cache", {}, TOKEN) == 200
    with urllib.request.urlopen(f"{url}/health", timeout=10) as answer:
        assert answer.status == 200
    with pytest.raises(ServerRequestError, match="refused the token"):
        ServerGeneration(url, "wrong", retry_budget_s=5).generate([[1, 2]], SamplingParams(max_new_tokens=2))


def test_a_missing_token_or_an_unreachable_server_fail_clearly(monkeypatch):
    config = load_config(None, ["generation.backend=server", f"generation.server.url=http://127.0.0.1:{_free_port()}",
                                "generation.server.retry_budget_s=2"])
    monkeypatch.delenv("NEMO_IGRPO_SERVER_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="NEMO_IGRPO_SERVER_TOKEN is empty or unset"):
        build_generation(config, None, pad_token_id=0)
    monkeypatch.setenv("NEMO_IGRPO_SERVER_TOKEN", TOKEN)
    started = time.monotonic()
    with pytest.raises(ServerUnavailableError, match=r"did not answer GET /v1/models within .*retry_budget_s=2 s"):
        build_generation(config, None, pad_token_id=0)
    assert 1.5 < time.monotonic() - started < 15


def test_serve_refuses_to_start_without_a_token(tmp_path, monkeypatch):
    from nemo_igrpo.cli import main

    monkeypatch.delenv("NEMO_IGRPO_SERVER_TOKEN", raising=False)
    (tmp_path / "config.json").write_text("{}")
    assert main(["serve", str(tmp_path)]) == 2


def test_serve_refuses_an_unsupported_vllm_naming_the_range(tmp_path, monkeypatch, capsys):
    import vllm

    from nemo_igrpo.cli import main
    from nemo_igrpo.generation.vllm import SUPPORTED_VLLM

    monkeypatch.setenv("NEMO_IGRPO_SERVER_TOKEN", TOKEN)
    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    (tmp_path / "config.json").write_text("{}")
    assert main(["serve", str(tmp_path)]) == 2  # before any server process starts
    assert f"vLLM 0.33.0 is not supported: nemo-igrpo needs vllm{SUPPORTED_VLLM}" in capsys.readouterr().err


@pytest.mark.parametrize("host, sync, backend", [("127.0.0.1", "auto", "nemo_igrpo_shm"),
                                                ("0.0.0.0", "auto", "nccl"), ("127.0.0.1", "nccl", "nccl"),
                                                ("0.0.0.0", "none", None)])
def test_serve_starts_the_weight_transfer_engine_the_trainer_will_use(host, sync, backend):
    """`serve --weight-sync` picks vLLM's engine by the rule the trainer's generation.server.weight_sync=auto uses
    (shm for a local server, else nccl); none starts no engine."""
    import argparse

    from nemo_igrpo.generation.vllm import resolve_weight_sync
    from nemo_igrpo.generation.vllm import api_server_command
    from nemo_igrpo.serve import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    command = api_server_command(parser.parse_args(["model", "--host", host, "--weight-sync", sync]))
    flags = [command[i + 1] for i, arg in enumerate(command) if arg == "--weight-transfer-config"]
    assert flags == ([] if backend is None else [json.dumps({"backend": backend})])
    assert resolve_weight_sync(sync, host) == {"nemo_igrpo_shm": "shm", "nccl": "nccl", None: "none"}[backend]


@pytest.mark.slow
def test_two_ranks_share_one_server(server, tmp_path):
    """Two gloo ranks, one server: one push per sync (rank 0), the same weights label on both ranks, a prompt's
    samples independent of rank and batch, each rank's own requests sampled from the pushed weights, peers
    (Megatron TP/PP) given identical samples, a restart detected on every rank, a refused push failing every rank."""
    import torch.multiprocessing as mp

    import server_ranks

    model, other = _tiny_model(server, 0), _tiny_model(server, 1)
    torch.save(dict(model.state_dict()), tmp_path / "weights.pt")
    mp.start_processes(server_ranks.worker, args=(2, _free_port(), server[0], TOKEN, str(tmp_path / "weights.pt"),
                                                  str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    assert ranks[0]["sent"] and ranks[1]["sent"] == []  # only rank 0 sends
    assert sum(ranks[0]["sent"]) == len(model.state_dict())
    assert ranks[0]["version"] == ranks[1]["version"] and ranks[0]["held"] == ranks[0]["version"]
    for result in ranks:  # each rank's own shard, sampled from the pushed weights
        prompts, groups = result["own"]
        rows = [p for p, g in zip(prompts, groups) for _ in g]
        flat = [c for g in groups for c in g]
        assert _max_error(model, rows, flat) < TOLERANCE
        assert _max_error(other, rows, flat) > 0.05
    tokens = lambda groups: [[c.token_ids for c in g] for g in groups]  # noqa: E731
    # per-prompt sampling keys: a prompt samples the same completions on either rank, batched or alone
    assert ranks[0]["keyed"] == ranks[1]["keyed"] and ranks[0]["keyed"][0] != ranks[0]["keyed"][1]
    # 8 tokens at T=1 from a random model: equal because one request served both peers (keys alone would too)
    assert tokens(ranks[0]["peers"]) == tokens(ranks[1]["peers"])
    (drafts0, stage2_0, refined0), (drafts1, stage2_1, refined1) = ranks[0]["chained"], ranks[1]["chained"]
    assert tokens(drafts0) == tokens(drafts1) and stage2_0 == stage2_1 and tokens(refined0) == tokens(refined1)
    assert ranks[0]["follow_up_calls"] == ranks[1]["follow_up_calls"] == [0, 1]  # the peer replayed the scoring
    for result in ranks:
        for key in ("restarted_peers", "restarted_alone"):
            name, message = result[key]
            assert name == "ServerRestartedError" and "restarted and lost the trained weights" in message
        name, message = result["bad_push"]
        assert name == "ServerRequestError" and "refused the token" in message
        assert result["healed"] == ("ok", 2)


@register_reward("test_kill_server")
class KillServerReward(BoxedMatchReward):
    """Scores like boxed_match, but kills the generation server the first time it is called (mid-step)."""

    process: subprocess.Popen | None = None

    def __call__(self, completions, answers):
        process = KillServerReward.process
        if process is not None and process.poll() is None:
            # SIGKILL, as a crash or an OOM kill: on SIGTERM the API server waits for its in-flight requests, and
            # those never finish once the engine process is gone.
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=60)
        return super().__call__(completions, answers)


@pytest.mark.slow  # the module's server; trains
def test_train_through_the_server_and_a_server_dying_mid_step(server, tmp_path, monkeypatch):
    """Keep last in the module: it stops the server."""
    from nemo_igrpo.tracking import read_metrics
    from nemo_igrpo.trainer import train

    url, process, _ = server
    monkeypatch.setenv("NEMO_IGRPO_SERVER_TOKEN", TOKEN)
    common = [*TINY_TRAIN, "generation.backend=server", f"generation.server.url={url}",
              f"trainer.output_dir={tmp_path}", "trainer.save_every=1", "optim.lr=1e-3"]
    train(load_config(REPO / "conf" / "quickstart.yaml", [*common, "trainer.max_steps=1"]))
    (record,) = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["step"] == 1]
    # the builder pushed the trainer's initial weights: generator and trainer agree
    assert abs(record["train/mismatch/token_prob_error"] - 1.0) < 1e-4
    saved = find_latest(tmp_path / "checkpoints")
    assert saved.name == "step_000001"
    before = {p.relative_to(saved): p.read_bytes() for p in saved.rglob("*") if p.is_file()}

    KillServerReward.process = process
    started = time.monotonic()
    with pytest.raises(ServerUnavailableError, match=rf"generation server {url} did not answer POST /v1/completions"):
        train(load_config(REPO / "conf" / "quickstart.yaml", [
            *common, "trainer.max_steps=2", "generation.server.retry_budget_s=3",
            "reward.components={test_kill_server: 1.0}"]))
    assert process.poll() is not None  # the server really died during step 2
    assert time.monotonic() - started < 120
    assert find_latest(tmp_path / "checkpoints") == saved
    assert {p.relative_to(saved): p.read_bytes() for p in saved.rglob("*") if p.is_file()} == before
