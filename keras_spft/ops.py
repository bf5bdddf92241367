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

from keras import ops


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
    """
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, int):
        axis = (axis,)
    out = []
    for a in axis:
        if not isinstance(a, int) or isinstance(a, bool):
            raise ValueError(f"axis entries must be ints, got {axis!r}.")
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for a rank-{ndim} tensor.")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axis {axis!r} repeats an axis.")
    return tuple(sorted(out))


def row_l1_norms(x, axis):
    """L1 norm of every row of `x`, with the reduced axes kept (size 1).

    Args:
        x: tensor.
        axis: axes summed per row (see module docstring); `()` gives `|x|`.

    Returns:
        Tensor broadcastable against `x`.
    """
    if len(axis) == 0:
        return ops.abs(x)
    return ops.sum(ops.abs(x), axis=axis, keepdims=True)


def mars_norm(x, axis):
    """Maximum absolute row sum: the largest row L1 norm of `x` (a scalar)."""
    return ops.max(row_l1_norms(x, axis))


def frobenius_norm(x):
    """Frobenius (element-wise L2) norm of `x` (a scalar)."""
    return ops.sqrt(ops.sum(ops.square(x)))


def _shrink_factor(norm, radius):
    # min(1, radius / norm) written as 1 / max(1, norm / radius): exactly 1 for
    # rows inside the ball, no division by zero for zero rows, and no NaN for
    # tiny or huge radii (norm / radius may overflow to inf, 1 / inf == 0).
    return 1.0 / ops.maximum(1.0, norm / radius)


def scale_to_l1_ball(t, radius, axis):
    """The paper's MARS-PGM projection: per-row radial rescale into the L1 ball.

    `t_r <- t_r / max(1, ||t_r||_1 / radius)` for every row `r`. This is a
    feasible point, not the Euclidean projection (see `project_l1_ball`).

    Args:
        t: tensor of offsets (kernel minus anchor).
        radius: positive scalar, or a tensor of per-row radii broadcastable
            against `row_l1_norms(t, axis)`.
        axis: axes summed per row.

    Returns:
        Tensor like `t` whose every row has L1 norm `<= radius`.
    """
    return t * _shrink_factor(row_l1_norms(t, axis), radius)


def scale_to_frobenius_ball(t, radius):
    """Euclidean projection of `t` onto the Frobenius ball of `radius`.

    `t <- t / max(1, ||t||_F / radius)`: the closed form of Gouk et al. (Eq. 3).
    """
    return t * _shrink_factor(frobenius_norm(t), radius)


def _rows_last(t, axis):
    """Moves the `axis` axes of `t` to the end and flattens them.

    Returns `(rows, restore)`: `rows` has shape `(n_rows, row_size)` and
    `restore(rows)` undoes the transform.
    """
    shape = tuple(t.shape)
    ndim = len(shape)
    keep = [a for a in range(ndim) if a not in axis]
    perm = keep + list(axis)
    row_size = 1
    for a in axis:
        row_size *= shape[a]
    moved = ops.transpose(t, perm) if perm != list(range(ndim)) else t
    moved_shape = tuple(shape[a] for a in perm)
    rows = ops.reshape(moved, (-1, row_size))
    inverse = [perm.index(a) for a in range(ndim)]

    def restore(r):
        r = ops.reshape(r, moved_shape)
        return ops.transpose(r, inverse) if perm != list(range(ndim)) else r

    return rows, restore


def project_l1_ball(t, radius, axis):
    """Exact Euclidean projection of every row of `t` onto its L1 ball.

    Solves `argmin_x ||x - t_r||_2 s.t. ||x||_1 <= radius` for all rows at once
    with the sort-based method (Duchi et al., 2008): sort `|t_r|` in decreasing
    order, take the soft threshold
    `theta_r = max(0, max_k (sum_{i<=k} u_i - radius) / k)`, and return
    `sign(t) * max(|t| - theta_r, 0)`. Rows already inside the ball get
    `theta = 0` and are returned unchanged. One sort and one cumulative sum
    over a `(rows, row_size)` view: no Python loop over rows.

    Args:
        t: tensor of offsets (kernel minus anchor).
        radius: positive scalar, or per-row radii broadcastable against
            `row_l1_norms(t, axis)`.
        axis: axes summed per row (`()`: element-wise, i.e. clipping).

    Returns:
        Tensor like `t`, each row projected.
    """
    if len(axis) == 0:
        return ops.sign(t) * ops.minimum(ops.abs(t), radius)
    rows, restore = _rows_last(t, axis)
    row_radius = radius
    if not _is_scalar(radius):
        # per-row radii with kept dims -> (n_rows, 1) in the same row order
        r_full = ops.broadcast_to(radius, row_l1_norms(t, axis).shape)
        row_radius, _ = _rows_last(r_full, axis)
    a = ops.abs(rows)
    u = -ops.sort(-a, axis=-1)  # decreasing
    css = ops.cumsum(u, axis=-1)
    k = ops.arange(1, rows.shape[-1] + 1, dtype=rows.dtype)
    theta = ops.max((css - row_radius) / k, axis=-1, keepdims=True)
    theta = ops.maximum(theta, 0.0)
    out = ops.sign(rows) * ops.maximum(a - theta, 0.0)
    # Rounding in the cumulative sum can leave a row a few ulps outside the
    # ball; a final radial rescale (a no-op factor of 1 for exact rows) keeps
    # the guarantee ||row||_1 <= radius.
    out = out * _shrink_factor(ops.sum(ops.abs(out), axis=-1, keepdims=True), row_radius)
    return restore(out)


def _is_scalar(x):
    return isinstance(x, (int, float)) or len(getattr(x, "shape", ())) == 0
