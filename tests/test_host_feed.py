"""The host feed of use_data_layer: batch files read straight into a slot give the bytes of
read_hkl (whole files and torchrun rows), bad files are errors naming them."""
import os

import numpy as np
import pytest

from lib import data
from tests.helpers import make_batches, write_hkl


@pytest.fixture
def folder(tmp_path):
    keys = make_batches(str(tmp_path), n_train=3, n_val=1, batch=8, size=36)
    labels = os.path.join(keys['label_folder'], 'train_labels.npy')
    return data.batch_files(keys['train_folder']), labels


@pytest.mark.parametrize('rows', [None, (2, 6), (0, 8)])
def test_read_into_gives_the_bytes_of_read(folder, tmp_path, rows):
    source = data.BatchFolder(*folder, 8, rows=rows)
    n = 8 if rows is None else rows[1] - rows[0]
    slot = np.memmap(tmp_path / 'slot', np.uint8, 'w+', shape=(3, 36, 36, n))  # as a loader slot
    for i in range(len(source)):
        slot[...] = 7
        source.read_into(i, slot)
        assert np.array_equal(slot, source.read(i))


def test_read_into_rejects_a_bad_file_naming_it_and_keeps_the_buffer(folder):
    source = data.BatchFolder(*folder, 8)
    out = np.full((3, 36, 36, 8), 7, np.uint8)
    write_hkl(source.files[1], np.zeros((3, 36, 36, 5), np.uint8))
    with pytest.raises(data.DataError, match=r'0001\.hkl: expected uint8 \(3, 36, 36, 8\), got '
                                             r'uint8 \(3, 36, 36, 5\)'):
        source.read_into(1, out)
    assert (out == 7).all()
    rows = data.BatchFolder(*folder, 8, rows=(0, 4))
    with pytest.raises(data.DataError, match=r'0001\.hkl: expected uint8 \(3, 36, 36, 8\)'):
        rows.read_into(1, out[..., :4])  # 5 images hold rows 0..3, but the file is not of 8
    write_hkl(source.files[2], np.zeros((3, 36, 36, 8), np.float32))
    with pytest.raises(data.DataError, match=r'0002\.hkl: expected uint8 .* got float32'):
        source.read_into(2, out)
    with open(source.files[0], 'wb') as f:
        f.write(b'garbage')
    with pytest.raises(data.DataError, match=r'0000\.hkl: cannot read batch file'):
        source.read_into(0, out)
    assert (out == 7).all()
