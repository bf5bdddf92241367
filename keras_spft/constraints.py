"""Keras constraints that keep a kernel within a distance of its anchor.

Keras applies `variable.constraint` after every optimizer update, on every
backend and inside compiled steps, so attaching one of these to a pre-trained
kernel turns any optimizer into the projected gradient method of Gouk et al.
(2021): `W <- proj(W)` after each step.
"""

import numpy as np
import keras
from keras import ops

from keras_spft import ops as spft_ops
from keras_spft.anchors import Anchored, check_positive, is_spec

PROJECTIONS = ("scale", "exact")


def _axis_list(axis):
    if axis is None:
        return None
    if isinstance(axis, int):
        return [axis]
    return [int(a) for a in axis]


def _compute_dtype(dtype):
    # Project 16-bit weights in float32; round once when storing.
    return dtype if str(dtype) in ("float32", "float64") else "float32"


class _DistanceConstraint(Anchored, keras.constraints.Constraint):
    """Shared machinery: offset from the anchor, project, add the anchor back."""

    def _project(self, t, radius):
        raise NotImplementedError

    def _row_shape(self, shape):
        raise NotImplementedError

    def __call__(self, w):
        w = ops.convert_to_tensor(w)
        self._check_shape(w)
        dtype = _compute_dtype(w.dtype)
        x = ops.cast(w, dtype)
        radius = ops.cast(self._scale.value, dtype)
        if self._anchor is None:
            out = self._project(x, radius)
        else:
            a = self._anchor_value(dtype, traced_with=w)
            out = a + self._project(x - a, radius)
        return ops.cast(out, w.dtype)

    @property
    def radius(self):
        """The radius variable (scalar, or one entry per row)."""
        return self._scale

    def distance(self, w):
        """The distance of `w` to the anchor in this constraint's norm."""
        raise NotImplementedError


@keras.saving.register_keras_serializable(package="keras_spft")
class MARSDistance(_DistanceConstraint):
    """Bounds the L1 distance of every row of a kernel to its anchor.

    After each optimizer step every row (output unit) `w_r` of the kernel is
    moved back so that `||w_r - a_r||_1 <= radius`, where `a` is the anchor.
    The largest row distance is the MARS (maximum absolute row sum) distance
    of Gouk et al. (2021); bounding it is their MARS-PGM.

    Args:
        anchor: the pre-trained kernel (array or tensor, copied once), or
            `None` to centre the ball at the origin (a new head).
        radius: positive float, or an array of per-row radii broadcastable to
            the per-row shape (the kernel shape with the `axis` axes set to 1).
        axis: axes summed to get one row's L1 norm, as in
            `keras.constraints.MaxNorm`: Dense `0`, Conv2D `[0, 1, 2]`,
            DepthwiseConv2D `[0, 1]`; `[]` makes every element its own row.
        projection: `"scale"`, the paper's per-row rescale
            `t / max(1, ||t||_1 / radius)`, or `"exact"`, the Euclidean
            projection of each row onto its L1 ball (Michelot's
            active-set iteration, all rows at once, no sort). Both leave rows inside the ball unchanged.
        relative: if `True`, `radius` is a fraction of each anchor row's own
            L1 norm (`radius * ||a_r||_1`), so one number fits layers of any
            scale. Needs an anchor.
        name: optional label used in error messages and reports.

    Returns:
        Called on a kernel, the projected kernel (same shape and dtype).

    Example:

    >>> import numpy as np, keras, keras_spft
    >>> w0 = np.random.normal(size=(4, 3)).astype("float32")
    >>> layer = keras.layers.Dense(3)
    >>> layer.build((None, 4)); layer.kernel.assign(w0)
    >>> c = keras_spft.MARSDistance(w0, radius=0.5, axis=0)
    >>> layer.kernel.constraint = layer.kernel_constraint = c
    >>> w = c(w0 + 1.0)        # every column moved by 4.0 in L1 ...
    >>> float(np.abs(np.asarray(w) - w0).sum(axis=0).max())  # ... now 0.5
    0.5
    """

    def __init__(self, anchor, radius, axis=0, projection="scale",
                 relative=False, name=None):
        self._init_anchor(anchor, name)
        if projection not in PROJECTIONS:
            raise ValueError(
                f"{self._owner()}: unknown projection {projection!r}; "
                f"expected one of {PROJECTIONS}."
            )
        self.projection = projection
        self.relative = bool(relative)
        self._axis_arg = _axis_list(axis)
        if self._anchor is not None:
            self.axis = spft_ops.normalize_axis(axis, len(self._anchor.shape))
            row_shape = self._row_shape(self._anchor.shape)
        else:
            self.axis = None  # resolved on first call from the kernel rank
            row_shape = None
        if self.relative:
            if self._anchor is None:
                raise ValueError(
                    f"{self._owner()}: `relative=True` needs an anchor; a "
                    "ball centred at the origin takes an absolute radius."
                )
            check_positive(radius, "radius", self._owner())
            if not is_spec(radius):
                norms = ops.convert_to_numpy(
                    spft_ops.row_l1_norms(
                        ops.convert_to_tensor(self._anchor.value), self.axis
                    )
                )
                if (norms <= 0).any():
                    raise ValueError(
                        f"{self._owner()}: `relative=True` but "
                        f"{int((norms <= 0).sum())} anchor rows are zero, "
                        "which would freeze them; use an absolute radius."
                    )
                with np.errstate(over="ignore"):
                    radius = norms.astype("float64") * float(ops.convert_to_numpy(radius))
        self._init_scale(radius, "radius", row_shape)

    def _row_shape(self, shape):
        return tuple(1 if i in self.axis else d for i, d in enumerate(shape))

    def _axis_for(self, w):
        if self.axis is not None:
            return self.axis
        return spft_ops.normalize_axis(self._axis_arg, len(w.shape))

    def _project(self, t, radius):
        axis = self._axis_for(t)
        if self.projection == "exact":
            return spft_ops.project_l1_ball(t, radius, axis)
        return spft_ops.scale_to_l1_ball(t, radius, axis)

    def row_distances(self, w):
        """Per-row L1 distances of `w` to the anchor (reduced axes kept)."""
        w = ops.convert_to_tensor(w)
        t = w if self._anchor is None else w - self._anchor_value(w.dtype)
        return spft_ops.row_l1_norms(t, self._axis_for(w))

    def distance(self, w):
        """The MARS distance: the largest row L1 distance to the anchor."""
        return ops.max(self.row_distances(w))

    def get_config(self):
        return {
            "anchor": self.anchor_spec,
            "radius": self._scale_config,
            "axis": self._axis_arg,
            "projection": self.projection,
            "relative": False,  # a relative radius is stored resolved
            "name": self.name,
        }


@keras.saving.register_keras_serializable(package="keras_spft")
class FrobeniusDistance(_DistanceConstraint):
    """Bounds the Frobenius distance of a kernel to its anchor (L2-PGM).

    After each optimizer step the kernel is replaced by its Euclidean
    projection onto the ball `||W - A||_F <= radius`:
    `W <- A + (W - A) / max(1, ||W - A||_F / radius)` (Gouk et al., Eq. 3).

    Args:
        anchor: the pre-trained kernel, or `None` for the origin (a new head).
        radius: positive float.
        relative: if `True`, `radius` is a fraction of `||A||_F`.
        name: optional label used in error messages and reports.

    Returns:
        Called on a kernel, the projected kernel (same shape and dtype).

    Example:

    >>> import numpy as np, keras_spft
    >>> w0 = np.zeros((4, 3), "float32")
    >>> c = keras_spft.FrobeniusDistance(w0, radius=2.0)
    >>> w = np.asarray(c(np.ones((4, 3), "float32")))
    >>> round(float(np.sqrt((w ** 2).sum())), 5)
    2.0
    """

    def __init__(self, anchor, radius, relative=False, name=None):
        self._init_anchor(anchor, name)
        self.relative = bool(relative)
        if self.relative:
            if self._anchor is None:
                raise ValueError(
                    f"{self._owner()}: `relative=True` needs an anchor; a "
                    "ball centred at the origin takes an absolute radius."
                )
            check_positive(radius, "radius", self._owner())
            norm = float(ops.convert_to_numpy(spft_ops.frobenius_norm(
                ops.convert_to_tensor(self._anchor.value))))
            if norm <= 0:
                raise ValueError(
                    f"{self._owner()}: `relative=True` but the anchor is zero."
                )
            radius = float(radius) * norm
        self._init_scale(radius, "radius", ())
        if not isinstance(self._scale_config, float) and self._scale.shape != ():
            raise ValueError(f"{self._owner()}: `radius` must be a scalar.")

    def _project(self, t, radius):
        return spft_ops.scale_to_frobenius_ball(t, radius)

    def distance(self, w):
        """The Frobenius distance of `w` to the anchor."""
        w = ops.convert_to_tensor(w)
        t = w if self._anchor is None else w - self._anchor_value(w.dtype)
        return spft_ops.frobenius_norm(t)

    def get_config(self):
        return {
            "anchor": self.anchor_spec,
            "radius": self._scale_config,
            "relative": False,
            "name": self.name,
        }
