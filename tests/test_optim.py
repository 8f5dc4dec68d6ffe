"""The original's SGD (reference §3) against a hand computation, and both lr policies."""
import numpy as np
import pytest
import torch

from lib import optim


def params_and_grads():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(torch.randn(4))
    w.grad, b.grad = torch.randn(4, 3), torch.randn(4)
    return w, b


@pytest.mark.parametrize('mode', ['momentum', 'nesterov', 'plain'])
def test_two_steps_match_a_hand_computation(mode):
    lr, mu, decay = 0.01, 0.9, 0.0005
    w, b = params_and_grads()
    opt = optim.MomentumSGD([('w', w), ('b', b)], lr, mu, decay,
                            use_momentum=mode != 'plain', nesterov=mode == 'nesterov')
    expected = {}
    for name, p, lr_eff, lam in (('w', w, lr, decay), ('b', b, 2 * lr, 0.0)):
        p0, g = p.detach().double().numpy().copy(), p.grad.double().numpy()
        v = np.zeros_like(p0)
        for _ in range(2):  # the same gradient twice: the second step sees the momentum
            g_eff = g + lam * p0
            if mode == 'momentum':
                v = mu * v - lr_eff * g_eff
            elif mode == 'nesterov':
                v = mu ** 2 * v - (1 + mu) * lr_eff * g_eff
            else:
                v = -lr_eff * g_eff
            p0 = p0 + v
        expected[name] = (p0, v)
    grads = [w.grad.clone(), b.grad.clone()]
    for _ in range(2):  # fresh gradients each step, as after a backward pass
        w.grad, b.grad = grads[0].clone(), grads[1].clone()
        opt.step()
    for name, p, buf in (('w', w, opt.momentum[0]), ('b', b, opt.momentum[1])):
        np.testing.assert_allclose(p.detach().numpy(), expected[name][0], rtol=1e-6, atol=1e-7)
        if mode != 'plain':
            np.testing.assert_allclose(buf.numpy(), expected[name][1], rtol=1e-5, atol=1e-8)


def test_momentum_buffers_are_tensors_by_name_and_round_trip():
    w, b = params_and_grads()
    opt = optim.MomentumSGD([('w', w), ('b', b)], 0.01)
    opt.step()
    state = opt.state_dict()
    assert set(state['momentum']) == {'w', 'b'} and state['lr'] == 0.01
    w2, b2 = params_and_grads()
    opt2 = optim.MomentumSGD([('w', w2), ('b', b2)], 0.5)
    opt2.load_state_dict(state)
    assert opt2.lr == 0.01 and torch.equal(opt2.momentum[0], opt.momentum[0])
    with pytest.raises(KeyError, match='w'):
        opt2.load_state_dict({'lr': 0.1, 'momentum': {'b': b}})


def test_step_policy_divides_after_each_listed_epoch():
    lr, seen = 0.01, []
    for epoch in range(1, 61):
        lr = optim.adjust_lr(lr, epoch, [], 'step', [20, 40], 0.01)
        seen.append(lr)
    assert seen[18] == 0.01 and seen[19] == pytest.approx(0.001)   # after epoch 20
    assert seen[38] == pytest.approx(0.001) and seen[39] == pytest.approx(0.0001)
    assert seen[-1] == pytest.approx(0.0001)


def test_auto_policy_waits_five_epochs_then_needs_progress_over_two():
    stalled = [0.9, 0.8, 0.7, 0.6, 0.55, 0.548, 0.545]
    assert optim.adjust_lr(0.01, 5, stalled[:5], 'auto', [], 0.01) == 0.01  # epoch <= 5: never
    assert optim.adjust_lr(0.01, 6, stalled[:6], 'auto', [], 0.01) == 0.01  # 0.6 - 0.548 >= 0.01
    assert optim.adjust_lr(0.01, 7, stalled, 'auto', [], 0.01) == pytest.approx(0.001)  # 0.55 - 0.545 < 0.01
    assert optim.adjust_lr(0.01, 7, [0.9] * 4 + [0.5, 0.4, 0.3], 'auto', [], 0.01) == 0.01
    # three errors are enough (a history that starts late: a run resumed from a snapshot of the
    # original, whose history holds only the epochs since)
    assert optim.adjust_lr(0.01, 9, stalled[-3:], 'auto', [], 0.01) == pytest.approx(0.001)
    assert optim.adjust_lr(0.01, 9, stalled[-2:], 'auto', [], 0.01) == 0.01
