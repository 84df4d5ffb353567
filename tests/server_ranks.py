"""Worker of ``test_server.py::test_two_ranks_share_one_server``: two gloo ranks, one generation server.

Kept out of test_server.py so that the spawned ranks import only this (not vLLM, which the test module imports).
Each rank writes what it saw to ``OUT/rank<r>.pt``; the test process checks it.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

TOKEN_ENV = "NEMO_IGRPO_SERVER_TOKEN"


def _outcome(call):
    try:
        return ("ok", call())
    except Exception as error:  # noqa: BLE001  (the test compares the errors of both ranks)
        return (type(error).__name__, str(error))


def worker(rank: int, world: int, port: int, url: str, token: str, weights: str, out: str) -> None:
    from nemo_igrpo.generation.base import SamplingParams
    from nemo_igrpo.generation.server import ServerGeneration

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    try:
        sent: list[int] = []

        class Counting(ServerGeneration):
            def control(self):  # counts the tensors of each bucket the shm engine announces
                control = super().control()
                if "update_weights" not in vars(control):
                    announce = control.update_weights
                    control.update_weights = lambda info: (sent.append(len(info["names"])), announce(info))
                return control

        client = Counting(url, token, retry_budget_s=30.0, weight_bucket_mb=1)
        state = torch.load(weights)
        result: dict = {}
        client.update_weights(state.items())  # every rank calls it, as the trainer does
        result["sent"] = list(sent)
        result["version"] = client._weights_version
        result["held"] = client.control().weight_version()

        params = SamplingParams(n=2, temperature=1.0, max_new_tokens=8)
        torch.manual_seed(5)  # the per-call seed comes from torch's global RNG, equal on every rank
        batch = [[4, 4, 2, 9], [7, 1]] if rank == 0 else [[4, 4, 2, 9]]  # a prompt alone, or batched with another
        result["keyed"] = [c.token_ids for c in client.generate(batch, params)[0]]
        mine = [[1 + rank, 2, 3, 4], [5, 6 + rank, 7]]  # this rank's data-parallel shard
        result["own"] = (mine, client.generate(mine, params))

        client.set_rollout_peers(dist.group.WORLD)  # as Megatron TP=2: both ranks train on the same rows
        shared = [[9, 8, 7], [6, 5, 4, 3]]
        result["peers"] = client.generate(shared, params)
        calls: list[int] = []

        def follow_up(index, drafts):
            calls.append(index)
            return shared[index] + drafts[0].token_ids + [2]

        result["chained"] = client.generate_chained(shared, params, follow_up, params)
        result["follow_up_calls"] = sorted(calls)

        dist.barrier()
        if rank == 0:  # what a restarted server reports: vLLM's initial label
            client.control().set_weight_version("default")
        dist.barrier()
        result["restarted_peers"] = _outcome(lambda: client.generate(shared, params))
        client.set_rollout_peers(None)
        result["restarted_alone"] = _outcome(lambda: client.generate(mine, params))

        # A push refused by the server (rank 0's token is wrong) fails every rank, not only the sender.
        pusher = ServerGeneration(url, token if rank else "wrong-token", retry_budget_s=5.0)
        result["bad_push"] = _outcome(lambda: pusher.update_weights(state.items()))
        client.update_weights(state.items())  # a fresh sync heals the restart
        result["healed"] = _outcome(lambda: len(client.generate(mine, params)))
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
