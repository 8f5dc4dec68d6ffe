"""Preprocessing speed: ImageNet's official archives read in place vs. the same images extracted.

    .venv/bin/python -m benchmarks.archives                      # 1,800 JPEGs of 256 px, 1 and 2 workers
    .venv/bin/python -m benchmarks.archives --classes 20 --per-class 200 --repeats 5

Generates one dataset of synthetic photo-like JPEGs (smooth colour fields plus grain, 256 x 256,
quality 90), written both as ImageNet ships it (ILSVRC2012_img_train.tar of per-class tars,
ILSVRC2012_img_val.tar) and as its extraction (train/<wnid>/*.JPEG, a flat val/), with one devkit
folder for both. Then runs the whole preprocessing (python -m preprocessing.make_data: check, write,
img_size 256, whole batches only) on each, with 1 and 2 workers, from scratch each time (outputs
deleted: the archive runs include indexing the archives), passes interleaved (in reverse order every
other repeat, so that each archive pass runs right before or after the folders pass of the same
repeat and worker count), all inputs in the page cache. Prints the median wall and CPU time (all its
processes) of --repeats passes, from the start of make_data to its end (not the interpreter start),
and the ratios archive / folders at the same number of workers: the median over the repeats of
the ratio of the two adjacent passes, which cancels most of the load that other processes put on a
shared machine (goal: at most 1.10). The CPU time is the steadier figure there; its system part
(mostly writing the batches) varies most. Also prints the CPU time the archive passes spend
indexing the archives (work the folder passes do not have). Then times the read path alone in this
process: every training image read, decoded and resized from the folder and from the archive (what
the workers do, without the writing), alternating too.
"""
import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
import scipy.io
import yaml
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def photo(rng, size):
    """JPEG bytes of a size x size image: a smooth random colour field (an 8 x 8 grid, bicubic) plus
    grain, compressing like a photo (about 20 KB at 256 px, quality 90)."""
    field = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    grain = rng.normal(0, 6, (size, size, 3))
    im = Image.fromarray(np.clip(np.asarray(field) + grain, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    im.save(buf, format='JPEG', quality=90)
    return buf.getvalue()


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_dataset(root, classes, per_class, n_val, size):
    """Folders and archives of the same JPEGs, and a devkit folder; returns the total bytes of JPEGs."""
    rng = np.random.default_rng(0)
    wnids = [f'n{10000000 + 7919 * i:08d}' for i in range(classes)]
    os.makedirs(os.path.join(root, 'tars'))
    total = 0
    with tarfile.open(os.path.join(root, 'tars', 'ILSVRC2012_img_train.tar'), 'w') as outer:
        for wnid in wnids:
            folder = os.path.join(root, 'folders', 'train', wnid)
            os.makedirs(folder)
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode='w') as inner:
                for j in range(per_class):
                    name, data = f'{wnid}_{j}.JPEG', photo(rng, size)
                    total += len(data)
                    with open(os.path.join(folder, name), 'wb') as f:
                        f.write(data)
                    add(inner, name, data)
            add(outer, f'{wnid}.tar', inner_bytes.getvalue())
    val_dir, kit = os.path.join(root, 'folders', 'val'), os.path.join(root, 'devkit', 'data')
    os.makedirs(val_dir)
    os.makedirs(kit)
    with tarfile.open(os.path.join(root, 'tars', 'ILSVRC2012_img_val.tar'), 'w') as tar:
        for k in range(1, n_val + 1):
            name, data = f'ILSVRC2012_val_{k:08d}.JPEG', photo(rng, size)
            total += len(data)
            with open(os.path.join(val_dir, name), 'wb') as f:
                f.write(data)
            add(tar, name, data)
    synsets = np.array([(i + 1, w, f'class {i}') for i, w in enumerate(wnids)],
                       dtype=[('ILSVRC2014_ID', 'O'), ('WNID', 'O'), ('words', 'O')])
    scipy.io.savemat(os.path.join(kit, 'meta_clsloc.mat'), {'synsets': synsets})
    with open(os.path.join(kit, 'ILSVRC2014_clsloc_validation_ground_truth.txt'), 'w') as f:
        f.write(''.join(f'{k % classes + 1}\n' for k in range(n_val)))
    return total


def paths_file(root, source, batch_size):
    inputs = {'folders': ('folders/train', 'folders/val'),
              'archive': ('tars/ILSVRC2012_img_train.tar', 'tars/ILSVRC2012_img_val.tar')}[source]
    out = f'out_{source}'
    cfg = dict(train_img_dir=inputs[0], val_img_dir=inputs[1], devkit='devkit', layout='auto',
               tar_root_dir=out, tar_train_dir=f'{out}/train_hkl', tar_val_dir=f'{out}/val_hkl',
               misc_dir=f'{out}/misc', img_size=256, batch_size=batch_size, sub_batches=[1])
    path = os.path.join(root, f'{source}.yaml')
    with open(path, 'w') as f:
        yaml.safe_dump(cfg, f)
    return path, os.path.join(root, out)


PASS = """
import json, resource, sys, time
from preprocessing import make_data
def cpu():
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))
listing = make_data.list_dataset
def timed_listing(*args):
    global list_cpu
    before = cpu()
    result = listing(*args)
    list_cpu = cpu() - before
    return result
make_data.list_dataset = timed_listing
start = time.perf_counter()
make_data.make_data(sys.argv[1], workers=int(sys.argv[2]))
wall = time.perf_counter() - start
print(json.dumps([wall, cpu(), list_cpu]))
"""


def one_pass(paths, out, workers):
    """(wall seconds, CPU seconds of all its processes, CPU seconds listing the dataset: indexing,
    for the archives) of a whole preprocessing run from scratch, in a fresh process; the
    interpreter's start and imports (about 1 s) are not counted."""
    shutil.rmtree(out, ignore_errors=True)
    r = subprocess.run([sys.executable, '-c', PASS, paths, str(workers)], cwd=ROOT, capture_output=True,
                       text=True)
    if r.returncode:
        sys.exit(f'preprocessing failed: {r.stderr.strip()}')
    return json.loads(r.stdout.strip().splitlines()[-1])


def same_outputs(a, b):
    """The two runs wrote the same batches, labels, mean and lists (a check, not a timing); the
    records of the run (fingerprint, mean_total: keyed by the layout) differ by design."""
    names = sorted(os.path.relpath(os.path.join(d, f), a) for d, _, fs in os.walk(a) for f in fs
                   if not f.endswith(('.index.npz', 'fingerprint.json', 'dataset.yaml', 'mean_total.npz')))
    return all(open(os.path.join(a, n), 'rb').read() == open(os.path.join(b, n), 'rb').read() for n in names)


def read_only(root, repeats):
    """{source: median seconds} to read, decode and resize every training image in this process, from
    the folders and from the archive (its index made by the archive passes): the read path alone."""
    from preprocessing.archives import train_archive
    from preprocessing.images import load_rgb
    from preprocessing.sources import FolderSource
    _, members = train_archive(os.path.join(root, 'tars', 'ILSVRC2012_img_train.tar'),
                               os.path.join(root, 'out_archive', 'misc'))
    sources = {'folders': FolderSource(os.path.join(root, 'folders', 'train')), 'archive': members}
    times = {s: [] for s in sources}
    for r in range(repeats):
        for name, source in list(sources.items())[::1 if r % 2 == 0 else -1]:
            start = time.perf_counter()
            for f in members.names:
                load_rgb(source.locate(f), 256)
            times[name].append(time.perf_counter() - start)
    return {s: statistics.median(t) for s, t in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(prog='python -m benchmarks.archives', description=__doc__.split('\n\n')[0])
    p.add_argument('--classes', type=int, default=10)
    p.add_argument('--per-class', type=int, default=150)
    p.add_argument('--val', type=int, default=300, help='val images')
    p.add_argument('--size', type=int, default=256, help='side of the generated JPEGs')
    p.add_argument('--batch', type=int, default=100, help='batch_size')
    p.add_argument('--workers', type=int, nargs='+', default=[1, 2])
    p.add_argument('--repeats', type=int, default=5)
    args = p.parse_args(argv)
    root = tempfile.mkdtemp(prefix='bench_archives_')
    try:
        jpeg_bytes = make_dataset(root, args.classes, args.per_class, args.val, args.size)
        n = args.classes * args.per_class + args.val
        runs = {(s, w): [] for w in args.workers for s in ('folders', 'archive')}
        files = {s: paths_file(root, s, args.batch) for s in ('folders', 'archive')}
        for r in range(args.repeats):  # interleaved, in reverse order every other time: load changes
            for source, workers in list(runs)[::1 if r % 2 == 0 else -1]:      # and order hit every row
                runs[(source, workers)].append(one_pass(*files[source], workers))
        identical = same_outputs(files['folders'][1], files['archive'][1])
        print(f'{n} JPEGs of {args.size} px ({jpeg_bytes / n / 1024:.0f} KiB on average; {args.classes} classes), '
              f'img_size 256, batch {args.batch}; {platform.processor() or platform.machine()}, '
              f'{os.cpu_count()} cores; median of {args.repeats} passes; outputs identical: {identical}')
        print('\n| source | workers | wall s (median) | img/s | wall × folders | CPU s (median) | CPU × folders |')
        print('|---|---:|---:|---:|---:|---:|---:|')
        for (source, workers), passes in runs.items():
            wall, cpu = (statistics.median(p[i] for p in passes) for i in (0, 1))
            wall_x, cpu_x = (statistics.median(p[i] / b[i] for p, b in zip(passes, runs[('folders', workers)]))
                             for i in (0, 1))  # each pass over the folders pass run next to it
            print(f'| {source} | {workers} | {wall:.2f} | {n / wall:.0f} | {wall_x:.3f} | {cpu:.2f} | {cpu_x:.3f} |')
        index = [p[2] - b[2] for w in args.workers for p, b in zip(runs[('archive', w)], runs[('folders', w)])]
        share = [p[2] / p[1] for w in args.workers for p in runs[('archive', w)]]
        print(f'\nindexing the archives (listing them, over listing the folders): {statistics.median(index):.3f} s '
              f'CPU (median of the {len(index)} archive passes), {100 * statistics.median(share):.1f} % of '
              f'their CPU time')
        read = read_only(root, args.repeats)
        n_train = args.classes * args.per_class
        print(f'\nread + decode + resize to 256 of the {n_train} training images, one process, no writing '
              f'(median of {args.repeats}):\n')
        print('| source | seconds | img/s | time × folders |')
        print('|---|---:|---:|---:|')
        for source, seconds in read.items():
            print(f'| {source} | {seconds:.3f} | {n_train / seconds:.0f} | {seconds / read["folders"]:.3f} |')
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
    main()
