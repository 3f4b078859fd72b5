"""One job per output folder: the lock's refusal names the holder, a dead holder's lock is taken over."""

from __future__ import annotations

import logging
import multiprocessing
import os
import re

import pytest

from arpg.errors import SettingError
from arpg.files import LOCK_NAME, FolderLock, remove_partial_writes


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
