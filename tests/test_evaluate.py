"""validate_performance.py, ten crops, plot.py, synthetic data, cosine/warm-up, label smoothing."""
import csv
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import plot
import validate_performance
from lib import checkpoint, config, data, optim, trainer, training
from lib import plot as lib_plot
from tests.test_train import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('run'))
    cfg = tiny_config(root, n_epochs=2, learning_rate=0.003)
    training.run(cfg)
    return root, cfg


def test_validate_reproduces_the_val_record_row(trained):
    root, cfg = trained
    record = np.load(os.path.join(root, 'w', 'val_record.npy'))
    for epoch in (1, 2):
        top1, top5, loss, n, _ = validate_performance.validate(
            dict(cfg, load_epoch=epoch, **config.defaults(config.EVALUATE)))
        assert n == 2 * 8
        assert (top1, loss) == (record[epoch - 1, 0], record[epoch - 1, 1])  # bit for bit
        history = torch.load(os.path.join(root, 'w', f'model_{epoch}.pt'), weights_only=True)['history']
        assert top5 == history[epoch - 1]['val_top5_error']  # (top-5 itself: the hand computation)


@pytest.mark.parametrize('loading', [dict(para_load=True), dict(para_load=True, use_data_layer=True)],
                         ids=['para_load', 'para_load+use_data_layer'])
def test_validate_reproduces_the_val_record_row_of_a_para_load_run(tmp_path, loading):
    """A run that validated through its loader process (crops made by the loader, or on the
    device by the data layer) gets its rows back bit for bit from validate_performance.py, which
    loads in-process with its defaults: the same plan, pixels, network and precision (fp32, NCHW,
    eager, one worker, CPU: what README and docs/training.md claim exact)."""
    cfg = tiny_config(str(tmp_path), n_epochs=2, learning_rate=0.003, **loading)
    training.run(cfg)
    record = np.load(tmp_path / 'w' / 'val_record.npy')
    plain = dict(cfg, para_load=False, use_data_layer=False)
    for epoch in (1, 2):
        top1, _, loss, _, _ = validate_performance.validate(
            dict(plain, load_epoch=epoch, **config.defaults(config.EVALUATE)))
        assert (top1, loss) == (record[epoch - 1, 0], record[epoch - 1, 1])  # bit for bit


def test_validate_cli_prints_six_significant_digits_and_ten_crop(trained):
    root, cfg = trained
    args = [sys.executable, os.path.join(ROOT, 'validate_performance.py')] + [
        f'{k}={cfg[k]}' for k in ('val_folder', 'label_folder', 'mean_file', 'batch_size',
                                  'weights_dir')] + ['gpu=cpu']
    r = subprocess.run(args + ['load_epoch=2'], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    top1 = float(r.stdout.split('top-1 error ')[1].split()[0])
    assert top1 == pytest.approx(np.load(os.path.join(root, 'w', 'val_record.npy'))[1, 0], abs=1e-6)
    assert 'centre crop' in r.stdout and 'loss ' in r.stdout
    ten = subprocess.run(args + [f'checkpoint={root}/w/model_1.pt', 'ten_crop=True'],
                         capture_output=True, text=True, timeout=120)
    assert ten.returncode == 0 and 'ten crops' in ten.stdout, ten.stderr
    missing = subprocess.run(args + ['load_epoch=9'], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and 'model_9.pt' in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_ten_crop_scores_the_mean_softmax_of_the_ten_views(trained, tmp_path):
    """ten_crop=True: per image the softmax averaged over the four corners and the centre of the
    crop range, each also mirrored, computed here from the batch files with numpy slices; it
    differs from the centre crop's numbers (which it must not silently give instead). The
    snapshot's last layer is scaled up, so that the views' scores differ clearly."""
    import hickle
    root, cfg = trained
    state = torch.load(os.path.join(root, 'w', 'model_2.pt'), weights_only=True)
    state['model']['classifier.weight'] *= 30
    path = str(tmp_path / 'model_2.pt')
    torch.save(state, path)
    net, _ = checkpoint.load_net(checkpoint.read(path), path)
    mean = np.load(cfg['mean_file']).astype(np.float64)
    labels = np.load(os.path.join(cfg['label_folder'], 'val_labels.npy')).reshape(-1, 8)
    S, c = 36, 32
    m = (S - c) // 2
    wrong1 = wrong5 = loss = 0.0
    for k, y in enumerate(labels):
        batch = hickle.load(os.path.join(cfg['val_folder'], f'{k:04d}.hkl'))     # (3, S, S, B)
        images = batch.transpose(3, 0, 1, 2).astype(np.float64) - mean           # (B, 3, S, S)
        probs = 0
        for x0, y0 in ((0, 0), (2 * m, 0), (0, 2 * m), (2 * m, 2 * m), (m, m)):
            crop = images[:, :, y0:y0 + c, x0:x0 + c]
            for view in (crop, crop[..., ::-1]):
                with torch.no_grad():
                    logits = net(torch.from_numpy(view.astype(np.float32).copy())).double()
                probs = probs + logits.softmax(1).numpy() / 10
        rank = (probs > probs[np.arange(len(y)), y][:, None]).sum(1)  # classes scored above the truth
        wrong1 += (rank >= 1).sum()
        wrong5 += (rank >= 5).sum()
        loss -= np.log(probs[np.arange(len(y)), y]).sum()
    n = labels.size
    eval_cfg = dict(cfg, **dict(config.defaults(config.EVALUATE), checkpoint=path))
    top1, top5, got_loss, _, _ = validate_performance.validate(dict(eval_cfg, ten_crop=True))
    assert (top1, top5) == (wrong1 / n, wrong5 / n)
    assert got_loss == pytest.approx(loss / n, rel=1e-5)
    centre = validate_performance.validate(eval_cfg)
    assert abs(centre[2] - got_loss) > 1e-2 * got_loss   # a sharp test: the views matter


def test_ten_crop_views_are_corners_and_centre_each_mirrored():
    steps, group = data.eval_plan(2, 4, 36, 32, ten_crop=True)
    assert group == 10 and len(steps) == 20 and [s.file for s in steps] == [0] * 10 + [1] * 10
    views = {(int(s.crop_x[0]), int(s.crop_y[0]), bool(s.mirror[0])) for s in steps[:10]}
    assert views == {(x, y, m) for x, y in ((0, 0), (4, 0), (0, 4), (4, 4), (2, 2))
                     for m in (False, True)}
    assert data.eval_plan(2, 4, 36, 32)[1] == 1


def test_plot_writes_a_png_from_history_or_val_record(trained, tmp_path):
    root, _ = trained
    out = tmp_path / 'p.png'
    assert plot.main([os.path.join(root, 'w'), '--out', str(out)]) == 0
    assert out.read_bytes()[:4] == b'\x89PNG'
    original = tmp_path / 'original'   # a run of the original: val_record.npy only
    original.mkdir()
    np.save(original / 'val_record.npy', np.array([[0.9, 2.3], [0.8, 2.0]]))
    assert plot.main([str(original)]) == 0 and (original / 'training.png').exists()
    assert plot.main([str(tmp_path / 'nothing')]) == 2


def _panels(weights_dir):
    """{title: {legend label: (epochs, values)}} of the panels of lib.plot.figure, checking
    that each panel's legend names its curves."""
    import matplotlib.pyplot as plt
    fig = lib_plot.figure(weights_dir)
    try:
        panels = {}
        for ax in fig.axes:
            lines = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata()))
                     for ln in ax.get_lines()}
            assert [t.get_text() for t in ax.get_legend().get_texts()] == list(lines)
            panels[ax.get_title()] = lines
        return panels
    finally:
        plt.close(fig)


def test_plot_puts_each_curve_in_its_panel_with_its_name(trained, tmp_path):
    """From history.csv: the error panel holds the three error curves, the loss panel the two
    loss curves, each with the values of its column; from val_record.npy only (a run of the
    original), its two columns."""
    root, _ = trained
    with open(os.path.join(root, 'w', 'history.csv'), newline='') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2

    def column(key):
        return [float(r['epoch']) for r in rows], [float(r[key]) for r in rows]
    assert _panels(os.path.join(root, 'w')) == {
        'error': {'train error': column('train_error'), 'val top-1 error': column('val_error'),
                  'val top-5 error': column('val_top5_error')},
        'loss': {'train loss': column('train_loss'), 'val loss': column('val_loss')}}
    np.save(tmp_path / 'val_record.npy', np.array([[0.9, 2.3], [0.8, 2.0]]))
    assert _panels(str(tmp_path)) == {'error': {'val top-1 error': ([1, 2], [0.9, 0.8])},
                                      'loss': {'val loss': ([1, 2], [2.3, 2.0])}}


def test_synthetic_trains_with_no_dataset_on_disk(tmp_path):
    cfg = config.merge({**config.CONFIG, **config.SPEC_1GPU}, [('test', dict(
        synthetic=True, synthetic_batches=3, num_classes=7, model='alexnet_cifar', crop_size=32,
        batch_size=4, n_epochs=1, gpu='cpu', weights_dir=str(tmp_path / 'w'),
        train_folder='/nonexistent', label_folder='/nonexistent', mean_file='/nonexistent'), None)])
    history = training.run(cfg)
    assert len(history) == 1 and math.isfinite(history[0]['train_loss'])
    state = torch.load(tmp_path / 'w' / 'model_1.pt', weights_only=True)
    assert state['model']['classifier.bias'].shape == (7,)


def test_synthetic_batches_have_1000_classes_whatever_labels_they_draw():
    """num_classes 0 means 1000 for synthetic batches, not the largest label drawn + 1."""
    cfg = config.merge({**config.CONFIG, **config.SPEC_1GPU}, [('test', dict(
        synthetic=True, synthetic_batches=2, model='alexnet_cifar', crop_size=32, batch_size=8,
        gpu='cpu'), None)])
    assert training.build_loaders(cfg, 'cpu')[1] == 1000
    assert training.build_loaders(dict(cfg, num_classes=7), 'cpu')[1] == 7


def test_cosine_and_warmup_schedules():
    assert optim.lr_scale(0.0, 10, 'step', 0) == 1.0
    assert optim.lr_scale(0.5, 10, 'step', 2) == 0.25               # warm-up, any policy
    assert optim.lr_scale(2.0, 10, 'cosine', 2) == 1.0              # cosine starts after it
    assert optim.lr_scale(6.0, 10, 'cosine', 2) == pytest.approx(0.5)
    assert optim.lr_scale(10.0, 10, 'cosine', 2) == pytest.approx(0.0)
    assert optim.adjust_lr(0.1, 5, [], 'cosine', [1, 5], 0.01) == 0.1  # no step division


def test_cosine_run_logs_the_scheduled_lr_and_label_smoothing_changes_the_loss(tmp_path):
    plain = training.run(tiny_config(str(tmp_path / 'a'), n_epochs=1, learning_rate=0.003))
    cosine = training.run(tiny_config(str(tmp_path / 'b'), n_epochs=2, learning_rate=0.003,
                                   lr_policy='cosine', warmup_epochs=1))
    smooth = training.run(tiny_config(str(tmp_path / 'c'), n_epochs=1, learning_rate=0.003,
                                   label_smoothing=0.1))
    assert [h['lr'] for h in plain] == [0.003]
    assert cosine[0]['lr'] == 0.0 and cosine[1]['lr'] == pytest.approx(0.003)  # warm-up, then 1.0
    # the same run but for the training loss's smoothing: its weights and losses differ
    assert smooth[0]['train_loss'] != plain[0]['train_loss']
    assert smooth[0]['val_loss'] != plain[0]['val_loss']


def test_a_cosine_run_resumes_only_along_its_own_cosine(tmp_path):
    """The cosine's length is n_epochs (after warmup_epochs): a resume to another n_epochs, or
    into or out of lr_policy cosine, would move the lr at once (at the end of a cosine, from 0
    back up), so it is refused in one line; the same cosine resumes and gives the fresh run's lr."""
    cfg = tiny_config(str(tmp_path), n_epochs=2, learning_rate=0.004, lr_policy='cosine',
                      snapshot_freq=1)
    fresh = training.run(cfg)
    snap = os.path.join(cfg['weights_dir'], 'model_2.pt')
    tail = (': {} was trained under lr_policy cosine, n_epochs 2, warmup_epochs 0, which set a '
            "cosine's lr: after epoch 2 it is 0, this run's {} (a cosine cannot be extended or "
            'cut: train a fresh run with the n_epochs wanted)')
    for over, msg in ((dict(n_epochs=4), 'n_epochs 4' + tail.format('{}', 0.002)),
                      (dict(n_epochs=3, lr_policy='step'), 'lr_policy step' + tail.format('{}', 0.004))):
        with pytest.raises(config.ConfigError) as e:
            training.run(dict(cfg, resume_train=True, load_epoch=2, **over))
        assert str(e.value) == msg.format(snap)
    again = training.run(dict(cfg, resume_train=True, load_epoch=1))  # the same cosine: accepted
    assert [h['lr'] for h in again] == [h['lr'] for h in fresh] and fresh[1]['lr'] < fresh[0]['lr']


def test_ten_crop_loss_is_finite_when_a_probability_underflows():
    """The ten views' probabilities are averaged in log space (log-sum-exp): a true class whose
    float32 softmax underflows to 0 in every view gives its true loss, not inf."""
    class Views:  # one batch file of 2 images; predict() gives the logits of each view
        batch_size = 2

        def epoch(self, plan):
            for _ in plan:
                yield torch.zeros(2, 1), torch.tensor([1, 0])

    logits = [torch.tensor([[0.0, -200.0 - v, 5.0], [3.0, 0.0, -1.0]]) for v in range(10)]
    it = iter(logits)
    plan = [None] * 10
    top1, top5, loss = trainer.evaluate(lambda x: next(it), Views(), plan, 10)
    logp = torch.stack([t.double().log_softmax(1) for t in logits])     # (views, B, classes)
    want = -(torch.logsumexp(logp, 0) - math.log(10))[[0, 1], [1, 0]].mean().item()
    assert math.isfinite(loss) and loss == pytest.approx(want, rel=1e-6)  # about 102.2
    assert top1 == 0.5                                                    # image 0 is wrong


def test_top1_top5_and_loss_against_a_hand_computation():
    """Ten classes, so that top-5 differs from top-1: per image, the rank of its true class is
    set by hand (0: top-1 right; 3: top-5 right; 7: both wrong), and the loss is computed from
    the logits in float64."""
    n_classes, true_rank = 10, [0, 3, 7, 4, 5, 1]
    y = torch.tensor([2, 9, 0, 5, 7, 3])
    order = torch.tensor([[9, 8, 7, 6, 5, 4, 3, 2, 1, 0]] * len(y))  # class order, best first
    logits = torch.empty(len(y), n_classes)
    for i, (label, rank) in enumerate(zip(y.tolist(), true_rank)):
        classes = [c for c in order[i].tolist() if c != label]
        classes.insert(rank, label)                       # the true class at that rank
        logits[i, classes] = torch.linspace(3.0, -2.0, n_classes) + 0.01 * i

    class OneBatch:
        batch_size = len(y)

        def epoch(self, plan):
            for _ in plan:
                yield torch.zeros(len(y), 1), y
    top1, top5, loss = trainer.evaluate(lambda x: logits, OneBatch(), [None], 1)
    assert top1 == pytest.approx(sum(r >= 1 for r in true_rank) / len(y))   # 5 of 6 wrong
    assert top5 == pytest.approx(sum(r >= 5 for r in true_rank) / len(y))   # ranks 7 and 5: 2 of 6
    want = -logits.double().log_softmax(1)[torch.arange(len(y)), y].mean().item()
    assert loss == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize('damage', ['truncated', 'not a snapshot', 'not torch', 'another zip'])
def test_a_damaged_snapshot_is_a_one_line_error(trained, tmp_path, capsys, damage):
    import shutil
    from tests.test_train import damage_snapshot
    root, cfg = trained
    bad = tmp_path / 'bad.pt'
    shutil.copy(os.path.join(root, 'w', 'model_1.pt'), bad)
    damage_snapshot(bad, damage)
    argv = [f'{k}={cfg[k]}' for k in ('val_folder', 'label_folder', 'mean_file', 'batch_size')] + [
        'gpu=cpu', f'checkpoint={bad}']
    assert validate_performance.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f'error: {bad} is not a'), err


def test_a_snapshot_without_a_config_is_evaluated_with_the_settings_given(trained, tmp_path, capsys):
    """A snapshot that holds only weights (another tool's, or one written by hand), alone in its
    folder: nothing to take from its run, so the command line says what it is."""
    root, cfg = trained
    state = torch.load(os.path.join(root, 'w', 'model_1.pt'), weights_only=True)
    torch.save({'model': state['model']}, tmp_path / 'model_1.pt')
    argv = [f"data={os.path.dirname(cfg['label_folder'])}", f"batch_size={cfg['batch_size']}", 'gpu=cpu',
            f'checkpoint={tmp_path / "model_1.pt"}', 'model=alexnet_cifar', 'crop_size=32']
    assert validate_performance.main(argv) == 0, capsys.readouterr().err
    record = np.load(os.path.join(root, 'w', 'val_record.npy'))
    out = capsys.readouterr().out
    assert 'model_1.pt: 16 images' in out
    assert float(out.split('top-1 error ')[1].split()[0]) == pytest.approx(record[0, 0], abs=1e-6)


def test_a_snapshot_that_does_not_fit_its_model_says_why(tmp_path):
    """checkpoint.load_net: the reason (our crop check, the missing fc layer, torch's load error)
    is in the one-line error, after the file and the model it was read as."""
    from lib import model
    weights = model.build('alexnet_cifar', 3, 0.5, 32, 0).state_dict()
    path = str(tmp_path / 'model_1.pt')
    for state, reason in (
            ({'model': weights, 'config': {'model': 'alexnet', 'crop_size': 32}},
             'model alexnet needs crop_size 227, got 32 (or set model=alexnet_cifar for small images, '
             'e.g. 32 px)'),
            ({'model': {}, 'config': {'model': 'alexnet_cifar', 'crop_size': 32}},
             'no fully connected layer in the weights'),
            ({'model': weights, 'config': {'model': 'alexnet', 'crop_size': 227}},
             'Error(s) in loading state_dict for AlexNet: Missing key(s) in state_dict: "features.10.weight"')):
        with pytest.raises(checkpoint.SnapshotError) as e:
            checkpoint.load_net(state, path)
        name, crop = state['config']['model'], state['config']['crop_size']
        assert str(e.value).startswith(f'{path} does not fit model {name} (crop_size {crop}): {reason}'), e.value
        assert '\n' not in str(e.value)


def test_a_load_error_is_cut_to_one_line_saying_what_was_left_out():
    assert checkpoint.misfit(RuntimeError('heading:\n\t' + 'x' * 200)) == 'heading: ' + 'x' * 200
    assert checkpoint.misfit(RuntimeError('heading:\n\t' + 'x' * 201)) == 'heading: ' + 'x' * 200 + ' ...'
    assert checkpoint.misfit(RuntimeError('heading:\n\tone\n\ttwo')) == 'heading: one ...'
    assert checkpoint.misfit(ValueError('alone\n')) == 'alone'
    assert checkpoint.misfit(ValueError('')) == 'ValueError'


def test_validate_takes_the_data_of_the_snapshots_run(trained, tmp_path, capsys):
    """`checkpoint=W/model_N.pt` alone: the data of that run (W/config.yaml, else the snapshot's
    own config), not the default ImageNet folders; `weights_dir=W` alone: its newest snapshot."""
    root, cfg = trained
    record = np.load(os.path.join(root, 'w', 'val_record.npy'))
    alone = tmp_path / 'alone'
    alone.mkdir()
    shutil.copy(os.path.join(root, 'w', 'model_1.pt'), alone)  # no config.yaml beside it
    for argv, epoch in (([f'checkpoint={root}/w/model_1.pt'], 1), ([f'weights_dir={root}/w'], 2),
                        ([f'checkpoint={alone}/model_1.pt'], 1)):
        assert validate_performance.main(argv + ['gpu=cpu']) == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        assert f'model_{epoch}.pt: 16 images' in out
        assert float(out.split('top-1 error ')[1].split()[0]) == pytest.approx(record[epoch - 1, 0],
                                                                               abs=1e-6)


def test_no_snapshot_or_a_folder_is_named_with_the_fix(trained, tmp_path, capsys):
    """load_epoch 0 is the newest: an empty weights_dir is named, not a model_0.pt; a folder given
    as checkpoint is named as a folder, with its newest snapshot."""
    root, _ = trained
    assert validate_performance.main([f'weights_dir={tmp_path}', 'gpu=cpu']) == 2
    assert capsys.readouterr().err.strip() == (f'error: no snapshot model_<N>.pt in {tmp_path} '
                                               '(set checkpoint=PATH or weights_dir=W)')
    assert validate_performance.main([f'checkpoint={root}/w', 'gpu=cpu']) == 2
    assert capsys.readouterr().err.strip() == (f'error: {root}/w is a folder: give a snapshot file '
                                               f'model_<N>.pt (the newest there: {root}/w/model_2.pt)')
    # a missing file, given as checkpoint or as weights_dir and an epoch it does not hold
    for args, path in (([f'checkpoint={tmp_path}/model_7.pt'], f'{tmp_path}/model_7.pt'),
                       ([f'weights_dir={root}/w', 'load_epoch=9'], f'{root}/w/model_9.pt')):
        assert validate_performance.main(args + ['gpu=cpu']) == 2
        assert capsys.readouterr().err == (f'error: no snapshot {path} '
                                           '(set checkpoint=PATH or load_epoch=N)\n')
