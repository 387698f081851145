"""Checkpoint checksums: a flipped byte in any file of a saved checkpoint (real DCP files and meta.pt) is reported by
file name; resume takes the newest intact checkpoint only when asked to fall back."""
import logging

import pytest
import torch

from soflow_fast import checkpoint as ckpt_io
from soflow_fast.integrity import CHECKSUMS, ChecksumError, resume_checkpoint, verify_checksums, write_checksums


def save(run_dir, step, checksums=True):
    directory = ckpt_io.checkpoint_dir(run_dir, step)
    state = {"model": {"w": torch.full((64, 64), float(step)), "b": torch.arange(7.0)}}
    ckpt_io.save_training_checkpoint(directory, state, {"step": step}, is_main=True)  # writes CHECKSUMS.json
    if not checksums:  # a checkpoint written before checksums existed
        (directory / CHECKSUMS).unlink()
    return directory


def test_save_writes_checksums_that_match(tmp_path):
    directory = save(tmp_path, 3)
    before = (directory / CHECKSUMS).read_text()
    write_checksums(directory)
    assert (directory / CHECKSUMS).read_text() == before


def flip_byte(path, offset=None):
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def files_of(directory):
    return sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != CHECKSUMS)


def shard_of(directory):
    return next(n for n in files_of(directory) if n.endswith(".distcp"))


@pytest.fixture
def run(tmp_path):
    for step in (1, 2):
        save(tmp_path, step)
    return tmp_path


def test_intact_checkpoint_verifies(run):
    newest = ckpt_io.checkpoint_dir(run, 2)
    assert len(files_of(newest)) >= 3  # .metadata, the shard file(s), meta.pt: all covered
    assert verify_checksums(newest) is True
    assert resume_checkpoint(run) == newest


@pytest.mark.parametrize("victim", ["meta.pt", ".metadata", "shard"])
def test_flipped_byte_is_named(run, victim):
    newest = ckpt_io.checkpoint_dir(run, 2)
    name = shard_of(newest) if victim == "shard" else victim
    flip_byte(newest / name)
    with pytest.raises(ChecksumError, match=rf"checkpoint .*step_00000002: file {name} is damaged \(its SHA-256"):
        verify_checksums(newest)
    with pytest.raises(ChecksumError, match=rf"file {name} is damaged.*resume_fallback: true"):
        resume_checkpoint(run)


def test_fallback_takes_the_previous_checkpoint_and_names_the_damaged_file(run, caplog):
    newest = ckpt_io.checkpoint_dir(run, 2)
    shard = shard_of(newest)
    flip_byte(newest / shard)
    with caplog.at_level(logging.WARNING, logger="soflow_fast"):
        assert resume_checkpoint(run, fallback=True) == ckpt_io.checkpoint_dir(run, 1)
    assert f"step_00000002: file {shard} is damaged" in caplog.text


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(run):
    for step in (1, 2):
        flip_byte(ckpt_io.checkpoint_dir(run, step) / "meta.pt")
    with pytest.raises(ChecksumError, match="every checkpoint is damaged"):
        resume_checkpoint(run, fallback=True)


def test_truncated_and_missing_files(run):
    newest = ckpt_io.checkpoint_dir(run, 2)
    (newest / "meta.pt").write_bytes((newest / "meta.pt").read_bytes()[:-1])
    with pytest.raises(ChecksumError, match=r"file meta.pt is damaged \(\d+ bytes"):
        verify_checksums(newest)
    (newest / "meta.pt").unlink()
    with pytest.raises(ChecksumError, match="file meta.pt is missing"):
        verify_checksums(newest)


def test_damaged_record(run):
    newest = ckpt_io.checkpoint_dir(run, 2)
    flip_byte(newest / CHECKSUMS, offset=0)
    with pytest.raises(ChecksumError, match=f"{CHECKSUMS} is damaged"):
        verify_checksums(newest)


def test_checkpoint_without_checksums_loads_unverified(tmp_path, caplog):
    old = save(tmp_path, 5, checksums=False)
    assert verify_checksums(old) is False
    with caplog.at_level(logging.WARNING, logger="soflow_fast"):
        assert resume_checkpoint(tmp_path) == old
    assert "loading it unverified" in caplog.text


def test_no_checkpoints(tmp_path):
    assert resume_checkpoint(tmp_path) is None


def test_flipped_byte_loads_silently_without_checksums(run):
    """Why checksums: DCP itself loads a checkpoint whose tensor bytes were changed, with a wrong value, no error."""
    newest = ckpt_io.checkpoint_dir(run, 2)
    shard = shard_of(newest)
    at = (newest / shard).read_bytes().find(torch.tensor([2.0]).numpy().tobytes())  # a float of "w" (all 2.0)
    flip_byte(newest / shard, offset=at + 1)
    state = {"model": {"w": torch.empty(64, 64), "b": torch.empty(7)}}
    ckpt_io.load_training_state(newest, state)
    assert (state["model"]["w"] != 2.0).sum() == 1
