"""The ImageNet devkit: the WNID of each val image (through its ILSVRC id) and the words of each class.

Either `devkit` names the devkit archive (ILSVRC2012_devkit_t12.tar.gz, ILSVRC2014_devkit.tgz) or a
folder, and the two files are found in it: at its top, in data/, or in <top folder>/data/:
    ILSVRC2014 (the original's): meta_clsloc.mat, ILSVRC2014_clsloc_validation_ground_truth.txt
    ILSVRC2012:                  meta.mat,        ILSVRC2012_validation_ground_truth.txt
or meta_clsloc_mat and val_label_file name them (either version, any file names). The two
versions number the classes differently; each ground truth goes with its own synsets and both
give the same WNID to every image.
meta*.mat: struct array `synsets`, field 0 = ILSVRC id (1-based), field 1 = WNID, `words` = the names
('tench, Tinca tinca'); the ground truth: the ILSVRC id of val image N on line N.
"""
import io
import os
import tarfile
import zlib
from dataclasses import dataclass

import numpy as np
import scipy.io

from preprocessing import PrepError

VERSIONS = [('meta_clsloc.mat', 'ILSVRC2014_clsloc_validation_ground_truth.txt'),   # ILSVRC2014
            ('meta.mat', 'ILSVRC2012_validation_ground_truth.txt')]                 # ILSVRC2012


@dataclass
class Devkit:
    wnid_of: dict        # {ILSVRC id: WNID}
    words_of: dict       # {WNID: words}; empty if the synsets have no `words` field
    ground_truth: list   # ILSVRC id of val image N at index N - 1
    mat: str             # where the synsets and the ground truth came from (for messages)
    gt: str


def read_devkit(cfg):
    """The Devkit of a loaded paths file (keys devkit, or meta_clsloc_mat and val_label_file)."""
    if cfg['devkit']:
        if cfg['meta_clsloc_mat'] or cfg['val_label_file']:
            raise PrepError('set either devkit or meta_clsloc_mat and val_label_file in the paths file, '
                            'not both')
        mat, mat_bytes, gt, gt_bytes = find_in_devkit(cfg['devkit'])
    else:
        for key in ('meta_clsloc_mat', 'val_label_file'):
            if not cfg[key]:
                raise PrepError('the imagenet layouts need devkit (or meta_clsloc_mat and val_label_file) in '
                                'the paths file')
        mat, gt = cfg['meta_clsloc_mat'], cfg['val_label_file']
        mat_bytes, gt_bytes = read_file(mat), read_file(gt)
    wnid_of, words_of = read_synsets(mat_bytes, mat)
    return Devkit(wnid_of, words_of, read_ground_truth(gt_bytes, gt), mat, gt)


def read_file(path):
    try:
        with open(path, 'rb') as f:
            return f.read()
    except OSError as e:
        raise PrepError(f'cannot read devkit file {path}: {e.strerror}') from None


def find_in_devkit(path):
    """(name, bytes) of the synsets and of the ground truth of the first version found in a devkit
    archive or folder (the files at its top, in data/, or in <top folder>/data/)."""
    wanted = {f for pair in VERSIONS for f in pair}
    found = {}
    if os.path.isdir(path):
        places = ['', 'data'] + [os.path.join(sub, 'data') for sub in sorted(os.listdir(path))]
        for place in places:
            for f in wanted - found.keys():
                candidate = os.path.join(path, place, f)
                if os.path.isfile(candidate):
                    found[f] = (os.path.normpath(candidate), None)
    elif os.path.isfile(path):
        try:
            with tarfile.open(path, 'r:*') as tar:
                for m in tar:
                    parts = m.name.lstrip('./').split('/')
                    if m.isreg() and (len(parts) == 1 or parts[-2] == 'data' and len(parts) in (2, 3)) \
                            and parts[-1] in wanted and parts[-1] not in found:
                        found[parts[-1]] = (f'{path} member {m.name}', tar.extractfile(m).read())
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise PrepError(f'cannot read devkit archive {path} ({type(e).__name__}: {e})') from None
    else:
        raise PrepError(f'devkit {path} is neither a folder nor an archive')
    for mat, gt in VERSIONS:
        if mat in found and gt in found:
            (mat_name, mat_bytes), (gt_name, gt_bytes) = found[mat], found[gt]
            # None: a file of the folder, read now (b'' is an empty archive member, kept)
            return (mat_name, read_file(mat_name) if mat_bytes is None else mat_bytes,
                    gt_name, read_file(gt_name) if gt_bytes is None else gt_bytes)
    instead = ('; or, instead of devkit, set meta_clsloc_mat and val_label_file to the synsets and '
               'ground-truth files')
    for mat, gt in VERSIONS:
        if (mat in found) != (gt in found):
            have, lack = (mat, gt) if mat in found else (gt, mat)
            raise PrepError(f'devkit {path} holds {have} but not {lack} (at its top, in data/ or in '
                            f'<folder>/data/){instead}')
    raise PrepError(f'devkit {path} holds neither {VERSIONS[0][0]} + {VERSIONS[0][1]} (ILSVRC2014) nor '
                    f'{VERSIONS[1][0]} + {VERSIONS[1][1]} (ILSVRC2012), at its top, in data/ or in '
                    f'<folder>/data/{instead}')


def read_ground_truth(data, name):
    try:
        return [int(w) for w in data.decode('ascii').split()]
    except (ValueError, UnicodeDecodeError) as e:
        raise PrepError(f'{name}: expected one integer ILSVRC id per line ({e})') from None


def read_synsets(data, name):
    """({ILSVRC id: WNID}, {WNID: words}) from the bytes of a devkit meta*.mat."""
    try:
        synsets = np.ravel(scipy.io.loadmat(io.BytesIO(data), squeeze_me=True)['synsets'])
        wnid_of = {int(s[0]): str(s[1]) for s in synsets}
        has_words = 'words' in (synsets.dtype.names or ())
        return wnid_of, ({str(s[1]): str(s['words']) for s in synsets} if has_words else {})
    except (ValueError, KeyError, IndexError, TypeError, OSError) as e:
        raise PrepError(f'{name}: expected a struct array `synsets` (field 0 = ILSVRC id, 1 = WNID) '
                        f'({type(e).__name__}: {e})') from None
