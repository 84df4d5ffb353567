"""Defaults of the ``reward.*`` settings, in one place: ``nemo_igrpo.config`` reads them for its ``RewardConfig`` and
the rewards for their constructors' defaults. Imports nothing, so the config can import it without a cycle."""

DEFAULT_EXTRACT = "boxed_or_tag"  # reward.extract: a box, or the <answer> block of the paper's template
DEFAULT_NUM_WORKERS = 2  # reward.num_workers: grading processes of the math_verify reward
DEFAULT_TIMEOUT_S = 5.0  # reward.timeout_s: wall-clock limit per graded answer, after which it scores 0
