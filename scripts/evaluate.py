"""FID, Inception Score and precision/recall of a sample .npz against a reference batch (see `arpg.eval`).

    python scripts/evaluate.py sample_npz=samples/arpg_l_cfg5.npz ref_npz=VIRTUAL_imagenet256_labeled.npz \
        weights_path=~/.cache/arpg device=cuda
"""

from arpg.commands import evaluate

if __name__ == "__main__":
    evaluate()
