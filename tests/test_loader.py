"""para_load: the loader process trains identically, never outlives the trainer, and never hangs it."""
import ctypes
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from lib import data, loader, training
from tests.helpers import children, make_batches, write_hkl
from tests.test_train import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gone_within(pid, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with open(f'/proc/{pid}/stat') as f:
                if f.read().rsplit(')', 1)[1].split()[0] == 'Z':
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def tiny(tmp_path):
    keys = make_batches(str(tmp_path), n_train=4, n_val=2, batch=8, size=36)
    sources = [data.BatchFolder(data.batch_files(keys[f'{s}_folder']),
                                os.path.join(keys['label_folder'], f'{s}_labels.npy'), 8)
               for s in ('train', 'val')]
    return keys, sources


def plan_for(source, seed=0):
    return data.make_plan(torch.Generator().manual_seed(seed), len(source), 8, 36, 32, train=True,
                          shuffle=True)


@pytest.mark.parametrize('on_device', [False, True])
def test_batches_equal_the_in_process_loader(tiny, on_device):
    keys, sources = tiny
    mean = data.load_mean(keys['mean_file'], 36)
    proc = loader.LoaderProcess(sources, keys['mean_file'], 32, 'cpu', on_device, timeout=30)
    try:
        for split in (0, 1, 0):  # train, val, train again: slots are reused across epochs
            plan = plan_for(sources[split], seed=split)
            want = [(x.clone(), y) for x, y in
                    data.InProcessLoader(sources[split], mean, 32, 'cpu').epoch(plan)]
            got = [(x.clone(), y) for x, y in proc.loader(split).epoch(plan)]
            assert len(got) == len(want)
            for (x1, y1), (x2, y2) in zip(want, got):
                assert torch.equal(x1, x2) and torch.equal(y1, y2)
    finally:
        proc.close()
    assert not proc.proc.is_alive() and not os.path.exists(proc.dir)
    assert proc.sock.closed and proc.ctx.closed  # the trainer's end of the link too


def test_the_loader_prepares_the_next_batch_while_the_trainer_holds_one(tiny):
    """para_load overlaps loading with training: while the trainer still holds a batch (it has
    not asked for the next), the loader has already been sent the next step and answers READY
    on its own. Without that prefetch para_load would train as before, only slower."""
    keys, sources = tiny
    proc = loader.LoaderProcess(sources, keys['mean_file'], 32, 'cpu', timeout=30)
    batches = proc.loader(0).epoch(plan_for(sources[0]))
    try:
        for _ in range(len(sources[0]) - 1):
            next(batches)
            assert proc.sock.poll(5_000), 'the loader was not asked for the next batch in advance'
        next(batches)
        assert not proc.sock.poll(200)  # the epoch's last batch: nothing more to prepare
    finally:
        batches.close()
        proc.close()


def test_para_load_and_data_layer_train_bitwise_identically(tmp_path):
    finals = []
    for para_load in (False, True):
        for layer in (False, True):
            root = str(tmp_path / f'{para_load}{layer}')
            cfg = tiny_config(root, n_epochs=2, para_load=para_load, use_data_layer=layer,
                              dropout=0.5, batch_crop_mirror=layer)
            training.run(cfg)
            finals.append((layer, torch.load(os.path.join(root, 'w', 'model_2.pt'),
                                             weights_only=True)['model']))
    for layer in (False, True):  # per-image and per-batch draws: each pair equal bit for bit
        a, b = [m for used, m in finals if used == layer]
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_waiting_for_the_device_copy_is_logged_apart_from_waiting_for_the_loader(
        tmp_path, monkeypatch, capsys):
    # on CUDA, release() waits for the previous batch's copy, queued behind earlier compute:
    # device back-pressure that must not read as a late loader (here a 50 ms stand-in)
    release = loader.SlotFeed.release
    monkeypatch.setattr(loader.SlotFeed, 'release', lambda self, k: (time.sleep(0.05), release(self, k)))
    training.run(tiny_config(str(tmp_path), n_epochs=1, para_load=True, use_data_layer=True))
    line = [s for s in capsys.readouterr().out.splitlines() if 'copy wait' in s][-1]
    data_ms, copy_ms = (float(line.split(f'{w} wait ')[1].split()[0]) for w in ('data', 'copy'))
    assert copy_ms >= 45 and data_ms < 45, line


def test_killed_loader_stops_the_trainer_with_an_error_naming_it(tiny):
    keys, sources = tiny
    proc = loader.LoaderProcess(sources, keys['mean_file'], 32, 'cpu', timeout=30)
    try:
        batches = proc.loader(0).epoch(plan_for(sources[0]))
        next(batches)
        os.kill(proc.proc.pid, signal.SIGKILL)
        t = time.monotonic()
        with pytest.raises(loader.LoaderError, match=rf'loader process \(pid {proc.proc.pid}\) died.*'
                                                      r'while preparing .*\.hkl'):
            for _ in batches:
                pass
        assert time.monotonic() - t < 5
    finally:
        proc.close()


def test_stalled_loader_times_out_naming_the_file(tiny):
    keys, sources = tiny
    proc = loader.LoaderProcess(sources, keys['mean_file'], 32, 'cpu', timeout=4)
    try:
        batches = proc.loader(0).epoch(plan_for(sources[0]))
        next(batches)
        os.kill(proc.proc.pid, signal.SIGSTOP)
        t = time.monotonic()
        # which file depends on how far the ring got before the SIGSTOP landed
        with pytest.raises(loader.LoaderError, match=r'stalled: no batch for 4 s .*/000\d\.hkl'):
            for _ in batches:
                pass
        assert time.monotonic() - t < 10
    finally:
        os.kill(proc.proc.pid, signal.SIGCONT)
        proc.close()


def test_bad_batch_file_is_an_error_naming_it(tiny):
    keys, sources = tiny
    bad = sources[0].files[2]
    write_hkl(bad, np.zeros((3, 36, 36, 5), np.uint8))
    proc = loader.LoaderProcess(sources, keys['mean_file'], 32, 'cpu', timeout=30)
    try:
        with pytest.raises(data.DataError, match='0002.hkl: expected uint8'):
            list(proc.loader(0).epoch(data.make_plan(torch.Generator(), 4, 8, 36, 32, train=True)))
        with open(bad, 'wb') as f:
            f.write(b'garbage')
        with pytest.raises(data.DataError, match='0002.hkl: cannot read batch file'):
            list(proc.loader(0).epoch(data.make_plan(torch.Generator(), 4, 8, 36, 32, train=True)))
    finally:
        proc.close()


def test_malformed_control_messages_are_rejected(tiny):
    import pickle
    for frames in ([b''], [b'garbage'], [pickle.dumps({'cmd': 'rm -rf'})],
                   loader.encode(loader.LOAD, 0, 0, 1)[:1],             # LOAD without arrays
                   [b'ALXX' + loader.encode(loader.STOP)[0][4:]],       # another magic
                   [loader.encode(loader.STOP)[0][:4] + b'\x09' + loader.encode(loader.STOP)[0][5:]],
                   loader.encode(loader.LOAD, 0, 5, 1, plan_for(tiny[1][0])[0]),   # slot 5
                   loader.encode(loader.LOAD, 2, 0, 1, plan_for(tiny[1][0])[0])):  # split 2
        with pytest.raises(loader.ProtocolError):
            loader.decode(frames, batch_size=8, n_files=[4, 2])
    load = loader.encode(loader.LOAD, 0, 0, 1, plan_for(tiny[1][0])[0])
    assert loader.decode(load, batch_size=8, n_files=[4, 2])[:4] == (loader.LOAD, 0, 0, 1)
    for i in (1, 2, 3):  # one array of another length than the batch's: crop x, crop y, mirror
        with pytest.raises(loader.ProtocolError, match='LOAD arrays are not of batch size 8'):
            loader.decode([*load[:i], load[i][:-1], *load[i + 1:]], batch_size=8, n_files=[4, 2])
    keys, sources = tiny
    proc = loader.LoaderProcess(sources, keys['mean_file'], 32, 'cpu', timeout=30)
    try:  # the loader answers garbage with an error and goes on serving
        proc.sock.send_multipart([pickle.dumps(os.system)])
        assert proc.sock.poll(10000)
        kind, *_, text = loader.decode(proc.sock.recv_multipart())
        assert kind == loader.ERROR and text.startswith('rejected control message')
        proc.sock.send_multipart(loader.encode(loader.LOAD, 2, 0, 0, plan_for(sources[0])[0]))
        assert proc.sock.poll(10000)  # a split it does not serve: rejected, the loader lives on
        kind, *_, text = loader.decode(proc.sock.recv_multipart())
        assert kind == loader.ERROR and 'split 2' in text and proc.proc.is_alive()
        proc.sock.send_multipart(loader.encode(loader.STOP) + [b'x'])  # a STOP with a frame too many
        assert proc.sock.poll(10000)  # is not obeyed: rejected, named
        kind, *_, text = loader.decode(proc.sock.recv_multipart())
        assert kind == loader.ERROR and proc.proc.is_alive()
        assert text == f'rejected control message: message kind {loader.STOP} with 2 frames', text
        assert len(list(proc.loader(1).epoch(plan_for(sources[1])))) == 2
    finally:
        proc.close()


def trainer_script(keys, *lines):
    """A trainer process's script: a LoaderProcess on the tiny data as `p`, then `lines`, then a
    minute's sleep (the tests kill it before)."""
    body = ["src = [data.BatchFolder(data.batch_files(keys[f'{s}_folder']), "
            "os.path.join(keys['label_folder'], f'{s}_labels.npy'), 8) for s in ('train', 'val')]",
            "p = loader.LoaderProcess(src, keys['mean_file'], 32, 'cpu')", *lines, 'time.sleep(60)']
    return ('import os, sys, time\nfrom lib import data, loader\nif __name__ == "__main__":\n'
            f'    keys = {keys!r}\n' + ''.join(f'    {line}\n' for line in body))


def test_loader_exits_when_its_trainer_is_killed(tiny, tmp_path):
    keys, _ = tiny
    script = trainer_script(keys, 'print(p.proc.pid, p.dir, flush=True)')
    trainer = subprocess.Popen([sys.executable, '-c', script], cwd=ROOT, stdout=subprocess.PIPE,
                               text=True)
    pid, folder = trainer.stdout.readline().split()
    trainer.kill()   # SIGKILL: no cleanup code runs in the trainer
    trainer.wait()
    assert gone_within(int(pid), 5), 'the loader outlived its trainer'
    assert not os.path.exists(folder), 'the shared-memory slots outlived the trainer'


def test_ctrl_c_stops_trainer_and_loader(tmp_path):
    keys = make_batches(str(tmp_path / 'data'), n_train=30, n_val=2, batch=8, size=36)
    args = [f'{k}={v}' for k, v in keys.items()] + [
        'model=alexnet_cifar', 'crop_size=32', 'gpu=cpu', 'n_epochs=1000', 'para_load=True',
        'weights_dir=w']
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py')] + args, cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        for line in p.stdout:
            if line.startswith('epoch 1 |'):
                break
        kids = children(p.pid)
        assert kids, 'no loader process'
        os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        assert p.wait(timeout=60) == 130  # (under load the trainer and its loader take seconds)
        assert all(gone_within(k, 5) for k in kids)
        assert 'interrupted' in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()


def test_oversized_control_frames_never_reach_the_loader(tiny):
    """zmq.MAXMSGSIZE: a frame larger than a LOAD's largest (8 bytes per image) is dropped by
    ZeroMQ, which drops the connection: never read into the loader's memory, and the trainer's
    next request stops within loader_timeout with an error saying so."""
    keys, sources = tiny
    proc = loader.LoaderProcess(sources, keys['mean_file'], 32, 'cpu', timeout=3)
    try:
        proc.sock.send_multipart([b'x' * (1 << 20)])
        assert not proc.sock.poll(3000)  # no answer: it was never received (unlike garbage)
        assert proc.proc.is_alive()
        t = time.monotonic()
        with pytest.raises(loader.LoaderError, match='within 3 s .*connection was lost'):
            list(proc.loader(1).epoch(plan_for(sources[1])))
        assert time.monotonic() - t < 10
    finally:
        proc.close()


def test_trainer_and_loader_killed_together_leave_nothing_in_dev_shm(tiny):
    """The slot files are unlinked once both processes mapped them (as the exchange does)."""
    keys, _ = tiny
    script = trainer_script(
        keys, 'b = next(p.loader(0).epoch(data.make_plan(None, 4, 8, 36, 32, train=False)))',
        'print(p.proc.pid, p.dir, float(b[0].sum()), flush=True)')
    trainer = subprocess.Popen([sys.executable, '-c', script], cwd=ROOT, stdout=subprocess.PIPE,
                               text=True)
    try:
        pid, folder, _ = trainer.stdout.readline().split()
        os.kill(int(pid), signal.SIGKILL)  # both at once: no cleanup code runs anywhere
        trainer.kill()
        trainer.wait()
        assert gone_within(int(pid), 5)
        assert not os.path.exists(folder), os.listdir(folder)
    finally:
        if trainer.poll() is None:
            trainer.kill()


def test_too_little_shared_memory_is_a_one_line_error(tiny, monkeypatch):
    keys, sources = tiny
    monkeypatch.setattr(loader, 'shm_free', lambda folder: 2**20 // 10)
    # 2 slots of 8 float32 crops of 3 x 32 x 32: 0.1875 MiB
    with pytest.raises(loader.LoaderError, match=r'needs 0.2 MiB .*, /dev/shm has 0.1 MiB free'):
        loader.LoaderProcess(sources, keys['mean_file'], 32, 'cpu')


def test_the_cuda_runtime_is_reached_in_the_instance_torch_loaded():
    """clear_last_cuda_error() calls cudaGetLastError in the libcudart mapped into this process
    (torch.cuda.cudart() binds none): the lookup, shown on the C library, gives the loaded
    instance. (A failed registration on a GPU: tests/test_cuda.py.)"""
    libc = loader.mapped_library('libc.so')
    assert libc and os.path.isabs(libc) and ctypes.CDLL(libc).getpid() == os.getpid()
    assert loader.mapped_library('no-such-library-') is None
    cudart = loader.mapped_library('libcudart.so')
    err = loader.clear_last_cuda_error()
    assert (err is None) == (cudart is None)  # a CPU build maps none: nothing to clear
    assert err is None or isinstance(err, int)
