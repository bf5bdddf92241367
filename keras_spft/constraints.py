"""Keras constraints that keep a kernel within a distance of its anchor.

Keras applies `variable.constraint` after every optimizer update, on every
backend and inside compiled steps, so attaching one of these to a pre-trained
kernel turns any optimizer into the projected gradient method of Gouk et al.
(2021): `W <- proj(W)` after each step.
"""

import contextlib

import numpy as np
import keras
from keras import ops

from keras_spft import ops as spft_ops
from keras_spft.anchors import Anchored, check_flag, check_positive, is_spec

__all__ = ["MARSDistance", "FrobeniusDistance"]

PROJECTIONS = ("scale", "exact")
#: Smallest value a learned radius takes, and its starting value in
#: `wrap_pretrained(radius="learned")`. FTP starts at 1e-8; in float32 an
#: offset that small from a weight of order 1 rounds away, and the gradient
#: of the radius with it.
MIN_LEARNED_RADIUS = 1e-4

# Depth of `RadiusOptimizer.apply` calls in progress: a constraint with a
# learned radius projects only when the optimizer that learns it drives it.
_LEARNER_DEPTH = [0]


@contextlib.contextmanager
def radius_learning():
    """Marks the code inside as driven by a radius-learning optimizer."""
    _LEARNER_DEPTH[0] += 1
    try:
        yield
    finally:
        _LEARNER_DEPTH[0] -= 1


#: Machine epsilon of the kernel dtypes (twice the worst rounding of a stored value).
_UNIT_ROUNDOFF = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7, "float32": 2.0 ** -23, "float64": 2.0 ** -52}


def _axis_list(axis, owner):
    """`axis` as given (None, an int or ints) as a list for the config; a
    ValueError naming `owner` for anything else (a string or a float would
    otherwise be read as axes, or fail inside the first training step)."""
    if axis is None:
        return None
    def _is_int(a):
        return isinstance(a, (int, np.integer)) and not isinstance(a, (bool, np.bool_))
    if _is_int(axis):
        return [int(axis)]
    if isinstance(axis, np.ndarray) and axis.ndim == 1:
        axis = axis.tolist()
    if not isinstance(axis, (list, tuple)) or not all(_is_int(a) for a in axis):
        raise ValueError(
            f"{owner}: `axis` must be an int, a list or tuple of ints, or None "
            f"(the axes summed per row, as in keras.constraints.MaxNorm), got {axis!r}.")
    return [int(a) for a in axis]


def _normalized_axis(axis, ndim, owner):
    """`spft_ops.normalize_axis` whose error names `owner` and the option."""
    try:
        return spft_ops.normalize_axis(axis, ndim)
    except ValueError as e:
        raise ValueError(f"{owner}: `axis` {axis!r} does not fit the kernel: {e}") from None


def _compute_dtype(dtype):
    # Project 16-bit weights in float32; round once when storing. Backends
    # name dtypes their own way ("torch.float64", tf.float64): standardize.
    dtype = keras.backend.standardize_dtype(dtype)
    return dtype if dtype in ("float32", "float64") else "float32"


class _DistanceConstraint(Anchored, keras.constraints.Constraint):
    """Shared machinery: offset from the anchor, project, add the anchor back."""

    def _project(self, t, radius, distances=None):
        raise NotImplementedError

    def _row_shape(self, shape, axis=None):
        raise NotImplementedError

    def _distances(self, t):
        """The norms `_project` reduces `t` to (per row, or one scalar)."""
        raise NotImplementedError

    def _radius_gradient(self, grad, t, radius, rounding, x):
        raise NotImplementedError

    def _init_options(self, radius, relative, learn_radius):
        """Checks and stores `relative` and `learn_radius` (after the anchor)."""
        self.relative = check_flag(relative, "relative", self._owner())
        self.learn_radius = check_flag(learn_radius, "learn_radius", self._owner())
        if self.learn_radius and self.relative:
            raise ValueError(
                f"{self._owner()}: `learn_radius=True` learns one absolute "
                "radius per kernel; it cannot be combined with `relative=True`."
            )
        if self.relative:
            if self._anchor is None:
                raise ValueError(
                    f"{self._owner()}: `relative=True` needs an anchor; a "
                    "ball centred at the origin takes an absolute radius."
                )
            check_positive(radius, "radius", self._owner())

    @staticmethod
    def _fraction(radius):
        """A relative radius (checked by `_init_options`) as float64 numbers."""
        return np.asarray(ops.convert_to_numpy(radius) if hasattr(radius, "shape") else radius, "float64")

    @property
    def min_radius(self):
        """The floor of a learned radius: 1e-4 (`MIN_LEARNED_RADIUS`), or,
        for a 16-bit anchor, two epsilons of its dtype times its largest row
        norm (MARS: row L1; Frobenius: the whole norm) if that is more.
        Below it the stored 16-bit kernel cannot move off its anchor (the
        offset rounds away), so a radius there would never grow."""
        return self._min_radius

    def _set_min_radius(self):
        """Works out `min_radius` (eagerly: at construction and when an anchor
        is loaded, never inside a compiled step; only a learned radius has
        a floor, so a fixed one costs no pass over its anchor)."""
        self._min_radius = MIN_LEARNED_RADIUS
        if self._anchor is None or not self.learn_radius:
            return
        dtype = keras.backend.standardize_dtype(self._anchor.dtype)
        if dtype in ("float16", "bfloat16"):
            a = np.abs(np.asarray(ops.convert_to_numpy(self._anchor), dtype="float64"))
            norm = (float(np.sqrt((a ** 2).sum())) if isinstance(self, FrobeniusDistance)
                    else float(a.sum(axis=tuple(self.axis), keepdims=True).max()) if a.size else 0.0)
            self._min_radius = max(MIN_LEARNED_RADIUS, 2.0 * _UNIT_ROUNDOFF[dtype] * norm)

    def _on_anchor_loaded(self):
        self._set_min_radius()

    def _check_learned_scalar(self):
        if self.learn_radius and tuple(self._scale.shape) != ():
            raise ValueError(
                f"{self._owner()}: a learned radius is one number per kernel; "
                f"got per-row radii of shape {tuple(self._scale.shape)}."
            )

    def __call__(self, w):
        return self._apply(w, learn=self.learn_radius)

    def project(self, w):
        """`w` projected with the current radius, and nothing else: a learned
        radius is neither clipped nor needs a `RadiusOptimizer`.

        Args:
            w: a kernel (tensor or variable) of the anchor's shape.

        Returns:
            The projected kernel, in `w`'s dtype.
        """
        return self._apply(w, learn=False)

    def _apply(self, w, learn):
        w = ops.convert_to_tensor(w)
        self._check_shape(w)
        dtype = _compute_dtype(w.dtype)
        x = ops.cast(w, dtype)
        radius = self._scale_value(dtype, traced_with=w)
        a = None if self._anchor is None else self._anchor_value(dtype, traced_with=w)
        t = x if a is None else x - a
        distances = None
        if learn:
            if not _LEARNER_DEPTH[0]:
                raise ValueError(
                    f"{self._owner()} has a learned radius, but the optimizer "
                    "applying it does not learn radii: compile with "
                    "`optimizer=keras_spft.RadiusOptimizer(your_optimizer)`, "
                    "or wrap with a fixed radius."
                )
            # FTP's clip: a radius beyond the farthest row would let it drift
            # where it no longer acts; keep it at or below that row. The
            # projection reuses these norms (one reduction pass, not two,
            # where nothing merges them: eager PyTorch).
            distances = self._distances(t)
            radius = spft_ops.at_least(spft_ops.at_most(radius, ops.max(distances)), self._min_radius)
            self._scale.assign(ops.cast(radius, "float32"))
        out = self._project(t, radius, distances)
        if a is not None:
            out = a + out
        return ops.cast(out, w.dtype)

    def radius_gradient(self, grad, w):
        """Loss gradient with respect to the radius, at a projected kernel.

        Args:
            grad: the loss gradient with respect to the kernel `w`.
            w: the kernel, as left by the last projection.

        Returns:
            A float32 scalar: `<grad, dP(w)/dradius>` (see
            `keras_spft.ops.l1_radius_gradient`).
        """
        w = ops.convert_to_tensor(w)
        self._check_shape(w)
        if tuple(grad.shape) != tuple(w.shape):
            raise ValueError(f"{self._owner()}: the gradient has shape {tuple(grad.shape)} but the kernel "
                             f"has shape {tuple(w.shape)}.")
        x = ops.cast(w, "float32")
        t = x if self._anchor is None else x - self._anchor_value("float32", traced_with=w)
        # Storing W0 + offset rounds each element by up to half an ulp of its
        # value: a row projected onto a tiny radius can read as inside the
        # ball. One unit roundoff of the stored dtype per element allows it.
        # (t is computed in float32: at least float32's.)
        rounding = max(_UNIT_ROUNDOFF.get(keras.backend.standardize_dtype(w.dtype), 0.0), 2.0 ** -23)
        return self._radius_gradient(
            ops.cast(grad, "float32"), t, ops.cast(self._scale.value, "float32"), rounding, x
        )

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
        learn_radius: if `True`, `radius` is only the starting value of one
            radius per kernel that `keras_spft.RadiusOptimizer` learns during
            training (FTP, Tian et al. 2023); the constraint then refuses to
            be applied by any other optimizer, and keeps the radius at most
            the largest row distance before each projection.
        name: optional label used in error messages and reports.

    Returns:
        Called on a kernel, the projected kernel (same shape and dtype).

    Example:

    >>> import numpy as np, keras, keras_spft
    >>> w0 = np.random.normal(size=(4, 3)).astype("float32")
    >>> layer = keras.layers.Dense(3)
    >>> layer.build((None, 4)); _ = layer.kernel.assign(w0)
    >>> c = keras_spft.MARSDistance(w0, radius=0.5, axis=0)
    >>> layer.kernel.constraint = layer.kernel_constraint = c
    >>> w = c(w0 + 1.0)        # every column moved by 4.0 in L1 ...
    >>> round(float(np.abs(np.asarray(w) - w0).sum(axis=0).max()), 6)  # ... now 0.5
    0.5
    """

    def __init__(self, anchor, radius, axis=0, projection="scale",
                 relative=False, learn_radius=False, name=None):
        self._init_anchor(anchor, name)
        self._init_options(radius, relative, learn_radius)
        if projection not in PROJECTIONS:
            raise ValueError(
                f"{self._owner()}: unknown projection {projection!r}; "
                f"expected one of {PROJECTIONS}."
            )
        self.projection = projection
        self._bn_reference = None        # batchnorm="reference" only: see `batchnorm_reference`
        self._bn_reference_lost = False  # loaded from a file saved before it was recorded
        self._axis_arg = _axis_list(axis, self._owner())
        if self._anchor is not None:
            self.axis = _normalized_axis(self._axis_arg, len(self._anchor.shape), self._owner())
            row_shape = self._row_shape(self._anchor.shape)
        else:
            self.axis = None  # resolved on first call from the kernel rank
            row_shape = None
        if self.relative and not is_spec(radius):
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
            # A fraction of each row's norm: one for all rows, or one per row.
            fraction = self._fraction(radius)
            if fraction.ndim:
                try:
                    np.broadcast_to(fraction, row_shape)
                except ValueError:
                    raise ValueError(
                        f"{self._owner()}: `radius` of shape {fraction.shape} (fractions of the row norms, "
                        f"relative=True) does not broadcast to the per-row shape {tuple(row_shape)}.") from None
            with np.errstate(over="ignore"):
                radius = norms.astype("float64") * fraction
        self._init_scale(radius, "radius", row_shape)
        self._check_learned_scalar()
        self._set_min_radius()

    def _row_shape(self, shape, axis=None):
        axis = self.axis if axis is None else axis
        return tuple(1 if i in axis else int(d) for i, d in enumerate(shape))

    def _axis_for(self, w):
        if self.axis is not None:
            return self.axis
        axis = _normalized_axis(self._axis_arg, len(w.shape), self._owner())
        if len(self._scale.shape):
            # Per-row radii without an anchor (a head): checked against the
            # rows of the kernel at hand (a shape test in Python; they would
            # broadcast silently).
            rows = self._row_shape(w.shape, axis)
            try:
                fits = np.broadcast_shapes(tuple(self._scale.shape), rows) == rows
            except ValueError:
                fits = False
            if not fits:
                raise ValueError(
                    f"{self._owner()}: `radius` of shape {tuple(self._scale.shape)} does not broadcast "
                    f"to the per-row shape {rows} of a kernel of shape {tuple(w.shape)}.")
        return axis

    def _project(self, t, radius, distances=None):
        axis = self._axis_for(t)
        if self.projection == "exact":
            return spft_ops.project_l1_ball(t, radius, axis, distances)
        return spft_ops.scale_to_l1_ball(t, radius, axis, distances)

    def _distances(self, t):
        return spft_ops.row_l1_norms(t, self._axis_for(t))

    def _radius_gradient(self, grad, t, radius, rounding, x):
        axis = self._axis_for(t)
        return spft_ops.l1_radius_gradient(
            grad, t, radius, axis, self.projection, slack=rounding * spft_ops.row_l1_norms(x, axis)
        )

    def row_distances(self, w):
        """Per-row L1 distances of `w` to the anchor (reduced axes kept)."""
        w = ops.convert_to_tensor(w)
        self._check_shape(w)
        w = ops.cast(w, _compute_dtype(w.dtype))   # 16-bit kernels: their distance in float32
        t = w if self._anchor is None else w - self._anchor_value(w.dtype)
        return spft_ops.row_l1_norms(t, self._axis_for(w))

    def distance(self, w):
        """The MARS distance: the largest row L1 distance to the anchor."""
        return ops.max(self.row_distances(w))

    def get_config(self):
        config = {
            "anchor": self.anchor_spec,
            "radius": self._scale_config,
            "axis": self._axis_arg,
            "projection": self.projection,
            "relative": False,  # a relative radius is stored resolved
            "learn_radius": self.learn_radius,
            "name": self.name,
        }
        if self.batchnorm_reference is not None:
            config["batchnorm_reference"] = self.batchnorm_reference
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        reference = config.pop("batchnorm_reference", None)
        obj = cls(**config)
        obj.batchnorm_reference = reference   # the file's value replaces it when loaded
        return obj

    # -- batchnorm="reference" ---------------------------------------------
    @property
    def batchnorm_reference(self):
        """For `wrap_pretrained(batchnorm="reference")`: the radius per unit
        of the pre-trained `sqrt(moving_variance + epsilon)`, saved with the
        radii (a later call scales by the pre-trained variance, not by the
        fine-tuned one); `None` otherwise."""
        return None if self._bn_reference is None else float(ops.convert_to_numpy(self._bn_reference))

    @batchnorm_reference.setter
    def batchnorm_reference(self, value):
        if value is None:
            self._bn_reference = None
        elif self._bn_reference is not None:
            self._bn_reference.assign(np.float32(value))
        else:
            self._bn_reference = keras.Variable(np.float32(value), dtype="float32", trainable=False,
                                                autocast=False, name="batchnorm_reference")

    def _own_variables(self):
        out = super()._own_variables()
        if self._bn_reference is not None:
            out["batchnorm_reference"] = self._bn_reference
        return out

    def _saved_without(self, keys):
        # Saved by keras-spft before 2026-11-28: the scale is unknown.
        if "batchnorm_reference" in keys:
            self._bn_reference = None
            self._bn_reference_lost = True

    def _saved_with(self, values):
        if "batchnorm_reference" in values:
            self.batchnorm_reference = float(values["batchnorm_reference"])
            self._bn_reference_lost = False


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
        learn_radius: if `True`, `radius` is the starting value of a radius
            that `keras_spft.RadiusOptimizer` learns (see `MARSDistance`).
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

    def __init__(self, anchor, radius, relative=False, learn_radius=False, name=None):
        self._init_anchor(anchor, name)
        self._init_options(radius, relative, learn_radius)
        if self.relative:
            norm = float(ops.convert_to_numpy(spft_ops.frobenius_norm(
                ops.convert_to_tensor(self._anchor.value))))
            if norm <= 0:
                raise ValueError(
                    f"{self._owner()}: `relative=True` but the anchor is zero."
                )
            fraction = self._fraction(radius)
            if fraction.ndim:
                raise ValueError(f"{self._owner()}: `radius` must be a scalar (one Frobenius ball per "
                                 f"kernel), got shape {fraction.shape}.")
            radius = float(fraction) * norm
        self._init_scale(radius, "radius", ())
        if not isinstance(self._scale_config, float) and self._scale.shape != ():
            raise ValueError(f"{self._owner()}: `radius` must be a scalar.")
        self._set_min_radius()

    def _project(self, t, radius, distances=None):
        return spft_ops.scale_to_frobenius_ball(t, radius, distances)

    def _distances(self, t):
        return spft_ops.frobenius_norm(t)

    def _radius_gradient(self, grad, t, radius, rounding, x):
        return spft_ops.frobenius_radius_gradient(grad, t, radius, slack=rounding * spft_ops.frobenius_norm(x))

    def distance(self, w):
        """The Frobenius distance of `w` to the anchor."""
        w = ops.convert_to_tensor(w)
        self._check_shape(w)
        w = ops.cast(w, _compute_dtype(w.dtype))   # 16-bit kernels: their distance in float32
        t = w if self._anchor is None else w - self._anchor_value(w.dtype)
        return spft_ops.frobenius_norm(t)

    def get_config(self):
        return {
            "anchor": self.anchor_spec,
            "radius": self._scale_config,
            "relative": False,
            "learn_radius": self.learn_radius,
            "name": self.name,
        }
