"""``python -m sslfast.pretrain``: end to end on the embedded data, exact resume
after a kill, DDP under torchrun (gloo), bad input, and its parts (sampler,
LARS, learning-rate schedule)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from sslfast.pretrain.cli import main
from sslfast.pretrain.optim import LARS, warmup_cosine
from sslfast.pretrain.sampler import ResumableSampler
from tests.utils import spawn_gloo

TINY = ["--backbone", "tiny", "--max-images", "64", "--max-val-images", "40",
        "--batch-size", "16", "--epochs", "2", "--num-workers", "0", "--log-every", "1"]
METHOD_TINY = {
    "simclr": ["--hidden-dim", "32", "--output-dim", "16"],
    "mocov2": ["--hidden-dim", "32", "--output-dim", "16", "--queue-size", "40"],
    "mocov3": ["--hidden-dim", "32", "--output-dim", "16"],
    "byol": ["--hidden-dim", "32", "--output-dim", "16"],
    "simsiam": ["--hidden-dim", "32", "--output-dim", "16"],
    "dino": ["--hidden-dim", "32", "--output-dim", "64", "--n-local-views", "2"],
}


def _args(method, out, *extra):
    return ["--method", method, "--output-dir", str(out), *TINY, *METHOD_TINY[method], *extra]


def _events(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_cli_end_to_end_on_the_embedded_data(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args("simclr", out)) == 0
    events = _events(out)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "knn"
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 9))  # 64 // 16 * 2 epochs
    assert all(e["images_per_s"] > 0 and e["loss"] == e["loss"] for e in steps)
    knn = events[-1]
    assert 0 <= knn["knn_accuracy"] <= 1 and 0 <= knn["random_init_knn_accuracy"] <= 1
    assert "kNN accuracy" in capsys.readouterr().out
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 8 and ckpt["settings"]["method"] == "simclr"


@pytest.mark.parametrize("method", ["simclr", "mocov2", "byol", "dino"])
def test_kill_and_resume_is_bit_exact(method, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(_args(method, full, "--no-knn", "--checkpoint-every", "3")) == 0
    # The "kill": the run stops right after its checkpoint at step 3 (mid-epoch 0).
    assert main(_args(method, cut, "--no-knn", "--checkpoint-every", "3",
                      "--stop-after-step", "3")) == 0
    assert torch.load(cut / "checkpoint.pt", weights_only=False)["step"] == 3
    assert main(_args(method, cut, "--no-knn", "--checkpoint-every", "3",
                      "--resume", str(cut))) == 0
    a = torch.load(full / "checkpoint.pt", weights_only=False)
    b = torch.load(cut / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 8
    assert a["model"].keys() == b["model"].keys()
    for k, v in a["model"].items():  # weights, EMA teacher, queue + pointer, DINO center
        assert torch.equal(v, b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    assert a["scheduler"] == b["scheduler"]
    assert torch.equal(a["rng"][0]["augment"], b["rng"][0]["augment"])
    losses = [e["loss"] for e in _events(full) if e["event"] == "step"]
    resumed = [e["loss"] for e in _events(cut) if e["event"] == "step"]
    assert resumed == losses[:3] + losses[3:]  # the same sequence, step for step


@pytest.mark.parametrize("method", ["mocov3", "simsiam"])
def test_other_methods_run(method, tmp_path):
    assert main(_args(method, tmp_path / "r", "--no-knn")) == 0


def test_torchrun_ddp_on_cpu(tmp_path):
    """Two gloo processes under torchrun: one checkpoint, the same model on both ranks
    (DDP), the queue shared."""
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "sslfast.pretrain", *_args("mocov2", out, "--max-val-images", "40")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = _events(out)
    assert events[0]["settings"]["world_size"] == 2
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(1, 9))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert len(ckpt["rng"]) == 2  # every rank's generators
    assert int(ckpt["model"]["queue.ptr"]) == (8 * 16) % 40  # keys of both ranks enqueued
    assert events[-1]["event"] == "knn"


def test_torchrun_rejects_a_batch_not_divisible_by_the_world(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(_args("simclr", tmp_path / "r")) == 2
    assert "not divisible by the world size 3" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv, message", [
    (["--method", "swav"], "--method: unknown method 'swav'"),
    (["--backbone", "resnet9000"], "--backbone: unknown model 'resnet9000'"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--batch-size", "4096"], "--batch-size 4096 is larger than the training set"),
    (["--queue-size", "8"], "--queue-size does not apply to --method simclr"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--knn-k", "0"], "--knn-k must be >= 1"),
    (["--knn-t", "0"], "--knn-t must be positive"),
    (["--temperature", "0"], "--temperature must be positive"),
    (["--hidden-dim", "-1"], "--hidden-dim must be >= 1"),
    (["--max-images", "0"], "--max-images must be >= 1"),
    (["--val-data", "."], "--val-data needs --data"),
])
def test_bad_arguments(argv, message, tmp_path, capsys):
    """Every setting is checked before anything runs or is written."""
    out = tmp_path / "r"
    assert main(["--output-dir", str(out), *TINY, *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_bad_data_folders(tmp_path, capsys):
    assert main(["--data", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "r")]) == 2
    assert "--data: no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["--data", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "r")]) == 2
    assert "empty" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_nothing_is_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args("simclr", out, "--no-knn", "--epochs", "1")) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # Another method's checkpoint cannot be resumed ...
    assert main(_args("byol", out, "--no-knn", "--resume", str(out))) == 2
    assert "checkpoint of --method simclr, not byol" in capsys.readouterr().err
    # ... nor other settings, and a used folder is not reused without --resume.
    assert main(_args("simclr", out, "--no-knn", "--resume", str(out), "--epochs", "3")) == 2
    assert "epochs: 1 (checkpoint) vs 3" in capsys.readouterr().err
    assert main(_args("simclr", out, "--no-knn")) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main(_args("simclr", tmp_path / "x", "--resume", str(tmp_path / "none"))) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_sampler_splits_global_batches_and_resumes_mid_epoch():
    ranks = [ResumableSampler(50, 4, r, 3, seed=7) for r in range(3)]
    assert ranks[0].batches_per_epoch == 4  # 50 // 12, the remainder dropped
    for s in ranks:
        s.set_epoch(2)
    orders = [list(s) for s in ranks]
    flat = [i for b in range(4) for r in range(3) for i in orders[r][b * 4:(b + 1) * 4]]
    assert flat == torch.randperm(50, generator=torch.Generator().manual_seed(9)).tolist()[:48]
    ranks[1].set_epoch(2, start_batch=3)
    assert list(ranks[1]) == orders[1][12:] and len(ranks[1]) == 4
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableSampler(10, 4, 0, 3)


def test_lars_scales_by_the_trust_ratio():
    w = torch.nn.Parameter(torch.full((2, 2), 3.0))
    b = torch.nn.Parameter(torch.ones(2))
    opt = LARS([w, b], lr=0.1, momentum=0.0, weight_decay=0.5, trust_coefficient=0.01)
    w.grad, b.grad = torch.ones(2, 2), torch.ones(2)
    opt.step()
    g = torch.ones(2, 2) + 0.5 * 3.0  # weight decay on the matrix only
    trust = 0.01 * torch.linalg.vector_norm(torch.full((2, 2), 3.0)) / torch.linalg.vector_norm(g)
    torch.testing.assert_close(w.detach(), torch.full((2, 2), 3.0) - 0.1 * trust * g)
    torch.testing.assert_close(b.detach(), torch.ones(2) - 0.1)  # no decay, no scaling


def test_warmup_cosine_schedule():
    f = warmup_cosine(4, 20)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and abs(f(12) - 0.5) < 1e-12 and f(20) == 0.0


def test_augment_option_changes_every_view(tmp_path, capsys):
    from sslfast.pretrain.cli import _parse_augment

    assert _parse_augment(["blur_p=0", "crop_scale=0.2,1"]) == {"blur_p": 0.0,
                                                                "crop_scale": (0.2, 1.0)}
    for bad, message in ((["sharpness=1"], "expected FIELD=VALUE"),
                         (["blur_p=often"], "not a number"),
                         (["crop_scale=0,1"], "crop_scale must lie in")):
        with pytest.raises(ValueError, match=message):
            _parse_augment(bad)
    from sslfast.augment.config import byol_configs, dino_configs

    assert [c.blur_p for c in byol_configs(32, blur_p=0.0)] == [0.0, 0.0]
    assert [c.output_size for c in dino_configs(32, 16, blur_p=0.0)] == [32, 32, 16]
    assert main(_args("byol", tmp_path / "r", "--no-knn", "--epochs", "1",
                      "--augment", "solarize_p=0")) == 0


def test_keep_freed_memory_then_peak_memory_still_counts():
    """The CLI keeps freed blocks in the heap on the CPU (no mmap churn per step);
    peak_memory must still see a fresh allocation afterwards."""
    from sslfast._memory import keep_freed_memory, peak_memory

    keep_freed_memory()
    _, peak = peak_memory(lambda: torch.ones(64 << 20, dtype=torch.uint8).sum(), "cpu")
    if peak is None:
        pytest.skip("the OS cannot reset the RSS peak")
    assert peak >= 60 << 20


def test_resume_from_a_checkpoint_file_in_the_working_directory(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert main(_args("simclr", out, "--no-knn", "--stop-after-step", "2")) == 0
    monkeypatch.chdir(out)
    assert main(_args("simclr", ".", "--no-knn", "--resume", "checkpoint.pt")[2:]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 8
    # Resuming into another, non-empty folder is refused (nothing overwritten there).
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    assert main(_args("simclr", other, "--no-knn", "--resume", str(out))) == 2
    assert "is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["keep.txt"]


def test_timm_vits_take_dino_local_crops():
    pytest.importorskip("timm")
    from sslfast.pretrain.backbones import build_backbone

    vit = build_backbone("timm:vit_tiny_patch16_224")
    assert vit(torch.zeros(1, 3, 96, 96)).shape == (1, vit.num_features)


def test_dino_local_views_keep_their_crop_scale():
    from sslfast.augment.config import dino_configs

    g1, g2, local = dino_configs(32, 16, crop_scale=(0.2, 1.0), blur_p=0.0)
    assert g1.crop_scale == g2.crop_scale == (0.2, 1.0)
    assert local.crop_scale == (0.05, 0.4) and local.blur_p == 0.0


def test_bf16_autocast_on_the_cpu(tmp_path):
    assert main(_args("mocov2", tmp_path / "r", "--no-knn", "--epochs", "1",
                      "--precision", "bf16")) == 0


def test_local_rank_beyond_the_visible_gpus_is_a_clear_error(monkeypatch):
    from sslfast.pretrain import train

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="LOCAL_RANK=1 but this process sees 1 CUDA device"):
        train._init_distributed("cuda")


def test_a_rank_failing_alone_under_nccl_exits_without_destroying(tmp_path, monkeypatch, capsys):
    # Destroying an NCCL group waits for the peers, which wait in their next collective:
    # the failing rank prints its traceback and exits; torchrun then stops the peers.
    from sslfast.pretrain import train

    calls = []
    monkeypatch.setattr(train, "_init_distributed", lambda device_type: (torch.device("cpu"),
                                                                         True))
    monkeypatch.setattr(train.dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(train.dist, "destroy_process_group", lambda: calls.append("destroy"))

    def fail(*args):
        raise OSError("No space left on device")

    def bad_input(*args):
        raise ValueError("bad")

    def exit_(code):
        calls.append(("exit", code))
        raise SystemExit(code)

    monkeypatch.setattr(train, "_train", fail)
    monkeypatch.setattr(train.os, "_exit", exit_)
    with pytest.raises(SystemExit):
        main(_args("simclr", tmp_path / "r"))
    assert calls == [("exit", 1)]
    assert "No space left on device" in capsys.readouterr().err
    monkeypatch.setattr(train, "_train", bad_input)
    calls.clear()
    with pytest.raises(SystemExit):  # bad input: main()'s message and status
        main(_args("simclr", tmp_path / "r3"))
    assert calls == [("exit", 2)]
    assert "sslfast-pretrain: error: bad" in capsys.readouterr().err
    monkeypatch.setattr(train.dist, "get_backend", lambda: "gloo")  # gloo: raise, destroy
    monkeypatch.setattr(train, "_train", fail)
    calls.clear()
    with pytest.raises(OSError):
        main(_args("simclr", tmp_path / "r2"))
    assert calls == ["destroy"]
    # gloo, success: destroy, then end the process without finalization (exit_process)
    monkeypatch.setattr(train, "_train", lambda *args: 0)
    calls.clear()
    with pytest.raises(SystemExit):
        main(_args("simclr", tmp_path / "r4"))
    assert calls == ["destroy", ("exit", 0)]


@pytest.mark.cuda
def test_checkpoint_restores_the_rank_devices_cuda_generator():
    from sslfast.pretrain import checkpoint

    generator = torch.Generator(device="cuda:0").manual_seed(3)
    state = checkpoint.rng_state(generator)
    first = (torch.rand(4, device="cuda"), torch.rand(4, device="cuda", generator=generator))
    checkpoint.set_rng_state(state, generator)
    again = (torch.rand(4, device="cuda"), torch.rand(4, device="cuda", generator=generator))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    state["cuda"] = [state["cuda"]]  # an older checkpoint: every visible device's state
    checkpoint.set_rng_state(state, generator)
    assert torch.equal(torch.rand(4, device="cuda"), first[0])


def _bn_after_rank0_buffers(rank, world):
    from sslfast.pretrain.train import rank0_buffers

    bn = torch.nn.BatchNorm1d(3)
    bn.running_mean.fill_(rank)  # each rank's own batches moved its statistics
    bn.num_batches_tracked.fill_(10 + rank)
    rank0_buffers(bn)
    return bn.running_mean, bn.num_batches_tracked


def test_knn_evaluates_rank0s_network_on_every_rank(tmp_path):
    # DDP keeps parameters equal but not BatchNorm's running statistics
    # (broadcast_buffers=False, no SyncBN on CPU): rank 0's are used everywhere.
    for mean, tracked in spawn_gloo(_bn_after_rank0_buffers, 2, tmp_path):
        assert torch.equal(mean, torch.zeros(3)) and int(tracked) == 10
