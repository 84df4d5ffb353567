"""HFPolicy under data parallelism (2 gloo processes): replicas start from rank 0's weights, the summed gradient of
two half-batches equals the full-batch gradient (same step, same weights), and only rank 0 writes files."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import make_policy, tiny_llama

from nemo_igrpo.algorithms.aggregation import LossNormalizer
from nemo_igrpo.algorithms.batch import RolloutBatch
from nemo_igrpo.algorithms.loss import make_loss_fn


def _batch() -> RolloutBatch:
    generator = torch.Generator().manual_seed(0)
    rows, length = 6, 12
    input_ids = torch.randint(0, 64, (rows, length), generator=generator)
    attention_mask = torch.ones(rows, length, dtype=torch.long)
    attention_mask[0, 9:] = 0  # a shorter row
    loss_mask = torch.zeros(rows, length)
    loss_mask[:, 6:] = 1.0
    loss_mask *= attention_mask
    return RolloutBatch(input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask,
                        advantages=torch.randn(rows, generator=generator), group_ids=torch.arange(rows) // 3,
                        gen_logprobs=torch.zeros(rows, length))


def _loss_fn(batch: RolloutBatch):
    # Normalised by the whole batch's counts, as the trainer does after all-reducing them.
    return make_loss_fn(policy_loss="ppo", eps_low=0.2, eps_high=0.2, dual_clip=None, loss_agg="seq-mean-token-mean",
                        kl_coef=0.0, kl_estimator="k3", kl_clamp=None, importance_correction="none",
                        importance_cap=2.0, normalizer=LossNormalizer.from_mask(batch.loss_mask, 16))


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        policy = make_policy(tiny_llama(seed=10 + rank), micro_batch_size=2)  # different initial weights per rank
        batch = _batch()
        mine = batch.select(torch.arange(rank, batch.size, world))
        metrics = policy.train_step(mine, _loss_fn(batch))
        saved = os.path.join(out, "saved")
        os.makedirs(saved, exist_ok=True)
        policy.save(saved)  # every rank calls it; only rank 0 writes
        grads = {name: p.grad for name, p in policy.model.named_parameters()}  # all-reduced and clipped
        torch.save({"metrics": metrics, "weights": policy.model.state_dict(), "grads": grads},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # 2 worker processes over gloo
@pytest.mark.timeout(300)
def test_two_replicas_take_the_full_batch_step(tmp_path, single_thread):
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    reference = make_policy(tiny_llama(seed=10), micro_batch_size=2)  # rank 0's initial weights
    batch = _batch()
    peak_lr = reference.optimizer.defaults["lr"]
    expected = reference.train_step(batch, _loss_fn(batch))

    for result in ranks:
        for name, tensor in reference.model.state_dict().items():
            # Adam's first step is lr·g/(|g| + eps) ≈ lr·sign(g): where |g| is near eps, float-rounding differences
            # of the gradient (reduction order: CPU-dependent) become a fraction of lr. A wrong step is ≈ lr off.
            torch.testing.assert_close(result["weights"][name], tensor, rtol=0, atol=2e-3 * peak_lr, msg=name)
        for name, param in reference.model.named_parameters():
            torch.testing.assert_close(result["grads"][name], param.grad, rtol=1e-4, atol=1e-7, msg=name)
        for key in ("loss", "grad_norm", "policy_loss", "entropy", "clip_fraction"):
            assert result["metrics"][key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
    assert ranks[0]["metrics"] == ranks[1]["metrics"]  # every rank reports the same (global) step metrics
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["model.safetensors", "optimizer.pt"]


def test_hf_sampling_of_a_prompt_does_not_depend_on_its_batch(single_thread):
    from nemo_igrpo.generation.base import SamplingParams
    from nemo_igrpo.generation.hf import HFGeneration

    generator = HFGeneration(tiny_llama(), pad_token_id=0, batch_size=64)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [1, 2, 3]]
    params = SamplingParams(n=3, temperature=0.7, top_p=0.9, max_new_tokens=10)

    def sample(batch, batch_size=64):
        generator.batch_size = batch_size
        torch.manual_seed(0)  # the per-call seed comes from the global RNG, as on every rank
        return [[c.token_ids for c in group] for group in generator.generate(batch, params)]

    full = sample(prompts)
    assert sample(prompts[:2]) == full[:2] and sample(prompts[2:])[0] == full[2]  # another rank's share
    assert sample(prompts, batch_size=1) == full  # other chunking, other padding
    assert full[0] != full[3]  # a repeated prompt gets its own samples
    assert len({tuple(c) for c in full[0]}) == 3  # and so does each of a prompt's n completions


def test_hf_sampling_draws_from_the_reported_distribution(single_thread):
    from nemo_igrpo.generation.base import SamplingParams
    from nemo_igrpo.generation.hf import HFGeneration

    model = tiny_llama()
    generator = HFGeneration(model, pad_token_id=0, batch_size=64)
    torch.manual_seed(1)
    samples = generator.generate([[1, 2, 3]], SamplingParams(n=4000, temperature=0.7, max_new_tokens=1))[0]
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([[1, 2, 3]])).logits[0, -1] / 0.7, dim=-1)
    tokens = torch.tensor([s.token_ids[0] for s in samples])
    frequencies = torch.bincount(tokens, minlength=probs.numel()).float() / len(samples)
    assert (frequencies - probs).abs().max() < 5 * (probs.max() / len(samples)) ** 0.5  # within 5 sigma
    reported = torch.tensor([s.logprobs[0] for s in samples])
    torch.testing.assert_close(reported, probs.log()[tokens], rtol=0, atol=1e-5)
