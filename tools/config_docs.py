"""Writes docs/configuration.md from the config schemas (lib/config.py, preprocessing/paths.py):

    .venv/bin/python -m tools.config_docs > docs/configuration.md
"""
from lib import config
from lib.config import REQUIRED
from preprocessing import paths

# (file, what it is, schema, {first key of a section: section title})
FILES = [
    ('config.yaml', 'Training settings shared by train.py, train_2gpu.py and validate_performance.py. '
     'A run merges config.yaml ← spec file ← `key=value` on the command line; paths in a YAML file are '
     'relative to that file, on the command line to the current directory.', config.CONFIG,
     {'resume_train': 'schedule', 'use_data_layer': 'data', 'model': 'model and optimiser',
      'exchange': 'several workers (train_2gpu.py; train.py under torchrun)', 'weights_dir': 'output'}),
    ('spec_1gpu.yaml', 'One device: the spec file of train.py and validate_performance.py.',
     config.SPEC_1GPU, {}),
    ('spec_2gpu.yaml', 'Two workers: the spec file of train_2gpu.py.', config.SPEC_2GPU, {}),
    ('validate_performance.py', 'Keys validate_performance.py takes besides those of config.yaml and '
     'spec_1gpu.yaml (set them on its command line).', config.EVALUATE, {}),
    ('preprocessing/paths.yaml', 'Settings of `sh preprocessing/generate_data.sh [PATHS_YAML]` (and '
     'generate_toy_data.sh); demo_paths.yaml, cifar10_paths.yaml and the other `*_paths.yaml` files '
     'hold the same keys. Relative paths are relative to the paths file.', paths.KEYS,
     {'train_img_dir': 'inputs', 'tar_root_dir': 'outputs', 'img_size': 'batches'}),
]


def cell(text):
    return str(text).replace('|', '\\|')


def default(entry):
    if entry.default is REQUIRED:
        return 'required'
    if entry.default is None:
        return '`null`'
    return '`' + (repr(entry.default) if entry.default == '' else str(entry.default)) + '`'


def values(entry):
    if entry.choices:
        return ', '.join(f'`{c}`' for c in entry.choices)
    t = config.kind(entry)
    if t is list and entry.check:
        return entry.check[1]
    text = 'path' if entry.path else {bool: 'True or False', int: 'integer', float: 'number',
                                      list: 'list of integers', str: 'text'}[t]
    text += ' or `null`' if entry.default is None else ''
    return text + (f', {entry.check[1]}' if entry.check else '')


def markdown():
    out = ['# Configuration', '',
           '<!-- Generated from lib/config.py and preprocessing/paths.py by '
           '`.venv/bin/python -m tools.config_docs > docs/configuration.md`; do not edit. -->', '',
           'Every key, its default (the value it has when no file sets it), the values it takes and '
           'what it does. An unknown key, or a value of the wrong type or out of its range, stops the '
           'program with a one-line error naming the file and the key.']
    for name, about, schema, sections in FILES:
        out += ['', f'## {name}', '', about]
        for key, entry in schema.items():
            if key in sections or key == next(iter(schema)):
                out += [''] + ([f'### {sections[key]}', ''] if key in sections else [])
                out += ['| key | default | values | meaning |', '|---|---|---|---|']
            row = [f'`{key}`', default(entry), values(entry), entry.meaning]
            out.append('| ' + ' | '.join(cell(c) for c in row) + ' |')
    return '\n'.join(out) + '\n'


if __name__ == '__main__':
    print(markdown(), end='')
