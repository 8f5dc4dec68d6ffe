"""Atomic file writes, used by preprocessing and training alike: write under a temporary name in the
same folder, then rename over the final name, so 'the file exists' means 'the file is complete'."""
import os

import numpy as np


def atomic_write(path, write):
    """write(tmp_path), then rename it to path; the temp ('.<name>.tmp<pid>') never survives."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f'.{name}.tmp{os.getpid()}')
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_npy(path, array):
    def write(tmp):
        with open(tmp, 'wb') as f:  # a file object: np.save(name) would append '.npy' to the temp name
            np.save(f, array)
    atomic_write(path, write)


def save_text(path, text):
    def write(tmp):
        with open(tmp, 'w', encoding='utf-8', errors='surrogateescape', newline='\n') as f:
            f.write(text)
    atomic_write(path, write)
