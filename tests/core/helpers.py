"""Independent checks used by the core tests (numpy, float64)."""

import numpy as np
from keras import ops

import keras_spft


def to_np(x):
    return np.asarray(ops.convert_to_numpy(x))


def half_ulps(w):
    """Half a float32 ulp of every stored element."""
    w = np.asarray(w)
    return np.spacing(np.abs(w).astype(w.dtype if w.dtype.itemsize >= 4 else np.float32)).astype(np.float64) / 2


def row_sums(x, axis):
    x = np.asarray(x, dtype=np.float64)
    return np.abs(x) if len(axis) == 0 else np.abs(x).sum(axis=tuple(axis), keepdims=True)


def assert_within_bound(constraint, w, slack=1e-5):
    """Asserts the paper's guarantee for a stored weight `w`.

    Per-row L1 (MARS) or Frobenius distance to the anchor <= radius, up to
    `slack` of the radius plus half an ulp per stored element.
    Returns the distances (per row, or scalar) for further checks.
    """
    w = to_np(w)
    a = 0.0 if constraint.anchor is None else to_np(constraint.anchor).astype(np.float64)
    t = w.astype(np.float64) - a
    r = to_np(constraint.radius).astype(np.float64)
    hu = half_ulps(w)
    if isinstance(constraint, keras_spft.MARSDistance):
        axis = constraint.axis if constraint.axis is not None else tuple(range(w.ndim - 1))
        d = row_sums(t, axis)
        allowed = r * (1 + slack) + row_sums(hu, axis)
    else:
        d = np.sqrt((t ** 2).sum())
        allowed = r * (1 + slack) + np.sqrt((hu ** 2).sum())
    excess = d - allowed
    assert np.all(excess <= 0), (
        f"{constraint.name}: distance exceeds radius by up to {excess.max():.3g}"
    )
    return d


def l1_projection_reference(v, radius):
    """Euclidean projection of a vector onto the L1 ball, by bisection on the
    soft threshold (independent of the sort-based method under test)."""
    v = np.asarray(v, dtype=np.float64)
    if np.abs(v).sum() <= radius:
        return v.copy()
    lo, hi = 0.0, np.abs(v).max()
    for _ in range(200):
        mid = (lo + hi) / 2
        if np.maximum(np.abs(v) - mid, 0).sum() > radius:
            lo = mid
        else:
            hi = mid
    return np.sign(v) * np.maximum(np.abs(v) - hi, 0)
