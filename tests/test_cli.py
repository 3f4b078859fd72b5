"""The command-line glue every script shares: stray keys refused, one-line errors, nothing of Hydra's
written. The scripts run in this process (runpy), exactly as `python scripts/<name>.py ...` would."""

from __future__ import annotations

import pytest

from arpg.cli import TRACEBACK_ENV
from arpg.errors import SettingError
from conftest import run_script

REQUIRED = {"train": [], "sample": ["checkpoint=x.safetensors"], "sample_fid": ["checkpoint=x.safetensors"],
            "extract_codes": ["data_path=/d", "output_dir=/o"], "evaluate": [], "bench_quality": [], "editing_demo": []}


@pytest.mark.parametrize("script", sorted(REQUIRED))
def test_every_script_refuses_a_stray_appended_key(script, capsys, tmp_path, monkeypatch):
    """`+key=value` slips past Hydra's schema check; each script stops on it, naming it, before any work."""
    monkeypatch.chdir(tmp_path)
    assert run_script(script, *REQUIRED[script], "+stepz=8") == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: unknown config keys ['stepz']")
    assert not list(tmp_path.iterdir())  # no outputs/ (or anything else) left in the current folder


def test_a_user_error_is_one_line_and_leaves_nothing_behind(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out_dir = tmp_path / "run"
    assert run_script("train", "grids.per_class=1", "grids.classes=[0,11]", f"out_dir={out_dir}") == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line == ("error: grids.classes must be class ids in [0, 10) (the data's classes), got [0, 11] "
                    f"(set {TRACEBACK_ENV}=1 for the traceback)")
    assert not list(tmp_path.iterdir())  # neither out_dir (nor its hydra/) nor outputs/
    # A section's own check names the section's key.
    assert run_script("sample_fid", "checkpoint=x.safetensors", "sampling.top_p=0") == 1
    assert capsys.readouterr().err.startswith("error: sampling.top_p must be in (0, 1]")
    assert run_script("sample", "checkpoint=missing.safetensors", "tokenizer=pixel_digits") == 1
    assert capsys.readouterr().err.startswith("error: checkpoint not found: missing.safetensors")
    assert run_script("sample", "checkpoint=missing.safetensors", "classes=[]") == 1
    assert capsys.readouterr().err.startswith("error: classes must list at least one class id, got []")
    assert run_script("sample", "checkpoint=missing.safetensors", "token_grid=0") == 1
    assert capsys.readouterr().err.startswith("error: token_grid must be >= 1 or null, got 0")
    # A text file given as the checkpoint to resume: the file named, nothing left behind.
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    assert run_script("train", f"resume={tmp_path / 'notes.pt'}", f"out_dir={out_dir}", "grids.per_class=0") == 1
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'notes.pt'} is not a readable PyTorch file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.pt"]
    # The full traceback on request.
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(SettingError, match="grids.classes"):
        run_script("train", "grids.per_class=1", "grids.classes=[0,11]", f"out_dir={out_dir}")
