"""A run folder that loses or corrupts nothing (issue 26): RNG states without pickle, manifests of any shape, verified
explicit resumes, no mixing with an older run, one writer at a time, torn metrics, atomic exports, fsynced renames,
and a prompt stream that a resume refuses to change silently."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from nemo_igrpo import checkpoint, lifecycle, tracking
from nemo_igrpo.checkpoint import find_latest, load_checkpoint, save_checkpoint
from nemo_igrpo.data.dataset import Example, PromptSampler
from nemo_igrpo.errors import ConfigError
from nemo_igrpo.lifecycle import TrainState


def payload(value: float):
    def write(directory):
        (directory / "weights.bin").write_bytes(bytes([int(value)]) * 16)
    return write


def examples(n: int, tag: str = "") -> list[Example]:
    return [Example(f"{tag}{i} + 1 = ?", str(i + 1)) for i in range(n)]


class FakePolicy:
    def __init__(self):
        self.loaded = None

    def save(self, directory):
        (directory / "weights.bin").write_bytes(b"w" * 8)

    def load(self, directory):
        self.loaded = (directory / "weights.bin").read_bytes()

    def save_pretrained(self, directory):
        (directory / "model.safetensors").write_bytes(b"new")


class FakeTokenizer:
    def save_pretrained(self, directory):
        (directory / "tokenizer.json").write_text("{}")


class Cursor:
    def __init__(self, sampler):
        self.sampler = sampler

    def state_dict(self):
        return self.sampler.state_dict()


# ------------------------------------------------------------------------------------------------ RNG states (4)


def test_rng_states_are_stored_without_pickle_and_restored_exactly(tmp_path, monkeypatch):
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    path = save_checkpoint(tmp_path, 1, payload(1), {}, keep_last=2)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand()
    assert not list(path.glob("rng*.pt"))  # no pickle in the run folder
    json.loads((path / "rng.json").read_text())

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load called on a run-folder file")
    monkeypatch.setattr(torch, "load", no_unpickling)
    load_checkpoint(path, lambda d: None)
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


def test_a_pickled_rng_file_of_an_older_version_is_never_unpickled(tmp_path, monkeypatch, caplog):
    path = save_checkpoint(tmp_path, 1, payload(1), {}, keep_last=2)
    # an older checkpoint: rng.pt that runs code when unpickled (the manifest is rewritten to match it)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    (path / "rng.json").unlink(missing_ok=True)
    torch.save({"python": Evil()}, path / "rng.pt")
    (path / checkpoint.MANIFEST).write_text(json.dumps({k: v for k, v in checkpoint._manifest(path).items()
                                                        if k != checkpoint.MANIFEST}))
    load_checkpoint(path, lambda d: None)
    assert not marker.exists()
    assert "rng.pt" in caplog.text


# ------------------------------------------------------------------------------------------ manifests, resume (12)


@pytest.mark.parametrize("manifest", ["[]", '{"policy/weights.bin": 5}', '{"policy/weights.bin": [1]}', "null"])
def test_a_manifest_of_the_wrong_shape_is_a_damaged_checkpoint_not_a_crash(tmp_path, manifest):
    save_checkpoint(tmp_path, 1, payload(1), {}, keep_last=2)
    newest = save_checkpoint(tmp_path, 2, payload(2), {}, keep_last=2)
    (newest / checkpoint.MANIFEST).write_text(manifest)
    assert "manifest" in checkpoint.damage(newest)
    assert find_latest(tmp_path).name == "step_000001"


def test_an_explicit_resume_path_is_checksum_verified(tmp_path):
    path = save_checkpoint(tmp_path / "checkpoints", 1, payload(1), {}, keep_last=2)
    weights = path / "policy" / "weights.bin"
    weights.write_bytes(b"\x07" * 16)  # same size, other bytes
    with pytest.raises(ConfigError, match=r"trainer\.resume=.*does not match its checksum"):
        lifecycle.resume_path(str(path), tmp_path / "elsewhere")


# ------------------------------------------------------------------------------------- an older run in the folder (3)


def test_resume_none_in_a_folder_that_holds_a_run_is_refused(tmp_path):
    save_checkpoint(tmp_path / "checkpoints", 8, payload(1), {}, keep_last=2)
    with pytest.raises(ConfigError, match=r"trainer\.output_dir=.*step 8.*trainer\.resume=auto"):
        lifecycle.resume_path("none", tmp_path)
    assert lifecycle.resume_path("none", tmp_path / "fresh") is None


def test_an_explicit_resume_below_the_folders_newest_checkpoint_is_refused(tmp_path):
    old = save_checkpoint(tmp_path / "checkpoints", 2, payload(1), {}, keep_last=3)
    save_checkpoint(tmp_path / "checkpoints", 8, payload(1), {}, keep_last=3)
    with pytest.raises(ConfigError, match=r"trainer\.output_dir.*step 8"):
        lifecycle.resume_path(str(old), tmp_path)


# ---------------------------------------------------------------------------------------------- one writer (12)


def test_a_second_writer_of_the_same_folder_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path):
    with lifecycle.run_lock(tmp_path):
        holder = json.loads((tmp_path / lifecycle.LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        other = subprocess.run([sys.executable, "-c", "from pathlib import Path; from nemo_igrpo import lifecycle\n"
                                f"with lifecycle.run_lock(Path({str(tmp_path)!r})): pass"],
                               capture_output=True, text=True)
        assert other.returncode != 0
        assert f"pid {os.getpid()}" in other.stderr and "trainer.output_dir" in other.stderr
    assert not (tmp_path / lifecycle.LOCK_FILE).exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / lifecycle.LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with lifecycle.run_lock(tmp_path):  # its holder is gone: a SIGKILLed run must not block the next one
        assert json.loads((tmp_path / lifecycle.LOCK_FILE).read_text())["pid"] == os.getpid()


# ------------------------------------------------------------------------------------------ metrics.jsonl (5)


def test_a_torn_last_metrics_line_does_not_block_a_resume(tmp_path):
    lines = [json.dumps({"step": s, "loss": 0.5}) for s in range(4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "lo')
    tracking.MetricsLogger(tmp_path, [], resume_step=2)
    assert [r["step"] for r in tracking.read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2]


def test_the_metrics_rewrite_at_start_up_is_atomic(tmp_path, monkeypatch):
    text = "".join(json.dumps({"step": s}) + "\n" for s in range(4))
    (tmp_path / "metrics.jsonl").write_text(text)

    def crash(*args):
        raise OSError("killed here")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="killed here"):
        tracking.MetricsLogger(tmp_path, [], resume_step=1)
    assert (tmp_path / "metrics.jsonl").read_text() == text  # the old file is intact until the new one replaces it


# ---------------------------------------------------------------------------------------------- final/ (6)


def test_the_export_swaps_final_in_without_a_moment_of_loss(tmp_path, monkeypatch):
    final = tmp_path / "final"
    final.mkdir()
    (final / "model.safetensors").write_bytes(b"old")
    real = os.replace

    def crash_on_the_new_one(src, dst):
        if str(src).endswith(".tmp-final"):
            raise OSError("killed here")
        real(src, dst)
    monkeypatch.setattr(os, "replace", crash_on_the_new_one)
    with pytest.raises(OSError):
        lifecycle.export_final(final, FakePolicy(), FakeTokenizer(), step=4)
    assert (final / "model.safetensors").read_bytes() == b"old"
    monkeypatch.setattr(os, "replace", real)
    assert not lifecycle.final_is_current(final, 4)
    lifecycle.export_final(final, FakePolicy(), FakeTokenizer(), step=4)
    assert (final / "model.safetensors").read_bytes() == b"new" and lifecycle.final_is_current(final, 4)
    assert not lifecycle.final_is_current(final, 5)  # a longer resumed run must export again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


# ---------------------------------------------------------------------------------------------- fsync (12)


def test_directories_are_fsynced_after_a_rename(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)
    monkeypatch.setattr(os, "fsync", record)
    save_checkpoint(tmp_path / "checkpoints", 1, payload(1), {}, keep_last=2)
    assert str(tmp_path / "checkpoints") in synced
    synced.clear()
    lifecycle.export_final(tmp_path / "final", FakePolicy(), FakeTokenizer(), step=1)
    assert str(tmp_path) in synced


# ------------------------------------------------------------------------------------------ prompt stream (9)


@pytest.mark.parametrize("change, message", [
    (dict(seed=2), r"trainer\.seed: 1 → 2"),
    (dict(data=examples(20, "x")), r"training examples.*data\."),
    (dict(data=examples(19)), r"20 → 19 examples"),
])
def test_a_resume_that_changes_the_prompt_stream_is_refused_saying_what_changed(tmp_path, change, message):
    sampler = PromptSampler(examples(20), seed=1)
    sampler.next_batch(6)
    lifecycle.save_state(tmp_path, TrainState(step=3), FakePolicy(), Cursor(sampler), keep_last=2)
    other = PromptSampler(change.get("data", examples(20)), seed=change.get("seed", 1))
    with pytest.raises(ConfigError, match=message):
        lifecycle.restore_state(tmp_path / "step_000003", FakePolicy(), other)
    same = PromptSampler(examples(20), seed=1)
    assert lifecycle.restore_state(tmp_path / "step_000003", FakePolicy(), same).step == 3
    assert same.state_dict() == {"epoch": 0, "position": 6}


# ------------------------------------------------------------------------------- Megatron's dist checkpoints (4)


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_tampered_dist_checkpoint_metadata_runs_no_code(tmp_path):
    import pickle

    import torch.distributed.checkpoint as dcp

    from nemo_igrpo.policy.megatron.checkpoint import _read_dcp

    dcp.save({"decoder.final_layernorm.weight": torch.ones(4)}, checkpoint_id=str(tmp_path), no_dist=True)
    assert torch.equal(_read_dcp(tmp_path)["decoder.final_layernorm.weight"], torch.ones(4))
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_RunsCode(tmp_path / "pwned")))
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        _read_dcp(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_non_tensor_entries_of_a_dist_checkpoint_are_loaded_without_running_code(tmp_path):
    import torch.distributed.checkpoint as dcp

    from nemo_igrpo.policy.megatron.safe_load import no_code_unpickling

    dcp.save({"w": torch.ones(2), "extra": "step 3"}, checkpoint_id=str(tmp_path / "plain"), no_dist=True)
    state = {"w": torch.zeros(2), "extra": None}
    with no_code_unpickling():
        dcp.load(state, checkpoint_id=str(tmp_path / "plain"), no_dist=True)
    assert torch.equal(state["w"], torch.ones(2)) and state["extra"] == "step 3"
    dcp.save({"w": torch.ones(2), "extra": _RunsCode(tmp_path / "pwned")}, checkpoint_id=str(tmp_path / "evil"),
             no_dist=True)
    with no_code_unpickling(), pytest.raises(BaseException):  # CheckpointException (a BaseException) wrapping it
        dcp.load({"w": torch.zeros(2), "extra": None}, checkpoint_id=str(tmp_path / "evil"), no_dist=True)
    assert not (tmp_path / "pwned").exists()


def test_reading_metrics_leaves_out_a_torn_last_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "lo')
    assert [r["step"] for r in tracking.read_metrics(tmp_path / "metrics.jsonl")] == [0, 1]


# ---------------------------------------------------------------------------------- the warm-started base (1)


def test_a_resume_loads_the_stored_warm_started_base_bit_for_bit(tmp_path, caplog):
    from rich.console import Console

    from nemo_igrpo.config import load_config
    from nemo_igrpo.warm_start import BASE_DIR, BASE_FILE, warm_started_base

    config = load_config(overrides=[f"trainer.output_dir={tmp_path}", "warm_start.steps=3"])
    console = Console(quiet=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    calls = []

    def train():  # stands in for the warm start: moves the weights by something not reproducible from the seed
        calls.append(1)
        with torch.no_grad():
            model.weight.add_(torch.rand(3, 4, generator=torch.Generator().manual_seed(len(calls) * 7)))
    warm_started_base(config, model, fresh=True, console=console, train=train)
    warm = {k: v.clone() for k, v in model.state_dict().items()}

    resumed = torch.nn.Linear(4, 3)  # the untrained model a resumed run builds
    warm_started_base(config, resumed, fresh=False, console=console, train=lambda: calls.append("again"))
    assert calls == [1]  # not trained again
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in warm.items())

    stored = tmp_path / BASE_DIR / BASE_FILE
    stored.write_bytes(stored.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(RuntimeError, match="checksum"):
        warm_started_base(config, torch.nn.Linear(4, 3), fresh=False, console=console, train=lambda: None)

    import shutil
    shutil.rmtree(tmp_path / BASE_DIR)  # a run folder of an older version: warm start again, with a warning
    warm_started_base(config, torch.nn.Linear(4, 3), fresh=False, console=console, train=lambda: calls.append(2))
    assert calls == [1, 2] and "no stored warm-started weights" in caplog.text


def test_a_lock_whose_heartbeat_stopped_is_taken_over_even_from_another_host(tmp_path):
    lock = tmp_path / lifecycle.LOCK_FILE
    lock.write_text(json.dumps({"pid": 1, "host": "another-node"}))
    with pytest.raises(ConfigError, match="another-node"):
        with lifecycle.run_lock(tmp_path):
            pass
    stale = lock.stat().st_mtime - 3600
    os.utime(lock, (stale, stale))  # its holder stopped beating an hour ago (a lost node)
    with lifecycle.run_lock(tmp_path):
        assert json.loads(lock.read_text())["host"] == socket.gethostname()
