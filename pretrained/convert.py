"""Convert between the original theano_alexnet's per-layer .npy snapshots and our checkpoints.

    .venv/bin/python pretrained/convert.py import SRC_DIR EPOCH OUT.pt       # original files -> ours
    .venv/bin/python pretrained/convert.py export CHECKPOINT.pt DST_DIR EPOCH  # ours -> original files
    (.venv/bin/python -m pretrained.convert ... is the same; both from the repo root or anywhere else)

The original (lib/tools.py save_weights / save_momentums, train.py) writes per snapshot epoch N, with
layer index i over its `layers` list (0-4 conv1-conv5, 5-7 fc6-fc8; the dropout layers are not in it):
    W_<i>_<N>.npy, b_<i>_<N>.npy            ungrouped layers i = 0, 2, 5, 6, 7
    W0_<i>_<N>.npy, W1_<i>_<N>.npy,         2-group layers i = 1, 3, 4 (conv2, conv4, conv5): the
    b0_<i>_<N>.npy, b1_<i>_<N>.npy            halves, half 0 sees input channels [0, C/2) and gives
                                              output channels [0, O/2), half 1 the others
    mom_<k>_<N>.npy                         momentum of its k-th parameter, k = 0..21 in the order
                                              W_0 b_0 W0_1 b0_1 W1_1 b1_1 W_2 b_2 W0_3 b0_3 W1_3 ...
    lr_<N>.npy                              learning rate (0-d float32), and val_record.npy
                                              (float64 rows [top-1 error, loss], one per epoch)
Only the 22 weight files are required (the released epoch-65 parameters are just those); momentum,
lr and val_record are carried over when present.

Layouts: conv kernels are stored (in, rows, cols, out) and applied as a TRUE convolution (cuDNN's
default 'conv' mode in Theano), so a PyTorch kernel (out, in, rows, cols) is the stored one
transposed and flipped in both spatial axes; fc matrices are stored (in, out), PyTorch's (out, in).
Both maps are exact (no arithmetic), so export and import are each other's inverse bit for bit.
Dropout is non-inverted in both (test time multiplies by 0.5), so no weight is rescaled.

It writes the state_dict keys of lib.model.AlexNet by name (numpy and torch, plus lib.atomic's
writes, so that a file is complete or absent); it reads our snapshots as every command does
(lib.checkpoint.read).
tests/test_pretrained.py checks the keys against lib.model.AlexNet and the whole mapping against an
independent numpy forward pass written the way the original computes.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import lib.env  # noqa: E402,F401  first: without the packages, one line instead of a traceback
import numpy as np  # noqa: E402
import torch  # noqa: E402

from lib import UserError, checkpoint, command  # noqa: E402
from lib.atomic import atomic_write, save_npy  # noqa: E402

# (original layer index, our module, groups, whole-layer shape in the original's layout:
# (in, rows, cols, out) or (in, out)); None = the number of classes, read from W_7.
LAYERS = (
    (0, 'features.0', 1, (3, 11, 11, 96)),       # conv1
    (1, 'features.4', 2, (96, 5, 5, 256)),       # conv2
    (2, 'features.8', 1, (256, 3, 3, 384)),      # conv3
    (3, 'features.10', 2, (384, 3, 3, 384)),     # conv4
    (4, 'features.12', 2, (384, 3, 3, 256)),     # conv5
    (5, 'classifier.0', 1, (9216, 4096)),        # fc6
    (6, 'classifier.3', 1, (4096, 4096)),        # fc7
    (7, 'classifier.6', 1, (4096, None)),        # fc8 (the original's softmax layer)
)


class ConvertError(UserError):
    """Bad input; the message is one line naming the file, printed as `error: ...` (exit 2)."""


def pieces(num_classes):
    """The original's parameters in its `params` order (= the mom_<k> order):
    (file stem, our state_dict key, half index or None, shape in the original's layout)."""
    for idx, module, groups, shape in LAYERS:
        shape = tuple(num_classes if s is None else s for s in shape)
        if groups == 1:
            yield f'W_{idx}', f'{module}.weight', None, shape
            yield f'b_{idx}', f'{module}.bias', None, shape[-1:]
            continue
        half = (shape[0] // 2,) + shape[1:-1] + (shape[-1] // 2,)
        for g in range(2):
            yield f'W{g}_{idx}', f'{module}.weight', g, half
            yield f'b{g}_{idx}', f'{module}.bias', g, half[-1:]


def to_ours(arr):
    """One stored array (weight or bias, possibly a half) -> PyTorch layout, float32."""
    if arr.ndim == 4:
        arr = arr.transpose(3, 0, 1, 2)[:, :, ::-1, ::-1]  # (in,r,c,out) -> (out,in,r,c), flipped
    elif arr.ndim == 2:
        arr = arr.T  # (in, out) -> (out, in)
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def to_original(t):
    """Inverse of to_ours: a PyTorch tensor (or a half of one) -> the original's layout."""
    arr = t.detach().cpu().to(torch.float32).numpy()
    if arr.ndim == 4:
        arr = arr[:, :, ::-1, ::-1].transpose(1, 2, 3, 0)
    elif arr.ndim == 2:
        arr = arr.T
    return np.ascontiguousarray(arr)


# --- original files -> our checkpoint -----------------------------------------------------------
def load_npy(path, shape=None):
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise ConvertError(f'missing {name} in {os.path.dirname(path) or "."}')
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ConvertError(f'{path}: not a readable .npy array ({e})') from None
    if not np.issubdtype(arr.dtype, np.floating):
        raise ConvertError(f'{path}: dtype {arr.dtype}, expected floating point')
    if shape is not None and arr.shape != tuple(shape):
        raise ConvertError(f'{path}: shape {arr.shape}, expected {tuple(shape)}')
    return arr


def merge(parts, key):
    """Our tensor for `key` from its converted halves (or its single whole part)."""
    return parts[key][0] if len(parts[key]) == 1 else torch.cat(parts[key], 0)


def import_original(src_dir, epoch):
    """Read the original's snapshot of `epoch` from src_dir; return our checkpoint dict."""
    if not os.path.isdir(src_dir):
        raise ConvertError(f'no folder {src_dir}')
    if not os.path.exists(os.path.join(src_dir, f'W_0_{epoch}.npy')):
        have = sorted(int(n[4:-4]) for n in os.listdir(src_dir)
                      if n.startswith('W_0_') and n.endswith('.npy') and n[4:-4].isdigit())
        raise ConvertError(f'missing W_0_{epoch}.npy in {src_dir} (epochs there: {have or "none"})')
    w7 = load_npy(os.path.join(src_dir, f'W_7_{epoch}.npy'))
    if w7.ndim != 2 or w7.shape[0] != 4096:
        raise ConvertError(f'{os.path.join(src_dir, f"W_7_{epoch}.npy")}: shape {w7.shape}, '
                           'expected (4096, classes)')
    num_classes = w7.shape[1]
    order = list(pieces(num_classes))
    weights, momentum = {}, {}
    have_momentum = os.path.exists(os.path.join(src_dir, f'mom_0_{epoch}.npy'))
    for k, (stem, key, _, shape) in enumerate(order):
        arr = load_npy(os.path.join(src_dir, f'{stem}_{epoch}.npy'), shape)
        weights.setdefault(key, []).append(to_ours(arr))
        if have_momentum:
            mom = load_npy(os.path.join(src_dir, f'mom_{k}_{epoch}.npy'), shape)
            momentum.setdefault(key, []).append(to_ours(mom))
    state = {'model': {key: merge(weights, key) for key in weights}, 'epoch': int(epoch),
             'config': {'model': 'alexnet', 'num_classes': int(num_classes), 'crop_size': 227,
                        'dropout': 0.5},
             'source': f'theano_alexnet snapshot {os.path.abspath(src_dir)} epoch {epoch}'}
    if have_momentum:
        state['momentum'] = {key: merge(momentum, key) for key in momentum}
    lr_path = os.path.join(src_dir, f'lr_{epoch}.npy')
    if os.path.exists(lr_path):
        state['lr'] = float(load_npy(lr_path, ()))
    rec_path = os.path.join(src_dir, 'val_record.npy')
    if os.path.exists(rec_path):
        rec = load_npy(rec_path)
        if rec.ndim != 2 or rec.shape[1] != 2:
            raise ConvertError(f'{rec_path}: shape {rec.shape}, expected (epochs, 2)')
        state['val_record'] = torch.from_numpy(rec[:epoch].astype(np.float64))
    return state


# --- our checkpoint -> original files -----------------------------------------------------------
def original_arrays(tensors, path, what):
    """{file stem: array} in the original's layout from a dict of our tensors, checking shapes."""
    w8 = tensors.get('classifier.6.weight')
    if w8 is None or w8.ndim != 2 or w8.shape[1] != 4096:
        raise ConvertError(f'{path}: {what} has no AlexNet classifier.6.weight (classes, 4096)')
    out = []
    for stem, key, half, shape in pieces(w8.shape[0]):
        if key not in tensors:
            raise ConvertError(f'{path}: {what} lacks {key}')
        t = tensors[key]
        if half is not None:
            n = t.shape[0] // 2
            t = t[half * n:(half + 1) * n]
        arr = to_original(t)
        if arr.shape != shape:
            raise ConvertError(f'{path}: {what} {key} gives {stem} of shape {arr.shape}, '
                               f'expected {shape}')
        out.append((stem, arr))
    return out


def export_original(ckpt_path, dst_dir, epoch):
    """Write the checkpoint as the original's snapshot `epoch` in dst_dir; return the file names."""
    state = checkpoint.read(ckpt_path)
    files = [(f'{stem}_{epoch}.npy', arr)
             for stem, arr in original_arrays(state['model'], ckpt_path, 'model')]
    if isinstance(state.get('momentum'), dict):
        files += [(f'mom_{k}_{epoch}.npy', arr) for k, (_, arr) in
                  enumerate(original_arrays(state['momentum'], ckpt_path, 'momentum'))]
    if 'lr' in state:
        files.append((f'lr_{epoch}.npy', np.float32(state['lr'])))
    if 'val_record' in state:
        files.append(('val_record.npy', np.asarray(state['val_record'], dtype=np.float64)))
    os.makedirs(dst_dir, exist_ok=True)
    for name, arr in files:
        save_npy(os.path.join(dst_dir, name), arr)
    return [name for name, _ in files]


def save_checkpoint(state, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(state, tmp))


@command
def main(argv=None):
    p = argparse.ArgumentParser(prog='.venv/bin/python pretrained/convert.py',
                                description=__doc__.split('\n')[0])
    sub = p.add_subparsers(dest='cmd', required=True)
    imp = sub.add_parser('import', help="original's .npy files -> our checkpoint")
    imp.add_argument('src_dir')
    imp.add_argument('epoch', type=int)
    imp.add_argument('out')
    exp = sub.add_parser('export', help="our checkpoint -> original's .npy files")
    exp.add_argument('checkpoint')
    exp.add_argument('dst_dir')
    exp.add_argument('epoch', type=int)
    args = p.parse_args(argv)
    if args.cmd == 'import':
        state = import_original(args.src_dir, args.epoch)
        save_checkpoint(state, args.out)
        extras = [k for k in ('momentum', 'lr', 'val_record') if k in state]
        print(f'wrote {args.out}: AlexNet, {state["config"]["num_classes"]} classes, '
              f'epoch {args.epoch}' + (f', with {", ".join(extras)}' if extras else ''))
    else:
        names = export_original(args.checkpoint, args.dst_dir, args.epoch)
        print(f'wrote {len(names)} files to {args.dst_dir}')


if __name__ == '__main__':
    sys.exit(main())
