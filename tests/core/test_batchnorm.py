"""keras_spft.reestimate_batchnorm: moving statistics for the final weights."""

import numpy as np
import pytest
import keras

import keras_spft
from tests.core.helpers import to_np

L = keras.layers


def _model():
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((3,)), L.Dense(4, name="d"), L.BatchNormalization(name="bn")], name="base")
    return keras.Sequential([keras.Input((3,)), base, L.Dropout(0.5, name="drop"), L.Dense(2, name="out")])


def _expected(model, x, batch_size):
    """The batch-size-weighted average of each batch's mean and (biased)
    variance of the BatchNorm's input, from the model's current weights."""
    w, b = (to_np(v).astype("float64") for v in model.get_layer("base").get_layer("d").weights)
    h = x.astype("float64") @ w + b
    batches = [h[i:i + batch_size] for i in range(0, len(h), batch_size)]
    n = np.array([len(c) for c in batches], "float64")[:, None]
    mean = (n * np.stack([c.mean(0) for c in batches])).sum(0) / n.sum()
    var = (n * np.stack([c.var(0) for c in batches])).sum(0) / n.sum()
    return mean, var


def test_statistics_after_fit_are_the_average_for_the_final_weights():
    model = _model()
    keras_spft.wrap_pretrained(model, radius=0.5)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, size=(44, 3)).astype("float32")   # 5 batches of 8 and one of 4
    y = rng.normal(size=(44, 2)).astype("float32")
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    bn = model.get_layer("base").get_layer("bn")
    mean, var = _expected(model, x, 8)
    assert not np.allclose(to_np(bn.moving_mean), mean, rtol=1e-3)   # fit's moving averages trail
    weights = [to_np(v) for v in model.trainable_variables]
    others = [to_np(v) for v in model.non_trainable_variables if v is not bn.moving_mean and v is not bn.moving_variance]

    assert keras_spft.reestimate_batchnorm(model, x, batch_size=8) == ["base/bn"]
    np.testing.assert_allclose(to_np(bn.moving_mean), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_np(bn.moving_variance), var, rtol=1e-4)
    assert bn.momentum == 0.99
    for before, v in zip(weights, model.trainable_variables):
        np.testing.assert_array_equal(to_np(v), before)
    rest = [v for v in model.non_trainable_variables if v is not bn.moving_mean and v is not bn.moving_variance]
    assert rest   # the dropout's seed and the constraints' anchors: as they were
    for before, v in zip(others, rest):
        np.testing.assert_array_equal(to_np(v), before)

    # (x, y) arrays and steps: the first two batches only.
    keras_spft.reestimate_batchnorm(model, (x, y), batch_size=8, steps=2)
    mean, var = _expected(model, x[:16], 8)
    np.testing.assert_allclose(to_np(bn.moving_mean), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_np(bn.moving_variance), var, rtol=1e-4)


class _InferenceBN(L.Layer):
    """Calls its BatchNormalization in inference mode whatever the model's mode."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.bn = L.BatchNormalization(name="bn_in")

    def call(self, x):
        return self.bn(x, training=False)


def test_layers_in_inference_mode_keep_their_statistics_and_are_named():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    h = _InferenceBN(name="fixed")(L.Dense(4)(inputs))
    h = L.BatchNormalization(name="bn_top")(L.Dense(4)(h))
    model = keras.Model(inputs, L.Dense(2)(h))
    fixed = model.get_layer("fixed").bn
    x = np.random.default_rng(1).normal(size=(16, 3)).astype("float32")
    with pytest.warns(UserWarning, match=r"1 called with training=False .*'fixed/bn_in'"):
        assert keras_spft.reestimate_batchnorm(model, x, batch_size=8) == ["bn_top"]
    np.testing.assert_array_equal(to_np(fixed.moving_mean), np.zeros(4))
    assert not np.allclose(to_np(model.get_layer("bn_top").moving_mean), 0.0)

    model.get_layer("bn_top").trainable = False
    fixed.trainable = False
    with pytest.raises(ValueError, match=r"no trainable BatchNormalization layer to re-estimate: all 2 are frozen"):
        keras_spft.reestimate_batchnorm(model, x)
    model.get_layer("bn_top").trainable = True
    with pytest.warns(UserWarning, match=r"1 frozen \(trainable=False\): 'fixed/bn_in'"):
        assert keras_spft.reestimate_batchnorm(model, x, batch_size=8) == ["bn_top"]


def test_training_false_in_a_functional_graph_does_not_keep_batchnorm_in_inference_mode():
    """Keras 3 (all backends): `fit` and `model(x, training=True)` override a
    `base(x, training=False)` recorded in a functional model (keras-team/keras
    #20285), so the guide does not call it inference mode, and
    reestimate_batchnorm re-estimates such a base's statistics as fit moves them."""
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((3,)), L.Dense(4), L.BatchNormalization(name="bn_base")], name="base")
    inputs = keras.Input((3,))
    model = keras.Model(inputs, L.Dense(2)(base(inputs, training=False)))
    x = np.random.default_rng(1).normal(size=(16, 3)).astype("float32")
    assert keras_spft.reestimate_batchnorm(model, x, batch_size=8) == ["base/bn_base"]
    assert not np.allclose(to_np(base.get_layer("bn_base").moving_mean), 0.0)


def test_refusals_name_the_reason():
    plain = keras.Sequential([keras.Input((3,)), L.Dense(2)], name="plain")
    with pytest.raises(ValueError, match="'plain' has no trainable BatchNormalization layer to re-estimate: it has none"):
        keras_spft.reestimate_batchnorm(plain, np.zeros((4, 3), "float32"))
    renorm = keras.Sequential([keras.Input((3,)), L.BatchNormalization(renorm=True, name="rn")])
    with pytest.raises(ValueError, match="layer 'rn' uses batch renormalization"):
        keras_spft.reestimate_batchnorm(renorm, np.zeros((4, 3), "float32"))
    model = _model()
    bn = model.get_layer("base").get_layer("bn")
    with pytest.raises(ValueError, match="gave no batch"):
        keras_spft.reestimate_batchnorm(model, np.zeros((0, 3), "float32"))
    assert bn.momentum == 0.99
    x = np.random.default_rng(0).normal(size=(9, 3)).astype("float32")
    for kwargs, match in ((dict(batch_size=0), "`batch_size` must be an integer of at least 1, got 0"),
                          (dict(batch_size=2.5), "`batch_size` must be an integer of at least 1, got 2.5"),
                          (dict(batch_size=True), "`batch_size` must be an integer"),
                          (dict(steps=0), "`steps` must be an integer of at least 1, got 0"),
                          (dict(steps=1.5), "`steps` must be an integer")):
        with pytest.raises(ValueError, match="reestimate_batchnorm: " + match):
            keras_spft.reestimate_batchnorm(model, x, **kwargs)
    # A batch of one example gives a Dense layer's BatchNorm a variance of 0
    # (PyTorch refuses it too): the last batch of 9 by 4, or batches of 1.
    before = [to_np(bn.moving_mean), to_np(bn.moving_variance)]
    for kwargs in (dict(batch_size=4), dict(batch_size=1)):
        with pytest.raises(ValueError, match=r"BatchNormalization 'base/bn' got a batch of one value per channel "
                                             r"\(input shape \(1, 4\)\), whose variance is 0"):
            keras_spft.reestimate_batchnorm(model, x, **kwargs)
        for b, v in zip(before, (bn.moving_mean, bn.moving_variance)):
            np.testing.assert_array_equal(to_np(v), b)
    assert keras_spft.reestimate_batchnorm(model, x, batch_size=4, steps=2) == ["base/bn"]   # stops before it
    assert keras_spft.reestimate_batchnorm(model, x, batch_size=None) == ["base/bn"]      # as fit: 32


def test_statistics_that_fit_left_as_nan_are_replaced():
    """Momentum 0 alone kept them: 0 * NaN is NaN (a float16 overflow in
    mixed precision writes NaN into the statistics while the loss scale
    skips the weight update)."""
    model = _model()
    bn = model.get_layer("base").get_layer("bn")
    x = np.random.default_rng(0).normal(size=(16, 3)).astype("float32")
    bn.moving_mean.assign(np.array([np.nan, 0.0, np.inf, 1.0], "float32"))
    bn.moving_variance.assign(np.array([1.0, np.nan, 1.0, -np.inf], "float32"))
    keras_spft.reestimate_batchnorm(model, x, batch_size=8)
    mean, var = _expected(model, x, 8)
    np.testing.assert_allclose(to_np(bn.moving_mean), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_np(bn.moving_variance), var, rtol=1e-4)


class _BNWithoutMask(L.BatchNormalization):
    def call(self, inputs, training=None):
        return super().call(inputs, training=training)


def test_a_shared_layer_averages_every_call_and_subclasses_keep_their_signature():
    """One BatchNorm on two paths is called twice a batch: the momentum was
    set once a batch, so the first path's statistics were overwritten (a
    review); a subclass whose call takes no mask failed."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    bn = L.BatchNormalization(name="shared")
    d1, d2 = L.Dense(4, name="d1"), L.Dense(4, name="d2")
    model = keras.Model(inputs, L.Add()([bn(d1(inputs)), bn(d2(inputs))]))
    x = np.random.default_rng(0).normal(size=(16, 3)).astype("float32")
    keras_spft.reestimate_batchnorm(model, x, batch_size=8)
    means, variances = [], []
    for dense in (d1, d2):
        w, b = (to_np(v).astype("float64") for v in dense.weights)
        for part in (x[:8], x[8:]):
            h = part @ w + b
            means.append(h.mean(0))
            variances.append(h.var(0))
    np.testing.assert_allclose(to_np(bn.moving_mean), np.mean(means, 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_np(bn.moving_variance), np.mean(variances, 0), rtol=1e-4)

    sub = keras.Sequential([keras.Input((3,)), L.Dense(4, name="d"), _BNWithoutMask(name="bn")])
    assert keras_spft.reestimate_batchnorm(sub, x, batch_size=8) == ["bn"]
    h = x.astype("float64") @ to_np(sub.get_layer("d").kernel) + to_np(sub.get_layer("d").bias)
    np.testing.assert_allclose(to_np(sub.get_layer("bn").moving_mean), h.mean(0), rtol=1e-5, atol=1e-6)
    assert "call" not in sub.get_layer("bn").__dict__

    a, b = keras.Input((3,)), keras.Input((3,))
    two = keras.Model([a, b], L.BatchNormalization()(L.Concatenate()([a, b])), name="two")
    with pytest.raises(ValueError, match=r"'two' takes 2 inputs: give them as a list or dict"):
        keras_spft.reestimate_batchnorm(two, (x, x))
    assert keras_spft.reestimate_batchnorm(two, [x, x], batch_size=8)


class _CallsItsBatchNormDirectly(L.Layer):
    """Calls its BatchNorm's `call` itself: `training` keeps its default,
    None, which is inference mode, whatever the model's mode."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.bn = L.BatchNormalization(name="bn_direct")

    def build(self, input_shape):
        self.bn.build(input_shape)

    def call(self, x):
        return self.bn.call(x)


def test_a_batchnorm_whose_call_gets_no_training_flag_is_named_not_listed():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    h = _CallsItsBatchNormDirectly(name="direct")(L.Dense(4)(inputs))
    model = keras.Model(inputs, L.Dense(2)(L.BatchNormalization(name="bn_top")(L.Dense(4)(h))))
    x = np.random.default_rng(2).normal(size=(16, 3)).astype("float32")
    with pytest.warns(UserWarning, match=r"1 called with training=False by a layer: 'direct/bn_direct'"):
        assert keras_spft.reestimate_batchnorm(model, x, batch_size=8) == ["bn_top"]
    np.testing.assert_array_equal(to_np(model.get_layer("direct").bn.moving_mean), np.zeros(4))
