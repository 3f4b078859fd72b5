"""Writes the storage refuses (a full disk, a quota, a read-only or forbidden folder) end in one
line naming what was written where, the bytes it needs and the bytes free; the previous file is
untouched, no partial file is left, and nothing saved before is lost. Long jobs whose need is known
(FID sampling, code extraction) refuse up front."""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import signal
import stat
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from arpg import create_model
from arpg.checkpoint import load_model, save
from arpg.data import ExtractConfig, ShardWriter, extract_codes
from arpg.errors import WriteError
from arpg.files import FolderLock, atomic_write
from arpg.images import save_grid
from arpg.sample import SamplingOptions
from arpg.sample_fid import SampleFIDConfig, sample_fid, write_npz
from arpg.tokenizer import VQConfig, VQTokenizer
from arpg.train.state import read_training_state
from conftest import run_script

pytestmark = pytest.mark.usefixtures("one_thread")

# A tiny digits run: checkpoints at steps 2, 4, 6, 8, then model.safetensors.
TINY_RUN = ["model.dim=32", "model.n_layer=2", "model.n_head=2", "model.multiple_of=32", "optim.batch_size=16",
            "max_steps=8", "ckpt_every=2", "log_every=1", "tensorboard=false", "grids.per_class=0",
            "grids.eval_samples=0"]


def refuse_file_fsync(monkeypatch, at: int, code: int = errno.ENOSPC) -> None:
    """The `at`-th fsync of a regular file (every atomic write makes one, after its writer is done)
    fails with `code`: what NFS, quotas and delayed allocation report when the blocks run out."""
    real, count = os.fsync, [0]

    def fsync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            count[0] += 1
            if count[0] == at:
                raise OSError(code, os.strerror(code))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def message_pattern(what: str, path: Path, reason: str) -> str:
    return (rf"could not write {what} {re.escape(str(path))}: {reason}; it needs (about|more than the|an unknown "
            rf"number of) [^;]*, [\d.,]+ [^;]* free on /\S*; nothing was replaced and the partial file is removed")


def _tiny_model(seed: int):
    torch.manual_seed(seed)
    return create_model("ARPG-tiny", dim=32, n_layer=2, n_head=2, vocab_size=17, block_size=16, num_classes=3)


def _pngs(folder: Path, count: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")


def _write_weights(root: Path, version: int) -> Path:
    return save(_tiny_model(version), root / "model.safetensors")


def _write_grid(root: Path, version: int) -> Path:
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(version)) * 2 - 1
    return save_grid(images, root / "samples" / "final.png", nrow=2)


def _write_shard(root: Path, version: int) -> Path:
    writer = ShardWriter(root / "codes", grid_size=(2, 2), codebook_size=17, tokenizer="pixel17", augmentations=1,
                         num_classes=3)
    tokens = np.random.default_rng(version).integers(0, 17, (5, 1, 4))
    writer.write_shard(0, tokens, np.arange(5) % 3)
    return root / "codes" / "shard_00000_tokens.npy"


def _write_fid_npz(root: Path, version: int) -> Path:
    _pngs(root / "fid", 6, seed=version)
    return write_npz(root / "fid", 6, 3, root / "fid.npz")


def _write_report(root: Path, version: int) -> Path:
    text = json.dumps({"rows": [version] * 100}, indent=1)  # as the benchmarks write their reports
    return atomic_write(root / "bench.json", lambda tmp: tmp.write_text(text))


# kind -> (write version v of it under a folder and return its path, what the message calls it)
WRITERS = {"weights": (_write_weights, "the model weights"), "sample grid": (_write_grid, "the PNG image"),
           "shard": (_write_shard, "the token shard"), "FID npz": (_write_fid_npz, "the FID sample archive"),
           "report JSON": (_write_report, "the JSON file")}


@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, r"no space left on device \(ENOSPC\)"),
                                          (errno.EDQUOT, r"disk quota exceeded \(EDQUOT\)")])
@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_a_refused_write_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch, kind, code, reason):
    write, what = WRITERS[kind]
    path = write(tmp_path, 0)
    before = path.read_bytes()
    refuse_file_fsync(monkeypatch, at=1, code=code)
    with pytest.raises(WriteError, match=message_pattern(what, path, reason) + "$") as caught:
        write(tmp_path, 1)
    assert caught.value.errno == code
    assert path.read_bytes() == before
    assert not [p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("code, reason", [(errno.EROFS, r"read-only file system \(EROFS\)"),
                                          (errno.EACCES, r"permission denied \(EACCES\)")])
def test_a_folder_that_refuses_files_is_named(tmp_path, monkeypatch, code, reason):
    """A read-only or forbidden folder fails already when the temporary file is made."""
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr("tempfile.mkstemp", refuse)
    with pytest.raises(WriteError, match=message_pattern("the weights file", tmp_path / "w.safetensors", reason)):
        atomic_write(tmp_path / "w.safetensors", lambda tmp: tmp.write_bytes(b"x"))


def test_a_lock_file_the_disk_refuses_is_named_and_leaves_no_folder(tmp_path, monkeypatch):
    def refuse(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", refuse)
    with pytest.raises(WriteError, match=rf"could not write the lock file {re.escape(str(tmp_path / 'run'))}/.arpg.lock "
                                         rf"\(one training job per folder\): no space left on device \(ENOSPC\); .* free on /"):
        FolderLock(tmp_path / "run", "training").acquire()
    assert not (tmp_path / "run").exists()


def _in_child_with_file_size_limit(limit: int, fn) -> str:
    """Run fn() in a forked child whose files cannot grow past `limit` bytes (RLIMIT_FSIZE: the
    kernel fails the writer's own write with EFBIG, inside torch's C++ or safetensors' Rust as
    anywhere); returns the child's error message ("" when fn succeeded)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        message = ""
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            fn()
        except BaseException as err:  # the child reports whatever happened, then leaves
            message = f"{type(err).__name__}: {err}"
        finally:
            os.write(write, message.encode())
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        message = pipe.read()
    os.waitpid(pid, 0)
    return message


def _numpy_file(path: Path, values: torch.Tensor) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, values.numpy())

    atomic_write(path, write)


# writer -> (file name, write(path, values (1, 3, H, W) in [-1, 1]))
INNER_WRITERS = {"torch.save": ("state.pt", lambda p, v: atomic_write(p, lambda tmp: torch.save({"v": v}, tmp))),
                 "safetensors": ("w.safetensors", lambda p, v: atomic_write(p, lambda tmp: save_file({"v": v}, str(tmp)))),
                 "PNG": ("grid.png", lambda p, v: save_grid(v, p)), "numpy": ("a.npy", _numpy_file)}


@pytest.mark.parametrize("writer", sorted(INNER_WRITERS))
def test_a_write_failing_inside_the_writer_is_recognised(tmp_path, writer):
    """torch.save (C++) and safetensors (Rust) lose the OSError on the way ("unexpected pos",
    "os error 27"); the storage is still named as the cause, and the previous file kept."""
    name, write = INNER_WRITERS[writer]
    path = tmp_path / name
    noise = torch.Generator().manual_seed(0)
    write(path, torch.rand(1, 3, 8, 8, generator=noise) * 2 - 1)  # small: fits
    before = path.read_bytes()
    big = torch.rand(1, 3, 400, 400, generator=noise) * 2 - 1  # 1.9 MB of floats, ~480 kB as a PNG
    message = _in_child_with_file_size_limit(256_000, lambda: write(path, big))
    assert re.fullmatch(r"WriteError: could not write .* " + re.escape(str(path)) + r": file too large \(EFBIG\); "
                        r"it needs .*; nothing was replaced and the partial file is removed", message), message
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_full_disk_at_a_checkpoint_stops_training_with_one_line_and_resumes(tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "run"
    refuse_file_fsync(monkeypatch, at=2)  # the checkpoint of step 4
    assert run_script("train", *TINY_RUN, f"out_dir={out_dir}") == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    checkpoint = out_dir / "checkpoints" / "step_0000004.pt"
    assert len(lines) == 1 and re.fullmatch(
        r"error: " + message_pattern("the training checkpoint", checkpoint, r"no space left on device \(ENOSPC\)")
        + r" \(set ARPG_TRACEBACK=1 for the traceback\)", lines[0]), lines
    assert sorted(p.name for p in (out_dir / "checkpoints").iterdir()) == ["step_0000002.pt"]
    assert read_training_state(out_dir / "checkpoints" / "step_0000002.pt")["step"] == 2
    monkeypatch.undo()  # space freed
    assert run_script("train", *TINY_RUN, f"out_dir={out_dir}") == 0
    assert "resuming from" in capsys.readouterr().out
    assert load_model(out_dir / "model.safetensors") is not None


def test_a_full_disk_at_the_export_keeps_every_checkpoint(tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "run"
    refuse_file_fsync(monkeypatch, at=5)  # after the 4 checkpoints: model.safetensors
    assert run_script("train", *TINY_RUN, f"out_dir={out_dir}") == 1
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert f"could not write the model weights {out_dir / 'model.safetensors'}: no space left" in line
    assert not (out_dir / "model.safetensors").exists()
    kept = sorted(p.name for p in (out_dir / "checkpoints").iterdir())
    assert kept == ["step_0000004.pt", "step_0000006.pt", "step_0000008.pt"]  # keep_checkpoints=3
    monkeypatch.undo()
    assert run_script("train", *TINY_RUN, f"out_dir={out_dir}") == 0  # resumes at step 8: exports only
    assert load_file(out_dir / "model.safetensors")


def test_resuming_from_a_truncated_checkpoint_is_one_line(tmp_path, capsys):
    assert run_script("train", *TINY_RUN, "max_steps=2", f"out_dir={tmp_path / 'run'}") == 0
    checkpoint = tmp_path / "run" / "checkpoints" / "step_0000002.pt"
    cut = tmp_path / "cut.pt"
    cut.write_bytes(checkpoint.read_bytes()[:100_000])  # a copy cut short by a full disk
    capsys.readouterr()
    assert run_script("train", *TINY_RUN, f"out_dir={tmp_path / 'other'}", f"resume={cut}") == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {cut} is not a readable PyTorch file: truncated, corrupt, not written by torch.save, or holding objects "
        f"other than tensors and plain data (RuntimeError) (set ARPG_TRACEBACK=1 for the traceback)")


@pytest.fixture
def fid_weights(tmp_path) -> dict[str, str]:
    model = create_model("ARPG-tiny", dim=32, n_layer=2, n_head=2, vocab_size=32, block_size=16, num_classes=3)
    vq = VQTokenizer(VQConfig(codebook_size=32, codebook_embed_dim=4, z_channels=8, ch=32, ch_mult=(1, 1, 2),
                              num_res_blocks=1))
    save(model, tmp_path / "arpg.safetensors")
    vq.save(tmp_path / "vq.safetensors")
    return {"checkpoint": str(tmp_path / "arpg.safetensors"), "vq_ckpt": str(tmp_path / "vq.safetensors")}


def _fid_config(weights: dict[str, str], output_dir: Path) -> SampleFIDConfig:
    return SampleFIDConfig(**weights, output_dir=str(output_dir), num_images=12, batch_size=4, device="cpu",
                           write_threads=1, sampling=SamplingOptions(steps=4))


def test_a_full_disk_during_fid_sampling_keeps_the_images_written(tmp_path, monkeypatch, fid_weights):
    output_dir = tmp_path / "fid"
    refuse_file_fsync(monkeypatch, at=7)  # the settings file, then 5 PNGs, then the 6th PNG (image 5) fails
    with pytest.raises(WriteError, match=r"could not write the PNG image .*/fid/000005\.png: no space left"):
        sample_fid(_fid_config(fid_weights, output_dir))
    written = sorted(p.name for p in output_dir.glob("*.png"))
    assert "000005.png" not in written and written[:5] == [f"{i:06d}.png" for i in range(5)]
    assert not list(output_dir.glob(".*.tmp"))
    before = {name: (output_dir / name).read_bytes() for name in written}
    monkeypatch.undo()
    sample_fid(_fid_config(fid_weights, output_dir))  # the rerun draws the missing 7 only
    assert len(list(output_dir.glob("*.png"))) == 12
    assert all((output_dir / name).read_bytes() == data for name, data in before.items())


def _little_free_space(monkeypatch, free: int) -> None:
    monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(f_bavail=free // 1000, f_frsize=1000))


def test_fid_sampling_refuses_up_front_when_the_images_cannot_fit(tmp_path, monkeypatch, fid_weights):
    output_dir = tmp_path / "fid"
    _little_free_space(monkeypatch, 5_000)  # 12 PNGs of 16x16 and a 12 x 776-byte .npz need ~14 kB
    with pytest.raises(WriteError, match=rf"not enough space for 12 FID sample PNGs of 16x16 and their .npz in "
                                         rf"{re.escape(str(output_dir))}: it needs about 13.9 kB .*, 5.0 kB "
                                         rf"\(5,000 bytes\) free on /\S*; free some space there or choose another"):
        sample_fid(_fid_config(fid_weights, output_dir))
    assert not output_dir.exists()  # nothing drawn, nothing written


def test_code_extraction_refuses_up_front_when_the_shards_cannot_fit(tmp_path, monkeypatch):
    _pngs(tmp_path / "images" / "a", 10, seed=0)
    _pngs(tmp_path / "images" / "b", 10, seed=1)
    config = ExtractConfig(data_path=str(tmp_path / "images"), output_dir=str(tmp_path / "codes"), tokenizer="pixel",
                           image_size=8, augment="flip", batch_size=4, num_workers=0, shard_size=7, device="cpu")
    _little_free_space(monkeypatch, 2_000)  # 20 images x 2 views x 64 uint16 tokens + labels: 5,280 bytes
    with pytest.raises(WriteError, match=r"not enough space for the codes of 20 images in .*codes: it needs about "
                                         r"5.3 kB \(5,280 bytes\), 2.0 kB \(2,000 bytes\) free on /"):
        extract_codes(config)
    assert not list((tmp_path / "codes").glob("shard_*"))


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def test_training_into_a_real_small_file_system(tmp_path, capsys):
    """A 3 MB tmpfs (needs root; skipped otherwise) holds one 1.8 MB checkpoint of the default
    model, not two: the second fails with the disk named, the first is kept and resumable."""
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "3m"):
        pytest.skip("mounting a tmpfs needs root")
    try:
        command = [f"out_dir={small / 'run'}", "max_steps=8", "ckpt_every=4", "log_every=4", "tensorboard=false",
                   "grids.per_class=0", "grids.eval_samples=0"]
        for attempt in range(2):  # the rerun resumes from step 4 and fails the same way
            assert run_script("train", *command) == 1
            (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
            assert re.fullmatch(r"error: could not write the training checkpoint .*/step_0000008\.pt: no space left on "
                                r"device \(ENOSPC\); it needs about 1\.\d MB .*, 1\.\d MB .* free on "
                                + re.escape(str(small)) + r"; nothing was replaced .*", line), line
            assert sorted(p.name for p in (small / "run" / "checkpoints").iterdir()) == ["step_0000004.pt"]
            assert read_training_state(small / "run" / "checkpoints" / "step_0000004.pt")["step"] == 4
    finally:
        subprocess.run(["umount", str(small)], check=True)
