"""Reading batches, the trainer's crop/mirror plan, and the in-process loader."""
import os

import numpy as np
import pytest
import torch

from lib import data
from tests.helpers import make_batches, write_hkl


def reference_crop(batch, mean, cx, cy, mirror, c):
    """The original's per-image recipe in numpy: (image - mean), crop, mirror, then to (B,3,c,c)."""
    out = []
    for i in range(batch.shape[3]):
        img = batch[:, :, :, i].astype(np.float32) - mean
        img = img[:, cy[i]:cy[i] + c, cx[i]:cx[i] + c]
        out.append(img[:, :, ::-1] if mirror[i] else img)
    return np.stack(out)


@pytest.mark.parametrize('per_batch', [False, True])
def test_crop_mirror_matches_the_reference_bitwise(per_batch):
    rng = np.random.RandomState(0)
    batch = rng.randint(0, 256, (3, 20, 20, 6)).astype(np.uint8)
    mean = rng.uniform(0, 255, (3, 20, 20)).astype(np.float32)
    gen = torch.Generator().manual_seed(3)
    plan = data.make_plan(gen, 5, 6, 20, 15, train=True, batch_crop_mirror=per_batch)
    for step in plan:
        got = data.crop_mirror(torch.from_numpy(batch), torch.from_numpy(mean), step, 15)
        want = reference_crop(batch, mean, step.crop_x.numpy(), step.crop_y.numpy(),
                              step.mirror.numpy(), 15)
        assert got.shape == (6, 3, 15, 15) and got.is_contiguous()
        assert np.array_equal(got.numpy(), want)
        # the GPU's one-kernel gather gives the same bits as the CPU's slice loop
        gathered = data._crop_gather(data.to_bchw(torch.from_numpy(batch)), torch.from_numpy(mean),
                                     step, 15)
        assert torch.equal(gathered, got)


def test_crop_mirror_into_reused_buffers_gives_the_same_bits():
    """buffers= (train.py's ring of 2) and out= (a loader slot) change where the result goes,
    not what it is; a buffer is reused every second batch and reallocated on a shape change."""
    rng = np.random.RandomState(1)
    bufs = data.HostBuffers()
    slot = torch.empty(6, 3, 15, 15)
    results = []
    for size in (20, 20, 20, 18):
        batch = torch.from_numpy(rng.randint(0, 256, (3, size, size, 6)).astype(np.uint8))
        mean = torch.from_numpy(rng.uniform(0, 255, (3, size, size)).astype(np.float32))
        step = data.make_plan(torch.Generator().manual_seed(size), 1, 6, size, 15, train=True)[0]
        want = data.crop_mirror(batch, mean, step, 15)
        got = data.crop_mirror(batch, mean, step, 15, buffers=bufs)
        assert torch.equal(got, want)
        assert data.crop_mirror(batch, mean, step, 15, out=slot, buffers=bufs) is slot
        assert torch.equal(slot, want)
        results.append(got)
    assert results[0].data_ptr() == results[2].data_ptr() != results[1].data_ptr()


def test_plan_draws_are_seeded_in_range_and_centre_when_not_random():
    def plan(seed, **kw):
        return data.make_plan(torch.Generator().manual_seed(seed), 50, 64, 256, 227, **kw)
    a, b = plan(1, train=True, shuffle=True), plan(1, train=True, shuffle=True)
    assert [s.file for s in a] == [s.file for s in b] and sorted(s.file for s in a) == list(range(50))
    assert all(torch.equal(x.crop_x, y.crop_x) and torch.equal(x.mirror, y.mirror) for x, y in zip(a, b))
    xs = torch.cat([s.crop_x for s in a])
    assert xs.min() == 0 and xs.max() == 28 and len(xs.unique()) == 29  # [0, 2 * 14], as the original
    assert 0.4 < torch.cat([s.mirror for s in a]).float().mean() < 0.6
    assert [s.file for s in plan(1, train=True)] == list(range(50))  # shuffle off: in order
    for s in plan(1, train=False) + plan(1, train=True, rand_crop=False):
        assert (s.crop_x == 14).all() and (s.crop_y == 14).all() and not s.mirror.any()
    per_batch = plan(2, train=True, batch_crop_mirror=True)
    assert all(len(s.crop_x.unique()) == 1 and len(s.mirror.unique()) == 1 for s in per_batch)


@pytest.mark.parametrize('per_batch', [False, True])
def test_a_workers_plan_is_its_rows_of_the_steps_plan(per_batch):
    """The crops and mirrors belong to the step: a worker's plan holds its rows of the plan of
    the whole step (all workers' images), whatever the number of workers, and every worker's
    generators end in the same state."""
    def plan(rows, batch=8):
        gen, order = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
        steps = data.make_plan(gen, 5, batch, 36, 32, train=True, shuffle=True, order_gen=order,
                               batch_crop_mirror=per_batch, rows=rows)
        return steps, gen.get_state()
    whole, state = plan(None)
    for n in (2, 4):
        for r in range(n):
            part, part_state = plan((r * 8 // n, (r + 1) * 8 // n))
            assert torch.equal(part_state, state)
            for a, b in zip(part, whole):
                assert a.file == b.file
                for f in ('crop_x', 'crop_y', 'mirror'):
                    assert torch.equal(getattr(a, f), getattr(b, f)[r * 8 // n:(r + 1) * 8 // n])
    assert len({tuple(s.crop_x.tolist()) for s in whole}) > 1  # (the draws are random)


def test_synthetic_batches_are_the_same_in_every_worker_and_every_run():
    """synthetic=True: a worker's rows of each drawn batch, images and labels, are its share of
    the batch a one-worker run draws from the same seed; another seed draws other batches; the
    images of four batches are held, and reused for the next ones (the labels are all drawn)."""
    whole = data.SyntheticBatches(5, 8, 12, 10, seed=3)
    halves = [data.SyntheticBatches(5, 8, 12, 10, seed=3, rows=r) for r in ((0, 4), (4, 8))]
    assert len(whole) == 5 and whole.labels.shape == (5, 8) and whole.read(4).shape == (3, 12, 12, 8)
    for i in range(len(whole)):
        assert np.array_equal(np.concatenate([h.read(i) for h in halves], axis=3), whole.read(i))
    assert np.array_equal(np.concatenate([h.labels for h in halves], axis=1), whole.labels)
    again, other = data.SyntheticBatches(5, 8, 12, 10, seed=3), data.SyntheticBatches(5, 8, 12, 10, seed=4)
    assert np.array_equal(again.labels, whole.labels) and np.array_equal(again.read(1), whole.read(1))
    assert np.array_equal(whole.read(4), whole.read(0))  # four drawn and reused: the memory held
    assert not np.array_equal(other.labels, whole.labels)


def test_batch_folder_reads_c01b_and_aligns_labels(tmp_path):
    keys = make_batches(str(tmp_path), n_train=3, n_val=1, batch=4, size=8)
    folder = data.BatchFolder(data.batch_files(keys['train_folder']),
                              os.path.join(keys['label_folder'], 'train_labels.npy'), 4)
    assert len(folder) == 3 and folder.image_size() == 8
    assert folder.read(2).shape == (3, 8, 8, 4) and folder.read(2).dtype == np.uint8
    labels = np.load(os.path.join(keys['label_folder'], 'train_labels.npy'))
    assert np.array_equal(folder.labels[1], labels[4:8])
    halves = data.BatchFolder(data.batch_files(keys['train_folder'].replace('_b_4', '_b_2'), 1),
                              os.path.join(keys['label_folder'], 'train_labels_1.npy'), 2)
    assert np.array_equal(halves.read(1), folder.read(1)[..., 2:])
    assert np.array_equal(halves.labels[1], labels[6:8])


def test_bad_files_give_errors_naming_them(tmp_path):
    keys = make_batches(str(tmp_path), n_train=2, n_val=1, batch=4, size=8)
    labels = os.path.join(keys['label_folder'], 'train_labels.npy')
    corrupt = os.path.join(keys['train_folder'], '0001.hkl')
    with open(corrupt, 'wb') as f:
        f.write(b'not hdf5 at all')
    folder = data.BatchFolder(data.batch_files(keys['train_folder']), labels, 4)
    with pytest.raises(data.DataError, match='0001.hkl'):
        folder.read(1)
    write_hkl(corrupt, np.zeros((3, 8, 8, 5), np.uint8))
    with pytest.raises(data.DataError, match=r'0001.hkl: expected uint8 \(3, S, S, 4\)'):
        folder.read(1)
    for shape in ((3, 8, 8), (5,)):  # not a batch at all
        write_hkl(corrupt, np.zeros(shape, np.uint8))
        with pytest.raises(data.DataError, match=r'0001.hkl: expected one 4-D array in the batch file, '
                                                 r'found 0$'):
            folder.read(1)
    with pytest.raises(data.DataError, match='0000.hkl holds 4 images, not 8: set batch_size=4'):
        data.share_source(keys['train_folder'], keys['label_folder'], 'train', 8)
    short = os.path.join(keys['label_folder'], 'short.npy')
    np.save(short, np.load(labels)[:6])
    with pytest.raises(data.DataError, match='short.npy holds 6 labels.*needs 2 batches x 4 = 8'):
        data.BatchFolder(data.batch_files(keys['train_folder']), short, 4)
    os.remove(os.path.join(keys['train_folder'], '0000.hkl'))
    with pytest.raises(data.DataError, match='not numbered 0..0'):
        data.batch_files(keys['train_folder'])
    with pytest.raises(data.DataError, match='no NNNN.hkl batch files in'):
        data.batch_files(str(tmp_path))
    with pytest.raises(data.DataError, match=r'img_mean.npy: mean image has shape \(3, 8, 8\)'):
        data.load_mean(keys['mean_file'], 16)


def test_loader_on_device_path_equals_host_path(tmp_path):
    keys = make_batches(str(tmp_path), n_train=3, n_val=1, batch=4, size=12)
    folder = data.BatchFolder(data.batch_files(keys['train_folder']),
                              os.path.join(keys['label_folder'], 'train_labels.npy'), 4)
    mean = data.load_mean(keys['mean_file'], 12)
    plan = data.make_plan(torch.Generator().manual_seed(0), 3, 4, 12, 10, train=True, shuffle=True)
    # a batch is valid until the next-but-one is made (reused buffers): keep copies
    host = [(x.clone(), y) for x, y in
            data.InProcessLoader(folder, mean, 10, 'cpu', on_device=False).epoch(plan)]
    dev = [(x.clone(), y) for x, y in
           data.InProcessLoader(folder, mean, 10, 'cpu', on_device=True).epoch(plan)]
    assert len(host) == 3
    for (x1, y1), (x2, y2), step in zip(host, dev, plan):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert torch.equal(y1, torch.from_numpy(folder.labels[step.file]))


def test_rows_of_a_batch_file_are_read_alone(tmp_path):
    """read_hkl of rows (a torchrun rank's or a train_2gpu.py worker's share of a whole batch): the
    same bytes as the whole file sliced, from hickle's contiguous dataset (mapped) and from a
    chunked, compressed one (HDF5 hyperslab); bad files are errors naming them."""
    import h5py
    rng = np.random.RandomState(0)
    x = rng.randint(0, 256, (3, 8, 8, 12)).astype(np.uint8)
    plain, chunked = str(tmp_path / 'plain.hkl'), str(tmp_path / 'chunked.hkl')
    write_hkl(plain, x)
    with h5py.File(chunked, 'w') as f:
        f.create_dataset('data', data=x, chunks=(3, 4, 4, 6), compression='gzip')
    for path in (plain, chunked):
        for lo, hi in ((0, 6), (6, 12), (3, 6), (9, 12), (0, 12)):
            got = data.read_hkl(path, 12, (lo, hi))
            assert got.flags['C_CONTIGUOUS'] and got.dtype == np.uint8
            assert np.array_equal(got, x[..., lo:hi]), (path, lo, hi)
    with pytest.raises(data.DataError, match=r'plain.hkl: expected uint8 \(3, S, S, 8\), got uint8'):
        data.read_hkl(plain, 8, (0, 4))
    with open(plain, 'r+b') as f:
        f.truncate(os.path.getsize(plain) - 700)          # the end of the dataset is missing
    with pytest.raises(data.DataError, match='plain.hkl: cannot read batch file'):
        data.read_hkl(plain, 12, (0, 6))
    keys = make_batches(str(tmp_path / 'd'), n_train=2, n_val=1, batch=4, size=8)
    labels = os.path.join(keys['label_folder'], 'train_labels.npy')
    whole, rows = data.BatchFolder(data.batch_files(keys['train_folder']), labels, 4), \
        data.BatchFolder(data.batch_files(keys['train_folder']), labels, 4, rows=(1, 3))
    assert rows.batch_size == 2 and np.array_equal(rows.labels, whole.labels[:, 1:3])
    assert np.array_equal(rows.read(1), whole.read(1)[..., 1:3])


def test_image_size_checks_the_batch_from_the_header_at_start_up(tmp_path):
    """A folder of batches of another size is named before any pixel is read (not at step N)."""
    keys = make_batches(str(tmp_path), n_train=2, n_val=1, batch=4, size=8)
    labels = os.path.join(keys['label_folder'], 'train_labels.npy')
    assert data.BatchFolder(data.batch_files(keys['train_folder']), labels, 4).image_size() == 8
    write_hkl(os.path.join(keys['train_folder'], '0000.hkl'), np.zeros((3, 8, 8, 2), np.uint8))
    with pytest.raises(data.DataError, match=r'0000.hkl holds 2 images, not 4: set batch_size=2'):
        data.share_source(keys['train_folder'], keys['label_folder'], 'train', 4)
    with pytest.raises(data.DataError, match=r'0000.hkl holds 2 images, not 4$'):
        data.BatchFolder(data.batch_files(keys['train_folder']), labels, 4)
