"""`DataSettings` (the `data` group of the configs) and `build_dataset`, the data set they name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from arpg.condition import ClassCondition
from arpg.data.digits import DIGITS_SPLITS, InMemoryTokenDataset, digits_dataset
from arpg.data.shards import MANIFEST_NAME, TokenDataset
from arpg.errors import require

DATA_CHOICES = ("digits", "codes")
CONDITION_CHOICES = ("class", "text")


@dataclass
class DataSettings:
    """`digits`: scikit-learn's 8x8 digits as tokens (bundled). `codes`: a token-shard folder
    written by scripts/extract_codes.py (`path`)."""

    name: str = "digits"
    path: Optional[str] = None
    condition: str = "class"  # "class" ids | "text" captions (digits: "a thin seven"; codes: the shards')
    split: Optional[str] = None  # digits only: None (all 1797), "train" or "test"
    num_workers: Optional[int] = 0  # loader processes; None: one per core but one (at most 8)

    @property
    def label(self) -> str:
        """A short name for runs on this data: "digits" (or "digits_test"), or data.path's folder name."""
        if self.name == "digits":
            captions = "_captions" if self.condition == "text" else ""
            return "digits" + captions + (f"_{self.split}" if self.split else "")
        return Path(self.path).resolve().name

    def validate(self) -> None:
        """Raise `SettingError` naming the first bad key (prefixed `data.`)."""
        require(self.name in DATA_CHOICES, f"data.name must be one of {DATA_CHOICES}, got {self.name!r}")
        require(self.condition in CONDITION_CHOICES,
                f"data.condition must be one of {CONDITION_CHOICES}, got {self.condition!r}")
        if self.name == "codes":
            require(bool(self.path), "data.path must be set for data.name=codes (a folder made by "
                                     "scripts/extract_codes.py)")
            require(Path(self.path, MANIFEST_NAME).is_file(),
                    f"data.path {self.path!r} is not a token-shard folder (no {MANIFEST_NAME} there); make one "
                    f"with scripts/extract_codes.py or point data.path at it")
        else:
            require(self.split in DIGITS_SPLITS, f"data.split must be one of {DIGITS_SPLITS}, got {self.split!r}")
        require(self.num_workers is None or self.num_workers >= 0,
                f"data.num_workers must be >= 0 or null (one per core but one), got {self.num_workers}")


def build_dataset(data: DataSettings, seed: int = 0) -> TokenDataset | InMemoryTokenDataset:
    """The token data set a `DataSettings` names (items: ((T,) LongTensor, a condition of its `condition`))."""
    data.validate()
    if data.name == "digits":
        return digits_dataset(data.split, captions=data.condition == "text")
    dataset = TokenDataset(data.path, seed=seed)
    stored = "class" if isinstance(dataset.condition, ClassCondition) else "text"
    require(stored == data.condition, f"data.condition={data.condition!r}, but the shards in {data.path} hold "
                                      f"{stored} conditions; set data.condition={stored}")
    return dataset
