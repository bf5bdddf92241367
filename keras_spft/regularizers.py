"""Keras regularizers that penalise the distance of a kernel to its anchor.

Keras adds `variable.regularizer(variable)` to `model.losses` at every step,
so attaching one of these to a pre-trained kernel gives the penalty methods
L2-SP (Li et al., 2018) and MARS-SP (Gouk et al., 2021).

The 1/2 convention: `L2SP(strength)` adds `strength * ||W - A||_F^2` with no
factor 1/2, as in the code of Gouk et al. Li et al. write `alpha / 2 * ||.||^2`:
their `alpha` is `2 * strength` here.
"""

import keras
from keras import ops

from keras_spft.anchors import Anchored
from keras_spft.constraints import _axis_list, _compute_dtype, _normalized_axis

__all__ = ["L2SP", "MARSSP"]


class _DistancePenalty(Anchored, keras.regularizers.Regularizer):
    def _offset(self, x):
        x = ops.convert_to_tensor(x)
        self._check_shape(x)
        dtype = _compute_dtype(x.dtype)
        x = ops.cast(x, dtype)
        if self._anchor is None:
            return x
        return x - self._anchor_value(dtype, traced_with=x)

    @property
    def strength(self):
        """The strength variable (a scalar)."""
        return self._scale


@keras.saving.register_keras_serializable(package="keras_spft")
class L2SP(_DistancePenalty):
    """Penalty `strength * ||W - A||_F^2` (L2-SP, without the 1/2 factor).

    Args:
        anchor: the pre-trained kernel (copied once), or `None` for the
            origin, which makes this a plain L2 (weight decay) penalty for a
            new head.
        strength: positive float. Li et al.'s `alpha` equals `2 * strength`.
        name: optional label used in error messages and reports.

    Returns:
        Called on a kernel, a scalar loss tensor.

    Example:

    >>> import numpy as np, keras_spft
    >>> reg = keras_spft.L2SP(np.zeros((2, 2), "float32"), strength=0.1)
    >>> round(float(reg(np.ones((2, 2), "float32"))), 6)
    0.4
    """

    def __init__(self, anchor, strength, name=None):
        self._init_anchor(anchor, name)
        self._init_scale(strength, "strength", ())

    def __call__(self, x):
        t = self._offset(x)
        return self._scale_value(t.dtype, traced_with=t) * ops.sum(ops.square(t))

    def get_config(self):
        return {"anchor": self.anchor_spec, "strength": self._scale_config,
                "name": self.name}


@keras.saving.register_keras_serializable(package="keras_spft")
class MARSSP(_DistancePenalty):
    """Penalty `strength * max_r ||w_r - a_r||_1` (MARS-SP, not squared).

    Args:
        anchor: the pre-trained kernel (copied once), or `None` for the origin.
        strength: positive float.
        axis: axes summed per row, as in `keras.constraints.MaxNorm`
            (Dense `0`, Conv2D `[0, 1, 2]`).
        name: optional label used in error messages and reports.

    Returns:
        Called on a kernel, a scalar loss tensor.

    Example:

    >>> import numpy as np, keras_spft
    >>> reg = keras_spft.MARSSP(np.zeros((2, 2), "float32"), 0.5, axis=0)
    >>> float(reg(np.array([[1., 0.], [2., 1.]], "float32")))
    1.5
    """

    def __init__(self, anchor, strength, axis=0, name=None):
        self._init_anchor(anchor, name)
        self._axis_arg = _axis_list(axis, self._owner())
        if self._anchor is not None:
            _normalized_axis(self._axis_arg, len(self._anchor.shape), self._owner())
        self._init_scale(strength, "strength", ())

    def __call__(self, x):
        t = self._offset(x)
        axis = _normalized_axis(self._axis_arg, len(t.shape), self._owner())
        # sign(t) * t, not |t|: the same value, but a gradient of exactly 0
        # where t = 0 on every backend (JAX's |x| has slope 1 at 0, so at the
        # anchor, the first step of every fine-tuning, the penalty would push
        # all weights one way on JAX only).
        rows = ops.sign(t) * t if len(axis) == 0 else ops.sum(ops.sign(t) * t, axis=axis, keepdims=True)
        return self._scale_value(t.dtype, traced_with=t) * ops.max(rows)

    def get_config(self):
        return {"anchor": self.anchor_spec, "strength": self._scale_config,
                "axis": self._axis_arg, "name": self.name}
