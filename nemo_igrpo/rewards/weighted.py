"""A weighted sum of rewards (the paper trains on accuracy 1.0 + format 1.0), each component logged on its own."""

from __future__ import annotations

from nemo_igrpo.rewards.base import Reward, RewardOutput


class WeightedReward(Reward):
    """score_i = Σ_k weight_k · score_k,i. Components and counters of every part are passed through, prefixed with
    the part's name where two parts report the same key (so nothing is silently overwritten)."""

    def __init__(self, parts: dict[str, tuple[Reward, float]]):
        if not parts:
            raise ValueError("WeightedReward needs at least one part")
        self.parts = parts

    def __call__(self, completions: list[str], answers: list[str]) -> RewardOutput:
        total = [0.0] * len(completions)
        components: dict[str, list[float]] = {}
        counters: dict[str, int] = {}
        for name, (reward, weight) in self.parts.items():
            out = reward(completions, answers)
            total = [t + weight * s for t, s in zip(total, out.scores)]
            for key, values in out.components.items():
                components[key if key not in components else f"{name}/{key}"] = values
            for key, count in out.counters.items():
                counters[key if key not in counters else f"{name}/{key}"] = count
        return RewardOutput(scores=total, components=components, counters=counters)

    def close(self) -> None:
        for reward, _ in self.parts.values():
            reward.close()
