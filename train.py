"""Train AlexNet on one device (GPU or CPU) from the preprocessed hickle batches.

    python train.py                                   # config.yaml <- spec_1gpu.yaml
    python train.py --config my.yaml --spec my_spec.yaml
    python train.py n_epochs=10 learning_rate=0.005 gpu=cpu
    python train.py data=data/demo model=alexnet_cifar crop_size=32   # what preprocessing wrote
    torchrun --nproc-per-node=N train.py [key=value ...]     # N GPUs (NCCL), or N CPU ranks
                                                             # (gloo) with gpu=cpu

Under torchrun each rank trains on rows [r*B/N, (r+1)*B/N) of every batch file and the ranks keep
their weights in step (exchange: average | gradients); rank 0 logs and writes. A later round of
the same torchrun job resumes from the last snapshot: a restart (--max-restarts), and in an
elastic job (--nnodes=MIN:MAX) a node lost or one that joins (docs/distributed.md).

Writes into weights_dir: config.yaml (the merged config), val_record.npy ([top-1 error, loss] per
epoch), history.csv, and model_<epoch>.pt every snapshot_freq epochs.
Resume with `python train.py weights_dir=W resume_train=True`: the newest snapshot of W (or
load_epoch=N), with W's saved config; key=value may change what does not break the resume.
"""
import contextlib
import io
import math
import os
import secrets
import sys
import time
from datetime import timedelta

import lib.env  # noqa: F401  first: without the packages, one line instead of a traceback
import torch
import torch.distributed as dist

from lib import UserError, checkpoint, command, config, exchange, runs
from lib.training import Worker, run, summary


def round_store(store, rank, world, timeout):
    """The keys of this round of torchrun's ranks, in a namespace every rank names alike.

    torchrun's store can outlive a round (the agent's shared store; restarts), so a new process
    group must not read the dead group's addresses (seen: gloo 'Connection refused'). Naming the
    round after TORCHELASTIC_RESTART_COUNT fails: the count is per agent, and a node started
    again counts from 0 while the others do not (pytorch/pytorch#135712). So rank 0 draws a
    fresh name and gives it to each rank in answer to that rank's fresh nonce: a key left by an
    earlier round is never taken for this one's."""
    deadline = time.monotonic() + timeout
    if rank == 0:
        name, answered, waiting = secrets.token_hex(8), set(), set(range(1, world))
        while waiting:
            for r in sorted(waiting):
                if store.check([f'alexnet/{name}/joined/{r}']):
                    waiting.discard(r)
                elif store.check([f'alexnet/hello/{r}']):
                    nonce = store.get(f'alexnet/hello/{r}').decode()
                    if nonce not in answered:  # an earlier round's nonce is answered in vain
                        store.set(f'alexnet/name/{nonce}', name)
                        answered.add(nonce)
            if waiting and time.monotonic() > deadline:
                raise dist.DistError(f'rank(s) {sorted(waiting)} did not join the process group '
                                     f'within {timeout:g} s (peer_timeout)')
            time.sleep(0.05)
    else:
        nonce = secrets.token_hex(8)
        store.set(f'alexnet/hello/{rank}', nonce)
        try:
            store.wait([f'alexnet/name/{nonce}'], timedelta(seconds=timeout))
        except dist.DistError:
            raise dist.DistError(f'rank 0 did not answer rank {rank} within {timeout:g} s '
                                 '(peer_timeout) at the start of the process group') from None
        name = store.get(f'alexnet/name/{nonce}').decode()
        store.set(f'alexnet/{name}/joined/{rank}', b'1')
    return dist.PrefixStore(f'alexnet/{name}', store)


def torchrun_launch():
    """The options torchrun's agent (this rank's parent process) was started with, parsed by
    torchrun's own parser (so abbreviations and its PET_* variables count as for the agent): a
    Namespace (nnodes, nproc_per_node, rdzv_backend, rdzv_endpoint, standalone, ...), or None
    where the parent is no torchrun command line we can read (no /proc, another launcher, ranks
    started by hand). torchrun tells its workers neither --nnodes nor the endpoint."""
    try:
        with open(f'/proc/{os.getppid()}/cmdline', 'rb') as f:
            argv = f.read().decode().split('\0')[:-1]
    except (OSError, UnicodeDecodeError):
        return None
    for i, arg in enumerate(argv):
        if (arg == 'torch.distributed.run' and argv[i - 1:i] == ['-m']
                or os.path.basename(arg) == 'torchrun'):
            break
    else:
        return None
    from torch.distributed import run as torchrun
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return torchrun.parse_args(argv[i + 1:])
    except (SystemExit, ValueError):
        return None


def check_batch_split(B, world, launch):
    """ConfigError (one line) unless batch_size splits over this world size and over every one
    that torchrun's --nnodes=MIN:MAX allows (MIN..MAX nodes of LOCAL_WORLD_SIZE ranks: every node
    is taken to run as many ranks as this one), so that an elastic job cannot fail later, at a
    change of nodes."""
    local = int(os.environ.get('LOCAL_WORLD_SIZE', world))
    sizes, lo, hi = {world}, None, None
    if launch is not None:
        from torch.distributed import run as torchrun
        lo, hi = torchrun.parse_min_max_nnodes(launch.nnodes)
    if lo is not None and lo < hi:  # (a fixed --nnodes: this world size, whatever each node runs)
        sizes |= {k * local for k in range(lo, hi + 1)}
    bad = sorted(n for n in sizes if B % n)
    if not bad:
        return
    what = ('(under torchrun batch_size is the images of all ranks together, as many as a batch '
            'file holds: not per rank)')
    if len(sizes) == 1:
        raise config.ConfigError(f'batch_size {B} does not split over {world} torchrun ranks {what}')
    n = bad[0]
    allowed = ', '.join(map(str, sorted(sizes)))
    multiple = math.lcm(*sizes)
    raise config.ConfigError(
        f'batch_size {B} does not split over {n} torchrun ranks, which --nnodes={launch.nnodes} '
        f'allows ({lo} to {hi} nodes x {local} ranks: {allowed} ranks) {what}: narrow --nnodes, '
        f'or preprocess batches of a multiple of {multiple} images')


def job_store(launch, timeout):
    """torchrun's c10d rendezvous store, on the node of --rdzv-endpoint: it lives as long as the
    job (the agent of that node hosts it), through every round of the rendezvous. None where there
    is none to reach (--standalone, a static or etcd rendezvous, no readable command line)."""
    if launch is None or launch.standalone or launch.rdzv_backend != 'c10d' or not launch.rdzv_endpoint:
        return None
    from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint
    host, port = parse_rendezvous_endpoint(launch.rdzv_endpoint, default_port=29400)
    try:
        return dist.TCPStore(host, port, is_master=False, timeout=timeout, wait_for_workers=False)
    except (RuntimeError, ValueError) as e:
        raise dist.DistError(f'cannot reach torchrun\'s rendezvous store at {host}:{port} '
                             f'(--rdzv-endpoint): {str(e).strip().splitlines()[0]}') from None


def torchrun_worker(cfg):
    """Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set): join the process group and return this
    rank's Worker; None when not under torchrun.

    A later round of the same torchrun job resumes from the newest snapshot in weights_dir: a
    restart after a failure (--max-restarts), and a change of nodes (--nnodes=MIN:MAX: a node lost
    for good, or one that joins). torchrun restarts the workers on a change of nodes without
    counting a restart (TORCHELASTIC_RESTART_COUNT stays as it was, a node that joins counts from
    0), so the rounds are counted in torchrun's own rendezvous store (c10d), which lives as long
    as the job: rank 0 counts a round once its run has started (weights_dir checked, and another
    run's snapshots refused or moved aside), and a round after one that started resumes. Without
    that store (--standalone, another rendezvous backend), a restart count above 0 on any node
    means a later round."""
    if 'RANK' not in os.environ or 'WORLD_SIZE' not in os.environ:
        return None
    rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    local = int(os.environ.get('LOCAL_RANK', 0))
    job = os.environ.get('TORCHELASTIC_RUN_ID')
    B = cfg['batch_size']
    launch = torchrun_launch() if job is not None else None
    check_batch_split(B, world, launch)
    if job is not None and launch is None and rank == 0:
        print('notice: the torchrun command line (--nnodes) is not readable from this rank: '
              f'batch_size {B} is checked against {world} ranks only', flush=True)
    if cfg['gpu'] == 'cpu' or not torch.cuda.is_available():
        gpu, backend = 'cpu', 'gloo'
    else:
        gpu, backend = f'cuda:{local}', 'nccl'
        torch.cuda.set_device(local)
    timeout = timedelta(seconds=cfg['peer_timeout'])
    store, _, _ = next(dist.rendezvous('env://', rank, world, timeout=timeout))
    dist.init_process_group(backend, timeout=timeout, rank=rank, world_size=world,
                            store=round_store(store, rank, world, cfg['peer_timeout']))
    # TORCHELASTIC_RESTART_COUNT is per agent (a node started again counts from 0): a restart
    # for one rank is a restart for all
    restarts = torch.tensor([int(os.environ.get('TORCHELASTIC_RESTART_COUNT', 0))], device=gpu)
    dist.all_reduce(restarts, op=dist.ReduceOp.MAX)
    restarts = int(restarts.item())
    rounds = job_store(launch, timeout) if rank == 0 else None
    key = f'alexnet/{job}/rounds'
    later, before = bool(restarts), None
    if rounds is not None:  # the rounds of this job that started training, and the last one's ranks
        later = rounds.add(key, 0) > 0
        before = rounds.get(f'{key}/ranks').decode() if later else None
    # rank 0 decides the epoch for everyone (nodes may hold different snapshots)
    latest = torch.tensor([checkpoint.latest_epoch(cfg['weights_dir']) if rank == 0 and later else 0],
                          device=gpu)
    dist.broadcast(latest, 0)
    latest = int(latest.item())
    if latest:
        cfg.update(resume_train=True, load_epoch=latest)
        path = checkpoint.snapshot_path(cfg['weights_dir'], latest)
        have = torch.tensor([int(os.path.exists(path))], device=gpu)
        dist.all_reduce(have, op=dist.ReduceOp.MIN)  # every rank stops if one cannot resume
        if not have.item():
            who = 'another rank has' if os.path.exists(path) else 'this rank has'
            raise config.ConfigError(f'rank 0 resumes from epoch {latest} but {who} no {path} '
                                     '(a restart needs weights_dir shared by every node)')
        if rank == 0:
            ranks = f'{world} rank' + 's' * (world != 1)
            if rounds is None:
                print(f'torchrun restart {restarts}: resuming from epoch {latest} on {ranks}',
                      flush=True)
            else:
                n = rounds.add(key, 0) + 1
                print(f'torchrun round {n}: resuming from epoch {latest} on {ranks} '
                      f'({before} in round {n - 1})', flush=True)

    def started():  # the run has started: a later round of this job resumes
        if rounds is not None:
            rounds.set(f'{key}/ranks', str(world))
            rounds.add(key, 1)
    return Worker(exchange.Distributed(cfg['exchange'], cfg['exchange_freq']),
                  share=(rank, world), gpu=gpu,
                  port=cfg['sock_data'] + local, started=started)


# Under torchrun a SIGTERM is its agent stopping the ranks of a round (a restart, a change of
# nodes): the rank ends at once, as torchrun expects; without torchrun it stops as Ctrl-C does.
RANK = os.environ.get('RANK')


@command(who=f'rank {RANK}: ' if RANK is not None else '', sigterm=RANK is None)
def main(argv=None):
    try:
        cfg = runs.command_line(__doc__, argv, {**config.CONFIG, **config.SPEC_1GPU})
        worker = torchrun_worker(cfg) or Worker()
        quiet = worker.exchanger is not None and not worker.exchanger.is_main
        if cfg['lib_conv'] and not quiet:
            print('notice: lib_conv is ignored (PyTorch picks the convolution library)')
        if not quiet:
            print('config:\n' + config.describe(cfg), flush=True)
        history = run(cfg, worker)
        if dist.is_initialized():  # no rank tears its connections down while a peer still
            dist.barrier()         # writes its snapshot (gloo aborted once at such a teardown)
    except UserError:
        raise
    except RuntimeError as e:  # DistError, or gloo's plain RuntimeError: a peer rank died or stalled
        if not (isinstance(e, dist.DistError) or 'gloo' in str(e).lower()):
            raise  # a bug, not a peer: keep the traceback
        raise UserError('a peer rank died, stalled or failed (torch.distributed: '
                        f'{str(e).strip().splitlines()[0]})') from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if not quiet:
        print(summary(cfg, history))


if __name__ == '__main__':
    sys.exit(main())
