"""Evaluation: how good is a model, and does it copy its training data?

One implementation of each metric lives here; the CLI, the trainer and the benchmarks import it
(``from diffusion_forge import evaluate as ev; ev.frechet_distance(...)``).

* ``metrics.py``: Frechet distance, KID (unbiased MMD^2, cubic kernel), precision / recall (k-NN
  manifolds), and the labels that carry the network and the sample count ("FD-EffNet@2k").
* ``features.py``: the feature networks by name (FD-EffNet: EfficientNet-Lite0; FID: pytorch-fid's
  Inception-v3 when its weights file exists; the coordinates of points), their input handling, and the
  cached features of the fixed reference images.
* ``digits.py``: the MNIST digit classifier (FD-Digits, digit confidence), trained once and cached.
* ``memorisation.py``: nearest training images per sample, near-copy fraction.
* ``likelihood.py``: NLL in bits/dim from the variational bound, stratified Monte Carlo over t, 95% interval.
* ``pipeline.py``: every metric for a sample set (``evaluate_images``), and the quick check during
  training (``evaluate_during_training``, sampling through ``sampling.generate.generate``).

Everything built once (classifier weights, reference statistics) is cached in ``cache_dir()``
(``$DFORGE_CACHE``, default ``~/.cache/diffusion_forge``), keyed by a hash of what produced it and
written atomically. Tests that swap a module-level setting patch the module that defines it
(e.g. ``evaluate.digits.DIGIT_RECIPE``).
"""
from ..io.files import cache_dir
from ..models.feature_nets import EFFNET_FEATURES, EfficientNetLite0, InceptionV3FID
from .digits import (DIGIT_RECIPE, SECOND_DIGIT_RECIPE, DigitClassifier, DigitFeatures, LeNetDigits,
                     _digit_key as _digit_key, digit_classifier, digit_accuracy, digit_confidence_score,
                     train_digit_classifier)
from .features import (DIGIT_DATA, EFFNET_SIZE, FEATURE_NETWORKS, INCEPTION_ENV, INCEPTION_FILE, Coordinates,
                       EffNetFeatures, InceptionFeatures, as_model_images, default_networks,
                       efficientnet_weights_path, feature_network, inception_weights_path, load_reference_images,
                       reference_features)
from .likelihood import nll_bits_per_dim
from .memorisation import memorization, nearest_training
from .metrics import (compare_features, count_label, feature_stats, frechet_distance, frechet_distance_features,
                      kernel_inception_distance, metric_label, mmd2_unbiased, precision_recall)
from .pipeline import evaluate_during_training, evaluate_images

__all__ = [
    "cache_dir", "EFFNET_FEATURES", "EfficientNetLite0", "InceptionV3FID",
    "DIGIT_RECIPE", "SECOND_DIGIT_RECIPE", "DigitClassifier", "DigitFeatures", "LeNetDigits", "digit_classifier",
    "digit_confidence_score", "digit_accuracy", "train_digit_classifier",
    "DIGIT_DATA", "EFFNET_SIZE", "FEATURE_NETWORKS", "INCEPTION_ENV", "INCEPTION_FILE", "Coordinates",
    "EffNetFeatures", "InceptionFeatures", "as_model_images", "default_networks", "efficientnet_weights_path",
    "feature_network", "inception_weights_path", "load_reference_images", "reference_features",
    "nll_bits_per_dim", "memorization", "nearest_training",
    "compare_features", "count_label", "feature_stats", "frechet_distance", "frechet_distance_features",
    "kernel_inception_distance", "metric_label", "mmd2_unbiased", "precision_recall",
    "evaluate_during_training", "evaluate_images",
]
