"""benchmarks/train_speed.py: its baseline and its table (tiny sizes: this checks it works, not speed)."""
import os
import subprocess
import sys

import torch

from benchmarks import train_speed
from lib import model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def table_rows(out):
    return [line for line in out.splitlines() if line.startswith('| ') and '---' not in line][1:]


def test_torch_lrn_baseline_swaps_every_lrn_and_keeps_the_values():
    for name, size in (('alexnet', 227), ('alexnet_cifar', 32)):
        ours = model.build(name, 10, 0.0, size, 1).eval()
        base = train_speed.use_torch_lrn(model.build(name, 10, 0.0, size, 1)).eval()
        kinds = {type(m) for m in base.modules()}
        assert torch.nn.LocalResponseNorm in kinds
        assert not kinds & {model.LRN, model.CrossChannelLRN}
        x = torch.randn(2, 3, size, size) * 50
        assert torch.allclose(ours(x), base(x), rtol=1e-4, atol=1e-5)


def test_train_speed_prints_a_row_per_run():
    r = subprocess.run([sys.executable, '-m', 'benchmarks.train_speed', '--models', 'alexnet_cifar',
                        '--batch', '4', '--steps', '1', '--warmup', '0'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = table_rows(r.stdout)
    assert len(rows) == 4  # torch LRN, torch.optim.SGD, ours nchw, ours channels_last
    assert rows[0].endswith('| 1.00x |') and '| torch |' in rows[0]
