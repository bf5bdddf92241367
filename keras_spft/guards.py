"""Stopping a diverging run before it writes a broken model."""

import math

import numpy as np
import keras
from keras import ops

__all__ = ["TerminateOnNonFinite"]


class TerminateOnNonFinite(keras.callbacks.Callback):
    """Stops training with a clear error as soon as the loss is NaN or inf.

    Unlike `keras.callbacks.TerminateOnNaN`, which lets the epoch finish (so
    a `ModelCheckpoint` placed after it can still write the broken weights),
    this raises `FloatingPointError` at the end of the offending batch, naming
    the epoch, the batch and the weights that are no longer finite. Put it
    first in the callbacks list. The projections never create NaN from finite
    weights; a NaN comes from the loss or the gradients (too high a learning
    rate, bad inputs).

    A weight can turn NaN while the loss stays finite (a compiled ReLU may map
    NaN to 0): the per-batch check of the loss misses it, and the default
    end-of-epoch scan of the weights catches it only then. With a
    `ModelCheckpoint` that saves during an epoch, pass `check_weights="batch"`
    so the last good checkpoint stays untouched.

    Args:
        check_weights: scan the model's weights for NaN/inf too: `True` at
            the end of every epoch (default; one pass, cheap next to an
            epoch), `"batch"` after every batch (one pass over the weights
            per step), `False` never.

    Example:

    >>> import numpy as np, keras, keras_spft
    >>> guard = keras_spft.TerminateOnNonFinite()
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> model.compile("sgd", "mse")
    >>> _ = model.fit(np.ones((4, 2)), np.ones((4, 1)), callbacks=[guard], verbose=0)
    """

    def __init__(self, check_weights=True):
        super().__init__()
        if check_weights not in (True, False, "batch"):
            raise ValueError(f"check_weights must be True, False or 'batch', got {check_weights!r}.")
        self.check_weights = check_weights
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def _bad_weights(self):
        weights = [v for v in self.model.weights if "float" in str(v.dtype)]
        if not weights:
            return []
        # One small transfer: a finite flag per weight, computed where the weights are.
        ok = ops.convert_to_numpy(ops.stack([ops.all(ops.isfinite(v.value)) for v in weights]))
        return [v.path for v, good in zip(weights, ok) if not good]

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        loss = None if loss is None else float(np.asarray(loss))
        if loss is not None and math.isfinite(loss) and self.check_weights == "batch":
            bad = self._bad_weights()
            if bad:
                self.model.stop_training = True
                raise FloatingPointError(
                    f"weights became non-finite at epoch {self._epoch}, batch {batch} (the loss, {loss}, "
                    f"did not show it): {_listed(bad)}. Lower the learning rate or check the inputs.")
        if loss is not None and not math.isfinite(loss):
            self.model.stop_training = True
            bad = self._bad_weights()
            raise FloatingPointError(
                f"loss became {loss} at epoch {self._epoch}, batch {batch}; training stopped "
                "before any further checkpoint. Non-finite weights: "
                + (_listed(bad) if bad else "none")
                + ". Lower the learning rate or check the inputs."
            )

    def on_epoch_end(self, epoch, logs=None):
        if self.check_weights:
            bad = self._bad_weights()
            if bad:
                self.model.stop_training = True
                raise FloatingPointError(
                    f"weights became non-finite by the end of epoch {epoch}: {_listed(bad)}."
                )


def _listed(names):
    """The first ten names, and how many more."""
    return ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
