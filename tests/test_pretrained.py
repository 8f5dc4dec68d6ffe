"""pretrained/convert.py: the original's per-layer .npy snapshots <-> our checkpoints.

The reference is a numpy forward pass written the way the original computes (lib/layers.py of
theano_alexnet), not from lib/model.py: c01b activations (channels, rows, cols, batch), TRUE
convolution with (in, rows, cols, out) kernels, conv2/4/5 as two halves W0/W1 + b0/b1 on the two
halves of the input channels, ReLU -> max-pool 3/2 -> pylearn2 LRN, fc as x @ W (in, out) + b, and
test-time dropout as a multiplication of the fc6/fc7 outputs by 0.5.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lib import checkpoint
from lib.model import AlexNet
from pretrained import convert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'pretrained', 'convert.py')
EPOCH = 65
CLASSES = 10  # fc8 small to keep the test light; conv1-fc7 are full size

# The original's 22 weight files per snapshot, as its save_weights names them (layer index 0..7).
NAMES = ['W_0', 'b_0', 'W0_1', 'W1_1', 'b0_1', 'b1_1', 'W_2', 'b_2', 'W0_3', 'W1_3', 'b0_3', 'b1_3',
         'W0_4', 'W1_4', 'b0_4', 'b1_4', 'W_5', 'b_5', 'W_6', 'b_6', 'W_7', 'b_7']
SHAPES = {  # the original's layout: conv (in, rows, cols, out) per group, fc (in, out)
    'W_0': (3, 11, 11, 96), 'W0_1': (48, 5, 5, 128), 'W_2': (256, 3, 3, 384),
    'W0_3': (192, 3, 3, 192), 'W0_4': (192, 3, 3, 128),
    'W_5': (9216, 4096), 'W_6': (4096, 4096), 'W_7': (4096, CLASSES)}


# --- the original's forward pass, in numpy (float64) ----------------------------------------------
def conv_c01b(x, w, b, stride, pad):
    """True convolution: out[o, i, j] = b[o] + sum_{c,u,v} x[c, i*s + u, j*s + v] * w[c, K-1-u, K-1-v, o]."""
    k = w.shape[1]
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    n = (x.shape[1] - k) // stride + 1
    out = np.zeros((w.shape[3], n, n, x.shape[3]))
    for u in range(k):  # shift-and-accumulate (im2col one kernel tap at a time)
        for v in range(k):
            patch = x[:, u:u + stride * (n - 1) + 1:stride, v:v + stride * (n - 1) + 1:stride]
            out += np.tensordot(w[:, k - 1 - u, k - 1 - v, :], patch, axes=(0, 0))
    return out + b[:, None, None, None]


def conv_layer(x, p, idx, stride, pad):
    if f'W_{idx}' in p:
        return conv_c01b(x, p[f'W_{idx}'], p[f'b_{idx}'], stride, pad)
    half = x.shape[0] // 2
    return np.concatenate([conv_c01b(x[:half], p[f'W0_{idx}'], p[f'b0_{idx}'], stride, pad),
                           conv_c01b(x[half:], p[f'W1_{idx}'], p[f'b1_{idx}'], stride, pad)])


def maxpool_c01b(x, size=3, stride=2):
    n = (x.shape[1] - size) // stride + 1
    return np.max([x[:, u:u + stride * (n - 1) + 1:stride, v:v + stride * (n - 1) + 1:stride]
                   for u in range(size) for v in range(size)], axis=0)


def lrn_c01b(x, n=5, k=2.0, alpha=1e-4, beta=0.75):
    """pylearn2 CrossChannelNormalization: alpha is NOT divided by n."""
    sq = np.pad(x ** 2, ((n // 2, n // 2), (0, 0), (0, 0), (0, 0)))
    window = sum(sq[i:i + x.shape[0]] for i in range(n))
    return x / (k + alpha * window) ** beta


def relu(x):
    return np.maximum(x, 0)


def original_forward(p, x):
    """p: {file stem: array} in the original's layout; x: (3, 227, 227, B) c01b. Logits (B, C)."""
    p = {k: v.astype(np.float64) for k, v in p.items()}
    x = lrn_c01b(maxpool_c01b(relu(conv_layer(x, p, 0, 4, 0))))   # 96 x 27 x 27
    x = lrn_c01b(maxpool_c01b(relu(conv_layer(x, p, 1, 1, 2))))   # 256 x 13 x 13
    x = relu(conv_layer(x, p, 2, 1, 1))                           # 384 x 13 x 13
    x = relu(conv_layer(x, p, 3, 1, 1))                           # 384 x 13 x 13
    x = maxpool_c01b(relu(conv_layer(x, p, 4, 1, 1)))             # 256 x 6 x 6
    x = x.transpose(3, 0, 1, 2).reshape(x.shape[3], -1)          # c01b -> bc01, flatten: (B, 9216)
    x = relu(x @ p['W_5'] + p['b_5']) * 0.5                       # fc6, test-time dropout
    x = relu(x @ p['W_6'] + p['b_6']) * 0.5                       # fc7, test-time dropout
    return x @ p['W_7'] + p['b_7']


# --- fixtures -------------------------------------------------------------------------------------
def random_original(seed=0):
    """Random parameters in the original's layout, He-scaled so activations stay O(10-100)
    (large enough that the LRN is far from the identity), with non-zero biases."""
    rng = np.random.default_rng(seed)
    p = {}
    for name in NAMES:
        idx = name.split('_')[1]
        shape = SHAPES.get(f'W_{idx}') or SHAPES[f'W0_{idx}']
        if name.startswith('W'):
            fan_in = int(np.prod(shape[:-1]))
            p[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32((2 / fan_in) ** 0.5)
        else:
            p[name] = rng.standard_normal(shape[-1], dtype=np.float32)
    return p


@pytest.fixture(scope='module')
def original(tmp_path_factory):
    folder = tmp_path_factory.mktemp('parameters_releasing')
    params = random_original()
    for name, arr in params.items():
        np.save(folder / f'{name}_{EPOCH}.npy', arr)
    return folder, params


@pytest.fixture(scope='module')
def imported(original, tmp_path_factory):
    """The plain-script form, run from outside the repo (no sys.path help from the cwd)."""
    out = tmp_path_factory.mktemp('ours') / f'model_{EPOCH}.pt'
    r = subprocess.run([sys.executable, SCRIPT, 'import', str(original[0]), str(EPOCH), str(out)],
                       cwd=out.parent, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return out


# --- tests ----------------------------------------------------------------------------------------
def test_imported_weights_give_the_original_logits(original, imported):
    """Through the network validate_performance.py and serve.py build from a snapshot (its
    model, crop_size and dropout from the snapshot's config): the imported file must carry the
    original's test-time dropout scaling (x 0.5 after fc6 and fc7), or every logit is off."""
    state = torch.load(imported, weights_only=True)
    assert state['epoch'] == EPOCH and state['config']['num_classes'] == CLASSES
    net, settings = checkpoint.load_net(checkpoint.read(str(imported)), str(imported))
    assert isinstance(net, AlexNet) and not net.training and settings['crop_size'] == 227

    x = np.random.default_rng(1).normal(0, 50, size=(3, 227, 227, 2)).astype(np.float32)  # c01b
    want = original_forward(original[1], x.astype(np.float64))
    with torch.no_grad():
        got = net(torch.from_numpy(x.transpose(3, 0, 1, 2).copy())).double().numpy()
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-4 * scale

    # the comparison is sharp: the same kernels without the flip (as cross-correlation) differ
    unflipped = {k: (v.flip(2, 3) if v.ndim == 4 else v) for k, v in state['model'].items()}
    net.load_state_dict(unflipped)
    with torch.no_grad():
        wrong = net(torch.from_numpy(x.transpose(3, 0, 1, 2).copy())).double().numpy()
    assert np.abs(wrong - want).max() > 1e-2 * scale


def test_export_and_import_are_inverse(original, imported, tmp_path):
    # ours -> original: the exported files are the original ones, bit for bit, with the same names
    assert convert.main(['export', str(imported), str(tmp_path / 'back'), str(EPOCH)]) == 0
    assert sorted(os.listdir(tmp_path / 'back')) == sorted(f'{n}_{EPOCH}.npy' for n in NAMES)
    for name, arr in original[1].items():
        again = np.load(tmp_path / 'back' / f'{name}_{EPOCH}.npy')
        assert again.dtype == np.float32 and again.flags.c_contiguous
        assert np.array_equal(again, arr), name

    # a checkpoint of ours with momentum, lr and val_record -> original files -> ours: identical
    net = AlexNet(num_classes=CLASSES)
    mom = {k: torch.randn_like(v) for k, v in net.state_dict().items()}
    record = torch.tensor([[0.9, 6.5], [0.8, 5.0]], dtype=torch.float64)
    torch.save({'model': net.state_dict(), 'momentum': mom, 'lr': 0.01, 'epoch': 2,
                'val_record': record}, tmp_path / 'model_2.pt')
    assert convert.main(['export', str(tmp_path / 'model_2.pt'), str(tmp_path / 'orig'), '2']) == 0
    names = os.listdir(tmp_path / 'orig')
    assert {f'mom_{k}_2.npy' for k in range(22)} | {'lr_2.npy', 'val_record.npy'} <= set(names)
    assert convert.main(['import', str(tmp_path / 'orig'), '2', str(tmp_path / 'again.pt')]) == 0
    again = torch.load(tmp_path / 'again.pt', weights_only=True)
    for want, got in ((net.state_dict(), again['model']), (mom, again['momentum'])):
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want)
    assert again['lr'] == pytest.approx(0.01) and torch.equal(again['val_record'], record)


def test_bad_input_is_a_one_line_error_naming_the_file(original, tmp_path, capsys):
    src, params = original
    # a missing file, through the script: exit status 2, one line on stderr
    partial = tmp_path / 'partial'
    partial.mkdir()
    for name in NAMES:
        if name != 'b1_3':
            os.symlink(src / f'{name}_{EPOCH}.npy', partial / f'{name}_{EPOCH}.npy')
    r = subprocess.run([sys.executable, SCRIPT, 'import', str(partial), str(EPOCH),
                        str(tmp_path / 'x.pt')], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ''
    assert r.stderr.count('\n') == 1 and r.stderr.startswith('error: ')
    assert f'b1_3_{EPOCH}.npy' in r.stderr
    assert not (tmp_path / 'x.pt').exists()

    # a half stored with in/out swapped
    np.save(partial / f'b1_3_{EPOCH}.npy', params['b1_3'])
    os.remove(partial / f'W0_4_{EPOCH}.npy')
    np.save(partial / f'W0_4_{EPOCH}.npy', params['W0_4'].transpose(3, 1, 2, 0))
    assert convert.main(['import', str(partial), str(EPOCH), str(tmp_path / 'x.pt')]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and f'W0_4_{EPOCH}.npy' in err and '(192, 3, 3, 128)' in err

    # not an .npy file; a snapshot epoch that is not there; a checkpoint that does not exist
    os.remove(partial / f'W0_4_{EPOCH}.npy')
    np.save(partial / f'W0_4_{EPOCH}.npy', params['W0_4'])
    os.remove(partial / f'W_6_{EPOCH}.npy')
    (partial / f'W_6_{EPOCH}.npy').write_text('not numpy')
    assert convert.main(['import', str(partial), str(EPOCH), str(tmp_path / 'x.pt')]) == 2
    assert f'W_6_{EPOCH}.npy' in capsys.readouterr().err
    assert convert.main(['import', str(partial), '60', str(tmp_path / 'x.pt')]) == 2
    assert f'missing W_0_60.npy in {partial} (epochs there: [65])' in capsys.readouterr().err
    assert convert.main(['export', str(tmp_path / 'none.pt'), str(tmp_path / 'out'), '1']) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and 'none.pt' in err and err.count('\n') == 1
