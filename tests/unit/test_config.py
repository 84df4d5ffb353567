"""The config schema: every shipped YAML validates, bad keys/types/values are rejected by name."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from nemo_igrpo.algorithms.presets import PRESETS
from nemo_igrpo.config import REPLACED_MAPPINGS, Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
YAMLS = sorted((REPO / "conf").rglob("*.yaml"))


def test_conf_directory_has_configs():
    assert REPO / "conf" / "quickstart.yaml" in YAMLS


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_yaml_validates(path):
    config = load_config(path)
    assert isinstance(config, Config)


def _keys(node, prefix=""):
    keys = set()
    for key, value in node.items():
        keys.add(prefix + key)
        if isinstance(value, dict):
            keys |= _keys(value, f"{prefix}{key}.")
    return keys


def _schema_keys(cls, prefix=""):
    keys = set()
    for f in dataclasses.fields(cls):
        keys.add(prefix + f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            keys |= _schema_keys(type(default), f"{prefix}{f.name}.")
    return keys


def test_quickstart_lists_every_schema_key_with_a_comment():
    text = (REPO / "conf" / "quickstart.yaml").read_text()
    mappings = tuple(f"{key}." for key in REPLACED_MAPPINGS)  # reward.components, warm_start.draft_mix: values
    listed = {k for k in _keys(yaml.safe_load(text)) if not k.startswith(mappings)}
    assert listed == _schema_keys(Config)
    for line in text.splitlines():  # every key line says what it does
        if line.strip() and not line.lstrip().startswith("#"):
            assert "#" in line, f"uncommented key in quickstart.yaml: {line!r}"


def test_overrides_win_over_yaml_and_preset(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algorithm:\n  preset: dapo\n  eps_high: 0.3\ntrainer:\n  max_steps: 7\n")
    config = load_config(path, ["trainer.max_steps=20", "algorithm.num_drafts=4"])
    assert config.trainer.max_steps == 20  # command line beats YAML
    assert config.algorithm.eps_high == 0.3  # YAML beats preset (dapo: 0.28)
    assert config.algorithm.num_drafts == 4  # command line beats preset (dapo: 0)
    assert config.algorithm.loss_agg == "token-mean"  # from the preset
    assert config.algorithm.dynamic_sampling is True


def test_reward_components_are_replaced_not_merged(tmp_path):
    assert load_config(None).reward.components == {"math_verify": 1.0, "format": 1.0}  # the paper's
    path = tmp_path / "c.yaml"
    path.write_text("reward:\n  components: {boxed_match: 1.0}\n")
    assert load_config(path).reward.components == {"boxed_match": 1.0}
    both = load_config(path, ["reward.components={math_verify: 1.0, format: 0.5}"])
    assert both.reward.components == {"math_verify": 1.0, "format": 0.5}


def test_preset_on_the_command_line_replaces_the_yaml_algorithm():
    quickstart = REPO / "conf" / "quickstart.yaml"  # spells out every iGRPO key
    grpo = load_config(quickstart, ["algorithm.preset=grpo"]).algorithm
    assert (grpo.num_drafts, grpo.num_refinements) == (0, 8)
    gspo = load_config(quickstart, ["algorithm.preset=igrpo_gspo", "algorithm.eps_high=0.001"]).algorithm
    assert (gspo.num_drafts, gspo.policy_loss, gspo.eps_low, gspo.eps_high) == (4, "gspo", 3e-4, 0.001)


def test_a_later_preset_fully_replaces_an_earlier_one(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algorithm:\n  preset: dapo\n")
    igrpo = load_config(path, ["algorithm.preset=igrpo"]).algorithm
    assert (igrpo.num_drafts, igrpo.eps_high, igrpo.loss_agg, igrpo.dynamic_sampling) == (
        4, 0.2, "seq-mean-token-mean", False)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets(name):
    config = load_config(None, [f"algorithm.preset={name}"])
    n, g = config.algorithm.num_drafts, config.algorithm.num_refinements
    assert n + g == 8  # matched rollout budget: GRPO 8 vs iGRPO 4 + 4
    assert (n == 4) == name.startswith("igrpo")


def test_paper_defaults():
    config = load_config(None)
    assert config.optim.lr == 1e-6 and config.optim.min_lr_ratio == 0.1 and config.optim.warmup_ratio == 0.1
    assert config.generation.temperature == 0.7 and config.generation.max_new_tokens == 4096
    assert config.data.max_prompt_tokens == 1024 and config.trainer.prompts_per_step == 128
    assert config.algorithm.kl_coef == 0.0 and config.algorithm.loss_agg == "seq-mean-token-mean"
    assert (config.algorithm.num_drafts, config.algorithm.num_refinements) == (4, 4)
    assert (config.eval.temperature, config.eval.top_p) == (0.6, 0.95)


@pytest.mark.parametrize("overrides, message", [
    (["algorithm.num_draft=3"], "unknown key 'algorithm.num_draft' (did you mean 'algorithm.num_drafts'?)"),
    (["trainr.max_steps=3"], "unknown key 'trainr' (did you mean 'trainer'?)"),
    (["trainer.max_steps=abc"], "trainer.max_steps"),
    (["algorithm.loss_agg=token_mean"],
     "algorithm.loss_agg: unknown loss aggregation 'token_mean' (did you mean 'token-mean'?)"),
    (["algorithm.preset=dpo"], "command line: algorithm.preset: unknown algorithm preset 'dpo'"),
    (["algorithm.num_refinements=1"], "algorithm.num_refinements"),
    (["generation.temperature=0"], "generation.temperature"),
    (["algorithm.dual_clip=0.5"], "algorithm.dual_clip"),
    (["trainer.resume=/no/such/checkpoint"], "trainer.resume"),
    (["max_steps"], "must look like section.key=value"),
    (["reward.components={boxed_mach: 1.0}"], "reward.components: unknown reward 'boxed_mach' (did you mean"),
    (["eval.protocol=papr"],
     "eval.protocol: unknown evaluation protocol 'papr' (did you mean 'paper'?); registered: paper"),
    (["reward.overlong_buffer=5000"], "reward.overlong_buffer: must be below generation.max_new_tokens"),
])
def test_bad_overrides_are_rejected_by_name(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert message in str(error.value)


def test_wrong_type_in_yaml_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("trainer:\n  prompts_per_step: many\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: trainer\.prompts_per_step"):
        load_config(path)


def test_unknown_nested_key_in_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  tiny:\n    hiden_size: 64\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'model\.tiny\.hiden_size' "
                                          r"\(did you mean 'model\.tiny\.hidden_size'\?\)"):
        load_config(path)


def test_malformed_yaml_names_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("trainer:\n  max_steps: 3\n  seed: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml:\d+:\d+: malformed YAML"):
        load_config(path)


def test_section_must_be_a_mapping(tmp_path):
    path = tmp_path / "flat.yaml"
    path.write_text("trainer: 5\n")
    with pytest.raises(ConfigError, match="trainer: expected a mapping"):
        load_config(path)
