"""The networks: reference §2 shapes, parameter count, LRN, dropout, initialisation."""
import pytest
import torch

from lib import model


def test_alexnet_layer_shapes_and_parameter_count():
    net = model.build('alexnet', 1000, 0.5, 227, seed=1)
    assert sum(p.numel() for p in net.parameters()) == 60_965_224
    shapes = {n: tuple(p.shape) for n, p in net.named_parameters() if n.endswith('weight')}
    assert list(shapes.values()) == [(96, 3, 11, 11), (256, 48, 5, 5), (384, 256, 3, 3),
                                     (384, 192, 3, 3), (256, 192, 3, 3), (4096, 9216),
                                     (4096, 4096), (1000, 4096)]
    x = torch.zeros(1, 3, 227, 227)
    sizes = []
    for layer in net.features:
        x = layer(x)
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.MaxPool2d)):
            sizes.append(tuple(x.shape[1:]))
    assert sizes == [(96, 55, 55), (96, 27, 27), (256, 27, 27), (256, 13, 13), (384, 13, 13),
                     (384, 13, 13), (256, 13, 13), (256, 6, 6)]
    # LRN comes after pooling in conv1 and conv2 (unlike Caffe)
    kinds = [type(m).__name__ for m in net.features]
    assert kinds[1:4] == ['ReLU', 'MaxPool2d', 'CrossChannelLRN']
    assert kinds[5:8] == ['ReLU', 'MaxPool2d', 'CrossChannelLRN']


def test_fc8_follows_the_number_of_classes():
    net = model.build('alexnet', 10, 0.5, 227, seed=1)
    assert sum(p.numel() for p in net.parameters()) == 60_965_224 - 4097 * 990
    assert net(torch.zeros(2, 3, 227, 227)).shape == (2, 10)


def test_lrn_is_pylearn2_cross_channel_normalisation():
    x = torch.randn(2, 8, 3, 3) * 30
    y = model.CrossChannelLRN()(x)
    sq = torch.nn.functional.pad(x ** 2, (0, 0, 0, 0, 2, 2))  # channel padding
    window = sum(sq[:, i:i + 8] for i in range(5))          # sum over 5 neighbouring channels
    assert torch.allclose(y, x / (2 + 1e-4 * window) ** 0.75, rtol=1e-5)


@pytest.mark.parametrize('size,alpha,beta,k', [(3, 5e-5, 0.75, 1.0), (5, 5e-4, 0.75, 2.0),
                                                (4, 1e-2, 0.6, 1.0)])
@pytest.mark.parametrize('layout', [torch.contiguous_format, torch.channels_last])
def test_fast_lrn_matches_torch_values_and_gradients(size, alpha, beta, k, layout):
    """model.local_response_norm (hand-written backward) == F.local_response_norm, in float64,
    for odd and even windows; its gradient passes gradcheck; the memory layout is kept."""
    torch.manual_seed(0)
    x = (torch.randn(4, 7, 5, 6, dtype=torch.float64) * 30).contiguous(memory_format=layout)
    x.requires_grad_()
    g = torch.randn(4, 7, 5, 6, dtype=torch.float64)
    ours = model.local_response_norm(x, size, alpha, beta, k)
    ref = torch.nn.functional.local_response_norm(x, size, alpha, beta, k)
    assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-12)
    assert ours.is_contiguous(memory_format=layout)
    g_ours, = torch.autograd.grad(ours, x, g)
    g_ref, = torch.autograd.grad(ref, x, g)
    assert torch.allclose(g_ours, g_ref, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: model.local_response_norm(t, size, alpha, beta, k),
                                    (x,))


def test_dropout_is_not_inverted():
    d = model.Dropout(0.5)
    x = torch.ones(10000)
    d.train()
    y = d(x)
    assert set(y.unique().tolist()) == {0.0, 1.0}        # mask only, no 1/(1-p)
    assert 0.45 < y.mean() < 0.55
    d.eval()
    assert torch.equal(d(x), x * 0.5)                  # test time scales by 1 - p


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_a_workers_dropout_masks_are_its_rows_of_the_steps_masks(dtype):
    """Each of N workers, from the same generator state, keeps its rows of the masks of the whole
    step: together they apply the masks one worker applies to the whole step, and their
    generators end in the same state as that worker's."""
    x = torch.randn(8, 64, dtype=dtype, requires_grad=True)
    alone = model.Dropout(0.5)
    torch.manual_seed(5)
    want = alone(x)
    after = torch.get_rng_state()
    for n in (2, 4):
        parts = []
        for r in range(n):
            worker = model.Dropout(0.5)
            model.share_dropout(torch.nn.Sequential(worker), r * 8 // n, 8)
            torch.manual_seed(5)
            parts.append(worker(x[r * 8 // n:(r + 1) * 8 // n]))
            assert torch.equal(torch.get_rng_state(), after)
        assert torch.equal(torch.cat(parts), want), n
    g = torch.autograd.grad(want.sum(), x)[0]
    assert torch.equal(g, (want != 0).to(dtype))  # backward: the same mask


def test_initialisation_follows_the_reference():
    net = model.build('alexnet', 1000, 0.5, 227, seed=23455)
    params = dict(net.named_parameters())
    convs = ['features.0', 'features.4', 'features.8', 'features.10', 'features.12']
    fcs = ['classifier.0', 'classifier.3', 'classifier.6']
    for name, std, bias in zip(convs + fcs, [0.01] * 5 + [0.005, 0.005, 0.01],
                               [0, 0.1, 0, 0.1, 0, 0.1, 0.1, 0]):
        w, b = params[name + '.weight'], params[name + '.bias']
        assert abs(w.std().item() - std) < 0.05 * std and abs(w.mean().item()) < 0.05 * std
        assert torch.all(b == bias)


def test_same_seed_same_weights_in_every_worker():
    a = model.build('alexnet_cifar', 10, 0.0, 32, seed=7).state_dict()
    b = model.build('alexnet_cifar', 10, 0.0, 32, seed=7).state_dict()
    c = model.build('alexnet_cifar', 10, 0.0, 32, seed=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a['features.0.weight'], c['features.0.weight'])


def test_alexnet_with_another_crop_names_the_fix():
    """Checked where the crop comes in: a config (lib/runs.py; test_config.py) or a snapshot."""
    from lib.config import ConfigError
    weights = model.build('alexnet', 10, 0.5, 227, seed=1).state_dict()
    with pytest.raises(ConfigError, match=r'^model alexnet needs crop_size 227, got 32 \(or set '
                                          r'model=alexnet_cifar for small images, e.g. 32 px\)$'):
        model.from_state(weights, 'alexnet', 0.5, 32)


def test_alexnet_cifar_is_the_18pct_net():
    net = model.build('alexnet_cifar', 10, 0.0, 32, seed=1)
    convs = [m for m in net.features if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(32, (5, 5)), (32, (5, 5)),
                                                                 (64, (5, 5))]
    assert net.classifier.in_features == 64 * 4 * 4
    assert net(torch.zeros(3, 3, 32, 32)).shape == (3, 10)
    assert model.build('alexnet_cifar', 10, 0.0, 24, seed=1)(torch.zeros(1, 3, 24, 24)).shape == (1, 10)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_lrn_runs_in_float32_under_autocast(dtype):
    """AlexNet's conv1/conv2 outputs on 0-255 pixels reach ~130: 8 channels of 130 sum to
    5 x 130^2 = 84,500 in a window, past float16's 65,504. The LRN must upcast: values and
    gradients as in float32, to the low precision's own rounding."""
    torch.manual_seed(0)
    x32 = (130 + torch.randn(2, 8, 5, 5)).to(dtype).float().requires_grad_()  # representable
    g = torch.randn(2, 8, 5, 5).to(dtype).float()
    ref = model.CrossChannelLRN()(x32)
    g_ref, = torch.autograd.grad(ref, x32, g)
    x = x32.detach().to(dtype).requires_grad_()
    with torch.autocast('cpu', dtype=dtype):
        y = model.CrossChannelLRN()(x)
    assert y.dtype == dtype                       # the activations stay in the autocast dtype
    g_x, = torch.autograd.grad(y, x, g.to(dtype))
    assert y[:, 1:-1].abs().min() > 20            # not zeroed by an overflow
    assert g_x.dtype == dtype and torch.isfinite(g_x).all()
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert torch.allclose(y.float(), ref, rtol=tol, atol=0)
    assert torch.allclose(g_x.float(), g_ref, rtol=8 * tol, atol=8 * tol * g_ref.abs().max().item())
    # through a conv under autocast, as in the network: its output is in the autocast dtype
    conv = torch.nn.Conv2d(3, 8, 1, bias=False)
    torch.nn.init.constant_(conv.weight, 1.0)
    img = torch.full((1, 3, 4, 4), 130 / 3)
    with torch.autocast('cpu', dtype=dtype):
        out = model.CrossChannelLRN()(conv(img))
    assert torch.allclose(out.float(), model.CrossChannelLRN()(conv(img)), rtol=tol)


def test_alexnet_gets_the_dropout_asked_for():
    """(alexnet_cifar, the 18pct net, has no dropout)"""
    for p in (0.0, 0.3, 0.5):
        layers = [m for m in model.build('alexnet', 10, p, 227, seed=0).modules()
                  if isinstance(m, model.Dropout)]
        assert [m.p for m in layers] == [p, p]
