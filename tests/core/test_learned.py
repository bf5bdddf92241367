"""Learned radii (radius="learned", RadiusOptimizer): the radius gradient
against finite differences, one optimizer step against a hand computation,
the bound with the current radius after every step of a real fit, radii that
move, save/load, logging, and the errors."""

import json
import zipfile

import numpy as np
import pytest
import keras
from keras import ops

import keras_spft
from keras_spft import ops as spft_ops
from keras_spft.constraints import MIN_LEARNED_RADIUS
from tests.core.helpers import assert_within_bound, l1_projection_reference, to_np
from tests.core.models import small_cnn
from tests.core.test_training import BoundChecker


# -- the radius gradient ------------------------------------------------------

def _scale_np(d, r):
    n = np.abs(d).sum(axis=0, keepdims=True)
    return d / np.maximum(1.0, n / r)


def _exact_np(d, r):
    return np.stack([l1_projection_reference(d[:, j], r) for j in range(d.shape[1])], axis=1)


def _fro_np(d, r):
    return d / max(1.0, np.sqrt((d ** 2).sum()) / r)


@pytest.mark.parametrize("kind", ["scale", "exact", "frobenius"])
def test_radius_gradient_matches_finite_differences(kind):
    # d/dr <g, P_r(d)> by central differences in float64, with P computed by
    # independent numpy code; the function under test only sees P_r(d).
    rng = np.random.default_rng(1)
    d = rng.normal(size=(20, 6))
    d[:, 0] *= 0.05          # a row well inside the ball
    g = rng.normal(size=d.shape)
    r = 3.0 if kind != "frobenius" else 4.0
    proj = {"scale": _scale_np, "exact": _exact_np, "frobenius": _fro_np}[kind]
    h = 1e-5
    expected = ((g * proj(d, r + h)).sum() - (g * proj(d, r - h)).sum()) / (2 * h)
    t = ops.convert_to_tensor(proj(d, r).astype("float32"))
    gt = ops.convert_to_tensor(g.astype("float32"))
    if kind == "frobenius":
        got = spft_ops.frobenius_radius_gradient(gt, t, r)
    else:
        got = spft_ops.l1_radius_gradient(gt, t, r, (0,), projection=kind)
    assert abs(float(to_np(got)) - expected) <= 1e-3 * max(1.0, abs(expected))
    assert abs(expected) > 0.1  # the case is not degenerate


@pytest.mark.parametrize("projection", ["scale", "exact"])
def test_elementwise_radius_gradient_matches_finite_differences(projection):
    # axis=(): every element its own row (BatchNorm gamma): P_r(d) = clip(d, -r, r).
    rng = np.random.default_rng(3)
    d = rng.normal(size=(40,))
    g = rng.normal(size=d.shape)
    r, h = 0.7, 1e-5
    expected = ((g * np.clip(d, -(r + h), r + h)).sum() - (g * np.clip(d, -(r - h), r - h)).sum()) / (2 * h)
    t = ops.convert_to_tensor(np.clip(d, -r, r).astype("float32"))
    got = spft_ops.l1_radius_gradient(ops.convert_to_tensor(g.astype("float32")), t, r, (), projection=projection)
    assert abs(float(to_np(got)) - expected) <= 1e-3 * max(1.0, abs(expected)) and abs(expected) > 0.1


def test_radius_gradient_is_zero_inside_the_ball():
    t = ops.convert_to_tensor(np.full((5, 3), 0.1, "float32"))   # row norms 0.5
    g = ops.ones((5, 3))
    assert float(to_np(spft_ops.l1_radius_gradient(g, t, 1.0, (0,)))) == 0.0
    assert float(to_np(spft_ops.frobenius_radius_gradient(g, t, 1.0))) == 0.0


# -- one optimizer step against numpy ----------------------------------------

def test_one_step_matches_hand_computation():
    rng = np.random.default_rng(2)
    w0 = rng.normal(size=(5, 3)).astype("float32")
    r0 = 0.5
    start = w0 + _scale_np(rng.normal(size=(5, 3)), r0).astype("float32")   # rows on the bound
    layer = keras.layers.Dense(3, use_bias=False)
    layer.build((None, 5))
    layer.kernel.assign(start)
    c = keras_spft.MARSDistance(w0, r0, axis=0, learn_radius=True, name="k")
    layer.kernel.constraint = c
    lr, rlr = 0.05, 0.01
    opt = keras_spft.RadiusOptimizer(keras.optimizers.SGD(lr), radius_learning_rate=rlr)
    g = rng.normal(size=(5, 3)).astype("float32")
    opt.apply([ops.convert_to_tensor(g)], [layer.kernel])

    t = start.astype(np.float64) - w0
    on = np.abs(t).sum(axis=0) >= r0 * (1 - 1e-3)
    assert on.all()
    gr = (g * t / r0).sum()
    # First Adam step: m_hat = gr, v_hat = gr^2.
    r1 = r0 - rlr * gr / (abs(gr) + 1e-8)
    moved = start.astype(np.float64) - lr * g - w0
    r1 = max(min(r1, np.abs(moved).sum(axis=0).max()), MIN_LEARNED_RADIUS)
    expected = w0 + _scale_np(moved, r1)
    np.testing.assert_allclose(float(to_np(c.radius)), r1, rtol=1e-5)
    np.testing.assert_allclose(to_np(layer.kernel), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shrink_factor, expected", [(0.0, 0.3), (1.0, 0.29)])
def test_shrink_factor(shrink_factor, expected):
    rng = np.random.default_rng(3)
    w0 = rng.normal(size=(4, 2)).astype("float32")
    layer = keras.layers.Dense(2, use_bias=False)
    layer.build((None, 4))
    start = w0 + _scale_np(rng.normal(size=(4, 2)), 0.3).astype("float32")
    layer.kernel.assign(start)
    c = keras_spft.MARSDistance(w0, 0.3, axis=0, learn_radius=True)
    layer.kernel.constraint = c
    opt = keras_spft.RadiusOptimizer(keras.optimizers.SGD(1e-6), shrink_factor=shrink_factor)
    # A gradient pointing away from the anchor has a positive radius
    # gradient: plain Adam shrinks the radius by its step size (0.01), k=0
    # leaves it (up to the clip at the farthest row, moved by 1e-6).
    opt.apply([ops.convert_to_tensor(start - w0)], [layer.kernel])
    assert float(to_np(c.radius)) == pytest.approx(expected, rel=1e-5)


# -- real training ---------------------------------------------------------------

def _data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 12, 12, 3)).astype("float32"), rng.integers(0, 3, n)


def _learned(model):
    return [(v, v.constraint) for v in model.trainable_variables
            if getattr(v.constraint, "learn_radius", False)]


class RadiusBoundChecker(keras.callbacks.Callback):
    """After every step: each kernel within its *current* radius, radius >= floor."""

    def __init__(self):
        super().__init__()
        self.checks = 0

    def on_train_batch_end(self, batch, logs=None):
        for var, c in _learned(self.model):
            assert float(to_np(c.radius)) >= MIN_LEARNED_RADIUS * (1 - 1e-6)
            assert_within_bound(c, var)
        self.checks += 1


@pytest.mark.parametrize("method, jit", [("mars-pgm", True), ("mars-pgm-exact", True), ("l2-pgm", False)])
def test_fit_learns_radii_within_bound(method, jit):
    keras.utils.set_random_seed(0)
    model = small_cnn()
    report = keras_spft.wrap_pretrained(model, radius="learned", method=method, head_radius=5.0)
    assert all(w.value == "learned" for w in report.wrapped if w.role == "backbone")
    model.compile(optimizer=keras_spft.RadiusOptimizer(keras.optimizers.Adam(1e-2)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=jit)
    x, y = _data()
    checker = RadiusBoundChecker()
    model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[checker])
    assert checker.checks == 12
    radii = keras_spft.learned_radii(model)
    assert len(radii) == 4
    # Radii move away from their start, and not all by the same amount.
    assert max(radii.values()) > 10 * MIN_LEARNED_RADIUS
    assert len({round(v, 6) for v in radii.values()}) > 1
    # The kernels use their radii: some sit on the bound.
    on = [float(to_np(c.distance(v))) >= 0.99 * float(to_np(c.radius)) for v, c in _learned(model)]
    assert any(on)
    assert "learned, now" in str(report)


def test_distance_monitor_logs_learned_radii():
    keras.utils.set_random_seed(0)
    model = small_cnn()
    keras_spft.wrap_pretrained(model, radius={"*": "learned", "fc": 2.0})
    model.compile(optimizer=keras_spft.RadiusOptimizer(keras.optimizers.Adam(1e-2)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data()
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0,
                        callbacks=[keras_spft.DistanceMonitor()])
    radii = keras_spft.learned_radii(model)
    assert len(radii) == 3                       # fc has a fixed radius
    assert len(history.history["spft/radius_mean"]) == 2
    key = "spft/base/c2/radius"
    assert history.history[key][-1] == pytest.approx(radii["base/c2/kernel"])
    assert history.history["spft/radius_max"][-1] == pytest.approx(max(radii.values()))
    assert "spft/base/fc/radius" not in history.history


def test_save_load_keeps_learned_radii_and_keeps_learning(tmp_path):
    keras.utils.set_random_seed(0)
    model = small_cnn()
    keras_spft.wrap_pretrained(model, radius="learned")
    model.compile(optimizer=keras_spft.RadiusOptimizer(keras.optimizers.Adam(1e-2), radius_learning_rate=0.02),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data()
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    radii = keras_spft.learned_radii(model)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert keras_spft.learned_radii(loaded) == radii
    assert isinstance(loaded.optimizer, keras_spft.RadiusOptimizer)
    assert loaded.optimizer.radius_learning_rate == 0.02
    for v, c in _learned(loaded):
        assert c.learn_radius and c.get_config()["learn_radius"] is True
    # Training goes on with the loaded radii: they keep moving, within bound.
    checker = RadiusBoundChecker()
    loaded.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[checker])
    assert checker.checks == 4
    assert keras_spft.learned_radii(loaded) != radii

    # Weights-only resume into a freshly wrapped model restores them too.
    wpath = str(tmp_path / "m.weights.h5")
    model.save_weights(wpath)
    fresh = small_cnn()
    keras_spft.wrap_pretrained(fresh, radius="learned")
    fresh.load_weights(wpath)
    assert keras_spft.learned_radii(fresh) == radii

    # The inner optimizer's state is written once, by the inner optimizer
    # (RadiusOptimizer also wrote it among its own: 1.5x the optimizer's size).
    import h5py

    with h5py.File(wpath) as f:
        own, inner = len(f["optimizer/vars"]), len(f["optimizer/inner_optimizer/vars"])
    assert inner == len(model.optimizer.inner_optimizer.variables)
    assert own == len(model.optimizer._variables) - len(model.optimizer._anchors) - len(model.optimizer._fixed_radii)
    reloaded = keras.models.load_model(path)
    for a, b in zip(model.optimizer.inner_optimizer.variables, reloaded.optimizer.inner_optimizer.variables):
        np.testing.assert_array_equal(to_np(a), to_np(b))
    # A file written the old way (inner state among its own) still loads.
    old_layout = {str(i): to_np(v) for i, v in enumerate(model.optimizer._saved_variables(with_inner=True))}
    again = keras_spft.RadiusOptimizer(keras.optimizers.Adam(1e-2))
    again.build(fresh.trainable_variables)
    again.load_own_variables(old_layout)
    np.testing.assert_array_equal(to_np(again._radius_m), to_np(model.optimizer._radius_m))


# -- errors ---------------------------------------------------------------------

def test_plain_optimizer_is_refused():
    model = small_cnn()
    keras_spft.wrap_pretrained(model, radius="learned")
    model.compile(optimizer="adam", loss="mse")
    x, _ = _data(8)
    with pytest.raises(ValueError, match="RadiusOptimizer"):
        model.fit(x, np.zeros((8, 3)), verbose=0)


def test_radius_optimizer_without_constraints_is_refused():
    model = small_cnn()
    opt = keras_spft.RadiusOptimizer(keras.optimizers.Adam())
    with pytest.raises(ValueError, match="none of the weights it trains has a keras-spft constraint.*not wrapped"):
        opt.build(model.trainable_variables)
    # Wrapped, but every constrained kernel frozen (a head-only phase): the
    # error says so instead of asking to wrap.
    keras_spft.wrap_pretrained(model, radius="learned")
    model.layers[0].trainable = False
    opt = keras_spft.RadiusOptimizer(keras.optimizers.Adam())
    with pytest.raises(ValueError, match="constrained kernels are frozen.*inner optimizer alone"):
        opt.build(model.trainable_variables)
    # Unfrozen, the same optimizer builds and trains (its inner optimizer was
    # built on the refused attempt's variables, and refused these).
    model.layers[0].trainable = True
    assert not opt.built and not opt.inner_optimizer.built
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data(8)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert opt.built and int(to_np(opt.iterations)) == 1


@pytest.mark.skipif(keras.backend.backend() == "jax",
                    reason="Keras' JAX trainer refuses a recompiled model with fewer trainable "
                           "variables for every built optimizer")
@pytest.mark.parametrize("radius", ["learned", 0.05])
def test_a_layer_frozen_between_fits_keeps_the_optimizer(radius):
    """Freezing one layer and compiling again with the same RadiusOptimizer
    (keeping its state) was refused as 'constraints changed'."""
    keras.utils.set_random_seed(1)
    model = small_cnn()
    keras_spft.wrap_pretrained(model, radius=radius, head_radius=5.0)
    opt = keras_spft.RadiusOptimizer(keras.optimizers.Adam(0.05))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=opt, loss=loss)
    x, y = _data(16)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    frozen = model.layers[0].layers[0]
    frozen.trainable = False
    before = to_np(frozen.kernel).copy()
    radius_before = to_np(frozen.kernel.constraint.radius).copy()
    model.compile(optimizer=opt, loss=loss)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    np.testing.assert_array_equal(to_np(frozen.kernel), before)
    # A frozen kernel's radius stays put (no gradient: its Adam step is masked).
    np.testing.assert_array_equal(to_np(frozen.kernel.constraint.radius), radius_before)
    for v in model.weights:
        if isinstance(v.constraint, (keras_spft.MARSDistance, keras_spft.FrobeniusDistance)):
            assert_within_bound(v.constraint, v)
    assert int(to_np(opt.iterations)) == 4


def test_fixed_radii_with_radius_optimizer(tmp_path):
    # Without learned radii it only carries the anchors as optimizer state:
    # radii unchanged, the bound holds, the file round-trips (anchors saved
    # once, by their constraints).
    keras.utils.set_random_seed(0)
    model = small_cnn()
    keras_spft.wrap_pretrained(model, radius=0.05, head_radius=3.0)
    opt = keras_spft.RadiusOptimizer(keras.optimizers.Adam(1e-2))
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data()
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    for v in model.trainable_variables:
        c = v.constraint
        if isinstance(c, keras_spft.MARSDistance):
            assert float(to_np(c.radius)) == pytest.approx(0.05 if c.anchor is not None else 3.0)
            assert_within_bound(c, v)
    anchors = [v.constraint.anchor for v in model.trainable_variables
               if getattr(v.constraint, "anchor", None) is not None]
    # State of a JAX step only (elsewhere the step reads the variables).
    on_jax = keras.backend.backend() == "jax"
    assert len(anchors) == 4 and len(opt._anchors) == (4 if on_jax else 0)
    assert len(opt._fixed_radii) == (5 if on_jax else 0)   # the head's too
    # Saved: its own state but the anchors and radii (their constraints save
    # them) and the inner optimizer's (saved by the inner optimizer).
    assert len(opt._saved_variables()) == (len(opt.variables) - len(opt._anchors) - len(opt._fixed_radii)
                                           - len(opt.inner_optimizer.variables))
    path = str(tmp_path / "f.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    for a, b in zip(model.trainable_variables, loaded.trainable_variables):
        np.testing.assert_array_equal(to_np(a), to_np(b))
        if getattr(a.constraint, "anchor", None) is not None:
            np.testing.assert_array_equal(to_np(a.constraint.anchor), to_np(b.constraint.anchor))
    for a, b in zip(opt._saved_variables(), loaded.optimizer._saved_variables()):
        np.testing.assert_array_equal(to_np(a), to_np(b))
    # A plain copy for serving: the file still records the RadiusOptimizer
    # (method="none" says so); compile=False loads it without keras-spft's
    # classes being needed.
    with pytest.warns(UserWarning, match=r"compiled with keras_spft.RadiusOptimizer.*compile=False"):
        keras_spft.wrap_pretrained(model, method="none")
    model.save(tmp_path / "plain.keras")
    with zipfile.ZipFile(tmp_path / "plain.keras") as z:
        config = z.read("config.json").decode()
    assert "keras_spft" in config and '"class_name": "RadiusOptimizer"' in config
    model_config = json.loads(config)["config"]
    assert "keras_spft" not in json.dumps(model_config)   # only the compile config names it


def test_a_fixed_radius_changed_after_compiling_is_in_force():
    """RadiusOptimizer carries fixed radii as state too: on JAX a radius
    compiled in as a constant would ignore the new value."""
    keras.utils.set_random_seed(0)
    model = small_cnn()
    keras_spft.wrap_pretrained(model, radius=1.0, head_radius=3.0)
    model.compile(optimizer=keras_spft.RadiusOptimizer(keras.optimizers.Adam(0.1)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data()
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    backbone = [(v, v.constraint) for v in model.trainable_variables
                if isinstance(v.constraint, keras_spft.MARSDistance) and v.constraint.anchor is not None]
    for _, c in backbone:
        c.radius.assign(0.01)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    farthest = max(float(np.max(assert_within_bound(c, v))) for v, c in backbone)
    assert 0.009 < farthest <= 0.01 * (1 + 1e-5)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX compiles the train step with jax.jit")
def test_jax_step_takes_anchors_as_inputs_not_constants():
    import jax

    def compiled(wrap, optimizer):
        keras.utils.set_random_seed(0)
        model = small_cnn()
        anchors = keras_spft.wrap_pretrained(model, radius=1.0).anchor_bytes if wrap else 0
        model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        x, y = _data(8)
        model.train_on_batch(x, y)
        state = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
                 [v.value for v in model.optimizer.variables], [v.value for v in model.metrics_variables])
        c = jax.jit(model.train_step, donate_argnums=0).lower(state, (x, y)).compile()
        return c.memory_analysis(), anchors

    plain, _ = compiled(False, keras.optimizers.Adam())
    carried, anchor_bytes = compiled(True, keras_spft.RadiusOptimizer(keras.optimizers.Adam()))
    # The anchors are arguments of the step (aliased to its outputs), and
    # nothing else grows: no copy of them compiled in as constants.
    scalars = 64 + 4 * 1024  # the optimizer wrapper's own scalars, with room
    assert anchor_bytes > 0
    assert 0 <= carried.argument_size_in_bytes - plain.argument_size_in_bytes - anchor_bytes <= scalars
    assert carried.peak_memory_in_bytes - plain.peak_memory_in_bytes <= anchor_bytes + scalars


@pytest.mark.parametrize("kwargs, match", [
    ({"radius": 2.0, "head_radius": "learned"}, "head_radius='learned' is not supported"),
    ({"radius": "learned", "relative": True}, "relative"),
    ({"radius": "learned", "batchnorm": "reference"}, "batchnorm='reference'"),
    ({"radius": "learn"}, "positive number or 'learned'"),
    ({"method": "l2-sp", "strength": "learned"}, "strength"),
])
def test_bad_learned_options(kwargs, match):
    model = small_cnn()
    with pytest.raises(ValueError, match=match):
        keras_spft.wrap_pretrained(model, **kwargs)


def test_radius_and_radius_optimizer_values_are_checked_with_their_names():
    model = small_cnn()
    for bad, said in [(True, r"`radius` must be a positive number, got True"),
                      ("a", r"`radius` must be a positive number or 'learned', got 'a'"),
                      ([1.0, 2.0], r"`radius` must be one number per layer"),
                      (ops.convert_to_tensor(-1.0), r"`radius` must be positive and finite")]:
        with pytest.raises(ValueError, match=r"layer 'base/c1': " + said):
            keras_spft.wrap_pretrained(model, radius=bad, head_radius=1.0)
    report = keras_spft.wrap_pretrained(model, radius=keras.Variable(0.5), head_radius=1.0)   # a tensor works
    assert float(to_np(report["c1"].radius)) == 0.5
    with pytest.raises(ValueError, match=r"MARSDistance\(unnamed\): `radius` must be a positive number"):
        keras_spft.MARSDistance(np.zeros((2, 2), "float32"), "a")
    for kwargs, said in [({"radius_learning_rate": float("inf")}, "radius_learning_rate"),
                         ({"beta_1": 1.5}, "beta_1"), ({"beta_2": -0.1}, "beta_2"), ({"epsilon": 0.0}, "epsilon")]:
        with pytest.raises(ValueError, match=said):
            keras_spft.RadiusOptimizer(keras.optimizers.Adam(), **kwargs)


def test_rewrapping_a_learned_radius_goes_on_from_it():
    keras.utils.set_random_seed(0)
    model = small_cnn()
    keras_spft.wrap_pretrained(model, radius="learned", head_radius=3.0)
    model.compile(optimizer=keras_spft.RadiusOptimizer(keras.optimizers.Adam(1e-2)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data()
    model.fit(x, y, epochs=3, batch_size=8, verbose=0)
    before = keras_spft.learned_radii(model)
    assert max(before.values()) > 10 * MIN_LEARNED_RADIUS      # it learned something
    report = keras_spft.wrap_pretrained(model, radius="learned", head_radius=5.0)
    assert keras_spft.learned_radii(model) == before and "kept learned radius" in str(report)
    assert str(report).startswith("mars-pgm (learned radii): 5 weights wrapped")


def test_switching_a_fine_tuned_model_to_learned_radii_keeps_its_weights():
    """From a fixed radius (or a penalty) to radius="learned": the radius
    starts at each kernel's current distance, not at 1e-4 (which would pull
    the fine-tuned kernels back to their anchors)."""
    keras.utils.set_random_seed(0)
    model = small_cnn()
    keras_spft.wrap_pretrained(model, method="l2-sp", strength=1e-4)
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data()
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    report = keras_spft.wrap_pretrained(model, radius="learned", head_radius=3.0)
    for w in report.wrapped:
        if w.role == "backbone":
            layer = model.get_layer("base").get_layer(w.path.split("/")[-1])
            d = float(to_np(w.obj.distance(layer.kernel)))
            assert d > 10 * MIN_LEARNED_RADIUS and float(to_np(w.obj.radius)) == pytest.approx(d, rel=1e-6)
            assert "learned radius starts at the current distance" in w.note


@pytest.mark.parametrize("radius", [0.05, "learned"])
def test_ema_weights_are_projected_at_the_end_of_fit(radius):
    """Keras averages the iterates before projecting them and writes the
    average into the weights when fit ends; RadiusOptimizer projects it."""
    keras.utils.set_random_seed(0)
    model = small_cnn()
    keras_spft.wrap_pretrained(model, radius=radius, head_radius=0.5)
    model.compile(optimizer=keras_spft.RadiusOptimizer(keras.optimizers.Adam(0.05, use_ema=True)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data()
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    radii = keras_spft.learned_radii(model)
    for v in model.trainable_variables:
        if isinstance(v.constraint, keras_spft.MARSDistance):
            assert_within_bound(v.constraint, v)
    assert keras_spft.learned_radii(model) == radii   # projecting does not move a learned radius


def test_radius_optimizer_argument_errors():
    with pytest.raises(ValueError, match="shrink_factor"):
        keras_spft.RadiusOptimizer(keras.optimizers.Adam(), shrink_factor=2.0)
    # Strings and None failed in a comparison; an infinite epsilon froze every radius.
    for kwargs, match in ((dict(beta_1="0.9"), r"`beta_1` must be a number in \[0, 1\), got '0.9'"),
                          (dict(beta_2=None), r"`beta_2` must be a number"),
                          (dict(shrink_factor=None), r"`shrink_factor` must be a number in \[0, 1\]"),
                          (dict(epsilon=float("inf")), r"RadiusOptimizer: `epsilon` must be positive and finite"),
                          (dict(epsilon=None), r"RadiusOptimizer: `epsilon` must be positive and finite, got None")):
        with pytest.raises(ValueError, match=match):
            keras_spft.RadiusOptimizer(keras.optimizers.Adam(), **kwargs)
    # Options of the base optimizer belong on the inner one; 0.99 (the EMA
    # momentum's default) was let through silently for all of them.
    for key in ("clipnorm", "weight_decay", "global_clipnorm"):
        with pytest.raises(ValueError, match=f"does not take {key}: set them on the inner optimizer"):
            keras_spft.RadiusOptimizer(keras.optimizers.Adam(), **{key: 0.99})
    keras_spft.RadiusOptimizer(keras.optimizers.Adam(), ema_momentum=0.99, clipnorm=None)   # defaults: fine
    with pytest.raises(ValueError, match="already learns radii"):
        keras_spft.RadiusOptimizer(keras_spft.RadiusOptimizer(keras.optimizers.Adam()))
    # its gradients are still scaled (inf on overflow steps) when the radii
    # read them: the other way round works (test_mixed_float16_... below)
    with pytest.raises(ValueError, match=r"LossScaleOptimizer\(RadiusOptimizer"):
        keras_spft.RadiusOptimizer(keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam()))
    with pytest.raises(ValueError, match="per kernel"):
        keras_spft.MARSDistance(np.ones((3, 2), "float32"), np.ones((1, 2)), learn_radius=True)


@pytest.mark.parametrize("radius", [None, 2.0, "learned"])
def test_recipe_compiles_with_radius_optimizer_when_needed(radius):
    from keras_spft import recipe

    model = small_cnn()
    if radius is not None:
        keras_spft.wrap_pretrained(model, radius=radius)
    recipe.compile_model(model, 1e-3)
    wrapped = isinstance(model.optimizer, keras_spft.RadiusOptimizer)
    # Learned radii need it; on JAX fixed radii get it too (anchors as state).
    assert wrapped == (radius == "learned" or (radius is not None and keras.backend.backend() == "jax"))
    assert float(to_np(model.optimizer.learning_rate)) == pytest.approx(1e-3)


def _multi(default, head):
    return keras.optimizers.MultiOptimizer(keras.optimizers.OptimizerMap(default_optimizer=default,
                                                                         optimizer_map={".*dense.*": head}))


@pytest.mark.parametrize("inner", ["adam", "multi", "callable"])
def test_gradient_accumulation_is_refused_with_learned_radii_only(inner):
    """Learned radii would step on every batch, the kernels on every k-th:
    refused, also where a sub-optimizer of a MultiOptimizer accumulates
    (once let through). Fixed radii (anchors as optimizer state on JAX) train
    with it, kernels moving on update steps only, within the bound."""
    def accumulating():
        adam = keras.optimizers.Adam(0.05, gradient_accumulation_steps=2)
        if inner == "callable":   # its sub-optimizers are known only once it is built
            sgd = keras.optimizers.SGD(0.1)
            return keras.optimizers.MultiOptimizer(lambda v: sgd if "head" in v.path else adam)
        return adam if inner == "adam" else _multi(adam, keras.optimizers.SGD(0.1))
    x, y = _data(16)
    keras.utils.set_random_seed(0)
    model = small_cnn()
    keras_spft.wrap_pretrained(model, radius="learned")
    model.compile(optimizer=keras_spft.RadiusOptimizer(accumulating()),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    which = "the inner optimizer 'adam[_0-9]*'" if inner == "adam" else "the sub-optimizer 'adam[_0-9]*'"
    with pytest.raises(ValueError, match=f"RadiusOptimizer: {which} accumulates gradients.*Fixed radii work"):
        model.fit(x, y, epochs=1, batch_size=4, verbose=0)

    keras.utils.set_random_seed(0)
    model = small_cnn()
    keras_spft.wrap_pretrained(model, radius=0.05, head_radius=0.5)
    model.compile(optimizer=keras_spft.RadiusOptimizer(accumulating()),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):   # self.model syncs JAX state
            seen.append(to_np(self.model.trainable_variables[0]).copy())
    checker = BoundChecker()
    model.fit(x, y, epochs=1, batch_size=4, verbose=0, callbacks=[Record(), checker])
    assert checker.checks == 4
    start = to_np(model.trainable_variables[0].constraint.anchor)
    moved = [float(np.abs(a - b).max()) for a, b in zip([start] + seen[:-1], seen)]
    assert moved[0] == 0.0 and moved[2] < 1e-6 < moved[1] and moved[3] > 1e-6   # updates on batches 2 and 4


def test_accumulation_is_refused_only_where_it_steps_learned_kernels_and_before_a_rewrap_changes_anything():
    x, y = _data(16)
    # A sub-optimizer that accumulates for BatchNorm only steps no learned kernel.
    keras.utils.set_random_seed(0)
    model = small_cnn()
    keras_spft.wrap_pretrained(model, radius="learned")
    bn = keras.optimizers.Adam(0.01, gradient_accumulation_steps=2)
    opt = keras.optimizers.MultiOptimizer(keras.optimizers.OptimizerMap(
        default_optimizer=keras.optimizers.Adam(0.01), optimizer_map={".*bn1.*": bn}))
    model.compile(optimizer=keras_spft.RadiusOptimizer(opt),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    # Fixed radii over an accumulating optimizer, then learned ones: refused
    # before the model or the optimizer changes (rebind raised at the end, with
    # the learned constraints attached and the optimizer's state half dropped).
    keras.utils.set_random_seed(0)
    model = small_cnn()
    keras_spft.wrap_pretrained(model, radius=0.05, head_radius=0.5)
    model.compile(optimizer=keras_spft.RadiusOptimizer(keras.optimizers.Adam(0.01, gradient_accumulation_steps=2)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    before = ([id(v.constraint) for v in model.trainable_variables], len(model.optimizer.variables))
    with pytest.raises(ValueError, match=r"wrap_pretrained \(nothing was changed\): in the RadiusOptimizer "
                                         r"'\w+' is compiled with, the inner optimizer 'adam[_0-9]*' accumulates"):
        keras_spft.wrap_pretrained(model, radius="learned")
    assert ([id(v.constraint) for v in model.trainable_variables], len(model.optimizer.variables)) == before
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)   # still trains as it was


def test_a_sub_optimizers_moving_average_is_projected_at_the_end_of_fit():
    """`use_ema=True` on a MultiOptimizer's sub-optimizer: its unprojected
    average replaced the weights at the end of fit (only the inner
    optimizer's own use_ema was looked at)."""
    keras.utils.set_random_seed(0)
    model = small_cnn()
    keras_spft.wrap_pretrained(model, radius=0.05, head_radius=0.5)
    opt = keras.optimizers.MultiOptimizer(keras.optimizers.OptimizerMap(
        default_optimizer=keras.optimizers.Adam(0.05, use_ema=True),
        optimizer_map={".*head.*": keras.optimizers.SGD(0.1)}))
    model.compile(optimizer=keras_spft.RadiusOptimizer(opt),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data()
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    for v in model.trainable_variables:
        if isinstance(v.constraint, keras_spft.MARSDistance):
            assert_within_bound(v.constraint, v)


def test_swap_ema_weights_under_mixed_float16():
    """Keras' SwapEMAWeights looks through one wrapper: under mixed_float16
    that is the LossScaleOptimizer, which reached RadiusOptimizer and failed
    ("Received: use_ema=False") though the inner optimizer has use_ema=True.
    It now swaps the inner optimizer's averages in for evaluation and back."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        model = small_cnn()
        keras_spft.wrap_pretrained(model, radius=0.05, head_radius=0.5)
        model.compile(optimizer=keras_spft.RadiusOptimizer(keras.optimizers.Adam(0.01, use_ema=True)),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        x, y = _data(16)
        seen = {}

        class Record(keras.callbacks.Callback):   # after SwapEMAWeights in the list
            def _weights(self):
                return [to_np(v).copy() for v in self.model.trainable_variables]

            def on_train_batch_end(self, batch, logs=None):
                seen["trained"] = self._weights()

            def on_test_begin(self, logs=None):
                seen["validated"] = self._weights()

            def on_epoch_end(self, epoch, logs=None):
                seen["after"] = self._weights()
        model.fit(x, y, epochs=2, batch_size=8, verbose=0, validation_data=(x, y),
                  callbacks=[keras.callbacks.SwapEMAWeights(), Record()])
        averages = model.optimizer.inner_optimizer.inner_optimizer._model_variables_moving_average
        # validated with the moving averages, trained on with the weights
        # (TensorFlow swaps by adding and subtracting: rounding)
        for v, e, t, a in zip(seen["validated"], averages, seen["trained"], seen["after"]):
            np.testing.assert_allclose(v, to_np(e), rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(a, t, rtol=1e-6, atol=1e-7)
        assert any(not np.array_equal(v, t) for v, t in zip(seen["validated"], seen["trained"]))
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_mixed_float16_wraps_radius_optimizer_in_loss_scaling():
    # Keras puts a LossScaleOptimizer around RadiusOptimizer; radii are still
    # learned from the unscaled gradients and the bound holds.
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        model = small_cnn()
        keras_spft.wrap_pretrained(model, radius="learned")
        model.compile(optimizer=keras_spft.RadiusOptimizer(keras.optimizers.Adam(1e-2)),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        assert isinstance(model.optimizer.inner_optimizer, keras_spft.RadiusOptimizer)
        x, y = _data(16)
        checker = RadiusBoundChecker()
        model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[checker])
        assert checker.checks == 4
        assert max(keras_spft.learned_radii(model).values()) > 10 * MIN_LEARNED_RADIUS
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_the_inner_optimizer_is_saved_in_a_form_every_backend_loads():
    """Keras records PyTorch's own Adam (keras.src.backend.torch...): a model
    saved on PyTorch could not train on TensorFlow or JAX after loading."""
    opt = keras_spft.RadiusOptimizer(keras.optimizers.Adam(0.01))
    assert opt.get_config()["inner_optimizer"]["module"] == "keras.optimizers"
    torch_form = dict(opt.get_config())
    torch_form["inner_optimizer"] = dict(torch_form["inner_optimizer"],
                                         module="keras.src.backend.torch.optimizers.torch_adam")
    back = keras_spft.RadiusOptimizer.from_config(torch_form)
    assert type(back.inner_optimizer) is type(keras.optimizers.Adam())
    assert float(back.inner_optimizer.learning_rate) == pytest.approx(0.01)


@pytest.mark.parametrize("kind, dtype", [("scale", "float32"), ("exact", "float32"), ("frobenius", "float32"),
                                         ("exact", "float64")])
def test_rows_projected_onto_a_tiny_radius_count_as_on_the_bound(kind, dtype):
    """Storing W0 + offset rounds each element by up to half an ulp: with
    weights of size 3 and a radius of 1e-4, projected rows read up to 0.3%
    inside the ball, beyond the 0.1% band, and their gradient was dropped
    (the radius gradient changed sign in a review)."""
    if keras.backend.standardize_dtype(ops.convert_to_tensor(np.zeros(1, dtype)).dtype) != dtype:
        pytest.skip(f"{dtype} tensors are not {dtype} here (JAX without x64)")
    rng = np.random.default_rng(0)
    w0 = (3 * rng.normal(size=(5, 400))).astype(dtype)
    if kind == "frobenius":
        c = keras_spft.FrobeniusDistance(w0, 1e-4)
    else:
        c = keras_spft.MARSDistance(w0, 1e-4, axis=0, projection=kind)
    w = c.project(ops.convert_to_tensor(w0 + rng.normal(size=w0.shape).astype(dtype)))
    t = to_np(w).astype("float64") - w0
    g = rng.normal(size=w0.shape)
    if kind == "frobenius":
        ref = (g * t).sum() / 1e-4
    elif kind == "scale":
        ref = (g * t).sum() / 1e-4          # every row on its bound: sum_r <g_r, t_r / r>
    else:
        ref = sum((np.sign(t[:, r]) * g[:, r]).sum() / (t[:, r] != 0).sum() for r in range(400))
    got = float(to_np(c.radius_gradient(ops.convert_to_tensor(g.astype("float32")), w)))
    assert got == pytest.approx(ref, rel=1e-3)


@pytest.mark.parametrize("method", ["mars-pgm", "l2-pgm"])
def test_learned_radii_of_16_bit_kernels_start_where_the_kernel_can_move(method):
    """At a radius of 1e-4 a bfloat16 kernel cannot leave its anchor (the
    offset is below half an ulp of the weights and rounds away), so the radius
    gradient read from it is 0 and the radius never grew. The floor of a
    16-bit kernel is two bfloat16 epsilons times its anchor's largest row
    norm: its kernels move, within their radii."""
    from keras import layers as L

    keras.utils.set_random_seed(0)
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("bfloat16")
    try:
        base = keras.Sequential([keras.Input((8, 8, 2)), L.Conv2D(4, 3, name="c1"), L.ReLU(),
                                 L.Conv2D(4, 3, name="c2")], name="base")
        model = keras.Sequential([keras.Input((8, 8, 2)), base, L.Flatten(), L.Dense(4, name="head")])
        report = keras_spft.wrap_pretrained(model, radius="learned", method=method, head_radius=3.0)
        # SGD: Keras' Adam leaves bfloat16 variables where they are.
        model.compile(optimizer=keras_spft.RadiusOptimizer(keras.optimizers.SGD(0.1), radius_learning_rate=1e-2),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        rng = np.random.default_rng(0)
        x, y = rng.random((32, 8, 8, 2)).astype("float32"), np.arange(32) % 4
        learned = [w for w in report.wrapped if w.obj.learn_radius]
        for w in learned:
            a = np.abs(to_np(w.obj.anchor).astype("float64"))
            norm = np.sqrt((a ** 2).sum()) if method == "l2-pgm" else a.sum(axis=(0, 1, 2)).max()
            assert w.obj.min_radius == pytest.approx(max(1e-4, 2 * 2.0 ** -7 * norm), rel=1e-6)
            assert float(to_np(w.obj.radius)) == pytest.approx(w.obj.min_radius, rel=1e-6)
        model.fit(x, y, epochs=1, batch_size=8, verbose=0)
        for w in learned:
            kernel = model.get_layer("base").get_layer(w.path.split("/")[-1]).kernel
            t = to_np(kernel).astype("float64") - to_np(w.obj.anchor).astype("float64")
            r = float(to_np(w.obj.radius))
            assert np.abs(t).max() > 0, f"{w.path} never left its anchor"
            # Within the radius, up to half a bfloat16 ulp per stored element.
            half_ulp = np.abs(to_np(kernel).astype("float64")) * 2.0 ** -8
            if method == "l2-pgm":
                assert np.sqrt((t ** 2).sum()) <= r * (1 + 1e-5) + np.sqrt((half_ulp ** 2).sum())
            else:
                assert np.all(np.abs(t).sum(axis=(0, 1, 2)) <= r * (1 + 1e-5) + half_ulp.sum(axis=(0, 1, 2)))
            assert r >= w.obj.min_radius * (1 - 1e-6)
        # What the floor avoids: projected at 1e-4, the stored kernel is its anchor.
        c, kernel = learned[0].obj, model.get_layer("base").get_layer("c1").kernel
        c.radius.assign(1e-4)
        assert np.mean(to_np(c.project(kernel)) == to_np(c.anchor)) > 0.95
    finally:
        keras.config.set_dtype_policy(policy)


def test_a_schedule_sets_the_inner_optimizers_learning_rate():
    """keras' LearningRateScheduler writes `model.optimizer.learning_rate`:
    it must reach the inner optimizer (recipe.lr_schedule halves it)."""
    keras.utils.set_random_seed(0)
    model = small_cnn()
    keras_spft.wrap_pretrained(model, radius="learned", head_radius=3.0)
    inner = keras.optimizers.Adam(1e-3)
    model.compile(optimizer=keras_spft.RadiusOptimizer(inner),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data(8)
    halve = keras.callbacks.LearningRateScheduler(lambda epoch, lr: 1e-3 if epoch < 2 else 5e-4)
    model.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[halve])
    assert float(to_np(inner.learning_rate)) == pytest.approx(5e-4)
    assert float(to_np(model.optimizer.learning_rate)) == pytest.approx(5e-4)


def test_radius_optimizer_state_building_twice_frozen_radii_and_misuse():
    # Under mixed_float16 Keras' LossScaleOptimizer saved every anchor again
    # (TensorFlow, PyTorch: they are no optimizer state there); a second
    # build() doubled the state (and loading then skipped it); a radius not
    # stepped had its Adam moments decayed; an iterator of variables left the
    # weights alone; misuse gave raw errors.
    keras.utils.set_random_seed(0)
    model = small_cnn()
    keras_spft.wrap_pretrained(model, radius="learned", head_radius=3.0)
    anchors = {id(v.constraint.anchor) for v in model.trainable_variables
               if getattr(v.constraint, "anchor", None) is not None}
    opt = keras_spft.RadiusOptimizer(keras.optimizers.SGD(0.1))
    lso = keras.optimizers.LossScaleOptimizer(opt)
    lso.build(model.trainable_variables)
    held = {id(v) for v in lso.variables}
    assert (anchors <= held) if keras.backend.backend() == "jax" else not (anchors & held)
    count = len(opt.variables)
    opt.build(model.trainable_variables)
    assert len(opt.variables) == count

    grads = [keras.ops.ones(v.shape) for v in model.trainable_variables]
    for _ in range(2):
        opt.apply(grads, model.trainable_variables)
    m, v = to_np(opt._radius_m), to_np(opt._radius_v)
    frozen = opt._learned[0][0]   # the first learned radius's kernel: its layer frozen
    rest = [var for var in model.trainable_variables if var is not frozen]
    opt.apply([keras.ops.ones(w.shape) for w in rest], rest)
    assert to_np(opt._radius_m)[0] == m[0] and to_np(opt._radius_v)[0] == v[0]
    assert to_np(opt._radius_m)[1] != m[1]    # the others stepped

    before = to_np(rest[-1])
    opt.apply([keras.ops.ones(w.shape) for w in rest], iter(rest))
    assert not np.array_equal(to_np(rest[-1]), before), "an iterator of variables left the weights alone"

    other = keras.Variable(np.zeros((2, 2), "float32"))
    with pytest.raises(ValueError, match=r"it was built for other variables than .*layers frozen when it was built"):
        opt.apply([keras.ops.zeros((2, 2))], [other])
    with pytest.raises(ValueError, match=r"When passing `grads` without `variables`, the optimizer must already be built"):
        keras_spft.RadiusOptimizer(keras.optimizers.SGD(0.1)).apply(grads)
    model.trainable = False   # a frozen model's learned radii are still reported
    assert len(keras_spft.learned_radii(model)) == len(opt._learned)
