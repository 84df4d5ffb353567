"""Checkpoints are atomic, pruned after the new one is complete, and incomplete ones are never resumed."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from nemo_igrpo.checkpoint import CheckpointError, damage, find_latest, is_complete, load_checkpoint, save_checkpoint


def write_weights(value: float):
    def payload(directory):
        torch.save({"w": torch.full((2,), value)}, directory / "weights.pt")
    return payload


def test_save_then_load_restores_payload_state_and_rngs(tmp_path):
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    path = save_checkpoint(tmp_path, 7, write_weights(1.5), {"sampler": {"epoch": 1, "position": 4}}, keep_last=2)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5)  # move every RNG on
    random.random()
    np.random.rand()

    loaded = {}
    state = load_checkpoint(path, lambda d: loaded.update(torch.load(d / "weights.pt")))
    assert state == {"sampler": {"epoch": 1, "position": 4}, "step": 7}
    assert torch.equal(loaded["w"], torch.full((2,), 1.5))
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


def test_keep_last_prunes_only_older_complete_checkpoints(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, write_weights(step), {}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000003", "step_000004"]
    assert find_latest(tmp_path).name == "step_000004"


@pytest.mark.parametrize("damage", ["marker", "state", "garbage_state", "rng", "tmp_only"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    save_checkpoint(tmp_path, 1, write_weights(1), {}, keep_last=3)
    newest = save_checkpoint(tmp_path, 2, write_weights(2), {}, keep_last=3)
    if damage == "marker":
        (newest / "COMPLETE").unlink()
    elif damage == "state":
        (newest / "trainer_state.json").unlink()
    elif damage == "garbage_state":
        (newest / "trainer_state.json").write_bytes(b"\x00\xff{garbage")
    elif damage == "rng":
        (newest / "rng.json").unlink()
    else:  # a crash mid-write leaves only the temporary directory
        newest.rename(tmp_path / ".tmp-step_000002")
    assert not is_complete(newest)
    assert find_latest(tmp_path).name == "step_000001"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(newest, lambda d: None)


def test_a_failing_write_leaves_the_previous_checkpoint_intact(tmp_path):
    save_checkpoint(tmp_path, 1, write_weights(1), {}, keep_last=1)

    def broken(directory):
        (directory / "half").write_text("partial")
        raise OSError("No space left on device")

    with pytest.raises(CheckpointError, match="No space left on device. The previous checkpoint .*000001 is intact"):
        save_checkpoint(tmp_path, 2, broken, {}, keep_last=1)
    assert find_latest(tmp_path).name == "step_000001"
    assert not (tmp_path / "step_000002").exists() and not (tmp_path / ".tmp-step_000002").exists()


@pytest.mark.parametrize("how", ["truncated", "missing", "garbage"])
def test_damaged_payload_bytes_are_detected_and_skipped(tmp_path, how, caplog):
    save_checkpoint(tmp_path, 1, write_weights(1), {}, keep_last=3)
    newest = save_checkpoint(tmp_path, 2, write_weights(2), {}, keep_last=3)
    weights = newest / "policy" / "weights.pt"
    data = bytearray(weights.read_bytes())
    if how == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif how == "missing":
        weights.unlink()
    else:  # same size, one byte of tensor data flipped: loads without error, so only the checksum can tell
        data[-40] ^= 0xFF
        weights.write_bytes(bytes(data))
    expected = {"truncated": "weights.pt has", "missing": "weights.pt is missing",
                "garbage": "weights.pt does not match its checksum"}[how]
    assert expected in damage(newest)
    assert find_latest(tmp_path).name == "step_000001"
    assert "skipping damaged checkpoint" in caplog.text and "step_000002" in caplog.text
    if how == "garbage":
        assert is_complete(newest)  # the cheap check (sizes) passes; resume uses the verified one
        assert find_latest(tmp_path, verify=False).name == "step_000002"


def test_no_checkpoints(tmp_path):
    assert find_latest(tmp_path / "missing") is None
