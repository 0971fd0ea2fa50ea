"""`mlem-jax train`: a UNet family by denoising score matching, resumable, one lock per --out."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, NamedTuple

from mlem_jax._errors import InputError
from mlem_jax.cli._common import (
    CLIError,
    check_out,
    command_line,
    exclusive,
    join_run,
    multiprocess_flags,
    positive,
    seed,
)


def add_parser(sub):
    """Register `mlem-jax train` on the subparsers `sub`."""
    t = sub.add_parser("train", help="train a UNet family by denoising score matching")
    t.add_argument("--dataset", default="digits",
                   help="digits (embedded, default), procedural, your own images (a folder of PNG/JPEG files, "
                        "centre-cropped and resized to --image-size, labels from subfolder names; or an .npy/.npz "
                        "array), or a tfds dataset prepared in --data-dir (mnist, fashion_mnist, cifar10, ...)")
    t.add_argument("--data-dir", default=None, help="tfds data dir holding the prepared dataset (never downloads)")
    t.add_argument("--image-size", type=positive(int), default=None, help="resize images to this size")
    t.add_argument("--nfs", type=positive(int), nargs="+", default=[4, 8, 16, 32],
                   help="base widths of the levels, increasing")
    t.add_argument("--ch-mult", type=positive(int), nargs="+", default=[1, 2, 2],
                   help="channel multipliers per resolution")
    t.add_argument("--schedule", choices=["vp", "flow"], default="vp",
                   help="vp: the VP SDE with eps-prediction and uniform times; flow: the rectified-flow path "
                        "x_t = (1 - t) x_0 + t eps with velocity prediction u = eps - x_0 and logit-normal times "
                        "(flow matching)")
    t.add_argument("--steps", type=positive(int), default=2000, help="training steps per level")
    t.add_argument("--batch-size", type=positive(int), default=128, help="training batch size")
    t.add_argument("--learning-rate", type=positive(float), default=2e-3, help="Adam learning rate after warm-up")
    t.add_argument("--seed", type=seed, default=0, help="seed of initialisation, data order and noise")
    t.add_argument("--checkpoint-every", type=positive(int), default=500, help="steps between checkpoints")
    t.add_argument("--eval-every", type=positive(int), default=250, help="steps between held-out losses")
    t.add_argument("--conditional", action="store_true",
                   help="class-conditional levels, trained on the dataset's labels (needed for --class/--guidance)")
    t.add_argument("--label-dropout", type=float, default=0.1,
                   help="with --conditional: the share of labels replaced by the null class, for guidance")
    t.add_argument("--out", default="runs/family", help="output folder: checkpoints/ and family.npz/.json")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoints in --out")
    t.add_argument("--overwrite", action="store_true",
                   help="start again from step 0, deleting the checkpoints already in --out")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.add_argument("--parallel-levels", action="store_true",
                   help="train the levels side by side, one group of local devices each (one process)")
    multiprocess_flags(t)
    t.set_defaults(func=run)


def _class_names(args) -> dict:
    """For a conditional family trained on a folder: {"class_names": [...]}, label i's folder name."""
    from mlem_jax.diffusion.folder import class_names

    names = class_names(args.dataset) if args.conditional else None
    return {"class_names": names} if names else {}


def _check_existing_family(args):
    """A family already in --out is replaced only with --overwrite: without --resume it would be
    lost to a new run, and a --resume with other --nfs would rewrite it with other levels."""
    from mlem_jax._atomic import read_json

    path = os.path.join(args.out, "family.json")
    if args.overwrite or not os.path.exists(path):
        return
    try:
        nfs = [int(level["nf"]) for level in read_json(path, f"--out: {path} is")["levels"]]
    except (KeyError, TypeError, ValueError):
        raise CLIError(f"--out: {path} is not a family file this version can read; pass --overwrite to replace it, "
                       "or choose another --out.") from None
    if not args.resume and not os.path.isdir(os.path.join(args.out, "checkpoints")):  # (with them, train refuses)
        raise CLIError(f"--out: {args.out} already holds a trained family (nf={nfs}); pass --resume to continue it, "
                       "--overwrite to replace it, or choose another --out.")
    if nfs != list(args.nfs):
        raise CLIError(f"--nfs: {args.out} holds a family with nf={nfs}; resuming with --nfs "
                       f"{' '.join(map(str, args.nfs))} would replace it. Pass --nfs {' '.join(map(str, nfs))} to "
                       "continue it, or choose another --out.")


def _check_free_space(out: str, family, image_shape) -> None:
    """Refuse before training when the disk under `out` cannot hold the checkpoints: per level, two kept
    steps of parameters, EMA and Adam's two moments (float32), plus the family file."""
    import shutil

    import jax

    from mlem_jax.diffusion.unet import count_params, init_params

    n = sum(count_params(jax.eval_shape(lambda m=m: init_params(m, jax.random.key(0), image_shape)))
            for m in family)
    need = n * 4 * 4 * 2 + n * 2  # bytes
    where = os.path.abspath(out)
    while not os.path.exists(where):
        where = os.path.dirname(where)
    free = shutil.disk_usage(where).free
    if free < 1.2 * need:
        raise CLIError(f"--out: {where} has {free / 1e6:.1f} MB free, but the checkpoints of these levels need about "
                       f"{need / 1e6:.1f} MB; free space or choose another --out.")


def run(args):
    """`mlem-jax train`: load the data, build the levels and the recipe, train them, write the family."""
    multiprocess = join_run(args)
    import jax

    data = _load_data(args)
    family, sde, config = _recipe(args, data.num_classes)
    if args.parallel_levels and multiprocess:
        raise CLIError("--parallel-levels: trains levels side by side on one process's devices; a multi-process "
                       "run trains them one after another over every device.")
    mesh = None
    if multiprocess or jax.device_count() > 1:
        from mlem_jax.parallel._mesh import batch_mesh

        mesh = None if args.parallel_levels else batch_mesh()
    primary = jax.process_index() == 0
    if primary:
        _check_free_space(args.out, family, data.train_x.shape[1:])
    say = print if primary else (lambda *a, **k: None)
    where = (f"process {jax.process_index()} of {jax.process_count()}, " if multiprocess else "") + \
        f"{jax.device_count()} device(s)" + (", levels side by side" if args.parallel_levels else "")
    say(f"training {len(family)} " + (f"class-conditional ({data.num_classes} classes) " if data.num_classes else "")
        + f"levels nf={list(args.nfs)} on {args.dataset} {data.train_x.shape[1:]} "
        f"({data.train_x.shape[0]} train / {data.test_x.shape[0]} held-out images), {args.steps} steps each; {where}")
    t0 = time.perf_counter()
    with exclusive(args.out) if primary else contextlib.nullcontext():
        results = _train(args, family, sde, config, data, mesh)
        losses = {m.nf: (h.test[-1][1] if h.test else None) for m, (_, h) in zip(family, results)}
        if not primary:  # process 0 writes the family
            return
        path = _save(args, family, results, sde, config, data, losses)
    for nf, loss in losses.items():
        print(f"  nf={nf:3d}: held-out DSM loss " + ("n/a (no new steps)" if loss is None else f"{loss:.4f}"))
    print(f"wrote {path} (EMA parameters, float16) in {time.perf_counter() - t0:.0f} s")


class _Data(NamedTuple):
    train_x: Any
    test_x: Any
    train_y: Any
    test_y: Any
    num_classes: int


def _load_data(args) -> _Data:
    from mlem_jax.diffusion.data import load_dataset

    train_y = test_y = None
    try:
        if args.conditional:
            train_x, train_y = load_dataset(args.dataset, "train", args.data_dir, args.image_size, with_labels=True)
            test_x, test_y = load_dataset(args.dataset, "test", args.data_dir, args.image_size, with_labels=True)
        else:
            train_x = load_dataset(args.dataset, "train", args.data_dir, args.image_size)
            test_x = load_dataset(args.dataset, "test", args.data_dir, args.image_size)
    except (ValueError, FileNotFoundError, ImportError) as e:  # decoders' ValueErrors are about the files
        raise CLIError(f"--dataset: {e}") from e
    num_classes = int(max(train_y.max(), test_y.max())) + 1 if args.conditional else 0
    return _Data(train_x, test_x, train_y, test_y, num_classes)


def _recipe(args, num_classes: int):
    """(levels, SDE, TrainConfig) from the flags, after refusing the ones that cannot work."""
    from mlem_jax.diffusion.objective import TrainConfig
    from mlem_jax.diffusion.sde import VP, Flow
    from mlem_jax.diffusion.unet import unet_family

    if not 0.0 <= args.label_dropout < 1.0:
        raise CLIError(f"--label-dropout: expected a share in [0, 1), got {args.label_dropout}.")
    check_out(os.path.join(args.out, "family.json"))
    if len(set(args.nfs)) != len(args.nfs):
        raise CLIError(f"--nfs: every level needs its own width (their checkpoints are kept by nf), got {args.nfs}.")
    _check_existing_family(args)
    try:
        family = unet_family(tuple(args.nfs), ch_mult=tuple(args.ch_mult), num_classes=num_classes)
    except InputError as e:
        raise CLIError(f"--nfs: {e}") from e
    flow = args.schedule == "flow"
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                         seed=args.seed, checkpoint_every=args.checkpoint_every, eval_every=args.eval_every,
                         label_dropout=args.label_dropout if args.conditional else 0.0,
                         parameterization="flow" if flow else "eps",
                         time_sampling="logit-normal" if flow else "uniform")
    return family, Flow() if flow else VP(), config


def _train(args, family, sde, config, data: _Data, mesh):
    from mlem_jax.diffusion.train import train_family

    try:
        return train_family(family, data.train_x, config, sde, data.test_x, os.path.join(args.out, "checkpoints"),
                            resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite,
                            mesh=mesh, parallel=args.parallel_levels, train_labels=data.train_y,
                            test_labels=data.test_y)
    except FileExistsError as e:
        raise CLIError(f"--out: {e}") from e
    except OSError as e:  # a full disk, a lost mount: the checkpoints already written are intact
        raise CLIError(f"--out: writing into {args.out} failed ({e.strerror or e}); the checkpoints written "
                       "before are kept: free space (or fix the folder) and rerun the same command with "
                       "--resume.") from e
    except InputError as e:  # a resume with another recipe, a batch larger than the data, ...
        name, _, text = str(e).partition(": ")
        raise CLIError(f"--{name.replace('_', '-')}: {text}") from e


def _save(args, family, results, sde, config, data: _Data, losses) -> str:
    from mlem_jax.diffusion.family import save_family

    return save_family(os.path.join(args.out, "family"), family, [s.ema_params for s, _ in results], sde,
                       config.parameterization, data.train_x.shape[1:],
                       extra={"command": command_line(args), "dataset": args.dataset,
                              "held_out_loss": {str(k): v for k, v in losses.items()},
                              "train_seconds": sum(h.seconds for _, h in results),
                              **({"num_classes": data.num_classes} if data.num_classes else {}),
                              **_class_names(args)})


