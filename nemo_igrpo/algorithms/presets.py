"""Named algorithm presets: each is a *diff* against the schema defaults in ``nemo_igrpo.config.AlgorithmConfig``.

The schema defaults are iGRPO as published (N = 4 drafts + G = 4 refinements, PPO clip 0.2, seq-mean-token-mean).
A preset is applied first; keys a user sets explicitly (YAML or command line) win over it.
"""

from nemo_igrpo.registry import Registry

GRPO_GROUP = {"num_drafts": 0, "num_refinements": 8}  # matched budget: 8 rollouts per prompt, like iGRPO's 4 + 4

# DAPO (Yu et al. 2025): clip-higher, token-level aggregation, dynamic sampling of zero-variance groups.
DAPO = {"eps_low": 0.2, "eps_high": 0.28, "loss_agg": "token-mean", "dynamic_sampling": True}

# GSPO (Zheng et al. 2025): sequence-level importance ratio with much tighter clip bounds.
GSPO = {"policy_loss": "gspo", "eps_low": 3e-4, "eps_high": 4e-4, "loss_agg": "seq-mean-token-mean"}

# Dr.GRPO (Liu et al. 2025): no std division, constant length normaliser.
DRGRPO = {"advantage": "drgrpo", "loss_agg": "seq-mean-token-sum-norm"}

# name -> the AlgorithmConfig keys it sets; a user preset is ``PRESETS.register("mine", {...})`` before loading
PRESETS: Registry[dict] = Registry("algorithm preset", "algorithm.preset")
PRESETS.register("igrpo", {})
PRESETS.register("grpo", {**GRPO_GROUP})
PRESETS.register("dapo", {**GRPO_GROUP, **DAPO})
PRESETS.register("igrpo_dapo", {**DAPO})
PRESETS.register("gspo", {**GRPO_GROUP, **GSPO})
PRESETS.register("igrpo_gspo", {**GSPO})
PRESETS.register("drgrpo", {**GRPO_GROUP, **DRGRPO})
