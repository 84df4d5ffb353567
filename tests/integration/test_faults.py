"""The fault-injection registry (nemo_igrpo.faults): inert by default, armed by API or environment, and every
declared point really called by the package (so a refactor cannot silently drop what a drill breaks)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nemo_igrpo import faults
from nemo_igrpo.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "nemo_igrpo"


@pytest.fixture(autouse=True)
def disarmed():
    faults.disarm()
    yield
    faults.disarm()


def test_an_unarmed_point_returns_its_value_without_looking_further(monkeypatch):
    value = object()
    monkeypatch.setattr(faults, "_fire", lambda *a: pytest.fail("an unarmed point must not reach _fire"))
    assert faults.point("loss.computed", value) is value
    assert faults.point("train.step", step=3) is None


def test_after_lets_that_many_hits_pass_then_fires_times_times_and_disarms():
    fired = []
    arm = faults.arm("train.step", lambda value, context: fired.append(context["step"]), after=2, times=2)
    for step in range(1, 7):
        faults.point("train.step", step=step)
    assert fired == [3, 4]  # hits 1 and 2 pass, hits 3 and 4 fire, then the arm is gone
    assert (arm.hits, arm.fired) == (4, 2)
    assert "train.step" not in faults._ARMED


def test_times_none_fires_on_every_hit_and_when_matches_context_and_the_ambient_step():
    seen = []
    faults.arm("loss.computed", lambda value, context: seen.append((context["step"], value)), times=None,
               when={"step": 2})
    for step in (1, 2, 3):
        faults.point("train.step", step=step)  # loss.computed carries no step: it is the last one reported
        faults.point("loss.computed", 10 * step)
        faults.point("loss.computed", 10 * step + 1)
    assert seen == [(2, 20), (2, 21)]


def test_an_action_replaces_the_value_and_none_keeps_it():
    faults.arm("rollout.reward", lambda texts, context: ["\\boxed{7}", *texts[1:]], when={"stage": "draft"})
    assert faults.point("rollout.reward", ["a", "b"], stage="refinement") == ["a", "b"]
    assert faults.point("rollout.reward", ["a", "b"], stage="draft") == ["\\boxed{7}", "b"]
    faults.arm("rollout.reward", lambda texts, context: None)
    assert faults.point("rollout.reward", ["a"], stage="draft") == ["a"]


def test_raise_and_the_context_manager_disarm_on_exit():
    with faults.armed("checkpoint.before_rename", "raise", when={"step": 4}) as arm:
        faults.point("checkpoint.before_rename", step=2, path="x")
        with pytest.raises(faults.FaultInjected, match="checkpoint.before_rename"):
            faults.point("checkpoint.before_rename", step=4, path="x")
        assert arm.fired == 1
    faults.arm("checkpoint.begin", "raise")
    with faults.armed("checkpoint.before_prune", "raise"):
        pass
    assert set(faults._ARMED) == {"checkpoint.begin"}  # only the context manager's own arm was removed


def test_unknown_points_and_actions_are_refused_naming_the_known_ones():
    known = r"known points: train\.step, .*checkpoint\.before_rename"
    with pytest.raises(ConfigError, match=r"unknown fault point 'checkpoint\.before_renmae'; " + known):
        faults.arm("checkpoint.before_renmae", "kill")
    with pytest.raises(ConfigError, match=r"unknown fault action 'explode'.*kill.*sleep:S"):
        faults.arm("train.step", "explode")
    with pytest.raises(ConfigError, match="times >= 1"):
        faults.arm("train.step", "raise", times=0)
    assert not faults._ARMED


def test_environment_syntax_arms_after_times_context_and_sleep():
    arms = faults.parse(" checkpoint.before_rename=raise@2 ; loss.computed=nan,step=3,times=all;"
                        "train.updated=sleep:0,rank=0")
    assert [(a.point, a.after, a.times, a.when) for a in arms] == [
        ("checkpoint.before_rename", 2, 1, {}), ("loss.computed", 0, None, {"step": "3"}),
        ("train.updated", 0, 1, {"rank": "0"})]
    faults.point("checkpoint.before_rename", step=1)
    faults.point("checkpoint.before_rename", step=2)
    with pytest.raises(faults.FaultInjected):
        faults.point("checkpoint.before_rename", step=3)
    faults.point("train.step", step=3)
    assert torch.isnan(faults.point("loss.computed", torch.tensor(1.0)))
    faults.point("train.updated")
    assert arms[2].fired == 1


@pytest.mark.parametrize("spec, message", [
    ("train.stp=kill", r"unknown fault point 'train\.stp'; known points: train\.step"),
    ("train.step=kill@x", "invalid literal"),
    ("train.step=kill,times", "is not KEY=VALUE"),
    ("train.step", "expected POINT=ACTION"),
    ("train.step=sleep", "unknown fault action 'sleep'"),
    ("train.step=kill,times=0", "times >= 1"),
])
def test_a_bad_environment_entry_names_itself_and_arms_nothing(spec, message):
    with pytest.raises(ConfigError, match=message) as caught:
        faults.parse(f"checkpoint.begin=raise;{spec}")
    assert f"{faults.ENV} entry" in str(caught.value)
    assert not faults._ARMED  # the valid first entry was not armed either


def test_a_claim_file_lets_exactly_one_arm_fire(tmp_path):
    flag = tmp_path / "grader.flag"
    fired = []
    for worker in range(3):  # stand-ins for grading workers, each with its own arm
        faults.arm("reward.grade_item", lambda v, c, worker=worker: fired.append(worker), claim=str(flag),
                   times=None)
    faults.point("reward.grade_item")
    assert fired == []  # no flag yet: nothing fires
    flag.write_text("")
    faults.point("reward.grade_item")
    faults.point("reward.grade_item")
    assert fired == [0] and (tmp_path / "grader.flag.taken").exists()


def test_nan_poisons_loss_and_gradient_nan_grad_only_the_gradient():
    weight = torch.tensor([1.0, 2.0], requires_grad=True)
    loss = faults.action("nan")((weight * 3).sum(), {})
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(weight.grad).all()
    weight.grad = None
    loss = faults.action("nan_grad")((weight * 3).sum(), {})
    loss.backward()
    assert loss.item() == 9.0 and torch.isnan(weight.grad).all()


def _python(code: str, spec: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, faults.ENV: spec}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)


def test_the_environment_arms_a_fresh_process_at_import(tmp_path):
    code = ("from nemo_igrpo import faults\n"
            "for step in (1, 2, 3):\n"
            "    faults.point('train.step', step=step)\n"
            "    print(step, flush=True)\n")
    done = _python(code, "train.step=exit:7,step=2", tmp_path)
    assert done.returncode == 7 and done.stdout.split() == ["1"]
    bad = _python(code, "train.stpe=kill", tmp_path)
    assert bad.returncode != 0 and "unknown fault point 'train.stpe'" in bad.stderr


def test_fsize_makes_later_writes_fail_as_on_a_full_disk(tmp_path):
    code = ("import errno\nfrom nemo_igrpo import faults\n"
            "faults.point('checkpoint.begin', step=1)\n"
            "try:\n    with open('big', 'wb') as f:\n        f.write(b'x' * 8192)\n"
            "except OSError as e:\n    print('EFBIG' if e.errno == errno.EFBIG else e)\n")
    done = _python(code, "checkpoint.begin=fsize:4096", tmp_path)
    assert done.stdout.strip() == "EFBIG", done.stderr


def _point_calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "point" and isinstance(node.func.value, ast.Name) and node.func.value.id == "faults"]


def test_every_declared_point_is_called_in_the_package_and_every_call_names_a_declared_point():
    called: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for call in _point_calls(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(REPO)}:{call.lineno}"
            name = call.args[0] if call.args else None
            assert isinstance(name, ast.Constant) and isinstance(name.value, str), f"{where}: name is not a literal"
            assert name.value in faults.POINTS, f"{where}: {name.value!r} is not declared in faults.POINTS"
            called.setdefault(name.value, []).append(where)
    never = sorted(set(faults.POINTS) - set(called))
    assert not never, f"declared fault points that no code calls (a call site was renamed or removed?): {never}"


def test_docs_list_every_point_and_action():
    docs = (REPO / "docs" / "reliability.md").read_text()
    assert [name for name in faults.POINTS if f"| `{name}` |" not in docs] == []
    assert [name for name in faults.ACTIONS if f"`{name}`" not in docs] == []


def test_the_fault_drills_patch_nothing_and_arm_only_declared_points():
    script = REPO / "scripts" / "fault_drills.py"
    tree = ast.parse(script.read_text())
    imported = {(alias.asname or alias.name).split(".")[0] for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id != "setattr", f"fault_drills.py:{node.lineno} patches with setattr"
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for target in targets:
            base = target
            while isinstance(base, ast.Attribute):
                base = base.value
            # module.function = wrapper (or module.Class.method = ...): a monkey-patch of something imported
            assert not (target is not base and isinstance(base, ast.Name) and base.id in imported), (
                f"fault_drills.py:{node.lineno} assigns {ast.unparse(target)}")
    armed = {node.args[0].value for node in ast.walk(tree) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute) and node.func.attr in ("arm", "armed")
             and node.args and isinstance(node.args[0], ast.Constant)}
    assert armed and armed <= set(faults.POINTS), armed - set(faults.POINTS)


@pytest.mark.slow
def test_a_training_run_reaches_every_point_at_the_expected_steps(tmp_path):
    """What the drills rely on: each point fires in the phase and at the step the docs say (2 steps, a checkpoint
    after each). reward.grade_item runs in grading workers, which this reward does not use (the drill covers it)."""
    from nemo_igrpo.config import load_config
    from nemo_igrpo.trainer import train

    config = load_config(REPO / "conf" / "quickstart.yaml", [
        "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "model.tiny.num_layers=2",
        "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1", "data.arithmetic.num_train=200",
        "data.arithmetic.num_heldout=16", "data.arithmetic.max_operand=9", "warm_start.steps=0",
        "trainer.prompts_per_step=4", "generation.max_new_tokens=12", "trainer.progress=false", "trainer.loggers=[]",
        "policy.micro_batch_size=8", "trainer.max_steps=2", "trainer.save_every=1", "trainer.keep_last=1",
        "trainer.eval_every=0", f"trainer.output_dir={tmp_path / 'run'}"])
    seen: dict[str, list[tuple]] = {name: [] for name in faults.POINTS}
    for name in faults.POINTS:
        faults.arm(name, lambda value, context: seen[context["point"]].append(
            (context.get("step"), context.get("stage"))), times=None)
    result = train(config)
    assert result.step == 2
    per_step = [(1, None), (2, None)]
    epochs = config.algorithm.ppo_epochs
    assert seen["train.step"] == per_step
    assert seen["train.updated"] == per_step
    assert seen["policy.gradients"] == [(1, None)] * epochs + [(2, None)] * epochs
    for name in ("checkpoint.begin", "checkpoint.before_rename", "checkpoint.before_prune"):
        assert seen[name] == per_step, name
    assert {step for step, _ in seen["rollout.generate"]} == {1, 2}
    assert {step for step, _ in seen["loss.computed"]} == {1, 2}
    stages = {"draft", "refinement"} if config.algorithm.num_drafts else {"refinement"}
    for name in ("rollout.reward", "rollout.rewarded"):
        assert set(seen[name]) == {(step, stage) for step in (1, 2) for stage in stages}, name
    assert seen["reward.grade_item"] == []
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_000002"]  # pruned after the hook
