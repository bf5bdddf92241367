"""The projections and norms against independent numpy computations."""

import numpy as np
import keras
import pytest
from keras import ops

from keras_spft import ops as sops
from tests.core.helpers import l1_projection_reference, row_sums, to_np

AXES = [((6, 5), (0,)), ((3, 3, 4, 5), (0, 1, 2)), ((3, 3, 4, 2), (0, 1)),
        ((3, 3, 5, 4), (0, 1, 3)), ((7,), ())]


def _offsets(shape, seed=0):
    """Rows inside, on and outside a unit ball, plus zero rows."""
    rng = np.random.default_rng(seed)
    t = rng.normal(size=shape).astype("float32")
    flat = t.reshape(-1)
    flat[: max(1, flat.size // 7)] = 0.0
    return t


@pytest.mark.parametrize("shape,axis", AXES)
@pytest.mark.parametrize("radius", [1e-6, 0.3, 2.0, 1e6])
def test_scale_matches_paper_formula(shape, axis, radius):
    t = _offsets(shape)
    got = to_np(sops.scale_to_l1_ball(ops.convert_to_tensor(t), radius, axis))
    n = row_sums(t, axis)
    want = t / np.maximum(1.0, n / radius)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-12)
    assert np.isfinite(got).all()
    assert np.all(row_sums(got, axis) <= radius * (1 + 1e-5))


@pytest.mark.parametrize("shape,axis", AXES)
@pytest.mark.parametrize("radius", [1e-6, 0.3, 2.0, 1e6])
def test_exact_matches_euclidean_projection(shape, axis, radius):
    t = _offsets(shape, seed=1)
    got = to_np(sops.project_l1_ball(ops.convert_to_tensor(t), radius, axis))
    keep = [a for a in range(len(shape)) if a not in axis]
    rows = np.transpose(t, keep + list(axis)).reshape(-1, int(np.prod([shape[a] for a in axis])) if axis else 1)
    got_rows = np.transpose(got, keep + list(axis)).reshape(rows.shape)
    for row, g in zip(rows, got_rows):
        want = l1_projection_reference(row, radius)
        # float32 inputs: the threshold is known to a few ulps of the row's
        # largest entry, which bounds the absolute error of every output.
        atol = 8 * np.finfo(np.float32).eps * np.abs(row).max() + 1e-6 * radius
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=atol)
        assert np.abs(g).sum() <= radius * (1 + 1e-5)
    assert np.isfinite(got).all()


def test_exact_is_closer_than_scale_and_both_idempotent():
    t = _offsets((4, 4, 8, 6), seed=3) * 3
    axis = (0, 1, 2)
    x = ops.convert_to_tensor(t)
    exact = to_np(sops.project_l1_ball(x, 1.0, axis))
    scale = to_np(sops.scale_to_l1_ball(x, 1.0, axis))
    d_exact = ((exact - t) ** 2).sum(axis=axis)
    d_scale = ((scale - t) ** 2).sum(axis=axis)
    assert np.all(d_exact <= d_scale + 1e-5)
    assert np.any(d_exact < d_scale - 1e-3)
    for f, once in ((sops.project_l1_ball, exact), (sops.scale_to_l1_ball, scale)):
        twice = to_np(f(ops.convert_to_tensor(once), 1.0, axis))
        np.testing.assert_allclose(twice, once, rtol=1e-5, atol=1e-7)


def test_per_row_radii():
    t = _offsets((5, 4), seed=4) * 4
    radii = np.array([[0.5, 1.0, 2.0, 4.0]], "float32")
    for f in (sops.scale_to_l1_ball, sops.project_l1_ball):
        got = to_np(f(ops.convert_to_tensor(t), ops.convert_to_tensor(radii), (0,)))
        assert np.all(np.abs(got).sum(axis=0) <= radii[0] * (1 + 1e-5))
    got = to_np(sops.project_l1_ball(ops.convert_to_tensor(t), ops.convert_to_tensor(radii), (0,)))
    for j in range(4):
        np.testing.assert_allclose(got[:, j], l1_projection_reference(t[:, j], radii[0, j]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("radius", [1e-6, 0.5, 1e6])
def test_frobenius_projection_closed_form(radius):
    t = _offsets((3, 3, 4, 5), seed=5)
    got = to_np(sops.scale_to_frobenius_ball(ops.convert_to_tensor(t), radius))
    n = np.sqrt((t.astype(np.float64) ** 2).sum())
    np.testing.assert_allclose(got, t / max(1.0, n / radius), rtol=2e-6, atol=1e-12)
    zero = to_np(sops.scale_to_frobenius_ball(ops.zeros((3, 4)), radius))
    assert np.all(zero == 0)


@pytest.mark.parametrize("shape,axis", AXES[:4])
def test_projections_given_their_norms_match_their_own(shape, axis):
    # A learned radius computes the norms first (to clip the radius) and
    # passes them on: the projection must be the very one it computes alone.
    t = ops.convert_to_tensor(_offsets(shape, seed=7))
    n = sops.row_l1_norms(t, axis)
    for f in (sops.scale_to_l1_ball, sops.project_l1_ball):
        np.testing.assert_array_equal(to_np(f(t, 0.3, axis, n)), to_np(f(t, 0.3, axis)))
    np.testing.assert_array_equal(
        to_np(sops.scale_to_frobenius_ball(t, 0.3, sops.frobenius_norm(t))),
        to_np(sops.scale_to_frobenius_ball(t, 0.3)))
    # ... and uses them: norms of a twice larger offset shrink every row twice as much.
    np.testing.assert_allclose(
        to_np(sops.scale_to_l1_ball(t, 0.3, axis, 2.0 * n)),
        to_np(sops.scale_to_l1_ball(t, 0.15, axis)), rtol=1e-6)


def test_norms():
    t = _offsets((3, 3, 4, 5), seed=6)
    assert float(sops.mars_norm(ops.convert_to_tensor(t), (0, 1, 2))) == pytest.approx(
        np.abs(t).sum(axis=(0, 1, 2)).max(), rel=1e-6)
    assert float(sops.frobenius_norm(ops.convert_to_tensor(t))) == pytest.approx(
        np.sqrt((t.astype(np.float64) ** 2).sum()), rel=1e-6)


def test_normalize_axis_errors():
    assert sops.normalize_axis(-1, 3) == (2,)
    assert sops.normalize_axis([2, 0], 3) == (0, 2)
    with pytest.raises(ValueError, match="out of range"):
        sops.normalize_axis(3, 3)
    with pytest.raises(ValueError, match="repeats"):
        sops.normalize_axis([0, -3], 3)


def test_rows_on_the_sphere_are_fixed_points():
    rng = np.random.default_rng(7)
    t = rng.normal(size=(9, 4)).astype("float64")
    t = (t / np.abs(t).sum(axis=0, keepdims=True) * 1.5).astype("float32")  # every row on the sphere
    for f in (sops.scale_to_l1_ball, sops.project_l1_ball):
        got = to_np(f(ops.convert_to_tensor(t), 1.5, (0,)))
        np.testing.assert_allclose(got, t, rtol=1e-5, atol=1e-7)


def test_python_number_bounds_keep_float64_and_16bit_rows_stay_finite():
    """A Python radius went through float32 (at_most(x64, 0.3) gave
    0.30000001, outside the ball); float16 rows with a radius below float16's
    normal range gave NaN on JAX."""
    x = ops.convert_to_tensor(np.array([0.5, 0.1, 0.4]), dtype="float64")
    if keras.backend.standardize_dtype(x.dtype) == "float64":   # not JAX without x64
        assert np.asarray(ops.convert_to_numpy(sops.at_most(x, 0.3))).tolist() == [0.3, 0.1, 0.3]
        assert np.asarray(ops.convert_to_numpy(sops.at_least(x, 0.3))).tolist() == [0.5, 0.3, 0.4]
        assert np.asarray(ops.convert_to_numpy(sops.project_l1_ball(x, 0.3, ()))).max() <= 0.3
    h = ops.convert_to_tensor(np.ones((4, 3)), dtype="float16")
    p = sops.project_l1_ball(h, 1e-6, (0,))
    assert keras.backend.standardize_dtype(p.dtype) == "float16"
    assert np.all(np.isfinite(np.asarray(ops.convert_to_numpy(p), "float32")))
    # A row whose L1 norm overflows float16 (2000 x 60 > 65504) is projected
    # in float32, not wiped to zero.
    big = ops.convert_to_tensor(np.full((2000, 2), 60.0), dtype="float16")
    rows = np.abs(np.asarray(ops.convert_to_numpy(sops.project_l1_ball(big, 10.0, (0,))), "float64")).sum(0)
    np.testing.assert_allclose(rows, 10.0, rtol=2e-3)


def test_16bit_norms_and_scalings_are_worked_out_in_float32():
    # A float16 sum of 4608 elements lost whole units (128 for 184.4 on TF),
    # squares of small offsets underflowed (a distance of 0) or large ones
    # overflowed (a relative radius of inf), and a scaled point left its ball.
    x = np.full((4608, 3), 0.04, "float16")
    exact = 4608 * float(np.float16(0.04))
    got = to_np(sops.row_l1_norms(ops.convert_to_tensor(x), (0,)))
    np.testing.assert_allclose(got, exact, rtol=1e-6)
    for scale, n in ((1e-4, 256), (8.0, 512)):   # squares below / above float16's range
        y = np.full((n, n), scale, "float16")
        want = float(np.float16(scale)) * n
        assert float(to_np(sops.frobenius_norm(ops.convert_to_tensor(y)))) == pytest.approx(want, rel=1e-6)
    t = ops.convert_to_tensor(np.full((64, 64), 1e-4, "float16"))
    out = to_np(sops.scale_to_frobenius_ball(t, 1e-3))
    assert out.dtype == np.float16 and np.sqrt((out.astype("float64") ** 2).sum()) <= 1e-3 * (1 + 2 ** -10)
    out = to_np(sops.scale_to_l1_ball(ops.convert_to_tensor(x), 1.0, (0,)))
    assert out.dtype == np.float16
    assert np.abs(out.astype("float64")).sum(axis=0).max() <= 1.0 * (1 + 2 ** -10)
    assert sops.normalize_axis(np.int64(-1), 3) == (2,) and type(sops.normalize_axis([np.int64(0)], 2)[0]) is int
    with pytest.raises(ValueError, match="axis entries must be ints, got True"):
        sops.normalize_axis(True, 2)
    # 16-bit radii, norms and gradients beside the widened offsets (TensorFlow
    # does not promote float32 * bfloat16).
    t16, r16 = ops.cast(ops.convert_to_tensor(x[:, :2]), "bfloat16"), ops.cast(ops.convert_to_tensor(1.0), "bfloat16")
    n16 = ops.cast(sops.row_l1_norms(t16, (0,)), "bfloat16")
    assert keras.backend.standardize_dtype(sops.scale_to_l1_ball(t16, r16, (0,), norms=n16).dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(sops.scale_to_frobenius_ball(t16, r16, norm=r16 * 50.0).dtype) == "bfloat16"
    want = float(np.sum(to_np(ops.cast(t16, "float32")) ** 2)) / 2.0
    assert float(to_np(sops.l1_radius_gradient(t16, t16, 2.0, (0,), rtol=1e9))) == pytest.approx(want, rel=1e-5)
    assert float(to_np(sops.frobenius_radius_gradient(t16, t16, 2.0, rtol=1e9))) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("t_dtype,r_dtype", [("bfloat16", "bfloat16"), ("float32", "float64"),
                                             ("float32", "bfloat16"), ("float64", "float32")])
def test_a_radius_tensor_in_another_dtype_works_on_every_backend(t_dtype, r_dtype):
    """TensorFlow does not promote float32 with float64 or bfloat16: a
    per-row radius (or norms) in another dtype than the offsets is cast, in
    all three projections alike."""
    t = _offsets((6, 5))
    radii = np.linspace(0.2, 1.0, 5).astype("float32")[None]
    want_scale = t / np.maximum(1.0, row_sums(t, (0,)) / radii)
    tt = ops.cast(ops.convert_to_tensor(t), t_dtype)
    rr = ops.cast(ops.convert_to_tensor(radii), r_dtype)
    tol = 1e-2 if "bfloat16" in (t_dtype, r_dtype) else 1e-6
    got = to_np(ops.cast(sops.scale_to_l1_ball(tt, rr, (0,)), "float32"))
    np.testing.assert_allclose(got, want_scale, rtol=tol, atol=tol)
    exact = to_np(ops.cast(sops.project_l1_ball(tt, rr, (0,), norms=ops.cast(sops.row_l1_norms(tt, (0,)), r_dtype)),
                           "float32"))
    assert np.all(row_sums(exact, (0,)) <= to_np(ops.cast(rr, "float32")) * (1 + tol))
    frob = to_np(ops.cast(sops.scale_to_frobenius_ball(tt, rr[0, 0]), "float32"))
    assert np.sqrt((frob.astype("float64") ** 2).sum()) <= 0.2 * (1 + tol)
    g = ops.cast(ops.convert_to_tensor(np.ones_like(t)), t_dtype)
    for grad in (sops.l1_radius_gradient(g, tt, rr, (0,)), sops.frobenius_radius_gradient(g, tt, rr[0, 0])):
        assert np.isfinite(to_np(grad)).all()


def test_docstring_examples_print_what_they_show_on_this_backend():
    """The examples of the core modules on the backend of this run (the
    suite runs tests/core on JAX, TensorFlow and PyTorch)."""
    import doctest
    from keras_spft import constraints, ops as ops_module, regularizers

    for module in (ops_module, constraints, regularizers):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        assert result.attempted and result.failed == 0, f"{module.__name__} on {keras.backend.backend()}"
