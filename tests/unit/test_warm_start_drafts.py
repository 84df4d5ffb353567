"""warm_start.draft_mix: the near-miss perturbation, the draw of a row's draft kind, and own drafts' refresh."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest
from rich.console import Console

from nemo_igrpo.config import ConfigError, WarmStartConfig, load_config
from nemo_igrpo.data.chain import make_chain_split
from nemo_igrpo.data.dataset import Example
from nemo_igrpo.data.drafts import DRAFT_KINDS, near_miss
from nemo_igrpo.warm_start import _OWN, _draft, draft_thresholds, warm_start


class FixedRng(random.Random):
    """randrange → ``at``, choice → ``delta``: the step that slips and by how much, chosen by the test."""

    def __init__(self, at: int, delta: int):
        super().__init__(0)
        self.at, self.delta = at, delta

    def randrange(self, *args, **kwargs):
        return self.at

    def choice(self, seq):
        return self.delta


@pytest.mark.parametrize("solution, at, delta, expected", [
    # step 2 of 3 slips by +1 (9 → 10); step 3 doubles the wrong count
    ("7+5=12, 12-3=9, 9*2=18 \\boxed{18}", 1, 1, "7+5=12, 12-3=10, 10*2=20 \\boxed{20}"),
    # the first step slips by -1; the unboxed ending is kept
    ("7+5=12, 12-3=9, 9*2=18, answer 18", 0, -1, "7+5=11, 11-3=8, 8*2=16, answer 16"),
    # -3 would make 4-4=0 into 1-4=-3: the slip turns positive, 4 → 7, 7-4=3
    ("3+1=4, 4-4=0 \\boxed{0}", 0, -3, "3+1=7, 7-4=3 \\boxed{3}"),
    # builtin:arithmetic is a chain of one step: its result and final answer slip together
    ("23+15=38 \\boxed{38}", 0, -2, "23+15=36 \\boxed{36}"),
    ("2*23=46 \\boxed{46}", 0, 2, "2*23=48 \\boxed{48}"),
    # user datasets: the final answer's last number
    ("so x = 3/4, \\boxed{\\frac{3}{4}}", 0, 1, "so x = 3/4, \\boxed{\\frac{3}{5}}"),
    ("Adding gives 40 and 2, so 42.", 0, 3, "Adding gives 40 and 2, so 45."),
    # not a right chain (12-3 is not 8): treated as free text
    ("7+5=12, 12-3=8 \\boxed{8}", 0, -1, "7+5=12, 12-3=8 \\boxed{7}"),
])
def test_near_miss_by_hand(solution, at, delta, expected):
    assert near_miss(solution, FixedRng(at, delta)) == expected


def test_near_miss_without_a_number_is_none_and_the_kind_falls_back_to_another_solution():
    assert near_miss("no numbers here", random.Random(0)) is None
    pool = [Example("q", "1", "other solution 1")]
    assert DRAFT_KINDS["near_miss"](Example("p", "x", "by inspection"), pool, random.Random(0)) == "other solution 1"


def test_every_chain_near_miss_slips_once_and_computes_right_from_there():
    rng = random.Random(3)
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    for example in make_chain_split(300, seed=5, max_operand=30, min_steps=2, max_steps=6):
        slipped = near_miss(example.solution, rng)
        body, final = slipped.split(" \\boxed{")
        steps = [re.fullmatch(r"(\d+)([+*-])(\d+)=(\d+)", text).groups() for text in body.split(", ")]
        steps = [(int(a), op, int(b), int(c)) for a, op, b, c in steps]
        wrong = [i for i, (a, op, b, c) in enumerate(steps) if ops[op](a, b) != c]
        assert len(wrong) == 1, slipped  # one slip; every later step is recomputed from it
        assert all(steps[i][0] == steps[i - 1][3] for i in range(1, len(steps)))
        assert final == f"{steps[-1][3]}}}" and str(steps[-1][3]) != example.answer
        assert min(c for *_, c in steps) >= 0
        assert body.split(", ")[:wrong[0]] == example.solution.split(", ")[:wrong[0]]  # right up to the slip


def test_thresholds_follow_the_registry_order_and_normalise():
    assert draft_thresholds({"reference": 0.5, "foreign": 0.5}) == {"reference": 0.5, "foreign": 1.0}
    assert draft_thresholds({"foreign": 3.0, "near_miss": 1.0, "own": 0.0}) == {"near_miss": 0.25, "foreign": 1.0}


def _old_prompt_draft(example, pool, refinement_fraction, rng):
    """The warm start's draw before draft_mix existed (kept here as the reference the default must reproduce)."""
    if rng.random() >= refinement_fraction:
        return None
    draft = example if rng.random() < 0.5 else rng.choice(pool)
    return draft.solution


def test_default_mix_reproduces_the_draws_before_mixes_existed():
    pool = make_chain_split(50, seed=1, max_operand=30, min_steps=2, max_steps=4)
    thresholds = draft_thresholds(WarmStartConfig().draft_mix)
    old, new = random.Random(7), random.Random(7)
    for i in range(2000):
        example = pool[i % len(pool)]
        assert _draft(example, pool, 0.5, thresholds, new) == _old_prompt_draft(example, pool, 0.5, old)
    assert old.random() == new.random()  # the same stream consumed


def test_mix_shares_are_the_shares_of_refinement_rows(monkeypatch):
    pool = make_chain_split(50, seed=1, max_operand=30, min_steps=2, max_steps=4)
    for kind in ("reference", "near_miss", "foreign"):  # each kind's draft says which kind it is
        monkeypatch.setitem(DRAFT_KINDS._entries, kind, lambda e, p, r, kind=kind: kind)
    mix = {"foreign": 0.2, "own": 0.3, "reference": 0.1, "near_miss": 0.4}
    rng, thresholds = random.Random(11), draft_thresholds(mix)
    drawn = Counter(_draft(pool[0], pool, 0.75, thresholds, rng) for _ in range(8000))
    assert drawn[None] / 8000 == pytest.approx(0.25, abs=0.02)  # plain rows: 1 - refinement_fraction
    refinement_rows = 8000 - drawn[None]
    # binomial std of a share over ~6000 rows is at most 0.0065: 0.03 is > 4 std
    for kind, share in mix.items():
        count = drawn[_OWN if kind == "own" else kind]
        assert count / refinement_rows == pytest.approx(share, abs=0.03), drawn


def test_unknown_kind_and_bad_shares_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match="warm_start.draft_mix: unknown warm-start draft kind 'nearmiss'.*near_miss"):
        load_config(None, ["warm_start.draft_mix={nearmiss: 1.0}"])
    with pytest.raises(ConfigError, match="warm_start.draft_mix: shares must be"):
        load_config(None, ["warm_start.draft_mix={foreign: -1.0}"])
    # a layer gives the whole mix: near_miss alone, not merged into the default reference/foreign halves
    assert load_config(None, ["warm_start.draft_mix={near_miss: 1.0}"]).warm_start.draft_mix == {"near_miss": 1.0}


class _Policy:
    data_parallel_group = None

    def __init__(self):
        self.batches = []

    def train_step(self, batch, loss_fn):
        self.batches.append(batch)
        return {"loss": 0.0}


class _Template:
    def __init__(self):
        self.shown = []  # (problem, draft) of each refinement row

    def problem_ids(self, problem):
        return [1]

    def refinement_ids(self, problem, draft):
        self.shown.append((problem, draft))
        return [1, 2]


class _Tokenizer:
    eos_token_id, pad_token_id = 3, 0

    def encode(self, text, add_special_tokens=False):
        return [4, 5]


class _OwnDrafts:
    def __init__(self):
        self.refreshes, self.calls = 0, 0

    def refresh(self):
        self.refreshes += 1

    def __call__(self, problems):
        self.calls += 1
        return [f"own draft of {p}" for p in problems]


def test_own_drafts_are_shown_for_their_problem_and_refreshed_every_own_refresh_rows():
    examples = make_chain_split(40, seed=2, max_operand=30, min_steps=2, max_steps=4)
    ws = WarmStartConfig(steps=6, batch_size=8, refinement_fraction=1.0, draft_mix={"own": 1.0}, own_refresh_rows=16)
    template, own, policy = _Template(), _OwnDrafts(), _Policy()
    warm_start(policy, None, examples, template, _Tokenizer(), ws, seed=0, console=Console(quiet=True),
               own_drafts=own)
    assert len(policy.batches) == 6 and own.calls == 6
    # 8 rows a step: the sampler has seen 16 rows before steps 3 and 5 (and the initial weights are current)
    assert own.refreshes == 2
    assert len(template.shown) == 48 and all(draft == f"own draft of {p}" for p, draft in template.shown)
    with pytest.raises(ValueError, match="own"):
        warm_start(policy, None, examples, template, _Tokenizer(), ws, seed=0, console=Console(quiet=True))
