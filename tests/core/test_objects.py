"""Constraints and regularizers as standalone Keras objects."""

import json

import numpy as np
import pytest
import keras
from keras import ops

import keras_spft
from tests.core.helpers import assert_within_bound, l1_projection_reference, to_np


def _w(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def test_mars_distance_is_anchor_plus_scaled_offset():
    a, w = _w((3, 3, 4, 6)), _w((3, 3, 4, 6), 1) * 2
    c = keras_spft.MARSDistance(a, radius=1.5, axis=[0, 1, 2])
    got = to_np(c(ops.convert_to_tensor(w)))
    t = (w - a).astype(np.float64)
    n = np.abs(t).sum(axis=(0, 1, 2), keepdims=True)
    np.testing.assert_allclose(got, a + t / np.maximum(1, n / 1.5), rtol=1e-5, atol=1e-6)
    assert_within_bound(c, got)


def test_float64_kernels_are_projected_and_penalised_in_float64():
    a = np.zeros((3, 2), "float64")
    w = a.copy()
    w[0, 0] = 1.0 + 1e-12  # inside the ball: must come back exactly
    w[:, 1] = 4.0          # outside: rescaled in float64
    if keras.backend.standardize_dtype(ops.convert_to_tensor(w).dtype) != "float64":
        pytest.skip("this backend holds float64 as float32 (JAX without jax_enable_x64)")
    c = keras_spft.MARSDistance(a, radius=3.0, axis=0)
    got = to_np(c(ops.convert_to_tensor(w)))
    assert got.dtype == np.float64
    assert got[0, 0] == 1.0 + 1e-12
    np.testing.assert_allclose(got[:, 1], 1.0, rtol=1e-15)
    pen = keras_spft.L2SP(a[:, :1], strength=1.0)(ops.convert_to_tensor(w[:, :1]))
    assert to_np(pen).dtype == np.float64
    assert float(to_np(pen)) == pytest.approx(1.0 + 2e-12, rel=1e-15, abs=0)  # 1.0 in float32


@pytest.mark.parametrize("method", ["scale", "exact", "frobenius"])
def test_float64_projections_match_float64_references(method):
    """Random rows, most outside the ball: every projection keeps float64
    precision (on PyTorch, `ops.maximum` alone would compute it in float32)."""
    rng = np.random.default_rng(7)
    a = rng.normal(size=(40, 5))
    w = a + rng.normal(size=(40, 5)) * 0.05
    if keras.backend.standardize_dtype(ops.convert_to_tensor(w).dtype) != "float64":
        pytest.skip("this backend holds float64 as float32 (JAX without jax_enable_x64)")
    t = w - a
    if method == "frobenius":
        c = keras_spft.FrobeniusDistance(a, radius=0.125)   # radii are float32: exact ones here
        want = a + t / max(1.0, np.sqrt((t ** 2).sum()) / 0.125)
    else:
        c = keras_spft.MARSDistance(a, radius=0.25, axis=0, projection=method)
        if method == "scale":
            want = a + t / np.maximum(1.0, np.abs(t).sum(axis=0) / 0.25)
        else:
            want = a + np.stack([l1_projection_reference(t[:, j], 0.25) for j in range(5)], axis=1)
    got = to_np(c(ops.convert_to_tensor(w)))
    assert got.dtype == np.float64
    assert not np.allclose(got, w)   # the ball was active
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)


def test_bfloat16_anchors_are_kept_in_bfloat16():
    import ml_dtypes
    a = _w((4, 3)).astype(ml_dtypes.bfloat16)
    c = keras_spft.MARSDistance(a, radius=0.5, axis=0)
    assert keras.backend.standardize_dtype(c.anchor.dtype) == "bfloat16"
    np.testing.assert_array_equal(to_np(c.anchor), a)
    w = ops.cast(ops.convert_to_tensor(a.astype("float32") + 1.0), "bfloat16")
    got = to_np(c(w))
    assert got.dtype == a.dtype
    # the projection runs in float32 and rounds once when stored
    assert_within_bound(c, got, slack=2.0 ** -8)


def test_constraint_copies_the_anchor():
    a = _w((4, 3))
    c = keras_spft.MARSDistance(a, radius=1.0)
    a += 100.0  # the caller's array changes; the stored anchor must not
    assert np.all(np.abs(to_np(c.anchor) - (a - 100.0)) < 1e-5)


def test_head_constraint_centred_at_origin():
    c = keras_spft.MARSDistance(None, radius=0.5, axis=0)
    got = to_np(c(ops.convert_to_tensor(np.full((4, 2), 1.0, "float32"))))
    np.testing.assert_allclose(np.abs(got).sum(axis=0), [0.5, 0.5], rtol=1e-6)
    f = keras_spft.FrobeniusDistance(None, radius=2.0)
    got = to_np(f(ops.convert_to_tensor(np.ones((4, 4), "float32"))))
    assert np.sqrt((got ** 2).sum()) == pytest.approx(2.0, rel=1e-6)


def test_relative_radius_is_fraction_of_anchor_row_norm():
    a = _w((5, 4))
    c = keras_spft.MARSDistance(a, radius=0.1, axis=0, relative=True)
    np.testing.assert_allclose(to_np(c.radius)[0], 0.1 * np.abs(a).sum(axis=0), rtol=1e-6)
    w = to_np(c(ops.convert_to_tensor(a + 10.0)))
    d = np.abs(w - a).sum(axis=0)
    np.testing.assert_allclose(d, 0.1 * np.abs(a).sum(axis=0), rtol=1e-4)
    f = keras_spft.FrobeniusDistance(a, radius=0.1, relative=True)
    assert float(to_np(f.radius)) == pytest.approx(0.1 * np.sqrt((a.astype(np.float64) ** 2).sum()), rel=1e-6)
    # One fraction per row (column of a Dense kernel).
    fractions = np.array([0.1, 0.2, 0.3, 0.4], "float32")
    c = keras_spft.MARSDistance(a, radius=fractions, axis=0, relative=True)
    np.testing.assert_allclose(to_np(c.radius)[0], fractions * np.abs(a).sum(axis=0), rtol=1e-6)
    for bad in (np.full(3, 0.5), np.full((4, 1), 0.5)):
        with pytest.raises(ValueError, match=rf"dense/kernel.*`radius` of shape \({bad.shape[0]},.*relative=True\) "
                                             r"does not broadcast to the per-row shape \(1, 4\)"):
            keras_spft.MARSDistance(a, radius=bad, axis=0, relative=True, name="dense/kernel")
    with pytest.raises(ValueError, match=r"dense/kernel.*`radius` must be a scalar.*shape \(4,\)"):
        keras_spft.FrobeniusDistance(a, radius=fractions, relative=True, name="dense/kernel")


def test_exact_projection_option():
    a, w = _w((8, 3)), _w((8, 3), 2) * 3
    c = keras_spft.MARSDistance(a, radius=1.0, axis=0, projection="exact")
    got = to_np(c(ops.convert_to_tensor(w)))
    assert_within_bound(c, got)
    scaled = to_np(keras_spft.MARSDistance(a, 1.0, axis=0)(ops.convert_to_tensor(w)))
    assert ((got - w) ** 2).sum() < ((scaled - w) ** 2).sum()


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_radius_is_rejected(bad):
    with pytest.raises(ValueError, match="radius.*positive and finite"):
        keras_spft.MARSDistance(_w((3, 2)), radius=bad, name="dense/kernel")
    with pytest.raises(ValueError, match="radius"):
        keras_spft.FrobeniusDistance(_w((3, 2)), radius=bad)
    with pytest.raises(ValueError, match="strength"):
        keras_spft.L2SP(_w((3, 2)), strength=bad)


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="unknown projection 'fast'"):
        keras_spft.MARSDistance(_w((3, 2)), 1.0, projection="fast")
    with pytest.raises(ValueError, match="relative=True.*needs an anchor"):
        keras_spft.MARSDistance(None, 1.0, relative=True)
    with pytest.raises(ValueError, match="`learn_radius` must be True or False, got 'false'"):
        keras_spft.FrobeniusDistance(_w((3, 2)), 1.0, learn_radius="false")
    with pytest.raises(ValueError, match="NaN or inf"):
        keras_spft.MARSDistance(np.array([[np.nan, 1.0]], "float32"), 1.0)
    with pytest.raises(ValueError, match=r"MARSDistance\(conv/kernel\): `axis` \[2\] does not fit.*out of range"):
        keras_spft.MARSDistance(_w((3, 2)), 1.0, axis=2, name="conv/kernel")
    # A penalty checks its axes against its anchor when made, not in the
    # first training step; one around the origin names itself there.
    with pytest.raises(ValueError, match=r"MARSSP\(conv/kernel\): `axis` \[5\] does not fit"):
        keras_spft.MARSSP(_w((3, 2)), 0.5, axis=5, name="conv/kernel")
    with pytest.raises(ValueError, match=r"MARSSP\(head\): `axis` \[5\] does not fit"):
        keras_spft.MARSSP(None, 0.5, axis=5, name="head")(ops.zeros((3, 2)))
    for bad in (0.0, "0", "12", True, [0.0]):
        for make in (lambda: keras_spft.MARSDistance(_w((3, 2)), 1.0, axis=bad, name="conv/kernel"),
                     lambda: keras_spft.MARSDistance(None, 1.0, axis=bad, name="conv/kernel"),
                     lambda: keras_spft.MARSSP(_w((3, 2)), 1.0, axis=bad, name="conv/kernel")):
            with pytest.raises(ValueError, match=r"conv/kernel.*`axis` must be an int, a list or tuple of ints"):
                make()
    assert keras_spft.MARSDistance(_w((3, 2)), 1.0, axis=np.array([0])).axis == (0,)
    with pytest.raises(ValueError, match="does not broadcast"):
        keras_spft.MARSDistance(_w((3, 2)), np.ones(3, "float32"), axis=0)
    c = keras_spft.MARSDistance(_w((3, 2)), 1.0, name="conv/kernel")
    with pytest.raises(ValueError, match=r"conv/kernel.*shape \(4, 2\).*anchor has shape \(3, 2\)"):
        c(ops.zeros((4, 2)))


def test_config_round_trip_keeps_no_anchor_values():
    a = _w((64, 32))
    c = keras_spft.MARSDistance(a, radius=2.0, axis=0, projection="exact", name="d/kernel")
    cfg = keras.constraints.serialize(c)
    text = json.dumps(cfg)
    assert len(text) < 600, "anchor values must not be stored as JSON"
    c2 = keras.constraints.deserialize(json.loads(text))
    assert isinstance(c2, keras_spft.MARSDistance) and c2.projection == "exact"
    with pytest.raises(RuntimeError, match="anchor was never loaded"):
        c2(ops.convert_to_tensor(a))
    # state transfer as keras' saving library does it
    store = {}
    c.save_own_variables(store)
    c2.load_own_variables(store)
    np.testing.assert_array_equal(to_np(c2.anchor), to_np(c.anchor))
    np.testing.assert_array_equal(to_np(c2(ops.convert_to_tensor(a + 1))), to_np(c(ops.convert_to_tensor(a + 1))))


def test_configs_show_the_numbers_given():
    """The config held float32's nearest value in double (0.10000000149011612)."""
    reg = keras_spft.L2SP(_w((3, 2)), strength=0.1)
    assert reg.get_config()["strength"] == 0.1
    c = keras_spft.FrobeniusDistance(_w((3, 2)), radius=1e-30)
    assert c.get_config()["radius"] == 1e-30
    back = keras_spft.FrobeniusDistance.from_config(c.get_config())
    assert to_np(back.radius).astype("float32") == to_np(c.radius).astype("float32")


def test_copy_and_pickle_keep_the_anchor():
    import copy
    import pickle

    a = _w((4, 3))
    for obj in (keras_spft.MARSDistance(a, 1.0), keras_spft.L2SP(a, 0.1)):
        for clone in (copy.deepcopy(obj), pickle.loads(pickle.dumps(obj))):
            np.testing.assert_array_equal(to_np(clone.anchor), a)
            assert clone.anchor is not obj.anchor


def test_penalty_values_against_numpy():
    a, w = _w((3, 3, 4, 5)), _w((3, 3, 4, 5), 1)
    x = ops.convert_to_tensor(w)
    t = w.astype(np.float64) - a
    l2 = float(keras_spft.L2SP(a, 0.01)(x))
    assert l2 == pytest.approx(0.01 * (t ** 2).sum(), rel=1e-5)
    mars = float(keras_spft.MARSSP(a, 0.2, axis=[0, 1, 2])(x))
    assert mars == pytest.approx(0.2 * np.abs(t).sum(axis=(0, 1, 2)).max(), rel=1e-5)
    head = float(keras_spft.L2SP(None, 0.5)(x))
    assert head == pytest.approx(0.5 * (w.astype(np.float64) ** 2).sum(), rel=1e-5)
    # axis=(): every element its own row (BatchNorm gamma): the largest |t_i|.
    g0, g = _w((7,)), _w((7,), 2)
    elementwise = float(keras_spft.MARSSP(g0, 0.3, axis=())(ops.convert_to_tensor(g)))
    assert elementwise == pytest.approx(0.3 * np.abs(g.astype(np.float64) - g0).max(), rel=1e-5)


def test_penalty_enters_model_losses_exactly():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, name="a"), keras.layers.Dense(3, name="b")])
    a0 = to_np(model.get_layer("a").kernel)
    keras_spft.wrap_pretrained(model, method="l2-sp", strength=0.03, head_strength=0.2)
    new = np.random.default_rng(1).normal(size=a0.shape).astype("float32")
    model.get_layer("a").kernel.assign(new)
    b = to_np(model.get_layer("b").kernel)
    want = 0.03 * ((new.astype(np.float64) - a0) ** 2).sum() + 0.2 * (b.astype(np.float64) ** 2).sum()
    got = sum(float(to_np(l)) for l in model.losses)
    assert got == pytest.approx(want, rel=1e-5)
    keras_spft.wrap_pretrained(model, method="mars-sp", strength=0.5, head_strength=0.1)
    want = 0.5 * np.abs(new.astype(np.float64) - a0).sum(axis=0).max() + 0.1 * np.abs(b).sum(axis=0).max()
    got = sum(float(to_np(l)) for l in model.losses)
    assert got == pytest.approx(want, rel=1e-5)


def test_mars_sp_pulls_nothing_at_the_anchor():
    """At W = W0 (the first step of every fine-tuning) the penalty's gradient
    is 0 on every backend: a step on a zero data loss leaves the kernel at its
    anchor (on JAX, |x| has slope 1 at 0)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, name="a"), keras.layers.Dense(3, name="b")])
    keras_spft.wrap_pretrained(model, method="mars-sp", strength=0.5, head_strength=0.1)
    a0 = to_np(model.get_layer("a").kernel)
    b0 = to_np(model.get_layer("b").kernel)
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss=lambda y, p: 0.0 * ops.sum(p))
    x = np.ones((2, 6), "float32")
    model.train_on_batch(x, np.zeros((2, 3), "float32"))
    np.testing.assert_array_equal(to_np(model.get_layer("a").kernel), a0)
    assert not np.allclose(to_np(model.get_layer("b").kernel), b0)   # the head (centred at 0) is pulled


def test_radius_that_vanishes_or_overflows_in_float32_is_rejected():
    # found by the fuzz test: 1e-210 is positive in float64 but 0 in float32
    # and 1e-39 is subnormal in float32: flushed to 0 by XLA on the CPU (NaN kernels)
    for bad in (1e-210, 1e-39, 1e39):
        with pytest.raises(ValueError, match="positive and finite in float32"):
            keras_spft.MARSDistance(_w((4, 3)), bad, name="d/kernel")
    with pytest.raises(ValueError, match="positive and finite in float32"):
        keras_spft.MARSDistance(_w((4, 3)) * 1e30, 1e20, relative=True)


def test_16_bit_kernels_are_projected_in_float32_and_rounded_once():
    # A float16 row whose L1 norm overflows float16 (128 x 1000 > 65504):
    # computed in float16 its factor would be 0 and the row zeroed.
    w = ops.convert_to_tensor(np.full((128, 2), 1000.0, "float16"))
    c = keras_spft.MARSDistance(np.zeros((128, 2), "float16"), radius=10.0, axis=0)
    out = to_np(c.project(w))
    assert out.dtype == np.float16
    np.testing.assert_allclose(np.abs(out.astype(np.float64)).sum(axis=0), 10.0, rtol=2e-3)
    # bfloat16: the float32 projection, rounded once to bfloat16.
    rng = np.random.default_rng(0)
    a = rng.normal(size=(16, 3)).astype("float32")
    x = a + rng.normal(size=(16, 3)).astype("float32")
    a16, x16 = (ops.cast(ops.convert_to_tensor(v), "bfloat16") for v in (a, x))
    got = to_np(keras_spft.MARSDistance(a16, radius=0.5, axis=0).project(x16)).astype(np.float64)
    a32, x32 = (to_np(ops.cast(v, "float32")).astype(np.float64) for v in (a16, x16))
    t = x32 - a32
    expected = a32 + t * np.minimum(1.0, 0.5 / np.abs(t).sum(axis=0, keepdims=True))
    rounded = to_np(ops.cast(ops.convert_to_tensor(expected.astype("float32")), "bfloat16")).astype(np.float64)
    assert np.mean(got == rounded) > 0.9 and np.abs(got - rounded).max() <= np.abs(rounded).max() * 2.0 ** -7


def test_16bit_distances_and_relative_radii_are_exact_in_float32():
    import keras_spft

    rng = np.random.default_rng(0)
    a = (rng.normal(size=(256, 256)) * 0.01).astype("float16")
    w = a + rng.choice([-1e-4, 1e-4], a.shape).astype("float16")
    d = (w.astype("float64") - a.astype("float64"))
    c = keras_spft.FrobeniusDistance(a, 1.0)
    assert float(to_np(c.distance(w))) == pytest.approx(np.sqrt((d ** 2).sum()), rel=1e-5)   # was 0.0
    m = keras_spft.MARSDistance(a, 1.0, axis=np.int64(0))
    assert float(to_np(m.distance(w))) == pytest.approx(np.abs(d).sum(axis=0).max(), rel=1e-5)
    big = rng.normal(size=(512, 512)).astype("float16")
    rel = keras_spft.FrobeniusDistance(big, 0.01, relative=True)        # was "radius ... got inf"
    want = 0.01 * np.sqrt((big.astype("float64") ** 2).sum())
    assert float(to_np(rel.radius)) == pytest.approx(want, rel=1e-5)
    conv = np.full((3, 3, 512, 2), 0.04, "float16")
    rel = keras_spft.MARSDistance(conv, 0.1, axis=(0, 1, 2), relative=True)   # was 13.5% off on TF
    np.testing.assert_allclose(to_np(rel.radius), 0.1 * 4608 * float(np.float16(0.04)), rtol=1e-6)


def test_per_row_radii_of_a_head_are_checked_against_its_rows():
    import keras_spft

    c = keras_spft.MARSDistance(None, radius=np.array([[1.0], [2.0], [3.0]], "float32"), axis=0)
    with pytest.raises(ValueError, match=r"`radius` of shape \(3, 1\) does not broadcast to the per-row shape "
                                         r"\(1, 3\) of a kernel of shape \(3, 3\)"):
        c(ops.ones((3, 3)))          # silently gave every column the norm 2
    c = keras_spft.MARSDistance(None, radius=np.array([1.0, 2.0, 3.0], "float32"), axis=0)
    out = to_np(c(ops.ones((4, 3)) * 2.0))
    np.testing.assert_allclose(np.abs(out).sum(axis=0), [1.0, 2.0, 3.0], rtol=1e-6)


def test_distances_of_a_kernel_of_another_shape_are_refused():
    """distance(), row_distances() and radius_gradient() broadcast a wrong
    shape against the anchor and returned a number (9.64 for (1, 4) against
    a (16, 4) anchor); __call__ refused it already."""
    anchor = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    mars, fro = keras_spft.MARSDistance(anchor, 1.0), keras_spft.FrobeniusDistance(anchor, 1.0)
    for bad in (np.zeros((1, 4), "float32"), np.zeros((4,), "float32")):
        for call in (mars.distance, mars.row_distances, fro.distance):
            with pytest.raises(ValueError, match=r"the weight has shape .* but the anchor has shape \(16, 4\)"):
                call(bad)
        with pytest.raises(ValueError, match=r"the anchor has shape \(16, 4\)"):
            mars.radius_gradient(np.zeros((16, 4), "float32"), bad)
    with pytest.raises(ValueError, match=r"the gradient has shape \(1, 4\) but the kernel has shape \(16, 4\)"):
        mars.radius_gradient(np.zeros((1, 4), "float32"), anchor)
    assert float(to_np(mars.distance(anchor))) == 0.0
