"""Atomic writes keep their temporary file beside the target; one job per output folder: the lock's
refusal names the holder, a dead holder's lock is taken over."""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import tempfile

import pytest

from arpg.errors import SettingError
from arpg.files import LOCK_NAME, FolderLock, atomic_write, remove_partial_writes


def _hold(folder, ready, release) -> None:
    with FolderLock(folder, "training"):
        ready.set()
        release.wait(30)


def test_a_folder_held_by_another_process_is_refused_naming_it(tmp_path):
    context = multiprocessing.get_context("fork")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold, args=(tmp_path, ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(SettingError, match=rf"{re.escape(str(tmp_path))} is in use by process {holder.pid} "
                                               rf"on .* \(training, since .*\): one job per folder"):
            FolderLock(tmp_path, "FID sampling").acquire()
    finally:
        release.set()
        holder.join(30)
    with FolderLock(tmp_path, "FID sampling"):  # released with its holder
        assert f"process {os.getpid()} " in (tmp_path / LOCK_NAME).read_text()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, caplog):
    context = multiprocessing.get_context("fork")
    dead = context.Process(target=os._exit, args=(0,))
    dead.start()
    dead.join()
    # What a killed holder leaves: its record, no lock (the kernel drops it with the process).
    (tmp_path / LOCK_NAME).write_text(f"process {dead.pid} on somehost (training, since 2024-01-01 00:00:00)\n")
    with caplog.at_level(logging.WARNING), FolderLock(tmp_path, "training"):
        assert f"process {os.getpid()} " in (tmp_path / LOCK_NAME).read_text()
    assert f"taking over the lock of process {dead.pid} on somehost" in caplog.text


def test_remove_partial_writes_takes_only_temporaries_of_the_named_files(tmp_path):
    names = [".000001.png.a1b2c3d4.tmp", ".model.safetensors.x9y8z7w6.tmp", "000001.png", ".hidden", "notes.tmp"]
    for name in names:
        (tmp_path / name).write_text("x")
    assert [p.name for p in remove_partial_writes(tmp_path, "*.png")] == [".000001.png.a1b2c3d4.tmp"]
    assert [p.name for p in remove_partial_writes(tmp_path)] == [".model.safetensors.x9y8z7w6.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "000001.png", "notes.tmp"]


@pytest.fixture()
def system_temp(tmp_path, monkeypatch):
    """An empty folder standing in for the system's temporary folder (where tempfile puts files by default)."""
    folder = tmp_path / "system_tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_atomic_write_keeps_its_temporary_file_beside_the_target(tmp_path, system_temp):
    # Beside it, so that the rename stays on one filesystem and cleanup finds what a killed write left.
    target = tmp_path / "out" / "model.safetensors"
    during = []

    def write(tmp):
        during.append((tmp, sorted(p.name for p in target.parent.iterdir()), list(system_temp.iterdir())))
        tmp.write_bytes(b"weights")

    assert atomic_write(target, write) == target
    ((tmp, listing, elsewhere),) = during
    assert tmp.parent == target.parent and re.fullmatch(r"\.model\.safetensors\.[^/]+\.tmp", tmp.name)
    assert listing == [tmp.name] and elsewhere == []
    assert target.read_bytes() == b"weights" and [p.name for p in target.parent.iterdir()] == ["model.safetensors"]


def test_a_write_killed_midway_leaves_only_what_remove_partial_writes_removes(tmp_path, system_temp):
    target = tmp_path / "step_0000004.pt"

    def killed_while_writing(tmp):
        tmp.write_bytes(b"half a checkpoint")
        os._exit(0)  # no cleanup runs, as under SIGKILL

    pid = os.fork()
    if pid == 0:
        try:
            atomic_write(target, killed_while_writing)
        finally:
            os._exit(1)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert not target.exists() and list(system_temp.iterdir()) == []
    (leftover,) = tmp_path.glob(".step_0000004.pt.*.tmp")
    assert leftover.read_bytes() == b"half a checkpoint"
    assert remove_partial_writes(tmp_path, "*.pt") == [leftover]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["system_tmp"]
