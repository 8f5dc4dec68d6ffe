"""Batch files: names, atomic writes, and the two kinds of work done in parallel (checking a file,
writing a batch), both pure functions of their input so that the output is the same for any number
of worker processes.

A batch of B images is one uint8 array (3, S, S, B) = channels, rows, cols, images ("c01b"), saved
with hickle. For each n in sub_batches it is written to the folder <tar_dir>_b<B>_b_<B//n>: as
NNNN.hkl if n == 1, else split into n consecutive equal parts NNNN_0.hkl ... NNNN_<n-1>.hkl.
"""
import multiprocessing
import os
import re
import signal
from dataclasses import dataclass

import h5py
import hickle
import numpy as np
from tqdm import tqdm

from lib.atomic import atomic_write
from preprocessing import PrepError
from preprocessing.images import BadImage, load_rgb, open_rgb

# No tqdm monitor thread: parallel_map forks its workers, and a fork while that thread holds tqdm's
# lock leaves the child waiting on it forever (tqdm/tqdm#627; seen here once in the test suite:
# a forked worker in futex_wait, the parent with a 'tqdm_monitor' thread). Bars still update on
# every step; only the every-10-s refresh of a stalled bar goes.
tqdm.monitor_interval = 0

TEMP = re.compile(r'^\..+\.tmp\d+$')  # '.0003.hkl.tmp<pid>': never mistaken for a batch file


def batch_dir(tar_dir, batch_size, n):
    return f'{tar_dir}_b{batch_size}_b_{batch_size // n}'


def batch_names(k, n):
    return [f'{k:04d}.hkl'] if n == 1 else [f'{k:04d}_{i}.hkl' for i in range(n)]


def save_hkl(path, array):
    """A hickle 5 file that the original's hickle (1.x, 2.x) reads too: theirs reads an array
    from the root datasets `data` (hickle 5's own) and `type` (['ndarray'], added here)."""
    def write(tmp):
        with h5py.File(tmp, 'w') as f:  # through h5py: hickle.dump(arr, filename) wants a .hkl name
            hickle.dump(array, f)
            f.create_dataset('type', data=np.array([b'ndarray']))
    atomic_write(path, write)


def remove_stale_temps(folders):
    """Delete temp files left by an interrupted run; returns how many."""
    removed = 0
    for folder in folders:
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if TEMP.match(name):
                    os.remove(os.path.join(folder, name))
                    removed += 1
    return removed


def check_file(path, size):
    """Phase 1: None if the file decodes fully, else the reason it does not."""
    try:
        open_rgb(path, size)
        return None
    except BadImage as e:
        return str(e)


@dataclass(frozen=True)
class BatchJob:
    """Phase 2 unit of work: one batch, written to every sub-batch folder."""
    images: tuple    # the B images (paths, archive members or CIFAR records: sources.py), in order
    outputs: tuple   # ((n, (path of part 0, ..., part n-1)), ...) one entry per n in sub_batches
    size: int        # S
    pad: int         # black border of S (the image is resized to S - 2 * pad)
    want_sum: bool   # return the per-pixel sum (training batches: for the mean image)


def run_job(job):
    """Write the missing files of a batch; returns (uint64 sum over images (3, S, S) or None, wrote)."""
    missing = [p for _, paths in job.outputs for p in paths if not os.path.exists(p)]
    if not missing:  # finished by an earlier run: read back only if its sum is needed
        return (read_batch(job).sum(axis=3, dtype=np.uint64) if job.want_sum else None), False
    images = []
    for path in job.images:
        try:
            images.append(load_rgb(path, job.size, job.pad))
        except BadImage as e:  # it decoded in phase 1 (of this run or of the one resumed): it changed
            raise PrepError(f'{path} became unreadable after it was checked ({e}); delete the outputs '
                            f'(batch folders, labels, misc_dir) and run again') from None
    batch = to_c01b(images)
    for n, paths in job.outputs:
        for path, part in zip(paths, np.split(batch, n, axis=3)):  # views; h5py copies them as needed
            if path in missing:
                save_hkl(path, part)
    return (batch.sum(axis=3, dtype=np.uint64) if job.want_sum else None), True


def to_c01b(images):
    """(3, S, S, B) array of B (S, S, 3) images. Built 16 images at a time: transposing the whole
    (B, S, S, 3) stack at once scatters single bytes over 50 MB and is about 4x slower."""
    size = images[0].shape[0]
    batch = np.empty((3, size, size, len(images)), np.uint8)
    for i in range(0, len(images), 16):
        batch[..., i:i + 16] = np.stack(images[i:i + 16], axis=3).transpose(2, 0, 1, 3)
    return batch


def read_batch(job):
    """The (3, S, S, B) array of a written batch, from its whole file if written, else from the
    parts of its first sub-batch folder; read with h5py (lib.data.read_hkl: never unpickles,
    and checks the type and shape)."""
    from lib.data import DataError, read_hkl  # here: lib.data imports torch (1.3 s, 190 MB),
    n, paths = min(job.outputs)                     # which only a resumed run needs
    parts = [np.empty((3, job.size, job.size, len(job.images) // n), np.uint8) for _ in paths]
    for path, part in zip(paths, parts):
        try:
            read_hkl(path, part.shape[3], out=part)
        except DataError as e:
            raise PrepError(f'{e}; delete it and run again to rewrite it') from None
    return parts[0] if n == 1 else np.concatenate(parts, axis=3)


def parallel_map(fn, items, count, workers, desc, step=1, chunksize=1, unit='img'):
    """Yield fn(item) for each of the `count` items (any iterable: read as the workers need them),
    in order, computed in `workers` processes (1: in this one), with a progress bar counting `step`
    `unit`s per item (hidden when stderr is not a terminal)."""
    with tqdm(total=count * step, desc=desc, unit=unit, disable=None, smoothing=0.1) as bar:
        # (each item counted before it is handed on: a consumer that stops at the last one, as
        # zip does, would otherwise leave the bar one short)
        if workers == 1:
            for item in items:
                result = fn(item)
                bar.update(step)
                yield result
            return
        with multiprocessing.Pool(workers, initializer=worker_signals) as pool:
            for result in pool.imap(fn, items, chunksize):
                bar.update(step)
                yield result


def worker_signals():
    # Ctrl-C: the main process stops the pool and reports once, instead of one traceback per worker;
    # the pool stops workers with SIGTERM, which must stay fatal (main's handler is inherited by fork).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
