"""Theorem 2/3 bound terms against a hand computation; PNG plots."""

import math

import numpy as np
import keras
import pytest
from keras import layers as L

import keras_spft
from keras_spft import bounds, plots


def two_layer_net(method="mars-pgm", radius=5.0):
    """x -> W1 -> relu -> W2 -> relu -> V, no biases, hand-picked weights."""
    model = keras.Sequential([keras.Input((2,)),
                              L.Dense(2, use_bias=False, activation="relu", name="w1"),
                              L.Dense(2, use_bias=False, activation="relu", name="w2"),
                              L.Dense(2, use_bias=False, name="v")])
    model.get_layer("w1").kernel.assign(np.array([[1.0, 0.0], [0.0, 1.0]]))    # W0_1
    model.get_layer("w2").kernel.assign(np.array([[2.0, 0.0], [1.0, 1.0]]))    # W0_2
    keras_spft.wrap_pretrained(model, radius=radius, method=method, head=["v"])
    model.get_layer("w1").kernel.assign(np.array([[1.0, 0.5], [0.0, 1.0]]))    # fine-tuned W1
    model.get_layer("v").kernel.assign(np.array([[1.0, 2.0], [3.0, -1.0]]))
    return model


def test_theorem2_by_hand():
    # Dense rows are output units = kernel columns.
    # W1 - W0_1 = [[0, .5], [0, 0]]: column L1 norms 0, .5 -> D1 = 0.5
    # ||W1||_inf = max(1, 1.5) = 1.5, ||W0_1||_inf = 1 -> B1 = 1.5
    # W2 = W0_2: D2 = 0, B2 = max(2 + 1, 0 + 1) = 3
    # ||V||_inf = max(1 + 3, 2 + 1) = 4
    # bound = 2 sqrt(log(2d)) c rho C B_V (D1/B1 + D2/B2) (2 B1)(2 B2) / sqrt(m)
    t = bounds.theorem2_bound(two_layer_net(), num_examples=100, num_classes=2, input_dim=2,
                              input_bound=1.0, lipschitz=1.0)
    expected = 2 * math.sqrt(math.log(4)) * 2 * 1 * 1 * 4 * (0.5 / 1.5 + 0) * (3 * 6) / 10
    assert t.value == pytest.approx(expected, rel=1e-6)
    assert [(l.path, l.bound, l.distance) for l in t.layers] == [("w1", 1.5, 0.5), ("w2", 3.0, 0.0)]
    assert t.head_bound == 4.0 and t.distance_sum == pytest.approx(1 / 3)
    # the proof carried to the input adds the distance-free term (sum -> 1 + sum)
    assert t.value_with_input_term == pytest.approx(expected * (1 + 1 / 3) / (1 / 3), rel=1e-6)
    # For every weight the radius (5) allows: D = (5, 5) and, by the triangle
    # inequality, B_j = ||W0_j|| + D_j = (1 + 5, 3 + 5); the free head: its norm.
    r = bounds.theorem2_bound(two_layer_net(), num_examples=100, num_classes=2, input_dim=2,
                              input_bound=1.0, distances="radius")
    assert [(l.bound, l.distance) for l in r.layers] == [(6.0, 5.0), (8.0, 5.0)]
    assert r.value == pytest.approx(2 * math.sqrt(math.log(4)) * 2 * 4 * (5 / 6 + 5 / 8) * 12 * 16 / 10, rel=1e-6)
    # A head bounded around the origin: its radius is B_V, whatever V is now.
    model = two_layer_net()
    keras_spft.wrap_pretrained(model, radius=5.0, head=["v"], head_radius=2.0)
    r2 = bounds.theorem2_bound(model, num_examples=100, num_classes=2, input_dim=2,
                               input_bound=1.0, distances="radius")
    assert r2.head_bound == 2.0 and r2.value == pytest.approx(r.value / 2, rel=1e-6)
    # Data constants enter as stated: linear in c, rho, C_inf; 1/sqrt(m).
    t2 = bounds.theorem2_bound(two_layer_net(), num_examples=400, num_classes=4, input_dim=2,
                               input_bound=3.0, lipschitz=0.5)
    assert t2.value == pytest.approx(expected * 2 * 3 * 0.5 / 2, rel=1e-6)


def test_theorem3_by_hand():
    # ||W1 - W0_1||_F = 0.5; ||W1||_F = sqrt(1 + .25 + 1) = 1.5 >= ||W0_1||_F = sqrt 2
    # W2: D2 = 0, B2 = sqrt(4 + 1 + 1) = sqrt 6; ||V||_F = sqrt(1 + 4 + 9 + 1) = sqrt 15
    # bound = sqrt(2c) rho C_2 B_V (sum D/B) prod(2B) / sqrt(m)
    t = bounds.theorem3_bound(two_layer_net("l2-pgm", 5.0), num_examples=100, num_classes=2,
                              input_bound=2.0)
    expected = math.sqrt(4) * 1 * 2.0 * math.sqrt(15) * (0.5 / 1.5) * (3 * 2 * math.sqrt(6)) / 10
    assert t.value == pytest.approx(expected, rel=1e-6)
    assert t.log_value == pytest.approx(math.log(expected), rel=1e-9)
    with pytest.raises(ValueError, match="FrobeniusDistance"):
        bounds.theorem3_bound(two_layer_net("mars-pgm"), num_examples=1, num_classes=2,
                              input_bound=1.0, distances="radius")


def test_conv_frobenius_counts_output_positions():
    model = keras.Sequential([keras.Input((4, 4, 1)), L.Conv2D(1, 3, use_bias=False, name="c"),
                              L.Flatten(), L.Dense(2, use_bias=False, name="v")])
    k = np.zeros((3, 3, 1, 1), "float32")
    k[1, 1] = 1.0
    model.get_layer("c").kernel.assign(k)
    keras_spft.wrap_pretrained(model, radius=1.0, method="l2-pgm", head=["v"])
    model.get_layer("c").kernel.assign(k * 2)
    # valid 3x3 conv on 4x4: 4 output positions -> ||map||_F = 2 ||K||_F
    t = bounds.theorem3_bound(model, num_examples=1, num_classes=2, input_bound=1.0)
    assert (t.layers[0].bound, t.layers[0].distance) == pytest.approx((4.0, 2.0))
    t1 = bounds.theorem3_bound(model, num_examples=1, num_classes=2, input_bound=1.0, conv_positions=False)
    assert (t1.layers[0].bound, t1.layers[0].distance) == pytest.approx((2.0, 1.0))


def test_conv_frobenius_refuses_unknown_output_sizes():
    """With unknown spatial sizes P cannot be counted; taking P = 1 would give
    a "bound" far below the real one for any input larger than the kernel."""
    model = keras.Sequential([keras.Input((None, None, 1)), L.Conv2D(2, 3, use_bias=False, name="c"),
                              L.GlobalAveragePooling2D(), L.Dense(2, use_bias=False, name="v")])
    keras_spft.wrap_pretrained(model, radius=1.0, method="l2-pgm", head=["v"])
    with pytest.raises(ValueError, match=r"positions of convolution .c.*unknown sizes.*fixed input size"):
        bounds.theorem3_bound(model, num_examples=1, num_classes=2, input_bound=1.0)
    t = bounds.theorem3_bound(model, num_examples=1, num_classes=2, input_bound=1.0, conv_positions=False)
    assert t.layers[0].bound > 0


def fake_history(scale, n_layers=12, radius=None):
    rng = np.random.default_rng(int(scale * 10))
    h = {"loss": [1.0, 0.5], "spft/mars_max": [0.0, 0.0]}
    for i in range(n_layers):
        d = rng.gamma(2.0, scale)
        if radius is not None:
            d = min(d, radius)
        h[f"spft/base/conv{i}/mars"] = [d / 2, d]
        h[f"spft/base/conv{i}/frobenius"] = [d / 4, d / 2]
    h["spft/head/head/mars"] = [100.0, 100.0]  # heads are not in Figure 2
    h["grad/global"] = [3.0 / scale, 2.0 / scale]
    return h


def test_layer_distances_reads_backbone_layers_only():
    d = plots.layer_distances(fake_history(1.0))
    assert len(d) == 12 and "head/head" not in d and "mars_max" not in d
    assert len(plots.layer_distances(fake_history(1.0), head=True)) == 13
    assert plots.layer_distances(fake_history(1.0), epoch=0)["base/conv0"] == fake_history(1.0)["spft/base/conv0/mars"][0]


def test_plots_write_readable_pngs(tmp_path):
    import matplotlib.image

    results = {"none": fake_history(2.0), "mars-pgm": fake_history(1.0, radius=1.5),
               "delta": fake_history(3.0)}
    p = plots.plot_distance_histograms(results, str(tmp_path / "dist.png"), radius={"mars-pgm": 1.5})
    img = matplotlib.image.imread(p)
    assert img.shape[0] > 300 and img.shape[1] > 500
    g = plots.plot_gradient_norms(results, str(tmp_path / "grad.png"))
    assert matplotlib.image.imread(g).shape[1] > 500
    with pytest.raises(ValueError, match="DistanceMonitor"):
        plots.plot_distance_histograms({"none": {"loss": [1.0]}}, str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="GradientNormMonitor"):
        plots.plot_gradient_norms({"none": {"loss": [1.0]}}, str(tmp_path / "x.png"))


def test_frozen_layers_stay_in_the_product_with_zero_distance():
    model = two_layer_net()
    t = bounds.theorem2_bound(model, num_examples=100, num_classes=2, input_dim=2, input_bound=1.0)
    model.get_layer("w1").trainable = False
    f = bounds.theorem2_bound(model, num_examples=100, num_classes=2, input_dim=2, input_bound=1.0)
    # w1 still multiplies the bound by 2 B_1 = 3, but its distance no longer counts
    assert [(l.path, l.bound, l.distance) for l in f.layers] == [("w1", 1.5, 0.0), ("w2", 3.0, 0.0)]
    assert f.value == 0.0 and t.value > 0
    model.get_layer("w1").trainable = True
    model.get_layer("w2").trainable = False
    g = bounds.theorem2_bound(model, num_examples=100, num_classes=2, input_dim=2, input_bound=1.0)
    assert g.value == pytest.approx(t.value, rel=1e-12)   # w2 had D = 0 already
    with pytest.raises(ValueError, match="unknown distances='radii'"):
        bounds.theorem2_bound(model, num_examples=100, num_classes=2, input_dim=2, input_bound=1.0,
                              distances="radii")


def test_the_at_bound_aggregate_is_not_a_layer():
    h = {"loss": [1.0], "spft/at_bound": [0.8], "spft/head_at_bound": [0.3], "spft/base/c1/at_bound": [1.0],
         "spft/base/c2/at_bound": [0.5]}
    assert plots.layer_distances(h, metric="at_bound") == {"base/c1": 1.0, "base/c2": 0.5}
    assert plots.layer_distances(h, metric="at_bound", head=True) == {"base/c1": 1.0, "base/c2": 0.5}
    # A History of DistanceMonitor(per_layer=False) has the aggregates only: said, not {}.
    with pytest.raises(ValueError, match=r"per_layer=False\) a History holds the aggregates only: pass the monitor itself"):
        plots.layer_distances({"spft/mars_max": [0.2], "spft/at_bound": [0.1], "spft/head_at_bound": [1.0]})
    # A penalty run has distances but no at_bound: nothing to show, no error.
    assert plots.layer_distances({"spft/base/c1/mars": [0.2]}, metric="at_bound") == {}


def test_gradient_norms_logged_every_other_epoch_need_the_monitor(tmp_path):
    h = {"loss": [1.0, 0.9, 0.8, 0.7], "grad/global": [2.0, 1.0]}   # GradientNormMonitor(every=2)
    with pytest.raises(ValueError, match="'grad/global' was logged on 2 of 4 epochs"):
        plots.plot_gradient_norms({"mars-pgm": h}, str(tmp_path / "g.png"))


def test_conv_positions_follow_the_layers_data_format():
    """A channels_first conv counted its channels as output positions (the
    global image_data_format was read, not the layer's)."""
    rng = np.random.default_rng(0)
    k, v = rng.normal(size=(3, 3, 3, 2)).astype("float32"), rng.normal(size=(72, 2)).astype("float32")
    results = []
    for fmt, shape in (("channels_last", (8, 8, 3)), ("channels_first", (3, 8, 8))):
        model = keras.Sequential([keras.Input(shape), L.Conv2D(2, 3, use_bias=False, data_format=fmt, name="c"),
                                  L.Flatten(), L.Dense(2, use_bias=False, name="v")])
        model.get_layer("c").kernel.assign(k)
        model.get_layer("v").kernel.assign(v)
        keras_spft.wrap_pretrained(model, radius=0.5, method="l2-pgm", head=["v"], head_radius=1.0)
        t = bounds.theorem3_bound(model, num_examples=100, num_classes=2, input_bound=1.0, distances="radius")
        results.append(t.layers[0].bound)
    # 6 x 6 output positions in both layouts: ||map||_F = 6 ||K||_F, and with
    # the radius the bound covers B = 6 (||K0||_F + 0.5)
    assert results == pytest.approx([6 * (float(np.sqrt((k ** 2).sum())) + 0.5)] * 2, rel=1e-6)


def test_a_transposed_conv_counts_its_input_positions():
    """A transposed conv is the adjoint of a conv over its inputs:
    ||map||_F = sqrt(input positions) ||K||_F for valid padding, checked
    against the explicit matrix of the map."""
    rng = np.random.default_rng(1)
    model = keras.Sequential([keras.Input((4, 4, 1)), L.Conv2DTranspose(1, 3, use_bias=False, name="t"),
                              L.Flatten(), L.Dense(2, use_bias=False, name="v")])
    k = rng.normal(size=(3, 3, 1, 1)).astype("float32")
    model.get_layer("t").kernel.assign(k)
    keras_spft.wrap_pretrained(model, radius=1.0, method="l2-pgm", head=["v"])
    sub = keras.Sequential([keras.Input((4, 4, 1)), model.get_layer("t")])
    basis = np.eye(16, dtype="float32").reshape(16, 4, 4, 1)
    matrix = np.asarray(sub.predict(basis, verbose=0)).reshape(16, -1)   # row i: the map of basis vector i
    t = bounds.theorem3_bound(model, num_examples=1, num_classes=2, input_bound=1.0)
    assert t.layers[0].bound == pytest.approx(float(np.sqrt((matrix ** 2).sum())), rel=1e-5)
    assert t.layers[0].bound == pytest.approx(4 * float(np.sqrt((k ** 2).sum())), rel=1e-5)


def test_a_dense_applied_at_several_positions_counts_them():
    """A Dense on a (5, 4) sequence is kron(I_5, W): its Frobenius norm is
    sqrt(5) ||W||_F (B_j and D_j were sqrt(5) too small); its MARS norm is W's."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5, 4)), L.Dense(6, use_bias=False, name="d1"), L.Flatten(),
                              L.Dense(3, use_bias=False, name="v")])
    w0 = model.get_layer("d1").kernel.numpy().astype("float64")
    keras_spft.wrap_pretrained(model, radius=1.0, method="l2-pgm", head=["v"])
    model.get_layer("d1").kernel.assign(w0 + 0.1)
    linear_map = np.kron(np.eye(5), model.get_layer("d1").kernel.numpy().astype("float64"))
    t3 = bounds.theorem3_bound(model, num_examples=10, num_classes=3, input_bound=1.0)
    assert t3.layers[0].bound == pytest.approx(np.linalg.norm(linear_map), rel=1e-6)
    assert t3.layers[0].distance == pytest.approx(math.sqrt(5) * np.linalg.norm(np.full((4, 6), 0.1)), rel=1e-5)
    t2 = bounds.theorem2_bound(model, num_examples=10, num_classes=3, input_dim=20, input_bound=1.0,
                               head_bound=1.0)
    assert t2.layers[0].distance == pytest.approx(0.4, rel=1e-5)   # column L1 of 0.1 * ones(4, 6)


def test_a_second_head_layer_stays_in_the_chain_when_v_is_named():
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((4,)), L.Dense(4, use_bias=False, name="d1")], name="base")
    model = keras.Sequential([keras.Input((4,)), base, L.Dense(4, use_bias=False, name="fc"),
                              L.Dense(3, use_bias=False, name="out")])
    keras_spft.wrap_pretrained(model, radius=1.0, head_radius=2.0)   # fc and out: heads around 0
    with pytest.raises(ValueError, match=r"exactly one head kernel V, found 2 \(\['fc', 'out'\]\); name V"):
        bounds.theorem2_bound(model, num_examples=10, num_classes=3, input_dim=4, input_bound=1.0)
    with pytest.raises(ValueError, match=r"found 2"):   # head_bound alone dropped fc from the chain
        bounds.theorem2_bound(model, num_examples=10, num_classes=3, input_dim=4, input_bound=1.0,
                              head_bound=1.0)
    t = bounds.theorem2_bound(model, num_examples=10, num_classes=3, input_dim=4, input_bound=1.0,
                              head=["out"])
    fc = np.abs(model.get_layer("fc").kernel.numpy()).sum(axis=0).max()
    assert [l.path for l in t.layers] == ["base/d1", "fc"]
    assert t.layers[1].distance == pytest.approx(fc, rel=1e-6)   # its distance to 0
    assert t.head_bound == pytest.approx(np.abs(model.get_layer("out").kernel.numpy()).sum(axis=0).max(), rel=1e-6)
    r = bounds.theorem2_bound(model, num_examples=10, num_classes=3, input_dim=4, input_bound=1.0,
                              head=["out"], distances="radius")
    assert r.layers[1].distance == 2.0 and r.layers[1].bound == 2.0 and r.head_bound == 2.0


def test_layer_and_head_bound_overrides_enter_the_value():
    model = two_layer_net()
    t = bounds.theorem2_bound(model, num_examples=4, num_classes=2, input_dim=2, input_bound=1.0)
    o = bounds.theorem2_bound(model, num_examples=4, num_classes=2, input_dim=2, input_bound=1.0,
                              layer_bounds={"w1": 3.0}, head_bound=2.0)
    b1, b2 = t.layers[0].bound, t.layers[1].bound
    d1, d2 = t.layers[0].distance, t.layers[1].distance
    assert o.layers[0].bound == 3.0 and o.head_bound == 2.0
    expected = t.constant * 2.0 * (d1 / 3.0 + d2 / b2) * (2 * 3.0) * (2 * b2)
    assert o.value == pytest.approx(expected, rel=1e-9)


def test_layer_distances_takes_every_layer_at_the_same_epoch():
    h = {"spft/x/mars": [1.0, float("nan"), 3.0], "spft/y/mars": [4.0, 5.0, 6.0]}
    assert plots.layer_distances(h, epoch=1) == {"y": 5.0}   # x was not logged at epoch 1
    assert plots.layer_distances(h) == {"x": 3.0, "y": 6.0}


def test_a_diverged_run_is_named_not_drawn(tmp_path):
    h = {"spft/base/c1/mars": [float("inf")], "spft/base/c2/mars": [0.5]}
    with pytest.raises(ValueError, match=r"'mars-pgm': non-finite mars distances of base/c1: the run diverged"):
        plots.plot_distance_histograms({"mars-pgm": h}, str(tmp_path / "d.png"))


def test_positions_of_layers_without_a_graph_and_of_an_einsum_summing_a_position():
    """A subclassed model's Dense has no symbolic output (theorem3_bound
    raised); an EinsumDense summing over a sequence axis repeats its kernel
    once per position (counted as 1: a bound sqrt(T) too small)."""
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.d1 = L.Dense(6, use_bias=False, name="d1")
            self.v = L.Dense(3, use_bias=False, name="v")

        def call(self, x):
            return self.v(self.d1(x))

    keras.utils.set_random_seed(0)
    net = Net()
    net(np.zeros((2, 5, 4), "float32"))   # d1 on a (5, 4) sequence: 5 positions
    keras_spft.wrap_pretrained(net, radius=1.0, method="l2-pgm", head=["v"])
    t = bounds.theorem3_bound(net, num_examples=4, num_classes=3, input_bound=1.0, distances="radius")
    w = net.d1.kernel.numpy().astype("float64")
    assert t.layers[0].bound == pytest.approx(math.sqrt(5) * (np.linalg.norm(w) + 1.0), rel=1e-6)

    inputs = keras.Input((3, 4))
    summed = L.EinsumDense("abc,cd->ad", output_shape=(5,), name="e")(inputs)
    model = keras.Model(inputs, L.Dense(2, use_bias=False, name="v")(summed))
    keras_spft.wrap_pretrained(model, radius=1.0, method="l2-pgm", head=["v"])
    k = model.get_layer("e").kernel.numpy().astype("float64")
    linear_map = np.concatenate([k] * 3, axis=0)     # x (3*4) -> sum_b x_b K
    t = bounds.theorem3_bound(model, num_examples=4, num_classes=2, input_bound=1.0)
    assert t.layers[0].bound == pytest.approx(np.linalg.norm(linear_map), rel=1e-6)


def test_mars_norm_of_an_einsum_summing_positions_is_that_of_its_linear_map():
    # Theorem 2 took the kernel's row L1 norm: T = 3 times too small for an
    # EinsumDense summing its kernel over 3 input positions.
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3, 4))
    summed = L.EinsumDense("abc,cd->ad", output_shape=(5,), name="e")(inputs)
    model = keras.Model(inputs, L.Dense(2, use_bias=False, name="v")(summed))
    w0 = model.get_layer("e").kernel.numpy().astype("float64")
    keras_spft.wrap_pretrained(model, radius=0.5, head=["v"])
    model.get_layer("e").kernel.assign(w0 + 0.01)
    linear_map = lambda k: np.concatenate([k] * 3, axis=0)   # noqa: E731  x (3*4) -> sum_b x_b K
    mars = lambda m: np.abs(m).sum(axis=0).max()             # noqa: E731  largest row (output unit) L1
    t = bounds.theorem2_bound(model, num_examples=4, num_classes=2, input_dim=12, input_bound=1.0)
    w = model.get_layer("e").kernel.numpy().astype("float64")
    assert t.layers[0].distance == pytest.approx(mars(linear_map(w - w0)), rel=1e-6)
    assert t.layers[0].bound == pytest.approx(max(mars(linear_map(w)), mars(linear_map(w0))), rel=1e-6)
    r = bounds.theorem2_bound(model, num_examples=4, num_classes=2, input_dim=12, input_bound=1.0,
                              distances="radius")
    assert r.layers[0].distance == pytest.approx(3 * 0.5)


def test_a_layer_the_bound_cannot_read_and_an_unknown_layer_bound_are_errors():
    # A LoRA layer was left out of the chain (its factor 2 B_j missing: a bound
    # too small); a misspelt layer_bounds name was ignored.
    model = keras.Sequential([keras.Input((4,)), L.Dense(8, name="c1"), L.Dense(8, name="c2"), L.Dense(3, name="out")])
    keras_spft.wrap_pretrained(model, radius=1.0, head=["out"], exclude=["c2"])
    kw = dict(num_examples=4, num_classes=3, input_dim=4, input_bound=1.0)
    with pytest.raises(ValueError, match=r"layer_bounds names \['c1 '\], which are no backbone kernels .*c1, c2"):
        bounds.theorem2_bound(model, layer_bounds={"c1 ": 100.0}, **kw)
    model.get_layer("c2").enable_lora(2)
    with pytest.raises(ValueError, match=r"every kernel layer of the chain, and cannot read 'c2' \(layer 'c2' has LoRA"):
        bounds.theorem2_bound(model, **kw)


def test_layer_distances_of_a_monitor_take_one_logged_epoch_for_every_layer():
    # A monitor's entries lack the frozen backbone in a first stage: its
    # per-key lists were ragged, so epoch=0 took the backbone's value of a later epoch.
    import types

    run = types.SimpleNamespace(history=[
        {"spft/head/h/mars": 0.4, "epoch": 0},
        {"spft/head/h/mars": 0.5, "epoch": 1},
        {"spft/head/h/mars": 0.7, "spft/base/c1/mars": 1.5, "epoch": 0},
    ])
    assert plots.layer_distances(run, epoch=0, head=True) == {"head/h": 0.4}
    assert plots.layer_distances(run, epoch=2, head=True) == {"head/h": 0.7, "base/c1": 1.5}
    assert plots.layer_distances(run) == {"base/c1": 1.5}


def test_a_history_of_aggregates_only_points_at_the_monitor(tmp_path):
    model = two_layer_net()
    model.compile(optimizer="sgd", loss="mse")
    monitor = keras_spft.DistanceMonitor(per_layer=False)
    history = model.fit(np.ones((4, 2)), np.ones((4, 2)), epochs=1, verbose=0, callbacks=[monitor])
    with pytest.raises(ValueError, match=r"per_layer=False\)? a History holds the aggregates only: pass the monitor"):
        plots.plot_distance_histograms({"mars-pgm": history}, str(tmp_path / "h.png"))
    assert plots.plot_distance_histograms({"mars-pgm": monitor}, str(tmp_path / "m.png")).endswith("m.png")


def test_a_constraint_attached_by_hand_on_other_axes_is_measured_on_the_layers_rows():
    """A MARSDistance with its default axis=0 on a Conv2D kernel bounds
    (kw, in, out) slices, not the layer's rows: the bound took the slices'
    norms (D_j 6x too small here) and was no bound."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    inp = keras.Input((6, 6, 2))
    conv = L.Conv2D(3, 3, use_bias=False, name="c1")
    model = keras.Model(inp, L.Dense(2, use_bias=False, name="head")(L.Flatten()(conv(inp))))
    w0 = keras.ops.convert_to_numpy(conv.kernel).astype("float64")
    c = keras_spft.MARSDistance(w0.astype("float32"), radius=0.2)   # sums axis 0 only
    conv.kernel.constraint = conv.kernel_constraint = c
    head = model.get_layer("head")
    head.kernel.constraint = head.kernel_constraint = keras_spft.MARSDistance(None, radius=1.0)
    moved = w0 + 0.3 * rng.normal(size=w0.shape)
    conv.kernel.assign(c(keras.ops.convert_to_tensor(moved.astype("float32"))))
    head.kernel.assign(head.kernel.constraint(head.kernel))
    w = keras.ops.convert_to_numpy(conv.kernel).astype("float64")
    rows = lambda t: np.abs(t).sum(axis=(0, 1, 2)).max()   # noqa: E731  the layer's rows: output channels
    kw = dict(num_examples=10, num_classes=2, input_dim=72, input_bound=1.0, head="head")
    now = bounds.theorem2_bound(model, **kw)
    assert now.layers[0].distance == pytest.approx(rows(w - w0), rel=1e-6)
    assert now.layers[0].distance > 0.2 * 1.5   # more than the constraint's own slices measure
    assert now.layers[0].bound == pytest.approx(max(rows(w), rows(w0)), rel=1e-6)
    # Radius mode: each of a row's 3 x 2 slices (kernel height x input channels) is within 0.2.
    by_radius = bounds.theorem2_bound(model, distances="radius", **kw)
    assert by_radius.layers[0].distance == pytest.approx(0.2 * 3 * 2, rel=1e-6)
    assert by_radius.layers[0].distance >= now.layers[0].distance


def test_bad_constants_of_the_bounds_are_named():
    """A zero or negative B_j gave a bound of 0, a negative input_bound a
    bare "math domain error", num_examples=1.5 was read as 1."""
    model = two_layer_net()
    kw = dict(num_examples=4, num_classes=2, input_dim=2, input_bound=1.0)
    for change, match in ((dict(layer_bounds={"w1": 0.0}), r"theorem2_bound: `layer_bounds\['w1'\]` must be positive"),
                          (dict(layer_bounds={"w1": -1.0}), r"`layer_bounds\['w1'\]` must be positive"),
                          (dict(input_bound=-1.0), r"theorem2_bound: `input_bound` must be positive"),
                          (dict(input_bound=float("nan")), r"`input_bound` must be positive and finite"),
                          (dict(lipschitz=-1.0), r"`lipschitz` must be positive"),
                          (dict(head_bound=-2.0), r"`head_bound` must be positive"),
                          (dict(num_examples=1.5), r"`num_examples` must be an integer of at least 1, got 1.5")):
        with pytest.raises(ValueError, match=match):
            bounds.theorem2_bound(model, **dict(kw, **change))
    with pytest.raises(ValueError, match=r"theorem3_bound: `num_classes` must be an integer of at least 1"):
        bounds.theorem3_bound(model, num_examples=4, num_classes=0, input_bound=1.0)
    assert bounds.theorem2_bound(model, **kw).value > 0
