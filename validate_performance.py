"""Evaluate a snapshot on the validation set: top-1 error, top-5 error and loss.

    python validate_performance.py checkpoint=weights/model_60.pt ten_crop=True
    python validate_performance.py weights_dir=weights load_epoch=20    # weights/model_20.pt
    python validate_performance.py weights_dir=weights                  # its newest snapshot
    python validate_performance.py checkpoint=weights/model_60.pt data=data/other

Same config files and key=value overrides as train.py (data, val_folder, batch_size, gpu, ...),
plus `checkpoint` and `ten_crop`. The data (data, the folders, mean_file, batch_size, num_classes)
comes from the snapshot's run (its weights_dir/config.yaml, else the snapshot's own config) unless
given on the command line; the network (model, crop_size, dropout) from the snapshot's config.
With the centre crop this computes exactly what training's validation wrote in that epoch's row of
val_record.npy; ten_crop averages the softmax over the four corners and the centre of the crop
range, each also mirrored.
"""
import sys

import lib.env  # noqa: F401  first: without the packages, one line instead of a traceback

from lib import checkpoint, command, config, data, model, runs, trainer, training
SCHEMA = {**config.CONFIG, **config.SPEC_1GPU, **config.EVALUATE}


def validate(cfg):
    """(top-1 error, top-5 error, loss, images, snapshot path) of a snapshot on the val set."""
    path = cfg['checkpoint'] or checkpoint.snapshot_path(cfg['weights_dir'], cfg['load_epoch'])
    state = checkpoint.read(path)
    device = trainer.resolve_device(cfg['gpu'])
    net, settings = checkpoint.load_net(state, path, device, fallback=cfg)
    cfg = dict(cfg, **settings)
    val, = training.data_sources(cfg, splits=('val',))
    size = val.image_size()
    mean = training.mean_image(cfg, size)
    loader = data.InProcessLoader(val, mean, cfg['crop_size'], device, cfg['use_data_layer'])
    training.check_labels(model.output_classes(state['model']), [val], where=f'{path} has classes')
    plan, group = data.eval_plan(len(val), val.batch_size, size, cfg['crop_size'], cfg['ten_crop'])
    top1, top5, loss = trainer.evaluate(lambda x: net(x).float(), loader, plan, group)
    return top1, top5, loss, len(val) * val.batch_size, path


@command
def main(argv=None):
    cfg = runs.command_line(__doc__, argv, SCHEMA)
    top1, top5, loss, n, path = validate(cfg)
    views = 'ten crops' if cfg['ten_crop'] else 'centre crop'
    print(f'{path}: {n} images, {views}')
    print(f'top-1 error {top1:.6f} ({100 * (1 - top1):.4f} % accuracy)')
    print(f'top-5 error {top5:.6f} ({100 * (1 - top5):.4f} % accuracy)')
    print(f'loss {loss:.6f}')


if __name__ == '__main__':
    sys.exit(main())
