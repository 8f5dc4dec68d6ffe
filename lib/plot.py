"""Training curves: error and loss per epoch, training vs validation, as a PNG (plot.py, and
weights_dir/training.png after every epoch of a run)."""
import csv
import os

import numpy as np

from lib.atomic import atomic_write


def curves(weights_dir):
    """{name: (epochs, values)} from history.csv, else from val_record.npy."""
    history = os.path.join(weights_dir, 'history.csv')
    if os.path.exists(history):
        with open(history, newline='') as f:
            rows = list(csv.DictReader(f))
        col = {k: np.array([float(r[k]) for r in rows]) for k in rows[0]} if rows else {}
        if not rows:
            raise ValueError(f'{history} has no epochs yet')
        return {name: (col['epoch'], col[key]) for name, key in (
            ('train error', 'train_error'), ('val top-1 error', 'val_error'),
            ('val top-5 error', 'val_top5_error'), ('train loss', 'train_loss'),
            ('val loss', 'val_loss'))}
    record_file = os.path.join(weights_dir, 'val_record.npy')
    if not os.path.exists(record_file):
        raise ValueError(f'neither history.csv nor val_record.npy in {weights_dir}')
    record = np.load(record_file).reshape(-1, 2)
    epochs = np.arange(1, len(record) + 1)
    return {'val top-1 error': (epochs, record[:, 0]), 'val loss': (epochs, record[:, 1])}


def figure(weights_dir):
    """The matplotlib Figure of the curves: the error panel, then the loss panel (close it with
    matplotlib.pyplot.close)."""
    import matplotlib
    matplotlib.use('Agg')  # files only, no screen needed
    import matplotlib.pyplot as plt
    data = curves(weights_dir)
    fig, (ax_err, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for name, (epochs, values) in data.items():
        ax = ax_loss if name.endswith('loss') else ax_err
        ax.plot(epochs, values, marker='o', markersize=3, label=name,
                linestyle='--' if name.startswith('train') else '-')
    for ax, title in ((ax_err, 'error'), (ax_loss, 'loss')):
        ax.set_xlabel('epoch')
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(os.path.basename(os.path.normpath(weights_dir)))
    fig.tight_layout()
    return fig


def write(weights_dir, out=None):
    """Write the PNG; returns its path."""
    fig = figure(weights_dir)
    import matplotlib.pyplot as plt
    try:
        out = out or os.path.join(weights_dir, 'training.png')
        atomic_write(out, lambda tmp: fig.savefig(tmp, format='png', dpi=100))
    finally:
        plt.close(fig)
    return out


def write_quietly(weights_dir):
    """For train.py: the plot if matplotlib is installed; never stops training."""
    try:
        write(weights_dir)
    except ImportError:
        pass
    except Exception as e:  # noqa: BLE001 -- a failed plot must not end a training run
        print(f'notice: could not write {weights_dir}/training.png: {e}', flush=True)
