"""What makes a rerun safe: the shuffled training list is kept, and misc_dir/fingerprint.json records
the settings and input files the outputs were made from, plus the result of phase 1 (the unreadable
files) so that a resumed run does not decode every image again.

A rerun with other settings or other valid files, over existing outputs, stops with an error instead
of mixing old and new batches.
"""
import glob
import hashlib
import json
import os

import numpy as np

from lib.atomic import save_npy, save_text
from preprocessing import PrepError
from preprocessing.writer import batch_dir

SHUFFLED = 'shuffled_train_filenames.npy'
FINGERPRINT = 'fingerprint.json'


def shuffled_train(misc_dir, train):
    """The training files in shuffled order: seed 1, as the original (np.random.seed(1); shuffle)."""
    path = os.path.join(misc_dir, SHUFFLED)
    if not os.path.exists(path):
        files = np.array(train)  # '<class>/<file>', sorted
        np.random.RandomState(1).shuffle(files)
        save_npy(path, files)
        return files.tolist()
    try:
        files = np.load(path).tolist()  # a unicode array: no pickle involved
    except (OSError, ValueError) as e:
        raise PrepError(f'cannot read {path} ({e}); delete it to make a new one') from None
    if sorted(files) != train:
        raise PrepError(f'{path} does not list the files now in the train folders; delete it to reshuffle')
    return files


def digest(obj):
    """Short hash of a JSON-able object (lists of file names, settings)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def read_record(misc_dir):
    path = os.path.join(misc_dir, FINGERPRINT)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None  # treated like outputs of unknown origin
    return record if isinstance(record, dict) and record.keys() == {'settings', 'files', 'checked'} else None


def save_record(misc_dir, record):
    save_text(os.path.join(misc_dir, FINGERPRINT), json.dumps(record, indent=1, sort_keys=True) + '\n')


def existing_output(cfg):
    """Path of one output of an earlier run (batch file, labels, mean), or None."""
    batch_size = cfg['batch_size']
    patterns = [os.path.join(batch_dir(d, batch_size, n), '*.hkl')
                for d in (cfg['tar_train_dir'], cfg['tar_val_dir']) for n in cfg['sub_batches']]
    patterns += [os.path.join(cfg['tar_root_dir'], 'labels', '*.npy'),
                 os.path.join(cfg['misc_dir'], 'img_mean.npy')]
    for pattern in patterns:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def guard(cfg, record, settings, files=None):
    """Raise PrepError if outputs exist that were made with other settings (or other valid files)."""
    found = existing_output(cfg)
    if found is None:
        return
    fix = f'delete the earlier outputs (batch folders, labels, {cfg["misc_dir"]}) to make new ones'
    if record is None:
        raise PrepError(f'{found} exists but {FINGERPRINT} in {cfg["misc_dir"]} does not: outputs of '
                        f'unknown origin; {fix}')
    for key, value in settings.items():
        if record['settings'].get(key) != value:
            raise PrepError(f'{found} was made with {key}={record["settings"].get(key)}, now {value}; {fix}')
    if files is not None and record['files'] != files:
        raise PrepError(f'the valid input files differ from those {found} was made from; {fix}')
