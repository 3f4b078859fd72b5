"""Samples for FID: N class-conditional images as PNGs and one `.npz` for ADM's evaluation suite.

    torchrun --nproc_per_node 8 scripts/sample_fid.py checkpoint=arpg_300m.pt vq_ckpt=vq_ds16_c2i.pt \
        output_dir=samples/arpg_l_cfg5
    python scripts/evaluate.py sample_npz=samples/arpg_l_cfg5.npz ref_npz=VIRTUAL_imagenet256_labeled.npz

What image i is does not depend on how it was made:

* image i (0 <= i < num_images) has class i % num_classes, so 50,000 images of a 1000-class model
  are exactly 50 per class and any prefix is as balanced as it can be;
* its decoding order and sampling noise come from its own generator, seeded with
  `image_seed(seed, i)`, and `arpg.sample.generate` makes a sample depend on its own generator
  only (not on the other samples of the batch);
* work is handed out by index: the missing indices are cut into batches of `batch_size` and
  process r takes batches r, r + world, r + 2 * world, ...

So image i is the same on 1 or 8 processes, in any batch, in a first or a resumed run (up to the
float round-off of the batched network, which changes a sampled token only at an exact tie).

Files: `<output_dir>/<i:06d>.png` (RGB, each written to a temporary file and renamed, so a file
that exists is complete), `<output_dir>/sample_fid.json` (the settings that decide the images,
with the SHA-256 of the weights and tokenizer files rather than their paths: a rerun with other
settings or other weights into the same folder is refused) and, once all N images exist,
`<output_dir>.npz` (written by rank 0, atomically): `arr_0` uint8 (N, H, W, 3), `arr_1` int64
(N,) class labels. A rerun skips the images that exist and generates only the missing ones.

Order of work: the settings are checked alone, then the folder is locked (`arpg.files.FolderLock`,
rank 0) and checked against what it holds, then the model and tokenizer are loaded and the
sampling settings checked against them; only then is the settings file written and any image drawn.
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import timedelta
from itertools import islice
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from arpg.checkpoint import WEIGHTS_CHOICES, load_model
from arpg.cli import overlay_field
from arpg.errors import describe_differences, differences, require
from arpg.eval import NpzImages
from arpg.files import FolderLock, atomic_write, check_free_space, file_digest, remove_partial_writes
from arpg.runtime import derive_seed, resolve_device, use_bf16
from arpg.sample import SamplingOptions, generate
from arpg.sample.decode import check_sampling, check_tokenizer
from arpg.sample.options import resolve_options
from arpg.tokenizer import TOKENIZER_CHOICES, load_tokenizer

SETTINGS_FILE = "sample_fid.json"
PRECISION_CHOICES = ("autocast", "bf16")
# Settings that decide how the images are made but not which images they are (device and amp
# change only the float arithmetic): left out of SETTINGS_FILE, so a run may be resumed with
# another batch size, device or image count.
_NOT_RECORDED = ("num_images", "batch_size", "output_dir", "device", "write_threads")
_NOT_RECORDED_SAMPLING = ("amp", "compile")
# Ranks meet when rank 0 has prepared and listed the folder and every rank has loaded the model,
# and after sampling. Sampling is balanced to within one batch, so waits are short; the limit only
# has to outlast loading the largest model.
_BARRIER_TIMEOUT = timedelta(hours=1)


@dataclass
class SampleFIDConfig:
    """`scripts/sample_fid.py` (mirrored by `arpg/configs/sample_fid.yaml`). `sampling`: fields of
    `SamplingOptions` that replace the model's recipe's (`model.sampling`), from the
    `arpg/configs/sampling/` group, a preset (every published field) and the command line; empty: the
    recipe. From Python it may also be a whole `SamplingOptions`, used as it is."""

    checkpoint: str = "???"  # our .safetensors or a published ARPG / LlamaGen / PAR .pt
    weights: str = "default"  # default | model | ema
    # Tokens per side for checkpoints that do not record their grid (published .pt files): None keeps
    # 16 (256px); 24 for LlamaGen's *_384.pt and the released PAR models (384px).
    token_grid: Optional[int] = None
    # Resize the decoded images to this many pixels per side (bicubic, before the uint8 conversion)
    # for evaluation; None keeps the tokenizer's size. 256 for 384px models, as PAR and LlamaGen do.
    image_size_eval: Optional[int] = None
    tokenizer: str = "vq16"  # vq16: the VQ autoencoder in vq_ckpt | pixel_digits: 8x8 digits, 17 grey levels
    vq_ckpt: str = ""  # LlamaGen's vq_ds16_c2i.pt, or our VQ .safetensors (any VQConfig; its config is stored)
    num_images: int = 50000  # image i has class i % num_classes
    sampling: Any = overlay_field(SamplingOptions)
    # autocast (ours): float32 weights, norms and softmax inputs, bf16 matmuls on CUDA (sampling.amp) |
    # bf16 (published): the whole model cast to bf16, as sample_c2i_ddp.py's --precision does
    precision: str = "autocast"
    seed: int = 0
    batch_size: int = 64  # images per process per decode (the network sees twice that with guidance)
    output_dir: str = "samples/arpg"  # PNGs; the .npz goes next to it as <output_dir>.npz
    device: str = "auto"  # auto: cuda:LOCAL_RANK when CUDA is available, else cpu | cpu | cuda | cuda:N
    write_threads: int = 4  # PNG encoding threads, overlapping the writes with the next batch


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index`'s generator: a hash of (seed, index), 63 bits."""
    return derive_seed(seed, index)


def image_path(output_dir: str | Path, index: int) -> Path:
    return Path(output_dir) / f"{index:06d}.png"


def npz_path(output_dir: str | Path) -> Path:
    """Where `sample_fid` writes the `.npz` of `output_dir`: beside it, as `<output_dir>.npz`."""
    output_dir = Path(output_dir)
    return output_dir.with_name(output_dir.name + ".npz")


def sample_fid(config: SampleFIDConfig) -> Path:
    """Make sure `config.num_images` samples exist in `config.output_dir` and their `.npz` beside it.

    Runs on every process of a torchrun / `accelerate launch` job (gloo on CPU, NCCL on GPU) or as
    a single process. Returns the path of the `.npz`.
    """
    _validate(config)
    rank, world, device = _setup_processes(config.device)
    try:
        return _sample_fid(config, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _sample_fid(config: SampleFIDConfig, rank: int, world: int, device: torch.device) -> Path:
    output_dir, npz = Path(config.output_dir), npz_path(config.output_dir)
    with FolderLock(output_dir, "FID sampling") if rank == 0 else nullcontext():
        if rank == 0:  # rank 0 keeps the folder's books; if it refuses, the launcher stops the others
            settings = _recorded_settings(config)
            _check_settings(settings, output_dir)
        grid = {} if config.token_grid is None else {"block_size": config.token_grid ** 2}
        model = load_model(config.checkpoint, weights=config.weights, device=device,
                           dtype=torch.bfloat16 if config.precision == "bf16" and use_bf16(True, device) else None,
                           **grid)
        tokenizer = load_tokenizer(config.tokenizer, config.vq_ckpt).to(device)
        check_tokenizer(model, tokenizer)
        options = resolve_options(model.sampling, config.sampling, {})
        check_sampling(model, options)
        model.condition.fid_conditions([0])  # the model's conditions can be assigned to images (class labels)
        # Rank 0 lists the folder after its cleanup and before anyone writes, and hands the list
        # to the others: nodes can see different listings of a shared (NFS) folder.
        missing = None
        if rank == 0:
            remove_partial_writes(output_dir, "*.png")
            remove_partial_writes(npz.parent, npz.name)
            missing = _missing_indices(output_dir, config.num_images)
            side = config.image_size_eval or model.grid[0] * tokenizer.downsample
            _check_space(output_dir, npz, config.num_images, missing, side)
            text = json.dumps(settings, indent=1)
            atomic_write(output_dir / SETTINGS_FILE, lambda tmp: tmp.write_text(text))
        missing = _from_rank0(missing, device)

        batches = [missing[i:i + config.batch_size] for i in range(0, len(missing), config.batch_size)]
        started = time.perf_counter()
        mine = batches[rank::world]
        if mine:
            _generate_batches(model, tokenizer, mine, config, options, device, rank, world)
        _barrier(device)
        seconds = time.perf_counter() - started

        if rank != 0:
            return npz
        if missing or not _npz_is_complete(npz, config.num_images):
            write_npz(output_dir, config.num_images, model.config.num_classes, npz)
    rate = f"{len(missing) / seconds:.2f} images/s over {world} process(es)" if missing else "nothing to sample"
    print(f"{config.num_images} images in {output_dir.resolve()} ({len(missing)} new, "
          f"{config.num_images - len(missing)} kept): {rate}; npz {npz.resolve()}")
    return npz


def _generate_batches(model, tokenizer, batches: list[list[int]], config: SampleFIDConfig,
                      options: SamplingOptions, device: torch.device, rank: int, world: int) -> None:
    """Sample and write this rank's batches; PNG encoding of one batch overlaps the next decode."""
    progress = tqdm(total=sum(map(len, batches)), unit="img", disable=rank != 0,
                    desc=f"sampling (rank 0 of {world})" if world > 1 else "sampling")
    with ThreadPoolExecutor(max_workers=config.write_threads) as pool:
        writing: list[Future] = []
        for indices in batches:
            conditions = model.condition.fid_conditions(indices, device)
            generators = [torch.Generator().manual_seed(image_seed(config.seed, i)) for i in indices]
            images = generate(model, conditions, options, generator=generators,
                              tokenizer=tokenizer)  # (B, C, H, W) in [-1, 1]
            if config.image_size_eval is not None:
                size = (config.image_size_eval, config.image_size_eval)
                images = F.interpolate(images, size=size, mode="bicubic")
            pictures = tokenizer.to_pil(images)
            for future in writing:  # the previous batch; re-raises a failed write
                future.result()
            progress.update(len(writing))
            writing = [pool.submit(_write_png, image_path(config.output_dir, i), picture)
                       for i, picture in zip(indices, pictures)]
        for future in writing:
            future.result()
        progress.update(len(writing))
    progress.close()


def _check_space(output_dir: Path, npz: Path, num_images: int, missing: list[int], side: int) -> None:
    """Refuse to start when the `missing` PNGs and the `.npz` cannot fit. The `.npz` holds the raw
    pixels; a PNG is taken as large as (up to 100 of) those already there, or half its raw pixels
    when there are none yet (natural images compress to about that)."""
    raw = side * side * 3
    absent = set(missing)
    written = list(islice((image_path(output_dir, i) for i in range(num_images) if i not in absent), 100))
    png = sum(p.stat().st_size for p in written) // len(written) if written else raw // 2
    npz_bytes = 0 if not missing and _npz_is_complete(npz, num_images) else num_images * (raw + 8)
    check_free_space({output_dir: len(missing) * png, npz.parent: npz_bytes},
                     f"{len(missing)} FID sample PNGs of {side}x{side} and their .npz")


def _write_png(path: Path, picture: Image.Image) -> None:
    # RGB even for grey tokenizers: the ADM suite reads (H, W, 3).
    rgb = picture.convert("RGB")
    atomic_write(path, lambda tmp: rgb.save(tmp, format="PNG"))


def write_npz(output_dir: str | Path, num_images: int, num_classes: int, path: str | Path) -> Path:
    """Pack `<output_dir>/000000.png ...` (num_images of them) into an ADM-style `.npz` at `path`.

    `arr_0` is uint8 (N, H, W, 3), `arr_1` the labels i % num_classes. The images are streamed into
    the (uncompressed, zip64) archive one at a time, so 50k 256x256 images (about 10 GB) never
    sit in memory at once. Written atomically.
    """
    first = _read_png(image_path(output_dir, 0))
    shape = (num_images, *first.shape)
    labels = np.arange(num_images, dtype=np.int64) % num_classes

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as member:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                          "shape": shape}
                np.lib.format.write_array_header_1_0(member, header)
                for index in tqdm(range(num_images), desc="npz", unit="img"):
                    pixels = first if index == 0 else _read_png(image_path(output_dir, index))
                    if pixels.shape != first.shape:
                        raise ValueError(f"{image_path(output_dir, index)} has shape {pixels.shape}, "
                                         f"{image_path(output_dir, 0)} has {first.shape}")
                    member.write(pixels.tobytes())
            with archive.open("arr_1.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, labels)

    return atomic_write(path, write, what="the FID sample archive", size=num_images * (first.nbytes + 8))


def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as picture:
        return np.asarray(picture.convert("RGB"), dtype=np.uint8)  # (H, W, 3)


def _npz_is_complete(path: Path, num_images: int) -> bool:
    """Whether `path` is a readable `.npz` of `num_images` images; a file cut short is not (it is rewritten)."""
    if not path.is_file():
        return False
    try:
        return len(NpzImages(path)) == num_images
    except (ValueError, zipfile.BadZipFile):  # not a zip (its directory is at the end), or not images
        return False


# ---------------------------------------------------------------------------------------------
# Folder bookkeeping
# ---------------------------------------------------------------------------------------------

def _missing_indices(output_dir: Path, num_images: int) -> list[int]:
    existing = set(os.listdir(output_dir)) if output_dir.is_dir() else set()
    return [i for i in range(num_images) if image_path(output_dir, i).name not in existing]


def _recorded_settings(config: SampleFIDConfig) -> dict:
    """What decides the images: the settings, and the weights and tokenizer by content (SHA-256);
    their paths are kept for the reader under "files" and not compared."""
    settings = {k: v for k, v in asdict(config).items() if k not in (*_NOT_RECORDED, "checkpoint", "vq_ckpt")}
    settings["sampling"] = {k: v for k, v in settings["sampling"].items() if k not in _NOT_RECORDED_SAMPLING}
    settings["checkpoint_sha256"] = file_digest(config.checkpoint)
    settings["tokenizer_sha256"] = file_digest(config.vq_ckpt) if config.tokenizer == "vq16" else None
    settings["files"] = {key: str(Path(getattr(config, key)).resolve()) for key in ("checkpoint", "vq_ckpt")
                         if getattr(config, key)}
    return settings


def _check_settings(settings: dict, output_dir: Path) -> None:
    path = output_dir / SETTINGS_FILE
    if not path.is_file():
        return
    recorded = json.loads(path.read_text())
    differ = differences(recorded, {k: v for k, v in settings.items() if k != "files"})
    require(not differ, f"{output_dir} holds samples made with other settings ({describe_differences(differ)}); "
                        f"use another output_dir, or delete it to start over")


# ---------------------------------------------------------------------------------------------
# Processes and checks
# ---------------------------------------------------------------------------------------------

def _setup_processes(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from the launcher's environment; joins the process group when
    there are several processes (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=_BARRIER_TIMEOUT)
    return rank, world, device


def _from_rank0(value, device: torch.device):
    """Rank 0's `value` on every rank (a picklable object)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    return box[0]


def _barrier(device: torch.device) -> None:
    if dist.is_initialized():
        dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)


def _validate(config: SampleFIDConfig) -> None:
    require(config.checkpoint not in ("", "???"),
            "checkpoint must be set (our .safetensors or a published ARPG / LlamaGen / PAR .pt)")
    require(Path(config.checkpoint).is_file(), f"checkpoint {config.checkpoint!r} not found")
    require(config.tokenizer != "vq16" or Path(config.vq_ckpt).is_file(),
            f"vq_ckpt {config.vq_ckpt!r} not found: tokenizer=vq16 needs LlamaGen's vq_ds16_c2i.pt (downloaded by "
            f"you from huggingface.co/FoundationVision/LlamaGen) or our VQ .safetensors")
    require(config.token_grid is None or config.token_grid >= 1,
            f"token_grid must be >= 1 or null, got {config.token_grid}")
    require(config.image_size_eval is None or config.image_size_eval >= 1,
            f"image_size_eval must be >= 1 or null (no resize), got {config.image_size_eval}")
    require(config.weights in WEIGHTS_CHOICES, f"weights must be one of {WEIGHTS_CHOICES}, got {config.weights!r}")
    require(config.tokenizer in TOKENIZER_CHOICES,
            f"tokenizer must be one of {TOKENIZER_CHOICES}, got {config.tokenizer!r}")
    require(config.precision in PRECISION_CHOICES,
            f"precision must be one of {PRECISION_CHOICES}, got {config.precision!r}")
    require(config.num_images >= 1, f"num_images must be >= 1, got {config.num_images}")
    require(config.batch_size >= 1, f"batch_size must be >= 1, got {config.batch_size}")
    require(config.seed >= 0, f"seed must be >= 0, got {config.seed}")
    require(config.write_threads >= 1, f"write_threads must be >= 1, got {config.write_threads}")
    require(config.output_dir not in ("", "."), f"output_dir must name a folder of its own, got {config.output_dir!r}")
    resolve_device(config.device)
