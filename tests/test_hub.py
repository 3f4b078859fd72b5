"""Recipes travel with the weights; published models by name; save_pretrained folders; files
evaluation fetches on first use. No network: the download functions are patched to serve local files."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import arpg
import arpg.checkpoint
import arpg.hub
from arpg import create_model
from arpg.checkpoint import load_model, save
from arpg.cli import compose_config
from arpg.hub import PUBLISHED, fetch_url, from_pretrained, tokenizer_for
from arpg.recipes import published_recipe, recipe
from arpg.sample import SamplingOptions, generate, inpaint
from arpg.tokenizer import PixelTokenizer

from conftest import data_file

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parent.parent


def tiny(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("ARPG-tiny", vocab_size=17, block_size=16, num_classes=3, dim=16, **overrides).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return model


# ----------------------------------------------------------------------------- recipes

def test_family_defaults_are_the_published_sampler_defaults():
    published = json.loads(data_file("published_sampler_defaults.json").read_text())
    a = published["ARPG"]
    arpg_default = create_model("ARPG-tiny", vocab_size=8, block_size=4, num_classes=2, dim=16).sampling
    assert (arpg_default.steps, arpg_default.schedule, arpg_default.order) == (a["num_iter"], a["sample_schedule"], "random")
    assert (arpg_default.cfg, arpg_default.cfg_schedule) == (a["guidance_scale"], a["cfg_schedule"])
    assert (arpg_default.temperature, arpg_default.top_k, arpg_default.top_p) == (a["temperature"], a["top_k"], a["top_p"])
    for name, system in (("LlamaGen-tiny", "LlamaGen"), ("PAR-tiny", "PAR")):
        s, p = create_model(name, vocab_size=8, block_size=16, num_classes=2, dim=16).sampling, published[system]
        assert (s.steps, s.schedule, s.order) == (None, None, None)  # their own decoding
        assert (s.cfg, s.cfg_schedule, p["cfg_interval"]) == (p["cfg_scale"], "constant", -1)
        assert (s.temperature, s.top_k, s.top_p) == (p["temperature"], p["top_k"], p["top_p"])


def test_a_published_arpg_l_file_samples_with_the_published_arpg_l_settings(tmp_path, monkeypatch):
    """The released layout (no config, no recipe) of ARPG-L, on the meta device: its recipe is the
    published FID run's (64 arccos steps, linear guidance 5.0), by load_model and by name."""
    with torch.device("meta"):
        state = create_model("ARPG-L").state_dict()
    path = tmp_path / "renamed.pt"
    path.write_bytes(b"not read: read_torch_file is patched")
    monkeypatch.setattr(arpg.checkpoint, "read_torch_file", lambda p, **_: {"model": state})
    fid = json.loads(data_file("published_fid_settings.json").read_text())["ARPG"]
    for model in (load_model(path, device="meta"), _by_name("ARPG-L", path, monkeypatch)):
        s = model.sampling
        assert (s.steps, s.schedule, s.order) == (fid["common"]["step"], fid["common"]["sample_schedule"], "random")
        assert (s.cfg, s.cfg_schedule) == (fid["models"]["ARPG-L"]["cfg_scale"], fid["common"]["cfg_schedule"])
        assert s == recipe("arpg_l") and model.config.dim == 1024


def test_a_published_par_16x_file_gets_its_own_recipe_and_grid(tmp_path, monkeypatch):
    with torch.device("meta"):
        state = create_model("PAR-3B", regions=16, block_size=576).state_dict()
    path = tmp_path / "PAR-3B-16x.pt"
    path.write_bytes(b"not read")
    monkeypatch.setattr(arpg.checkpoint, "read_torch_file", lambda p, **_: {"model": state})
    fid = json.loads(data_file("published_fid_settings.json").read_text())["PAR"]["models"]["PAR-3B-16x"]
    by_file = load_model(path, device="meta", block_size=576)
    by_name = _by_name("PAR-3B-16x", path, monkeypatch)
    for model in (by_file, by_name):
        assert model.system == "PAR" and model.config.regions == 16 and model.grid == (24, 24)
        assert model.sampling == published_recipe("PAR-3B-16x", "PAR") and model.sampling.cfg == fid["cfg_scale"]


def _by_name(name: str, path: Path, monkeypatch) -> torch.nn.Module:
    asked = []
    monkeypatch.setattr(arpg.hub, "hf_hub_download", lambda repo, file: asked.append((repo, file)) or str(path))
    model = from_pretrained(name, device="meta")
    assert asked == [(PUBLISHED[name].repo_id, PUBLISHED[name].filename)]
    return model


def test_options_rule_whole_options_replace_the_recipe_keywords_replace_fields():
    model = tiny()
    model.sampling = SamplingOptions(steps=4, schedule="cube", cfg=3.0, cfg_schedule="linear", temperature=0.5)

    def draw(*args, **kwargs):
        return generate(model, [0, 1, 2], *args, generator=torch.Generator().manual_seed(1), **kwargs)

    recipe_at_2 = draw(model.sampling.replace(steps=2))
    assert torch.equal(draw(steps=2), recipe_at_2)  # a keyword keeps the recipe's other fields
    assert torch.equal(draw({"steps": 2}), recipe_at_2)  # so does a dict (the scripts' sampling keys)
    whole = SamplingOptions(steps=2)  # a whole SamplingOptions is used as it is: constant guidance 4, temperature 1
    assert torch.equal(draw(whole), draw(model.sampling.replace(steps=2, schedule=None, cfg=4.0,
                                                                cfg_schedule="constant", temperature=1.0)))
    assert not torch.equal(draw(whole), recipe_at_2)
    assert torch.equal(draw(whole, temperature=0.5), draw(whole.replace(temperature=0.5)))
    keep = torch.zeros(4, 4, dtype=torch.bool)
    keep[:2] = True
    tokens = torch.zeros(3, 4, 4, dtype=torch.long)
    edit = inpaint(model, tokens, keep, [0, 1, 2], steps=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(edit, inpaint(model, tokens, keep, [0, 1, 2], model.sampling.replace(steps=2),
                                     generator=torch.Generator().manual_seed(1)))


def test_every_save_records_the_recipe(tmp_path):
    model = tiny()
    model.sampling = SamplingOptions(steps=3, schedule=[1, 5, 10], cfg=2.5, cfg_schedule="linear", top_k=4)
    assert load_model(save(model, tmp_path / "m.safetensors")).sampling == model.sampling
    model.sampling = SamplingOptions(order=torch.arange(16))
    with pytest.raises(ValueError, match="sampling.order: a recipe records an order by name"):
        save(model, tmp_path / "n.safetensors")


def test_a_training_run_records_its_sampling_with_its_weights(tmp_path):
    from arpg.train import TrainConfig, train

    config = compose_config("train", TrainConfig, [
        "max_steps=1", "model.dim=16", "model.n_layer=2", "model.n_head=2", "model.multiple_of=16",
        "grids.per_class=0", "grids.eval_samples=0", "tensorboard=false", f"out_dir={tmp_path / 'run'}"])
    result = train(config)
    assert config.sampling.schedule == "cube"  # the digits recipe
    assert load_model(result.weights).sampling == config.sampling
    assert load_model(result.checkpoint, weights="ema").sampling == config.sampling


@pytest.mark.parametrize("model_group", ["par_tiny", "llamagen_tiny", "llamagen_B", "par_XL"])
def test_llamagen_and_par_training_configs_take_their_family_sampling(model_group):
    from arpg.data import build_dataset
    from arpg.train import TrainConfig
    from arpg.train.config import plan_run, resolve, validate

    config = compose_config("train", TrainConfig, [f"model={model_group}"])
    assert (config.sampling.steps, config.sampling.schedule, config.sampling.order) == (None, None, None)
    validate(config)
    dataset = build_dataset(config.data, config.seed)
    plan_run(resolve(config, dataset), dataset)  # checks the sampling on the model's grid, as train does


def test_llamagen_refuses_a_schedule_without_speaking_of_regions():
    model = create_model("LlamaGen-tiny", vocab_size=8, block_size=16, num_classes=2, dim=16).eval()
    with pytest.raises(ValueError, match="schedule: LlamaGen decodes with its own schedule") as error:
        generate(model, [0], schedule="cube")
    assert "one token per step" in str(error.value) and "regions" not in str(error.value)
    par = create_model("PAR-tiny", vocab_size=8, block_size=16, num_classes=2, dim=16).eval()
    with pytest.raises(ValueError, match="'regions': 4 single tokens, then 4 per step"):
        generate(par, [0], schedule="cube")


# ----------------------------------------------------------------------------- names and folders

def test_the_name_table_follows_the_published_weights_list():
    listed = json.loads(data_file("published_weights.json").read_text())["weights"]
    assert {w["name"] for w in listed} == set(PUBLISHED)
    for w in listed:
        entry = PUBLISHED[w["name"]]
        assert (entry.repo_id, entry.filename) == (w["repo_id"], w["filename"]), w["name"]
        assert entry.kind == w.get("kind", "model"), w["name"]
        if entry.kind == "model":
            assert entry.tokens == w["tokens"] and entry.tokenizer in PUBLISHED, w["name"]


def test_save_pretrained_round_trip(tmp_path):
    model = tiny(cls_rope="identity", rope_base=16.0)
    model.sampling = SamplingOptions(steps=5, schedule="square", cfg=2.0, cfg_schedule="falling", temperature=0.9,
                                     positions="confidence", position_noise=1.5)
    folder = model.save_pretrained(tmp_path / "tiny")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    loaded = arpg.from_pretrained(folder)
    assert loaded.config == model.config and loaded.sampling == model.sampling
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    # the files are what a reader of the folder sees: edits to the recipe file are taken
    recipe_file = folder / "generation_config.json"
    recipe_file.write_text(json.dumps({**json.loads(recipe_file.read_text()), "cfg": 1.5}))
    assert arpg.from_pretrained(folder).sampling == model.sampling.replace(cfg=1.5)


def test_from_pretrained_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(ValueError, match="name_or_path must be a published name"):
        from_pretrained(tmp_path / "nothing")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        from_pretrained(tmp_path / "folder")


def test_tokenizer_for_a_model():
    assert isinstance(tokenizer_for(tiny()), PixelTokenizer)
    with pytest.raises(ValueError, match="no tokenizer is implied for vocab_size 8"):
        tokenizer_for(create_model("ARPG-tiny", vocab_size=8, block_size=4, num_classes=2, dim=16))


def test_a_published_tokenizer_by_name(tmp_path, monkeypatch):
    from arpg.tokenizer import VQConfig, VQTokenizer

    VQTokenizer(VQConfig(codebook_size=32, codebook_embed_dim=4, z_channels=8, ch=32, ch_mult=(1, 1, 2),
                         num_res_blocks=1)).save(tmp_path / "vq.safetensors")
    monkeypatch.setattr(arpg.hub, "hf_hub_download", lambda repo, file: str(tmp_path / "vq.safetensors"))
    assert from_pretrained("VQ-16").codebook_size == 32


def test_offline_without_the_file_is_one_line_naming_it(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", "import arpg; arpg.from_pretrained('ARPG-L')"],
                         env=env, capture_output=True, text=True, timeout=120)
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode != 0 and last.startswith("FileNotFoundError: arpg_300m.pt (ARPG-L) is not in the Hugging "
                                                   "Face cache and HF_HUB_OFFLINE is set")
    assert "huggingface-cli download hp-l33/ARPG arpg_300m.pt" in last


# ----------------------------------------------------------------------------- evaluation inputs

def _serve(monkeypatch, source: Path) -> list[str]:
    fetched = []

    def download_url_to_file(url, dst, progress=True):
        fetched.append(url)
        Path(dst).write_bytes(source.read_bytes())

    monkeypatch.setattr(torch.hub, "download_url_to_file", download_url_to_file)
    return fetched


def test_inception_weights_are_fetched_once_and_checked(tmp_path, monkeypatch):
    import arpg.eval.inception

    monkeypatch.setenv("HOME", str(tmp_path))
    fake = tmp_path / "served.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, fake)
    fetched = _serve(monkeypatch, fake)
    monkeypatch.setattr(arpg.eval.inception, "INCEPTION_WEIGHTS_SHA256_PREFIX", "00000000")
    with pytest.raises(ValueError, match="does not start with 00000000"):
        arpg.eval.resolve_inception_weights()
    cached = tmp_path / ".cache" / "arpg" / arpg.eval.INCEPTION_WEIGHTS_FILENAME
    assert not cached.exists() and not list(cached.parent.iterdir())  # nothing kept
    monkeypatch.setattr(arpg.eval.inception, "INCEPTION_WEIGHTS_SHA256_PREFIX",
                        hashlib.sha256(fake.read_bytes()).hexdigest()[:8])
    assert arpg.eval.resolve_inception_weights() == cached and cached.read_bytes() == fake.read_bytes()
    assert arpg.eval.resolve_inception_weights() == cached  # from the cache
    assert fetched == [arpg.eval.INCEPTION_WEIGHTS_URL] * 2


def test_adm_reference_batch_is_fetched_by_its_name_and_checked(tmp_path, monkeypatch):
    import numpy as np

    import arpg.eval

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    name = "VIRTUAL_imagenet256_labeled.npz"
    bad, good = tmp_path / "bad.npz", tmp_path / "good.npz"
    images = np.zeros((2, 8, 8, 3), np.uint8)
    np.savez(bad, arr_0=images)
    np.savez(good, arr_0=images, mu=np.zeros(2048), sigma=np.eye(2048))
    _serve(monkeypatch, bad)
    with pytest.raises(ValueError, match="is not an ADM reference batch"):
        arpg.eval.resolve_reference_batch(name)
    _serve(monkeypatch, good)
    assert arpg.eval.resolve_reference_batch(name) == tmp_path / ".cache" / "arpg" / name
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set: download https://"):
        fetch_url("https://example.invalid/x.bin", "x.bin")
