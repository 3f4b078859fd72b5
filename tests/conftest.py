"""Shared fixtures. Reference data lives in tests/data/ (copied from ../shared/reference) so the
suite is self-contained; a missing file is a failure, never a skip."""

from __future__ import annotations

import contextlib
import json
import os
import runpy
import sys
import traceback
from pathlib import Path

import pytest
import torch

from arpg.runtime import CPU_BF16_ENV

# No test depends on the CPU it runs on: the suite runs as a CPU without fast bf16 (AVX2) would,
# and `ARPG_CPU_FAST_BF16=1 python -m pytest` runs it as one with AVX512-BF16 or AMX would.
os.environ.setdefault(CPU_BF16_ENV, "0")

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parent.parent


def data_file(name: str) -> Path:
    path = DATA / name
    if not path.is_file():
        pytest.fail(f"reference fixture {path} is missing (copy it from ../shared/reference/)")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors (`pytestmark = pytest.mark.usefixtures(
    "one_thread")`): more threads only add synchronisation, and far worse when the cores are shared
    with other processes (OpenMP threads then spin waiting for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def no_host_sync(monkeypatch):
    """`with no_host_sync("the decode loop"): ...` raises AssertionError where the code inside reads
    a tensor's value back to the host (a device sync on a GPU: `.item()`, `.tolist()`, `bool(t)`, ...)."""
    @contextlib.contextmanager
    def forbid(what: str):
        def no_sync(*args, **kwargs):
            raise AssertionError(f"{what} read a value back from the device")

        with monkeypatch.context() as patch:
            for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__"):
                patch.setattr(torch.Tensor, name, no_sync)
            yield

    return forbid


@pytest.fixture(params=["avx2", "avx512_bf16"])
def cpu_kind(request, monkeypatch) -> str:
    """Run a test as each kind of CPU would: without fast bf16 (AVX2) and with it (AVX512-BF16, AMX)."""
    monkeypatch.setenv(CPU_BF16_ENV, "1" if request.param == "avx512_bf16" else "0")
    return request.param


@pytest.fixture(scope="session")
def arpg_golden() -> dict:
    return torch.load(data_file("tiny_arpg_golden.pt"), weights_only=True)


@pytest.fixture(scope="session")
def arpg_layout() -> dict:
    return json.loads(data_file("arpg_state_dict_layout.json").read_text())


@pytest.fixture()
def golden_model(arpg_golden):
    """The tiny reference model with the golden weights, in eval mode."""
    from arpg.models.arpg import ARPG, ARPGConfig

    fields = ARPGConfig.__dataclass_fields__
    model = ARPG(ARPGConfig(**{k: v for k, v in arpg_golden["config"].items() if k in fields}))
    model.load_state_dict(arpg_golden["state_dict"], strict=True)
    return model.eval()


@pytest.fixture(scope="session")
def llamagen_goldens() -> dict:
    """The tiny LlamaGen and PAR reference files, by family name."""
    return {"llamagen": torch.load(data_file("tiny_llamagen_golden.pt"), weights_only=True),
            "par": torch.load(data_file("tiny_par_golden.pt"), weights_only=True)}


@pytest.fixture(scope="session")
def llamagen_layout() -> dict:
    return json.loads(data_file("llamagen_par_state_dict_layout.json").read_text())


def run_script(name: str, *overrides: str) -> int:
    """Run scripts/<name>.py in this process with `overrides` as its command line, exactly as
    `python scripts/<name>.py ...` would (without a new interpreter's start-up); its exit status."""
    argv = sys.argv
    sys.argv = [str(REPO / "scripts" / f"{name}.py"), *overrides]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as exit_:
        return exit_.code
    finally:
        sys.argv = argv
    return 0


def in_child(fn) -> int:
    """Run fn() in a forked copy of this process; its exit status (-9: killed by SIGKILL; 1: it
    raised, and the traceback is printed). Work that starts threads or worker pools a fork cannot
    copy (a compiled backward, inductor's compile workers) runs in a child this way too, so that
    this process can still fork children that train."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            fn()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
