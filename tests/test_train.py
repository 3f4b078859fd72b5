"""The training loop: configs, validation, exact resume, learning, and DDP equivalence (CPU)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from arpg.checkpoint import load_model
from arpg.cli import compose_config
from arpg.data import digits_dataset
from arpg.quality import digits_class_accuracy, digits_judge
from arpg.train import TrainConfig, learning_rate, train

REPO = Path(__file__).resolve().parent.parent

# A model small enough that a step takes milliseconds; dropout on, so resume must restore it too.
SMALL = ["model.dim=32", "model.n_layer=2", "model.n_head=2", "model.multiple_of=32",
         "model.token_dropout_p=0.1", "model.resid_dropout_p=0.1", "model.ffn_dropout_p=0.1",
         "optim.batch_size=16", "optim.warmup_epochs=0.1", "optim.ema_decay=0.9",
         "log_every=1", "tensorboard=false", "sample.per_class=0", "sample.eval_samples=0"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one intra-op thread is as fast, and far faster when the cores are
    shared with other processes (OpenMP threads then spin waiting for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# 2 accumulated micro-batches of 32; the 359 test digits make 5 steps an epoch, so 8 steps cross
# an epoch boundary and a resume at step 2 or 4 must find its place in the data order.
RESUME = [*SMALL, "data.split=test", "optim.batch_size=64", "optim.grad_accum=2", "max_steps=8", "ckpt_every=2"]


def make_config(*overrides: str) -> TrainConfig:
    """Compose configs/train.yaml with overrides, exactly as scripts/train.py would."""
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
    ("sample.per_class=1 sample.tokenizer=vq16 sample.vq_ckpt=/missing/vq.pt",
     "sample.vq_ckpt '/missing/vq.pt' not found"),
])
def test_bad_config_fails_before_any_work(tmp_path, override, message):
    out_dir = tmp_path / "run"
    config = make_config(*SMALL, *override.split(), f"out_dir={out_dir}")
    with pytest.raises(ValueError, match=re.escape(message)):
        train(config)
    assert not out_dir.exists()  # nothing was written


def test_learning_rate_warms_up_then_decays_to_min():
    lrs = [learning_rate(s, total_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-5) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-5, rel=0.05)


# ---------------------------------------------------------------------------------------------
# Resume


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """8 steps in one go, with every output switched on: TensorBoard, a sample grid at step 4 and at
    the end, and the digits accuracy."""
    out_dir = tmp_path_factory.mktemp("straight")
    result = train(make_config(*RESUME, f"out_dir={out_dir}",
                               "tensorboard=true", "sample.per_class=2", "sample.every_steps=4",
                               "sample.eval_samples=20"))
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
    assert 0.0 <= result.digits_accuracy <= 1.0
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
    config = make_config(*SMALL, "model.dim=48", "max_steps=8", f"resume={straight.checkpoint}",
                         f"out_dir={tmp_path}")
    with pytest.raises(ValueError, match="another model config"):
        train(config)


# ---------------------------------------------------------------------------------------------
# Learning


def test_digits_accuracy_tells_real_digits_from_noise(straight_run):
    real = torch.stack([tokens for tokens, _ in digits_dataset()])
    labels = torch.tensor([label for _, label in digits_dataset()])
    assert digits_judge().accuracy(real, labels) > 0.95
    barely_trained = load_model(straight_run[0].weights)  # 8 steps: noise
    assert digits_class_accuracy(barely_trained, num_samples=100) < 0.3


def test_loss_falls_well_below_uniform_on_digits(tmp_path):
    result = train(make_config(*SMALL, "optim.batch_size=32", "optim.lr=3e-3", "max_steps=300", "log_every=25",
                               f"out_dir={tmp_path}"))
    uniform = math.log(17)  # cross-entropy of guessing among the 17 grey levels: 2.83
    pixels = torch.stack([tokens for tokens, _ in digits_dataset()]).flatten()
    frequencies = torch.bincount(pixels, minlength=17).float() / pixels.numel()
    unigram = -(frequencies[frequencies > 0] * frequencies[frequencies > 0].log()).sum().item()  # 2.06
    first, last = result.loss_log[0][1], result.loss_log[-1][1]
    assert first > unigram  # starts near uniform
    # Below what grey-level frequencies alone can reach: it has learnt shapes, not just ink density.
    assert last < unigram - 0.25 < 0.65 * uniform, result.loss_log


# ---------------------------------------------------------------------------------------------
# Multi-process


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, strategy):
    """torchrun x 2 (gloo, 1 micro-batch each; DDP or FSDP2) == 1 process accumulating 2 micro-batches.

    Both cut each global batch of 16 into the same two slices of 8, and a slice's order, class
    dropout and dropout masks are derived from (seed, step, slice), so the updates agree up to
    float summation order. About 15-50 s each on 2 cores.
    """
    common = [*SMALL, "max_steps=4", "runtime.device=cpu"]
    multi_dir, single_dir = tmp_path / strategy, tmp_path / "single"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    subprocess.run([*launch, str(REPO / "scripts" / "train.py"), *common, f"runtime.strategy={strategy}",
                    f"out_dir={multi_dir}"], check=True, env=env, cwd=tmp_path, timeout=300)
    train(make_config(*common, "optim.grad_accum=2", f"out_dir={single_dir}"))
    multi = checkpoint_state(multi_dir / "checkpoints" / "step_0000004.pt")
    single = checkpoint_state(single_dir / "checkpoints" / "step_0000004.pt")
    assert len(multi["rng"]) == 2 and len(single["rng"]) == 1  # one RNG state per process
    assert_states_equal(multi, single)
