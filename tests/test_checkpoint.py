import argparse
import logging

import pytest
import torch

from arpg import MODEL_SIZES, create_model
from arpg.checkpoint import load_model, load_weights, save
from arpg.files import atomic_write


def _small(**overrides):
    torch.manual_seed(0)
    model = create_model("ARPG-tiny", vocab_size=16, block_size=16, num_classes=4, dim=64, **overrides)
    torch.nn.init.normal_(model.head.weight)
    return model.eval()


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_safetensors_round_trip_keeps_config(tmp_path):
    model = _small(cls_rope="identity")
    path = save(model, tmp_path / "m.safetensors")
    loaded = load_model(path)
    assert loaded.config == model.config and not loaded.training
    assert _same_weights(model, loaded)


def test_published_pt_layouts(tmp_path, caplog, arpg_golden):
    model = _small()
    state = model.state_dict()
    ema = {k: v + 1 for k, v in state.items()}
    ckpt = {"model": state, "ema": ema, "optimizer": {}, "steps": 10,
            "args": argparse.Namespace(gpt_model="ARPG-tiny")}
    torch.save(ckpt, tmp_path / "train.pt")
    with caplog.at_level(logging.INFO, logger="arpg.checkpoint"):
        default = load_model(tmp_path / "train.pt", model_name="ARPG-tiny", dim=64, block_size=16)
    assert "'model'" in caplog.text
    assert _same_weights(default, model)
    ema_model = load_model(tmp_path / "train.pt", weights="ema", model_name="ARPG-tiny", dim=64, block_size=16)
    assert torch.equal(ema_model.head.weight, ema["head.weight"])
    for key in ("module", "state_dict"):
        torch.save({key: state}, tmp_path / f"{key}.pt")
        loaded = load_model(tmp_path / f"{key}.pt", model_name="ARPG-tiny", dim=64, block_size=16)
        assert _same_weights(loaded, model)
    # The golden file's bare-bones config: vocab and classes are read off the shapes.
    torch.save(arpg_golden["state_dict"], tmp_path / "bare.pt")
    golden = load_model(tmp_path / "bare.pt", model_name="ARPG-tiny", dim=64, block_size=16)
    assert (golden.config.vocab_size, golden.config.num_classes) == (32, 10)


@pytest.mark.parametrize("name", ["ARPG-L", "ARPG-XL", "ARPG-XXL"])
def test_published_size_is_recognised_from_shapes(name):
    from arpg.checkpoint import infer_config

    with torch.device("meta"):
        state = create_model(name).state_dict()
    family, config = infer_config(state, None, "published.pt")
    assert family.name == "arpg"
    assert config == {**MODEL_SIZES[name][1], "vocab_size": 16384, "num_classes": 1000}


def test_wrong_shape_names_key_and_shapes(tmp_path):
    model = _small()
    state = dict(model.state_dict())
    state["layers.to_k.weight"] = torch.zeros(64, 32)
    torch.save({"model": state}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"layers\.to_k\.weight.*\(64, 32\).*\(64, 64\)"):
        load_model(tmp_path / "bad.pt", model_name="ARPG-tiny", dim=64, block_size=16)
    del state["layers.to_k.weight"]
    torch.save({"model": state}, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"missing key 'layers\.to_k\.weight'"):
        load_model(tmp_path / "missing.pt", model_name="ARPG-tiny", dim=64, block_size=16)
    state["extra.weight"] = torch.zeros(1)
    state["layers.to_k.weight"] = model.layers.to_k.weight
    torch.save({"model": state}, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"unexpected key 'extra\.weight'"):
        load_model(tmp_path / "extra.pt", model_name="ARPG-tiny", dim=64, block_size=16)


def test_wrong_size_is_reported(tmp_path):
    model = _small()
    path = save(model, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=r"embeddings\.weight"):
        load_model(path, num_classes=5)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_or_foreign_files(tmp_path, suffix):
    model = _small()
    good = tmp_path / f"good{suffix}"
    if suffix == ".pt":
        torch.save({"model": model.state_dict()}, good)
    else:
        save(model, good)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_model(cut, model_name="ARPG-tiny", dim=64, block_size=16)
    junk = tmp_path / f"junk{suffix}"
    junk.write_text("hello, not a checkpoint")
    with pytest.raises(ValueError, match=str(junk.name)):
        load_model(junk, model_name="ARPG-tiny", dim=64, block_size=16)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model(tmp_path / f"nowhere{suffix}")


def test_non_state_dict_payload(tmp_path):
    torch.save({"model": {"a": 1}}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a state dict"):
        load_model(tmp_path / "x.pt")


def test_bad_weights_choice(tmp_path):
    with pytest.raises(ValueError, match="weights must be one of"):
        load_weights(tmp_path / "x.pt", weights="best")


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write(target, lambda p: p.write_bytes(b"old"))

    def crash(p):
        p.write_bytes(b"partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(target, crash)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_atomic_write_respects_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "f.bin", lambda p: p.write_bytes(b"x"))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_bad_config_metadata_names_the_file(tmp_path):
    from safetensors.torch import save_file

    model = create_model("ARPG-tiny", vocab_size=17, block_size=16, num_classes=10, dim=32)
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={"arpg_config": "{oops"})
    with pytest.raises(ValueError, match=r"m\.safetensors: its 'arpg_config' metadata is not valid JSON"):
        load_model(path)
