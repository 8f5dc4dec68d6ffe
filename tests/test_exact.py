"""The number of workers never changes the training, under the defaults users run: the default
network (alexnet, dropout 0.5 in fc6 and fc7), random crops and mirrors, shuffled batch files.

The random draws belong to the step: every worker draws the crops, mirrors and dropout masks of
the whole step and keeps its rows, so one worker on batches of 4 images, two train_2gpu.py
workers on 2 each (halves files, or rows of whole files; shm and tcp) and torchrun ranks (both
exchange modes) train the same model, and a snapshot resumes under any launcher. In float64 on
the CPU (see EXACT in test_train_2gpu.py for why float64 and 1e-9), a few steps at 227 px."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from lib import config, training
from tests.helpers import make_batches
from tests.test_torchrun import torchrun
from tests.test_train_2gpu import EXACT_TOLERANCE, SCRIPT, args, free_port, relative_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what config.yaml leaves as it is: model alexnet, crop_size 227, dropout 0.5, rand_crop True
DEFAULTS = dict(shuffle=True, precision='fp64', print_freq=1, gpu='cpu')
ENV = dict(os.environ, OMP_NUM_THREADS='1')


@pytest.fixture(autouse=True)
def own_temp_dir(tmp_path, monkeypatch):
    monkeypatch.setenv('TMPDIR', str(tmp_path))  # torchrun's agent leaves its folders there


@pytest.fixture(scope='module')
def alexnet(tmp_path_factory):
    """(data keys, reference weights_dir): 2 batch files of 4 images at 240 px (3 classes), and
    one worker's run of 3 epochs (2 steps each) with a snapshot after every epoch."""
    root = tmp_path_factory.mktemp('alexnet')
    keys = make_batches(str(root / 'data'), n_train=2, n_val=1, batch=4, size=240)
    ref = str(root / 'one')
    history = training.run(config.merge({**config.CONFIG, **config.SPEC_1GPU}, [
        ('test', dict(keys, **DEFAULTS, n_epochs=3, weights_dir=ref), None)]))
    assert len(history) == 3
    return keys, ref


def snapshot(weights_dir, epoch):
    return torch.load(os.path.join(weights_dir, f'model_{epoch}.pt'), weights_only=True)


def assert_same_training(got, ref, what):
    assert ref['config']['model'] == 'alexnet' and ref['config']['dropout'] == 0.5
    for part in ('model', 'momentum'):
        for k in ref[part]:
            assert relative_error(got[part][k], ref[part][k]) < EXACT_TOLERANCE, (what, part, k)
    # (the logged loss is summed in float32, over however many workers)
    assert [h['train_loss'] for h in got['history']] == pytest.approx(
        [h['train_loss'] for h in ref['history']], rel=1e-6), what


def run(cmd, cwd, timeout=600):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=ENV)
    assert r.returncode == 0, r.stdout[-1500:] + '\n--- stderr:\n' + r.stderr[-3000:]
    return r


def two_workers(keys, weights_dir, transport, halves, **over):
    """train_2gpu.py on 2 CPU workers, each on 2 images of every step: the NNNN_<r>.hkl halves,
    or rows [2r, 2r + 2) of the whole files."""
    folders = {k: keys[k].replace('_b4_b_4', '_b4_b_2') if halves else keys[k]
               for k in ('train_folder', 'val_folder')}
    values = dict(keys, **folders, **DEFAULTS, batch_size=2, weights_dir=weights_dir,
                  exchange_transport=transport, sock_gpu=free_port(), peer_timeout=120.0, **over)
    del values['gpu']
    return [sys.executable, SCRIPT, 'gpu0=cpu', 'gpu1=cpu'] + args(values)


def ranks(keys, weights_dir, n, mode, **over):
    values = dict(keys, **DEFAULTS, weights_dir=weights_dir, exchange=mode, peer_timeout=120.0,
                  **over)
    return torchrun(n) + args(values)


def test_two_workers_over_tcp_on_halves_train_alexnet_as_one_worker(tmp_path, alexnet):
    keys, ref = alexnet
    r = run(two_workers(keys, str(tmp_path / 'w'), 'tcp', True, n_epochs=1), tmp_path)
    assert 'exchange over tcp' in r.stdout
    assert_same_training(snapshot(tmp_path / 'w', 1), snapshot(ref, 1), 'tcp')


def test_torchrun_ranks_averaging_train_alexnet_as_one_worker(tmp_path, alexnet):
    keys, ref = alexnet
    r = run(ranks(keys, str(tmp_path / 'w'), 2, 'average', n_epochs=1), tmp_path)
    assert 'batches of 4 (2 workers x 2)' in r.stdout
    assert_same_training(snapshot(tmp_path / 'w', 1), snapshot(ref, 1), 'average')


def test_a_run_moves_across_launchers_and_ends_as_one_uninterrupted_run(tmp_path, alexnet):
    """Epoch 1 on two train_2gpu.py workers (shm, rows of whole files), epoch 2 resumed on 4
    torchrun ranks (gradients), epoch 3 with train.py alone: after each, the weights of one
    train.py run."""
    keys, ref = alexnet
    w = str(tmp_path / 'w')
    run(two_workers(keys, w, 'shm', False, n_epochs=1), tmp_path)
    assert_same_training(snapshot(w, 1), snapshot(ref, 1), 'train_2gpu.py')
    r = run(ranks(keys, w, 4, 'gradients', n_epochs=2, resume_train=True), tmp_path)
    assert 'batches of 4 (4 workers x 1)' in r.stdout and 'resumed from' in r.stdout
    assert_same_training(snapshot(w, 2), snapshot(ref, 2), 'train_2gpu.py -> torchrun')
    r = run([sys.executable, os.path.join(ROOT, 'train.py'), f'weights_dir={w}', 'resume_train=True',
             'n_epochs=3'], tmp_path)
    assert 'resumed from' in r.stdout and 'done: epoch 3' in r.stdout
    assert_same_training(snapshot(w, 3), snapshot(ref, 3), 'train_2gpu.py -> torchrun -> train.py')


def test_one_worker_resumes_the_dropout_stream_bit_for_bit(tmp_path):
    """Epoch 2 resumed from model_1.pt is epoch 2 of the uninterrupted run, bit for bit: the
    dropout masks come from torch's generator, whose state the snapshot holds. (Its own small
    run: one batch file of 2 images per epoch, kept cheap for the mutation check.)"""
    keys = make_batches(str(tmp_path / 'data'), n_train=1, n_val=1, batch=2, size=232)

    def train(weights_dir, **over):
        training.run(config.merge({**config.CONFIG, **config.SPEC_1GPU}, [
            ('test', dict(keys, **DEFAULTS, n_epochs=2, weights_dir=str(weights_dir), **over), None)]))
    train(tmp_path / 'one')
    w = tmp_path / 'w'
    w.mkdir()
    shutil.copy(tmp_path / 'one' / 'model_1.pt', w)
    train(w, resume_train=True, load_epoch=1)
    got, want = snapshot(w, 2), snapshot(tmp_path / 'one', 2)
    assert want['config']['dropout'] == 0.5
    for part in ('model', 'momentum'):
        for k in want[part]:
            assert torch.equal(got[part][k], want[part][k]), (part, k)
