"""`keras-spft compare` killed (SIGKILL) after its first finished run, then
started again with the same command: finished runs are kept, not retrained."""

import json
import os
import signal
import subprocess
import sys
import time

from tests.workflow.conftest import REPO, make_image_folder

# Loaded at start-up of the `python -m keras_spft.cli` processes (via
# PYTHONPATH): swaps keras.applications for a tiny conv model so runs take ~1 s.
SITECUSTOMIZE = """
import keras_spft.backbones as backbones
from tests.workflow.conftest import tiny_model
backbones.build_model = lambda name, n, *, weights, image_size, alpha, head: tiny_model(n, size=image_size)
"""


def test_compare_killed_after_first_run_resumes_without_retraining(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=("a", "b", "c"))
    out = tmp_path / "out"
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hook), REPO, os.environ.get("PYTHONPATH", "")]),
               KERAS_BACKEND="tensorflow")
    cmd = [sys.executable, "-m", "keras_spft.cli", "compare", "--data", data, "--weights", "none",
           "--image-size", "16", "--epochs", "1", "--batch-size", "4", "--methods", "none,l2-sp",
           "--seeds", "2", "--trials", "0", "--out", str(out), "--verbose", "0"]
    runs = [out / "runs" / m / f"seed{s}.json" for m in ("none", "l2-sp") for s in (0, 1)]

    with open(tmp_path / "log1", "w") as log1:
        proc = subprocess.Popen(cmd, stdout=log1, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        deadline = time.time() + 240
        while not runs[0].exists():
            assert proc.poll() is None, open(tmp_path / "log1").read()[-3000:]
            assert time.time() < deadline, "no run finished in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    finished = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in runs if p.exists()}
    assert runs[0] in finished and len(finished) < len(runs), "killed too late to test resuming"
    assert not (out / "compare.json").exists()

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO, env=env)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    for path, (mtime, content) in finished.items():
        method, seed = path.parent.name, path.stem[len("seed"):]
        assert f"[{method} seed {seed}] done already" in second.stdout
        assert f"[{method} seed {seed}] test accuracy" not in second.stdout   # not retrained
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == content
    for path in set(runs) - set(finished):
        method, seed = path.parent.name, path.stem[len("seed"):]
        assert f"[{method} seed {seed}] test accuracy" in second.stdout       # trained now
    summary = json.load(open(out / "compare.json"))
    assert [(r["method"], r["seeds"]) for r in summary["rows"]] == [("none", [0, 1]), ("l2-sp", [0, 1])]
    first_acc = json.loads(finished[runs[0]][1])["accuracy"] * 100
    assert summary["rows"][0]["accuracy"][0] == first_acc
    assert summary["diagnostics"] == ["distances.png", "gradient_norms.png"]
    # Keras' test loss adds L2-SP's penalty; the cross-entropy is the loss without it.
    sp = json.load(open(runs[2]))
    assert sp["loss"] > sp["cross_entropy"] + 1e-4 and 0 < sp["cross_entropy"]
