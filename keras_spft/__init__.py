"""keras-spft: regularised fine-tuning of pre-trained Keras 3 models."""

from keras_spft.constraints import FrobeniusDistance, MARSDistance
from keras_spft.regularizers import L2SP, MARSSP

__version__ = "0.1.0"
from keras_spft.wrap import WrapReport, wrap_pretrained
from keras_spft.learned import RadiusOptimizer, learned_radii
from keras_spft.guards import TerminateOnNonFinite
from keras_spft.delta import DeltaModel, add_delta, compute_attention
from keras_spft.diagnostics import DistanceMonitor, GradientNormMonitor, gradient_norms
from keras_spft.batchnorm import reestimate_batchnorm
from keras_spft import bounds, plots  # noqa: F401  (plots imports matplotlib lazily)

__all__ = [
    "wrap_pretrained", "WrapReport", "MARSDistance", "FrobeniusDistance", "L2SP", "MARSSP",
    "RadiusOptimizer", "learned_radii", "TerminateOnNonFinite", "DeltaModel", "add_delta",
    "compute_attention", "DistanceMonitor", "GradientNormMonitor", "gradient_norms", "reestimate_batchnorm",
]
