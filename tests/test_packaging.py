"""The wheel is a working library on its own: it ships the Hydra configs (with the published sampling
settings) inside the package and declares the console commands, and installed outside the
repository it composes the published presets and runs a command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMMANDS = {"arpg-train": "train", "arpg-sample": "sample", "arpg-sample-fid": "sample_fid",
            "arpg-evaluate": "evaluate", "arpg-extract-codes": "extract_codes"}


def test_the_wheel_ships_the_configs_and_the_commands(tmp_path):
    source = tmp_path / "source"  # a copy of what the wheel is built from: building writes build/ and *.egg-info
    for name in ("arpg", "pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("arpg-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    configs = {n.removeprefix("arpg/configs/") for n in names if n.startswith("arpg/configs/")}
    shipped = {str(p.relative_to(REPO / "arpg" / "configs")) for p in (REPO / "arpg" / "configs").rglob("*.yaml")}
    assert shipped and configs == shipped
    assert {"train.yaml", "sample_fid.yaml", "preset/arpg_l.yaml", "sampling/arpg_l.yaml"} <= configs
    for command, function in COMMANDS.items():
        assert f"{command} = arpg.commands:{function}" in entry_points

    # Installed into a fresh environment (its dependencies are this one's) and used from elsewhere.
    venv, outside = tmp_path / "venv", tmp_path / "elsewhere"
    outside.mkdir()
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True, timeout=600)
    compose = ("import arpg; from arpg.cli import compose_config; from arpg.sample_fid import SampleFIDConfig; "
               "config = compose_config('sample_fid', SampleFIDConfig, ['preset=arpg_l', 'checkpoint=x.pt']); "
               "print(arpg.__file__); print(config.sampling['cfg'], config.sampling['cfg_schedule'], config.precision)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    shown = subprocess.run([python, "-c", compose], cwd=outside, env=env, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    where, settings = shown.stdout.splitlines()[-2:]
    assert Path(where).is_relative_to(venv) and settings == "5.0 linear bf16"
    job = subprocess.run([venv / "bin" / "arpg-train", "model=par_tiny", "--cfg", "job"], cwd=outside, env=env,
                         capture_output=True, text=True, timeout=300)
    assert job.returncode == 0 and "regions: 4" in job.stdout, job.stderr  # PAR-tiny composed from the wheel
