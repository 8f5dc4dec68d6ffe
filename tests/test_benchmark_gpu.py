"""benchmarks/gpu.py, the one GPU command: its import check, and every part of it with tiny
sizes on the CPU (--cpu-smoke: the CUDA tests skip, the tables fill). Speed is not checked here."""
import json
import os
import subprocess
import sys
import time
import types

import pytest
import torch

from benchmarks import gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_check_names_what_is_missing_and_how_to_install_it(tmp_path):
    req = tmp_path / 'req.txt'
    req.write_text('-r other.txt\npyzmq==27.3.0  # the link\nno-such-module-xyz==1.0\nPyYAML==6.0.3\n')
    assert [m for _, _, m in gpu.requirements([str(req)])] == ['zmq', 'no_such_module_xyz', 'yaml']
    line = gpu.import_problem([str(req)])
    assert line == ('error: missing Python modules: no_such_module_xyz (no-such-module-xyz==1.0). '
                    'Install them: pip install -r requirements.txt -r requirements-test.txt')
    assert gpu.import_problem() is None  # this environment has what the command needs


# What the lent GPU machine's python3 has (the device tool's KINDS.md, 2026-11), by import name,
# among what requirements*.txt pins: pyzmq and hickle travel as wheels (../shared/device-wheels).
DEVICE_HAS = {'torch', 'numpy', 'h5py', 'yaml', 'PIL', 'tqdm', 'scipy', 'sklearn', 'matplotlib',
              'werkzeug', 'pytest'}
CARRIED = {'zmq', 'hickle'}
WHEELS = '../shared/device-wheels'


def test_the_command_needs_only_what_the_device_has_plus_the_two_carried_wheels():
    # playwright (the browser test's) was pinned after this command was written: the import check
    # then refused to run on the device; the modules it checks are the ones the command imports
    assert {m for _, _, m in gpu.needed()} <= DEVICE_HAS | CARRIED
    assert CARRIED <= {m for _, _, m in gpu.needed()}  # and they are checked
    wheels = os.listdir(os.path.join(ROOT, WHEELS)) if os.path.isdir(os.path.join(ROOT, WHEELS)) else []
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


def gone(pid):
    for _ in range(50):  # gone, or a zombie where nothing reaps orphans
        try:
            with open(f'/proc/{pid}/stat') as f:
                if f.read().rsplit(')', 1)[1].split()[0] == 'Z':
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def test_what_a_command_leaves_behind_is_stopped_when_it_ends(tmp_path):
    pid_file = tmp_path / 'orphan'
    t0 = time.monotonic()
    text, code = gpu.run_group(['sh', '-c', f'sleep 60 & echo $! > {pid_file}; echo done'], timeout=30)
    assert (text, code) == ('done\n', 0) and time.monotonic() - t0 < 10
    assert gone(int(pid_file.read_text()))


FAKE_TESTS = """
import os, signal, time
def test_a():
    pass
def test_hangs():
    time.sleep(60)
def test_crashes_pytest():
    os.kill(os.getpid(), signal.SIGKILL)
def test_b():
    assert False
"""


def test_a_hung_or_crashing_test_costs_its_own_time_only_and_each_result_is_written_as_it_ends(
        tmp_path, monkeypatch):
    (tmp_path / 'test_fake.py').write_text(FAKE_TESTS)
    report = gpu.Report(str(tmp_path), {})
    written = []  # the results in gpu_report.json each time it is written
    write = report.write

    def spy():
        write()
        rows = json.loads((tmp_path / 'gpu_report.json').read_text())['parts'][-1]['rows']
        written.append([r['result'] for r in rows])
    monkeypatch.setattr(report, 'write', spy)
    args = types.SimpleNamespace(out_dir=str(tmp_path), cpu_smoke=True)
    part = gpu.run_tests(args, gpu.Budget(120), report, 'fake', ['test_fake.py'], test_timeout=8,
                         cwd=str(tmp_path))
    results = [r['result'] for r in part['rows']]
    assert [r['test'] for r in part['rows']] == ['test_a', 'test_hangs', 'test_crashes_pytest', 'test_b']
    assert results[0] == 'PASSED' and results[3] == 'FAILED'
    # stopped by pytest-timeout where installed, else by the command a quarter later
    assert results[1].startswith(('FAILED', 'TIMEOUT: no result in 10 s'))
    assert results[2] == 'CRASHED: pytest ended during it with exit code -9'
    assert ['PASSED', 'not run', 'not run', 'not run'] in written  # before test_hangs ended
    assert 'test_b FAILED' in (tmp_path / 'cuda_tests.log').read_text()


def test_profile_totals_count_each_kernel_once():
    from torch.autograd import DeviceType
    op = types.SimpleNamespace(key='aten::conv2d', device_type=DeviceType.CPU, self_cpu_time_total=5,
                               self_device_time_total=40, is_user_annotation=False)
    kernel = types.SimpleNamespace(key='sm90_xmma_fprop', device_type=DeviceType.CUDA,
                                   self_cpu_time_total=0, self_device_time_total=40,
                                   is_user_annotation=False)
    step = types.SimpleNamespace(key='ProfilerStep#1', device_type=DeviceType.CUDA,
                                 self_cpu_time_total=0, self_device_time_total=45,
                                 is_user_annotation=True)
    # the launching operator carries the kernel's device time too: only the kernel counts
    assert gpu.device_events([op, kernel, step], DeviceType.CUDA) == [(kernel, 40)]
    assert gpu.device_events([op, kernel, step], DeviceType.CPU) == [(op, 5)]


def test_rows_are_written_as_they_end_and_a_compiled_row_starts_only_with_150_s_left(
        tmp_path, monkeypatch):
    report = gpu.Report(str(tmp_path), {})
    seen = []  # rows with a figure already in gpu_report.json when the next row starts

    def fake_time_steps(*a):
        rows = json.loads((tmp_path / 'gpu_report.json').read_text())['parts'][-1]['rows']
        seen.append(sum(isinstance(r.get('img/s'), float) for r in rows))
        return 1.0, 2.0, 3.0, 10.0
    monkeypatch.setattr(gpu, 'time_steps', fake_time_steps)
    args = types.SimpleNamespace(cpu_smoke=False)
    budget = types.SimpleNamespace(left=lambda: 149.0)
    eager = gpu.step_table(None, args, gpu.FULL, budget, report, None, 'alexnet', 227, 1000, 'eager',
                           gpu.configs([256], False))
    assert seen == [0, 1, 2, 3] and all(r['img/s'] == 25600.0 for r in eager['rows'])
    compiled = gpu.step_table(None, args, gpu.FULL, budget, report, None, 'alexnet', 227, 1000, 'c',
                              gpu.configs([256], True), eager=eager)
    assert {r['img/s'] for r in compiled['rows']} == {'skipped (time budget)'}
    budget.left = lambda: 150.0
    compiled = gpu.step_table(None, args, gpu.FULL, budget, report, None, 'alexnet', 227, 1000, 'c',
                              gpu.configs([256], True), eager=eager)
    assert all(r['img/s'] == 25600.0 and r['x eager'] == '1.00x' for r in compiled['rows'])


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
    env = report['environment']
    assert env['mode'] == 'cpu-smoke' and env['torch / CUDA / cuDNN / NCCL'].startswith(torch.__version__)
    assert env['commit'] != '?'
    for key in ('sandbox', '/dev/shm', 'compute mode', 'PYTORCH_CUDA_ALLOC_CONF / PYTORCH_ALLOC_CONF',
                'driver', 'GPUs', 'CPU cores (usable)'):
        assert env[key], key
    titles = [p['title'].split(' ')[0] for p in report['parts']]
    assert titles == ['Preflight:', 'CUDA', 'AlexNet', 'cuDNN', 'Exchange', 'End', 'Profile:',
                      'alexnet_cifar', 'CUDA', 'Compiled:']  # in order of value
    parts = dict(zip(titles, report['parts']))
    assert not [p for p in report['parts'] if p.get('error')]
    assert [row['result'] for row in parts['Preflight:']['rows']] == [
        'ok', 'ok', 'ok (the CPU reads the slot in place)']
    tests, compile_test = [p for p in report['parts'] if p['title'].startswith('CUDA')]
    assert len(tests['rows']) >= 9 and 'compile' not in str(tests['rows'])
    assert [row['test'] for row in compile_test['rows']] == ['test_compile_gives_the_val_record_of_eager']
    for row in tests['rows'] + compile_test['rows']:
        assert row['result'] == 'SKIPPED' and row['s'] >= 0  # no CUDA: all skip, cleanly
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
    on, off = parts['cuDNN']['rows']  # the best row again, autotuning off, in a fresh process
    assert on['cudnn_benchmark'] is True and off['cudnn_benchmark'] is False
    assert on['img/s'] == max(s['img/s'] for s in steps) and off['img/s'] > 0
    assert off['x autotuned'].endswith('x')
    for s in steps:
        assert s['step ms'] > 0 and min(s['forward ms'], s['backward ms'], s['update ms']) > 0
    e2e = parts['End']['rows']
    assert [row['input'].split(' ')[0] for row in e2e] == ['loader', 'in-process']
    assert all(0 <= row['data wait % of step'] < 100 and row['copy wait ms'] >= 0 for row in e2e)
    exchange = parts['Exchange']['rows']
    assert exchange[1]['what'].startswith('shm exchange') and exchange[1]['ms'] > 0
    profile = parts['Profile:']['rows']  # the CPU operators, as the kernels on a GPU
    assert profile and all(row['ms per step'] > 0 for row in profile)
    assert any('conv' in row['CPU operator'] for row in profile)
    assert 0 < sum(row['% of the step'] for row in profile) <= 100 + 1e-6
    md = (out / 'gpu_report.md').read_text()
    assert md.index('## Environment') < md.index('## Preflight') < md.index('## CUDA tests')
    assert '| batch | precision | layout | mode | forward ms |' in md and '| sandbox |' in md
    assert 'SKIPPED' in (out / 'cuda_tests.log').read_text()


def test_parts_run_alone_in_their_order_and_unknown_ones_are_refused(tmp_path):
    r = subprocess.run([sys.executable, '-m', 'benchmarks.gpu', str(tmp_path), '--cpu-smoke',
                        '--parts', 'profile,preflight'], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, GIT_DIR=str(tmp_path / 'no-git'),
                                             GIT_COMMIT='abc1234'))
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / 'gpu_report.json').read_text())
    assert report['environment']['commit'] == 'abc1234'  # no .git: the commit from GIT_COMMIT
    assert [p['title'].split(' ')[0] for p in report['parts']] == ['Preflight:', 'Profile:']
    # without the step table, the profile takes the configuration expected to be best
    assert 'bf16 channels_last' in report['parts'][1]['title']
    with pytest.raises(SystemExit) as e:
        gpu.main([str(tmp_path), '--parts', 'steps,bogus'])
    assert e.value.code == 2
