"""DELTA: loss against a hand computation, attention, frozen copy, saving."""

import os

import numpy as np
import keras
import pytest
from keras import layers as L

import keras_spft
from keras_spft import delta as D


def to_np(x):
    return np.asarray(keras.ops.convert_to_numpy(x), dtype="float64")


def pointwise_net(seed=0):
    """Base of two 1x1 convs (so feature maps are matrix products) + head."""
    rng = np.random.default_rng(seed)
    base = keras.Sequential([keras.Input((3, 3, 2)), L.Conv2D(3, 1, name="c1"),
                             L.Conv2D(2, 1, name="c2")], name="base")
    model = keras.Sequential([keras.Input((3, 3, 2)), base, L.GlobalAveragePooling2D(),
                              L.Dense(2, name="head")])
    for w in model.weights:
        w.assign(rng.normal(size=w.shape).astype("float32"))
    return model


def features_np(model, x):
    base = model.layers[0]
    k1, b1 = (to_np(w) for w in base.get_layer("c1").weights)
    k2, b2 = (to_np(w) for w in base.get_layer("c2").weights)
    f1 = x.astype("float64") @ k1[0, 0] + b1
    f2 = f1 @ k2[0, 0] + b2
    return [f1, f2]


def test_delta_loss_matches_hand_computation():
    model = pointwise_net()
    x = np.random.default_rng(1).normal(size=(4, 3, 3, 2)).astype("float32")
    dm = D.DeltaModel(model, feature_layers=["c1", "base/c2"], alpha=0.3, beta=0.2)
    assert dm.feature_layers == ["base/c1", "base/c2"]
    # Before any change the model and its frozen copy agree exactly.
    assert float(to_np(dm.delta_loss(x))) == pytest.approx(0.0, abs=1e-10)
    ref = features_np(model, x)
    w = [np.array([0.2, 0.5, 0.3]), np.array([0.9, 0.1])]
    dm.set_attention(w)
    rng = np.random.default_rng(2)
    for v in model.weights:  # fine-tuning moved every weight
        v.assign(to_np(v) + rng.normal(scale=0.1, size=v.shape))
    now = features_np(model, x)
    expected = 0.0
    for f, f0, wc in zip(now, ref, w):
        c, hw = f.shape[-1], f.shape[1] * f.shape[2]
        per_ex = 0.5 * (c / hw) * ((f - f0) ** 2).sum(axis=(1, 2)) @ wc
        expected += per_ex.mean()
    assert float(to_np(dm.delta_loss(x))) == pytest.approx(expected, rel=1e-4)
    # In training mode the forward pass adds alpha * term + beta/2 ||V||^2.
    dm(x, training=True)
    v = to_np(model.get_layer("head").kernel)
    total = sum(float(to_np(l)) for l in dm.losses)
    assert total == pytest.approx(0.3 * expected + 0.5 * 0.2 * (v ** 2).sum(), rel=1e-4)
    # ... and nothing in inference mode.
    dm(x, training=False)
    assert not dm.losses


def test_last_layer_variant_is_weighted_mean_squared_difference():
    model = pointwise_net()
    x = np.random.default_rng(1).normal(size=(4, 3, 3, 2)).astype("float32")
    dm = D.DeltaModel(model, alpha=1.0, beta=0.0, variant="last-layer")
    assert dm.feature_layers == ["base/c2"]
    f0 = features_np(model, x)[1]
    w = np.array([0.7, 0.2])
    dm.set_attention([w])
    k = model.layers[0].get_layer("c2").kernel
    k.assign(to_np(k) * 1.5)
    f = features_np(model, x)[1]
    assert float(to_np(dm.delta_loss(x))) == pytest.approx(((f - f0) ** 2 * w).mean(), rel=1e-4)


def test_attention_from_importance_by_hand():
    imp = np.array([1.0, 2.0, 3.0, 6.0])
    z = (imp - 3.0) / np.sqrt(((imp - 3.0) ** 2).mean())
    e = np.exp(z / 5)
    np.testing.assert_allclose(D.attention_from_importance(imp), e / e.sum(), rtol=1e-6)
    np.testing.assert_allclose(D.attention_from_importance(np.zeros(3)), np.full(3, 1 / 3), rtol=1e-6)
    np.testing.assert_allclose(D.attention_from_importance(imp, "last-layer"), 1 / (1 + np.exp(-imp)), rtol=1e-6)


def small_cnn():
    keras.utils.set_random_seed(3)
    base = keras.Sequential([keras.Input((6, 6, 3)), L.Conv2D(4, 3, padding="same", name="c1"),
                             L.BatchNormalization(name="bn"), L.ReLU(name="r1"),
                             L.Conv2D(5, 3, strides=2, name="c2"), L.ReLU(name="r2")], name="base")
    return keras.Sequential([keras.Input((6, 6, 3)), base, L.GlobalAveragePooling2D(),
                             L.Dense(3, name="head")])


def data(n=16):
    rng = np.random.default_rng(0)
    return rng.random((n, 6, 6, 3)).astype("float32"), np.arange(n) % 3


def test_attention_sums_to_one_per_layer_and_is_cached(tmp_path):
    model = small_cnn()
    x, y = data()
    before = [to_np(w) for w in model.weights]
    cache = str(tmp_path / "att.npz")
    att = D.compute_attention(model, x, y, feature_layers=["r1", "r2"], batch_size=8, steps=2,
                              head_epochs=1, cache=cache)
    assert [a.shape for a in att] == [(4,), (5,)]
    for a in att:
        assert a.sum() == pytest.approx(1.0, abs=1e-6)
        assert np.all(a > 0)
        assert not np.allclose(a, a[0])  # the ablation told the channels apart
    # The model itself was not touched (the head was trained on a copy).
    for b, w in zip(before, model.weights):
        np.testing.assert_array_equal(b, to_np(w))
    # The cache answers without computing: these inputs would fail.
    again = D.compute_attention(model, np.zeros((2, 1)), np.zeros(2), feature_layers=["r1", "r2"], cache=cache)
    for a, b in zip(att, again):
        np.testing.assert_array_equal(a, b)
    dm = keras_spft.add_delta(model, feature_layers=["r1", "r2"], cache=cache)
    for a, b in zip(att, dm.get_attention()):
        np.testing.assert_array_equal(a, b)


def test_a_truncated_attention_file_is_named_and_recomputed(tmp_path):
    model = small_cnn()
    x, y = data()
    cache = tmp_path / "att.npz"
    cache.write_bytes(b"PK\x03\x04 half a file")          # e.g. a process killed mid-write
    with pytest.raises(ValueError, match=r"cannot read the DELTA attention file .*att.npz.*remove it"):
        keras_spft.add_delta(model, feature_layers=["r1", "r2"], cache=str(cache))
    with pytest.warns(UserWarning, match="cannot read the DELTA attention file"):
        att = D.compute_attention(model, x, y, feature_layers=["r1", "r2"], batch_size=8, steps=1,
                                  head_epochs=1, cache=str(cache))
    assert [a.shape for a in D.load_attention(str(cache))[1]] == [a.shape for a in att]   # rewritten whole
    assert [p.name for p in tmp_path.iterdir()] == ["att.npz"]                            # no temporary left


def test_ablating_a_dead_channel_changes_nothing():
    # The head ignores channel 1 of the last map: its loss increase is 0,
    # so the sigmoid weight is exactly 1/2; the live channels differ.
    model = small_cnn()
    head = model.get_layer("head")
    k = to_np(head.kernel)
    k[1] = 0.0
    head.kernel.assign(k)
    x, y = data()
    (att,) = D.compute_attention(model, x, y, variant="last-layer", head_epochs=0,
                                 batch_size=8, steps=2)
    assert att.shape == (5,)
    assert att[1] == pytest.approx(0.5, abs=1e-6)
    assert np.all(np.abs(np.delete(att, 1) - 0.5) > 1e-6)


def test_frozen_copy_does_not_change_during_fit():
    model = small_cnn()
    x, y = data()
    dm = D.DeltaModel(model, feature_layers=["r1", "r2"], alpha=1.0)
    frozen = [to_np(w) for w in dm.frozen.weights]
    start = [to_np(w) for w in model.weights]
    assert not dm.frozen.trainable_weights
    assert {id(v) for v in dm.trainable_variables} == {id(v) for v in model.trainable_variables}
    dm.compile(optimizer=keras.optimizers.SGD(0.1),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    dm.fit(x, y, batch_size=8, epochs=2, verbose=0)
    for f, w in zip(frozen, dm.frozen.weights):  # BN moving statistics included
        np.testing.assert_array_equal(f, to_np(w))
    moved = [not np.allclose(s, to_np(w)) for s, w in zip(start, model.weights)]
    assert any(moved)
    assert float(to_np(dm.delta_loss(x))) > 0
    # the channel weights must come from the pre-trained backbone, not this one
    with pytest.raises(ValueError, match="backbone has moved from its pre-trained copy"):
        dm.compute_attention(x, y, steps=1, head_epochs=1)


def test_save_and_load(tmp_path):
    model = small_cnn()
    x, y = data()
    dm = D.DeltaModel(model, feature_layers=["r1", "r2"], alpha=1.0)
    dm.set_attention([np.linspace(0.1, 0.4, 4), np.linspace(0.1, 0.3, 5)])
    dm.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    dm.fit(x, y, batch_size=8, epochs=1, verbose=0)
    path = str(tmp_path / "delta.keras")
    dm.save(path)
    back = keras.models.load_model(path)
    assert isinstance(back, D.DeltaModel) and back.feature_layers == dm.feature_layers
    for a, b in zip(dm.get_attention(), back.get_attention()):
        np.testing.assert_allclose(a, b)
    for a, b in zip(dm.frozen.weights, back.frozen.weights):
        np.testing.assert_array_equal(to_np(a), to_np(b))
    np.testing.assert_allclose(back.predict(x, verbose=0), dm.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    assert float(to_np(back.delta_loss(x))) == pytest.approx(float(to_np(dm.delta_loss(x))), rel=1e-5)


def test_default_feature_layers_by_block_names():
    # ResNet naming: the last convolution of each stage (Li et al.: before
    # the block's BatchNorm, shortcut and ReLU), the deepest four stages.
    x = inp = keras.Input((16, 16, 3))
    for stage, blocks, stride in ((1, 1, 1), (2, 2, 2), (3, 2, 2), (4, 3, 1), (5, 2, 2)):
        for b in range(1, blocks + 1):
            x = L.Conv2D(2, 1, strides=stride if b == 1 else 1, name=f"conv{stage}_block{b}_1_conv")(x)
            x = L.Conv2D(2, 1, name=f"conv{stage}_block{b}_3_conv")(x)
            x = L.ReLU(name=f"conv{stage}_block{b}_out")(x)
    m = keras.Model(inp, x)
    assert D.default_feature_layers(m) == ["conv2_block2_3_conv", "conv3_block2_3_conv",
                                           "conv4_block3_3_conv", "conv5_block2_3_conv"]
    assert D.default_feature_layers(m, "last-layer") == ["conv5_block2_out"]
    # Unknown names: the last map, with a warning.
    with pytest.warns(UserWarning, match="feature_layers"):
        assert D.default_feature_layers(small_cnn()) == ["base/r2"]


def test_errors():
    model = small_cnn()
    with pytest.raises(ValueError, match="does not exist"):
        D.DeltaModel(model, feature_layers=["nope"])
    with pytest.raises(ValueError, match="variant"):
        D.DeltaModel(model, feature_layers=["r2"], variant="x")
    dm = D.DeltaModel(model, feature_layers=["r2"])
    with pytest.raises(ValueError, match="shape"):
        dm.set_attention([np.ones(3)])
    with pytest.raises(ValueError, match="add_delta"):
        keras_spft.wrap_pretrained(model, method="delta")


def test_unknown_spatial_sizes_are_an_error_not_one_map():
    # An EfficientNet-named base built without input_shape: every map is
    # (None, None) and its resolutions cannot be told apart.
    x = inp = keras.Input((None, None, 3))
    for b in ("2b", "3b", "5c"):
        x = L.Conv2D(2, 1, strides=2, name=f"block{b}_conv")(x)
        x = L.ReLU(name=f"block{b}_add")(x)
    with pytest.raises(ValueError, match="no known spatial size.*block2b_add.*input_shape.*feature_layers"):
        D.default_feature_layers(keras.Model(inp, x))


def test_head_given_as_one_name():
    model = small_cnn()
    dm = D.DeltaModel(model, feature_layers=["r2"], head="head")
    assert dm.head == ["head"]
    with pytest.raises(ValueError, match=r"head layer\(s\) \['nope'\] are not top-level layers"):
        D.DeltaModel(model, feature_layers=["r2"], head="nope")
    x, y = data(8)
    with pytest.raises(ValueError, match=r"head layer\(s\) \['h'\] are not top-level layers"):
        D.compute_attention(model, x, y, feature_layers=["r2"], head=["h"])
    att = D.compute_attention(model, x, y, feature_layers=["r2"], head="head")
    assert len(att) == 1 and np.isclose(att[0].sum(), 1.0)


def test_a_fresh_delta_model_loads_saved_weights(tmp_path):
    """KerasTuner's Hyperband and checkpoint resumption build a new
    DeltaModel and load_weights into it: it refused ("not yet been built")."""
    x, y = data()
    dm = D.DeltaModel(small_cnn(), feature_layers=["r1", "r2"], alpha=1.0)
    dm.set_attention([np.linspace(0.1, 0.4, 4), np.linspace(0.1, 0.3, 5)])
    dm.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    dm.fit(x, y, batch_size=8, epochs=1, verbose=0)
    dm.save_weights(str(tmp_path / "d.weights.h5"))
    fresh = D.DeltaModel(small_cnn(), feature_layers=["r1", "r2"], alpha=1.0)
    assert not fresh.attention_computed
    fresh.load_weights(str(tmp_path / "d.weights.h5"))
    assert fresh.attention_computed
    for a, b in zip(dm.get_attention(), fresh.get_attention()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(fresh.predict(x, verbose=0), dm.predict(x, verbose=0))
    # Uniform attention saved and loaded is still reported as uniform.
    uniform = D.DeltaModel(small_cnn(), feature_layers=["r1", "r2"])
    uniform.save(str(tmp_path / "u.keras"))
    assert not keras.models.load_model(str(tmp_path / "u.keras")).attention_computed


TORCH_DOTTED_NAME = """
import numpy as np, keras
from keras import layers as L
from keras_spft import delta as D
inputs = keras.Input((6, 6, 3))   # Functional, as keras.applications builds it
base = keras.Model(inputs, L.ReLU(name="r1")(L.Conv2D(4, 3, name="c1")(inputs)), name="mobilenet_0.25_64")
model = keras.Sequential([keras.Input((6, 6, 3)), base, L.GlobalAveragePooling2D(), L.Dense(3, name="head")])
dm = D.DeltaModel(model, feature_layers=["r1"])
dm.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
dm.fit(np.random.rand(8, 6, 6, 3), np.arange(8) % 3, epochs=1, verbose=0)
print("trained", keras.backend.backend())
"""


def test_delta_trains_on_pytorch_with_a_dotted_model_name():
    """build_model's MobileNets are named mobilenet_0.25_64: PyTorch refused
    the attention variables' names ('parameter name can't contain ".")."""
    import importlib.util
    import subprocess
    import sys
    if importlib.util.find_spec("torch") is None:
        pytest.skip("PyTorch is not installed")
    env = dict(os.environ, KERAS_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", TORCH_DOTTED_NAME], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "trained torch" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize("softmax", [False, True])
def test_attention_matches_a_brute_force_ablation(softmax):
    """Each channel of the feature map zeroed in turn, the mean increase of the
    cross-entropy, softmax(zscore / 5): recomputed in numpy from the weights,
    for a head giving logits and one ending in a softmax (read as probabilities)."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((5,))
    f = L.Dense(8, activation="relu", name="f")(inputs)
    out = L.Dense(3, activation="softmax" if softmax else None, name="head")(f)
    model = keras.Model(inputs, out)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 5)).astype("float32"), rng.integers(0, 3, 16)
    (att,) = D.compute_attention(model, x, y, feature_layers=["f"], head_epochs=0, batch_size=8, steps=None)
    w1, b1, w2, b2 = (to_np(v) for v in model.weights)

    def loss(feats, labels):
        z = feats @ w2 + b2
        z = z - z.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))   # log softmax, both cases
        return -logp[np.arange(len(labels)), labels].mean()

    importance = np.zeros(8)
    for s in (slice(0, 8), slice(8, 16)):
        feats = np.maximum(x[s] @ w1 + b1, 0)
        for c in range(8):
            ablated = feats.copy()
            ablated[:, c] = 0.0
            importance[c] += (loss(ablated, y[s]) - loss(feats, y[s])) / 2
    z = (importance - importance.mean()) / importance.std()
    expected = np.exp(z / 5) / np.exp(z / 5).sum()
    np.testing.assert_allclose(att, expected, rtol=1e-4)
    assert np.argmax(att) == np.argmax(importance)


def test_default_feature_maps_of_mobilenet_and_efficientnet_are_the_documented_ones():
    resnet = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(32, 32, 3))
    assert D.default_feature_layers(resnet) == ["conv2_block3_3_conv", "conv3_block4_3_conv",
                                                "conv4_block6_3_conv", "conv5_block3_3_conv"]
    mobilenet = keras.applications.MobileNet(alpha=0.25, weights=None, include_top=False, input_shape=(64, 64, 3))
    assert D.default_feature_layers(mobilenet) == ["conv_pw_3_relu", "conv_pw_5_relu", "conv_pw_11_relu",
                                                   "conv_pw_13_relu"]
    efficientnet = keras.applications.EfficientNetB0(weights=None, include_top=False, input_shape=(64, 64, 3))
    assert D.default_feature_layers(efficientnet) == ["block2b_add", "block3b_add", "block5c_add",
                                                      "block7a_project_bn"]
    # nested in a model with a head: paths through the base
    model = keras.Sequential([keras.Input((64, 64, 3)), mobilenet, L.GlobalAveragePooling2D(), L.Dense(2)])
    assert D.default_feature_layers(model)[0] == f"{mobilenet.name}/conv_pw_3_relu"


def test_labels_of_shape_n_by_1_are_sparse_not_one_hot():
    # (N, 1) labels (keras.datasets.cifar10) were read as one-hot: every label 0.
    model = small_cnn()
    x, y = data()
    att = []
    for labels in (y, y[:, None], np.eye(3)[y]):
        keras.utils.set_random_seed(0)
        att.append(D.compute_attention(model, x, labels, feature_layers=["r2"], batch_size=8, steps=2,
                                       head_epochs=1)[0])
    np.testing.assert_allclose(att[1], att[0], rtol=1e-5)
    np.testing.assert_allclose(att[2], att[0], rtol=1e-5)


def test_a_nested_head_gets_the_beta_penalty_and_a_head_without_kernels_warns():
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((6, 6, 3)), L.Conv2D(4, 3, name="c1"), L.ReLU(name="r1"),
                             L.GlobalAveragePooling2D()], name="base")
    top = keras.Sequential([L.Dense(5, name="fc"), L.Dense(3, name="out")], name="top")
    model = keras.Sequential([keras.Input((6, 6, 3)), base, top])
    x, _ = data(4)
    dm = D.DeltaModel(model, feature_layers=["r1"], alpha=0.0, beta=0.2, head=["top"])
    dm(x, training=True)
    expected = 0.1 * sum((to_np(top.get_layer(n).kernel) ** 2).sum() for n in ("fc", "out"))
    assert sum(float(to_np(l)) for l in dm.losses) == pytest.approx(expected, rel=1e-5)
    with pytest.warns(UserWarning, match=r"beta=0.2 has no head kernel to act on \(head: \[\]\)"):
        D.DeltaModel(model, feature_layers=["r1"], alpha=0.0, beta=0.2, head=[])
    # The default head follows wrap_pretrained's rules: a nested head model
    # cannot be told from a second base, so it must be named.
    with pytest.raises(ValueError, match=r"cannot tell the new head.*head=\['top'\]"):
        D.DeltaModel(model, feature_layers=["r1"], alpha=0.0, beta=0.2)


def test_the_default_head_is_wrap_pretraineds():
    """A flat base feeding a nested head: DELTA took every base layer with a
    kernel as its head (beta decays pre-trained kernels towards zero)."""
    inp = keras.Input((6, 6, 3))
    x = L.GlobalAveragePooling2D()(L.ReLU(name="r1")(L.Conv2D(4, 3, name="c1")(inp)))
    flat = keras.Model(inp, keras.Sequential([L.Dense(3, name="out")], name="top")(x))
    with pytest.raises(ValueError, match=r"nested model 'top' takes the output of layers with kernels \('c1'\)"):
        D.DeltaModel(flat, feature_layers=["r1"])
    assert D.DeltaModel(flat, feature_layers=["r1"], head=["top"]).head == ["top"]
    top = flat.get_layer("top")
    assert D.DeltaModel(flat, feature_layers=["r1"], head=top).head == ["top"]   # a layer, as for wrap_pretrained
    assert D.DeltaModel(flat, feature_layers=["r1"], head=[top]).head == ["top"]
    inp = keras.Input((6, 6, 3))
    base = keras.Model(inp, L.GlobalAveragePooling2D()(L.ReLU(name="r1")(L.Conv2D(4, 3, name="c1")(inp))), name="base")
    nested = keras.Sequential([keras.Input((6, 6, 3)), base, L.Dense(5, name="fc"), L.Dense(3, name="out")])
    assert D.DeltaModel(nested, feature_layers=["r1"]).head == ["fc", "out"]


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="a tf.function trace (TensorFlow backend)")
def test_the_li2019_term_on_maps_of_a_size_unknown_when_traced():
    # TensorFlow traced hw *= None for a model built on any image size.
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    inp = keras.Input((None, None, 3))
    f = L.Conv2D(2, 1, name="c1")(inp)
    model = keras.Model(inp, L.Dense(3, name="head")(L.GlobalAveragePooling2D()(f)))
    dm = D.DeltaModel(model, feature_layers=["c1"])
    model.get_layer("c1").kernel.assign(to_np(model.get_layer("c1").kernel) + 0.3)
    traced = tf.function(dm.delta_loss, input_signature=[tf.TensorSpec((None, None, None, 3))])
    for size in (4, 6):
        x = np.random.default_rng(size).random((2, size, size, 3)).astype("float32")
        assert float(traced(x)) == pytest.approx(float(to_np(dm.delta_loss(x))), rel=1e-6)


def test_compute_attention_reads_only_the_batches_it_uses_and_names_a_one_unit_output():
    model = small_cnn()
    x, y = data()
    read = []

    def batches():   # as long as ds.repeat() for what it reads (capped: old code read it all)
        for _ in range(50):
            read.append(1)
            yield x[:8], y[:8]

    D.compute_attention(model, batches(), feature_layers=["r2"], steps=2, head_epochs=0)
    assert len(read) == 2
    keras.utils.set_random_seed(0)
    binary = keras.Sequential([keras.Input((6, 6, 3)), L.Conv2D(2, 3, name="c1"), L.ReLU(name="r1"),
                               L.GlobalAveragePooling2D(), L.Dense(1, name="head")])
    with pytest.raises(ValueError, match=r"one output unit.*give the head 2 units"):
        D.compute_attention(binary, x, y % 2, feature_layers=["r1"])


def test_a_softmax_at_the_end_of_a_nested_head_is_read_as_probabilities():
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((6, 6, 3)), L.Conv2D(4, 3, name="c1"), L.ReLU(name="r1"),
                             L.GlobalAveragePooling2D()], name="base")
    top = keras.Sequential([L.Dense(5, name="fc"), L.Dense(3, activation="softmax", name="out")], name="top")
    model = keras.Sequential([keras.Input((6, 6, 3)), base, top])
    assert D._ends_in_softmax(model)
    x, y = data()
    kw = dict(feature_layers=["r1"], head=["top"], head_epochs=0, batch_size=8, steps=2)
    np.testing.assert_allclose(D.compute_attention(model, x, y, **kw),
                               D.compute_attention(model, x, y, from_logits=False, **kw), rtol=1e-6)


def _twin(data_format):
    keras.utils.set_random_seed(0)
    inp = keras.Input((3, 8, 10) if data_format == "channels_first" else (8, 10, 3))
    # r1: a layer without data_format of its own, after a convolution that has one
    f1 = L.ReLU(name="r1")(L.Conv2D(4, 3, name="f1", data_format=data_format)(inp))
    f2 = L.Conv2D(5, 3, activation="relu", name="f2", data_format=data_format)(f1)
    return keras.Model(inp, L.Dense(3, name="head")(L.GlobalAveragePooling2D(data_format=data_format)(f2)))


def test_channels_first_models_weigh_and_ablate_channels_not_columns():
    """DELTA read the last axis as channels: on a channels_first model it
    weighed and ablated width columns (its term was 2x off in a review)."""
    last, first = _twin("channels_last"), _twin("channels_first")
    for a, b in zip(last.weights, first.weights):   # kernels have one layout for both formats
        b.assign(a)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 8, 10, 3)).astype("float32"), np.arange(16) % 3
    x_first = x.transpose(0, 3, 1, 2)
    kwargs = dict(feature_layers=["r1", "f2"], head=["head"], head_epochs=0, batch_size=8)
    att_last = keras_spft.compute_attention(last, x, y, **kwargs)
    att_first = keras_spft.compute_attention(first, x_first, y, **kwargs)
    assert [a.shape for a in att_first] == [(4,), (5,)]
    for a, b in zip(att_last, att_first):
        np.testing.assert_allclose(b, a, atol=1e-6)
    dm_last = D.DeltaModel(last, feature_layers=["r1", "f2"], attention=att_last, head=["head"])
    dm_first = D.DeltaModel(first, feature_layers=["r1", "f2"], attention=att_first, head=["head"])
    for a, b in zip(last.trainable_weights, first.trainable_weights):
        moved = keras.ops.convert_to_numpy(a) + 0.1 * rng.normal(size=a.shape)
        a.assign(moved)
        b.assign(moved)
    omega = float(keras.ops.convert_to_numpy(dm_last.delta_loss(x)))
    assert omega > 0
    assert float(keras.ops.convert_to_numpy(dm_first.delta_loss(x_first))) == pytest.approx(omega, rel=1e-5)

    previous = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_first")   # how keras.applications builds channels_first
    try:
        mobilenet = keras.applications.MobileNet(alpha=0.25, weights=None, include_top=False, input_shape=(3, 64, 64))
    finally:
        keras.config.set_image_data_format(previous)
    assert D.default_feature_layers(mobilenet) == ["conv_pw_3_relu", "conv_pw_5_relu", "conv_pw_11_relu",
                                                   "conv_pw_13_relu"]


def test_bad_delta_options_are_named():
    model = keras.Sequential([keras.Input((8, 8, 3)), L.Conv2D(4, 3, name="f1"), L.GlobalAveragePooling2D(),
                              L.Dense(3, name="head")])
    x, y = np.zeros((8, 8, 8, 3), "float32"), np.arange(8) % 3
    for kwargs, match in ((dict(alpha="0.01"), r"DeltaModel: `alpha` must be a finite number >= 0, got '0.01'"),
                          (dict(beta=None), r"DeltaModel: `beta` must be a finite number >= 0, got None"),
                          (dict(feature_layers=[]), r"DeltaModel: `feature_layers` is empty")):
        with pytest.raises(ValueError, match=match):
            D.DeltaModel(model, head=["head"], **dict(dict(feature_layers=["f1"]), **kwargs))
    for kwargs, match in ((dict(steps=0), r"compute_attention: `steps` must be an integer of at least 1"),
                          (dict(batch_size=0), r"compute_attention: `batch_size` must be an integer of at least 1"),
                          (dict(feature_layers=[]), r"compute_attention: `feature_layers` is empty")):
        with pytest.raises(ValueError, match=match):
            keras_spft.compute_attention(model, x, y, head=["head"], **dict(dict(feature_layers=["f1"]), **kwargs))
    with pytest.raises(ValueError, match=r"add_delta: `y` is given without `x`"):
        keras_spft.add_delta(model, None, y, feature_layers=["f1"], head=["head"])


def test_the_channel_axis_is_not_read_through_layers_that_change_the_layout():
    """A review: after a channels_first convolution, a Permute back to
    channels-last (or a Reshape to tokens) made DELTA read the convolution's
    format through it, and a ReLU used in another channels_first graph first
    took that graph's format."""
    inp = keras.Input((3, 8, 10))
    x = L.Conv2D(4, 3, name="c1", data_format="channels_first")(inp)        # (B, 4, 6, 8)
    tap = L.ReLU(name="tap")(L.Permute((2, 3, 1))(x))                         # (B, 6, 8, 4): channels last
    m1 = keras.Model(inp, L.Dense(3, name="head")(L.GlobalAveragePooling2D()(tap)))
    assert D.DeltaModel(m1, feature_layers=["tap"], head=["head"])._channels == [4]

    shared = L.ReLU(name="shared_tap")
    other = keras.Input((3, 8, 10))
    shared(L.Conv2D(4, 3, data_format="channels_first")(other))                # a first use, channels_first
    inp2 = keras.Input((8, 10, 3))
    y = shared(L.Conv2D(4, 3, name="c2")(inp2))                                # (B, 6, 8, 4)
    m2 = keras.Model(inp2, L.Dense(3, name="head")(L.GlobalAveragePooling2D()(y)))
    assert D.DeltaModel(m2, feature_layers=["shared_tap"], head=["head"])._channels == [4]
