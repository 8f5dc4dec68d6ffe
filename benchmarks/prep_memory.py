"""Preprocessing memory for the mean image: the running exact total (preprocessing/mean.py) against
the earlier way (one uint64 sum per training batch kept in a list, stacked and summed at the end),
on the same generated image tree, for a growing number of batches.

    .venv/bin/python -m benchmarks.prep_memory                        # 8 / 64 batches at 256 px
    .venv/bin/python -m benchmarks.prep_memory --batches 8 32 128 --img-size 256 --batch-size 2

Each row is one `python -m preprocessing.make_data` run (workers=1, so every sum lives in the one
measured process) in a fresh subprocess with tracemalloc on: the peak of traced memory (numpy's
arrays included) and the process's ru_maxrss, then a rerun over the finished outputs without
tracemalloc (what a resumed run does once the batches are written): the batch files it read back
and its time (torch, which reading back imports, imported before the clock starts; it is in
every row's ru_maxrss). The
"list" rows run make_data with phase_2 replaced by the earlier one (below, as it was), everything
else the same. A batch of B images at S px has a sum of 3 * S * S * 8 bytes (1.5 MiB at 256 px),
so the "list" peak grows by about twice that per batch (the list, then the stacked copy np.sum
makes); the running total stays flat. Tiny source images (8 x 8) keep decoding cheap: the sums
depend only on S and the number of batches.
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numpy as np
import yaml
from PIL import Image


def make_tree(root, n_train, n_val):
    rng = np.random.default_rng(0)
    for split, n in (('train', n_train), ('val', n_val)):
        for c in ('a', 'b'):
            os.makedirs(os.path.join(root, split, c))
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                os.path.join(root, split, 'ab'[i % 2], f'{i}.png'))


def list_phase_2(cfg, valid, workers, sources, key=None):
    """make_data.phase_2 before the running total: every training batch's sum kept in a list."""
    from lib.atomic import save_npy
    from preprocessing.make_data import batch_jobs
    from preprocessing.writer import parallel_map, run_job
    batch_size, sums, written = cfg['batch_size'], {}, 0
    for split in ('train', 'val'):
        count = len(valid[split]) // batch_size
        want = np.full(count, split == 'train')
        jobs = batch_jobs(cfg, sources[split], valid[split], cfg[f'tar_{split}_dir'], want)
        sums[split] = []
        for batch_sum, wrote in parallel_map(run_job, jobs, count, workers, f'write {split}', batch_size):
            sums[split].append(batch_sum)
            written += wrote * batch_size
    n_batches = {split: len(sums[split]) for split in sums}
    total = np.sum(sums['train'], axis=0, dtype=np.uint64)
    mean = (total / (n_batches['train'] * batch_size)).astype(np.float32)
    save_npy(os.path.join(cfg['misc_dir'], 'img_mean.npy'), mean)
    return n_batches, written


def child(mode, paths, trace):
    """One make_data run in this process; prints a JSON line of what it measured."""
    import lib.data  # noqa: F401  (imported by read_batch on a rerun: torch, 1.3 s, not timed)
    from preprocessing import make_data, writer
    if mode == 'list':
        make_data.phase_2 = list_phase_2
    reads = []
    real = writer.read_batch
    writer.read_batch = lambda job: reads.append(1) or real(job)
    if trace == 'trace':
        tracemalloc.start()
    t0 = time.perf_counter()
    with open(os.devnull, 'w') as quiet:
        sys.stdout = quiet
        make_data.make_data(paths, workers=1)
        sys.stdout = sys.__stdout__
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({'peak': peak, 'rss': rss, 'seconds': seconds, 'reads': len(reads)}))


def measure(mode, paths, trace):
    r = subprocess.run([sys.executable, '-m', 'benchmarks.prep_memory', '--child', mode, paths, trace],
                       capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f'error: make_data ({mode}) failed: {r.stderr.strip().splitlines()[-1:]}')
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(prog='python -m benchmarks.prep_memory', description=__doc__.split('\n\n')[0])
    p.add_argument('--batches', type=int, nargs='+', default=[8, 64], help='training batches per row')
    p.add_argument('--img-size', type=int, default=256)
    p.add_argument('--batch-size', type=int, default=2)
    p.add_argument('--child', nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(*args.child)
    S, B = args.img_size, args.batch_size
    print(f'# {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; '
          f'img_size {S}, batch_size {B}: one batch sum = {3 * S * S * 8 / 2**20:.2f} MiB')
    rows = []
    with tempfile.TemporaryDirectory(prefix='prep-memory-') as tmp:
        for n in args.batches:
            tree = os.path.join(tmp, f'raw{n}')
            make_tree(tree, n * B, B)
            for mode in ('list', 'running'):
                out = os.path.join(tmp, f'{mode}{n}')
                paths = os.path.join(tmp, f'{mode}{n}.yaml')
                with open(paths, 'w') as f:
                    yaml.safe_dump(dict(train_img_dir=f'{tree}/train', val_img_dir=f'{tree}/val',
                                        tar_root_dir=out, tar_train_dir=f'{out}/train_hkl',
                                        tar_val_dir=f'{out}/val_hkl', misc_dir=f'{out}/misc',
                                        img_size=S, batch_size=B, sub_batches=[1], workers=1,
                                        layout='folders'), f)
                first, rerun = measure(mode, paths, 'trace'), measure(mode, paths, 'time')
                mean = np.load(f'{out}/misc/img_mean.npy')
                rows.append((mode, n, first, rerun, mean))
    means = {}
    for mode, n, _, _, mean in rows:
        means.setdefault(n, {})[mode] = mean.tobytes()
    same = all(len(set(m.values())) == 1 for m in means.values())
    print('| mean kept as | train batches | peak traced MiB | × list | ru_maxrss MiB | '
          'rerun: batches read back | rerun s |')
    print('|---|---:|---:|---:|---:|---:|---:|')
    base = {n: first['peak'] for mode, n, first, _, _ in rows if mode == 'list'}
    for mode, n, first, rerun, _ in rows:
        label = 'list of per-batch sums (before)' if mode == 'list' else 'running total (now)'
        print(f'| {label} | {n} | {first["peak"] / 2**20:.1f} | {first["peak"] / base[n]:.2f} | '
              f'{first["rss"] / 2**20:.0f} | {rerun["reads"]} | {rerun["seconds"]:.2f} |')
    print(f'img_mean.npy identical bytes for both ways: {same}')
    return 0 if same else 1


if __name__ == '__main__':
    sys.exit(main())
