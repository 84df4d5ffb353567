"""Named algorithm presets: each is a *diff* against the schema defaults in ``nemo_igrpo.config.AlgorithmConfig``.

The schema defaults are iGRPO as published (N = 4 drafts + G = 4 refinements, PPO clip 0.2, seq-mean-token-mean).
A preset is applied first; keys a user sets explicitly (YAML or command line) win over it.
"""

GRPO_GROUP = {"num_drafts": 0, "num_refinements": 8}  # matched budget: 8 rollouts per prompt, like iGRPO's 4 + 4

# DAPO (Yu et al. 2025): clip-higher, token-level aggregation, dynamic sampling of zero-variance groups.
DAPO = {"eps_low": 0.2, "eps_high": 0.28, "loss_agg": "token-mean", "dynamic_sampling": True}

# GSPO (Zheng et al. 2025): sequence-level importance ratio with much tighter clip bounds.
GSPO = {"policy_loss": "gspo", "eps_low": 3e-4, "eps_high": 4e-4, "loss_agg": "seq-mean-token-mean"}

# Dr.GRPO (Liu et al. 2025): no std division, constant length normaliser.
DRGRPO = {"advantage": "drgrpo", "loss_agg": "seq-mean-token-sum-norm"}

PRESETS: dict[str, dict] = {
    "igrpo": {},
    "grpo": {**GRPO_GROUP},
    "dapo": {**GRPO_GROUP, **DAPO},
    "igrpo_dapo": {**DAPO},
    "gspo": {**GRPO_GROUP, **GSPO},
    "igrpo_gspo": {**GSPO},
    "drgrpo": {**GRPO_GROUP, **DRGRPO},
}
