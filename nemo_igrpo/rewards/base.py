"""The reward interface and its registry.

A reward maps (completion text, gold answer) pairs to scalar scores. It returns per-component scores for logging
(e.g. accuracy vs. a format bonus) and counters for events worth watching (e.g. verifier timeouts). Rewards are
registered by name so that configs can pick one: ``@register_reward("my_reward")``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from nemo_igrpo.registry import Registry

if TYPE_CHECKING:
    from nemo_igrpo.generation.base import GenerationBackend


@dataclass
class RewardOutput:
    """Scores for a batch of completions, in input order."""

    scores: list[float]
    components: dict[str, list[float]] = field(default_factory=dict)  # name → one value per completion
    counters: dict[str, int] = field(default_factory=dict)  # name → count over the batch (e.g. "timeouts")

    def solved(self) -> list[bool]:
        """Whether each completion solves its problem: the ``accuracy`` component when the reward reports one (a
        format bonus is not a solve), else the score; > 0 counts. Evaluation and Proposition 3.1 use this."""
        return [value > 0 for value in self.components.get("accuracy", self.scores)]


class Reward(ABC):
    """Scores completions against gold answers. Subclasses must not look at anything but the text they are given."""

    # True for a reward that asks ``RewardContext.chat_model`` for a model (a judge): validation then refuses a
    # generation backend that cannot give it an engine of its own
    uses_chat_model: bool = False

    @abstractmethod
    def __call__(self, completions: list[str], answers: list[str]) -> RewardOutput:
        """One score per completion; ``answers[i]`` is the gold answer for ``completions[i]``."""

    def close(self) -> None:
        """Release resources (e.g. worker processes). Stateless rewards have none."""

    @classmethod
    def from_config(cls, settings: Any, context: "RewardContext") -> "Reward":
        """Build from the run's ``reward`` section (``nemo_igrpo.config.RewardConfig``); override to read the keys
        this reward uses. ``context`` gives what a section cannot hold (e.g. a judge model's generator)."""
        return cls()


@dataclass
class ChatModel:
    """A model to talk to (e.g. a judge): its generator, its chat template and its tokenizer's decode."""

    generator: "GenerationBackend"
    render: Callable[[str], list[int]]  # one user message → prompt token ids
    decode: Callable[[list[int]], str]
    stop_token_ids: tuple[int, ...]


@dataclass
class RewardContext:
    """What the assembly (``nemo_igrpo.assembly``) lends to rewards beyond their config section, built on demand so
    that rewards never reach a policy or generation implementation themselves."""

    chat_model: Callable[[str | None], ChatModel]  # model path or hub name (None: the policy's model) → ChatModel


REWARDS: Registry[type[Reward]] = Registry("reward", "reward.components")

R = TypeVar("R", bound=type[Reward])


def register_reward(name: str) -> Callable[[R], R]:
    """Class decorator adding a ``Reward`` subclass to ``REWARDS`` under ``name`` (names must be unique; a module
    imported twice may register the same class again)."""

    def decorator(cls: R) -> R:
        if name in REWARDS and REWARDS[name] is not cls:
            raise ValueError(f"reward {name!r} is already registered to {REWARDS[name].__qualname__}")
        if name not in REWARDS:
            REWARDS.register(name, cls)
        return cls

    return decorator
