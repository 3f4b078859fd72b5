"""Image tokenizers: images in [-1, 1] <-> grids of discrete token ids.

Two implementations share the `Tokenizer` interface:

* `VQTokenizer`: our implementation of LlamaGen's VQ-16 vector-quantised autoencoder (the
  tokenizer every published ARPG checkpoint was trained on). Its state-dict keys and shapes are
  exactly LlamaGen's, so the published `vq_ds16_c2i.pt` loads strictly.
* `PixelTokenizer`: one token per grey pixel, for small images such as the bundled 8x8 digits.

Images are channels-first float tensors in [-1, 1]; token grids are (B, h, w) int64 in raster
(row-major) order.
"""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from arpg.checkpoint import check_state_dict, load_weights
from arpg.files import atomic_write
from arpg.images import images_to_pil

# LlamaGen allocates a 65536-entry usage counter regardless of the codebook size; it is in the
# published state dict, so we keep it (it only changes while training the tokenizer, which we
# never do).
_CODEBOOK_USAGE_SLOTS = 65536


def _check_token_range(tokens: torch.Tensor, codebook_size: int) -> None:
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
    if tokens.numel() == 0:
        return
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= codebook_size:
        raise ValueError(f"token ids must be in [0, {codebook_size - 1}], got values in [{low}, {high}]")


def _as_grid(tokens: torch.Tensor) -> torch.Tensor:
    """Accept (B, h, w) grids or (B, T) raster sequences with square T; return (B, h, w)."""
    if tokens.ndim == 3:
        return tokens
    if tokens.ndim == 2:
        side = int(round(tokens.shape[1] ** 0.5))
        if side * side == tokens.shape[1]:
            return tokens.reshape(tokens.shape[0], side, side)
    raise ValueError(f"tokens must have shape (B, h, w) or (B, T) with square T, got {tuple(tokens.shape)}")


class Tokenizer(nn.Module, ABC):
    """Interface shared by all tokenizers.

    `encode(images (B, C, H, W) in [-1, 1]) -> tokens (B, h, w) int64` and
    `decode(tokens (B, h, w)) -> images (B, C, H, W) in [-1, 1]`, with h = H / downsample.
    `identity` is a short string recorded in token-shard manifests so data made with one
    tokenizer is never silently paired with another.
    """

    @property
    @abstractmethod
    def codebook_size(self) -> int:
        """Number of distinct token ids (ids are 0 .. codebook_size - 1)."""

    @property
    @abstractmethod
    def downsample(self) -> int:
        """Image pixels per token along each side."""

    @property
    @abstractmethod
    def identity(self) -> str:
        """Short description of the tokenizer (and its weights) for data manifests."""

    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float images in [-1, 1] -> (B, H / downsample, W / downsample) int64."""

    @abstractmethod
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h, w) (or (B, T) with square T) token ids -> (B, C, H, W) images in [-1, 1]."""

    def to_pil(self, images: torch.Tensor) -> list[Image.Image]:
        """Decoded images (B, C, H, W) in [-1, 1] -> list of PIL images."""
        return images_to_pil(images)


# --------------------------------------------------------------------------------------------
# VQ-16


@dataclass
class VQConfig:
    """Architecture of a LlamaGen-style VQ autoencoder. The defaults are the published VQ-16.

    The encoder has len(ch_mult) levels of `num_res_blocks` residual blocks at widths
    ch * ch_mult[i], halving the resolution between levels; the decoder mirrors it with
    num_res_blocks + 1 blocks per level (as LlamaGen does). Attention blocks follow every residual
    block at the lowest resolution and sit in both mid sections.
    """

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    z_channels: int = 256
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    out_channels: int = 3

    def __post_init__(self) -> None:
        self.ch_mult = tuple(self.ch_mult)
        for name in ("codebook_size", "codebook_embed_dim", "z_channels", "ch", "num_res_blocks",
                     "in_channels", "out_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ValueError(f"ch_mult must be a non-empty list of positive ints, got {list(self.ch_mult)}")
        widths = [self.ch * m for m in self.ch_mult]
        if any(w % 32 for w in widths):
            raise ValueError(f"ch * ch_mult must be multiples of 32 (GroupNorm groups), got widths {widths}")

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> VQConfig:
        """The architecture a LlamaGen-layout state dict was made with, read off its tensor shapes
        (the published `.pt` records no config; VQ-16's file gives `VQConfig()`)."""
        try:
            codebook_size, embed_dim = state["quantize.embedding.weight"].shape
            ch, in_channels = state["encoder.conv_in.weight"].shape[:2]
            levels = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.conv_blocks.")})
            blocks = {int(k.split(".")[4]) for k in state if k.startswith("encoder.conv_blocks.0.res.")}
            widths = [state[f"encoder.conv_blocks.{i}.res.{len(blocks) - 1}.conv2.weight"].shape[0] for i in levels]
            return cls(codebook_size=codebook_size, codebook_embed_dim=embed_dim,
                       z_channels=state["quant_conv.weight"].shape[1], ch=ch, ch_mult=tuple(w // ch for w in widths),
                       num_res_blocks=len(blocks), in_channels=in_channels,
                       out_channels=state["decoder.conv_out.weight"].shape[0])
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"not a LlamaGen VQ state dict (no or malformed {err})") from None


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """norm-SiLU-conv3x3 twice plus a skip (1x1 `nin_shortcut` when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions using all C channels, plus a skip."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(B, 1, C, H * W).transpose(2, 3)  # (B, 1, HW, C)

        out = F.scaled_dot_product_attention(heads(self.q(h)), heads(self.k(h)), heads(self.v(h)))
        out = out.transpose(2, 3).reshape(B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one column right and one row below (LlamaGen/taming)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: residual blocks, optional attention after each, optional resampler.

    The resampler attribute is named `downsample` or `upsample` to match the published keys.
    """

    def __init__(self, widths: list[tuple[int, int]], attention: bool, resample: str | None):
        super().__init__()
        self.res = nn.ModuleList(ResnetBlock(c_in, c_out) for c_in, c_out in widths)
        self.attn = nn.ModuleList(AttnBlock(c_out) for _, c_out in widths) if attention else nn.ModuleList()
        self.resample_name = resample
        if resample == "downsample":
            self.downsample = Downsample(widths[-1][1])
        elif resample == "upsample":
            self.upsample = Upsample(widths[-1][1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        if self.resample_name is not None:
            x = getattr(self, self.resample_name)(x)
        return x


def _level_widths(in_width: int, out_width: int, n_blocks: int) -> list[tuple[int, int]]:
    return [(in_width if i == 0 else out_width, out_width) for i in range(n_blocks)]


def _mid(width: int) -> nn.Sequential:
    # Sequential indices give the published keys mid.0 (res), mid.1 (attn), mid.2 (res).
    return nn.Sequential(ResnetBlock(width, width), AttnBlock(width), ResnetBlock(width, width))


class VQEncoder(nn.Module):
    """(B, in_channels, H, W) -> (B, z_channels, H / 2^(L-1), W / 2^(L-1))."""

    def __init__(self, config: VQConfig):
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        width = config.ch
        for i, out_width in enumerate(widths):
            self.conv_blocks.append(_Level(_level_widths(width, out_width, config.num_res_blocks),
                                           attention=i == last,
                                           resample="downsample" if i != last else None))
            width = out_width
        self.mid = _mid(width)
        self.norm_out = _norm(width)
        self.conv_out = nn.Conv2d(width, config.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQDecoder(nn.Module):
    """(B, z_channels, h, w) -> (B, out_channels, h * 2^(L-1), w * 2^(L-1)).

    Level 0 is the LOWEST resolution (the reverse of the encoder's numbering), as in LlamaGen.
    """

    def __init__(self, config: VQConfig):
        super().__init__()
        widths = [config.ch * m for m in reversed(config.ch_mult)]
        last = len(widths) - 1
        width = widths[0]
        self.conv_in = nn.Conv2d(config.z_channels, width, 3, padding=1)
        self.mid = _mid(width)
        self.conv_blocks = nn.ModuleList()
        for i, out_width in enumerate(widths):
            self.conv_blocks.append(_Level(_level_widths(width, out_width, config.num_res_blocks + 1),
                                           attention=i == 0,
                                           resample="upsample" if i != last else None))
            width = out_width
        self.norm_out = _norm(width)
        self.conv_out = nn.Conv2d(width, config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-code lookup with cosine similarity.

    Both the latents and the codebook rows are L2-normalised every time they are used: the
    stored rows of the published codebook are NOT unit norm, so skipping the normalisation would
    pick different codes and decode to different vectors. The quantised latents are the code
    vectors themselves; there is no straight-through estimator because the tokenizer is only
    used for inference here.
    """

    def __init__(self, codebook_size: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, embed_dim)
        self.register_buffer("codebook_used", torch.zeros(_CODEBOOK_USAGE_SLOTS))

    def normalized_codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight, dim=-1)  # (K, D)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, D, h, w) -> (quantised latents (B, D, h, w), indices (B, h, w) int64)."""
        z_flat = F.normalize(z.permute(0, 2, 3, 1), dim=-1)  # (B, h, w, D)
        # For unit vectors argmin ||z - e||^2 = argmin (2 - 2 z.e) = argmax z.e.
        indices = torch.argmax(z_flat @ self.normalized_codebook().T, dim=-1)  # (B, h, w)
        return self.lookup(indices), indices

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) ids -> normalised codebook rows arranged as (B, D, h, w)."""
        return F.embedding(indices, self.normalized_codebook()).permute(0, 3, 1, 2)


class VQTokenizer(Tokenizer):
    """LlamaGen's VQ autoencoder (VQ-16 by default), inference only.

    State-dict keys and shapes equal LlamaGen's `VQModel`, including the
    `quantize.codebook_used` buffer, so the published `vq_ds16_c2i.pt` loads strictly.
    """

    def __init__(self, config: VQConfig | None = None):
        super().__init__()
        self.config = config or VQConfig()
        c = self.config
        self.encoder = VQEncoder(c)
        self.decoder = VQDecoder(c)
        self.quantize = VectorQuantizer(c.codebook_size, c.codebook_embed_dim)
        self.quant_conv = nn.Conv2d(c.z_channels, c.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.codebook_embed_dim, c.z_channels, 1)
        self.source = "random-init"
        self.eval()

    @classmethod
    def vq16(cls) -> VQTokenizer:
        """The published VQ-16 architecture (16x downsampling, 16384 codes of dim 8), random weights."""
        return cls(VQConfig())

    @classmethod
    def from_checkpoint(cls, path: str | Path, config: VQConfig | None = None) -> VQTokenizer:
        """Load weights from LlamaGen's `.pt` (a dict with key "model") or our `.safetensors`.

        `config` defaults to the one stored in our safetensors metadata, else the one the tensor
        shapes say (`VQConfig.from_state_dict`: VQ-16 for the published file). Keys and shapes
        must match exactly; the error names the first mismatch.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"VQ tokenizer checkpoint {path} not found. Download vq_ds16_c2i.pt from the LlamaGen "
                f"release (huggingface.co/FoundationVision/LlamaGen) and pass its path.")
        # load_weights reads both formats, takes "model" from LlamaGen's dict and turns unreadable
        # files into a ValueError naming the file.
        state_dict, _ = load_weights(path)
        if config is None:
            try:
                config = _stored_vq_config(path) or VQConfig.from_state_dict(state_dict)
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from None
        with torch.device("meta"):  # no point initialising 72M weights that are overwritten next
            tokenizer = cls(config)
        check_state_dict(tokenizer, state_dict, path)
        tokenizer.load_state_dict(state_dict, strict=True, assign=True)
        tokenizer.source = path.name
        return tokenizer.eval()

    def save(self, path: str | Path) -> None:
        """Write the weights as safetensors (atomically), with the config in the metadata."""
        metadata = {"format": "arpg-vq", "vq_config": json.dumps(dataclasses.asdict(self.config))}
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    @property
    def identity(self) -> str:
        name = "vq16" if self.config == VQConfig() else f"vq{json.dumps(dataclasses.asdict(self.config))}"
        return f"{name}[{self.source}]"

    def _to_model(self, x: torch.Tensor) -> torch.Tensor:
        """Move an input to the weights' device and floating dtype."""
        return x.to(self.quant_conv.weight.device, self.quant_conv.weight.dtype)

    @torch.no_grad()
    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> pre-quantisation latents (B, embed_dim, H/ds, W/ds)."""
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"images must have shape (B, {self.config.in_channels}, H, W), "
                             f"got {tuple(images.shape)}")
        if images.shape[2] % self.downsample or images.shape[3] % self.downsample:
            raise ValueError(f"image height and width must be multiples of {self.downsample}, "
                             f"got {tuple(images.shape[2:])}")
        return self.quant_conv(self.encoder(self._to_model(images)))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        _, indices = self.quantize(self.encode_latents(images))
        return indices

    @torch.no_grad()
    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B, h, w) -> quantised latents (B, embed_dim, h, w) (normalised code rows)."""
        tokens = _as_grid(tokens)
        _check_token_range(tokens, self.codebook_size)
        return self.quantize.lookup(tokens.to(self.quant_conv.weight.device))

    @torch.no_grad()
    def decode_latents(self, quant: torch.Tensor) -> torch.Tensor:
        """Quantised latents (B, embed_dim, h, w) -> images (B, out_channels, H, W), NOT clamped."""
        return self.decoder(self.post_quant_conv(self._to_model(quant)))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decode_latents(self.lookup(tokens)).clamp(-1, 1)


def _stored_vq_config(path: Path) -> VQConfig | None:
    """The VQConfig recorded in our safetensors metadata, or None (published `.pt` files hold none)."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "vq_config" not in metadata:
        return None
    try:
        return VQConfig(**json.loads(metadata["vq_config"]))
    except (json.JSONDecodeError, TypeError) as err:
        raise ValueError(f"its 'vq_config' metadata is not a VQConfig in JSON ({err})") from None


# --------------------------------------------------------------------------------------------
# Pixels


class PixelTokenizer(Tokenizer):
    """One token per pixel of a GREY image: the pixel's grey level quantised to `levels` values.

    Token l decodes to 2 * l / (levels - 1) - 1 in [-1, 1]; encode inverts that with rounding,
    so already-quantised images round-trip exactly. RGB input is converted to grey (ITU-R 601
    luma) first. Decoded images have one channel.
    """

    def __init__(self, levels: int):
        super().__init__()
        if not 2 <= levels <= 65536:
            raise ValueError(f"levels must be in [2, 65536], got {levels}")
        self.levels = levels

    @classmethod
    def digits(cls) -> PixelTokenizer:
        """For scikit-learn's 8x8 digits: 17 grey levels, token id = sklearn's stored value 0..16."""
        return cls(levels=17)

    @property
    def codebook_size(self) -> int:
        return self.levels

    @property
    def downsample(self) -> int:
        return 1

    @property
    def identity(self) -> str:
        return f"pixel{self.levels}"

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must have shape (B, 1 or 3, H, W), got {tuple(images.shape)}")
        grey = images.float()
        if grey.shape[1] == 3:
            grey = (grey * grey.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        levels = torch.round((grey[:, 0] + 1) * (self.levels - 1) / 2)  # (B, H, W)
        return levels.clamp(0, self.levels - 1).long()

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = _as_grid(tokens)
        _check_token_range(tokens, self.levels)
        return (2 * tokens.float() / (self.levels - 1) - 1).unsqueeze(1)  # (B, 1, H, W)


TOKENIZER_CHOICES = ("vq16", "pixel_digits", "pixel")


def load_tokenizer(name: str, vq_ckpt: str = "", pixel_levels: int = 256) -> Tokenizer:
    """The tokenizer named in a config: "vq16" (weights from `vq_ckpt`: LlamaGen's
    vq_ds16_c2i.pt or our VQ safetensors), "pixel_digits" (8x8 digits, 17 grey levels) or
    "pixel" (`pixel_levels` grey levels)."""
    if name not in TOKENIZER_CHOICES:
        raise ValueError(f"tokenizer must be one of {TOKENIZER_CHOICES}, got {name!r}")
    if name == "pixel_digits":
        return PixelTokenizer.digits()
    if name == "pixel":
        return PixelTokenizer(pixel_levels)
    if not vq_ckpt:
        raise ValueError("vq_ckpt must be set for tokenizer=vq16: download vq_ds16_c2i.pt from the LlamaGen "
                         "release (huggingface.co/FoundationVision/LlamaGen) yourself and pass vq_ckpt=/path/to/it")
    return VQTokenizer.from_checkpoint(vq_ckpt)
