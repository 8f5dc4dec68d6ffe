"""How fast does one device train when no data loading holds it back (the ceiling)?
Latest answer: docs/benchmarks.md#one-training-step

Training speed of one device on synthetic in-memory input.

    .venv/bin/python -m benchmarks.train_speed                       # both models, cpu
    .venv/bin/python -m benchmarks.train_speed --models alexnet --batch 64 --steps 5
    .venv/bin/python -m benchmarks.train_speed --precision fp32 bf16 --device cuda:0

Prints a markdown table: ms per forward / backward / update and img/s of a whole step, median over
--steps timed steps after --warmup, for each model, precision (autocast, as train.py's
`precision`) and memory layout (--layouts: nchw, and channels_last as train.py's
`channels_last: True`). Two baseline rows per model, measured in the same run: fp32 NCHW with
torch's own nn.LocalResponseNorm in place of our LRN (model.local_response_norm), and fp32 NCHW
with torch.optim.SGD(momentum, foreach) in place of our MomentumSGD; `vs torch LRN` is each row's
img/s over the first baseline's. Synthetic input: the ceiling that a real run (train.py's img/s
and data wait) can be compared with.
"""
import argparse
import statistics
import sys

import torch

from benchmarks.common import header, step_marks
from lib import command, model, optim, trainer
from lib.step import Step

SIZES = {'alexnet': 227, 'alexnet_cifar': 32}


def use_torch_lrn(net):
    """Swap our LRN modules for torch's nn.LocalResponseNorm with the same values (the baseline)."""
    for parent in net.modules():
        for name, m in parent.named_children():
            if isinstance(m, model.CrossChannelLRN):  # pylearn2: alpha not divided by n
                setattr(parent, name, torch.nn.LocalResponseNorm(m.n, m.alpha * m.n, m.beta, m.k))
            elif isinstance(m, model.LRN):
                setattr(parent, name, torch.nn.LocalResponseNorm(m.size, m.alpha, m.beta, m.k))
    return net


def time_steps(net, opt, x, y, steps, warmup, device, precision='fp32', memory_format=None):
    """Median ms of forward, backward, update, and of the whole step, over back-to-back steps."""
    step = Step(net, opt, precision, device, memory_format=memory_format or torch.preserve_format)
    clock, marks, _ = step_marks(torch, step, x, y, steps, warmup, device)
    return [statistics.median(clock.ms(m[a], m[b]) for m in marks)
            for a, b in ((0, 1), (1, 2), (2, 3), (0, 3))]


@command
def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--models', nargs='+', default=['alexnet_cifar', 'alexnet'], choices=list(SIZES))
    p.add_argument('--batch', type=int, default=None, help='default: 128 (cifar), 32 (alexnet)')
    p.add_argument('--device', default='auto')
    p.add_argument('--steps', type=int, default=10)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--precision', nargs='+', default=['fp32'], choices=['fp32', 'bf16', 'fp16'])
    p.add_argument('--layouts', nargs='+', default=['nchw', 'channels_last'],
                   choices=['nchw', 'channels_last'])
    args = p.parse_args()
    device = trainer.resolve_device(args.device, '--device')
    print(header(f'device {device}' + (f' ({torch.cuda.get_device_name(device)})'
                                        if device.type == 'cuda' else ''),
                 threads=torch.get_num_threads()) + '\n')
    print('| model | batch | precision | layout | LRN | optimiser | forward ms | backward ms | '
          'update ms | step ms | img/s | vs torch LRN |')
    print('|---|---|---|---|---|---|---|---|---|---|---|---|')
    for name in args.models:
        size = SIZES[name]
        batch = args.batch or (128 if name == 'alexnet_cifar' else 32)
        x = torch.randn(batch, 3, size, size, device=device) * 50
        y = torch.randint(0, 1000 if name == 'alexnet' else 10, (batch,), device=device)
        runs = [('fp32', 'nchw', 'torch', 'ours (MomentumSGD)'),
                ('fp32', 'nchw', 'ours', 'baseline torch.optim.SGD')]
        runs += [(p, layout, 'ours', 'ours (MomentumSGD)')
                 for p in args.precision for layout in args.layouts]
        base = None
        for precision, layout, lrn, label in runs:
            net = model.build(name, 1000 if name == 'alexnet' else 10, 0.5, size, 1)
            if lrn == 'torch':
                use_torch_lrn(net)
            fmt = torch.channels_last if layout == 'channels_last' else torch.contiguous_format
            net = net.to(device, memory_format=fmt)
            if label.startswith('ours'):
                opt = optim.MomentumSGD(net.named_parameters(), 0.01)
            else:
                opt = torch.optim.SGD(net.parameters(), 0.01, momentum=0.9, weight_decay=5e-4,
                                      foreach=True)
            fwd, bwd, upd, step = time_steps(net, opt, x.contiguous(memory_format=fmt), y,
                                             args.steps, args.warmup, device, precision, fmt)
            base = base or step
            print(f'| {name} | {batch} | {precision} | {layout} | {lrn} | {label} | {fwd:.1f} | '
                  f'{bwd:.1f} | {upd:.2f} | {step:.1f} | {1000 * batch / step:.0f} | '
                  f'{base / step:.2f}x |', flush=True)


if __name__ == '__main__':
    sys.exit(main())
