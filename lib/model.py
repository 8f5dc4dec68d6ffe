"""The networks: AlexNet as the original builds it, and the cuda-convnet 18pct net for 32 px images.

Layouts are PyTorch's (conv weight (out, in/groups, kh, kw), fc weight (out, in)); the original's
true convolution, (in, rows, cols, out) storage and W0/W1 halves are converted by pretrained/.
"""
import torch
from torch import nn
import torch.nn.functional as F

from lib.config import ConfigError


def _channel_window_sum(t, before, after):
    """out[:, c] = sum of t[:, c - before .. c + after] over the channels that exist."""
    out = t.clone()
    C = t.shape[1]
    for o in range(1, min(after, C - 1) + 1):
        out[:, :C - o] += t[:, o:]
    for o in range(1, min(before, C - 1) + 1):
        out[:, o:] += t[:, :C - o]
    return out


class _LRN(torch.autograd.Function):
    """F.local_response_norm for (N, C, H, W), with a hand-written backward.

    y = x * d^-beta,  d = k + alpha/size * sum_{window(c)} x^2, window(c) = [c - size//2,
    c + (size-1)//2] as nn.LocalResponseNorm. Backward: dx_i = g_i d_i^-beta
    - 2 alpha beta/size * x_i * sum_{j: i in window(j)} g_j y_j / d_j.
    Same values as F.local_response_norm to float rounding, about 5x faster on CPU forward +
    backward (it sums shifted channel slices instead of running avg_pool3d, and keeps the
    memory format: channels_last stays channels_last).
    """

    @staticmethod
    def forward(ctx, x, size, alpha, beta, k):
        d = _channel_window_sum(x * x, size // 2, (size - 1) // 2).mul_(alpha / size).add_(k)
        p = d.pow(-beta)
        ctx.save_for_backward(x, p, d)
        ctx.lrn = size, alpha, beta
        return x * p

    @staticmethod
    def backward(ctx, g):
        x, p, d = ctx.saved_tensors
        size, alpha, beta = ctx.lrn
        gp = g * p
        t = _channel_window_sum(gp * x / d, (size - 1) // 2, size // 2)  # g_j y_j / d_j
        return gp.sub_(t.mul_(x).mul_(2 * alpha * beta / size)), None, None, None, None


def local_response_norm(x, size, alpha=1e-4, beta=0.75, k=1.0):
    """F.local_response_norm's formula (alpha divided by size) for 4-D inputs, faster.

    Always computed in float32 (forward and the hand-written backward): under fp16 autocast the
    window sum of x^2 overflows past 65,504 (5 channels of 115 do) and zeroes the output.
    The result is cast back to the input's dtype (the gradient too, by autograd)."""
    low = x.dtype in (torch.float16, torch.bfloat16)
    t = x.float() if low else x
    if t.dim() != 4:
        y = F.local_response_norm(t, size, alpha, beta, k)
    else:
        y = _LRN.apply(t, size, alpha, beta, k)
    return y.to(x.dtype) if low else y


class LRN(nn.LocalResponseNorm):
    """nn.LocalResponseNorm (same arguments, same values) computed by local_response_norm."""

    def forward(self, x):
        return local_response_norm(x, self.size, self.alpha, self.beta, self.k)


class CrossChannelLRN(nn.Module):
    """pylearn2 CrossChannelNormalization: x / (k + alpha * sum_{n neighbours} x^2) ** beta.

    pylearn2 does not divide alpha by n; nn.LocalResponseNorm does, so it gets alpha * n.
    """

    def __init__(self, n=5, alpha=1e-4, beta=0.75, k=2.0):
        super().__init__()
        self.n, self.alpha, self.beta, self.k = n, alpha, beta, k

    def forward(self, x):
        return local_response_norm(x, self.n, alpha=self.alpha * self.n, beta=self.beta, k=self.k)

    def extra_repr(self):
        return f'n={self.n}, alpha={self.alpha}, beta={self.beta}, k={self.k}'


class Dropout(nn.Module):
    """The original's non-inverted dropout: training multiplies by the 0/1 mask, testing by 1 - p.

    (nn.Dropout scales by 1/(1-p) while training instead, which changes the effective step size
    of the layers after it under the original's learning rates.)

    The mask is drawn for the whole step: rows = (lo, step), set by share_dropout for one of
    several workers, draws it for all `step` images, from torch's generator of the device (in the
    same state in every worker), and this worker keeps rows lo.. of it; so each image gets the
    mask it gets in a one-worker run. The mask is uniform >= p, drawn in float32 whatever the
    precision (the same masks in fp32 and fp64 runs), and applied exactly: x * mask.
    """

    def __init__(self, p):
        super().__init__()
        self.p = p
        self.rows = None  # (lo, step); None: the step is this worker's images

    def forward(self, x):
        if self.p == 0:
            return x
        if not self.training:
            return x * (1 - self.p)
        lo, step = self.rows or (0, len(x))
        keep = torch.rand((step, *x.shape[1:]), device=x.device)[lo:lo + len(x)] >= self.p
        return x * keep

    def extra_repr(self):
        return f'p={self.p}, non-inverted'


def share_dropout(net, lo, step):
    """Make the dropout layers of `net` draw their masks for a whole step of `step` images and
    keep rows lo.. (a worker's share of the step); step None: for its own images (one worker)."""
    for layer in net.modules():
        if isinstance(layer, Dropout):
            layer.rows = None if step is None else (lo, step)


def _init(layer, std, bias):
    nn.init.normal_(layer.weight, 0.0, std)
    nn.init.constant_(layer.bias, bias)
    return layer


class AlexNet(nn.Module):
    """Reference §2: conv -> ReLU -> max-pool -> LRN (LRN after pooling), grouped conv2/4/5."""

    def __init__(self, num_classes=1000, dropout=0.5):
        super().__init__()
        self.features = nn.Sequential(
            _init(nn.Conv2d(3, 96, 11, stride=4), 0.01, 0.0),                # 96 x 55 x 55
            nn.ReLU(inplace=True), nn.MaxPool2d(3, 2), CrossChannelLRN(),    # 96 x 27 x 27
            _init(nn.Conv2d(96, 256, 5, padding=2, groups=2), 0.01, 0.1),    # 256 x 27 x 27
            nn.ReLU(inplace=True), nn.MaxPool2d(3, 2), CrossChannelLRN(),    # 256 x 13 x 13
            _init(nn.Conv2d(256, 384, 3, padding=1), 0.01, 0.0),             # 384 x 13 x 13
            nn.ReLU(inplace=True),
            _init(nn.Conv2d(384, 384, 3, padding=1, groups=2), 0.01, 0.1),   # 384 x 13 x 13
            nn.ReLU(inplace=True),
            _init(nn.Conv2d(384, 256, 3, padding=1, groups=2), 0.01, 0.0),   # 256 x 13 x 13
            nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),                       # 256 x 6 x 6
        )
        self.classifier = nn.Sequential(
            _init(nn.Linear(256 * 6 * 6, 4096), 0.005, 0.1), nn.ReLU(inplace=True), Dropout(dropout),
            _init(nn.Linear(4096, 4096), 0.005, 0.1), nn.ReLU(inplace=True), Dropout(dropout),
            _init(nn.Linear(4096, num_classes), 0.01, 0.0),
        )

    def forward(self, x):  # x: (B, 3, 227, 227) float, mean subtracted
        return self.classifier(torch.flatten(self.features(x), 1))  # logits (B, classes)


class AlexNetCifar(nn.Module):
    """cuda-convnet's layers-18pct net (as SINGA's AlexNet on CIFAR-10, Caffe's cifar10_full).

    conv5x5/32 -> max-pool 3/2 -> ReLU -> LRN; conv5x5/32 -> ReLU -> avg-pool 3/2 -> LRN;
    conv5x5/64 -> ReLU -> avg-pool 3/2; fc -> classes. Pools round up (cuda-convnet, Caffe), so a
    32 px input gives 16, 8, 4. `dropout` is unused: the 18pct net has none.
    """

    def __init__(self, num_classes=10, dropout=0.0, crop_size=32):
        super().__init__()
        lrn = dict(size=3, alpha=5e-5, beta=0.75, k=1.0)
        self.features = nn.Sequential(
            _init(nn.Conv2d(3, 32, 5, padding=2), 1e-4, 0.0),
            nn.MaxPool2d(3, 2, ceil_mode=True), nn.ReLU(inplace=True), LRN(**lrn),
            _init(nn.Conv2d(32, 32, 5, padding=2), 0.01, 0.0),
            nn.ReLU(inplace=True), nn.AvgPool2d(3, 2, ceil_mode=True), LRN(**lrn),
            _init(nn.Conv2d(32, 64, 5, padding=2), 0.01, 0.0),
            nn.ReLU(inplace=True), nn.AvgPool2d(3, 2, ceil_mode=True),
        )
        with torch.no_grad():  # 64 x 4 x 4 for 32 px; draws no random numbers
            n_features = self.features(torch.zeros(1, 3, crop_size, crop_size)).numel()
        self.classifier = _init(nn.Linear(n_features, num_classes), 0.01, 0.0)

    def forward(self, x):  # x: (B, 3, S, S)
        return self.classifier(torch.flatten(self.features(x), 1))


def check_crop(name, crop_size):
    """ConfigError naming the fix when the network `name` cannot take crops of crop_size."""
    if name == 'alexnet' and crop_size != 227:
        raise ConfigError(f'model alexnet needs crop_size 227, got {crop_size} (or set '
                          f'model=alexnet_cifar for small images, e.g. 32 px)')


def build(name, num_classes, dropout, crop_size, seed):
    """The model with its initial weights drawn from `seed` (identical in every worker), for
    crops of crop_size (checked where the config comes in: lib/runs.py, from_state)."""
    torch.manual_seed(seed)
    if name == 'alexnet':
        return AlexNet(num_classes, dropout)
    return AlexNetCifar(num_classes, dropout, crop_size)


def output_classes(state_dict):
    """The classes a network's weights predict: the rows of its last fully connected layer."""
    fc = [v for k, v in state_dict.items()
          if k.endswith('weight') and isinstance(v, torch.Tensor) and v.ndim == 2]
    if not fc:
        raise ValueError('no fully connected layer in the weights')
    return fc[-1].shape[0]


def from_state(state_dict, name, dropout, crop_size):
    """The network `name` holding the weights of a snapshot, in eval mode. ValueError (alexnet's
    crop_size, no fc layer) or RuntimeError (weights of another shape) when they do not fit."""
    check_crop(name, crop_size)
    net = build(name, output_classes(state_dict), dropout, crop_size, 0)
    net.load_state_dict(state_dict)
    return net.eval()
