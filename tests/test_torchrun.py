"""train.py under torchrun (gloo on CPU): N ranks train exactly as one worker, in both exchange
modes; a dead rank stops the others; --max-restarts resumes from the last snapshot; in an elastic
job (--nnodes=1:2) a node that joins is taken in and the ranks resume; batch_size is checked
against every world size the --nnodes range allows."""
import os
import re
import signal
import subprocess
import sys
import threading
import time
import types
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import train
from lib import config, training
from tests.helpers import children, make_batches
from tests.test_loader import gone_within
from tests.test_train_2gpu import COMMON, EXACT, EXACT_TOLERANCE, args, free_port, relative_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def own_temp_dir(tmp_path, monkeypatch):
    """torchrun's agent leaves a torchelastic_* folder in the temporary directory of every run:
    the launches here put theirs in the test's own folder, which pytest cleans up."""
    monkeypatch.setenv('TMPDIR', str(tmp_path))


def torchrun(n, extra=()):
    return [sys.executable, '-m', 'torch.distributed.run', f'--nproc-per-node={n}',
            '--rdzv-backend=c10d', f'--rdzv-endpoint=127.0.0.1:{free_port()}', *extra,
            os.path.join(ROOT, 'train.py')]


# an elastic rendezvous that completes 1 s after its fewest nodes are there (torch: 30 s) and
# takes a node for lost after 3 s without a heartbeat (torch: 15 s)
QUICK_RDZV = 'last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3'
# EXACT (random crops and mirrors, shuffled files, fp64; alexnet_cifar has no dropout) at a
# learning rate at which these runs of many steps keep training: at 0.01 they diverge (a cost
# of 1e5 in epoch 1) into weights that hardly move, a weaker comparison
DEFAULTS = dict(EXACT, learning_rate=0.001)


class Lines:
    """A process's output, read in a thread, with the time each line came."""

    def __init__(self, proc):
        self.proc, self.lines = proc, []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))

    def when(self, pattern, timeout):
        """The time the first line matching `pattern` (a regex) came: waits for it."""
        deadline = time.monotonic() + timeout
        while True:
            for t, line in list(self.lines):
                if re.search(pattern, line):
                    return t
            assert self.thread.is_alive() and time.monotonic() < deadline, \
                f'no line {pattern!r} within {timeout} s:\n' + self.text()[-4000:]
            time.sleep(0.1)

    def finish(self, timeout):
        """(exit code, whole output); the process killed if still running after `timeout` s."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.thread.join(10)
        return self.proc.returncode, self.text()

    def text(self):
        return ''.join(line for _, line in list(self.lines))


def one_worker(values):
    """train.py's run of `values` in this process, on one thread as the ranks have
    (OMP_NUM_THREADS=1): on a loaded machine of 2 cores two threads ran 4 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return training.run(config.merge({**config.CONFIG, **config.SPEC_1GPU}, [('test', values, None)]))
    finally:
        torch.set_num_threads(threads)


def environ_of(pid):
    """A process's environment ({} if it is gone)."""
    try:
        with open(f'/proc/{pid}/environ', 'rb') as f:
            return dict(kv.decode().split('=', 1) for kv in f.read().split(b'\0') if b'=' in kv)
    except OSError:
        return {}


def cmdline(pid):
    """A process's command line, as it is in /proc (b'' if it is gone)."""
    try:
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
            return f.read()
    except OSError:
        return b''


def rank_of(pid):
    env = environ_of(pid)
    return int(env['RANK']) if 'RANK' in env else None


def ranks(agent_pid):
    """{rank: pid} of the workers torchrun's agent started."""
    return {rank_of(p): p for p in children(agent_pid) if rank_of(p) is not None}


@pytest.fixture(scope='module')
def single(tmp_path_factory):
    """One worker on the whole batches, per seed: the reference every torchrun run must match
    (in float64: see EXACT in test_train_2gpu)."""
    done = {}

    def reference(seed):
        if seed not in done:
            root = tmp_path_factory.mktemp(f'torchrun{seed}')
            keys = make_batches(str(root / 'data'), n_train=4, n_val=2, batch=8, size=36, seed=seed)
            training.run(config.merge({**config.CONFIG, **config.SPEC_1GPU}, [(
                'test', dict(keys, **EXACT, seed=seed, gpu='cpu', weights_dir=str(root / 'w1')), None)]))
            done[seed] = keys, torch.load(root / 'w1' / 'model_2.pt', weights_only=True)
        return done[seed]
    return reference


@pytest.mark.parametrize('n,mode,seed', [(2, 'average', 0), (4, 'gradients', 0),
                                         (4, 'average', 1), (2, 'gradients', 2)])
def test_n_ranks_equal_one_worker(tmp_path, single, n, mode, seed):
    keys, ref = single(seed)
    values = dict(keys, **EXACT, seed=seed, gpu='cpu', weights_dir=str(tmp_path / 'w'), exchange=mode)
    r = subprocess.run(torchrun(n) + args(values), capture_output=True, text=True, timeout=300,
                       cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS='1', PYTHONFAULTHANDLER='1'))
    # a crash shows where it happened: the Python stacks (faulthandler) and how far training got
    assert r.returncode == 0, r.stdout[-1500:] + '\n--- stderr:\n' + r.stderr[-6000:]
    assert r.stdout.count('done: epoch 2') == 1  # rank 0 alone reports
    assert f'batches of 8 ({n} workers x {8 // n})' in r.stdout
    got = torch.load(tmp_path / 'w' / 'model_2.pt', weights_only=True)
    for part in ('model', 'momentum'):
        for k in ref[part]:
            assert relative_error(got[part][k], ref[part][k]) < EXACT_TOLERANCE, (mode, n, part, k)
    assert got['val_record'].numpy() == pytest.approx(ref['val_record'].numpy(), rel=1e-5)


def test_a_dead_rank_stops_the_others(tmp_path):
    keys = make_batches(str(tmp_path / 'data'), n_train=300, n_val=2, batch=8, size=36)
    values = dict(keys, **dict(COMMON, n_epochs=50), gpu='cpu', weights_dir=str(tmp_path / 'w'),
                  peer_timeout=20.0)
    proc = subprocess.Popen(torchrun(2) + args(values), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        for line in proc.stdout:
            if 'epoch 1 iter' in line:
                break
        pids = ranks(proc.pid)
        assert sorted(pids) == [0, 1]
        t0 = time.monotonic()
        os.kill(pids[1], signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert elapsed < 20.0 + 15.0
    # whoever is first: rank 0 names the failure itself, or torchrun's agent saw rank 1 die and
    # stopped rank 0 (SIGTERM) before it got there
    assert ('rank 0: error: a peer rank died, stalled or failed (torch.distributed:' in err
            or f'exitcode: -9) local_rank: 1 (pid: {pids[1]})' in err), err[-3000:]
    for pid in pids.values():
        assert gone_within(pid, 10)


def test_max_restarts_resumes_from_the_last_snapshot(tmp_path):
    keys = make_batches(str(tmp_path / 'data'), n_train=100, n_val=2, batch=8, size=36)
    values = dict(keys, **dict(COMMON, n_epochs=3, print_freq=10), gpu='cpu',
                  weights_dir=str(tmp_path / 'w'), peer_timeout=20.0)
    proc = subprocess.Popen(torchrun(2, ['--max-restarts=1']) + args(values), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith('epoch 2 iter'):
                break
        os.kill(ranks(proc.pid)[1], signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert 'torchrun round 2: resuming from epoch 1 on 2 ranks (2 in round 1)' in out
    assert 'done: epoch 3' in out
    state = torch.load(tmp_path / 'w' / 'model_3.pt', weights_only=True)
    assert [h['epoch'] for h in state['history']] == [1, 2, 3]


def test_batch_that_does_not_split_is_a_one_line_error(tmp_path):
    """Over this world size, and over every one that --nnodes=MIN:MAX allows: an elastic job
    whose batch_size does not split over 2 nodes x 2 ranks stops at its start on 1 node, in
    one line per rank, rather than at a change of nodes hours later."""
    keys = make_batches(str(tmp_path / 'data'), n_train=1, n_val=1, batch=6, size=36)
    values = dict(keys, **COMMON, gpu='cpu', weights_dir=str(tmp_path / 'w'))
    r = subprocess.run(torchrun(4) + args(values), capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert r.returncode != 0
    assert 'error: batch_size 6 does not split over 4 torchrun ranks' in r.stderr
    r = subprocess.run(torchrun(2, ['--nnodes=1:2', f'--rdzv-conf={QUICK_RDZV}']) + args(values),
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if ': error: ' in line]
    assert sorted(errors) == [
        f'rank {n}: error: batch_size 6 does not split over 4 torchrun ranks, which --nnodes=1:2 '
        'allows (1 to 2 nodes x 2 ranks: 2, 4 ranks) (under torchrun batch_size is the images of '
        'all ranks together, as many as a batch file holds: not per rank): narrow --nnodes, or '
        'preprocess batches of a multiple of 4 images' for n in (0, 1)], r.stderr[-3000:]
    assert not os.path.exists(tmp_path / 'w')


@pytest.mark.parametrize('form', ['module', 'console script', 'no -m', 'plain python'])
def test_torchrun_launch_reads_the_agents_command_line(tmp_path, monkeypatch, form):
    """train.torchrun_launch() parses its parent's /proc/PID/cmdline with torchrun's parser, for
    both forms an agent's command line takes (`python -m torch.distributed.run ...`, and the
    console script `torchrun ...`, whose command line is `python /path/to/torchrun ...`); a
    parent that is no torchrun (or names torch.distributed.run without -m) gives None. The parent
    here is a sleeping python whose command line has that shape (what follows -c or a script is
    its argv, visible in /proc)."""
    sleep = 'import time; time.sleep(60)'
    options = ['--nnodes=1:3', '--nproc-per-node=2', '--rdzv-backend=c10d',
               '--rdzv-endpoint=127.0.0.1:1234', 'train.py', 'n_epochs=2']
    if form == 'module':
        argv = ['-c', sleep, '-m', 'torch.distributed.run', *options]
    elif form == 'console script':
        script = tmp_path / 'bin' / 'torchrun'
        script.parent.mkdir()
        script.write_text(sleep + '\n')
        argv = [str(script), *options]
    elif form == 'no -m':
        argv = ['-c', sleep, 'torch.distributed.run', *options]
    else:
        argv = ['-c', sleep]
    proc = subprocess.Popen([sys.executable, *argv], stdin=subprocess.DEVNULL)
    try:
        # (the parent of a vfork returns when the child execs, before the kernel has set the
        # child's arguments: its cmdline can be empty for a moment)
        deadline = time.monotonic() + 30
        while not cmdline(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        monkeypatch.setattr(os, 'getppid', lambda: proc.pid)
        launch = train.torchrun_launch()
    finally:
        proc.kill()
        proc.wait()
    if form in ('no -m', 'plain python'):
        assert launch is None
    else:
        assert (launch.nnodes, launch.nproc_per_node, launch.rdzv_backend, launch.rdzv_endpoint,
                launch.standalone, launch.training_script, launch.training_script_args) == (
            '1:3', '2', 'c10d', '127.0.0.1:1234', False, 'train.py', ['n_epochs=2'])


def test_job_store_reaches_the_rendezvous_store_of_a_c10d_job():
    """train.job_store(): a client of the TCPStore at --rdzv-endpoint for a c10d rendezvous (it
    sees what the store's host set), None where there is none to reach; nothing listening there
    is a one-line DistError naming host:port and --rdzv-endpoint."""
    host = dist.TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=30))
    host.set('alexnet/test', 'from the host')

    def launch(**over):
        return types.SimpleNamespace(**dict(dict(
            standalone=False, rdzv_backend='c10d', rdzv_endpoint=f'127.0.0.1:{host.port}'), **over))
    store = train.job_store(launch(), timedelta(seconds=30))
    assert store.get('alexnet/test') == b'from the host'
    for other in (launch(standalone=True), launch(rdzv_backend='static'),
                  launch(rdzv_backend='etcd-v2'), launch(rdzv_endpoint='')):
        assert train.job_store(other, timedelta(seconds=30)) is None, other
    assert train.job_store(None, timedelta(seconds=30)) is None
    port = free_port()
    with pytest.raises(dist.DistError) as e:
        train.job_store(launch(rdzv_endpoint=f'127.0.0.1:{port}'), timedelta(seconds=1))
    message = str(e.value)
    assert '\n' not in message and message.startswith(
        f"cannot reach torchrun's rendezvous store at 127.0.0.1:{port} (--rdzv-endpoint): "), message


def test_check_batch_split_names_the_world_sizes_nnodes_allows(monkeypatch):
    """train.check_batch_split() directly: batch_size must split over every world size that
    --nnodes=MIN:MAX allows (MIN..MAX nodes of LOCAL_WORLD_SIZE ranks), with the message naming
    them and the multiple that would; with a fixed --nnodes (or no torchrun command line) only
    over this world size."""
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')
    what = ('(under torchrun batch_size is the images of all ranks together, as many as a batch '
            'file holds: not per rank)')
    elastic = types.SimpleNamespace(nnodes='1:3')
    assert train.check_batch_split(12, 2, elastic) is None
    with pytest.raises(config.ConfigError) as e:
        train.check_batch_split(8, 2, elastic)
    assert str(e.value) == (
        'batch_size 8 does not split over 6 torchrun ranks, which --nnodes=1:3 allows (1 to 3 '
        f'nodes x 2 ranks: 2, 4, 6 ranks) {what}: narrow --nnodes, or preprocess batches of a '
        'multiple of 12 images')
    for launch in (types.SimpleNamespace(nnodes='2'), None):
        assert train.check_batch_split(8, 4, launch) is None
        with pytest.raises(config.ConfigError) as e:
            train.check_batch_split(6, 4, launch)
        assert str(e.value) == f'batch_size 6 does not split over 4 torchrun ranks {what}'


def test_a_restart_resumes_from_rank_0s_epoch_or_stops_every_rank(tmp_path):
    """Two 'nodes' with their own weights_dir (ranks started by hand, as torchrun's restart 1,
    with no torchrun command line, so no rendezvous store, to read): rank 0 holds snapshots 1
    and 2, rank 1 only 1. Rank 0's node was started again (its restart count is 0, rank 1's 1):
    a restart of one rank is a restart for all, so rank 0 decides to resume (epoch 2); rank 1
    cannot resume from it, so both stop with one line instead of averaging different epochs.
    Once rank 1 holds snapshot 2 too, the same start resumes from it on both (one epoch more),
    and rank 0 says so."""
    keys = make_batches(str(tmp_path / 'data'), n_train=2, n_val=1, batch=8, size=36)
    base = dict(keys, **dict(COMMON, n_epochs=2), gpu='cpu', peer_timeout=30.0)
    training.run(config.merge({**config.CONFIG, **config.SPEC_1GPU},
                           [('test', dict(base, weights_dir=str(tmp_path / 'w0')), None)]))
    os.makedirs(tmp_path / 'w1')
    os.link(tmp_path / 'w0' / 'model_1.pt', tmp_path / 'w1' / 'model_1.pt')

    def restart():
        """Both ranks, as torchrun's restart 1 on rank 1's node: (their exit codes, outputs)."""
        port = free_port()
        procs = []
        for rank in (0, 1):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2',
                       MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port),
                       TORCHELASTIC_RESTART_COUNT=str(rank), OMP_NUM_THREADS='1')
            values = dict(base, n_epochs=3, weights_dir=str(tmp_path / f'w{rank}'))
            procs.append(subprocess.Popen(
                [sys.executable, os.path.join(ROOT, 'train.py')] + args(values),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env))
        outs = [p.communicate(timeout=120) for p in procs]
        return [p.returncode for p in procs], outs

    codes, outs = restart()
    assert codes == [2, 2], outs
    assert outs[1][1].strip().splitlines() == [
        f"rank 1: error: rank 0 resumes from epoch 2 but this rank has no "
        f"{tmp_path / 'w1' / 'model_2.pt'} (a restart needs weights_dir shared by every node)"]
    assert 'rank 0: error: rank 0 resumes from epoch 2 but another rank has no' in outs[0][1]
    assert not os.path.exists(tmp_path / 'w0' / 'model_3.pt')
    os.link(tmp_path / 'w0' / 'model_2.pt', tmp_path / 'w1' / 'model_2.pt')
    codes, outs = restart()
    assert codes == [0, 0], outs
    assert 'torchrun restart 1: resuming from epoch 2 on 2 ranks\n' in outs[0][0], outs[0]
    assert 'torchrun restart' not in outs[1][0], outs[1]
    # (rank 0 writes the snapshots: its history goes on from model_2.pt's)
    before = torch.load(tmp_path / 'w0' / 'model_2.pt', weights_only=True)['history']
    after = torch.load(tmp_path / 'w0' / 'model_3.pt', weights_only=True)['history']
    assert [h['epoch'] for h in after] == [1, 2, 3] and after[:2] == before


def test_resuming_a_snapshot_of_another_network_is_a_one_line_error(tmp_path):
    keys = make_batches(str(tmp_path / 'data'), n_train=1, n_val=1, batch=8, size=36)
    cfg = config.merge({**config.CONFIG, **config.SPEC_1GPU}, [('test', dict(
        keys, **dict(COMMON, n_epochs=1), gpu='cpu', weights_dir=str(tmp_path / 'w')), None)])
    training.run(cfg)
    more = dict(cfg, n_epochs=2, resume_train=True, load_epoch=1)
    with pytest.raises(config.ConfigError, match=r'model_1.pt holds classifier.weight of shape '
                                                 r'\(3, 1024\), this run \(5, 1024\)'):
        training.run(dict(more, num_classes=5))
    with pytest.raises(config.ConfigError, match=r'model_1.pt was trained with crop_size 32, '
                                                 r'this run has crop_size 28'):
        training.run(dict(more, crop_size=28))


@pytest.mark.parametrize('mode', ['average', 'gradients'])
def test_ranks_resume_two_plus_two_epochs_as_four(tmp_path, mode):
    """Every rank loads the snapshot: 2 epochs, then `resume_train=True load_epoch=2` to 4, give
    the weights of 4 epochs in one go (fp64, 1e-9). A rank that ignored it would start from the
    initial weights (gradients: DDP broadcast them before the resume) or average them in."""
    keys = make_batches(str(tmp_path / 'data'), n_train=3, n_val=2, batch=8, size=36)
    base = dict(keys, **{k: v for k, v in EXACT.items() if k != 'n_epochs'}, gpu='cpu',
                exchange=mode, exchange_freq=2 if mode == 'average' else 1)
    env = dict(os.environ, OMP_NUM_THREADS='1')
    for name, over in (('full', dict(n_epochs=4)), ('part', dict(n_epochs=2)),
                       ('part', dict(n_epochs=4, resume_train=True, load_epoch=2))):
        values = dict(base, weights_dir=str(tmp_path / name), **over)
        r = subprocess.run(torchrun(2) + args(values), capture_output=True, text=True, timeout=300,
                           cwd=tmp_path, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
    assert 'resumed from' in r.stdout
    a = torch.load(tmp_path / 'full' / 'model_4.pt', weights_only=True)
    b = torch.load(tmp_path / 'part' / 'model_4.pt', weights_only=True)
    for part in ('model', 'momentum'):
        for k in a[part]:
            assert relative_error(b[part][k], a[part][k]) < EXACT_TOLERANCE, (mode, part, k)
    assert [h['val_loss'] for h in b['history']] == pytest.approx(
        [h['val_loss'] for h in a['history']], rel=1e-9)


def test_train_py_names_a_dead_rank_itself(tmp_path):
    """Ranks started by hand (no torchrun agent to stop the survivor first): rank 1 is killed,
    and rank 0 stops by itself, in seconds, with train.py's one-line error and exit code 2."""
    keys = make_batches(str(tmp_path / 'data'), n_train=300, n_val=2, batch=8, size=36)
    values = dict(keys, **dict(COMMON, n_epochs=50), gpu='cpu', weights_dir=str(tmp_path / 'w'),
                  peer_timeout=20.0)
    port, procs = free_port(), []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2',
                   MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), OMP_NUM_THREADS='1')
        procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py')] + args(values),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      cwd=tmp_path, env=env))
    try:
        for line in procs[0].stdout:
            if 'epoch 1 iter' in line:
                break
        procs[1].kill()
        t0 = time.monotonic()
        out, err = procs[0].communicate(timeout=20.0 + 30)
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert procs[0].returncode == 2, err[-3000:]
    assert elapsed < 20.0 + 10.0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        'rank 0: error: a peer rank died, stalled or failed (torch.distributed: '), err[-3000:]


def elastic_node(n, port, is_host, tmp_path, values, restarts=0):
    """One node of an elastic job (--nnodes=1:2) on this host: torchrun's agent and n ranks."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes=1:2', f'--nproc-per-node={n}',
           '--rdzv-backend=c10d', f'--rdzv-endpoint=127.0.0.1:{port}', '--rdzv-id=job',
           f'--rdzv-conf={QUICK_RDZV},is_host={int(is_host)}', '--local-addr=127.0.0.1',
           f'--max-restarts={restarts}', os.path.join(ROOT, 'train.py')] + args(values)
    env = dict(os.environ, OMP_NUM_THREADS='1', TORCH_DISABLE_SHARE_RDZV_TCP_STORE='1')
    return Lines(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, cwd=tmp_path, env=env))


def test_a_node_that_joins_later_is_taken_in_and_resumes(tmp_path):
    """An elastic job (--nnodes=1:2, no restarts allowed) starts on one node of 1 rank; a second
    node joins once model_1.pt is written. torchrun restarts the ranks without a failure (the
    restart count stays 0 on both nodes): they resume from the newest snapshot on 2 ranks, with
    no error, and 2 epochs later hold the weights of one uninterrupted worker (random crops,
    mirrors and shuffling on, fp64). The job is then stopped: it is long (50 epochs) so that it
    cannot end before the second node is in, however slow that node is to start."""
    keys = make_batches(str(tmp_path / 'data'), n_train=10, n_val=2, batch=8, size=36)
    values = dict(keys, **dict(DEFAULTS, n_epochs=50, print_freq=10), gpu='cpu', peer_timeout=30.0,
                  weights_dir=str(tmp_path / 'w'))
    port = free_port()
    nodes = [elastic_node(1, port, True, tmp_path, values)]
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(tmp_path / 'w' / 'model_1.pt'):
            assert nodes[0].proc.poll() is None and time.monotonic() < deadline, nodes[0].text()
            time.sleep(0.1)
        t_join = time.monotonic()
        nodes.append(elastic_node(1, port, False, tmp_path, values))
        pattern = r'^torchrun round 2: resuming from epoch (\d+) on 2 ranks \(1 in round 1\)$'
        t_resume = nodes[0].when(pattern, 120)
        print(f'the ranks resumed {t_resume - t_join:.1f} s after the second node was started')
        resumed = int(re.search(pattern, nodes[0].text(), re.M).group(1))
        counts = [environ_of(pid).get('TORCHELASTIC_RESTART_COUNT')
                  for n in nodes for pid in children(n.proc.pid)]
        end = tmp_path / 'w' / f'model_{resumed + 2}.pt'
        while not os.path.exists(end):
            assert all(n.proc.poll() is None for n in nodes) and time.monotonic() < deadline + 120, \
                nodes[0].text()[-3000:] + nodes[1].text()[-3000:]
            time.sleep(0.1)
        out = nodes[0].text() + nodes[1].text()
    finally:
        for n in nodes:
            n.proc.terminate()  # torchrun's agent stops its ranks
            n.finish(60)
    assert counts == ['0', '0'], counts
    assert 'batches of 8 (1 workers x 8)' in out and 'batches of 8 (2 workers x 4)' in out
    assert 'error:' not in out and 'Traceback' not in out, out[-6000:]
    n = resumed + 2
    one_worker(dict(values, n_epochs=n, weights_dir=str(tmp_path / 'w1')))  # (lr_policy step:
    # the weights of epoch n do not depend on n_epochs)
    state = torch.load(end, weights_only=True)
    ref = torch.load(tmp_path / 'w1' / f'model_{n}.pt', weights_only=True)
    assert [h['epoch'] for h in state['history']] == list(range(1, n + 1))
    for part in ('model', 'momentum'):
        for k in ref[part]:
            assert relative_error(state[part][k], ref[part][k]) < EXACT_TOLERANCE, (part, k)


def test_a_rank_started_by_hand_is_a_first_round_not_a_restart(tmp_path):
    """Without torchrun's TORCHELASTIC_RESTART_COUNT (ranks started by hand) a run is a fresh
    one: into a weights_dir of another run's snapshots it is refused, not resumed from them."""
    keys = make_batches(str(tmp_path / 'data'), n_train=1, n_val=1, batch=8, size=36)
    values = dict(keys, **dict(COMMON, n_epochs=1), gpu='cpu', weights_dir=str(tmp_path / 'w'))
    env = {k: v for k, v in os.environ.items() if not k.startswith('TORCHELASTIC_')}
    env.update(RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', MASTER_ADDR='127.0.0.1',
               MASTER_PORT=str(free_port()), OMP_NUM_THREADS='1')

    def run(n_epochs):
        return subprocess.run([sys.executable, os.path.join(ROOT, 'train.py')]
                              + args(dict(values, n_epochs=n_epochs)),
                              capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    first = run(1)
    assert first.returncode == 0, first.stderr[-3000:]
    again = run(2)
    assert again.returncode == 2 and 'holds the snapshots of another run' in again.stderr, again.stderr[-3000:]
    assert not (tmp_path / 'w' / 'model_2.pt').exists()
