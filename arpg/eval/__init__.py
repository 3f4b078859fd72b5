"""Sample-quality metrics: FID, Inception Score and k-NN precision/recall of an image `.npz`.

Modules: `metrics` (the maths: numpy, scipy and torch only), `npz` (ADM's `.npz` image sets,
streamed), `inception` (the FID Inception-v3 features, fetched on first use, or any
`FeatureExtractor` by name), `reference` (reference batches and their statistics), `evaluation`
(`EvalConfig`, `evaluate`, `evaluate_npz`, `summary_table`).
"""

from arpg.eval.evaluation import EvalConfig, evaluate, evaluate_npz, summary_table
from arpg.eval.inception import (DEFAULT_WEIGHTS_DIR, INCEPTION_FEATURE_DIM, INCEPTION_NUM_CLASSES,
                                 INCEPTION_WEIGHTS_FILENAME, INCEPTION_WEIGHTS_SHA256_PREFIX, INCEPTION_WEIGHTS_URL,
                                 FeatureExtractor, InceptionFeatures, extract_features, import_extractor,
                                 resolve_inception_weights)
from arpg.eval.metrics import feature_statistics, frechet_distance, inception_score, precision_recall
from arpg.eval.npz import NpzImages, npz_keys
from arpg.eval.reference import (ADM_REFERENCE_BATCHES, check_reference_batch, load_reference_stats,
                                 resolve_reference_batch)

__all__ = ["ADM_REFERENCE_BATCHES", "DEFAULT_WEIGHTS_DIR", "INCEPTION_FEATURE_DIM", "INCEPTION_NUM_CLASSES",
           "INCEPTION_WEIGHTS_FILENAME", "INCEPTION_WEIGHTS_SHA256_PREFIX", "INCEPTION_WEIGHTS_URL", "EvalConfig",
           "FeatureExtractor", "InceptionFeatures", "NpzImages", "check_reference_batch", "evaluate",
           "evaluate_npz", "extract_features", "feature_statistics", "frechet_distance", "import_extractor",
           "inception_score", "load_reference_stats", "npz_keys", "precision_recall", "resolve_inception_weights",
           "resolve_reference_batch", "summary_table"]
