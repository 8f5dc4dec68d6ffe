"""Training configuration: defaults with their meaning, YAML merging and `key=value` overrides.

A run's config is  config.yaml  <-  spec file  <-  command-line overrides.  Every key must be
declared below; its default fixes its type, and an unknown key is an error that names the closest
valid one. Paths set in a YAML file are relative to that file; paths given on the command line are
relative to the current directory. The merged config is a plain dict of plain values (no queues,
sockets or processes in it).
"""
import argparse
import difflib
import os

import yaml

from lib import UserError
from lib.atomic import atomic_write

# key: (default, meaning). The shipped config.yaml / spec_1gpu.yaml hold the same values.
CONFIG = {
    # --- schedule -----------------------------------------------------------------------
    'resume_train': (False, 'continue from weights_dir/model_<load_epoch>.pt'),
    'load_epoch': (0, 'epoch of the snapshot to resume from'),
    'n_epochs': (60, 'train until this epoch (inclusive)'),
    'learning_rate': (0.01, 'initial learning rate (biases use 2x)'),
    'lr_policy': ('step', 'step: /10 after each epoch in lr_step; auto: /10 when val error stalls; '
                          'cosine: to 0 at n_epochs, per step'),
    'lr_adapt_threshold': (0.01, 'auto policy: minimum drop of val top-1 error over 2 epochs'),
    'lr_step': ([20, 40], 'step policy: epochs after which lr is divided by 10'),
    'warmup_epochs': (0, 'raise lr linearly from 0 over this many epochs (any policy), per step'),
    'label_smoothing': (0.0, 'training loss: cross-entropy with this much label smoothing'),
    # --- data ---------------------------------------------------------------------------
    'use_data_layer': (False, 'ship uint8 batches and do mean/crop/mirror on the device'),
    'rand_crop': (True, 'random crop + mirror in training; False: centre crop, no mirror'),
    'shuffle': (False, 'shuffle the order of the training batch files every epoch'),
    'para_load': (False, 'load and prepare the next batch in a separate process'),
    'loader_timeout': (60.0, 'para_load: seconds to wait for a batch before stopping with an error'),
    'batch_crop_mirror': (False, 'one crop/mirror draw per batch instead of per image'),
    'crop_size': (227, 'side of the square crop fed to the network'),
    'synthetic': (False, 'train on random in-memory batches: no dataset needed (benchmarks)'),
    'synthetic_batches': (100, 'synthetic: training batches per epoch (val: a tenth)'),
    'num_classes': (0, '0: from dataset.yaml / the labels; synthetic: 0 means 1000'),
    'data': ('data/imagenet', 'the folder preprocessing wrote (its tar_root_dir, holding '
                              'dataset.yaml): gives the folders, mean_file and batch_size left empty'),
    'label_folder': ('', "folder holding train_labels.npy, val_labels.npy ('': <data>/labels)"),
    'mean_file': ('', "mean image, float32 (3, S, S) ('': <data>/misc/img_mean.npy)"),
    # --- model and optimiser --------------------------------------------------------------
    'model': ('alexnet', 'alexnet (227 px input) or alexnet_cifar (cuda-convnet 18pct, 32 px)'),
    'dropout': (0.5, 'dropout probability of fc6/fc7 (alexnet)'),
    'use_momentum': (True, 'v = mu*v - lr*g; p = p + v  (False: p = p - lr*g)'),
    'use_nesterov_momentum': (False, 'v = mu^2*v - (1+mu)*lr*g; p = p + v'),
    'momentum': (0.9, 'mu'),
    'weight_decay': (0.0005, 'L2 decay added to the gradient of weights (not biases)'),
    'precision': ('fp32', 'fp32 | bf16 | fp16: autocast dtype of forward/backward (fp16 adds loss '
                          'scaling) | fp64: float64 throughout (numerical checks; slow)'),
    'channels_last': (False, 'NHWC memory layout for the convolutions (faster on recent GPUs)'),
    'compile': (False, 'torch.compile the network (slow first steps, faster after)'),
    'cudnn_benchmark': (True, 'CUDA: cuDNN times its convolution algorithms for the fixed shapes '
                              'once, then uses the fastest (False: its heuristics)'),
    'seed': (23455, 'seed of initial weights, dropout and crop/mirror draws (same for all workers)'),
    'lib_conv': ('', "the original's conv library switch: accepted, ignored with a notice"),
    # --- several workers (train_2gpu.py, torchrun) --------------------------------------------
    'exchange': ('average', 'torchrun: average (parameters + momentum every exchange_freq steps, '
                            'the original) | gradients (DistributedDataParallel)'),
    'exchange_freq': (1, 'average parameters and momentum every this many steps'),
    'peer_timeout': (120.0, 'seconds a worker waits for the others before stopping with an error'),
    # --- output -----------------------------------------------------------------------------
    'weights_dir': ('weights', 'snapshots, val_record.npy, history.csv, config.yaml'),
    'overwrite': (False, 'a fresh run into a weights_dir holding snapshots moves that run into '
                         'weights_dir/previous_<N> first (False: refuse to start)'),
    'snapshot_freq': (1, 'save model_<epoch>.pt every this many epochs'),
    'print_train_error': (True, 'log the training top-1 error too'),
    'print_freq': (40, 'log a line every this many iterations'),
}

SPEC_1GPU = {
    'gpu': ('auto', 'device: auto, cpu, gpu0, gpu1, cuda:N'),
    'sock_data': (5000, 'port of the loader socket (para_load)'),
    'batch_size': (0, "images per step = images per batch file (0: data's batch files); "
                      'under torchrun the images of all ranks together'),
    'train_folder': ('', "folder of training NNNN.hkl files ('': <data>/train_hkl_b<B>_b_<B>)"),
    'val_folder': ('', "folder of validation NNNN.hkl files ('': <data>/val_hkl_b<B>_b_<B>)"),
}

SPEC_2GPU = {
    'gpu0': ('gpu0', 'device of worker 0'),
    'gpu1': ('gpu1', 'device of worker 1'),
    'sock_gpu': (5002, 'port of the weight-exchange socket'),
    'sock_data0': (5000, 'loader socket of worker 0'),
    'sock_data1': (5001, 'loader socket of worker 1'),
    'batch_size': (0, "images per step per worker (0: half of data's batch files)"),
    'train_folder': ('', 'NNNN.hkl batches of 2 x batch_size (each worker takes its half) or a '
                         "folder of NNNN_0.hkl / NNNN_1.hkl halves ('': from data)"),
    'val_folder': ('', "validation batches, as train_folder ('': from data)"),
    'exchange_transport': ('auto', 'auto | ipc (CUDA IPC) | shm (CPU shared memory) | tcp (bytes '
                                   'over ZeroMQ); auto: ipc for 2 GPUs, shm for 2 CPUs, else tcp'),
    'exchange_host': ('', "address worker 0 binds sock_gpu on ('': 127.0.0.1, this host only)"),
    'curve_dir': ('', 'folder of worker0/worker1 CURVE keys: encrypt and authenticate the link'),
}

EVALUATE = {
    'checkpoint': ('', 'snapshot to evaluate (default: weights_dir/model_<load_epoch>.pt)'),
    'ten_crop': (False, 'average the softmax over 4 corners + centre, each mirrored'),
}

PATH_KEYS = ('data', 'label_folder', 'mean_file', 'weights_dir', 'train_folder', 'val_folder', 'checkpoint',
             'curve_dir')
CHOICES = {
    'model': ('alexnet', 'alexnet_cifar'),
    'lr_policy': ('step', 'auto', 'cosine'),
    'precision': ('fp32', 'bf16', 'fp16', 'fp64'),
    'exchange_transport': ('auto', 'ipc', 'shm', 'tcp'),
    'exchange': ('average', 'gradients'),
}

# key: (test, what it must be). Checked for every entry point once the sources are merged.
RANGES = {
    'n_epochs': (lambda v: v >= 0, 'at least 0'),
    'load_epoch': (lambda v: v >= 0, 'at least 0'),
    'learning_rate': (lambda v: v > 0, 'above 0'),
    'lr_adapt_threshold': (lambda v: v >= 0, 'at least 0'),
    'lr_step': (lambda v: all(e >= 1 for e in v), 'a list of epochs, each at least 1'),
    'warmup_epochs': (lambda v: v >= 0, 'at least 0'),
    'label_smoothing': (lambda v: 0 <= v < 1, 'in [0, 1)'),
    'loader_timeout': (lambda v: v > 0, 'above 0'),
    'crop_size': (lambda v: v >= 1, 'at least 1'),
    'synthetic_batches': (lambda v: v >= 1, 'at least 1'),
    'num_classes': (lambda v: v >= 0, 'at least 0 (0: from the dataset)'),
    'dropout': (lambda v: 0 <= v < 1, 'in [0, 1)'),
    'momentum': (lambda v: 0 <= v < 1, 'in [0, 1)'),
    'weight_decay': (lambda v: v >= 0, 'at least 0'),
    'exchange_freq': (lambda v: v >= 1, 'at least 1'),
    'peer_timeout': (lambda v: v > 0, 'above 0'),
    'snapshot_freq': (lambda v: v >= 1, 'at least 1'),
    'print_freq': (lambda v: v >= 1, 'at least 1'),
    'batch_size': (lambda v: v >= 0, "at least 0 (0: from data)"),
    'sock_data': (lambda v: 1 <= v <= 65535, 'a port in 1..65535'),
    'sock_data0': (lambda v: 1 <= v <= 65535, 'a port in 1..65535'),
    'sock_data1': (lambda v: 1 <= v <= 65535, 'a port in 1..65535'),
    'sock_gpu': (lambda v: 1 <= v <= 65535, 'a port in 1..65535'),
}


class ConfigError(UserError, ValueError):
    """A bad config file, key or value; the message is one line meant for the user."""


def defaults(schema):
    return {k: (list(v) if isinstance(v, list) else v) for k, (v, _) in schema.items()}


def _check(key, value, schema, where):
    if key not in schema:
        close = difflib.get_close_matches(key, list(schema), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ''
        raise ConfigError(f"unknown config key '{key}' in {where}{hint}")
    default = schema[key][0]
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):  # an int is a fine float (learning_rate: 1)
        if isinstance(value, str):  # YAML 1.1 reads '1e-3' as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, list):
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool)
                                             for v in value)
    else:  # str; `key=` on the command line (YAML null) means the empty string
        value = '' if value is None else value
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"config key '{key}' in {where} must be {type(default).__name__} "
                          f"like {default!r}, got {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"config key '{key}' in {where} must be one of "
                          f"{', '.join(CHOICES[key])}, got {value!r}")
    return value


def load_yaml(path):
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of key: value")
    return data


def parse_overrides(args):
    """['n_epochs=3', 'lr_step=[2, 4]'] -> {'n_epochs': 3, 'lr_step': [2, 4]}; values are YAML."""
    out = {}
    for arg in args:
        key, sep, text = arg.partition('=')
        if not sep or not key:
            raise ConfigError(f"override '{arg}' is not of the form key=value")
        try:
            out[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"override '{arg}': value is not valid YAML") from None
    return out


def merge(schema, sources):
    """sources: [(name, dict, base_dir or None)] applied in order over the schema's defaults.

    Relative paths are resolved against base_dir (a YAML file's folder) or, when base_dir is None
    (command line), against the current directory.
    """
    cfg = defaults(schema)
    for where, values, base_dir in sources:
        for key, value in values.items():
            value = _check(key, value, schema, where)
            if key in PATH_KEYS and value:
                value = os.path.normpath(os.path.join(base_dir or os.getcwd(), value))
            cfg[key] = value
    for key in PATH_KEYS:  # defaults are relative to the repo root
        if cfg.get(key) and not os.path.isabs(cfg[key]):
            cfg[key] = os.path.normpath(os.path.join(REPO_ROOT, cfg[key]))
    check_ranges(cfg)
    return cfg


def check_ranges(cfg):
    """ConfigError naming the first key whose value is out of its range (RANGES)."""
    for key, (ok, what) in RANGES.items():
        if key in cfg and not ok(cfg[key]):
            raise ConfigError(f'{key} must be {what}, got {cfg[key]!r}')


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(config_file, spec_file, overrides, schema):
    """The merged config: config_file <- spec_file <- [saved run] <- overrides (a list of
    'key=value'), then the data keys left empty taken from `data` (with_data).

    The saved run is the config of the run a command continues (saved_run): a resume
    (resume_train, load_epoch 0 = the newest snapshot) or the snapshot validate_performance.py
    evaluates. Only the command line overrides it."""
    files = [(path, load_yaml(path), os.path.dirname(os.path.abspath(path)))
             for path in (config_file, spec_file)]
    command = ('command-line overrides', parse_overrides(overrides), None)
    cfg = merge(schema, files + [command])
    from lib import checkpoint
    if cfg['load_epoch'] == 0 and (cfg['resume_train'] or cfg.get('checkpoint') == ''):
        cfg['load_epoch'] = checkpoint.latest_epoch(cfg['weights_dir'])
    saved = saved_run(cfg, schema)
    if saved is None:
        return with_data(cfg, files + [command], schema)
    epoch = cfg['load_epoch']
    cfg = dict(merge(schema, files + [saved, command]), load_epoch=epoch)
    return with_data(cfg, files + [saved, command], schema)


# Keys `data` sets where they are empty (0): the batch folders, labels, mean and batch size.
DATA_KEYS = ('train_folder', 'val_folder', 'label_folder', 'mean_file', 'batch_size')
# What validate_performance.py takes from the run of the snapshot it evaluates.
EVAL_KEYS = ('data',) + DATA_KEYS + ('num_classes', 'synthetic', 'synthetic_batches', 'seed',
                                     'model', 'crop_size')
# What a resumed run never takes from the run it continues.
RUN_LOCAL = ('resume_train', 'load_epoch', 'weights_dir', 'overwrite')


def per_worker(keys):
    """Workers that share one batch file where batch_size is per worker: 2 for train_2gpu.py's
    keys, else 1 (train.py; under torchrun batch_size is the total of all ranks)."""
    return 2 if 'gpu0' in keys else 1


def saved_run(cfg, schema):
    """The source (name, values, folder) of the saved config of the run that cfg continues:
    weights_dir/config.yaml beside the snapshot, else the snapshot's own config. For a resume,
    all but RUN_LOCAL; for validate_performance.py, EVAL_KEYS. None when cfg continues no run.
    batch_size is converted between per worker (train_2gpu.py) and per step (train.py)."""
    from lib import checkpoint
    if 'checkpoint' in schema:
        path = cfg['checkpoint'] or checkpoint.snapshot_path(cfg['weights_dir'], cfg['load_epoch'])
        if not os.path.isfile(path):
            raise checkpoint.SnapshotError(f'no snapshot {path} (set checkpoint=PATH or '
                                           'load_epoch=N)')
        keys = EVAL_KEYS
    elif cfg['resume_train']:
        path = checkpoint.check_exists(cfg['weights_dir'], cfg['load_epoch'])
        keys = [k for k in schema if k not in RUN_LOCAL]
    else:
        return None
    folder = os.path.dirname(os.path.abspath(path))
    where = os.path.join(folder, 'config.yaml')
    if os.path.isfile(where):
        saved = load_yaml(where)
    else:
        where, saved = path, checkpoint.read(path).get('config', {})
    values = {k: v for k, v in saved.items() if k in keys and k in schema}
    if isinstance(values.get('batch_size'), int):
        values['batch_size'] = values['batch_size'] * per_worker(saved) // per_worker(schema)
    return f'{where} (the run continued)', values, folder


def read_dataset(folder):
    """The dataset.yaml preprocessing wrote into `folder`, checked to give batch_size."""
    path = os.path.join(folder, 'dataset.yaml')
    if not os.path.isfile(path):
        raise ConfigError(f'data: no {path} (data is the folder preprocessing wrote, its '
                          'tar_root_dir: preprocess first with sh preprocessing/generate_data.sh, '
                          'or set data=FOLDER)')
    info = load_yaml(path)
    if not (isinstance(info.get('batch_size'), int) and info['batch_size'] >= 1):
        raise ConfigError(f'{path} gives no batch_size (a dataset.yaml of preprocessing holds it)')
    return info


def with_data(cfg, sources, schema):
    """cfg with each of DATA_KEYS that is empty (0), or set in an earlier source than `data`,
    taken from the data folder: <data>/train_hkl_b<B>_b_<B>, val_hkl_..., labels,
    misc/img_mean.npy and B (B/2 per worker in train_2gpu.py), B = dataset.yaml's batch_size.
    A key set at or after data's own source wins. Synthetic runs take B = 256. When only
    batch_size is left and data holds no dataset.yaml, it stays 0: the batch files name it."""
    given = {}
    for i, (_, values, _) in enumerate(sources):
        given.update(dict.fromkeys(values, i))
    need = [k for k in DATA_KEYS
            if k in cfg and (not cfg[k] or given.get(k, -1) < given.get('data', -1))]
    share = per_worker(schema)
    if not need or cfg['synthetic']:
        if 'batch_size' in need:
            cfg['batch_size'] = 256 // share
        return cfg
    meta = os.path.join(cfg['data'], 'dataset.yaml')
    if need == ['batch_size'] and not (cfg['data'] and os.path.isfile(meta)):
        return cfg  # the folders are given: their batch files name the batch_size to set
    if not cfg['data']:
        raise ConfigError(f"data is empty: set data=FOLDER (the folder preprocessing wrote) or "
                          f"{', '.join(need)}")
    info = read_dataset(cfg['data'])
    B = info['batch_size']
    n = 1 if share == 1 or 1 in info.get('sub_batches', [1]) else 2  # else the halves
    found = {'train_folder': os.path.join(cfg['data'], f'train_hkl_b{B}_b_{B // n}'),
             'val_folder': os.path.join(cfg['data'], f'val_hkl_b{B}_b_{B // n}'),
             'label_folder': os.path.join(cfg['data'], 'labels'),
             'mean_file': os.path.join(cfg['data'], 'misc', 'img_mean.npy'),
             'batch_size': B // share}
    cfg.update({k: found[k] for k in need})
    return cfg


def dump(cfg, path):
    """Write the merged config as YAML (atomically), in schema order."""
    def write(tmp):
        with open(tmp, 'w') as f:
            yaml.safe_dump(cfg, f, sort_keys=False, default_flow_style=None)
    atomic_write(str(path), write)


def describe(cfg):
    width = max(map(len, cfg))
    return '\n'.join(f'  {k:<{width}} : {v}' for k, v in cfg.items())


def parser(doc, spec='spec_1gpu.yaml'):
    """The entry points' arguments: `[--config FILE] [--spec FILE] [key=value ...]`, the defaults
    being the repo's config.yaml and `spec`; a script may add options of its own."""
    p = argparse.ArgumentParser(description=doc.split('\n')[0],
                                epilog='key=value overrides any config key (values are YAML)')
    p.add_argument('--config', default=os.path.join(REPO_ROOT, 'config.yaml'))
    p.add_argument('--spec', default=os.path.join(REPO_ROOT, spec))
    p.add_argument('overrides', nargs='*', metavar='key=value')
    return p


def command_line(doc, argv, schema, spec='spec_1gpu.yaml'):
    """The merged config of a command line (ConfigError if bad); see parser()."""
    args = parser(doc, spec).parse_args(argv)
    return load(args.config, args.spec, args.overrides, schema)
