"""Config keys and their checking: the training config (YAML merging, `key=value` overrides) and
the schema mechanism that preprocessing's paths files use too. A leaf: it imports no torch and no
other module of lib/ (what a run is made of, from a merged config, is lib/runs.py's).

A run's config is  config.yaml  <-  spec file  <-  command-line overrides.  Every key is declared
once as a Key (default, meaning, allowed values); its default fixes its type, and an unknown key is
an error that names the closest valid one. Paths set in a YAML file are relative to that file;
paths given on the command line are relative to the current directory. The merged config is a plain
dict of plain values (no queues, sockets or processes in it). docs/configuration.md is generated
from these declarations:  python -m tools.config_docs > docs/configuration.md
"""
import argparse
import difflib
import os
from typing import NamedTuple

import yaml

from lib import ROOT, UserError

REQUIRED = object()  # the default of a key that every file must set


class Key(NamedTuple):
    """One config key. The default fixes the type (kind: where the default is None or REQUIRED;
    a None default makes null a valid value)."""
    default: object
    meaning: str                # markdown, for docs/configuration.md
    check: tuple = None         # (test of the value, what it must be)
    choices: tuple = ()
    path: bool = False          # a path: relative to the file that sets it
    kind: type = None


def at_least(n):
    return (lambda v: v >= n, f'at least {n}')


ABOVE_0 = (lambda v: v > 0, 'above 0')
IN_0_1 = (lambda v: 0 <= v < 1, 'in [0, 1)')
PORT = (lambda v: 1 <= v <= 65535, 'a port in 1..65535')

# The training config (config.yaml). The shipped YAML files hold exactly these keys and defaults.
CONFIG = {
    # --- schedule -----------------------------------------------------------------------
    'resume_train': Key(False, 'continue the run in `weights_dir` from `model_<load_epoch>.pt`, with '
                        'that run\'s saved config (the command line changes what it names, except '
                        '`learning_rate` and `seed`: the snapshot\'s lr and random streams go on)'),
    'load_epoch': Key(0, 'epoch of the snapshot to resume from (0: the newest)', at_least(0)),
    'n_epochs': Key(60, 'train until this epoch (inclusive)', at_least(0)),
    'learning_rate': Key(0.01, 'initial learning rate (biases use 2×, and no weight decay)', ABOVE_0),
    'lr_policy': Key('step', '`step`: ÷10 after each epoch in `lr_step`; `auto`: ÷10 when (after epoch 5) '
                     'the val top-1 error fell by less than `lr_adapt_threshold` over the last 2 epochs; '
                     '`cosine`: half a cosine from the lr down to 0 at `n_epochs`, updated every step '
                     "(TF's ImageNet recipe)", choices=('step', 'auto', 'cosine')),
    'lr_adapt_threshold': Key(0.01, '`auto` policy: the smallest drop of the val top-1 error over 2 '
                              'epochs that keeps the lr', at_least(0)),
    'lr_step': Key([20, 40], '`step` policy: epochs after which the lr is divided by 10',
                   (lambda v: all(e >= 1 for e in v), 'a list of epochs, each at least 1')),
    'warmup_epochs': Key(0, 'raise the lr linearly from 0 over this many epochs, step by step (any '
                         'policy)', at_least(0)),
    'label_smoothing': Key(0.0, 'training loss: cross-entropy with this much label smoothing '
                           '(validation loss stays plain)', IN_0_1),
    # --- data ---------------------------------------------------------------------------
    'use_data_layer': Key(False, 'ship uint8 batches and subtract mean / crop / mirror on the device'),
    'rand_crop': Key(True, 'random crop (offsets in [0, 2·⌊(S−crop)/2⌋], 0..28 for 256→227) and mirror; '
                     '`False`: centre crop, no mirror, in training too'),
    'shuffle': Key(False, 'shuffle the order of the training batch files every epoch (one order for all '
                   'workers, drawn from `seed`)'),
    'para_load': Key(False, 'a separate loader process reads, crops and mirrors the next batch while '
                     'the trainer computes'),
    'loader_timeout': Key(60.0, '`para_load`: seconds to wait for one batch before stopping with an '
                          'error naming the loader and the file', ABOVE_0),
    'batch_crop_mirror': Key(False, 'one crop/mirror draw per batch instead of per image'),
    'crop_size': Key(227, 'side of the square crop fed to the network (227 for `alexnet`)', at_least(1)),
    'synthetic': Key(False, 'train on random in-memory uint8 batches (no dataset on disk), e.g. to '
                     'benchmark: `python train.py synthetic=True gpu=cpu`'),
    'synthetic_batches': Key(100, '`synthetic`: training batches per epoch (validation: a tenth)',
                             at_least(1)),
    'num_classes': Key(0, '0: from `dataset.yaml` next to the labels folder, else the largest label + 1; '
                       '`synthetic`: 0 means 1000', (lambda v: v >= 0, 'at least 0 (0: from the dataset)')),
    'data': Key('data/imagenet', 'the folder preprocessing wrote (its `tar_root_dir`, holding '
                '`dataset.yaml`): gives `train_folder`, `val_folder`, `label_folder`, `mean_file` and '
                '`batch_size` where they are left empty', path=True),
    'label_folder': Key('', "folder of `train_labels.npy`, `val_labels.npy` (`''`: `<data>/labels`)",
                        path=True),
    'mean_file': Key('', "mean image, float32 (3, S, S) (`''`: `<data>/misc/img_mean.npy`)", path=True),
    # --- model and optimiser --------------------------------------------------------------
    'model': Key('alexnet', '`alexnet` (the reference network, 227 px) or `alexnet_cifar` '
                 "(cuda-convnet layers-18pct, as SINGA's AlexNet on CIFAR-10; any crop, 32 px typical)",
                 choices=('alexnet', 'alexnet_cifar')),
    'dropout': Key(0.5, 'fc6/fc7 dropout, non-inverted as the original (test time scales by 1−p)',
                   IN_0_1),
    'use_momentum': Key(True, 'v ← μv − lr·g ; p ← p + v (`False`: p ← p − lr·g)'),
    'use_nesterov_momentum': Key(False, 'v ← μ²v − (1+μ)·lr·g ; p ← p + v'),
    'momentum': Key(0.9, 'μ', IN_0_1),
    'weight_decay': Key(0.0005, 'λ, added to the gradient of weights (g + λp), not biases', at_least(0)),
    'precision': Key('fp32', '`bf16` or `fp16`: forward and backward under autocast with fp32 master '
                     'weights (the LRN always computes in fp32); `fp16` adds dynamic loss scaling '
                     '(overflowing steps are skipped); `fp64`: float64 throughout, for numerical checks',
                     choices=('fp32', 'bf16', 'fp16', 'fp64')),
    'channels_last': Key(False, 'NHWC memory layout for the convolutions (faster with tensor cores)'),
    'compile': Key(False, '`torch.compile` the network (slow first steps; snapshots keep plain keys)'),
    'cudnn_benchmark': Key(True, 'on CUDA: cuDNN times its convolution algorithms once for the run\'s '
                           'fixed shapes and keeps the fastest (`torch.backends.cudnn.benchmark`); '
                           '`False`: its heuristics. No effect on the CPU'),
    'seed': Key(23455, 'initial weights, dropout masks, crop/mirror/shuffle draws: drawn for the whole '
                'step alike in every worker, each keeping its images\' rows (docs/distributed.md)'),
    'lib_conv': Key('', "the original's convolution library switch: accepted and ignored, with a notice"),
    # --- several workers (train_2gpu.py, torchrun) --------------------------------------------
    'exchange': Key('average', 'torchrun: `average` (parameters + momentum every `exchange_freq` '
                    'steps, the original) or `gradients` (DistributedDataParallel)',
                    choices=('average', 'gradients')),
    'exchange_freq': Key(1, 'train_2gpu.py / torchrun `average`: average parameters and momentum every '
                         'this many steps (and always at the end of an epoch)', at_least(1)),
    'peer_timeout': Key(120.0, 'seconds a worker waits for the others before it stops with an error',
                        ABOVE_0),
    # --- output -----------------------------------------------------------------------------
    'weights_dir': Key('weights', 'snapshots `model_<epoch>.pt`, `val_record.npy`, `history.csv`, '
                       '`config.yaml`', path=True),
    'overwrite': Key(False, 'a fresh run (no `resume_train`) into a `weights_dir` that holds snapshots '
                     'is refused; `True` first moves the old run into `weights_dir/previous_<N>/`'),
    'snapshot_freq': Key(1, 'write `model_<epoch>.pt` every this many epochs (and after the last)',
                         at_least(1)),
    'print_train_error': Key(True, 'log the training top-1 error too'),
    'print_freq': Key(40, 'log a line every this many iterations', at_least(1)),
}

# One device (spec_1gpu.yaml: train.py, validate_performance.py).
SPEC_1GPU = {
    'gpu': Key('auto', '`auto` (cuda:0 if present, else cpu), `cpu`, `gpu0`, `gpu1`, `cuda:N`'),
    'sock_data': Key(5000, 'loader socket port on 127.0.0.1, used only where ZeroMQ has no `ipc://`',
                     PORT),
    'batch_size': Key(0, 'images per step = images per batch file (0: those of `data`, else of the '
                      'batch files); under torchrun the images of all ranks together', at_least(0)),
    'train_folder': Key('', "folder of `NNNN.hkl` training batches (`''`: "
                        '`<data>/train_hkl_b<B>_b_<B>`)', path=True),
    'val_folder': Key('', "folder of `NNNN.hkl` validation batches (`''`: `<data>/val_hkl_b<B>_b_<B>`)",
                      path=True),
}

# Two workers (spec_2gpu.yaml: train_2gpu.py).
SPEC_2GPU = {
    'gpu0': Key('gpu0', "device of worker 0: as train.py's `gpu` (`cpu`, `cuda:N`, ...)"),
    'gpu1': Key('gpu1', 'device of worker 1'),
    'sock_gpu': Key(5002, 'two hosts: port of the exchange link on `exchange_host` (one host: a unix '
                     'socket in the launcher\'s private folder)', PORT),
    'sock_data0': Key(5000, 'loader socket of worker 0 (used only where ZeroMQ has no `ipc://`)', PORT),
    'sock_data1': Key(5001, 'loader socket of worker 1', PORT),
    'batch_size': Key(0, 'images per step per worker (0: half of the batch files of `data`, else of '
                      'the batch files, or those of a halves file; 2 × 128 = the original\'s 256)',
                      at_least(0)),
    'train_folder': Key('', 'whole `NNNN.hkl` batches of 2 × `batch_size` (each worker takes its half), '
                        "or a folder of `NNNN_0.hkl` / `NNNN_1.hkl` halves (`''`: from `data`)", path=True),
    'val_folder': Key('', "validation batches, as `train_folder` (`''`: from `data`)", path=True),
    'exchange_transport': Key('auto', '`ipc` (CUDA IPC), `shm` (CPU shared memory) or `tcp` (bytes over '
                              'ZeroMQ); `auto`: `ipc` for two GPUs, `shm` for two CPUs, else `tcp`',
                              choices=('auto', 'ipc', 'shm', 'tcp')),
    'exchange_host': Key('', "two hosts: the address worker 0 binds `sock_gpu` on ('': one host; "
                         'then each worker starts with `--worker 0` / `--worker 1`)'),
    'curve_dir': Key('', 'two hosts: the folder of `worker0`/`worker1` CURVE keys that encrypt and '
                     'authenticate the link', path=True),
}

# validate_performance.py's keys besides those of config.yaml and spec_1gpu.yaml.
EVALUATE = {
    'checkpoint': Key('', "snapshot to evaluate (`''`: `weights_dir/model_<load_epoch>.pt`, the newest "
                      'for 0)', path=True),
    'ten_crop': Key(False, 'average the softmax over the 4 corners and the centre of the crop range, '
                    'each also mirrored (`False`: the centre crop)'),
}


class ConfigError(UserError, ValueError):
    """A bad config file, key or value; the message is one line meant for the user."""


def defaults(schema):
    return {k: (list(e.default) if isinstance(e.default, list) else e.default)
            for k, e in schema.items()}


def kind(entry):
    """The type of a Key's values."""
    return entry.kind or (str if entry.path else type(entry.default))


def check_value(key, value, schema, where, error=ConfigError):
    """The value of `key` set in `where`, checked against schema[key]: the key exists, the type is
    the default's (an int is a fine float), the value is one of the choices and passes the check."""
    if key not in schema:
        close = difflib.get_close_matches(str(key), list(schema), n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'?" if close else 'docs/configuration.md lists the keys'
        raise error(f"unknown config key '{key}' in {where}; {hint}")
    entry = schema[key]
    t = kind(entry)
    if value is None and entry.default is None:
        return None
    if t is bool:
        ok = isinstance(value, bool)
    elif t is float:  # an int is a fine float (learning_rate: 1)
        if isinstance(value, str):  # YAML 1.1 reads '1e-3' as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif t is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif t is list:
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool)
                                             for v in value)
    else:  # str; `key=` on the command line (YAML null) means the empty string
        value = '' if value is None and entry.default == '' else value
        ok = isinstance(value, str)
    if not ok:
        like = '' if entry.default is None or entry.default is REQUIRED else f' like {entry.default!r}'
        null = ' or null' if entry.default is None else ''
        name = 'a path' if entry.path else t.__name__
        raise error(f"config key '{key}' in {where} must be {name}{null}{like}, got {value!r}")
    if entry.choices and value not in entry.choices:
        raise error(f"config key '{key}' in {where} must be one of {', '.join(entry.choices)}, "
                    f"got {value!r}")
    if entry.check and not entry.check[0](value):
        raise error(f"config key '{key}' in {where} must be {entry.check[1]}, got {value!r}")
    return value


def read_yaml(path, error=ConfigError, what='config file'):
    """The YAML document of the file at path (None when it is empty); `error`, one line naming
    the file, when it cannot be read or is not YAML."""
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise error(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None


def load_yaml(path, error=ConfigError, what='config file'):
    """A YAML file of `key: value` (a config, spec or paths file) as a dict."""
    data = read_yaml(path, error, what)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{path} must hold a mapping of key: value")
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


def merge(schema, sources, error=ConfigError):
    """sources: [(name, dict, base_dir or None)] applied in order over the schema's defaults, each
    value checked (check_value); `error` is the exception class raised for a bad one.

    Relative paths are resolved against base_dir (a YAML file's folder) or, when base_dir is None
    (command line), against the current directory; relative default paths against the repo root.
    """
    cfg = defaults(schema)
    for where, values, base_dir in sources:
        for key, value in values.items():
            value = check_value(key, value, schema, where, error)
            if schema[key].path and value:
                value = os.path.normpath(os.path.join(base_dir or os.getcwd(), os.path.expanduser(value)))
            cfg[key] = value
    missing = [k for k, v in cfg.items() if v is REQUIRED]
    if missing:
        raise error(f"{', '.join(w for w, _, _ in sources)}: missing config key(s) {', '.join(missing)}")
    for key, entry in schema.items():
        if entry.path and cfg[key] and not os.path.isabs(cfg[key]):
            cfg[key] = os.path.normpath(os.path.join(ROOT, cfg[key]))
    return cfg


def yaml_source(path, error=ConfigError, what='config file'):
    """A YAML file as a source of merge(): its paths are relative to its folder."""
    return str(path), load_yaml(path, error, what), os.path.dirname(os.path.abspath(path))


def to_yaml(cfg):
    """The merged config as YAML text, in schema order (a run's weights_dir/config.yaml)."""
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)


def describe(cfg):
    width = max(map(len, cfg))
    return '\n'.join(f'  {k:<{width}} : {v}' for k, v in cfg.items())


def parser(doc, spec='spec_1gpu.yaml'):
    """The entry points' arguments: `[--config FILE] [--spec FILE] [key=value ...]`, the defaults
    being the repo's config.yaml and `spec`; a script may add options of its own."""
    p = argparse.ArgumentParser(description=doc.split('\n')[0],
                                epilog='key=value overrides any config key (values are YAML)')
    p.add_argument('--config', default=os.path.join(ROOT, 'config.yaml'))
    p.add_argument('--spec', default=os.path.join(ROOT, spec))
    p.add_argument('overrides', nargs='*', metavar='key=value')
    return p
