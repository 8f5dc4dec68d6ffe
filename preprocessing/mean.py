"""The mean image as a running exact total: one uint64 per-pixel sum (3, S, S) over the training
batches added so far, whatever their number (1.5 MiB at 256 px), instead of one sum per batch.

Sums of uint8 pixels in uint64 are exact, so the total does not depend on the order the batches
are added in nor on the number of workers, and the mean, total / images as float32, is the same bits
as summing all per-batch sums at the end.

misc_dir/mean_total.npz holds the total, which batches it includes, and the key of the run (a
digest of the settings and the valid input files). It is rewritten atomically every SAVE_EVERY_S
seconds and when the training batches are done or the run stops, so a resumed run reads back only
the finished batches that the saved total does not include yet. No pickle: plain arrays, loaded
with allow_pickle=False.
"""
import os
import sys
import time
import zipfile

import numpy as np

from lib.atomic import atomic_write

TOTAL = 'mean_total.npz'
SAVE_EVERY_S = 30.0


class MeanTotal:
    """Running uint64 total of the training batches; `included[k]`: batch k is in it."""

    def __init__(self, misc_dir, key, size, n_batches):
        self.path, self.key = os.path.join(misc_dir, TOTAL), key
        self.state = (np.zeros((3, size, size), np.uint64), np.zeros(n_batches, bool))
        self.saved_at = time.monotonic()
        if os.path.exists(self.path):
            found = self._load()
            if found is None:
                print(f'notice: {self.path} is not from this run\'s settings and files: '
                      f'reading the finished batches again for the mean image', file=sys.stderr)
            else:
                self.state = found

    @property
    def total(self):
        return self.state[0]

    @property
    def included(self):
        return self.state[1]

    def _load(self):
        """(total, included) saved by an earlier run over the same data, or None."""
        try:
            with np.load(self.path, allow_pickle=False) as f:
                if set(f.files) != {'key', 'total', 'included'}:
                    return None
                key, total, included = f['key'], f['total'], f['included']
        except (OSError, ValueError, zipfile.BadZipFile):
            return None
        if key.shape != () or str(key) != self.key or total.dtype != np.uint64 \
                or total.shape != self.total.shape or included.dtype != bool \
                or included.shape != self.included.shape:
            return None
        return total, included

    def add(self, k, batch_sum):
        included = self.included.copy()
        included[k] = True
        # one assignment of both: a Ctrl-C (KeyboardInterrupt, raised between two bytecodes) lands
        # before or after it, never between the total and its mark (copies: 0.12 ms a batch at 256 px)
        self.state = (self.total + batch_sum, included)
        if time.monotonic() - self.saved_at >= SAVE_EVERY_S:
            self.save()

    def save(self):
        total, included = self.state  # (one consistent pair)
        arrays = {'key': np.array(self.key), 'total': total, 'included': included}

        def write(tmp):  # np.savez's layout, with a fixed date: the same bytes for the same sums
            with zipfile.ZipFile(tmp, 'w') as z:
                for name, array in arrays.items():
                    with z.open(zipfile.ZipInfo(f'{name}.npy', (1980, 1, 1, 0, 0, 0)), 'w') as f:
                        np.lib.format.write_array(f, array, allow_pickle=False)
        atomic_write(self.path, write)
        self.saved_at = time.monotonic()

    def mean(self, batch_size):
        """float32 (3, S, S): the mean over every training image (all batches must be in)."""
        total, included = self.state
        missing = np.flatnonzero(~included)
        if missing.size:
            raise RuntimeError(f'mean image: batches {missing[:5].tolist()}... not summed')
        return (total / (included.size * batch_size)).astype(np.float32)
