"""What a run is made of, from the config files and the command line: the saved run that a resume
or validate_performance.py continues, the data folder (its dataset.yaml and its batch folders) and
the batch size; the network's crop checked as the config comes in.

A run's config is  config.yaml  <-  spec file  <-  [saved run]  <-  command-line overrides, merged
and checked by lib/config.py; then the data keys left empty are taken from `data` (with_data).
"""
import os

from lib import checkpoint, config, data, model

# Keys `data` sets where they are empty (0): the batch folders, labels, mean and batch size.
DATA_KEYS = ('train_folder', 'val_folder', 'label_folder', 'mean_file', 'batch_size')
# What validate_performance.py takes from the run of the snapshot it evaluates.
EVAL_KEYS = ('data',) + DATA_KEYS + ('num_classes', 'synthetic', 'synthetic_batches', 'seed',
                                     'model', 'crop_size')
# What a resumed run never takes from the run it continues.
RUN_LOCAL = ('resume_train', 'load_epoch', 'weights_dir', 'overwrite')


def command_line(doc, argv, schema, spec='spec_1gpu.yaml'):
    """The merged config of a command line (UserError if bad); see config.parser()."""
    args = config.parser(doc, spec).parse_args(argv)
    return load(args.config, args.spec, args.overrides, schema)


def load(config_file, spec_file, overrides, schema):
    """The merged config: config_file <- spec_file <- [saved run] <- overrides (a list of
    'key=value'), then the data keys left empty taken from `data` (with_data).

    The saved run is the config of the run a command continues (saved_run): a resume
    (resume_train, load_epoch 0 = the newest snapshot) or the snapshot validate_performance.py
    evaluates. Only the command line overrides it. A run to train has its network's crop checked
    here (validate_performance.py takes the network of its snapshot)."""
    files = [config.yaml_source(config_file), config.yaml_source(spec_file)]
    command = ('command-line overrides', config.parse_overrides(overrides), None)
    cfg = config.merge(schema, files + [command])
    if cfg['load_epoch'] == 0 and (cfg['resume_train'] or cfg.get('checkpoint') == ''):
        cfg['load_epoch'] = checkpoint.latest_epoch(cfg['weights_dir'])
    saved = saved_run(cfg, schema)
    if saved is None:
        cfg = with_data(cfg, files + [command], schema)
    else:
        epoch = cfg['load_epoch']
        cfg = dict(config.merge(schema, files + [saved, command]), load_epoch=epoch)
        cfg = with_data(cfg, files + [saved, command], schema)
    if 'checkpoint' not in schema:
        model.check_crop(cfg['model'], cfg['crop_size'])
    return cfg


def saved_run(cfg, schema):
    """The source (name, values, folder) of the saved config of the run that cfg continues:
    weights_dir/config.yaml beside the snapshot, else the snapshot's own config. For a resume,
    all but RUN_LOCAL; for validate_performance.py, EVAL_KEYS. None when cfg continues no run.
    The snapshot is checked to exist here, once. batch_size keeps its images per step whichever
    launcher saved it (data.batch_images)."""
    if 'checkpoint' in schema:
        if not (cfg['checkpoint'] or cfg['load_epoch']):  # load_epoch 0: weights_dir has none
            raise checkpoint.SnapshotError(f"no snapshot model_<N>.pt in {cfg['weights_dir']} "
                                           '(set checkpoint=PATH or weights_dir=W)')
        path = cfg['checkpoint'] or checkpoint.snapshot_path(cfg['weights_dir'], cfg['load_epoch'])
        checkpoint.check_file(path, ' (set checkpoint=PATH or load_epoch=N)')
        keys = EVAL_KEYS
    elif cfg['resume_train']:
        path = checkpoint.check_exists(cfg['weights_dir'], cfg['load_epoch'])
        keys = [k for k in schema if k not in RUN_LOCAL]
    else:
        return None
    folder = os.path.dirname(os.path.abspath(path))
    where = os.path.join(folder, 'config.yaml')
    if os.path.isfile(where):
        saved = config.load_yaml(where)
    else:
        where, saved = path, checkpoint.read(path).get('config', {})
    values = {k: v for k, v in saved.items() if k in keys and k in schema}
    if isinstance(values.get('batch_size'), int):
        step = data.batch_images(values['batch_size'], data.launcher_of(saved)).step
        values['batch_size'] = data.batch_size_for(step, data.launcher_of(schema))
    return f'{where} (the run continued)', values, folder


def with_data(cfg, sources, schema):
    """cfg with each of DATA_KEYS that is empty (0), or set in an earlier source than `data`,
    taken from the data folder: <data>/train_hkl_b<B>_b_<B>, val_hkl_..., labels,
    misc/img_mean.npy and the batch_size of steps of B images, B = dataset.yaml's batch_size.
    A key set at or after data's own source wins. Synthetic runs take B = 256. When only
    batch_size is left and data holds no dataset.yaml, the training batch files give it."""
    given = {}
    for i, (_, values, _) in enumerate(sources):
        given.update(dict.fromkeys(values, i))
    need = [k for k in DATA_KEYS
            if k in cfg and (not cfg[k] or given.get(k, -1) < given.get('data', -1))]
    launcher = data.launcher_of(schema)
    if not need or cfg['synthetic']:
        if 'batch_size' in need:
            cfg['batch_size'] = data.batch_size_for(256, launcher)
        return cfg
    labels = os.path.join(cfg['data'], 'labels')
    meta = data.dataset_yaml(labels)
    if need == ['batch_size'] and not (cfg['data'] and os.path.isfile(meta)):
        # the folders are given (data preprocessed by the original)
        cfg['batch_size'] = data.file_batch(cfg['train_folder'], launcher)
        return cfg
    if not cfg['data']:
        raise config.ConfigError(f"data is empty: set data=FOLDER (the folder preprocessing wrote) "
                                 f"or {', '.join(need)}")
    if not os.path.isfile(meta):
        raise config.ConfigError(f'data: no {meta} (data is the folder preprocessing wrote, its '
                                 'tar_root_dir: preprocess first with sh '
                                 'preprocessing/generate_data.sh, or set data=FOLDER)')
    info = data.read_dataset(meta)
    B = info.get('batch_size')
    if not (isinstance(B, int) and B >= 1):
        raise data.DataError(f'{meta} gives no batch_size (a dataset.yaml of preprocessing holds it)')
    halves = launcher == 'train_2gpu.py' and 1 not in info.get('sub_batches', [1])
    n = 2 if halves else 1  # no whole batches: train_2gpu.py's workers take the halves
    found = {'train_folder': os.path.join(cfg['data'], f'train_hkl_b{B}_b_{B // n}'),
             'val_folder': os.path.join(cfg['data'], f'val_hkl_b{B}_b_{B // n}'),
             'label_folder': labels,
             'mean_file': os.path.join(cfg['data'], 'misc', 'img_mean.npy'),
             'batch_size': data.batch_size_for(B, launcher)}
    cfg.update({k: found[k] for k in need})
    return cfg
