"""Fine-tune MobileNet on flowers17 with MARS-PGM: `wrap_pretrained` + `model.fit`.

Runs offline on the flowers17 folder and the MobileNet (alpha 0.25) ImageNet
weights kept in ../shared (from the repository root):

    python examples/finetune_flowers.py --epochs 5

Point --data at your own image folder (train/ val/ test/ with one folder per
class) or a TFDS name (tfds:oxford_flowers102), and --weights at "imagenet"
on a machine that can download.
"""

import argparse
import os
import time

import keras

import keras_spft
from keras_spft import recipe
from keras_spft.backbones import build_model, get_backbone
from keras_spft.data import load_data

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared")

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data", default=os.path.join(SHARED, "data", "flowers17"))
parser.add_argument("--weights", default=os.path.join(SHARED, "assets", "mobilenet_2_5_224_tf_no_top.h5"))
parser.add_argument("--image-size", type=int, default=128)
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--radius", type=float, default=7.4)
parser.add_argument("--head-radius", type=float, default=7.4)
parser.add_argument("--lr", type=float, default=1e-3)
args = parser.parse_args()

# 1. Data: train+val -> test (the paper's final runs), the backbone's own preprocessing.
backbone = get_backbone("mobilenet")
splits = load_data(args.data, image_size=args.image_size, batch_size=32, stage="final",
                   preprocess=backbone.preprocess_input)
print(splits)

# 2. The pre-trained backbone with a new head (logits).
keras.utils.set_random_seed(0)
model = build_model("mobilenet", splits.num_classes, weights=args.weights,
                    image_size=args.image_size, alpha=0.25)

# 3. Anchor every pre-trained kernel: MARS-PGM, rows within `radius` of W0.
report = keras_spft.wrap_pretrained(model, radius=args.radius, method="mars-pgm",
                                    head_radius=args.head_radius)
print(report.summary())

# 4. Ordinary Keras training: Adam(amsgrad), lr halved after 2/3 of the epochs.
model.compile(optimizer=keras.optimizers.Adam(args.lr, amsgrad=True),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              metrics=["accuracy"])
start = time.time()
model.fit(splits.train, epochs=args.epochs, verbose=2,
          callbacks=[recipe.lr_schedule(args.lr, args.epochs)])
loss, acc = model.evaluate(splits.eval, verbose=0)
print(f"test accuracy {acc:.4f} (loss {loss:.4f}) after {args.epochs} epochs, {time.time() - start:.0f} s")

# The constraint held: the largest row distance of a backbone kernel is within the radius.
c = report["conv_pw_13"]
d = keras.ops.convert_to_numpy(c.row_distances(model.layers[1].get_layer("conv_pw_13").kernel))
print(f"conv_pw_13: max row L1 distance {d.max():.3f} <= radius {args.radius}")

# BatchNorm's moving statistics trail the weights fit ends with: re-estimated
# for them (one forward pass over the training data), then evaluated again.
keras_spft.reestimate_batchnorm(model, splits.train)
loss, acc = model.evaluate(splits.eval, verbose=0)
print(f"test accuracy {acc:.4f} (loss {loss:.4f}) with BatchNorm statistics re-estimated")
