"""Test accuracy with fit's BatchNorm statistics vs `reestimate_batchnorm`'s, side by side.

For each seed and method: fine-tune the pre-trained MobileNet on the training
data, evaluate on the test data with the moving statistics `fit` left, then
re-estimate them on the training data (`keras_spft.reestimate_batchnorm`) and
evaluate the same weights again. From the repository root, offline:

    python -m benchmarks.batchnorm --epochs 10 --seeds 3 --methods none,mars-pgm

Prints one row per run and the mean change, and writes them as JSON (`--out`).
"""

import argparse
import json
import os
import time

import keras
import numpy as np

import keras_spft
from keras_spft import recipe
from keras_spft.backbones import build_model, get_backbone
from keras_spft.data import load_data

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared")


def run(args, method, seed, splits):
    # The seed fixes the weights of the head and the data order (a pipeline
    # reseeded for this run): rows do not depend on the runs before them.
    keras.utils.set_random_seed(seed)
    train = splits.reseeded(seed).train
    model = build_model("mobilenet", splits.num_classes, weights=args.weights,
                        image_size=args.image_size, alpha=0.25)
    if method != "none":
        recipe.wrap(model, method, {"radius": args.radius, "head_radius": args.radius})
    model.compile(optimizer=keras.optimizers.Adam(args.lr, amsgrad=True),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    start = time.time()
    model.fit(train, epochs=args.epochs, verbose=0, callbacks=[recipe.lr_schedule(args.lr, args.epochs)])
    fit_s = time.time() - start
    _, acc_fit = model.evaluate(splits.eval, verbose=0)
    start = time.time()
    updated = keras_spft.reestimate_batchnorm(model, train)
    reestimate_s = time.time() - start
    _, acc_re = model.evaluate(splits.eval, verbose=0)
    return {"method": method, "seed": seed, "test_acc_fit_stats": float(acc_fit),
            "test_acc_reestimated": float(acc_re), "batchnorm_layers": len(updated),
            "fit_s": round(fit_s, 1), "reestimate_s": round(reestimate_s, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.path.join(SHARED, "data", "flowers17"))
    parser.add_argument("--weights", default=os.path.join(SHARED, "assets", "mobilenet_2_5_224_tf_no_top.h5"))
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", default="none,mars-pgm")
    parser.add_argument("--radius", type=float, default=7.4, help="radius and head radius of PGM methods")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", default=None, help="JSON file for the rows")
    args = parser.parse_args()

    # train+val -> test, as the paper's final runs; the backbone's own preprocessing.
    splits = load_data(args.data, image_size=args.image_size, batch_size=32, stage="final",
                       preprocess=get_backbone("mobilenet").preprocess_input)
    print(splits)
    print("| method | seed | test acc, fit's statistics | test acc, re-estimated | change | fit (s) | re-estimate (s) |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for method in args.methods.split(","):
        for seed in range(args.seeds):
            r = run(args, method, seed, splits)
            rows.append(r)
            print(f"| {method} | {seed} | {r['test_acc_fit_stats']:.4f} | {r['test_acc_reestimated']:.4f} | "
                  f"{r['test_acc_reestimated'] - r['test_acc_fit_stats']:+.4f} | {r['fit_s']} | {r['reestimate_s']} |",
                  flush=True)
    for method in args.methods.split(","):
        change = [r["test_acc_reestimated"] - r["test_acc_fit_stats"] for r in rows if r["method"] == method]
        print(f"{method}: mean change {np.mean(change):+.4f} (min {min(change):+.4f}, max {max(change):+.4f}) "
              f"over {len(change)} seeds")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
