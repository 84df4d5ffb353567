"""Megatron policy backend with ``policy.max_tokens_per_micro_batch``: log-probs, loss, metrics, gradients and the
optimizer step equal row micro-batches at TP=2 + sequence parallel, PP=2 (micro-batches of different shapes:
stages exchange shapes) and DP=2 (rows re-dealt over the DP group by tokens), on CPU over gloo.

Each layout runs in fresh processes (``python tests/integration/test_megatron_token_budget.py MODE RANK WORLD PORT
OUT``), reusing the model, batch and loss of test_megatron_parallel.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from worker_launch import launch, worker_main

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.slow  # launches 3 × 2 processes (about 2 minutes on 2 loaded cores)

# rollout_batch() row lengths 14, 9, 7, 12, 5 → with 20 tokens: [14], [12], [9, 7], [5] (row micro-batches of 2
# pad to 3 × 2 × 14 = 84 tokens, the budget to 14 + 12 + 18 + 5 = 49)
BUDGET = 20
LAYOUTS = {  # TP=1 is what test_megatron_parallel compares every layout with; here each run has its own baseline
    "tp2": {"tensor_model_parallel_size": 2, "sequence_parallel": True},
    "pp2": {"pipeline_model_parallel_size": 2},
    "dp2": {"use_distributed_optimizer": False},  # an unsharded gradient buffer can be read back per rank
}


def worker(mode: str, out: Path) -> None:
    import megatron_cpu_patch
    import torch.distributed as dist
    from test_megatron_parallel import OPTIM, hf_model, loss_fn_for, megatron_settings, rollout_batch

    megatron_cpu_patch.apply()
    from nemo_igrpo.policy.megatron.policy import MegatronPolicy
    from nemo_igrpo.sharding import balance_across_ranks

    torch.set_num_threads(1)
    full = rollout_batch()
    full.ref_logprobs = full.gen_logprobs - 3.0 * full.loss_mask  # the loss has a KL term (kl_coef 0.05)
    loss_fn = loss_fn_for(full)
    result = {}
    for kind, budget in (("rows", None), ("budget", BUDGET)):
        policy = MegatronPolicy(hf_model(), megatron=megatron_settings(**LAYOUTS[mode]), bf16=False,
                                micro_batch_size=2, use_reference=False, seed=0, max_tokens_per_micro_batch=budget,
                                **OPTIM)
        batch = full
        if mode == "dp2":
            rank = dist.get_rank()
            batch = full.select(slice(0, 3) if rank == 0 else slice(3, 5))  # rollout shards: 30 vs 17 tokens
            if budget is not None:
                batch = balance_across_ranks(batch, policy.data_parallel_group)
        stats = policy.compute_logprobs(batch)
        # every rank's rows and values, in the order of the full batch
        rows = _gather_rows(batch, stats, mode)
        loss, metrics = policy.accumulate_gradients(batch, loss_fn)
        result[kind] = {"rows": rows, "loss": loss, "metrics": metrics, "grads": policy.gradients_as_hf(),
                        "tokens": int(batch.attention_mask.sum()), "parts": len(policy._micro_batches(batch)[1]),
                        "step": policy.train_step(batch, loss_fn),
                        "weights": {n: t.clone() for n, t in policy.export_weights()}}
        del policy
    if dist.get_rank() == 0:
        torch.save(result, out / f"{mode}.pt")
    dist.barrier()


def _gather_rows(batch, stats, mode: str) -> dict[tuple, tuple[torch.Tensor, torch.Tensor]]:
    """{row's token ids: (log-probs, entropy)} over all DP ranks (rows are re-dealt, so key them by content)."""
    from nemo_igrpo import distributed

    mine = {tuple(batch.input_ids[i].tolist()): (stats.logprobs[i], stats.entropy[i]) for i in range(batch.size)}
    if mode != "dp2":
        return mine
    merged = {}
    for part in distributed.all_gather_objects(mine):
        merged.update(part)
    return merged


# ---------------------------------------------------------------------------------------------- pytest side


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("megatron_budget")
    for mode, world in (("tp2", 2), ("pp2", 2), ("dp2", 2)):
        launch(__file__, mode, world, out, 240)
    return {mode: torch.load(out / f"{mode}.pt", weights_only=False) for mode in LAYOUTS}


def _key(ids: tuple) -> tuple:
    # rows are right-padded to different widths in different shards: compare by their ids without trailing padding
    ids = list(ids)
    while ids and ids[-1] == 0:
        ids.pop()
    return tuple(ids)


@pytest.mark.parametrize("mode", list(LAYOUTS))
def test_token_budget_equals_row_micro_batches(runs, mode):
    rows, budget = runs[mode]["rows"], runs[mode]["budget"]
    assert budget["parts"] == (4 if mode != "dp2" else 2) and rows["parts"] == (3 if mode != "dp2" else 2)
    if mode == "dp2":
        assert budget["tokens"] == 26  # rank 0's balanced share: 14 + 7 + 5 of 47 tokens (rollout shard: 30)
    # log-probs and entropy of every row (1e-5: float32 forwards of differently shaped micro-batches, O(1) values)
    ref = {_key(k): v for k, v in rows["rows"].items()}
    got = {_key(k): v for k, v in budget["rows"].items()}
    assert set(ref) == set(got) and len(ref) == 5
    for key, (logprobs, entropy) in ref.items():
        width = len(key)  # shards pad rows to different widths; beyond the row's own tokens both are 0
        assert (got[key][0][:width] - logprobs[:width]).abs().max() < 1e-5
        assert (got[key][1][:width] - entropy[:width]).abs().max() < 1e-5
    assert sum(v[0].abs().sum() for v in ref.values()) > 1
    assert budget["loss"] == pytest.approx(rows["loss"], rel=1e-5, abs=1e-7)
    for name in rows["metrics"]:
        assert budget["metrics"][name] == pytest.approx(rows["metrics"][name], rel=1e-5, abs=1e-6), name
    scale = max(g.abs().max().item() for g in rows["grads"].values())
    assert scale > 0
    for name, grad in rows["grads"].items():
        assert (budget["grads"][name] - grad).abs().max() < 1e-5 * scale, name
    for key in ("loss", "grad_norm", "lr", "skipped", "policy_loss"):
        assert budget["step"][key] == pytest.approx(rows["step"][key], rel=1e-5, abs=1e-7), key
    for name, tensor in rows["weights"].items():
        # 1% of the lr (1e-3) that bounds a first Adam step: gradient sums in another order differ at 1e-7 relative
        assert (budget["weights"][name] - tensor).abs().max() < 1e-5, name


def test_layouts_agree(runs):
    ref = runs["tp2"]["budget"]
    for mode in ("pp2", "dp2"):
        assert runs[mode]["budget"]["step"]["loss"] == pytest.approx(ref["step"]["loss"], rel=1e-5, abs=1e-7), mode
        assert runs[mode]["budget"]["step"]["grad_norm"] == pytest.approx(ref["step"]["grad_norm"], rel=1e-5), mode


if __name__ == "__main__":
    worker_main(worker)
