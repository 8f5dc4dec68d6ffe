"""What does it cost a worker to draw the random numbers of the whole step (all workers' images)?
Latest answer: docs/benchmarks.md#the-draws-of-a-step

Each of N workers draws the crops, mirrors and fc6/fc7 dropout masks of the step's N x b images
and keeps its b rows (lib/data.make_plan rows=, lib/model.share_dropout), so that N workers train
the model one worker trains. The baseline, measured in the same run, is the same worker drawing
for its own b images only (as one worker does, and as every worker did before).

    .venv/bin/python -m benchmarks.shared_draws                  # alexnet, b=32, N = 2 4 8, cpu
    .venv/bin/python -m benchmarks.shared_draws --batch 128 --workers 2 8 --device cuda:0

Prints a markdown table: median ms of a training step (forward, backward, update; fp32 NCHW, the
default alexnet with dropout 0.5; rounds of baseline and shared steps interleaved) and the shared
step's time over the baseline's; then, measured alone, the two dropout layers' mask draws and the
drawing of an epoch's plan of 100 steps.
"""
import argparse
import statistics
import sys
import time

import torch

from benchmarks.common import header, step_marks
from lib import command, data, model, optim, trainer
from lib.step import Step


def masks_ms(net, x, repeat=20):
    """Median ms of the dropout layers' mask draws alone: one forward of each Dropout layer on
    its input (b x 4096), as share_dropout left it."""
    layers = [m for m in net.modules() if isinstance(m, model.Dropout)]
    times = []
    with torch.no_grad():
        for _ in range(repeat):
            t = time.perf_counter()
            for layer in layers:
                layer(x)
            if x.device.type == 'cuda':
                torch.cuda.synchronize()
            times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def plan_ms(batch, rows, repeat=5):
    """Median ms of drawing the plan of 100 training steps (random crops and mirrors)."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        data.make_plan(torch.Generator().manual_seed(0), 100, batch, 256, 227, train=True,
                       rows=rows)
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


@command
def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--batch', type=int, default=32, help="one worker's images per step (b)")
    p.add_argument('--workers', type=int, nargs='+', default=[2, 4, 8])
    p.add_argument('--device', default='auto')
    p.add_argument('--rounds', type=int, default=5, help='rounds of (baseline, shared) steps')
    p.add_argument('--steps', type=int, default=3, help='timed steps per round and setting')
    args = p.parse_args()
    device = trainer.resolve_device(args.device, '--device')
    print(header(f'device {device}', 'shared_draws',
                 [f'--batch {args.batch}', f"--workers {' '.join(map(str, args.workers))}"],
                 threads=torch.get_num_threads()) + '\n')
    b = args.batch
    net = model.build('alexnet', 1000, 0.5, 227, 1).to(device)
    opt = optim.MomentumSGD(net.named_parameters(), 0.01)
    x = torch.randn(b, 3, 227, 227, device=device) * 50
    y = torch.randint(0, 1000, (b,), device=device)
    train_step = Step(net, opt, 'fp32', device)

    def step_ms(n):
        """ms of this worker's steps as the last of n workers (n 1: drawing its own images only)."""
        model.share_dropout(net, (n - 1) * b, n * b if n > 1 else None)
        clock, marks, _ = step_marks(torch, train_step, x, y, args.steps, 1, device)
        return [clock.ms(m[0], m[3]) for m in marks]

    settings = [1] + args.workers
    times = {n: [] for n in settings}
    for _ in range(args.rounds):  # interleaved, so that a slow spell hits every setting
        for n in settings:
            times[n] += step_ms(n)
    base = statistics.median(times[1])
    fc = torch.randn(b, 4096, device=device)
    print('| workers N | draws for | step ms | vs own draws | fc6 + fc7 masks ms | plan of 100 steps ms |')
    print('|---|---|---|---|---|---|')
    for n in settings:
        step = statistics.median(times[n])
        what = f'its own {b} images' if n == 1 else f'the step: {n} x {b} images'
        model.share_dropout(net, (n - 1) * b, n * b if n > 1 else None)
        net.train()
        masks = masks_ms(net, fc)
        plan = plan_ms(n * b, None if n == 1 else ((n - 1) * b, n * b))
        print(f'| {n} | {what} | {step:.1f} | {step / base:.3f}x | {masks:.2f} | {plan:.2f} |',
              flush=True)


if __name__ == '__main__':
    sys.exit(main())
