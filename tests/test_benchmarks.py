"""The benchmark scripts run and print their tables (tiny sizes: this checks they work, not speed)."""
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

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


def test_loader_benchmark_on_re_encoded_sources(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (('train', 6), ('val', 2)):
        for c in ('a', 'b'):
            os.makedirs(tmp_path / 'tree' / split / c)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                    tmp_path / 'tree' / split / c / f'{i}.jpg')
    r = subprocess.run([sys.executable, '-m', 'benchmarks.loader', '--jpeg-root', str(tmp_path / 'tree'),
                        '--limit', '6', '--img-size', '16', '--batch-size', '4', '--source-size',
                        '40x30', '--max-procs', '1', '--images', '8', '--repeats', '1',
                        '--work-dir', str(tmp_path / 'work')],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert 'source JPEG 40x30 px' in r.stdout
    assert 'max |diff| = 0' in r.stdout  # both pipelines read the same (re-encoded) images
    assert [row.split('|')[1].strip() for row in table_rows(r.stdout)] == ['hkl', 'jpeg']
    with Image.open(next((tmp_path / 'work' / 'src' / 'train' / 'a').iterdir())) as im:
        assert im.size == (40, 30)


def test_loader_benchmark_rejects_a_bad_source_size():
    r = subprocess.run([sys.executable, '-m', 'benchmarks.loader', '--jpeg-root', '.', '--source-size',
                        '400'], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "'400' is not WxH" in r.stderr


def test_prep_memory_benchmark_runs_both_ways_to_the_same_mean():
    r = subprocess.run([sys.executable, '-m', 'benchmarks.prep_memory', '--batches', '2', '6',
                        '--img-size', '16', '--batch-size', '2'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [[c.strip() for c in row.split('|')[1:-1]] for row in table_rows(r.stdout)]
    assert [(row[0].split()[0], row[1]) for row in rows] == [('list', '2'), ('running', '2'),
                                                            ('list', '6'), ('running', '6')]
    assert [row[5] for row in rows] == ['2', '0', '6', '0']  # batches read back by a rerun
    assert 'img_mean.npy identical bytes for both ways: True' in r.stdout


def test_row_read_benchmark_reads_the_same_rows_every_way():
    r = subprocess.run([sys.executable, '-m', 'benchmarks.row_read', '--files', '2', '--repeats', '1',
                        '--size', '8', '--batch', '8', '--ranks', '2', '4'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr  # (it stops with an error if a way reads other bytes)
    assert 'contiguous and uncompressed: True' in r.stdout
    rows = [[c.strip() for c in row.split('|')[1:-1]] for row in table_rows(r.stdout)]
    assert [row[:3] for row in rows] == [[cache, n, way] for cache in ('warm', 'cold')
                                         for n in ('2', '4') for way in ('whole', 'h5py', 'rows', 'part')]
    assert all(row[5] == '1.00' for row in rows if row[2] == 'whole')
