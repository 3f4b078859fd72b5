"""Token shards, the digits set, the published .npy layout converter and image extraction."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import arpg.data as data
import arpg.runtime
from arpg.cli import compose_config
from arpg.data import (ExtractConfig, ShardWriter, TokenDataset, convert_npy_folder, default_batch_size,
                       digits_dataset, extract_codes)
from arpg.errors import SettingError
from arpg.files import FolderLock
from arpg.runtime import worker_count
from arpg.tokenizer import PixelTokenizer, VQConfig, VQTokenizer
from conftest import run_script

REPO = Path(__file__).resolve().parent.parent


# ---- digits ------------------------------------------------------------------------------------

def test_digits_dataset():
    full = digits_dataset()
    assert len(full) == 1797
    assert full.grid_size == (8, 8) and full.codebook_size == 17 and full.num_classes == 10
    tokens, label = full[0]
    assert tokens.shape == (64,) and tokens.dtype == torch.int64 and isinstance(label, int)
    assert full.tokens.min() == 0 and full.tokens.max() == 16
    assert sorted(set(full.labels.tolist())) == list(range(10))
    # The tokens are sklearn's grey levels, i.e. the PixelTokenizer.digits() encoding.
    from sklearn.datasets import load_digits
    assert torch.equal(tokens, torch.from_numpy(load_digits().images[0].reshape(64).astype(np.int64)))
    pixel = PixelTokenizer.digits()
    grids = full.tokens[:50].reshape(50, 8, 8)
    assert torch.equal(pixel.encode(pixel.decode(grids)), grids)

    train, test = digits_dataset("train"), digits_dataset("test")
    assert len(train) + len(test) == 1797 and len(test) == 359
    assert sorted(set(test.labels.tolist())) == list(range(10))
    with pytest.raises(ValueError, match="split must be one of"):
        digits_dataset("val")


# ---- shards ------------------------------------------------------------------------------------

def _writer(root, **overrides) -> ShardWriter:
    args = dict(grid_size=(2, 3), codebook_size=50, tokenizer="test", augmentations=4, num_classes=5)
    return ShardWriter(root, **{**args, **overrides})


def test_shards_round_trip_and_augmentation_choice(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, size=(11, 4, 6))
    labels = rng.integers(0, 5, size=11)
    writer = _writer(tmp_path)
    writer.write_shard(0, tokens[:7], labels[:7])
    writer.write_shard(1, tokens[7:], labels[7:])
    writer.finish()

    ds = TokenDataset(tmp_path, seed=3)
    assert len(ds) == 11 and ds.grid_size == (2, 3) and ds.codebook_size == 50 and ds.num_classes == 5
    assert ds.augmentations == 4 and ds.tokenizer == "test"
    picks = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        epoch_picks = []
        for i in range(len(ds)):
            item, label = ds[i]
            assert item.dtype == torch.int64 and item.shape == (6,) and label == labels[i]
            matches = [a for a in range(4) if np.array_equal(item.numpy(), tokens[i, a])]
            assert matches, f"sample {i} is none of its augmentations"
            epoch_picks.append(matches[0])
        picks.append(epoch_picks)
    assert picks[0] != picks[1]  # a new choice each epoch ...
    ds.set_epoch(0)
    assert [ds[i][0].tolist() for i in range(11)] == [tokens[i, picks[0][i]].tolist() for i in range(11)]  # ... reproducibly
    with pytest.raises(IndexError):
        ds[11]


def test_shard_writer_refuses_mixing_and_incomplete_reads(tmp_path):
    writer = _writer(tmp_path)
    writer.write_shard(0, np.zeros((2, 4, 6), dtype=np.int64), np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match="incomplete"):
        TokenDataset(tmp_path)
    with pytest.raises(ValueError, match="codebook_size=50"):
        _writer(tmp_path, codebook_size=60)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 49\]"):
        writer.write_shard(1, np.full((1, 4, 6), 50), np.zeros(1, dtype=np.int64))
    with pytest.raises(ValueError, match=r"tokens must have shape \(n, 4, 6\)"):
        writer.write_shard(1, np.zeros((1, 3, 6)), np.zeros(1, dtype=np.int64))
    resumed = _writer(tmp_path)
    assert resumed.has_shard(0) and not resumed.has_shard(1) and resumed.count == 2


# ---- the published per-image .npy layout -------------------------------------------------------

def test_convert_npy_folder_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    src, expected = tmp_path / "codes", []
    for label in (0, 3, 7):
        (src / str(label)).mkdir(parents=True)
        for i in range(4):
            codes = rng.integers(0, 16384, size=(1, 2, 16))
            np.save(src / str(label) / f"{i}.npy", codes)
            expected.append((codes[0], label))

    manifest = convert_npy_folder(src, tmp_path / "shards", shard_size=5)
    assert manifest["count"] == 12 and len(manifest["shards"]) == 3 and manifest["num_classes"] == 8
    ds = TokenDataset(tmp_path / "shards")
    assert ds.grid_size == (4, 4) and ds.augmentations == 2 and ds.codebook_size == 16384
    stored = np.concatenate([np.load(tmp_path / "shards" / s["tokens"]) for s in manifest["shards"]])
    assert stored.dtype == np.uint16
    assert np.array_equal(stored, np.stack([codes for codes, _ in expected]))
    for i, (codes, label) in enumerate(expected):
        item, got_label = ds[i]
        assert got_label == label
        assert any(np.array_equal(item.numpy(), codes[a]) for a in range(2))


def test_convert_npy_folder_errors(tmp_path):
    (tmp_path / "cats").mkdir()
    with pytest.raises(ValueError, match="integer class id"):
        convert_npy_folder(tmp_path, tmp_path / "out")
    (tmp_path / "cats").rmdir()
    (tmp_path / "0").mkdir()
    np.save(tmp_path / "0" / "a.npy", np.zeros((1, 2, 16), dtype=np.int64))
    np.save(tmp_path / "0" / "b.npy", np.zeros((1, 1, 16), dtype=np.int64))
    with pytest.raises(ValueError, match="b.npy"):
        convert_npy_folder(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("bad, problem", [
    ("object", "holds pickled Python objects"), ("empty", "is empty"), ("text", "not a .npy file (no NumPy header)"),
    ("out_of_range", "token ids must be in [0, 99], got values in [0, 100]"),
])
def test_convert_npy_folder_names_the_bad_file(tmp_path, bad, problem):
    """With a million files, the error must say which one; and never invite unsafe (pickle) loading."""
    for i in range(3):
        (tmp_path / "src" / "4").mkdir(parents=True, exist_ok=True)
        np.save(tmp_path / "src" / "4" / f"{i}.npy", np.zeros((1, 1, 16), dtype=np.int64))
    culprit = tmp_path / "src" / "4" / "1.npy"
    if bad == "object":
        np.save(culprit, np.array([{"codes": 1}], dtype=object), allow_pickle=True)
    elif bad == "empty":
        culprit.write_bytes(b"")
    elif bad == "text":
        culprit.write_text("not codes")
    else:
        np.save(culprit, np.full((1, 1, 16), 100, dtype=np.int64) * (np.arange(16) % 2))
    with pytest.raises(ValueError) as error:
        convert_npy_folder(tmp_path / "src", tmp_path / "out", codebook_size=100)
    message = str(error.value)
    assert message.startswith(f"{culprit}: ") and problem in message, message
    assert "unsafe" not in message and "allow_pickle" not in message


# ---- extraction --------------------------------------------------------------------------------

SIZES = [(12, 9), (9, 12), (20, 20), (31, 17), (8, 8), (40, 25)]


@pytest.fixture
def image_tree(tmp_path) -> Path:
    return _make_image_tree(tmp_path)


def _make_image_tree(folder: Path) -> Path:
    """3 classes x 12 RGB PNGs of several sizes, plus one corrupt .png in class 'b'."""
    rng = np.random.default_rng(2)
    root = folder / "images"
    for name in ("a", "b", "c"):
        (root / name).mkdir(parents=True)
        for i in range(12):
            w, h = SIZES[i % len(SIZES)]
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name / f"{i:02d}.png")
    (root / "b" / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    return root


def _config(root: Path, out: Path, **overrides) -> ExtractConfig:
    return ExtractConfig(**{**dict(data_path=str(root), output_dir=str(out), tokenizer="pixel", image_size=8,
                                   augment="flip", batch_size=4, num_workers=0, shard_size=7, device="cpu"),
                            **overrides})


def test_extract_codes_writes_readable_shards(image_tree, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="arpg.data"):
        manifest = extract_codes(_config(image_tree, tmp_path / "out"))
    assert "zz_corrupt.png" in caplog.text
    assert manifest["count"] == 36 and len(manifest["shards"]) == 6  # 37 files in slices of 7
    assert [s["skipped"] for s in manifest["shards"] if s["skipped"]] == [[str(image_tree / "b" / "zz_corrupt.png")]]

    ds = TokenDataset(tmp_path / "out")
    assert ds.grid_size == (8, 8) and ds.codebook_size == 256 and ds.num_classes == 3
    assert ds.augmentations == 2 and ds.tokenizer == "pixel256"
    assert [ds[i][1] for i in range(len(ds))] == [0] * 12 + [1] * 12 + [2] * 12
    tokens = np.concatenate([np.load(tmp_path / "out" / s["tokens"]) for s in manifest["shards"]])
    # view 1 is the mirror image of view 0
    assert np.array_equal(tokens[:, 1].reshape(-1, 8, 8), tokens[:, 0].reshape(-1, 8, 8)[:, :, ::-1])
    # the 8x8 source image is taken as it is (the centre crop of an image of the target size is itself)
    grey = np.asarray(Image.open(image_tree / "a" / "04.png").convert("RGB"), dtype=np.float64) @ [0.299, 0.587, 0.114]
    assert np.abs(tokens[4, 0].reshape(8, 8).astype(np.float64) - grey).max() <= 1


def test_extract_codes_resumes_without_duplicates(image_tree, tmp_path, monkeypatch):
    reference = extract_codes(_config(image_tree, tmp_path / "reference"))

    written: list[int] = []
    original = ShardWriter.save_shard

    def crash_after_two(self, index, *args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt("simulated kill")
        written.append(index)
        return original(self, index, *args, **kwargs)

    monkeypatch.setattr(ShardWriter, "save_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        extract_codes(_config(image_tree, tmp_path / "out"))
    assert written == [0, 1]
    with pytest.raises(ValueError, match="incomplete"):
        TokenDataset(tmp_path / "out")

    stale = tmp_path / "out" / ".shard_00002_tokens.npy.abc123.tmp"  # what a SIGKILL mid-write leaves
    stale.write_bytes(b"partial")
    resumed: list[int] = []

    def record(self, index, *args, **kwargs):
        resumed.append(index)
        return original(self, index, *args, **kwargs)

    monkeypatch.setattr(ShardWriter, "save_shard", record)
    manifest = extract_codes(_config(image_tree, tmp_path / "out"))
    assert resumed == [2, 3, 4, 5]  # finished shards were kept, not redone
    assert not stale.exists()
    assert manifest["count"] == reference["count"] == 36
    for name in ("tokens", "labels"):
        got = np.concatenate([np.load(tmp_path / "out" / s[name]) for s in manifest["shards"]])
        want = np.concatenate([np.load(tmp_path / "reference" / s[name]) for s in reference["shards"]])
        assert np.array_equal(got, want)
    assert sum(len(s["skipped"]) for s in manifest["shards"]) == 1
    # a resumed run with different settings would mix data sets: refused
    with pytest.raises(ValueError, match="augmentations"):
        extract_codes(_config(image_tree, tmp_path / "out", augment="none"))


def test_extraction_refuses_a_folder_in_use_and_removes_partial_writes(image_tree, tmp_path):
    out = tmp_path / "out"
    with FolderLock(out, "code extraction"):
        with pytest.raises(SettingError, match=rf"{re.escape(str(out))} is in use by process {os.getpid()} "):
            extract_codes(_config(image_tree, out))
    assert not (out / "manifest.json").exists()


def test_extraction_fits_the_machine(monkeypatch):
    """Default views per encode call from the free memory (8 full-resolution feature maps of the VQ's
    first width per view); loader workers bounded by the cores."""
    vq16 = VQTokenizer(VQConfig())
    gib = 2 ** 30
    monkeypatch.setattr(data.extraction.psutil, "virtual_memory", lambda: type("Memory", (), {"available": 8 * gib})())
    # One 256x256 view: 8 maps of 256 x 256 x 128 float32 = 256 MiB; half of 8 GiB free holds 16 of them.
    assert default_batch_size(vq16, 256, torch.device("cpu")) == 16
    assert default_batch_size(vq16, 128, torch.device("cpu")) == 64
    assert default_batch_size(PixelTokenizer(256), 256, torch.device("cpu")) == 256
    monkeypatch.setattr(arpg.runtime, "available_cores", lambda: 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert (worker_count(None), worker_count(0), worker_count(16)) == (1, 0, 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes of a launcher share the 2 cores
    assert (worker_count(None), worker_count(16)) == (0, 1)
    assert ExtractConfig().batch_size is None and ExtractConfig().num_workers is None


def test_extract_ten_crop_with_tiny_vq(image_tree, tmp_path):
    for name in ("a", "b"):  # one class is enough here; keeps the CPU encode short
        shutil.rmtree(image_tree / name)
    torch.manual_seed(0)
    vq = VQTokenizer(VQConfig(codebook_size=32, codebook_embed_dim=4, z_channels=8, ch=32, ch_mult=(1, 1, 2)))
    config = _config(image_tree, tmp_path / "out", tokenizer="vq16", image_size=16, augment="ten_crop",
                     shard_size=100, batch_size=40)
    manifest = extract_codes(config, tokenizer=vq)
    ds = TokenDataset(tmp_path / "out")
    assert manifest["count"] == 12 and ds.augmentations == 10 and ds.grid_size == (4, 4)
    assert ds.codebook_size == 32 and ds.tokenizer == vq.identity
    # Recompute one image's ten views by hand: TenCrop(16) of the ADM centre crop at 16 * 1.1.
    from torchvision.transforms.functional import ten_crop
    image = Image.open(image_tree / "c" / "05.png").convert("RGB")
    views = [np.asarray(v, dtype=np.float32) for v in ten_crop(data.center_crop(image, 17), 16)]
    expected = vq.encode(torch.from_numpy(np.stack(views)).permute(0, 3, 1, 2) / 127.5 - 1)
    stored = np.load(tmp_path / "out" / manifest["shards"][0]["tokens"])[5]
    assert np.array_equal(stored, expected.reshape(10, 16).numpy())


def test_center_crop_matches_adm():
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (90, 300, 3), dtype=np.uint8))
    crop = data.center_crop(image, 32)
    assert crop.size == (32, 32)
    # ADM: BOX-halve while the short side is >= 2 * size (90 -> 45), BICUBIC to short side 32, centre.
    half = image.resize((150, 45), resample=Image.BOX)
    scaled = half.resize((round(150 * 32 / 45), 32), resample=Image.BICUBIC)
    left = (scaled.size[0] - 32) // 2
    assert np.array_equal(np.asarray(crop), np.asarray(scaled)[:, left:left + 32])


def test_extract_config_errors(image_tree, tmp_path):
    with pytest.raises(ValueError, match="vq_ckpt must be set"):
        extract_codes(_config(image_tree, tmp_path / "out", tokenizer="vq16"))
    with pytest.raises(FileNotFoundError, match="vq_ds16_c2i.pt"):
        extract_codes(_config(image_tree, tmp_path / "out", tokenizer="vq16", vq_ckpt=str(tmp_path / "vq.pt")))
    with pytest.raises(ValueError, match="augment must be one of"):
        extract_codes(_config(image_tree, tmp_path / "out", augment="rotate"))
    with pytest.raises(ValueError, match="data_path must be set"):
        extract_codes(ExtractConfig(output_dir=str(tmp_path)))


def test_extract_script_and_yaml_mirror_the_config(image_tree, tmp_path, capsys):
    yaml_text = (REPO / "arpg" / "configs" / "extract_codes.yaml").read_text()
    assert yaml_text.splitlines()[0] == "defaults: [extract_codes_schema, quiet_hydra, _self_]"
    keys = {line.split(":")[0] for line in yaml_text.splitlines() if line and line[0].isalpha()}
    assert keys - {"defaults"} == {f.name for f in fields(ExtractConfig)}

    out = tmp_path / "out"
    assert run_script("extract_codes", f"data_path={image_tree}", f"output_dir={out}", "tokenizer=pixel",
                      "image_size=8", "num_workers=0", "device=cpu") == 0
    assert "extracted 36 images" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["complete"]


def test_extract_config_typo_is_an_error_naming_the_key():
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    from arpg.cli import register_schema, to_dataclass

    register_schema("extract_codes", ExtractConfig)
    with initialize_config_dir(config_dir=str(REPO / "arpg" / "configs"), version_base=None):
        config = to_dataclass(compose("extract_codes", overrides=["data_path=/d", "output_dir=/o"]), ExtractConfig)
        assert config == ExtractConfig(data_path="/d", output_dir="/o")  # the YAML defaults equal the dataclass's
        with pytest.raises(ConfigCompositionException, match="shard_sise"):
            compose("extract_codes", overrides=["shard_sise=3"])


# ---- extraction over several processes ---------------------------------------------------------

@pytest.fixture(scope="module")
def multi_process_setup(tmp_path_factory, one_thread) -> dict:
    """The image tree, a tiny VQ's weights (8x8 images -> 2x2 codes) and the overrides of
    scripts/extract_codes.py for them (6 shards of 7 images, 2 images per encode call); `reference`:
    the shards of an uninterrupted one-process run, {file name: bytes}."""
    root = tmp_path_factory.mktemp("extraction")
    torch.manual_seed(0)
    vq = VQTokenizer(VQConfig(codebook_size=32, codebook_embed_dim=4, z_channels=8, ch=32, ch_mult=(1, 1, 2),
                              num_res_blocks=1))
    vq.save(root / "vq_tiny.safetensors")
    setup = {"root": root, "overrides": [f"data_path={_make_image_tree(root)}", "tokenizer=vq16",
                                         f"vq_ckpt={root / 'vq_tiny.safetensors'}", "image_size=8", "augment=flip",
                                         "batch_size=4", "num_workers=0", "shard_size=7", "device=cpu"]}
    extract_codes(_compose_extraction(setup, root / "reference"))
    setup["reference"] = _folder_bytes(root / "reference")
    assert len(setup["reference"]) == 1 + 2 * 6
    return setup


def _compose_extraction(setup: dict, out: Path) -> ExtractConfig:
    return compose_config("extract_codes", ExtractConfig, [*setup["overrides"], f"output_dir={out}"])


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file of a shard folder (hidden ones too: leftovers would show), by name."""
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def _launch_two(script: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), *args], env=env, capture_output=True, text=True, timeout=300)


def _shards_on_disk(out: Path) -> set[int]:
    return {int(path.name.split("_")[1]) for path in out.glob("shard_*.npy")}


def test_two_processes_write_the_shards_of_one_process(multi_process_setup):
    out = multi_process_setup["root"] / "two"
    run = _launch_two(REPO / "scripts" / "extract_codes.py", *multi_process_setup["overrides"], f"output_dir={out}")
    assert run.returncode == 0, run.stderr
    # Byte for byte, the manifest included; nothing else left in the folder (lock, partial writes).
    assert _folder_bytes(out) == multi_process_setup["reference"]
    # Process 0 alone reports: one progress bar for both processes and one summary.
    assert run.stdout.count("extracted 36 images (2 views each) into 6 shards") == 1, run.stdout
    assert "37 read now" in run.stdout and "on 2 process(es)" in run.stdout
    # The corrupt image (the 25th, in shard 3) was met by process 1; process 0's summary counts it.
    assert "zz_corrupt.png" in run.stdout + run.stderr and "skipped 1 unreadable" in run.stdout
    assert "extract (2 processes): 100%" in run.stderr and "extract:" not in run.stderr


@pytest.mark.parametrize("failure", ["error", "kill"])
def test_a_failed_two_process_run_is_finished_by_one_process(multi_process_setup, failure, monkeypatch):
    """Process 1 fails (an error) or is killed (SIGKILL) as it is about to write its second shard:
    the job stops (the error on both processes), the shards finished so far are kept, and one
    process writes only the missing ones, giving the shards of an uninterrupted run."""
    out = multi_process_setup["root"] / failure
    run = _launch_two(REPO / "tests" / "two_process_extraction.py", failure, *multi_process_setup["overrides"],
                      f"output_dir={out}")
    assert run.returncode != 0
    manifest = json.loads((out / "manifest.json").read_text())
    listed = {shard["index"] for shard in manifest["shards"]}
    assert not manifest["complete"] and {0, 1} <= listed < set(range(6)), listed  # process 1 wrote shard 1
    if failure == "error":
        # Process 1 shows its error (a traceback), process 0 the same error as one line; shard 2,
        # finished by process 0 at the step process 1 failed, is listed too: no shard file unlisted.
        assert "OSError: simulated failure before writing shard 3" in run.stderr
        assert "error: process 1 of 2 failed: OSError: simulated failure before writing shard 3" in run.stderr
        assert listed == _shards_on_disk(out) == {0, 1, 2}
    kept = {index: (out / f"shard_{index:05d}_tokens.npy").stat().st_ino for index in listed}

    saved: list[int] = []
    original = ShardWriter.save_shard

    def record(self, index, *args, **kwargs):
        saved.append(index)
        return original(self, index, *args, **kwargs)

    monkeypatch.setattr(ShardWriter, "save_shard", record)
    extract_codes(_compose_extraction(multi_process_setup, out))
    assert sorted(saved) == sorted(set(range(6)) - listed)  # finished shards were not written again
    assert {index: (out / f"shard_{index:05d}_tokens.npy").stat().st_ino for index in listed} == kept
    assert _folder_bytes(out) == multi_process_setup["reference"]


def test_extract_codes_stores_captions_beside_the_codes(image_tree, tmp_path):
    """Text-to-image data: each image's caption in a .txt beside it; the shards hold the captions'
    text-encoder embeddings (a fixed word table here) in the images' order."""
    from arpg.condition import Captions, TextCondition
    from arpg.text import load_text_encoder

    words = "words:a,thin,bold,picture,of"
    texts = {}
    for i, path in enumerate(sorted(p for p in image_tree.rglob("*.png") if p.name != "zz_corrupt.png")):
        if path.name != "05.png" or path.parent.name != "c":  # one image without a caption: skipped
            texts[path] = f"a {'thin' if i % 2 else 'bold'} picture" + " of a" * (i % 3)
            path.with_suffix(".txt").write_text(texts[path] + "\n")
    manifest = extract_codes(_config(image_tree, tmp_path / "out", captions=True, text_encoder=words, caption_dim=8,
                                     caption_tokens=7))
    skipped = sorted(Path(p).name for s in manifest["shards"] for p in s["skipped"])
    assert manifest["count"] == 35 and skipped == ["05.png", "zz_corrupt.png"]
    data = TokenDataset(tmp_path / "out")
    assert isinstance(data.condition, TextCondition) and data.num_classes is None
    assert (data.condition.caption_dim, data.condition.rows, data.condition.text_encoder) == (8, 7, words)
    embeddings, mask = load_text_encoder(words, 7, 8)(list(texts.values()))  # in the images' sorted order
    items = [data[i][1] for i in range(len(data))]
    assert all(isinstance(item, Captions) for item in items)
    assert torch.equal(torch.stack([item.mask for item in items]), mask)
    torch.testing.assert_close(torch.stack([item.embeddings for item in items]), embeddings, atol=1e-3, rtol=0)
