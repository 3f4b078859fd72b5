"""The FID presets reproduce the published sampling settings, and the documented FID commands use them."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from arpg.cli import compose_config
from arpg.recipes import published_recipe
from arpg.sample import SamplingOptions
from arpg.sample_fid import SampleFIDConfig

from conftest import data_file

REPO = Path(__file__).resolve().parent.parent
PRESETS = {"arpg_l": ("ARPG", "ARPG-L"), "arpg_xl": ("ARPG", "ARPG-XL"), "arpg_xxl": ("ARPG", "ARPG-XXL"),
           "par_xl_4x": ("PAR", "PAR-XL-4x"), "par_xxl_4x": ("PAR", "PAR-XXL-4x"), "par_3b_4x": ("PAR", "PAR-3B-4x"),
           "par_3b_16x": ("PAR", "PAR-3B-16x")}


@pytest.fixture(scope="module")
def published() -> dict:
    return json.loads(data_file("published_fid_settings.json").read_text())


def preset_config(name: str, *overrides: str) -> SampleFIDConfig:
    return compose_config("sample_fid", SampleFIDConfig, [f"preset={name}", "checkpoint=x.pt", *overrides])


def test_every_published_model_has_a_preset(published):
    names = {(system, model) for system in ("ARPG", "PAR") for model in published[system]["models"]}
    assert names == set(PRESETS.values())
    assert {p.stem for p in (REPO / "arpg" / "configs" / "preset").glob("*.yaml")} >= set(PRESETS)


@pytest.mark.parametrize("preset", sorted(p for p in PRESETS if p.startswith("arpg")))
def test_arpg_preset_equals_the_published_run(published, preset):
    system, model = PRESETS[preset]
    common, settings = published[system]["common"], published[system]["models"][model]
    config = preset_config(preset)
    s = SamplingOptions(**config.sampling)  # a preset sets every published field
    assert s == published_recipe(model, system)  # the released file's recipe: the same numbers
    assert s.steps == common["step"] and s.schedule == common["sample_schedule"] and s.order == "random"
    assert s.cfg == settings["cfg_scale"] and s.cfg_schedule == common["cfg_schedule"] == "linear"
    assert (s.temperature, s.top_k, s.top_p) == (common["temperature"], common["top_k"], common["top_p"])
    assert s.causal_within_step is False  # the published sampler attends block-wise within a step
    assert config.precision == "bf16" and common["precision"].startswith("bf16")
    assert config.num_images == common["num_fid_samples"] and config.seed == common["global_seed"]
    assert config.weights == "default"  # "model", else "module", else "state_dict": never the EMA, as published
    assert config.tokenizer == "vq16" and common["image_size"] == 256


@pytest.mark.parametrize("preset", sorted(p for p in PRESETS if p.startswith("par")))
def test_par_preset_equals_the_published_run(published, preset):
    system, model = PRESETS[preset]
    common, settings = published[system]["common"], published[system]["models"][model]
    config = preset_config(preset)
    s = SamplingOptions(**config.sampling)  # a preset sets every published field
    assert s == published_recipe(model, system)  # the released file's recipe: the same numbers
    assert (s.steps, s.schedule, s.order) == (None, None, None)  # PAR's own: n single steps, then n per step
    assert s.cfg == settings["cfg_scale"] and s.cfg_schedule == "constant" and "constant" in common["cfg_schedule"]
    assert (s.temperature, s.top_k, s.top_p) == (common["temperature"], common["top_k"], common["top_p"])
    assert config.token_grid == 24 and common["tokens"] == "24x24"
    assert config.image_size_eval == common["image_size_eval"] == 256 and "bicubic" in common["resize"]
    assert config.precision == "bf16" and common["precision"].startswith("bf16")
    assert config.num_images == common["num_fid_samples"] and config.seed == common["global_seed"]


def _readme_fid_commands() -> list[tuple[list[str], str]]:
    """(overrides, trailing comment) of every scripts/sample_fid.py command of a published model
    (checkpoint=.../arpg_*.pt or PAR-*.pt) in the code blocks of README.md and docs/*.md."""
    text = "".join(path.read_text() for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for command in block.replace("\\\n", " ").splitlines():
            code, _, comment = command.partition("#")
            if "scripts/sample_fid.py" not in code:
                continue
            arguments = shlex.split(code.split("scripts/sample_fid.py", 1)[1])
            if any(re.fullmatch(r"checkpoint=(.*/)?(arpg_\w+|PAR-[\w-]+)\.pt", a) for a in arguments):
                commands.append((arguments, comment))
    return commands


def checkpoint_file(overrides: list[str]) -> str:
    return next(Path(o.split("=", 1)[1]).name for o in overrides if o.startswith("checkpoint="))


def test_documented_fid_commands_resolve_to_the_presets(published):
    commands = _readme_fid_commands()
    assert len(commands) >= len(PRESETS)
    seen = set()
    for overrides, comment in commands:
        presets = [o.split("=", 1)[1] for o in overrides if o.startswith("preset=")]
        assert len(presets) == 1, f"documented FID command without a preset: {overrides}"
        preset = presets[0]
        system, model = PRESETS[preset]
        changed = dict(o.split("=", 1) for o in overrides if o.startswith("sampling."))
        if changed:  # an experiment on top of a preset: it claims no FID, and its settings win over the preset's
            assert "FID" not in comment, f"a documented command that changes the preset's sampling states a FID: {overrides}"
            sampling = compose_config("sample_fid", SampleFIDConfig, overrides).sampling
            assert {key: str(sampling[key.removeprefix("sampling.")]) for key in changed} == changed
            continue
        # Only where the files are and where the samples go may be added: the sampling is the preset's.
        extra = [o.split("=", 1)[0] for o in overrides if not o.startswith("preset=")]
        assert set(extra) <= {"checkpoint", "vq_ckpt", "output_dir", "batch_size", "device"}, overrides
        assert compose_config("sample_fid", SampleFIDConfig, overrides).sampling == preset_config(preset).sampling
        assert checkpoint_file(overrides) == published[system]["models"][model]["file"].split()[0], overrides
        seen.add(preset)
    assert seen == set(PRESETS)


def test_published_precision_casts_the_model_to_bf16(tmp_path, monkeypatch):
    """precision=bf16 samples with every weight in bf16 (the published cast); autocast keeps float32."""
    import torch

    import arpg.sample_fid
    from arpg import create_model
    from arpg.checkpoint import save
    from arpg.sample import SamplingOptions
    from arpg.sample_fid import sample_fid
    from arpg.tokenizer import VQConfig, VQTokenizer

    torch.manual_seed(0)
    model = create_model("ARPG-tiny", dim=64, vocab_size=32, block_size=16, num_classes=10)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    save(model, tmp_path / "m.safetensors")
    VQTokenizer(VQConfig(codebook_size=32, codebook_embed_dim=4, z_channels=8, ch=32, ch_mult=(1, 1, 2),
                         num_res_blocks=1)).save(tmp_path / "vq.safetensors")
    dtypes = []
    real_generate = arpg.sample_fid.generate

    def recording_generate(model, *args, **kwargs):
        dtypes.append({p.dtype for p in model.parameters()})
        return real_generate(model, *args, **kwargs)

    monkeypatch.setattr(arpg.sample_fid, "generate", recording_generate)
    for precision in ("bf16", "autocast"):
        sample_fid(SampleFIDConfig(checkpoint=str(tmp_path / "m.safetensors"), vq_ckpt=str(tmp_path / "vq.safetensors"),
                                   num_images=2, batch_size=2, device="cpu", precision=precision,
                                   sampling=SamplingOptions(steps=2, cfg=2.0), output_dir=str(tmp_path / precision)))
    assert dtypes == [{torch.bfloat16}, {torch.float32}]
