"""Image folder -> token shards: `extract_codes` tokenises an ImageFolder tree (over the processes
of a job, resumably)."""

from __future__ import annotations

import hashlib
import logging
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import psutil
import torch
from einops import rearrange
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from arpg.condition import TextCondition
from arpg.data.shards import ShardWriter
from arpg.errors import require
from arpg.files import FolderLock, check_free_space
from arpg.processes import Processes, Step
from arpg.runtime import resolve_device, worker_count
from arpg.tokenizer import TOKENIZER_CHOICES, Tokenizer, VQTokenizer, load_tokenizer

log = logging.getLogger("arpg.data")  # the package's name, as the scripts' console shows it

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
AUGMENT_CHOICES = ("none", "flip", "ten_crop")


@dataclass
class ExtractConfig:
    """Tokenise an ImageFolder-style tree (`data_path/<class name>/<image>`) into shards.

    Class ids follow the sorted class-folder names. `augment`: "none" (1 view, the ADM centre
    crop), "flip" (2 views: the crop and its mirror; LlamaGen's default) or "ten_crop" (10 views:
    TenCrop(image_size) of an ADM centre crop of size image_size * crop_range, which already holds
    5 mirrored crops; LlamaGen's --ten-crop).

    `captions`: text-to-image data. Each image's caption is in a `.txt` file beside it (the same
    name); the shards store the caption's text-encoder embeddings (condition "text") instead of the
    class, as LlamaGen's extract_codes_t2i does. An image without a caption file is skipped and
    counted like an unreadable one.
    """

    data_path: str = "???"
    output_dir: str = "???"
    tokenizer: str = "vq16"  # "vq16" (needs vq_ckpt) or "pixel" (grey levels; small data and tests)
    vq_ckpt: str = ""  # path to LlamaGen's vq_ds16_c2i.pt (or our VQ safetensors)
    pixel_levels: int = 256
    image_size: int = 256
    augment: str = "flip"
    crop_range: float = 1.1
    # Views per encode call (an image's views stay together); None: what half the free memory of the
    # device holds (`default_batch_size`), at most 256.
    batch_size: Optional[int] = None
    num_workers: Optional[int] = None  # image-decoding processes; None: one per core but one, at most 8
    shard_size: int = 10000  # images per shard: the unit of resumption
    device: str = "auto"  # "auto" = cuda when available, else cpu
    captions: bool = False  # store each image's caption (<image>.txt) as text-encoder embeddings
    text_encoder: str = "google/flan-t5-xl"  # with captions: a Hub name or folder, or "words:<w1>,<w2>,..."
    caption_dim: int = 2048  # with captions: the text encoder's width (flan-t5-xl: 2048)
    caption_tokens: int = 120  # with captions: caption rows, left-padded (LlamaGen's t2i: 120)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM's centre crop: halve with BOX while the short side is >= 2*size, BICUBIC-resize the
    short side to `size`, then crop the centre size x size."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def _views(image: Image.Image, config: ExtractConfig) -> list[Image.Image]:
    if config.augment == "ten_crop":
        from torchvision.transforms.functional import ten_crop

        return list(ten_crop(center_crop(image, int(config.image_size * config.crop_range)), config.image_size))
    crop = center_crop(image, config.image_size)
    return [crop, crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)] if config.augment == "flip" else [crop]


def _num_views(augment: str) -> int:
    return {"none": 1, "flip": 2, "ten_crop": 10}[augment]


class _ImageViews(Dataset):
    """(views (A, 3, S, S) uint8 or None if unreadable, label, path, error message or None, caption
    or None)."""

    def __init__(self, files: list[tuple[Path, int]], config: ExtractConfig):
        self.files = files
        self.config = config

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        path, label = self.files[index]
        caption = None
        try:
            if self.config.captions:
                caption = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
            with Image.open(path) as image:
                image = image.convert("RGB")  # forces the full decode, so damage shows up here
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            return None, label, str(path), f"{type(err).__name__}: {err}", None
        # uint8 until it reaches the device: a quarter of the bytes through worker queues and PCIe.
        pixels = np.stack([np.asarray(v, dtype=np.uint8) for v in _views(image, self.config)])
        return rearrange(torch.from_numpy(pixels), "a h w c -> a c h w"), label, str(path), None, caption


def _collate(items: list) -> list:
    return items  # variable content (None for unreadable files); batched by hand in extract_codes


def _list_image_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    if not root.is_dir():
        raise FileNotFoundError(f"data_path {root} not found (expected <data_path>/<class>/<image>)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"data_path {root} has no class subfolders (expected <data_path>/<class>/<image>)")
    files = [(f, label) for label, name in enumerate(classes) for f in sorted((root / name).rglob("*"))
             if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise ValueError(f"data_path {root} holds no images with extensions {IMAGE_EXTENSIONS}")
    return classes, files


def _validate(config: ExtractConfig) -> None:
    for name in ("data_path", "output_dir"):
        require(getattr(config, name) not in ("", "???"), f"{name} must be set, got {getattr(config, name)!r}")
    require(config.tokenizer in TOKENIZER_CHOICES,
            f"tokenizer must be one of {TOKENIZER_CHOICES}, got {config.tokenizer!r}")
    require(config.augment in AUGMENT_CHOICES, f"augment must be one of {AUGMENT_CHOICES}, got {config.augment!r}")
    for name in ("image_size", "shard_size"):
        require(getattr(config, name) >= 1, f"{name} must be >= 1, got {getattr(config, name)}")
    require(config.batch_size is None or config.batch_size >= 1,
            f"batch_size must be >= 1 or null (fit the free memory), got {config.batch_size}")
    require(config.num_workers is None or config.num_workers >= 0,
            f"num_workers must be >= 0 or null (one per core but one), got {config.num_workers}")
    require(config.augment != "ten_crop" or config.crop_range >= 1, f"crop_range must be >= 1, got {config.crop_range}")
    for name in ("caption_dim", "caption_tokens"):
        require(not config.captions or getattr(config, name) >= 1, f"{name} must be >= 1, got {getattr(config, name)}")
    require(Path(config.data_path).is_dir(),
            f"data_path {config.data_path} not found (expected <data_path>/<class>/<image>)")


# A VQ encoder holds about this many float32 feature maps of its first width at full resolution
# per view at its peak (measured: 20 views of 256x256 through VQ-16 took 4.4 GB on a CPU).
_FEATURE_MAPS_PER_VIEW = 8


def default_batch_size(tokenizer: Tokenizer, image_size: int, device: torch.device) -> int:
    """Views per encode call that fit in half the device's free memory (CUDA: free GPU memory;
    CPU: available RAM), at most 256. Pixel tokenizers need next to nothing: 256."""
    if not isinstance(tokenizer, VQTokenizer):
        return 256
    per_view = _FEATURE_MAPS_PER_VIEW * image_size ** 2 * tokenizer.config.ch * 4
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available
    return max(1, min(256, int(0.5 * free / per_view)))


def extract_codes(config: ExtractConfig, tokenizer: Tokenizer | None = None) -> dict:
    """Tokenise `config.data_path` into shards at `config.output_dir`; return the manifest.

    `tokenizer` overrides the one `config` names (useful from Python and in tests). Unreadable
    images are logged by path and skipped. Interrupted runs resume: shards already written are
    kept, the rest are redone, so no image is stored twice.

    Runs as one process or on every process of a torchrun / `accelerate launch` job, on one node or
    several (`data_path` and `output_dir` on file systems that all of them see). Shards are fixed
    slices of the sorted image list, each encoded in the same batches by whichever process takes
    it, so the shards are the same byte for byte on any number of processes (for one `batch_size`
    and kind of device; its default is the smallest over the processes), and a run may be resumed
    on another number of processes. Process r encodes the missing shards r, r + world, ... and
    writes their files; process 0 holds the folder's lock, lists each shard in the manifest as it
    is finished, shows the progress of all and marks the data set complete once every one is
    there. The processes work in lock step (`arpg.processes`): one that fails stops the others
    with its error.
    """
    with Processes.join() as processes:
        return _extract_codes(config, tokenizer, processes)


@dataclass
class _Encoder:
    """What each process of an extraction sets up for itself."""

    tokenizer: Tokenizer  # on `device`, in eval mode
    tokenizer_file: Optional[str]  # its weights file, recorded in the manifest
    device: torch.device
    classes: list[str]
    files: list[tuple[Path, int]]  # (image, class id), sorted
    batch_size: int  # views per encode call
    workers: int  # image-decoding processes


def _set_up(config: ExtractConfig, tokenizer: Tokenizer | None, local_rank: int) -> _Encoder:
    _validate(config)
    device = resolve_device(config.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # pinned memory and the free-memory probe use the current GPU
    tokenizer_file = config.vq_ckpt if tokenizer is None and config.tokenizer == "vq16" else None
    tokenizer = tokenizer or load_tokenizer(config.tokenizer, config.vq_ckpt, config.pixel_levels)
    require(config.image_size % tokenizer.downsample == 0,
            f"image_size must be a multiple of the tokenizer's downsample {tokenizer.downsample}, "
            f"got {config.image_size}")
    classes, files = _list_image_folder(Path(config.data_path))
    batch_size = config.batch_size or default_batch_size(tokenizer, config.image_size, device)
    return _Encoder(tokenizer.to(device).eval(), tokenizer_file, device, classes, files, batch_size,
                    worker_count(config.num_workers))


def _listing_digest(files: list[tuple[Path, int]], root: str) -> str:
    """What a process's image list is, wherever the folder is mounted."""
    listing = "\n".join(f"{path.relative_to(root)}\t{label}" for path, label in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def _shard_files(files: list[tuple[Path, int]], index: int, shard_size: int) -> list[tuple[Path, int]]:
    return files[index * shard_size:(index + 1) * shard_size]


def _extract_codes(config: ExtractConfig, tokenizer: Tokenizer | None, processes: Processes) -> dict:
    # Every process checks the settings, loads the tokenizer and lists the images itself.
    encoder = processes.everywhere(lambda: _set_up(config, tokenizer, processes.local_rank))
    files = encoder.files
    listings = processes.gather((len(files), _listing_digest(files, config.data_path), encoder.batch_size))
    require(len({(count, digest) for count, digest, _ in listings}) == 1,
            f"the processes see different images in data_path {config.data_path} (images per process: "
            f"{[count for count, _, _ in listings]}); every node must see the same folder")
    batch_size = config.batch_size or min(size for _, _, size in listings)
    first = processes.rank == 0
    if first:
        log.info("encoding %d views per call (batch_size) with %d loader worker(s) per process on %d process(es) "
                 "(%s on process 0)", batch_size, encoder.workers, processes.world, encoder.device)
    side = config.image_size // encoder.tokenizer.downsample
    views = _num_views(config.augment)
    num_shards = math.ceil(len(files) / config.shard_size)
    with ExitStack() as books:
        def open_folder() -> ShardWriter:  # on process 0, which keeps the folder's books
            books.enter_context(FolderLock(config.output_dir, "code extraction"))
            captions = (TextCondition(config.caption_dim, config.caption_tokens, config.text_encoder)
                        if config.captions else None)
            return ShardWriter(
                config.output_dir, grid_size=(side, side), codebook_size=encoder.tokenizer.codebook_size,
                tokenizer=encoder.tokenizer.identity, augmentations=views,
                num_classes=None if config.captions else len(encoder.classes), condition=captions,
                class_names=encoder.classes,
                # Shards are fixed slices of the sorted file list; these make a resumed run slice the same way.
                source={"data_path": str(Path(config.data_path).resolve()), "files": len(files),
                        "shard_size": config.shard_size, "image_size": config.image_size,
                        "augment": config.augment, "crop_range": config.crop_range},
                tokenizer_file=encoder.tokenizer_file)

        writer = processes.on_first(open_folder)  # the others save shards with a copy of it
        missing = [index for index in range(num_shards) if not writer.has_shard(index)]
        new = sum(len(_shard_files(files, index, config.shard_size)) for index in missing)
        # uint16 tokens of every view and an int64 label (or float16 caption rows and a length) per image
        per_image = views * side * side * 2 + 8 + (config.caption_tokens * config.caption_dim * 2
                                                   if config.captions else 0)
        processes.on_first(lambda: check_free_space({config.output_dir: new * per_image},
                                                    f"the codes of {new} images"))
        progress = tqdm(total=len(files), initial=len(files) - new, unit="img", disable=not first,
                        desc=f"extract ({processes.world} processes)" if processes.world > 1 else "extract")

        def receive(step: Step) -> None:
            progress.update(step.count)
            if first:
                for entry in step.news:
                    writer.add_shard(entry)

        started = time.perf_counter()
        with progress:
            mine = missing[processes.rank::processes.world]
            processes.steps(_encode_shards(mine, config, encoder, batch_size, writer), receive)
        seconds = time.perf_counter() - started
        manifest = processes.on_first(writer.finish)
    if first:
        skipped = sum(len(s["skipped"]) for s in manifest["shards"])
        rate = f"{new / seconds:.3g} images/s on {processes.world} process(es)" if new else "nothing left to do"
        print(f"extracted {manifest['count']} images ({views} views each) into {len(manifest['shards'])} shards "
              f"at {config.output_dir}; skipped {skipped} unreadable; {new} read now ({rate}), "
              f"{len(files) - new} kept from an earlier run")
    return manifest


def _encode_shards(shards: list[int], config: ExtractConfig, encoder: _Encoder, batch_size: int,
                   writer: ShardWriter) -> Iterator[tuple[int, Optional[dict]]]:
    """Encode and save `shards` (indices) in turn: yields (images read, None) after each batch and
    (0, the shard's manifest entry) once a shard's files are written."""
    images_per_batch = max(1, batch_size // _num_views(config.augment))
    side = config.image_size // encoder.tokenizer.downsample
    for index in shards:
        loader = DataLoader(_ImageViews(_shard_files(encoder.files, index, config.shard_size), config),
                            batch_size=images_per_batch, num_workers=encoder.workers, collate_fn=_collate,
                            pin_memory=encoder.device.type == "cuda")
        tokens, labels, captions, skipped = [], [], [], []
        for batch in loader:
            good = [item for item in batch if item[0] is not None]
            for _, _, path, error, _ in batch:
                if error is not None:
                    log.warning("skipping unreadable image %s (%s)", path, error)
                    skipped.append(path)
            if good:
                views = torch.stack([item[0] for item in good]).to(encoder.device, non_blocking=True)  # uint8
                codes = encoder.tokenizer.encode(rearrange(views, "b a c h w -> (b a) c h w").float() / 127.5 - 1)
                tokens.append(rearrange(codes, "(b a) h w -> b a (h w)", b=len(good)).cpu().numpy())
                labels.extend(item[1] for item in good)
                captions.extend(item[4] for item in good)
            yield len(batch), None
        stacked = np.concatenate(tokens) if tokens else np.zeros((0, _num_views(config.augment), side * side))
        conditions = np.array(labels, dtype=np.int64)
        if config.captions:  # their embeddings, made where the images were encoded
            conditions = (writer.condition.check(captions, device=encoder.device) if captions
                          else writer.condition.no_captions())
        yield 0, writer.save_shard(index, stacked, conditions, skipped)
