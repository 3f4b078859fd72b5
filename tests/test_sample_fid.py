"""FID sampling: every image once, an ADM-readable .npz, resumption, and independence of the process count."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException
from PIL import Image

from arpg import create_model
from arpg.checkpoint import save
from arpg.cli import compose_config
from arpg.errors import SettingError
from arpg.eval import EvalConfig, evaluate_npz
from arpg.files import FolderLock
from arpg.sample import SamplingOptions
from arpg.sample_fid import SETTINGS_FILE, SampleFIDConfig, image_path, image_seed, npz_path, sample_fid
from arpg.tokenizer import VQConfig, VQTokenizer
from test_eval import _reference_fid, _reference_precision_recall

REPO = Path(__file__).resolve().parent.parent
NUM_CLASSES = 10


# One thread in this process, as the torchrun workers (OMP_NUM_THREADS=1): in-process and
# multi-process runs do the same arithmetic.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """A random tiny ARPG (4x4 tokens of 32 codes, 10 classes) and a tiny VQ (16x16 RGB <-> 4x4 codes)."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    model = create_model("ARPG-tiny", dim=64, vocab_size=32, block_size=16, num_classes=NUM_CLASSES)
    for p in model.parameters():  # the published init zeroes the head: every sample would be uniform noise
        torch.nn.init.normal_(p, std=0.3)
    vq = VQTokenizer(VQConfig(codebook_size=32, codebook_embed_dim=4, z_channels=8, ch=32, ch_mult=(1, 1, 2),
                              num_res_blocks=1))
    save(model, root / "arpg_tiny.safetensors")
    vq.save(root / "vq_tiny.safetensors")
    return {"checkpoint": root / "arpg_tiny.safetensors", "vq_ckpt": root / "vq_tiny.safetensors"}


def make_config(weights: dict[str, Path], output_dir: Path, **overrides) -> SampleFIDConfig:
    settings = {**dict(num_images=20, sampling={"steps": 4, "cfg": 2.0}, batch_size=4, device="cpu"),
                **overrides}
    return SampleFIDConfig(checkpoint=str(weights["checkpoint"]), vq_ckpt=str(weights["vq_ckpt"]),
                           output_dir=str(output_dir), **settings)


def read_pngs(output_dir: Path, count: int) -> np.ndarray:
    return np.stack([np.asarray(Image.open(image_path(output_dir, i))) for i in range(count)])


def file_identities(output_dir: Path, count: int) -> list[tuple[int, int]]:
    """(inode, mtime in ns) of each image: a rewritten file (temp + rename) gets a new inode."""
    return [(s.st_ino, s.st_mtime_ns) for s in (image_path(output_dir, i).stat() for i in range(count))]


def test_two_processes_write_every_image_once_and_equal_one_process(weights, tmp_path):
    two_dir, one_dir = tmp_path / "two", tmp_path / "one"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(REPO / "scripts" / "sample_fid.py"), f"checkpoint={weights['checkpoint']}",
                    f"vq_ckpt={weights['vq_ckpt']}", "num_images=20", "sampling.steps=4", "sampling.cfg=2.0", "batch_size=4",
                    "device=cpu", f"output_dir={two_dir}"],
                   check=True, env=env, cwd=tmp_path, timeout=300)

    assert sorted(p.name for p in two_dir.glob("*.png")) == [f"{i:06d}.png" for i in range(20)]
    assert not list(two_dir.glob(".*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    images = read_pngs(two_dir, 20)
    assert images.shape == (20, 16, 16, 3) and images.dtype == np.uint8
    assert len({image.tobytes() for image in images}) == 20  # 20 distinct samples
    with np.load(npz_path(two_dir)) as npz:
        assert sorted(npz.files) == ["arr_0", "arr_1"]
        assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (20, 16, 16, 3)
        np.testing.assert_array_equal(npz["arr_0"], images)
        np.testing.assert_array_equal(npz["arr_1"], np.arange(20) % NUM_CLASSES)

    # One process, same batches: image i is the same image.
    sample_fid(make_config(weights, one_dir))
    np.testing.assert_array_equal(read_pngs(one_dir, 20), images)


def test_rerun_generates_only_the_missing_images(weights, tmp_path, capsys):
    out = tmp_path / "samples"
    config = make_config(weights, out, num_images=12)
    sample_fid(config)
    original = read_pngs(out, 12)
    identities = file_identities(out, 12)

    # An interrupted run: three images and the npz missing, a half-written temporary file left.
    deleted = [2, 5, 11]
    for i in deleted:
        image_path(out, i).unlink()
    npz_path(out).unlink()
    (out / ".000005.png.x1y2.tmp").write_bytes(b"half a png")
    capsys.readouterr()
    sample_fid(replace(config, batch_size=3))  # other batches: image i must not change

    assert "(3 new, 9 kept)" in capsys.readouterr().out
    assert not list(out.glob(".*.tmp"))
    after = file_identities(out, 12)
    kept = [i for i in range(12) if i not in deleted]
    assert [after[i] for i in kept] == [identities[i] for i in kept]  # never rewritten
    regenerated = read_pngs(out, 12)
    # Equal up to float round-off of the differently batched decoder (at most 1 grey level).
    assert np.abs(regenerated.astype(int) - original.astype(int)).max() <= 1
    with np.load(npz_path(out)) as npz:
        np.testing.assert_array_equal(npz["arr_0"], regenerated)

    # More images later: the first 12 stay, 2 are added, the npz grows to 14.
    sample_fid(replace(config, num_images=14))
    assert file_identities(out, 12) == after
    with np.load(npz_path(out)) as npz:
        assert npz["arr_0"].shape[0] == 14


@pytest.mark.parametrize("damage", ["missing", "truncated", "more_images"])
def test_npz_is_rebuilt_from_the_pngs_with_nothing_sampled(weights, tmp_path, monkeypatch, capsys, damage):
    """Every PNG there but the npz missing, cut short (a run killed while writing it, a copy cut short)
    or holding more images than now asked for: the rerun rewrites the npz from the PNGs and samples nothing."""
    out = tmp_path / "samples"
    config = make_config(weights, out, num_images=6)
    npz = sample_fid(config)
    identities = file_identities(out, 6)
    if damage == "missing":
        npz.unlink()
    elif damage == "truncated":
        npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    else:
        config = replace(config, num_images=4)

    def no_sampling(*args, **kwargs):
        raise AssertionError("an image was sampled although every PNG exists")

    monkeypatch.setattr("arpg.sample_fid.generate", no_sampling)
    capsys.readouterr()
    assert sample_fid(config) == npz
    count = config.num_images
    assert f"(0 new, {count} kept)" in capsys.readouterr().out
    assert file_identities(out, 6) == identities  # no PNG rewritten
    with np.load(npz) as data:
        np.testing.assert_array_equal(data["arr_0"], read_pngs(out, count))
        np.testing.assert_array_equal(data["arr_1"], np.arange(count) % NUM_CLASSES)


def test_npz_reads_back_through_the_evaluator(weights, tmp_path):
    """The streamed npz is what arpg.eval (and ADM's evaluator) expects: uint8 (N, H, W, 3) under arr_0,
    holding exactly the PNGs: evaluated against another image set, it scores what the PNGs score."""
    sample_fid(make_config(weights, tmp_path / "a", num_images=8))
    reference = np.random.default_rng(0).integers(0, 256, (9, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=reference)

    def features(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return images.reshape(len(images), -1)[:, :6].astype(np.float64), np.full((len(images), 4), 0.25)

    results = evaluate_npz(npz_path(tmp_path / "a"), tmp_path / "ref.npz", extractor=features, splits=2, k=2)
    pngs = read_pngs(tmp_path / "a", 8)
    expected = _reference_fid(features(pngs)[0], features(reference)[0])
    assert results["num_samples"] == 8 and expected > 1
    assert results["fid"] == pytest.approx(expected, rel=1e-9)
    assert (results["precision"], results["recall"]) == _reference_precision_recall(
        features(reference)[0], features(pngs)[0], k=2)


def test_other_settings_in_the_same_folder_are_refused(weights, tmp_path):
    config = make_config(weights, tmp_path / "s", num_images=2)
    sample_fid(config)
    assert json.loads((tmp_path / "s" / SETTINGS_FILE).read_text())["sampling"]["cfg"] == 2.0
    with pytest.raises(ValueError, match="sampling.cfg: 2.0 there, 3.0 now"):
        sample_fid(replace(config, sampling={**config.sampling, "cfg": 3.0}))


def test_other_weights_under_the_same_path_are_refused(weights, tmp_path):
    """The folder records what the weights and the tokenizer are (their content), not where they lie."""
    checkpoint, vq = tmp_path / "model.safetensors", tmp_path / "vq.safetensors"
    shutil.copy(weights["checkpoint"], checkpoint)
    shutil.copy(weights["vq_ckpt"], vq)
    config = make_config({"checkpoint": checkpoint, "vq_ckpt": vq}, tmp_path / "s", num_images=4)
    sample_fid(config)
    retrained = create_model("ARPG-tiny", dim=64, vocab_size=32, block_size=16, num_classes=NUM_CLASSES)
    save(retrained, checkpoint)  # "retrain": new weights, same file name
    digest = "'[0-9a-f]{64}'"
    with pytest.raises(ValueError, match=rf"other settings \(checkpoint_sha256: {digest} there, {digest} now\)"):
        sample_fid(replace(config, num_images=8))
    assert sorted(p.name for p in (tmp_path / "s").glob("*.png")) == [f"{i:06d}.png" for i in range(4)]
    # The very same files moved elsewhere are the same weights: resumed.
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(weights["checkpoint"], moved / "a.safetensors")
    shutil.move(vq, moved / "b.safetensors")
    sample_fid(replace(config, checkpoint=str(moved / "a.safetensors"), vq_ckpt=str(moved / "b.safetensors"),
                       num_images=6))
    assert len(list((tmp_path / "s").glob("*.png"))) == 6


def test_a_failed_start_leaves_the_folder_usable(weights, tmp_path):
    out = tmp_path / "s"
    # 100 steps for 4x4 tokens: found against the model, before anything is written.
    with pytest.raises(SettingError, match=re.escape("sampling.steps must be in [1, 16], got 100")):
        sample_fid(make_config(weights, out, num_images=2, sampling=SamplingOptions(steps=100)))
    assert not (out / SETTINGS_FILE).exists() and not list(out.glob("*.png"))
    sample_fid(make_config(weights, out, num_images=2))  # the corrected run is not refused
    assert len(list(out.glob("*.png"))) == 2


def test_a_second_sampler_on_the_same_folder_is_refused(weights, tmp_path):
    out = tmp_path / "s"
    with FolderLock(out, "FID sampling"):
        with pytest.raises(SettingError, match=rf"is in use by process {os.getpid()} "):
            sample_fid(make_config(weights, out, num_images=2))
    assert not list(out.glob("*.png"))


def test_image_seeds_are_distinct_and_stable():
    seeds = [image_seed(0, i) for i in range(1000)] + [image_seed(1, i) for i in range(1000)]
    assert len(set(seeds)) == 2000 and all(0 <= s < 2 ** 63 for s in seeds)
    assert image_seed(0, 7) == image_seed(0, 7)


@pytest.mark.parametrize("overrides, name", [
    (dict(checkpoint="???"), "checkpoint"), (dict(num_images=0), "num_images"), (dict(batch_size=0), "batch_size"),
    (dict(tokenizer="vq8"), "tokenizer"), (dict(weights="best"), "weights"), (dict(seed=-1), "seed"),
    (dict(device="tpu"), "device"), (dict(output_dir="."), "output_dir"),
])
def test_bad_settings_name_the_parameter(weights, tmp_path, overrides, name):
    with pytest.raises(ValueError, match=name):
        sample_fid(replace(make_config(weights, tmp_path / "x"), **overrides))


def test_yaml_configs_mirror_the_dataclasses():
    assert compose_config("sample_fid", SampleFIDConfig, ["checkpoint=x.pt"]) == SampleFIDConfig(checkpoint="x.pt")
    assert compose_config("evaluate", EvalConfig) == EvalConfig()
    with pytest.raises(ConfigCompositionException, match="stepz"):
        compose_config("sample_fid", SampleFIDConfig, ["checkpoint=x.pt", "stepz=8"])


RANK1_SEES_AN_EMPTY_FOLDER = """
import os, sys
import arpg.sample_fid as sample_fid
from arpg.sample import SamplingOptions
if os.environ["RANK"] == "1":  # a stale listing of a shared folder on another node
    sample_fid._missing_indices = lambda output_dir, num_images: list(range(num_images))
checkpoint, vq_ckpt, output_dir = sys.argv[1:]
sample_fid.sample_fid(sample_fid.SampleFIDConfig(checkpoint=checkpoint, vq_ckpt=vq_ckpt, output_dir=output_dir,
                                                 num_images=12, sampling=SamplingOptions(steps=4, cfg=2.0),
                                                 batch_size=4, device="cpu"))
"""


def test_ranks_take_rank_0s_listing_of_the_folder(weights, tmp_path):
    """Only rank 0 lists the folder: a rank whose view of it is stale (NFS) neither redraws the
    images that exist nor leaves missing ones undrawn."""
    out = tmp_path / "samples"
    sample_fid(make_config(weights, out, num_images=12))
    identities = file_identities(out, 12)
    deleted = (2, 5, 11)
    for i in deleted:
        image_path(out, i).unlink()
    npz_path(out).unlink()
    script = tmp_path / "stale_rank.py"
    script.write_text(RANK1_SEES_AN_EMPTY_FOLDER)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
                    str(weights["checkpoint"]), str(weights["vq_ckpt"]), str(out)],
                   check=True, env=env, cwd=tmp_path, timeout=300)
    after, kept = file_identities(out, 12), [i for i in range(12) if i not in deleted]
    assert [after[i] for i in kept] == [identities[i] for i in kept]  # never rewritten
    with np.load(npz_path(out)) as npz:
        assert npz["arr_0"].shape[0] == 12
