"""Preprocessing straight from the official archives: ImageNet's train tar of class tars, val tar and
devkit archives (preprocessing/archives.py, devkit.py), and the CIFAR binary versions (cifar.py).

The ImageNet archives are made from a generated tree with hostile files (tests/test_preprocessing.py),
tarred as image-net.org ships it; the same tree, as its extraction gives it, is the reference that
every output must match byte for byte.
"""
import io
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import scipy.io
import yaml
from PIL import Image

from preprocessing import archives, devkit, make_data, writer
from preprocessing.paths import KEYS, load_paths
from tests.test_preprocessing import (REPO, WNIDS, batches, decode, listed, make_train, make_val_imagenet,
                                      one_line_error, run, run_sh, solid, write_paths)

# devkit synsets as (ILSVRC id, WNID, words): the 2014 and 2012 devkits number the classes differently
WORDS = {'n01000001': 'tench, Tinca tinca', 'n02000002': 'goldfish, Carassius auratus',
         'n03000003': 'great white shark', 'n04000004': 'tiger shark, Galeocerdo cuvieri'}
ORDER_2014 = ['n03000003', 'n01000001', 'n04000004', 'n02000002']   # as tests/test_preprocessing.py
ORDER_2012 = ['n02000002', 'n04000004', 'n03000003', 'n01000001']
SAME = ['labels', 'train_hkl_b4_b_4', 'train_hkl_b4_b_2', 'val_hkl_b4_b_4', 'val_hkl_b4_b_2']
MISC = ['shuffled_train_filenames.npy', 'img_mean.npy', 'bad_images.txt', 'train.txt', 'val.txt']


# ---------------------------------------------------------------------------------- ImageNet archives
def synsets_mat(order):
    rows = [(i + 1, w, WORDS[w]) for i, w in enumerate(order)]
    arr = np.array(rows, dtype=[('ILSVRC2014_ID', 'O'), ('WNID', 'O'), ('words', 'O')])
    buf = io.BytesIO()
    scipy.io.savemat(buf, {'synsets': arr})
    return buf.getvalue()


def devkit_files(root, order=ORDER_2014):
    """Ground truth (ILSVRC ids of the val images in `root`/val, numbered as in `order`) + synsets."""
    wnid_of_2014 = dict(enumerate(ORDER_2014, 1))
    gt_2014 = [int(x) for x in (root / 'devkit' / 'gt.txt').read_text().split()]
    gt = [order.index(wnid_of_2014[i]) + 1 for i in gt_2014]
    return synsets_mat(order), ''.join(f'{i}\n' for i in gt).encode()


def add_bytes(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_devkit_archive(path, version, raw):
    top = {'2014': 'ILSVRC2014_devkit', '2012': 'ILSVRC2012_devkit_t12'}[version]
    mat, gt = devkit_files(raw, ORDER_2014 if version == '2014' else ORDER_2012)
    names = {'2014': ('meta_clsloc.mat', 'ILSVRC2014_clsloc_validation_ground_truth.txt'),
             '2012': ('meta.mat', 'ILSVRC2012_validation_ground_truth.txt')}[version]
    with tarfile.open(path, 'w:gz') as tar:
        add_bytes(tar, f'{top}/readme.txt', b'the devkit\n')
        add_bytes(tar, f'{top}/data/{names[0]}', mat)
        add_bytes(tar, f'{top}/data/{names[1]}', gt)
    return path


def tar_train(train_dir, path):
    """ILSVRC2012_img_train.tar as shipped: <wnid>.tar per class folder, holding its files flat (and,
    here, whatever else the folder holds: a text file, a subfolder), plus a stray top-level file."""
    with tarfile.open(path, 'w', format=tarfile.GNU_FORMAT) as outer:
        for wnid in sorted(os.listdir(train_dir)):
            folder = train_dir / wnid
            if not folder.is_dir():
                outer.add(folder, arcname=wnid)
                continue
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode='w', format=tarfile.GNU_FORMAT) as inner:
                for k, name in enumerate(sorted(os.listdir(folder))):
                    inner.add(folder / name, arcname=('./' if k % 3 == 0 else '') + name)  # both spellings
            add_bytes(outer, f'{wnid}.tar', buf.getvalue())
    return path


def tar_flat(folder, path):
    with tarfile.open(path, 'w') as tar:
        for name in sorted(os.listdir(folder)):
            tar.add(folder / name, arcname=name)
    return path


@pytest.fixture(scope='module')
def imagenet_pair(tmp_path_factory):
    """The extracted tree (hostile files, a subfolder in a class folder, a stray file beside the class
    folders) and its archives; returns (root, train table, val table)."""
    root = tmp_path_factory.mktemp('archives')
    raw = root / 'raw'
    train, _ = make_train(raw, WNIDS)
    val = make_val_imagenet(raw)
    sub = raw / 'train' / WNIDS[0] / 'subfolder'                    # extraction makes it; not listed
    sub.mkdir()
    solid(sub / 'deeper.jpg', (5, 5, 5))
    (raw / 'train' / 'README.txt').write_text('not a class\n')
    (raw / 'train' / 'extra.JPEG').write_text('not in a class folder\n')
    mat, gt = devkit_files(raw)
    (raw / 'devkit' / 'meta_clsloc.mat').write_bytes(mat)            # the same ids, with words
    (raw / 'devkit' / 'gt.txt').write_bytes(gt)
    tars = root / 'tars'
    tars.mkdir()
    tar_train(raw / 'train', tars / 'ILSVRC2012_img_train.tar')
    tar_flat(raw / 'val', tars / 'ILSVRC2012_img_val.tar')
    make_devkit_archive(tars / 'ILSVRC2014_devkit.tgz', '2014', raw)
    make_devkit_archive(tars / 'ILSVRC2012_devkit_t12.tar.gz', '2012', raw)
    run(write_paths(root / 'folders.yaml', tar_root_dir='ref', tar_train_dir='ref/train_hkl',
                    tar_val_dir='ref/val_hkl', misc_dir='ref/misc'))
    return root, train, val


def archive_paths(root, name, devkit='tars/ILSVRC2014_devkit.tgz', **kw):
    settings = dict(train_img_dir='tars/ILSVRC2012_img_train.tar', val_img_dir='tars/ILSVRC2012_img_val.tar',
                    devkit=devkit, meta_clsloc_mat=None, val_label_file=None, layout='auto',
                    tar_root_dir=name, tar_train_dir=f'{name}/train_hkl', tar_val_dir=f'{name}/val_hkl',
                    misc_dir=f'{name}/misc')
    settings.update(kw)
    return write_paths(root / f'{name}.yaml', **settings)


def same_outputs(a, b):
    for folder in SAME:
        names = sorted(os.listdir(a / folder))
        assert names == sorted(os.listdir(b / folder)) and names, folder
        for n in names:
            assert (a / folder / n).read_bytes() == (b / folder / n).read_bytes(), f'{folder}/{n}'
    for n in MISC:
        assert (a / 'misc' / n).read_bytes() == (b / 'misc' / n).read_bytes(), n


@pytest.mark.parametrize('devkit,workers', [('tars/ILSVRC2014_devkit.tgz', 2),
                                            ('tars/ILSVRC2012_devkit_t12.tar.gz', 1)])
def test_archives_give_what_the_extracted_folders_give(imagenet_pair, devkit, workers, monkeypatch):
    """Labels, shuffle, batches, mean, lists and bad members byte-identical to the extracted tree,
    with either devkit (their ILSVRC ids differ), 1 or 2 workers (indexing the class tars too);
    auto detects the archives."""
    monkeypatch.setattr(archives, 'PARALLEL_CLASSES', 1)
    indexed_by = []
    scan = archives.scan_train
    monkeypatch.setattr(archives, 'scan_train', lambda archive, workers=1: (indexed_by.append(workers),
                                                                            scan(archive, workers))[1])
    root, train, val = imagenet_pair
    name = f'arch_{workers}'
    run(archive_paths(root, name, devkit=devkit, workers=workers))
    assert indexed_by == [workers]  # the class tars indexed by the paths file's workers
    same_outputs(root / 'ref', root / name)
    info = yaml.safe_load((root / name / 'dataset.yaml').read_text())
    ref = yaml.safe_load((root / 'ref' / 'dataset.yaml').read_text())
    assert info['layout'] == 'imagenet_tar' and ref['layout'] == 'imagenet'
    assert info['class_words'] == ref['class_words'] == [WORDS[w] for w in WNIDS]
    for key in ('class_names', 'counts', 'bad_files'):
        assert info[key] == ref[key], key
    bad = [line.split('\t')[:2] for line in (root / name / 'misc' / 'bad_images.txt').read_text().splitlines()]
    assert sorted(f for _, f in bad) == sorted(['n01000001/truncated.jpg', 'n02000002/empty.jpg',
                                                'n03000003/text.jpg', 'ILSVRC2012_val_00000005.JPEG'])
    files = [f for b in batches(root / name / 'train_hkl_b4_b_4') for f in decode(b, train)]
    lines = listed(root / name / 'misc' / 'train.txt')                  # the images are the listed ones
    assert files == [f for f, _ in lines][:len(files)] and len(files) == 28
    assert 'subfolder/deeper.jpg' not in ''.join(f for f, _ in lines)


class Bars:
    """tqdm as the preprocessing calls it, recording each progress bar: [desc, unit, total, count]."""
    made = []

    def __init__(self, total=None, desc=None, unit='it', **kwargs):
        self.n, self.row = 0, [desc, unit, total, 0]
        Bars.made.append(self.row)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        self.n += n
        self.row[3] = self.n


def test_progress_bars_name_what_they_count(imagenet_pair, monkeypatch):
    """What a terminal shows while the archives are preprocessed: each bar's name, unit, total,
    and a count that reaches it (the class tars of the train archive indexed, the val archive's
    bytes indexed, the files checked, the images written)."""
    monkeypatch.setattr(archives, 'tqdm', Bars)
    monkeypatch.setattr(writer, 'tqdm', Bars)
    Bars.made = []
    root, _, _ = imagenet_pair
    run(archive_paths(root, 'bars', workers=1, sub_batches=[1]))
    val_tar = os.path.getsize(root / 'tars' / 'ILSVRC2012_img_val.tar')
    assert [row[:2] for row in Bars.made] == [
        ['index ILSVRC2012_img_train.tar', 'class'], ['index ILSVRC2012_img_val.tar', 'B'],
        ['check train', 'img'], ['check val', 'img'], ['write train', 'img'], ['write val', 'img']]
    assert Bars.made[0][2:] == [len(WNIDS)] * 2                    # the class tars
    assert 0.8 * val_tar < Bars.made[1][3] <= Bars.made[1][2] == val_tar  # to its last member's end
    assert Bars.made[2][2:] == [31] * 2 and Bars.made[3][2:] == [14] * 2    # the files checked
    assert Bars.made[4][2:] == [28] * 2 and Bars.made[5][2:] == [12] * 2    # the images written


def test_an_archive_index_is_read_without_unpickling(tmp_path):
    """misc_dir's index of an archive is numpy arrays read with allow_pickle=False: one holding a
    pickle is never unpickled, but taken as unreadable, and the archive indexed again."""
    archive, misc = tmp_path / 'train.tar', tmp_path / 'misc'
    archive.write_bytes(b'\0' * 1024)
    misc.mkdir()
    st = os.stat(archive)
    marker = tmp_path / 'unpickled'

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), 'w'))
    with open(misc / 'train.tar.index.npz', 'wb') as f:
        np.savez(f, stamp=np.array([archives.INDEX_VERSION, st.st_size, st.st_mtime_ns], np.int64),
                 classes=np.array([Evil()], dtype=object), names=np.array([Evil()], dtype=object),
                 offsets=np.zeros(1, np.int64), sizes=np.ones(1, np.int64))
    scanned = []
    classes, source = archives.load_index(str(archive), str(misc), lambda a: (
        scanned.append(a), (['n1'], {'n1/a.jpg': (512, 10)}))[1])
    assert not marker.exists() and scanned == [str(archive)]
    assert classes == ['n1'] and source.names == ['n1/a.jpg']


def test_member_names_that_are_not_utf8_survive_the_index():
    """tarfile gives a member name's bytes that are not UTF-8 as surrogates (an old latin-1 tar):
    the index stores and gives back such names unchanged."""
    names = ['n01000001/caf\udce9.jpg', 'n01000001/plain.jpg', 'n02000002/\udcff.png']
    assert archives.unpack(archives.pack(names)) == names


def test_a_class_tar_without_images_is_named(tmp_path):
    archive = tmp_path / 'train.tar'
    with tarfile.open(archive, 'w') as outer:
        for wnid, member in (('n01000001', 'a.JPEG'), ('n02000002', 'readme.txt')):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode='w') as tar:
                add_bytes(tar, member, b'x' * 100)
            add_bytes(outer, f'{wnid}.tar', inner.getvalue())
    with pytest.raises(archives.PrepError) as e:
        archives.train_archive(str(archive), str(tmp_path / 'misc'))
    exts = '/'.join(archives.IMAGE_EXTS)
    assert str(e.value) == f'no images ({exts}) in {archive} member n02000002.tar'


def test_a_devkit_missing_a_file_names_what_it_holds_and_what_it_lacks(tmp_path):
    kit = tmp_path / 'kit'
    (kit / 'data').mkdir(parents=True)
    (kit / 'data' / 'ILSVRC2014_clsloc_validation_ground_truth.txt').write_text('1\n')
    with pytest.raises(devkit.PrepError) as e:
        devkit.find_in_devkit(str(kit))
    instead = ('; or, instead of devkit, set meta_clsloc_mat and val_label_file to the synsets and '
               'ground-truth files')
    assert str(e.value) == (f'devkit {kit} holds ILSVRC2014_clsloc_validation_ground_truth.txt but '
                            f'not meta_clsloc.mat (at its top, in data/ or in <folder>/data/){instead}')
    (kit / 'data' / 'ILSVRC2014_clsloc_validation_ground_truth.txt').unlink()
    with pytest.raises(devkit.PrepError) as e:
        devkit.find_in_devkit(str(kit))
    assert str(e.value) == (
        f'devkit {kit} holds neither meta_clsloc.mat + ILSVRC2014_clsloc_validation_ground_truth.txt '
        '(ILSVRC2014) nor meta.mat + ILSVRC2012_validation_ground_truth.txt (ILSVRC2012), at its top, '
        f'in data/ or in <folder>/data/{instead}')


def test_a_devkit_with_its_files_too_or_unreadable_synsets_is_named(tmp_path):
    """read_devkit: devkit and the two files it replaces, both set, is refused naming the keys;
    synsets that are not a `synsets` struct array name the file they came from (a file of the
    paths file, or the member of a devkit archive)."""
    none = dict.fromkeys(('devkit', 'meta_clsloc_mat', 'val_label_file'))
    with pytest.raises(devkit.PrepError) as e:
        devkit.read_devkit(dict(none, devkit='kit.tgz', meta_clsloc_mat='meta.mat'))
    assert str(e.value) == ('set either devkit or meta_clsloc_mat and val_label_file in the paths file, '
                            'not both')
    buf = io.BytesIO()
    scipy.io.savemat(buf, {'other': np.arange(3)})  # a .mat without synsets
    bad_mat = buf.getvalue()
    (tmp_path / 'meta.mat').write_bytes(bad_mat)
    (tmp_path / 'gt.txt').write_text('1\n')
    kit = tmp_path / 'kit.tgz'
    with tarfile.open(kit, 'w:gz') as tar:
        add_bytes(tar, 'kit/data/meta_clsloc.mat', bad_mat)
        add_bytes(tar, 'kit/data/ILSVRC2014_clsloc_validation_ground_truth.txt', b'1\n')
    for cfg, name in ((dict(none, meta_clsloc_mat=str(tmp_path / 'meta.mat'),
                            val_label_file=str(tmp_path / 'gt.txt')), tmp_path / 'meta.mat'),
                      (dict(none, devkit=str(kit)), f'{kit} member kit/data/meta_clsloc.mat')):
        with pytest.raises(devkit.PrepError) as e:
            devkit.read_devkit(cfg)
        assert str(e.value).startswith(f'{name}: expected a struct array `synsets` (field 0 = ILSVRC id, '
                                       '1 = WNID) (KeyError'), e.value


def test_devkit_folder_of_either_version(imagenet_pair, tmp_path):
    """An extracted devkit folder (the 2012 one here) gives the same labels as its archive."""
    root = imagenet_pair[0]
    with tarfile.open(root / 'tars' / 'ILSVRC2012_devkit_t12.tar.gz') as tar:
        tar.extractall(tmp_path, filter='data')
    run(archive_paths(root, 'kitdir', devkit=str(tmp_path / 'ILSVRC2012_devkit_t12'), workers=2,
                      sub_batches=[1]))
    for split in ('train', 'val'):
        assert (root / 'kitdir' / 'labels' / f'{split}_labels.npy').read_bytes() == \
            (root / 'ref' / 'labels' / f'{split}_labels.npy').read_bytes()


def test_the_devkit_is_read_before_the_archives_and_may_hold_its_files_at_the_top(imagenet_pair, tmp_path,
                                                                                 monkeypatch, capsys):
    """A wrong devkit is named, with the keys that replace it, before the archives are indexed (on
    ImageNet: minutes of reading tar headers); a folder or an archive holding the two files at its top
    is a devkit too."""
    root = imagenet_pair[0]

    def no_scan(archive, workers=1):
        raise AssertionError(f'{archive} indexed before the devkit was read')
    with monkeypatch.context() as m:
        m.setattr(archives, 'scan_train', no_scan)
        m.setattr(archives, 'scan_val', no_scan)
        for typo in (tmp_path / 'ILSVRC2014_devkt', root / 'raw' / 'devkit'):   # missing; other names
            assert make_data.main([str(archive_paths(root, 'typo', devkit=str(typo)))]) == 2
            err = capsys.readouterr().err
            assert err.count('\n') == 1 and err.startswith('error: ') and str(typo) in err, err
            assert 'meta_clsloc_mat' in err and 'val_label_file' in err, err
    mat, gt = devkit_files(root / 'raw')
    flat = tmp_path / 'flat'
    flat.mkdir()
    (flat / 'meta_clsloc.mat').write_bytes(mat)
    (flat / 'ILSVRC2014_clsloc_validation_ground_truth.txt').write_bytes(gt)
    with tarfile.open(tmp_path / 'flat.tgz', 'w:gz') as tar:
        add_bytes(tar, 'meta_clsloc.mat', mat)
        add_bytes(tar, 'ILSVRC2014_clsloc_validation_ground_truth.txt', gt)
    for kit in (flat, tmp_path / 'flat.tgz'):
        run(archive_paths(root, kit.name, devkit=str(kit), sub_batches=[1]))
        for split in ('train', 'val'):
            assert (root / kit.name / 'labels' / f'{split}_labels.npy').read_bytes() == \
                (root / 'ref' / 'labels' / f'{split}_labels.npy').read_bytes()


def test_an_empty_devkit_member_is_read_as_empty_not_looked_up_as_a_file(tmp_path):
    kit = tmp_path / 'kit.tgz'
    with tarfile.open(kit, 'w:gz') as tar:
        add_bytes(tar, 'kit/data/meta_clsloc.mat', synsets_mat(ORDER_2014))
        add_bytes(tar, 'kit/data/ILSVRC2014_clsloc_validation_ground_truth.txt', b'')
    mat_name, mat, gt_name, gt = devkit.find_in_devkit(str(kit))
    assert gt == b'' and gt_name == f'{kit} member kit/data/ILSVRC2014_clsloc_validation_ground_truth.txt'
    assert mat == synsets_mat(ORDER_2014)


def test_train_archive_with_an_extracted_val_folder(imagenet_pair):
    """layout imagenet_tar reads a val folder too (val extracted, train not): the same outputs."""
    root = imagenet_pair[0]
    run(archive_paths(root, 'mixed', val_img_dir='raw/val', layout='imagenet_tar'))
    same_outputs(root / 'ref', root / 'mixed')


def test_archive_resume_reuses_the_index(imagenet_pair, monkeypatch):
    """A rerun neither rescans the archives (index in misc_dir) nor rewrites finished batches; a
    changed archive is indexed again."""
    root = imagenet_pair[0]
    paths = archive_paths(root, 'resume', sub_batches=[1])
    run(paths)
    out = root / 'resume'
    assert sorted(p.name for p in (out / 'misc').glob('*.index.npz')) == \
        ['ILSVRC2012_img_train.tar.index.npz', 'ILSVRC2012_img_val.tar.index.npz']
    before = {p: p.read_bytes() for p in out.rglob('*.hkl')}
    (out / 'train_hkl_b4_b_4' / '0003.hkl').unlink()
    old = 10 ** 18
    for p in before:
        if p.exists():
            os.utime(p, ns=(old, old))

    def no_scan(archive, workers=1):
        raise AssertionError(f'{archive} scanned again')
    monkeypatch.setattr(archives, 'scan_train', no_scan)
    monkeypatch.setattr(archives, 'scan_val', no_scan)
    run(paths)
    assert {p: p.read_bytes() for p in out.rglob('*.hkl')} == before
    assert [p for p in before if p.name != '0003.hkl' and p.stat().st_mtime_ns != old] == []
    os.utime(root / 'tars' / 'ILSVRC2012_img_val.tar')                 # touched: index again
    with pytest.raises(AssertionError, match='ILSVRC2012_img_val.tar scanned again'):
        make_data.make_data(str(paths))


def test_archive_errors_are_one_line_and_lose_nothing(imagenet_pair, tmp_path):
    root = imagenet_pair[0]
    tars = root / 'tars'
    cwd = tmp_path

    def paths(name, **kw):
        return str(archive_paths(root, name, **kw))
    index = root / 'err1' / 'misc' / 'ILSVRC2012_img_train.tar.index.npz'
    # a devkit archive without the ground truth: refused before the archives are indexed
    kit = tmp_path / 'ILSVRC2014_devkit.tgz'
    with tarfile.open(kit, 'w:gz') as tar:
        add_bytes(tar, 'ILSVRC2014_devkit/data/meta_clsloc.mat', synsets_mat(ORDER_2014))
    one_line_error(run_sh('generate_data.sh', paths('err1', devkit=str(kit)), cwd=cwd), str(kit),
                   'ILSVRC2014_clsloc_validation_ground_truth.txt', 'meta_clsloc_mat', 'val_label_file')
    assert not index.exists()
    # a ground truth one line short: found once the val archive is listed; then fixed, the rerun
    # completes
    mat, gt = devkit_files(root / 'raw')
    with tarfile.open(kit, 'w:gz') as tar:
        add_bytes(tar, 'ILSVRC2014_devkit/data/meta_clsloc.mat', mat)
        add_bytes(tar, 'ILSVRC2014_devkit/data/ILSVRC2014_clsloc_validation_ground_truth.txt',
                  b''.join(gt.splitlines(keepends=True)[:-1]))
    one_line_error(run_sh('generate_data.sh', paths('err1', devkit=str(kit)), cwd=cwd), str(kit),
                   'needs line 14')
    assert index.exists()                                               # kept
    assert run_sh('generate_data.sh', paths('err1'), cwd=cwd).returncode == 0
    same_outputs(root / 'ref', root / 'err1')
    # not a tar; a class member that is not a tar; a truncated archive; a missing one
    junk = tmp_path / 'junk.tar'
    junk.write_bytes(b'\x01' * 5000)
    one_line_error(run_sh('generate_data.sh', paths('err2', train_img_dir=str(junk)), cwd=cwd), str(junk))
    fake = tmp_path / 'fake.tar'
    with tarfile.open(fake, 'w') as tar:
        add_bytes(tar, 'n01000001.tar', b'not a tar' * 300)
    one_line_error(run_sh('generate_data.sh', paths('err3', train_img_dir=str(fake)), cwd=cwd), str(fake),
                   'n01000001.tar')
    cut = tmp_path / 'cut.tar'
    data = (tars / 'ILSVRC2012_img_train.tar').read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    one_line_error(run_sh('generate_data.sh', paths('err4', train_img_dir=str(cut)), cwd=cwd), str(cut))
    one_line_error(run_sh('generate_data.sh', paths('err6', layout='imagenet'), cwd=cwd),
                   'ILSVRC2012_img_train.tar', 'layout imagenet_tar')
    gone = tmp_path / 'gone.tar'
    one_line_error(run_sh('generate_data.sh', paths('err5', layout='imagenet_tar', train_img_dir=str(gone)),
                          cwd=cwd), str(gone))


def test_class_tar_error_in_a_worker_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(archives, 'PARALLEL_CLASSES', 1)
    fake = tmp_path / 'raw' / 'fake.tar'
    fake.parent.mkdir()
    with tarfile.open(fake, 'w') as tar:
        add_bytes(tar, 'n01000001.tar', b'not a tar' * 300)
    make_val_imagenet(tmp_path / 'raw')
    paths = write_paths(tmp_path / 'paths.yaml', train_img_dir='raw/fake.tar', layout='auto', workers=2)
    assert make_data.main([str(paths)]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('error: ') and str(fake) in err and 'n01000001.tar' in err


def test_member_is_read_through_a_window(tmp_path):
    """A member decodes from its own bytes only: the next member's bytes are never read, so a
    truncated member is as bad as the truncated file would be."""
    from preprocessing.images import BadImage, open_rgb
    from preprocessing.sources import Member
    solid(tmp_path / 'a.jpg', (200, 10, 10))
    data = (tmp_path / 'a.jpg').read_bytes()
    blob = tmp_path / 'blob'
    blob.write_bytes(b'x' * 100 + data + data)
    ok = Member(str(blob), 100, len(data), 'a.jpg')
    assert np.asarray(open_rgb(ok, 16)).reshape(-1, 3)[0].tolist() == \
        np.asarray(open_rgb(str(tmp_path / 'a.jpg'), 16)).reshape(-1, 3)[0].tolist()
    with pytest.raises(BadImage):
        open_rgb(Member(str(blob), 100, len(data) // 2, 'cut.jpg'), 16)


@pytest.mark.parametrize('whole', [True, False])
def test_member_read_at_once_or_through_a_window_decodes_as_its_file(tmp_path, monkeypatch, whole):
    """A member small enough is read with one pread and decoded from memory, a larger one through
    the Window: either way its pixels, or the reason it is unreadable, are those of the same bytes as
    a file, whole, cut short, empty, or cut by the end of a truncated archive."""
    from preprocessing import sources
    from preprocessing.images import BadImage, load_rgb
    from preprocessing.sources import Member
    monkeypatch.setattr(sources, 'WHOLE_MEMBER', sources.WHOLE_MEMBER if whole else 0)
    rng = np.random.default_rng(0)
    for fmt in ('JPEG', 'PNG'):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(buf, format=fmt)
        data = buf.getvalue()
        for cut, archive_ends in ((len(data), False), (len(data) // 2, False), (0, False),
                                  (len(data) // 3, True)):
            blob, file = tmp_path / f'blob_{cut}', tmp_path / f'file_{cut}'
            blob.write_bytes(b'x' * 100 + data[:cut] + (b'' if archive_ends else data))
            file.write_bytes(data[:cut])
            member = Member(str(blob), 100, len(data) if archive_ends else cut, 'm')

            def result(item):
                try:
                    return load_rgb(item, 32).tolist()
                except BadImage as e:
                    return str(e)
            got, want = result(member), result(str(file))
            assert got == want, (fmt, cut, archive_ends)
            assert isinstance(want, str) == (cut < len(data)), (fmt, cut)


# ---------------------------------------------------------------------------------- CIFAR binaries
CIFAR10_NAMES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']


def record_pixels(k):
    """3,072 planar bytes: R = a row ramp, G = a column ramp, B = k (distinct per record)."""
    r = np.repeat(np.arange(32, dtype=np.uint8) * 8, 32).reshape(32, 32)
    return np.stack([r, r.T, np.full((32, 32), k % 256, np.uint8)]).tobytes()


def make_cifar(folder, layout, n_train=(9, 8, 8, 8, 7), n_val=10):
    """Binary CIFAR files with labels k % classes; returns {name as listed: (label, blue value)}."""
    folder.mkdir(parents=True)
    table, k = {}, 0
    if layout == 'cifar10_bin':
        (folder / 'batches.meta.txt').write_text('\n'.join(CIFAR10_NAMES) + '\n\n')
        files = [(f'data_batch_{i + 1}.bin', n) for i, n in enumerate(n_train)] + [('test_batch.bin', n_val)]
    else:
        (folder / 'fine_label_names.txt').write_text('\n'.join(f'fine{i:02d}' for i in range(100)) + '\n')
        (folder / 'coarse_label_names.txt').write_text('\n'.join(f'coarse{i:02d}' for i in range(20)) + '\n')
        files = [('train.bin', sum(n_train)), ('test.bin', n_val)]
    for fname, n in files:
        records = []
        for j in range(n):
            k += 1
            if layout == 'cifar10_bin':
                label = k % 10
                records.append(bytes([label]) + record_pixels(k))
                table[f'{CIFAR10_NAMES[label]}/{fname}:{j:05d}'] = (label, k % 256)
            else:
                coarse, fine = k % 20, (7 * k) % 100
                records.append(bytes([coarse, fine]) + record_pixels(k))
                table[(fname, j)] = (coarse, fine, k % 256)
        (folder / fname).write_bytes(b''.join(records))
    return table


def tar_gz(folder, path):
    with tarfile.open(path, 'w:gz') as tar:
        tar.add(folder, arcname=folder.name)
    return path


def cifar_paths(root, name, source, layout='auto', **kw):
    return write_paths(root / f'{name}.yaml', train_img_dir=str(source), val_img_dir=str(source),
                       layout=layout, meta_clsloc_mat=None, val_label_file=None, img_size=32,
                       tar_root_dir=name, tar_train_dir=f'{name}/train_hkl', tar_val_dir=f'{name}/val_hkl',
                       misc_dir=f'{name}/misc', **kw)


def test_cifar10_binary_archive_and_folder(tmp_path):
    folder = tmp_path / 'raw' / 'cifar-10-batches-bin'
    table = make_cifar(folder, 'cifar10_bin')
    archive = tar_gz(folder, tmp_path / 'raw' / 'cifar-10-binary.tar.gz')
    run(cifar_paths(tmp_path, 'from_tgz', archive, workers=2))
    run(cifar_paths(tmp_path, 'from_dir', folder, layout='cifar10_bin'))
    out = tmp_path / 'from_tgz'
    same_outputs(tmp_path / 'from_dir', out)
    info = yaml.safe_load((out / 'dataset.yaml').read_text())
    assert info['layout'] == 'cifar10_bin' and info['class_names'] == CIFAR10_NAMES
    assert info['counts'] == {'train_images': 40, 'train_batches': 10, 'train_dropped': 0,
                              'val_images': 8, 'val_batches': 2, 'val_dropped': 2}
    train = [n for n in table if 'data_batch' in n]
    expected = np.array(sorted(train))
    np.random.RandomState(1).shuffle(expected)
    assert np.load(out / 'misc' / 'shuffled_train_filenames.npy').tolist() == expected.tolist()
    for split, names in (('train', expected.tolist()), ('val', sorted(n for n in table if 'test' in n))):
        lines = listed(out / 'misc' / f'{split}.txt')
        assert lines == [[n, str(table[n][0])] for n in names]
        images = np.concatenate(batches(out / f'{split}_hkl_b4_b_4'), axis=3)          # (3, 32, 32, N)
        planes = np.frombuffer(record_pixels(0), np.uint8).reshape(3, 32, 32)
        assert np.array_equal(images[:2], np.repeat(planes[:2, ..., None], images.shape[3], axis=3))
        assert images[2, 0, 0].tolist() == [table[n][1] for n in names[:images.shape[3]]]   # each record
        assert np.load(out / 'labels' / f'{split}_labels.npy').tolist() == \
            [table[n][0] for n in names[:images.shape[3]]]


def test_cifar_train_and_val_from_two_places_list_as_from_one(tmp_path):
    """train_img_dir and val_img_dir naming different copies (a folder and the archive, either
    way round) give the listing of one."""
    from preprocessing import cifar
    folder = tmp_path / 'raw' / 'cifar-10-batches-bin'
    make_cifar(folder, 'cifar10_bin', n_train=(3, 2, 2, 2, 1), n_val=4)
    archive = tar_gz(folder, tmp_path / 'raw' / 'cifar-10-binary.tar.gz')
    cfg = {'cifar100_labels': 'fine'}
    one = cifar.list_cifar(dict(cfg, train_img_dir=str(folder), val_img_dir=str(folder)), 'cifar10_bin')
    for train, val in ((folder, archive), (archive, folder)):
        two = cifar.list_cifar(dict(cfg, train_img_dir=str(train), val_img_dir=str(val)), 'cifar10_bin')
        assert two[:4] == one[:4] and len(one[1]) == 10 and len(one[2]) == 4
        assert [s.files for s in two[4].values()] == [s.files for s in one[4].values()]


def test_cifar_is_found_as_a_tgz_or_in_the_folder_above_its_own(tmp_path):
    """The archive also comes as .tgz (any case), and train_img_dir may name the folder that holds
    cifar-10-batches-bin/ (where the archive was extracted): both list as the folder itself."""
    from preprocessing import cifar
    folder = tmp_path / 'raw' / 'cifar-10-batches-bin'
    make_cifar(folder, 'cifar10_bin', n_train=(3, 2, 2, 2, 1), n_val=4)
    cfg = {'cifar100_labels': 'fine'}
    one = cifar.list_cifar(dict(cfg, train_img_dir=str(folder), val_img_dir=str(folder)), 'cifar10_bin')
    for name in ('cifar-10-binary.tgz', 'CIFAR-10-Binary.TGZ'):
        assert cifar.detect(str(tar_gz(folder, tmp_path / name))) == 'cifar10_bin'
    above = str(tmp_path / 'raw')
    assert cifar.detect(above) == 'cifar10_bin'
    two = cifar.list_cifar(dict(cfg, train_img_dir=above, val_img_dir=above), 'cifar10_bin')
    assert two[:4] == one[:4] and len(one[1]) == 10
    assert [s.files for s in two[4].values()] == [s.files for s in one[4].values()]


def test_cifar_class_names_that_are_empty_or_not_utf8(tmp_path):
    """A names file of no names is refused as empty, one that repeats a name or has a "/" in one
    names it; bytes that are not UTF-8 (a names file in Latin-1) become U+FFFD in the names, not a
    traceback."""
    from preprocessing import PrepError, cifar
    with pytest.raises(PrepError) as e:
        cifar.class_names(b'\n  \n', 'raw: batches.meta.txt')
    assert str(e.value) == ('raw: batches.meta.txt: expected one class name a line, distinct and '
                            'without "/" (empty)')
    assert cifar.class_names('caf\u00e9\nbird\n'.encode('latin-1'), 'raw') == ['caf\ufffd', 'bird']
    # a name twice (two classes would share a folder name) or with a "/" is refused, naming it
    for names, bad in ((b'cat\nbird\ncat\n', 'cat'), (b'cat\nbird/x\n', 'bird/x')):
        with pytest.raises(PrepError, match=rf"^raw: expected .* \(got '{bad}'\)$"):
            cifar.class_names(names, 'raw')


@pytest.mark.parametrize('kind', ['fine', 'coarse'])
def test_cifar100_binary_fine_or_coarse_labels(tmp_path, kind):
    folder = tmp_path / 'raw' / 'cifar-100-binary'
    table = make_cifar(folder, 'cifar100_bin', n_train=(16,), n_val=8)
    archive = tar_gz(folder, tmp_path / 'raw' / 'cifar-100-binary.tar.gz')
    run(cifar_paths(tmp_path, 'out', archive, cifar100_labels=kind, sub_batches=[1]))
    out = tmp_path / 'out'
    info = yaml.safe_load((out / 'dataset.yaml').read_text())
    n = 100 if kind == 'fine' else 20
    assert info['layout'] == 'cifar100_bin' and info['cifar100_labels'] == kind and info['num_classes'] == n
    assert info['class_names'] == [f'{kind}{i:02d}' for i in range(n)]
    for split, fname in (('train', 'train.bin'), ('val', 'test.bin')):
        lines = listed(out / 'misc' / f'{split}.txt')
        assert len(lines) == len([key for key in table if key[0] == fname])
        images = np.concatenate(batches(out / f'{split}_hkl_b4_b_4'), axis=3)
        labels = np.load(out / 'labels' / f'{split}_labels.npy').tolist()
        for i, (name, y) in enumerate(lines):
            cls, rest = name.split('/')
            f, j = rest.split(':')
            coarse, fine, blue = table[(f, int(j))]
            label = fine if kind == 'fine' else coarse
            assert f == fname and cls == f'{kind}{label:02d}' and int(y) == label
            assert images[2, 0, 0, i] == blue and labels[i] == label


def test_the_other_cifar_versions_extracted_are_named_with_the_binary_to_get(tmp_path):
    """The python (pickles, never loaded) and matlab versions' folders, by their names."""
    from preprocessing import cifar
    for name, files in (('cifar-10-batches-py', ['data_batch_1', 'batches.meta']),
                        ('cifar-100-python', ['train', 'test', 'meta']),
                        ('cifar-10-batches-mat', ['data_batch_1.mat', 'batches.meta.mat'])):
        folder = tmp_path / name
        folder.mkdir()
        for f in files:
            (folder / f).write_bytes(b'\x80\x04pickle')
        with pytest.raises(cifar.PrepError, match=rf'^{folder}: only the binary version of CIFAR is read'):
            cifar.detect(str(folder))
    assert cifar.detect(str(tmp_path)) is None


def test_cifar_pickle_versions_and_bad_files_are_refused(tmp_path):
    cwd = tmp_path
    pickled = tmp_path / 'cifar-10-python.tar.gz'
    pickled.write_bytes(b'whatever')
    one_line_error(run_sh('generate_data.sh', str(cifar_paths(tmp_path, 'p1', pickled)), cwd=cwd),
                   str(pickled), 'cifar-10-binary.tar.gz')
    # the python version renamed, read as binary: its member names give it away
    folder = tmp_path / 'cifar-10-batches-py'
    folder.mkdir()
    for name in ('data_batch_1', 'batches.meta', 'test_batch'):
        (folder / name).write_bytes(b'\x80\x04pickle')
    renamed = tar_gz(folder, tmp_path / 'mine.tar.gz')
    one_line_error(run_sh('generate_data.sh', str(cifar_paths(tmp_path, 'p2', renamed, layout='cifar10_bin')),
                          cwd=cwd), str(renamed), 'binary version')
    one_line_error(run_sh('generate_data.sh', str(cifar_paths(tmp_path, 'p3', folder)), cwd=cwd), str(folder),
                   'binary version')
    # a record cut short; a label beyond the class names
    good = tmp_path / 'cifar-10-batches-bin'
    make_cifar(good, 'cifar10_bin')
    with open(good / 'data_batch_3.bin', 'ab') as f:
        f.write(b'\x01' * 100)
    one_line_error(run_sh('generate_data.sh', str(cifar_paths(tmp_path, 'p4', good)), cwd=cwd),
                   'data_batch_3.bin', '3073-byte records')
    make_cifar(tmp_path / 'c2' / 'cifar-10-batches-bin', 'cifar10_bin')
    meta = tmp_path / 'c2' / 'cifar-10-batches-bin' / 'batches.meta.txt'
    meta.write_text('\n'.join(CIFAR10_NAMES[:5]))
    one_line_error(run_sh('generate_data.sh', str(cifar_paths(tmp_path, 'p5', meta.parent)), cwd=cwd),
                   'batches.meta.txt', 'label')


@pytest.mark.parametrize('name', ['cifar10_bin_paths.yaml', 'cifar100_bin_paths.yaml'])
def test_shipped_cifar_paths_files(name):
    path = REPO / 'preprocessing' / name
    cfg = load_paths(path)
    keys = [line.split(':')[0] for line in path.read_text().splitlines() if line and not line.startswith('#')]
    assert sorted(keys) == sorted(KEYS) and cfg['layout'] == name.split('_paths')[0]
    assert cfg['train_img_dir'] == cfg['val_img_dir'] == str(REPO / 'data' / 'raw' / (
        'cifar-10-binary.tar.gz' if name.startswith('cifar10_') else 'cifar-100-binary.tar.gz'))


def test_train_py_trains_on_the_cifar_binary_archive(tmp_path):
    """The whole path: cifar-10-binary.tar.gz -> generate_data.sh -> train.py (CPU)."""
    folder = tmp_path / 'raw' / 'cifar-10-batches-bin'
    make_cifar(folder, 'cifar10_bin')
    archive = tar_gz(folder, tmp_path / 'raw' / 'cifar-10-binary.tar.gz')
    assert run_sh('generate_data.sh', str(cifar_paths(tmp_path, 'out', archive)), cwd=tmp_path).returncode == 0
    out = tmp_path / 'out'
    r = subprocess.run(
        [sys.executable, str(REPO / 'train.py'), 'model=alexnet_cifar', 'crop_size=28', 'batch_size=4',
         'gpu=cpu', 'n_epochs=1', 'print_freq=5', f'weights_dir={tmp_path / "w"}',
         f'train_folder={out}/train_hkl_b4_b_4', f'val_folder={out}/val_hkl_b4_b_4',
         f'label_folder={out}/labels', f'mean_file={out}/misc/img_mean.npy'],
        capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert '10 classes' in r.stdout and 'done: epoch 1' in r.stdout


def read_bytes_so_far():
    with open('/proc/self/io') as f:
        return int(next(line for line in f if line.startswith('rchar:')).split()[1])


@pytest.mark.skipif(not os.path.exists('/proc/self/io'), reason='needs Linux /proc/self/io')
def test_indexing_reads_headers_not_images(tmp_path):
    """Indexing a 12 MiB tar of class tars reads its headers only (bytes read by this process, all
    system calls counted), and yields each member's offset: memory and reads stay bounded."""
    rng = np.random.default_rng(0)
    blobs = {}
    with tarfile.open(tmp_path / 'train.tar', 'w') as outer:
        for c in range(3):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode='w') as inner:
                for j in range(4):
                    blobs[f'n0{c}/{j}.JPEG'] = rng.bytes(1 << 20)
                    add_bytes(inner, f'{j}.JPEG', blobs[f'n0{c}/{j}.JPEG'])
            add_bytes(outer, f'n0{c}.tar', buf.getvalue())
    before = read_bytes_so_far()
    classes, source = archives.train_archive(str(tmp_path / 'train.tar'), str(tmp_path / 'misc'))
    assert read_bytes_so_far() - before < 256 * 1024   # 15 headers of 512 bytes; 12 MiB of images
    assert classes == ['n00', 'n01', 'n02'] and source.names == sorted(blobs)
    data = (tmp_path / 'train.tar').read_bytes()
    for name in source.names:
        m = source.locate(name)
        assert data[m.offset:m.offset + m.size] == blobs[name]
