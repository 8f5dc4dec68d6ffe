"""Train AlexNet on one device (GPU or CPU) from the preprocessed hickle batches.

    python train.py                                   # config.yaml <- spec_1gpu.yaml
    python train.py --config my.yaml --spec my_spec.yaml
    python train.py n_epochs=10 learning_rate=0.005 gpu=cpu
    torchrun --nproc-per-node=N train.py [key=value ...]     # N GPUs (NCCL), or N CPU ranks
                                                             # (gloo) with gpu=cpu

Under torchrun each rank trains on rows [r*B/N, (r+1)*B/N) of every batch file and the ranks keep
their weights in step (exchange: average | gradients); rank 0 logs and writes. A restart by
torchrun --max-restarts resumes from the last snapshot.

Writes into weights_dir: config.yaml (the merged config), val_record.npy ([top-1 error, loss] per
epoch), history.csv, and model_<epoch>.pt every snapshot_freq epochs.
Resume with resume_train=True load_epoch=N.
"""
import os
import secrets
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import yaml

import plot
from lib import UserError, checkpoint, config, data, exchange, halves, loader, model, optim, trainer


def num_classes(cfg, sources):
    """num_classes if set, else from dataset.yaml beside the labels folder (written by our
    preprocessing), else from the largest label (data preprocessed by the original)."""
    if cfg['num_classes']:
        return cfg['num_classes']
    meta = os.path.join(os.path.dirname(os.path.normpath(cfg['label_folder'])), 'dataset.yaml')
    if os.path.exists(meta):
        with open(meta) as f:
            return int(yaml.safe_load(f)['num_classes'])
    return int(max(s.labels.max() for s in sources)) + 1


def check_labels(n_classes, sources, where='num_classes'):
    """DataError naming the labels file when a label is outside 0..n_classes-1 (instead of a
    device-side assert in the first step)."""
    for s in sources:
        if getattr(s, 'labels_file', None) is None or not s.labels.size:
            continue  # synthetic batches draw their labels below num_classes
        lo, hi = int(s.labels.min()), int(s.labels.max())
        if lo < 0 or hi >= n_classes:
            raise data.DataError(f'{s.labels_file} holds label {hi if hi >= n_classes else lo}, '
                                 f'outside 0..{n_classes - 1} ({where} {n_classes})')


def check_snapshot(cfg, state, net, images_per_step):
    """ConfigError (one line) when a snapshot was trained with another network or another number
    of images per step than this run's (batch_size is per worker in train_2gpu.py, per step in
    train.py and under torchrun: a 2 x 128 snapshot resumes in a 256 run, and back)."""
    path = checkpoint.snapshot_path(cfg['weights_dir'], cfg['load_epoch'])
    saved = state.get('config', {})
    for key in ('model', 'crop_size'):
        if key in saved and saved[key] != cfg[key]:
            raise config.ConfigError(f'{path} was trained with {key} {saved[key]!r}, this run '
                                     f'has {key} {cfg[key]!r}')
    if 'images_per_step' in state:
        if int(state['images_per_step']) != images_per_step:
            raise config.ConfigError(f'{path} was trained on {int(state["images_per_step"])} '
                                     f'images per step, this run on {images_per_step} '
                                     f'(batch_size {cfg["batch_size"]})')
    elif 'batch_size' in saved and saved['batch_size'] != cfg['batch_size']:  # older snapshots
        raise config.ConfigError(f'{path} was trained with batch_size {saved["batch_size"]!r}, '
                                 f'this run has batch_size {cfg["batch_size"]!r}')
    for name, p in net.state_dict().items():
        have = state['model'].get(name)
        if have is None or have.shape != p.shape:
            raise config.ConfigError(f'{path} holds {name} of shape '
                                     f'{None if have is None else tuple(have.shape)}, this run '
                                     f'{tuple(p.shape)} (num_classes or model differ)')


@dataclass
class Worker:
    """What differs between the workers of one run; the defaults are train.py on its own."""
    exchanger: object = None    # lib/exchange.py: Local, Pair (train_2gpu.py), Distributed (torchrun)
    part: int = None            # train on half <part> of every batch (train_2gpu.py; lib/halves.py)
    rows: tuple = None          # train on rows [lo, hi) of every batch file (torchrun)
    gpu: str = None             # device (default: the gpu key)
    port: int = None            # loader port where there is no ipc:// (default: sock_data)


def data_sources(cfg, worker=Worker(), splits=('train', 'val')):
    """The batch sources of `splits`: batch folders and their labels, or synthetic batches."""
    B = cfg['batch_size']
    if cfg['synthetic']:
        size = (cfg['crop_size'] * 256 + 226) // 227  # 256 for 227 crops, 37 for 32
        n_files = {'train': cfg['synthetic_batches'], 'val': max(1, cfg['synthetic_batches'] // 10)}
        rows = worker.rows or (0, B)
        return [data.SyntheticBatches(n_files[s], rows[1] - rows[0], size, cfg['num_classes'] or 1000,
                                      cfg['seed'] + (s == 'val')) for s in splits]
    if worker.part is not None:  # train_2gpu.py: halves, or half of every whole batch
        found = [halves.half_source(cfg[f'{split}_folder'], cfg['label_folder'], split, B, worker.part)
                 for split in splits]
        notices = [n for _, n in found if n]
        if notices and worker.part == 0:
            print('notice: ' + '; '.join(notices), flush=True)
        return [source for source, _ in found]
    return [data.BatchFolder(cfg[f'{split}_folder'],
                             os.path.join(cfg['label_folder'], f'{split}_labels.npy'), B,
                             rows=worker.rows)
            for split in splits]


def build_loaders(cfg, device, worker=Worker()):
    """(train, val) loaders (in-process, or served by one loader process) and the class count."""
    train, val = data_sources(cfg, worker)
    size, val_size = train.image_size(), val.image_size()
    if val_size != size:  # else the loader's slots do not fit val's batches
        raise data.DataError(f'{val.files[0]} holds {val_size} px images, the training '
                             f'batches ({train.files[0]}) {size} px: preprocess both at one size')
    n_classes = num_classes(cfg, (train, val))
    check_labels(n_classes, (train, val))
    if cfg['crop_size'] > size:
        raise data.DataError(f"crop_size {cfg['crop_size']} is larger than the images "
                             f"({size} px) in {cfg['train_folder']}")
    if cfg['para_load'] and cfg['synthetic']:
        print('notice: synthetic batches are made in-process; para_load is ignored', flush=True)
    if cfg['para_load'] and not cfg['synthetic']:
        proc = loader.LoaderProcess([train, val], cfg['mean_file'], cfg['crop_size'], device,
                                    cfg['use_data_layer'], cfg['loader_timeout'],
                                    cfg['sock_data'] if worker.port is None else worker.port)
        loaders = [proc.loader(0), proc.loader(1)]
    else:
        mean = (torch.full((3, size, size), 127.5) if cfg['synthetic']
                else data.load_mean(cfg['mean_file'], size))
        loaders = [data.InProcessLoader(s, mean, cfg['crop_size'], device, cfg['use_data_layer'])
                   for s in (train, val)]
    return loaders, n_classes


def run(cfg, worker=Worker()):
    """Build everything from a merged config and train; returns the history (list of dicts)."""
    exchanger = worker.exchanger or exchange.Local()
    device = trainer.resolve_device(worker.gpu or cfg['gpu'])
    os.makedirs(cfg['weights_dir'], exist_ok=True)
    (train_data, val_data), n_cls = build_loaders(cfg, device, worker)
    try:  # from here on a loader process may be running: always close it
        net = model.build(cfg['model'], n_cls, cfg['dropout'], cfg['crop_size'],
                          cfg['seed']).to(device, torch.float64 if cfg['precision'] == 'fp64' else None)
        opt = optim.MomentumSGD(net.named_parameters(), cfg['learning_rate'], cfg['momentum'],
                                cfg['weight_decay'], cfg['use_momentum'],
                                cfg['use_nesterov_momentum'])
        loop = trainer.Trainer(cfg, net, opt, (train_data, val_data), device, exchanger)
        loop.on_epoch_end = plot.write_quietly  # training.png, when matplotlib is installed
        start = 0
        if not cfg['resume_train']:  # (a torchrun restart resumes: torchrun_worker set it)
            aside = checkpoint.check_fresh_start(cfg['weights_dir'], cfg['overwrite'],
                                                 move=exchanger.is_main)
            if aside:
                loop.log(f'overwrite: the previous run in {cfg["weights_dir"]} moved to {aside}')
        if cfg['resume_train']:
            state = checkpoint.load(cfg['weights_dir'], cfg['load_epoch'])
            check_snapshot(cfg, state, net, loop.images_per_step)
            start = loop.restore(state)
            loop.log(f'resumed from {checkpoint.snapshot_path(cfg["weights_dir"], start)} '
                     f'(epoch {start}, lr {opt.lr:g})')
        exchanger.attach(opt.params, opt.momentum, device)  # after channels_last and resume
        if exchanger.is_main:  # only now: a run that fails to start leaves weights_dir as it was
            config.dump(cfg, os.path.join(cfg['weights_dir'], 'config.yaml'))
        n_params = sum(p.numel() for p in net.parameters())
        loop.log(f'{cfg["model"]}: {n_params:,} parameters, {n_cls} classes, device {device}, '
                 f'{len(train_data)} train / {len(val_data)} val batches of {cfg["batch_size"]}'
                 + (f' ({exchanger.size} workers x {train_data.batch_size})' if worker.rows else ''))
        return loop.fit(start)
    finally:
        train_data.close()
        val_data.close()


def summary(cfg, history):
    if not history:
        return f"done: nothing to train (n_epochs {cfg['n_epochs']})"
    last = history[-1]
    return (f"done: epoch {last['epoch']}, val top-1 accuracy {100 * (1 - last['val_error']):.2f} %"
            f" (top-5 {100 * (1 - last['val_top5_error']):.2f} %); records in "
            f"{os.path.join(cfg['weights_dir'], 'val_record.npy')}")


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
        raise config.ConfigError(f'batch_size {B} does not split over {world} torchrun ranks')
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
                  rows=(rank * B // world, (rank + 1) * B // world), gpu=gpu,
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
