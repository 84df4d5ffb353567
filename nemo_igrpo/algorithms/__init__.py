"""The pure-torch algorithm core: advantages, KL, policy losses, aggregation, the loss function, draft selection."""

from nemo_igrpo.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    drgrpo_advantages,
    grpo_advantages,
    register_advantage,
    rloo_advantages,
    zero_variance_groups,
)
from nemo_igrpo.algorithms.aggregation import AGGREGATIONS, LossNormalizer, aggregate, check_aggregation
from nemo_igrpo.algorithms.batch import RolloutBatch, pad_sequences
from nemo_igrpo.algorithms.kl import KL_ESTIMATORS, kl_penalty
from nemo_igrpo.algorithms.loss import make_loss_fn
from nemo_igrpo.algorithms.policy_losses import (
    POLICY_LOSSES,
    PolicyLossOutput,
    cispo_loss,
    gspo_loss,
    ppo_loss,
    register_policy_loss,
)
from nemo_igrpo.algorithms.selection import DRAFT_SELECTIONS, TIE_BREAKS, select_best, select_draft

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATIONS",
    "DRAFT_SELECTIONS",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "TIE_BREAKS",
    "LossNormalizer",
    "PolicyLossOutput",
    "RolloutBatch",
    "aggregate",
    "check_aggregation",
    "cispo_loss",
    "compute_advantages",
    "drgrpo_advantages",
    "grpo_advantages",
    "gspo_loss",
    "kl_penalty",
    "make_loss_fn",
    "pad_sequences",
    "ppo_loss",
    "register_advantage",
    "register_policy_loss",
    "rloo_advantages",
    "select_best",
    "select_draft",
    "zero_variance_groups",
]
