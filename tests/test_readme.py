"""The README's "Train on your own data" commands, run as written on a toy ImageFolder, scaled down by
overrides only: extract -> train -> sample -> sample_fid -> evaluate. So the documentation cannot drift."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from arpg.tokenizer import VQConfig, VQTokenizer
from conftest import REPO, run_script

# What makes the toy run small; each appended override replaces the README's value or adds a key.
SCALE_DOWN = {
    "extract_codes": ["image_size=32", "augment=none", "device=cpu"],
    "train": ["max_steps=3", "optim.batch_size=4", "optim.warmup_epochs=0.5", "sample.per_class=1", "log_every=1",
              "tensorboard=false", "runtime.device=cpu"],
    "sample": ["sampling.steps=4", "device=cpu"],
    "sample_fid": ["num_images=4", "batch_size=4", "sampling.steps=4", "device=cpu"],
    "evaluate": ["extractor=test_readme:pixel_features", "splits=2"],
}


def pixel_features(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A stand-in for Inception: mean colour per image quadrant as features, a softmax over them."""
    quadrants = images.reshape(len(images), 2, images.shape[1] // 2, 2, images.shape[2] // 2, 3).mean(axis=(2, 4))
    features = quadrants.reshape(len(images), -1).astype(np.float64)  # (B, 12)
    logits = features / 32
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return features, probs / probs.sum(axis=1, keepdims=True)


def readme_commands(section: str) -> list[list[str]]:
    """The `python scripts/...` lines of the first bash block under the README heading `section`."""
    text = (REPO / "README.md").read_text()
    body = text[text.index(f"### {section}\n"):]
    block = re.search(r"```bash\n(.*?)```", body, re.S).group(1).replace("\\\n", " ")
    return [shlex.split(line) for line in block.splitlines() if line.startswith("python scripts/")]


@pytest.fixture
def toy_world(tmp_path, monkeypatch) -> Path:
    """What the README asks a user to have, in miniature: 3 classes x 4 images, a random VQ saved in
    the published layout (a dict with "model") as pretrained/vq_ds16_c2i.pt, and a reference batch."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "dog", "owl")):
        (tmp_path / "my_images" / name).mkdir(parents=True)
        for i in range(4):
            base = np.full((40, 40, 3), 60 * c + 40, dtype=np.uint8)
            Image.fromarray(base + rng.integers(0, 40, base.shape, dtype=np.uint8)).save(
                tmp_path / "my_images" / name / f"{i}.png")
    torch.manual_seed(0)
    vq = VQTokenizer(VQConfig(codebook_size=32, codebook_embed_dim=4, z_channels=8, ch=32, ch_mult=(1, 1, 2),
                              num_res_blocks=1))  # 32x32 images <-> 8x8 tokens
    (tmp_path / "pretrained").mkdir()
    torch.save({"model": vq.state_dict(), "optimizer": None}, tmp_path / "pretrained" / "vq_ds16_c2i.pt")
    np.savez(tmp_path / "my_reference.npz", arr_0=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    return tmp_path


def test_readme_own_data_commands_run(toy_world, capsys):
    commands = readme_commands("Train on your own data")
    scripts = [Path(command[1]).stem for command in commands]
    assert scripts == ["extract_codes", "train", "sample", "sample_fid", "evaluate"]
    for command, script in zip(commands, scripts):
        assert command[:2] == ["python", f"scripts/{script}.py"]
        assert run_script(script, *command[2:], *SCALE_DOWN[script]) == 0, (command, capsys.readouterr().err)

    manifest = (toy_world / "data" / "my_codes" / "manifest.json").read_text()
    assert '"tokenizer_file": "' + str(toy_world / "pretrained" / "vq_ds16_c2i.pt") in manifest
    run = toy_world / "runs" / "tiny_my_codes"  # named after the data, as the README says
    with Image.open(run / "samples" / "final.png") as grid:  # decoded with the data's VQ: 3 rows of RGB
        assert grid.mode == "RGB" and grid.size == (34 + 2, 3 * 34 + 2)
    assert (toy_world / "samples" / "grid.png").is_file()
    with np.load(toy_world / "samples" / "my_model.npz") as npz:
        assert npz["arr_0"].shape == (4, 32, 32, 3) and npz["arr_1"].tolist() == [0, 1, 2, 0]
    out = " ".join(capsys.readouterr().out.split())
    assert "| num_samples | fid |" in out
    # The scripts' logging shows on the console: which weights were taken, what extraction uses.
    assert "INFO arpg.checkpoint: runs/tiny_my_codes/model.safetensors: safetensors (ema weights)" in out
    assert "INFO arpg.data: encoding 256 views per call (batch_size)" in out
    # Nothing of Hydra's anywhere: no outputs/, no hydra/ or .hydra/ folders.
    assert not [p for p in toy_world.rglob("*") if p.name in ("outputs", "hydra", ".hydra")]
