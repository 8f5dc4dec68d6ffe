"""Small datasets for tests, written in the preprocessed format (as preprocessing/ writes it)."""
import os

import h5py
import hickle
import numpy as np
import yaml


def write_hkl(path, array):
    with h5py.File(path, 'w') as f:
        hickle.dump(array, f)


def make_batches(root, n_train=4, n_val=2, batch=8, size=36, classes=3, seed=0):
    """A learnable toy dataset under root: each class has its own mean colour per quadrant.

    Returns a dict of the config keys that point at it (1-worker layout, plus _0/_1 halves).
    """
    rng = np.random.RandomState(seed)
    palette = rng.randint(40, 216, size=(classes, 3, 2, 2))
    os.makedirs(os.path.join(root, 'labels'), exist_ok=True)
    os.makedirs(os.path.join(root, 'misc'), exist_ok=True)
    total = np.zeros((3, size, size))
    for split, n in (('train', n_train), ('val', n_val)):
        full = os.path.join(root, f'{split}_hkl_b{batch}_b_{batch}')
        half = os.path.join(root, f'{split}_hkl_b{batch}_b_{batch // 2}')
        os.makedirs(full, exist_ok=True)
        os.makedirs(half, exist_ok=True)
        labels = rng.randint(0, classes, size=n * batch)
        for i in range(n):
            lab = labels[i * batch:(i + 1) * batch]
            img = np.repeat(np.repeat(palette[lab], size // 2, axis=2), size // 2, axis=3)
            img = np.clip(img + rng.randint(-30, 31, size=img.shape), 0, 255).astype(np.uint8)
            c01b = np.ascontiguousarray(img.transpose(1, 2, 3, 0))  # (B,3,S,S) -> (3,S,S,B)
            write_hkl(os.path.join(full, f'{i:04d}.hkl'), c01b)
            write_hkl(os.path.join(half, f'{i:04d}_0.hkl'), c01b[..., :batch // 2])
            write_hkl(os.path.join(half, f'{i:04d}_1.hkl'), c01b[..., batch // 2:])
            if split == 'train':
                total += c01b.sum(axis=3)
        np.save(os.path.join(root, 'labels', f'{split}_labels.npy'), labels)
        halves = labels.reshape(n, 2, batch // 2)
        np.save(os.path.join(root, 'labels', f'{split}_labels_0.npy'), halves[:, 0].ravel())
        np.save(os.path.join(root, 'labels', f'{split}_labels_1.npy'), halves[:, 1].ravel())
    np.save(os.path.join(root, 'misc', 'img_mean.npy'),
            (total / (n_train * batch)).astype(np.float32))
    with open(os.path.join(root, 'dataset.yaml'), 'w') as f:
        yaml.safe_dump({'num_classes': classes,
                        'class_names': [f'c{k}' for k in range(classes)],
                        'img_size': size, 'batch_size': batch}, f)
    return {'train_folder': os.path.join(root, f'train_hkl_b{batch}_b_{batch}'),
            'val_folder': os.path.join(root, f'val_hkl_b{batch}_b_{batch}'),
            'label_folder': os.path.join(root, 'labels'),
            'mean_file': os.path.join(root, 'misc', 'img_mean.npy'),
            'batch_size': batch}


def both_workers(work, timeout=60):
    """{rank: work(rank)} for ranks 0 and 1 run at once in threads (two exchangers talking to
    each other); an exception in either fails the test with both outcomes."""
    import threading
    out = {}

    def run(rank):
        try:
            out[rank] = work(rank)
        except Exception as e:  # noqa: BLE001  (handed to the test)
            out[rank] = e
    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert sorted(out) == [0, 1] and not any(isinstance(r, Exception) for r in out.values()), out
    return out


def fake_cuda(numel, fill=7):
    """In a fresh (spawned) process: CUDA IPC opening faked as the real one behaves, for
    lib.exchange.ipc_open on a machine without CUDA: _new_shared_cuda works only once CUDA is
    initialised (it would crash the process), and gives a storage of `numel` bytes `fill`.
    Returns the list of the calls made, in their order ('crashed' where the real one would)."""
    import torch
    calls = []

    def lazy_init():
        calls.append('_lazy_init')

    def new_shared_cuda(*args):
        calls.append('_new_shared_cuda')
        if '_lazy_init' not in calls:  # the caching allocator's per-device state is not set up
            calls.append('crashed')
        return torch.full((numel,), fill, dtype=torch.uint8).untyped_storage()
    torch.cuda._lazy_init = lazy_init
    torch.UntypedStorage._new_shared_cuda = staticmethod(new_shared_cuda)
    return calls


# a CUDA IPC description (lib.exchange.ipc_share's) of 1 KiB of uint8, for fake_cuda
FAKE_IPC_INFO = {'handle': '00' * 64, 'device': 0, 'size': 1 << 10, 'offset': 0, 'ref': '00',
                 'ref_offset': 0, 'event': None, 'event_sync': False, 'storage_offset': 0,
                 'numel': 1 << 10, 'dtype': 'uint8'}


def answer_of_a_fresh_process(target, *args, timeout=120):
    """What target(*args, queue) puts on the queue, run in a new (spawned) python process."""
    import multiprocessing
    ctx = multiprocessing.get_context('spawn')
    out = ctx.Queue()
    child = ctx.Process(target=target, args=(*args, out), daemon=True)
    child.start()
    try:
        return out.get(timeout=timeout)
    finally:
        child.join(30)


def refuse_page_locking(monkeypatch):
    """CUDA said to be there, and torch.empty(pin_memory=True) refused as a platform that does
    not allow page-locking refuses it (torch's error, first line 'CUDA error: operation not
    supported')."""
    import torch
    empty = torch.empty

    def refusing_empty(*args, pin_memory=False, **kwargs):
        if pin_memory:
            raise RuntimeError('CUDA error: operation not supported\nCUDA kernel errors ...')
        return empty(*args, **kwargs)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch, 'empty', refusing_empty)


def _live_pids(field, value):
    """Pids of the live processes whose /proc/PID/stat `field` (1: parent, 2: process group)
    is value (Linux); an ended one not yet waited for (a zombie) is not live."""
    found = []
    for entry in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{entry}/stat') as f:
                fields = f.read().rsplit(')', 1)[1].split()
        except OSError:
            continue
        if int(fields[field]) == value and fields[0] != 'Z':
            found.append(int(entry))
    return found


def children(pid):
    """Pids of the live children of pid."""
    return _live_pids(1, pid)


def group(pgid):
    """Pids of the live processes of process group pgid."""
    return _live_pids(2, pgid)

