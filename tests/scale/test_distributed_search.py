"""KerasTuner's distributed mode (a chief oracle and 2 workers on 127.0.0.1,
configured by its environment variables) runs the radius search: every trial
runs exactly once and completes."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("keras_tuner")
pytest.importorskip("tensorboard")  # KerasTuner's distributed mode logs to TensorBoard

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRIALS = 4

WORKER = """
import os, sys
import numpy as np, keras, keras_tuner
from keras_spft.tuning import SPFTHyperModel
out = sys.argv[1]
def build():
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, name="fc")], name="base")
    return keras.Sequential([keras.Input((6,)), base, keras.layers.Dense(2, name="head")])
rng = np.random.default_rng(0)
x = rng.normal(size=(32, 6)).astype("float32")
y = (x[:, 0] > 0).astype("int32")
class Tuner(keras_tuner.RandomSearch):
    def run_trial(self, trial, *args, **kwargs):
        with open(os.path.join(out, "ran_" + os.environ["KERASTUNER_TUNER_ID"] + ".txt"), "a") as f:
            f.write(trial.trial_id + "\\n")
        return super().run_trial(trial, *args, **kwargs)
tuner = Tuner(SPFTHyperModel(build, method="mars-pgm"), objective="val_accuracy", max_trials=%d,
              directory=os.path.join(out, "kt"), project_name="dist", seed=1)
tuner.search(x, y, validation_data=(x, y), epochs=1, batch_size=8, verbose=0)
print("DONE")
""" % TRIALS


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_chief_and_two_workers_run_every_trial_once(tmp_path):
    env = dict(os.environ, KERASTUNER_ORACLE_IP="127.0.0.1", KERASTUNER_ORACLE_PORT=str(_free_port()),
               TF_CPP_MIN_LOG_LEVEL="3")
    script = textwrap.dedent(WORKER)
    procs = {}
    for role in ("chief", "tuner0", "tuner1"):
        procs[role] = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT,
                                       env=dict(env, KERASTUNER_TUNER_ID=role),
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        outputs = {role: procs[role].communicate(timeout=300) for role in ("tuner0", "tuner1")}
        try:
            outputs["chief"] = procs["chief"].communicate(timeout=5)
        except subprocess.TimeoutExpired:
            # KerasTuner's chief polls every 20 s for trials still running
            # once the search is over; when it is asleep, waiting for it
            # tests nothing of ours (the workers' results are what count).
            pass
    finally:
        for p in procs.values():
            p.kill()
    for role, (out, err) in outputs.items():
        assert procs[role].returncode == 0, f"{role} failed:\n{err[-3000:]}"
    ran = []
    for worker in ("tuner0", "tuner1"):
        path = tmp_path / f"ran_{worker}.txt"
        ran += path.read_text().split() if path.exists() else []
    assert not (tmp_path / "ran_chief.txt").exists(), "the chief only serves the oracle"
    assert sorted(ran) == sorted(set(ran)), f"a trial ran twice: {ran}"
    assert len(ran) == TRIALS, f"trials lost: ran {ran}"
    radii = set()
    for trial_id in ran:
        trial = json.loads((tmp_path / "kt" / "dist" / f"trial_{trial_id}" / "trial.json").read_text())
        assert trial["status"] == "COMPLETED" and trial["score"] is not None
        values = trial["hyperparameters"]["values"]
        assert 1.64 < values["radius"] < 33.2 and 1.64 < values["head_radius"] < 33.2
        radii.add(values["radius"])
    assert len(radii) == TRIALS, "the oracle handed out the same radius twice"
