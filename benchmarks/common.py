"""What the benchmark scripts share: a free port, a CUDA/CPU clock, the marks of training steps,
synthetic batch files, running train.py and reading its log, and the machine header of a table.

Standard library only at import: benchmarks/gpu.py imports this module before it has checked that
torch and the other requirements import (torch is passed in, or imported where it is used).
"""
import os
import platform
import re
import socket
import subprocess
import time

from lib import ROOT


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Clock:
    """CUDA events on a GPU (no host sync between the marks), perf_counter on the CPU."""

    def __init__(self, torch, device):
        self.torch, self.cuda = torch, device.type == 'cuda'

    def mark(self):
        if self.cuda:
            e = self.torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, a, b):
        return a.elapsed_time(b) if self.cuda else 1000 * (b - a)

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()


def step_marks(torch, step, x, y, steps, warmup, device):
    """(clock, marks, last loss) of `steps` back-to-back training steps after `warmup`: the
    trainer's own step (lib.step.Step: forward in its precision, cross-entropy, backward, the
    optimiser's update). Marks: (start, forward done, backward done, update done)."""
    clock, marks = Clock(torch, device), []
    for i in range(warmup + steps):
        if i == warmup:
            clock.sync()
        m = [clock.mark()]
        _, loss = step(x, y, mark=lambda m=m: m.append(clock.mark()))
        if i >= warmup:
            marks.append(tuple(m))
    clock.sync()
    return clock, marks, loss


def header(device, module=None, argv=(), threads=None):
    """The lines that head a table: machine, cores (or torch threads), device, versions, and the
    command `python -m benchmarks.<module> <argv>` when module is given."""
    import torch
    cores = f'{threads} threads' if threads else f'{os.cpu_count()} cores'
    text = (f'machine: {platform.machine()}, {cores}, {device}; torch {torch.__version__}, '
            f'python {platform.python_version()}')
    if module:
        text += f'\ncommand: python -m benchmarks.{module} {" ".join(argv)}'.rstrip()
    return text


def write_batches(folder, n_files, batch, size, seed=0):
    """n_files synthetic NNNN.hkl batch files (uint8 (3, S, S, B), as preprocessing writes them),
    their labels and a mean image. Returns (labels file, mean file)."""
    import h5py
    import hickle
    import numpy as np
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n_files):
        with h5py.File(os.path.join(folder, f'{i:04d}.hkl'), 'w') as f:
            hickle.dump(rng.integers(0, 256, (3, size, size, batch), dtype=np.uint8), f)
    labels, mean = os.path.join(folder, 'labels.npy'), os.path.join(folder, 'mean.npy')
    np.save(labels, rng.integers(0, 1000, n_files * batch))
    np.save(mean, np.full((3, size, size), 127.5, np.float32))
    return labels, mean


def train_log(cmd, timeout, env=None):
    """stdout of cmd (train.py, train_2gpu.py or torchrun), run in the repository root; if it
    fails, a RuntimeError naming the script and the last line it wrote."""
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode != 0:
        name = next((os.path.basename(c) for c in cmd if c.endswith('.py')), cmd[0])
        last = (r.stderr.strip() or r.stdout.strip() or '?').splitlines()[-1][:300]
        raise RuntimeError(f'{name} exited {r.returncode}: {last}')
    return r.stdout


def epoch_img_s(log, epoch):
    """img/s of the last `epoch N | ...` line of a training log (the whole epoch)."""
    return float(re.findall(rf'^epoch {epoch} \|.* ([\d.]+) img/s$', log, re.M)[-1])


def iter_lines(log, epoch):
    """[(img/s, data wait ms, copy wait ms, exchange ms or None)] of the `epoch N iter` lines."""
    found = re.findall(rf'^epoch {epoch} iter \d+/\d+ .*\| ([\d.]+) img/s \| data wait ([\d.]+) ms'
                       r' \| copy wait ([\d.]+) ms(?: \| exchange ([\d.]+) ms)?', log, re.M)
    return [(float(a), float(w), float(c), float(x) if x else None) for a, w, c, x in found]
