"""Does every GPU path work on this CUDA machine, and how fast is each (about 8 min on one H200)?
Latest answer: none yet (no GPU run); how to run it and what it reports: docs/gpu.md#the-parts

    python -m benchmarks.gpu OUT_DIR                       # every part, on a CUDA machine
    python -m benchmarks.gpu OUT_DIR --parts tests,steps   # some parts (each about 2 min or less)
    python -m benchmarks.gpu OUT_DIR --cpu-smoke           # every part, tiny sizes, on the CPU (CI)

It writes OUT_DIR/gpu_report.md and gpu_report.json, rewritten after every row (a run cut short
keeps what it measured), and OUT_DIR/cuda_tests.log. First an import check: without torch, numpy
or yaml one line naming them, exit 2; any other missing module skips only the parts that need it
(UNIT_MODULES: "skipped: missing X"). Then the environment table (sandbox, /dev/shm, CUDA and why
not, GPU compute mode, allocator settings, driver, CUDA, cuDNN, NCCL, GPUs, cores, what each missing
module skips, commit: from git, else $GIT_COMMIT), written even where CUDA is unusable (exit 2
then: a driver too old for the build looks like no GPU, and only this table says so). Then the
parts, in order of value, so that a run cut anywhere holds the most important answers:

  preflight  a matmul, 1 MB shared with a second process over CUDA IPC, cudaHostRegister of an
             empty 1 MB /dev/shm mapping then filled by a second process (the loader's order), the
             tcp exchange's 488 MB pin_memory=True buffer: what the platform allows. A refusal is a
             finding ("refused by the platform: ..."), apart from a wrong result; the run goes on
             with the fallbacks
  tests      the CUDA-marked tests of tests/test_cuda.py but compile's, each stopped after 120 s,
             each result in the report as it ends; a test the platform refuses what it needs reads
             "REFUSED by the platform: ...", apart from failures; with --cpu-smoke they all skip
             (pytest does not see the GPU)
  steps      AlexNet 227, synthetic input, batch 256 and 128 x fp32 / bf16 x NCHW / channels_last,
             eager, cuDNN autotuning on (as train.py): forward / backward / update / step ms (CUDA
             events) and img/s; then the best batch-256 row with autotuning off, in a fresh process
  exchange   the CUDA IPC exchange of AlexNet's [params | momentum] (488 MB, two processes on the
             one GPU) against a device copy of the same bytes, and as % of the best steps
  e2e        the best configuration end to end: train.py from hkl files on local disk, loader
             process + use_data_layer against in-process loading: img/s, data wait (the loader not
             ready) and copy wait (the device copy not done) per step
  profile    torch.profiler of the best batch-256 step: the kernels with the most device time, each
             as a share of their summed time; no kernel events at all is the part's error
  cifar      alexnet_cifar at 32 px, for scale
  compile    compile's CUDA test, then the batch-256 rows with torch.compile (a row starts only
             with 150 s of the budget left: a cold compile of AlexNet takes about a minute)

Where the GPU's compute mode is Exclusive_Process, what starts a second process on it (MULTI_PROCESS)
is skipped. Rows that would start past --budget-s are marked skipped. --cpu-smoke: tiny batches,
compile with the 'eager' backend, the exchange over shm with alexnet_cifar, the profile's CPU
operators.
"""
import argparse
import datetime
import importlib
import importlib.util
import json
import os
import platform
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial

from benchmarks.common import epoch_img_s, iter_lines, step_marks, train_log, write_batches
from lib import ROOT, SHM, command

REQUIREMENTS = ('requirements.txt', 'requirements-test.txt')
MODULES = {'pyzmq': 'zmq', 'pyyaml': 'yaml', 'pillow': 'PIL', 'scikit-learn': 'sklearn',
           'pytest-xdist': 'xdist'}
# not imported by this command: demo data, ImageNet devkit, serve.py's browser test, the linter
# (tests/test_lint.py is not among the CUDA tests), pytest_timeout (used where installed, else
# a fallback stops a hung test), matplotlib (train.py skips its training.png without it) and
# xdist (test.sh's two tests at a time; this command runs its tests one at a time)
NOT_NEEDED_HERE = {'sklearn', 'scipy', 'playwright', 'ruff', 'pytest_timeout', 'matplotlib', 'xdist'}
CORE = ('torch', 'numpy', 'yaml')  # without them nothing runs: the import check stops (exit 2)
# What each part, preflight check or row imports besides CORE (import names). Where one of them
# is missing, that part is marked "skipped: missing ..." and the others run; the steps, profile,
# cifar and compiled rows need CORE only. tests/test_benchmark_gpu.py runs the command with every
# other module of the requirements unimportable, in every process it starts.
TESTS_MODULES = ('zmq', 'hickle', 'h5py', 'PIL', 'tqdm', 'werkzeug', 'pytest')
UNIT_MODULES = {
    'check_matmul': (), 'check_share': ('zmq',), 'check_register': ('zmq', 'h5py'),
    'check_pinned': ('zmq',),
    'tests': TESTS_MODULES,
    'steps': (), 'autotune': (),
    'exchange': ('zmq',),
    'e2e': ('zmq', 'hickle', 'h5py', 'tqdm'),  # the batch files; train.py and its loader process
    'profile': (), 'cifar': (),
    'compile test': TESTS_MODULES, 'compile': (),
}
# what starts a second process on the GPU: skipped where the GPU's compute mode lets one process
# at a time use it (Exclusive_Process), since this command's own process holds it
MULTI_PROCESS = {'check_share', 'tests', 'autotune', 'exchange', 'e2e', 'compile test'}
EXCLUSIVE = ('the GPU\'s compute mode is Exclusive_Process (one process at a time, and this '
             'command holds it): a second process on the GPU would fail')
MIN_TORCH = (2, 11)
PARTS = ('preflight', 'tests', 'steps', 'exchange', 'e2e', 'profile', 'cifar', 'compile')
TEST_TIMEOUT = 120.0     # s per CUDA test: one hang must not take the others' time
TESTS_S = 240.0          # s at most for the tests part (about 100 s when none hangs)
COMPILE_MIN_LEFT = 150.0  # s of budget a compiled row needs to start
ALEXNET_FLAT_BYTES = 2 * 60_965_224 * 4  # AlexNet's float32 [params | momentum], as exchanged


# --- imports ---------------------------------------------------------------------------------------
def requirements(files=REQUIREMENTS):
    """[(distribution, version, module)] pinned in the requirement files (recursing into -r)."""
    out = []
    for name in files:
        path = name if os.path.isabs(name) else os.path.join(ROOT, name)
        with open(path) as f:
            for line in f:
                line = line.split('#')[0].strip()
                if line.startswith('-r'):
                    continue  # requirements-test.txt includes requirements.txt: listed already
                if line:
                    dist, _, version = line.partition('==')
                    dist = dist.strip()
                    out.append((dist, version.strip(),
                                MODULES.get(dist.lower(), dist.lower().replace('-', '_'))))
    return out


def needed(files=REQUIREMENTS):
    """The [(distribution, version, module)] of `requirements` that this command imports."""
    return [r for r in requirements(files) if r[2] not in NOT_NEEDED_HERE]


def missing_modules(files=REQUIREMENTS):
    """{module: 'module (distribution==version)'} of the needed modules that do not import."""
    missing = {}
    for dist, version, module in needed(files):
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 -- ImportError, or a broken install: missing either way
            missing[module] = f'{module} ({dist}=={version})' if version else module
    return missing


def import_problem(missing, core=CORE):
    """None, or one line naming the missing modules among `core` and how to install them."""
    lacking = [missing[m] for m in core if m in missing]
    if not lacking:
        return None
    return (f'error: missing Python modules: {", ".join(lacking)}. Install them: '
            f'pip install -r requirements.txt -r requirements-test.txt')


def skip_reason(unit, missing, exclusive):
    """None, or why `unit` (a key of UNIT_MODULES) cannot run here: 'skipped: ...'."""
    why = []
    lacking = [missing[m] for m in UNIT_MODULES[unit] if m in missing]
    if lacking:
        why.append(f'missing {", ".join(lacking)}')
    if exclusive and unit in MULTI_PROCESS:
        why.append(EXCLUSIVE)
    return 'skipped: ' + '; '.join(why) if why else None


def what_missing_costs(missing):
    """The environment table's line: each missing module and the parts it skips."""
    if not missing:
        return 'none'
    return '; '.join(f'{text}: skips {", ".join(u for u, m in UNIT_MODULES.items() if module in m)}'
                     for module, text in missing.items())


# --- the report ------------------------------------------------------------------------------------
def failure(e):
    return f'failed: {type(e).__name__}: {(str(e).splitlines() or [""])[0][:200]}'


class Report:
    """The environment and the tables of one run, rewritten as markdown + JSON after every row."""

    def __init__(self, out_dir, env):
        self.out_dir, self.env, self.parts = out_dir, env, []

    def add(self, title, columns=(), notes=(), **facts):
        """A new table (rows filled by the caller, who calls write() after each)."""
        part = dict(facts, title=title, columns=list(columns), rows=[], notes=list(notes))
        self.parts.append(part)
        self.write()
        return part

    def measure(self, row, work, skipped=None, key='img/s', errors=Exception, failed=failure):
        """work()'s result for `row` (of one of the tables), or None: then row[key] says why
        there is none, `skipped` (a reason: work not run) or failed(error) where work raises one
        of `errors` (one bad row, an OOM or a compiler error, stays one row: the rest of its
        table goes on), and the report is written."""
        if skipped:
            row[key] = skipped
        else:
            try:
                return work()
            except errors as e:
                row[key] = failed(e)
        self.write()
        return None

    def write(self):
        """Both files, each replaced whole (a run stopped mid-write keeps the previous one)."""
        from lib.atomic import atomic_write

        def put(name, text):
            def write(tmp):
                with open(tmp, 'w') as f:
                    f.write(text)
            atomic_write(os.path.join(self.out_dir, name), write)
        put('gpu_report.json', json.dumps({'environment': self.env, 'parts': self.parts}, indent=1))
        lines = ['# benchmarks.gpu report', '', '## Environment', '', '| what | value |', '|---|---|']
        lines += [f'| {k} | {v} |' for k, v in self.env.items()]
        for p in self.parts:
            lines += ['', f'## {p["title"]}', '']
            if p.get('error'):
                lines += [f'**failed:** {p["error"]}', '']
            if p.get('skipped'):
                lines += [f'**{p["skipped"]}**', '']
            if p['columns'] and p['rows']:
                lines.append('| ' + ' | '.join(p['columns']) + ' |')
                lines.append('|' + '---|' * len(p['columns']))
                for r in p['rows']:
                    lines.append('| ' + ' | '.join(fmt(r.get(c, '')) for c in p['columns']) + ' |')
                lines.append('')
            lines += [str(n) for n in p['notes']]
        put('gpu_report.md', '\n'.join(lines) + '\n')


def fmt(v):
    if isinstance(v, float):
        return f'{v:.0f}' if abs(v) >= 1000 else f'{v:.2f}' if abs(v) < 100 else f'{v:.1f}'
    return str(v)


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ''


def cuda_state(torch):
    """'available', or why not: torch.cuda.is_available() says only False, and a driver too
    old for the build looks like no GPU at all."""
    if torch.cuda.is_available():
        return 'available'
    try:
        torch.cuda.init()
    except Exception as e:  # noqa: BLE001 -- AssertionError for a CPU build, RuntimeError for a driver
        return f'unavailable: {type(e).__name__}: {(str(e).strip().splitlines() or [""])[0][:300]}'
    return 'unavailable'


def environment(args, torch, missing):
    """What a platform refusal or a figure may depend on, recorded before anything runs."""
    def smi(query):
        try:
            return subprocess.run(['nvidia-smi', f'--query-gpu={query}', '--format=csv,noheader'],
                                  capture_output=True, text=True, timeout=30
                                  ).stdout.strip().replace('\n', ', ') or '?'
        except (OSError, subprocess.SubprocessError):
            return '? (no nvidia-smi)'
    cuda = torch.cuda.is_available()
    release, cmdline = platform.release(), read('/proc/cmdline')
    sandbox = ('gVisor (uname -r 4.4.0)' if release.startswith('4.4.0') else
               'Firecracker (virtio_mmio devices on the kernel command line)'
               if 'virtio_mmio' in cmdline or 'firecracker' in cmdline.lower() else 'none detected')
    mounts = [line.split() for line in read('/proc/mounts').splitlines()]
    shm_fs = next((m[2] for m in mounts if len(m) > 2 and m[1] == '/dev/shm'), None)
    if SHM:
        usage = shutil.disk_usage(SHM)
        shm = (f'{shm_fs or "not a mount point"}, {usage.total / 2**30:.1f} GiB, '
               f'{usage.free / 2**30:.1f} GiB free')
    else:
        shm = 'absent'
    try:
        nccl = torch.cuda.nccl.version() if cuda else '-'  # a tuple; an int in older torch
        nccl = '.'.join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    except Exception:  # noqa: BLE001 -- a build without NCCL
        nccl = 'none'
    try:
        commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ''
    gpus = [f'{torch.cuda.get_device_name(i)} '
            f'({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB)'
            for i in range(torch.cuda.device_count())] if cuda else []
    memory = re.search(r'MemTotal:\s+(\d+)', read('/proc/meminfo'))
    mode = '- (cpu-smoke)' if args.cpu_smoke else smi('compute_mode')
    if 'exclusive_process' in mode.lower():
        mode += f': {EXCLUSIVE}; the parts that start one are skipped'
    return {
        'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
        'command': 'python -m benchmarks.gpu ' + ' '.join(args.argv),
        'mode': 'cpu-smoke' if args.cpu_smoke else 'gpu',
        'commit': commit or os.environ.get('GIT_COMMIT') or '?',
        'sandbox': f'{sandbox}; uname -r {release}',
        '/dev/shm': shm,
        'CUDA': cuda_state(torch),
        'GPUs': ', '.join(gpus) or 'none',
        'compute mode': mode,
        'driver': smi('driver_version'),  # also without CUDA: a driver too old for the build
        'torch / CUDA / cuDNN / NCCL': f'{torch.__version__} / {torch.version.cuda or "-"} / '
                                       f'{torch.backends.cudnn.version() if cuda else "-"} / {nccl}',
        'PYTORCH_CUDA_ALLOC_CONF / PYTORCH_ALLOC_CONF':
            f'{os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "unset")} / '
            f'{os.environ.get("PYTORCH_ALLOC_CONF", "unset")}',
        'tf32 (cuDNN conv / cuBLAS matmul)': f'{torch.backends.cudnn.allow_tf32} / '
                                            f'{torch.backends.cuda.matmul.allow_tf32}',
        'CPU cores (usable)': f'{os.cpu_count()} ({len(os.sched_getaffinity(0))})',
        'memory': f'{int(memory.group(1)) / 2**20:.0f} GiB' if memory else '?',
        'python': platform.python_version(),
        'missing modules': what_missing_costs(missing),
    }


OUT_OF_TIME = 'skipped (time budget)'


class Budget:
    """The run's time (--budget-s): a row starts only with the seconds it needs left (with
    --cpu-smoke, smoke=True: while any is left, whatever it needs)."""

    def __init__(self, seconds, smoke=False):
        self.start, self.smoke = time.monotonic(), smoke
        self.deadline = self.start + seconds

    def left(self):
        return self.deadline - time.monotonic()

    def elapsed(self):
        return time.monotonic() - self.start

    def allows(self, need):
        """Whether what needs `need` seconds may start."""
        return self.left() >= need * (not self.smoke)

    def short(self, need):
        """None, or why what needs `need` seconds does not start (OUT_OF_TIME)."""
        return None if self.allows(need) else OUT_OF_TIME

    def timeout(self, low, high=float('inf')):
        """The seconds a command may run: what is left, at least `low` (at most `high`)."""
        return min(high, max(low, self.left()))

    def part(self, seconds):
        """A budget of at most `seconds` within this one."""
        return Budget(min(self.left(), seconds), self.smoke)


def run_group(cmd, timeout, on_line=None, quiet_s=None, cwd=ROOT, env=None):
    """(output, exit code or 'timeout' or 'quiet') of cmd, run in its own process group, which is
    killed when it ends or is stopped: what a test started and left behind (workers, loaders,
    servers) would otherwise hold the GPU and its memory while the next part runs. on_line(line)
    sees each line as it comes; with quiet_s, cmd is also stopped ('quiet') when on_line has
    returned nothing true for that long (a hung test). env: variables set for cmd."""
    p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True,
                         env=dict(os.environ, PYTHONUNBUFFERED='1', **(env or {})))
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in p.stdout], daemon=True).start()
    out, t0 = [], time.monotonic()
    progress = t0
    while True:
        try:
            out.append(lines.get(timeout=0.5))
            if on_line is not None and on_line(out[-1]):
                progress = time.monotonic()
        except queue.Empty:  # no output for 0.5 s: ended? (its pipe may be held by what it left)
            if p.poll() is not None:
                code = p.returncode
                break
        now = time.monotonic()
        if now >= t0 + timeout or (quiet_s is not None and now >= progress + quiet_s):
            code = 'timeout' if now >= t0 + timeout else 'quiet'
            break
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:  # nothing left in the group
        pass
    p.wait()
    time.sleep(0.1)  # the reader's last lines
    while not lines.empty():
        out.append(lines.get())
    text = ''.join(out)
    if code == 'timeout':
        text += f'\n(stopped after {timeout:.0f} s)'
    elif code == 'quiet':
        text += f'\n(stopped: no test ended for {quiet_s:.0f} s)'
    return text, code


# --- preflight: what the platform allows -----------------------------------------------------------
REFUSED = 'refused by the platform: '


def refusal(e):
    """'refused by the platform: <error>' on one line (CUDA's errors run to several)."""
    return REFUSED + f'{type(e).__name__}: {(str(e).strip().splitlines() or [""])[0][:300]}'


def share_child(info, out):
    """In a second process: open the parent's 1 MB (CUDA IPC handle, or a /dev/shm file on the
    CPU), check it holds 7s, write 8s for the parent to see."""
    import numpy as np
    import torch
    from lib import exchange
    try:
        if 'handle' in info:
            t = exchange.ipc_open(info)
        else:
            t = torch.from_numpy(np.memmap(info['path'], np.uint8, 'r+', shape=(info['numel'],)))
    except Exception as e:  # noqa: BLE001 -- cudaIpcOpenMemHandle's refusal, say
        out.put(refusal(e))
        return
    ok = bool((t == 7).all())
    t.fill_(8)
    if t.is_cuda:
        torch.cuda.synchronize()
    out.put('ok' if ok else 'WRONG: the second process read other bytes than were written')


def check_share(torch, device):
    import multiprocessing
    import numpy as np
    from lib import exchange
    folder = tempfile.mkdtemp(prefix='bench-gpu-share-', dir=SHM)
    try:
        n = 1 << 20
        if device.type == 'cuda':
            t = torch.full((n,), 7, dtype=torch.uint8, device=device)
            try:
                info = exchange.ipc_share(t)  # cudaIpcGetMemHandle
            except Exception as e:  # noqa: BLE001
                return refusal(e)
            torch.cuda.synchronize()
        else:
            info = {'path': os.path.join(folder, 'buf'), 'numel': n}
            t = torch.from_numpy(np.memmap(info['path'], np.uint8, 'w+', shape=(n,)))
            t.fill_(7)
        ctx = multiprocessing.get_context('spawn')
        out = ctx.Queue()
        child = ctx.Process(target=share_child, args=(info, out), daemon=True)
        child.start()
        deadline, result = time.monotonic() + 60, None
        while result is None:
            alive = child.is_alive()
            try:
                result = out.get(timeout=1)
            except queue.Empty:
                if not alive or time.monotonic() > deadline:
                    result = (f'failed: the second process gave no answer (exit code '
                              f'{child.exitcode}{"" if alive else ", it died"})')
        child.join(10)
        if child.is_alive():
            child.kill()
        if result == 'ok' and not bool((t == 8).all()):
            result = 'WRONG: the second process\'s writes did not arrive'
        return result
    finally:
        shutil.rmtree(folder, ignore_errors=True)


FILL = ('import os, sys, numpy as np; '
        'm = np.memmap(sys.argv[1], np.uint8, "r+", shape=(int(sys.argv[2]),)); '
        'm[:] = int(sys.argv[3]); m.flush(); print(os.getpid())')


def fill_slot(path, numel, value):
    """Fill the slot file at path with `value` from a second process, as the loader process
    writes the trainer's slots; returns that process's pid."""
    r = subprocess.run([sys.executable, '-c', FILL, path, str(numel), str(value)],
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f'the process filling the slot exited {r.returncode}: '
                           f'{(r.stderr.strip().splitlines() or ["?"])[-1][:200]}')
    return int(r.stdout.split()[-1])


def check_register(torch, device):
    """In the loader's order: the slot is page-locked (cudaHostRegister) while still empty, a
    second process fills it, and only then is it copied to the device: where the registration
    pinned other pages than the ones the other process writes, the copy reads stale bytes."""
    import numpy as np
    from lib import loader
    folder = tempfile.mkdtemp(prefix='bench-gpu-register-', dir=SHM)
    try:
        n = 1 << 20
        slots = loader.map_slots(folder, (np.uint8, (n,)), 1, create=True)  # zeros
        feed = loader.SlotFeed(slots, device)  # cudaHostRegister of the mapping, as the loader's
        try:
            fill_slot(os.path.join(folder, 'slot0'), n, 5)
            x = feed.to_device(0)
            right = bool((x == 5).all())
            feed.consumed(0)
            feed.release(0)
        finally:
            feed.close()
        if not right:
            return ('WRONG: the device copy of the slot holds other bytes than the second '
                    'process wrote')
        if device.type == 'cuda' and not feed.pinned:
            try:
                cudart = torch.cuda.cudart()  # the binding takes its cudaError enum, not an int
                name = cudart.cudaGetErrorString(cudart.cudaError(feed.error))
            except Exception:  # noqa: BLE001
                name = ''
            return REFUSED + f'cudaHostRegister gave cudaError {feed.error} {name} (the loader ' \
                             'falls back to synchronous copies, which gave the right bytes)'
        return 'ok' if device.type == 'cuda' else 'ok (the CPU reads the slot in place)'
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def check_pinned(torch, device, nbytes):
    """The tcp exchange's host buffer (lib.exchange.host_buffer: pin_memory=True, cudaHostAlloc,
    pageable where that is refused), filled and copied to the device."""
    from lib import exchange
    buf, refusal = exchange.host_buffer(nbytes, torch.uint8)
    try:
        buf.fill_(3)
        right = bool((buf.to(device, non_blocking=buf.is_pinned()) == 3).all())
    finally:
        del buf
        if device.type == 'cuda' and hasattr(torch._C, '_host_emptyCache'):
            torch._C._host_emptyCache()  # not held for the rest of the run
    size = f'{nbytes / 1e6:.0f} MB' if nbytes >= 1e6 else f'{nbytes} bytes'
    if not right:
        return f'WRONG: the device copy of the {size} host buffer holds other bytes'
    if refusal:
        return REFUSED + f'{refusal} (the tcp exchange falls back to pageable memory, which gave ' \
                         'the right bytes)'
    return 'ok' if device.type == 'cuda' else f'ok (pageable memory on the CPU, {size})'


def check_matmul(torch, device):
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(1024, 1024, generator=gen) for _ in range(2))
    got = (a.to(device) @ b.to(device)).cpu().double()
    err = ((got - a.double() @ b.double()).norm() / got.norm()).item()
    return 'ok' if err < 1e-2 else f'WRONG: relative error {err:.1e} against float64 on the CPU'


def preflight(torch, device, report, pinned_bytes, skip=lambda check: None):
    """{check: result}: a few seconds that say what the platform allows before anything needs it.
    skip(check name): None, or why that check cannot run here ('skipped: ...')."""
    part = report.add('Preflight: what the platform allows', ['check', 'result', 'ms'], notes=[
        '"refused by the platform" is the platform saying no (the run goes on with the fallbacks: '
        'the exchange over tcp, synchronous loader copies, pageable exchange buffers); "WRONG" is '
        'a wrong result; "failed" an error of the check itself.'])
    checks = [('matmul 1024 x 1024 fp32, against float64 on the CPU', check_matmul),
              ('1 MB shared with a second process (CUDA IPC; on the CPU a /dev/shm file)', check_share),
              ('cudaHostRegister of an empty 1 MB /dev/shm mapping, filled by a second process, '
               'copied to the device', check_register),
              (f'pin_memory=True host buffer of {pinned_bytes / 1e6:.0f} MB (the tcp exchange\'s, '
               'cudaHostAlloc), copied to the device', check_pinned)]
    results = {}
    for name, check in checks:
        t0 = time.perf_counter()
        row = {'check': name}
        part['rows'].append(row)
        args = (torch, device, pinned_bytes) if check is check_pinned else (torch, device)
        result = report.measure(row, partial(check, *args), skip(check.__name__), key='result')
        if result is not None:
            row['result'] = result
        row['ms'] = 1000 * (time.perf_counter() - t0)
        results[check.__name__] = row['result']
        report.write()
    return results


# --- the CUDA tests --------------------------------------------------------------------------------
# a result line of pytest -v: the test, its outcome, and a skip's reason (in full: COLUMNS below)
RESULT = re.compile(r'^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b(?: \((.*)\))?')
PLATFORM = 'REFUSED by the platform'  # a test skipped for the platform's refusal, not a defect


def run_tests(args, budget, report, title, select, test_timeout=TEST_TIMEOUT, cwd=ROOT, checks=None):
    """The tests `select` picks, in one pytest process, each result written to the report as it
    ends. Each test is stopped after test_timeout s: by pytest-timeout where it is installed (the
    run goes on), else by stopping pytest (a quarter later) and starting it again on the tests
    not yet run, as after a test that crashed pytest. checks: the preflight's results, which the
    tests read (BENCHMARKS_GPU_PREFLIGHT) to skip what the platform refused; a test skipped
    "refused by the platform: ..." reads "REFUSED by the platform: ...", apart from failures.
    With --cpu-smoke, pytest does not see the GPU (CUDA_VISIBLE_DEVICES empty)."""
    log = os.path.join(args.out_dir, 'cuda_tests.log')
    base = [sys.executable, '-m', 'pytest', '-p', 'no:cacheprovider']
    env = {'COLUMNS': '1000', 'BENCHMARKS_GPU_PREFLIGHT': json.dumps(checks or {})}
    if args.cpu_smoke:
        env['CUDA_VISIBLE_DEVICES'] = ''
    text, code = run_group(base + ['--collect-only', '-q'] + select, 120, cwd=cwd, env=env)
    ids = [line for line in text.splitlines() if re.match(r'^\S+::\S+$', line)]
    part = report.add(title, ['test', 'result', 's'], notes=[])
    if not ids:
        part['error'] = f'no tests collected (exit code {code}): {text.strip()[-300:]}'
        report.write()
        return part
    rows = {i: {'test': i.split('::', 1)[1], 'result': 'not run'} for i in ids}
    part['rows'] = list(rows.values())
    report.write()
    plugin = importlib.util.find_spec('pytest_timeout') is not None
    extra = [f'--timeout={test_timeout:.0f}'] if plugin else []
    last = [time.monotonic()]

    def on_line(line):
        m = RESULT.match(line)
        if not m or m.group(1) not in rows:
            return False
        row, now = rows[m.group(1)], time.monotonic()
        result = m.group(2)
        if result == 'SKIPPED' and (m.group(3) or '').startswith(REFUSED):
            result = PLATFORM + ': ' + m.group(3)[len(REFUSED):]
        if row['result'] == 'not run':
            row.update(result=result, s=now - last[0])
        else:  # an error in teardown, after the test's own result
            row['result'] += f', then {m.group(2)}'
        last[0] = now
        report.write()
        return True
    todo, t0 = ids, time.monotonic()
    while todo:
        if not budget.allows(10):
            code = 'timeout'
            break
        last[0] = time.monotonic()
        text, code = run_group(base + ['-v', '-rs'] + extra + todo, budget.timeout(10.0),
                               on_line, quiet_s=1.25 * test_timeout, cwd=cwd, env=env)
        with open(log, 'a') as f:
            f.write(text)
        todo = [i for i in todo if rows[i]['result'] == 'not run']
        if code in (0, 1, 'timeout') or not todo:  # 0 / 1: pytest ran them all, passed / not
            break
        rows[todo[0]]['result'] = (  # the test running when pytest hung or died: the rest go on
            f'TIMEOUT: no result in {1.25 * test_timeout:.0f} s, stopped' if code == 'quiet' else
            f'CRASHED: pytest ended during it with exit code {code}')
        report.write()
        todo = todo[1:]
    for i in todo:
        rows[i]['result'] = ('not run (time budget)' if code == 'timeout' else
                             f'no result (pytest exit code {code})')
    counts = {}
    for r in part['rows']:
        counts[r['result'].split(':')[0]] = counts.get(r['result'].split(':')[0], 0) + 1
    part['summary'] = counts
    how = 'pytest-timeout' if plugin else 'no pytest-timeout: pytest restarted on the rest'
    part['notes'] = [f'{", ".join(f"{n} {k}" for k, n in counts.items())} in '
                     f'{time.monotonic() - t0:.0f} s; each test stopped after {test_timeout:.0f} s '
                     f'({how}); full log in cuda_tests.log']
    if PLATFORM in counts:
        part['notes'].append(f'{PLATFORM}: the test needs what the platform refuses here (the '
                             'preflight\'s row, or the test\'s own first call, says so); not a '
                             'defect of the code, and not counted as a failure.')
    report.write()
    return part


# --- step times on synthetic input -----------------------------------------------------------------
def time_steps(torch, name, size, classes, batch, precision, layout, compiled, steps, warmup,
               device, backend, cudnn_benchmark=True):
    """Median forward / backward / update ms and the mean step ms over `steps` back-to-back steps
    (the trainer's step, lib.step.Step: autocast forward, cross-entropy, backward, MomentumSGD),
    with cuDNN's autotuning on as the trainer sets it (config key cudnn_benchmark)."""
    from lib import model, optim
    from lib.step import Step
    device = torch.device(device)
    torch.backends.cudnn.benchmark = cudnn_benchmark
    fmt = torch.channels_last if layout == 'channels_last' else torch.contiguous_format
    torch.manual_seed(0)
    net = model.build(name, classes, 0.5, size, 1).to(device, memory_format=fmt)
    forward = torch.compile(net, backend=backend) if compiled else net
    opt = optim.MomentumSGD(net.named_parameters(), 0.01)
    x = (torch.randn(batch, 3, size, size, device=device) * 50).contiguous(memory_format=fmt)
    y = torch.randint(0, classes, (batch,), device=device)
    train_step = Step(forward, opt, precision, device, memory_format=fmt)
    clock, marks, loss = step_marks(torch, train_step, x, y, steps, warmup, device)
    if not torch.isfinite(loss):
        raise RuntimeError(f'{name} {precision} {layout}: the loss is not finite')
    fwd, bwd, upd = (statistics.median(clock.ms(m[j], m[j + 1]) for m in marks) for j in range(3))
    step = clock.ms(marks[0][0], marks[-1][3]) / len(marks)
    del net, opt, forward, train_step, x, y
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    return fwd, bwd, upd, step


def steps_in_fresh_process(timeout, **kwargs):
    """time_steps(**kwargs) in a new Python process. cuDNN's v8 API caches each convolution's plan
    per process under a key without the benchmark flag and looks there before the flag: in a
    process that has autotuned, cudnn_benchmark=False would reuse the autotuned plans."""
    code = ('import json, sys, torch; from benchmarks.gpu import time_steps; '
            'print("RESULT", json.dumps(time_steps(torch, **json.loads(sys.argv[1]))))')
    text, rc = run_group([sys.executable, '-c', code, json.dumps(kwargs)], timeout)
    found = re.findall(r'^RESULT (.*)$', text, re.M)
    if rc != 0 or not found:
        raise RuntimeError(f'exit code {rc}: {(text.strip().splitlines() or [""])[-1][:200]}')
    return json.loads(found[-1])


def configs(batches, compiled, keep=lambda precision, layout: True):
    return [(b, p, layout, compiled) for b in batches for p in ('fp32', 'bf16')
            for layout in ('nchw', 'channels_last') if keep(p, layout)]


def step_table(torch, args, sizes, budget, report, device, name, size, classes, title, runs,
               eager=None):
    """One row per (batch, precision, layout, compiled) of `runs`. `x fp32 NCHW eager`: against
    the fp32 NCHW eager row of the same batch, in this table or in `eager` (an earlier table of
    the same run); compiled rows also get `x eager`, against their own configuration eager."""
    cols = ['batch', 'precision', 'layout', 'mode', 'forward ms', 'backward ms', 'update ms',
            'step ms', 'img/s', 'x fp32 NCHW eager'] + (['x eager'] if eager is not None else [])
    part = report.add(title, cols, notes=[
        f'{sizes["steps"]} timed steps after {sizes["warmup"]} warm-up (+2 when compiled, backend '
        f'{sizes["backend"]}); forward / backward / update: medians between CUDA events '
        '(perf_counter on the CPU); step: mean of the back-to-back steps (what img/s is computed '
        'from); synthetic input already on the device.'])
    done = {(r['batch'], r['precision'], r['layout']): r['step ms']
            for r in (eager or {}).get('rows', []) if isinstance(r.get('img/s'), float)}
    for batch, precision, layout, compiled in runs:
        row = dict(batch=batch, precision=precision, layout=layout,
                   mode='compile' if compiled else 'eager')
        part['rows'].append(row)
        times = report.measure(row, partial(time_steps, torch, name, size, classes, batch, precision,
                                            layout, compiled, sizes['steps'],
                                            sizes['warmup'] + 2 * compiled, device, sizes['backend']),
                               budget.short(COMPILE_MIN_LEFT if compiled else 20))
        if times is None:
            continue
        fwd, bwd, upd, step = times
        if eager is None:
            done[batch, precision, layout] = step
        base = done.get((batch, 'fp32', 'nchw'))
        row.update({'forward ms': fwd, 'backward ms': bwd, 'update ms': upd, 'step ms': step,
                    'img/s': 1000 * batch / step,
                    'x fp32 NCHW eager': f'{base / step:.2f}x' if base else '-'})
        if eager is not None:
            same = done.get((batch, precision, layout))
            row['x eager'] = f'{same / step:.2f}x' if same else '-'
        report.write()
    return part


def autotune_table(args, sizes, budget, report, device, best):
    """The best row of the step table again with cuDNN's autotuning off (config
    cudnn_benchmark=False: its heuristics pick the algorithms), in a fresh process."""
    row = {'cudnn_benchmark': False}
    part = report.add(
        f'cuDNN autotuning (config cudnn_benchmark): AlexNet batch {best["batch"]} '
        f'{best["precision"]} {best["layout"]} eager', ['cudnn_benchmark', 'step ms', 'img/s', 'x autotuned'],
        notes=['True (the default) is the step table\'s row; False is timed in a fresh process '
               '(cuDNN caches its plans per process, whatever the flag). `x autotuned` > 1 would '
               'mean the heuristics are faster. No effect on the CPU (--cpu-smoke).'])
    part['rows'] = [{'cudnn_benchmark': True, 'step ms': best['step ms'], 'img/s': best['img/s'],
                     'x autotuned': '1.00x'}, row]
    times = report.measure(row, lambda: steps_in_fresh_process(
        budget.timeout(30.0, 120.0), name='alexnet', size=227, classes=1000, batch=best['batch'],
        precision=best['precision'], layout=best['layout'], compiled=False, steps=sizes['steps'],
        warmup=sizes['warmup'], device=str(device), backend=sizes['backend'],
        cudnn_benchmark=False), budget.short(30))
    if times is not None:
        step = times[3]
        row.update({'step ms': step, 'img/s': 1000 * best['batch'] / step,
                    'x autotuned': f'{best["step ms"] / step:.2f}x'})
        report.write()


def best_row(part, batch):
    done = [r for r in part['rows'] if r['batch'] == batch and isinstance(r.get('img/s'), float)]
    return max(done, key=lambda r: r['img/s']) if done else None


def device_events(events, device_type):
    """[(event, own µs)] of the key_averages() events that ran on device_type: on CUDA the kernels
    (and copies), which torch.profiler's own table sums; the aten operator that launched a kernel
    carries that kernel's time as well, so counting both would count it twice. On the CPU
    (--cpu-smoke) the operators' self CPU time. Annotations (ProfilerStep ranges) are left out."""
    key = 'self_cpu_time_total' if str(device_type).endswith('CPU') else 'self_device_time_total'
    return [(e, getattr(e, key)) for e in events if e.device_type == device_type
            and not getattr(e, 'is_user_annotation', False) and getattr(e, key) > 0]


def profile_table(torch, sizes, report, device, row, top=12):
    """Where a step of `row`'s configuration (eager) spends its time: torch.profiler, the
    kernels with the most device time (the operators' CPU time on the CPU) over a few steps."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    from lib import model, optim
    from lib.step import Step
    cuda = device.type == 'cuda'
    what = 'kernel' if cuda else 'CPU operator'
    part = report.add(f'Profile: AlexNet batch {row["batch"]} {row["precision"]} {row["layout"]} '
                      f'eager, the {what}s with the most {"device" if cuda else "self CPU"} time',
                      [what, 'ms per step', f'% of summed {what} time', 'calls per step'])
    fmt_ = torch.channels_last if row['layout'] == 'channels_last' else torch.contiguous_format
    torch.backends.cudnn.benchmark = True
    net = model.build('alexnet', 1000, 0.5, 227, 1).to(device, memory_format=fmt_)
    opt = optim.MomentumSGD(net.named_parameters(), 0.01)
    x = (torch.randn(row['batch'], 3, 227, 227, device=device) * 50).contiguous(memory_format=fmt_)
    y = torch.randint(0, 1000, (row['batch'],), device=device)
    step = Step(net, opt, row['precision'], device, memory_format=fmt_)
    for _ in range(sizes['warmup']):
        step(x, y)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    n = max(1, sizes['steps'] // 4)
    with profile(activities=activities) as prof:
        for _ in range(n):
            step(x, y)
        if cuda:
            torch.cuda.synchronize()
    profile_rows(part, device_events(prof.key_averages(), DeviceType.CUDA if cuda else DeviceType.CPU),
                 what, n, sizes['warmup'], top)
    report.write()


def profile_rows(part, events, what, n, warmup, top=12):
    """The profile table's rows from device_events() over n steps: the `top` events by time,
    each as a share of their summed time (a step's time holds gaps between kernels too); no
    events at all (kernel tracing unavailable, say) is the part's error, not an empty table."""
    if not events:
        part['error'] = (f'the profiler recorded no {what} events over {n} steps (on a GPU: '
                         'kernel tracing, CUPTI, unavailable here?)')
        return
    total = sum(t for _, t in events)
    part['rows'] = [{what: e.key[:100], 'ms per step': t / 1000 / n, part['columns'][2]: 100 * t / total,
                     'calls per step': e.count / n}
                    for e, t in sorted(events, key=lambda et: et[1], reverse=True)[:top]]
    part['notes'] = [f'torch.profiler over {n} steps after {warmup} warm-up; the top {top} of '
                     f'{len(events)} {what}s, {total / 1000 / n:.1f} ms per step in all ({what} '
                     f'time summed: a step\'s time also holds the gaps between them).']


# --- end to end from hkl files, the exchange -------------------------------------------------------
def write_dataset(root, n_train, n_val, batch, size, classes, seed=0):
    """Synthetic batch files as preprocessing writes them (4 distinct ones, repeated), labels, a
    mean image and dataset.yaml. Returns the config keys pointing at them."""
    import numpy as np
    keys = {}
    for split, n in (('train', n_train), ('val', n_val)):
        folder = os.path.join(root, f'{split}_hkl')
        write_batches(folder, min(n, 4), batch, size, seed)
        for i in range(4, n):
            shutil.copyfile(os.path.join(folder, f'{i % 4:04d}.hkl'), os.path.join(folder, f'{i:04d}.hkl'))
        keys[f'{split}_folder'] = folder
    os.makedirs(os.path.join(root, 'labels'), exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (('train', n_train), ('val', n_val)):
        np.save(os.path.join(root, 'labels', f'{split}_labels.npy'), rng.integers(0, classes, n * batch))
    np.save(os.path.join(root, 'mean.npy'), np.full((3, size, size), 127.5, np.float32))
    return dict(keys, label_folder=os.path.join(root, 'labels'),
                mean_file=os.path.join(root, 'mean.npy'), batch_size=batch, num_classes=classes)


def run_train(values, timeout):
    """(img/s of the last epoch, mean data wait ms, mean copy wait ms per step in it) of a
    train.py run."""
    log = train_log([sys.executable, 'train.py'] + [f'{k}={v}' for k, v in values.items()], timeout)
    waits = iter_lines(log, values['n_epochs'])
    return (epoch_img_s(log, values['n_epochs']), statistics.mean(w[1] for w in waits),
            statistics.mean(w[2] for w in waits))


def e2e_table(args, sizes, budget, report, device, best, which, synthetic_img_s):
    e = sizes['e2e']
    part = report.add(f'End to end from hkl files: train.py, {e["model"]} {e["crop"]}, batch {e["batch"]}, '
                      f'{best["precision"]} {best["layout"]} eager ({which})',
                      ['input', 'img/s', 'step ms', 'data wait ms', 'copy wait ms',
                       'data wait % of step', 'x synthetic'])
    work = tempfile.mkdtemp(prefix='bench-gpu-e2e-', dir=args.work_dir)
    rows, notes = part['rows'], part['notes']
    try:
        t0 = time.monotonic()
        keys = write_dataset(work, e['files'], 2, e['batch'], e['size'], e['classes'])
        notes.append(f'{e["files"]} train + 2 val batch files of {e["batch"]} images at {e["size"]} px '
                     f'written to {work} on local disk in {time.monotonic() - t0:.1f} s; '
                     f'{e["epochs"]} epochs, figures of the last (page cache warm)')
        common = dict(keys, model=e['model'], crop_size=e['crop'], gpu=str(device),
                      precision=best['precision'], channels_last=best['layout'] == 'channels_last',
                      compile=False, n_epochs=e['epochs'], lr_step=[],  # compiled rows: last
                      print_freq=max(1, e['files'] // 4), snapshot_freq=1000, use_data_layer=True,
                      learning_rate=0.001)
        for label, para in (('loader process (para_load), use_data_layer', True),
                            ('in-process loading, use_data_layer', False)):
            row = {'input': label}
            rows.append(row)
            figures = report.measure(
                row, partial(run_train, dict(common, para_load=para,
                                             weights_dir=os.path.join(work, f'w{para}')),
                             timeout=budget.timeout(60.0, 150.0)),
                budget.short(60), errors=(RuntimeError, subprocess.TimeoutExpired, IndexError,
                                          statistics.StatisticsError),
                failed=lambda e: f'failed: {str(e)[:300]}')
            if figures is None:
                continue
            img_s, wait, copy = figures
            step = 1000 * e['batch'] / img_s
            row.update({'img/s': img_s, 'step ms': step, 'data wait ms': wait, 'copy wait ms': copy,
                        'data wait % of step': 100 * wait / step,
                        'x synthetic': f'{img_s / synthetic_img_s:.2f}x' if synthetic_img_s else '-'})
            report.write()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if synthetic_img_s:
        notes.append(f'`x synthetic`: img/s over the same configuration on synthetic input in the '
                     f'step table ({synthetic_img_s:.0f} img/s).')
    notes.append('per step, from the train.py log lines: data wait, the loop waiting for the loader '
                 '(the batch not ready); copy wait, the loop waiting for the previous batch\'s copy '
                 'to the device before its slot goes back to the loader process (it queues behind '
                 'earlier compute: the device is the bottleneck; never with in-process loading).')
    report.write()



def exchange_table(sizes, budget, report, device, steps, transport):
    from benchmarks import exchange as bx
    x = sizes['exchange']
    ms, nbytes = bx.time_exchange(transport, str(device), x['repeats'], x['net'],
                                  timeout=budget.timeout(30.0, 120.0))
    copy = bx.time_copy(nbytes, device, x['repeats'])
    rows = [{'what': f'device copy of the same {nbytes / 1e6:.0f} MB, 1 process (floor)', 'ms': copy,
             'x copy': '1.00'},
            {'what': f'{transport} exchange, 2 processes on {device}, each averages half',
             'ms': ms, 'x copy': f'{ms / copy:.2f}'}]
    for batch, step in steps:
        rows[1][f'% of a batch-{batch} step'] = 100 * ms / step
    cols = ['what', 'ms', 'x copy'] + [f'% of a batch-{b} step' for b, _ in steps]
    notes = [f'medians of {x["repeats"]} exchanges after a warm-up one (benchmarks/exchange.py); '
             'steps: the best rows of the step table (train_2gpu.py runs batch 128 per worker).']
    if transport == 'tcp':
        notes.append('over tcp: the preflight found CUDA IPC refused by the platform.')
    part = report.add(f'Exchange of {x["net"]} [params | momentum], {nbytes / 1e6:.0f} MB per worker',
                      cols, notes)
    part['rows'] = rows
    report.write()


# --- main ------------------------------------------------------------------------------------------
FULL = {'alexnet_batches': (256, 128), 'alexnet_cifar_batches': (256, 128), 'steps': 20,
        'warmup': 3, 'backend': 'inductor', 'compile_keep': lambda precision, layout: True,
        'e2e': dict(model='alexnet', crop=227, size=256, batch=256, files=48, epochs=2, classes=1000),
        'exchange': dict(net='alexnet', repeats=10), 'pinned_bytes': ALEXNET_FLAT_BYTES}
SMOKE = {'alexnet_batches': (2,), 'alexnet_cifar_batches': (4,), 'steps': 1, 'warmup': 1,
         'backend': 'eager', 'compile_keep': lambda precision, layout: (precision, layout) == ('fp32', 'nchw'),
         'e2e': dict(model='alexnet_cifar', crop=32, size=36, batch=8, files=4, epochs=1, classes=10),
         'exchange': dict(net='alexnet_cifar', repeats=2), 'pinned_bytes': 1 << 20}
TITLES = {'tests': 'CUDA tests (tests/test_cuda.py, marker cuda)',
          'steps': 'AlexNet 227, synthetic input: step times (eager)',
          'autotune': 'cuDNN autotuning (config cudnn_benchmark)',
          'exchange': 'Exchange of [params | momentum] between two processes',
          'e2e': 'End to end from hkl files (train.py)',
          'profile': 'Profile of the best step',
          'cifar': 'alexnet_cifar 32 px (CIFAR-size), synthetic input, for scale',
          'compile test': 'CUDA test of compile (tests/test_cuda.py)',
          'compile': 'Compiled: AlexNet 227, torch.compile'}


def guarded(report, title, fn, *args):
    """fn(*args), or its failure as a part of the report: one failed part does not stop the rest."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001
        report.add(title, error=failure(e))
        return None


def part_list(text):
    parts = [p.strip() for p in text.split(',') if p.strip()]
    wrong = [p for p in parts if p not in PARTS]
    if wrong or not parts:
        raise argparse.ArgumentTypeError(f'unknown part(s) {", ".join(wrong) or "(none)"}; '
                                         f'choose from {",".join(PARTS)}')
    return parts


@command
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog='python -m benchmarks.gpu', description=__doc__.split('\n')[0])
    p.add_argument('out_dir', help='folder for gpu_report.md / .json and cuda_tests.log')
    p.add_argument('--cpu-smoke', action='store_true',
                   help='every part with tiny sizes on the CPU (what CI checks)')
    p.add_argument('--parts', type=part_list, default=list(PARTS),
                   help=f'comma-separated, run in this order whatever the order given: {",".join(PARTS)} '
                        '(default: all)')
    p.add_argument('--budget-s', type=float, default=420.0,
                   help='stop starting rows after this many seconds (420: a row started late, '
                        'at most a compiled one, still ends within 10 minutes)')
    p.add_argument('--work-dir', help='where the e2e batch files go (default: the temporary folder)')
    args = p.parse_args(argv)
    args.argv = argv
    missing = missing_modules()
    problem = import_problem(missing)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    import torch
    version = tuple(int(n) for n in re.findall(r'\d+', torch.__version__)[:2])
    if version < MIN_TORCH:
        print(f'notice: torch {torch.__version__} is older than {MIN_TORCH[0]}.{MIN_TORCH[1]}, '
              'which the project is checked with', file=sys.stderr)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, 'cuda_tests.log'), 'w'):
        pass
    report = Report(args.out_dir, environment(args, torch, missing))
    report.write()  # the environment, before anything that may fail or hang
    if not args.cpu_smoke and not torch.cuda.is_available():
        report.add('No CUDA device', error=f'torch.cuda.is_available() is False ({report.env["CUDA"]})')
        print(f'error: no CUDA device here (torch.cuda.is_available() is False; the environment '
              f'is in {os.path.join(args.out_dir, "gpu_report.md")}); use --cpu-smoke to check the '
              'command on the CPU', file=sys.stderr)
        return 2
    budget = Budget(args.budget_s, smoke=args.cpu_smoke)
    device = torch.device('cpu' if args.cpu_smoke else 'cuda:0')
    sizes = SMOKE if args.cpu_smoke else FULL
    exclusive = 'exclusive_process' in report.env['compute mode'].lower()
    skip = lambda unit: skip_reason(unit, missing, exclusive)  # noqa: E731
    say = lambda text: print(f'[{budget.elapsed():5.0f} s] {text}', flush=True)  # noqa: E731

    def skipped(unit, title=None):
        """Whether `unit` cannot run here; if so, a part saying why."""
        why = skip(unit)
        if why:
            report.add(title or TITLES[unit], skipped=why)
            say(f'{unit}: {why}')
        return bool(why)
    run = set(args.parts)
    big = sizes['alexnet_batches'][0]
    # without the step table (not among --parts, or no row ran), the later parts take this one
    best = {'batch': big, 'precision': 'bf16', 'layout': 'channels_last', 'img/s': None}
    steps, checks = None, {}
    if 'preflight' in run:
        say('preflight ...')
        checks = guarded(report, 'Preflight', preflight, torch, device, report,
                         sizes['pinned_bytes'], skip) or {}
        say('; '.join(checks.values()))
    if 'tests' in run and not skipped('tests'):
        say('CUDA tests ...')
        title = TITLES['tests']
        part = guarded(report, title, run_tests, args, budget.part(TESTS_S), report,
                       title, ['tests/test_cuda.py', '-m', 'cuda', '-k', 'not compile'],
                       TEST_TIMEOUT, ROOT, checks)
        say(((part or {}).get('notes') or ['failed'])[0])
    if 'steps' in run and not skipped('steps'):
        say('step table, alexnet (eager) ...')
        steps = step_table(torch, args, sizes, budget, report, device, 'alexnet', 227, 1000,
                           TITLES['steps'], configs(sizes['alexnet_batches'], False))
        if best_row(steps, big):
            best = best_row(steps, big)
            say(f'best batch-{big} row: {best["precision"]} {best["layout"]}, {best["img/s"]:.0f} '
                'img/s; cuDNN autotuning off, in a fresh process ...')
            if not skipped('autotune'):
                guarded(report, TITLES['autotune'], autotune_table, args, sizes, budget, report,
                        device, best)
    note = ('the best row of the step table' if best['img/s'] else
            'no step table in this run: the configuration expected to be best')
    if 'exchange' in run and not skipped('exchange'):
        say('exchange ...')
        step_ms = [(b, r['step ms']) for b in sizes['alexnet_batches']
                   if steps and (r := best_row(steps, b))]
        refused = checks.get('check_share', '').startswith(REFUSED)
        transport = 'shm' if device.type == 'cpu' else 'tcp' if refused else 'ipc'
        if budget.allows(45):
            guarded(report, TITLES['exchange'], exchange_table, sizes, budget, report, device,
                    step_ms, transport)
        else:
            report.add(TITLES['exchange'], skipped=OUT_OF_TIME)
    if 'e2e' in run and not skipped('e2e'):
        say('end to end from hkl files ...')
        same_model = sizes['e2e']['model'] == 'alexnet'  # --cpu-smoke: alexnet_cifar, no ratio
        guarded(report, TITLES['e2e'], e2e_table, args, sizes, budget, report, device, best, note,
                best['img/s'] if same_model else None)
    if 'profile' in run and not skipped('profile'):
        say('profile ...')
        guarded(report, TITLES['profile'], profile_table, torch, sizes, report, device, best)
    if 'cifar' in run and not skipped('cifar'):
        say('step table, alexnet_cifar ...')
        step_table(torch, args, sizes, budget, report, device, 'alexnet_cifar', 32, 10,
                   TITLES['cifar'], configs(sizes['alexnet_cifar_batches'], False))
    if 'compile' in run:  # last: a cold compile takes about a minute per row
        say('compile: its CUDA test, then the step table ...')
        if budget.allows(COMPILE_MIN_LEFT) and not skipped('compile test'):
            title = TITLES['compile test']
            guarded(report, title, run_tests, args, budget, report, title,
                    ['tests/test_cuda.py', '-m', 'cuda', '-k', 'compile'], TEST_TIMEOUT, ROOT, checks)
        if not skipped('compile'):
            first = (best['precision'], best['layout'])  # the most likely to be used, first
            runs = sorted(configs([big], True, sizes['compile_keep']), key=lambda r: r[1:3] != first)
            step_table(torch, args, sizes, budget, report, device, 'alexnet', 227, 1000,
                       f'Compiled: AlexNet 227, batch {big}, torch.compile', runs, eager=steps or {})
    say(f'done: {os.path.join(args.out_dir, "gpu_report.md")}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
