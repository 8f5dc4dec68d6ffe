"""Reading one rank's rows of a batch file: the whole file then a slice (what lib.data.BatchFolder
does) against reading only the rows, for N ranks sharing every batch (torchrun; N = 2 is a
train_2gpu.py worker taking its half of a whole batch).

    .venv/bin/python -m benchmarks.row_read                  # 256 px, batches of 256 (50 MB files)
    .venv/bin/python -m benchmarks.row_read --files 2 --repeats 3 --size 64 --batch 64

A batch file is hickle's HDF5: one uint8 dataset (3, S, S, B), images on the LAST axis. Rank r of
N needs [..., r*B/N:(r+1)*B/N]: from every one of the 3*S*S pixels a run of B/N bytes, B bytes apart.
Ways to read it (all give the same array; checked):
  whole    read_hkl(path) (the whole dataset), then np.ascontiguousarray(x[..., r0:r1])
  h5py     dataset[..., r0:r1]: an HDF5 hyperslab, 3*S*S blocks of B/N bytes
  rows     lib.data.read_hkl_rows, what BatchFolder.read does for rows now: np.memmap of the file
           at the dataset's offset (hickle's datasets are contiguous and uncompressed: checked and
           printed; else it reads the h5py hyperslab), then np.ascontiguousarray of the slice
  part     read_hkl of a file holding only those rows (NNNN_<r>.hkl of a `sub_batches: [1, N]` folder;
           for N = 2 the halves train_2gpu.py workers read before): the floor, at the price of a
           second copy of the data on disk
Warm: the files are in the page cache; every rank's read of every file is timed, and the table
gives the median time per rank per file and what all N ranks of a node spend per batch (N reads).
Cold: before each read the file is dropped from the page cache (fsync, posix_fadvise DONTNEED),
one rank's read per file per pass (on a VM disk the host may still cache: compare rows of one run); every
page of the file holds bytes of every rank, so a cold read fetches the whole file whichever way
(the other ranks of a node then find it in the cache).
The ways are interleaved read by read, in a rotating order, so a load change hits all alike.
"""
import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import h5py
import numpy as np

from lib.data import hkl_dataset, read_hkl
from preprocessing.writer import save_hkl

WAYS = ('whole', 'h5py', 'rows', 'part')
FILE_BATCH = [None]  # B, set by main


def layout(path):
    """(offset, shape, dtype) of the batch dataset when it is contiguous and uncompressed, else None."""
    with h5py.File(path, 'r') as f:
        d = hkl_dataset(f, path)
        if d.chunks is not None or d.compression is not None or d.id.get_offset() is None:
            return None
        return d.id.get_offset(), d.shape, d.dtype


def part_path(path, r0, r1):
    return f'{path[:-4]}_{r0}_{r1}.hkl'


def read(way, path, r0, r1):
    if way == 'part':
        return read_hkl(part_path(path, r0, r1))
    if way == 'whole':
        return np.ascontiguousarray(read_hkl(path)[..., r0:r1])
    if way == 'h5py':
        with h5py.File(path, 'r') as f:
            return hkl_dataset(f, path)[..., r0:r1]
    return read_hkl(path, FILE_BATCH[0], (r0, r1))


def drop_cache(path):
    if not os.path.exists(path):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(way, path, r0, r1, cold):
    if cold:
        drop_cache(path)
        drop_cache(part_path(path, r0, r1))
    t0 = time.perf_counter()
    x = read(way, path, r0, r1)
    return time.perf_counter() - t0, x


def main(argv=None):
    p = argparse.ArgumentParser(prog='python -m benchmarks.row_read', description=__doc__.split('\n\n')[0])
    p.add_argument('--files', type=int, default=4, help='batch files (each read by every rank)')
    p.add_argument('--size', type=int, default=256, help='S (image side)')
    p.add_argument('--batch', type=int, default=256, help='B (images per file)')
    p.add_argument('--ranks', type=int, nargs='+', default=[2, 4, 8])
    p.add_argument('--repeats', type=int, default=5, help='passes over the files (warm)')
    p.add_argument('--no-cold', action='store_true', help='skip the cold rows')
    args = p.parse_args(argv)
    S, B = args.size, args.batch
    if any(B % n for n in args.ranks):
        print(f'error: --batch {B} does not split over every --ranks value', file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix='row-read-', dir=os.environ.get('TMPDIR', '/var/tmp')) as tmp:
        paths = []
        for i in range(args.files):
            paths.append(os.path.join(tmp, f'{i:04d}.hkl'))
            x = rng.integers(0, 256, (3, S, S, B), dtype=np.uint8)
            save_hkl(paths[-1], x)
            for n in args.ranks:
                for r in range(n):
                    r0, r1 = r * B // n, (r + 1) * B // n
                    save_hkl(part_path(paths[-1], r0, r1), x[..., r0:r1])
        contiguous = layout(paths[0]) is not None
        FILE_BATCH[0] = B
        mb = os.path.getsize(paths[0]) / 1e6
        print(f'# {platform.machine()}, {os.cpu_count()} cores; {args.files} files of uint8 (3, {S}, {S}, '
              f'{B}) = {mb:.1f} MB; hickle dataset contiguous and uncompressed: {contiguous}; '
              f'medians of {args.repeats} passes (warm: every rank, cold: one rank per file)')
        print('| cache | N ranks | read | ms per rank per file | ms per batch, all N ranks | × whole |')
        print('|---|---:|---|---:|---:|---:|')
        for cold in ((False,) if args.no_cold else (False, True)):
            for n in args.ranks:
                rows = [(r * B // n, (r + 1) * B // n) for r in range(n)]
                times = {w: [] for w in WAYS}
                k = 0
                for rep in range(args.repeats):
                    for i, path in enumerate(paths):
                        for r0, r1 in (rows[i % n:i % n + 1] if cold else rows):
                            k += 1  # rotate the order of the ways from one read to the next
                            order = WAYS[k % len(WAYS):] + WAYS[:k % len(WAYS)]
                            got = {w: timed(w, path, r0, r1, cold) for w in order}
                            for w in WAYS:
                                times[w].append(got[w][0])
                                if not np.array_equal(got[w][1], got['whole'][1]):
                                    raise SystemExit(f'error: {w} read other bytes than whole')
                base = statistics.median(times['whole'])
                for w in WAYS:
                    med = statistics.median(times[w])
                    node = '-' if cold else f'{1e3 * med * n:.1f}'
                    print(f'| {"cold" if cold else "warm"} | {n} | {w} | {1e3 * med:.2f} | {node} | '
                          f'{med / base:.2f} |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
