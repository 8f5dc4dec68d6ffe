"""Every GPU path, on a CUDA device (marked `cuda`: skipped without one; `python -m benchmarks.gpu`
runs them first on a GPU machine). Each has a CPU twin elsewhere in the suite; here the same
claims are checked where the CUDA code runs: CUDA IPC exchange, page-locked loader slots copied on
a side stream, the on-device data layer, bf16 / fp16, compile, evaluation and serving, NCCL.

Every test that compares numbers is set up so that only a real defect fails it: TF32 is off
(NVIDIA_TF32_OVERRIDE=0 for the scripts, the backend flags here: TF32 rounds inputs to 10 bits),
cuDNN's autotuning is off (cudnn_benchmark=False: it may pick other algorithms in each run), and
"N ways of training give the same weights" runs in float64 (cuDNN may pick other algorithms per
batch size, its weight-gradient reductions are not deterministic, and in float32 one max-pool
near-tie flip is a 2e-3 jump: see tests/test_train_2gpu.py's EXACT). Not cuDNN's deterministic
mode: it may find no algorithm for a float64 grouped convolution, and float64 needs none.

Where the platform refuses what a test needs (CUDA IPC, cudaHostRegister: some sandboxes do), the
test skips with "refused by the platform: <error>" instead of failing: correct code must never
read as a defect. The refusal is the one benchmarks.gpu's preflight found (handed over in
BENCHMARKS_GPU_PREFLIGHT), else the one the same check, or the test's own first call, finds."""
import functools
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from lib import config, data, loader, training
from tests.helpers import make_batches
from tests.test_train import tiny_config
from tests.test_train_2gpu import EXACT, EXACT_TOLERANCE, args, free_port, relative_error

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = {**config.CONFIG, **config.SPEC_1GPU}
ENV = dict(os.environ, NVIDIA_TF32_OVERRIDE='0')


REFUSED = 'refused by the platform: '  # as benchmarks.gpu's preflight words it


@functools.cache
def refusal(check, probe=True):
    """The platform's refusal ('refused by the platform: ...') of benchmarks.gpu's preflight check
    `check` ('check_share': CUDA IPC with a second process; 'check_register': cudaHostRegister of
    a /dev/shm mapping), or None. From the preflight's results where the command ran it; else, with
    probe, from running that check now (a few seconds)."""
    found = json.loads(os.environ.get('BENCHMARKS_GPU_PREFLIGHT') or '{}').get(check) or ''
    if probe and not found.startswith(('ok', 'WRONG', 'failed', REFUSED)):  # not run, or skipped
        from benchmarks import gpu
        found = getattr(gpu, check)(torch, torch.device('cuda:0'))
    return found if found.startswith(REFUSED) else None


def skip_if_refused(check, probe=True):
    found = refusal(check, probe)
    if found:
        pytest.skip(' '.join(found.split()))  # one line: benchmarks.gpu reads pytest's -v line


def script(name, values, cwd, timeout=100):
    r = subprocess.run([sys.executable, os.path.join(ROOT, name)] + args(values), cwd=cwd,
                       capture_output=True, text=True, timeout=timeout, env=ENV)
    assert r.returncode == 0, r.stdout[-2000:] + '\n--- stderr:\n' + r.stderr[-4000:]
    return r


def same_state(a, b, tol):
    for part in ('model', 'momentum'):
        for k in a[part]:
            err = relative_error(b[part][k].double().cpu(), a[part][k].double().cpu())
            assert err < tol, (part, k, err)


@pytest.fixture(scope='module', autouse=True)
def no_tf32():
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def test_two_workers_over_cuda_ipc_on_one_gpu_equal_one_worker(tmp_path):
    skip_if_refused('check_share')
    two_workers_on_gpus_equal_one_worker(tmp_path, 'ipc')


def test_two_workers_over_tcp_on_one_gpu_equal_one_worker(tmp_path):
    """The tcp exchange of GPU workers: through a host buffer (page-locked where the platform
    allows) of the run's dtype, fp64 here."""
    two_workers_on_gpus_equal_one_worker(tmp_path, 'tcp')


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='two workers on two GPUs need 2 GPUs')
def test_two_workers_over_cuda_ipc_on_two_gpus_equal_one_worker(tmp_path):
    """Each worker's half averaged on its own GPU, the peer's half copied across first."""
    skip_if_refused('check_share')
    two_workers_on_gpus_equal_one_worker(tmp_path, 'ipc', gpu1='cuda:1')


def two_workers_on_gpus_equal_one_worker(tmp_path, transport, gpu1='cuda:0'):
    # seed 1: data without max-pool near-ties (see tests/test_torchrun.py)
    batch = 8
    full = make_batches(str(tmp_path / 'data'), n_train=4, n_val=2, batch=batch, size=36, seed=1)
    halves = dict(full, batch_size=batch // 2, **{
        k: full[k].replace(f'_b{batch}_b_{batch}', f'_b{batch}_b_{batch // 2}')
        for k in ('train_folder', 'val_folder')})
    common = dict(EXACT, n_epochs=1, cudnn_benchmark=False)
    script('train.py', dict(full, **common, gpu='cuda:0', weights_dir=str(tmp_path / 'w1')), tmp_path)
    r = script('train_2gpu.py', dict(halves, **common, gpu0='cuda:0', gpu1=gpu1,
                                     exchange_transport=transport, sock_gpu=free_port(),
                                     peer_timeout=60.0, weights_dir=str(tmp_path / 'w2')), tmp_path)
    assert f'exchange over {transport} every 1 step(s)' in r.stdout
    a = torch.load(tmp_path / 'w1' / 'model_1.pt', weights_only=True)
    b = torch.load(tmp_path / 'w2' / 'model_1.pt', weights_only=True)
    same_state(a, b, EXACT_TOLERANCE)


def test_two_workers_over_cuda_ipc_train_alexnet_with_dropout_as_one_worker(tmp_path):
    """The default network, its fc6 / fc7 dropout masks drawn on the GPU for the whole step by
    each worker's CUDA generator (seeded alike), random crops and mirrors, shuffled: two workers
    on rows of whole files = one worker (tests/test_exact.py is the CPU twin)."""
    skip_if_refused('check_share')
    keys = make_batches(str(tmp_path / 'data'), n_train=2, n_val=1, batch=4, size=240)
    common = dict(keys, model='alexnet', crop_size=227, dropout=0.5, rand_crop=True, shuffle=True,
                  precision='fp64', n_epochs=1, print_freq=1, cudnn_benchmark=False)
    script('train.py', dict(common, gpu='cuda:0', weights_dir=str(tmp_path / 'w1')), tmp_path)
    script('train_2gpu.py', dict(common, batch_size=2, gpu0='cuda:0', gpu1='cuda:0',
                                 exchange_transport='ipc', sock_gpu=free_port(), peer_timeout=60.0,
                                 weights_dir=str(tmp_path / 'w2')), tmp_path)
    a = torch.load(tmp_path / 'w1' / 'model_1.pt', weights_only=True)
    b = torch.load(tmp_path / 'w2' / 'model_1.pt', weights_only=True)
    assert b['config']['dropout'] == 0.5
    same_state(a, b, EXACT_TOLERANCE)


def test_loader_slots_are_page_locked_and_give_the_in_process_batches(tmp_path):
    skip_if_refused('check_register')
    keys = make_batches(str(tmp_path), n_train=6, n_val=2, batch=8, size=36)
    sources = [data.BatchFolder(data.batch_files(keys[f'{s}_folder']),
                                os.path.join(keys['label_folder'], f'{s}_labels.npy'), 8)
               for s in ('train', 'val')]
    mean = data.load_mean(keys['mean_file'], 36)
    dev = torch.device('cuda:0')
    proc = loader.LoaderProcess(sources, keys['mean_file'], 32, dev, on_device=True, timeout=60)
    try:
        assert proc.feed.pinned and all(s.is_pinned() for s in proc.slots)  # cudaHostRegister
        # the uint8 batch crosses to the device as it is (a quarter of float32's bytes)
        assert [b.dtype for b in proc.feed.buffers] == [torch.uint8] * len(proc.slots)
        for split in (0, 1, 0):  # train, val, train again: slots and device buffers reused
            plan = data.make_plan(torch.Generator().manual_seed(split), len(sources[split]), 8, 36,
                                  32, train=True, shuffle=True)
            want = [(x.clone(), y.clone()) for x, y in
                    data.InProcessLoader(sources[split], mean, 32, dev, True).epoch(plan)]
            got = []
            for x, y in proc.loader(split).epoch(plan):
                got.append((x.clone(), y.clone()))
                # a busy compute stream: the CPU runs ahead, so a slot handed back to the loader
                # before its copy finished would be overwritten under the copy
                torch.cuda._sleep(20_000_000)
            assert len(got) == len(want)
            for (x1, y1), (x2, y2) in zip(want, got):
                assert x2.device == dev and torch.equal(x1, x2) and torch.equal(y1, y2)
    finally:
        proc.close()
    assert not proc.proc.is_alive() and not os.path.exists(proc.dir)
    assert proc.feed.registered == []  # close() unregistered the slots (cudaHostUnregister)


def test_a_failed_registration_falls_back_to_plain_copies_and_leaves_no_error(capsys):
    skip_if_refused('check_register', probe=False)  # the preflight's finding, if it ran
    slots = [torch.zeros(1 << 20, dtype=torch.uint8) for _ in range(2)]
    cudart = torch.cuda.cudart()
    err = int(cudart.cudaHostRegister(slots[0].data_ptr(), slots[0].numel(), 0))
    if err:  # this test's own first call: the platform refuses to page-lock memory
        loader.clear_last_cuda_error()
        pytest.skip(f'{REFUSED}cudaHostRegister gave cudaError {err}')
    try:  # slot 0 is registered already: SlotFeed's registration fails
        feed = loader.SlotFeed(slots, torch.device('cuda:0'))
        assert 'cudaHostRegister of the loader slots failed' in capsys.readouterr().out
        assert not feed.pinned and not feed.registered
        slots[1].fill_(7)
        x = feed.to_device(1)
        # the next kernels run: the failed call's error was not left for their launch check
        assert int((x.float() + 1).sum()) == 8 * slots[1].numel()
        feed.consumed(1)
        feed.release(1)
        feed.close()
    finally:
        cudart.cudaHostUnregister(slots[0].data_ptr())


def test_crop_mirror_on_cuda_gives_the_bits_of_the_cpu():
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (3, 20, 20, 6), dtype=torch.uint8, generator=gen)
    mean = torch.rand(3, 20, 20, generator=gen) * 255
    for per_batch in (False, True):
        for step in data.make_plan(gen, 3, 6, 20, 15, train=True, batch_crop_mirror=per_batch):
            want = data.crop_mirror(batch, mean, step, 15)
            got = data.crop_mirror(batch.cuda(), mean.cuda(), step, 15)
            assert got.is_cuda and torch.equal(got.cpu(), want)


def test_para_load_and_data_layer_on_cuda_train_as_in_process_loading(tmp_path):
    finals = {}
    for para_load in (False, True):
        root = str(tmp_path / str(para_load))
        training.run(tiny_config(root, n_epochs=2, gpu='cuda:0', para_load=para_load,
                              use_data_layer=True, dropout=0.5, cudnn_benchmark=False,
                              precision='fp64'))
        assert not torch.backends.cudnn.benchmark  # the trainer set the config's value
        finals[para_load] = torch.load(os.path.join(root, 'w', 'model_2.pt'), weights_only=True)
    same_state(finals[False], finals[True], EXACT_TOLERANCE)


# alexnet_cifar on make_batches' 3 learnable classes, 3 epochs of 100 steps of 32 images, cuDNN
# autotuning off (it may pick other algorithms per run: as every comparing test here)
STEPS300 = dict(model='alexnet_cifar', crop_size=32, n_epochs=3, print_freq=50, learning_rate=0.003,
                shuffle=True, lr_step=[], cudnn_benchmark=False)


def steps300_config(data_keys, precision, weights_dir, gpu='cuda:0'):
    return config.merge(SCHEMA, [('test', dict(data_keys, **STEPS300, gpu=gpu, precision=precision,
                                               weights_dir=weights_dir), None)])


@pytest.fixture(scope='module')
def steps300(tmp_path_factory):
    """STEPS300 on cuda:0; fp32, the reference, first."""
    root = tmp_path_factory.mktemp('steps300')
    keys = make_batches(str(root / 'data'), n_train=100, n_val=4, batch=32, size=36)

    def run(precision):
        history = training.run(steps300_config(keys, precision, str(root / precision)))
        return history, torch.load(root / precision / 'model_3.pt', weights_only=True)
    return run, run('fp32')


@pytest.mark.parametrize('precision', ['bf16', 'fp16'])
def test_bf16_and_fp16_train_300_steps_to_finite_losses_close_to_fp32(steps300, precision):
    # calibrated on the CPU (steps300_config with gpu='cpu', torch 2.13, 2 cores): fp32, bf16
    # and fp16 alike, train loss 0.164 in epoch 1 and 0.0000 in epochs 2 and 3, val loss 0.0000
    # and val error 0 in every epoch: the task is learned in the first epoch, so each bound
    # below holds with its whole margin, and only a precision that does not train fails it
    run, (ref, _) = steps300
    got, state = run(precision)
    losses = [h[k] for h in got for k in ('train_loss', 'val_loss')]
    assert all(np.isfinite(losses)), losses
    assert got[-1]['train_loss'] < 0.5 * got[0]['train_loss']                # it learns
    assert abs(got[-1]['val_loss'] - ref[-1]['val_loss']) < 0.05 + 0.2 * ref[-1]['val_loss']
    assert abs(got[-1]['val_error'] - ref[-1]['val_error']) <= 2 / 128 + 1e-9  # 4 x 32 val images
    assert all(v.dtype == torch.float32 for v in state['model'].values())   # fp32 master weights
    assert ('loss_scale' in state) == (precision == 'fp16')
    if precision == 'fp16':
        assert torch.isfinite(state['loss_scale']) and state['loss_scale'] >= 1


@pytest.fixture(scope='module')
def eager(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('eager'))
    cfg = tiny_config(root, n_epochs=2, gpu='cuda:0', learning_rate=0.003, cudnn_benchmark=False)
    return root, cfg, training.run(cfg)


def test_compile_gives_the_val_record_of_eager(eager, tmp_path):
    root, _, _ = eager
    training.run(tiny_config(str(tmp_path), n_epochs=2, gpu='cuda:0', learning_rate=0.003,
                          compile=True, cudnn_benchmark=False))
    a = np.load(os.path.join(root, 'w', 'val_record.npy'))
    b = np.load(tmp_path / 'w' / 'val_record.npy')
    assert b.shape == a.shape == (2, 2)
    assert np.abs(b[:, 0] - a[:, 0]).max() <= 1 / 16 + 1e-9   # at most one of 16 val images
    np.testing.assert_allclose(b[:, 1], a[:, 1], rtol=2e-2)   # fused kernels round differently


def test_validate_performance_on_cuda_reproduces_the_val_record(eager):
    root, cfg, _ = eager
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'validate_performance.py')] + [
        f'{k}={cfg[k]}' for k in ('val_folder', 'label_folder', 'mean_file', 'batch_size',
                                  'weights_dir')] + ['gpu=cuda:0', 'load_epoch=2'],
                       capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0, r.stderr
    top1 = float(r.stdout.split('top-1 error ')[1].split()[0])
    loss = float(r.stdout.split('loss ')[1].split()[0])
    record = np.load(os.path.join(root, 'w', 'val_record.npy'))
    # the same weights, images and (heuristic, no TF32) algorithms: the loss to float rounding;
    # top-1 to one image of 16, a logit near-tie being the one thing rounding could still flip
    assert loss == pytest.approx(record[1, 1], rel=1e-4, abs=1e-6)
    assert abs(top1 - record[1, 0]) <= 1 / 16 + 1e-9


def png(size=36, seed=0):
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8)
                    ).save(buf, 'PNG')
    return buf.getvalue()


def test_serve_on_cuda_answers_an_upload_with_its_top5(eager, tmp_path):
    root, _, _ = eager
    port = free_port()
    with open(tmp_path / 'out', 'w') as out, open(tmp_path / 'err', 'w') as err:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'serve.py'),
                                 os.path.join(root, 'w', 'model_2.pt'), '--device', 'cuda:0',
                                 '--port', str(port)], stdout=out, stderr=err, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while True:  # up when the port answers
            assert proc.poll() is None, (tmp_path / 'err').read_text()
            assert time.monotonic() < deadline, 'serve.py did not listen within 120 s'
            try:
                socket.create_connection(('127.0.0.1', port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        boundary = 'gpuboundary0123456789'
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
                f'filename="x.png"\r\nContent-Type: image/png\r\n\r\n').encode() + png() + \
            f'\r\n--{boundary}--\r\n'.encode()
        c = http.client.HTTPConnection('127.0.0.1', port, timeout=60)
        c.request('POST', '/api', body=body,
                  headers={'Content-Type': f'multipart/form-data; boundary={boundary}'})
        r = c.getresponse()
        answer = json.loads(r.read())
        c.close()
        assert r.status == 200, answer
        assert isinstance(answer['top5'], list) and 1 <= len(answer['top5']) <= 5, answer
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='torchrun with NCCL needs 2 GPUs')
def test_torchrun_nccl_two_ranks_equal_one_worker(tmp_path):
    keys = make_batches(str(tmp_path / 'data'), n_train=4, n_val=2, batch=8, size=36, seed=1)
    common = dict(EXACT, cudnn_benchmark=False)
    script('train.py', dict(keys, **common, gpu='cuda:0', weights_dir=str(tmp_path / 'w1')), tmp_path)
    values = dict(keys, **common, gpu='auto', weights_dir=str(tmp_path / 'w2'))
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc-per-node=2',
                        '--rdzv-backend=c10d', f'--rdzv-endpoint=127.0.0.1:{free_port()}',
                        os.path.join(ROOT, 'train.py')] + args(values),
                       capture_output=True, text=True, timeout=100, cwd=tmp_path,
                       env=dict(ENV, TMPDIR=str(tmp_path)))  # torchrun's torchelastic_* folder
    assert r.returncode == 0, r.stderr[-4000:]
    assert 'device cuda:0' in r.stdout and '(2 workers x 4)' in r.stdout
    a = torch.load(tmp_path / 'w1' / 'model_2.pt', weights_only=True)
    b = torch.load(tmp_path / 'w2' / 'model_2.pt', weights_only=True)
    same_state(a, b, EXACT_TOLERANCE)
