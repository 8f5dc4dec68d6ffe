"""Preprocessing: raw images -> hickle batch files, labels, mean image and file lists.

    sh preprocessing/generate_data.sh [PATHS_YAML]        # every image (default preprocessing/paths.yaml)
    sh preprocessing/generate_toy_data.sh [PATHS_YAML]    # only the first 10 batches of train and of val
    python -m preprocessing.make_data [PATHS_YAML] [--toy] [--workers N]   # the same, from the repo root

Outputs (B = batch_size, S = img_size, n in sub_batches; paths as set in the paths file):
    <tar_train_dir>_b<B>_b_<B//n>/NNNN.hkl (n = 1) or NNNN_<i>.hkl (n > 1, part i of batch NNNN):
        uint8 (3, S, S, B//n) = c01b; training images in shuffled order; last incomplete batch dropped
    <tar_val_dir>_b<B>_b_<B//n>/...     the same for val, in sorted order
    <tar_root_dir>/labels/{train,val}_labels.npy        int64, one per image in the batch files
                          {train,val}_labels_<i>.npy    n = 2: labels of half i of every batch
                                  (n > 2: part i's labels are labels.reshape(-1, n, B//n)[:, i])
    <tar_root_dir>/dataset.yaml         classes (label order), sizes, counts, bad files, source folders;
                                        class_words (imagenet layouts: the devkit's names of the classes)
    <misc_dir>/shuffled_train_filenames.npy, img_mean.npy (float32 (3, S, S), over all training
        batches), bad_images.txt ("<split>\\t<file>\\t<reason>"), fingerprint.json,
        mean_total.npz (the mean's exact running total, for resuming: preprocessing/mean.py),
        <archive>.index.npz (layout imagenet_tar: where each image lies in the archive, see archives.py)
    traintxt_filename ("<class>/<file> <label>", shuffled order), valtxt_filename ("<file> <label>")

Two phases make the batches independent of the number of workers: 1) decode every listed file, giving
the list of valid ones; 2) write batches of valid files. An interrupted run resumes where it stopped
(see resume.py).
"""
import argparse
import os
import sys
import time
from functools import partial

import lib.env  # noqa: F401  first: without the packages, one line instead of a traceback
import numpy as np
import yaml

from lib import ROOT as REPO, command
from lib.atomic import save_npy, save_text
from preprocessing import PrepError
from preprocessing.layouts import list_dataset
from preprocessing.mean import MeanTotal
from preprocessing.paths import load_paths
from preprocessing.resume import digest, guard, read_record, save_record, shuffled_train
from preprocessing.writer import (BatchJob, batch_dir, batch_names, check_file, parallel_map,
                                  remove_stale_temps, run_job)

TOY_BATCHES = 10
DEFAULT_PATHS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'paths.yaml')
OUTPUT_KEYS = ('tar_root_dir', 'tar_train_dir', 'tar_val_dir', 'misc_dir', 'traintxt_filename',
               'valtxt_filename')


def make_data(paths_file, toy=False, workers=None):
    """Run both phases for the dataset of a paths file; returns the summary written to dataset.yaml."""
    start = time.perf_counter()
    cfg = load_paths(paths_file)
    workers = workers or cfg['workers'] or available_cores()
    folders = [batch_dir(d, cfg['batch_size'], n) for d in (cfg['tar_train_dir'], cfg['tar_val_dir'])
               for n in cfg['sub_batches']]
    labels_dir = os.path.join(cfg['tar_root_dir'], 'labels')
    note = outside_note(paths_file, cfg)
    if note:
        print(note, flush=True)
    check_outputs(cfg, folders + [labels_dir, cfg['misc_dir']])
    listing = list_dataset(cfg, workers)
    for folder in folders + [labels_dir, cfg['misc_dir']]:
        os.makedirs(folder, exist_ok=True)
    remove_stale_temps(folders + [labels_dir, cfg['misc_dir'], cfg['tar_root_dir'],
                                  os.path.dirname(cfg['traintxt_filename']),
                                  os.path.dirname(cfg['valtxt_filename'])])
    # (sub_batches is not a setting of the data: a rerun with other sub_batches adds or omits
    # copies of the same batches)
    settings = {'img_size': cfg['img_size'], 'batch_size': cfg['batch_size'],
                'layout': listing.layout, 'toy': toy}
    if cfg['pad']:  # (records of earlier runs, without pad, stay valid)
        settings['pad'] = cfg['pad']
    if listing.layout == 'cifar100_bin':
        settings['cifar100_labels'] = cfg['cifar100_labels']
    record = read_record(cfg['misc_dir'])
    guard(cfg, record, settings)
    valid, labels, bad, checked = phase_1(cfg, listing, toy, workers, record)
    files_hash = digest([listing.classes, valid, labels])
    guard(cfg, record, settings, files_hash)
    save_record(cfg['misc_dir'], {'settings': settings, 'files': files_hash, 'checked': checked})
    phase_1_s = time.perf_counter() - start
    n_batches, written = phase_2(cfg, valid, workers, listing.sources, digest([settings, files_hash]))
    for split in ('train', 'val'):
        save_labels(labels_dir, split, labels[split][:n_batches[split] * cfg['batch_size']], cfg)
    save_lists(cfg, valid, labels)
    summary = describe(cfg, listing, toy, valid, bad, n_batches)
    save_text(os.path.join(cfg['tar_root_dir'], 'dataset.yaml'), yaml.safe_dump(summary, sort_keys=False))
    reused = record is not None and record['checked']['listing'] == checked['listing']
    timing = {'workers': workers, 'checked': 0 if reused else sum(len(valid[s]) + len(bad[s]) for s in bad),
              'phase_1_s': phase_1_s, 'written': written, 'total_s': time.perf_counter() - start}
    print_summary(summary, cfg, folders, labels_dir, timing)
    return summary


def outside_note(paths_file, cfg):
    """One line naming the output folders that lie outside both this clone and the paths file's
    folder, or None: a copied paths file keeps its relative paths, so it may write elsewhere than
    its user expects (a copy of paths.yaml in the clone's root writes ../data, outside it)."""
    folder = os.path.dirname(os.path.realpath(paths_file))
    # (tar_train_dir and tar_val_dir begin the names of the batch folders: those lie in their parent)
    places = [cfg[k] if k in ('tar_root_dir', 'misc_dir') else os.path.dirname(cfg[k]) for k in OUTPUT_KEYS]
    outside = sorted({p for p in places if not within(p, REPO) and not within(p, folder)})
    outside = [d for d in outside if not any(within(d, o) for o in outside if o != d)]
    if outside:
        homes = f'the clone {REPO}' + ('' if within(folder, REPO) else f" and the paths file's folder {folder}")
        return (f'note: the outputs go to {", ".join(outside)}, outside {homes} (relative paths in '
                f'{os.path.realpath(paths_file)} are relative to its folder)')
    return None


def within(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def check_outputs(cfg, folders):
    """Refuses, before any input is read, outputs that cannot be written or that clash: train and
    val batches in one folder, both lists in one file, an output folder (`folders`: the batch, label
    and misc folders) inside an input folder."""
    if cfg['tar_train_dir'] == cfg['tar_val_dir']:
        raise PrepError(f'tar_train_dir and tar_val_dir are both {cfg["tar_val_dir"]}: the val batches '
                        f'would overwrite the train batches; give them different paths')
    if cfg['traintxt_filename'] == cfg['valtxt_filename']:
        raise PrepError(f'traintxt_filename and valtxt_filename are both {cfg["valtxt_filename"]}; give them '
                        f'different paths')
    for folder in folders:
        for source in ('train_img_dir', 'val_img_dir'):
            if os.path.isdir(cfg[source]) and within(folder, cfg[source]):
                raise PrepError(f'the output folder {folder} is inside {source} {cfg[source]}: it would be '
                                f'listed with the images; put the outputs elsewhere')
    for path in folders + [os.path.dirname(cfg[k]) for k in ('traintxt_filename', 'valtxt_filename')]:
        check_writable(path)
    for key in ('traintxt_filename', 'valtxt_filename'):
        if os.path.isdir(cfg[key]):
            raise PrepError(f'{key} {cfg[key]} is a folder; name a file')


def check_writable(folder):
    """Raises PrepError unless `folder` is, or can be made as, a writable folder."""
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise PrepError(f'cannot make the output folder {folder}: {existing} is a file')
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PrepError(f'cannot write to the output folder {folder}: {existing} is not writable')


def phase_1(cfg, listing, toy, workers, record):
    """Decode every listed file (a resumed run reuses the answer of the run it continues).
    Returns the valid files and their labels per split, the unreadable files with the reason, and
    what fingerprint.json keeps of this phase."""
    batch_size, size = cfg['batch_size'], cfg['img_size']
    limit = TOY_BATCHES * batch_size if toy else None
    train = shuffled_train(cfg['misc_dir'], listing.train)
    listed = digest([listing.classes, train, listing.val, listing.val_labels, size, limit])
    reuse = record['checked']['bad'] if record and record['checked']['listing'] == listed else None
    valid, bad = {}, {}
    for split, files in (('train', train), ('val', listing.val)):
        valid[split], bad[split] = check_split(listing.sources[split], files, limit, size, workers,
                                               split, reuse and reuse[split])
    bad_list = os.path.join(cfg['misc_dir'], 'bad_images.txt')
    save_text(bad_list, ''.join(f'{s}\t{f}\t{reason}\n' for s in bad for f, reason in bad[s]))
    for split in ('train', 'val'):
        if len(valid[split]) < batch_size:
            raise PrepError(f'{split}: {len(valid[split])} readable images in {cfg[f"{split}_img_dir"]}, '
                            f'fewer than one batch of {batch_size} ({len(bad[split])} unreadable: '
                            f'see {bad_list})')
    val_label = dict(zip(listing.val, listing.val_labels))
    labels = {'train': listing.train_labels(valid['train']), 'val': [val_label[f] for f in valid['val']]}
    return valid, labels, bad, {'listing': listed, 'bad': bad}


def phase_2(cfg, valid, workers, sources, key):
    """Write the batch files (those not written yet) and the mean image, kept as a running exact
    total (preprocessing/mean.py) that a resumed run continues from (`key`: settings and files).
    Returns the number of batches per split and the number of images written by this run."""
    batch_size, written = cfg['batch_size'], 0
    n_batches = {split: len(valid[split]) // batch_size for split in ('train', 'val')}
    total = MeanTotal(cfg['misc_dir'], key, cfg['img_size'], n_batches['train'])
    for split in ('train', 'val'):
        need = ~total.included if split == 'train' else np.zeros(n_batches[split], bool)
        jobs = batch_jobs(cfg, sources[split], valid[split], cfg[f'tar_{split}_dir'], need)
        results = parallel_map(run_job, jobs, n_batches[split], workers, f'write {split}', batch_size)
        try:
            for k, (batch_sum, wrote) in enumerate(results):
                if batch_sum is not None:
                    total.add(k, batch_sum)
                written += wrote * batch_size
        finally:
            if split == 'train':  # also when interrupted: what is summed is kept
                total.save()
    save_npy(os.path.join(cfg['misc_dir'], 'img_mean.npy'), total.mean(batch_size))
    return n_batches, written


def describe(cfg, listing, toy, valid, bad, n_batches):
    """The contents of dataset.yaml."""
    batch_size = cfg['batch_size']
    counts = {}
    for s in ('train', 'val'):
        counts.update({f'{s}_images': n_batches[s] * batch_size, f'{s}_batches': n_batches[s],
                       f'{s}_dropped': len(valid[s]) - n_batches[s] * batch_size})
    words = {'class_words': listing.class_words} if listing.class_words else {}
    labels = {'cifar100_labels': cfg['cifar100_labels']} if listing.layout == 'cifar100_bin' else {}
    return {
        'num_classes': len(listing.classes), 'class_names': listing.classes, 'img_size': cfg['img_size'],
        'pad': cfg['pad'],
        'batch_size': batch_size, 'sub_batches': cfg['sub_batches'], 'layout': listing.layout, 'toy': toy,
        'counts': counts, 'bad_files': {s: len(bad[s]) for s in bad},
        'source': {k: cfg[k] for k in ('train_img_dir', 'val_img_dir', 'devkit', 'meta_clsloc_mat',
                                       'val_label_file')},
        **labels, **words,
    }


def check_split(source, files, limit, size, workers, split, reuse=None):
    """(valid files, [[file, reason], ...] of the others), in the order of `files`, stopping at
    `limit` valid files: the toy run checks only what it uses. `reuse`: the bad files found by an
    earlier run over the same listing."""
    if reuse is not None:
        skip = {f for f, _ in reuse}
        return [f for f in files if f not in skip][:limit], reuse
    valid, bad, start = [], [], 0
    while start < len(files) and (limit is None or len(valid) < limit):
        # a chunk of exactly as many files as are still needed, so every checked file is used
        end = len(files) if limit is None else min(len(files), start + limit - len(valid))
        chunk = files[start:end]
        paths = (source.locate(f) for f in chunk)  # paths, archive members or records
        reasons = parallel_map(partial(check_file, size=size), paths, len(chunk), workers, f'check {split}',
                               chunksize=64)
        for f, reason in zip(chunk, reasons):
            if reason is None:
                valid.append(f)
            else:
                bad.append([f, reason])
        start = end
    return valid, bad


def batch_jobs(cfg, source, files, tar_dir, want_sum):
    """Yield one BatchJob per whole batch of `files`; the remainder is dropped. want_sum[k]: job k
    returns the pixel sum of its batch."""
    batch_size = cfg['batch_size']
    for k in range(len(files) // batch_size):
        images = tuple(source.locate(f) for f in files[k * batch_size:(k + 1) * batch_size])
        outputs = tuple((n, tuple(os.path.join(batch_dir(tar_dir, batch_size, n), name)
                                  for name in batch_names(k, n))) for n in cfg['sub_batches'])
        yield BatchJob(images, outputs, cfg['img_size'], cfg['pad'], bool(want_sum[k]))


def save_labels(folder, split, labels, cfg):
    """int64 labels in batch order; with sub_batches 2, those of half i of every batch (_<i>)."""
    labels, batch_size = np.asarray(labels, np.int64), cfg['batch_size']
    save_npy(os.path.join(folder, f'{split}_labels.npy'), labels)
    if 2 in cfg['sub_batches']:  # a halves folder's labels (train_2gpu.py reads them)
        halves = labels.reshape(-1, 2, batch_size // 2)
        for i in (0, 1):
            save_npy(os.path.join(folder, f'{split}_labels_{i}.npy'), halves[:, i].ravel())


def save_lists(cfg, valid, labels):
    """train.txt / val.txt, caffe style: every readable image with its label."""
    for split, path in (('train', cfg['traintxt_filename']), ('val', cfg['valtxt_filename'])):
        save_text(path, ''.join(f'{f} {y}\n' for f, y in zip(valid[split], labels[split])))


def print_summary(summary, cfg, folders, labels_dir, timing):
    counts, bad, t = summary['counts'], summary['bad_files'], timing
    write_s = max(t['total_s'] - t['phase_1_s'], 1e-9)
    check = (f'checked {t["checked"]} files at {t["checked"] / max(t["phase_1_s"], 1e-9):.0f}/s'
             if t['checked'] else 'reused the file check of the previous run')
    print(f'done in {t["total_s"]:.1f} s with {t["workers"]} worker(s): {check}; wrote {t["written"]} '
          f'images at {t["written"] / write_s:.0f}/s; '
          f'{t["written"] / t["total_s"]:.0f} images/s overall')
    for s in ('train', 'val'):
        print(f'{s}: {counts[f"{s}_batches"]} batches = {counts[f"{s}_images"]} images '
              f'({counts[f"{s}_dropped"]} dropped to make whole batches, {bad[s]} unreadable)')
    if bad['train'] + bad['val']:
        print(f'unreadable files are listed in {os.path.join(cfg["misc_dir"], "bad_images.txt")}')
    print('batches: ' + ', '.join(folders))
    print(f'labels: {labels_dir}   mean, lists: {cfg["misc_dir"]}   '
          f'summary: {os.path.join(cfg["tar_root_dir"], "dataset.yaml")}')


def available_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


@command(interrupted='interrupted: run the same command again to resume')
def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m preprocessing.make_data',
                                     description=__doc__.split('\n\n')[0])
    parser.add_argument('paths', nargs='?', default=DEFAULT_PATHS, help='paths file (YAML)')
    parser.add_argument('--toy', action='store_true', help=f'only the first {TOY_BATCHES} batches')
    parser.add_argument('--workers', type=int, default=None, help='processes (default: paths file)')
    args = parser.parse_args(argv)
    make_data(args.paths, toy=args.toy, workers=args.workers)


if __name__ == '__main__':
    sys.exit(main())
