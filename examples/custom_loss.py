#!/usr/bin/env python
"""Train with a policy loss of your own: one function, registered under a name, selected in ``algorithm.policy_loss``.

This one is plain (unclipped) importance-weighted REINFORCE: loss_t = −A · r_t with r_t = π_t / π_old,t, whose
gradient at r = 1 is −A · ∇ log π_t. Aggregation, the KL penalty, the importance correction, micro-batching and
both policy backends come for free: the loss only sees per-token tensors. It runs the embedded demo for a few steps:

    python examples/custom_loss.py trainer.max_steps=5 trainer.output_dir=runs/custom_loss
"""

from __future__ import annotations

import sys

import torch

from nemo_igrpo.algorithms import PolicyLossOutput, register_policy_loss


@register_policy_loss("reinforce")
def reinforce_loss(logprobs, old_logprobs, advantages, loss_mask, *, eps_low, eps_high, dual_clip):
    """logprobs, old_logprobs, loss_mask: [B, L]; advantages: [B]. Clip settings are unused (nothing is clipped)."""
    mask = loss_mask > 0
    ratio = torch.where(mask, logprobs - old_logprobs, 0.0).exp()  # 0 off-mask: exp() never sees padding
    loss = -advantages[:, None] * ratio
    return PolicyLossOutput(per_token_loss=torch.where(mask, loss, 0.0), clipped=torch.zeros_like(ratio),
                            ratio=ratio.detach())


if __name__ == "__main__":
    from nemo_igrpo.cli import default_config_path
    from nemo_igrpo.config import load_config
    from nemo_igrpo.trainer import train

    # Register first (importing this file did), then load: validation reads the live registry.
    train(load_config(default_config_path(), ["algorithm.policy_loss=reinforce", *sys.argv[1:]]))
