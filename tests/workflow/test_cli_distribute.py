"""keras-spft --distribute: MirroredStrategy on 2 logical CPUs, and clear errors."""

import json
import os
import subprocess
import sys

import pytest

from keras_spft import cli
from tests.workflow.conftest import REPO, make_image_folder

# The device layout must be set before TensorFlow starts: a fresh process that
# splits the CPU into 2 logical devices, patches in a tiny model, and records
# the type of the variables at compile time (inside the strategy's scope).
MIRRORED = """
import os, sys
os.environ["KERAS_BACKEND"] = "tensorflow"
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras_spft.backbones as backbones
from keras_spft import cli, recipe
from tests.workflow.conftest import tiny_model
backbones.build_model = lambda name, n, *, weights, image_size, alpha, head: tiny_model(n, size=image_size)
real_compile = recipe.compile_model
def compile_model(model, lr=1e-4, **kwargs):
    print("VARIABLES", sorted({type(v.value).__name__ for v in model.trainable_variables}),
          "IN_SCOPE", tf.distribute.has_strategy())
    return real_compile(model, lr, **kwargs)
recipe.compile_model = compile_model
cli.run(sys.argv[1:])
"""


def test_mirrored_strategy_trains_on_two_replicas(tmp_path):
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               KERAS_BACKEND="tensorflow")
    proc = subprocess.run(
        [sys.executable, "-c", MIRRORED, "finetune", "--data", data, "--weights", "none", "--image-size", "16",
         "--epochs", "1", "--batch-size", "4", "--method", "mars-pgm", "--radius", "0.5",
         "--distribute", "mirrored", "--out", str(out), "--verbose", "0"],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[distribute] tf.distribute.MirroredStrategy over 2 replicas" in proc.stdout, proc.stdout
    # Built, wrapped and compiled inside the scope: mirrored variables.
    assert "VARIABLES ['MirroredVariable'] IN_SCOPE True" in proc.stdout, proc.stdout
    run = json.load(open(out / "runs" / "mars-pgm" / "seed0.json"))
    assert run["distribute"] == "mirrored" and run["replicas"] == 2
    assert len(run["history"]["loss"]) == 1 and 0 <= run["accuracy"] <= 1
    # The radius holds after the distributed step (logged by DistanceMonitor).
    assert 0 < run["history"]["spft/base/c1/mars"][0] <= 0.5 * (1 + 1e-5)


@pytest.mark.parametrize("choice,backend,match", [
    ("mirrored", "jax", r"--distribute mirrored needs the tensorflow backend .* runs on jax; on jax use --distribute data-parallel"),
    ("data-parallel", "tensorflow", r"--distribute data-parallel needs the jax backend .* runs on tensorflow; on tensorflow use --distribute mirrored"),
    ("mirrored", "torch", r"--distribute mirrored needs the tensorflow backend .* the torch backend has no --distribute option"),
    ("data-parallel", "torch", r"--distribute data-parallel needs the jax backend .* runs on torch"),
])
def test_distribute_backend_mismatch_is_named(choice, backend, match):
    with pytest.raises(ValueError, match=match):
        cli.check_distribute(choice, backend)


def test_distribute_matching_backend_or_none_passes():
    for choice, backend in [("mirrored", "tensorflow"), ("data-parallel", "jax"), ("none", "torch")]:
        cli.check_distribute(choice, backend)


def test_distribute_error_from_the_command(tmp_path, capsys):
    import keras

    assert keras.backend.backend() == "tensorflow"    # the suite's backend
    with pytest.raises(SystemExit) as e:
        cli.run(["finetune", "--data", str(tmp_path), "--distribute", "data-parallel"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "keras-spft: error: --distribute data-parallel needs the jax backend" in err
    with pytest.raises(SystemExit):
        cli.run(["finetune", "--data", str(tmp_path), "--distribute", "horovod"])
    assert "invalid choice: 'horovod'" in capsys.readouterr().err


# JAX: two host devices, a tiny model, and at every compile the current
# distribution and how many devices the first kernel is laid out on.
DATA_PARALLEL = """
import os, sys
os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import keras
import keras_spft.backbones as backbones
from keras_spft import cli, recipe
from tests.workflow.conftest import tiny_model
backbones.build_model = lambda name, n, *, weights, image_size, alpha, head: tiny_model(n, size=image_size)
real_compile = recipe.compile_model
def compile_model(model, lr=1e-4, **kwargs):
    dist = keras.distribution.distribution()
    print("COMPILE", type(dist).__name__, len(model.trainable_variables[0].value.sharding.device_set))
    return real_compile(model, lr, **kwargs)
recipe.compile_model = compile_model
cli.run(sys.argv[1:])
"""


def test_data_parallel_trains_every_run_and_trial_on_all_devices(tmp_path):
    """keras.backend.clear_session() (before every run, and KerasTuner's before
    every trial) drops the Keras distribution: each run and trial must still
    be built and trained under DataParallel, and batches that would not split
    evenly over the devices are refused before any training."""
    from tests.workflow.conftest import CLASSES

    # 2 classes: train 8, val 4, train+val 12, test 4 images; batches of 4
    # split over 2 devices, batches of 3 do not.
    data = make_image_folder(tmp_path / "data", per_split={"train": 4, "val": 2, "test": 2})
    assert len(CLASSES) == 2
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), KERAS_BACKEND="jax")
    common = ["--data", data, "--weights", "none", "--image-size", "16", "--epochs", "1", "--method", "mars-pgm",
              "--distribute", "data-parallel", "--verbose", "0"]
    proc = subprocess.run([sys.executable, "-c", DATA_PARALLEL, "tune", "--trials", "1", "--tuner", "random",
                           "--batch-size", "4", "--out", str(tmp_path / "out"), *common], capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[distribute] keras.distribution.DataParallel over 2 devices" in proc.stdout, proc.stdout
    compiles = [line for line in proc.stdout.splitlines() if line.startswith("COMPILE")]
    # KerasTuner's build that declares the search space, the trial, the final run.
    assert len(compiles) == 3, proc.stdout
    assert set(compiles) == {"COMPILE DataParallel 2"}, compiles
    run = json.load(open(tmp_path / "out" / "runs" / "mars-pgm" / "seed0.json"))
    assert run["distribute"] == "data-parallel" and run["replicas"] == 2
    proc = subprocess.run([sys.executable, "-c", DATA_PARALLEL, "finetune", "--radius", "0.5", "--batch-size", "3",
                           "--out", str(tmp_path / "out3"), *common], capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert ("--distribute data-parallel splits every batch over 2 devices, but --batch-size 3 gives the 12 "
            "images of split 'train' a batch of 3") in proc.stderr, proc.stderr[-3000:]
    assert "COMPILE" not in proc.stdout
    # The final stage's test split (9 images: a last batch of 1) is refused
    # before the search, not after it (a review found the search run first).
    odd = make_image_folder(tmp_path / "odd", classes=("a", "b", "c"), per_split={"train": 4, "val": 2, "test": 3})
    common[1] = odd
    proc = subprocess.run([sys.executable, "-c", DATA_PARALLEL, "tune", "--trials", "1", "--tuner", "random",
                           "--batch-size", "4", "--out", str(tmp_path / "out_odd"), *common], capture_output=True,
                          text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "--batch-size 4 gives the 9 images of split 'test' a batch of 1" in proc.stderr, proc.stderr[-3000:]
    assert "COMPILE" not in proc.stdout
    # No search (--trials 0): the tune stage's batches (3 training images: a
    # last batch of 1) are not refused; the final run's split evenly.
    common[1] = make_image_folder(tmp_path / "notune", classes=("a", "b", "c"),
                                  per_split={"train": 1, "val": 1, "test": 2})
    proc = subprocess.run([sys.executable, "-c", DATA_PARALLEL, "tune", "--trials", "0", "--radius", "0.5",
                           "--batch-size", "2", "--out", str(tmp_path / "out_notune"), *common], capture_output=True,
                          text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
