"""One command that proves and measures every GPU path, for a lent GPU machine (< 10 min on one H100).

    python -m benchmarks.gpu OUT_DIR                 # on a CUDA machine
    python -m benchmarks.gpu OUT_DIR --cpu-smoke     # every part with tiny sizes on the CPU (CI)

In order, writing OUT_DIR/gpu_report.md and gpu_report.json after each part (so a run cut short
keeps what it measured), and OUT_DIR/cuda_tests.log:

1. imports: every module of requirements.txt / requirements-test.txt; one line naming what is
   missing and how to bring it, exit 2 (the device machine's python3 has torch + CUDA but not
   pyzmq or hickle: see README, "GPU").
2. correctness: the CUDA-marked tests (tests/test_cuda.py: CUDA IPC exchange, page-locked loader
   slots, data layer, bf16 / fp16, compile, validate_performance.py and serve.py on the GPU,
   torchrun NCCL with 2 GPUs). Without CUDA (--cpu-smoke) they must all skip.
3. speed, one table per part, ratios against rows of the same run, in this order:
   a. AlexNet 227 on synthetic input, batch 256 and 128 x fp32 / bf16 x NCHW / channels_last,
      eager, cuDNN autotuning on (as train.py sets it): forward, backward, update and step ms
      (CUDA events), img/s; then the best batch-256 row with autotuning off (cudnn_benchmark);
   b. the CUDA IPC exchange of AlexNet's [params | momentum] (488 MB, lib/exchange.Pair, two
      processes on the one GPU) against a device-to-device copy of the same bytes, and as % of a
      step of (a)'s best configurations;
   c. a profile (torch.profiler) of (a)'s best batch-256 configuration: the operators with the
      most device time, to say what bounds the step;
   d. that configuration end to end: train.py from hkl batch files on local disk (written here,
      256 px) through the loader process with use_data_layer, against in-process loading: img/s
      and data wait as % of the step;
   e. alexnet_cifar on CIFAR-size (32 px) input, for scale;
   f. last, as compiling costs about a minute a row: (a) at batch 256 with torch.compile.
   Rows that would start past --budget-s are marked skipped. --cpu-smoke: tiny batches, compile
   with the 'eager' backend (traced, not code-generated), exchange over shm with alexnet_cifar.
"""
import argparse
import datetime
import importlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIREMENTS = ('requirements.txt', 'requirements-test.txt')
MODULES = {'pyzmq': 'zmq', 'pyyaml': 'yaml', 'pillow': 'PIL', 'scikit-learn': 'sklearn'}
# demo data, ImageNet devkit, serve.py's browser test: not used by this command
NOT_NEEDED_HERE = {'sklearn', 'scipy', 'playwright'}
WHEELS = '../shared/device-wheels'
INSTALL = ('python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site '
           '.whl/*.whl && export PYTHONPATH=/tmp/site')
MIN_TORCH = (2, 11)


# --- 1. imports ------------------------------------------------------------------------------------
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


def import_problem(files=REQUIREMENTS):
    """None, or one line naming the missing modules and how to bring them."""
    missing = []
    for dist, version, module in needed(files):
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 -- ImportError, or a broken install: missing either way
            missing.append(f'{module} ({dist}=={version})' if version else module)
    if not missing:
        return None
    return (f'error: missing Python modules: {", ".join(missing)}. Bring them: copy their wheels '
            f'(for pyzmq and hickle: {WHEELS}/*.whl) into a git-ignored .whl/ folder, carry it, and '
            f'start with `{INSTALL}`; where a package index is reachable: pip install -r '
            f'requirements-test.txt')


# --- helpers ---------------------------------------------------------------------------------------
class Report:
    """The tables and facts of one run, rewritten as markdown + JSON after every part."""

    def __init__(self, out_dir, meta):
        self.out_dir, self.meta, self.parts = out_dir, meta, []

    def add(self, part):
        self.parts.append(part)
        self.write()

    def write(self):
        with open(os.path.join(self.out_dir, 'gpu_report.json'), 'w') as f:
            json.dump({'meta': self.meta, 'parts': self.parts}, f, indent=1)
        lines = ['# benchmarks.gpu report', '']
        lines += [f'- {k}: {v}' for k, v in self.meta.items()]
        for p in self.parts:
            lines += ['', f'## {p["title"]}', '']
            if p.get('error'):
                lines += [f'**failed:** {p["error"]}', '']
            if p.get('columns') and p.get('rows'):
                lines.append('| ' + ' | '.join(p['columns']) + ' |')
                lines.append('|' + '---|' * len(p['columns']))
                for r in p['rows']:
                    lines.append('| ' + ' | '.join(fmt(r.get(c, '')) for c in p['columns']) + ' |')
                lines.append('')
            lines += [str(n) for n in p.get('notes', [])]
        with open(os.path.join(self.out_dir, 'gpu_report.md'), 'w') as f:
            f.write('\n'.join(lines) + '\n')


def fmt(v):
    if isinstance(v, float):
        return f'{v:.0f}' if abs(v) >= 1000 else f'{v:.2f}' if abs(v) < 100 else f'{v:.1f}'
    return str(v)


def meta(args, torch):
    def smi(query):
        try:
            return subprocess.run(['nvidia-smi', f'--query-gpu={query}', '--format=csv,noheader'],
                                  capture_output=True, text=True, timeout=30).stdout.strip() or '?'
        except (OSError, subprocess.SubprocessError):
            return '?'
    cuda = torch.cuda.is_available()
    try:
        commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or '?'
    except (OSError, subprocess.SubprocessError):
        commit = '?'
    return {
        'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
        'mode': 'cpu-smoke' if args.cpu_smoke else 'gpu',
        'device': torch.cuda.get_device_name(0) if cuda else 'cpu',
        'gpus': torch.cuda.device_count() if cuda else 0,
        'driver': smi('driver_version') if cuda else '-',
        'torch': torch.__version__, 'cuda': torch.version.cuda or '-',
        'cudnn': torch.backends.cudnn.version() if cuda else '-',
        'python': platform.python_version(), 'cpu cores': os.cpu_count(),
        'tf32 (cudnn conv / cuBLAS matmul)': f'{torch.backends.cudnn.allow_tf32} / '
                                             f'{torch.backends.cuda.matmul.allow_tf32}',
        'cudnn.benchmark at start (train.py sets config cudnn_benchmark)': torch.backends.cudnn.benchmark,
        'commit': commit,
        'command': 'python -m benchmarks.gpu ' + ' '.join(args.argv),
    }


class Budget:
    def __init__(self, seconds):
        self.deadline = time.monotonic() + seconds

    def left(self):
        return self.deadline - time.monotonic()


# --- 2. the CUDA tests -----------------------------------------------------------------------------
def run_group(cmd, timeout):
    """(output, exit code or 'timeout') of cmd, run in its own process group: one stopped at the
    timeout takes along what it started (a test's workers, loaders, servers would otherwise hold
    the GPU and its memory while the speed tables run)."""
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    try:
        text, _ = p.communicate(timeout=timeout)
        return text, p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        try:
            text, _ = p.communicate(timeout=30)
        except subprocess.TimeoutExpired as e:  # something left the group and holds the pipe
            text = e.output.decode(errors='replace') if isinstance(e.output, bytes) else e.output
            p.stdout.close()
            p.wait()
        return (text or '') + f'\n(stopped after {timeout:.0f} s)', 'timeout'


def run_tests(args, budget):
    log = os.path.join(args.out_dir, 'cuda_tests.log')
    cmd = [sys.executable, '-m', 'pytest', 'tests/test_cuda.py', '-m', 'cuda', '-v', '-rs',
           '-p', 'no:cacheprovider']
    timeout = max(30, min(args.tests_timeout, budget.left() - 60))
    t0 = time.monotonic()
    text, code = run_group(cmd, timeout)
    with open(log, 'w') as f:
        f.write(text)
    summary = next((line.strip('= ') for line in reversed(text.splitlines())
                    if re.search(r'\d+ (passed|failed|skipped|error)', line)), 'no summary')
    rows = [{'test': m.group(1), 'result': m.group(2)}
            for m in re.finditer(r'^tests/test_cuda\.py::(\S+) (PASSED|FAILED|SKIPPED|ERROR)', text, re.M)]
    return {'title': 'CUDA tests (tests/test_cuda.py, marker cuda)', 'columns': ['test', 'result'],
            'rows': rows, 'summary': summary, 'exit code': code,
            'notes': [f'`{" ".join(cmd[1:])}`: {summary} in {time.monotonic() - t0:.0f} s '
                      f'(exit code {code}; full log in cuda_tests.log)']}


# --- 3a. step times on synthetic input -------------------------------------------------------------
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


def time_steps(torch, name, size, classes, batch, precision, layout, compiled, steps, warmup,
               device, backend, cudnn_benchmark=True):
    """Median forward / backward / update ms and the mean step ms over `steps` back-to-back steps
    (the train loop's operations: autocast forward, cross-entropy, backward, MomentumSGD), with
    cuDNN's autotuning on as the trainer sets it (config key cudnn_benchmark)."""
    import torch.nn.functional as F
    from lib import model, optim
    torch.backends.cudnn.benchmark = cudnn_benchmark
    fmt = torch.channels_last if layout == 'channels_last' else torch.contiguous_format
    torch.manual_seed(0)
    net = model.build(name, classes, 0.5, size, 1).to(device, memory_format=fmt)
    forward = torch.compile(net, backend=backend) if compiled else net
    opt = optim.MomentumSGD(net.named_parameters(), 0.01)
    x = (torch.randn(batch, 3, size, size, device=device) * 50).contiguous(memory_format=fmt)
    y = torch.randint(0, classes, (batch,), device=device)
    dtype = {'fp32': torch.float32, 'bf16': torch.bfloat16}[precision]
    clock, marks = Clock(torch, device), []
    for i in range(warmup + steps):
        if i == warmup:
            clock.sync()
        m0 = clock.mark()
        with torch.autocast(device.type, dtype=dtype, enabled=precision != 'fp32'):
            loss = F.cross_entropy(forward(x).float(), y)
        m1 = clock.mark()
        opt.zero_grad()
        loss.backward()
        m2 = clock.mark()
        opt.step()
        m3 = clock.mark()
        if i >= warmup:
            marks.append((m0, m1, m2, m3))
    clock.sync()
    if not torch.isfinite(loss):
        raise RuntimeError(f'{name} {precision} {layout}: the loss is not finite')
    fwd, bwd, upd = (statistics.median(clock.ms(m[j], m[j + 1]) for m in marks) for j in range(3))
    step = clock.ms(marks[0][0], marks[-1][3]) / len(marks)
    del net, opt, forward, x, y
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    return fwd, bwd, upd, step


def configs(batches, compiled, keep=lambda precision, layout: True):
    return [(b, p, l, compiled) for b in batches for p in ('fp32', 'bf16')
            for l in ('nchw', 'channels_last') if keep(p, l)]


def step_table(torch, args, sizes, budget, device, name, size, classes, title, runs, eager=None):
    """One row per (batch, precision, layout, compiled) of `runs`. `x fp32 NCHW eager`: against
    the fp32 NCHW eager row of the same batch, in this table or in `eager` (an earlier table of
    the same run); compiled rows also get `x eager`, against their own configuration eager."""
    cols = ['batch', 'precision', 'layout', 'mode', 'forward ms', 'backward ms', 'update ms',
            'step ms', 'img/s', 'x fp32 NCHW eager'] + (['x eager'] if eager else [])
    rows = []
    done = {(r['batch'], r['precision'], r['layout']): r['step ms']
            for r in (eager or {}).get('rows', []) if isinstance(r.get('img/s'), float)}
    for batch, precision, layout, compiled in runs:
        row = dict(batch=batch, precision=precision, layout=layout,
                   mode='compile' if compiled else 'eager')
        rows.append(row)
        if budget.left() < (90 if compiled else 20) * (not args.cpu_smoke):
            row['img/s'] = 'skipped (time budget)'
            continue
        try:
            fwd, bwd, upd, step = time_steps(torch, name, size, classes, batch, precision, layout,
                                             compiled, sizes['steps'], sizes['warmup'] + 2 * compiled,
                                             device, sizes['backend'])
        except Exception as e:  # noqa: BLE001 -- one bad row (OOM, compiler) stays one row
            row['img/s'] = f'failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}'
            continue
        if not eager:
            done[batch, precision, layout] = step
        base = done.get((batch, 'fp32', 'nchw'))
        row.update({'forward ms': fwd, 'backward ms': bwd, 'update ms': upd, 'step ms': step,
                    'img/s': 1000 * batch / step,
                    'x fp32 NCHW eager': f'{base / step:.2f}x' if base else '-'})
        if eager:
            same = done.get((batch, precision, layout))
            row['x eager'] = f'{same / step:.2f}x' if same else '-'
    notes = [f'{sizes["steps"]} timed steps after {sizes["warmup"]} warm-up (+2 when compiled, '
             f'backend {sizes["backend"]}); forward / backward / update: medians between CUDA events '
             '(perf_counter on the CPU); step: mean of the back-to-back steps (what img/s is computed '
             'from); synthetic input already on the device.']
    return {'title': title, 'columns': cols, 'rows': rows, 'notes': notes}


def autotune_table(torch, args, sizes, budget, device, best):
    """The best row of the step table again with cuDNN's autotuning off (config
    cudnn_benchmark=False: its heuristics pick the algorithms), against the row with it on."""
    row = {'cudnn_benchmark': False}
    rows = [{'cudnn_benchmark': True, 'step ms': best['step ms'], 'img/s': best['img/s'],
             'x autotuned': '1.00x'}, row]
    if budget.left() < 20 * (not args.cpu_smoke):
        row['img/s'] = 'skipped (time budget)'
    else:
        try:
            step = time_steps(torch, 'alexnet', 227, 1000, best['batch'], best['precision'],
                              best['layout'], False, sizes['steps'], sizes['warmup'], device,
                              sizes['backend'], cudnn_benchmark=False)[3]
            row.update({'step ms': step, 'img/s': 1000 * best['batch'] / step,
                        'x autotuned': f'{best["step ms"] / step:.2f}x'})
        except Exception as e:  # noqa: BLE001
            row['img/s'] = f'failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}'
        finally:
            torch.backends.cudnn.benchmark = True
    return {'title': f'cuDNN autotuning (config cudnn_benchmark): AlexNet batch {best["batch"]} '
                     f'{best["precision"]} {best["layout"]} eager',
            'columns': ['cudnn_benchmark', 'step ms', 'img/s', 'x autotuned'], 'rows': rows,
            'notes': ['True (the default) is the step table\'s row; `x autotuned` > 1 would mean the '
                      'heuristics are faster. No effect on the CPU (--cpu-smoke).']}


def best_row(part, batch):
    done = [r for r in part['rows'] if r['batch'] == batch and isinstance(r.get('img/s'), float)]
    return max(done, key=lambda r: r['img/s']) if done else None


def profile_table(torch, sizes, device, row, top=12):
    """Where a step of `row`'s configuration (eager) spends its time: torch.profiler, the
    operators with the most self device time (CPU time on the CPU) over a few steps."""
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile
    from lib import model, optim
    fmt = torch.channels_last if row['layout'] == 'channels_last' else torch.contiguous_format
    net = model.build('alexnet', 1000, 0.5, 227, 1).to(device, memory_format=fmt)
    opt = optim.MomentumSGD(net.named_parameters(), 0.01)
    x = (torch.randn(row['batch'], 3, 227, 227, device=device) * 50).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (row['batch'],), device=device)
    dtype = torch.bfloat16 if row['precision'] == 'bf16' else torch.float32

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=row['precision'] != 'fp32'):
            loss = F.cross_entropy(net(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for _ in range(sizes['warmup']):
        step()
    cuda = device.type == 'cuda'
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    n = max(1, sizes['steps'] // 4)
    with profile(activities=activities) as prof:
        for _ in range(n):
            step()
        if cuda:
            torch.cuda.synchronize()

    def own(e):  # the attribute's name changed over torch versions
        if not cuda:
            return e.self_cpu_time_total
        return getattr(e, 'self_device_time_total', None) or getattr(e, 'self_cuda_time_total', 0)
    events = [e for e in prof.key_averages() if own(e) > 0]
    total = sum(own(e) for e in events) or 1
    rows = [{'operator': e.key[:80], 'ms per step': own(e) / 1000 / n,
             '% of the step': 100 * own(e) / total, 'calls per step': e.count / n}
            for e in sorted(events, key=own, reverse=True)[:top]]
    what = 'device (kernel)' if cuda else 'CPU'
    return {'title': f'Profile: AlexNet batch {row["batch"]} {row["precision"]} {row["layout"]} '
                     f'eager, self {what} time per operator',
            'columns': ['operator', 'ms per step', '% of the step', 'calls per step'], 'rows': rows,
            'notes': [f'torch.profiler over {n} steps after {sizes["warmup"]} warm-up; the top {top} '
                      f'of {len(events)} operators by self {what} time ({total / 1000 / n:.1f} ms '
                      'per step in all).']}


# --- 3b. end to end from hkl files -----------------------------------------------------------------
def write_dataset(root, n_train, n_val, batch, size, classes, seed=0):
    """Synthetic batch files as preprocessing writes them (4 distinct ones, repeated), labels, a
    mean image and dataset.yaml. Returns the config keys pointing at them."""
    import numpy as np
    from benchmarks.host_feed import write_batches
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
    """(img/s of the last epoch, mean data wait ms per step in it) of a train.py run."""
    cmd = [sys.executable, 'train.py'] + [f'{k}={v}' for k, v in values.items()]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f'train.py exited {r.returncode}: '
                           f'{(r.stderr.strip() or r.stdout.strip()).splitlines()[-1][:300]}')
    last = values['n_epochs']
    img_s = float(re.findall(rf'^epoch {last} \|.* ([\d.]+) img/s$', r.stdout, re.M)[-1])
    waits = [float(w) for w in re.findall(rf'^epoch {last} iter .*\| data wait ([\d.]+) ms', r.stdout, re.M)]
    return img_s, statistics.mean(waits)


def e2e_table(args, sizes, budget, device, best, synthetic_img_s):
    e = sizes['e2e']
    work = tempfile.mkdtemp(prefix='bench-gpu-e2e-', dir=args.work_dir)
    rows, notes = [], []
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
            if budget.left() < 60 * (not args.cpu_smoke):
                row['img/s'] = 'skipped (time budget)'
                continue
            try:
                img_s, wait = run_train(dict(common, para_load=para, weights_dir=os.path.join(work, f'w{para}')),
                                        timeout=max(60, budget.left()))
            except (RuntimeError, subprocess.TimeoutExpired, IndexError, statistics.StatisticsError) as ex:
                row['img/s'] = f'failed: {str(ex)[:300]}'
                continue
            step = 1000 * e['batch'] / img_s
            row.update({'img/s': img_s, 'step ms': step, 'data wait ms': wait,
                        'data wait % of step': 100 * wait / step,
                        'x synthetic': f'{img_s / synthetic_img_s:.2f}x' if synthetic_img_s else '-'})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    title = (f'End to end from hkl files: train.py, {e["model"]} {e["crop"]}, batch {e["batch"]}, '
             f'{best["precision"]} {best["layout"]} eager (the best row of the eager step table)')
    if synthetic_img_s:
        notes.append(f'`x synthetic`: img/s over the same configuration on synthetic input in the '
                     f'step table ({synthetic_img_s:.0f} img/s).')
    notes.append('data wait: the time the loop waits for its next batch, per step (train.py log '
                 'lines).')
    return {'title': title, 'columns': ['input', 'img/s', 'step ms', 'data wait ms',
                                        'data wait % of step', 'x synthetic'],
            'rows': rows, 'notes': notes}


# --- 3c. the exchange ------------------------------------------------------------------------------
def exchange_table(args, sizes, device, steps):
    from benchmarks import exchange as bx
    x = sizes['exchange']
    transport = 'ipc' if device.type == 'cuda' else 'shm'
    ms, nbytes = bx.time_exchange(transport, str(device), x['repeats'], x['net'])
    copy = bx.time_copy(nbytes, device, x['repeats'])
    rows = [{'what': f'device copy of the same {nbytes / 1e6:.0f} MB, 1 process (floor)', 'ms': copy,
             'x copy': '1.00'},
            {'what': f'{transport} exchange, 2 processes on {device}, each averages half',
             'ms': ms, 'x copy': f'{ms / copy:.2f}'}]
    for batch, step in steps:
        rows[1][f'% of a batch-{batch} step'] = 100 * ms / step
    cols = ['what', 'ms', 'x copy'] + [f'% of a batch-{b} step' for b, _ in steps]
    return {'title': f'Exchange of {x["net"]} [params | momentum], {nbytes / 1e6:.0f} MB per worker',
            'columns': cols, 'rows': rows,
            'notes': [f'medians of {x["repeats"]} exchanges after a warm-up one (benchmarks/exchange.py); '
                      'steps: the best rows of the step table (train_2gpu.py runs batch 128 per worker).']}


# --- main ------------------------------------------------------------------------------------------
FULL = {'alexnet_batches': (256, 128), 'alexnet_cifar_batches': (256, 128), 'steps': 20,
        'warmup': 3, 'backend': 'inductor', 'compile_keep': lambda precision, layout: True,
        'e2e': dict(model='alexnet', crop=227, size=256, batch=256, files=80, epochs=2, classes=1000),
        'exchange': dict(net='alexnet', repeats=10)}
SMOKE = {'alexnet_batches': (2,), 'alexnet_cifar_batches': (4,), 'steps': 1, 'warmup': 1,
         'backend': 'eager', 'compile_keep': lambda precision, layout: (precision, layout) == ('fp32', 'nchw'),
         'e2e': dict(model='alexnet_cifar', crop=32, size=36, batch=8, files=4, epochs=1, classes=10),
         'exchange': dict(net='alexnet_cifar', repeats=2)}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog='python -m benchmarks.gpu', description=__doc__.split('\n')[0])
    p.add_argument('out_dir', help='folder for gpu_report.md / .json and cuda_tests.log')
    p.add_argument('--cpu-smoke', action='store_true',
                   help='every part with tiny sizes on the CPU (what CI checks)')
    p.add_argument('--budget-s', type=float, default=540.0,
                   help='stop starting rows after this many seconds (540)')
    p.add_argument('--tests-timeout', type=float, default=300.0, help='for the CUDA tests (300)')
    p.add_argument('--skip-tests', action='store_true', help='no CUDA tests, speed only')
    p.add_argument('--work-dir', help='where the e2e batch files go (default: the temporary folder)')
    args = p.parse_args(argv)
    args.argv = argv
    problem = import_problem()
    if problem:
        print(problem, file=sys.stderr)
        return 2
    import torch
    version = tuple(int(n) for n in re.findall(r'\d+', torch.__version__)[:2])
    if version < MIN_TORCH:
        print(f'notice: torch {torch.__version__} is older than {MIN_TORCH[0]}.{MIN_TORCH[1]}, '
              'which the project is checked with', file=sys.stderr)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print('error: no CUDA device here (torch.cuda.is_available() is False); use --cpu-smoke '
              'to check the command on the CPU', file=sys.stderr)
        return 2
    os.makedirs(args.out_dir, exist_ok=True)
    budget = Budget(args.budget_s)
    device = torch.device('cpu' if args.cpu_smoke else 'cuda:0')
    sizes = SMOKE if args.cpu_smoke else FULL
    report = Report(args.out_dir, meta(args, torch))
    report.write()
    say = lambda text: print(f'[{args.budget_s - budget.left():5.0f} s] {text}', flush=True)  # noqa: E731
    if not args.skip_tests:
        say('CUDA tests ...')
        part = run_tests(args, budget)
        report.add(part)
        say(part['notes'][0])
    say('step table, alexnet (eager) ...')
    big = sizes['alexnet_batches'][0]
    steps = step_table(torch, args, sizes, budget, device, 'alexnet', 227, 1000,
                       'AlexNet 227, synthetic input: step times (eager)',
                       configs(sizes['alexnet_batches'], False))
    report.add(steps)
    best = best_row(steps, big)
    if best is None:
        report.add({'title': 'End to end and exchange', 'error': 'no row of the step table ran'})
        return 1
    say(f'best batch-{big} row: {best["precision"]} {best["layout"]}, {best["img/s"]:.0f} img/s; '
        'cuDNN autotuning off ...')
    report.add(autotune_table(torch, args, sizes, budget, device, best))
    say('exchange ...')
    step_ms = [(b, r['step ms']) for b in sizes['alexnet_batches'] if (r := best_row(steps, b))]
    if budget.left() > 45 * (not args.cpu_smoke):
        try:
            report.add(exchange_table(args, sizes, device, step_ms))
        except Exception as e:  # noqa: BLE001 -- the report says what failed; the rest goes on
            report.add({'title': 'Exchange', 'error': f'{type(e).__name__}: {e}'})
    else:
        report.add({'title': 'Exchange', 'error': 'skipped (time budget)'})
    say('profile ...')
    try:
        report.add(profile_table(torch, sizes, device, best))
    except Exception as e:  # noqa: BLE001
        report.add({'title': 'Profile', 'error': f'{type(e).__name__}: {e}'})
    say('end to end from hkl files ...')
    same_model = sizes['e2e']['model'] == 'alexnet'  # --cpu-smoke: alexnet_cifar, no ratio
    report.add(e2e_table(args, sizes, budget, device, best, best['img/s'] if same_model else None))
    say('step table, alexnet_cifar ...')
    report.add(step_table(torch, args, sizes, budget, device, 'alexnet_cifar', 32, 10,
                          'alexnet_cifar 32 px (CIFAR-size), synthetic input, for scale',
                          configs(sizes['alexnet_cifar_batches'], False)))
    # last: compiling costs about a minute per row; the rows the budget leaves no room for say so
    say('step table, alexnet (compile) ...')
    report.add(step_table(torch, args, sizes, budget, device, 'alexnet', 227, 1000,
                          f'Compiled: AlexNet 227, batch {big}, torch.compile',
                          configs([big], True, sizes['compile_keep']), eager=steps))
    say(f'done: {os.path.join(args.out_dir, "gpu_report.md")}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
