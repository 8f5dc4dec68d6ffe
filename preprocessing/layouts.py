"""Listing the raw images of a dataset and their labels, in the two supported layouts.

imagenet: train_img_dir/<wnid>/*.JPEG, a flat val_img_dir, and the devkit: meta_clsloc.mat (struct array
          `synsets`: field 0 = 1-based ILSVRC id, field 1 = WNID) and a ground-truth file holding the
          ILSVRC id of each val image, one per line (ids are not in WNID order).
folders:  train_img_dir/<class>/*, val_img_dir/<class>/*, no devkit.
auto:     imagenet if meta_clsloc_mat exists and val_img_dir holds images directly, else folders.
The label of a class is the index of its folder among the train folders sorted by name. Relative paths
always use '/', so train.txt and the shuffled list are the same on every OS.
"""
import os
import re
from dataclasses import dataclass

import numpy as np
import scipy.io

from preprocessing import PrepError

IMAGE_EXTS = ('.jpg', '.jpeg', '.png')  # compared lower-case
VAL_NUMBER = re.compile(r'_(\d+)\.[^.]+$')  # ILSVRC2012_val_00000001.JPEG -> ground-truth line 1


@dataclass
class Listing:
    layout: str       # 'imagenet' or 'folders' (never 'auto')
    classes: list     # class folder names, in label order
    train: list       # '<class>/<file>', sorted
    val: list         # '<file>' (imagenet) or '<class>/<file>' (folders), sorted
    val_labels: list  # label of each val file

    def train_labels(self, files):
        """Labels of train files given as '<class>/<file>' (any order)."""
        index = {c: i for i, c in enumerate(self.classes)}
        return [index[f.split('/', 1)[0]] for f in files]


def list_dataset(cfg):
    """The Listing of the dataset described by a loaded paths file."""
    layout = resolve_layout(cfg)
    classes = subfolders(cfg['train_img_dir'])
    if not classes:
        raise PrepError(f'no class folders in {cfg["train_img_dir"]}')
    train = []
    for c in classes:
        names = image_files(os.path.join(cfg['train_img_dir'], c))
        if not names:
            raise PrepError(f'no images ({"/".join(IMAGE_EXTS)}) in {os.path.join(cfg["train_img_dir"], c)}')
        train += [f'{c}/{n}' for n in names]
    if layout == 'imagenet':
        val, val_labels = list_val_imagenet(cfg, classes)
    else:
        val, val_labels = list_val_folders(cfg, classes)
    return Listing(layout, classes, sorted(train), val, val_labels)


def resolve_layout(cfg):
    if cfg['layout'] != 'auto':
        return cfg['layout']
    mat, val_dir = cfg['meta_clsloc_mat'], cfg['val_img_dir']
    flat_val = os.path.isdir(val_dir) and image_files(val_dir)
    return 'imagenet' if mat and os.path.isfile(mat) and flat_val else 'folders'


def list_val_folders(cfg, classes):
    val_dir, index = cfg['val_img_dir'], {c: i for i, c in enumerate(classes)}
    files = []
    for c in subfolders(val_dir):
        if c not in index:
            raise PrepError(f'val class folder {os.path.join(val_dir, c)} is not among the training '
                            f'classes in {cfg["train_img_dir"]}')
        files += [f'{c}/{n}' for n in image_files(os.path.join(val_dir, c))]
    if not files:
        hint = ' (a flat val folder needs layout: imagenet and the devkit)' if image_files(val_dir) else ''
        raise PrepError(f'no images in the class folders of {val_dir}{hint}')
    files.sort()
    return files, [index[f.split('/', 1)[0]] for f in files]


def list_val_imagenet(cfg, classes):
    """Flat val files and their labels through ground-truth ids -> devkit WNIDs -> train folders."""
    val_dir, gt_file, mat = cfg['val_img_dir'], cfg['val_label_file'], cfg['meta_clsloc_mat']
    for key in ('meta_clsloc_mat', 'val_label_file'):
        if not cfg[key]:
            raise PrepError(f'layout imagenet needs {key} in the paths file')
    wnid_of, ids = read_synsets(mat), read_ground_truth(gt_file)
    names = image_files(val_dir)
    if not names:
        hint = ' (class folders need layout: folders)' if subfolders(val_dir) else ''
        raise PrepError(f'no images ({"/".join(IMAGE_EXTS)}) directly in {val_dir}{hint}')
    index = {c: i for i, c in enumerate(classes)}
    # ILSVRC names carry their ground-truth line; other names are matched by position.
    numbers = [VAL_NUMBER.search(n) for n in names]
    lines = [int(m.group(1)) for m in numbers] if all(numbers) else range(1, len(names) + 1)
    labels = []
    for name, line in zip(names, lines):
        if not 1 <= line <= len(ids):
            raise PrepError(f'{gt_file} has {len(ids)} ids, but {name} needs line {line}')
        gt = ids[line - 1]
        if gt not in wnid_of:
            raise PrepError(f'ILSVRC id {gt} (line {line} of {gt_file}) is not in the synsets of {mat}')
        if wnid_of[gt] not in index:
            raise PrepError(f'{wnid_of[gt]} (ILSVRC id {gt}, val image {name}) is not a class folder '
                            f'in {cfg["train_img_dir"]}')
        labels.append(index[wnid_of[gt]])
    return names, labels


def read_ground_truth(path):
    try:
        with open(path) as f:
            words = f.read().split()
    except OSError as e:
        raise PrepError(f'cannot read val ground truth {path}: {e.strerror}') from None
    try:
        return [int(w) for w in words]
    except ValueError as e:
        raise PrepError(f'{path}: expected one integer ILSVRC id per line ({e})') from None


def read_synsets(path):
    """{ILSVRC id: WNID} from the devkit's meta_clsloc.mat."""
    try:
        synsets = scipy.io.loadmat(path, squeeze_me=True)['synsets']
        return {int(s[0]): str(s[1]) for s in np.ravel(synsets)}
    except OSError as e:
        raise PrepError(f'cannot read devkit {path}: {e.strerror}') from None
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise PrepError(f'{path}: expected a struct array `synsets` (field 0 = ILSVRC id, 1 = WNID) '
                        f'({type(e).__name__}: {e})') from None


def subfolders(folder):
    """Sorted names of the (non-hidden) subfolders of a folder."""
    return sorted(e.name for e in scan(folder) if e.is_dir() and not e.name.startswith('.'))


def image_files(folder):
    """Sorted names of the image files directly in a folder."""
    return sorted(e.name for e in scan(folder)
                  if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTS)


def scan(folder):
    try:
        with os.scandir(folder) as it:
            return list(it)
    except OSError as e:
        raise PrepError(f'cannot list {folder}: {e.strerror}') from None
