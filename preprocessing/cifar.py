"""The CIFAR-10 and CIFAR-100 binary versions, read as downloaded (the .tar.gz) or extracted; no pickle.

cifar10_bin:  cifar-10-binary.tar.gz, or its folder cifar-10-batches-bin/: data_batch_1.bin ...
              data_batch_5.bin (train), test_batch.bin (val), batches.meta.txt (class names, one a
              line); 3,073-byte records: label, 1,024 R, 1,024 G, 1,024 B bytes (rows of 32 pixels).
cifar100_bin: cifar-100-binary.tar.gz, or its folder cifar-100-binary/: train.bin, test.bin,
              coarse_label_names.txt, fine_label_names.txt; 3,074-byte records: coarse label, fine
              label, pixels. The key cifar100_labels picks fine (100 classes) or coarse (20).
train_img_dir and val_img_dir name the archive or folder (the same one, usually). Record k of
data_batch_1.bin, labelled cat, is listed as 'cat/data_batch_1.bin:00042', so train.txt and val.txt
say where each image came from, as for image files, and the classes are in label order (the names
file's). The python (pickle) and matlab versions are refused.
"""
import os
import tarfile
import zlib

from preprocessing import PrepError
from preprocessing.sources import RecordSource

LAYOUTS = ('cifar10_bin', 'cifar100_bin')
PIXELS = 3072
FILES = {  # layout: (train files, val files, names file per label kind, header bytes, standard folder)
    'cifar10_bin': ([f'data_batch_{i}.bin' for i in range(1, 6)], ['test_batch.bin'],
                    {'label': 'batches.meta.txt'}, 1, 'cifar-10-batches-bin'),
    'cifar100_bin': (['train.bin'], ['test.bin'],
                     {'coarse': 'coarse_label_names.txt', 'fine': 'fine_label_names.txt'}, 2,
                     'cifar-100-binary'),
}
PICKLED = {'data_batch_1', 'batches.meta', 'meta', 'train', 'test'}  # the python version's files
HINT = ('only the binary version of CIFAR is read (the python version is pickles, never loaded): download '
        'cifar-10-binary.tar.gz or cifar-100-binary.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html')


def detect(path):
    """The CIFAR layout of an archive or folder, None if it is not one; refuses the pickle versions."""
    name = os.path.basename(path.rstrip('/')).lower()
    if os.path.isfile(path) and name.startswith('cifar-10') and name.endswith(('.tar.gz', '.tgz')):
        if 'binary' not in name:
            raise PrepError(f'{path}: {HINT}')
        return 'cifar100_bin' if name.startswith('cifar-100') else 'cifar10_bin'
    if os.path.isdir(path):
        for layout, (train, _, _, _, folder) in FILES.items():
            if any(os.path.isfile(os.path.join(path, sub, train[0])) for sub in ('.', folder)):
                return layout
        if name in ('cifar-10-batches-py', 'cifar-100-python', 'cifar-10-batches-mat'):
            raise PrepError(f'{path}: {HINT}')
    return None


def list_cifar(cfg, layout):
    """(classes, train, val, val_labels, sources) of a CIFAR binary archive or folder."""
    train_files, val_files, names_files, header, _ = FILES[layout]
    kind = 'label' if layout == 'cifar10_bin' else cfg['cifar100_labels']
    label_byte = 1 if kind == 'fine' else 0
    names_file = names_files[kind]
    if cfg['val_img_dir'] == cfg['train_img_dir']:  # one pass over the archive
        blobs = read_files(cfg['train_img_dir'], layout, train_files + [names_file] + val_files)
    else:
        blobs = {**read_files(cfg['train_img_dir'], layout, train_files + [names_file]),
                 **read_files(cfg['val_img_dir'], layout, val_files)}
    classes = class_names(blobs[names_file], f'{cfg["train_img_dir"]}: {names_file}')
    listed, sources = {}, {}
    for split, files, root in (('train', train_files, cfg['train_img_dir']),
                               ('val', val_files, cfg['val_img_dir'])):
        entries = []
        for f in files:
            data, size = blobs[f], header + PIXELS
            if not data or len(data) % size:
                raise PrepError(f'{root}: {f} holds {len(data)} bytes, not a whole number of {size}-byte '
                                f'records ({layout})')
            for k in range(len(data) // size):
                label = data[k * size + label_byte]
                if label >= len(classes):
                    raise PrepError(f'{root}: record {k} of {f} has label {label}, but {names_file} names '
                                    f'{len(classes)} classes')
                entries.append((f'{classes[label]}/{f}:{k:05d}', label))
        entries.sort()
        listed[split] = entries
        sources[split] = RecordSource({f: blobs[f] for f in files}, header)
    train = [n for n, _ in listed['train']]
    return classes, train, [n for n, _ in listed['val']], [y for _, y in listed['val']], sources


def class_names(data, where):
    names = [line.strip() for line in data.decode('utf-8', 'replace').splitlines() if line.strip()]
    bad = [n for n in names if '/' in n] or sorted({n for n in names if names.count(n) > 1})
    if not names or bad:
        raise PrepError(f'{where}: expected one class name a line, distinct and without "/"'
                        + (f' (got {bad[0]!r})' if bad else ' (empty)'))
    return names


def read_files(path, layout, wanted):
    """{name: bytes} of the wanted files of a CIFAR binary archive (.tar.gz) or folder."""
    found = {}
    if os.path.isdir(path):
        folder = FILES[layout][4]
        base = path if os.path.isfile(os.path.join(path, wanted[0])) else os.path.join(path, folder)
        seen = set(os.listdir(base)) if os.path.isdir(base) else set()
        for f in wanted:
            if f in seen:
                try:
                    with open(os.path.join(base, f), 'rb') as fh:
                        found[f] = fh.read()
                except OSError as e:
                    raise PrepError(f'cannot read {os.path.join(base, f)}: {e.strerror}') from None
    elif os.path.isfile(path):
        seen = set()
        try:
            with tarfile.open(path, 'r:*') as tar:
                for m in tar:  # streamed: only the wanted members are read
                    name = m.name.rsplit('/', 1)[-1]
                    seen.add(name)
                    if m.isreg() and name in wanted and name not in found:
                        found[name] = tar.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise PrepError(f'cannot read CIFAR archive {path} ({type(e).__name__}: {e})') from None
    else:
        raise PrepError(f'{path} does not exist')
    missing = [f for f in wanted if f not in found]
    if missing:
        hint = f'; {HINT}' if seen & PICKLED else f' (layout {layout})'
        raise PrepError(f'{path} holds no {missing[0]}{hint}')
    return found
