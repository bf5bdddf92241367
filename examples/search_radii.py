"""Search MARS-PGM's backbone and head radii with KerasTuner, then train with the best.

Runs offline on the flowers17 folder and the shared MobileNet weights
(from the repository root):

    python examples/search_radii.py --trials 4 --epochs 3

The paper's budget is 20 trials of Bayesian/TPE search over log-uniform
radii in [e^0.5, e^3.5], scored on the validation split.
"""

import argparse
import os
import tempfile

import keras

import keras_spft
from keras_spft import recipe
from keras_spft.backbones import build_model, get_backbone
from keras_spft.data import load_data
from keras_spft.tuning import search

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared")

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data", default=os.path.join(SHARED, "data", "flowers17"))
parser.add_argument("--weights", default=os.path.join(SHARED, "assets", "mobilenet_2_5_224_tf_no_top.h5"))
parser.add_argument("--image-size", type=int, default=128)
parser.add_argument("--trials", type=int, default=20)
parser.add_argument("--epochs", type=int, default=5)
parser.add_argument("--tuner", default="bayesian", help="bayesian (needs scikit-learn), random, hyperband")
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--directory", default=os.path.join(tempfile.gettempdir(), "spft_search_example"),
                    help="KerasTuner folder: run again to resume the search")
args = parser.parse_args()

backbone = get_backbone("mobilenet")
tune = load_data(args.data, image_size=args.image_size, batch_size=32, stage="tune",
                 preprocess=backbone.preprocess_input)
print(tune)


def fresh_model():
    """Every trial starts from the pre-trained weights."""
    return build_model("mobilenet", tune.num_classes, weights=args.weights,
                       image_size=args.image_size, alpha=0.25)


# Tune on train -> val. The search checks its own settings when it resumes,
# but not what fresh_model reads from `args`: the project name holds those,
# so another image size or weights file starts its own search.
project = f"mars-pgm_{args.image_size}px_{os.path.splitext(os.path.basename(args.weights))[0]}"
result = search(fresh_model, tune.train, tune.eval, method="mars-pgm", epochs=args.epochs,
                tuner=args.tuner, max_trials=args.trials, lr=args.lr,
                directory=args.directory, project_name=project, verbose=2)
print(result)

# Final run with the best radii: train on train+val, report test.
final = load_data(args.data, image_size=args.image_size, batch_size=32, stage="final",
                  preprocess=backbone.preprocess_input)
keras.utils.set_random_seed(0)
model = fresh_model()
keras_spft.wrap_pretrained(model, method="mars-pgm", radius=result.best["radius"],
                           head_radius=result.best["head_radius"])
recipe.compile_model(model, args.lr)
model.fit(final.train, epochs=args.epochs, verbose=2, callbacks=[recipe.lr_schedule(args.lr, args.epochs)])
acc = model.evaluate(final.eval, verbose=0, return_dict=True)["accuracy"]
print(f"best radius {result.best['radius']:.3g}, head radius {result.best['head_radius']:.3g}: "
      f"test accuracy {acc:.4f}")
