"""Distributed training keeps the guarantee on every replica.

Each case runs in a subprocess because the device layout (2 logical CPU
devices) must be set before the backend starts.
"""

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COMMON = """
import numpy as np, keras, keras_spft
def build():
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, name="c"),
                             keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(6, name="fc")], name="base")
    return keras.Sequential([keras.Input((8, 8, 3)), base, keras.layers.Dense(3, name="head")])
def check(model, report, replica_values, radius=lambda w: 0.5 if w.role == "head" else 0.05):
    n_at_bound = 0
    for w in report.wrapped:
        var = next(v for v in model.trainable_variables if v.constraint is w.obj)
        anchor = 0.0 if w.obj.anchor is None else keras.ops.convert_to_numpy(w.obj.anchor).astype("float64")
        r = radius(w)
        values = replica_values(var)
        assert len(values) == 2, len(values)
        for v in values:
            v = np.asarray(v, dtype="float64")
            d = np.abs(v - anchor).sum(axis=tuple(range(v.ndim - 1)))
            assert d.max() <= r * (1 + 1e-5) + 1e-6, (w.path, d.max())
            n_at_bound += int((d > 0.99 * r).sum())
        np.testing.assert_array_equal(values[0], values[1])
    assert n_at_bound > 0
    print("OK", n_at_bound)
x = np.random.default_rng(0).random((32, 8, 8, 3)).astype("float32")
y = np.arange(32) % 3
"""

# Two logical CPU devices, then one of the two distribution set-ups.
TF_TWO_REPLICAS = """
import os
os.environ["KERAS_BACKEND"] = "tensorflow"
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
""" + COMMON + """
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
"""

JAX_TWO_REPLICAS = """
import os
os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
""" + COMMON + """
import jax
assert len(jax.devices()) == 2
keras.distribution.set_distribution(keras.distribution.DataParallel())
def shards(var):
    return [np.asarray(s.data) for s in var.value.addressable_shards]
"""

TF_MIRRORED = TF_TWO_REPLICAS + """
with strategy.scope():
    model = build()
    report = keras_spft.wrap_pretrained(model, radius=0.05, head_radius=0.5)
    model.compile(optimizer=keras.optimizers.Adam(0.05),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
# one anchor object per kernel, mirrored like the kernel it anchors
assert len(report.wrapped) == 3
assert type(report["c"].anchor.value).__name__ == "MirroredVariable"
model.fit(x, y, batch_size=8, epochs=2, verbose=0)
check(model, report, lambda var: [np.asarray(v) for v in var.value.values])
"""

JAX_DATA_PARALLEL = JAX_TWO_REPLICAS + """
model = build()
report = keras_spft.wrap_pretrained(model, radius=0.05, head_radius=0.5)
model.compile(optimizer=keras.optimizers.Adam(0.05),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model.fit(x, y, batch_size=8, epochs=2, verbose=0)
check(model, report, shards)
"""

JAX_DATA_PARALLEL_LEARNED = JAX_TWO_REPLICAS + """
model = build()
report = keras_spft.wrap_pretrained(model, radius="learned", head_radius=0.5)
model.compile(optimizer=keras_spft.RadiusOptimizer(keras.optimizers.Adam(0.05)),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model.fit(x, y, batch_size=8, epochs=2, verbose=0)
radii = keras_spft.learned_radii(model)
assert len(radii) == 2 and max(radii.values()) > 1e-3, radii
# every replica within the current radius (learned backbone, fixed head) and identical
check(model, report, shards,
      radius=lambda w: 0.5 if w.role == "head" else float(keras.ops.convert_to_numpy(w.obj.radius)))
"""

JAX_MODEL_PARALLEL = """
import os
os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
""" + COMMON + """
mesh = keras.distribution.DeviceMesh((1, 2), ["batch", "model"], devices=keras.distribution.list_devices())
layouts = keras.distribution.LayoutMap(mesh)
layouts["base/c/kernel"] = (None, None, None, "model")   # output channels: the rows MARS sums within
layouts["base/fc/kernel"] = ("model", None)              # input units: each row's sum spans both devices
keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=layouts, batch_dim_name="batch"))
model = build()
start = {v.path: np.array(v.value) for v in model.trainable_variables}
report = keras_spft.wrap_pretrained(model, radius=0.05, head_radius=0.5)
model.compile(optimizer=keras.optimizers.Adam(0.05),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
for path in ("base/c/kernel", "base/fc/kernel"):
    var = next(v for v in model.trainable_variables if v.path == path)
    anchor = var.constraint.anchor
    # Sharded as its kernel (it was replicated in full on every device).
    assert anchor.value.sharding.spec == var.value.sharding.spec, (path, anchor.value.sharding.spec)
    assert anchor.value.addressable_shards[0].data.size * 2 == anchor.value.size, path
model.fit(x, y, batch_size=8, epochs=2, verbose=0)
n_at_bound = 0
for w in report.wrapped:
    var = next(v for v in model.trainable_variables if v.constraint is w.obj)
    v = np.asarray(var.value, "float64")
    anchor = 0.0 if w.obj.anchor is None else np.asarray(w.obj.anchor.value, "float64")
    if w.obj.anchor is not None:
        np.testing.assert_array_equal(np.asarray(w.obj.anchor.value), start[var.path])
        assert w.obj.anchor.value.sharding.spec == var.value.sharding.spec
    r = 0.5 if w.role == "head" else 0.05
    d = np.abs(v - anchor).sum(axis=tuple(range(v.ndim - 1)))
    assert d.max() <= r * (1 + 1e-5) + 1e-6, (w.path, d.max())
    n_at_bound += int((d > 0.99 * r).sum())
assert n_at_bound > 0
print("OK", n_at_bound)
"""

TF_MIRRORED_LEARNED_REFUSED = TF_TWO_REPLICAS + """
with strategy.scope():
    model = build()
    keras_spft.wrap_pretrained(model, radius="learned")
    model.compile(optimizer=keras_spft.RadiusOptimizer(keras.optimizers.Adam(0.05)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
try:
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
except ValueError as e:
    assert "(learned or fixed radii) is not supported under a tf.distribute strategy" in str(e), e
    print("OK refused")
"""


@pytest.mark.parametrize("script", [TF_MIRRORED, JAX_DATA_PARALLEL, JAX_DATA_PARALLEL_LEARNED,
                                    JAX_MODEL_PARALLEL, TF_MIRRORED_LEARNED_REFUSED],
                         ids=["tf-mirrored", "jax-data-parallel", "jax-data-parallel-learned",
                              "jax-model-parallel", "tf-mirrored-learned-refused"])
def test_bound_holds_on_every_replica(script):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("KERAS_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
