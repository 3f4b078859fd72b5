import pytest
import torch

from arpg.models import MODEL_SIZES, create_model
from arpg.models.arpg import ARPGConfig
from arpg.models.layers import apply_rope, rope_2d


def _in_order(logits, order):
    """Raster-order logits (B, T, V) -> training order."""
    return logits.gather(1, order[..., None].expand_as(logits))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_golden_training_forward(golden_model, arpg_golden, mode):
    golden_model.train(mode == "train")
    logits, loss = golden_model(arpg_golden["tokens"], arpg_golden["labels"], arpg_golden["orders"])
    assert logits.dtype == torch.float32
    diff = (_in_order(logits, arpg_golden["orders"]) - arpg_golden["train_logits"]).abs().max()
    assert diff <= 1e-4
    assert abs(loss.item() - float(arpg_golden["train_loss"])) <= 1e-4


def test_eval_mode_stays_causal(golden_model, arpg_golden):
    # The published eval mode drops the mask and so reproduces `eval_mode_logits`; ours keeps the
    # training-time causal mask: it gives the (causal) train-mode logits, and changing the token
    # predicted k-th moves only the predictions after it.
    golden_model.eval()
    tokens, labels, orders = arpg_golden["tokens"], arpg_golden["labels"], arpg_golden["orders"]
    in_order = _in_order(golden_model(tokens, labels, orders)[0], orders)
    assert (in_order - arpg_golden["train_logits"]).abs().max() <= 1e-4
    assert (in_order - arpg_golden["eval_mode_logits"]).abs().max() > 1e-2
    k, rows = 7, torch.arange(tokens.shape[0])
    changed = tokens.clone()
    changed[rows, orders[:, k]] = (tokens[rows, orders[:, k]] + 1) % golden_model.config.vocab_size
    moved = _in_order(golden_model(changed, labels, orders)[0], orders)
    torch.testing.assert_close(moved[:, :k + 1], in_order[:, :k + 1], atol=1e-6, rtol=0)
    assert (moved[:, k + 1:] - in_order[:, k + 1:]).abs().amax(-1).min() > 1e-4  # every later query sees it


def test_rope_table_matches_reference(golden_model, arpg_golden):
    table = torch.cat([golden_model.class_rope(1)[0], golden_model.position_rope(torch.arange(16))])
    assert torch.equal(table, arpg_golden["freqs_cis"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rope_rotates_each_channel_pair(dtype):
    # The shared rotation (a complex product) against the reference's pairwise formula, in float32.
    g = torch.Generator().manual_seed(0)
    x, rope = torch.randn(2, 5, 3, 8, generator=g).to(dtype), torch.randn(2, 5, 4, 2, generator=g)
    a, b = x.float()[..., 0::2], x.float()[..., 1::2]
    cos, sin = rope[:, :, None, :, 0], rope[:, :, None, :, 1]
    expected = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2).to(dtype)
    out = apply_rope(x, rope)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6 if dtype == torch.float32 else 0)


def test_identity_class_rope_rotates_nothing():
    model = create_model("ARPG-tiny", vocab_size=8, block_size=16, num_classes=3, cls_rope="identity")
    rope = model.class_rope(2)
    assert torch.equal(rope[..., 0], torch.ones(2, 1, 16)) and torch.equal(rope[..., 1], torch.zeros(2, 1, 16))


@pytest.mark.parametrize("name", ["ARPG-L", "ARPG-XL", "ARPG-XXL"])
def test_layout_matches_published(name, arpg_layout):
    reference = arpg_layout[name]
    with torch.device("meta"):
        model = create_model(name)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == reference["state_dict"]
    assert model.num_parameters() == reference["num_parameters"]
    assert list(model.buffers()) == []
    cfg = reference["config"]
    assert model.config.ffn_hidden_dim == cfg["ffn_hidden_dim"]
    assert (model.config.mask_token_id, model.config.null_class_id) == (cfg["mask_token_id"], cfg["none_conds_id"])
    assert model.config.class_token_offset == cfg["class_token_id_offset"]


def _random_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = create_model("ARPG-tiny", vocab_size=16, block_size=16, num_classes=4, dim=64,
                         token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, **overrides)
    for p in model.parameters():  # the published init zeroes the head; randomise everything
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def test_causality_content_and_order():
    model = _random_model()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 16, (2, 16), generator=g)
    labels = torch.tensor([0, 3])
    order = torch.stack([torch.randperm(16, generator=g) for _ in range(2)])
    base = _in_order(model(tokens, labels, order)[0], order)
    for j in (0, 5, 14):
        changed = tokens.clone()
        pos = order[:, j]
        changed[torch.arange(2), pos] = (changed[torch.arange(2), pos] + 1) % 16
        after = _in_order(model(changed, labels, order)[0], order)
        assert torch.equal(after[:, : j + 1], base[:, : j + 1]), f"order position <= {j} saw token {j}"
        assert not torch.allclose(after[:, j + 1:], base[:, j + 1:]), "later positions should react"
        # Permute what comes after j: positions <= j keep their logits.
        reordered = order.clone()
        tail = reordered[:, j + 1:]
        reordered[:, j + 1:] = tail.flip(1)
        again = _in_order(model(tokens, labels, reordered)[0], reordered)
        assert torch.equal(again[:, : j + 1], base[:, : j + 1])


def test_eval_is_deterministic_and_class_dropout_only_in_training():
    model = _random_model(class_dropout_prob=0.5)
    tokens = torch.randint(0, 16, (8, 16))
    labels = torch.arange(8) % 4
    order = torch.arange(16).expand(8, 16)
    a, _ = model(tokens, labels, order)
    b, _ = model(tokens, labels, order)
    assert torch.equal(a, b)
    model.train()
    dropped = model(tokens, labels, order, generator=torch.Generator().manual_seed(0))[0]
    assert not torch.allclose(dropped, a)


def test_logits_are_raster_order_and_loss_is_mean_ce():
    model = _random_model()
    tokens = torch.randint(0, 16, (3, 16))
    labels = torch.tensor([0, 1, 2])
    order = torch.stack([torch.randperm(16) for _ in range(3)])
    logits, loss = model(tokens, labels, order)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    assert torch.allclose(loss, expected, atol=1e-6)
    # Position order[:, 0] is predicted from the class token alone: same for any token values.
    other = torch.randint(0, 16, (3, 16))
    first = torch.arange(3), order[:, 0]
    assert torch.equal(model(other, labels, order)[0][first], logits[first])


def test_random_order_is_fresh_and_seedable():
    model = _random_model()
    tokens, labels = torch.randint(0, 16, (2, 16)), torch.tensor([0, 1])
    a = model(tokens, labels, generator=torch.Generator().manual_seed(3))[1]
    b = model(tokens, labels, generator=torch.Generator().manual_seed(3))[1]
    c = model(tokens, labels, generator=torch.Generator().manual_seed(4))[1]
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("kwargs, match", [
    (dict(labels=torch.tensor([0, 4])), r"labels.*\[0, 4\)"),
    (dict(labels=torch.tensor([-1, 0])), r"labels.*\[0, 4\)"),
    (dict(tokens=torch.full((2, 16), 16)), r"tokens.*\[0, 16\)"),
    (dict(tokens=torch.zeros(2, 15, dtype=torch.long)), r"tokens.*\(B, 16\)"),
    (dict(order=torch.zeros(2, 16, dtype=torch.long)), r"order.*permutation"),
    (dict(order=torch.arange(16)), r"order.*shape"),
])
def test_bad_input(kwargs, match):
    model = _random_model()
    args = dict(tokens=torch.zeros(2, 16, dtype=torch.long), labels=torch.tensor([0, 1]), order=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        model(**args)


@pytest.mark.parametrize("overrides, match", [
    (dict(n_layer=3), "n_layer"), (dict(block_size=15), "block_size"), (dict(cls_rope="x"), "cls_rope"),
    (dict(dim=60, n_head=6), "multiple of 4"), (dict(resid_dropout_p=1.5), "resid_dropout_p"),
])
def test_bad_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        ARPGConfig(**overrides)


def test_registry():
    assert {"ARPG-tiny", "ARPG-S", "ARPG-L", "ARPG-XL", "ARPG-XXL"} <= set(MODEL_SIZES)
    with pytest.raises(ValueError, match="model name must be one of"):
        create_model("ARPG-huge")
    with pytest.raises(ValueError, match="unknown ARPGConfig fields"):
        create_model("ARPG-tiny", n_layers=2)
    model = create_model("ARPG-tiny", vocab_size=17, block_size=64, num_classes=10)
    assert model.config.vocab_size == 17 and model.head.weight.shape == (17, 128)


def test_rope_extends_beyond_training_grid():
    # Columns past the training grid get the angles of their own index (col * frequency), not a
    # wrap-around to col % grid.
    head_dim, base = 16, 10000.0
    rope = rope_2d(torch.tensor([0, 0]), torch.tensor([3, 20]), head_dim=head_dim, base=base)  # (2, 8, 2)
    freqs = base ** (-torch.arange(0, head_dim // 2, 2, dtype=torch.float32) / (head_dim // 2))
    for i, col in enumerate((3, 20)):
        torch.testing.assert_close(rope[i, 4:, 0], torch.cos(col * freqs))
        torch.testing.assert_close(rope[i, 4:, 1], torch.sin(col * freqs))
        torch.testing.assert_close(rope[i, :4], torch.stack([torch.ones(4), torch.zeros(4)], -1))  # row 0
    assert not torch.allclose(rope[1], rope_2d(torch.tensor([0]), torch.tensor([20 % 4]), head_dim=head_dim)[0])
