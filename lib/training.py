"""Build a run from a merged config and train it: the data sources and loaders of one worker,
the network, the optimiser and the loop (lib/trainer.py), and a resume from a snapshot.

train.py (one worker, or a torchrun rank) and train_2gpu.py (each of two workers) call run();
they differ only in the Worker they pass: its exchanger and its share of every batch.
"""
import os
from dataclasses import dataclass

import torch

from lib import checkpoint, config, data, exchange, loader, model, optim, plot, trainer
from lib.atomic import save_text


def num_classes(cfg, sources):
    """num_classes if set (synthetic batches: else 1000), else from dataset.yaml beside the labels
    folder (written by our preprocessing), else from the largest label (data preprocessed by the
    original)."""
    if cfg['num_classes'] or cfg['synthetic']:
        return cfg['num_classes'] or 1000
    meta = data.dataset_yaml(cfg['label_folder'])
    if not os.path.exists(meta):
        return int(max(s.labels.max() for s in sources)) + 1
    n = data.read_dataset(meta).get('num_classes')
    if not (isinstance(n, int) and n >= 1):
        raise data.DataError(f'{meta} gives no num_classes (a dataset.yaml of preprocessing holds it)')
    return n


def check_labels(n_classes, sources, where='num_classes'):
    """DataError naming the labels file when a label is outside 0..n_classes-1 (instead of a
    device-side assert in the first step)."""
    for s in sources:
        if getattr(s, 'labels_file', None) is None or not s.labels.size:
            continue  # synthetic batches draw their labels below num_classes
        lo, hi = int(s.labels.min()), int(s.labels.max())
        if lo < 0 or hi >= n_classes:
            raise data.DataError(f'{s.labels_file} holds label {hi if hi >= n_classes else lo}, '
                                 f'outside 0..{n_classes - 1} ({where} {n_classes})')


def check_snapshot(cfg, state, net, images_per_step):
    """ConfigError (one line) when a snapshot was trained with another network or another number
    of images per step than this run's (batch_size is per worker in train_2gpu.py, per step in
    train.py and under torchrun: a 2 x 128 snapshot resumes in a 256 run, and back), or with
    another learning_rate or seed (the snapshot's lr and random streams would silently win)."""
    path = checkpoint.snapshot_path(cfg['weights_dir'], cfg['load_epoch'])
    saved = state.get('config', {})
    for key in ('model', 'crop_size'):
        if key in saved and saved[key] != cfg[key]:
            raise config.ConfigError(f'{path} was trained with {key} {saved[key]!r}, this run '
                                     f'has {key} {cfg[key]!r}')
    if 'images_per_step' in state:
        if int(state['images_per_step']) != images_per_step:
            raise config.ConfigError(f'{path} was trained on {int(state["images_per_step"])} '
                                     f'images per step, this run on {images_per_step} '
                                     f'(batch_size {cfg["batch_size"]})')
    elif 'batch_size' in saved and saved['batch_size'] != cfg['batch_size']:  # older snapshots
        raise config.ConfigError(f'{path} was trained with batch_size {saved["batch_size"]!r}, '
                                 f'this run has batch_size {cfg["batch_size"]!r}')
    # what trainer.restore takes from the snapshot, not from the config: a new value is ignored
    if saved.get('learning_rate', cfg['learning_rate']) != cfg['learning_rate']:
        raise config.ConfigError(
            f"learning_rate {cfg['learning_rate']:g}: {path} was trained from learning_rate "
            f"{saved['learning_rate']:g}, and a resume continues its lr ({float(state['lr']):g} "
            f"after epoch {int(state['epoch'])}); the schedule keys lr_policy, lr_step, "
            'lr_adapt_threshold, warmup_epochs and n_epochs may change')
    # a cosine's length is n_epochs (after warmup_epochs): another one moves the lr at once
    curve = ('lr_policy', 'n_epochs', 'warmup_epochs')
    if 'cosine' in (saved.get('lr_policy'), cfg['lr_policy']) and all(k in saved for k in curve):
        if changed := [k for k in curve if saved[k] != cfg[k]]:
            epoch, lr = int(state['epoch']), float(state['lr'])
            was, now = (lr * optim.lr_scale(epoch, c['n_epochs'], c['lr_policy'], c['warmup_epochs'])
                        for c in (saved, cfg))
            raise config.ConfigError(
                f"{changed[0]} {cfg[changed[0]]}: {path} was trained under lr_policy "
                f"{saved['lr_policy']}, n_epochs {saved['n_epochs']}, warmup_epochs "
                f"{saved['warmup_epochs']}, which set a cosine's lr: after epoch {epoch} it is "
                f"{was:g}, this run's {now:g} (a cosine cannot be extended or cut: train a fresh "
                'run with the n_epochs wanted)')
    if saved.get('seed', cfg['seed']) != cfg['seed']:
        raise config.ConfigError(
            f"seed {cfg['seed']}: {path} was trained with seed {saved['seed']}, and a resume "
            'continues its random streams (crops, dropout, file order); another seed is a fresh '
            'run (another weights_dir)')
    for name, p in net.state_dict().items():
        have = state['model'].get(name)
        if have is None or have.shape != p.shape:
            raise config.ConfigError(f'{path} holds {name} of shape '
                                     f'{None if have is None else tuple(have.shape)}, this run '
                                     f'{tuple(p.shape)} (num_classes or model differ)')


@dataclass(frozen=True)
class Worker:
    """What differs between the workers of one run; the defaults are train.py on its own."""
    exchanger: object = None    # lib/exchange.py: Local, Pair (train_2gpu.py), Distributed (torchrun)
    share: tuple = None         # (index, count): its share of every step (data.share_source)
    gpu: str = None             # device (default: the gpu key)
    port: int = None            # loader port where there is no ipc:// (default: sock_data)
    started: object = None      # called once the run has started (weights_dir checked, written)


def data_sources(cfg, worker=Worker(), splits=('train', 'val'), quiet=False):
    """The batch sources of `splits`: the worker's share of the batch folders, or synthetic batches
    (worker 0 prints where its share comes from, unless quiet)."""
    B, launcher = cfg['batch_size'], data.launcher_of(cfg)
    if cfg['synthetic']:
        size = (cfg['crop_size'] * 256 + 226) // 227  # 256 for 227 crops, 37 for 32
        n_files = {'train': cfg['synthetic_batches'], 'val': max(1, cfg['synthetic_batches'] // 10)}
        index, count = worker.share or (0, 1)  # a worker's rows of batches of a step
        b, step = data.batch_images(B, launcher, count)
        return [data.SyntheticBatches(n_files[s], step, size, cfg['num_classes'] or 1000,
                                      cfg['seed'] + (s == 'val'), (index * b, (index + 1) * b))
                for s in splits]
    found = [data.share_source(cfg[f'{split}_folder'], cfg['label_folder'], split, B, launcher,
                               worker.share) for split in splits]
    notices = [n for _, n in found if n]
    if notices and worker.share[0] == 0 and not quiet:
        print('notice: ' + '; '.join(notices), flush=True)
    return [source for source, _ in found]


def mean_image(cfg, size):
    """The mean image subtracted from batches of `size` px: mean_file's (checked), or 127.5 for
    synthetic batches."""
    return (torch.full((3, size, size), 127.5) if cfg['synthetic']
            else data.load_mean(cfg['mean_file'], size))


def checked_data(cfg, worker=Worker(), quiet=False):
    """(train, val, class count, mean image) of a worker, checked as a run starts (headers, labels
    and the mean; no pixels read): one image size, labels below the class count, crops that fit
    the images (the network's crop was checked with the config: lib/runs.py)."""
    train, val = data_sources(cfg, worker, quiet=quiet)
    size, val_size = train.image_size(), val.image_size()
    if val_size != size:  # else the loader's slots do not fit val's batches
        raise data.DataError(f'{val.files[0]} holds {val_size} px images, the training '
                             f'batches ({train.files[0]}) {size} px: preprocess both at one size')
    n_classes = num_classes(cfg, (train, val))
    check_labels(n_classes, (train, val))
    if cfg['crop_size'] > size:
        fix = 'model=alexnet_cifar and ' if cfg['model'] == 'alexnet' else ''
        raise data.DataError(f"crop_size {cfg['crop_size']} is larger than the images "
                             f"({size} px) in {cfg['train_folder']}: set {fix}crop_size={size} "
                             'or less')
    return train, val, n_classes, mean_image(cfg, size)


def build_loaders(cfg, device, worker=Worker()):
    """(train, val) loaders (in-process, or served by one loader process) and the class count."""
    train, val, n_classes, mean = checked_data(cfg, worker)
    if cfg['para_load'] and cfg['synthetic']:
        print('notice: synthetic batches are made in-process; para_load is ignored', flush=True)
    if cfg['para_load'] and not cfg['synthetic']:
        proc = loader.LoaderProcess([train, val], cfg['mean_file'], cfg['crop_size'], device,
                                    cfg['use_data_layer'], cfg['loader_timeout'],
                                    cfg['sock_data'] if worker.port is None else worker.port)
        loaders = [proc.loader(0), proc.loader(1)]
    else:
        loaders = [data.InProcessLoader(s, mean, cfg['crop_size'], device, cfg['use_data_layer'])
                   for s in (train, val)]
    return loaders, n_classes


def run(cfg, worker=Worker()):
    """Build everything from a merged config and train; returns the history (list of dicts)."""
    exchanger = worker.exchanger or exchange.Local()
    if cfg['resume_train'] and cfg['n_epochs'] <= cfg['load_epoch']:
        return []  # nothing to train: weights_dir stays as it is (summary says so)
    device = trainer.resolve_device(worker.gpu or cfg['gpu'])
    (train_data, val_data), n_cls = build_loaders(cfg, device, worker)
    try:  # from here on a loader process may be running: always close it
        net = model.build(cfg['model'], n_cls, cfg['dropout'], cfg['crop_size'],
                          cfg['seed']).to(device, torch.float64 if cfg['precision'] == 'fp64' else None)
        opt = optim.MomentumSGD(net.named_parameters(), cfg['learning_rate'], cfg['momentum'],
                                cfg['weight_decay'], cfg['use_momentum'],
                                cfg['use_nesterov_momentum'])
        loop = trainer.Trainer(cfg, net, opt, (train_data, val_data), device, exchanger)
        loop.on_epoch_end = plot.write_quietly  # training.png, when matplotlib is installed
        start = 0
        if not cfg['resume_train']:  # (a torchrun restart resumes: torchrun_worker set it)
            aside = checkpoint.check_fresh_start(cfg['weights_dir'], cfg['overwrite'],
                                                 move=exchanger.is_main)
            if aside:
                loop.log(f'overwrite: the previous run in {cfg["weights_dir"]} moved to {aside}')
        if cfg['resume_train']:
            state = checkpoint.read(checkpoint.snapshot_path(cfg['weights_dir'], cfg['load_epoch']))
            check_snapshot(cfg, state, net, loop.images_per_step)
            start = loop.restore(state)
            loop.log(f'resumed from {checkpoint.snapshot_path(cfg["weights_dir"], start)} '
                     f'(epoch {start}, lr {opt.lr:g})')
        exchanger.attach(opt.params, opt.momentum, device)  # after channels_last and resume
        if exchanger.is_main:  # only now: a run that fails to start leaves weights_dir as it was
            os.makedirs(cfg['weights_dir'], exist_ok=True)
            save_text(os.path.join(cfg['weights_dir'], 'config.yaml'), config.to_yaml(cfg))
        if worker.started is not None:  # (train.py under torchrun: a later round resumes)
            worker.started()
        n_params = sum(p.numel() for p in net.parameters())
        loop.log(f'{cfg["model"]}: {n_params:,} parameters, {n_cls} classes, device {device}, '
                 f'{len(train_data)} train / {len(val_data)} val batches of {loop.images_per_step}'
                 + (f' ({exchanger.size} workers x {train_data.batch_size})' if worker.share else ''))
        return loop.fit(start)
    finally:
        train_data.close()
        val_data.close()


def summary(cfg, history):
    if not history and cfg['resume_train']:
        return (f"nothing to train: model_{cfg['load_epoch']}.pt is at epoch {cfg['load_epoch']}, "
                f"n_epochs is {cfg['n_epochs']} ({cfg['weights_dir']} left as it was)")
    if not history:
        return f"done: nothing to train (n_epochs {cfg['n_epochs']})"
    last = history[-1]
    return (f"done: epoch {last['epoch']}, val top-1 accuracy {100 * (1 - last['val_error']):.2f} %"
            f" (top-5 {100 * (1 - last['val_top5_error']):.2f} %); records in "
            f"{os.path.join(cfg['weights_dir'], 'val_record.npy')}")
