"""Where a train_2gpu.py worker's half of every batch comes from (one copy on disk).

Worker `part` (0 or 1) trains on images [part*b, (part+1)*b) of every batch of 2b images, b =
batch_size (per worker). The folder it is given (train_folder / val_folder) may hold:
  - halves NNNN_<part>.hkl (b images each), with labels <split>_labels_<part>.npy: the folders
    `<tar_dir>_b<2b>_b_<b>` written by the original or by preprocessing's `sub_batches: [1, 2]`;
  - whole batches NNNN.hkl (2b images each), with labels <split>_labels.npy: the worker reads its
    rows of every file, as a torchrun rank does (preprocessing's default, `sub_batches: [1]`).
A halves folder `<prefix>_b<2b>_b_<b>` that does not exist falls back to its whole-batch sibling
`<prefix>_b<2b>_b_<2b>` when that exists (a notice says so), so configs naming halves keep working
on data preprocessed with one copy. Either way a worker gets the same images and labels.
"""
import os
import re

from lib.data import BatchFolder, DataError, batch_files, hkl_shape

HALVES_NAME = re.compile(r'^(?P<prefix>.*_b(?P<whole>\d+))_b_(?P<half>\d+)$')
HALF_FILE = r'^\d{{4,}}_{part}\.hkl$'


def whole_sibling(folder):
    """The whole-batch folder `<prefix>_b<2b>_b_<2b>` of a halves folder `<prefix>_b<2b>_b_<b>`,
    or None when the name is not of that form."""
    m = HALVES_NAME.match(os.path.normpath(folder))
    if m is None or int(m['whole']) != 2 * int(m['half']):
        return None
    return f"{m['prefix']}_b_{m['whole']}"


def holds_halves(folder, part):
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    pattern = re.compile(HALF_FILE.format(part=part))
    return any(pattern.match(n) for n in names)


def half_source(folder, label_folder, split, batch_size, part):
    """(BatchFolder of worker `part`'s half of `split`, notice or None). See the module doc."""
    def labels(suffix):
        return os.path.join(label_folder, f'{split}_labels{suffix}.npy')

    if holds_halves(folder, part):
        return BatchFolder(folder, labels(f'_{part}'), batch_size, part), None
    notice, sibling = None, whole_sibling(folder)
    if not os.path.isdir(folder) and sibling is not None and os.path.isdir(sibling):
        notice = f'{folder} does not exist: each worker takes its half of every batch in {sibling}'
        folder = sibling
    first = batch_files(folder)[0]
    held = hkl_shape(first)[-1]  # the header only, not the pixels
    if held != 2 * batch_size:
        raise DataError(f'{first} holds {held} images: a train_2gpu.py worker takes half of every '
                        f'NNNN.hkl batch of 2 x batch_size = {2 * batch_size} (batch_size is per '
                        f'worker: set batch_size={held // 2}), or the NNNN_{part}.hkl halves of a '
                        f'halves folder')
    rows = (part * batch_size, (part + 1) * batch_size)
    return BatchFolder(folder, labels(''), 2 * batch_size, rows=rows), notice
