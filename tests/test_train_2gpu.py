"""train_2gpu.py: two workers averaging after every step train exactly as one worker on the whole
batches; both CPU transports; a dead or stalled worker stops everything; hostile clients."""
import os
import pickle
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zmq

from lib import config, exchange, link, training
from lib.data import DataError, share_source
from tests.helpers import both_workers, children, make_batches
from tests.test_loader import gone_within

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'train_2gpu.py')


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def dataset(tmp_path, n_train=4, batch=8, seed=0):
    keys = make_batches(str(tmp_path / 'data'), n_train=n_train, n_val=2, batch=batch, size=36,
                        seed=seed)
    halves = {k: v.replace(f'_b{batch}_b_{batch}', f'_b{batch}_b_{batch // 2}')
              for k, v in keys.items() if k.endswith('_folder') and k != 'label_folder'}
    return keys, dict(keys, **halves, batch_size=batch // 2)


COMMON = dict(model='alexnet_cifar', crop_size=32, n_epochs=2, print_freq=2, dropout=0.0,
              rand_crop=False, shuffle=False, learning_rate=0.01)
# "N workers on 1/N of each batch train as one worker on the whole batches" is exact up to
# rounding, and float32 rounding can flip a near-tie of a max-pool window (a 2e-3 relative jump
# for some seeds). In float64 a flip would need a tie within ~1e-15, so the property is tested
# there, with a bound (1e-9) that such rounding cannot reach and any real difference exceeds;
# under the defaults users run: random crops and mirrors, shuffled, two epochs, several seeds
# (the draws belong to the step: every worker's images get the crops of a one-worker run).
EXACT = dict(COMMON, shuffle=True, rand_crop=True, precision='fp64')
EXACT_TOLERANCE = 1e-9


def args(values):
    return [f'{k}={v}' for k, v in values.items()]


def settings(tmp_path, halves, **over):
    values = dict(halves, **COMMON, gpu0='cpu', gpu1='cpu', weights_dir=str(tmp_path / 'w2'),
                  sock_gpu=free_port(), peer_timeout=30.0)
    values.update(over)
    return values


def run_2gpu(tmp_path, halves, timeout=300, **over):
    values = settings(tmp_path, halves, **over)
    return subprocess.run([sys.executable, SCRIPT] + args(values), capture_output=True,
                          text=True, timeout=timeout, cwd=tmp_path)


def launcher_folder(proc):
    """The launcher's private folder, from its first line (the link's socket is in it)."""
    line = next(line for line in proc.stdout if ' link ' in line)
    return os.path.dirname(line.split(' link ')[1].strip().removeprefix('ipc://'))


def family(pid):
    """The live children of pid and theirs: workers, loaders, the folder's keeper, the resource
    tracker."""
    out = children(pid)
    return out + [c for p in out for c in children(p)]


def removed_within(path, seconds):
    deadline = time.monotonic() + seconds
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not os.path.exists(path)


def started(proc):
    """The worker pids [worker 0, worker 1] once training runs in both."""
    pids = None
    for line in proc.stdout:
        if line.startswith('train_2gpu: worker 0 pid'):
            pids = [int(line.split()[4].rstrip(',')), int(line.split()[8])]
        if 'epoch 1 iter' in line:
            assert set(pids) <= set(children(proc.pid)), (pids, children(proc.pid))
            return pids
    raise AssertionError(f'training did not start: {proc.stderr.read()}')


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize('transport,seed', [('shm', 0), ('tcp', 1), ('shm', 2)])
def test_two_workers_on_halves_equal_one_worker_on_whole_batches(tmp_path, transport, seed):
    full, halves = dataset(tmp_path, seed=seed)
    one = training.run(config.merge({**config.CONFIG, **config.SPEC_1GPU},
                                 [('test', dict(full, **EXACT, gpu='cpu', seed=seed,
                                                weights_dir=str(tmp_path / 'w1')), None)]))
    r = run_2gpu(tmp_path, halves, exchange_transport=transport, seed=seed, **EXACT)
    assert r.returncode == 0, r.stderr
    assert f'exchange over {transport} every 1 step(s)' in r.stdout
    assert r.stdout.count('epoch 1 iter') == 2  # worker 0 alone logs
    a = torch.load(tmp_path / 'w1' / 'model_2.pt', weights_only=True)
    b = torch.load(tmp_path / 'w2' / 'model_2.pt', weights_only=True)
    assert a['model']['classifier.weight'].dtype == torch.float64
    for part in ('model', 'momentum'):
        for k in a[part]:
            assert relative_error(b[part][k], a[part][k]) < EXACT_TOLERANCE, (part, k)
    rec1, rec2 = np.load(tmp_path / 'w1' / 'val_record.npy'), np.load(tmp_path / 'w2' / 'val_record.npy')
    assert rec2.shape == (2, 2)
    np.testing.assert_allclose(rec2, rec1, rtol=1e-5)  # averaged over the two halves of val
    assert [h['train_loss'] for h in b['history']] == pytest.approx(
        [h['train_loss'] for h in one], rel=1e-4)
    assert sorted(os.listdir(tmp_path / 'w2')) == ['config.yaml', 'history.csv', 'model_1.pt',
                                                   'model_2.pt', 'training.png', 'val_record.npy']


def test_halves_of_whole_batch_files_train_as_the_halves_folder(tmp_path):
    """One copy on disk: workers taking their half of every NNNN.hkl (the whole folder named,
    through the loader process; or in-process as the fallback of a halves folder that does not
    exist) train bit for bit as workers on the NNNN_0.hkl / NNNN_1.hkl halves, also with
    batch_size left 0 (then half of a whole file)."""
    full, halves = dataset(tmp_path)
    forgot = {k: v for k, v in halves.items() if k != 'batch_size'}
    whole = dict(forgot, train_folder=full['train_folder'], val_folder=full['val_folder'])
    over = dict(n_epochs=1, rand_crop=True, shuffle=True, dropout=0.5)
    runs = [('halves', halves, {}), ('whole_loader', whole, {'para_load': True}), ('fallback', forgot, {})]
    out = {}
    for name, keys, extra in runs:
        if name == 'fallback':  # the halves folders are gone: their whole siblings are used
            for k in ('train_folder', 'val_folder'):
                shutil.rmtree(halves[k])
        r = run_2gpu(tmp_path, keys, weights_dir=str(tmp_path / name), **over, **extra)
        assert r.returncode == 0, (name, r.stderr)
        out[name] = r.stdout
    assert 'notice:' not in out['halves'] + out['whole_loader']
    notice = [line for line in out['fallback'].splitlines() if line.startswith('notice:')]
    assert len(notice) == 1 and halves['train_folder'] in notice[0] \
        and full['val_folder'] in notice[0], out['fallback']
    ref = torch.load(tmp_path / 'halves' / 'model_1.pt', weights_only=True)
    for name, _, _ in runs[1:]:
        got = torch.load(tmp_path / name / 'model_1.pt', weights_only=True)
        for part in ('model', 'momentum'):
            assert all(torch.equal(got[part][k], ref[part][k]) for k in ref[part]), (name, part)
        assert torch.equal(got['val_record'], ref['val_record']), name


def test_where_a_worker_takes_its_half_from(tmp_path):
    TWO = 'train_2gpu.py'  # batch_size: per worker
    full, halves = dataset(tmp_path)
    labels = full['label_folder']
    half, notice = share_source(halves['train_folder'], labels, 'train', 4, TWO, (1, 2))
    assert (half.files[0], half.rows, notice) == \
        (os.path.join(halves['train_folder'], '0000_1.hkl'), None, None)
    assert half.labels_file.endswith('train_labels_1.npy')
    rows, notice = share_source(full['train_folder'], labels, 'train', 4, TWO, (1, 2))
    assert (rows.files[0], rows.rows, notice) == \
        (os.path.join(full['train_folder'], '0000.hkl'), (4, 8), None)
    assert rows.labels_file.endswith('train_labels.npy') and rows.labels.shape == (4, 4)
    assert np.array_equal(rows.labels, half.labels) and np.array_equal(rows.read(2), half.read(2))
    with pytest.raises(DataError) as e:  # batch_size is per worker: these files hold 2 x 4
        share_source(full['train_folder'], labels, 'train', 8, TWO, (0, 2))
    assert str(e.value) == (os.path.join(full['train_folder'], '0000.hkl') + ' holds 8 images, not '
                            '16 (2 workers x 8): set batch_size=4, or name a folder of NNNN_0.hkl '
                            'halves')
    with pytest.raises(DataError, match=r'0000.hkl holds 8 images, not 4: set batch_size=8$'):
        share_source(full['train_folder'], labels, 'train', 4)  # train.py alone
    with pytest.raises(DataError, match=r'holds 8 images, not 16 \(4 workers x 4\): set '
                                        r'batch_size=8 \(under torchrun: all ranks together\)$'):
        share_source(full['train_folder'], labels, 'train', 16, 'train.py', (3, 4))  # torchrun rank 3 of 4
    shutil.rmtree(halves['train_folder'])  # a halves folder that is gone: its whole sibling
    source, notice = share_source(halves['train_folder'], labels, 'train', 4, TWO, (0, 2))
    assert (os.path.dirname(source.files[0]), source.rows) == (full['train_folder'], (0, 4))
    assert notice == (f"{halves['train_folder']} does not exist: each worker takes its half of "
                      f"every batch in {full['train_folder']}")
    quarters = full['train_folder'].replace('_b8_b_8', '_b8_b_2')  # not the sibling of _b8_b_8
    with pytest.raises(DataError, match=f'cannot list batch folder {quarters}'):
        share_source(quarters, labels, 'train', 4, TWO, (0, 2))


def test_resume_and_exchange_freq(tmp_path):
    _, halves = dataset(tmp_path)
    # fp16: the workers share each step's overflow decision (one more collective per step)
    over = dict(exchange_freq=3, dropout=0.5, rand_crop=True, shuffle=True, precision='fp16')
    r = run_2gpu(tmp_path, halves, n_epochs=1, **over)
    assert r.returncode == 0, r.stderr
    first = torch.load(tmp_path / 'w2' / 'model_1.pt', weights_only=True)
    r = run_2gpu(tmp_path, halves, n_epochs=2, resume_train=True, load_epoch=1, **over)
    assert r.returncode == 0, r.stderr
    assert 'resumed from' in r.stdout and 'epoch 2 |' in r.stdout and 'epoch 1 |' not in r.stdout
    second = torch.load(tmp_path / 'w2' / 'model_2.pt', weights_only=True)
    assert second['val_record'].shape == (2, 2)
    assert torch.equal(second['val_record'][0], first['val_record'][0])
    assert second['loss_scale'].item() > 0
    assert not torch.equal(second['momentum']['classifier.weight'],
                           first['momentum']['classifier.weight'])


def test_a_killed_worker_stops_the_other_and_the_launcher(tmp_path):
    _, halves = dataset(tmp_path, n_train=400)
    values = settings(tmp_path, halves, sock_gpu=free_port(), peer_timeout=8.0, n_epochs=50)
    proc = subprocess.Popen([sys.executable, SCRIPT] + args(values), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        folder = launcher_folder(proc)
        victim = started(proc)[1]
        workers = children(proc.pid)  # both workers, the folder's keeper, the resource tracker
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    assert elapsed < 8.0  # the disconnection noticed, not the silence past peer_timeout
    assert 'worker 0: error: lost the connection to worker 1 at step' in err, err
    assert 'alexnet-worker1 exit code -9' in err
    for pid in workers:
        assert gone_within(pid, 5)
    assert not os.path.exists(folder)


def test_a_stalled_worker_is_named_within_peer_timeout(tmp_path):
    _, halves = dataset(tmp_path, n_train=400)
    values = settings(tmp_path, halves, sock_gpu=free_port(), peer_timeout=4.0, n_epochs=50)
    proc = subprocess.Popen([sys.executable, SCRIPT] + args(values), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        victim = started(proc)[1]
        workers = children(proc.pid)  # both workers (and multiprocessing's resource tracker)
        os.kill(victim, signal.SIGSTOP)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        for pid in children(proc.pid):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    assert elapsed < 4.0 + 15.0
    assert 'worker 0: error:' in err and 'worker 1' in err and 'at step' in err, err
    for pid in workers:
        assert gone_within(pid, 5)


def as_nobody(path):
    """What user nobody (65534) meets when it looks up `path` and connects to it: [error name or
    'reached'] twice, from a forked child."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(65534)
            os.setuid(65534)
            seen = []
            for reach in (lambda: os.stat(path), lambda: socket.socket(socket.AF_UNIX).connect(path)):
                try:
                    reach()
                    seen.append('reached')
                except OSError as e:
                    seen.append(type(e).__name__)
            os.write(w, ' '.join(seen).encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        return f.read().split()


def test_hostile_clients_are_rejected_and_training_goes_on(tmp_path):
    """On one host the link is a unix socket in the launcher's private folder (mode 0700, a
    random name on /dev/shm), not a port: another user can neither see nor reach it; clients of
    this user that connect anyway (pickles, garbage, hellos, not even ZeroMQ) are dropped and
    training goes on."""
    _, halves = dataset(tmp_path, n_train=60)
    port = free_port()
    # 8 epochs: the run must outlast the clients below (3 epochs once ended first on a busy machine)
    values = settings(tmp_path, halves, sock_gpu=port, peer_timeout=30.0, n_epochs=8)
    proc = subprocess.Popen([sys.executable, SCRIPT] + args(values), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    marker = tmp_path / 'pwned'

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), 'w'))

    ctx = zmq.Context()
    try:
        endpoint = next(line for line in proc.stdout if ' link ' in line).split(' link ')[1].strip()
        started(proc)
        path = endpoint.removeprefix('ipc://')
        folder = os.stat(os.path.dirname(path))
        assert stat.S_IMODE(folder.st_mode) == 0o700 and folder.st_uid == os.getuid(), endpoint
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        with pytest.raises(ConnectionRefusedError):  # sock_gpu is not used on one host
            socket.create_connection(('127.0.0.1', port), timeout=5).close()
        if os.getuid() == 0:
            assert as_nobody(path) == ['PermissionError', 'PermissionError']
        for sock_type in (zmq.DEALER, zmq.PAIR, zmq.REQ):
            s = ctx.socket(sock_type)
            s.setsockopt(zmq.LINGER, 0)
            assert proc.poll() is None, 'the run ended before the clients connected'
            s.connect(endpoint)
            frames = [[pickle.dumps(Evil())] if sock_type != zmq.REQ else [b'garbage']]
            if sock_type == zmq.DEALER:
                frames += [[link.header(link.HELLO, 1), b'{}'], [link.header(link.ARRIVE, 1)]]
            for f in frames:
                try:  # a PAIR's pipe to worker 0's ROUTER is dropped once ZeroMQ sees the types
                    s.send_multipart(f, zmq.NOBLOCK)  # differ: a blocking send then never returns
                except zmq.Again:
                    pass
            time.sleep(0.3)
            s.close()
        raw = socket.socket(socket.AF_UNIX)  # not even ZeroMQ
        raw.connect(path)
        raw.sendall(pickle.dumps(Evil()))
        raw.close()
        out, err = proc.communicate(timeout=240)
    finally:
        ctx.destroy(linger=0)  # closes any socket an exception left open (term() would wait on it)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert 'done: epoch 8' in out
    assert 'exchange: rejected a message from' in err
    assert not marker.exists()
    assert not os.path.exists(os.path.dirname(path))  # removed at the end


def test_port_in_use_is_a_one_line_error(tmp_path):
    """Two hosts: worker 0 binds exchange_host:sock_gpu."""
    from zmq.auth import create_certificates
    _, halves = dataset(tmp_path)
    os.mkdir(tmp_path / 'keys')
    for r in (0, 1):
        create_certificates(str(tmp_path / 'keys'), f'worker{r}')
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        s.listen()
        port = s.getsockname()[1]
        values = settings(tmp_path, halves, sock_gpu=port, peer_timeout=10.0,
                          exchange_host='127.0.0.1', curve_dir=str(tmp_path / 'keys'))
        r = subprocess.run([sys.executable, SCRIPT, '--worker', '0'] + args(values),
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == (f'worker 0: error: cannot bind the exchange socket tcp://127.0.0.1:'
                                f'{port} (exchange_host, sock_gpu): Address already in use'), r.stderr
    assert not os.path.exists(tmp_path / 'w2' / 'model_1.pt')


def test_bad_settings_are_one_line_errors(tmp_path):
    """Checked once by the launcher before the workers start: one line, not one per worker and
    the launcher's; nothing is written."""
    full, halves = dataset(tmp_path)
    used = tmp_path / 'used'
    used.mkdir()
    (used / 'model_1.pt').write_bytes(b'')
    whole = os.path.join(full['train_folder'], '0000.hkl')
    for over, msg in (({'exchange_transport': 'ipc'}, 'exchange_transport ipc needs two CUDA workers'),
                      ({'train_folder': full['train_folder'], 'batch_size': 8},
                       f'error: {whole} holds 8 images, not 16 (2 workers x 8): set batch_size=4'),
                      ({'weights_dir': str(used)}, f'error: {used} holds the snapshots of another run'),
                      ({'num_classes': 2}, 'train_labels_0.npy holds label 2, outside 0..1'),
                      ({'model': 'alexnet'}, 'model alexnet needs crop_size 227, got 32'),
                      ({'exchange_transport': 'udp'}, "must be one of auto, ipc, shm, tcp, got 'udp'"),
                      ({'exchange_freq': 0}, "'exchange_freq' in command-line overrides must be at least 1"),
                      ({'gpu1': 'tpu'}, "gpu1: 'tpu' is not a device"),
                      ({'exchange_host': '127.0.0.1'}, 'exchange_host is for two hosts: start each '
                       'worker with --worker 0 / --worker 1, with curve_dir')):
        r = run_2gpu(tmp_path, halves, **over)
        assert r.returncode == 2, (over, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and msg in r.stderr, r.stderr
        assert not (tmp_path / 'w2').exists() and os.listdir(used) == ['model_1.pt']


def test_flatten_makes_views_of_one_buffer():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(16, 2))
    net.to(memory_format=torch.channels_last)
    params = list(net.parameters())
    before = [p.detach().clone() for p in params]
    momentum = [torch.full_like(p, i) for i, p in enumerate(params)]
    flat = exchange.flatten(params, momentum, lambda n: torch.empty(n))
    n = sum(p.numel() for p in params)
    assert flat.shape == (2 * n,)
    assert params[0].is_contiguous(memory_format=torch.channels_last)
    for p, b, m in zip(params, before, momentum):
        assert torch.equal(p, b) and p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
        assert m.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    flat.zero_()
    assert all(p.abs().sum() == 0 for p in params) and all(m.abs().sum() == 0 for m in momentum)
    out = net(torch.randn(2, 3, 4, 4))
    out.sum().backward()  # autograd still works on the views
    assert params[0].grad.shape == params[0].shape


def test_flatten_refuses_parameters_it_cannot_view_naming_them():
    dense, other = torch.zeros(2, 3), torch.zeros(4, 6)[:, ::2]  # a strided view is not dense
    with pytest.raises(exchange.ExchangeError, match=r'^parameter 1 \(4, 3\) is not dense$'):
        exchange.flatten([dense, other], [torch.zeros(2, 3), torch.zeros(4, 3)], torch.empty)
    with pytest.raises(exchange.ExchangeError, match=r'needs float32 \(or float64\) parameters on one '
                                                     r'device, got .*torch.float16'):
        exchange.flatten([dense.half()], [dense.half()], torch.empty)


def test_transport_choice():
    cpu, gpu = torch.device('cpu'), torch.device('cuda:0')
    assert exchange.transport_for('auto', [cpu, cpu]) == 'shm'
    assert exchange.transport_for('auto', [gpu, gpu]) == 'ipc'
    assert exchange.transport_for('auto', [gpu, cpu]) == 'tcp'
    assert exchange.transport_for('auto', [gpu, gpu], same_host=False) == 'tcp'
    assert [exchange.transport_for(t, [gpu, gpu]) for t in ('ipc', 'tcp')] == ['ipc', 'tcp']
    assert [exchange.transport_for(t, [cpu, cpu]) for t in ('shm', 'tcp')] == ['shm', 'tcp']
    for choice, devices, same_host, refusal in (
            ('shm', [gpu, gpu], True, 'shm needs two CPU workers'),
            ('ipc', [cpu, cpu], True, 'ipc needs two CUDA workers'),
            ('ipc', [gpu, cpu], True, 'ipc needs two CUDA workers'),
            ('ipc', [gpu, gpu], False, 'ipc needs both workers on one host'),
            ('shm', [cpu, cpu], False, 'shm needs both workers on one host')):
        with pytest.raises(exchange.ExchangeError, match=f'exchange_transport {refusal}'):
            exchange.transport_for(choice, devices, same_host)


def test_headers_reject_anything_else():
    assert link.parse_header(link.header(link.DATA, 7)) == (link.DATA, 7)
    for bad in (b'', b'x' * 16, pickle.dumps({'a': 1}), b'ALXW' + bytes([9]) + b'\0' * 11,
                link.header(link.DATA, 7)[:-1]):
        with pytest.raises(ValueError):
            link.parse_header(bad)


def test_two_hosts_mode_with_curve_keys(tmp_path):
    """--worker 0 / --worker 1 as on two hosts (here both on loopback), CURVE-encrypted tcp."""
    _, halves = dataset(tmp_path)
    r = subprocess.run([sys.executable, SCRIPT, '--make-keys', str(tmp_path / 'keys')],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / 'keys')) == ['worker0.key', 'worker0.key_secret',
                                                     'worker1.key', 'worker1.key_secret']
    values = settings(tmp_path, halves, exchange_host='127.0.0.1', curve_dir=str(tmp_path / 'keys'))
    procs = [subprocess.Popen([sys.executable, SCRIPT, '--worker', str(rank)] + args(values),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
             for rank in (0, 1)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert 'done: epoch 2' in outs[0][0] and 'done:' not in outs[1][0]
    assert os.path.exists(tmp_path / 'w2' / 'model_2.pt')
    r = subprocess.run([sys.executable, SCRIPT, '--worker', '1'] + args(dict(values, curve_dir='')),
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and '--worker needs exchange_host and curve_dir' in r.stderr


def test_ctrl_c_stops_everything(tmp_path):
    _, halves = dataset(tmp_path, n_train=400)
    values = settings(tmp_path, halves, n_epochs=50, para_load=True)
    proc = subprocess.Popen([sys.executable, SCRIPT] + args(values), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, start_new_session=True)
    try:
        folder = launcher_folder(proc)
        started(proc)
        everyone = family(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert 'interrupted' in err
    assert len(everyone) >= 5  # 2 workers + 2 loaders + the folder's keeper (+ the resource tracker)
    for pid in everyone:
        assert gone_within(pid, 10), pid
    assert not os.path.exists(folder)


def test_sigterm_to_the_launcher_stops_everything(tmp_path):
    """SIGTERM to the launcher alone (what a service manager or `kill PID` sends): the launcher
    stops its workers (and so their loader processes) as Ctrl-C does, removes its folder and
    exits 130."""
    _, halves = dataset(tmp_path, n_train=400)
    values = settings(tmp_path, halves, n_epochs=50, para_load=True)
    proc = subprocess.Popen([sys.executable, SCRIPT] + args(values), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        folder = launcher_folder(proc)
        started(proc)
        everyone = family(proc.pid)
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert 'interrupted' in err
    assert len(everyone) >= 5  # 2 workers + 2 loaders + the folder's keeper (+ the resource tracker)
    for pid in everyone:
        assert gone_within(pid, 10), pid
    assert not os.path.exists(folder)


def test_a_killed_launcher_leaves_no_process_and_no_folder(tmp_path):
    """The launcher killed with SIGKILL (none of its code runs): the workers and their loader
    processes stop by themselves, and the folder (the link's socket) is removed by its keeper,
    but only once no worker holds it: worker 1 is stopped (SIGSTOP) before the kill, and the
    folder outlives worker 0 until worker 1, continued, is gone too."""
    _, halves = dataset(tmp_path, n_train=400)
    values = settings(tmp_path, halves, n_epochs=50, para_load=True)
    proc = subprocess.Popen([sys.executable, SCRIPT] + args(values), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    everyone, folder = [], None
    try:
        folder = launcher_folder(proc)
        w0, w1 = started(proc)
        everyone = family(proc.pid)
        os.kill(w1, signal.SIGSTOP)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert gone_within(w0, 10), 'worker 0 outlives its killed launcher'
        time.sleep(1.0)  # time enough for a keeper that does not wait for worker 1 to remove it
        assert os.path.isdir(folder), 'the folder was removed while worker 1 held it'
        os.kill(w1, signal.SIGCONT)
        assert gone_within(w1, 20), 'worker 1 outlives its killed launcher'
        assert removed_within(folder, 8), f'{folder} left behind'
        for pid in everyone:
            assert gone_within(pid, 10), pid
        err = proc.stderr.read()  # every writer (the workers) has ended
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in everyone:  # a failed check leaves nothing running (nor stopped) ...
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if folder:  # ... nor the folder
            shutil.rmtree(folder, ignore_errors=True)
    assert proc.returncode == -signal.SIGKILL
    assert err.count('worker: the launcher is gone; stopping') == 2, err


@pytest.mark.parametrize('transport', ['tcp', 'shm'])
def test_exchange_every_k_steps_and_at_the_end_of_an_epoch(tmp_path, transport):
    """Two real Pair exchangers (in threads), exchange_freq 3: worker r adds r + 1 to its weight
    and momentum after every step. Against a hand computation: they are averaged after steps 3
    and 6 only, and flush() averages the step left over at the end of the epoch (step 7)."""

    def worker(rank):
        pair = exchange.Pair(rank, transport, f'ipc://{tmp_path}/link', freq=3, timeout=20.0,
                             shm_dir=str(tmp_path))
        w, m = torch.nn.Parameter(torch.zeros(4)), [torch.zeros(4)]
        seen = []
        try:
            pair.attach([w], m, torch.device('cpu'))
            for _ in range(7):
                with torch.no_grad():
                    w += rank + 1
                    m[0] += rank + 1
                pair.after_step()
                seen.append((w[0].item(), m[0][0].item()))
            pair.flush()
            seen.append((w[0].item(), m[0][0].item()))
            pair.flush()  # nothing pending: no exchange (a second would wait for a peer that sent none)
            return seen
        finally:
            pair.close()
    results = both_workers(worker)

    def expected(rank):  # by hand: the mean of 1 and 2 is 1.5 per step
        v, out = 0.0, []
        for step in range(1, 8):
            v += rank + 1
            if step % 3 == 0:
                v = 1.5 * step
            out.append((v, v))
        return out + [(1.5 * 7, 1.5 * 7)]
    assert results[0] == expected(0) and results[1] == expected(1)


def test_exchange_data_the_peer_does_not_take_is_named_with_the_timeout_and_the_step():
    """The tcp exchange waits for ZeroMQ to hand each chunk over before the buffer under it is
    written again; a peer that stops taking them (stalled after sending its own) is named, with
    peer_timeout and the step. (Here a send that never completes: a real stall needs more data
    than the sockets buffer.)"""
    import threading
    pair = exchange.Pair(0, 'tcp', 'ipc:///nonexistent', timeout=0.2)
    pair.steps = 7
    with pytest.raises(exchange.PeerError) as e:
        pair._wait_sent(zmq.MessageTracker(threading.Event()))  # never done
    assert str(e.value) == 'worker 1 did not take the exchange data within 0.2 s (peer_timeout) at step 7'


def test_two_workers_resume_two_plus_two_epochs_as_four(tmp_path):
    """Both workers load the snapshot (weights, momentum, lr, the run's random streams): 2
    epochs, then a resume to 4, give the weights of 4 epochs in one go (fp64, 1e-9), random crops
    and mirrors, shuffled, exchange_freq 3 so that the end-of-epoch flush is part of it."""
    _, halves = dataset(tmp_path)
    over = {k: v for k, v in EXACT.items() if k != 'n_epochs'}
    over['exchange_freq'] = 3
    full = run_2gpu(tmp_path, halves, n_epochs=4, weights_dir=str(tmp_path / 'full'), **over)
    assert full.returncode == 0, full.stderr
    part = run_2gpu(tmp_path, halves, n_epochs=2, **over)
    assert part.returncode == 0, part.stderr
    resumed = run_2gpu(tmp_path, halves, n_epochs=4, resume_train=True, load_epoch=2, **over)
    assert resumed.returncode == 0, resumed.stderr
    assert 'resumed from' in resumed.stdout and 'epoch 2 |' not in resumed.stdout
    a = torch.load(tmp_path / 'full' / 'model_4.pt', weights_only=True)
    b = torch.load(tmp_path / 'w2' / 'model_4.pt', weights_only=True)
    for part_ in ('model', 'momentum'):
        for k in a[part_]:
            assert relative_error(b[part_][k], a[part_][k]) < EXACT_TOLERANCE, (part_, k)
    assert [h['val_loss'] for h in b['history']] == pytest.approx(
        [h['val_loss'] for h in a['history']], rel=1e-9)


def test_a_worker_that_fails_tells_the_other_which_names_it(tmp_path):
    """Worker 1 meets a corrupt batch file: it stops with its error and sends BYE; worker 0 stops
    at once naming worker 1 and its reason (not a lost connection, not a timeout)."""
    _, halves = dataset(tmp_path, n_train=6)
    bad = os.path.join(halves['train_folder'], '0003_1.hkl')  # worker 1's half of file 3
    with open(bad, 'wb') as f:
        f.write(b'not an hdf5 file' * 64)
    t0 = time.monotonic()
    r = run_2gpu(tmp_path, halves, shuffle=False, peer_timeout=60.0, timeout=120)
    assert time.monotonic() - t0 < 60.0  # well before peer_timeout
    assert r.returncode == 1, r.stderr
    assert 'worker 1: error: ' in r.stderr and bad in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith('worker 0: error: ')]
    assert len(lines) == 1 and lines[0].startswith(f'worker 0: error: worker 1 stopped ({bad}'), \
        r.stderr
    assert not os.path.exists(tmp_path / 'w2' / 'model_1.pt')


def test_data_gives_each_worker_half_a_batch_and_a_resume_needs_only_weights_dir(tmp_path):
    """data=FOLDER: batch_size is half of data's batch per worker; `weights_dir=W
    resume_train=True` alone resumes the newest snapshot with the run's saved config."""
    make_batches(str(tmp_path / 'd'), n_train=2, n_val=1, batch=8, size=36)
    w = tmp_path / 'w'
    common = [sys.executable, SCRIPT, f'weights_dir={w}', f'sock_gpu={free_port()}']
    r = subprocess.run(common + [f'data={tmp_path / "d"}', 'gpu0=cpu', 'gpu1=cpu', 'n_epochs=1',
                                 'model=alexnet_cifar', 'crop_size=32', 'peer_timeout=30'],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert '2 train / 1 val batches of 8 (2 workers x 4)' in r.stdout
    r = subprocess.run(common + ['resume_train=True', 'n_epochs=2'], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f'resumed from {w / "model_1.pt"} (epoch 1' in r.stdout and 'done: epoch 2' in r.stdout
    r = subprocess.run(common + ['resume_train=True', 'n_epochs=2'], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f'nothing to train: model_2.pt is at epoch 2, n_epochs is 2 ({w} left as it was)' in r.stdout


def test_make_keys_writes_into_a_folder_that_exists(tmp_path, capsys):
    """--make-keys FOLDER: the two key pairs, also into a folder made beforehand (or by an
    earlier --make-keys: new keys replace the old)."""
    import train_2gpu
    for _ in range(2):
        train_2gpu.make_keys(str(tmp_path))
        assert sorted(os.listdir(tmp_path)) == ['worker0.key', 'worker0.key_secret', 'worker1.key',
                                                'worker1.key_secret']
    assert capsys.readouterr().out == f'wrote CURVE keys worker0/worker1 to {tmp_path}\n' * 2


def test_a_keeper_that_gives_no_folder_is_named_with_why(tmp_path, monkeypatch):
    """The launcher's private folder comes from its keeper process: a keeper that cannot make it
    is its own one-line error; one that ends without a word is named with its exit code, one that
    says nothing in time as such (and is ended)."""
    import train_2gpu
    from lib import UserError
    missing = tmp_path / 'missing'
    with pytest.raises(UserError, match=f'^cannot make a private folder in {missing}: '):
        train_2gpu.start_keeper(str(missing))
    for _ in range(5):  # (its exit status is read as soon as its pipe closes)
        monkeypatch.setattr(train_2gpu, 'KEEPER', 'import sys; sys.exit(3)')
        with pytest.raises(UserError, match=r"^the keeper of the launcher's private folder "
                                            r'\(pid \d+\) exited with code 3$'):
            train_2gpu.start_keeper(str(tmp_path))
    monkeypatch.setattr(train_2gpu, 'KEEPER', 'import time; time.sleep(30)')
    monkeypatch.setattr(train_2gpu, 'KEEPER_ANSWER', 0.5)
    with pytest.raises(UserError, match=r"^the keeper of the launcher's private folder "
                                        r'\(pid \d+\) did not answer within 0.5 s$'):
        train_2gpu.start_keeper(str(tmp_path))
    assert os.listdir(tmp_path) == []
