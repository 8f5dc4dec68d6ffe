"""benchmarks/gpu.py, the one GPU command: its import check, and every part of it with tiny
sizes on the CPU (--cpu-smoke: the CUDA tests skip, the tables fill). Speed is not checked here."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from benchmarks import gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_check_names_what_is_missing_and_how_to_bring_it(tmp_path):
    req = tmp_path / 'req.txt'
    req.write_text('-r other.txt\npyzmq==27.3.0  # the link\nno-such-module-xyz==1.0\nPyYAML==6.0.3\n')
    assert [m for _, _, m in gpu.requirements([str(req)])] == ['zmq', 'no_such_module_xyz', 'yaml']
    line = gpu.import_problem([str(req)])
    assert line.startswith('error: missing Python modules: no_such_module_xyz '
                           '(no-such-module-xyz==1.0). Bring them:')
    assert 'zmq' not in line.split('Bring')[0] and '\n' not in line
    assert '.whl/' in line and 'pip install -q --no-index --no-deps' in line
    assert gpu.import_problem() is None  # this environment has what the command needs


# What the lent GPU machine's python3 has (the device tool's KINDS.md, 2026-11), by import name,
# among what requirements*.txt pins: pyzmq and hickle travel as wheels (../shared/device-wheels).
DEVICE_HAS = {'torch', 'numpy', 'h5py', 'yaml', 'PIL', 'tqdm', 'scipy', 'sklearn', 'matplotlib',
              'werkzeug', 'pytest'}
CARRIED = {'zmq', 'hickle'}


def test_the_command_needs_only_what_the_device_has_plus_the_two_carried_wheels():
    # playwright (the browser test's) was pinned after this command was written: the import check
    # then refused to run on the device; the modules it checks are the ones the command imports
    assert {m for _, _, m in gpu.needed()} <= DEVICE_HAS | CARRIED
    assert CARRIED <= {m for _, _, m in gpu.needed()}  # and they are checked
    wheels = os.listdir(os.path.join(ROOT, gpu.WHEELS)) if os.path.isdir(
        os.path.join(ROOT, gpu.WHEELS)) else []
    if wheels:  # ../shared beside the checkout: its wheels are the pinned versions
        pins = {m: v for _, v, m in gpu.requirements()}
        for module, dist in (('zmq', 'pyzmq'), ('hickle', 'hickle')):
            assert any(w.startswith(f'{dist}-{pins[module]}-') for w in wheels), (dist, wheels)


def test_tests_stopped_at_their_timeout_take_what_they_started_along(tmp_path):
    pid_file = tmp_path / 'grandchild'
    text, code = gpu.run_group(['sh', '-c', f'sleep 60 & echo $! > {pid_file}; echo started; wait'],
                               timeout=2)
    assert code == 'timeout' and 'started' in text and 'stopped after 2 s' in text
    pid = int(pid_file.read_text())
    for _ in range(50):  # killed with its group (gone, or a zombie where nothing reaps orphans)
        try:
            with open(f'/proc/{pid}/stat') as f:
                if f.read().rsplit(')', 1)[1].split()[0] == 'Z':
                    break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f'the grandchild {pid} outlived the timeout')
    assert gpu.run_group([sys.executable, '-c', 'print(42)'], timeout=30) == ('42\n', 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the refusal without CUDA')
def test_without_cuda_the_full_run_is_a_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, '-m', 'benchmarks.gpu', str(tmp_path / 'out')], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count('\n') == 1
    assert r.stderr.startswith('error: no CUDA device here') and '--cpu-smoke' in r.stderr


def test_cpu_smoke_runs_every_part_and_writes_the_report(tmp_path):
    out = tmp_path / 'out'
    r = subprocess.run([sys.executable, '-m', 'benchmarks.gpu', str(out), '--cpu-smoke',
                        '--work-dir', str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    report = json.loads((out / 'gpu_report.json').read_text())
    assert report['meta']['mode'] == 'cpu-smoke' and report['meta']['torch'] == torch.__version__
    parts = {p['title'].split(' ')[0]: p for p in report['parts']}
    assert list(parts) == ['CUDA', 'AlexNet', 'cuDNN', 'Exchange', 'Profile:', 'End',
                           'alexnet_cifar', 'Compiled:']
    assert not [p for p in report['parts'] if p.get('error')]
    tests = parts['CUDA']
    assert tests['exit code'] == 0 and len(tests['rows']) >= 8
    assert {row['result'] for row in tests['rows']} == {'SKIPPED'}  # no CUDA: all skip, cleanly
    steps = parts['AlexNet']['rows']
    assert [(s['precision'], s['layout'], s['mode']) for s in steps] == [
        ('fp32', 'nchw', 'eager'), ('fp32', 'channels_last', 'eager'), ('bf16', 'nchw', 'eager'),
        ('bf16', 'channels_last', 'eager')]
    compiled = parts['Compiled:']['rows']
    assert [(s['precision'], s['layout'], s['mode']) for s in compiled] == [('fp32', 'nchw', 'compile')]
    assert compiled[0]['x eager'].endswith('x') and compiled[0]['x fp32 NCHW eager'] == compiled[0]['x eager']
    for row in steps + compiled + parts['alexnet_cifar']['rows'] + parts['End']['rows']:
        assert isinstance(row['img/s'], float) and row['img/s'] > 0, row
    assert steps[0]['x fp32 NCHW eager'] == '1.00x'
    on, off = parts['cuDNN']['rows']  # the best row again, autotuning off
    assert on['cudnn_benchmark'] is True and off['cudnn_benchmark'] is False
    assert on['img/s'] == max(s['img/s'] for s in steps) and off['img/s'] > 0
    assert off['x autotuned'].endswith('x')
    for s in steps:
        assert s['step ms'] > 0 and min(s['forward ms'], s['backward ms'], s['update ms']) > 0
    e2e = parts['End']['rows']
    assert [row['input'].split(' ')[0] for row in e2e] == ['loader', 'in-process']
    assert all(0 <= row['data wait % of step'] < 100 for row in e2e)
    exchange = parts['Exchange']['rows']
    assert exchange[1]['what'].startswith('shm exchange') and exchange[1]['ms'] > 0
    profile = parts['Profile:']['rows']
    assert profile and all(row['ms per step'] > 0 for row in profile)
    assert any('conv' in row['operator'] for row in profile)
    md = (out / 'gpu_report.md').read_text()
    assert '| batch | precision | layout | mode | forward ms |' in md and 'device: cpu' in md
    assert 'SKIPPED' in (out / 'cuda_tests.log').read_text()
