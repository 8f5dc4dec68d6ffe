"""Train AlexNet with two worker processes that average their weights after every step.

    python train_2gpu.py                              # config.yaml <- spec_2gpu.yaml
    python train_2gpu.py gpu0=cpu gpu1=cpu            # two CPU workers (shared memory)
    python train_2gpu.py --config my.yaml --spec my_spec.yaml n_epochs=10
    python train_2gpu.py data=data/cifar10 model=alexnet_cifar crop_size=28   # batch_size: half
    python train_2gpu.py weights_dir=W resume_train=True n_epochs=60  # the newest snapshot of W

batch_size is per worker: each takes half of every batch file (data's batch / 2 by default).
A resume takes W's saved config; key=value may change what does not break it (as train.py).

Each worker runs train.py's loop on its half of every batch (worker r: images [r*b, (r+1)*b) of
every NNNN.hkl of 2b images, or the NNNN_<r>.hkl halves; lib/data.py) from the same initial
weights; every exchange_freq steps they average parameters and momentum over the
exchange_transport (lib/exchange.py), with barriers and metrics on a ZeroMQ link (lib/link.py):
a unix socket in the launcher's private folder (mode 0700, on /dev/shm), which no other user can
reach. Worker 0 logs and writes weights_dir (as train.py does).

If a worker dies or stalls, the other stops within peer_timeout naming it and the step, and
this launcher stops what is left and exits non-zero; Ctrl-C or SIGTERM stops everything (exit
code 130). The launcher killed (SIGKILL): the workers stop by themselves within a second or two,
and the private folder's keeper (KEEPER below) removes the folder once they are gone.

On two hosts: set exchange_host (the address worker 0 binds) and curve_dir (keys made by
`python train_2gpu.py --make-keys DIR`, copied to both hosts), then run
`python train_2gpu.py --worker 0 ...` on the first host and `--worker 1 ...` on the second.
"""
import multiprocessing
import multiprocessing.connection
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time

import lib.env  # noqa: F401  first: without the packages, one line instead of a traceback
import torch

from lib import SHM, UserError, checkpoint, command, config, exchange, link, runs, trainer, training

SCHEMA = {**config.CONFIG, **config.SPEC_2GPU}


def devices(cfg):
    """The two workers' devices; a bad one is a ValueError naming its key (gpu0 / gpu1)."""
    return [trainer.resolve_device(cfg[f'gpu{r}'], key=f'gpu{r}') for r in (0, 1)]


def check_start(cfg):
    """The workers' start-up checks that cost little, once before they start (one error line,
    not one per worker and the launcher's): both workers' data (headers, labels and the mean; not
    synthetic batches, which are made whole), and that a fresh run does not mix with another
    run's snapshots (moving them aside with overwrite is left to worker 0). The workers check
    again (two hosts: only they can). The network's crop was checked with the config."""
    for r in () if cfg['synthetic'] else (0, 1):
        training.checked_data(cfg, training.Worker(share=(r, 2)), quiet=True)
    if not cfg['resume_train']:
        checkpoint.check_fresh_start(cfg['weights_dir'], cfg['overwrite'], move=False)


# The launcher's private folder (the link's socket, the shm transport's buffers) has a keeper: a
# tiny process in a session of its own (a Ctrl-C or a closed terminal that ends the launcher's
# process group leaves it be) that makes the folder, prints its path, and removes it once the
# launcher has ended, however it ended (its stdin reaches EOF when the launcher's pipe closes, even
# on SIGKILL), and no worker holds the folder any more: each worker holds a shared flock on it for
# its whole life (a lock goes with its process, killed or not), and the keeper waits for an
# exclusive one, so a worker still starting or still mapping its buffers never has the folder
# removed under it. A worker that is stopped (SIGSTOP) is waited for at most KEEPER_WAIT seconds.
# From the moment the folder exists, its keeper exists: no moment leaves it behind.
KEEPER_WAIT = 60.0
KEEPER_ANSWER = 60.0  # seconds the launcher waits for the keeper to name its folder
KEEPER = r"""
import fcntl, os, sys, tempfile, time, shutil
try:
    folder = tempfile.mkdtemp(prefix='alexnet-2gpu-', dir=sys.argv[1] or None)  # mode 0700
except OSError as e:
    print(f'error: cannot make a private folder in {sys.argv[1] or tempfile.gettempdir()}: {e}',
          flush=True)
    sys.exit(1)
print(folder, flush=True)
sys.stdin.buffer.read()  # EOF: the launcher has ended (or is ending)
try:
    fd = os.open(folder, os.O_RDONLY)
except OSError:
    sys.exit(0)  # the launcher removed it
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # no worker holds the folder
        break
    except BlockingIOError:
        time.sleep(0.1)
shutil.rmtree(folder, ignore_errors=True)
"""


def start_keeper(root, wait=KEEPER_WAIT):
    """The keeper (above) of a new private folder in root: (its process, the folder)."""
    keeper = subprocess.Popen([sys.executable, '-I', '-c', KEEPER, root or '', str(wait)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    line = ''
    answered = select.select([keeper.stdout], [], [], KEEPER_ANSWER)[0]
    if answered:
        line = keeper.stdout.readline().decode().strip()
    keeper.stdout.close()
    if not line.startswith(os.sep):
        try:  # an end of its output is its exit, which may not have been waited for yet
            code = keeper.wait(5.0 if answered else 0)
        except subprocess.TimeoutExpired:
            code = None
        keeper.kill()
        keeper.wait()
        raise UserError(line.removeprefix('error: ') or (
            f"the keeper of the launcher's private folder (pid {keeper.pid}) "
            + (f'did not answer within {KEEPER_ANSWER:g} s' if code is None else f'exited with code {code}')))
    return keeper, line


def hold(run_dir):
    """Hold a shared lock on the launcher's folder for this worker's life (see KEEPER). False
    when the folder is gone: the launcher has ended already."""
    import fcntl  # POSIX: one host needs unix sockets anyway (Windows runs --worker, no folder)
    try:
        fd = os.open(run_dir, os.O_RDONLY)  # left open: the lock lasts as long as the process
        fcntl.flock(fd, fcntl.LOCK_SH)
        return os.path.samestat(os.fstat(fd), os.stat(run_dir))  # not removed before the lock
    except OSError:
        return False


def launcher_gone():
    print('worker: the launcher is gone; stopping', file=sys.stderr, flush=True)
    os._exit(3)


def watch_parent(parent):
    """Exit when the launcher is gone (killed -9): a worker never outlives it."""
    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        launcher_gone()
    threading.Thread(target=watch, daemon=True, name='watch-launcher').start()


def worker_main(rank, cfg, transport, run_dir, parent=None):
    """One worker: training.run on its half with the Pair exchanger. Returns the exit code
    (`command`'s, its lines naming the worker; Ctrl-C: the launcher says it).
    The link: tcp to exchange_host (two hosts, CURVE), else a socket in run_dir (one host)."""
    return command(work, who=f'worker {rank}: ', interrupted=None, sigterm=False)(
        rank, cfg, transport, run_dir, parent)


def work(rank, cfg, transport, run_dir, parent):
    if parent is not None:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if not hold(run_dir):
            launcher_gone()
        watch_parent(parent)
    device = trainer.resolve_device(cfg[f'gpu{rank}'], key=f'gpu{rank}')
    if device.type == 'cpu' and 'OMP_NUM_THREADS' not in os.environ:  # two workers share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    endpoint = (f"tcp://{cfg['exchange_host']}:{cfg['sock_gpu']}" if cfg['exchange_host']
                else f'ipc://{run_dir}/link')
    pair = exchange.Pair(rank, transport, endpoint, freq=cfg['exchange_freq'],
                         timeout=cfg['peer_timeout'], curve_dir=cfg['curve_dir'], shm_dir=run_dir)
    try:
        worker = training.Worker(pair, share=(rank, 2), gpu=cfg[f'gpu{rank}'],
                                 port=cfg[f'sock_data{rank}'])
        history = training.run(cfg, worker)
        if rank == 0:
            print(training.summary(cfg, history), flush=True)
    except UserError as e:  # the peer learns why this worker stops
        pair.close(reason=e)
        raise
    except KeyboardInterrupt:
        pair.close(reason='interrupted')
        raise
    except BaseException as e:
        pair.close(reason=f'{type(e).__name__}: {e}')
        raise
    pair.close()


def _child(rank, cfg, transport, run_dir, parent):
    sys.exit(worker_main(rank, cfg, transport, run_dir, parent))


def stop(procs, grace):
    """SIGINT, then SIGKILL after `grace` seconds, every worker still running."""
    for p in procs:
        if p.is_alive():
            os.kill(p.pid, signal.SIGINT)
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(5)


def launch(cfg):
    """Start both workers on this host and wait for them; the exit code of the run."""
    transport = exchange.transport_for(cfg['exchange_transport'], devices(cfg))
    keeper, run_dir = start_keeper(SHM)
    ctx = multiprocessing.get_context('spawn')
    procs = [ctx.Process(target=_child, name=f'alexnet-worker{r}',
                         args=(r, cfg, transport, run_dir, os.getpid())) for r in (0, 1)]
    print(f'train_2gpu: 2 workers on {cfg["gpu0"]} and {cfg["gpu1"]}, exchange over {transport} '
          f'every {cfg["exchange_freq"]} step(s), link ipc://{run_dir}/link', flush=True)
    try:
        for p in procs:
            p.start()
        print(f'train_2gpu: worker 0 pid {procs[0].pid}, worker 1 pid {procs[1].pid}', flush=True)
        return wait(procs, cfg['peer_timeout'])
    except KeyboardInterrupt:
        stop(procs, 10.0)
        raise
    finally:
        stop(procs, 5.0)
        shutil.rmtree(run_dir, ignore_errors=True)
        keeper.stdin.close()  # it finds the folder gone and exits
        try:
            keeper.wait(5.0)
        except subprocess.TimeoutExpired:  # a worker that SIGKILL could not end (it waits for it)
            pass


def wait(procs, peer_timeout):
    """Wait for both workers. When one fails, the other has a few seconds to notice (it names
    the failure itself) before it is stopped; when one ends well, the other should follow."""
    running, failed, deadline = list(procs), None, None
    while running:
        ready = multiprocessing.connection.wait([p.sentinel for p in running], timeout=1.0)
        for p in [p for p in running if p.sentinel in ready]:
            p.join()
            running.remove(p)
            if p.exitcode != 0 and failed is None:
                failed, deadline = p, time.monotonic() + min(peer_timeout, 10.0)
            elif p.exitcode == 0 and deadline is None:
                deadline = time.monotonic() + peer_timeout + 60.0
        if running and time.monotonic() > (deadline or float('inf')):
            print(f"train_2gpu: stopping {', '.join(p.name for p in running)}", file=sys.stderr)
            stop(running, 5.0)
            failed = failed or running[0]
            break
    if failed is not None:
        codes = ', '.join(f'{p.name} exit code {p.exitcode}' for p in procs)
        print(f'train_2gpu: error: a worker failed ({codes})', file=sys.stderr, flush=True)
        return 1
    return 0


def make_keys(folder):
    """CURVE key pairs for worker0 and worker1 (copy the folder to both hosts)."""
    import zmq.auth
    os.makedirs(folder, exist_ok=True)
    for r in (0, 1):
        zmq.auth.create_certificates(folder, f'worker{r}')
    print(f'wrote CURVE keys worker0/worker1 to {folder}')


@command
def main(argv=None):
    p = config.parser(__doc__, spec='spec_2gpu.yaml')
    p.add_argument('--worker', type=int, choices=(0, 1),
                   help='run only this worker, on this host (two hosts: see above)')
    p.add_argument('--make-keys', metavar='DIR', help='write the CURVE keys of both workers to DIR')
    args = p.parse_args(argv)
    if args.make_keys:
        make_keys(args.make_keys)
        return 0
    rank = args.worker  # None: both workers, on this host
    cfg = runs.load(args.config, args.spec, args.overrides, SCHEMA)
    if cfg['lib_conv']:
        print('notice: lib_conv is ignored (PyTorch picks the convolution library)')
    if rank is None:
        if cfg['exchange_host']:
            raise config.ConfigError('exchange_host is for two hosts: start each worker with '
                                     '--worker 0 / --worker 1, with curve_dir (see '
                                     'train_2gpu.py --help)')
        devices(cfg)  # a bad device or setting is a one-line error before anything starts
        check_start(cfg)
        print('config:\n' + config.describe(cfg), flush=True)
        return launch(cfg)
    if not (cfg['exchange_host'] and cfg['curve_dir']):
        raise config.ConfigError('--worker needs exchange_host and curve_dir (the link '
                                 'between hosts is always authenticated and encrypted)')
    link.curve_keys(cfg['curve_dir'], rank)  # unreadable keys: an error now
    device = trainer.resolve_device(cfg[f'gpu{rank}'], key=f'gpu{rank}')
    transport = exchange.transport_for(cfg['exchange_transport'], [device, device],
                                       same_host=False)
    if rank == 0:
        print('config:\n' + config.describe(cfg), flush=True)
    return worker_main(rank, cfg, transport, '')


if __name__ == '__main__':
    sys.exit(main())
