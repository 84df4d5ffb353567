"""Named fault-injection points: where the fault drills (``scripts/fault_drills.py``) break a run on purpose.

The training code calls ``faults.point("checkpoint.before_rename", step=..., path=...)`` at each place a drill
needs; every point is declared in ``POINTS`` below with a line saying where it is. Nothing is armed by default,
and then a point costs one truthiness test of a dict. A drill arms a point with an action:

- in the process itself: ``faults.arm("checkpoint.before_rename", "kill", when={"step": 4})``, or
  ``with faults.armed(...):`` (an action is a built-in name, see ``ACTIONS``, or a callable ``fn(value, context)``);
- in a child process, a torchrun rank or a grading worker (they inherit the environment), through
  ``NEMO_IGRPO_FAULTS``, read when this module is imported::

      NEMO_IGRPO_FAULTS="checkpoint.before_rename=kill@2; loss.computed=nan,step=3,times=all"

  Entries are separated by ``;``; each is ``POINT=ACTION[:ARG][@AFTER][,KEY=VALUE...]``. ``@AFTER`` lets that many
  matching hits pass first; ``times=K`` (default 1; ``all``: no limit) fires K times; ``claim=PATH`` fires only in
  the process that atomically renames ``PATH`` to ``PATH.taken`` (one item of one worker, when a drill creates
  the file); any other key is a context value that must match (``step=3``, ``stage=draft``, ``rank=1``).

Context: what the call site passes, plus ``step`` (the last step a point reported, once anything is armed) and
``rank`` (``$RANK``, default 0). A point may carry a value (``loss = faults.point("loss.computed", loss)``): the
action's return value replaces it (``None`` keeps it). Unknown point or action names raise ``ConfigError`` naming
the known ones, so a drill cannot silently arm a point that no longer exists; ``tests/integration/test_faults.py``
checks that every declared point is called somewhere in the package.

This module imports nothing from the package but ``errors`` (any layer may call it, even a grading worker).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from nemo_igrpo.errors import ConfigError

ENV = "NEMO_IGRPO_FAULTS"

# Every injection point, with where it is. Call sites pass the name as a string literal (the test reads them).
POINTS: dict[str, str] = {
    "train.step": "trainer loop: a training step begins (before its rollout); context: step",
    "train.updated": "trainer: the step's optimizer update(s) are done, before the weight sync",
    "rollout.generate": "rollout: before the generation call of a sampling round (drafts and refinements)",
    "rollout.reward": "rollout: before the reward scores completions; value: their texts; context: stage",
    "rollout.rewarded": "rollout: after the reward scored completions; context: stage (draft | refinement)",
    "loss.computed": "loss function (both policy backends): a micro-batch's loss, before its backward; value: loss",
    "policy.gradients": "the shared optimizer step (both policy backends): the step's gradients are accumulated, "
                        "before the non-finite check, clipping and the optimizer step",
    "checkpoint.begin": "checkpoint: a save starts (nothing written yet); context: step, path",
    "checkpoint.before_rename": "checkpoint: every file written and fsynced in the temporary directory, before "
                                "the rename makes it visible; context: step, path",
    "checkpoint.before_prune": "checkpoint: renamed into place, before checkpoints beyond keep_last are deleted; "
                               "context: step, path",
    "export.before_swap": "final export: the new final/ written beside the old one, before they are swapped; "
                          "context: step, path",
    "reward.grade_item": "grading-pool worker process: before it grades one item (arm it through the environment)",
    "weights.bucket": "server weight sync (shm): before a bucket of weights is written to /dev/shm and loaded by "
                      "the server; context: bucket (0, 1, ...)",
}


class FaultInjected(RuntimeError):
    """Raised by the ``raise`` action."""


Action = Callable[[Any, dict], Any]


def _raise(value: Any, context: dict) -> Any:
    raise FaultInjected(f"fault injected at {context['point']}")


def _signal(signum: int) -> Action:
    def send(value: Any, context: dict) -> Any:
        os.kill(os.getpid(), signum)
        return value

    return send


def _hang(value: Any, context: dict) -> Any:
    while True:  # until killed, e.g. by the grading pool's deadline
        time.sleep(3600)


def _nan(value: Any, context: dict) -> Any:
    return value * float("nan")  # a tensor keeps its graph: the loss and its gradients become NaN


_poison_grad = None


def _nan_grad(value: Any, context: dict) -> Any:
    """The value unchanged, but NaN gradients flowing back through it (a finite loss with non-finite gradients)."""
    global _poison_grad
    if _poison_grad is None:
        import torch  # only when a drill asks for it: this module stays import-free

        class PoisonGrad(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x.clone()

            @staticmethod
            def backward(ctx, grad):
                return grad * float("nan")

        _poison_grad = PoisonGrad
    return _poison_grad.apply(value)


def _sleep(seconds: str) -> Action:
    def sleep(value: Any, context: dict) -> Any:
        time.sleep(float(seconds))
        return value

    return sleep


def _exit(code: str) -> Action:
    def exit_now(value: Any, context: dict) -> Any:
        os._exit(int(code))

    return exit_now


def _fsize(limit: str) -> Action:
    def limit_file_size(value: Any, context: dict) -> Any:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG, like ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), resource.RLIM_INFINITY))
        return value

    return limit_file_size


# Built-in actions: name -> (description, action or factory taking the ":ARG" string).
ACTIONS: dict[str, tuple[str, Any]] = {
    "raise": ("raise FaultInjected", _raise),
    "kill": ("SIGKILL this process", _signal(signal.SIGKILL)),
    "term": ("SIGTERM this process (the trainer checkpoints and stops after the step)", _signal(signal.SIGTERM)),
    "hang": ("sleep forever", _hang),
    "nan": ("multiply the value (a loss) by NaN", _nan),
    "nan_grad": ("keep the value (a tensor), make the gradients flowing back through it NaN", _nan_grad),
    "sleep:S": ("sleep S seconds", _sleep),
    "exit:CODE": ("end the process at once with status CODE (os._exit)", _exit),
    "fsize:BYTES": ("limit file writes to BYTES (later writes fail with EFBIG, as on a full disk)", _fsize),
}


def action(spec: str | Action) -> Action:
    """A built-in action by name (``"kill"``, ``"sleep:0.5"``), or the callable itself."""
    if callable(spec):
        return spec
    name, _, arg = str(spec).partition(":")
    for key, (_, fn) in ACTIONS.items():
        base, _, takes = key.partition(":")
        if base == name and bool(takes) == bool(arg):
            return fn(arg) if takes else fn
    raise ConfigError(f"unknown fault action {spec!r}; known: {', '.join(ACTIONS)}")


@dataclass
class Arm:
    """One armed fault; ``hits`` counts matching hits, ``fired`` how often the action ran."""

    point: str
    action: Action
    after: int = 0
    times: int | None = 1
    when: dict[str, Any] = field(default_factory=dict)
    claim: str | None = None
    hits: int = 0
    fired: int = 0


_ARMED: dict[str, list[Arm]] = {}
_LOCK = threading.Lock()
_AMBIENT: dict[str, Any] = {}


def point(name: str, value: Any = None, /, **context: Any) -> Any:
    """An injection point: returns ``value``, or what an armed action replaced it with."""
    if not _ARMED:
        return value
    return _fire(name, value, context)


def _fire(name: str, value: Any, context: dict) -> Any:
    due = []
    with _LOCK:
        if "step" in context:
            _AMBIENT["step"] = context["step"]
        context = {"rank": int(os.environ.get("RANK", "0")), **_AMBIENT, **context, "point": name}
        for arm in list(_ARMED.get(name, ())):
            if any(str(context.get(key)) != str(expected) for key, expected in arm.when.items()):
                continue
            arm.hits += 1
            if arm.hits <= arm.after or (arm.claim is not None and not _claim(arm.claim)):
                continue
            arm.fired += 1
            if arm.times is not None and arm.fired >= arm.times:
                _remove(arm)
            due.append(arm)
    for arm in due:  # outside the lock: an action may arm or disarm points, or never return
        result = arm.action(value, context)
        if result is not None:
            value = result
    return value


def _claim(path: str) -> bool:
    try:
        os.rename(path, path + ".taken")  # atomic: of all processes that try, exactly one succeeds
    except OSError:
        return False
    return True


def _remove(arm: Arm) -> None:
    arms = _ARMED.get(arm.point, [])
    if arm in arms:
        arms.remove(arm)
    if not arms:
        _ARMED.pop(arm.point, None)


def _check_point(name: str, where: str = "") -> None:
    if name not in POINTS:
        raise ConfigError(f"{where}unknown fault point {name!r}; known points: {', '.join(POINTS)}")


def _check(name: str, after: int, times: int | None, where: str = "") -> None:
    _check_point(name, where)
    if after < 0 or (times is not None and times < 1):
        raise ConfigError(f"{where}fault at {name!r}: after must be >= 0 and times >= 1 (or None), got {after}, "
                          f"{times}")


def arm(name: str, fault: str | Action, *, after: int = 0, times: int | None = 1, when: dict | None = None,
        claim: str | None = None) -> Arm:
    """Arm point ``name``: after ``after`` matching hits, run ``fault`` on the next ``times`` ones (None: all)."""
    _check(name, after, times)
    armed_fault = Arm(name, action(fault), after, times, dict(when or {}), claim)
    with _LOCK:
        _ARMED.setdefault(name, []).append(armed_fault)
    return armed_fault


def disarm(target: str | Arm | None = None) -> None:
    """Disarm one arm, every arm of a point, or (no argument) everything."""
    with _LOCK:
        if target is None:
            _ARMED.clear()
            _AMBIENT.clear()
        elif isinstance(target, Arm):
            _remove(target)
        else:
            _check_point(target)
            _ARMED.pop(target, None)


@contextmanager
def armed(name: str, fault: str | Action, **options: Any) -> Iterator[Arm]:
    """``with faults.armed("loss.computed", "nan", times=None) as arm: ...``; disarmed on exit."""
    handle = arm(name, fault, **options)
    try:
        yield handle
    finally:
        disarm(handle)


def parse(spec: str) -> list[Arm]:
    """Arm every entry of a ``NEMO_IGRPO_FAULTS`` string (see the module docstring); returns the arms."""
    entries = [entry.strip() for entry in spec.split(";") if entry.strip()]
    parsed = []
    for entry in entries:
        where = f"{ENV} entry {entry!r}: "
        name, eq, rest = entry.partition("=")
        if not eq or not rest:
            raise ConfigError(f"{where}expected POINT=ACTION[@AFTER][,KEY=VALUE...]")
        _check_point(name.strip(), where)
        head, *options = rest.split(",")
        fault, _, after = head.strip().partition("@")
        settings: dict[str, Any] = {"after": 0, "times": 1, "when": {}, "claim": None}
        try:
            settings["after"] = int(after) if after else 0
            for option in options:
                key, eq, value = (part.strip() for part in option.partition("="))
                if not eq or not key:
                    raise ValueError(f"option {option!r} is not KEY=VALUE")
                if key == "times":
                    settings["times"] = None if value == "all" else int(value)
                elif key == "claim":
                    settings["claim"] = value
                else:
                    settings["when"][key] = value
        except ValueError as error:
            raise ConfigError(f"{where}{error}") from None
        try:
            fn = action(fault)
        except ConfigError as error:
            raise ConfigError(f"{where}{error}") from None
        _check(name.strip(), settings["after"], settings["times"], where)
        parsed.append((name.strip(), fn, settings))
    # Validate every entry before arming any, so a bad spec arms nothing.
    return [arm(name, fn, **settings) for name, fn, settings in parsed]


if os.environ.get(ENV, "").strip():
    parse(os.environ[ENV])
