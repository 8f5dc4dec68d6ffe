"""train.py end to end on a tiny dataset; snapshots; 2 + 2 epochs == 4 epochs, bit for bit."""
import csv
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
import yaml

import train
from lib import checkpoint, config, model, runs, training
from tests.helpers import make_batches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = {**config.CONFIG, **config.SPEC_1GPU}


def tiny_config(root, **over):
    keys = make_batches(os.path.join(root, 'data'), n_train=3, n_val=2, batch=8, size=36)
    values = dict(keys, model='alexnet_cifar', crop_size=32, gpu='cpu', n_epochs=4, print_freq=2,
                  weights_dir=os.path.join(root, 'w'), shuffle=True)
    values.update(over)
    return config.merge(SCHEMA, [('test', values, root)])


def test_train_py_end_to_end(tmp_path):
    keys = make_batches(str(tmp_path / 'data'), n_train=8, n_val=2, batch=8, size=36)
    args = [f'{k}={v}' for k, v in keys.items()] + [
        'model=alexnet_cifar', 'crop_size=32', 'gpu=cpu', 'n_epochs=3', 'print_freq=4',
        'weights_dir=w', 'lib_conv=cudnn', 'learning_rate=0.003']
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py')] + args,
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert 'notice: lib_conv is ignored' in out
    assert 'epoch 1 iter 4/8 | cost ' in out and ' img/s | data wait ' in out
    assert 'done: epoch 3, val top-1 accuracy' in out and 'resumed' not in out
    w = tmp_path / 'w'
    record = np.load(w / 'val_record.npy')
    assert record.shape == (3, 2) and record.dtype == np.float64
    assert np.all((record[:, 0] >= 0) & (record[:, 0] <= 1)) and np.all(record[:, 1] > 0)
    assert record[:, 0].min() < 0.3  # three separable classes: far under chance (0.67)
    rows = list(csv.DictReader(open(w / 'history.csv')))
    assert [int(r['epoch']) for r in rows] == [1, 2, 3]
    assert [float(r['val_error']) for r in rows] == pytest.approx(record[:, 0].tolist())
    saved = yaml.safe_load(open(w / 'config.yaml'))
    assert saved['weights_dir'] == str(w) and saved['n_epochs'] == 3 and saved['learning_rate'] == 0.003
    assert sorted(os.listdir(w)) == ['config.yaml', 'history.csv', 'model_1.pt', 'model_2.pt',
                                     'model_3.pt', 'training.png', 'val_record.npy']
    assert (w / 'training.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_snapshot_is_one_weights_only_dict(tmp_path):
    cfg = tiny_config(str(tmp_path), n_epochs=1)
    training.run(cfg)
    state = torch.load(tmp_path / 'w' / 'model_1.pt', weights_only=True)
    assert set(state) == {'model', 'momentum', 'epoch', 'lr', 'val_record', 'history', 'config', 'rng',
                          'images_per_step'}
    assert state['epoch'] == 1 and state['lr'] == 0.01 and state['config'] == cfg
    assert list(state['model']) == list(state['momentum'])  # a buffer for every parameter
    assert all(isinstance(t, torch.Tensor) for t in state['rng'].values())
    assert state['val_record'].shape == (1, 2)
    net = __import__('lib.model', fromlist=['build']).build('alexnet_cifar', 3, 0.0, 32, seed=0)
    net.load_state_dict(state['model'])  # the conventional PyTorch layout


def test_two_plus_two_epochs_equal_four_bitwise(tmp_path, capsys):
    # dropout and random crops/mirrors/shuffles on, so every RNG stream must be restored
    full = training.run(tiny_config(str(tmp_path / 'a'), dropout=0.5, lr_step=[3]))
    training.run(tiny_config(str(tmp_path / 'b'), n_epochs=2, lr_step=[3]))
    resumed = training.run(tiny_config(str(tmp_path / 'b'), resume_train=True, load_epoch=2,
                                    lr_step=[3]))
    assert 'resumed from ' in capsys.readouterr().out
    a = torch.load(tmp_path / 'a' / 'w' / 'model_4.pt', weights_only=True)
    b = torch.load(tmp_path / 'b' / 'w' / 'model_4.pt', weights_only=True)
    for part in ('model', 'momentum'):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert a['lr'] == b['lr'] == pytest.approx(0.001)  # the step at epoch 3 happened after resuming
    for x, y in zip(full, resumed):
        assert {k: v for k, v in x.items() if k not in ('seconds', 'img_per_s')} == \
               {k: v for k, v in y.items() if k not in ('seconds', 'img_per_s')}
    assert np.array_equal(np.load(tmp_path / 'a' / 'w' / 'val_record.npy'),
                          np.load(tmp_path / 'b' / 'w' / 'val_record.npy'))


def test_data_layer_on_and_off_train_identically(tmp_path):
    """On the CPU both crop with the same slice loop (the GPU's gather is compared with it in
    test_data.py): what differs is where the mean lives and what is shipped. Same bits."""
    a = training.run(tiny_config(str(tmp_path / 'a'), n_epochs=2, use_data_layer=False, dropout=0.5))
    b = training.run(tiny_config(str(tmp_path / 'b'), n_epochs=2, use_data_layer=True, dropout=0.5))
    assert [h['val_loss'] for h in a] == [h['val_loss'] for h in b]
    assert [h['train_loss'] for h in a] == [h['train_loss'] for h in b]
    wa, wb = (torch.load(tmp_path / r / 'w' / 'model_2.pt', weights_only=True)['model'] for r in 'ab')
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_from_a_missing_snapshot_names_it(tmp_path):
    """Checked once, as the config comes in (lib/runs.py), before anything is built."""
    (tmp_path / 'model_1.pt').write_bytes(b'')
    shipped = [os.path.join(ROOT, name) for name in ('config.yaml', 'spec_1gpu.yaml')]
    with pytest.raises(checkpoint.SnapshotError, match=r'model_7.pt.*snapshots there: \[1\]'):
        runs.load(*shipped, [f'weights_dir={tmp_path}', 'resume_train=True', 'load_epoch=7'], SCHEMA)
    (tmp_path / 'model_1.pt').unlink()  # none there at all
    with pytest.raises(checkpoint.SnapshotError) as e:
        runs.load(*shipped, [f'weights_dir={tmp_path}', 'resume_train=True', 'load_epoch=7'], SCHEMA)
    assert str(e.value) == (f'no snapshot {tmp_path}/model_7.pt to resume from (load_epoch: 7; '
                            'snapshots there: none)')


def test_bad_device_and_crop_are_one_line_errors(tmp_path):
    keys = make_batches(str(tmp_path / 'data'), n_train=1, n_val=1, batch=4, size=36)
    base = [sys.executable, os.path.join(ROOT, 'train.py')] + [f'{k}={v}' for k, v in keys.items()]
    for extra, msg in ((['gpu=tpu3'], "gpu: 'tpu3' is not a device"),
                       (['model=alexnet_cifar', 'crop_size=40', 'gpu=cpu'],
                        'crop_size 40 is larger than the images (36 px)')):
        r = subprocess.run(base + extra + ['weights_dir=w'], capture_output=True, text=True,
                           cwd=tmp_path, timeout=120)
        assert r.returncode == 2
        assert len(r.stderr.strip().splitlines()) == 1 and msg in r.stderr, r.stderr


def test_labels_beyond_num_classes_and_val_of_another_size_are_named_at_start_up(tmp_path):
    from lib import data
    from tests.helpers import write_hkl
    cfg = tiny_config(str(tmp_path), n_epochs=1, num_classes=2)  # the labels go up to 2
    with pytest.raises(data.DataError, match=r'train_labels.npy holds label 2, outside 0..1 '
                                             r'\(num_classes 2\)'):
        training.run(cfg)
    write_hkl(os.path.join(cfg['val_folder'], '0000.hkl'), np.zeros((3, 40, 40, 8), np.uint8))
    with pytest.raises(data.DataError, match=r'0000.hkl holds 40 px images, the training batches '
                                             r'\(.*0000.hkl\) 36 px'):
        training.run(dict(cfg, num_classes=0))
    assert not os.path.exists(cfg['weights_dir'])  # a run refused at start-up makes no folder


def test_a_snapshot_resumes_at_its_images_per_step_whatever_the_worker_count(tmp_path):
    """batch_size is per worker in train_2gpu.py and per step in train.py: a 1-worker snapshot of
    8 images per step resumes in 2 workers x 4, not in 2 x 8; older snapshots compare batch_size."""
    cfg = tiny_config(str(tmp_path), n_epochs=1)
    training.run(cfg)
    state = checkpoint.read(checkpoint.snapshot_path(cfg['weights_dir'], 1))
    assert state['images_per_step'] == 8
    net = model.build('alexnet_cifar', 3, 0.0, 32, 0)
    more = dict(cfg, resume_train=True, load_epoch=1)
    training.check_snapshot(dict(more, batch_size=4), state, net, images_per_step=8)   # 2 x 4
    with pytest.raises(config.ConfigError, match=r'model_1.pt was trained on 8 images per step, '
                                                 r'this run on 16 \(batch_size 8\)'):
        training.check_snapshot(more, state, net, images_per_step=16)                   # 2 x 8
    del state['images_per_step']
    with pytest.raises(config.ConfigError, match=r'trained with batch_size 8, this run has '
                                                 r'batch_size 4'):
        training.check_snapshot(dict(more, batch_size=4), state, net, images_per_step=8)


def test_a_fresh_run_into_another_runs_folder_is_refused_or_moves_it_aside(tmp_path, capsys):
    """Two runs never mix in one weights_dir: a fresh start (no resume_train) into a folder with
    snapshots stops with one line naming the ways on and changes nothing; overwrite=True first
    moves the old run's files into previous_1/, whole."""
    keys = make_batches(str(tmp_path / 'data'), n_train=2, n_val=1, batch=8, size=36)
    argv = [f'{k}={v}' for k, v in keys.items()] + [
        'model=alexnet_cifar', 'crop_size=32', 'gpu=cpu', f'weights_dir={tmp_path / "w"}']
    assert train.main(argv + ['n_epochs=3']) == 0
    w = tmp_path / 'w'
    old = {n: (w / n).read_bytes() for n in os.listdir(w)}
    capsys.readouterr()
    assert train.main(argv + ['n_epochs=1']) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f'error: {w} holds the snapshots of another run (model_1.pt .. model_3.pt): resume it with '
        f'weights_dir={w} resume_train=True, choose another weights_dir, or set overwrite=True to '
        f'move that run into {w / "previous_<N>"} first']
    assert {n: (w / n).read_bytes() for n in os.listdir(w)} == old
    assert train.main(argv + ['n_epochs=1', 'overwrite=True']) == 0
    assert f'the previous run in {w} moved to {w / "previous_1"}' in capsys.readouterr().out
    assert {n: (w / 'previous_1' / n).read_bytes() for n in os.listdir(w / 'previous_1')} == old
    assert sorted(os.listdir(w)) == ['config.yaml', 'history.csv', 'model_1.pt', 'previous_1',
                                     'training.png', 'val_record.npy']
    assert np.load(w / 'val_record.npy').shape == (1, 2)


@pytest.mark.parametrize('damage', ['truncated', 'not a snapshot', 'not torch', 'another zip'])
def test_a_damaged_snapshot_is_a_one_line_error_on_resume(tmp_path, capsys, damage):
    keys = make_batches(str(tmp_path / 'data'), n_train=1, n_val=1, batch=8, size=36)
    argv = [f'{k}={v}' for k, v in keys.items()] + [
        'model=alexnet_cifar', 'crop_size=32', 'gpu=cpu', f'weights_dir={tmp_path / "w"}']
    assert train.main(argv + ['n_epochs=1']) == 0
    damage_snapshot(tmp_path / 'w' / 'model_1.pt', damage)
    capsys.readouterr()
    assert train.main(argv + ['n_epochs=2', 'resume_train=True', 'load_epoch=1']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f'error: {tmp_path / "w" / "model_1.pt"} is not a'), err


def damage_snapshot(path, how):
    """Spoil a snapshot file as a user's disk or hand might."""
    if how == 'truncated':
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif how == 'not a snapshot':
        torch.save({'weights': torch.zeros(3)}, path)
    elif how == 'another zip':  # a zip file, as torch.save writes, of other contents
        with zipfile.ZipFile(path, 'w') as z:
            z.writestr('notes.txt', 'not a snapshot')
    else:
        path.write_bytes(b'not a torch file at all\n' * 10)


def test_one_data_folder_drives_a_run_and_its_resume(tmp_path, capsys):
    """data=FOLDER gives the folders, mean and batch_size; `weights_dir=W resume_train=True`
    alone resumes the newest snapshot with the run's config (--config W/config.yaml too), and
    what would break the resume is still refused."""
    d, w = tmp_path / 'd', tmp_path / 'w'
    make_batches(str(d), n_train=2, n_val=1, batch=8, size=36)
    assert train.main([f'data={d}', 'model=alexnet_cifar', 'crop_size=32', 'gpu=cpu',
                       f'weights_dir={w}', 'n_epochs=1']) == 0
    saved = yaml.safe_load(open(w / 'config.yaml'))
    assert saved['batch_size'] == 8 and saved['train_folder'] == str(d / 'train_hkl_b8_b_8')
    capsys.readouterr()
    assert train.main([f'weights_dir={w}', 'resume_train=True', 'n_epochs=2']) == 0
    assert f'resumed from {w / "model_1.pt"} (epoch 1' in capsys.readouterr().out
    assert train.main(['--config', str(w / 'config.yaml'), 'resume_train=True', 'load_epoch=2',
                       'n_epochs=3']) == 0
    assert f'resumed from {w / "model_2.pt"} (epoch 2' in capsys.readouterr().out
    assert train.main([f'weights_dir={w}', 'resume_train=True', 'crop_size=28', 'n_epochs=4']) == 2
    assert capsys.readouterr().err.strip() == (f'error: {w / "model_3.pt"} was trained with '
                                               'crop_size 32, this run has crop_size 28')
    assert checkpoint.epochs(str(w)) == [1, 2, 3]


def test_a_forgotten_batch_size_is_that_of_the_batch_files_in_every_mode(tmp_path, capsys):
    """batch_size 0 with the folders given and no dataset.yaml (data preprocessed by the
    original): train.py and torchrun take the images of a batch file (all ranks together),
    train_2gpu.py half of them or those of a halves file. A batch_size set wrong, or a forgotten
    model, is still an error that names the fix."""
    from lib import data
    keys = make_batches(str(tmp_path / 'd'), n_train=2, n_val=1, batch=8, size=36)
    os.remove(tmp_path / 'd' / 'dataset.yaml')
    folders = [f'{k}={v}' for k, v in keys.items() if k != 'batch_size']
    argv = folders + ['model=alexnet_cifar', 'crop_size=32', 'gpu=cpu', 'n_epochs=1',
                      f'weights_dir={tmp_path / "w"}']
    assert train.main(argv) == 0, capsys.readouterr().err
    assert yaml.safe_load(open(tmp_path / 'w' / 'config.yaml'))['batch_size'] == 8

    def batch_size(spec, *extra):
        schema = {**config.CONFIG, **(config.SPEC_2GPU if '2gpu' in spec else config.SPEC_1GPU)}
        return runs.load(os.path.join(ROOT, 'config.yaml'), os.path.join(ROOT, spec),
                           folders + list(extra), schema)['batch_size']
    halves = [f'{k}={keys[k].replace("_b8_b_8", "_b8_b_4")}' for k in ('train_folder', 'val_folder')]
    assert batch_size('spec_1gpu.yaml') == 8            # train.py; torchrun: all ranks together
    assert batch_size('spec_2gpu.yaml') == 4            # train_2gpu.py: half of a whole file
    assert batch_size('spec_2gpu.yaml', *halves) == 4   # or a halves file NNNN_0.hkl
    assert batch_size('spec_1gpu.yaml', *halves) == 8   # (two torchrun ranks read the halves)
    B = batch_size('spec_1gpu.yaml')  # torchrun rank 1 of 2 takes images 4..7 of every file
    rank1, _ = data.share_source(keys['train_folder'], keys['label_folder'], 'train', B, 'train.py', (1, 2))
    assert (rank1.batch_size, rank1.rows) == (4, (4, 8))
    first = os.path.join(keys['train_folder'], '0000.hkl')
    assert train.main(argv + ['batch_size=256']) == 2
    assert capsys.readouterr().err.strip() == f'error: {first} holds 8 images, not 256: set batch_size=8'
    assert train.main(folders + ['gpu=cpu', f'weights_dir={tmp_path / "w2"}']) == 2
    assert capsys.readouterr().err.strip() == (
        f'error: crop_size 227 is larger than the images (36 px) in {keys["train_folder"]}: '
        'set model=alexnet_cifar and crop_size=36 or less')
    with pytest.raises(data.DataError, match=r'holds 8 images, not 16 \(2 workers x 8\): set '
                                             r'batch_size=8 \(under torchrun: all ranks together\)$'):
        data.share_source(keys['train_folder'], keys['label_folder'], 'train', 16, 'train.py', (0, 2))


def test_a_resume_refuses_the_keys_its_snapshot_overrides_and_one_with_nothing_to_train_writes_nothing(
        tmp_path, capsys):
    """A resume continues the snapshot's lr and random streams: another learning_rate or seed
    would be ignored yet saved in config.yaml, so it is refused (the same value, and the
    schedule keys, are taken); n_epochs at or below the snapshot's epoch trains nothing and
    leaves weights_dir as it was."""
    d, w = tmp_path / 'd', tmp_path / 'w'
    make_batches(str(d), n_train=2, n_val=1, batch=8, size=36)
    assert train.main([f'data={d}', 'model=alexnet_cifar', 'crop_size=32', 'gpu=cpu',
                       f'weights_dir={w}', 'n_epochs=1', 'learning_rate=0.003']) == 0
    before = {name: (w / name).read_bytes() for name in os.listdir(w)}
    resume = [f'weights_dir={w}', 'resume_train=True']
    capsys.readouterr()
    for extra, msg in (
            ('learning_rate=0.1', f'learning_rate 0.1: {w / "model_1.pt"} was trained from '
                                  'learning_rate 0.003, and a resume continues its lr (0.003 after '
                                  'epoch 1); the schedule keys lr_policy, lr_step, '
                                  'lr_adapt_threshold, warmup_epochs and n_epochs may change'),
            ('seed=1', f'seed 1: {w / "model_1.pt"} was trained with seed 23455, and a resume '
                       'continues its random streams (crops, dropout, file order); another seed '
                       'is a fresh run (another weights_dir)')):
        assert train.main(resume + ['n_epochs=2', extra]) == 2
        assert capsys.readouterr().err.strip() == f'error: {msg}'
    assert train.main(resume + ['n_epochs=1', 'dropout=0.1']) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f'nothing to train: model_1.pt is at epoch 1, n_epochs is 1 ({w} left as it was)')
    assert {name: (w / name).read_bytes() for name in os.listdir(w)} == before
    assert train.main(resume + ['n_epochs=3', 'learning_rate=0.003', 'seed=23455', 'lr_step=[2]']) == 0
    rows = list(csv.DictReader(open(w / 'history.csv')))
    assert [float(r['lr']) for r in rows] == pytest.approx([0.003, 0.003, 0.0003])  # lr_step did


def test_the_newest_snapshot_is_the_highest_epoch_not_the_last_name_in_text_order(tmp_path, capsys):
    """model_10.pt is newer than model_9.pt (as text, 'model_9' sorts after 'model_10'): a resume
    without load_epoch and validate_performance.py weights_dir=W both take epoch 10."""
    import validate_performance
    d, w = tmp_path / 'd', tmp_path / 'w'
    make_batches(str(d), n_train=1, n_val=1, batch=8, size=36)
    assert train.main([f'data={d}', 'model=alexnet_cifar', 'crop_size=32', 'gpu=cpu',
                       f'weights_dir={w}', 'n_epochs=1']) == 0
    state = torch.load(w / 'model_1.pt', weights_only=True)
    for epoch in (9, 10):
        torch.save(dict(state, epoch=epoch), w / f'model_{epoch}.pt')
    assert checkpoint.epochs(str(w)) == [1, 9, 10] and checkpoint.latest_epoch(str(w)) == 10
    capsys.readouterr()
    assert validate_performance.main([f'weights_dir={w}', 'gpu=cpu']) == 0
    assert capsys.readouterr().out.startswith(f'{w / "model_10.pt"}: 8 images')
    assert train.main([f'weights_dir={w}', 'resume_train=True', 'n_epochs=11']) == 0
    assert f'resumed from {w / "model_10.pt"} (epoch 10' in capsys.readouterr().out


def test_a_snapshot_cut_short_by_a_crash_never_takes_the_place_of_a_good_one(tmp_path, monkeypatch):
    """A snapshot is written under a temporary name and renamed when complete: a run killed while
    writing model_3.pt leaves no model_3.pt (nor its temporary), so the newest snapshot, the one a
    resume takes, is still the complete model_2.pt."""
    cfg = tiny_config(str(tmp_path), n_epochs=2)
    training.run(cfg)
    w = tmp_path / 'w'
    good = (w / 'model_2.pt').read_bytes()

    def killed_while_saving(obj, f):  # half the bytes on disk, then the process is gone
        with open(f, 'wb') as out:
            out.write(good[:len(good) // 2])
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, 'save', killed_while_saving)
    with pytest.raises(KeyboardInterrupt):
        training.run(dict(cfg, resume_train=True, load_epoch=2, n_epochs=3))
    monkeypatch.undo()
    assert sorted(n for n in os.listdir(w) if '.pt' in n) == ['model_1.pt', 'model_2.pt']
    assert checkpoint.latest_epoch(str(w)) == 2 and (w / 'model_2.pt').read_bytes() == good
    assert checkpoint.read(str(w / 'model_2.pt'))['epoch'] == 2


def test_lr_policy_auto_decides_on_the_top1_error_not_the_loss(tmp_path, monkeypatch):
    """lr_policy auto: after epoch 5, lr / 10 when the val top-1 error fell by less than
    lr_adapt_threshold over the last two epochs, whatever the val loss did. The validation is
    scripted: after epoch 7 the error stalls while the loss still falls (divide), after epoch 8
    the loss stalls while the error falls (do not: the snapshot's lr for epoch 9 stays)."""
    from lib import plot, trainer
    errors = [0.9, 0.8, 0.7, 0.6, 0.5, 0.5, 0.5, 0.3]
    losses = [3.0, 2.9, 2.8, 2.7, 2.6, 2.5, 2.4, 2.5]
    scripted = iter(zip(errors, [0.1] * 8, losses))
    monkeypatch.setattr(trainer.Trainer, 'evaluate', lambda self, ten_crop=False: next(scripted))
    monkeypatch.setattr(plot, 'write_quietly', lambda weights_dir: None)  # (no png: seconds)
    history = training.run(tiny_config(str(tmp_path), n_epochs=8, lr_policy='auto',
                                       lr_adapt_threshold=0.01, learning_rate=0.01))
    assert [h['val_error'] for h in history] == errors
    assert [h['lr'] for h in history] == pytest.approx([0.01] * 7 + [0.001])
    assert checkpoint.read(checkpoint.snapshot_path(str(tmp_path / 'w'), 8))['lr'] == pytest.approx(0.001)


def test_the_closing_line_gives_the_last_epochs_top1_and_top5_accuracy():
    """What train.py prints last: the accuracies (1 - error, in %) of the last epoch's row."""
    cfg = dict(weights_dir='w', resume_train=False, n_epochs=2, load_epoch=0)
    history = [dict(epoch=1, val_error=0.5, val_top5_error=0.25),
               dict(epoch=2, val_error=0.375, val_top5_error=0.125)]
    assert training.summary(cfg, history) == ('done: epoch 2, val top-1 accuracy 62.50 % (top-5 87.50 %); '
                                              f'records in {os.path.join("w", "val_record.npy")}')
    assert training.summary(dict(cfg, n_epochs=0), []) == 'done: nothing to train (n_epochs 0)'


def test_snapshots_are_the_files_named_model_n_pt_only(tmp_path):
    for name in ('model_1.pt', 'model_10.pt', 'model_2.pt.part', 'backup12.pt', 'model_x.pt',
                 'modelx_4.pt', 'other_55.npy', 'val_record.npy'):
        (tmp_path / name).write_bytes(b'')
    assert checkpoint.epochs(str(tmp_path)) == [1, 10] and checkpoint.latest_epoch(str(tmp_path)) == 10
    assert checkpoint.epochs(str(tmp_path / 'none')) == []


def test_the_cuda_generator_is_restored_on_cuda_only_and_only_when_saved(monkeypatch):
    """A snapshot of a GPU run resumed on the CPU leaves the CUDA generator alone; one of a CPU
    run (no CUDA state) resumed on a GPU draws it afresh instead of failing."""
    restored = []
    monkeypatch.setattr(torch.cuda, 'set_rng_state', lambda s, device: restored.append((s, device)))
    gen, order = torch.Generator(), torch.Generator()
    saved = {'data': gen.get_state(), 'order': order.get_state(), 'torch': torch.get_rng_state()}
    gpu = torch.device('cuda', 0)
    checkpoint.set_rng_state(dict(saved, cuda='the gpu state'), gen, torch.device('cpu'), order)
    checkpoint.set_rng_state(saved, gen, gpu, order)
    assert restored == []
    checkpoint.set_rng_state(dict(saved, cuda='the gpu state'), gen, gpu, order)
    assert restored == [('the gpu state', gpu)]


def test_a_cuda_device_past_the_last_is_named(monkeypatch):
    from lib import trainer
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    assert trainer.resolve_device('gpu1') == torch.device('cuda:1')
    for name in ('gpu2', 'cuda:2'):
        with pytest.raises(config.ConfigError, match=rf"^gpu: '{name}' but only 2 CUDA device\(s\)$"):
            trainer.resolve_device(name)


@pytest.mark.parametrize('layer', [False, True])
def test_in_process_loading_crops_where_use_data_layer_says(tmp_path, layer):
    """para_load False: use_data_layer True ships the uint8 batch to the device and crops there,
    False crops on the host (on the CPU both are the CPU)."""
    keys = make_batches(str(tmp_path), n_train=2, n_val=1, batch=8, size=36)
    cfg = config.merge({**config.CONFIG, **config.SPEC_1GPU}, [('test', dict(
        keys, model='alexnet_cifar', crop_size=32, batch_size=8, gpu='cpu', para_load=False,
        use_data_layer=layer), None)])
    loaders, n_classes = training.build_loaders(cfg, 'cpu')
    assert [ld.on_device for ld in loaders] == [layer, layer] and n_classes == 3



def test_with_overwrite_only_the_main_worker_moves_the_previous_run_aside(tmp_path):
    """Every worker of a run checks weights_dir before it starts; the one that writes moves the
    previous run aside: the others, which may check it after that run started writing, never
    do (they would move the new run's files)."""
    from lib import exchange

    class Other(exchange.Local):
        rank, is_main = 1, False
    cfg = tiny_config(str(tmp_path), n_epochs=1)
    training.run(cfg)
    before = sorted(os.listdir(tmp_path / 'w'))
    assert 'model_1.pt' in before
    training.run(dict(cfg, overwrite=True), training.Worker(exchanger=Other()))
    assert sorted(os.listdir(tmp_path / 'w')) == before
    training.run(dict(cfg, overwrite=True))
    assert 'previous_1' in os.listdir(tmp_path / 'w')
