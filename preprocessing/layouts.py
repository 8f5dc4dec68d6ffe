"""Listing the raw images of a dataset and their labels, in the supported layouts.

imagenet:     train_img_dir/<wnid>/*.JPEG, a flat val_img_dir, and the devkit (devkit.py): its synsets
              map the ILSVRC id of each val image (ground truth, one per line) to a WNID.
imagenet_tar: the same from the official archives, not extracted (archives.py): train_img_dir =
              ILSVRC2012_img_train.tar (a tar per class), val_img_dir = ILSVRC2012_img_val.tar; the
              listed names, and so every output, are those the extracted folders give.
folders:      train_img_dir/<class>/*, val_img_dir/<class>/*, no devkit.
cifar10_bin, cifar100_bin: the CIFAR binary versions (cifar.py).
auto:         imagenet_tar if train_img_dir is a .tar file; a CIFAR layout if it is a CIFAR binary
              archive or folder; imagenet if a devkit is set and val_img_dir holds images directly;
              else folders.
The label of a class is the index of its folder among the train folders sorted by name (CIFAR: the
label stored in each record). Relative paths always use '/', so train.txt and the shuffled list are
the same on every OS.
"""
import os
import re
from dataclasses import dataclass

from preprocessing import PrepError, archives, cifar
from preprocessing.devkit import read_devkit
from preprocessing.sources import IMAGE_EXTS, FolderSource

VAL_NUMBER = re.compile(r'_(\d+)\.[^.]+$')  # ILSVRC2012_val_00000001.JPEG -> ground-truth line 1


@dataclass
class Listing:
    layout: str       # never 'auto'
    classes: list     # class folder names, in label order
    train: list       # '<class>/<file>', sorted
    val: list         # '<file>' (imagenet) or '<class>/<file>' (folders), sorted
    val_labels: list  # label of each val file
    sources: dict = None       # {'train': source, 'val': source}: listed name -> item (sources.py)
    class_words: list = None   # imagenet layouts: the devkit's words of each class, in label order

    def train_labels(self, files):
        """Labels of train files given as '<class>/<file>' (any order)."""
        index = {c: i for i, c in enumerate(self.classes)}
        return [index[f.split('/', 1)[0]] for f in files]


def list_dataset(cfg, workers=1):
    """The Listing of the dataset described by a loaded paths file (`workers` processes index the
    class tars of an ImageNet train archive)."""
    check_inputs(cfg)
    layout = resolve_layout(cfg)
    if layout in cifar.LAYOUTS:
        return Listing(layout, *cifar.list_cifar(cfg, layout))
    kit = read_devkit(cfg) if layout != 'folders' else None  # seconds, before the archives' minutes
    if layout == 'imagenet_tar':
        if not archives.is_archive(cfg['train_img_dir']):
            raise PrepError(f'layout imagenet_tar: train_img_dir {cfg["train_img_dir"]} is not a .tar file '
                            f'(extracted folders: layout imagenet)')
        classes, train_source = archives.train_archive(cfg['train_img_dir'], cfg['misc_dir'], workers)
        train = train_source.names
    else:
        classes, train = list_train_folders(cfg)
        train_source = FolderSource(cfg['train_img_dir'])
    if layout == 'folders':
        val, val_labels = list_val_folders(cfg, classes)
        return Listing(layout, classes, train, val, val_labels,
                       {'train': train_source, 'val': FolderSource(cfg['val_img_dir'])})
    if layout == 'imagenet_tar' and archives.is_archive(cfg['val_img_dir']):  # (or extracted: a folder)
        val_source = archives.val_archive(cfg['val_img_dir'], cfg['misc_dir'])
        names = val_source.names
    else:
        val_source = FolderSource(cfg['val_img_dir'])
        names = None  # listed once the devkit is read, as before
    val, val_labels, words = list_val_imagenet(cfg, kit, classes, names)
    return Listing(layout, classes, train, val, val_labels, {'train': train_source, 'val': val_source}, words)


def check_inputs(cfg):
    """Refuses, before the layout is chosen and anything is listed, an input path of the paths
    file that does not exist (a wrong devkit would otherwise turn `auto` into `folders`)."""
    for key in ('train_img_dir', 'val_img_dir', 'devkit', 'meta_clsloc_mat', 'val_label_file'):
        if cfg[key] and not os.path.exists(cfg[key]):
            instead = (' (or set meta_clsloc_mat and val_label_file to the synsets and ground-truth files '
                       'instead)') if key == 'devkit' else ''
            raise PrepError(f'{key} {cfg[key]} does not exist; correct it in the paths file{instead}')


def list_train_folders(cfg):
    if archives.is_archive(cfg['train_img_dir']):
        raise PrepError(f'train_img_dir {cfg["train_img_dir"]} is a .tar file: use layout imagenet_tar (or auto)')
    classes = subfolders(cfg['train_img_dir'])
    if not classes:
        raise PrepError(f'no class folders in {cfg["train_img_dir"]}')
    train = []
    for c in classes:
        names = image_files(os.path.join(cfg['train_img_dir'], c))
        if not names:
            raise PrepError(f'no images ({"/".join(IMAGE_EXTS)}) in {os.path.join(cfg["train_img_dir"], c)}')
        train += [f'{c}/{n}' for n in names]
    return classes, sorted(train)


def resolve_layout(cfg):
    if cfg['layout'] != 'auto':
        return cfg['layout']
    train_dir, val_dir = cfg['train_img_dir'], cfg['val_img_dir']
    found = cifar.detect(train_dir)
    if found:
        return found
    if archives.is_archive(train_dir):
        return 'imagenet_tar'
    devkit = cfg['devkit'] or cfg['meta_clsloc_mat']
    flat_val = os.path.isdir(val_dir) and image_files(val_dir)
    return 'imagenet' if devkit and flat_val else 'folders'


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


def list_val_imagenet(cfg, kit, classes, names=None):
    """Flat val files (`names`, or those of val_img_dir), their labels through ground-truth ids ->
    devkit WNIDs (`kit`: a Devkit) -> train folders, and the devkit's words of each class (None if it
    has none)."""
    val_dir = cfg['val_img_dir']
    gt_file, mat, ids = kit.gt, kit.mat, kit.ground_truth
    if names is None:
        names = image_files(val_dir)
    if not names:
        hint = ' (class folders need layout: folders)' if os.path.isdir(val_dir) and subfolders(val_dir) else ''
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
        if gt not in kit.wnid_of:
            raise PrepError(f'ILSVRC id {gt} (line {line} of {gt_file}) is not in the synsets of {mat}')
        if kit.wnid_of[gt] not in index:
            raise PrepError(f'{kit.wnid_of[gt]} (ILSVRC id {gt}, val image {name}) is not a class folder '
                            f'in {cfg["train_img_dir"]}')
        labels.append(index[kit.wnid_of[gt]])
    words = [kit.words_of.get(c) for c in classes]
    return names, labels, (words if None not in words else None)


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
