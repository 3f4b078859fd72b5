"""Token data sets: on-disk shards, the bundled digits set, and image -> token extraction.

Modules: `shards` (the shard format: `ShardWriter`, `TokenDataset`), `digits` (scikit-learn's
digits as tokens, `InMemoryTokenDataset`), `settings` (`DataSettings`, `build_dataset`), `npy`
(the published per-image .npy layout -> shards), `extraction` (image folder -> shards,
`extract_codes`).
"""

from arpg.data.digits import (DIGIT_NAMES, DIGIT_STROKES, DIGITS_CAPTION_DIM, DIGITS_CAPTION_TOKENS, DIGITS_SPLITS,
                              DIGITS_TEXT_ENCODER, InMemoryTokenDataset, digit_prompt, digit_strokes,
                              digits_dataset, digits_ink_medians)
from arpg.data.extraction import (AUGMENT_CHOICES, IMAGE_EXTENSIONS, ExtractConfig, center_crop, default_batch_size,
                                  extract_codes)
from arpg.data.npy import PUBLISHED_VQ16_IDENTITY, convert_npy_folder, list_npy_folder, read_npy_codes
from arpg.data.settings import CONDITION_CHOICES, DATA_CHOICES, DataSettings, build_dataset
from arpg.data.shards import MANIFEST_NAME, ShardWriter, TokenDataset, dataset_identity

__all__ = ["AUGMENT_CHOICES", "CONDITION_CHOICES", "DATA_CHOICES", "DIGITS_CAPTION_DIM", "DIGITS_CAPTION_TOKENS",
           "DIGITS_SPLITS", "DIGITS_TEXT_ENCODER", "DIGIT_NAMES", "DIGIT_STROKES", "IMAGE_EXTENSIONS",
           "MANIFEST_NAME", "PUBLISHED_VQ16_IDENTITY", "DataSettings", "ExtractConfig", "InMemoryTokenDataset",
           "ShardWriter", "TokenDataset", "build_dataset", "center_crop", "convert_npy_folder", "dataset_identity",
           "default_batch_size", "digit_prompt", "digit_strokes", "digits_dataset", "digits_ink_medians",
           "extract_codes", "list_npy_folder", "read_npy_codes"]
