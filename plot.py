"""Plot a run's error and loss per epoch, training vs validation.

    python plot.py WEIGHTS_DIR [--out FILE]     # default WEIGHTS_DIR/training.png

Reads history.csv (written by train.py) or, for runs of the original, val_record.npy alone
(validation curves only). train.py also writes WEIGHTS_DIR/training.png after every epoch when
matplotlib is installed.
"""
import argparse
import sys

import lib.env  # noqa: F401  first: without the packages, one line instead of a traceback
from lib import UserError, command
from lib.plot import write


@command
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('weights_dir')
    p.add_argument('--out', help='PNG path (default WEIGHTS_DIR/training.png)')
    args = p.parse_args(argv)
    try:
        print(write(args.weights_dir, args.out))
    except (ValueError, OSError) as e:  # no records, a damaged one, a PNG that cannot be written
        raise UserError(str(e)) from None


if __name__ == '__main__':
    sys.exit(main())
