"""The one training loop, shared by train.py and the multi-worker launchers.

What differs between them is passed in: the loaders (which batch files, in-process or not) and
the exchanger (lib/exchange.py). Per epoch: train over the plan drawn from the trainer's own
generator, validate with the centre crop, adapt the learning rate, write val_record.npy /
history.csv, and every snapshot_freq epochs a snapshot that resumes bit for bit.
"""
import math
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lib import checkpoint, data, optim
from lib import model as lib_model
from lib.config import ConfigError
from lib.step import Step


def resolve_device(name, key='gpu'):
    """'auto' | 'cpu' | 'gpuN' | 'cuda:N' -> torch.device, with a clear error naming the config
    key (gpu, gpu0, gpu1) when the value is bad or CUDA is absent."""
    if name == 'auto':
        return torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')
    if name == 'cpu':
        return torch.device('cpu')
    index = name[3:] if name.startswith('gpu') else name[5:] if name.startswith('cuda:') else ''
    if not index.isdigit():
        raise ConfigError(f"{key}: '{name}' is not a device (use auto, cpu, gpu0, gpu1 or cuda:N)")
    if not torch.cuda.is_available():
        raise ConfigError(f"{key}: '{name}' asks for CUDA, which is not available here "
                         f"(use {key}=cpu or {key}=auto)")
    if int(index) >= torch.cuda.device_count():
        raise ConfigError(f"{key}: '{name}' but only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(f'cuda:{index}')


ORDER_SEED = 104729  # the file order is drawn from seed + this (crops and mirrors from seed)


class Trainer:
    def __init__(self, cfg, model, optimizer, loaders, device, exchanger):
        self.cfg, self.model, self.opt, self.device = cfg, model, optimizer, device
        self.train_data, self.val_data = loaders
        self.exchanger = exchanger
        if cfg['channels_last']:
            model.to(memory_format=torch.channels_last)
        if device.type == 'cuda':  # shapes are fixed (whole batch files, one crop size)
            torch.backends.cudnn.benchmark = cfg['cudnn_benchmark']
        # self.model stays the plain module (its state_dict keys have no '_orig_mod.' or
        # 'module.' prefix); the exchanger may wrap it (DistributedDataParallel)
        net = exchanger.wrap(model)
        self.forward = torch.compile(net) if cfg['compile'] else net
        self.step = Step(
            self.forward, optimizer, cfg['precision'], device,
            # fp64: parameters, inputs and the loss in float64 (train.py builds the model so)
            dtype=next(model.parameters()).dtype,
            memory_format=torch.channels_last if cfg['channels_last'] else torch.preserve_format,
            label_smoothing=cfg['label_smoothing'],
            # fp16 overflow: one decision for all workers where their gradients differ (under DDP
            # they are the same everywhere, and so is the decision: no collective per step)
            overflow_average=None if exchanger.same_gradients else exchanger.average)
        self.scaler = self.step.scaler  # fp16's loss scale: in the snapshot
        # The random draws belong to the step, not to the worker: every worker draws the crops,
        # mirrors and dropout masks of the step's images of all workers, from streams in the same
        # state everywhere (these generators; torch's default ones, seeded by model.build and
        # drawn alike since), and keeps the rows of its own images, [rank * B, (rank + 1) * B).
        # So N workers train the model one worker trains on the whole batches.
        self.gen = torch.Generator().manual_seed(cfg['seed'])          # crops and mirrors
        self.order_gen = torch.Generator().manual_seed(cfg['seed'] + ORDER_SEED)  # file order
        self.history = []  # one dict per finished epoch (the history.csv rows)
        self.on_epoch_end = None  # called with weights_dir after the records are written
        self.image_size = self.train_data.image_size
        B = self.train_data.batch_size
        self.images_per_step = B * exchanger.size  # all workers together
        self.rows = (exchanger.rank * B, (exchanger.rank + 1) * B)  # this worker's, of a step
        if exchanger.size > 1:  # (one worker: the masks F.dropout draws, the same bits)
            lib_model.share_dropout(model, self.rows[0], self.images_per_step)

    # --- state --------------------------------------------------------------------------
    def state(self):
        extra = ({'loss_scale': self.scaler.scale, 'loss_scale_good_steps': self.scaler.good_steps}
                 if self.scaler else {})
        return {'model': self.model.state_dict(), **self.opt.state_dict(), **extra,
                'val_record': torch.from_numpy(checkpoint.val_record(self.history)),
                'history': self.history, 'config': self.cfg,
                'images_per_step': self.images_per_step,
                'rng': checkpoint.rng_state(self.gen, self.device, self.order_gen)}

    def restore(self, state):
        self.model.load_state_dict(state['model'])
        self.opt.load_state_dict(state)
        # the run's streams (every worker's are the same), whichever launcher wrote the snapshot
        checkpoint.set_rng_state(state['rng'], self.gen, self.device, self.order_gen)
        self.history = list(state['history'])
        if self.scaler is not None and 'loss_scale' in state:
            self.scaler.scale.copy_(state['loss_scale'])
            self.scaler.good_steps.copy_(state['loss_scale_good_steps'])
        return int(state['epoch'])

    # --- the loop --------------------------------------------------------------------------
    def fit(self, start_epoch=0):
        cfg, log = self.cfg, self.log
        for epoch in range(start_epoch + 1, cfg['n_epochs'] + 1):
            t0 = time.perf_counter()
            policy_lr = self.opt.lr
            train_loss, train_err, img_s, first_lr = self.train_epoch(epoch)
            val_err, val_top5, val_loss = self.evaluate()
            row = dict(epoch=epoch, train_loss=train_loss, train_error=train_err,
                       val_error=val_err, val_top5_error=val_top5, val_loss=val_loss,
                       lr=first_lr, seconds=time.perf_counter() - t0, img_per_s=img_s)
            self.history.append(row)
            log(f'epoch {epoch} | train loss {train_loss:.4f} error {train_err:.4f} | val top-1 '
                f'error {val_err:.4f} top-5 {val_top5:.4f} loss {val_loss:.4f} | '
                f'{row["seconds"]:.1f} s, {img_s:.0f} img/s')
            self.opt.lr = optim.adjust_lr(self.opt.lr, epoch, [h['val_error'] for h in self.history],
                                          cfg['lr_policy'], cfg['lr_step'], cfg['lr_adapt_threshold'])
            if self.opt.lr != policy_lr:
                log(f'learning rate changed to {self.opt.lr:g}')
            if self.exchanger.is_main:
                checkpoint.write_records(cfg['weights_dir'], self.history)
                if self.on_epoch_end is not None:
                    self.on_epoch_end(cfg['weights_dir'])
                if epoch % cfg['snapshot_freq'] == 0 or epoch == cfg['n_epochs']:
                    checkpoint.save(cfg['weights_dir'], epoch, self.state())
        return self.history

    def train_epoch(self, epoch):
        cfg, model, opt = self.cfg, self.model, self.opt
        images = self.images_per_step
        plan = data.make_plan(self.gen, len(self.train_data), images, self.image_size,
                              cfg['crop_size'], train=True, rand_crop=cfg['rand_crop'],
                              batch_crop_mirror=cfg['batch_crop_mirror'], shuffle=cfg['shuffle'],
                              order_gen=self.order_gen, rows=self.rows)
        model.train()
        total = torch.zeros(2, device=self.device)     # sums of [loss, error] over the epoch
        window = torch.zeros(2, device=self.device)    # ... since the last log line
        bar = tqdm(total=len(plan), desc=f'epoch {epoch}', leave=False, file=sys.stdout,
                   disable=not (sys.stdout.isatty() and self.exchanger.is_main))
        t_epoch = t_log = time.perf_counter()
        wait = exch = 0.0  # seconds waiting for data / in the exchanger, since the last log line
        copied = self.train_data.copy_wait  # of `wait`: for the device copy, not for the loader
        batches = self.train_data.epoch(plan)
        for it in range(1, len(plan) + 1):
            t = time.perf_counter()
            x, y = next(batches)
            wait += time.perf_counter() - t
            opt.lr_scale = optim.lr_scale(epoch - 1 + (it - 1) / len(plan), cfg['n_epochs'],
                                          cfg['lr_policy'], cfg['warmup_epochs'])
            if it == 1:
                first_lr = opt.lr * opt.lr_scale
            logits, loss = self.step(x, y)
            t = time.perf_counter()
            self.exchanger.after_step()
            exch += time.perf_counter() - t
            with torch.no_grad():
                stats = torch.stack([loss.detach().float(), (logits.argmax(1) != y).float().mean()])
                total += stats
                window += stats
            bar.update()
            if it % cfg['print_freq'] == 0 or it == len(plan):
                n = it % cfg['print_freq'] or cfg['print_freq']
                loss_v, err_v = (self.exchanger.average(window) / n).tolist()  # host sync, here only
                dt = time.perf_counter() - t_log
                err_txt = f' | error {err_v:.4f}' if cfg['print_train_error'] else ''
                exch_txt = f' | exchange {1000 * exch / n:.1f} ms' if self.exchanger.size > 1 else ''
                copy, copied = self.train_data.copy_wait - copied, self.train_data.copy_wait
                self.log(f'epoch {epoch} iter {it}/{len(plan)} | cost {loss_v:.4f}{err_txt} | '
                         f'lr {opt.lr * opt.lr_scale:g} | {n * images / dt:.0f} img/s | '
                         f'data wait {1000 * (wait - copy) / n:.1f} ms | copy wait '
                         f'{1000 * copy / n:.1f} ms{exch_txt}', bar)
                window.zero_()
                wait, exch, t_log = 0.0, 0.0, time.perf_counter()
        bar.close()
        self.exchanger.flush()  # every worker validates and snapshots the same weights
        seconds = time.perf_counter() - t_epoch
        loss_v, err_v = (self.exchanger.average(total) / len(plan)).tolist()
        return loss_v, err_v, len(plan) * images / seconds, first_lr

    def evaluate(self, ten_crop=False):
        """[top-1 error, top-5 error, loss] over the whole val set (centre crop, or ten crops)."""
        plan, group = data.eval_plan(len(self.val_data), self.val_data.batch_size, self.image_size,
                                     self.cfg['crop_size'], ten_crop)
        self.model.eval()
        return evaluate(self.predict, self.val_data, plan, group, self.exchanger.average)

    def predict(self, x):
        return self.step.logits(x).float()

    def log(self, text, bar=None):
        if not self.exchanger.is_main:
            return
        if bar is not None and not bar.disable:
            bar.write(text)
        else:
            print(text, flush=True)


@torch.no_grad()
def evaluate(predict, loader, plan, group, average=lambda t: t):
    """[top-1 error, top-5 error, loss] over a plan whose steps come in groups of `group` views of
    one batch file (1: the centre crop; 10: corners and centre, each mirrored). The views'
    softmax outputs are averaged, in log space: log mean p = logsumexp(log_softmax) - log(group),
    finite where a probability underflows; with one view the loss is the plain cross-entropy,
    exactly what training's validation computes."""
    sums, log_sum = None, None
    for i, (x, y) in enumerate(loader.epoch(plan)):
        logits = predict(x)                                           # (B, classes) float32
        if group > 1:
            logp = logits.log_softmax(1)
            log_sum = logp if i % group == 0 else torch.logaddexp(log_sum, logp)
            if i % group != group - 1:
                continue
            log_mean = log_sum - math.log(group)  # same order as the mean probabilities
            scores, loss = log_mean, F.nll_loss(log_mean, y, reduction='sum')
        else:
            scores, loss = logits, F.cross_entropy(logits, y, reduction='sum')
        top5 = scores.topk(min(5, scores.shape[1]), 1).indices
        batch = torch.stack([(top5[:, 0] != y).float().sum(), (top5 != y[:, None]).all(1).float().sum(),
                             loss])
        sums = batch if sums is None else sums + batch
    n = len(plan) // group * len(y)
    return tuple((average(sums) / n).tolist())
