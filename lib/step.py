"""One training step: the trainer's (lib/trainer.py), and the one the benchmarks time.

torch and lib.optim only, so that benchmarks/gpu.py's step parts need no more than torch.
"""
import torch
import torch.nn.functional as F

from lib import optim


class Step:
    """forward: the network (or its compiled / DDP-wrapped form); opt: MomentumSGD (or, in the
    benchmarks' baseline, any torch optimiser); precision: fp32 | fp64 | bf16 | fp16 (autocast;
    fp16 with the loss scaler); dtype: the parameters' (fp64: the inputs and the loss too);
    memory_format: the inputs' (channels_last, or as they come); overflow_average: see
    optim.LossScaler.step."""

    def __init__(self, forward, opt, precision, device, dtype=torch.float32,
                 memory_format=torch.preserve_format, label_smoothing=0.0, overflow_average=None):
        self.forward, self.opt, self.dtype, self.memory_format = forward, opt, dtype, memory_format
        self.label_smoothing, self.overflow_average = label_smoothing, overflow_average
        self.autocast = dict(device_type=device.type, enabled=precision in ('bf16', 'fp16'),
                             dtype=torch.float16 if precision == 'fp16' else torch.bfloat16)
        self.scaler = optim.LossScaler(device) if precision == 'fp16' else None

    def logits(self, x):
        """The network's output for a batch as the step computes it (validation's)."""
        with torch.autocast(**self.autocast):
            return self.forward(x.to(self.dtype).contiguous(memory_format=self.memory_format))

    def __call__(self, x, y, mark=None):
        """One step on the batch (x, y): forward, cross-entropy, backward, update. (logits, loss),
        both still on the device: no host sync here (fp16's overflow check aside). mark(), when
        given, is called after the forward, the backward and the update (a benchmark's clock)."""
        with torch.autocast(**self.autocast):
            logits = self.forward(x.to(self.dtype).contiguous(memory_format=self.memory_format))
            loss = F.cross_entropy(logits.to(self.dtype), y, label_smoothing=self.label_smoothing)
        if mark is not None:
            mark()
        self.opt.zero_grad()
        if self.scaler is None:
            loss.backward()
            if mark is not None:
                mark()
            self.opt.step()
        else:
            (loss * self.scaler.scale).backward()
            if mark is not None:
                mark()
            self.scaler.step(self.opt, self.overflow_average)
        if mark is not None:
            mark()
        return logits, loss
