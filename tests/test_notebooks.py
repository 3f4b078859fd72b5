"""The notebooks: stored without outputs; the quick start runs cell by cell (nbclient) without an
error; the ImageNet one (published weights, a GPU) is not run, but every name it uses is checked
against the API, so that a renamed function or option fails here."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
from pathlib import Path

import pytest

import arpg
from arpg.hub import PUBLISHED
from arpg.models.base import GridGenerator
from arpg.sample import SamplingOptions

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
nbformat = pytest.importorskip("nbformat")


def code_cells(name: str) -> list[str]:
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    return [cell.source for cell in book.cells if cell.cell_type == "code"]


@pytest.mark.parametrize("name", ["quickstart.ipynb", "imagenet.ipynb"])
def test_notebooks_are_stored_without_outputs(name):
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(book)
    for cell in book.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: a cell keeps its outputs"


def test_quickstart_runs_without_an_error():
    """Runs beside the shipped weights (it writes no file): loads them, samples, compares the
    strategies and inpaints."""
    nbclient = pytest.importorskip("nbclient")
    book = nbformat.read(NOTEBOOKS / "quickstart.ipynb", as_version=4)
    client = nbclient.NotebookClient(book, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError naming the cell on any error
    figures = [o for cell in book.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(figures) == 3  # the grid, the strategies side by side, the inpainting
    printed = "".join(o.get("text", "") for cell in book.cells for o in cell.get("outputs", []))
    assert "recipe: steps=8 schedule=cube cfg=3.0 cfg_schedule=linear" in printed  # the run's, from the file


def test_imagenet_notebook_uses_only_names_the_api_has():
    callables = {"generate": arpg.sample.generate, "inpaint": arpg.sample.inpaint,
                 "from_pretrained": arpg.from_pretrained, "tokenizer_for": arpg.tokenizer_for}
    options = {f.name for f in dataclasses.fields(SamplingOptions)}
    seen = set()
    for source in code_cells("imagenet.ipynb"):
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.module.split(".")[0] == "arpg":
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "arpg":
                assert hasattr(arpg, node.attr), f"arpg has no {node.attr}"
                seen.add(node.attr)
            elif isinstance(node, ast.Attribute) and node.attr in ("sampling", "save_pretrained"):
                assert hasattr(GridGenerator, node.attr)
            elif isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
                if name not in callables:
                    continue
                seen.add(name)
                parameters = set(inspect.signature(callables[name]).parameters)
                for keyword in node.keywords:
                    assert keyword.arg in parameters | options, f"{name}() has no keyword {keyword.arg}"
                if name == "from_pretrained" and isinstance(node.args[0], ast.Constant) and \
                        not node.args[0].value.endswith("_folder"):
                    assert node.args[0].value in PUBLISHED
    assert {"from_pretrained", "tokenizer_for", "generate", "inpaint"} <= seen
