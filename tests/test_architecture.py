"""The house: no import cycles, every module importable alone, and one definition of the sampling
settings that every entry point takes."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from arpg.cli import compose_config
from arpg.sample import SamplingOptions

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "arpg"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """arpg module -> the arpg modules it imports (anywhere in the file, lazy imports included)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module)
                # `from arpg.sample import decode` imports the submodule arpg.sample.decode
                imported |= {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def test_no_module_imports_one_that_imports_it_back():
    graph = _imports()
    assert len(graph) > 20
    cycles = []

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    for module, imported in graph.items():
        cycles += [f"{module} -> {other} -> ... -> {module}" for other in imported if module in reach(other)]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_every_module_imports_alone():
    names = sorted(_imports())
    script = ("import importlib, sys\n"
              f"for name in {names!r}:\n"
              "    for loaded in [m for m in sys.modules if m == 'arpg' or m.startswith('arpg.')]:\n"
              "        del sys.modules[loaded]\n"
              "    importlib.import_module(name)\n")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, timeout=300)


def test_every_third_party_import_is_a_declared_dependency():
    """A module the package, its scripts or tools import (lazy imports included) is installed by
    `pip install arpg` or one of its extras (`[text]`, `[eval]`, ...)."""
    import importlib.metadata
    import re

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    normalise = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731 (PEP 503 names)
    declared = {normalise(re.match(r"[A-Za-z0-9_.-]+", r).group()) for r in requirements}
    distributions = importlib.metadata.packages_distributions()  # module -> the installed distributions
    imported = set()
    for path in [*(REPO / "arpg").rglob("*.py"), *(REPO / "scripts").rglob("*.py"), *(REPO / "tools").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = sorted(m for m in imported if m not in sys.stdlib_module_names and m != "arpg")
    assert {"torch", "timm", "transformers"} <= set(third_party)  # the scan sees lazy imports
    undeclared = [m for m in third_party
                  if not {normalise(d) for d in distributions.get(m, [m])} & declared]
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def _script_configs() -> dict[str, object]:
    from arpg.reports.editing import EditingDemoConfig
    from arpg.reports.quality import BenchQualityConfig
    from arpg.sample.script import SampleConfig
    from arpg.sample_fid import SampleFIDConfig
    from arpg.train import TrainConfig

    return {"sample": compose_config("sample", SampleConfig, ["checkpoint=x.pt"]),
            "sample_fid": compose_config("sample_fid", SampleFIDConfig, ["checkpoint=x.pt"]),
            "train": compose_config("train", TrainConfig),
            "bench_quality": compose_config("bench_quality", BenchQualityConfig),
            "editing_demo": compose_config("editing_demo", EditingDemoConfig)}


def test_a_new_sampling_default_reaches_every_entry_point(monkeypatch, tmp_path):
    """Change one default in SamplingOptions and every script config, `generate` itself and the
    training run's sample grids see it: the settings are defined there and nowhere else."""
    import arpg.train.loop
    from arpg.sample import generate
    from arpg.train import TrainConfig

    fields = [f.name for f in dataclasses.fields(SamplingOptions)]
    defaults = list(SamplingOptions.__init__.__defaults__)
    defaults[fields.index("top_p")] = 0.875  # no config group sets top_p
    monkeypatch.setattr(SamplingOptions.__init__, "__defaults__", tuple(defaults))
    assert SamplingOptions().top_p == 0.875
    for script, config in _script_configs().items():
        if script in ("sample", "sample_fid"):  # fields replacing the model's recipe's: none by default
            assert config.sampling == {}, script
            continue
        assert isinstance(config.sampling, SamplingOptions), script
        assert config.sampling.top_p == 0.875, script

    seen = []

    def recording_generate(model, labels, options=None, **kwargs):
        seen.append(options.top_p)
        return generate(model, labels, options, **kwargs)

    monkeypatch.setattr(arpg.train.loop, "generate", recording_generate)
    config = compose_config("train", TrainConfig,
                            ["max_steps=1", "model.dim=16", "model.n_layer=2", "model.n_head=2", "model.multiple_of=16",
                             "grids.per_class=1", "grids.eval_samples=0", "tensorboard=false",
                             f"out_dir={tmp_path / 'run'}"])
    arpg.train.loop.train(config)
    assert seen == [0.875]
    from arpg import create_model
    from arpg.sample.draw import TokenSampler

    class RecordingSampler(TokenSampler):
        def __call__(self, step, slots, logits):
            seen.append(self.top_p)
            return super().__call__(step, slots, logits)

    monkeypatch.setattr("arpg.sample.decode.TokenSampler", RecordingSampler)
    seen.clear()
    generate(create_model("ARPG-tiny", vocab_size=8, block_size=4, num_classes=2, dim=16), [0, 1],
             SamplingOptions(steps=2))
    assert seen == [0.875, 0.875]
