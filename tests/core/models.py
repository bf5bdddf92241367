"""Small models used by the core tests."""

import keras
from keras import layers as L


def all_kernel_types_model():
    """A pre-trained 'base' (a nested functional model) holding every supported
    layer type, inside an outer model with a new Dense head."""
    x1 = keras.Input((8, 3), name="x1")
    x2 = keras.Input((8, 8, 3), name="x2")
    x3 = keras.Input((4, 4, 4, 2), name="x3")
    xv = keras.Input((6,), name="xv")
    h1 = L.Conv1D(4, 3, name="conv1d")(x1)
    h1 = L.DepthwiseConv1D(3, depth_multiplier=2, name="dw1d")(h1)
    h1 = L.SeparableConv1D(5, 2, depth_multiplier=2, name="sep1d")(h1)
    h1 = L.Conv1DTranspose(3, 2, name="convt1d")(h1)
    h2 = L.Conv2D(4, 3, name="conv2d")(x2)
    h2 = L.BatchNormalization(name="bn")(h2)
    h2 = L.DepthwiseConv2D(3, depth_multiplier=2, name="dw2d")(h2)
    h2 = L.SeparableConv2D(5, 2, name="sep2d")(h2)
    h2 = L.Conv2DTranspose(3, 2, name="convt2d")(h2)
    h3 = L.Conv3D(3, 2, name="conv3d")(x3)
    h3 = L.Conv3DTranspose(2, 2, name="convt3d")(h3)
    hv = L.Dense(5, name="dense")(xv)
    hv = L.EinsumDense("ab,bcd->acd", output_shape=(3, 4), bias_axes="cd", name="einsum")(hv)
    feats = L.Concatenate()([L.Flatten()(h) for h in (h1, h2, h3, hv)])
    base = keras.Model([x1, x2, x3, xv], feats, name="base")
    inputs = [keras.Input(t.shape[1:], name=t.name + "_outer") for t in (x1, x2, x3, xv)]
    out = L.Dense(2, name="head")(base(inputs))
    return keras.Model(inputs, out, name="outer")


# Which kernel axis indexes the output units, per layer type (the reference
# notes' table): rows are obtained by summing all the other axes.
OUTPUT_AXES = {
    "conv1d": [2], "dw1d": [1, 2], "sep1d.depthwise_kernel": [1, 2], "sep1d.pointwise_kernel": [2],
    "convt1d": [1], "conv2d": [3], "dw2d": [2, 3], "sep2d.depthwise_kernel": [2, 3],
    "sep2d.pointwise_kernel": [3], "convt2d": [2], "conv3d": [4], "convt3d": [3],
    "dense": [1], "einsum": [1, 2], "head": [1], "bn.gamma": [0],
}


def small_cnn(num_classes=3, name="base"):
    """A small conv base (nested) plus a Dense head, like fine-tuning setups."""
    base = keras.Sequential(
        [
            keras.Input((12, 12, 3)),
            L.Conv2D(6, 3, name="c1"),
            L.BatchNormalization(name="bn1"),
            L.ReLU(),
            L.DepthwiseConv2D(3, name="dw"),
            L.Conv2D(8, 1, name="c2"),
            L.GlobalAveragePooling2D(),
            L.Dense(8, name="fc"),
        ],
        name=name,
    )
    return keras.Sequential([keras.Input((12, 12, 3)), base, L.Dense(num_classes, name="head")])
