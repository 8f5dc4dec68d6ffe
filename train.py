"""Train AlexNet on one device (GPU or CPU) from the preprocessed hickle batches.

    python train.py                                   # config.yaml <- spec_1gpu.yaml
    python train.py --config my.yaml --spec my_spec.yaml
    python train.py n_epochs=10 learning_rate=0.005 gpu=cpu
    python train.py data=data/demo model=alexnet_cifar crop_size=32   # what preprocessing wrote
    torchrun --nproc-per-node=N train.py [key=value ...]     # N GPUs (NCCL), or N CPU ranks
                                                             # (gloo) with gpu=cpu

Under torchrun each rank trains on rows [r*B/N, (r+1)*B/N) of every batch file and the ranks keep
their weights in step (exchange: average | gradients); rank 0 logs and writes. A restart by
torchrun --max-restarts resumes from the last snapshot.

Writes into weights_dir: config.yaml (the merged config), val_record.npy ([top-1 error, loss] per
epoch), history.csv, and model_<epoch>.pt every snapshot_freq epochs.
Resume with `python train.py weights_dir=W resume_train=True`: the newest snapshot of W (or
load_epoch=N), with W's saved config; key=value may change what does not break the resume.
"""
import os
import secrets
import sys
import time
from datetime import timedelta

import lib.env  # noqa: F401  first: without the packages, one line instead of a traceback
import torch
import torch.distributed as dist

from lib import UserError, checkpoint, config, exchange
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


def torchrun_worker(cfg):
    """Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set): join the process group and return this
    rank's Worker; None when not under torchrun. A restart (--max-restarts) resumes from the
    last snapshot in weights_dir."""
    if 'RANK' not in os.environ or 'WORLD_SIZE' not in os.environ:
        return None
    rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    local = int(os.environ.get('LOCAL_RANK', 0))
    B = cfg['batch_size']
    if B % world:
        raise config.ConfigError(f'batch_size {B} does not split over {world} torchrun ranks '
                                 '(under torchrun batch_size is the images of all ranks together, '
                                 'as many as a batch file holds: not per rank)')
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
    if restarts:  # rank 0 decides the epoch for everyone (nodes may hold different snapshots)
        latest = torch.tensor([checkpoint.latest_epoch(cfg['weights_dir']) if rank == 0 else 0],
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
                print(f'torchrun restart {restarts}: resuming from epoch {latest}', flush=True)
    return Worker(exchange.Distributed(cfg['exchange'], cfg['exchange_freq']),
                  share=(rank, world, B // world), gpu=gpu,
                  port=cfg['sock_data'] + local)


def main(argv=None):
    rank = os.environ.get('RANK')
    who = f'rank {rank}: ' if rank is not None else ''
    try:
        cfg = config.command_line(__doc__, argv, {**config.CONFIG, **config.SPEC_1GPU})
        worker = torchrun_worker(cfg) or Worker()
        quiet = worker.exchanger is not None and not worker.exchanger.is_main
        if cfg['lib_conv'] and not quiet:
            print('notice: lib_conv is ignored (PyTorch picks the convolution library)')
        if not quiet:
            print('config:\n' + config.describe(cfg), flush=True)
        history = run(cfg, worker)
        if dist.is_initialized():  # no rank tears its connections down while a peer still
            dist.barrier()         # writes its snapshot (gloo aborted once at such a teardown)
    except UserError as e:
        print(f'{who}error: {e}', file=sys.stderr)
        return 2
    except RuntimeError as e:  # DistError, or gloo's plain RuntimeError: a peer rank died or stalled
        if not (isinstance(e, dist.DistError) or 'gloo' in str(e).lower()):
            raise  # a bug, not a peer: keep the traceback
        print(f'{who}error: a peer rank died, stalled or failed (torch.distributed: '
              f'{str(e).strip().splitlines()[0]})', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if not quiet:
        print(summary(cfg, history))
    return 0


if __name__ == '__main__':
    sys.exit(main())
