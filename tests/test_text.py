"""Text conditions: LlamaGen's text-to-image GPT against its golden reference and its released
layout, the caption condition's seam (checks, guidance, dropout, shards), and prompts in, images out."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from arpg.checkpoint import infer_config, load_model
from arpg.condition import Captions, ClassCondition, TextCondition, condition_for, condition_from_manifest
from arpg.models import create_model
from arpg.models.llamagen import LlamaGen, LlamaGenConfig
from arpg.sample import SamplingOptions, generate
from arpg.sample.decode import decode_grid, decode_plan
from arpg.sample.draw import TokenSampler
from conftest import data_file
from test_sample import _Recorder  # a `choose` that keeps the guided logits of each step

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(data_file("tiny_llamagen_t2i_golden.pt"), weights_only=True)


def _golden_model(golden: dict) -> LlamaGen:
    fields = LlamaGenConfig.__dataclass_fields__
    model = LlamaGen(LlamaGenConfig(**{k: v for k, v in golden["config"].items() if k in fields}))
    model.load_state_dict(golden["state_dict"], strict=True)
    return model.eval()


def _captions(golden: dict) -> Captions:
    return TextCondition(24).check((golden["captions"], golden["emb_masks"]))


# ---------------------------------------------------------------------------------------------
# Golden reference


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_golden_training_forward_and_mask(golden, mode):
    model = _golden_model(golden).train(mode == "train")  # every dropout is 0: both modes agree
    captions = _captions(golden)
    logits, loss = model(golden["tokens"], captions)
    assert (logits - golden["train_logits"]).abs().max() <= 1e-4
    assert abs(loss.item() - golden["train_loss"].item()) <= 1e-4
    mask = model.attention_mask(captions, 135)  # 120 caption rows + the first 15 image tokens
    assert torch.equal(mask[:, 0], golden["train_attn_mask"])


@pytest.mark.parametrize("cfg", [4.0, 1.0])
@pytest.mark.parametrize("use_cache", [True, False])
def test_golden_greedy_decodes_step_by_step(golden, cfg, use_cache):
    model = _golden_model(golden)
    captions = _captions(golden)
    options = SamplingOptions(cfg=cfg, use_cache=use_cache)
    plan = decode_plan(model, options, 3, [(3, None)], torch.device("cpu"))
    recorder = _Recorder(lambda step, slots, logits: logits.argmax(-1))  # top_k 1
    tokens = decode_grid(model, captions, plan, recorder, options)
    name = "cfg4" if cfg == 4.0 else "cfg1"
    assert (torch.cat(recorder.logits, dim=1) - golden[f"greedy_{name}_step_logits"]).abs().max() <= 1e-4
    assert torch.equal(tokens.flatten(1), golden[f"greedy_{name}_tokens"])


def test_golden_null_caption_keeps_the_conditional_mask(golden):
    # The published decoder runs the null caption under the conditional rows' mask: the
    # unconditional rows of a sample with 7 valid caption rows see 7 rows of `uncond_embedding`.
    model = _golden_model(golden)
    captions = _captions(golden)
    null = model.condition.unconditional(captions)
    assert torch.equal(null.mask, captions.mask) and bool(null.null.all())
    one_row = Captions(captions.embeddings[:1], captions.mask[:1], torch.ones(1, dtype=torch.bool))
    other = one_row._replace(embeddings=torch.randn_like(one_row.embeddings))  # ignored where null
    tokens = golden["tokens"][:1]
    assert torch.equal(model(tokens, one_row)[0], model(tokens, other)[0])


def test_released_layout_loads_strictly_on_meta():
    layout = json.loads(data_file("llamagen_t2i_state_dict_layout.json").read_text())
    for name, reference in layout["models"].items():
        with torch.device("meta"):
            model = create_model("LlamaGen-XL", **reference["config"], drop_path_rate=0.0)
        state = model.state_dict()
        assert {k: list(v.shape) for k, v in state.items()} == reference["state_dict"], name
        assert model.num_parameters() == reference["parameters"]  # uncond_embedding is a buffer
        assert isinstance(model.condition, TextCondition) and model.condition.rows == 120
        shapes = {k: torch.empty(v, device="meta") for k, v in reference["state_dict"].items()}
        family, inferred = infer_config(shapes, source=name)  # recognised from the shapes alone
        assert family.name == "llamagen" and {k: inferred[k] for k in ("model_type", "caption_dim", "cls_token_num")} \
            == {"model_type": "t2i", "caption_dim": 2048, "cls_token_num": 120}
        with torch.device("meta"):
            LlamaGen(LlamaGenConfig(**inferred, block_size=reference["config"]["block_size"])).load_state_dict(
                shapes, strict=True, assign=True)


def test_published_t2i_file_loads(golden, tmp_path):
    torch.save({"model": golden["state_dict"]}, tmp_path / "t2i.pt")
    model = load_model(tmp_path / "t2i.pt", model_name="LlamaGen-tiny", block_size=16, multiple_of=32)
    logits, _ = model(golden["tokens"], _captions(golden))  # eval mode: as causal as training
    assert (logits - golden["train_logits"]).abs().max() <= 1e-4


# ---------------------------------------------------------------------------------------------
# The condition seam


def test_condition_for_picks_the_type():
    assert isinstance(condition_for(LlamaGenConfig(num_classes=7)), ClassCondition)
    text = condition_for(LlamaGenConfig(model_type="t2i", caption_dim=16, cls_token_num=8))
    assert isinstance(text, TextCondition) and (text.rows, text.caption_dim) == (8, 16)
    with pytest.raises(ValueError, match="model_type"):
        LlamaGenConfig(model_type="i2i")
    with pytest.raises(ValueError, match="cls_token_num"):
        LlamaGenConfig(cls_token_num=4)  # several class tokens: not a published layout
    with torch.device("meta"):
        assert isinstance(create_model("ARPG-tiny", model_type="t2i").condition, TextCondition)


@pytest.mark.parametrize("value, match", [
    ((torch.zeros(2, 8, 15), torch.ones(2, 8)), r"\(B, 8, 16\)"),
    ((torch.zeros(2, 8, 16), torch.ones(2, 7)), r"mask.*\(2, 8\)"),
    ([3, 4], "prompts"),
])
def test_bad_captions_name_the_parameter(value, match):
    with pytest.raises(ValueError, match=match):
        TextCondition(16, 8).check(value)


def test_caption_batches_join_take_drop():
    condition = TextCondition(4, 3)
    captions = condition.check((torch.randn(5, 3, 4), torch.ones(5, 3)))
    both = condition.join(captions, condition.unconditional(captions))
    assert condition.batch_size(both) == 10 and both.null.tolist() == [False] * 5 + [True] * 5
    assert torch.equal(condition.take(both, torch.tensor([6])).embeddings, captions.embeddings[1:2])
    dropped = condition.drop(captions, 0.5, torch.Generator().manual_seed(0))
    assert 0 < int(dropped.null.sum()) < 5 and torch.equal(dropped.embeddings, captions.embeddings)
    assert condition.drop(captions, 0.0) is captions


@pytest.mark.parametrize("condition, batch", [
    (ClassCondition(10), torch.tensor([3, 1, 9])),
    (TextCondition(4, 6), Captions(torch.randn(3, 6, 4) * torch.tensor([0, 0, 0, 1, 1, 1.])[:, None],
                                   torch.arange(6).expand(3, 6) >= 3, torch.zeros(3, dtype=torch.bool))),
])
def test_shard_storage_round_trip(condition, batch):
    arrays = condition.shard_arrays(batch)
    items = [condition.shard_item(arrays, i) for i in range(3)]
    restored = torch.utils.data.default_collate(items)
    if isinstance(batch, Tensor := torch.Tensor):
        assert torch.equal(restored, batch)
    else:
        assert torch.equal(restored.mask, batch.mask) and not restored.null.any()
        assert (restored.embeddings - batch.embeddings).abs().max() <= 1e-2  # float16 storage
    manifest = json.loads(json.dumps(condition.manifest_entry()))
    assert condition_from_manifest(manifest).manifest_entry() == condition.manifest_entry()


def test_t2i_llamagen_and_par_train_and_decode_consistently():
    # Teacher forcing, the cached decode and the recomputing decode agree on a text PAR model with
    # padded captions (any gap would be a mask or position error).
    torch.manual_seed(0)
    model = create_model("PAR-tiny", dim=32, n_layer=2, n_head=2, vocab_size=17, block_size=16, model_type="t2i",
                         caption_dim=8, cls_token_num=6, token_dropout_p=0.0, resid_dropout_p=0.0,
                         ffn_dropout_p=0.0).double().eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    mask = torch.arange(6).expand(2, 6) >= torch.tensor([[4], [1]])  # 2 and 5 valid rows
    captions = model.condition.check((torch.randn(2, 6, 8, dtype=torch.float64) * mask[..., None], mask))
    runs = []
    for use_cache in (True, False):
        options = SamplingOptions(cfg=None, use_cache=use_cache)
        plan = decode_plan(model, options, 2, [(2, None)], torch.device("cpu"))
        recorder = _Recorder(lambda step, slots, logits: logits.argmax(-1))
        out = decode_grid(model, captions, plan, recorder, options)
        runs.append((out, torch.cat(recorder.logits, dim=1)))
    assert torch.equal(runs[0][0], runs[1][0]) and (runs[0][1] - runs[1][1]).abs().max() < 1e-9
    logits, _ = model(runs[0][0].flatten(1), captions)  # raster order
    in_slots = logits[:, model.slot_order()]
    assert (in_slots - runs[0][1]).abs().max() < 1e-9


def test_caption_shards_train_a_text_model(tmp_path):
    # Caption embeddings stored beside the codes (as LlamaGen's extract_codes_t2i does) train a
    # text-to-image model with the same loop; the model config takes the data's condition.
    from arpg.cli import compose_config
    from arpg.data import ShardWriter, TokenDataset
    from arpg.train import TrainConfig, train

    rng = np.random.default_rng(0)
    condition = TextCondition(8, 6)
    lengths = torch.tensor([1, 6, 3, 2] * 4)
    mask = torch.arange(6) >= 6 - lengths[:, None]  # left-padded
    captions = Captions(torch.randn(16, 6, 8) * mask[..., None], mask, torch.zeros(16, dtype=torch.bool))
    writer = ShardWriter(tmp_path / "codes", grid_size=(4, 4), codebook_size=17, tokenizer="pixel17", augmentations=1,
                         condition=condition)
    writer.write_shard(0, rng.integers(0, 17, (16, 1, 16)), captions)
    writer.finish()
    data = TokenDataset(tmp_path / "codes")
    assert data.num_classes is None and data.condition.manifest_entry() == condition.manifest_entry()
    tokens, batch = torch.utils.data.default_collate([data[i] for i in range(4)])
    assert isinstance(batch, Captions) and torch.equal(batch.mask, mask[:4]) and tokens.shape == (4, 16)
    config = compose_config("train", TrainConfig, [
        "model=llamagen_tiny", "model.dim=32", "model.n_layer=2", "model.n_head=2", "model.multiple_of=32",
        "data=codes", "condition=text", f"data.path={tmp_path / 'codes'}", "optim.batch_size=8", "max_steps=2",
        "log_every=1",
        "tensorboard=false", "grids.per_class=0", "grids.eval_samples=0", f"out_dir={tmp_path / 'run'}"])
    result = train(config)
    model = load_model(result.weights)
    assert isinstance(model.condition, TextCondition) and model.config.cls_token_num == 6
    assert model.cls_embedding.uncond_embedding.shape == (6, 8)


# ---------------------------------------------------------------------------------------------
# Prompts in, images out (a tiny random T5 encoder: nothing is downloaded)

WORDS = ["<pad>", "</s>", "<unk>", "a", "red", "fox", "in", "snow", "thin", "seven", "bold", "two"]


def _tiny_text_encoder(max_tokens: int = 6, seed: int = 0):
    """A word-level tokenizer with T5's conventions (pad 0, </s> appended) and a random 2-layer T5 encoder."""
    transformers = pytest.importorskip("transformers")  # the `text` extra
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from arpg.text import TextEncoder

    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="</s>",
                                                     unk_token="<unk>")
    torch.manual_seed(seed)
    config = transformers.T5Config(vocab_size=len(WORDS), d_model=8, d_kv=4, num_heads=2, num_layers=2, d_ff=16)
    return TextEncoder(tokenizer, transformers.T5EncoderModel(config), max_tokens=max_tokens)


def test_text_encoder_makes_the_published_layout_and_caches_prompts():
    encoder = _tiny_text_encoder()
    calls = []
    encoder.encoder.register_forward_hook(lambda module, args, kwargs_out: calls.append(1))
    prompts = ["a red fox in snow", "two", "a red fox in snow", "a thin seven in red snow"]
    embeddings, mask = encoder(prompts)
    assert embeddings.shape == (4, 6, 8) and embeddings.dtype == torch.float32
    assert mask.sum(1).tolist() == [6, 2, 6, 6]  # words + </s>, at most 6 (truncated)
    assert torch.equal(mask, torch.arange(6) >= 6 - mask.sum(1, keepdim=True))  # left-padded
    assert not embeddings[~mask].any() and embeddings[mask].abs().sum(-1).min() > 0  # zero on padded rows only
    assert len(calls) == 1  # one batch, each prompt once
    again, _ = encoder(["two", "a red fox in snow"])  # cached: no encoder call
    assert len(calls) == 1 and torch.equal(again[0], embeddings[1]) and torch.equal(again[1], embeddings[0])
    # The valid rows are the encoder's states of the prompt alone (the padding changes nothing).
    alone = encoder.tokenizer(["two"], return_tensors="pt")
    states = encoder.encoder(**alone).last_hidden_state[0]  # (2, 8)
    assert (embeddings[1, -2:] - states).abs().max() < 1e-5


def _tiny_t2i_model(seed: int = 0) -> LlamaGen:
    torch.manual_seed(seed)
    model = create_model("LlamaGen-tiny", dim=32, n_layer=2, n_head=2, multiple_of=32, vocab_size=17, block_size=16,
                         model_type="t2i", caption_dim=8, cls_token_num=6)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return model.eval()


def test_generate_from_prompts():
    model = _tiny_t2i_model()
    model.condition.encoder = _tiny_text_encoder()
    prompts = ["a red fox in snow", "a bold two"]
    options = dict(cfg=3.0, temperature=1.0)
    tokens = generate(model, prompts, generator=[torch.Generator().manual_seed(i) for i in range(2)], **options)
    assert tokens.shape == (2, 4, 4) and tokens.dtype == torch.long
    captions = Captions(*model.condition.encoder(prompts), torch.zeros(2, dtype=torch.bool))
    same = generate(model, captions, generator=[torch.Generator().manual_seed(i) for i in range(2)], **options)
    alone = generate(model, prompts[1], generator=[torch.Generator().manual_seed(1)], **options)
    assert torch.equal(tokens, same) and torch.equal(tokens[1:], alone)  # batching changes nothing
    with pytest.raises(ValueError, match="caption_dim"):
        model.condition.encoder = _tiny_text_encoder().__class__(model.condition.encoder.tokenizer,
                                                                 model.condition.encoder.encoder, max_tokens=5)
        generate(model, prompts)
    with pytest.raises(ValueError, match="labels must be class ids"):
        generate(create_model("LlamaGen-tiny", vocab_size=17, block_size=16, num_classes=3), prompts)


def test_text_decode_loop_never_syncs(no_host_sync):
    model = _tiny_t2i_model()
    mask = torch.arange(6) >= torch.tensor([[3], [0]])
    captions = model.condition.check((torch.randn(2, 6, 8) * mask[..., None], mask))
    options = SamplingOptions(cfg=3.0, top_k=5)
    plan = decode_plan(model, options, 2, [(2, None)], torch.device("cpu"))
    sampler = TokenSampler(torch.rand(2, 16))
    with no_host_sync("the decode loop"):
        decode_grid(model, captions, plan, sampler, options)


# ---------------------------------------------------------------------------------------------
# ARPG with captions


def _tiny_arpg_t2i(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = create_model("ARPG-tiny", dim=32, n_layer=4, n_head=2, vocab_size=17, block_size=16, model_type="t2i",
                         caption_dim=8, cls_token_num=6, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0,
                         **overrides)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return model.eval()


@pytest.mark.parametrize("cls_rope", ["zeros", "identity"])
def test_arpg_with_captions_decodes_as_it_trains(cls_rope):
    # Causal within steps and one token per step make the decode the teacher-forced pass: any gap
    # is a mask, position or cache error of the caption rows.
    model = _tiny_arpg_t2i(cls_rope=cls_rope).double()
    assert "embeddings.weight" in model.state_dict() and model.embeddings.weight.shape[0] == 18  # tokens + mask
    fields = model.fields_from_state_dict(model.state_dict())  # a checkpoint's shapes say it reads captions
    assert (fields["model_type"], fields["cls_token_num"], fields["caption_dim"]) == ("t2i", 6, 8)
    mask = torch.arange(6) >= torch.tensor([[4], [1]])  # 2 and 5 valid rows
    captions = model.condition.check((torch.randn(2, 6, 8, dtype=torch.float64) * mask[..., None], mask))
    order = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(s)) for s in (1, 2)])
    runs = []
    for use_cache in (True, False):
        options = SamplingOptions(cfg=None, use_cache=use_cache, causal_within_step=True, steps=16, order=order)
        plan = decode_plan(model, options, 2, [(2, None)], torch.device("cpu"))
        recorder = _Recorder(lambda step, slots, logits: logits.argmax(-1))
        tokens = decode_grid(model, captions, plan, recorder, options)
        runs.append((tokens, torch.cat(recorder.logits, dim=1)))
    assert torch.equal(runs[0][0], runs[1][0]) and (runs[0][1] - runs[1][1]).abs().max() < 1e-9
    logits, _ = model(runs[0][0].flatten(1), captions, order=order)  # raster order
    assert (logits.gather(1, order[..., None].expand_as(logits)) - runs[0][1]).abs().max() < 1e-9
    # A padded row's content changes nothing: no other row attends to it.
    noisy = captions._replace(embeddings=captions.embeddings + 5 * (~mask)[..., None])
    assert (model(runs[0][0].flatten(1), noisy, order=order)[0] - logits).abs().max() < 1e-9


def test_inpaint_takes_a_prompt():
    from arpg.sample import inpaint

    model = _tiny_arpg_t2i()
    model.condition.encoder = _tiny_text_encoder()
    tokens = torch.randint(0, 17, (2, 4, 4), generator=torch.Generator().manual_seed(0))
    keep = torch.zeros(4, 4, dtype=torch.bool)
    keep[:, :2] = True
    out = inpaint(model, tokens, keep, ["a red fox", "two"], steps=4, cfg=2.0,
                  generator=[torch.Generator().manual_seed(i) for i in range(2)])
    assert torch.equal(out[:, keep], tokens[:, keep])
    alone = inpaint(model, tokens[1:], keep, ["two"], steps=4, cfg=2.0, generator=[torch.Generator().manual_seed(1)])
    assert torch.equal(out[1:], alone)
    images = generate(model, ["a red fox in snow"], steps=4)
    assert images.shape == (1, 4, 4)
    with pytest.raises(ValueError, match="static"):
        generate(model, ["two"], steps=4, static=True)


# ---------------------------------------------------------------------------------------------
# The captioned digits


def test_digits_with_captions():
    from arpg.data import DIGITS_TEXT_ENCODER, DataSettings, build_dataset, digit_prompt, digit_strokes
    from arpg.text import load_text_encoder

    data = build_dataset(DataSettings(condition="text"))
    assert data.num_classes is None and isinstance(data.condition, TextCondition) and len(data) == 1797
    tokens, caption = data[0]
    assert tokens.shape == (64,) and caption.embeddings.shape == (4, 16)
    assert caption.mask.tolist() == [False] + [True] * 3  # "a <stroke> <digit>", left-padded to 4 rows
    strokes = digit_strokes(data.tokens, data.labels)
    assert 0.45 < strokes.count("thin") / len(strokes) < 0.55  # the median splits each class
    encoder = load_text_encoder(DIGITS_TEXT_ENCODER, 4, 16)
    embeddings, mask = encoder([digit_prompt(int(data.labels[7]), strokes[7])])  # e.g. "a bold seven"
    assert torch.equal(data.captions.embeddings[7], embeddings[0]) and torch.equal(data.captions.mask[7], mask[0])
    with pytest.raises(ValueError, match="unknown"):
        encoder(["a purple seven"])
    assert build_dataset(DataSettings()).num_classes == 10  # class ids by default


def test_captions_demo_writes_the_picture_and_the_checks(tmp_path):
    from arpg.checkpoint import save
    from arpg.data import DIGITS_TEXT_ENCODER
    from arpg.reports.captions import CaptionsDemoConfig, captions_demo

    torch.manual_seed(0)
    model = create_model("ARPG-tiny", dim=16, n_layer=2, n_head=2, multiple_of=16, vocab_size=17, block_size=64,
                         model_type="t2i", caption_dim=16, cls_token_num=4, text_encoder=DIGITS_TEXT_ENCODER)
    save(model, tmp_path / "model.safetensors")
    checks = captions_demo(CaptionsDemoConfig(checkpoint=str(tmp_path / "model.safetensors"), out_dir=str(tmp_path),
                                              sampling=SamplingOptions(steps=2), per_prompt=2, eval_samples=3))
    assert len(checks["per_prompt"]) == 20 and 0 <= checks["digit_accuracy"] <= 1
    assert json.loads((tmp_path / "digits_captions.json").read_text())["stroke_agreement"] == checks["stroke_agreement"]
    from PIL import Image

    with Image.open(tmp_path / "digits_captions.png") as picture:
        assert picture.size == (2 * (8 * 4 + 2) + 2, 20 * (8 * 4 + 2) + 2)


def test_sample_script_takes_prompts(tmp_path):
    from arpg.checkpoint import save
    from arpg.data import DIGITS_TEXT_ENCODER
    from conftest import run_script

    model = create_model("ARPG-tiny", dim=16, n_layer=2, n_head=2, multiple_of=16, vocab_size=17, block_size=64,
                         model_type="t2i", caption_dim=16, cls_token_num=4, text_encoder=DIGITS_TEXT_ENCODER)
    save(model, tmp_path / "model.safetensors")
    common = [f"checkpoint={tmp_path / 'model.safetensors'}", "tokenizer=pixel_digits", "device=cpu",
              "sampling.steps=2", f"output={tmp_path / 'grid.png'}", "nrow=3", "scale=2"]
    assert run_script("sample", *common, 'prompts=["a thin seven","a bold two"]', "samples_per_class=3") == 0
    from PIL import Image

    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (3 * 18 + 2, 2 * 18 + 2)
    assert run_script("sample", *common) == 1  # class ids for a text model: one line naming what it takes
