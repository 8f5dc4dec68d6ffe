"""Preprocessing (preprocessing/): raw image trees -> hkl batches, labels, mean, lists.

Every test builds its own tiny image tree in a temporary folder. Each image is a solid colour unique to
its file, so a batch can be decoded back to the files (and classes) it holds and compared with the
labels and lists written next to it.
"""
import io
import itertools
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import hickle
import numpy as np
import pytest
import scipy.io
import yaml
from PIL import Image

from lib.data import read_hkl
from preprocessing import layouts, make_data, make_demo_data, mean, writer
from preprocessing.images import load_rgb, to_rgb
from preprocessing.paths import KEYS

REPO = Path(__file__).resolve().parents[1]
S, B = 16, 4                                      # img_size, batch_size of the test runs
WNIDS = ['n01000001', 'n02000002', 'n03000003']   # train class folders (label = index)
# devkit synsets (ILSVRC id, WNID): ids not in WNID order; n04000004 has no train folder
SYNSETS = [(1, 'n03000003'), (2, 'n01000001'), (3, 'n04000004'), (4, 'n02000002')]
# solid colours for ordinary files: no grays, at least 70 apart, far from the hostile files' colours
GRID = [c for c in itertools.product((30, 100, 170, 240), repeat=3) if len(set(c)) > 1]
EXTS = ['.jpg', '.JPG', '.png', '.jpeg', '.PNG', '.JPEG']   # any case is accepted
EXIF_TOP, EXIF_BOTTOM = (250, 250, 0), (0, 250, 250)


# ---------------------------------------------------------------------------------- image trees
def save(im, **kw):
    return lambda path: im.save(path, **kw)


def exif_rotated(path):
    """20x12 stored, left half EXIF_TOP; orientation 6 (rotate 90 cw to display): EXIF_TOP on top."""
    im = Image.new('RGB', (20, 12), EXIF_BOTTOM)
    im.paste(EXIF_TOP, (0, 0, 10, 12))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(path, format='JPEG', quality=95, exif=exif.tobytes())


def truncated_jpeg(path):
    noise = np.random.RandomState(0).randint(0, 256, (64, 64, 3)).astype(np.uint8)
    Image.fromarray(noise).save(path, format='JPEG')
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:len(data) // 2])


def hostile_files():
    """(name, write(path), RGB the image must become): every odd kind of file that is still an image."""
    size = (20, 12)
    palette = Image.new('P', size, 0)
    palette.putpalette([10, 200, 30] + [0, 0, 0] * 255)
    gray16 = lambda v: Image.fromarray(np.full((12, 20), v, np.uint16))  # noqa: E731  (mode I;16)
    return [
        ('cmyk.jpg', save(Image.new('CMYK', size, (0, 255, 255, 0)), format='JPEG', quality=95), (255, 0, 0)),
        ('gray.jpg', save(Image.new('L', size, 77), format='JPEG', quality=95), (77, 77, 77)),
        ('gray_alpha.png', save(Image.new('LA', size, (150, 100))), (150, 150, 150)),
        ('palette.png', save(palette, transparency=0), (10, 200, 30)),        # fully transparent
        ('onebit.png', save(Image.new('1', size, 0)), (0, 0, 0)),
        ('gray16.png', save(gray16(65535)), (255, 255, 255)),
        ('gray16_mid.png', save(gray16(32896)), (128, 128, 128)),             # clipping would give 255
        ('rgba.png', save(Image.new('RGBA', size, (40, 60, 220, 0))), (40, 60, 220)),
        ('png_inside.JPEG', save(Image.new('RGB', size, (200, 120, 40)), format='PNG'), (200, 120, 40)),
        ('rotated.jpg', exif_rotated, EXIF_TOP),
    ]


BAD_FILES = [('truncated.jpg', truncated_jpeg), ('empty.jpg', lambda p: Path(p).write_bytes(b'')),
             ('text.jpg', lambda p: Path(p).write_text('not an image\n'))]


def solid(path, rgb):
    fmt = 'PNG' if path.suffix.lower() == '.png' else 'JPEG'
    Image.new('RGB', (20, 12), rgb).save(path, format=fmt, quality=95)


def make_train(root, classes, per_class=6, hostile=True, bad=True):
    """train/<class>/...: solid images, the hostile files and the bad files spread over the classes.
    Returns ({relpath: (label, rgb)} of the readable files, [relpaths of the bad ones])."""
    colours, table, bad_files = iter(GRID), {}, []
    for c, name in enumerate(classes):
        folder = root / 'train' / name
        folder.mkdir(parents=True)
        (folder / 'readme.txt').write_text('not listed: not an image extension')
        for j in range(per_class):
            rel = f'{name}/img{j}{EXTS[j % len(EXTS)]}'
            table[rel] = (c, next(colours))
            solid(root / 'train' / rel, table[rel][1])
    for i, (fname, write, rgb) in enumerate(hostile_files() if hostile else []):
        c = i % len(classes)
        write(root / 'train' / classes[c] / fname)
        table[f'{classes[c]}/{fname}'] = (c, rgb)
    for i, (fname, write) in enumerate(BAD_FILES if bad else []):
        write(root / 'train' / classes[i % len(classes)] / fname)
        bad_files.append(f'{classes[i % len(classes)]}/{fname}')
    return table, bad_files


def make_val_imagenet(root, n=14, bad=(5,)):
    """Flat val/ILSVRC2012_val_<k>.JPEG, devkit/meta_clsloc.mat and devkit/gt.txt (ILSVRC ids)."""
    (root / 'val').mkdir()
    (root / 'devkit').mkdir()
    id_of = {w: i for i, w in SYNSETS}
    colours, table, gt = iter(GRID[::-1]), {}, []
    for k in range(1, n + 1):
        c = (2 * k) % len(WNIDS)
        gt.append(id_of[WNIDS[c]])
        name = f'ILSVRC2012_val_{k:08d}.JPEG'
        if k in bad:
            truncated_jpeg(root / 'val' / name)
        else:
            table[name] = (c, next(colours))
            solid(root / 'val' / name, table[name][1])
    synsets = np.array(SYNSETS, dtype=[('ILSVRC2014_ID', 'O'), ('WNID', 'O')])
    scipy.io.savemat(root / 'devkit' / 'meta_clsloc.mat', {'synsets': synsets})
    (root / 'devkit' / 'gt.txt').write_text(''.join(f'{i}\n' for i in gt))
    return table


def make_val_folders(root, classes, per_class=5):
    table, colours = {}, iter(GRID[::-1])
    for c, name in enumerate(classes):
        (root / 'val' / name).mkdir(parents=True)
        for j in range(per_class):
            table[f'{name}/v{j}.jpg'] = (c, next(colours))
            solid(root / 'val' / name / f'v{j}.jpg', table[f'{name}/v{j}.jpg'][1])
    truncated_jpeg(root / 'val' / classes[0] / 'broken.jpg')
    return table


def write_paths(path, **settings):
    """A paths file; its relative paths are relative to its folder (raw/ and out/ next to it)."""
    cfg = dict(train_img_dir='raw/train', val_img_dir='raw/val', tar_root_dir='out',
               tar_train_dir='out/train_hkl', tar_val_dir='out/val_hkl', misc_dir='out/misc',
               meta_clsloc_mat='raw/devkit/meta_clsloc.mat', val_label_file='raw/devkit/gt.txt',
               img_size=S, batch_size=B, sub_batches=[1, 2], workers=1, layout='imagenet')
    cfg.update(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(paths, *args):
    """make_data in this process; asserts success."""
    assert make_data.main([str(paths), *args]) == 0


def run_sh(script, *args, cwd):
    return subprocess.run(['sh', str(REPO / 'preprocessing' / script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------------------------- reading outputs
def batches(folder, part=None):
    names = sorted(n for n in os.listdir(folder) if n.endswith('.hkl') and
                   (('_' not in n) if part is None else n.endswith(f'_{part}.hkl')))
    return [hickle.load(folder / n) for n in names]


def original_hickle_load(path):
    """A batch file as the original reads it: theano_alexnet (Python 2) calls hkl.load(name) -
    img_mean with the hickle of its time, 1.x or 2.x. This is the path those versions' load takes
    for such a file, step for step (hickle 2.1.0's hickle.load and hickle_legacy.load; 1.x's load is
    the latter): a root with attributes CLASS and VERSION is hickle 2's own layout, read otherwise
    (none of ours); else the object's kind is h5f['type'][0], and an 'ndarray' is h5f['data'][:].
    A KeyError where a dataset is missing, as theirs. Python 2's str is bytes: compared as bytes.
    Checked against the real hickle 1.1.0 and 2.1.0 under Python 2.7 and h5py 2.10 (docs/data.md)."""
    with h5py.File(path, 'r') as h5f:
        if 'CLASS' in h5f.attrs and 'VERSION' in h5f.attrs:
            raise AssertionError(f'{path}: hickle 2 would read this as its own layout, not ours')
        kind = h5f['type'][0]
        if kind != b'ndarray':
            raise AssertionError(f'{path}: hickle 1.x / 2.x would load a {kind!r}, not an ndarray')
        return h5f['data'][:]


def decode(batch, table):
    """Files whose colour each image of a (3, S, S, b) batch shows. The pixel is taken near the top
    right corner: there the EXIF test image shows EXIF_TOP only if it was turned upright."""
    rgb = batch[:, 1, S - 2, :].T.astype(int)                         # (b, 3)
    keys = list(table)
    colours = np.array([table[k][1] for k in keys])
    dist = np.abs(rgb[:, None, :] - colours[None]).max(axis=2)        # (b, files)
    assert dist.min(axis=1).max() <= 6, 'an image shows none of the expected colours'
    return [keys[i] for i in dist.argmin(axis=1)]


def listed(path):
    return [line.rsplit(' ', 1) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope='module')
def imagenet(tmp_path_factory):
    """An imagenet-layout tree with hostile and bad files, preprocessed with 1 worker (warnings as
    errors: a Pillow warning must not stop the run)."""
    root = tmp_path_factory.mktemp('imagenet')
    train, bad = make_train(root / 'raw', WNIDS)
    val = make_val_imagenet(root / 'raw')
    paths = write_paths(root / 'paths.yaml')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        # not ours: hickle 5.0.3 sets an array's dtype in place, deprecated from numpy 2.5 (the
        # numpy a CUDA machine may have; requirements.txt pins 2.4)
        warnings.filterwarnings('ignore', 'Setting the dtype', DeprecationWarning, r'hickle\.')
        run(paths)
    return root, train, val, bad


# ---------------------------------------------------------------------------------- tests
def test_writes_exactly_the_reference_files(imagenet):
    root, train, val, bad = imagenet
    out = root / 'out'
    n_train, n_val = len(train) // B, len(val) // B                   # 28 -> 7, 13 -> 3
    expected = {'dataset.yaml', 'misc/shuffled_train_filenames.npy', 'misc/img_mean.npy',
                'misc/bad_images.txt', 'misc/fingerprint.json', 'misc/train.txt', 'misc/val.txt',
                'misc/mean_total.npz'}
    for split, n in (('train', n_train), ('val', n_val)):
        expected |= {f'labels/{split}_labels{s}.npy' for s in ('', '_0', '_1')}
        expected |= {f'{split}_hkl_b4_b_4/{k:04d}.hkl' for k in range(n)}
        expected |= {f'{split}_hkl_b4_b_2/{k:04d}_{i}.hkl' for k in range(n) for i in (0, 1)}
    found = {str(p.relative_to(out)) for p in out.rglob('*') if p.is_file()}
    assert found == expected
    for f in out.rglob('*.hkl'):
        x = hickle.load(f)
        assert x.dtype == np.uint8 and x.shape == (3, S, S, 4 if f.parent.name.endswith('b_4') else 2)
    for split, n in (('train', n_train), ('val', n_val)):
        for s, length in (('', n * B), ('_0', n * B // 2), ('_1', n * B // 2)):
            y = np.load(out / 'labels' / f'{split}_labels{s}.npy')
            assert y.dtype == np.int64 and y.shape == (length,)
    mean = np.load(out / 'misc' / 'img_mean.npy')
    assert mean.dtype == np.float32 and mean.shape == (3, S, S)
    shuffled = np.load(out / 'misc' / 'shuffled_train_filenames.npy')
    assert shuffled.dtype.kind == 'U' and len(shuffled) == len(train) + len(bad)
    info = yaml.safe_load((out / 'dataset.yaml').read_text())
    assert info['num_classes'] == 3 and info['class_names'] == WNIDS and info['layout'] == 'imagenet'
    assert info['counts'] == {'train_images': 28, 'train_batches': 7, 'train_dropped': 0,
                              'val_images': 12, 'val_batches': 3, 'val_dropped': 1}
    assert info['bad_files'] == {'train': 3, 'val': 1}
    assert (info['img_size'], info['pad'], info['batch_size'], info['sub_batches']) == (S, 0, B, [1, 2])


def test_the_originals_hickle_reads_our_batch_files(imagenet):
    """Every batch file written (whole batches and halves) gives the original's reader (hickle
    1.x / 2.x, original_hickle_load) the array it gives hickle 5 and lib.data.read_hkl."""
    files = sorted((imagenet[0] / 'out').rglob('*.hkl'))
    assert len(files) == 30
    for f in files:
        ours = read_hkl(str(f))
        np.testing.assert_array_equal(original_hickle_load(f), ours)
        np.testing.assert_array_equal(hickle.load(f), ours)


def test_batch_files_the_originals_hickle_wrote_are_read(tmp_path):
    """The other way: the layouts hickle 1.x and 2.1.0 write an ndarray in (as seen in files the
    real ones wrote under Python 2.7) are read by lib.data.read_hkl, pixel for pixel."""
    x = np.random.RandomState(0).randint(0, 256, (3, S, S, 4)).astype(np.uint8)
    with h5py.File(tmp_path / 'v1.hkl', 'w') as f:  # hickle 1.x: the array and its kind
        f.create_dataset('data', data=x)
        f.create_dataset('type', data=np.array([b'ndarray']))
    with h5py.File(tmp_path / 'v2.hkl', 'w') as f:  # hickle 2.1.0: versioned, one node per object
        f.attrs.update({'CLASS': b'hickle', 'VERSION': 3, 'type': np.array([b'hickle'])})
        f.create_dataset('data_0', data=x).attrs['type'] = np.array([b'ndarray'])
    for name in ('v1.hkl', 'v2.hkl'):
        np.testing.assert_array_equal(read_hkl(str(tmp_path / name)), x)


def test_train_order_is_the_seed_1_shuffle(imagenet):
    root, train, _, bad = imagenet
    expected = np.array(sorted(list(train) + bad))
    np.random.RandomState(1).shuffle(expected)
    assert np.load(root / 'out' / 'misc' / 'shuffled_train_filenames.npy').tolist() == expected.tolist()
    txt = [f for f, _ in listed(root / 'out' / 'misc' / 'train.txt')]
    assert txt == [f for f in expected if f not in bad]


@pytest.mark.parametrize('split', ['train', 'val'])
def test_labels_follow_the_images(imagenet, split):
    """Decode each image back to its file (and class): lists, labels and halves must all agree.
    For val the labels come from the ground truth through the devkit (ids not in WNID order)."""
    root, train, val, _ = imagenet
    out, table = root / 'out', {'train': train, 'val': val}[split]
    files = [f for b in batches(out / f'{split}_hkl_b4_b_4') for f in decode(b, table)]
    lines = listed(out / 'misc' / f'{split}.txt')
    assert files == [f for f, _ in lines][:len(files)]
    assert [int(y) for _, y in lines] == [table[f][0] for f, _ in lines]
    labels = np.load(out / 'labels' / f'{split}_labels.npy')
    assert labels.tolist() == [table[f][0] for f in files]
    for i in (0, 1):
        half = [f for b in batches(out / f'{split}_hkl_b4_b_2', i) for f in decode(b, table)]
        assert half == [f for k in range(0, len(files), B) for f in files[k + 2 * i:k + 2 * i + 2]]
        assert np.load(out / 'labels' / f'{split}_labels_{i}.npy').tolist() == [table[f][0] for f in half]
    if split == 'val':
        assert files == sorted(files) and all('/' not in f for f in files)


def test_hostile_files_become_the_right_rgb(tmp_path):
    for name, write, rgb in hostile_files():
        write(tmp_path / name)
        img = load_rgb(tmp_path / name, S)
        assert img.shape == (S, S, 3) and img.dtype == np.uint8
        if name == 'rotated.jpg':                                   # turned upright: top / bottom
            assert np.abs(img[:4].astype(int) - EXIF_TOP).max() <= 6, name
            assert np.abs(img[-4:].astype(int) - EXIF_BOTTOM).max() <= 6, name
        else:
            assert np.abs(img.astype(int) - rgb).max() <= 3, (name, img[0, 0])


def test_batches_hold_the_images_pixel_for_pixel():
    """c01b: batch[c, row, col, i] is pixel (row, col) of image i, channel c (20 images: more
    than one block of the 16-image transposes)."""
    rng = np.random.RandomState(0)
    images = [rng.randint(0, 256, (S, S, 3)).astype(np.uint8) for _ in range(20)]
    batch = writer.to_c01b(images)
    assert batch.shape == (3, S, S, 20) and batch.dtype == np.uint8
    for i, img in enumerate(images):
        for c in range(3):
            np.testing.assert_array_equal(batch[c, :, :, i], img[:, :, c])


def test_the_progress_bar_counts_the_images_of_every_batch(monkeypatch):
    """On a terminal, parallel_map's bar counts `step` units per item: 3 batches of 4 images end
    at 12/12 img, 100 %; off a terminal (a log, a pipe) there is none."""
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    for stderr, workers in ((Terminal(), 1), (Terminal(), 2), (io.StringIO(), 1)):
        monkeypatch.setattr(sys, 'stderr', stderr)
        assert list(writer.parallel_map(abs, [-1, -2, -3], 3, workers, 'write train', step=4)) == [1, 2, 3]
        last = stderr.getvalue().split('\r')[-1]
        if stderr.isatty():
            assert last.startswith('write train: 100%|') and '| 12/12 [' in last and 'img/s]' in last, last
        else:
            assert last == '', last


def test_images_are_resized_bilinearly(tmp_path):
    """A 2x2 image, black left, gray 200 right, stretched to 4x4: bilinear interpolation between
    the pixel centres (at 1/4 and 3/4 of the way: 50 and 150), the edges repeated. Pillow's default
    (bicubic) would give 41, 159 and overshoot to 218."""
    Image.fromarray(np.array([[[0] * 3, [200] * 3]] * 2, np.uint8)).save(tmp_path / 'step.png')
    rgb = load_rgb(tmp_path / 'step.png', 4)
    assert rgb.shape == (4, 4, 3) and (rgb == np.array([0, 50, 150, 200])[None, :, None]).all(), rgb[..., 0]


@pytest.mark.parametrize('mode', ['I;16', 'I;16B', 'I'])
def test_16_bit_gray_is_scaled_not_clipped(mode):
    for value, gray in ((65535, 255), (32896, 128), (0, 0)):
        assert to_rgb(Image.new(mode, (2, 2), value)).getpixel((0, 0)) == (gray,) * 3


def test_bad_files_are_listed_and_skipped(imagenet):
    root, train, val, bad = imagenet
    lines = [line.split('\t') for line in (root / 'out' / 'misc' / 'bad_images.txt').read_text().splitlines()]
    assert sorted((s, f) for s, f, _ in lines) == sorted([('train', f) for f in bad] +
                                                         [('val', 'ILSVRC2012_val_00000005.JPEG')])
    assert all(reason for _, _, reason in lines)
    misc = root / 'out' / 'misc'
    names = [f for f, _ in listed(misc / 'train.txt') + listed(misc / 'val.txt')]
    assert not set(names) & set(bad + ['ILSVRC2012_val_00000005.JPEG'])
    assert sorted(names) == sorted(list(train) + list(val))


def test_mean_is_the_mean_of_the_training_batches(imagenet):
    out = imagenet[0] / 'out'
    images = np.concatenate(batches(out / 'train_hkl_b4_b_4'), axis=3)
    np.testing.assert_allclose(np.load(out / 'misc' / 'img_mean.npy'), images.mean(axis=3), atol=1e-4)


def test_output_is_byte_identical_with_two_workers(imagenet):
    root = imagenet[0]
    run(write_paths(root / 'paths_2.yaml', tar_root_dir='out2', tar_train_dir='out2/train_hkl',
                    tar_val_dir='out2/val_hkl', misc_dir='out2/misc', workers=2))
    one = {p.relative_to(root / 'out'): p.read_bytes() for p in (root / 'out').rglob('*') if p.is_file()}
    two = {p.relative_to(root / 'out2'): p.read_bytes() for p in (root / 'out2').rglob('*') if p.is_file()}
    assert one.keys() == two.keys()
    assert [k for k in one if one[k] != two[k]] == []


def test_resume_writes_only_what_is_missing(tmp_path):
    make_train(tmp_path / 'raw', WNIDS)
    make_val_imagenet(tmp_path / 'raw')
    paths = write_paths(tmp_path / 'paths.yaml')
    run(paths)
    out = tmp_path / 'out'
    before = {p: p.read_bytes() for p in out.rglob('*.hkl')}
    mean = np.load(out / 'misc' / 'img_mean.npy')
    deleted = [out / 'train_hkl_b4_b_4' / '0001.hkl', out / 'train_hkl_b4_b_2' / '0002_1.hkl',
               out / 'val_hkl_b4_b_4' / '0000.hkl']
    for p in deleted:
        p.unlink()
    stale = out / 'train_hkl_b4_b_4' / '.0003.hkl.tmp12345'          # left by a killed run
    stale.write_bytes(b'partial')
    old = 10 ** 18                                                    # a recognisable mtime
    for p in before:
        if p not in deleted:
            os.utime(p, ns=(old, old))
    run(paths, '--workers', '2')
    assert {p: p.read_bytes() for p in out.rglob('*.hkl')} == before  # recreated identical
    assert [p for p in before if p not in deleted and p.stat().st_mtime_ns != old] == []
    assert not stale.exists()
    np.testing.assert_array_equal(np.load(out / 'misc' / 'img_mean.npy'), mean)  # sums read back


def test_val_labels_follow_the_number_in_each_file_name_across_gaps(tmp_path):
    """ILSVRC2012_val_<N> takes line N of the ground truth wherever it lies in the sorted folder:
    with images 3 and 8 missing, image 4 still gets line 4 (by position it, and every image after
    a gap, would take the line of another image: neighbouring lines here are other classes)."""
    make_train(tmp_path / 'raw', WNIDS, hostile=False, bad=False)
    table = make_val_imagenet(tmp_path / 'raw', n=14, bad=())
    for k in (3, 8):
        name = f'ILSVRC2012_val_{k:08d}.JPEG'
        (tmp_path / 'raw' / 'val' / name).unlink()
        del table[name]
    run(write_paths(tmp_path / 'paths.yaml', sub_batches=[1]))
    out = tmp_path / 'out'
    files = [f for b in batches(out / 'val_hkl_b4_b_4') for f in decode(b, table)]
    assert len(files) == 12 and 'ILSVRC2012_val_00000004.JPEG' in files
    assert np.load(out / 'labels' / 'val_labels.npy').tolist() == [table[f][0] for f in files]
    assert [(f, int(y)) for f, y in listed(out / 'misc' / 'val.txt')] == [(f, table[f][0]) for f in files]


def test_a_rerun_after_an_input_image_was_removed_stops_and_changes_nothing(tmp_path, capsys):
    """The batches on disk were made from the images as they were: a rerun after an image left
    the train or the val folder stops with one line naming the fix, rather than writing labels
    (of the images now there) beside batches of the old images."""
    make_train(tmp_path / 'raw', WNIDS, hostile=False, bad=False)
    make_val_imagenet(tmp_path / 'raw', bad=())
    paths = write_paths(tmp_path / 'paths.yaml', sub_batches=[1])
    run(paths)
    out = tmp_path / 'out'
    before = {p: p.read_bytes() for p in out.rglob('*') if p.is_file()}
    for moved, message in (('train/n02000002/img3.jpeg', 'shuffled_train_filenames.npy does not list '
                                                         'the files now in the train folders'),
                           ('val/ILSVRC2012_val_00000002.JPEG', 'the valid input files differ from '
                                                               'those')):
        image = tmp_path / 'raw' / moved
        image.rename(tmp_path / 'aside')
        capsys.readouterr()
        assert make_data.main([str(paths)]) == 2
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and message in err and ('delete' in err), err
        assert {p: p.read_bytes() for p in out.rglob('*') if p.is_file()} == before
        (tmp_path / 'aside').rename(image)


def old_mean(folder):
    """img_mean.npy as the earlier make_data computed it: every batch's uint64 sum kept, then summed."""
    sums = [b.sum(axis=3, dtype=np.uint64) for b in batches(folder)]
    total = np.sum(sums, axis=0, dtype=np.uint64)
    return (total / (len(sums) * B)).astype(np.float32)


def count_reads(monkeypatch):
    """The batch files read back (workers=1: run_job runs in this process)."""
    reads = []
    real = writer.read_batch

    def read_batch(job):
        reads.append(int(os.path.basename(job.outputs[0][1][0])[:4]))
        return real(job)
    monkeypatch.setattr(writer, 'read_batch', read_batch)
    monkeypatch.setattr(hickle, 'load', None)  # finished batches are read with h5py only
    return reads


def test_mean_is_a_running_total_that_a_resume_continues(tmp_path, monkeypatch, capsys):
    """img_mean.npy is bit for bit the old per-batch-sums formula; a run stopped in phase 2 keeps
    the total of what it summed, and the resumed run reads back only the batches written but not
    summed; a complete rerun reads none; a total of other data is not used."""
    make_train(tmp_path / 'raw', WNIDS, hostile=False, bad=False)    # 18 images -> 4 batches
    make_val_imagenet(tmp_path / 'raw')
    paths = write_paths(tmp_path / 'paths.yaml', sub_batches=[2])   # parts only: read and joined
    out = tmp_path / 'out'
    real_add = mean.MeanTotal.add

    def add(self, k, batch_sum):
        if k == 2:
            raise KeyboardInterrupt  # as Ctrl-C after batch 2 was written, before it was summed
        real_add(self, k, batch_sum)
    monkeypatch.setattr(mean.MeanTotal, 'add', add)
    assert make_data.main([str(paths)]) == 130
    monkeypatch.setattr(mean.MeanTotal, 'add', real_add)
    def train_batches():  # whole batches joined from their halves
        return [np.concatenate(p, axis=3) for p in zip(*[batches(out / 'train_hkl_b4_b_2', i)
                                                        for i in (0, 1)])]
    with np.load(out / 'misc' / 'mean_total.npz') as saved:
        assert saved['included'].tolist() == [True, True, False, False]
        done = train_batches()
        assert len(done) == 3  # batch 2 was written, not summed
        assert np.array_equal(saved['total'], done[0].sum(axis=3, dtype=np.uint64)
                              + done[1].sum(axis=3, dtype=np.uint64))
    assert not (out / 'misc' / 'img_mean.npy').exists()
    with monkeypatch.context() as m:
        reads = count_reads(m)
        run(paths)
    assert reads == [2]
    sums = [b.sum(axis=3, dtype=np.uint64) for b in train_batches()]    # the old formula
    expected = (np.sum(sums, axis=0, dtype=np.uint64) / (4 * B)).astype(np.float32)
    mean_bytes = (out / 'misc' / 'img_mean.npy').read_bytes()
    assert np.load(out / 'misc' / 'img_mean.npy').tobytes() == expected.tobytes()
    reads = count_reads(monkeypatch)
    run(paths)                                                        # complete: nothing to read
    assert reads == [] and (out / 'misc' / 'img_mean.npy').read_bytes() == mean_bytes
    # a total saved for other settings or files is not used: every batch is read back
    total = out / 'misc' / 'mean_total.npz'
    with np.load(total) as saved:
        arrays = {k: saved[k] for k in saved.files}
    with open(total, 'wb') as f:
        np.savez(f, **dict(arrays, key=np.array('another run')))
    capsys.readouterr()
    run(paths)
    assert reads == [0, 1, 2, 3] and 'is not from this run' in capsys.readouterr().err
    assert (out / 'misc' / 'img_mean.npy').read_bytes() == mean_bytes


def test_mean_matches_the_old_formula_bit_for_bit(imagenet):
    out = imagenet[0] / 'out'
    assert np.load(out / 'misc' / 'img_mean.npy').tobytes() == old_mean(out / 'train_hkl_b4_b_4').tobytes()


def test_resume_never_unpickles_a_batch_file(tmp_path, capsys):
    """A finished batch that must be read back is read with h5py: a hickle file holding a pickle
    is a one-line error naming it, and is never unpickled."""
    make_train(tmp_path / 'raw', WNIDS, hostile=False, bad=False)
    make_val_imagenet(tmp_path / 'raw')
    paths = write_paths(tmp_path / 'paths.yaml', sub_batches=[1])
    run(paths)
    out, marker = tmp_path / 'out', tmp_path / 'unpickled'
    (out / 'misc' / 'mean_total.npz').unlink()                        # the sums must be read back

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), 'w'))
    evil = out / 'train_hkl_b4_b_4' / '0001.hkl'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')                               # hickle: "data is serialized"
        with h5py.File(evil, 'w') as f:
            hickle.dump(Evil(), f)
    capsys.readouterr()
    assert make_data.main([str(paths)]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith(f'error: {evil}: expected one 4-D array'), err
    assert 'delete it and run again' in err and not marker.exists()


def test_one_copy_by_default_and_halves_added_by_a_rerun(tmp_path, capsys):
    """sub_batches defaults to [1]: whole batches only (train_2gpu.py takes halves of them); a rerun
    with sub_batches [1, 2] over them adds the halves and their labels, touching nothing else, and
    says it took the first run's check of the (same) input files instead of checking them again."""
    make_train(tmp_path / 'raw', WNIDS, hostile=False, bad=False)
    make_val_imagenet(tmp_path / 'raw')
    paths = write_paths(tmp_path / 'paths.yaml')
    settings = yaml.safe_load(paths.read_text())
    del settings['sub_batches']
    paths.write_text(yaml.safe_dump(settings))
    run(paths)
    out = tmp_path / 'out'
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ['labels', 'misc', 'train_hkl_b4_b_4',
                                                                  'val_hkl_b4_b_4']
    assert sorted(os.listdir(out / 'labels')) == ['train_labels.npy', 'val_labels.npy']
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob('*.hkl')}
    mean = (out / 'misc' / 'img_mean.npy').read_bytes()
    first = capsys.readouterr().out
    assert ': checked 32 files at ' in first  # 18 train, 14 val
    assert f"\nlabels: {out / 'labels'}   mean, lists: {out / 'misc'}   summary: {out / 'dataset.yaml'}\n" in first
    run(write_paths(tmp_path / 'paths.yaml', sub_batches=[1, 2]))
    assert ': reused the file check of the previous run; ' in capsys.readouterr().out
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in before} == before
    assert (out / 'misc' / 'img_mean.npy').read_bytes() == mean
    for split in ('train', 'val'):
        whole = batches(out / f'{split}_hkl_b4_b_4')
        for i in (0, 1):
            assert [h.tobytes() for h in batches(out / f'{split}_hkl_b4_b_2', i)] == \
                [w[..., 2 * i:2 * i + 2].tobytes() for w in whole]
            y = np.load(out / 'labels' / f'{split}_labels.npy').reshape(-1, 2, 2)[:, i].ravel()
            assert np.load(out / 'labels' / f'{split}_labels_{i}.npy').tolist() == y.tolist()


def test_folders_layout_and_other_sub_batches(tmp_path):
    classes = ['cat', 'dog', 'frog']
    train, _ = make_train(tmp_path / 'raw', classes, hostile=False, bad=False)   # 18 -> 4 batches
    val = make_val_folders(tmp_path / 'raw', classes)                          # 15 + 1 bad -> 3
    paths = write_paths(tmp_path / 'paths.yaml', layout='auto', meta_clsloc_mat=None,
                        val_label_file=None, sub_batches=[2, 4])
    run(paths)
    out = tmp_path / 'out'
    info = yaml.safe_load((out / 'dataset.yaml').read_text())
    assert info['layout'] == 'folders' and info['class_names'] == classes
    quarters = [f'{k:04d}_{i}.hkl' for k in range(4) for i in range(4)]
    assert sorted(os.listdir(out / 'train_hkl_b4_b_1')) == quarters
    assert not (out / 'train_hkl_b4_b_4').exists()
    lines = listed(out / 'misc' / 'val.txt')
    assert [f for f, _ in lines] == sorted(val)
    assert [int(y) for _, y in lines] == [val[f][0] for f in sorted(val)]
    for split, table, n in (('train', train, 4), ('val', val, 3)):
        files = [f for b in batches(out / f'{split}_hkl_b4_b_2', 0) for f in decode(b, table)]
        assert len(files) == 2 * n
        y = np.load(out / 'labels' / f'{split}_labels.npy')
        assert y.shape == (n * B,)
        assert np.load(out / 'labels' / f'{split}_labels_0.npy').tolist() == [table[f][0] for f in files]
    # the halves' labels and no others: nothing reads labels of quarters (rows of train_labels.npy)
    assert sorted(os.listdir(out / 'labels')) == [f'{s}_labels{i}.npy' for s in ('train', 'val')
                                                  for i in ('', '_0', '_1')]
    images = np.concatenate([np.concatenate(p, axis=3) for p in
                             zip(*[batches(out / 'train_hkl_b4_b_2', i) for i in (0, 1)])], axis=3)
    np.testing.assert_allclose(np.load(out / 'misc' / 'img_mean.npy'), images.mean(axis=3), atol=1e-4)


def one_line_error(proc, *names):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and 'Traceback' not in proc.stderr, proc.stderr
    for name in names:
        assert name in lines[0]


def test_sh_errors_are_one_line(tmp_path):
    """Run from another directory, through the shell script, as a user would."""
    cwd = tmp_path / 'elsewhere'
    cwd.mkdir()
    # an empty class folder
    make_train(tmp_path / 'a' / 'raw', WNIDS, hostile=False, bad=False)
    make_val_imagenet(tmp_path / 'a' / 'raw')
    empty = tmp_path / 'a' / 'raw' / 'train' / 'n09999999'
    empty.mkdir()
    one_line_error(run_sh('generate_data.sh', str(write_paths(tmp_path / 'a' / 'paths.yaml')), cwd=cwd),
                   str(empty))
    # every file unreadable
    root = tmp_path / 'b' / 'raw'
    for name in WNIDS:
        (root / 'train' / name).mkdir(parents=True)
        for fname, write in BAD_FILES:
            write(root / 'train' / name / fname)
    make_val_imagenet(root)
    one_line_error(run_sh('generate_data.sh', str(write_paths(tmp_path / 'b' / 'paths.yaml')), cwd=cwd),
                   str(root / 'train'), 'bad_images.txt')
    # a val ground-truth id that the devkit does not know
    make_train(tmp_path / 'c' / 'raw', WNIDS, hostile=False, bad=False)
    make_val_imagenet(tmp_path / 'c' / 'raw')
    gt = tmp_path / 'c' / 'raw' / 'devkit' / 'gt.txt'
    gt.write_text(gt.read_text().replace('4\n', '17\n', 1))
    one_line_error(run_sh('generate_data.sh', str(write_paths(tmp_path / 'c' / 'paths.yaml')), cwd=cwd),
                   'ILSVRC id 17', str(gt))
    # an unknown key in the paths file (relative to the current directory)
    bad_key = write_paths(cwd / 'cfg' / 'paths.yaml', batchsize=4)
    one_line_error(run_sh('generate_data.sh', 'cfg/paths.yaml', cwd=cwd), str(bad_key), "'batchsize'",
                   "'batch_size'")


def test_in_process_errors_are_one_line(tmp_path, capsys):
    def fails(paths, *names):
        capsys.readouterr()
        assert make_data.main([str(paths)]) == 2
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and err.startswith('error: ') and all(n in err for n in names), err

    classes = ['cat', 'dog']
    make_train(tmp_path / 'raw', classes, hostile=False, bad=False)
    make_val_folders(tmp_path / 'raw', classes)
    folders = dict(layout='folders', meta_clsloc_mat=None, val_label_file=None)
    paths = write_paths(tmp_path / 'paths.yaml', **folders)
    (tmp_path / 'raw' / 'val' / 'cow').mkdir()
    fails(paths, str(tmp_path / 'raw' / 'val' / 'cow'))                  # val class not in train
    (tmp_path / 'raw' / 'val' / 'cow').rmdir()
    fails(write_paths(tmp_path / 'p.yaml', sub_batches=[1, 3], **folders), 'sub_batches')
    fails(write_paths(tmp_path / 'p.yaml', layout='imagenet'), 'meta_clsloc.mat')  # no devkit
    fails(write_paths(tmp_path / 'p.yaml', layout='imagenet', meta_clsloc_mat=None, val_label_file=None),
          'error: the imagenet layouts need devkit (or meta_clsloc_mat and val_label_file) in the '
          'paths file\n')
    run(paths)
    fails(write_paths(tmp_path / 'p.yaml', img_size=8, **folders), 'img_size=16, now 8', 'delete')
    solid(tmp_path / 'raw' / 'train' / 'cat' / 'new.jpg', (1, 2, 3))   # the shuffled list is stale
    fails(paths, 'shuffled_train_filenames.npy', 'delete')


def test_a_flat_val_folder_without_images_is_named_with_what_it_holds(tmp_path, capsys):
    """layout imagenet reads the val images directly in val_img_dir: one that holds class folders
    instead is named with the layout that reads those, an empty one alone; nothing is written."""
    make_train(tmp_path / 'raw', WNIDS, per_class=2, hostile=False, bad=False)
    make_val_imagenet(tmp_path / 'raw', n=4, bad=())
    val = tmp_path / 'raw' / 'val'
    (val / WNIDS[0]).mkdir()
    for f in val.glob('*.JPEG'):
        f.rename(val / WNIDS[0] / f.name)
    paths = write_paths(tmp_path / 'paths.yaml')
    for hint in (' (class folders need layout: folders)', ''):
        assert make_data.main([str(paths)]) == 2
        assert capsys.readouterr().err == f'error: no images (.jpg/.jpeg/.png) directly in {val}{hint}\n'
        assert not (tmp_path / 'out' / 'train_hkl_b4_b_1').exists()
        shutil.rmtree(val / WNIDS[0], ignore_errors=True)  # then: an empty folder


def pid_after_a_nap(i):
    import time
    time.sleep(0.2)
    return i, os.getpid()


def test_parallel_map_runs_in_as_many_processes_as_workers_and_keeps_the_order():
    """`workers: N` in the paths file: N processes decode and write, results in input order."""
    out = list(writer.parallel_map(pid_after_a_nap, range(9), 9, 3, 'test'))
    assert [i for i, _ in out] == list(range(9))
    assert len({pid for _, pid in out}) == 3 and os.getpid() not in {pid for _, pid in out}
    assert list(writer.parallel_map(pid_after_a_nap, range(3), 3, 1, 'test')) == \
        [(i, os.getpid()) for i in range(3)]


def test_outputs_are_checked_before_any_input_is_read(tmp_path, monkeypatch, capsys):
    """Outputs that cannot be written or that clash are refused at once (on ImageNet listing or
    indexing the inputs takes minutes), each in one line naming the path."""
    def not_yet(cfg, workers=1):
        raise AssertionError('inputs listed before the outputs were checked')
    monkeypatch.setattr(make_data, 'list_dataset', not_yet)
    (tmp_path / 'a_file').write_text('')
    for settings, names in [
            (dict(misc_dir='a_file/misc'), [str(tmp_path / 'a_file' / 'misc'), 'is a file']),
            (dict(tar_val_dir='out/train_hkl'), ['tar_train_dir', 'tar_val_dir']),
            (dict(valtxt_filename='out/list.txt', traintxt_filename='out/list.txt'), ['valtxt_filename']),
            (dict(tar_root_dir='raw/train/out'), [str(tmp_path / 'raw' / 'train' / 'out'), 'train_img_dir']),
            (dict(misc_dir='raw/val/misc'), ['val_img_dir']),
            (dict(traintxt_filename='raw'), [str(tmp_path / 'raw'), 'traintxt_filename'])]:
        (tmp_path / 'raw' / 'train').mkdir(parents=True, exist_ok=True)
        (tmp_path / 'raw' / 'val').mkdir(exist_ok=True)
        assert make_data.main([str(write_paths(tmp_path / 'paths.yaml', **settings))]) == 2, settings
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and err.startswith('error: ') and all(n in err for n in names), err


@pytest.mark.parametrize('key, settings', [
    ('devkit', dict(devkit='raw/devkit_tpo', meta_clsloc_mat=None, val_label_file=None, layout='auto')),
    ('meta_clsloc_mat', dict(meta_clsloc_mat='raw/devkit/meta.mat', layout='auto')),
    ('val_label_file', dict(val_label_file='raw/devkit/gt_.txt')),
    ('train_img_dir', dict(train_img_dir='raw/ILSVRC2012_img_trian.tar', layout='auto')),
    ('val_img_dir', dict(val_img_dir='raw/vla', layout='folders'))])
def test_an_input_path_that_does_not_exist_is_named_before_anything_is_listed(tmp_path, monkeypatch,
                                                                               capsys, key, settings):
    """A typo in an input path (extracted folders, a flat val, a misspelt devkit) is one line naming
    the key and the path, before `auto` picks a layout (it took `folders` and blamed the val folder)."""
    def not_yet(*args, **kwargs):
        raise AssertionError('listed before the input paths were checked')
    make_train(tmp_path / 'raw', WNIDS, per_class=2, hostile=False, bad=False)
    make_val_imagenet(tmp_path / 'raw', n=4, bad=())
    for name in ('subfolders', 'image_files', 'resolve_layout'):
        monkeypatch.setattr(layouts, name, not_yet)
    assert make_data.main([str(write_paths(tmp_path / 'paths.yaml', **settings))]) == 2
    err = capsys.readouterr().err
    path = os.path.normpath(tmp_path / settings[key])
    assert err.startswith(f'error: {key} {path} does not exist; correct it in the paths file') \
        and err.count('\n') == 1, err


def test_a_note_names_outputs_outside_both_the_clone_and_the_paths_files_folder(tmp_path, capsys):
    """Relative paths follow the paths file: a copy of preprocessing/paths.yaml in the repo root
    writes to ../data, outside the clone. One line at start says where, once; outputs in the clone
    or in the paths file's own folder get none, wherever the paths file is."""
    from preprocessing.paths import load_paths
    shipped = REPO / 'preprocessing' / 'paths.yaml'
    cfg = load_paths(shipped)
    assert make_data.outside_note(shipped, cfg) is None                      # ../data: in the clone
    outputs = {k: v for k, v in cfg.items() if k in make_data.OUTPUT_KEYS}   # absolute, in the clone
    assert make_data.outside_note(tmp_path / 'x' / 'paths.yaml', outputs) is None
    copied = {k: os.path.normpath(v.replace(str(REPO / 'data'), str(REPO.parent / 'data')))
              for k, v in outputs.items()}                                    # as a copy in the root gives
    note = make_data.outside_note(REPO / 'paths.yaml', copied)
    assert note.startswith(f"note: the outputs go to {REPO.parent / 'data' / 'imagenet'}, outside ")
    assert note.count(str(REPO.parent / 'data')) == 1 and f'outside the clone {REPO} (' in note
    # a run: the note once, first, and the run goes on
    classes = ['cat', 'dog']
    make_train(tmp_path / 'raw', classes, hostile=False, bad=False)
    make_val_folders(tmp_path / 'raw', classes)
    out = dict(tar_root_dir='../out', tar_train_dir='../out/train_hkl', tar_val_dir='../out/val_hkl',
               misc_dir='../out/misc', train_img_dir='../raw/train', val_img_dir='../raw/val')
    run(write_paths(tmp_path / 'cfg' / 'paths.yaml', layout='folders', meta_clsloc_mat=None,
                    val_label_file=None, sub_batches=[1], **out))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith('note: ') and str(tmp_path / 'out') in lines[0] \
        and f"the clone {REPO} and the paths file's folder {tmp_path / 'cfg'}" in lines[0]
    assert sum(line.startswith('note: ') for line in lines) == 1
    run(write_paths(tmp_path / 'paths.yaml', layout='folders', meta_clsloc_mat=None, val_label_file=None,
                    sub_batches=[1]))
    assert 'note: ' not in capsys.readouterr().out


def test_more_val_than_train_batches_and_the_mean_of_the_train_batches_alone(tmp_path):
    """A dataset with more val batches than train batches (1 and 2 here) is written whole, and
    the mean image is that of the training batch alone."""
    classes = ['cat', 'dog']
    make_train(tmp_path / 'raw', classes, per_class=2, hostile=False, bad=False)
    make_val_folders(tmp_path / 'raw', classes)
    run(write_paths(tmp_path / 'paths.yaml', layout='folders', meta_clsloc_mat=None, val_label_file=None,
                    sub_batches=[1]))
    out = tmp_path / 'out'
    train, val = batches(out / 'train_hkl_b4_b_4'), batches(out / 'val_hkl_b4_b_4')
    assert (len(train), len(val)) == (1, 2)
    want = (train[0].sum(axis=3, dtype=np.uint64) / B).astype(np.float32)
    assert np.load(out / 'misc' / 'img_mean.npy').tobytes() == want.tobytes()


def test_the_closing_summary_gives_the_rate_of_each_phase(capsys):
    """The first line of the summary: phase 1's checks per second over its own time, the images
    written per second over the rest."""
    counts = dict(train_batches=7, train_images=28, train_dropped=0, val_batches=3, val_images=12,
                  val_dropped=1)
    make_data.print_summary({'counts': counts, 'bad_files': {'train': 0, 'val': 0}},
                            {'misc_dir': 'm', 'tar_root_dir': 'r'}, ['b'], 'l',
                            dict(workers=2, checked=40, phase_1_s=2.0, written=40, total_s=10.0))
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [
        'done in 10.0 s with 2 worker(s): checked 40 files at 20/s; wrote 40 images at 5/s; 4 images/s overall',
        'train: 7 batches = 28 images (0 dropped to make whole batches, 0 unreadable)',
        'val: 3 batches = 12 images (1 dropped to make whole batches, 0 unreadable)']


def test_ground_truth_shorter_than_val_set(tmp_path, capsys):
    make_train(tmp_path / 'raw', WNIDS, hostile=False, bad=False)
    make_val_imagenet(tmp_path / 'raw')
    gt = tmp_path / 'raw' / 'devkit' / 'gt.txt'
    gt.write_text('\n'.join(gt.read_text().split()[:10]))
    assert make_data.main([str(write_paths(tmp_path / 'paths.yaml'))]) == 2
    assert str(gt) in capsys.readouterr().err


def test_toy_script_writes_10_batches(tmp_path):
    classes = ['a', 'b', 'c']
    make_train(tmp_path / 'raw', classes, per_class=15, hostile=False, bad=False)   # 45
    make_val_folders(tmp_path / 'raw', classes, per_class=14)                       # 42
    write_paths(tmp_path / 'cfg' / 'paths.yaml', layout='folders', meta_clsloc_mat=None,
                val_label_file=None, train_img_dir='../raw/train', val_img_dir='../raw/val',
                tar_root_dir='../out', tar_train_dir='../out/train_hkl', tar_val_dir='../out/val_hkl',
                misc_dir='../out/misc', workers=2)
    proc = run_sh('generate_toy_data.sh', 'cfg/paths.yaml', cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / 'out'
    for split in ('train', 'val'):
        assert sorted(os.listdir(out / f'{split}_hkl_b4_b_4')) == [f'{k:04d}.hkl' for k in range(10)]
        assert len(os.listdir(out / f'{split}_hkl_b4_b_2')) == 20
        assert np.load(out / 'labels' / f'{split}_labels.npy').shape == (40,)
        assert len(listed(out / 'misc' / f'{split}.txt')) == 40
    # a full run over the toy outputs must not mix them
    one_line_error(run_sh('generate_data.sh', 'cfg/paths.yaml', cwd=tmp_path), 'toy=True')


def test_demo_data(tmp_path):
    make_demo_data.main([str(tmp_path / 'raw')])
    count = {s: len(list((tmp_path / 'raw' / s).rglob('*.png'))) for s in ('train', 'val')}
    assert count == {'train': 1498, 'val': 299}
    assert sorted(os.listdir(tmp_path / 'raw' / 'val')) == [str(d) for d in range(10)]
    from sklearn.datasets import load_digits
    digit = load_digits().images[0]                                 # a 0, values 0..16
    png = np.asarray(Image.open(tmp_path / 'raw' / 'train' / '0' / '0000.png'))
    assert png.shape == (8, 8) and png.dtype == np.uint8 and png.max() >= 200  # 0..16 -> 0..255
    assert np.abs(png / 255 * 16 - digit).max() <= 16 / 255 / 2 + 1e-9, png
    assert make_demo_data.make_demo_data(tmp_path / 'raw') == 0                  # already complete
    paths = write_paths(tmp_path / 'paths.yaml', layout='folders', meta_clsloc_mat=None,
                        val_label_file=None, img_size=8, batch_size=32, sub_batches=[1], workers=2)
    run(paths)
    info = yaml.safe_load((tmp_path / 'out' / 'dataset.yaml').read_text())
    assert info['counts']['train_batches'] == 46 and info['counts']['val_batches'] == 9
    lines = listed(tmp_path / 'out' / 'misc' / 'train.txt')
    assert all(f.split('/')[0] == y for f, y in lines)


@pytest.mark.parametrize('name', ['paths.yaml', 'demo_paths.yaml', 'cifar10_paths.yaml',
                                  'cifar10_pad4_paths.yaml'])
def test_shipped_paths_files(name):
    from preprocessing.paths import load_paths
    path = REPO / 'preprocessing' / name
    cfg = load_paths(path)
    lines = path.read_text().splitlines()
    keys = [line.split(':')[0] for line in lines if line and not line.startswith('#')]
    assert sorted(keys) == sorted(KEYS)
    assert not any(line.split(':', 1)[1].strip().startswith('/') for line in lines if line and line[0] != '#')
    assert cfg['train_img_dir'].startswith(str(REPO / 'data'))                # relative to the file
    if name == 'paths.yaml':                                                     # every key commented
        assert all(lines[i - 1].startswith('#') for i, line in enumerate(lines) if line and line[0] != '#')


@pytest.mark.parametrize('settings, message', [
    (dict(misc_dir=None), "config key 'misc_dir' in {p} must be a path, got None"),
    (dict(batchsize=4), "unknown config key 'batchsize' in {p}; did you mean 'batch_size'?"),
    (dict(workers='all'), "config key 'workers' in {p} must be int or null, got 'all'"),
    (dict(workers=0), "config key 'workers' in {p} must be at least 1, got 0"),
    (dict(img_size=0), "config key 'img_size' in {p} must be at least 1, got 0"),
    (dict(layout='flat'), "config key 'layout' in {p} must be one of imagenet, imagenet_tar, folders, "
                          "cifar10_bin, cifar100_bin, auto, got 'flat'"),
    (dict(cifar100_labels='both'), "config key 'cifar100_labels' in {p} must be one of fine, coarse, "
                                   "got 'both'"),
    (dict(sub_batches=[2, 2]), "config key 'sub_batches' in {p} must be a list of distinct positive "
                               "integers, got [2, 2]"),
    (dict(train_img_dir=3), "config key 'train_img_dir' in {p} must be a path, got 3"),
])
def test_a_bad_paths_file_is_a_prep_error_naming_the_file_and_key(tmp_path, settings, message):
    from preprocessing import PrepError
    from preprocessing.paths import load_paths
    p = write_paths(tmp_path / 'paths.yaml', **settings)
    with pytest.raises(PrepError) as e:
        load_paths(p)
    assert str(e.value) == message.format(p=p)


def test_a_paths_file_without_a_required_key_names_them(tmp_path):
    from preprocessing import PrepError
    from preprocessing.paths import load_paths
    p = tmp_path / 'paths.yaml'
    p.write_text('train_img_dir: raw/train\nval_img_dir: raw/val\ntar_root_dir: out\n')
    with pytest.raises(PrepError, match=f'^{p}: missing config key[(]s[)] tar_train_dir, tar_val_dir, '
                                        'misc_dir$'):
        load_paths(p)


def test_a_paths_file_that_is_missing_not_yaml_or_not_a_mapping_is_a_prep_error_naming_it(tmp_path):
    """Before any key is looked at: the file itself, named as the paths file it is, as the
    preprocessing error every caller of load_paths catches."""
    from preprocessing import PrepError
    from preprocessing.paths import load_paths
    p = tmp_path / 'paths.yaml'
    for text, message in ((None, f'cannot read paths file {p}: No such file or directory'),
                          ('img_size: [16\n', f'{p} is not valid YAML: while parsing a flow sequence'),
                          ('- img_size\n', f'{p} must hold a mapping of key: value')):
        if text is not None:
            p.write_text(text)
        with pytest.raises(PrepError) as e:
            load_paths(p)
        assert type(e.value) is PrepError and str(e.value) == message


@pytest.mark.parametrize('layout', ['imagenet', 'folders'])
def test_train_py_trains_on_what_preprocessing_wrote(tmp_path, layout):
    """The whole path: raw tree -> generate_data.sh -> train.py (CPU), for both layouts."""
    classes = WNIDS if layout == 'imagenet' else ['cat', 'dog', 'frog']
    make_train(tmp_path / 'raw', classes)
    if layout == 'imagenet':
        make_val_imagenet(tmp_path / 'raw')
        paths = write_paths(tmp_path / 'paths.yaml')
    else:
        make_val_folders(tmp_path / 'raw', classes)
        paths = write_paths(tmp_path / 'paths.yaml', layout='folders', meta_clsloc_mat=None,
                            val_label_file=None)
    assert run_sh('generate_data.sh', str(paths), cwd=tmp_path).returncode == 0
    out = tmp_path / 'out'
    where = ([f'data={out}'] if layout == 'folders' else  # data=: the folder preprocessing wrote
             [f'batch_size={B}', f'train_folder={out}/train_hkl_b{B}_b_{B}',
              f'val_folder={out}/val_hkl_b{B}_b_{B}', f'label_folder={out}/labels',
              f'mean_file={out}/misc/img_mean.npy'])
    r = subprocess.run(
        [sys.executable, str(REPO / 'train.py'), 'model=alexnet_cifar', f'crop_size={S - 2}',
         'gpu=cpu', 'n_epochs=2', 'print_freq=1', f'weights_dir={tmp_path / "w"}'] + where,
        capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert '3 classes' in r.stdout and 'done: epoch 2' in r.stdout
    assert np.load(tmp_path / 'w' / 'val_record.npy').shape == (2, 2)


def test_pad_frames_every_image_in_black(tmp_path, capsys):
    """pad: P resizes to S - 2P and frames in P black pixels; the centre crop of S - 2P is the
    unpadded image; dataset.yaml records pad (serve.py reads it); bad values are one-line errors."""
    classes = ['cat', 'dog']
    train, _ = make_train(tmp_path / 'raw', classes, hostile=False, bad=False)
    make_val_folders(tmp_path / 'raw', classes)
    folders = dict(layout='folders', meta_clsloc_mat=None, val_label_file=None, sub_batches=[1])
    run(write_paths(tmp_path / 'paths.yaml', pad=3, **folders))
    out = tmp_path / 'out'
    assert yaml.safe_load((out / 'dataset.yaml').read_text())['pad'] == 3
    for batch in batches(out / f'train_hkl_b{B}_b_{B}'):
        assert batch.shape[:3] == (3, S, S)
        inner = np.zeros(batch.shape, bool)
        inner[:, 3:S - 3, 3:S - 3] = True
        assert not batch[~inner].any()                                   # the frame is black
        assert batch[inner].min() >= 20                                  # the image fills the rest
    some = tmp_path / 'raw' / 'train' / next(iter(train))
    framed, plain = load_rgb(some, S, pad=3), load_rgb(some, S - 6)
    assert framed.shape == (S, S, 3) and np.array_equal(framed[3:-3, 3:-3], plain)
    for bad in (-1, 8, 1.5, True):  # 2 * 8 >= S = 16
        p = write_paths(tmp_path / 'bad' / 'paths.yaml', pad=bad, **folders)
        capsys.readouterr()
        assert make_data.main([str(p)]) == 2
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and err.startswith(f"error: config key 'pad' in {p} must be"), err
