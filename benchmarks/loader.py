"""Input pipeline speed: preprocessed hickle batches vs. decoding JPEGs on the fly, on the same images.

    # simplest: give a class-folder tree with train/ (and val/); the script takes --limit images per
    # class (a tree of symlinks), preprocesses them with the repo's own preprocessing
    # (python -m preprocessing.make_data PATHS --workers 2) into a temporary folder, and times both
    .venv/bin/python -m benchmarks.loader --jpeg-root /tmp/cifar/cifar10-jpg --limit 300 --img-size 256
    .venv/bin/python -m benchmarks.loader --jpeg-root /tmp/cifar/cifar10-jpg --limit 300 --img-size 32
    # the same images re-encoded at ImageNet's typical size first (decode cost of large JPEGs)
    .venv/bin/python -m benchmarks.loader --jpeg-root /tmp/cifar/cifar10-jpg --limit 300 --source-size 400x350
    # data already preprocessed (e.g. by sh preprocessing/generate_data.sh): name both versions
    .venv/bin/python -m benchmarks.loader --jpeg-dir data/mine/raw/train \\
        --hkl-dir data/mine/train_hkl_b128_b_128 --labels data/mine/labels/train_labels.npy \\
        --mean data/mine/misc/img_mean.npy

Pipelines, each run with k = 1 .. --max-procs processes, torch.set_num_threads(1) in each:
  hkl   k reader processes; each repeatedly does BatchFolder.read(i) + crop_mirror(...) over its share
        of the batch files (file i for i = rank, rank + k, ...), with the steps of lib.data.make_plan
        (random per-image crop and mirror, as training does), giving float32 (B, 3, c, c) tensors
        in the reader process (not shipped to a consumer).
  jpeg  the usual baseline without preprocessing: a torch.utils.data.DataLoader with k workers over
        the JPEG files, whose Dataset does PIL open + convert('RGB') + resize to S x S (BILINEAR)
        + random crop c + random mirror + float32 minus the mean image (numpy), batch size B; batches
        arrive in the main process (through shared memory).
Each pass times at least --images images after one warm-up batch per process, every process doing
the same number of batches; img/s = images / wall time. The table holds the median over --repeats
passes; passes of the two pipelines and of each k are interleaved, so a load change on the machine
hits all rows alike. With --jpeg-root, the JPEG pipeline reads exactly the images of the hkl batches
(misc/train.txt, last incomplete batch dropped) and the script checks that one of them decodes to the
same pixels as in its batch file.

Caveat: what decoding costs depends on the size of the source JPEGs. CIFAR-10 images are 32 x 32, so
their decode is cheap: resizing them to 256 reflects the resize cost, not the decode of large JPEGs
(ImageNet averages about 400 x 350 px, i.e. over 100x more pixels to decode per image); on ImageNet
the jpeg rows would be slower than here. The source size is printed in the header.
"""
import argparse
import math
import multiprocessing
import os
import platform
import queue
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler

from lib.data import (BatchFolder, DataError, HostBuffers, batch_files, crop_mirror, load_mean,
                      make_plan, read_hkl)
from preprocessing import PrepError
from preprocessing.layouts import image_files, subfolders

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600  # a pass that takes longer than this has hung


class BenchError(Exception):
    """Bad input: printed as one line `error: ...`, exit status 2."""


def default_crop(size):
    """227 for 256 (AlexNet), the whole image for small ones (CIFAR's 32)."""
    return size - 29 if size >= 64 else size


# --- hkl: reader processes ---------------------------------------------------------------------

def hkl_reader(rank, procs, folder, labels, batch_size, mean_file, crop, n_batches, seed, barrier,
               results):
    """One reader process of a pass: a warm-up batch, then (after the start barrier) n_batches."""
    try:
        torch.set_num_threads(1)
        source = BatchFolder(folder, labels, batch_size)
        size = source.image_size()
        mean = load_mean(mean_file, size)
        gen = torch.Generator().manual_seed(seed + rank)

        def steps():  # this process's share of the steps of epoch after epoch
            while True:
                plan = make_plan(gen, len(source), batch_size, size, crop, train=True)
                yield from plan[rank::procs] or plan  # fewer files than processes: all of them

        it = steps()

        buffers = HostBuffers()  # reused buffers, as the loader process and train.py do

        def one():
            step = next(it)
            x = crop_mirror(torch.from_numpy(source.read(step.file)), mean, step, crop,
                            buffers=buffers)
            y = torch.from_numpy(source.labels[step.file])
            return x, y

        x, y = one()
        if x.shape != (batch_size, 3, crop, crop) or x.dtype != torch.float32 or y.shape != (batch_size,):
            raise BenchError(f'hkl reader produced {tuple(x.shape)} {x.dtype}')
    except Exception as e:  # noqa: BLE001 -- reported by the parent as one line
        results.put(('error', f'{type(e).__name__}: {e}' if not isinstance(e, (DataError, BenchError))
                     else str(e)))
        barrier.abort()
        return
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        return
    try:
        for _ in range(n_batches):
            one()
    except Exception as e:  # noqa: BLE001
        results.put(('error', f'{type(e).__name__}: {e}'))
        return
    results.put(('done', n_batches * batch_size))


def time_hkl(hkl, procs, crop, n_batches, seed):
    """img/s of one pass of `procs` reader processes, each doing n_batches after a warm-up batch."""
    ctx = multiprocessing.get_context()
    barrier, results = ctx.Barrier(procs + 1), ctx.Queue()
    workers = [ctx.Process(target=hkl_reader, daemon=True,
                           args=(r, procs, hkl['dir'], hkl['labels'], hkl['batch_size'], hkl['mean'],
                                 crop, n_batches, seed, barrier, results)) for r in range(procs)]
    for w in workers:
        w.start()
    try:
        try:
            barrier.wait(timeout=TIMEOUT_S)
        except threading.BrokenBarrierError:
            raise BenchError(first_error(results, 'an hkl reader process failed during its warm-up')) from None
        t0 = time.perf_counter()
        images = 0
        for _ in range(procs):
            try:
                kind, value = results.get(timeout=TIMEOUT_S)
            except queue.Empty:
                raise BenchError(f'an hkl reader process gave no result in {TIMEOUT_S} s') from None
            if kind == 'error':
                raise BenchError(value)
            images += value
        return images / (time.perf_counter() - t0)
    finally:
        for w in workers:
            w.join(timeout=10)
            if w.is_alive():
                w.terminate()


def first_error(results, fallback):
    try:
        kind, value = results.get(timeout=5)
        return value if kind == 'error' else fallback
    except queue.Empty:  # the process died without a word
        return fallback


# --- jpeg: DataLoader ----------------------------------------------------------------------------

class JpegImages(Dataset):
    """Decode + resize + random crop/mirror + mean subtraction per image, as a user without
    preprocessing would write it (PIL and numpy; no torchvision)."""

    def __init__(self, paths, labels, size, crop, mean):
        self.paths, self.labels, self.size, self.crop, self.mean = paths, labels, size, crop, mean
        self.margin = (size - crop) // 2

    def __len__(self):
        return len(self.paths)

    def decode(self, i):
        """uint8 (S, S, 3): the file opened, converted to RGB and resized."""
        with Image.open(self.paths[i]) as im:
            return np.asarray(im.convert('RGB').resize((self.size, self.size), Image.BILINEAR))

    def __getitem__(self, i):
        a, c = self.decode(i), self.crop
        # the offsets and mirror of lib.data.make_plan: round(u * 2 * margin), u >= 0.5
        x0, y0 = round(random.random() * 2 * self.margin), round(random.random() * 2 * self.margin)
        x = a[y0:y0 + c, x0:x0 + c].transpose(2, 0, 1).astype(np.float32) \
            - self.mean[:, y0:y0 + c, x0:x0 + c]
        if random.random() >= 0.5:
            x = x[:, :, ::-1]
        return torch.from_numpy(np.ascontiguousarray(x)), self.labels[i]


def one_thread(worker_id):
    torch.set_num_threads(1)


def time_jpeg(dataset, batch_size, procs, n_batches, seed):
    """img/s of one pass of a DataLoader with `procs` workers: one warm-up batch per worker, then
    n_batches (a multiple of procs, so every worker does the same number)."""
    total = (procs + n_batches) * batch_size
    sampler = RandomSampler(dataset, num_samples=total, generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=procs,
                        drop_last=True, worker_init_fn=one_thread, timeout=TIMEOUT_S)
    it = iter(loader)
    x, y = next(it)
    if x.shape != (batch_size, 3, dataset.crop, dataset.crop) or x.dtype != torch.float32:
        raise BenchError(f'jpeg pipeline produced {tuple(x.shape)} {x.dtype}')
    for _ in range(procs - 1):
        next(it)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    rate = n_batches * batch_size / (time.perf_counter() - t0)
    del it  # the sampler is spent: the workers have nothing left to do and exit
    return rate


# --- inputs --------------------------------------------------------------------------------------

def list_tree(root):
    """Paths and labels (class folder index) of the images of a class-folder tree."""
    paths, labels = [], []
    for label, c in enumerate(subfolders(root)):
        names = image_files(os.path.join(root, c))
        paths += [os.path.join(root, c, n) for n in names]
        labels += [label] * len(names)
    if not paths:
        raise BenchError(f'no class folders with images (.jpg/.jpeg/.png) in {root}')
    return paths, labels


def size_wxh(text):
    """'400x350' -> (400, 350), for --source-size."""
    try:
        w, h = (int(n) for n in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not WxH, e.g. 400x350') from None
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f'{text!r}: sides must be at least 1')
    return w, h


def link_subset(src, dst, per_class, last=False, source_size=None):
    """A class-folder tree of symlinks to the first (or last) `per_class` images of each class;
    with source_size (w, h), JPEG copies resized to it instead (quality 90).
    Returns (number of classes, number of files)."""
    classes = subfolders(src)
    if not classes:
        raise BenchError(f'no class folders in {src}')
    linked = 0
    for c in classes:
        names = image_files(os.path.join(src, c))
        os.makedirs(os.path.join(dst, c))
        for n in (names[-per_class:] if last else names[:per_class]):
            if source_size:
                with Image.open(os.path.join(src, c, n)) as im:
                    big = im.convert('RGB').resize(source_size, Image.BICUBIC)
                big.save(os.path.join(dst, c, os.path.splitext(n)[0] + '.jpg'), quality=90)
            else:
                os.symlink(os.path.join(src, c, n), os.path.join(dst, c, n))
            linked += 1
    return len(classes), linked


def build(args, work):
    """--jpeg-root mode: subset trees, paths.yaml, preprocessing. Returns (hkl dict, dataset args,
    one line about the preprocessing run)."""
    root = os.path.abspath(args.jpeg_root)
    src = os.path.join(work, 'src')
    if os.path.exists(src):
        shutil.rmtree(src)
    n_classes, n_train = link_subset(os.path.join(root, 'train'), os.path.join(src, 'train'),
                                     args.limit, source_size=args.source_size)
    # val is only there because preprocessing wants one batch of it: take as few images as possible
    per_class = math.ceil(args.batch_size / n_classes) + 2
    val = os.path.join(root, 'val')
    if os.path.isdir(val):
        n_val = link_subset(val, os.path.join(src, 'val'), per_class)[1]
    else:
        n_val = link_subset(os.path.join(root, 'train'), os.path.join(src, 'val'), per_class, last=True)[1]
    out = os.path.join(work, 'data')
    paths_file = os.path.join(work, 'paths.yaml')
    with open(paths_file, 'w') as f:
        f.write(f'train_img_dir: {src}/train\nval_img_dir: {src}/val\nlayout: folders\n'
                f'tar_root_dir: {out}\ntar_train_dir: {out}/train_hkl\ntar_val_dir: {out}/val_hkl\n'
                f'misc_dir: {out}/misc\nimg_size: {args.img_size}\nbatch_size: {args.batch_size}\n'
                f'sub_batches: [1]\nworkers: {args.prep_workers}\n')
    cmd = [sys.executable, '-m', 'preprocessing.make_data', paths_file, '--workers', str(args.prep_workers)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip() or f'exit status {done.returncode}').splitlines()[-1]
        raise BenchError(f'preprocessing failed ({" ".join(cmd[1:])}): {last}')
    summary = next((line for line in done.stdout.splitlines() if line.startswith('done in')), '')
    hkl = {'dir': f'{out}/train_hkl_b{args.batch_size}_b_{args.batch_size}',
           'labels': f'{out}/labels/train_labels.npy', 'mean': f'{out}/misc/img_mean.npy'}
    # the images of the batch files, in batch order: train.txt lists them, shuffled, incomplete batch included
    n_images = len(batch_files(hkl['dir'])) * args.batch_size
    with open(f'{out}/misc/train.txt', encoding='utf-8') as f:
        listed = [line.rsplit(' ', 1) for line in f.read().splitlines()[:n_images]]
    paths = [os.path.join(src, 'train', *name.split('/')) for name, _ in listed]
    labels = [int(y) for _, y in listed]
    prep = (f'preprocessing ({args.prep_workers} workers, {n_train} train + {n_val} val files): '
            f'{seconds:.1f} s; {summary}')
    return hkl, paths, labels, prep


def check_paths(args):
    """The first missing input, as a BenchError."""
    if args.jpeg_root:
        want = [('--jpeg-root', args.jpeg_root, os.path.isdir),
                ('--jpeg-root', os.path.join(args.jpeg_root, 'train'), os.path.isdir)]
    else:
        want = [('--jpeg-dir', args.jpeg_dir, os.path.isdir), ('--hkl-dir', args.hkl_dir, os.path.isdir),
                ('--labels', args.labels, os.path.isfile), ('--mean', args.mean, os.path.isfile)]
    for flag, path, ok in want:
        if not ok(path):
            what = 'directory' if ok is os.path.isdir else 'file'
            raise BenchError(f'{flag}: no such {what}: {path}')


def same_pixels(hkl, dataset):
    """Max |difference| between image 0 of batch file 0 and the JPEG pipeline's decode of the
    first listed file (0 when both pipelines see the same image)."""
    batch = read_hkl(batch_files(hkl['dir'])[0])      # (3, S, S, B)
    return int(np.abs(batch[..., 0].transpose(1, 2, 0).astype(int) - dataset.decode(0).astype(int)).max())


# --- main ----------------------------------------------------------------------------------------

def run(args):
    check_paths(args)
    work = None
    if args.jpeg_root:
        work = os.path.abspath(args.work_dir) if args.work_dir else tempfile.mkdtemp(prefix='loader_bench_')
        os.makedirs(work, exist_ok=True)
    try:
        if args.jpeg_root:
            hkl, paths, labels, prep = build(args, work)
        else:
            hkl = {'dir': args.hkl_dir, 'labels': args.labels, 'mean': args.mean}
            paths, labels = list_tree(args.jpeg_dir)
            prep = None
        first = read_hkl(batch_files(hkl['dir'])[0])
        size, batch_size = first.shape[1], first.shape[3]
        source = BatchFolder(hkl['dir'], hkl['labels'], batch_size)  # checks files and labels
        hkl['batch_size'] = batch_size
        mean = load_mean(hkl['mean'], size).numpy()
        crop = args.crop or default_crop(size)
        if not 0 < crop <= size:
            raise BenchError(f'--crop {crop} does not fit images of {size} px')
        dataset = JpegImages(paths, labels, size, crop, mean)
        with Image.open(paths[0]) as im:
            src_w, src_h = im.size
        report(args, hkl, source, dataset, size, batch_size, crop, (src_w, src_h), prep)
    finally:
        if work and not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


def report(args, hkl, source, dataset, size, batch_size, crop, src_size, prep):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    load = ' (load average %.1f)' % os.getloadavg()[0] if hasattr(os, 'getloadavg') else ''
    print(f'machine: {platform.machine()}, {cores} cores{load}; 1 torch thread per reader/worker '
          f'process (main process {torch.get_num_threads()}); torch {torch.__version__}, '
          f'python {platform.python_version()}')
    exe = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd() + os.sep) else sys.executable
    print('command: ' + shlex.join([exe, '-m', 'benchmarks.loader'] + sys.argv[1:]))
    if prep:
        print(prep)
    w, h = src_size
    print(f'images: hkl {len(source)} batch files x {batch_size} = {len(source) * batch_size} images, '
          f'jpeg {len(dataset)} files; source JPEG {w}x{h} px -> S = {size}, crop {crop}, batch {batch_size}')
    if w * h < 200 * 200:
        resize = (f'no resize is needed (already {size} px)' if (w, h) == (size, size) else
                  f'the jpeg rows reflect the resize to {size} px')
        print(f'note: the source images are small ({w}x{h}): JPEG decode is cheap here, far cheaper than '
              f'for ImageNet-size JPEGs; {resize}')
    if args.jpeg_root:
        diff = same_pixels(hkl, dataset)
        print(f'same images: first image of batch 0 vs. the jpeg pipeline\'s decode of it, '
              f'max |diff| = {diff}')
    print(f'timed: >= {args.images} images per pass after 1 warm-up batch per process; '
          f'median of {args.repeats} passes\n', flush=True)
    rates = {}  # (pipeline, procs) -> [img/s per pass]
    for r in range(args.repeats):
        for k in range(1, args.max_procs + 1):
            n_each = math.ceil(args.images / (batch_size * k))  # batches per process
            rates.setdefault(('hkl', k), []).append(time_hkl(hkl, k, crop, n_each, args.seed + 100 * r))
            rates.setdefault(('jpeg', k), []).append(time_jpeg(dataset, batch_size, k, n_each * k,
                                                               args.seed + 100 * r))
            if args.verbose:
                print(f'pass {r + 1} procs {k}: hkl {rates["hkl", k][-1]:.0f} img/s, '
                      f'jpeg {rates["jpeg", k][-1]:.0f} img/s', file=sys.stderr, flush=True)
    print('| pipeline | procs | img/s | img/s per proc | ratio hkl/jpeg (same procs) |')
    print('|---|---|---|---|---|')
    for k in range(1, args.max_procs + 1):
        med = {p: statistics.median(rates[p, k]) for p in ('hkl', 'jpeg')}
        for p in ('hkl', 'jpeg'):
            ratio = f'{med["hkl"] / med["jpeg"]:.2f}' if p == 'hkl' else '-'
            print(f'| {p} | {k} | {med[p]:.0f} | {med[p] / k:.0f} | {ratio} |')


def main(argv=None):
    p = argparse.ArgumentParser(prog='python -m benchmarks.loader', description=__doc__.split('\n')[0])
    src = p.add_argument_group('inputs: either --jpeg-root (preprocessed here), or all four of '
                               '--jpeg-dir --hkl-dir --labels --mean')
    src.add_argument('--jpeg-root', help='class-folder tree with train/ (and val/): preprocessed here')
    src.add_argument('--jpeg-dir', help='class-folder tree of the JPEGs (e.g. .../train)')
    src.add_argument('--hkl-dir', help='folder of NNNN.hkl batches of the same images')
    src.add_argument('--labels', help='train_labels.npy of the batches')
    src.add_argument('--mean', help='img_mean.npy, float32 (3, S, S)')
    b = p.add_argument_group('--jpeg-root mode')
    b.add_argument('--limit', type=int, default=300, help='images per class taken from train/ (300)')
    b.add_argument('--img-size', type=int, default=256, help='S, images resized to S x S (256)')
    b.add_argument('--batch-size', type=int, default=128, help='B, images per batch file (128)')
    b.add_argument('--prep-workers', type=int, default=2, help='preprocessing processes (2)')
    b.add_argument('--source-size', type=size_wxh,
                   help='WxH: re-encode the train images at this size first (JPEG quality 90), '
                        'e.g. 400x350 for the decode cost of ImageNet-size sources')
    b.add_argument('--work-dir', help='keep the subset tree and batches here (default: a temporary '
                   'folder, deleted at the end); a second run with the same settings reuses them')
    p.add_argument('--crop', type=int, default=None, help='crop side c (default S - 29 for S >= 64 '
                   '(227 for 256), else S)')
    p.add_argument('--max-procs', type=int, default=2, help='k = 1 .. this (2)')
    p.add_argument('--images', type=int, default=4096, help='images timed per pass, at least (4096)')
    p.add_argument('--repeats', type=int, default=3, help='passes; the table shows medians (3)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--verbose', action='store_true', help='print every pass to stderr')
    args = p.parse_args(argv)
    mode_a = [args.jpeg_dir, args.hkl_dir, args.labels, args.mean]
    if bool(args.jpeg_root) == any(mode_a) or (not args.jpeg_root and not all(mode_a)):
        p.error('give either --jpeg-root, or all four of --jpeg-dir --hkl-dir --labels --mean')
    if args.source_size and not args.jpeg_root:
        p.error('--source-size re-encodes the images of --jpeg-root; it has no effect with --jpeg-dir')
    for name in ('limit', 'img_size', 'batch_size', 'prep_workers', 'max_procs', 'images', 'repeats'):
        if getattr(args, name) < 1:
            p.error(f'--{name.replace("_", "-")} must be at least 1')
    try:
        run(args)
    except (BenchError, DataError, PrepError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130
    return 0


if __name__ == '__main__':
    sys.exit(main())
