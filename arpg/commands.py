"""The console commands a pip install gives (`arpg-train`, `arpg-sample`, `arpg-sample-fid`,
`arpg-evaluate`, `arpg-extract-codes`), the same as `python scripts/<name>.py`: Hydra overrides on
the command line (`arpg-train model=par_tiny`, `arpg-sample-fid preset=arpg_l checkpoint=...`),
`--help`, `--cfg job` to print the composed config without running. The configs ship inside the
package (`arpg.recipes.CONFIG_DIR`), so they work from any folder."""

from __future__ import annotations

from arpg.cli import hydra_main


def train() -> None:
    """`arpg-train`: train ARPG, LlamaGen or PAR (`arpg.train.TrainConfig`, arpg/configs/train.yaml)."""
    from arpg.train import TrainConfig, train as run

    hydra_main(run, TrainConfig, "train")


def sample() -> None:
    """`arpg-sample`: a PNG grid of class-conditional samples (`arpg.sample.script.SampleConfig`)."""
    from arpg.sample.script import SampleConfig, sample_images

    hydra_main(sample_images, SampleConfig, "sample")


def sample_fid() -> None:
    """`arpg-sample-fid`: N samples as PNGs and an ADM-style .npz (`arpg.sample_fid.SampleFIDConfig`)."""
    from arpg.sample_fid import SampleFIDConfig, sample_fid as run

    hydra_main(run, SampleFIDConfig, "sample_fid")


def evaluate() -> None:
    """`arpg-evaluate`: FID, Inception Score and precision/recall of a sample .npz (`arpg.eval.EvalConfig`)."""
    from arpg.eval import EvalConfig, evaluate as run

    hydra_main(run, EvalConfig, "evaluate")


def extract_codes() -> None:
    """`arpg-extract-codes`: tokenise an ImageFolder tree into token shards (`arpg.data.ExtractConfig`)."""
    from arpg.data import ExtractConfig, extract_codes as run

    hydra_main(run, ExtractConfig, "extract_codes")
