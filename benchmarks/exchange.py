"""What does the 2-worker weight exchange cost, and what do two workers gain over one?
Latest answer: docs/benchmarks.md#the-2-worker-exchange

    .venv/bin/python -m benchmarks.exchange                     # both parts, CPU
    .venv/bin/python -m benchmarks.exchange --part exchange --repeats 10
    .venv/bin/python -m benchmarks.exchange --part training --batches 30

Part 1 (exchange): two processes hold AlexNet's flat [params | momentum] buffer (60,965,224
parameters + as many momentum values, float32 = 488 MB each) and average it with lib/exchange.Pair
over each transport that fits the device (shm and tcp on CPU; ipc and tcp on CUDA, both processes
on the same GPU). The floor, measured in the same run: one plain copy of the same 488 MB in one
process (dst.copy_(src)). Median ms per exchange over --repeats, after one warm-up exchange.

Part 2 (training): alexnet_cifar on synthetic batches, the same total batch per step, as
`train.py` (1 worker, batch B) and `train_2gpu.py` (2 workers, B/2 each), each with 1 torch
thread per worker; img/s of the second epoch (the first warms up), median of --trials.
Prints markdown tables with the machine and versions.
"""
import argparse
import multiprocessing
import os
import queue
import shutil
import statistics
import sys
import tempfile
import time

import torch

from benchmarks.common import Clock, epoch_img_s, header, train_log
from lib import SHM, command, exchange, model, trainer


def sync(device):
    Clock(torch, device).sync()


NETS = {'alexnet': (1000, 227), 'alexnet_cifar': (10, 32)}  # classes, crop


def exchange_worker(rank, transport, device, endpoint, shm_dir, repeats, out, net='alexnet',
                    curve_dir=''):
    """One of the two Pair workers; puts (rank, median ms, bytes of its buffer) into `out`.
    endpoint / curve_dir: the link and the CURVE keys (two hosts: benchmarks.links)."""
    torch.set_num_threads(1)
    device = torch.device(device)
    net = model.build(net, NETS[net][0], 0.5, NETS[net][1], seed=23455).to(device)
    params = list(net.parameters())
    momentum = [torch.zeros_like(p) for p in params]
    pair = exchange.Pair(rank, transport, endpoint, timeout=600.0, curve_dir=curve_dir,
                         shm_dir=shm_dir)
    try:
        pair.attach(params, momentum, device)  # includes one (warm-up) exchange
        times = []
        for _ in range(repeats):
            params[0].data.add_(1.0)  # something to average
            sync(device)
            t0 = time.perf_counter()
            pair.exchange()
            times.append(time.perf_counter() - t0)
        pair.average(torch.zeros(1))  # a barrier: the peer has all of the last exchange
        out.put((rank, 1000 * statistics.median(times), pair.flat.numel() * 4))
    finally:
        pair.close()


def time_exchange(transport, device, repeats, net='alexnet', timeout=600.0):
    """(ms per exchange: the slower worker's median, bytes per worker) of two processes averaging
    `net`'s [params | momentum] with lib/exchange.Pair over `transport`, within `timeout` s."""
    shm_dir = tempfile.mkdtemp(prefix='bench-exchange-', dir=SHM)
    ctx = multiprocessing.get_context('spawn')
    out = ctx.Queue()
    procs = [ctx.Process(target=exchange_worker,
                         args=(r, transport, device, f'ipc://{shm_dir}/link', shm_dir, repeats, out, net))
             for r in (0, 1)]
    try:
        for p in procs:
            p.start()
        results, deadline = [], time.monotonic() + timeout
        while len(results) < len(procs):  # a worker that dies is an error now, not in 600 s
            try:
                results.append(out.get(timeout=2))
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f'exchange worker failed (exit codes '
                                       f'{[p.exitcode for p in procs]}) or gave no result in '
                                       f'{timeout:.0f} s') from None
        for p in procs:
            p.join(60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        shutil.rmtree(shm_dir, ignore_errors=True)
    return max(ms for _, ms, _ in results), results[0][2]


def time_copy(nbytes, device, repeats):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each exchange worker (benchmarks.gpu goes on in this process)
    try:
        src = torch.ones(nbytes // 4, device=device)
        dst = torch.empty_like(src)
        times = []
        for _ in range(repeats + 1):
            sync(device)
            t0 = time.perf_counter()
            dst.copy_(src)
            sync(device)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return 1000 * statistics.median(times[1:])


def part_exchange(args):
    device = trainer.resolve_device(args.device, '--device')
    transports = ['ipc', 'tcp'] if device.type == 'cuda' else ['shm', 'tcp']
    rows = []
    for t in transports:
        ms, nbytes = time_exchange(t, args.device, args.repeats)
        rows.append((t, ms, nbytes))
    floor = time_copy(rows[0][2], device, args.repeats)
    print(f'\n### Exchange of AlexNet [params | momentum], {rows[0][2] / 1e6:.0f} MB per worker, '
          f'{args.device}\n')
    print('| transport | ms per exchange (median) | x plain copy |')
    print('|---|---:|---:|')
    print(f'| plain copy of the same bytes, 1 process (floor) | {floor:.1f} | 1.00 |')
    for t, ms, _ in rows:
        print(f'| {t} (2 processes, each averages half) | {ms:.1f} | {ms / floor:.2f} |')


def train_img_s(cmd, env):
    return epoch_img_s(train_log(cmd, 1800, env), 2)


def part_training(args):
    work = tempfile.mkdtemp(prefix='bench-2worker-')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    common = ['model=alexnet_cifar', 'crop_size=32', 'synthetic=True', 'n_epochs=2',
              f'synthetic_batches={args.batches}', 'print_freq=1000', 'snapshot_freq=1000',
              'lr_step=[]', 'num_classes=10', 'overwrite=True']  # every trial into one weights_dir
    one = [sys.executable, 'train.py', 'gpu=cpu', f'batch_size={args.batch}',
           f'weights_dir={work}/one'] + common
    two = [sys.executable, 'train_2gpu.py', 'gpu0=cpu', 'gpu1=cpu', f'batch_size={args.batch // 2}',
           f'weights_dir={work}/two'] + common
    res = {'one': [], 'two': []}
    try:
        for _ in range(args.trials):  # interleaved, so a load change hits both
            res['one'].append(train_img_s(one, env))
            res['two'].append(train_img_s(two, env))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    a, b = statistics.median(res['one']), statistics.median(res['two'])
    print(f'\n### alexnet_cifar training, CPU, {args.batch} images per step in all, 1 torch thread '
          f'per worker, synthetic batches (median of {args.trials})\n')
    print('| run | img/s | x one worker |')
    print('|---|---:|---:|')
    print(f'| train.py, 1 worker x batch {args.batch} | {a:.0f} | 1.00 |')
    print(f'| train_2gpu.py, 2 workers x batch {args.batch // 2}, shm, exchange every step | '
          f'{b:.0f} | {b / a:.2f} |')


@command
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--part', choices=['exchange', 'training', 'both'], default='both')
    p.add_argument('--device', default='cuda:0' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--repeats', type=int, default=7)
    p.add_argument('--batch', type=int, default=256, help='total images per step (training)')
    p.add_argument('--batches', type=int, default=20, help='synthetic batches per epoch (training)')
    p.add_argument('--trials', type=int, default=3)
    args = p.parse_args(argv)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'
    print(header(device, 'exchange', argv if argv is not None else sys.argv[1:]))
    if args.part in ('exchange', 'both'):
        part_exchange(args)
    if args.part in ('training', 'both'):
        part_training(args)


if __name__ == '__main__':
    sys.exit(main())
