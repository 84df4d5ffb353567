"""Hostile numbers (issue 26 item 10): every numeric key of the schema is finite and within the range declared next to
its field in ``config.py``; anything else is a ConfigError naming the key. The keys are found by walking the
dataclasses, so a numeric key added later is fuzzed too (and must declare a range)."""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from pathlib import Path

import pytest

from nemo_igrpo.config import Config, ConfigError, load_config
from nemo_igrpo.validation import validate

QUICKSTART = Path(__file__).resolve().parents[2] / "conf" / "quickstart.yaml"
NUMBER_TYPES = (int, float)


def _numeric_keys(schema: type = Config, prefix: str = "") -> list[tuple[str, dataclasses.Field, type]]:
    """(dotted key, field, number type) of every int or float key (optional or list items included), not bools."""
    keys = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            keys += _numeric_keys(hint, f"{prefix}{f.name}.")
            continue
        if typing.get_origin(hint) is dict:  # reward.components: weights, any finite sign (checked on their own)
            continue
        args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        if typing.get_origin(hint) is list:
            args = list(typing.get_args(hint))
        number = next((a for a in args if a in NUMBER_TYPES), None)
        if number is not None:
            keys.append((f"{prefix}{f.name}", f, number))
    return keys


KEYS = _numeric_keys()
HOSTILE = ["nan", "inf", "-inf", "-1", "-1e30", "1e30", "-1000000000000", "1000000000000"]


def test_the_walk_finds_the_keys_the_issue_names():
    names = {key for key, _, _ in KEYS}
    assert {"generation.server.retry_budget_s", "reward.timeout_s", "optim.min_lr_ratio", "optim.betas",
            "rollout.max_off_policy_steps", "trainer.seed", "algorithm.dual_clip"} <= names
    assert "policy.sequence_packing" not in names  # bools are not numbers here
    assert len(names) > 60


@pytest.mark.parametrize("key", [key for key, _, _ in KEYS])
def test_every_numeric_key_declares_a_finite_range(key):
    (f,) = [f for k, f, _ in KEYS if k == key]
    limits = dict(f.metadata)
    assert set(limits) <= {"ge", "gt", "le", "lt"} and limits, f"{key}: no range declared (config.ranged)"
    assert ("ge" in limits) != ("gt" in limits) and ("le" in limits) != ("lt" in limits), f"{key}: two-sided range"
    assert all(math.isfinite(v) for v in limits.values())


BASE = load_config(QUICKSTART)


def _with(config: Config, key: str, value) -> Config:
    """A deep copy of ``config`` with ``key`` set to ``value`` (as an override would, after parsing)."""
    config = copy.deepcopy(config)
    *path, name = key.split(".")
    section = config
    for part in path:
        section = getattr(section, part)
    setattr(section, name, value)
    return config


@pytest.mark.parametrize("key, number", [(key, number) for key, _, number in KEYS])
def test_every_numeric_key_refuses_nan_infinities_negative_and_huge_values(key, number):
    # Deliberately, no key of the schema takes any of these: every count, size, time and coefficient is
    # non-negative, inf has no meaning anywhere (optim.max_grad_norm: 0 turns clipping off), and 10¹² or 10³⁰ is
    # beyond every upper bound (seeds stop at 2³² − 1, numpy's range). Set on the typed config and validated (a
    # load per value would make this the slowest unit test); the overrides path is exercised below.
    for text in HOSTILE:
        value = float(text) if number is float or not text.lstrip("-").isdigit() else int(text)
        with pytest.raises(ConfigError) as caught:
            validate(_with(BASE, key, [value, 0.999] if key == "optim.betas" else value))
        assert str(caught.value).startswith(f"{key}: "), (key, text, str(caught.value))


@pytest.mark.parametrize("key", ["reward.timeout_s", "trainer.seed", "optim.betas", "eval.num_problems"])
def test_hostile_overrides_are_refused_through_load_config(key):
    for text in HOSTILE:
        override = f"{key}=[{text},0.999]" if key == "optim.betas" else f"{key}={text}"
        with pytest.raises(ConfigError) as caught:
            load_config(QUICKSTART, [override])
        assert key in str(caught.value), (override, str(caught.value))


@pytest.mark.parametrize("override", [
    "optim.min_lr_ratio=0", "optim.min_lr_ratio=1", "optim.max_grad_norm=0", "algorithm.kl_coef=0",
    "eval.temperature=0", "trainer.seed=4294967295", "rollout.max_off_policy_steps=0", "generation.top_p=1",
    "generation.server.retry_budget_s=0", "reward.overlong_penalty=0", "warm_start.steps=0", "trainer.max_steps=0",
    "policy.lora.dropout=0", "algorithm.num_drafts=0", "eval.num_problems=0", "optim.betas=[0.0,0.95]",
    "generation.max_new_tokens=32768", "data.max_prompt_tokens=32768", "reward.timeout_s=600",
])
def test_legitimate_edge_values_are_accepted(override):
    load_config(QUICKSTART, [override])


@pytest.mark.parametrize("override, message", [
    ("generation.server.retry_budget_s=nan", "generation.server.retry_budget_s: must be a finite number, got nan"),
    ("optim.min_lr_ratio=-1", r"optim.min_lr_ratio: must be >= 0 and <= 1, got -1"),
    ("rollout.max_off_policy_steps=10000000", r"rollout.max_off_policy_steps: must be >= 0 and <= 64, got 10000000"),
    ("optim.betas=[0.9,1.0]", r"optim.betas: must be >= 0 and < 1, got 1.0"),
])
def test_messages_name_the_key_the_range_and_the_value(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(QUICKSTART, [override])
