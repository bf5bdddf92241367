#!/bin/bash
# The GPU figures of docs/benchmarks.md, as one script for a lent GPU machine
# with JAX (no TensorFlow, no package registry): the keras wheel and its two
# missing dependencies travel in .whl/ (ignored by git: the device call must
# name it, carry: [".whl"]). Fill it here first (optree's wheel is for the
# machine's Python, 3.12):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl keras==3.15.1 namex==0.1.0 optree==0.20.0
# Writes everything under $OUT.
OUT=${OUT:-/tmp/spft_gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
$PY -m pip install --no-index --no-deps -q .whl/*.whl 2>&1 | grep -v "^WARNING: Running pip"
# The backend before the first import: without it (and without a keras.json)
# Keras starts TensorFlow, which that machine lacks.
export KERAS_BACKEND=jax PYTHONPATH=$PWD
if ! err=$($PY -c "import keras" 2>&1); then
  echo "$err" | tail -3
  echo "keras did not import after installing .whl/ (carried? filled for this Python?): stopping"; exit 3
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import jax, keras; print('jax', jax.__version__, 'keras', keras.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
run() {  # name, timeout, command...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "== $name: exit $? in $(( $(date +%s) - t0 )) s"
  grep "^|\|^rep " "$OUT/$name.txt"
}
# Method lists and limits can be narrowed to fit the device time left (one
# command may run 600 s: projection 90 + two models at LIMIT must stay below).
# An empty list skips that model (EFF= ...). On the H200 each method's warm-up
# took 35-70 s when it compiled both train_on_batch's step and fit's; the fit
# loop now compiles fit's only. Each method's kernel counts are printed (and
# written to the JSON) as soon as it is compiled, so a run cut short keeps them.
# "none#2" is a second compilation of the plain model in the same process:
# XLA keeps its GPU autotuning results process-wide, so it shows the noise of
# recompiling, not of autotuning (compare runs of separate processes for that).
# "mars-pgm-grouped" projects same-shape kernels together: compiled for an
# H200 without one (benchmarks/gpu_kernels.py) it added 134 kernels to the
# plain step where mars-pgm added 390; this times whether that pays.
R101=${R101-none,none#2,floor,mars-pgm,l2-pgm,mars-pgm-grouped}
EFF=${EFF-none,floor,mars-pgm,mars-pgm-learned}
# Seconds per model: 240 each with both models (90 + 2 x 240 = 570 s); with
# EFF= the ResNet101 stage may take 420 (its warm-ups took 45-70 s each: six
# methods fit).
if [ -n "$EFF" ]; then LIMIT=${LIMIT:-240}; else LIMIT=${LIMIT:-420}; fi
LOOP=${LOOP:-fit}   # fit: steps_per_execution, no per-step host round trip; or train_on_batch
# --passes 20: the pass time without the call's fixed costs (earlier GPU runs
# timed one pass per call: 3.5 ms on the H200, 144 GB/s, over 20 times below
# its memory bandwidth, so most of that was not the pass).
# XLA_FLAGS=--xla_gpu_autotune_level=0 in the environment takes autotuning
# (one suspect of the variance between compilations) out of every run.
run projection 90 $PY -m benchmarks.projection --model resnet101 --reps 7 --passes 20 \
  --impls floor,scale,scale-grouped,learned-scale,frobenius
# COUNT=--count-kernels (default) also counts the kernels each method's step
# launches (XLA's HLO dumps; where a constraint's time goes); COUNT= skips it.
COUNT=${COUNT---count-kernels}
if [ -n "$R101" ]; then
  run resnet101 "$LIMIT" $PY benchmarks/overhead.py --model resnet101 --image-size 224 --batch 32 \
    --reps 5 --steps 20 --loop "$LOOP" --methods "$R101" --out "$OUT/resnet101.json" $COUNT
fi
if [ -n "$EFF" ]; then
  run efficientnetb0 "$LIMIT" $PY benchmarks/overhead.py --model efficientnetb0 --image-size 224 --batch 32 \
    --reps 5 --steps 20 --loop "$LOOP" --methods "$EFF" --out "$OUT/efficientnetb0.json"
fi
exit 0   # each stage's exit status is printed above ("== name: exit N")
