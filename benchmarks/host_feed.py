"""Host feed: how fast raw uint8 batches get from hkl files into memory the GPU copies from.

    .venv/bin/python -m benchmarks.host_feed                          # 256 px, batches of 256
    .venv/bin/python -m benchmarks.host_feed --files 4 --repeats 5

With use_data_layer the host only reads the batch files and hands the uint8 c01b batches to the
device. This times, on synthetic batch files written to a temporary folder (page cache warm, as
for a dataset that is read epoch after epoch), every row in the same run, interleaved:

  read_hkl only            lib.data.read_hkl: a fresh array per batch (no slot)
  read_hkl + copy (old)    the loader process before: read_hkl, then a copy into the slot
  read_into slot (new)     lib.data.BatchFolder.read_into: HDF5 reads the bytes straight into
                           the slot (a mapped file on /dev/shm, as the loader's)
  loader process (new)     lib.loader.LoaderProcess with use_data_layer: the trainer asks for
                           batch after batch over its ZeroMQ control socket and gets each in a
                           slot of the ring of 2 (the trainer side does nothing else)

img/s = images / wall time of one pass over the files, median over --repeats passes; `x old` is
each row over `read_hkl + copy (old)`. On a CUDA machine the slots are also page-locked
(cudaHostRegister, lib.loader.SlotFeed), which changes nothing on the host side timed here.
"""
import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import h5py
import hickle
import numpy as np
import torch

from lib import data, loader


def write_batches(folder, n_files, batch, size, seed=0):
    """n_files synthetic NNNN.hkl batch files (uint8 (3, S, S, B), as preprocessing writes them),
    their labels and a mean image. Returns (labels file, mean file)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n_files):
        with h5py.File(os.path.join(folder, f'{i:04d}.hkl'), 'w') as f:
            hickle.dump(rng.integers(0, 256, (3, size, size, batch), dtype=np.uint8), f)
    labels, mean = os.path.join(folder, 'labels.npy'), os.path.join(folder, 'mean.npy')
    np.save(labels, rng.integers(0, 1000, n_files * batch))
    np.save(mean, np.full((3, size, size), 127.5, np.float32))
    return labels, mean


def time_pass(fn, n_files, batch):
    t0 = time.perf_counter()
    for i in range(n_files):
        fn(i)
    return n_files * batch / (time.perf_counter() - t0)


def loader_pass(proc, source, n_files):
    """One pass over the files through the loader process's ring, as ProcessLoader drives it."""
    B = source.batch_size
    step = lambda i: data.Step(i, torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long),  # noqa: E731
                               torch.zeros(B, dtype=torch.bool))
    t0 = time.perf_counter()
    pending = []
    for slot in range(min(loader.N_SLOTS, n_files)):
        proc.sock.send_multipart(loader.encode(loader.LOAD, 0, slot, slot, step(slot)))
        pending.append((slot, slot))
    nxt = len(pending)
    while pending:
        slot, file = pending.pop(0)
        proc._wait(slot, 0, file)
        if nxt < n_files:
            proc.sock.send_multipart(loader.encode(loader.LOAD, 0, slot, nxt, step(nxt)))
            pending.append((slot, nxt))
            nxt += 1
    return n_files * B / (time.perf_counter() - t0)


def run(args):
    work = tempfile.mkdtemp(prefix='bench-host-feed-', dir=args.work_dir)
    shm = '/dev/shm' if os.path.isdir('/dev/shm') else None
    slot_dir = tempfile.mkdtemp(prefix='bench-host-feed-slot-', dir=shm)
    proc = None
    try:
        folder = os.path.join(work, 'batches')
        labels, mean = write_batches(folder, args.files, args.batch, args.size)
        source = data.BatchFolder(folder, labels, args.batch)
        shape = (3, args.size, args.size, args.batch)
        slot = np.memmap(os.path.join(slot_dir, 'slot'), np.uint8, 'w+', shape=shape)
        slot[...] = 0  # mapped and touched once, as the loader's slots are after the first batch
        for i in range(args.files):  # page cache warm
            source.read(i)
        source.read_into(0, slot)
        if not np.array_equal(slot, source.read(0)):
            raise SystemExit('error: read_into gave other bytes than read_hkl')

        def old(i):
            slot[...] = source.read(i)

        rows = {'read_hkl only': lambda i: source.read(i),
                'read_hkl + copy into the slot (old loader path)': old,
                'read_into the slot (new loader path)': lambda i: source.read_into(i, slot)}
        proc = loader.LoaderProcess([source, source], mean, args.size - 29 if args.size >= 64
                                    else args.size, 'cpu', on_device=True, timeout=120)
        loader_pass(proc, source, args.files)  # warm-up
        last = args.files - 1
        if not np.array_equal(proc.slots[last % loader.N_SLOTS].numpy(), source.read(last)):
            raise SystemExit('error: the loader process put other bytes in its slot than read_hkl')
        name_proc = 'loader process, ring of 2 slots, use_data_layer (new)'
        rates = {name: [] for name in list(rows) + [name_proc]}
        for _ in range(args.repeats):  # interleaved: a load change hits every row alike
            for name, fn in rows.items():
                rates[name].append(time_pass(fn, args.files, args.batch))
            rates[name_proc].append(loader_pass(proc, source, args.files))
    finally:
        if proc is not None:
            proc.close()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(slot_dir, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    base = med['read_hkl + copy into the slot (old loader path)']
    mb = 3 * args.size * args.size * args.batch / 1e6
    print(f'machine: {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, '
          f'h5py {h5py.__version__}, python {platform.python_version()}')
    print(f'{args.files} batch files of {args.batch} images at {args.size} px ({mb:.1f} MB each), '
          f'page cache warm; median of {args.repeats} passes\n')
    print('| path | img/s | MB/s | x old |')
    print('|---|---:|---:|---:|')
    for name, r in med.items():
        print(f'| {name} | {r:.0f} | {r * mb / args.batch:.0f} | {r / base:.2f} |')
    return med


def main(argv=None):
    p = argparse.ArgumentParser(prog='python -m benchmarks.host_feed',
                                description=__doc__.split('\n')[0])
    p.add_argument('--files', type=int, default=6, help='batch files (6)')
    p.add_argument('--batch', type=int, default=256, help='images per file (256)')
    p.add_argument('--size', type=int, default=256, help='image side S (256)')
    p.add_argument('--repeats', type=int, default=7, help='passes per row; medians (7)')
    p.add_argument('--work-dir', help='where the batch files go (default: the temporary folder)')
    args = p.parse_args(argv)
    for name in ('files', 'batch', 'size', 'repeats'):
        if getattr(args, name) < 1:
            p.error(f'--{name} must be at least 1')
    run(args)
    return 0


if __name__ == '__main__':
    sys.exit(main())
