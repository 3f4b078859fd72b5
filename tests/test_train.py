"""The training loop: configs, validation, exact resume, learning, and DDP equivalence (CPU)."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException
from PIL import Image
from torch.optim.optimizer import register_optimizer_step_pre_hook

from arpg import create_model
from arpg.checkpoint import load_model, save
from arpg.cli import compose_config
from arpg.data import ShardWriter, digits_dataset
from arpg.errors import SettingError, TrainingDiverged
from arpg.files import LOCK_NAME, FolderLock
from arpg.digits_judge import digits_class_accuracy, digits_judge, sample_digits
from arpg.tokenizer import VQConfig, VQTokenizer
from arpg.train import TrainConfig, TrainResult, learning_rate, train
from arpg.train.config import resolve
from arpg.train.state import EMA, read_training_state

from conftest import in_child, run_script

REPO = Path(__file__).resolve().parent.parent

# A model small enough that a step takes milliseconds; dropout on, so resume must restore it too.
SMALL = ["model.dim=32", "model.n_layer=2", "model.n_head=2", "model.multiple_of=32",
         "model.token_dropout_p=0.1", "model.resid_dropout_p=0.1", "model.ffn_dropout_p=0.1",
         "optim.batch_size=16", "optim.warmup_epochs=0.1", "optim.ema_decay=0.9",
         "log_every=1", "tensorboard=false", "grids.per_class=0", "grids.eval_samples=0"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models


# 2 accumulated micro-batches of 32; the 359 test digits make 5 steps an epoch, so 8 steps cross
# an epoch boundary and a resume at step 2 or 4 must find its place in the data order.
RESUME = [*SMALL, "data.split=test", "optim.batch_size=64", "optim.grad_accum=2", "max_steps=8", "ckpt_every=2"]


def make_config(*overrides: str) -> TrainConfig:
    """Compose arpg/configs/train.yaml with overrides, exactly as scripts/train.py would."""
    return compose_config("train", TrainConfig, overrides)


def checkpoint_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_states_equal(a: dict, b: dict) -> None:
    for entry in ("model", "ema"):
        assert a[entry].keys() == b[entry].keys()
        for key in a[entry]:
            torch.testing.assert_close(a[entry][key], b[entry][key], rtol=0, atol=1e-6, msg=f"{entry}.{key}")
    for pid, state in a["optimizer"]["state"].items():
        torch.testing.assert_close(state["exp_avg"], b["optimizer"]["state"][pid]["exp_avg"], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Configs and validation


def test_default_config_is_the_tiny_digits_recipe():
    config = make_config()
    assert (config.model.name, config.data.name, config.order) == ("ARPG-tiny", "digits", None)  # None: random
    assert config.model.cls_rope == "identity"
    assert config.runtime.mixed_precision == "no" and config.sampling.steps == 8
    resolved = resolve(config, digits_dataset())  # what the data decides: the name, folder and grids
    assert (resolved.name, resolved.out_dir) == ("tiny_digits", "runs/tiny_digits")
    assert (resolved.grids.tokenizer, resolved.grids.classes) == ("pixel", list(range(10)))


def test_imagenet_experiment_is_the_published_recipe():
    config = make_config("experiment=imagenet_arpg_l")
    o, m = config.optim, config.model
    assert m.name == "ARPG-L" and config.epochs == 400 and config.data.name == "codes"
    assert (o.batch_size, o.lr, o.min_lr, o.weight_decay, o.beta1, o.beta2, o.grad_clip) == \
        (1024, 4e-4, 1e-5, 0.05, 0.9, 0.95, 1.0)
    assert o.lr == pytest.approx(1e-4 * o.batch_size / 256)
    assert (m.resid_dropout_p, m.ffn_dropout_p, m.token_dropout_p, m.class_dropout_prob) == (0.1, 0.1, 0.1, 0.1)
    assert config.runtime.mixed_precision == "bf16"


@pytest.mark.parametrize("override, key", [("optim.lrr=1", "optim.lrr"), ("orderr=raster", "orderr"),
                                           ("model=Q", "model/Q"), ("optim.lr=fast", "optim.lr")])
def test_typo_in_override_is_an_error_naming_the_key(override, key):
    with pytest.raises(ConfigCompositionException, match=re.escape(key)):
        make_config(override)


def test_appended_unknown_key_is_an_error_naming_it(tmp_path):
    # `+key=value` (which Hydra suggests for unknown keys) slips through the schema; composing refuses it.
    with pytest.raises(ValueError, match=re.escape("unknown config keys ['optim.lrr']")):
        make_config(*SMALL, "+optim.lrr=1", f"out_dir={tmp_path / 'run'}")


@pytest.mark.parametrize("override, message", [
    ("model.name=ARPG-Q", "model.name must be one of"),
    ("optim.lr=-1e-3", "optim.lr must be > 0"),
    ("optim.grad_accum=3", "optim.batch_size must be divisible by num_processes x optim.grad_accum"),
    ("data=codes data.path=/nonexistent/codes", "data.path '/nonexistent/codes'"),
    ("order=spiral", "order must be one of"),
    ("grids.per_class=1 grids.tokenizer=vq16 grids.vq_ckpt=/missing/vq.pt",
     "grids.vq_ckpt '/missing/vq.pt' not found"),
    # checked against the data (8x8 digits, 17 grey levels, 10 classes, 1797 images) before any work
    ("grids.per_class=1 sampling.steps=100", "sampling.steps must be in [1, 64], got 100"),
    ("grids.eval_samples=10 sampling.schedule=regions", "sampling.schedule='regions'"),
    ("grids.per_class=1 grids.classes=[0,11]", "grids.classes must be class ids in [0, 10)"),
    ("optim.batch_size=4096", "optim.batch_size must be <= the data set size 1797"),
    ("grids.per_class=1 grids.classes=[]", "grids.classes must name at least one class"),
    ("resume_changes=[model]", "resume_changes must name some of"),
])
def test_bad_config_fails_before_any_work(tmp_path, override, message):
    out_dir = tmp_path / "run"
    config = make_config(*SMALL, "max_steps=1", *override.split(), f"out_dir={out_dir}")
    with pytest.raises(ValueError, match=re.escape(message)):
        train(config)
    assert not out_dir.exists()  # nothing was written


@pytest.mark.parametrize("override, message", [
    ("sampling.steps=0", "sampling.steps must be an int >= 1"), ("sampling.top_p=0", "sampling.top_p must be in"),
    ("sampling.cfg=-1", "sampling.cfg must be >= 0"), ("sampling.schedule=foo", "sampling.schedule must be one of"),
])
def test_a_bad_section_setting_is_named_with_its_section(override, message):
    with pytest.raises(SettingError, match=re.escape(message)):
        make_config(override)


def test_learning_rate_warms_up_then_decays_to_min():
    lr, low = 1e-3, 1e-5
    lrs = [learning_rate(s, total_steps=110, warmup_steps=10, lr=lr, min_lr=low) for s in range(120)]
    # Linear warmup: step s (0-based) runs at lr * (s + 1) / 10.
    assert lrs[:10] == pytest.approx([lr * (s + 1) / 10 for s in range(10)])
    # Then half a cosine over the remaining 100 steps, from lr down to min_lr: a linear decay would
    # be at 75% of the way at a quarter, a cosine is at (1 + cos(pi / 4)) / 2 = 85.4%.
    decay = [(x - low) / (lr - low) for x in lrs[10:111]]
    assert decay[0] == pytest.approx(1.0) and decay[50] == pytest.approx(0.5) and decay[100] == pytest.approx(0.0)
    assert decay[25] == pytest.approx((1 + math.cos(math.pi / 4)) / 2) and decay[75] == pytest.approx(
        (1 + math.cos(3 * math.pi / 4)) / 2)
    # Slow at both ends, fastest in the middle; then min_lr for steps past the schedule.
    drops = np.diff(decay)
    assert abs(drops[0]) < abs(drops[49]) > abs(drops[99])
    assert lrs[110:] == pytest.approx([low] * 10)


def test_ema_after_updates_of_a_two_parameter_model():
    model = torch.nn.Linear(1, 1)  # two parameters: weight (1, 1) and bias (1,)
    with torch.no_grad():
        model.weight.fill_(1.0), model.bias.fill_(-2.0)
    ema = EMA(model, decay=0.75)
    with torch.no_grad():
        model.weight.fill_(3.0), model.bias.fill_(4.0)
    ema.update(model)
    # decay * average + (1 - decay) * weights: 0.75 * 1 + 0.25 * 3 = 1.5 and 0.75 * -2 + 0.25 * 4 = -0.5
    state = ema.state_dict()
    assert state.keys() == {"weight", "bias"}
    assert torch.equal(state["weight"], torch.tensor([[1.5]])) and torch.equal(state["bias"], torch.tensor([-0.5]))
    ema.update(model)  # 0.75 * 1.5 + 0.25 * 3 = 1.875 and 0.75 * -0.5 + 0.25 * 4 = 0.625
    assert torch.equal(ema.state_dict()["weight"], torch.tensor([[1.875]]))
    assert torch.equal(ema.state_dict()["bias"], torch.tensor([0.625]))


# The 359 test digits in batches of 16 are 22 steps an epoch: warmup_epochs=0.1 is round(2.2) = 2
# warmup steps; a checkpoint after each of the 6 steps, all kept.
SIX_STEPS = [*SMALL, "data.split=test", "max_steps=6", "optim.lr=1e-3", "optim.min_lr=1e-4", "ckpt_every=1",
             "keep_checkpoints=6"]


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    """A 6-step run; the learning rate of every param group at each optimizer.step call."""
    out_dir = tmp_path_factory.mktemp("six_steps")
    seen = []
    hook = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: seen.append([group["lr"] for group in optimizer.param_groups]))
    try:
        result = train(make_config(*SIX_STEPS, f"out_dir={out_dir}"))
    finally:
        hook.remove()
    return result, seen


def test_the_loop_runs_each_step_at_the_scheduled_learning_rate(six_steps):
    result, seen = six_steps
    # Worked by hand from the schedule's definition (lr 1e-3, min_lr 1e-4, 2 warmup steps, 6 steps):
    # warmup 1e-3 * 1/2, 1e-3 * 2/2; then half a cosine over the 4 remaining steps at progress
    # 0, 1/4, 1/2, 3/4: min_lr + (lr - min_lr) * (1 + cos(pi * progress)) / 2.
    cosine = [1e-4 + 9e-4 * (1 + math.cos(math.pi * progress)) / 2 for progress in (0, 0.25, 0.5, 0.75)]
    expected = [5e-4, 1e-3, *cosine]  # 5e-4, 1e-3, 1e-3, 8.682e-4, 5.5e-4, 2.318e-4
    assert len(seen) == 6 and all(len(set(groups)) == 1 for groups in seen)  # one rate for every param group
    assert [groups[0] for groups in seen] == pytest.approx(expected, rel=1e-12)
    # Each checkpoint records the rate of the step that made it.
    for step in range(1, 7):
        state = checkpoint_state(result.out_dir / "checkpoints" / f"step_{step:07d}.pt")
        assert state["lr_schedule"]["lr"] == pytest.approx(expected[step - 1], rel=1e-12)


def test_the_loop_updates_the_ema_after_each_optimizer_step(six_steps):
    # ema_decay=0.9: the EMA after step s is 0.9 * the EMA after step s - 1 + 0.1 * the weights after step s.
    result, _ = six_steps
    states = [checkpoint_state(result.out_dir / "checkpoints" / f"step_{step:07d}.pt") for step in range(1, 7)]
    for before, after in zip(states, states[1:]):
        for name, average in after["ema"].items():
            expected = 0.9 * before["ema"][name] + 0.1 * after["model"][name]
            torch.testing.assert_close(average, expected, rtol=0, atol=1e-6, msg=f"step {after['step']}: {name}")
    # and the exported weights are the last EMA
    exported = load_model(result.weights).state_dict()
    assert all(torch.equal(exported[name], value) for name, value in states[-1]["ema"].items())


# ---------------------------------------------------------------------------------------------
# Resume


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """8 steps in one go, with every output switched on: TensorBoard, a sample grid at step 4 and at
    the end, and the digits accuracy."""
    out_dir = tmp_path_factory.mktemp("straight")
    result = train(make_config(*RESUME, f"out_dir={out_dir}",
                               "tensorboard=true", "grids.per_class=2", "grids.every_steps=4",
                               "grids.eval_samples=20"))
    return result, checkpoint_state(out_dir / "checkpoints" / "step_0000008.pt")


def test_a_run_leaves_checkpoint_weights_samples_and_logs(straight_run):
    result, state = straight_run
    out_dir = result.out_dir
    assert result.steps == result.total_steps == 8 and state["step"] == 8
    assert result.checkpoint == out_dir / "checkpoints" / "step_0000008.pt"
    assert result.weights == out_dir / "model.safetensors" and result.weights.is_file()
    assert result.samples == out_dir / "samples" / "final.png"
    assert (out_dir / "samples" / "step_0000004.png").is_file() and result.samples.is_file()
    assert list((out_dir / "tensorboard").glob("events.out.tfevents.*"))
    # The reported accuracy is the judge's verdict on the exported EMA model's samples (20, as configured).
    tokens, labels = sample_digits(load_model(result.weights), 20, options=make_config(*RESUME).sampling)
    assert result.digits_accuracy == (digits_judge().predict(tokens) == labels.numpy()).mean()
    assert state["config"]["model"]["block_size"] == 64 and state["config"]["train"]["optim"]["grad_accum"] == 2
    assert state["lr_schedule"]["step"] == 8 and state["data"] == {"epoch": 1, "batch_in_epoch": 3,
                                                                   "steps_per_epoch": 5, "seed": 0}


def test_resume_is_exact(tmp_path, straight_run):
    straight, straight_state = straight_run
    common = [*RESUME, f"out_dir={tmp_path}"]
    first = train(make_config(*common, "stop_at_step=4"))
    assert first.steps == 4 and first.weights is None  # stopped early: no export yet
    second = train(make_config(*common))  # resume=auto is the default
    assert [s for s, _ in second.loss_log] == [5, 6, 7, 8]
    # Equal floats, not just close; the straight run also drew a sample grid at step 4, which
    # must not disturb training.
    assert first.loss_log + second.loss_log == straight.loss_log
    assert_states_equal(checkpoint_state(tmp_path / "checkpoints" / "step_0000008.pt"), straight_state)
    # keep_checkpoints=3: step 2 was pruned
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt")) == \
        ["step_0000004.pt", "step_0000006.pt", "step_0000008.pt"]


def test_truncated_checkpoint_is_never_resumed(tmp_path, straight_run):
    straight, straight_state = straight_run
    common = [*RESUME, f"out_dir={tmp_path}"]
    train(make_config(*common, "stop_at_step=4"))
    newest = tmp_path / "checkpoints" / "step_0000004.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a write cut short
    resumed = train(make_config(*common))
    assert resumed.loss_log[0][0] == 3  # continued from step 2, the previous complete checkpoint
    assert_states_equal(checkpoint_state(tmp_path / "checkpoints" / "step_0000008.pt"), straight_state)


def test_training_state_loads_as_a_model_and_export_matches_ema(straight_run, tmp_path):
    straight, _ = straight_run
    from_state = load_model(straight.checkpoint, weights="ema")
    exported = load_model(straight.weights)
    assert from_state.config == exported.config and exported.config.block_size == 64
    for key, value in from_state.state_dict().items():
        assert torch.equal(value, exported.state_dict()[key]), key


def test_resume_refuses_a_different_model(tmp_path, straight_run):
    straight, _ = straight_run
    config = make_config(*RESUME, "model.dim=48", f"resume={straight.checkpoint}", f"out_dir={tmp_path}",
                         "resume_changes=[data,seed,order,batch_size,total_steps,warmup_steps]")
    with pytest.raises(ValueError, match=r"another model config \(model.dim: 32 there, 48 now"):
        train(config)
    assert not (tmp_path / "checkpoints").exists()


def test_resume_refuses_other_training_settings_naming_them(tmp_path):
    common = [*RESUME, f"out_dir={tmp_path}"]
    train(make_config(*common, "stop_at_step=2"))
    # A second run with another seed and data on the same folder: refused, naming what differs.
    with pytest.raises(ValueError) as refused:
        train(make_config(*common, "seed=1", "data.split=train", "order=raster"))
    message = str(refused.value)
    for change in ("seed: 0 there, 1 now", "data.split: 'test' there, 'train' now", "data.count: 359 there, 1438 now",
                   "order: None there, 'raster' now", "resume_changes=[data,order,seed,warmup_steps]"):
        assert change in message, message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000002.pt"]


def test_extending_a_finished_run_is_an_explicit_choice(tmp_path, caplog):
    common = [*RESUME, f"out_dir={tmp_path}"]
    finished = train(make_config(*common))
    with pytest.raises(ValueError, match=re.escape("total_steps: 8 there, 10 now")):
        train(make_config(*common, "max_steps=10"))
    with caplog.at_level(logging.WARNING):
        extended = train(make_config(*common, "max_steps=10", "resume_changes=[total_steps]"))
    assert "deliberate change (resume_changes): total_steps: 8 there, 10 now" in caplog.text
    assert (finished.steps, extended.steps, extended.total_steps) == (8, 10, 10)
    assert [s for s, _ in extended.loss_log] == [9, 10]
    assert torch.load(extended.checkpoint, weights_only=True)["run"]["total_steps"] == 10


def test_unreadable_checkpoints_are_set_aside_and_never_counted_as_kept(tmp_path, caplog):
    common = [*RESUME, f"out_dir={tmp_path}", "keep_checkpoints=1"]
    train(make_config(*common, "stop_at_step=6"))
    ckpts = tmp_path / "checkpoints"
    (newest,) = ckpts.glob("step_*.pt")
    assert newest.name == "step_0000006.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # e.g. a disk that filled up during a copy
    with caplog.at_level(logging.WARNING):
        restarted = train(make_config(*common, "stop_at_step=2"))
    # Said loudly; the unreadable file is kept aside and does not push out the new step-2 checkpoint.
    assert "STARTING FROM STEP 0" in caplog.text and "moved aside to step_0000006.pt.corrupt" in caplog.text
    assert restarted.loss_log[0][0] == 1
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000002.pt", "step_0000006.pt.corrupt"]
    assert torch.load(ckpts / "step_0000002.pt", weights_only=True)["step"] == 2


def test_pruning_never_counts_an_unreadable_older_checkpoint(tmp_path, caplog):
    common = [*RESUME, f"out_dir={tmp_path}", "keep_checkpoints=3"]
    train(make_config(*common, "stop_at_step=4"))  # leaves steps 2 and 4
    older = tmp_path / "checkpoints" / "step_0000002.pt"
    older.write_bytes(b"garbage")  # resume=auto reads step 4 and never looks at step 2
    with caplog.at_level(logging.WARNING):
        train(make_config(*common, "stop_at_step=6"))  # 3 to keep: 6, 4 and (not) the garbage
    assert "step_0000002.pt is unreadable, moved aside" in caplog.text
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_0000002.pt.corrupt", "step_0000004.pt", "step_0000006.pt"]


def test_a_second_run_on_the_same_out_dir_is_refused_naming_the_holder(tmp_path):
    with FolderLock(tmp_path, "training"):  # as another process's run would hold it
        with pytest.raises(SettingError, match=rf"{re.escape(str(tmp_path))} is in use by process {os.getpid()} "):
            train(make_config(*SMALL, "max_steps=2", f"out_dir={tmp_path}"))
    assert not (tmp_path / "checkpoints").exists()
    train(make_config(*SMALL, "max_steps=2", f"out_dir={tmp_path}"))  # free again
    assert not (tmp_path / LOCK_NAME).exists()  # released at the end of the run


def test_training_removes_partial_writes_of_a_killed_run(tmp_path):
    common = [*SMALL, "max_steps=4", "ckpt_every=2", f"out_dir={tmp_path}"]
    train(make_config(*common, "stop_at_step=2"))
    # What a SIGKILL inside atomic_write leaves (the fault-injection test below makes real ones).
    leftovers = [tmp_path / "checkpoints" / ".step_0000004.pt.k2j4x9ab.tmp",
                 tmp_path / ".model.safetensors.a1b2c3d4.tmp", tmp_path / "samples" / ".final.png.zz11yy22.tmp"]
    for path in leftovers:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half a file")
    train(make_config(*common))
    assert not [p for p in leftovers if p.exists()] and not list(tmp_path.rglob("*.tmp"))


def test_written_files_get_umask_permissions(tmp_path):
    """safetensors writes its own 0600 file and renames it over the target; atomic_write's mode must win."""
    previous = os.umask(0o027)
    try:
        result = train(make_config(*SMALL, "max_steps=1", f"out_dir={tmp_path / 'run'}"))
        model = create_model("ARPG-tiny", vocab_size=17, block_size=64, num_classes=10, dim=32)
        written = [result.weights, result.checkpoint, save(model, tmp_path / "m.safetensors"),
                   tmp_path / "vq.safetensors"]
        VQTokenizer(VQConfig(codebook_size=8, codebook_embed_dim=4, z_channels=8, ch=32, ch_mult=(1, 2),
                             num_res_blocks=1)).save(written[-1])
    finally:
        os.umask(previous)
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == {p.name: "0o640" for p in written}


def _codes_folder(root: Path, num_classes: int = 3, count: int = 24) -> Path:
    """A token-shard folder like extract_codes writes: 8x8 grey-level tokens (pixel17), `num_classes` classes."""
    rng = np.random.default_rng(0)
    writer = ShardWriter(root, grid_size=(8, 8), codebook_size=17, tokenizer="pixel17", augmentations=1,
                         num_classes=num_classes)
    writer.write_shard(0, rng.integers(0, 17, (count, 1, 64)), np.arange(count) % num_classes)
    writer.finish()
    return root


def test_training_on_codes_takes_tokenizer_classes_and_name_from_the_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _codes_folder(tmp_path / "data" / "my_codes")
    small = [o for o in SMALL if not o.startswith(("grids.per_class", "optim.batch_size"))]
    config = make_config(*small, "data=codes", "data.path=data/my_codes", "optim.batch_size=8", "max_steps=2",
                         "grids.per_class=2")
    assert config.name is config.out_dir is config.grids.tokenizer is config.grids.classes is None
    result = train(config)
    assert result.out_dir == tmp_path / "runs" / "tiny_my_codes"
    with Image.open(result.samples) as grid:  # 3 rows (the data's classes) of 2 images, 8x8 enlarged to 32x32
        assert grid.size == (2 * 34 + 2, 3 * 34 + 2)
    # The digits recipe's classes 0..9 on a 3-class set: refused before any work, naming the setting.
    with pytest.raises(SettingError, match=re.escape("grids.classes must be class ids in [0, 3)")):
        train(make_config(*small, "data=codes", "data.path=data/my_codes", "optim.batch_size=8",
                          "grids.classes=[0,1,2,3,4,5,6,7,8,9]", "name=other"))
    assert not (tmp_path / "runs" / "other").exists()


# ---------------------------------------------------------------------------------------------
# Fault injection: SIGKILL anywhere, then resume


# 8 steps of 2 accumulated micro-batches, a checkpoint every 2 (2 kept: pruning runs), the EMA
# export and a sample grid at the end: every kind of write the loop does.
FAULTS = [*RESUME, "keep_checkpoints=2", "grids.per_class=1"]


def _probe_writes(kill_at: int | None, events: list[str]) -> None:
    """In a child: record every write event of the run in `events`, and SIGKILL the process at the
    `kill_at`-th (1-based). Events: an optimizer step; a file fully written to its temporary name
    (torch.save, safetensors, PNG; the kill cuts that file to half first: a write cut short); an
    fsync; a rename into place; a deletion (pruning, cleanup, the lock's release)."""
    import arpg.export

    def hit(what: str, partial: object = None) -> None:
        events.append(what)
        if len(events) == kill_at:
            if partial is not None and Path(partial).is_file():
                Path(partial).write_bytes(Path(partial).read_bytes()[: Path(partial).stat().st_size // 2])
            os.kill(os.getpid(), signal.SIGKILL)

    def after_writing(what, write):
        def wrapped(*args, **kwargs):
            result = write(*args, **kwargs)
            hit(what, partial=args[1])  # the file argument of torch.save, save_file, Image.save
            return result
        return wrapped

    def before(what, call):
        def wrapped(*args, **kwargs):
            hit(what)
            return call(*args, **kwargs)
        return wrapped

    torch.save = after_writing("torch.save", torch.save)
    arpg.export.save_file = after_writing("safetensors", arpg.export.save_file)
    Image.Image.save = after_writing("png", Image.Image.save)
    os.fsync, os.replace = before("fsync", os.fsync), before("rename", os.replace)
    Path.unlink = before("unlink", Path.unlink)
    torch.optim.AdamW.step = before("step", torch.optim.AdamW.step)


def _assert_same(a, b, where: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def _final_outputs(out_dir: Path) -> dict:
    """What a finished run leaves: its last training state, the exported EMA weights (tensors and
    metadata: safetensors orders the metadata differently from one process to the next) and the PNG."""
    from safetensors import safe_open

    state = checkpoint_state(out_dir / "checkpoints" / "step_0000008.pt")
    with safe_open(str(out_dir / "model.safetensors"), "pt") as f:
        exported = {"metadata": f.metadata(), "tensors": {k: f.get_tensor(k) for k in f.keys()}}
    return {"state": {k: state[k] for k in ("run", "model", "ema", "optimizer", "step", "lr_schedule", "data")},
            "model.safetensors": exported, "final.png": (out_dir / "samples" / "final.png").read_bytes()}


def _kill_and_resume(tmp_path: Path, every: int | None = None, only: tuple[str, ...] = ()) -> tuple[int, list[str]]:
    """Kill a run at write events (all, or the first of each kind in `only`), resume it each time and
    compare with an uninterrupted run. Returns (events in a run, kill points tried)."""
    events: list[str] = []
    log = tmp_path / "events.txt"
    config = make_config(*FAULTS)  # composed once: the runs differ only in their folder

    def run(out_dir: Path) -> TrainResult:
        return train(dataclasses.replace(config, out_dir=str(out_dir)))

    def counted() -> None:
        _probe_writes(None, events)
        run(tmp_path / "counted")
        log.write_text("\n".join(events))

    run(tmp_path / "reference")  # in this process: the children forked from it start warm
    expected = _final_outputs(tmp_path / "reference")
    assert in_child(counted) == 0
    events = log.read_text().splitlines()
    _assert_same(_final_outputs(tmp_path / "counted"), expected, "a forked uninterrupted run")
    points = range(1, len(events) + 1) if not only else [events.index(kind) + 1 for kind in only]
    for point in points:
        out_dir = tmp_path / f"killed_at_{point}"
        assert in_child(lambda: (_probe_writes(point, []), run(out_dir))) == -signal.SIGKILL, \
            f"event {point} ({events[point - 1]}) did not kill the run"
        assert in_child(lambda: run(out_dir)) == 0
        _assert_same(_final_outputs(out_dir), expected, f"killed at {point} ({events[point - 1]})")
        leftovers = [p.name for p in out_dir.rglob("*") if p.name.endswith((".tmp", ".corrupt")) or p.name == LOCK_NAME]
        assert not leftovers, f"killed at {point} ({events[point - 1]}): {leftovers}"
    return len(events), [events[p - 1] for p in points]


def test_a_run_killed_inside_its_writes_resumes_bit_identical(tmp_path):
    """SIGKILL mid-way through writing a checkpoint and the exported weights (each file cut to half):
    each resumed run ends bit-identical to an uninterrupted one and leaves no temporary file. The
    slow test below kills at every write event."""
    _, tried = _kill_and_resume(tmp_path, only=("torch.save", "safetensors"))
    assert tried == ["torch.save", "safetensors"]


@pytest.mark.slow
def test_a_run_killed_at_any_write_event_resumes_bit_identical(tmp_path):
    count, tried = _kill_and_resume(tmp_path)
    print(f"{count} kill points, every resumed run bit-identical: {sorted(set(tried))}")
    assert count == len(tried) > 30


# ---------------------------------------------------------------------------------------------
# Non-finite training: stop before saving, keep the last good checkpoint, resume from it


def _non_finite(patch: pytest.MonkeyPatch, loss_at: set[int] = frozenset(), weights_at: set[int] = frozenset()) -> None:
    """Make the loss of every micro-batch of these 1-based optimizer steps NaN (its gradients follow),
    or set a weight to inf right after these steps' updates (an update that overflowed)."""
    import arpg.train.loop
    from arpg.models.arpg import ARPG

    current = {"step": 0}
    make_generator, forward, update = arpg.train.loop._micro_batch_generator, ARPG.forward, torch.optim.AdamW.step

    def tracking(config, step, slice_index, device):
        current["step"] = step + 1
        return make_generator(config, step, slice_index, device)

    def poisoned(self, *args, **kwargs):
        logits, loss = forward(self, *args, **kwargs)
        return logits, loss * math.nan if current["step"] in loss_at else loss

    def overflowing(self, *args, **kwargs):
        result = update(self, *args, **kwargs)
        if current["step"] in weights_at:
            self.param_groups[0]["params"][0].data[0] = math.inf
        return result

    patch.setattr(arpg.train.loop, "_micro_batch_generator", tracking)
    patch.setattr(ARPG, "forward", poisoned)
    patch.setattr(torch.optim.AdamW, "step", overflowing)


def _assert_finite_checkpoints(ckpt_dir: Path) -> list[str]:
    """Every checkpoint left reads completely, holds only finite numbers and loads as a model; their names."""
    names = sorted(p.name for p in ckpt_dir.iterdir())
    for name in names:
        state = read_training_state(ckpt_dir / name)
        tensors = [*state["model"].values(), *state["ema"].values(),
                   *(t for s in state["optimizer"]["state"].values() for t in s.values())]
        assert all(torch.isfinite(t).all() for t in tensors), name
        load_model(ckpt_dir / name, weights="ema")
    return names


def test_a_run_stopped_by_a_non_finite_loss_resumes_bit_identical(tmp_path, monkeypatch):
    """A NaN loss at step 5 (of 8, checkpoints every 2, two kept): the run stops at step 5 naming the
    checkpoint of step 4 as its last good state and writes nothing else (no model.safetensors, no
    grid); resumed, it ends bit-identical to a run that never saw the NaN."""
    config = make_config(*FAULTS)
    train(dataclasses.replace(config, out_dir=str(tmp_path / "reference")))
    out_dir = tmp_path / "stopped"
    last_good = out_dir / "checkpoints" / "step_0000004.pt"
    with monkeypatch.context() as patch:
        _non_finite(patch, loss_at={5})
        with pytest.raises(TrainingDiverged, match=rf"^training stopped at step 5: the loss, the gradient norm and the "
                                                   rf"weights became non-finite \(NaN or inf\) at step 5 \(learning rate "
                                                   rf"0\.00\d+\), in 1 step\(s\); nothing of it was saved; the last good "
                                                   rf"checkpoint is {re.escape(str(last_good))}; to go on from it rerun the "
                                                   rf"same command with resume={re.escape(str(last_good))} and a lower "
                                                   rf"optim.lr \(this run: 0.008; e.g. 0.004\)$"):
            train(dataclasses.replace(config, out_dir=str(out_dir)))
    assert _assert_finite_checkpoints(out_dir / "checkpoints") == ["step_0000002.pt", "step_0000004.pt"]
    assert not (out_dir / "model.safetensors").exists() and not list(out_dir.rglob("*.png"))
    train(dataclasses.replace(config, out_dir=str(out_dir)))  # resume=auto takes step 4
    _assert_same(_final_outputs(out_dir), _final_outputs(tmp_path / "reference"), "resumed after a non-finite stop")


def test_a_non_finite_checkpoint_is_never_resumed_nor_counted_as_kept(tmp_path, straight_run, caplog):
    """A diverged checkpoint (NaN weights) in the folder, as a run without these checks left them:
    resume=auto moves it aside and continues from the finite one before it."""
    straight, straight_state = straight_run
    common = [*RESUME, f"out_dir={tmp_path}"]
    train(make_config(*common, "stop_at_step=4"))
    newest = tmp_path / "checkpoints" / "step_0000004.pt"
    state = checkpoint_state(newest)
    next(iter(state["model"].values())).fill_(math.nan)
    torch.save(state, newest)
    with caplog.at_level(logging.WARNING, logger="arpg.train.state"):
        resumed = train(make_config(*common))
    assert "step_0000004.pt holds non-finite weights" in caplog.text
    assert resumed.loss_log[0][0] == 3  # from step 2
    assert (tmp_path / "checkpoints" / "step_0000004.pt.corrupt").is_file()
    assert_states_equal(checkpoint_state(tmp_path / "checkpoints" / "step_0000008.pt"), straight_state)


def test_non_finite_weights_stop_the_run_although_loss_and_gradients_were_finite(tmp_path, monkeypatch):
    _non_finite(monkeypatch, weights_at={3})
    with pytest.raises(TrainingDiverged, match=r"^training stopped at step 3: the weights became non-finite \(NaN or "
                                               r"inf\) by step 3; nothing of it was saved; the last good checkpoint is "
                                               r".*step_0000002\.pt;"):
        train(make_config(*RESUME, f"out_dir={tmp_path}"))
    assert _assert_finite_checkpoints(tmp_path / "checkpoints") == ["step_0000002.pt"]


def test_skip_nonfinite_steps_skips_that_many_then_stops(tmp_path, monkeypatch, caplog):
    config = make_config(*RESUME, "skip_nonfinite_steps=1")
    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING, logger="arpg.train.nonfinite"):
        _non_finite(patch, loss_at={3})
        result = train(dataclasses.replace(config, out_dir=str(tmp_path / "one")))
    assert result.steps == 8
    assert "step 3: non-finite gradient norm, step skipped (1 of skip_nonfinite_steps=1;" in caplog.text
    _assert_finite_checkpoints(tmp_path / "one" / "checkpoints")
    state = checkpoint_state(tmp_path / "one" / "checkpoints" / "step_0000008.pt")
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {7}  # AdamW applied 7 of 8 steps
    with monkeypatch.context() as patch:
        _non_finite(patch, loss_at={3, 4})
        with pytest.raises(TrainingDiverged, match=r"^training stopped at step 4: the loss and the gradient norm became "
                                                   r"non-finite \(NaN or inf\) at step 3 .*, in 2 step\(s\); "
                                                   r"skip_nonfinite_steps=1 exceeded; .*step_0000002\.pt;"):
            train(dataclasses.replace(config, out_dir=str(tmp_path / "two")))
    assert _assert_finite_checkpoints(tmp_path / "two" / "checkpoints") == ["step_0000002.pt"]


def test_a_diverging_digits_run_stops_with_one_line_and_resumes_with_a_lower_learning_rate(tmp_path, capsys):
    """The digits default (ARPG-tiny) at a learning rate far too high (it diverges during the warmup,
    at step 15 or so, depending on the CPU), a checkpoint every 4 steps, two kept: exit status 1, one line naming the
    step and the last good checkpoint, every checkpoint left finite and loadable, the newest the one
    named; no model.safetensors. Resumed from the oldest kept one with a low learning rate, the run
    finishes with finite weights."""
    command = ["optim.lr=30", "max_steps=24", "ckpt_every=4", "keep_checkpoints=2", "tensorboard=false",
               "grids.per_class=0", "grids.eval_samples=0", f"out_dir={tmp_path}"]
    assert run_script("train", *command) == 1
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    stopped = re.fullmatch(r"error: training stopped at step (\d+): (.*) became non-finite \(NaN or inf\) at step "
                           r"(\d+) .*; nothing of it was saved; the last good checkpoint is (\S+); to go on from it "
                           r"rerun the same command with resume=\4 and a lower optim.lr \(this run: 30; e.g. 15\) "
                           r"\(set ARPG_TRACEBACK=1 for the traceback\)", line)
    assert stopped, line
    step, first_bad, last_good = int(stopped.group(1)), int(stopped.group(3)), Path(stopped.group(4))
    # Checked at the checkpoint boundaries (log_every=50): the first one after the first bad step.
    assert step % 4 == 0 and step - 4 < first_bad <= step < 24
    # which of them overflows first depends on the CPU's float kernels
    assert set(re.split(r", | and ", stopped.group(2))) <= {"the loss", "the gradient norm", "the weights"}
    names = _assert_finite_checkpoints(tmp_path / "checkpoints")
    assert names == [f"step_{s:07d}.pt" for s in (step - 8, step - 4) if s > 0] and last_good.name == names[-1]
    assert not (tmp_path / "model.safetensors").exists()
    # The newest finite checkpoint can be past saving already (huge weights); the oldest kept one is not.
    oldest = last_good.parent / names[0]
    assert run_script("train", *command, f"resume={oldest}", "optim.lr=1e-4") == 0
    assert f"resuming from {oldest} at step {int(names[0][5:12])}" in capsys.readouterr().out
    weights = load_model(tmp_path / "model.safetensors")
    assert all(torch.isfinite(p).all() for p in weights.parameters())


# ---------------------------------------------------------------------------------------------
# Learning


def test_digits_accuracy_tells_real_digits_from_noise(straight_run):
    judge = digits_judge()
    digits = digits_dataset()
    held_out = torch.arange(len(digits)) % 2 == 1  # the half the judge was not fitted on
    assert judge.accuracy(digits.tokens[held_out], digits.labels[held_out]) > 0.95
    noise = torch.randint(0, 17, (500, 64), generator=torch.Generator().manual_seed(0))
    assert judge.accuracy(noise, torch.arange(500) % 10) < 0.3
    barely_trained = load_model(straight_run[0].weights)  # 8 steps: noise
    assert digits_class_accuracy(barely_trained, num_samples=100) < 0.3


def _entropy(tokens: torch.Tensor) -> float:
    """Entropy (nats) of the grey levels in `tokens`, by their frequencies."""
    p = torch.bincount(tokens.flatten(), minlength=17).double() / tokens.numel()
    return -(p[p > 0] * p[p > 0].log()).sum().item()


def test_loss_starts_uniform_and_falls_below_the_per_position_entropy_on_digits(tmp_path):
    result = train(make_config(*SMALL, "optim.batch_size=32", "optim.lr=3e-3", "max_steps=300", "log_every=1",
                               f"out_dir={tmp_path}"))
    losses = [loss for _, loss in result.loss_log]
    # The output head starts at zero: every first prediction is uniform over the 17 grey levels.
    assert losses[0] == pytest.approx(math.log(17), abs=1e-5)
    # A model of independent pixels, each with its own position's grey-level frequencies (where the
    # ink usually is), scores the mean per-position entropy: 1.67 nats. Falling below it takes more
    # than ink density: the class or the shapes around a pixel. (The last 25 steps, with dropout on.)
    pixels = torch.stack([tokens for tokens, _ in digits_dataset()])  # (1797, 64)
    per_position = sum(_entropy(pixels[:, p]) for p in range(64)) / 64
    assert sum(losses[-25:]) / 25 < per_position, losses[-25:]


# ---------------------------------------------------------------------------------------------
# Multi-process


def test_two_processes_ddp_and_fsdp_equal_one_process_with_the_same_global_batch(tmp_path):
    """torchrun x 2 (gloo, 1 micro-batch each; DDP, then FSDP2) == 1 process accumulating 2 micro-batches.

    Both cut each global batch of 16 into the same two slices of 8, and a slice's order, class
    dropout and dropout masks are derived from (seed, step, slice), so the updates agree up to
    float summation order. Under FSDP each process holds only its shard of every parameter and of
    its EMA (checked inside the processes by tests/two_process_training.py).
    """
    common = [*SMALL, "max_steps=2", "runtime.device=cpu"]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    subprocess.run([*launch, str(REPO / "tests" / "two_process_training.py"), str(tmp_path), *common],
                   check=True, env=env, cwd=tmp_path, timeout=300)
    train(make_config(*common, "optim.grad_accum=2", f"out_dir={tmp_path / 'single'}"))
    single = checkpoint_state(tmp_path / "single" / "checkpoints" / "step_0000002.pt")
    for strategy in ("ddp", "fsdp"):
        multi = checkpoint_state(tmp_path / strategy / "checkpoints" / "step_0000002.pt")
        assert len(multi["rng"]) == 2 and len(single["rng"]) == 1  # one RNG state per process
        assert_states_equal(multi, single)
    held = [tuple(map(int, (tmp_path / f"fsdp_rank{r}.txt").read_text().split())) for r in (0, 1)]
    total = sum(v.numel() for v in single["model"].values())
    assert [t for _, t in held] == [total, total] and sum(h for h, _ in held) == total  # two halves, no overlap
