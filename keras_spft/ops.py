"""Pure tensor math of distance-based fine-tuning, on `keras.ops` only.

Every function here takes and returns backend tensors, runs unchanged on the
TensorFlow, JAX and PyTorch backends and inside `jit`-compiled steps.

A *row* is one output unit of a kernel: the slice obtained by fixing every axis
that is not in `axis`. `axis` follows `keras.constraints.MaxNorm`: it names the
axes that are summed to get one row's norm (Dense: `0`; Conv2D: `(0, 1, 2)`;
DepthwiseConv2D: `(0, 1)`). An empty `axis` makes every element its own row.

All reductions keep their dimensions, so a per-row quantity (norm, radius)
broadcasts against the kernel.
"""

import numpy as np
import keras
from keras import ops

__all__ = [
    "normalize_axis",
    "row_l1_norms",
    "mars_norm",
    "frobenius_norm",
    "at_least",
    "at_most",
    "scale_to_l1_ball",
    "scale_to_frobenius_ball",
    "project_l1_ball",
    "l1_radius_gradient",
    "frobenius_radius_gradient",
]


def normalize_axis(axis, ndim):
    """Returns `axis` as a sorted tuple of non-negative ints for rank `ndim`.

    Args:
        axis: `None` (all axes), an int, or a sequence of ints (negative ints
            count from the end).
        ndim: rank of the tensor the axes refer to.

    Returns:
        A sorted tuple of distinct axes in `[0, ndim)`.

    Raises:
        ValueError: an axis is out of range or repeated.

    Example:

    >>> from keras_spft import ops as sops
    >>> sops.normalize_axis(-1, 4), sops.normalize_axis((2, 0), 4)
    ((3,), (0, 2))
    """
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (bool, np.bool_)):
        raise ValueError(f"axis entries must be ints, got {axis!r}.")
    if isinstance(axis, (int, np.integer)):
        axis = (int(axis),)
    out = []
    for a in axis:
        if not isinstance(a, (int, np.integer)) or isinstance(a, (bool, np.bool_)):
            raise ValueError(f"axis entries must be ints, got {axis!r}.")
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for a rank-{ndim} tensor.")
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axis {axis!r} repeats an axis.")
    return tuple(sorted(out))


def row_l1_norms(x, axis):
    """L1 norm of every row of `x`, with the reduced axes kept (size 1).

    Args:
        x: tensor.
        axis: axes summed per row (see module docstring); `()` gives `|x|`.

    Returns:
        Tensor broadcastable against `x` (float32 for 16-bit `x`: a 16-bit
        sum of thousands of elements loses whole units).

    Example:

    >>> import numpy as np
    >>> from keras import ops
    >>> from keras_spft import ops as sops
    >>> x = ops.convert_to_tensor(np.array([[1.0, -2.0], [3.0, 4.0]]))
    >>> ops.convert_to_numpy(sops.row_l1_norms(x, (0,))).tolist()   # rows = columns of a Dense kernel
    [[4.0, 6.0]]
    """
    x = _widened(x)
    if len(axis) == 0:
        return ops.abs(x)
    return ops.sum(ops.abs(x), axis=axis, keepdims=True)


def mars_norm(x, axis):
    """Maximum absolute row sum: the largest row L1 norm of `x`.

    Args:
        x: tensor.
        axis: axes summed per row.

    Returns:
        Scalar tensor.

    Example:

    >>> import numpy as np
    >>> from keras import ops
    >>> from keras_spft import ops as sops
    >>> x = ops.convert_to_tensor(np.array([[1.0, -2.0], [3.0, 4.0]]))
    >>> float(sops.mars_norm(x, (0,)))
    6.0
    """
    return ops.max(row_l1_norms(x, axis))


def frobenius_norm(x):
    """Frobenius (element-wise L2) norm of `x`.

    Args:
        x: tensor.

    Returns:
        Scalar tensor (float32 for 16-bit `x`, whose squares underflow or
        overflow in 16 bits).

    Example:

    >>> import numpy as np
    >>> from keras import ops
    >>> from keras_spft import ops as sops
    >>> float(sops.frobenius_norm(ops.convert_to_tensor(np.array([[3.0, 0.0], [0.0, 4.0]]))))
    5.0
    """
    sq = ops.square(_widened(x))
    if len(x.shape) > 1:
        # Two stages (over all axes but the last, then the rest): one pass at
        # the memory floor on XLA GPU, where a single full reduction of every
        # kernel took 1.32 floors (docs/benchmarks.md).
        sq = ops.sum(sq, axis=tuple(range(len(x.shape) - 1)))
    return ops.sqrt(ops.sum(sq))


def at_least(x, low):
    """`max(x, low)` in `x`'s dtype, NaN propagated.

    Not `ops.maximum`/`ops.minimum`: on the PyTorch backend (Keras 3.15)
    they compute float64 tensors in float32 (their result dtype is looked up
    from `torch.float64`, which Keras' `result_type` does not recognise).

    Args:
        x: tensor.
        low: a number or tensor (broadcast against `x`), taken in `x`'s dtype.

    Returns:
        Tensor like `x`.

    Example:

    >>> import numpy as np
    >>> from keras import ops
    >>> from keras_spft import ops as sops
    >>> x = ops.convert_to_tensor(np.array([0.5, 2.0, np.nan]))
    >>> ops.convert_to_numpy(sops.at_least(x, 1.0)).tolist()
    [1.0, 2.0, nan]
    """
    low = _like(low, x)
    return ops.where(x < low, low, x)


def at_most(x, high):
    """`min(x, high)` in `x`'s dtype, NaN propagated (see `at_least`).

    Args:
        x: tensor.
        high: a number or tensor (broadcast against `x`), taken in `x`'s dtype.

    Returns:
        Tensor like `x`.

    Example:

    >>> import numpy as np
    >>> from keras import ops
    >>> from keras_spft import ops as sops
    >>> ops.convert_to_numpy(sops.at_most(ops.convert_to_tensor(np.array([0.5, 2.0])), 1.0)).tolist()
    [0.5, 1.0]
    """
    high = _like(high, x)
    return ops.where(x > high, high, x)


def _like(value, x):
    """`value` in `x`'s dtype; a Python number made in it directly (a float64
    bound passed through float32 first, as `where` may do, loses digits)."""
    if isinstance(value, (int, float)):
        return ops.convert_to_tensor(value, dtype=x.dtype)
    return ops.cast(value, x.dtype)


def _widened(t):
    """`t` in float32 if it is 16-bit (sums and tiny radii stay finite)."""
    return ops.cast(t, "float32") if keras.backend.standardize_dtype(t.dtype) in ("float16", "bfloat16") else t


def _matched(t, *values):
    """`t` widened (`_widened`) and each tensor or array among `values` cast to
    its dtype: TensorFlow does not promote float32 * bfloat16 or float32 *
    float64, so a radius or norms given in another dtype than the offsets
    would fail there only. Python numbers and `None` as they are."""
    t = _widened(t)
    return (t,) + tuple(ops.cast(v, t.dtype) if hasattr(v, "dtype") and hasattr(v, "shape") else v
                        for v in values)


def _shrink_factor(norm, radius):
    # min(1, radius / norm) written as 1 / max(1, norm / radius): exactly 1 for
    # rows inside the ball, no division by zero for zero rows, and no NaN for
    # tiny or huge radii (norm / radius may overflow to inf, 1 / inf == 0).
    return 1.0 / at_least(norm / radius, 1.0)


def scale_to_l1_ball(t, radius, axis, norms=None):
    """The paper's MARS-PGM projection: per-row radial rescale into the L1 ball.

    `t_r <- t_r / max(1, ||t_r||_1 / radius)` for every row `r`. This is a
    feasible point, not the Euclidean projection (see `project_l1_ball`).

    Args:
        t: tensor of offsets (kernel minus anchor).
        radius: positive scalar, or a tensor of per-row radii broadcastable
            against `row_l1_norms(t, axis)`.
        axis: axes summed per row.
        norms: `row_l1_norms(t, axis)` when the caller has it already (a
            learned radius is clipped with them first), else `None`.

    Returns:
        Tensor like `t` whose every row has L1 norm `<= radius`.

    Example:

    >>> import numpy as np
    >>> from keras import ops
    >>> from keras_spft import ops as sops
    >>> t = ops.convert_to_tensor(np.array([[3.0, 0.1], [1.0, 0.1]]))
    >>> ops.convert_to_numpy(sops.scale_to_l1_ball(t, 2.0, (0,))).astype(float).round(3).tolist()   # column 0 scaled by 1/2
    [[1.5, 0.1], [0.5, 0.1]]
    """
    dtype = t.dtype
    t, radius, norms = _matched(t, radius, norms)   # 16-bit: computed in float32, rounded once
    if norms is None:
        norms = row_l1_norms(t, axis)
    return ops.cast(t * _shrink_factor(norms, radius), dtype)


def scale_to_frobenius_ball(t, radius, norm=None):
    """Euclidean projection of `t` onto the Frobenius ball of `radius`.

    `t <- t / max(1, ||t||_F / radius)`: the closed form of Gouk et al. (Eq. 3).
    Written as a division by the two-stage norm of `frobenius_norm`: on an
    H100 (JAX) this form ran one pass over all ResNet101 kernels at the
    memory floor (1.00-1.02 floors), the one-reduction, reciprocal form at
    1.32-1.37 floors (docs/benchmarks.md).

    Args:
        t: tensor of offsets (kernel minus anchor).
        radius: positive scalar.
        norm: `frobenius_norm(t)` when the caller has it already, else `None`.

    Returns:
        Tensor like `t` with Frobenius norm `<= radius`.

    Example:

    >>> import numpy as np
    >>> from keras import ops
    >>> from keras_spft import ops as sops
    >>> t = ops.convert_to_tensor(np.array([3.0, 4.0]))
    >>> ops.convert_to_numpy(sops.scale_to_frobenius_ball(t, 1.0)).astype(float).round(3).tolist()
    [0.6, 0.8]
    """
    dtype = t.dtype
    t, radius, norm = _matched(t, radius, norm)   # 16-bit: computed in float32, rounded once
    if norm is None:
        norm = frobenius_norm(t)
    return ops.cast(t / at_least(norm / radius, 1.0), dtype)


def _l1_threshold(a, radius, axis, s=None):
    """Soft threshold of the Euclidean projection onto the L1 ball, per row.

    `a = |t|`. Michelot's (1986) active-set fixed point: start from the whole
    row, `theta = (sum_S a - radius) / |S|`, drop the entries `a <= theta`,
    repeat until the set stops shrinking. `theta` only grows, the set only
    shrinks, so it ends after at most `row_size` rounds with the exact
    threshold (in practice a handful). Every round is one element-wise pass
    with per-row sums: no sort, no transpose, all rows at once.
    """
    row_size = 1
    for ax in axis:
        row_size *= a.shape[ax]
    if s is None:
        s = ops.sum(a, axis=axis, keepdims=True)
    one = ops.ones_like(s)
    count = one * row_size
    theta = (s - radius) / count

    def cond(theta, count, prev, i):
        return ops.logical_and(i < row_size, ops.any(ops.not_equal(count, prev)))

    def body(theta, count, prev, i):
        mask = ops.cast(ops.greater(a, theta), a.dtype)
        new_count = at_least(ops.sum(mask, axis=axis, keepdims=True), 1.0)
        new_s = ops.sum(a * mask, axis=axis, keepdims=True)
        # theta never decreases in exact arithmetic; taking the maximum keeps
        # rounding from growing the set back (which could oscillate), so the
        # set size strictly decreases until the loop stops.
        new_theta = at_least((new_s - radius) / new_count, theta)
        return new_theta, new_count, count, i + 1

    theta, _, _, _ = ops.while_loop(
        cond, body, (theta, count, -one, ops.convert_to_tensor(0, "int32"))
    )
    return ops.relu(theta)


def project_l1_ball(t, radius, axis, norms=None):
    """Exact Euclidean projection of every row of `t` onto its L1 ball.

    Solves `argmin_x ||x - t_r||_2 s.t. ||x||_1 <= radius` for all rows at
    once: `x = sign(t) * max(|t| - theta_r, 0)` with the soft threshold
    `theta_r >= 0` found by Michelot's active-set iteration (see
    `_l1_threshold`), which needs no sort. Rows already inside the ball get
    `theta = 0` and are returned unchanged.

    Args:
        t: tensor of offsets (kernel minus anchor).
        radius: positive scalar, or per-row radii broadcastable against
            `row_l1_norms(t, axis)`.
        axis: axes summed per row (`()`: element-wise, i.e. clipping).
        norms: `row_l1_norms(t, axis)` when the caller has it already, else
            `None`.

    Returns:
        Tensor like `t`, each row projected.

    Example:

    >>> import numpy as np
    >>> from keras import ops
    >>> from keras_spft import ops as sops
    >>> t = ops.convert_to_tensor(np.array([[3.0], [1.0]]))
    >>> ops.convert_to_numpy(sops.project_l1_ball(t, 2.0, (0,))).tolist()   # soft threshold 1
    [[2.0], [0.0]]
    """
    dtype = t.dtype
    t, radius, norms = _matched(t, radius, norms)
    if len(axis) == 0:
        return ops.cast(ops.sign(t) * at_most(ops.abs(t), radius), dtype)
    a = ops.abs(t)
    theta = _l1_threshold(a, radius, axis, norms)
    out = ops.sign(t) * ops.relu(a - theta)
    # Rounding in the sums can leave a row a few ulps outside the ball; a
    # final radial rescale (a factor of exactly 1 for rows inside) keeps the
    # guarantee ||row||_1 <= radius.
    return ops.cast(out * _shrink_factor(row_l1_norms(out, axis), radius), dtype)


def _at_bound(norm, radius, rtol, slack):
    return ops.cast(ops.greater_equal(norm + slack, radius * (1.0 - rtol)), norm.dtype)


def l1_radius_gradient(grad, t, radius, axis, projection="scale", rtol=1e-3, slack=0.0):
    """Derivative of the loss with respect to the radius of an L1-ball projection.

    `t` is a projected offset `P_radius(d)` (kernel minus anchor just after a
    projection) and `grad` the loss gradient at the projected kernel. The
    projection's derivative `dP/dradius` is read off `t` itself, so no
    pre-projection copy is kept: for rows on the bound (`||t_r||_1 >=
    (1 - rtol) * radius`) it is `t_r / radius` for the radial rescale
    (`"scale"`) and `sign(t_r) / nnz(t_r)` for the Euclidean projection
    (`"exact"`: the soft threshold falls by `1 / nnz` per unit of radius);
    rows inside the ball do not depend on the radius. This is the chain rule
    of FTP (Tian et al., 2023) for a per-row L1 ball.

    Args:
        grad: loss gradient with respect to the kernel, shaped like `t`.
        t: projected offset (kernel minus anchor).
        radius: the scalar radius of the last projection.
        axis: axes summed per row.
        projection: `"scale"` or `"exact"`.
        rtol: relative tolerance deciding which rows lie on the bound.
        slack: absolute per-row allowance added to each row's norm in that
            test (scalar or shaped like the row norms): the rounding of the
            stored kernel, which can put a projected row below
            `(1 - rtol) * radius` when the radius is tiny next to the weights.

    Returns:
        Scalar `sum_r <grad_r, dt_r/dradius>`.

    Example:

    >>> import numpy as np
    >>> from keras import ops
    >>> from keras_spft import ops as sops
    >>> t = ops.convert_to_tensor(np.array([[1.5], [0.5]]))     # a row on the ball of radius 2
    >>> g = ops.convert_to_tensor(np.array([[1.0], [1.0]]))
    >>> float(sops.l1_radius_gradient(g, t, 2.0, (0,)))            # <g, t / r>
    1.0
    """
    # Per-row reductions only (siblings of the row norms, one pass when
    # fused); the row mask is applied to the small per-row results.
    t, grad, radius = _matched(t, grad, radius)
    norms = row_l1_norms(t, axis)
    if projection == "exact":
        if len(axis):
            dots = ops.sum(ops.sign(t) * grad, axis=axis, keepdims=True)
            nnz = ops.sum(ops.cast(ops.not_equal(t, 0.0), t.dtype), axis=axis, keepdims=True)
            per_row = dots / at_least(nnz, 1.0)
        else:
            per_row = ops.sign(t) * grad
    else:
        dots = ops.sum(t * grad, axis=axis, keepdims=True) if len(axis) else t * grad
        per_row = dots / radius
    return ops.sum(per_row * _at_bound(norms, radius, rtol, slack))


def frobenius_radius_gradient(grad, t, radius, rtol=1e-3, slack=0.0):
    """Derivative of the loss with respect to the radius of a Frobenius-ball projection.

    `<grad, t / radius>` when `||t||_F + slack >= (1 - rtol) * radius`, else 0
    (see `l1_radius_gradient`).

    Args:
        grad: loss gradient with respect to the kernel, shaped like `t`.
        t: projected offset (kernel minus anchor).
        radius: the scalar radius of the last projection.
        rtol: relative tolerance deciding whether `t` lies on the ball.
        slack: absolute allowance added to `||t||_F` in that test.

    Returns:
        Scalar tensor.

    Example:

    >>> import numpy as np
    >>> from keras import ops
    >>> from keras_spft import ops as sops
    >>> t = ops.convert_to_tensor(np.array([0.6, 0.8]))             # on the ball of radius 1
    >>> round(float(sops.frobenius_radius_gradient(ops.convert_to_tensor(np.array([1.0, 1.0])), t, 1.0)), 6)
    1.4
    """
    t, grad, radius = _matched(t, grad, radius)
    on = _at_bound(frobenius_norm(t), radius, rtol, slack)
    return on * ops.sum(grad * t) / radius
