"""The pretraining loop behind ``python -m sslfast.pretrain``."""

import datetime
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from sslfast import distributed
from sslfast._memory import keep_freed_memory
from sslfast.methods import METHODS
from sslfast.pretrain import checkpoint
from sslfast.pretrain.backbones import build_backbone, check_backbone
from sslfast.pretrain.cli import (
    USER_ERRORS,
    WANTS_SYNC_BN,
    print_user_error,
    settings_from_args,
)
from sslfast.pretrain.data import (
    EncodedImages,
    decode_images,
    embedded_dataset,
    make_loader,
    stack_if_same_size,
)
from sslfast.pretrain.knn import knn_accuracy
from sslfast.pretrain.optim import build_optimizer, warmup_cosine
from sslfast.pretrain.sampler import ResumableSampler

GATHERING_METHODS = {"simclr", "mocov2", "mocov3"}


def _device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available")
    return name


def _init_distributed(device_type):
    """Under torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU. Returns the
    device and whether this call initialized the process group."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda" and local >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK={local} but this process sees {torch.cuda.device_count()} "
                         "CUDA device(s): launch one process per visible GPU "
                         "(torchrun --nproc-per-node at most the GPU count)")
    device = torch.device("cuda", local) if device_type == "cuda" else torch.device("cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device, False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, True


def _datasets(s, max_images, max_val_images):
    if s["data"] is None:
        train = embedded_dataset("train", size=max_images, image_size=32)
        val = embedded_dataset("test", size=max_val_images, image_size=32)
        return train, val
    train = EncodedImages.from_folder(s["data"])
    val = EncodedImages.from_folder(s["val_data"]) if s["val_data"] else None
    if max_images:
        train = torch.utils.data.Subset(train, range(min(max_images, len(train))))
        train.classes = train.dataset.classes
    return train, val


def _output_dir(requested, resume, method):
    if resume:
        run_dir = resume if os.path.isdir(resume) else os.path.dirname(os.path.abspath(resume))
        if requested is None or os.path.abspath(requested) == os.path.abspath(run_dir):
            return run_dir, True
    if requested is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        requested = os.path.join("runs", f"{method}-{stamp}")
    if os.path.isdir(requested) and os.listdir(requested):
        raise FileExistsError(f"--output-dir {requested} is not empty; pass --resume to "
                              f"continue that run or choose another folder")
    return requested, bool(resume)


class _Log:
    """JSON lines in ``log.jsonl`` and a progress line on stderr (rank 0 only)."""

    def __init__(self, path, enabled):
        self.path, self.enabled = path, enabled
        self.tty = sys.stderr.isatty()

    def event(self, kind, **fields):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"event": kind, "time": round(time.time(), 3), **fields}) + "\n")

    def progress(self, epoch, epochs, step, max_steps, loss, lr, ips):
        if not self.enabled:
            return
        width = 24
        filled = int(width * step / max(1, max_steps))
        line = (f"epoch {epoch + 1}/{epochs} [{'#' * filled}{'.' * (width - filled)}] "
                f"{step}/{max_steps}  loss {loss:.4f}  lr {lr:.3g}  {ips:,.0f} img/s")
        sys.stderr.write(("\r" + line) if self.tty else line + "\n")
        sys.stderr.flush()

    def done(self):
        if self.enabled and self.tty:
            sys.stderr.write("\n")


def _build_method(s, device):
    torch.manual_seed(s["seed"])  # the same initial weights on every rank and on resume
    backbone = build_backbone(s["backbone"])
    kwargs = dict(s["method_kwargs"], image_size=s["image_size"],
                  augment_dtype=torch.bfloat16 if s["bf16"] else torch.float32,
                  channels_last=s["channels_last"])
    if s["method"] in GATHERING_METHODS:
        kwargs["gather_distributed"] = s["world_size"] > 1
    method = METHODS[s["method"]](backbone.to(device), **kwargs).to(device)
    if s["channels_last"]:
        method.to(memory_format=torch.channels_last)
    return method


def pretrain(args):
    """Trains as the parsed command line says; returns the exit status. Under
    torchrun on CPU (a gloo group it made) it does not return: the process ends
    with that status after the group is destroyed (distributed.exit_process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    s = settings_from_args(args, world)
    device_type = _device(s["device"])
    check_backbone(s["backbone"])
    s["bf16"] = s["precision"] == "bf16" or (s["precision"] == "auto" and device_type == "cuda")
    train_set, val_set = _datasets(s, args.max_images, args.max_val_images)
    if len(train_set) < s["batch_size"]:
        raise ValueError(f"--batch-size {s['batch_size']} is larger than the training set "
                         f"({len(train_set)} images)")
    device, owns_group = _init_distributed(device_type)
    if device.type == "cpu":
        keep_freed_memory()
    rank = distributed.rank()
    try:
        out_dir, resuming = _output_dir(args.output_dir, args.resume, s["method"])
        ckpt = None
        if resuming:
            _, ckpt = checkpoint.load(args.resume, s)
        if world > 1:  # one folder name for all ranks (the timestamp)
            box = [out_dir]
            dist.broadcast_object_list(box, src=0)
            out_dir = box[0]
        if rank == 0:
            os.makedirs(out_dir, exist_ok=True)
        result = _train(s, args, train_set, val_set, device, out_dir, ckpt)
    except BaseException as exc:
        if owns_group and dist.get_backend() == "nccl":
            # One rank may have failed alone (a full disk on rank 0, an out-of-memory
            # error): its peers wait in their next collective, and destroying an NCCL
            # group waits for them. Exit now, as main() would; torchrun stops the peers.
            if isinstance(exc, USER_ERRORS):
                print_user_error(exc)
            else:
                traceback.print_exc()
            distributed.exit_process(2 if isinstance(exc, USER_ERRORS) else 1)
        if owns_group:
            dist.destroy_process_group()
        raise
    if owns_group:
        gloo = dist.get_backend() == "gloo"
        dist.destroy_process_group()
        if gloo:  # its worker threads may outlive the group (see exit_process)
            distributed.exit_process(result)
    return result


def _train(s, args, train_set, val_set, device, out_dir, ckpt):
    rank, world = distributed.rank(), s["world_size"]
    log = _Log(os.path.join(out_dir, "log.jsonl"), rank == 0)
    method = _build_method(s, device)
    sync_bn = s["sync_bn"] == "on" or (s["sync_bn"] == "auto" and world > 1 and
                                       device.type == "cuda" and s["method"] in WANTS_SYNC_BN)
    if sync_bn:
        if device.type != "cuda":
            raise ValueError("--sync-bn on needs CUDA (torch's SyncBatchNorm is GPU-only)")
        # In place; it keeps the Parameter objects, so the EMA teacher's pairing holds.
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    if s["compile"]:
        method.backbone.compile()
    model = method
    if world > 1:
        model = DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)  # queue and teacher buffers stay per rank (kept equal)
    optimizer = build_optimizer(s["optimizer"], method, s["lr"], s["weight_decay"])
    per_rank = s["batch_size"] // world
    sampler = ResumableSampler(len(train_set), per_rank, distributed.rank(), world, s["seed"])
    steps_per_epoch = sampler.batches_per_epoch
    max_steps = s["epochs"] * steps_per_epoch
    warmup = round(s["warmup_epochs"] * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, max_steps))
    generator = torch.Generator(device=device).manual_seed(s["seed"] * 1_000_003 + rank)
    step = 0
    if ckpt is not None:
        method.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step = ckpt["step"]
        checkpoint.set_rng_state(ckpt["rng"][rank], generator)
        log.event("resume", step=step)
    else:
        log.event("start", settings={k: v for k, v in s.items()}, device=str(device),
                  torch=torch.__version__, steps_per_epoch=steps_per_epoch, max_steps=max_steps)
    loader = make_loader(train_set, per_rank, shuffle=False, drop_last=True,
                         num_workers=s["num_workers"], sampler=sampler)
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")

    def save():
        payload = dict(format=checkpoint.FORMAT, settings=s, step=step,
                       model=method.state_dict(), optimizer=optimizer.state_dict(),
                       scheduler=scheduler.state_dict(),
                       rng=checkpoint.all_rng_states(generator))
        if rank == 0:
            checkpoint.save(ckpt_path, payload)
        log.event("checkpoint", step=step, path=ckpt_path)

    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=s["bf16"])
    t0, start_step, last_saved = time.time(), step, step
    method.train()
    while step < max_steps:
        epoch, batch = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch, batch)
        method.set_epoch(epoch)
        for encoded, _ in loader:
            loss = train_step(method, model, optimizer, encoded, device, generator, amp)
            scheduler.step()
            method.step_end(step, max_steps)
            step += 1
            if step % s["log_every"] == 0 or step == max_steps:
                ips = (step - start_step) * s["batch_size"] / (time.time() - t0)
                lr = optimizer.param_groups[0]["lr"]
                value = float(loss.detach())
                log.event("step", step=step, epoch=epoch, loss=value, lr=lr,
                          momentum=method.momentum, images_per_s=ips)
                log.progress(epoch, s["epochs"], step, max_steps, value, lr, ips)
            end_of_epoch = step % steps_per_epoch == 0
            if (s["checkpoint_every"] and step % s["checkpoint_every"] == 0) or \
                    (not s["checkpoint_every"] and end_of_epoch) or \
                    step == s["stop_after_step"]:
                save()
                last_saved = step
            if step == s["stop_after_step"]:
                log.done()
                return 0
    if last_saved != step:
        save()
    log.done()
    train_seconds = time.time() - t0
    if s["knn"]:  # every rank: each embeds its shard of the training set
        if val_set is None:
            if rank == 0:
                print("kNN evaluation skipped: pass --val-data (a labelled ImageFolder)")
        else:
            _knn(s, method, train_set, val_set, device, log, train_seconds)
    return 0


def train_step(method, model, optimizer, encoded, device, generator, autocast):
    """One optimizer step from a batch of encoded images: decoded on ``device``,
    augmented into the method's views, the loss of ``model`` (the method, or
    its DDP wrapper) under ``autocast``, backward, ``optimizer.step()``. The caller
    steps the schedule and calls ``method.step_end``. Returns the loss."""
    images = stack_if_same_size(decode_images(encoded, device))
    views = method.augment(images, generator)
    with autocast:
        loss = model(views)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    method.before_optimizer_step()
    optimizer.step()
    return loss


def rank0_buffers(module):
    """The module's buffers (BatchNorm's running statistics) made rank 0's on every
    rank: DDP keeps the parameters equal, but with broadcast_buffers=False and no
    SyncBN each rank's running statistics follow its own batches. Collective."""
    if distributed.world_size() > 1:
        for b in module.buffers():
            dist.broadcast(b, src=0)


def _knn(s, method, train_set, val_set, device, log, train_seconds):
    kw = dict(k=s["knn_k"], t=s["knn_t"], channels_last=s["channels_last"],
              autocast_dtype=torch.bfloat16 if s["bf16"] else None,
              num_workers=s["num_workers"], distributed=True)
    rank0_buffers(method.backbone)  # one network: rank 0's, the one the checkpoint holds
    acc = knn_accuracy(method.backbone, train_set, val_set, device, s["image_size"], **kw)
    torch.manual_seed(s["seed"])  # the very weights training started from
    baseline = build_backbone(s["backbone"]).to(device)
    base_acc = knn_accuracy(baseline, train_set, val_set, device, s["image_size"], **kw)
    log.event("knn", knn_accuracy=acc, random_init_knn_accuracy=base_acc, k=s["knn_k"],
              t=s["knn_t"], train_seconds=train_seconds)
    if distributed.rank() != 0:
        return
    print(f"kNN accuracy (k={s['knn_k']}, cosine, t={s['knn_t']}): {100 * acc:.1f} %   "
          f"same backbone at random init: {100 * base_acc:.1f} %   "
          f"(training {train_seconds:.0f} s)")
