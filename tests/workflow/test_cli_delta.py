"""keras-spft command line: the "delta" method, and diagnostics in every run."""

import json
import math
import os

import numpy as np
import pytest

from keras_spft import cli, recipe
from tests.workflow.conftest import make_image_folder, tiny_model


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    import keras_spft.backbones as backbones

    monkeypatch.setattr(backbones, "build_model",
                        lambda name, num_classes, *, weights, image_size, alpha, head:
                        tiny_model(num_classes, size=image_size))
    data = make_image_folder(tmp_path / "data", classes=("a", "b", "c"))
    return data, tmp_path / "out"


def _args(data, out, *extra):
    return ["--data", data, "--weights", "none", "--image-size", "16", "--epochs", "1",
            "--batch-size", "4", "--out", str(out), "--verbose", "0", *extra]


def test_recipe_and_hypermodel_know_delta():
    assert "delta" in recipe.METHODS and "delta" in cli._methods("none,delta")
    assert recipe.hyperparameter_names("delta") == ("alpha", "beta")
    assert recipe.default_ranges("delta") == {"alpha": recipe.STRENGTH_RANGE, "beta": recipe.STRENGTH_RANGE}
    assert recipe.STRENGTH_RANGE == (math.exp(-10), math.exp(-1))
    assert recipe.method_values("delta", {"alpha": 0.02}) == {"alpha": 0.02, "beta": math.exp(-5.5)}

    import keras_tuner
    from keras_spft.delta import DeltaModel
    from keras_spft.tuning import SPFTHyperModel

    att = [np.array([0.75, 0.25, 0.0, 0.0], "float32")]
    hm = SPFTHyperModel(lambda: tiny_model(2), "delta", ranges={"beta": 0.5},
                        wrap_options={"attention": att, "feature_layers": ["base/c1"]})
    hp = keras_tuner.HyperParameters()
    model = hm.build(hp)
    assert isinstance(model, DeltaModel) and model.optimizer is not None      # the DeltaModel is trained
    assert hp.values["beta"] == 0.5 and math.exp(-10) <= hp.values["alpha"] <= math.exp(-1)
    assert model.alpha == pytest.approx(hp.values["alpha"]) and model.beta == 0.5
    np.testing.assert_allclose(model.get_attention()[0], att[0])
    with pytest.raises(ValueError, match="does not apply to method 'delta'"):
        SPFTHyperModel(lambda: tiny_model(2), "delta", ranges={"strength": 0.1})


def test_delta_finetune_caches_attention_and_evaluates_plain_model(tiny, monkeypatch, capsys):
    data, out = tiny
    import keras_spft.delta as delta

    calls = []
    real = delta.compute_attention
    monkeypatch.setattr(delta, "compute_attention", lambda *a, **k: calls.append(k["cache"]) or real(*a, **k))
    evaluated = []
    import keras

    real_eval = keras.Model.evaluate
    monkeypatch.setattr(keras.Model, "evaluate",
                        lambda self, *a, **k: evaluated.append(type(self).__name__) or real_eval(self, *a, **k))
    res = cli.run(["finetune"] + _args(data, out, "--method", "delta", "--delta-alpha", "0.05",
                                        "--delta-beta", "0.002", "--seeds", "2"))
    assert [r["values"] for r in res] == [{"alpha": 0.05, "beta": 0.002, "lr": 1e-4}] * 2
    assert evaluated == ["Functional", "Functional"]          # the plain network, not the DeltaModel
    # The attention: computed once for both seeds, cached under --out.
    assert len(calls) == 1 and calls[0].startswith(str(out / "delta" / "attention_"))
    assert os.path.isfile(calls[0])
    stdout = capsys.readouterr().out
    assert "DELTA (li2019): alpha=0.05" in stdout and "computed attention" in stdout
    assert stdout.count("[delta] attention of") == 1
    run = json.load(open(out / "runs" / "delta" / "seed1.json"))
    assert run["method"] == "delta" and run["values"]["alpha"] == 0.05
    assert len(run["history"]["spft/mars_max"]) == 1 and run["history"]["spft/mars_max"][0] > 0
    assert run["history"]["grad/global"][0] > 0
    assert json.load(open(out / "finetune.json"))["rows"][0]["name"] == "DELTA"

    # A new invocation (new seed) reads the attention back instead of computing it again.
    mtime = os.stat(calls[0]).st_mtime_ns
    cli.run(["finetune"] + _args(data, out, "--method", "delta", "--delta-alpha", "0.05",
                                  "--delta-beta", "0.002", "--seeds", "1,2"))
    stdout = capsys.readouterr().out
    assert "read from " + calls[0] in stdout
    assert "[delta seed 1] done already" in stdout and "[delta seed 2] test accuracy" in stdout
    assert os.stat(calls[0]).st_mtime_ns == mtime


    # Runs recorded before the feature maps were: reused, except a ResNet's,
    # whose maps changed on 2026-11-28 (block outputs before).
    path = out / "runs" / "delta" / "seed1.json"
    done = json.loads(path.read_text())
    assert done["settings"]["delta_maps"] == cli.DELTA_MAPS
    del done["settings"]["delta_maps"]
    path.write_text(json.dumps(done))
    monkeypatch.setattr(cli, "train_one", lambda *a, **k: pytest.fail("re-ran a finished run"))
    cli.run(["finetune"] + _args(data, out, "--method", "delta", "--delta-alpha", "0.05",
                                  "--delta-beta", "0.002", "--seeds", "1,2"))
    assert "[delta seed 1] done already" in capsys.readouterr().out
    assert cli._unrecorded_delta_maps("ResNet50") != cli.DELTA_MAPS
    assert cli._unrecorded_delta_maps("MobileNet") == cli.DELTA_MAPS


def test_compare_with_delta_searches_alpha_beta_and_plots_diagnostics(tiny, capsys):
    data, out = tiny
    summary = cli.run(["compare"] + _args(data, out, "--methods", "none,mars-pgm,delta", "--seeds", "1",
                                           "--trials", "1", "--tuner", "random",
                                           "--delta-beta-range", "0.001", "0.002"))
    best = json.load(open(out / "search" / "delta" / "best.json"))
    assert set(best["best"]) == {"alpha", "beta", "lr"}
    assert math.exp(-10) <= best["best"]["alpha"] <= math.exp(-1) and 0.001 <= best["best"]["beta"] <= 0.002
    assert best["search_settings"]["ranges"]["beta"] == [0.001, 0.002]
    assert [r["name"] for r in summary["rows"]] == ["None", "MARS-PGM", "DELTA"]
    assert summary["diagnostics"] == ["distances.png", "gradient_norms.png"]
    for name in summary["diagnostics"]:
        assert os.path.getsize(out / name) > 5000
    stdout = capsys.readouterr().out
    assert f"diagnostics: {out / 'distances.png'}, {out / 'gradient_norms.png'}" in stdout
    run = json.load(open(out / "runs" / "mars-pgm" / "seed0.json"))
    h = run["history"]
    assert "spft/base/c1/mars" in h and "spft/head/head/mars" in h and "grad/global" in h
    # The MARS-PGM constraint holds in what was logged (radius line of the plot).
    assert h["spft/base/c1/mars"][0] <= run["values"]["radius"] * (1 + 1e-5)


def test_diagnostics_skip_old_results_without_them(tmp_path):
    old = {"seed": 0, "values": {"radius": 3.0}, "history": {"loss": [1.0], "accuracy": [0.5]}}
    assert cli.plot_diagnostics({"mars-pgm": [old]}, str(tmp_path)) == []
    new = {"seed": 1, "values": {"radius": 3.0},
           "history": {"loss": [1.0], "spft/c1/mars": [2.5], "spft/d/mars": [3.0], "grad/global": [0.7]}}
    written = cli.plot_diagnostics({"mars-pgm": [old, new], "none": [old]}, str(tmp_path))
    assert [os.path.basename(p) for p in written] == ["distances.png", "gradient_norms.png"]
