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
    missing = gpu.missing_modules([str(req)])
    assert missing == {'no_such_module_xyz': 'no_such_module_xyz (no-such-module-xyz==1.0)'}
    assert gpu.import_problem(missing) is None  # not one the command cannot start without
    line = gpu.import_problem(missing, core=('yaml', 'no_such_module_xyz'))
    assert line == ('error: missing Python modules: no_such_module_xyz (no-such-module-xyz==1.0). '
                    'Install them: pip install -r requirements.txt -r requirements-test.txt')
    assert gpu.missing_modules() == {}  # this environment has what the command needs


def test_every_pinned_module_is_needed_by_a_part_or_named_as_not_needed():
    mapped = set(gpu.CORE).union(*gpu.UNIT_MODULES.values())
    pinned = {m for _, _, m in gpu.requirements()}
    assert mapped | gpu.NOT_NEEDED_HERE == pinned and not mapped & gpu.NOT_NEEDED_HERE
    assert gpu.MULTI_PROCESS <= set(gpu.UNIT_MODULES)
    # the parts that measure the training step need torch, numpy and yaml only
    for unit in ('check_matmul', 'steps', 'autotune', 'profile', 'cifar', 'compile'):
        assert gpu.UNIT_MODULES[unit] == (), unit
    missing = {'zmq': 'zmq (pyzmq==27.3.0)'}
    assert gpu.skip_reason('exchange', missing, False) == 'skipped: missing zmq (pyzmq==27.3.0)'
    assert gpu.skip_reason('cifar', missing, False) is None
    assert gpu.skip_reason('autotune', {}, True) == 'skipped: ' + gpu.EXCLUSIVE
    assert gpu.skip_reason('profile', {}, True) is None
    assert gpu.what_missing_costs(missing) == (
        'zmq (pyzmq==27.3.0): skips check_share, check_register, check_pinned, tests, exchange, e2e, '
        'compile test')


# every process the command starts imports this first: the modules named in BLOCK_MODULES are
# absent, as where they are not installed (import raises ModuleNotFoundError, find_spec is None)
BLOCKER = """
import os, sys
for name in filter(None, os.environ.get('BLOCK_MODULES', '').split(',')):
    sys.modules[name] = None
"""


CHECKS = ('check_matmul', 'check_share', 'check_register', 'check_pinned')
UNITS = {'Preflight:': 'preflight', 'CUDA': 'tests', 'Exchange': 'exchange', 'End': 'e2e',
         'Profile:': 'profile', 'Profile': 'profile', 'alexnet_cifar': 'cifar'}


@pytest.mark.parametrize('available, parts', [
    # torch, numpy and yaml alone: the steps and compiled rows time the step as cifar does
    # (time_steps), and take a minute more on 2 cores
    ((), 'preflight,tests,exchange,e2e,profile,cifar'),
    (gpu.UNIT_MODULES['e2e'], 'preflight,e2e'),  # the largest set of the preflight's rows
    (gpu.TESTS_MODULES, 'tests'),
], ids=['core', 'e2e', 'tests'])
def test_each_part_runs_with_only_the_modules_it_is_mapped_to_and_else_says_what_is_missing(
        tmp_path, available, parts):
    (tmp_path / 'site').mkdir()
    (tmp_path / 'site' / 'sitecustomize.py').write_text(BLOCKER)
    # pytest_timeout and xdist stay: pytest loads its plugins by their entry points, which a
    # blocked module breaks (and the command works with or without pytest_timeout:
    # test_a_hung_or_crashing_test_costs_its_own_time_...; it does not use xdist)
    plugins = {'pytest_timeout', 'xdist'}
    blocked = {m for _, _, m in gpu.requirements()} - set(gpu.CORE) - set(available) - plugins
    env = dict(os.environ, PYTHONPATH=str(tmp_path / 'site'), BLOCK_MODULES=','.join(sorted(blocked)))
    r = subprocess.run([sys.executable, '-m', 'benchmarks.gpu', str(tmp_path / 'out'), '--cpu-smoke',
                        '--parts', parts], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / 'out' / 'gpu_report.json').read_text())
    pins = {m: f'{m} ({d}=={v})' for d, v, m in gpu.requirements()}
    costs = report['environment']['missing modules']
    assert all(f'{pins[m]}: skips ' in costs for m in blocked & set(gpu.TESTS_MODULES)), costs

    def expected(unit):  # None: it runs
        lacking = [pins[m] for m in gpu.UNIT_MODULES[unit] if m in blocked]
        return 'skipped: missing ' + ', '.join(lacking) if lacking else None
    assert [UNITS[p['title'].split(' ')[0]] for p in report['parts']] == parts.split(',')
    ran = []
    for part in report['parts']:
        unit = UNITS[part['title'].split(' ')[0]]
        assert not part.get('error'), part
        if unit == 'preflight':
            for row, check in zip(part['rows'], CHECKS, strict=True):
                assert row['result'] == (expected(check) or row['result']), (check, row['result'])
                assert row['result'].startswith('ok') or expected(check), (check, row['result'])
                ran += [check] * row['result'].startswith('ok')
        elif expected(unit):
            assert part['skipped'] == expected(unit) and not part['rows'], part
        else:  # the CUDA tests skip without CUDA; the tables hold figures
            assert part['rows'] and all(row.get('result') == 'SKIPPED' or isinstance(
                row.get('img/s', row.get('ms per step')), float) for row in part['rows']), part
            ran.append(unit)
    assert ran == {'core': ['check_matmul', 'profile', 'cifar'], 'e2e': list(CHECKS) + ['e2e'],
                   'tests': ['tests']}[{(): 'core', gpu.TESTS_MODULES: 'tests'}.get(available, 'e2e')]
    if not available:
        assert f'**{expected("tests")}**' in (tmp_path / 'out' / 'gpu_report.md').read_text()


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


# --- the preflight ---------------------------------------------------------------------------------
def share_child_with_fake_cuda(info, out):
    """benchmarks.gpu.share_child in this fresh process, CUDA faked (tests.helpers.fake_cuda)."""
    from tests.helpers import fake_cuda
    calls = fake_cuda(info['numel'])
    answer = __import__('queue').Queue()
    gpu.share_child(info, answer)
    out.put((answer.get(timeout=10), calls))


def test_the_preflight_opens_the_handle_in_a_fresh_process_as_the_exchange_does():
    # the preflight's second process has not touched CUDA when it opens the parent's handle
    # (lib.exchange.ipc_open's own test: tests/test_link.py)
    from tests.helpers import FAKE_IPC_INFO, answer_of_a_fresh_process
    result, calls = answer_of_a_fresh_process(share_child_with_fake_cuda, FAKE_IPC_INFO)
    assert (result, calls) == ('ok', ['_lazy_init', '_new_shared_cuda'])


def test_a_refused_ipc_open_is_one_line_of_the_report(monkeypatch):
    import queue
    from lib import exchange

    def refused(info):
        raise RuntimeError('CUDA error: operation not supported\nCUDA kernel errors might be ...')
    monkeypatch.setattr(exchange, 'ipc_open', refused)
    out = queue.Queue()
    gpu.share_child({'handle': '00'}, out)
    assert out.get_nowait() == 'refused by the platform: RuntimeError: CUDA error: operation not supported'


def test_the_preflight_reports_a_refused_pinned_host_buffer(monkeypatch):
    """(lib.exchange.host_buffer's own test: tests/test_link.py)"""
    from tests.helpers import refuse_page_locking
    refuse_page_locking(monkeypatch)
    assert gpu.check_pinned(torch, torch.device('cpu'), 1000) == (
        'refused by the platform: CUDA error: operation not supported (the tcp exchange falls back '
        'to pageable memory, which gave the right bytes)')


def test_the_pinned_row_is_as_large_as_alexnets_exchange_buffer():
    from lib import model
    net = model.build('alexnet', 1000, 0.5, 227, 1)
    assert gpu.ALEXNET_FLAT_BYTES == 2 * 4 * sum(p.numel() for p in net.parameters())


def test_the_register_check_registers_first_then_a_second_process_fills_then_it_copies(
        monkeypatch):
    from lib import loader
    events = []

    class Feed:  # loader.SlotFeed, recording what the slot holds at each step
        pinned, error = True, None

        def __init__(self, slots, device):
            self.slots = slots
            events.append(('register', bool((slots[0] == 5).all())))

        def to_device(self, k):
            events.append(('copy', bool((self.slots[k] == 5).all())))
            return self.slots[k].clone()

        def consumed(self, k):
            pass

        release = consumed

        def close(self):
            pass
    fill = gpu.fill_slot

    def spy(path, numel, value):
        pid = fill(path, numel, value)
        events.append(('fill', pid != os.getpid()))
        return pid
    monkeypatch.setattr(loader, 'SlotFeed', Feed)
    monkeypatch.setattr(gpu, 'fill_slot', spy)
    assert gpu.check_register(torch, torch.device('cpu')) == 'ok (the CPU reads the slot in place)'
    # registered while empty, filled by another process, then copied: the loader's order
    assert events == [('register', False), ('fill', True), ('copy', True)]


def test_profile_rows_name_their_share_and_an_empty_profile_is_an_error(tmp_path):
    from torch.autograd import DeviceType
    kernels = [types.SimpleNamespace(key=k, device_type=DeviceType.CUDA, self_cpu_time_total=0,
                                     self_device_time_total=t, count=4)
               for k, t in (('sgemm', 3000), ('fprop', 1000))]
    report = gpu.Report(str(tmp_path), {})
    part = report.add('p', ['kernel', 'ms per step', '% of summed kernel time', 'calls per step'])
    gpu.profile_rows(part, gpu.device_events(kernels, DeviceType.CUDA), 'kernel', 2, 3)
    assert [(r['kernel'], r['ms per step'], r['% of summed kernel time'], r['calls per step'])
            for r in part['rows']] == [('sgemm', 1.5, 75.0, 2.0), ('fprop', 0.5, 25.0, 2.0)]
    assert not part.get('error')
    empty = report.add('p', part['columns'])
    gpu.profile_rows(empty, [], 'kernel', 2, 3)  # kernel tracing unavailable: no events at all
    assert empty['error'].startswith('the profiler recorded no kernel events over 2 steps')
    assert not empty['rows']


# --- refusals by the platform in the CUDA tests -----------------------------------------------------
REFUSING_TESTS = """
import json, os, pytest
def test_refused():
    pytest.skip('refused by the platform: RuntimeError: CUDA error: operation not supported (a, b)')
def test_needs_cuda():
    pytest.skip('needs a CUDA device')
def test_sees_what_the_command_hands_over():
    assert os.environ['CUDA_VISIBLE_DEVICES'] == ''  # --cpu-smoke: the GPU hidden
    assert json.loads(os.environ['BENCHMARKS_GPU_PREFLIGHT']) == {'check_share': 'ok'}
def test_fails():
    assert False
"""


def test_a_test_skipped_for_the_platforms_refusal_reads_refused_apart_from_failures(
        tmp_path, monkeypatch):
    (tmp_path / 'test_fake.py').write_text(REFUSING_TESTS)
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '0')  # as on a CUDA machine
    report = gpu.Report(str(tmp_path), {})
    args = types.SimpleNamespace(out_dir=str(tmp_path), cpu_smoke=True)
    part = gpu.run_tests(args, gpu.Budget(120), report, 'fake', ['test_fake.py'], cwd=str(tmp_path),
                         checks={'check_share': 'ok'})
    assert [r['result'] for r in part['rows']] == [
        'REFUSED by the platform: RuntimeError: CUDA error: operation not supported (a, b)',
        'SKIPPED', 'PASSED', 'FAILED']
    assert part['summary'] == {'REFUSED by the platform': 1, 'SKIPPED': 1, 'PASSED': 1, 'FAILED': 1}
    assert 'not a defect' in part['notes'][1]
    md = (tmp_path / 'gpu_report.md').read_text()
    assert ('| test_refused | REFUSED by the platform: RuntimeError: CUDA error: operation not '
            'supported (a, b) |') in md


def test_the_cuda_tests_skip_where_the_preflight_found_the_platform_refusing(monkeypatch, tmp_path):
    from tests import test_cuda
    refusals = {'check_share': 'refused by the platform: RuntimeError: CUDA error: not supported',
                'check_register': 'refused by the platform: cudaHostRegister gave cudaError 801 '
                                  'cudaErrorNotSupported (the loader falls back ...)'}
    monkeypatch.setenv('BENCHMARKS_GPU_PREFLIGHT', json.dumps(refusals))
    monkeypatch.setattr(test_cuda, 'refusal', test_cuda.refusal.__wrapped__)  # not cached
    # called directly on the CPU, each stops at its first line, where nothing has run on a GPU yet
    for test, check, arg in (
            (test_cuda.test_two_workers_over_cuda_ipc_on_one_gpu_equal_one_worker, 'check_share', tmp_path),
            (test_cuda.test_loader_slots_are_page_locked_and_give_the_in_process_batches,
             'check_register', tmp_path),
            (test_cuda.test_a_failed_registration_falls_back_to_plain_copies_and_leaves_no_error,
             'check_register', None)):
        with pytest.raises(pytest.skip.Exception) as e:
            test(arg)
        assert str(e.value) == refusals[check], test.__name__
    # allowed: no skip (and no check of its own: the preflight's answer stands)
    monkeypatch.setenv('BENCHMARKS_GPU_PREFLIGHT', json.dumps({'check_register': 'ok'}))
    monkeypatch.setattr(gpu, 'check_register', lambda *a: pytest.fail('checked again'))
    assert test_cuda.refusal('check_register') is None
    # not run by the command: the test checks itself; its own first call may be refused too
    monkeypatch.setenv('BENCHMARKS_GPU_PREFLIGHT', '')
    monkeypatch.setattr(gpu, 'check_register', lambda torch, device: refusals['check_register'])
    assert test_cuda.refusal('check_register') == refusals['check_register']
    assert test_cuda.refusal('check_register', probe=False) is None
    monkeypatch.setattr(torch.cuda, 'cudart', lambda: types.SimpleNamespace(
        cudaHostRegister=lambda ptr, size, flags: 801))
    with pytest.raises(pytest.skip.Exception) as e:
        test_cuda.test_a_failed_registration_falls_back_to_plain_copies_and_leaves_no_error(None)
    assert str(e.value) == 'refused by the platform: cudaHostRegister gave cudaError 801'


def test_the_300_step_precision_test_runs_with_cudnn_autotuning_off(tmp_path):
    from tests import test_cuda
    from tests.helpers import make_batches
    keys = make_batches(str(tmp_path), n_train=2, n_val=1, batch=32, size=36)
    cfg = test_cuda.steps300_config(keys, 'fp16', str(tmp_path / 'w'))
    assert (cfg['cudnn_benchmark'], cfg['gpu'], cfg['precision'], cfg['n_epochs']) == (
        False, 'cuda:0', 'fp16', 3)


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
    budget = gpu.Budget(0)
    budget.left = lambda: 149.0
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


def test_a_row_out_of_time_is_skipped_and_a_failed_row_stays_one_row(tmp_path, monkeypatch):
    budget = gpu.Budget(100)
    assert budget.short(50) is None and budget.short(200) == gpu.OUT_OF_TIME == 'skipped (time budget)'
    assert 99 < budget.timeout(30.0, 120.0) <= 100 and budget.timeout(30.0, 60.0) == 60.0
    assert budget.part(10).left() <= 10 and budget.elapsed() < 5
    assert gpu.Budget(1, smoke=True).allows(1000)  # --cpu-smoke: a row needs no more than time left
    assert not gpu.Budget(-1, smoke=True).allows(0)

    def time_steps(torch, name, size, classes, batch, precision, *rest):
        if precision == 'bf16':
            raise RuntimeError('CUDA out of memory. Tried to allocate 2 GiB\n(more lines)')
        return 1.0, 2.0, 3.0, 10.0
    monkeypatch.setattr(gpu, 'time_steps', time_steps)
    args, report = types.SimpleNamespace(cpu_smoke=False), gpu.Report(str(tmp_path), {})
    part = gpu.step_table(None, args, gpu.FULL, gpu.Budget(100), report, None, 'alexnet', 227, 1000,
                          'eager', gpu.configs([256], False))
    assert [r['img/s'] for r in part['rows']] == [25600.0, 25600.0] + [
        'failed: RuntimeError: CUDA out of memory. Tried to allocate 2 GiB'] * 2
    assert json.loads((tmp_path / 'gpu_report.json').read_text())['parts'][-1]['rows'] == part['rows']
    with pytest.raises(ValueError):  # not one of the errors a row stands for: the part's error
        report.measure({}, lambda: int('x'), errors=(RuntimeError,))


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the refusal without CUDA')
def test_without_cuda_the_full_run_is_a_one_line_error_after_the_environment_table(tmp_path):
    r = subprocess.run([sys.executable, '-m', 'benchmarks.gpu', str(tmp_path / 'out')], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count('\n') == 1
    assert r.stderr.startswith('error: no CUDA device here') and '--cpu-smoke' in r.stderr
    # what explains it (a driver too old for the build looks like no CUDA at all) is written
    report = json.loads((tmp_path / 'out' / 'gpu_report.json').read_text())
    assert report['environment']['CUDA'].startswith('unavailable: ')
    assert report['environment']['mode'] == 'gpu' and 'driver' in report['environment']
    assert [p['title'] for p in report['parts']] == ['No CUDA device']
    assert report['parts'][0]['error'].startswith('torch.cuda.is_available() is False (unavailable: ')
    assert '| CUDA | unavailable: ' in (tmp_path / 'out' / 'gpu_report.md').read_text()


def test_in_exclusive_process_compute_mode_the_parts_with_a_second_process_are_skipped(
        tmp_path, monkeypatch):
    environment = gpu.environment

    def exclusive(args, torch, missing):  # nvidia-smi's answer for such a GPU
        return dict(environment(args, torch, missing), **{'compute mode': 'Exclusive_Process'})
    monkeypatch.setattr(gpu, 'environment', exclusive)
    assert gpu.main([str(tmp_path), '--cpu-smoke', '--parts', 'preflight,tests,exchange,e2e']) == 0
    report = json.loads((tmp_path / 'gpu_report.json').read_text())
    preflight, *others = report['parts']
    results = [row['result'] for row in preflight['rows']]
    assert results[1] == 'skipped: ' + gpu.EXCLUSIVE and results[0] == 'ok'
    assert results[2:] == ['ok (the CPU reads the slot in place)', 'ok (pageable memory on the CPU, 1 MB)']
    assert [p['title'].split(' ')[0] for p in others] == ['CUDA', 'Exchange', 'End']
    assert all(p['skipped'] == 'skipped: ' + gpu.EXCLUSIVE and not p['rows'] for p in others)
    # the environment table says so, from nvidia-smi
    run = subprocess.run

    def smi(cmd, **kwargs):
        if cmd[0] == 'nvidia-smi':
            return types.SimpleNamespace(stdout={'--query-gpu=compute_mode': 'Exclusive_Process\n',
                                                 '--query-gpu=driver_version': '590.48.01\n'}[cmd[1]])
        return run(cmd, **kwargs)
    monkeypatch.setattr(subprocess, 'run', smi)
    env = environment(types.SimpleNamespace(argv=[], cpu_smoke=False), torch, {})
    assert env['compute mode'] == (f'Exclusive_Process: {gpu.EXCLUSIVE}; the parts that start '
                                   'one are skipped')
    assert env['driver'] == '590.48.01' and 'one process at a time' in gpu.EXCLUSIVE


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
                'driver', 'GPUs', 'CPU cores (usable)', 'CUDA'):
        assert env[key], key
    assert env['missing modules'] == 'none'
    titles = [p['title'].split(' ')[0] for p in report['parts']]
    assert titles == ['Preflight:', 'CUDA', 'AlexNet', 'cuDNN', 'Exchange', 'End', 'Profile:',
                      'alexnet_cifar', 'CUDA', 'Compiled:']  # in order of value
    parts = dict(zip(titles, report['parts']))
    assert not [p for p in report['parts'] if p.get('error')]
    assert [row['result'] for row in parts['Preflight:']['rows']] == [
        'ok', 'ok', 'ok (the CPU reads the slot in place)', 'ok (pageable memory on the CPU, 1 MB)']
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
    assert 0 < sum(row['% of summed CPU operator time'] for row in profile) <= 100 + 1e-6
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
