"""Stopping a diverging run before it writes a broken model."""

import math

import numpy as np
import keras
from keras import ops


class TerminateOnNonFinite(keras.callbacks.Callback):
    """Stops training with a clear error as soon as the loss is NaN or inf.

    Unlike `keras.callbacks.TerminateOnNaN`, which lets the epoch finish (so
    a `ModelCheckpoint` placed after it can still write the broken weights),
    this raises `FloatingPointError` at the end of the offending batch, naming
    the epoch, the batch and the weights that are no longer finite. Put it
    first in the callbacks list. The projections never create NaN from finite
    weights; a NaN comes from the loss or the gradients (too high a learning
    rate, bad inputs), and the last good checkpoint stays untouched.

    Args:
        check_weights: also scan the model's weights at the end of every
            epoch (one pass over them; cheap next to an epoch).

    Example:

    >>> import numpy as np, keras, keras_spft
    >>> guard = keras_spft.TerminateOnNonFinite()
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> model.compile("sgd", "mse")
    >>> _ = model.fit(np.ones((4, 2)), np.ones((4, 1)), callbacks=[guard], verbose=0)
    """

    def __init__(self, check_weights=True):
        super().__init__()
        self.check_weights = check_weights
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def _bad_weights(self):
        return [v.path for v in self.model.weights
                if "float" in str(v.dtype) and not np.all(np.isfinite(ops.convert_to_numpy(v)))]

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        loss = float(np.asarray(loss))
        if not math.isfinite(loss):
            self.model.stop_training = True
            bad = self._bad_weights()
            raise FloatingPointError(
                f"loss became {loss} at epoch {self._epoch}, batch {batch}; training stopped "
                "before any further checkpoint. Non-finite weights: "
                + (", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "") if bad else "none")
                + ". Lower the learning rate or check the inputs."
            )

    def on_epoch_end(self, epoch, logs=None):
        if self.check_weights:
            bad = self._bad_weights()
            if bad:
                self.model.stop_training = True
                raise FloatingPointError(
                    f"weights became non-finite by the end of epoch {epoch}: {', '.join(bad[:10])}."
                )
