"""ImageNet's official image archives, read without extracting them.

ILSVRC2012_img_train.tar holds one uncompressed tar per class (n01440764.tar ...), each holding that
class's JPEGs; ILSVRC2012_img_val.tar holds the val JPEGs. Each archive is indexed once: listed name ->
byte offset and size of the image inside the archive file (tarfile reads only the 512-byte headers and
seeks over the data, so nothing is held in memory but the index). The index is kept in misc_dir
(<archive name>.index.npz, checked against the archive's size and mtime), so a resumed run does not
scan 138 GB again. Workers then read each image in place (sources.Member).

The names are those the extracted folders give (`<wnid>/<file>` for train, extracting <wnid>.tar into
the folder <wnid>; `<file>` for val), and only the members that extraction would put directly in those
folders with an image extension are listed (not directories, links, other files), exactly as the
folder listing does: every output is the same as from the extracted folders.
"""
import os
import tarfile
from contextlib import contextmanager
from functools import partial

import numpy as np
from tqdm import tqdm

from lib.atomic import atomic_write
from preprocessing import PrepError
from preprocessing.sources import IMAGE_EXTS, ArchiveSource, Window
from preprocessing.writer import parallel_map

INDEX_VERSION = 1
PARALLEL_CLASSES = 64  # fewer class tars are indexed in the main process (a pool costs ~20 ms to start)


def train_archive(archive, misc_dir, workers=1):
    """(classes sorted, ArchiveSource of '<wnid>/<file>' names) of the train tar of class tars; the
    class tars are indexed in `workers` processes."""
    classes, source = load_index(archive, misc_dir, partial(scan_train, workers=workers))
    counts = {}
    for name in source.names:
        c = name.split('/', 1)[0]
        counts[c] = counts.get(c, 0) + 1
    for c in classes:
        if not counts.get(c):
            raise PrepError(f'no images ({"/".join(IMAGE_EXTS)}) in {archive} member {c}.tar')
    return classes, source


def val_archive(archive, misc_dir):
    """ArchiveSource of the '<file>' names of the flat val tar."""
    return load_index(archive, misc_dir, scan_val)[1]


def is_archive(path):
    return os.path.isfile(path) and path.lower().endswith('.tar')


def load_index(archive, misc_dir, scan):
    """(classes, ArchiveSource) from misc_dir's index of the archive, made first if missing or stale."""
    try:
        st = os.stat(archive)
    except OSError as e:
        raise PrepError(f'cannot read archive {archive}: {e.strerror}') from None
    stamp = np.array([INDEX_VERSION, st.st_size, st.st_mtime_ns], np.int64)
    path = os.path.join(misc_dir, os.path.basename(archive) + '.index.npz')
    try:
        with np.load(path, allow_pickle=False) as z:
            if np.array_equal(z['stamp'], stamp):
                return unpack(z['classes']), ArchiveSource(archive, unpack(z['names']), z['offsets'], z['sizes'])
    except (OSError, ValueError, KeyError):
        pass  # no index yet, or an unreadable one: scan again
    classes, entries = scan(archive)
    names = sorted(entries)
    offsets = np.array([entries[n][0] for n in names], np.int64)
    sizes = np.array([entries[n][1] for n in names], np.int64)
    os.makedirs(misc_dir, exist_ok=True)

    def write(tmp):
        with open(tmp, 'wb') as f:
            np.savez(f, stamp=stamp, classes=pack(classes), names=pack(names), offsets=offsets, sizes=sizes)
    atomic_write(path, write)
    return classes, ArchiveSource(archive, names, offsets, sizes)


def scan_train(archive, workers=1):
    """(sorted class names, {'<wnid>/<file>': (offset, size)}) from the headers of a tar of tars: the
    outer headers here, then the class tars in `workers` processes (each opens the archive itself)."""
    jobs = []
    with open_tar(archive) as (_, outer):
        for m in outer:
            name = direct_name(m)
            if m.isreg() and name is not None and name.endswith('.tar') and not name.startswith('.'):
                jobs.append((archive, m.name, m.offset_data, m.size))
            # (anything else is extracted beside the class folders: not listed)
    entries = {}
    for found in parallel_map(scan_class, jobs, len(jobs),
                              workers if len(jobs) >= PARALLEL_CLASSES else 1,
                              f'index {os.path.basename(archive)}', unit='class'):
        entries.update(found)  # in archive order: a class tar given twice adds to the first
    return sorted({direct_name_of(job[1])[:-4] for job in jobs}), entries


def scan_class(job):
    """{'<wnid>/<file>': (offset in the archive, size)} of one class tar inside the archive."""
    archive, member, offset, size = job
    wnid = direct_name_of(member)[:-4]
    entries = {}
    try:
        with open(archive, 'rb', buffering=0) as raw:
            for im in tarfile.open(fileobj=Window(raw.fileno(), offset, size), mode='r:'):
                if listed(im):
                    entries[f'{wnid}/{direct_name(im)}'] = (offset + im.offset_data, im.size)
    except OSError as e:
        raise PrepError(f'cannot read archive {archive}: {e.strerror}') from None
    except tarfile.TarError as e:
        raise PrepError(f'{archive}: member {member} is not a readable tar ({e}; is the archive '
                        f'truncated?)') from None
    return entries


def scan_val(archive):
    """([], {'<file>': (offset, size)}) from the headers of a flat tar."""
    with open_tar(archive) as (_, tar), progress(archive) as bar:
        entries = {}
        for m in tar:
            bar.update(m.offset_data + m.size - bar.n)
            if listed(m):
                entries[direct_name(m)] = (m.offset_data, m.size)
    return [], entries


@contextmanager
def open_tar(archive):
    """(unbuffered file, TarFile) of an uncompressed tar; errors become one-line PrepErrors."""
    try:
        raw = open(archive, 'rb', buffering=0)  # headers only: read 512 bytes at a time, not 8 KiB
    except OSError as e:
        raise PrepError(f'cannot read archive {archive}: {e.strerror}') from None
    with raw:
        try:
            tar = tarfile.open(fileobj=raw, mode='r:')
        except tarfile.TarError as e:
            raise PrepError(f'{archive} is not an uncompressed tar archive ({e})') from None
        try:
            yield raw, tar
        except (tarfile.TarError, OSError) as e:
            raise PrepError(f'cannot read archive {archive} ({type(e).__name__}: {e}); '
                            f'is it truncated?') from None


def progress(archive):
    return tqdm(total=os.path.getsize(archive), desc=f'index {os.path.basename(archive)}', unit='B',
                unit_scale=True, disable=None)


def direct_name(member):
    """The member's file name if extraction puts it directly in the target folder, else None."""
    return direct_name_of(member.name)


def direct_name_of(name):
    while name.startswith('./'):
        name = name[2:]
    return name if name and '/' not in name and name not in ('.', '..') else None


def listed(member):
    """A regular file directly in the folder, with an image extension: what the folder listing lists."""
    name = direct_name(member)
    return member.isreg() and name is not None and os.path.splitext(name)[1].lower() in IMAGE_EXTS


def pack(names):
    return np.frombuffer('\0'.join(names).encode('utf-8', 'surrogateescape'), np.uint8)


def unpack(blob):
    text = blob.tobytes().decode('utf-8', 'surrogateescape')
    return text.split('\0') if text else []
