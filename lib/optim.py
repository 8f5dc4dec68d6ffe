"""The original's SGD (reference §3) and its learning-rate policies.

For every parameter p with gradient g and momentum buffer v:
    weights (ndim > 1): g_eff = g + weight_decay * p,  lr_eff = lr
    biases  (ndim = 1): g_eff = g,                     lr_eff = 2 * lr
    momentum:  v <- mu * v - lr_eff * g_eff;               p <- p + v
    Nesterov:  v <- mu^2 * v - (1 + mu) * lr_eff * g_eff;  p <- p + v
    neither:   p <- p - lr_eff * g_eff
This is not torch.optim.SGD, whose buffer accumulates raw gradients (v <- mu*v + g; p <- p - lr*v)
and so reacts differently when lr changes. The momentum buffers are plain tensors in
`self.momentum`, in the order of `self.names`, so a weight exchange can reach them.
"""
import math

import torch


class MomentumSGD:
    def __init__(self, named_params, lr, momentum=0.9, weight_decay=0.0005,
                 use_momentum=True, nesterov=False):
        named = [(n, p) for n, p in named_params if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.momentum = [torch.zeros_like(p) for p in self.params]
        self.lr, self.mu, self.decay = lr, momentum, weight_decay
        self.lr_scale = 1.0  # per-step factor of a schedule (warm-up, cosine): lr_eff = lr * lr_scale
        self.use_momentum, self.nesterov = use_momentum, nesterov
        is_weight = [p.ndim > 1 for p in self.params]
        self.groups = [  # (indices, lr multiplier, decay)
            ([i for i, w in enumerate(is_weight) if w], 1.0, weight_decay),
            ([i for i, w in enumerate(is_weight) if not w], 2.0, 0.0),
        ]

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        for idx, lr_mult, decay in self.groups:
            if not idx:
                continue
            params = [self.params[i] for i in idx]
            grads = [self.params[i].grad for i in idx]
            lr = self.lr * self.lr_scale * lr_mult
            if decay:  # in place: the gradients are spent after the step (zero_grad drops them)
                torch._foreach_add_(grads, params, alpha=decay)  # g + decay * p
            if not self.use_momentum:
                torch._foreach_add_(params, grads, alpha=-lr)
                continue
            vel = [self.momentum[i] for i in idx]
            if self.nesterov:
                torch._foreach_mul_(vel, self.mu * self.mu)
                torch._foreach_add_(vel, grads, alpha=-(1 + self.mu) * lr)
            else:
                torch._foreach_mul_(vel, self.mu)
                torch._foreach_add_(vel, grads, alpha=-lr)
            torch._foreach_add_(params, vel)

    def state_dict(self):
        return {'lr': self.lr, 'momentum': dict(zip(self.names, self.momentum))}

    def load_state_dict(self, state):
        self.lr = float(state['lr'])
        missing = set(self.names) - set(state['momentum'])
        if missing:
            raise KeyError(f'momentum buffers missing for {sorted(missing)}')
        for name, buf in zip(self.names, self.momentum):
            buf.copy_(state['momentum'][name])


class LossScaler:
    """Dynamic loss scaling for fp16 training (torch.amp.GradScaler's rule, for MomentumSGD):
    the loss is multiplied by `scale` before backward; the step unscales the gradients and is
    skipped when any is inf/nan, halving the scale; after `interval` good steps it doubles."""

    def __init__(self, device, init=2.0 ** 16, growth=2.0, backoff=0.5, interval=2000):
        self.scale = torch.full((), init, dtype=torch.float32, device=device)
        self.good_steps = torch.zeros((), dtype=torch.int32, device=device)
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self.growth, self.backoff, self.interval = growth, backoff, interval

    def step(self, opt, average=None):
        """Unscale the gradients and step unless they overflowed; True if the step was taken.

        average: the exchanger's mean over workers (lib/exchange.py). With several workers the
        decision is everyone's: all skip when any overflowed (else an averaged step would be half
        a step, and the loss scales would drift apart), so the scales stay identical."""
        self.found_inf.zero_()
        torch._amp_foreach_non_finite_check_and_unscale_(
            [p.grad for p in opt.params], self.found_inf, self.scale.reciprocal())
        if average is not None:
            self.found_inf.copy_((average(self.found_inf) > 0).float())
        took = not bool(self.found_inf.item())  # a host sync, for fp16 only: skip the bad step
        if took:
            opt.step()
        torch._amp_update_scale_(self.scale, self.good_steps, self.found_inf, self.growth,
                                 self.backoff, self.interval)
        return took


def adjust_lr(lr, epoch, val_errors, policy, lr_step, threshold):
    """The learning rate for the epoch after `epoch` (1-based, just finished).

    step: divide by 10 after each epoch listed in lr_step.
    auto: after epoch 5, divide by 10 when the val top-1 error fell by less than `threshold`
          over the last two epochs (val_errors[-3] - val_errors[-1]).
    cosine: unchanged (see lr_scale).
    """
    if policy == 'step':
        return lr / 10 if epoch in lr_step else lr
    if policy == 'cosine':  # lr stays; lr_scale() does the work, step by step
        return lr
    if epoch > 5 and len(val_errors) >= 3 and val_errors[-3] - val_errors[-1] < threshold:
        return lr / 10
    return lr


def lr_scale(progress, n_epochs, policy, warmup_epochs):
    """Per-step factor on lr at `progress` epochs into training (e.g. 2.5 = halfway through the
    third epoch): a linear warm-up from 0 over warmup_epochs, then for cosine half a cosine from
    1 down to 0 at n_epochs."""
    if progress < warmup_epochs:
        return progress / warmup_epochs
    if policy != 'cosine':
        return 1.0
    span = max(n_epochs - warmup_epochs, 1e-9)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup_epochs) / span)))
