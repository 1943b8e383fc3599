"""``python -m sslfast.pretrain`` / ``sslfast-pretrain``: self-supervised
pretraining on one CPU, one GPU, or many under ``torchrun``."""

import argparse
import dataclasses
import os
import sys

from sslfast.augment.config import AugmentConfig
from sslfast.methods import METHODS
from sslfast.pretrain.optim import OPTIMIZERS

# Per method: extra constructor arguments the command line can set.
METHOD_ARGS = {
    "simclr": ("hidden_dim", "output_dim", "temperature"),
    "mocov2": ("hidden_dim", "output_dim", "temperature", "queue_size", "momentum"),
    "mocov3": ("hidden_dim", "output_dim", "temperature", "momentum"),
    "byol": ("hidden_dim", "output_dim", "momentum"),
    "simsiam": ("hidden_dim", "output_dim"),
    "dino": ("hidden_dim", "output_dim", "momentum", "n_local_views"),
}
# Methods whose BatchNorm should see the global batch under DDP (MoCo v2 shuffles instead).
WANTS_SYNC_BN = {"simclr", "mocov3", "byol", "simsiam", "dino"}
DEFAULT_WEIGHT_DECAY = {"sgd": 5e-4, "adamw": 0.05, "lars": 1e-6}
# Defaults where the command line leaves them open. The embedded data's recipe is
# sized for a 2-core CPU (the default run: < 10 minutes, see the README): a small CNN,
# AdamW, no blur on 32² images (as lightly's CIFAR-10 recipes), crops of at least 20 %
# (smaller ones of a 32² image often miss the shape), NT-Xent at temperature 0.2.
DEFAULTS = {"backbone": "resnet18", "epochs": 100, "optimizer": "sgd", "image_size": 224}
EMBEDDED_DEFAULTS = {"backbone": "tiny", "epochs": 20, "optimizer": "adamw", "image_size": 32}
EMBEDDED_AUGMENT = {"blur_p": 0.0, "crop_scale": (0.2, 1.0)}
EMBEDDED_TEMPERATURE = 0.2
# Base learning rate per 256 images of global batch.
DEFAULT_BASE_LR = {"sgd": 0.12, "adamw": 1e-3, "lars": 0.3}


def _parse_augment(items):
    fields = {f.name for f in dataclasses.fields(AugmentConfig)} - {"output_size", "dtype",
                                                                    "channels_last"}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--augment: expected FIELD=VALUE with FIELD one of "
                             f"{', '.join(sorted(fields))}, got {item!r}")
        try:
            parts = [float(v) for v in value.split(",")]
        except ValueError:
            raise ValueError(f"--augment {key}: not a number or a list of numbers: "
                             f"{value!r}") from None
        out[key] = tuple(parts) if len(parts) > 1 else \
            (int(parts[0]) if key == "blur_kernel_size" else parts[0])
    try:
        AugmentConfig(**out)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--augment: {exc}") from None
    return out


def parser():
    p = argparse.ArgumentParser(
        prog="sslfast-pretrain", description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", default="simclr", help=f"one of {', '.join(METHODS)}")
    p.add_argument("--data", default=None, help="an ImageFolder root (class folders of "
                   "JPEG/PNG files); default: the embedded synthetic dataset")
    p.add_argument("--val-data", default=None, help="labelled ImageFolder for the kNN "
                   "evaluation (default: the embedded test split with the embedded data)")
    p.add_argument("--backbone", default=None,
                   help="resnet18..resnet152 (torchvision), tiny, or a timm model name "
                        "(default: resnet18; tiny on the embedded data)")
    p.add_argument("--image-size", type=int, default=None,
                   help="training crop size (default: 224; 32 on the embedded data)")
    p.add_argument("--batch-size", type=int, default=256, help="global batch size")
    p.add_argument("--epochs", type=int, default=None,
                   help="default: 100; 20 on the embedded data")
    p.add_argument("--optimizer", default=None, choices=OPTIMIZERS,
                   help="default: sgd; adamw on the embedded data")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: a base rate per 256 images times "
                        "batch/256: sgd 0.12, adamw 1e-3, lars 0.3)")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="default: sgd 5e-4, adamw 0.05, lars 1e-6")
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    p.add_argument("--sync-bn", default="auto", choices=("auto", "on", "off"),
                   help="auto: on under DDP on GPUs for the methods that want it")
    p.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--output-dir", default=None, help="default: runs/<method>-<time>")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="steps between checkpoints (0: at the end of every epoch)")
    p.add_argument("--resume", default=None, help="a checkpoint file or run directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    p.add_argument("--knn-k", type=int, default=200)
    p.add_argument("--knn-t", type=float, default=0.1)
    p.add_argument("--no-knn", action="store_true", help="skip the final kNN evaluation")
    g = p.add_argument_group("method options (default: the method's own)")
    g.add_argument("--hidden-dim", type=int, default=None)
    g.add_argument("--output-dim", type=int, default=None)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--queue-size", type=int, default=None, help="MoCo v2")
    g.add_argument("--momentum", type=float, default=None, help="EMA teacher base momentum")
    g.add_argument("--n-local-views", type=int, default=None, help="DINO")
    g.add_argument("--augment", nargs="+", default=[], metavar="FIELD=VALUE",
                   help="changes to the method's augmentation preset (AugmentConfig fields), "
                        "e.g. blur_p=0 crop_scale=0.2,1")
    p.add_argument("--max-images", type=int, default=None,
                   help="train on the first N images only (embedded data: N generated)")
    p.add_argument("--max-val-images", type=int, default=None,
                   help="embedded data: N test images for the kNN evaluation")
    # Stops right after the checkpoint of this step, as a kill would (resume tests).
    p.add_argument("--stop-after-step", type=int, default=None, help=argparse.SUPPRESS)
    return p


def settings_from_args(args, world_size):
    """Validated settings (a plain dict: it goes into the checkpoint)."""
    defaults = DEFAULTS if args.data is not None else EMBEDDED_DEFAULTS
    args = argparse.Namespace(**{k: defaults[k] if v is None and k in defaults else v
                                 for k, v in vars(args).items()})
    if args.method not in METHODS:
        raise ValueError(f"--method: unknown method {args.method!r}; choose from "
                         f"{', '.join(METHODS)}")
    for name in ("batch_size", "epochs", "log_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.batch_size % world_size:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by the world size "
                         f"{world_size}")
    if args.image_size is not None and args.image_size < 8:
        raise ValueError("--image-size must be >= 8")
    if args.val_data is not None and args.data is None:
        raise ValueError("--val-data needs --data (the embedded data brings its own test split)")
    for name in ("max_images", "max_val_images", "knn_k", "hidden_dim", "output_dim",
                 "queue_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.n_local_views is not None and args.n_local_views < 0:
        raise ValueError("--n-local-views must be >= 0")
    for name in ("knn_t", "temperature"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if args.momentum is not None and not 0 <= args.momentum <= 1:
        raise ValueError("--momentum must be in [0, 1]")
    if args.checkpoint_every < 0 or args.num_workers < 0 or args.warmup_epochs < 0:
        raise ValueError("--checkpoint-every, --num-workers and --warmup-epochs must be >= 0")
    if args.lr is not None and args.lr <= 0:
        raise ValueError("--lr must be positive")
    for path, flag in ((args.data, "--data"), (args.val_data, "--val-data")):
        if path is not None and not os.path.isdir(path):
            raise FileNotFoundError(f"{flag}: no such folder: {path}")
    method_kwargs = {}
    for key in ("hidden_dim", "output_dim", "temperature", "queue_size", "momentum",
                "n_local_views"):
        value = getattr(args, key)
        if value is None:
            continue
        if key not in METHOD_ARGS[args.method]:
            raise ValueError(f"--{key.replace('_', '-')} does not apply to --method "
                             f"{args.method}")
        method_kwargs[key] = value
    if args.data is None and "temperature" in METHOD_ARGS[args.method]:
        method_kwargs.setdefault("temperature", EMBEDDED_TEMPERATURE)
    augment = {**(EMBEDDED_AUGMENT if args.data is None else {}),
               **_parse_augment(args.augment)}
    if augment:
        method_kwargs.update(augment)
    lr = args.lr if args.lr is not None else \
        DEFAULT_BASE_LR[args.optimizer] * args.batch_size / 256
    wd = args.weight_decay if args.weight_decay is not None else \
        DEFAULT_WEIGHT_DECAY[args.optimizer]
    return dict(
        method=args.method, backbone=args.backbone, data=args.data, val_data=args.val_data,
        image_size=args.image_size,
        batch_size=args.batch_size, epochs=args.epochs, optimizer=args.optimizer, lr=lr,
        weight_decay=wd, warmup_epochs=args.warmup_epochs, precision=args.precision,
        channels_last=args.channels_last, compile=args.compile, sync_bn=args.sync_bn,
        num_workers=args.num_workers, device=args.device, seed=args.seed,
        world_size=world_size, method_kwargs=method_kwargs,
        checkpoint_every=args.checkpoint_every, log_every=args.log_every, knn=not args.no_knn,
        knn_k=args.knn_k, knn_t=args.knn_t, stop_after_step=args.stop_after_step)


def main(argv=None):
    from sslfast.pretrain.train import pretrain

    args = parser().parse_args(argv)
    try:
        return pretrain(args)
    except USER_ERRORS as exc:
        print_user_error(exc)
        return 2


# Bad input: a one-line message and exit status 2, no traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)


def print_user_error(exc):
    print(f"sslfast-pretrain: error: {exc}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
