"""Loading and checking a paths file (preprocessing/paths.yaml, demo_paths.yaml, or the user's own).

Every key is declared in KEYS; an unknown key is an error naming the closest valid one. Relative paths
are relative to the directory of the paths file, so the file works from any working directory.
"""
import difflib
import os

import yaml

from preprocessing import PrepError

REQUIRED = object()  # marks keys without a default

# key: default. The meaning of each key is commented in preprocessing/paths.yaml.
KEYS = {
    'train_img_dir': REQUIRED,
    'val_img_dir': REQUIRED,
    'tar_root_dir': REQUIRED,
    'tar_train_dir': REQUIRED,
    'tar_val_dir': REQUIRED,
    'misc_dir': REQUIRED,
    'devkit': None,              # imagenet layouts: the devkit archive or folder, or else the two files:
    'meta_clsloc_mat': None,     # the devkit's synsets (meta_clsloc.mat or meta.mat)
    'val_label_file': None,      # the devkit's val ground truth
    'valtxt_filename': None,     # None: misc_dir/val.txt
    'traintxt_filename': None,   # None: misc_dir/train.txt
    'img_size': 256,
    'pad': 0,                    # black border: images resized to img_size - 2 * pad, then framed
    'batch_size': 256,
    'sub_batches': [1],          # train_2gpu.py takes halves of the whole batches
    'workers': None,             # None: all cores
    'layout': 'auto',
    'cifar100_labels': 'fine',   # cifar100_bin: fine (100 classes) or coarse (20)
}
PATH_KEYS = [k for k in KEYS if k.endswith(('_dir', '_mat', '_file', '_filename')) or k == 'devkit']
LAYOUTS = ('imagenet', 'imagenet_tar', 'folders', 'cifar10_bin', 'cifar100_bin', 'auto')


def load_paths(path):
    """The settings of a paths file as a dict holding every key of KEYS, paths made absolute."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise PrepError(f'cannot read paths file {path}: {e.strerror}') from None
    except yaml.YAMLError as e:
        where = getattr(e, 'problem_mark', None)
        line = f' at line {where.line + 1}' if where else ''
        raise PrepError(f'{path}: not valid YAML{line}') from None
    if not isinstance(raw, dict):
        raise PrepError(f'{path}: expected a mapping of key: value')
    for key in raw:
        if key not in KEYS:
            close = difflib.get_close_matches(str(key), KEYS, n=1)
            hint = f"did you mean '{close[0]}'?" if close else 'valid keys: ' + ', '.join(KEYS)
            raise PrepError(f"{path}: unknown key '{key}' ({hint})")
    cfg = {k: raw.get(k, default) for k, default in KEYS.items()}
    missing = [k for k, v in cfg.items() if v is REQUIRED]
    if missing:
        raise PrepError(f'{path}: missing key(s): {", ".join(missing)}')
    base = os.path.dirname(os.path.abspath(path))
    for key in PATH_KEYS:
        if cfg[key] is not None:
            if not isinstance(cfg[key], str):
                raise PrepError(f'{path}: {key} must be a path, got {cfg[key]!r}')
            cfg[key] = os.path.normpath(os.path.join(base, os.path.expanduser(cfg[key])))
    cfg['traintxt_filename'] = cfg['traintxt_filename'] or os.path.join(cfg['misc_dir'], 'train.txt')
    cfg['valtxt_filename'] = cfg['valtxt_filename'] or os.path.join(cfg['misc_dir'], 'val.txt')
    check_values(cfg, path)
    return cfg


def check_values(cfg, path):
    """Types and ranges of the non-path keys; raises PrepError naming the key."""
    def positive_int(x):
        return isinstance(x, int) and not isinstance(x, bool) and x > 0

    for key in ('img_size', 'batch_size'):
        if not positive_int(cfg[key]):
            raise PrepError(f'{path}: {key} must be a positive integer, got {cfg[key]!r}')
    pad = cfg['pad']
    if not isinstance(pad, int) or isinstance(pad, bool) or pad < 0 or 2 * pad >= cfg['img_size']:
        raise PrepError(f'{path}: pad must be an integer from 0 to (img_size - 1) // 2, got {pad!r}')
    if cfg['workers'] is not None and not positive_int(cfg['workers']):
        raise PrepError(f'{path}: workers must be a positive integer or null, got {cfg["workers"]!r}')
    if cfg['layout'] not in LAYOUTS:
        raise PrepError(f'{path}: layout must be one of {", ".join(LAYOUTS)}, got {cfg["layout"]!r}')
    if cfg['cifar100_labels'] not in ('fine', 'coarse'):
        raise PrepError(f'{path}: cifar100_labels must be fine or coarse, got {cfg["cifar100_labels"]!r}')
    subs = cfg['sub_batches']
    if not isinstance(subs, list) or not subs or not all(positive_int(n) for n in subs) \
            or len(set(subs)) != len(subs):
        raise PrepError(f'{path}: sub_batches must be a list of distinct positive integers, got {subs!r}')
    for n in subs:
        if cfg['batch_size'] % n:
            raise PrepError(f'{path}: batch_size {cfg["batch_size"]} cannot be split in {n} equal parts '
                            f'(sub_batches)')
