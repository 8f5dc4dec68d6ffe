"""Snapshots and per-epoch records, all written atomically (temp file in the same folder, then
rename), so an interrupted run never leaves a half-written file in place of a good one.

model_<epoch>.pt is one torch.save dict, loadable with torch.load(weights_only=True):
    model       state_dict of the network (PyTorch layout)
    momentum    {parameter name: momentum buffer}
    epoch, lr   the finished epoch and the learning rate for the next one
    val_record  float64 tensor (epoch, 2): [top-1 error, loss] per epoch
    history     [{history.csv row}] per epoch, so a resumed run rewrites the same records
    config      the merged config (plain values)
    rng         {'data': crop/mirror generator state, 'order': file-order (shuffle) generator
                state, 'torch': CPU RNG (dropout on the CPU), 'cuda': the device's RNG (dropout
                on a GPU)}: the run's streams, in the same state in every worker, so any number
                of workers under any launcher resumes them
"""
import csv
import os
import zipfile

import numpy as np
import torch

from lib import UserError, model
from lib.atomic import atomic_write, save_npy

HISTORY_FIELDS = ('epoch', 'train_loss', 'train_error', 'val_error', 'val_top5_error',
                  'val_loss', 'lr', 'seconds', 'img_per_s')


def snapshot_path(weights_dir, epoch):
    return os.path.join(weights_dir, f'model_{epoch}.pt')


def save(weights_dir, epoch, state):
    path = snapshot_path(weights_dir, epoch)
    atomic_write(path, lambda tmp: torch.save(dict(state, epoch=epoch), tmp))
    return path


def epochs(weights_dir):
    """The epochs of the snapshots in weights_dir, sorted."""
    if not os.path.isdir(weights_dir):
        return []
    return sorted(int(n[6:-3]) for n in os.listdir(weights_dir)
                  if n.startswith('model_') and n.endswith('.pt') and n[6:-3].isdigit())


def latest_epoch(weights_dir):
    """The epoch of the newest snapshot, 0 when there is none."""
    have = epochs(weights_dir)
    return have[-1] if have else 0


class SnapshotError(UserError):
    """A snapshot that is missing, damaged, not one of ours, or does not fit the run."""


def check_file(path, hint=''):
    """SnapshotError unless path is a file: a folder is named as one (give a model_<N>.pt of
    it), a missing file with `hint`."""
    if os.path.isdir(path):
        have = epochs(path)
        there = f'the newest there: {snapshot_path(path, have[-1])}' if have else 'it holds none'
        raise SnapshotError(f'{path} is a folder: give a snapshot file model_<N>.pt ({there})')
    if not os.path.isfile(path):
        raise SnapshotError(f'no snapshot {path}{hint}')


def read(path):
    """The snapshot dict at path (tensors on the CPU), checked to hold a network's weights."""
    check_file(path)
    if not zipfile.is_zipfile(path):  # (torch.load's own error then is about pickle internals)
        raise SnapshotError(f'{path} is not a readable snapshot: not a torch zip file as train.py writes '
                            f'(another kind of file, or one cut short)')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001  (a truncated zip, a pickle of anything, ...: many kinds)
        raise SnapshotError(f'{path} is not a readable snapshot ({type(e).__name__}: '
                            f'{" ".join(str(e).split())[:200]})') from None
    if not (isinstance(state, dict) and isinstance(state.get('model'), dict)
            and isinstance(state.get('config', {}), dict)):
        raise SnapshotError(f'{path} is not a snapshot of this trainer (no state_dict under "model")')
    return state


def check_exists(weights_dir, epoch):
    """The path of the snapshot of `epoch` to resume from; SnapshotError naming what is there
    when it is missing (epoch 0: there is none)."""
    path = snapshot_path(weights_dir, epoch)
    if not os.path.exists(path):
        have = epochs(weights_dir)
        if not epoch:
            raise SnapshotError(f'no snapshot model_<N>.pt in {weights_dir} to resume from')
        raise SnapshotError(f'no snapshot {path} to resume from (load_epoch: {epoch}; '
                            f'snapshots there: {have or "none"})')
    return path


def misfit(error, width=200):
    """One line of a load error: its first line, and its second cut to `width` characters (torch's
    load_state_dict: a heading, then what did not fit), ' ...' where more was left out."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) < 2:
        return lines[0] if lines else type(error).__name__
    cut = len(lines[1]) > width or len(lines) > 2
    return f'{lines[0]} {lines[1][:width]}{" ..." if cut else ""}'


def load_net(state, path, device='cpu', fallback=None):
    """The network of a snapshot dict (read from `path`), in eval mode on `device`: its model,
    crop_size and dropout from the snapshot's own config (from `fallback`, a config, for a
    snapshot that holds none), the classes from its weights. (net, the settings used)."""
    saved = state.get('config') or fallback or {}
    name = saved.get('model', 'alexnet')
    settings = {'model': name,
                'crop_size': int(saved.get('crop_size', 227 if name == 'alexnet' else 32)),
                'dropout': float(saved.get('dropout', 0.5))}
    try:
        net = model.from_state(state['model'], name, settings['dropout'], settings['crop_size'])
    except (ValueError, RuntimeError) as e:  # no fc layer; weights of another shape
        raise SnapshotError(f'{path} does not fit model {name} (crop_size {settings["crop_size"]}): '
                            f'{misfit(e)}') from None
    return net.to(device), settings


RUN_FILES = ('config.yaml', 'history.csv', 'val_record.npy', 'training.png')


def check_fresh_start(weights_dir, overwrite, move=True):
    """Before a fresh run writes into weights_dir: refuse (one line naming the ways on) when it
    holds another run's snapshots, or with `overwrite` move that run's files into
    weights_dir/previous_<N>/ (`move` False: leave that to the worker that writes)."""
    have = epochs(weights_dir)
    if not have:
        return None
    if not overwrite:
        raise SnapshotError(
            f'{weights_dir} holds the snapshots of another run (model_{have[0]}.pt .. '
            f'model_{have[-1]}.pt): resume it with weights_dir={weights_dir} resume_train=True, '
            f'choose another weights_dir, or set overwrite=True to move that run into '
            f'{os.path.join(weights_dir, "previous_<N>")} first')
    if not move:
        return None
    n = 1
    while os.path.exists(os.path.join(weights_dir, f'previous_{n}')):
        n += 1
    aside = os.path.join(weights_dir, f'previous_{n}')
    os.mkdir(aside)
    for name in [f'model_{e}.pt' for e in have] + list(RUN_FILES):
        if os.path.exists(os.path.join(weights_dir, name)):
            os.replace(os.path.join(weights_dir, name), os.path.join(aside, name))
    return aside


def rng_state(gen, device, order_gen):
    state = {'data': gen.get_state(), 'torch': torch.get_rng_state(), 'order': order_gen.get_state()}
    if device.type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, gen, device, order_gen):
    gen.set_state(state['data'])
    if 'order' in state:  # snapshots before the shared file order have none
        order_gen.set_state(state['order'])
    torch.set_rng_state(state['torch'])
    if device.type == 'cuda' and 'cuda' in state:
        torch.cuda.set_rng_state(state['cuda'], device)


def val_record(history):
    """float64 (epochs, 2): [top-1 error, loss] per epoch of the list of per-epoch dicts, as the
    original's val_record.npy (and a snapshot's val_record)."""
    record = np.array([[h['val_error'], h['val_loss']] for h in history], dtype=np.float64)
    return record.reshape(len(history), 2)


def write_records(weights_dir, history):
    """val_record.npy and history.csv from the list of per-epoch dicts."""
    record = val_record(history)
    save_npy(os.path.join(weights_dir, 'val_record.npy'), record)

    def write_csv(tmp):
        with open(tmp, 'w', newline='') as f:
            w = csv.DictWriter(f, HISTORY_FIELDS)
            w.writeheader()
            w.writerows({k: h[k] for k in HISTORY_FIELDS} for h in history)
    atomic_write(os.path.join(weights_dir, 'history.csv'), write_csv)
    return record

