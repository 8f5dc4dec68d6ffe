"""Loading and checking a paths file (preprocessing/paths.yaml, demo_paths.yaml, or the user's own).

Every key is declared in KEYS (lib.config.Key: default, meaning, allowed values) and checked by
lib.config: an unknown key is an error naming the closest valid one, and relative paths are relative
to the directory of the paths file, so the file works from any working directory.
"""
import os

from lib import config
from lib.config import REQUIRED, Key, at_least
from preprocessing import PrepError

KEYS = {
    # --- inputs -----------------------------------------------------------------------------
    'train_img_dir': Key(REQUIRED, 'training images: `ILSVRC2012_img_train.tar` (a tar of one tar per '
                         'class), the extracted folders, one per class (`train/<class>/*`), or a CIFAR '
                         'binary archive or folder (see `layout`)', path=True),
    'val_img_dir': Key(REQUIRED, 'validation images: `ILSVRC2012_img_val.tar`, or extracted flat '
                       '(`imagenet`), or class folders (`folders`), or the CIFAR archive', path=True),
    'devkit': Key(None, 'imagenet layouts: the devkit archive or its extracted folder: '
                  '`ILSVRC2012_devkit_t12.tar.gz` (`data/meta.mat` + '
                  '`data/ILSVRC2012_validation_ground_truth.txt`) or `ILSVRC2014_devkit.tgz` '
                  "(`data/meta_clsloc.mat` + `data/ILSVRC2014_clsloc_validation_ground_truth.txt`, the "
                  "original's)", path=True),
    'meta_clsloc_mat': Key(None, "instead of `devkit`, its synsets: struct array `synsets` (field 0 "
                           'ILSVRC id, 1-based, field 1 WNID, `words`)', path=True),
    'val_label_file': Key(None, 'instead of `devkit`, its val ground truth: the ILSVRC id of val image '
                          'N on line N (NOT in WNID order)', path=True),
    'layout': Key('auto', '`imagenet_tar`: the archives above, read in place, + devkit; `imagenet`: the '
                  'same extracted (`train/<wnid>/*`, flat `val/`) + devkit; `folders`: `train/<class>/*`, '
                  '`val/<class>/*`, no devkit; `cifar10_bin` / `cifar100_bin`: '
                  '`cifar-10-binary.tar.gz` / `cifar-100-binary.tar.gz` or their folders. `auto`: '
                  '`imagenet_tar` if `train_img_dir` is a `.tar` file, a CIFAR layout for a CIFAR binary '
                  'archive or folder, `imagenet` if a devkit is set and val is flat, else `folders`',
                  choices=('imagenet', 'imagenet_tar', 'folders', 'cifar10_bin', 'cifar100_bin', 'auto')),
    'cifar100_labels': Key('fine', '`cifar100_bin`: `fine` (100 classes) or `coarse` (the 20 '
                           'superclasses)', choices=('fine', 'coarse')),
    # --- outputs ----------------------------------------------------------------------------
    'tar_root_dir': Key(REQUIRED, 'gets `labels/` (`{train,val}_labels*.npy`) and `dataset.yaml` '
                        '(classes, sizes, counts)', path=True),
    'tar_train_dir': Key(REQUIRED, 'training batches go to `<tar_train_dir>_b<B>_b_<B/n>` for each n '
                         'in `sub_batches`', path=True),
    'tar_val_dir': Key(REQUIRED, 'validation batches, named the same way', path=True),
    'misc_dir': Key(REQUIRED, '`shuffled_train_filenames.npy`, `img_mean.npy`, `bad_images.txt`, '
                    '`fingerprint.json`, `mean_total.npz`, `<archive>.index.npz`', path=True),
    'traintxt_filename': Key(None, 'caffe-style list `<wnid>/<file> <label>` of the training images, '
                             'in shuffled order (null: `misc_dir/train.txt`)', path=True),
    'valtxt_filename': Key(None, 'caffe-style list `<file> <label>` of the validation images (null: '
                           '`misc_dir/val.txt`)', path=True),
    # --- batches ----------------------------------------------------------------------------
    'img_size': Key(256, 'side S of the square every image is resized to (aspect not kept), pixels',
                    at_least(1)),
    'pad': Key(0, 'black border: images are resized to S − 2·pad and framed by `pad` black pixels; with '
               '`crop_size` = S − 2·pad, random crops shift the image by up to ±pad (below S / 2)',
               at_least(0)),
    'batch_size': Key(256, 'images per batch file; the last incomplete batch is dropped', at_least(1)),
    'sub_batches': Key([1], 'write every batch split in n equal parts, for each n: 1: whole batches '
                       '`NNNN.hkl`, all that train.py, torchrun and train_2gpu.py need; 2: also the '
                       "halves `NNNN_0.hkl` / `NNNN_1.hkl` (a second copy, as the original did)",
                       (lambda v: v and min(v) >= 1 and len(set(v)) == len(v),
                        'a list of distinct positive integers')),
    'workers': Key(None, 'processes decoding images (null: all cores); the output is the same for any '
                   'number', at_least(1), kind=int),
}


def load_paths(path):
    """The settings of a paths file as a dict holding every key of KEYS, paths made absolute."""
    cfg = config.merge(KEYS, [config.yaml_source(path, PrepError, 'paths file')], PrepError)
    cfg['traintxt_filename'] = cfg['traintxt_filename'] or os.path.join(cfg['misc_dir'], 'train.txt')
    cfg['valtxt_filename'] = cfg['valtxt_filename'] or os.path.join(cfg['misc_dir'], 'val.txt')
    if 2 * cfg['pad'] >= cfg['img_size']:
        raise PrepError(f"config key 'pad' in {path} must be below img_size / 2 = {cfg['img_size'] / 2:g}, "
                        f"got {cfg['pad']}")
    for n in cfg['sub_batches']:
        if cfg['batch_size'] % n:
            raise PrepError(f'{path}: batch_size {cfg["batch_size"]} cannot be split in {n} equal parts '
                            f'(sub_batches)')
    return cfg
