"""Config: defaults <- config.yaml <- spec <- key=value, type-checked, unknown keys named."""
import os
import subprocess
import sys

import pytest
import yaml

from lib import UserError, config, runs
from lib.atomic import save_text
from preprocessing import paths
from tools import config_docs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = {**config.CONFIG, **config.SPEC_1GPU}


@pytest.fixture(autouse=True)
def dataset(tmp_path, monkeypatch):
    """The default `data` of SCHEMA here: a folder with a dataset.yaml as preprocessing writes it."""
    folder = tmp_path / 'dataset'
    folder.mkdir()
    (folder / 'dataset.yaml').write_text('num_classes: 3\nimg_size: 36\nbatch_size: 16\nsub_batches: [1]\n')
    monkeypatch.setitem(SCHEMA, 'data', config.Key(str(folder), 'test data', path=True))
    return folder


def write(path, text):
    path.write_text(text)
    return str(path)


def test_shipped_files_hold_exactly_the_schema_defaults():
    for name, schema in (('config.yaml', config.CONFIG), ('spec_1gpu.yaml', config.SPEC_1GPU),
                         ('spec_2gpu.yaml', config.SPEC_2GPU)):
        values = config.load_yaml(os.path.join(ROOT, name))
        assert list(values) == list(schema), f'{name}: not the keys of the schema, in its order'
        assert values == config.defaults(schema), f'{name}: not the defaults of the schema'


def test_shipped_paths_yaml_holds_every_key_and_the_defaults_of_the_settings():
    """paths.yaml holds the user's paths (required or not), and every other key at its default."""
    values = config.load_yaml(os.path.join(ROOT, 'preprocessing', 'paths.yaml'))
    assert list(values) == list(paths.KEYS)
    settings = {k: e.default for k, e in paths.KEYS.items() if not e.path}
    assert {k: values[k] for k in settings} == settings
    assert all(values[k] for k, e in paths.KEYS.items() if e.default is config.REQUIRED)


def test_every_default_passes_its_own_check():
    for schema in (config.CONFIG, config.SPEC_1GPU, config.SPEC_2GPU, config.EVALUATE, paths.KEYS):
        for key, entry in schema.items():
            if entry.default is not None and entry.default is not config.REQUIRED:
                assert config.check_value(key, entry.default, schema, 'the schema') == entry.default


def test_docs_configuration_md_is_generated_from_the_schema():
    with open(os.path.join(ROOT, 'docs', 'configuration.md')) as f:
        shipped = f.read()
    assert shipped == config_docs.markdown(), \
        'docs/configuration.md is stale: .venv/bin/python -m tools.config_docs > docs/configuration.md'


def test_merge_order_and_overrides(tmp_path):
    cfg_file = write(tmp_path / 'c.yaml', 'n_epochs: 5\nlearning_rate: 0.02\nlr_step: [2, 4]\n')
    spec_file = write(tmp_path / 's.yaml', 'batch_size: 64\nn_epochs: 7\n')
    cfg = runs.load(cfg_file, spec_file, ['n_epochs=9', 'learning_rate=1e-3', 'lr_step=[3]',
                                            'rand_crop=false', 'gpu=cpu'], SCHEMA)
    assert cfg['n_epochs'] == 9 and cfg['batch_size'] == 64
    assert cfg['learning_rate'] == 0.001 and isinstance(cfg['learning_rate'], float)
    assert cfg['lr_step'] == [3] and cfg['rand_crop'] is False and cfg['gpu'] == 'cpu'
    assert cfg['momentum'] == 0.9  # untouched default
    assert list(cfg) == list(SCHEMA)


def test_int_is_accepted_as_float_but_not_the_reverse(tmp_path):
    f = write(tmp_path / 'c.yaml', 'learning_rate: 1\n')
    assert runs.load(f, f, [], SCHEMA)['learning_rate'] == 1.0
    with pytest.raises(config.ConfigError, match="'n_epochs'.*int"):
        runs.load(f, f, ['n_epochs=2.5'], SCHEMA)
    with pytest.raises(config.ConfigError, match="'rand_crop'.*bool"):
        runs.load(f, f, ['rand_crop=maybe'], SCHEMA)
    with pytest.raises(config.ConfigError, match="'lr_policy'.*step, auto, cosine"):
        runs.load(f, f, ['lr_policy=linear'], SCHEMA)


def test_unknown_key_names_the_closest(tmp_path):
    f = write(tmp_path / 'c.yaml', 'learnig_rate: 0.1\n')
    with pytest.raises(config.ConfigError) as e:
        runs.load(f, f, [], SCHEMA)
    assert "'learnig_rate'" in str(e.value) and "'learning_rate'" in str(e.value)
    assert str(tmp_path / 'c.yaml') in str(e.value)
    g = write(tmp_path / 'g.yaml', '')
    with pytest.raises(config.ConfigError, match="did you mean 'n_epochs'"):
        runs.load(g, g, ['n_epoch=3'], SCHEMA)
    with pytest.raises(config.ConfigError, match="^unknown config key 'zzz' in command-line overrides; "
                                                 "docs/configuration.md lists the keys$"):
        runs.load(g, g, ['zzz=3'], SCHEMA)


def test_bad_override_syntax_and_bad_yaml(tmp_path):
    g = write(tmp_path / 'g.yaml', '')
    with pytest.raises(config.ConfigError, match="'n_epochs' is not of the form"):
        runs.load(g, g, ['n_epochs'], SCHEMA)
    bad = write(tmp_path / 'bad.yaml', 'a: [1\n')
    with pytest.raises(config.ConfigError, match='bad.yaml is not valid YAML'):
        runs.load(bad, g, [], SCHEMA)
    with pytest.raises(config.ConfigError, match='cannot read config file'):
        runs.load(str(tmp_path / 'missing.yaml'), g, [], SCHEMA)


def test_paths_are_relative_to_their_file_or_to_cwd(tmp_path, monkeypatch):
    sub = tmp_path / 'sub'
    sub.mkdir()
    f = write(sub / 'c.yaml', 'mean_file: misc/mean.npy\n')
    monkeypatch.chdir(tmp_path)
    cfg = runs.load(f, f, ['weights_dir=out'], SCHEMA)
    assert cfg['mean_file'] == str(sub / 'misc' / 'mean.npy')
    assert cfg['weights_dir'] == str(tmp_path / 'out')


def test_to_yaml_round_trips(tmp_path):
    f = write(tmp_path / 'c.yaml', '')
    cfg = runs.load(f, f, ['lr_step=[1, 2]'], SCHEMA)
    assert yaml.safe_load(config.to_yaml(cfg)) == cfg


def test_train_py_reports_unknown_key_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), 'n_epoch=3'],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: unknown config key 'n_epoch' in command-line overrides; did you mean 'n_epochs'?"]


# every key with a range: (a value just outside it, the message; a value just inside it)
OUT_OF_RANGE = {
    'n_epochs': (-1, 'at least 0, got -1', 0),
    'load_epoch': (-1, 'at least 0, got -1', 0),
    'learning_rate': (0, 'above 0, got 0.0', 1e-9),
    'lr_adapt_threshold': (-0.1, 'at least 0, got -0.1', 0.0),
    'lr_step': ([3, 0], 'a list of epochs, each at least 1, got [3, 0]', [1]),
    'warmup_epochs': (-1, 'at least 0, got -1', 0),
    'label_smoothing': (1.0, 'in [0, 1), got 1.0', 0.0),
    'loader_timeout': (0, 'above 0, got 0.0', 0.5),
    'crop_size': (0, 'at least 1, got 0', 1),
    'synthetic_batches': (0, 'at least 1, got 0', 1),
    'num_classes': (-1, 'at least 0 (0: from the dataset), got -1', 0),
    'dropout': (1.0, 'in [0, 1), got 1.0', 0.0),
    'momentum': (1, 'in [0, 1), got 1.0', 0.0),
    'weight_decay': (-1e-4, 'at least 0, got -0.0001', 0.0),
    'exchange_freq': (0, 'at least 1, got 0', 1),
    'peer_timeout': (0, 'above 0, got 0.0', 0.1),
    'snapshot_freq': (0, 'at least 1, got 0', 1),
    'print_freq': (0, 'at least 1, got 0', 1),
    'batch_size': (-1, 'at least 0, got -1', 0),
    'sock_data': (70000, 'a port in 1..65535, got 70000', 65535),
    'sock_data0': (0, 'a port in 1..65535, got 0', 1),
    'sock_data1': (65536, 'a port in 1..65535, got 65536', 65535),
    'sock_gpu': (-5, 'a port in 1..65535, got -5', 1),
}
EVERY_KEY = {**config.CONFIG, **config.SPEC_1GPU, **config.SPEC_2GPU}


def test_every_range_of_the_schema_is_tested_here():
    assert set(OUT_OF_RANGE) == {k for k, e in EVERY_KEY.items() if e.check}


@pytest.mark.parametrize('key', sorted(OUT_OF_RANGE))
def test_values_out_of_range_are_named_at_start_up(key):
    bad, msg, edge = OUT_OF_RANGE[key]
    with pytest.raises(config.ConfigError) as e:
        config.merge(EVERY_KEY, [('command-line overrides', {key: bad}, None)])
    assert str(e.value) == f"config key '{key}' in command-line overrides must be {msg}"
    assert config.merge(EVERY_KEY, [('command-line overrides', {key: edge}, None)])[key] == edge


def test_a_value_out_of_range_is_named_with_the_file_or_override_that_set_it(tmp_path):
    g = write(tmp_path / 'g.yaml', '')
    with pytest.raises(config.ConfigError, match=r"^config key 'momentum' in command-line overrides "
                                                 r"must be in \[0, 1\), got 1.0$"):
        runs.load(g, g, ['momentum=1'], SCHEMA)
    f = write(tmp_path / 'f.yaml', 'print_freq: 0\n')
    with pytest.raises(config.ConfigError) as e:
        runs.load(g, f, [], SCHEMA)
    assert str(e.value) == f"config key 'print_freq' in {f} must be at least 1, got 0"


def test_out_of_range_value_is_a_one_line_error_before_training(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), 'snapshot_freq=0'],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: config key 'snapshot_freq' in command-line overrides must be at least 1, got 0"]


SHIPPED = (os.path.join(ROOT, 'config.yaml'), os.path.join(ROOT, 'spec_1gpu.yaml'))
SCHEMA_2GPU = {**config.CONFIG, **config.SPEC_2GPU}


def data_folder(folder, batch):
    os.makedirs(folder)
    write(folder / 'dataset.yaml', f'num_classes: 3\nimg_size: 36\nbatch_size: {batch}\n')
    return folder


def test_data_gives_the_folders_and_the_batch_and_explicit_keys_win(tmp_path):
    d = data_folder(tmp_path / 'd', 16)
    cfg = runs.load(*SHIPPED, [f'data={d}'], SCHEMA)
    assert [cfg[k] for k in runs.DATA_KEYS] == [
        f'{d}/train_hkl_b16_b_16', f'{d}/val_hkl_b16_b_16', f'{d}/labels', f'{d}/misc/img_mean.npy', 16]
    two = runs.load(SHIPPED[0], os.path.join(ROOT, 'spec_2gpu.yaml'), [f'data={d}'], SCHEMA_2GPU)
    assert two['batch_size'] == 8 and two['train_folder'] == cfg['train_folder']  # per worker: half
    cfg = runs.load(*SHIPPED, [f'data={d}', 'batch_size=4', f'val_folder={tmp_path}/v'], SCHEMA)
    assert cfg['batch_size'] == 4 and cfg['val_folder'] == str(tmp_path / 'v')
    assert cfg['train_folder'] == f'{d}/train_hkl_b16_b_16'
    # a key set beside data, or after it, wins; data set after a key replaces it
    mine = write(tmp_path / 'mine.yaml', f'data: {d}\nmean_file: my_mean.npy\n')
    cfg = runs.load(SHIPPED[0], mine, [], SCHEMA)
    assert cfg['mean_file'] == str(tmp_path / 'my_mean.npy') and cfg['label_folder'] == f'{d}/labels'
    other = data_folder(tmp_path / 'other', 32)
    cfg = runs.load(SHIPPED[0], mine, [f'data={other}'], SCHEMA)
    assert cfg['mean_file'] == f'{other}/misc/img_mean.npy' and cfg['batch_size'] == 32


def test_a_missing_or_garbled_dataset_yaml_is_a_one_line_error_naming_it(tmp_path):
    d = tmp_path / 'd'
    d.mkdir()
    path = str(d / 'dataset.yaml')
    for text, msg in ((None, f'data: no {path} (data is the folder preprocessing wrote, its tar_root_dir: '
                             'preprocess first with sh preprocessing/generate_data.sh, or set data=FOLDER)'),
                      ('a: [1\n', f'{path} is not valid YAML'),
                      ('num_classes: 3\n', f'{path} gives no batch_size')):
        if text is not None:
            write(d / 'dataset.yaml', text)
        with pytest.raises(UserError) as e:
            runs.load(*SHIPPED, [f'data={d}'], SCHEMA)
        assert str(e.value).startswith(msg) and '\n' not in str(e.value), str(e.value)


def test_folders_without_a_dataset_yaml_give_the_batch_size_of_their_batch_files(tmp_path):
    """The folders named (data preprocessed by the original: no dataset.yaml), batch_size 0: the
    header of a batch file gives it, per step (train.py) or per worker (train_2gpu.py, whole files
    or halves); a folder of a single batch file too."""
    from tests.helpers import make_batches
    keys = make_batches(str(tmp_path / 'd'), n_train=1, n_val=1, batch=8)
    os.remove(tmp_path / 'd' / 'dataset.yaml')
    given = [f"data={tmp_path / 'd'}",
             *(f'{k}={keys[k]}' for k in ('train_folder', 'val_folder', 'label_folder', 'mean_file'))]
    assert runs.load(*SHIPPED, given, SCHEMA)['batch_size'] == 8
    spec_2gpu = os.path.join(ROOT, 'spec_2gpu.yaml')
    assert runs.load(SHIPPED[0], spec_2gpu, given, SCHEMA_2GPU)['batch_size'] == 4
    halves = [f"train_folder={keys['train_folder'][:-1]}4", *given[2:]]
    assert runs.load(SHIPPED[0], spec_2gpu, [given[0], *halves], SCHEMA_2GPU)['batch_size'] == 4


def test_a_resume_takes_its_runs_saved_config_and_the_newest_snapshot(tmp_path):
    """`weights_dir=W resume_train=True` alone (or `--config W/config.yaml resume_train=True`):
    the run's saved config below the command line, above the shipped files; load_epoch 0 is
    the newest snapshot; batch_size per worker (train_2gpu.py) and per step convert."""
    from lib import checkpoint
    d, w = data_folder(tmp_path / 'd', 16), tmp_path / 'w'
    w.mkdir()
    saved = runs.load(*SHIPPED, [f'data={d}', 'model=alexnet_cifar', 'crop_size=32', 'gpu=cpu',
                                   'n_epochs=3', f'weights_dir={w}', 'shuffle=True'], SCHEMA)
    save_text(str(w / 'config.yaml'), config.to_yaml(saved))
    for epoch in (1, 3):
        (w / f'model_{epoch}.pt').write_bytes(b'')
    cfg = runs.load(*SHIPPED, [f'weights_dir={w}', 'resume_train=True', 'n_epochs=5'], SCHEMA)
    assert cfg == dict(saved, resume_train=True, load_epoch=3, n_epochs=5)
    cfg = runs.load(str(w / 'config.yaml'), SHIPPED[1], ['resume_train=True', 'load_epoch=1'], SCHEMA)
    assert cfg == dict(saved, resume_train=True, load_epoch=1)
    two = runs.load(SHIPPED[0], os.path.join(ROOT, 'spec_2gpu.yaml'),
                      [f'weights_dir={w}', 'resume_train=True'], SCHEMA_2GPU)
    assert two['batch_size'] == 8 and two['model'] == 'alexnet_cifar' and two['load_epoch'] == 3
    with pytest.raises(checkpoint.SnapshotError, match=f'no snapshot model_<N>.pt in {tmp_path}/none'):
        runs.load(*SHIPPED, [f'weights_dir={tmp_path}/none', 'resume_train=True'], SCHEMA)


def test_config_is_a_leaf_that_imports_no_torch():
    """lib/config.py (the schema and the merging of YAML files and key=value) imports neither
    torch, refused here by an import hook, nor any other module of lib/."""
    code = '\n'.join([
        'import json, sys',
        'class NoTorch:',
        '    def find_spec(self, name, path=None, target=None):',
        "        if name.split('.')[0] == 'torch':",
        "            raise ImportError(f'{name} is refused here')",
        'sys.meta_path.insert(0, NoTorch())',
        'import lib.config',
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'lib')))"])
    r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert yaml.safe_load(r.stdout) == ['lib', 'lib.config']


def test_batch_size_means_images_per_worker_in_train_2gpu_and_per_step_in_train_py():
    """data.batch_images says what batch_size means for a launcher and its workers, and
    data.batch_size_for the batch_size of a step (a whole batch file) under each launcher."""
    from lib import data
    assert data.batch_images(128, 'train_2gpu.py') == (128, 256)      # per worker, 2 workers
    assert data.batch_images(256, 'train.py') == (256, 256)           # alone: the step
    assert data.batch_images(256, 'train.py', 4) == (64, 256)         # 4 torchrun ranks together
    assert (data.batch_size_for(256, 'train_2gpu.py'), data.batch_size_for(256, 'train.py')) == (128, 256)
    assert data.launcher_of(SCHEMA_2GPU) == 'train_2gpu.py' and data.launcher_of(SCHEMA) == 'train.py'


def test_a_run_to_train_has_its_crop_checked_with_its_config(tmp_path):
    """Once, as the config comes in (not again by the data check or the network); a snapshot to
    evaluate brings its own network (validate_performance.py: test_evaluate.py)."""
    with pytest.raises(config.ConfigError, match='^model alexnet needs crop_size 227, got 32 '):
        runs.load(*SHIPPED, ['synthetic=True', 'crop_size=32'], SCHEMA)
    cifar = runs.load(*SHIPPED, ['synthetic=True', 'crop_size=32', 'model=alexnet_cifar'], SCHEMA)
    assert cifar['crop_size'] == 32
