#!/bin/sh
# The whole pipeline on the embedded demo dataset (scikit-learn's handwritten digits, shipped inside
# the package: no download), in a few minutes on a laptop CPU:
#   .venv  ->  PNG class folders  ->  hickle batches  ->  train alexnet_cifar  ->  val_record.npy
# Extra key=value arguments go to train.py (e.g. sh demo.sh n_epochs=3 gpu=cpu). Run again, it
# first moves the previous demo run into weights/demo/previous_<N>/ (overwrite=True).
set -eu
cd "$(dirname "$0")"
sh tools/venv.sh requirements.txt
.venv/bin/python -m preprocessing.make_demo_data data/demo/raw
sh preprocessing/generate_data.sh preprocessing/demo_paths.yaml
exec .venv/bin/python train.py \
    data=data/demo model=alexnet_cifar crop_size=32 rand_crop=False \
    learning_rate=0.003 lr_step=[10] n_epochs=12 print_freq=23 \
    weights_dir=weights/demo overwrite=True "$@"
