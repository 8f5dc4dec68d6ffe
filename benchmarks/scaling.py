"""What throughput and exchange cost per step does each multi-worker path give at one total batch?
Latest answer: docs/benchmarks.md#every-multi-worker-path

    .venv/bin/python -m benchmarks.scaling                       # CPU: 1, 2, 4 ranks
    .venv/bin/python -m benchmarks.scaling --gpu cuda --ranks 1 2 --model alexnet --batch 256

alexnet_cifar (or --model) on synthetic batches, the same total batch per step in every row:
train.py alone (the baseline, measured in the same run), train.py under torchrun with N ranks in
both exchange modes (gloo on CPU, NCCL on GPU), and train_2gpu.py's ZeroMQ exchanger at 2
workers. One torch thread per worker on CPU. Figures of the second epoch (the first warms up):
img/s, and the exchange ms per step that the trainer measures around exchanger.after_step() (for
`gradients` the all-reduce runs inside backward, overlapped, so it shows as ~0 there). Median of
--trials, runs interleaved.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile

import torch

from benchmarks.common import free_port, header, iter_lines, train_log
from lib import command


def runs(args, work):
    B = args.batch
    common = [f'model={args.model}', f'crop_size={227 if args.model == "alexnet" else 32}',
              'synthetic=True', 'n_epochs=2', f'synthetic_batches={args.batches}',
              f'print_freq={args.batches}', 'snapshot_freq=1000', 'lr_step=[]', 'num_classes=10',
              'overwrite=True']  # every trial into the same throwaway weights_dir
    gpu = 'cpu' if args.gpu == 'cpu' else 'cuda:0'
    py = sys.executable
    out = [('train.py, 1 worker', '-', lambda: [py, 'train.py', f'gpu={gpu}', f'batch_size={B}',
                                                f'weights_dir={work}/one'] + common)]
    for n in args.ranks:
        if n == 1:
            continue
        for mode in ('average', 'gradients'):
            out.append((f'torchrun, {n} ranks', mode, lambda n=n, mode=mode: [
                py, '-m', 'torch.distributed.run', f'--nproc-per-node={n}', '--rdzv-backend=c10d',
                f'--rdzv-endpoint=127.0.0.1:{free_port()}', 'train.py', f'gpu={gpu}',
                f'batch_size={B}', f'exchange={mode}', f'weights_dir={work}/tr{n}{mode}'] + common))
    g1 = 'cpu' if args.gpu == 'cpu' else ('cuda:1' if torch.cuda.device_count() > 1 else 'cuda:0')
    out.append(('train_2gpu.py, 2 workers', 'ZeroMQ + shm' if gpu == 'cpu' else 'ZeroMQ + ipc',
                lambda: [py, 'train_2gpu.py', f'gpu0={gpu}', f'gpu1={g1}', f'batch_size={B // 2}',
                         f'weights_dir={work}/two'] + common))
    return out


def measure(cmd, env):
    img_s, _, _, exch = iter_lines(train_log(cmd, 3600, env), 2)[-1]
    return img_s, exch or 0.0


@command
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--gpu', default='cpu', choices=['cpu', 'cuda'])
    p.add_argument('--ranks', type=int, nargs='+', default=[1, 2, 4])
    p.add_argument('--model', default='alexnet_cifar', choices=['alexnet_cifar', 'alexnet'])
    p.add_argument('--batch', type=int, default=256, help='total images per step')
    p.add_argument('--batches', type=int, default=20, help='synthetic batches per epoch')
    p.add_argument('--trials', type=int, default=2)
    args = p.parse_args(argv)
    env = dict(os.environ, OMP_NUM_THREADS='1')
    work = tempfile.mkdtemp(prefix='bench-scaling-')
    table = runs(args, work)
    results = {i: [] for i in range(len(table))}
    try:
        for _ in range(args.trials):
            for i, (_, _, cmd) in enumerate(table):
                results[i].append(measure(cmd(), env))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(header(torch.cuda.get_device_name() if args.gpu == 'cuda' else
                 'CPU only (1 torch thread per worker)', 'scaling',
                 argv if argv is not None else sys.argv[1:]) + '\n')
    print(f'{args.model}, {args.batch} images per step in all, synthetic batches, median of {args.trials}\n')
    print('| run | exchange | img/s | × train.py alone | exchange ms per step |')
    print('|---|---|---:|---:|---:|')
    base = statistics.median(r[0] for r in results[0])
    for i, (name, mode, _) in enumerate(table):
        img_s = statistics.median(r[0] for r in results[i])
        exch = statistics.median(r[1] for r in results[i])
        print(f'| {name} | {mode} | {img_s:.0f} | {img_s / base:.2f} | '
              f'{"-" if mode == "-" else f"{exch:.1f}"} |')


if __name__ == '__main__':
    sys.exit(main())
