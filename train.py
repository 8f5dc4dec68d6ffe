"""Train AlexNet on one device (GPU or CPU) from the preprocessed hickle batches.

    python train.py                                   # config.yaml <- spec_1gpu.yaml
    python train.py --config my.yaml --spec my_spec.yaml
    python train.py n_epochs=10 learning_rate=0.005 gpu=cpu

Writes into weights_dir: config.yaml (the merged config), val_record.npy ([top-1 error, loss] per
epoch), history.csv, and model_<epoch>.pt every snapshot_freq epochs.
Resume with resume_train=True load_epoch=N.
"""
import os
import sys

import torch
import yaml

import plot
from lib import checkpoint, config, data, exchange, loader, model, optim, trainer


def num_classes(cfg, sources):
    """num_classes if set, else from dataset.yaml beside the labels folder (written by our
    preprocessing), else from the largest label (data preprocessed by the original)."""
    if cfg['num_classes']:
        return cfg['num_classes']
    meta = os.path.join(os.path.dirname(os.path.normpath(cfg['label_folder'])), 'dataset.yaml')
    if os.path.exists(meta):
        with open(meta) as f:
            return int(yaml.safe_load(f)['num_classes'])
    return int(max(s.labels.max() for s in sources)) + 1


def data_sources(cfg, part=None, splits=('train', 'val')):
    """The batch sources of `splits`: batch folders and their labels, or synthetic batches."""
    B = cfg['batch_size']
    if cfg['synthetic']:
        size = (cfg['crop_size'] * 256 + 226) // 227  # 256 for 227 crops, 37 for 32
        n_files = {'train': cfg['synthetic_batches'], 'val': max(1, cfg['synthetic_batches'] // 10)}
        return [data.SyntheticBatches(n_files[s], B, size, cfg['num_classes'] or 1000,
                                      cfg['seed'] + (s == 'val')) for s in splits]
    suffix = '' if part is None else f'_{part}'
    return [data.BatchFolder(cfg[f'{split}_folder'],
                             os.path.join(cfg['label_folder'], f'{split}_labels{suffix}.npy'), B, part)
            for split in splits]


def build_loaders(cfg, device, part=None, port=None):
    """(train, val) loaders (in-process, or served by one loader process) and the class count."""
    train, val = data_sources(cfg, part)
    size = train.image_size()
    if cfg['crop_size'] > size:
        raise data.DataError(f"crop_size {cfg['crop_size']} is larger than the images "
                             f"({size} px) in {cfg['train_folder']}")
    if cfg['para_load'] and cfg['synthetic']:
        print('notice: synthetic batches are made in-process; para_load is ignored', flush=True)
    if cfg['para_load'] and not cfg['synthetic']:
        proc = loader.LoaderProcess([train, val], cfg['mean_file'], cfg['crop_size'], device,
                                    cfg['use_data_layer'], cfg['loader_timeout'], port)
        loaders = [proc.loader(0), proc.loader(1)]
    else:
        mean = (torch.full((3, size, size), 127.5) if cfg['synthetic']
                else data.load_mean(cfg['mean_file'], size))
        loaders = [data.InProcessLoader(s, mean, cfg['crop_size'], device, cfg['use_data_layer'])
                   for s in (train, val)]
    return loaders, num_classes(cfg, (train, val))


def run(cfg, exchanger=None, part=None, gpu=None, port=None):
    """Build everything from a merged config and train; returns the history (list of dicts).

    The multi-worker launchers pass their exchanger, the part of each batch this worker trains
    on (the _0 / _1 files), its device and its loader port (default: the gpu / sock_data keys)."""
    exchanger = exchanger or exchange.Local()
    device = trainer.resolve_device(gpu or cfg['gpu'])
    os.makedirs(cfg['weights_dir'], exist_ok=True)
    (train_data, val_data), n_cls = build_loaders(cfg, device, part,
                                                  port if port is not None else cfg.get('sock_data'))
    try:  # from here on a loader process may be running: always close it
        net = model.build(cfg['model'], n_cls, cfg['dropout'], cfg['crop_size'],
                          cfg['seed']).to(device)
        if exchanger.rank:  # same initial weights everywhere, but each worker its own dropout
            torch.manual_seed(cfg['seed'] + trainer.WORKER_SEED_STRIDE * exchanger.rank)
        opt = optim.MomentumSGD(net.named_parameters(), cfg['learning_rate'], cfg['momentum'],
                                cfg['weight_decay'], cfg['use_momentum'],
                                cfg['use_nesterov_momentum'])
        loop = trainer.Trainer(cfg, net, opt, (train_data, val_data), device, exchanger)
        loop.on_epoch_end = plot.write_quietly  # training.png, when matplotlib is installed
        start = 0
        if cfg['resume_train']:
            start = loop.restore(checkpoint.load(cfg['weights_dir'], cfg['load_epoch']))
            loop.log(f'resumed from {checkpoint.snapshot_path(cfg["weights_dir"], start)} '
                     f'(epoch {start}, lr {opt.lr:g})')
        exchanger.attach(opt.params, opt.momentum, device)  # after channels_last and resume
        if exchanger.is_main:  # only now: a run that fails to start leaves weights_dir as it was
            config.dump(cfg, os.path.join(cfg['weights_dir'], 'config.yaml'))
        n_params = sum(p.numel() for p in net.parameters())
        loop.log(f'{cfg["model"]}: {n_params:,} parameters, {n_cls} classes, device {device}, '
                 f'{len(train_data)} train / {len(val_data)} val batches of {cfg["batch_size"]}')
        return loop.fit(start)
    finally:
        train_data.close()
        val_data.close()


def summary(cfg, history):
    if not history:
        return f"done: nothing to train (n_epochs {cfg['n_epochs']})"
    last = history[-1]
    return (f"done: epoch {last['epoch']}, val top-1 accuracy {100 * (1 - last['val_error']):.2f} %"
            f" (top-5 {100 * (1 - last['val_top5_error']):.2f} %); records in "
            f"{os.path.join(cfg['weights_dir'], 'val_record.npy')}")


def main(argv=None):
    try:
        cfg = config.command_line(__doc__, argv, {**config.CONFIG, **config.SPEC_1GPU})
        if cfg['lib_conv']:
            print('notice: lib_conv is ignored (PyTorch picks the convolution library)')
        print('config:\n' + config.describe(cfg), flush=True)
        history = run(cfg)
    except (config.ConfigError, data.DataError, loader.LoaderError, FileNotFoundError,
            ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130
    print(summary(cfg, history))
    return 0


if __name__ == '__main__':
    sys.exit(main())
