"""A small real dataset with no download: scikit-learn's digits (1797 grayscale 8x8 images, 10 classes)
written as a class-folder PNG tree that preprocessing/demo_paths.yaml reads (layout: folders).

    python -m preprocessing.make_demo_data data/demo/raw
    sh preprocessing/generate_data.sh preprocessing/demo_paths.yaml

OUT_DIR/train/<digit>/NNNN.png and OUT_DIR/val/<digit>/NNNN.png, NNNN = index in the dataset; every
6th image (index 5, 11, ...) goes to val: 1498 train, 299 val. Rerunning writes only missing files.
"""
import argparse
import os
import sys

import lib.env  # noqa: F401  first: without the packages, one line instead of a traceback
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from lib import command
from preprocessing import PrepError

VAL_EVERY = 6


def make_demo_data(out_dir):
    """Write the tree; returns the number of files written (0 when it was already complete)."""
    digits = load_digits()  # images (1797, 8, 8) float, values 0..16; target (1797,)
    written = 0
    for i, (image, digit) in enumerate(zip(digits.images, digits.target)):
        split = 'val' if i % VAL_EVERY == VAL_EVERY - 1 else 'train'
        path = os.path.join(out_dir, split, str(digit), f'{i:04d}.png')
        if os.path.exists(path):
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pixels = np.round(image * 255 / 16).astype(np.uint8)
        tmp = path + '.tmp'  # not .png: an interrupted run leaves nothing the listing would take
        Image.fromarray(pixels).save(tmp, format='PNG')
        os.replace(tmp, path)
        written += 1
    return written


@command
def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m preprocessing.make_demo_data',
                                     description='write the digits demo dataset as PNG class folders')
    parser.add_argument('out_dir', help='e.g. data/demo/raw (what preprocessing/demo_paths.yaml reads)')
    args = parser.parse_args(argv)
    try:
        written = make_demo_data(args.out_dir)
    except OSError as e:  # a folder that cannot be made or written
        raise PrepError(f'cannot write the demo data to {args.out_dir}: {e}') from None
    print(f'{args.out_dir}: wrote {written} images' if written else f'{args.out_dir}: already complete')


if __name__ == '__main__':
    sys.exit(main())
