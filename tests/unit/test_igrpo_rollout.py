"""One iGRPO rollout with a scripted generator: best-draft selection, the Stage-2 prompt, masks, advantages."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_igrpo.algorithms.igrpo import DynamicSamplingError, RolloutSettings, collect_batch
from nemo_igrpo.data.char_tokenizer import build_char_tokenizer
from nemo_igrpo.data.dataset import Example
from nemo_igrpo.data.prompts import PromptBuilder
from nemo_igrpo.generation.base import Completion, GenerationBackend, SamplingParams
from nemo_igrpo.rewards import BoxedMatchReward, RewardOutput

TOKENIZER = build_char_tokenizer()
END = TOKENIZER.eos_token_id


class ScriptedGenerator(GenerationBackend):
    """Answers from a script: ``script(prompt_text, sample_index) -> completion text``; records every call."""

    def __init__(self, script):
        self.script = script
        self.calls: list[tuple[list[str], int]] = []

    def generate(self, prompts, params):
        texts = [TOKENIZER.decode(p) for p in prompts]
        self.calls.append((texts, params.n))
        out = []
        for text in texts:
            group = []
            for k in range(params.n):
                ids = TOKENIZER.encode(self.script(text, k), add_special_tokens=False) + [END]
                group.append(Completion(ids, [-0.5] * len(ids), "stop"))
            out.append(group)
        return out

    def update_weights(self, weights):
        pass


def settings(n, g, **overrides):
    base = dict(num_drafts=n, num_refinements=g, tie_break="first", advantage="grpo", adv_eps=1e-6,
                dynamic_sampling=False, max_sampling_rounds=3, sampling=SamplingParams(max_new_tokens=16))
    return RolloutSettings(**{**base, **overrides})


def run(generator, problems, s, num=None):
    queue = list(problems)

    def source(k):
        taken, queue[:] = queue[:k], queue[k:]
        return taken

    template = PromptBuilder(TOKENIZER, system_prompt=None, draft_header="Draft:")
    return collect_batch(source, num or len(problems), generator, BoxedMatchReward(), template,
                         lambda ids: TOKENIZER.decode(ids, skip_special_tokens=True), s, TOKENIZER.pad_token_id)


def drafts_then_refinements(draft_answers, refinement_answers):
    def script(text, k):
        answers = refinement_answers if "Draft:" in text else draft_answers
        return f"#{k} \\boxed{{{answers[k]}}}"
    return script


def test_best_draft_goes_into_the_stage2_prompt_and_only_refinements_carry_loss():
    # drafts 0..3 answer 5, 7, 5, 7 for a problem whose answer is 7 → rewards [0, 1, 0, 1]; tie → first → draft #1
    generator = ScriptedGenerator(drafts_then_refinements(["5", "7", "5", "7"], ["7", "7", "3", "7"]))
    batch, metrics = run(generator, [Example("What is 3+4?", "7")], settings(4, 4))

    (stage1, n1), (stage2, n2) = generator.calls
    assert (n1, n2) == (4, 4)
    assert stage2 == ["<|im_start|>user\nWhat is 3+4?\n\nDraft:\n#1 \\boxed{7}<|im_end|>\n<|im_start|>assistant\n"]
    # Stage-2 rows: prompt (with the draft) has loss mask 0; only the refinement tokens have mask 1.
    prompt_len = len(TOKENIZER.encode(stage2[0], add_special_tokens=False))
    for row in range(4):
        completion_len = int(batch.attention_mask[row].sum()) - prompt_len
        assert batch.loss_mask[row, :prompt_len].sum() == 0
        assert batch.loss_mask[row].sum() == completion_len
    # Refinement rewards [1, 1, 0, 1]: mean 0.75, unbiased std 0.5 → advantages [0.5, 0.5, -1.5, 0.5]
    torch.testing.assert_close(batch.advantages, torch.tensor([0.5, 0.5, -1.5, 0.5]), atol=1e-5, rtol=0)
    assert metrics["reward/draft_mean"] == 0.5
    assert metrics["reward/best_draft_mean"] == 1.0
    assert metrics["reward/refinement_mean"] == 0.75
    assert metrics["reward/refinement_minus_best_draft"] == -0.25
    assert metrics["reward/accuracy/best_draft_predicted"] == pytest.approx(1 - 0.5 ** 4)  # 1 − (1 − p)^N, p = 0.5
    assert metrics["rollouts_per_prompt/total"] == 8.0


def test_all_wrong_drafts_still_condition_stage2_and_gen_logprobs_are_aligned():
    generator = ScriptedGenerator(drafts_then_refinements(["1", "2", "3", "4"], ["9", "9"]))
    batch, metrics = run(generator, [Example("Q?", "9")], settings(4, 2))
    assert "Draft:\n#0 \\boxed{1}" in generator.calls[1][0][0]  # best of all-zero rewards: the first
    assert metrics["reward/best_draft_mean"] == 0.0
    assert torch.equal(batch.gen_logprobs != 0, batch.loss_mask.bool())  # generator log-probs sit on completions
    torch.testing.assert_close(batch.advantages, torch.zeros(2))  # all refinements right: no signal


def test_grpo_is_the_same_rollout_without_drafts():
    generator = ScriptedGenerator(lambda text, k: f"\\boxed{{{k}}}")
    batch, metrics = run(generator, [Example("A?", "1"), Example("B?", "0")], settings(0, 4))
    assert len(generator.calls) == 1 and generator.calls[0][1] == 4  # one stage, on the plain prompts
    assert generator.calls[0][0][0] == "<|im_start|>user\nA?<|im_end|>\n<|im_start|>assistant\n"
    assert batch.group_ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert "reward/draft_mean" not in metrics
    # group 0 rewards [0,1,0,0]: mean .25, std .5 → [-.5, 1.5, -.5, -.5]
    torch.testing.assert_close(batch.advantages[:4], torch.tensor([-0.5, 1.5, -0.5, -0.5]), atol=1e-5, rtol=0)


def test_random_tie_break_picks_among_the_best_only():
    chosen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        generator = ScriptedGenerator(drafts_then_refinements(["7", "1", "7", "7"], ["7", "1"]))
        run(generator, [Example("Q?", "7")], settings(4, 2, tie_break="random"))
        chosen.add(generator.calls[1][0][0].split("Draft:\n#")[1][0])
    assert chosen <= {"0", "2", "3"} and len(chosen) > 1


def test_dynamic_sampling_refills_the_batch_with_informative_groups():
    # Problems whose answer is "0" get all-correct refinements (zero variance) and are dropped.
    generator = ScriptedGenerator(lambda text, k: f"\\boxed{{{k % 2}}}" if "X" in text else "\\boxed{0}")
    problems = [Example("A0?", "0"), Example("BX?", "1"), Example("C0?", "0"), Example("DX?", "1"),
                Example("EX?", "1")]
    batch, metrics = run(generator, problems, settings(0, 2, dynamic_sampling=True), num=2)
    # Each round draws only the groups still missing: A, B (A dropped) → C (dropped) → D; E is never drawn.
    assert metrics["sampling_rounds"] == 3.0
    assert [texts[0].split("user\n")[1][:2] for texts, _ in generator.calls] == ["A0", "C0", "DX"]
    assert batch.size == 4 and len(set(batch.group_ids.tolist())) == 2
    assert metrics["zero_variance_fraction"] == 0.5  # over everything sampled: A and C of A, B, C, D
    assert (batch.advantages != 0).all()


def test_dynamic_sampling_gives_up_with_a_clear_error():
    generator = ScriptedGenerator(lambda text, k: "\\boxed{0}")
    problems = [Example(f"P{i}?", "0") for i in range(10)]
    with pytest.raises(DynamicSamplingError, match="max_sampling_rounds"):
        run(generator, problems, settings(0, 2, dynamic_sampling=True, max_sampling_rounds=3), num=2)


def test_overlong_penalty_and_filter():
    # budget 24 tokens, buffer 8 (penalty from 16 on): 10 tokens → 0; 20 tokens → −4/8; cut at 24 → −1
    padding = {0: 0, 1: 10, 2: 20}

    def script(text, k):
        return "\\boxed{7}" + "x" * padding[k]  # + the end token: 10, 20 and 30 tokens

    class Truncating(ScriptedGenerator):
        def generate(self, prompts, params):
            groups = super().generate(prompts, params)
            for c in (c for group in groups for c in group if len(c.token_ids) > params.max_new_tokens):
                limit = params.max_new_tokens  # it did not stop by itself within the budget
                c.token_ids, c.logprobs, c.finish_reason = c.token_ids[:limit], c.logprobs[:limit], "length"
            return groups

    s = settings(0, 3, overlong_buffer=8, overlong_penalty=1.0, overlong_filter=True,
                 sampling=SamplingParams(max_new_tokens=24))
    batch, metrics = run(Truncating(script), [Example("Q?", "7")], s)
    # rewards 1 + [0, −0.5, −1] = [1, 0.5, 0]; mean 0.5, unbiased std 0.5 → advantages [1, 0, −1]
    torch.testing.assert_close(batch.advantages, torch.tensor([1.0, 0.0, -1.0]), atol=1e-5, rtol=0)
    assert metrics["reward/overlong"] == pytest.approx(-0.5)
    assert metrics["reward/accuracy"] == 1.0
    assert batch.loss_mask.sum(dim=1).tolist() == [10.0, 20.0, 0.0]  # the truncated sample carries no loss


class AccuracyPlusFormat:
    """The paper's reward shape: accuracy (boxed answer right) + format (always 1 here), so totals are in {1, 2}."""

    def __call__(self, completions, answers):
        accuracy = BoxedMatchReward()(completions, answers).scores
        return RewardOutput(scores=[a + 1.0 for a in accuracy],
                            components={"accuracy": list(accuracy), "format": [1.0] * len(accuracy)})


def run_with(reward, generator, problems, s):
    template = PromptBuilder(TOKENIZER, system_prompt=None, draft_header="Draft:")
    return collect_batch(lambda k: problems[:k], len(problems), generator, reward, template,
                         lambda ids: TOKENIZER.decode(ids, skip_special_tokens=True), s, TOKENIZER.pad_token_id)


def test_proposition_metrics_use_the_accuracy_component():
    """Drafts scored [2, 1, 2, 1] (accuracy [1, 0, 1, 0] + format 1): Proposition 3.1's p is 0.5 (not 1.5 clamped to
    1), predicting 1 − 0.5⁴ best-draft success; the total-reward metrics stay, under their own names."""
    generator = ScriptedGenerator(drafts_then_refinements(["7", "5", "7", "5"], ["7", "7", "3", "7"]))
    _, metrics = run_with(AccuracyPlusFormat(), generator, [Example("What is 3+4?", "7")], settings(4, 4))
    assert metrics["reward/accuracy/draft_mean"] == 0.5  # p
    assert metrics["reward/accuracy/best_draft_predicted"] == pytest.approx(1 - 0.5 ** 4)
    assert metrics["reward/accuracy/best_draft_mean"] == 1.0  # the selected draft is right
    assert metrics["reward/accuracy/any_draft_correct"] == 1.0  # best-of-N success
    assert metrics["reward/draft_mean"] == 1.5 and metrics["reward/best_draft_mean"] == 2.0  # total reward
    assert "reward/best_draft_predicted" not in metrics  # the prediction is only defined for the binary reward


class SometimesNaN:
    """Exact-match reward that returns NaN for completions answering 5 (a broken user reward)."""

    def __call__(self, completions, answers):
        scores = BoxedMatchReward()(completions, answers).scores
        return RewardOutput(scores=[float("nan") if "{5}" in c else s for c, s in zip(completions, scores)])


def test_non_finite_rewards_are_unscorable_in_both_stages():
    # drafts answer 5 (NaN), 5 (NaN), 3 (0), 7 (1): the best draft is #3, not the first NaN
    generator = ScriptedGenerator(drafts_then_refinements(["5", "5", "3", "7"], ["7", "5", "3", "7"]))
    batch, metrics = run_with(SometimesNaN(), generator, [Example("What is 3+4?", "7")], settings(4, 4))
    assert "Draft:\n#3 \\boxed{7}" in generator.calls[1][0][0]
    assert metrics["reward/count/non_finite"] == 3.0  # two drafts, one refinement
    # refinements [1, NaN, 0, 1]: the NaN row gets 0; the rest as the group [1, 0, 1] (mean 2/3, std √(1/3))
    std = (1 / 3) ** 0.5
    torch.testing.assert_close(batch.advantages, torch.tensor([1 / 3, 0.0, -2 / 3, 1 / 3]) / (std + 1e-6))
    assert metrics["reward/refinement_mean"] == pytest.approx(2 / 3)  # over the scorable samples
    assert metrics["reward/draft_mean"] == 0.5 and metrics["reward/best_draft_mean"] == 1.0
    assert metrics["zero_variance_fraction"] == 0.0
    assert all(math.isfinite(v) for v in metrics.values())


def test_random_draft_selection_conditions_stage2_on_any_draft():
    chosen = set()
    for seed in range(16):
        torch.manual_seed(seed)  # random selection draws from torch's global RNG, as random tie-breaks do
        generator = ScriptedGenerator(drafts_then_refinements(["7", "1", "1", "1"], ["7", "1"]))
        run(generator, [Example("Q?", "7")], settings(4, 2, draft_selection="random"))
        chosen.add(generator.calls[1][0][0].split("Draft:\n#")[1][0])
    assert chosen == {"0", "1", "2", "3"}  # the right draft and the wrong ones (best would always give #0)


def test_skip_solved_by_drafts_skips_stage2_for_problems_every_draft_solved():
    # Problems named "S" are solved by all 4 drafts; the others by drafts 0 and 2 only. Two problems are wanted.
    def script(text, k):
        if "Draft:" in text:
            return f"#{k} \\boxed{{1}}"  # every refinement right: the rows' content is not what is tested
        return "\\boxed{1}" if "S" in text.split("user\n")[1][:2] or k % 2 == 0 else "\\boxed{2}"

    problems = [Example("S1?", "1"), Example("A1?", "1"), Example("S2?", "1"), Example("S3?", "1"),
                Example("B1?", "1"), Example("C1?", "1")]
    generator = ScriptedGenerator(script)
    batch, metrics = run(generator, problems, settings(4, 2, skip_solved_by_drafts=True, max_sampling_rounds=3),
                         num=2)
    stage = [("Draft:" in texts[0], [t.split("user\n")[1][:2] for t in texts]) for texts, _ in generator.calls]
    # round 1 drafts S1, A1 and refines only A1; round 2 drafts S2 (skipped: no refinement call); round 3 is the
    # last allowed round, which refines whatever it drew (S3), so the batch is full. B1 and C1 are never drawn.
    assert stage == [(False, ["S1", "A1"]), (True, ["A1"]), (False, ["S2"]), (False, ["S3"]), (True, ["S3"])]
    assert metrics["rollout/skipped_solved"] == 2.0
    assert metrics["sampling_rounds"] == 3.0
    assert batch.size == 4 and batch.group_ids.tolist() == [0, 0, 1, 1]
    # the draft metrics cover the problems that reached Stage 2: A1 (2 of 4 right) and S3 (4 of 4)
    assert metrics["reward/accuracy/draft_mean"] == 0.75
    assert metrics["response_length/draft_mean"] == len("\\boxed{1}") + 1  # every draft: 9 characters + the end


def test_skip_solved_by_drafts_keeps_a_batch_of_unsolved_problems_whole():
    # Nothing solved by all drafts: one round, exactly as without the option (and the count is logged as 0).
    generator = ScriptedGenerator(drafts_then_refinements(["5", "7", "5", "7"], ["7", "3"]))
    batch, metrics = run(generator, [Example("Q?", "7")], settings(4, 2, skip_solved_by_drafts=True))
    plain_generator = ScriptedGenerator(drafts_then_refinements(["5", "7", "5", "7"], ["7", "3"]))
    plain, plain_metrics = run(plain_generator, [Example("Q?", "7")], settings(4, 2))
    assert metrics["rollout/skipped_solved"] == 0.0 and "rollout/skipped_solved" not in plain_metrics
    assert generator.calls == plain_generator.calls
    assert torch.equal(batch.input_ids, plain.input_ids) and torch.equal(batch.advantages, plain.advantages)


def test_skip_solved_by_drafts_is_off_by_default_and_needs_drafts():
    from nemo_igrpo.config import load_config
    from nemo_igrpo.errors import ConfigError

    assert load_config(None).algorithm.skip_solved_by_drafts is False  # the paper's method by default
    with pytest.raises(ConfigError, match="algorithm.skip_solved_by_drafts: needs Stage-1 drafts"):
        load_config(None, ["algorithm.preset=grpo", "algorithm.skip_solved_by_drafts=true"])
