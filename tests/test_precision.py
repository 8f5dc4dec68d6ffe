"""precision (bf16 / fp16 with loss scaling), channels_last and compile, through the one loop."""
import pytest
import torch

from lib import optim, trainer, training
from tests.test_train import tiny_config


def final_weights(root, **over):
    history = training.run(tiny_config(root, n_epochs=2, **over))
    state = torch.load(f'{root}/w/model_2.pt', weights_only=True)
    return history, state


@pytest.mark.parametrize('precision', ['bf16', 'fp16'])
def test_mixed_precision_trains_close_to_fp32(tmp_path, precision):
    ref, ref_state = final_weights(str(tmp_path / 'fp32'), learning_rate=0.003)
    got, state = final_weights(str(tmp_path / precision), learning_rate=0.003, precision=precision)
    assert got[-1]['train_loss'] < got[0]['train_loss']              # it learns
    assert abs(got[-1]['val_loss'] - ref[-1]['val_loss']) < 0.1       # like fp32 does
    assert all(v.dtype == torch.float32 for v in state['model'].values())  # master weights fp32
    assert ('loss_scale' in state) == (precision == 'fp16')


def test_loss_scaler_skips_overflowing_steps_and_backs_off():
    w = torch.nn.Parameter(torch.ones(2, 2))
    opt = optim.MomentumSGD([('w', w)], lr=0.1, weight_decay=0.0)
    scaler = optim.LossScaler('cpu', init=8.0, interval=2)
    w.grad = torch.full((2, 2), 8.0)                       # = scale * 1.0
    assert scaler.step(opt) and torch.allclose(w, torch.full((2, 2), 0.9))
    w.grad = torch.tensor([[float('inf'), 0.0], [0.0, 0.0]])
    before = w.detach().clone()
    assert not scaler.step(opt) and torch.equal(w, before)  # skipped
    assert scaler.scale.item() == 4.0                       # backed off
    for _ in range(2):                                       # two good steps: grows back
        w.grad = torch.zeros(2, 2)
        assert scaler.step(opt)
    assert scaler.scale.item() == 8.0


def test_channels_last_trains_like_the_default_layout(tmp_path):
    a, _ = final_weights(str(tmp_path / 'a'))
    b, _ = final_weights(str(tmp_path / 'b'), channels_last=True)
    assert [h['val_loss'] for h in a] == pytest.approx([h['val_loss'] for h in b], rel=1e-4)


def test_compiled_network_trains_and_snapshots_plain_keys(tmp_path):
    """compile=True on the CPU: torch.compile's default backend, inductor, compiles the network
    (forward and backward: no silent fall-back to eager) and 2 epochs of alexnet_cifar train as
    eager does, to 1 % of the train loss."""
    from torch._dynamo.utils import counters
    a, state_a = final_weights(str(tmp_path / 'a'), learning_rate=0.003)
    counters.clear()
    b, state_b = final_weights(str(tmp_path / 'b'), learning_rate=0.003, compile=True)
    assert counters['frames']['ok'] >= 1 and counters['aot_autograd']['ok'] >= 1, dict(counters)
    assert sum(counters['inductor'].values()) > 0, dict(counters)  # inductor made the kernels
    assert list(state_b['model']) == list(state_a['model'])   # no '_orig_mod.' prefix
    # fused kernels round differently: close, not equal
    assert [h['train_loss'] for h in a] == pytest.approx([h['train_loss'] for h in b], rel=1e-2)
    assert b[-1]['train_loss'] < b[0]['train_loss']


def test_fp16_overflow_decision_is_shared_by_the_workers(tmp_path):
    """Two real Pair exchangers (tcp transport, in threads): worker 1 alone overflows; both skip
    the step, both back off, and their scales stay equal; then both step."""
    from lib import exchange
    from tests.helpers import both_workers

    def worker(rank):
        w = torch.nn.Parameter(torch.ones(2, 2))
        opt = optim.MomentumSGD([('w', w)], lr=0.1, weight_decay=0.0)
        pair = exchange.Pair(rank, 'tcp', f'ipc://{tmp_path}/link', timeout=20.0)
        scaler = optim.LossScaler('cpu', init=8.0, interval=100)
        try:
            pair.attach(opt.params, opt.momentum, torch.device('cpu'))
            took = []
            for bad in (True, False):
                g = torch.full((2, 2), 8.0)
                if bad and rank == 1:
                    g[0, 0] = float('inf')
                opt.params[0].grad = g
                took.append(scaler.step(opt, pair.average))
                pair.after_step()
            return took, scaler.scale.item(), opt.params[0].detach().clone()
        finally:
            pair.close()
    results = both_workers(worker)
    (took0, scale0, w0), (took1, scale1, w1) = results[0], results[1]
    assert took0 == took1 == [False, True]     # worker 0 skipped too: one decision
    assert scale0 == scale1 == 4.0             # backed off once, alike
    assert torch.equal(w0, w1)
    assert torch.allclose(w0, torch.full((2, 2), 1 - 0.1 * 8.0 / 4.0))


@pytest.mark.parametrize('precision,dtype', [('bf16', torch.bfloat16), ('fp16', torch.float16),
                                             ('fp32', torch.float32), ('fp64', torch.float64)])
def test_the_forward_runs_in_the_precision_asked_for(tmp_path, monkeypatch, precision, dtype):
    """Every convolution and linear layer's output, in training and in validation, is of the
    precision's dtype (autocast really on for bf16 / fp16)."""
    seen, fit = {}, trainer.Trainer.fit

    def hook(module, args, output):
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            seen.setdefault(module.training, set()).add(output.dtype)

    def hooked_fit(self, *args):  # the loop's forwards only (the model's constructor runs one)
        handle = torch.nn.modules.module.register_module_forward_hook(hook)
        try:
            return fit(self, *args)
        finally:
            handle.remove()
    monkeypatch.setattr(trainer.Trainer, 'fit', hooked_fit)
    training.run(tiny_config(str(tmp_path), n_epochs=1, precision=precision))
    assert seen == {True: {dtype}, False: {dtype}}


def test_an_fp16_step_updates_the_weights_as_an_fp32_step_does():
    """The loss is scaled up before backward and the gradients unscaled before the update: one
    step moves the weights as fp32's does, to fp16's rounding."""
    from lib import model, step
    x, y = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3])
    moved = {}
    for precision in ('fp32', 'fp16'):
        net = model.build('alexnet_cifar', 10, 0.0, 32, seed=0)
        before = [p.detach().clone() for p in net.parameters()]
        opt = optim.MomentumSGD(net.named_parameters(), lr=0.1, momentum=0.0, weight_decay=0.0)
        step.Step(net, opt, precision, torch.device('cpu'))(x, y)
        moved[precision] = torch.cat([(p.detach() - b).flatten() for p, b in zip(net.parameters(), before)])
    assert moved['fp32'].norm() > 0
    assert ((moved['fp16'] - moved['fp32']).norm() / moved['fp32'].norm()).item() < 0.05
