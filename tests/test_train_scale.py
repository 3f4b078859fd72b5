"""What training at scale depends on, checked on the CPU: the compiled training step is one graph,
the training forward keeps only what the loss needs, the EMA is copied to the CPU by the main
process only, FSDP2 reduces gradients in float32, a process-group timeout, TF32 policies, and
memory-mapped published checkpoints."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from arpg import create_model
from arpg.checkpoint import load_model
from arpg.cli import compose_config
from arpg.errors import SettingError
from arpg.eval import extract_features
from arpg.models.arpg import ARPG
from arpg.runtime import tf32
from arpg.train import TrainConfig, train
from arpg.train.loop import _fsdp_plugin, _make_accelerator
from arpg.train.state import EMA, Run

from conftest import in_child

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models

SMALL = ["model.dim=32", "model.n_layer=2", "model.n_head=2", "model.multiple_of=32", "optim.batch_size=16",
         "log_every=1", "tensorboard=false", "grids.per_class=0", "grids.eval_samples=0", "runtime.device=cpu"]


def make_config(*overrides: str) -> TrainConfig:
    return compose_config("train", TrainConfig, overrides)


def graphs_in_child(run, tmp_path: Path) -> int:
    """The graphs torch.compile traces while `run(counter)` runs in a forked child. A compiled
    backward starts autograd's worker threads, after which this process could no longer fork
    children that train (the fault-injection tests do): so it runs in a child."""
    result = tmp_path / "graphs.txt"

    def child() -> None:
        counter = CompileCounter()
        torch._dynamo.reset()
        run(counter)
        result.write_text(str(counter.frame_count))

    assert in_child(child) == 0
    return int(result.read_text())


@pytest.mark.parametrize("family", [[], ["order=raster"], ["experiment=digits_llamagen"], ["experiment=digits_par"]])
def test_compiled_training_step_is_one_graph(tmp_path, monkeypatch, family):
    """runtime.compile: the forward of a training step traces as one graph (no break at the input
    check or at the draws of order and class dropout), and the next steps reuse it."""
    compile_ = torch.compile

    def run(counter: CompileCounter) -> None:
        monkeypatch.setattr(torch, "compile", lambda model, **kwargs: compile_(model, backend=counter))
        train(make_config(*SMALL, *family, "max_steps=3", "runtime.compile=true", f"out_dir={tmp_path / 'run'}"))

    assert graphs_in_child(run, tmp_path) == 1


@pytest.mark.parametrize("name", ["ARPG-tiny", "LlamaGen-tiny"])
def test_compiled_training_forward_takes_any_batch_size_after_one_recompile(name, tmp_path):
    """The input checks do not pin the batch size into the graph: torch.compile's first recompile
    makes it dynamic (a size formatted into a message would pin it: one graph per size)."""
    torch.manual_seed(0)
    model = create_model(name, dim=32, n_layer=2, n_head=2, vocab_size=17, block_size=16, num_classes=10).train()

    def run(counter: CompileCounter) -> None:
        compiled = torch.compile(model, backend=counter)
        for batch in (4, 6, 8, 5):
            order = {} if name.startswith("LlamaGen") else {"order": torch.rand(batch, 16).argsort(1)}
            _, loss = compiled(torch.randint(0, 17, (batch, 16)), torch.randint(0, 10, (batch,)), check=False,
                               drop_labels=False, return_logits=False, **order)
            loss.backward()

    assert graphs_in_child(run, tmp_path) == 2


class PeakMemory(TorchDispatchMode):
    """The peak bytes held by the tensors that the operations inside the block create (storages
    alive at once; the parameters and inputs made before are not counted)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # forget freed storages first: a new one may reuse a freed one's address
        self.live = {ptr: (ref, size) for ptr, (ref, size) in self.live.items() if not ref.expired()}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                self.live.setdefault(storage.data_ptr(), (StorageWeakRef(storage), storage.nbytes()))
        self.peak = max(self.peak, sum(size for _, size in self.live.values()))
        return out


def test_training_step_without_raster_logits_peaks_one_logits_tensor_lower():
    """The raster-order logits the loop discards are a float32 (B, T, V) copy; bound to `_` they
    live through the backward. Without them the step's peak is lower by exactly that copy."""
    B, T, V = 4, 16, 4096  # the vocabulary dominates, as at scale
    torch.manual_seed(0)
    model = create_model("ARPG-tiny", dim=32, n_layer=2, n_head=2, multiple_of=32, vocab_size=V, block_size=T,
                         num_classes=10).train()
    tokens, labels, order = torch.randint(0, V, (B, T)), torch.randint(0, 10, (B,)), torch.rand(B, T).argsort(1)
    peaks, losses = {}, {}
    for return_logits in (True, False):
        model.zero_grad(set_to_none=True)  # both steps allocate their gradients
        with PeakMemory() as memory:
            logits, loss = model(tokens, labels, order, check=False, return_logits=return_logits)
            loss.backward()
        peaks[return_logits], losses[return_logits] = memory.peak, loss
        assert (logits is None) == (not return_logits)
    assert torch.equal(losses[True], losses[False])
    assert peaks[True] - peaks[False] >= B * T * V * 4, peaks


def test_training_loop_asks_for_the_loss_only(tmp_path, monkeypatch):
    returned = []
    forward = ARPG.forward

    def recording_forward(self, *args, **kwargs):
        logits, loss = forward(self, *args, **kwargs)
        returned.append(logits)
        return logits, loss

    monkeypatch.setattr(ARPG, "forward", recording_forward)
    train(make_config(*SMALL, "max_steps=2", f"out_dir={tmp_path}"))
    assert len(returned) == 2 and all(logits is None for logits in returned)


def test_only_the_main_process_copies_the_ema_to_the_cpu(monkeypatch):
    """`EMA.state_dict` and `Run.ema_model` run on every process (gathering FSDP shards is
    collective); the copy to the CPU is made on the main process alone."""
    model = create_model("ARPG-tiny", dim=32, n_layer=2, n_head=2, multiple_of=32, vocab_size=16, block_size=16,
                         num_classes=4)
    ema = EMA(model, decay=0.9)
    copies, cpu = [], torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: copies.append(self) or cpu(self, *a, **k))
    config = make_config(*SMALL)
    for main in (False, True):
        copies.clear()
        run = Run(config, model.config, SimpleNamespace(is_main_process=main, device=torch.device("cpu")), model, model,
                  None, ema, step=0, steps_per_epoch=1, total_steps=1, record={})
        state, ema_model = ema.state_dict(keep=main), run.ema_model()
        assert len(copies) == (2 * len(ema.tensors) if main else 0)
        assert (state is None) == (ema_model is None) == (not main)
    assert state.keys() == model.state_dict().keys() and ema_model.sampling == config.sampling
    for name, tensor in ema_model.state_dict().items():
        assert torch.equal(tensor, state[name]) and torch.equal(tensor, model.state_dict()[name])


def test_fsdp_reduces_gradients_in_float32_under_bf16():
    """FSDP2 gathers parameters in bf16 but sums gradients in float32, as DDP does; accelerate sets
    its own policy (bf16 reductions) on GPU processes unless one is given, which it keeps."""
    for precision, low in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        plugin = _fsdp_plugin(precision)
        plugin.set_mixed_precision(precision)  # what accelerate's state does on a GPU process
        policy = plugin.mixed_precision_policy
        assert (policy.param_dtype, policy.reduce_dtype) == (low, torch.float32)
    assert _fsdp_plugin("no").mixed_precision_policy is None  # float32 throughout


def test_process_group_timeout_comes_from_the_setting():
    default = make_config(*SMALL).runtime
    assert default.collective_timeout_minutes == 60
    for minutes in (default.collective_timeout_minutes, 5):
        accelerator = _make_accelerator(dataclasses.replace(default, collective_timeout_minutes=minutes))
        assert accelerator.init_handler.to_kwargs() == {"timeout": timedelta(minutes=minutes)}
    with pytest.raises(SettingError, match="runtime.collective_timeout_minutes"):
        train(make_config(*SMALL, "runtime.collective_timeout_minutes=0"))


def _tf32_flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize("setting", [True, False])
def test_training_runs_under_its_tf32_setting_and_restores_the_flags(tmp_path, monkeypatch, setting):
    before, seen = _tf32_flags(), set()
    forward = ARPG.forward

    def recording_forward(self, *args, **kwargs):
        seen.add(_tf32_flags())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(ARPG, "forward", recording_forward)
    train(make_config(*SMALL, "max_steps=1", f"runtime.tf32={str(setting).lower()}", f"out_dir={tmp_path}"))
    assert seen == {(setting, setting)} and _tf32_flags() == before


def test_fid_features_are_extracted_in_true_float32():
    seen = set()

    def extractor(images):
        seen.add(_tf32_flags())
        return np.zeros((len(images), 2)), np.full((len(images), 2), 0.5)

    before = _tf32_flags()
    with tf32(True):
        features, _ = extract_features(extractor, np.zeros((3, 4, 4, 3), np.uint8), batch_size=2)
        assert _tf32_flags() == (True, True)
    assert seen == {(False, False)} and features.shape == (3, 2) and _tf32_flags() == before


def _mapped_from(path: Path, tensor: torch.Tensor) -> bool:
    """Whether `tensor`'s memory is a mapping of the file at `path` (Linux: /proc/self/maps)."""
    address, target = tensor.untyped_storage().data_ptr(), str(path.resolve())
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return True
    return False


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the memory map of a Linux process")
def test_published_pt_files_are_memory_mapped_not_read(tmp_path):
    """Processes that load one published `.pt` share its pages instead of each holding a copy."""
    model = create_model("ARPG-tiny", dim=64, vocab_size=32, block_size=16, num_classes=10)
    path = tmp_path / "published.pt"
    torch.save({"model": model.state_dict(), "optimizer": {"state": {0: torch.zeros(1000)}}}, path)
    loaded = load_model(path, model_name="ARPG-tiny", dim=64, block_size=16)
    assert all(_mapped_from(path, p) for p in loaded.parameters())
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), model.parameters()))
    legacy = tmp_path / "legacy.pt"  # torch.save's format before 1.6 cannot be mapped: read whole
    torch.save({"model": model.state_dict()}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(load_model(legacy, model_name="ARPG-tiny", dim=64, block_size=16).head.weight,
                       model.head.weight)
