"""keras-spft command line: finetune/tune/compare on tiny data, resume, outputs, errors."""

import json
import os
import subprocess
import sys

import pytest

from keras_spft import cli
from tests.workflow.conftest import REPO, make_image_folder, tiny_model


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    """A tiny image folder, and build_model patched to a tiny conv model (fast)."""
    import keras_spft.backbones as backbones

    built = []

    def fake_build(name, num_classes, *, weights, image_size, alpha, head):
        built.append(name)
        return tiny_model(num_classes, size=image_size)

    monkeypatch.setattr(backbones, "build_model", fake_build)
    data = make_image_folder(tmp_path / "data", classes=("a", "b", "c"))
    return data, tmp_path / "out", built


def _args(data, out, *extra):
    return ["--data", data, "--weights", "none", "--image-size", "16", "--epochs", "1",
            "--batch-size", "4", "--out", str(out), "--verbose", "0", *extra]


def test_compare_writes_table_and_resumes_without_rerunning(tiny, monkeypatch, capsys):
    data, out, built = tiny
    argv = ["compare"] + _args(data, out, "--methods", "none,mars-pgm", "--seeds", "2",
                               "--trials", "2", "--tuner", "random", "--name", "tiny3")
    summary = cli.run(argv)
    # Files: one JSON per run, search records, the table as md/json/png.
    for m in ("none", "mars-pgm"):
        for s in (0, 1):
            run = json.load(open(out / "runs" / m / f"seed{s}.json"))
            assert run["method"] == m and run["seed"] == s and run["eval_split"] == "test"
            assert run["train_images"] == 15 and run["eval_images"] == 6     # train+val -> test
            assert 0 <= run["accuracy"] <= 1 and len(run["history"]["loss"]) == 1
            assert run["cross_entropy"] == pytest.approx(run["loss"], rel=1e-4)   # no penalty: the same
        best = json.load(open(out / "search" / m / "best.json"))
        assert len(best["trials"]) == 2
    r = json.load(open(out / "search" / "mars-pgm" / "best.json"))["best"]
    assert 1.64 < r["radius"] < 33.2 and 1.64 < r["head_radius"] < 33.2
    assert json.load(open(out / "runs" / "mars-pgm" / "seed1.json"))["values"]["radius"] == pytest.approx(r["radius"])
    lr = json.load(open(out / "search" / "none" / "best.json"))["best"]["lr"]
    assert 1e-5 <= lr <= 1e-3                       # the baseline's learning rate is searched
    md = open(out / "compare.md").read()
    assert "| Method | tiny3 |" in md and "| None |" in md and "| MARS-PGM |" in md and "±" in md
    saved = json.load(open(out / "compare.json"))
    assert [row["method"] for row in saved["rows"]] == ["none", "mars-pgm"]
    row = saved["rows"][1]
    accs = [json.load(open(out / "runs" / "mars-pgm" / f"seed{s}.json"))["accuracy"] * 100 for s in (0, 1)]
    assert row["accuracy"] == pytest.approx(accs) and row["mean"] == pytest.approx(sum(accs) / 2)
    assert row["std"] == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)   # sample std (ddof=1) of two
    assert os.path.getsize(out / "compare.png") > 1000
    assert summary["rows"][0]["name"] == "None"
    stdout = capsys.readouterr().out
    assert stdout.count("test accuracy") == 4       # one summary line per run

    # Restart: nothing is trained or searched again.
    calls = []
    monkeypatch.setattr(cli, "train_one", lambda *a, **k: calls.append(a) or pytest.fail("re-ran a finished run"))
    import keras_spft.tuning as tuning
    monkeypatch.setattr(tuning, "search", lambda *a, **k: pytest.fail("re-ran a finished search"))
    cli.run(argv)
    assert "done already" in capsys.readouterr().out
    # A run reused from another backend says so.
    run_file = out / "runs" / "none" / "seed0.json"
    run = json.loads(run_file.read_text())
    run_file.write_text(json.dumps({**run, "keras_backend": "jax-elsewhere"}))
    cli.run(argv)
    import keras
    assert f"made on the jax-elsewhere backend, this is {keras.backend.backend()}" in capsys.readouterr().out

    # An interrupted run (its JSON missing) is the only one redone.
    os.remove(out / "runs" / "mars-pgm" / "seed1.json")
    redo = []
    monkeypatch.setattr(cli, "train_one", lambda s, m, v, seed, stage, epochs=None: redo.append((m, seed)) or {
        "method": m, "seed": seed, "values": v, "eval_split": "test", "accuracy": 0.5, "loss": 1.0,
        "cross_entropy": 1.0, "history": {}, "train_images": 15, "eval_images": 6, "wall_s": 0.0,
        "settings": s.settings(stage, m), "keras_backend": "x"})
    cli.run(argv)
    assert redo == [("mars-pgm", 1)]


def test_resume_refuses_results_made_with_other_settings(tiny):
    data, out, _ = tiny
    cli.run(["finetune"] + _args(data, out, "--method", "l2-pgm", "--radius", "2"))
    assert (out / "runs" / "l2-pgm" / "seed0.json").is_file()
    with pytest.raises(SystemExit, match=r"seed0.json' is a finished run with other settings \(epochs: 1 on disk vs 2"):
        cli.run(["finetune", "--data", data, "--weights", "none", "--image-size", "16",
                  "--epochs", "2", "--batch-size", "4", "--out", str(out), "--verbose", "0",
                  "--method", "l2-pgm", "--radius", "2"])


def test_resume_refuses_results_made_with_other_values(tiny):
    data, out, _ = tiny
    cli.run(["finetune"] + _args(data, out, "--method", "l2-pgm", "--radius", "2"))
    with pytest.raises(SystemExit, match=r"other settings \(radius: 2.0 on disk vs 5.0 now\)"):
        cli.run(["finetune"] + _args(data, out, "--method", "l2-pgm", "--radius", "5"))


def test_finetune_values_and_tune_stage(tiny):
    data, out, built = tiny
    res = cli.run(["finetune"] + _args(data, out, "--method", "mars-sp", "--strength", "0.01",
                                        "--stage", "tune", "--lr", "0.001"))
    assert res[0]["values"]["strength"] == 0.01 and res[0]["values"]["lr"] == 0.001
    assert res[0]["eval_split"] == "val" and res[0]["train_images"] == 9
    assert (out / "runs_tune" / "mars-sp" / "seed0.json").is_file()
    assert built == ["mobilenet"]


def test_tune_with_given_values_does_not_search(tiny, monkeypatch):
    data, out, _ = tiny
    import keras_spft.tuning as tuning
    monkeypatch.setattr(tuning, "search", lambda *a, **k: pytest.fail("searched although all values were given"))
    summary = cli.run(["tune"] + _args(data, out, "--method", "l2-pgm", "--radius", "3", "--head-radius", "4"))
    assert summary["rows"][0]["values"]["radius"] == 3.0
    assert (out / "tune.md").is_file() and (out / "runs" / "l2-pgm" / "seed0.json").is_file()


def test_clear_errors(tiny, capsys):
    data, out, _ = tiny
    with pytest.raises(SystemExit):
        cli.run(["finetune"] + _args(str(out / "missing"), out))
    assert "data folder '" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="ResNet50 has no width multiplier"):
        cli.run(["finetune"] + _args(data, out, "--model", "resnet50", "--alpha", "0.5"))
    with pytest.raises(SystemExit, match="weights file '.*nope.h5' does not exist"):
        cli.run(["finetune", "--data", data, "--weights", str(out / "nope.h5")])
    with pytest.raises(SystemExit):
        cli.run(["compare", "--data", data, "--methods", "none,magic"])
    assert "unknown method 'magic'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.run(["finetune", "--data", data, "--seeds", "zero"])
    assert "--seeds 'zero'" in capsys.readouterr().err
    assert cli._seeds("3") == [0, 1, 2] and cli._seeds("0,4") == [0, 4]


def test_console_script_is_declared():
    text = open(os.path.join(REPO, "pyproject.toml")).read()
    assert 'keras-spft = "keras_spft.cli:main"' in text


def test_cli_subprocess_real_mobilenet(tmp_path):
    """The real command in a fresh process: MobileNet (random weights), 1 epoch."""
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "keras_spft.cli", "finetune", "--data", data, "--model", "mobilenet",
         "--alpha", "0.25", "--weights", "none", "--image-size", "32", "--epochs", "1",
         "--batch-size", "4", "--method", "mars-pgm", "--radius", "3", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "- accuracy:" in proc.stdout and "- loss:" in proc.stdout        # Keras' per-epoch line
    assert "[mars-pgm seed 0] test accuracy" in proc.stdout                  # the run's summary line
    run = json.load(open(out / "runs" / "mars-pgm" / "seed0.json"))
    assert run["settings"]["model"] == "MobileNet" and run["settings"]["alpha"] == 0.25
    assert run["values"]["radius"] == 3.0 and run["keras_backend"]
    import keras

    import keras_spft
    assert run["versions"]["keras_spft"] == keras_spft.__version__ and run["versions"]["keras"] == keras.__version__
    assert run["versions"][{"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[keras.backend.backend()]]


def test_console_entry_point_returns_exit_status_zero(tiny):
    # console scripts call sys.exit(main()): anything but 0/None is a failure
    # status (a returned result dict used to make every successful run exit 1)
    data, out, _ = tiny
    status = cli.main(["finetune"] + _args(data, out, "--method", "l2-pgm", "--radius", "2"))
    assert status == 0
    assert (out / "runs" / "l2-pgm" / "seed0.json").is_file()


def test_finetune_learned_radii_records_them(tiny):
    data, out, _ = tiny
    cli.run(["finetune"] + _args(data, out, "--method", "mars-pgm-learned", "--epochs", "2",
                                 "--radius-lr", "0.05", "--head-radius", "3.0"))
    run = json.load(open(out / "runs" / "mars-pgm-learned" / "seed0.json"))
    radii = run["learned_radii"]
    assert list(radii) == ["base/c1/kernel"] and radii["base/c1/kernel"] > 1e-3
    assert run["radius_lr"] == 0.05 and run["values"]["head_radius"] == 3.0
    # Logged per epoch by the DistanceMonitor; the last entry is the final radius.
    per_epoch = run["history"]["spft/radius_mean"]
    assert len(per_epoch) == 2 and per_epoch[-1] == pytest.approx(radii["base/c1/kernel"])


def test_learned_method_refuses_radius(tiny):
    data, out, _ = tiny
    with pytest.raises(SystemExit, match="--radius does not apply to mars-pgm-learned"):
        cli.run(["finetune"] + _args(data, out, "--method", "mars-pgm-learned", "--radius", "2"))


def test_resume_refuses_runs_made_with_another_lr_or_batchnorm(tiny):
    data, out, _ = tiny
    cli.run(["finetune"] + _args(data, out, "--method", "l2-pgm", "--radius", "2", "--lr", "0.001"))
    # the default learning rate now (no --lr) is another value than the stored run's
    with pytest.raises(SystemExit, match=r"lr: 0.001 on disk vs 0.0001 now"):
        cli.run(["finetune"] + _args(data, out, "--method", "l2-pgm", "--radius", "2"))
    with pytest.raises(SystemExit, match=r"batchnorm: 'none' on disk vs 'gamma' now"):
        cli.run(["finetune"] + _args(data, out, "--method", "l2-pgm", "--radius", "2", "--lr", "0.001",
                                     "--batchnorm", "gamma"))
    cli.run(["finetune"] + _args(data, out, "--method", "mars-pgm-learned"))
    with pytest.raises(SystemExit, match=r"radius_lr: 0.01 on disk vs 0.1 now"):
        cli.run(["finetune"] + _args(data, out, "--method", "mars-pgm-learned", "--radius-lr", "0.1"))


def test_runs_finished_before_batchnorm_and_radius_lr_were_recorded_are_reused(tiny, monkeypatch):
    """Run files of older versions lack these settings: the docs promise
    they are reused, but they were refused as 'other settings'."""
    data, out, _ = tiny
    cli.run(["finetune"] + _args(data, out, "--method", "l2-pgm", "--radius", "2"))
    path = out / "runs" / "l2-pgm" / "seed0.json"
    done = json.loads(path.read_text())
    del done["settings"]["batchnorm"]
    done["settings"]["radius_lr"] = None
    del done["settings"]["data_files"]                            # and the data path was relative
    done["settings"]["data"] = os.path.relpath(done["settings"]["data"])
    path.write_text(json.dumps(done))
    monkeypatch.setattr(cli, "train_one", lambda *a, **k: pytest.fail("re-ran a finished run"))
    cli.run(["finetune"] + _args(data, out, "--method", "l2-pgm", "--radius", "2"))
    with pytest.raises(SystemExit, match=r"batchnorm: 'none' on disk vs 'gamma' now"):
        cli.run(["finetune"] + _args(data, out, "--method", "l2-pgm", "--radius", "2", "--batchnorm", "gamma"))


def test_runs_are_reused_only_for_the_same_data_folder_and_files(tiny, monkeypatch, tmp_path):
    """`--data data` from another directory is another folder; the folder's
    files are recorded too (a relative path was the whole key: another data
    set at the same relative path reused the old runs and table)."""
    import shutil

    data, out, _ = tiny
    make_image_folder(tmp_path / "elsewhere" / "data", classes=("a", "b", "c"), per_split={"train": 4, "val": 2,
                                                                                          "test": 2})
    run = ["--method", "l2-pgm", "--radius", "2"]
    monkeypatch.chdir(tmp_path)
    cli.run(["finetune"] + _args("data", out, *run))
    assert json.load(open(out / "runs" / "l2-pgm" / "seed0.json"))["settings"]["data_files"].startswith("21 files, ")
    monkeypatch.setattr(cli, "train_one", lambda *a, **k: pytest.fail("re-ran a finished run"))
    cli.run(["finetune"] + _args(str(tmp_path / "data") + os.sep, out, *run))   # the same folder: reused
    (tmp_path / "data" / "train" / ".DS_Store").write_bytes(b"x")                 # not data: still reused
    os.symlink(tmp_path / "data", tmp_path / "link")
    cli.run(["finetune"] + _args(str(tmp_path / "link"), out, *run))              # the same folder via a link
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(SystemExit, match=r"data: '\S+/data' on disk vs '\S+/elsewhere/data' now"):
        cli.run(["finetune"] + _args("data", out, *run))
    monkeypatch.chdir(tmp_path)
    shutil.copy(tmp_path / "data" / "train" / "a" / "img0.png", tmp_path / "data" / "train" / "a" / "new.png")
    with pytest.raises(SystemExit, match=r"data_files: '21 files, .*' on disk vs '22 files, .*' now"):
        cli.run(["finetune"] + _args("data", out, *run))


def test_images_swapped_between_classes_are_other_data(tiny, monkeypatch, tmp_path):
    """BMPs of one size have one byte size: the record held names, labels
    and sizes only, and a folder whose classes were swapped (every label
    wrong) reused the old runs. Records of older versions (no contents) are
    still compared as they were recorded."""
    _, out, _ = tiny
    data = make_image_folder(tmp_path / "bmp", classes=("a", "b"), fmt="bmp")
    run = ["--method", "l2-pgm", "--radius", "2"]
    cli.run(["finetune"] + _args(data, out, *run))
    record = out / "runs" / "l2-pgm" / "seed0.json"
    done = json.loads(record.read_text())
    assert " bytes, contents " in done["settings"]["data_files"]
    monkeypatch.setattr(cli, "train_one", lambda *a, **k: pytest.fail("re-ran a finished run"))
    old = dict(done, settings=dict(done["settings"], data_files=cli._data_files(data, contents=False)))
    record.write_text(json.dumps(old))
    cli.run(["finetune"] + _args(data, out, *run))                    # an older version's record: reused
    record.write_text(json.dumps(done))
    for split in ("train", "val", "test"):
        a, b = tmp_path / "bmp" / split / "a", tmp_path / "bmp" / split / "b"
        a.rename(tmp_path / "swap")
        b.rename(a)
        (tmp_path / "swap").rename(b)
    with pytest.raises(SystemExit, match=r"data_files: '14 files, (\d+) bytes, contents \w+' on disk vs "
                                         r"'14 files, \1 bytes, contents \w+' now"):
        cli.run(["finetune"] + _args(data, out, *run))


def test_unfinished_search_resumes_only_with_its_settings(tiny, monkeypatch):
    data, out, _ = tiny
    import keras_spft.tuning as tuning

    def interrupted(*a, **k):   # killed in its first trial: KerasTuner has written its state
        os.makedirs(os.path.join(k["directory"], k["project_name"], "trial_0"), exist_ok=True)
        raise KeyboardInterrupt
    monkeypatch.setattr(tuning, "search", interrupted)
    tune = ["tune"] + _args(data, out, "--method", "mars-pgm", "--trials", "2")
    with pytest.raises(KeyboardInterrupt):
        cli.run(tune)
    started = out / "search" / "mars-pgm" / "search_settings.json"
    assert json.loads(started.read_text())["trials"] == 2
    with pytest.raises(SystemExit, match=r"unfinished search started with other settings \(ranges: \{.lr.: 0.0001\} on disk vs \{.radius.: \[2.0, 3.0\], .lr.: 0.0001\} now\)"):
        cli.run(tune + ["--radius-range", "2", "3"])
    with pytest.raises(KeyboardInterrupt):   # the same settings: resumed
        cli.run(tune)


def test_a_seed_gives_the_same_data_order_whatever_ran_before(tiny):
    import keras
    import numpy as np

    data, out, _ = tiny
    session = cli.Session(cli.build_parser().parse_args(["finetune"] + _args(data, out)))

    def labels():
        return np.concatenate([np.asarray(y) for _, y in cli.run_splits(session, "final", 1).train])
    keras.utils.set_random_seed(0)
    first = labels()
    keras.utils.set_random_seed(5)
    assert np.array_equal(labels(), first)


def test_every_methods_search_starts_from_the_same_data_order(tiny, monkeypatch):
    """The tune pipeline was shared by the methods of one `compare`: a method
    searched after another saw the next reshuffle, and its search depended
    on what ran before it in the process."""
    import numpy as np

    from keras_spft import tuning

    data, out, _ = tiny
    session = cli.Session(cli.build_parser().parse_args(["compare"] + _args(data, out, "--trials", "2")))
    orders = []

    class Stop(Exception):
        pass

    def fake_search(build, train, val, method, **kwargs):
        orders.append(np.concatenate([np.asarray(y) for _, y in train]))
        raise Stop

    monkeypatch.setattr(tuning, "search", fake_search)
    for method in ("l2-sp", "mars-pgm", "l2-sp"):
        with pytest.raises(Stop):
            cli.tune_method(session, method)
    assert len(orders) == 3 and all(np.array_equal(o, orders[0]) for o in orders)


def test_compare_applies_an_option_to_the_methods_that_have_it(tiny):
    data, out, _ = tiny
    with pytest.raises(SystemExit, match=r"--radius does not apply to any of none, l2-sp \(their hyper-parameters: "
                                         r"--head-strength, --strength\)"):
        cli.run(["compare"] + _args(data, out, "--methods", "none,l2-sp", "--radius", "2"))
    # a value and a range for one hyper-parameter: the range was dropped silently
    with pytest.raises(SystemExit, match=r"--radius and --radius-range both given: a value fixes it, a range "
                                         r"searches it; give one"):
        cli.run(["tune"] + _args(data, out, "--method", "mars-pgm", "--radius", "5", "--radius-range", "2", "20"))
    with pytest.raises(SystemExit, match=r"--lr-range does not apply to any of l2-pgm, mars-pgm-learned"):
        cli.run(["compare"] + _args(data, out, "--methods", "l2-pgm,mars-pgm-learned", "--lr-range", "1e-4", "1e-2"))
    # --radius fixes mars-pgm's radius; the learned method (no radius) runs beside it.
    cli.run(["compare"] + _args(data, out, "--methods", "mars-pgm,mars-pgm-learned", "--radius", "2",
                                "--head-radius", "3", "--trials", "0"))
    fixed = json.load(open(out / "runs" / "mars-pgm" / "seed0.json"))
    learned = json.load(open(out / "runs" / "mars-pgm-learned" / "seed0.json"))
    assert fixed["values"]["radius"] == 2.0 and fixed["values"]["head_radius"] == 3.0
    assert "radius" not in learned["values"] and learned["values"]["head_radius"] == 3.0
    rows = [l for l in (out / "compare.md").read_text().splitlines() if l.startswith("| MARS-PGM")]
    assert rows and all("±" not in l for l in rows)   # one seed: the mean alone, no spread


def test_options_a_method_does_not_use_are_errors(tiny):
    data, out, _ = tiny
    with pytest.raises(SystemExit, match=r"--strength does not apply to mars-pgm \(its hyper-parameters: --head-radius, --radius\)"):
        cli.run(["finetune"] + _args(data, out, "--method", "mars-pgm", "--strength", "0.1"))
    with pytest.raises(SystemExit, match=r"--radius, --radius-range do not apply to l2-sp"):
        cli.run(["tune"] + _args(data, out, "--method", "l2-sp", "--radius", "5", "--radius-range", "2", "3"))
    with pytest.raises(SystemExit, match=r"error: --radius-range does not apply to mars-pgm-learned"):
        cli.run(["tune"] + _args(data, out, "--method", "mars-pgm-learned", "--radius-range", "1", "2"))
    with pytest.raises(SystemExit, match=r"--lr-range does not apply to l2-pgm"):
        cli.run(["tune"] + _args(data, out, "--method", "l2-pgm", "--lr-range", "1e-4", "1e-2"))


def test_usage_errors_exit_with_status_2_and_bad_values_are_refused(tiny, capsys):
    data, out, _ = tiny
    cli.run(["finetune"] + _args(data, out, "--method", "l2-pgm", "--radius", "2"))
    with pytest.raises(SystemExit) as e:   # a settings mismatch, as argparse's errors: status 2
        cli.main(["finetune"] + _args(data, out, "--method", "l2-pgm", "--radius", "5"))
    assert e.value.code == 2
    assert "is a finished run with other settings (radius: 2.0 on disk vs 5.0 now)" in capsys.readouterr().err
    for bad, said in [(["--seeds", ","], "--seeds ','"),
                      (["--seeds", "4294967296"], "--seeds '4294967296': give a count from 1 to 1000"),  # MemoryError
                      (["--image-size", "0"], "--image-size: expected an integer of at least 1, got '0'"),
                      (["--epochs", "0"], "--epochs: expected an integer of at least 1")]:
        with pytest.raises(SystemExit) as e:
            cli.run(["finetune"] + _args(data, out) + bad)
        assert e.value.code == 2 and said in capsys.readouterr().err
    for bad, said in [(["--methods", ""], "--methods '': give at least one method"),
                      (["--tune-epochs", "0"], "--tune-epochs: expected an integer of at least 1"),
                      (["--trials", "-1"], "--trials: expected an integer of at least 0"),
                      (["--radius-range", "20", "2"], "--radius-range 20 2: LOW must be below HIGH")]:
        with pytest.raises(SystemExit) as e:
            cli.run(["compare"] + _args(data, out) + bad)
        assert e.value.code == 2 and said in capsys.readouterr().err


def test_radius_lr_and_lr_are_refused_where_nothing_uses_them(tiny):
    data, out, _ = tiny
    with pytest.raises(SystemExit, match=r"--radius-lr does not apply to l2-pgm"):
        cli.run(["tune"] + _args(data, out, "--method", "l2-pgm", "--radius-lr", "0.5"))
    with pytest.raises(SystemExit, match=r"--lr does not apply to none"):
        cli.run(["tune"] + _args(data, out, "--method", "none", "--lr", "1e-3"))
    # with nothing searched the baseline does use --lr
    summary = cli.run(["tune"] + _args(data, out, "--method", "none", "--lr", "1e-3", "--trials", "0"))
    assert summary["rows"][0]["values"]["lr"] == 1e-3


def test_a_failed_start_leaves_nothing_that_blocks_the_corrected_command(tiny, monkeypatch):
    data, out, _ = tiny
    import keras_spft.tuning as tuning

    seen = {}

    def fake_search(*a, **k):   # records what the search was given, then stops the command
        seen.update(k)
        raise KeyboardInterrupt
    monkeypatch.setattr(tuning, "search", fake_search)
    tune = ["tune", "--method", "mars-pgm-learned", "--head-radius-range", "2", "20", "--radius-lr", "0.5"]
    with pytest.raises(SystemExit):   # a typo in --data: fails while loading
        cli.run(tune + _args(str(out / "typo"), out)[2:] + ["--data", str(out / "typo")])
    assert not (out / "search").exists()
    with pytest.raises(KeyboardInterrupt):   # the corrected command starts its search
        cli.run(tune + _args(data, out))
    assert seen["radius_lr"] == 0.5   # the trials learn their radii at the given step size


def test_finished_search_error_says_what_differs_and_data_paths_are_normalised(tiny):
    data, out, _ = tiny
    tune = _args(data, out, "--method", "mars-pgm", "--trials", "1", "--tuner", "random")
    cli.run(["tune"] + tune)
    cli.run(["tune"] + _args(data + os.sep, out, "--method", "mars-pgm", "--trials", "1", "--tuner", "random"))
    with pytest.raises(SystemExit, match=r"finished search with other settings \(trials: 1 on disk vs 2 now\)"):
        cli.run(["tune"] + _args(data, out, "--method", "mars-pgm", "--trials", "2", "--tuner", "random"))


def test_stage_tune_tables_say_val_and_keep_the_final_table(tiny, monkeypatch):
    data, out, _ = tiny
    monkeypatch.setattr(sys, "argv", ["python", "--unrelated-flag"])
    cli.run(["finetune"] + _args(data, out, "--method", "l2-pgm", "--radius", "2", "--seeds", "2", "--stage", "tune"))
    assert json.load(open(out / "finetune_tune.json"))["metric"].startswith("val accuracy (%)")
    assert (out / "finetune_tune.md").is_file() and not (out / "finetune.md").exists()
    assert "val accuracy (%)" in (out / "finetune_tune.md").read_text()
    # compare records the command it was given, not the Python process's argv
    argv = ["compare"] + _args(data, out, "--methods", "l2-pgm", "--radius", "2", "--head-radius", "3")
    cli.run(argv)
    assert json.load(open(out / "compare.json"))["command"] == "keras-spft " + " ".join(argv)


def test_the_gradient_probe_is_the_same_batch_whatever_ran_first(tiny):
    import keras
    import numpy as np

    data, out, _ = tiny
    args = cli.build_parser().parse_args(["finetune"] + _args(data, out))
    keras.utils.set_random_seed(0)
    first = cli.Session(args).probe("final")
    keras.utils.set_random_seed(5)
    again = cli.Session(args).probe("final")
    np.testing.assert_array_equal(first[1], again[1])
    np.testing.assert_array_equal(first[0], again[0])


def test_seeds_given_twice_or_out_of_range_and_search_options_without_a_search_are_refused(tiny, capsys):
    data, out, _ = tiny
    for command, bad, said in [
            ("finetune", ["--seeds", "0,0"], "--seeds '0,0': a seed given twice"),
            ("finetune", ["--seeds=-1,2"], "from 0 to 2**32-1"),
            ("tune", ["--trials", "0", "--radius-range", "2", "5", "--tuner", "grid"],
             "--tuner, --radius-range apply to the search, and --trials 0 runs none"),
            ("compare", ["--trials", "0", "--objective", "val_loss"], "--objective applies to the search"),
            ("finetune", ["--data-dir", "/tmp"], "--data-dir applies to TFDS data (--data tfds:NAME) only")]:
        with pytest.raises(SystemExit) as e:
            cli.run([command] + _args(data, out) + bad)
        assert e.value.code == 2 and said in capsys.readouterr().err
    assert not out.exists()


def test_batchnorm_is_checked_up_front_and_recorded_for_the_methods_it_applies_to(tiny, monkeypatch):
    data, out, _ = tiny
    with pytest.raises(SystemExit, match=r"--batchnorm gamma does not apply to none"):
        cli.run(["tune"] + _args(data, out, "--method", "none", "--batchnorm", "gamma", "--trials", "0"))
    with pytest.raises(SystemExit, match=r"--batchnorm reference does not apply to l2-sp"):
        cli.run(["tune"] + _args(data, out, "--method", "l2-sp", "--batchnorm", "reference", "--trials", "1"))
    assert not out.exists()   # refused before anything was written
    compare = ["compare"] + _args(data, out, "--methods", "none,l2-pgm", "--radius", "2", "--head-radius", "3",
                                  "--trials", "0")
    cli.run(compare + ["--batchnorm", "reference"])
    assert json.load(open(out / "runs" / "none" / "seed0.json"))["settings"]["batchnorm"] == "none"
    assert json.load(open(out / "runs" / "l2-pgm" / "seed0.json"))["settings"]["batchnorm"] == "reference"
    monkeypatch.setattr(cli, "train_one", lambda *a, **k: pytest.fail("re-ran a finished run"))
    # Without --batchnorm the baseline's run is the same run: reused; l2-pgm's is not.
    with pytest.raises(SystemExit, match=r"l2-pgm/seed0.json' is a finished run with other settings "
                                         r"\(batchnorm: 'reference' on disk vs 'none' now\)"):
        cli.run(compare)


def test_the_default_width_multiplier_is_the_same_setting_as_alpha_given(tiny, monkeypatch):
    data, out, _ = tiny
    cli.run(["finetune"] + _args(data, out, "--method", "l2-pgm", "--radius", "2"))   # MobileNet, no --alpha
    assert json.load(open(out / "runs" / "l2-pgm" / "seed0.json"))["settings"]["alpha"] == 1.0
    with pytest.raises(SystemExit, match=r"alpha: 1.0 on disk vs 0.5 now"):
        cli.run(["finetune"] + _args(data, out, "--method", "l2-pgm", "--radius", "2", "--alpha", "0.5"))
    monkeypatch.setattr(cli, "train_one", lambda *a, **k: pytest.fail("re-ran a finished run"))
    cli.run(["finetune"] + _args(data, out, "--method", "l2-pgm", "--radius", "2", "--alpha", "1.0"))
    # A run stored by a version that recorded the absent --alpha as None.
    path = out / "runs" / "l2-pgm" / "seed0.json"
    path.write_text(json.dumps({**json.loads(path.read_text()),
                                "settings": {**json.loads(path.read_text())["settings"], "alpha": None}}))
    cli.run(["finetune"] + _args(data, out, "--method", "l2-pgm", "--radius", "2", "--alpha", "1.0"))


def test_a_finished_penalty_search_scored_on_val_loss_by_an_earlier_version_is_noted(tiny, capsys):
    data, out, _ = tiny
    argv = ["tune"] + _args(data, out, "--method", "l2-sp", "--trials", "1", "--tuner", "random",
                            "--objective", "val_loss")
    cli.run(argv)
    best = out / "search" / "l2-sp" / "best.json"
    record = json.load(open(best))
    assert record["objective"] == "val_cross_entropy"
    json.dump(dict(record, objective="val_loss"), open(best, "w"))   # as written before 2026-11-28
    capsys.readouterr()
    cli.run(argv)
    assert "note: that search scored Keras' val_loss, which adds the l2-sp penalty" in capsys.readouterr().out


def test_user_mistakes_found_before_training_and_named(tiny, monkeypatch, tmp_path, capsys):
    """An --out that is a file (found after training: the run lost), a record
    under --out that is damaged, a non-number for a number option."""
    data, out, _ = tiny
    (tmp_path / "file").write_text("x")
    with monkeypatch.context() as m:
        m.setattr(cli, "train_one", lambda *a, **k: pytest.fail("trained before checking --out"))
        with pytest.raises(SystemExit, match=r"--out '\S+/file' is not a folder keras-spft can write to"):
            cli.run(["finetune"] + _args(data, tmp_path / "file"))
    run = ["--method", "l2-pgm", "--radius", "2"]
    cli.run(["finetune"] + _args(data, out, *run))
    record = out / "runs" / "l2-pgm" / "seed0.json"
    record.write_text('{"method": "l2')
    with pytest.raises(SystemExit, match=r"'\S+/seed0.json' is not a readable keras-spft run record .*remove it"):
        cli.run(["finetune"] + _args(data, out, *run))
    with pytest.raises(SystemExit):
        cli.run(["finetune"] + _args(data, out, "--radius", "abc"))
    assert "argument --radius: expected a positive number, got 'abc'" in capsys.readouterr().err


def test_a_weights_file_replaced_at_the_same_path_is_another_setting(tiny, tmp_path):
    data, out, built = tiny
    weights = tmp_path / "w.weights.h5"
    weights.write_bytes(b"first")   # build_model is patched: the bytes are only recorded
    run = ["--method", "l2-pgm", "--radius", "2"]
    cli.run(["finetune"] + _args(data, out, *run)[2:] + ["--data", data, "--weights", str(weights)])
    settings = json.load(open(out / "runs" / "l2-pgm" / "seed0.json"))["settings"]
    assert settings["weights"] == str(weights) and settings["weights_file"].startswith("5 bytes, ")
    cli.run(["finetune"] + _args(data, out, *run)[2:] + ["--data", data, "--weights", str(weights)])   # reused
    # The same bytes through a link or as a copy elsewhere: reused too (a
    # link was "other settings", though the digest matched)
    (tmp_path / "link.weights.h5").symlink_to(weights)
    (tmp_path / "copy.weights.h5").write_bytes(b"first")
    runs = len(built)
    for name in ("link.weights.h5", "copy.weights.h5"):
        cli.run(["finetune"] + _args(data, out, *run)[2:] + ["--data", data, "--weights", str(tmp_path / name)])
    assert len(built) == runs
    weights.write_bytes(b"other")
    with pytest.raises(SystemExit, match=r"weights_file: '5 bytes, \w+' on disk vs '5 bytes, \w+' now"):
        cli.run(["finetune"] + _args(data, out, *run)[2:] + ["--data", data, "--weights", str(weights)])


def test_a_search_that_failed_before_its_first_trial_blocks_nothing(tiny, monkeypatch, capsys):
    """A bad weights file or image size fails when KerasTuner first builds the
    model, after the search's record was written: the corrected command was
    refused as 'an unfinished search started with other settings'."""
    import keras_spft.backbones as backbones

    data, out, _ = tiny
    real = backbones.build_model

    def failing(*a, **k):
        raise ValueError("weights file 'w.h5' does not fit this model")
    monkeypatch.setattr(backbones, "build_model", failing)
    tune = ["tune", "--method", "l2-pgm", "--trials", "1", "--tuner", "random"]
    with pytest.raises(SystemExit):
        cli.run(tune + _args(data, out))
    assert "keras-spft: error: weights file 'w.h5' does not fit this model" in capsys.readouterr().err
    assert os.listdir(out / "search" / "l2-pgm") == ["search_settings.json"]
    monkeypatch.setattr(backbones, "build_model", real)
    summary = cli.run(tune + _args(data, out, "--image-size", "20"))   # another setting: not refused
    assert summary["rows"][0]["method"] == "l2-pgm"


def test_hyperband_searches_are_reused_whatever_trials_says(tiny):
    data, out, _ = tiny
    tune = ["tune", "--method", "l2-pgm", "--tuner", "hyperband", "--tune-epochs", "1"]
    cli.run(tune + _args(data, out))
    summary = cli.run(tune + _args(data, out, "--trials", "5"))   # --trials does not apply to Hyperband
    assert summary["rows"][0]["method"] == "l2-pgm"


def test_cli_grid_and_damaged_search_records_are_usage_errors(tiny, monkeypatch):
    data, out, _ = tiny
    import keras_spft.tuning as tuning

    monkeypatch.setattr(cli, "run_splits", lambda *a, **k: pytest.fail("loaded the data before refusing"))
    with pytest.raises(SystemExit, match=r"--tuner grid over 2 searched value\(s\) \(radius, head_radius\) "
                                         r"needs --trials of at least 4 .*got 3"):
        cli.run(["tune"] + _args(data, out, "--method", "mars-pgm", "--tuner", "grid", "--trials", "3"))
    monkeypatch.undo()
    project = out / "search" / "l2-pgm"
    project.mkdir(parents=True)
    (project / tuning.SETTINGS_FILE).write_text('{"method": "l2')
    with pytest.raises(ValueError, match=r"'\S+keras_spft_search.json' is not a readable keras-spft search record"):
        tuning._check_resumed(str(project), {"method": "l2-pgm"})


def test_delta_attention_caches_of_earlier_versions_are_found(tiny):
    """The attention cache's name did not change for --weights none/imagenet
    (a new key element would have made every earlier cache unreachable)."""
    import hashlib

    data, out, _ = tiny
    args = cli.build_parser().parse_args(["finetune", "--method", "delta", *_args(data, out)])
    session = cli.Session(args)
    a = args
    def name(data_files):
        key = json.dumps([cli._data_key(a.data), data_files, session.backbone.name, session.weights, a.alpha,
                          a.image_size, a.head, cli.ATTENTION_BATCHES, a.batch_size, a.augment])
        return f"_{hashlib.sha1(key.encode()).hexdigest()[:10]}.npz"

    assert session.attention_cache().endswith(name(session.data_files))
    # Earlier versions recorded the folder without the images' contents: their
    # cache, when there, is read (a review found it recomputed beside the old one).
    earlier = out / "delta" / ("attention_" + session.backbone.name + name(cli._data_files(data, contents=False)))
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"earlier")
    newer = out / "delta" / ("attention_" + session.backbone.name + name(session.data_files))
    # Adopted under the new name, once: a change of the images' contents
    # later misses both names (it kept matching the size-only one).
    assert session.attention_cache() == str(newer) and newer.read_bytes() == b"earlier"
    assert not earlier.exists()
    earlier.write_bytes(b"stale")
    assert session.attention_cache() == str(newer) and newer.read_bytes() == b"earlier"   # a newer one first
