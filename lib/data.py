"""Reading the preprocessed batches, drawing crops, and the batch iterator the training loop uses.

On disk (written by preprocessing/, or by the original's make_hkl.py): NNNN.hkl (or NNNN_<part>.hkl)
holding a uint8 array (3, S, S, B) = channels, rows, cols, images ("c01b"); labels as int arrays in
batch order; a float32 mean image (3, S, S).

The trainer owns the random draws: `make_plan` turns a seeded torch.Generator into the list of
steps of an epoch (file order, crop offsets and mirror flags per image), and a loader only
executes a plan. Loaders share one interface: `epoch(plan)` yields (images, labels) on the
device, and `close()`. `InProcessLoader` is the `para_load: False` implementation.
"""
import os
import re
from dataclasses import dataclass
from typing import NamedTuple

import h5py
import numpy as np
import torch

from lib import UserError, config


class DataError(UserError, RuntimeError):
    """A missing or malformed data file; the message names it."""


def hkl_dataset(f, path):
    """The one 4-D dataset of an open hickle batch file (any hickle version)."""
    found = []
    f.visititems(lambda name, obj: found.append(obj) if isinstance(obj, h5py.Dataset)
                 and obj.ndim == 4 else None)
    if len(found) != 1:
        raise DataError(f'{path}: expected one 4-D array in the batch file, found {len(found)}')
    return found[0]


def check_batch(path, dtype, shape, file_batch=None, size=None):
    """DataError naming the file unless it holds uint8 (3, S, S, file_batch) (S = size and
    file_batch where they are given)."""
    S = size or (shape[1] if len(shape) == 4 else 0)
    if dtype != np.uint8 or len(shape) != 4 or tuple(shape[:3]) != (3, S, S) or S < 1 \
            or (file_batch is not None and shape[3] != file_batch):
        want = (3, size or 'S', size or 'S', 'B' if file_batch is None else file_batch)
        raise DataError(f"{path}: expected uint8 ({', '.join(map(str, want))}), got {dtype} {shape}")


def read_hkl(path, file_batch=None, rows=None, out=None):
    """The uint8 c01b array (3, S, S, B) of a hickle batch file, read with h5py (its one 4-D
    dataset, any hickle version; never unpickled) and checked first: uint8, square images, and
    `file_batch` images where given.

    rows=(lo, hi): only images lo..hi-1 (a torchrun rank's or a train_2gpu.py worker's share),
    without copying the rest: where the dataset is contiguous (hickle writes it so) its bytes are
    mapped and only the rows copied, else HDF5 reads a hyperslab (0.2-0.4x the time of reading
    the whole file and slicing). out: read straight into this writable uint8 array of the
    result's shape (a loader slot: 3x the rate of a read and a copy), else into a new contiguous
    array. A file that fails the check is a DataError naming it, and `out` is left untouched."""
    size = None if out is None else out.shape[1]
    try:
        with h5py.File(path, 'r') as f:
            d = hkl_dataset(f, path)
            check_batch(path, d.dtype, d.shape, file_batch, size)
            lo, hi = rows or (0, d.shape[3])
            if not 0 <= lo < hi <= d.shape[3] or (out is not None and out.shape[3] != hi - lo):
                raise DataError(f'{path}: holds {d.shape[3]} images, asked for images {lo}..{hi - 1}'
                                + ('' if out is None else f' into a buffer of {out.shape[3]}'))
            offset, shape = d.id.get_offset(), d.shape
            if rows is None or d.chunks is not None or d.external or offset is None:
                if out is None:  # (no HDF5 filters without chunks: a plain read or a hyperslab)
                    return d[()] if rows is None else d[..., lo:hi]
                d.read_direct(out, None if rows is None else np.s_[:, :, :, lo:hi])
                return out
        mapped = np.memmap(path, np.uint8, 'r', offset=offset, shape=shape)
        if out is None:
            return np.ascontiguousarray(mapped[..., lo:hi])
        np.copyto(out, mapped[..., lo:hi])
        return out
    except (OSError, ValueError) as e:  # ValueError: a file shorter than its dataset
        raise DataError(f'{path}: cannot read batch file ({e})') from None


def hkl_shape(path):
    """Shape of a batch file's uint8 array, from its header alone (no pixels read), checked as
    read_hkl checks it (any number of images)."""
    try:
        with h5py.File(path, 'r') as f:
            d = hkl_dataset(f, path)
            check_batch(path, d.dtype, d.shape)
            return d.shape
    except OSError as e:
        raise DataError(f'{path}: cannot read batch file ({e})') from None


def dataset_yaml(label_folder):
    """Where preprocessing writes dataset.yaml: in the data folder (its tar_root_dir), beside the
    labels folder."""
    return os.path.join(os.path.dirname(os.path.normpath(label_folder)), 'dataset.yaml')


def read_dataset(path):
    """What a dataset.yaml holds (preprocessing's summary of a data folder: num_classes,
    class_names, class_words, pad, batch_size, sub_batches, ...), as a dict; a plain YAML list is
    taken as the class names. DataError naming the file when it cannot be read or holds neither;
    the caller checks the keys it needs."""
    info = config.read_yaml(path, DataError, 'dataset file')
    if isinstance(info, list):
        info = {'class_names': info}
    if not isinstance(info, dict):
        raise DataError(f'{path} must hold a mapping of key: value (or a list of class names)')
    return info


def batch_files(folder, part=None):
    """Sorted NNNN.hkl files (or NNNN_<part>.hkl) of a folder, checked to be numbered 0..n-1."""
    pattern = re.compile(r'^(\d{4,})\.hkl$' if part is None else rf'^(\d{{4,}})_{part}\.hkl$')
    try:
        names = os.listdir(folder)
    except OSError as e:
        raise DataError(f'cannot list batch folder {folder}: {e.strerror} (preprocess the images '
                        'first: sh preprocessing/generate_data.sh)') from None
    numbered = sorted((int(m.group(1)), n) for n in names if (m := pattern.match(n)))
    if not numbered:
        what = 'NNNN.hkl' if part is None else f'NNNN_{part}.hkl'
        raise DataError(f'no {what} batch files in {folder}')
    for i, (num, name) in enumerate(numbered):
        if num != i:
            raise DataError(f'{folder}: batch files are not numbered 0..{len(numbered) - 1} '
                            f'(found {name} at position {i})')
    return [os.path.join(folder, n) for _, n in numbered]


class BatchFolder:
    """Batch files of `file_batch` images each and their labels (labels_file, in batch order).

    rows=(lo, hi): only images lo..hi-1 of every file (a worker's share: see share_source);
    batch_size is the images read per file, labels the (n_files, batch_size) labels of them."""

    def __init__(self, files, labels_file, file_batch, rows=None):
        self.files, self.labels_file, self.file_batch, self.rows = files, labels_file, file_batch, rows
        self.shape = hkl_shape(files[0])  # the header only: (3, S, S, images per file)
        if self.shape[3] != file_batch:
            raise DataError(f'{files[0]} holds {self.shape[3]} images, not {file_batch}')
        try:
            labels = np.load(labels_file)
        except OSError as e:
            raise DataError(f'cannot read labels {labels_file}: {e}') from None
        need = len(files) * file_batch
        if labels.ndim != 1 or len(labels) < need:
            raise DataError(f'{labels_file} holds {labels.size} labels, {os.path.dirname(files[0])} '
                            f'needs {len(files)} batches x {file_batch} = {need}')
        lo, hi = rows or (0, file_batch)
        labels = labels[:need].astype(np.int64).reshape(-1, file_batch)
        self.labels = np.ascontiguousarray(labels[:, lo:hi])
        self.batch_size = hi - lo

    def spec(self):
        """The arguments that make this BatchFolder again (in another process)."""
        return dict(files=self.files, labels_file=self.labels_file, file_batch=self.file_batch,
                    rows=self.rows)

    def __len__(self):
        return len(self.files)

    def read(self, i):
        """uint8 array (3, S, S, B) of file i (its rows), checked against the batch size."""
        return read_hkl(self.files[i], self.file_batch, self.rows)

    def read_into(self, i, out):
        """File i (its rows) read straight into `out`, a uint8 (3, S, S, batch_size) array: the
        bytes of read(i), without the intermediate array (the loader process's raw slots)."""
        read_hkl(self.files[i], self.file_batch, self.rows, out)

    def image_size(self):
        """S of the (3, S, S, B) batches, from the first file's header (checked at start)."""
        return self.shape[1]


HALVES_NAME = re.compile(r'^(?P<prefix>.*_b(?P<whole>\d+))_b_(?P<half>\d+)$')


def worker_files(folder, index, count):
    """(batch files, halves, notice) of worker `index` of `count`: with two workers the
    NNNN_<index>.hkl of a halves folder (halves True), else the NNNN.hkl of `folder`, or of its
    whole-batch sibling `<prefix>_b<2b>_b_<2b>` where a halves folder `<prefix>_b<2b>_b_<b>` does
    not exist (with a notice naming both; else notice None)."""
    notice = None
    if count == 2:
        names = os.listdir(folder) if os.path.isdir(folder) else ()
        if any(re.match(rf'^\d{{4,}}_{index}\.hkl$', n) for n in names):
            return batch_files(folder, index), True, None
        m = HALVES_NAME.match(os.path.normpath(folder))
        sibling = m and int(m['whole']) == 2 * int(m['half']) and f"{m['prefix']}_b_{m['whole']}"
        if not os.path.isdir(folder) and sibling and os.path.isdir(sibling):
            notice = f'{folder} does not exist: each worker takes its half of every batch in {sibling}'
            folder = sibling
    return batch_files(folder), False, notice


class BatchImages(NamedTuple):
    """The images that one batch_size means."""
    worker: int  # images of one worker in a step (its rows of a whole batch file, or a halves file)
    step: int    # images of a step, all workers together: those of a whole batch file


def launcher_of(keys):
    """The launcher whose config holds `keys` (a schema, a merged or a saved config):
    train_2gpu.py's has gpu0, train.py's (alone or under torchrun) does not."""
    return 'train_2gpu.py' if 'gpu0' in keys else 'train.py'


def batch_images(batch_size, launcher, workers=None):
    """What batch_size means under `launcher` with `workers` workers: BatchImages(worker, step).
    train_2gpu.py's batch_size is the images of one of its 2 workers; train.py's those of a whole
    step, of one worker (workers None) or of all torchrun ranks together (workers: the ranks)."""
    if launcher == 'train_2gpu.py':
        return BatchImages(batch_size, 2 * batch_size)
    return BatchImages(batch_size // (workers or 1), batch_size)


def batch_size_for(step, launcher):
    """The batch_size that means steps of `step` images under `launcher` (batch_images backwards)."""
    return step // 2 if launcher == 'train_2gpu.py' else step


def file_batch(folder, launcher):
    """The batch_size under `launcher` that the batch files of `folder` give, from a header: a
    step is the images of an NNNN.hkl, or of both halves NNNN_0.hkl and NNNN_1.hkl."""
    files, halves, _ = worker_files(folder, 0, 2)
    held = hkl_shape(files[0])[-1]
    step = 2 * held if halves else held
    batch_size = batch_size_for(step, launcher)
    if batch_images(batch_size, launcher).step != step:
        raise DataError(f'{files[0]} holds {held} images, which 2 workers cannot share '
                        'equally: name a folder of NNNN_0.hkl / NNNN_1.hkl halves')
    return batch_size


def share_source(folder, label_folder, split, batch_size, launcher='train.py', share=None):
    """(BatchFolder of a worker's share of every batch of `split`, notice or None).

    share=(index, count): worker `index` of `count` takes its rows, images [index*b, (index+1)*b),
    of every NNNN.hkl of a step (b: batch_images' worker); None: whole files of a step (one
    worker). One of two workers takes instead the NNNN_<index>.hkl of a halves folder (labels
    <split>_labels_<index>.npy), or its share of the whole-batch sibling of a halves folder that
    does not exist, with a notice (worker_files)."""
    index, count = share or (0, 1)
    b, step = batch_images(batch_size, launcher, count)
    files, halves, notice = worker_files(folder, index, count)
    if halves:
        return BatchFolder(files, os.path.join(label_folder, f'{split}_labels_{index}.npy'), b), None
    held = hkl_shape(files[0])[-1]  # the header only, not the pixels
    if held != step:
        each = f' ({count} workers x {b})' if count > 1 else ''
        how = ('' if count == 1 else ' (under torchrun: all ranks together)' if launcher == 'train.py'
               else f', or name a folder of NNNN_{index}.hkl halves')  # train_2gpu.py: per worker
        raise DataError(f'{files[0]} holds {held} images, not {step}{each}: set '
                        f'batch_size={batch_size_for(held, launcher)}{how}')
    rows = None if count == 1 else (index * b, (index + 1) * b)
    return BatchFolder(files, os.path.join(label_folder, f'{split}_labels.npy'), held, rows), notice


class SyntheticBatches:
    """synthetic: True. Random uint8 batches held in memory (a few distinct ones, reused), with the
    interface of BatchFolder, so the whole training path runs without a dataset on disk.
    Batches of `file_batch` images are drawn (the same in every worker) and a worker keeps its
    rows=(lo, hi) of each (None: all), as it would of batch files."""

    def __init__(self, n_files, file_batch, image_size, num_classes, seed, rows=None):
        g = torch.Generator().manual_seed(seed)
        lo, hi = rows or (0, file_batch)
        self.files = [f'<synthetic batch {i}>' for i in range(n_files)]
        self.batch_size, self.size = hi - lo, image_size
        self.batches = [torch.randint(0, 256, (3, image_size, image_size, file_batch), generator=g,
                                      dtype=torch.uint8)[..., lo:hi].contiguous().numpy()
                        for _ in range(min(n_files, 4))]
        self.labels = torch.randint(0, num_classes, (n_files, file_batch), generator=g)[:, lo:hi]
        self.labels = self.labels.contiguous().numpy()

    def __len__(self):
        return len(self.files)

    def read(self, i):
        return self.batches[i % len(self.batches)]

    def image_size(self):
        return self.size


def load_mean(path, image_size=None, crop_size=1):
    """The mean image, float32 (3, S, S): S = image_size where the batches fix it, else any
    S >= crop_size (serve.py: the size its uploads are resized to)."""
    try:
        mean = np.load(path)
    except (OSError, ValueError) as e:
        raise DataError(f'cannot read mean image {path}: {" ".join(str(e).split())}') from None
    if image_size is not None and mean.shape != (3, image_size, image_size):
        raise DataError(f'{path}: mean image has shape {mean.shape}, the batches need '
                        f'(3, {image_size}, {image_size})')
    if mean.ndim != 3 or mean.shape[0] != 3 or mean.shape[1] != mean.shape[2] \
            or mean.shape[1] < crop_size:
        raise DataError(f'{path}: mean image has shape {mean.shape}, expected (3, S, S) with '
                        f'S >= crop_size {crop_size}')
    return torch.from_numpy(mean.astype(np.float32))


@dataclass
class Step:
    """One training step: which file, and per image the crop offsets and the mirror flag."""
    file: int
    crop_x: torch.Tensor  # (B,) int64
    crop_y: torch.Tensor  # (B,) int64
    mirror: torch.Tensor  # (B,) bool


def make_plan(gen, n_files, batch_size, image_size, crop_size, *, train, rand_crop=True,
              batch_crop_mirror=False, shuffle=False, order_gen=None, rows=None):
    """The steps of one epoch, as the original draws them: with margin = (S - crop) // 2
    (14 for 256 -> 227), random offsets are round(u * 2 * margin), in [0, 28], and mirror is
    u >= 0.5, u ~ U[0, 1) from `gen`. Validation, and training with rand_crop False, use the
    centre crop (offset margin) and no mirror, drawing nothing. The shuffled file order comes
    from `order_gen` when given (seeded alike in every worker: one order for all of them).

    batch_size is the images of a whole step (all workers together): the draws belong to the
    step, so every worker draws them alike and takes its rows=(lo, hi) of them (None: all), and
    a worker's images get the crops they would get in a one-worker run."""
    order = (torch.randperm(n_files, generator=order_gen or gen).tolist() if train and shuffle
             else range(n_files))
    margin = (image_size - crop_size) // 2
    lo, hi = rows or (0, batch_size)
    steps = []
    for i in order:
        if train and rand_crop:
            u = torch.rand(3, 1 if batch_crop_mirror else batch_size, generator=gen,
                           dtype=torch.float64).expand(3, batch_size)[:, lo:hi]
            cx, cy = (u[0] * 2 * margin).round().long(), (u[1] * 2 * margin).round().long()
            mirror = u[2] >= 0.5
        else:
            cx = cy = torch.full((hi - lo,), margin, dtype=torch.long)
            mirror = torch.zeros(hi - lo, dtype=torch.bool)
        steps.append(Step(i, cx, cy, mirror))
    return steps


def eval_plan(n_files, batch_size, image_size, crop_size, ten_crop=False):
    """(steps, views per file) for evaluation: the centre crop of every file, or ten views per
    file (the four corners of the random-crop range and the centre, each also mirrored)."""
    if not ten_crop:
        return make_plan(None, n_files, batch_size, image_size, crop_size, train=False), 1
    m = (image_size - crop_size) // 2
    views = [(x, y, flip) for x, y in ((0, 0), (2 * m, 0), (0, 2 * m), (2 * m, 2 * m), (m, m))
             for flip in (False, True)]
    steps = [Step(i, torch.full((batch_size,), x), torch.full((batch_size,), y),
                  torch.full((batch_size,), flip)) for i in range(n_files) for x, y, flip in views]
    return steps, len(views)


def to_bchw(batch, out=None):
    """(3, S, S, B) c01b -> contiguous (B, 3, S, S). Images are the fastest-varying axis of c01b,
    so one image is scattered over the whole array: gather them once, as a 2-D transpose (into
    `out` when given)."""
    C, H, W, B = batch.shape
    if out is None:
        return batch.reshape(C * H * W, B).t().contiguous().view(B, C, H, W)
    out.view(B, C * H * W).copy_(batch.reshape(C * H * W, B).t())
    return out


class HostBuffers:
    """Reused host buffers for crop_mirror on the CPU. A fresh tensor per batch (79 MB for 128
    crops of 227) costs more in page faults than the crops themselves, because large blocks go
    back to the OS when freed. `out()` cycles through `n` output buffers: a batch stays valid
    until n more have been made (the training loop holds one while the next is prepared)."""

    def __init__(self, n=2):
        self.ring, self.i, self.work = [None] * n, 0, None

    def out(self, shape):
        self.i = (self.i + 1) % len(self.ring)
        if self.ring[self.i] is None or self.ring[self.i].shape != shape:
            self.ring[self.i] = torch.empty(shape, dtype=torch.float32)
        return self.ring[self.i]

    def scratch(self, shape):
        if self.work is None or self.work.shape != shape:
            self.work = torch.empty(shape, dtype=torch.uint8)
        return self.work


def crop_mirror(batch, mean, step, crop_size, out=None, buffers=None):
    """(3, S, S, B) uint8 batch -> (B, 3, c, c) float32: mean subtracted, cropped, mirrored.

    Subtracting the cropped mean from the cropped image gives the same numbers as the original's
    crop of (image - mean). On the CPU a loop of per-image slices is fastest (5x a gather);
    on a GPU one gather kernel is. Both give the same bits. On the CPU the result goes into
    `out` (e.g. a loader's shared-memory slot) or a buffer of `buffers` (a HostBuffers) when
    given, and the transposed batch into the scratch of `buffers`.
    """
    C, S, _, B = batch.shape
    if batch.device.type != 'cpu':
        return _crop_gather(to_bchw(batch), mean, step, crop_size)
    x = to_bchw(batch, buffers.scratch((B, C, S, S)) if buffers is not None else None)
    if out is None:
        out = (buffers.out((B, C, crop_size, crop_size)) if buffers is not None else
               torch.empty(B, C, crop_size, crop_size, dtype=torch.float32))
    return _crop_loop(x, mean, step, crop_size, out)


def _crop_loop(x, mean, step, c, out):
    W = x.shape[3]
    mean_flip = mean.flip(2)  # once per batch: a mirrored crop of the mean is then a plain slice
    draws = zip(step.crop_x.tolist(), step.crop_y.tolist(), step.mirror.tolist())
    for i, (x0, y0, flip) in enumerate(draws):
        if flip:
            img = x[i, :, y0:y0 + c, x0:x0 + c].flip(2)
            m = mean_flip[:, y0:y0 + c, W - x0 - c:W - x0]
        else:
            img, m = x[i, :, y0:y0 + c, x0:x0 + c], mean[:, y0:y0 + c, x0:x0 + c]
        torch.sub(img, m, out=out[i])
    return out


def _crop_gather(x, mean, step, c):
    dev = x.device
    ar = torch.arange(c, device=dev)
    if dev.type == 'cuda':  # one asynchronous copy: a pageable one waits for the GPU to drain
        draws = torch.stack([step.crop_x, step.crop_y, step.mirror.long()]).pin_memory()
        cx, cy, mirror = draws.to(dev, non_blocking=True).unbind(0)
        mirror = mirror.bool()
    else:
        cx, cy, mirror = step.crop_x.to(dev), step.crop_y.to(dev), step.mirror.to(dev)
    rows = (cy[:, None] + ar)[:, None, :, None]                              # (B, 1, c, 1)
    cols = torch.where(mirror[:, None], cx[:, None] + (c - 1 - ar), cx[:, None] + ar)
    cols = cols[:, None, None, :]                                            # (B, 1, 1, c)
    ch = torch.arange(3, device=dev)[None, :, None, None]                    # (1, 3, 1, 1)
    b = torch.arange(x.shape[0], device=dev)[:, None, None, None]            # (B, 1, 1, 1)
    return x[b, ch, rows, cols].float() - mean[ch, rows, cols]               # (B, 3, c, c)


class InProcessLoader:
    """para_load False: the trainer reads and prepares each batch itself, between steps.

    use_data_layer True ships the uint8 batch to the device and crops there (4x fewer bytes);
    False crops on the host and ships float32. As with the loader process, a batch is valid
    until the next one is asked for (host buffers are reused; clone to keep one).
    """
    copy_wait = 0.0  # as loader.ProcessLoader's: next() never waits for an earlier device copy

    def __init__(self, source, mean, crop_size, device, on_device=False):
        self.source, self.crop_size, self.device = source, crop_size, torch.device(device)
        self.batch_size = source.batch_size
        self.on_device = on_device
        self.image_size = source.image_size()
        self.mean = mean.to(self.device) if on_device else mean
        self.pin = self.device.type == 'cuda'
        self.buffers = HostBuffers()  # a batch is used before the next-but-one is made

    def __len__(self):
        return len(self.source)

    def _to_device(self, t):
        if self.pin:
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def epoch(self, plan):
        for step in plan:
            batch = torch.from_numpy(self.source.read(step.file))
            if self.on_device:
                x = crop_mirror(self._to_device(batch), self.mean, step, self.crop_size)
            else:
                x = self._to_device(crop_mirror(batch, self.mean, step, self.crop_size,
                                                buffers=self.buffers))
            y = self._to_device(torch.from_numpy(self.source.labels[step.file]))
            yield x, y

    def close(self):
        pass
