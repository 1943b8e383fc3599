"""The methods (sslfast.methods): one training step each, the loss falls on a
fixed batch, the EMA teacher, queue and DINO center move as specified, DDP on 2
gloo processes equals one process on the full batch."""

import copy

import pytest
import torch
from torch import nn

import sslfast
from sslfast import methods
from sslfast.methods.base import infer_feature_dim
from sslfast.schedules import cosine_schedule
from tests.utils import spawn_gloo

SIZE = 16  # crop size: small, so the whole file runs in seconds
SMALL = {
    "simclr": dict(hidden_dim=32, output_dim=16),
    "mocov2": dict(hidden_dim=32, output_dim=16, queue_size=24),
    "mocov3": dict(hidden_dim=32, output_dim=16),
    "byol": dict(hidden_dim=32, output_dim=16),
    "simsiam": dict(hidden_dim=32, output_dim=16, pred_hidden_dim=8),
    "dino": dict(hidden_dim=32, bottleneck_dim=16, output_dim=64, n_local_views=2,
                 local_size=8),
}


def tiny_backbone(batch_norm=True):
    bn = (lambda c: nn.BatchNorm2d(c)) if batch_norm else (lambda c: nn.Identity())
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), bn(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), bn(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def make(name, **kw):
    return methods.METHODS[name](tiny_backbone(), image_size=SIZE, **{**SMALL[name], **kw})


def images(b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, 20, 24), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_one_training_step(name):
    method = make(name)
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.05)
    views = method.augment(images(), torch.Generator().manual_seed(1))
    n_views = 4 if name == "dino" else 2
    assert len(views) == n_views and all(v.dtype == torch.float32 for v in views)
    assert views[0].shape == (8, 3, SIZE, SIZE)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    loss = method(views)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    method.before_optimizer_step()
    opt.step()
    method.step_end(0, 10)
    after = method.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.startswith("backbone.") for k in moved)
    if method.teacher is not None:  # the teacher follows: its parameters moved too
        assert any(k.startswith("teacher.") for k in moved)


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_loss_falls_on_a_fixed_batch(name):
    torch.manual_seed(0)
    method = make(name)
    opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=3e-3)
    views = method.augment(images(16), torch.Generator().manual_seed(2))
    method.set_epoch(5)  # past DINO's last-layer freeze
    losses = []
    for step in range(12):
        loss = method(views)
        opt.zero_grad()
        loss.backward()
        method.before_optimizer_step()
        opt.step()
        method.step_end(step, 12)
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    # MoCo's first loss is against a random queue; from the third step the queue holds
    # this batch's own keys (the hardest negatives), and the loss falls from there.
    first = 2 if name == "mocov2" else 0
    # DINO's target moves: the center (momentum 0.9) converges to this batch's mean
    # teacher output and flattens the centered targets. On a fixed batch the targets'
    # entropy and the loss fall for a few steps, then both rise, faster than the student
    # follows (with torch 2.14.1 and 2.11 alike): judged on the first six steps.
    last = 6 if name == "dino" else len(losses)
    assert min(losses[last - 3:last]) < losses[first], losses


@pytest.mark.parametrize("name", ["mocov2", "mocov3", "byol", "dino"])
def test_teacher_follows_the_cosine_momentum(name):
    method = make(name)
    student = {k: v.detach().clone() for k, v in method.encoder.named_parameters()}
    teacher = {k: v.detach().clone() for k, v in method.teacher.module.named_parameters()}
    with torch.no_grad():
        for p in method.encoder.parameters():
            p.add_(torch.randn_like(p))
    step, max_steps = 3, 10
    m = cosine_schedule(step, max_steps, method.base_momentum, 1.0)
    method.step_end(step, max_steps)
    assert method.momentum == m
    for k, p in method.teacher.module.named_parameters():
        s = dict(method.encoder.named_parameters())[k]
        torch.testing.assert_close(p, m * teacher[k] + (1 - m) * s.detach())
        assert not torch.equal(s.detach(), student[k])
    method.step_end(max_steps - 1, max_steps)  # momentum 1 at the end: the teacher stays
    assert method.momentum == 1.0


def test_mocov2_queue_receives_the_keys():
    method = make("mocov2")
    views = method.augment(images(), torch.Generator().manual_seed(3))
    assert int(method.queue.ptr) == 0
    method(views)
    assert int(method.queue.ptr) == 8
    with torch.no_grad():
        k = nn.functional.normalize(method.teacher.module(views[1]), dim=1)
    torch.testing.assert_close(method.queue.queue[:8], k, rtol=1e-5, atol=1e-6)
    method.eval()
    method(views)  # evaluation does not enqueue
    assert int(method.queue.ptr) == 8
    assert "queue.queue" in method.state_dict() and "queue.ptr" in method.state_dict()


def test_dino_center_and_last_layer_freeze():
    method = make("dino", freeze_last_layer=1)
    views = method.augment(images(), torch.Generator().manual_seed(4))
    center = method.criterion.center.clone()
    loss = method(views)
    assert not torch.equal(center, method.criterion.center)
    loss.backward()
    method.before_optimizer_step()  # epoch 0 < freeze_last_layer: no last-layer update
    assert method.encoder.head.last_layer.weight.grad is None
    assert method.encoder.head.mlp[0].weight.grad is not None
    method.set_epoch(1)
    method.zero_grad()
    method(views).backward()
    method.before_optimizer_step()
    assert method.encoder.head.last_layer.weight.grad is not None


def test_dino_student_sees_all_views_teacher_the_global_ones():
    method = make("dino")
    views = method.augment(images(), torch.Generator().manual_seed(5))
    assert [v.shape[-1] for v in views] == [SIZE, SIZE, 8, 8]
    seen = []
    hook = method.teacher.module.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    method(views)
    hook.remove()
    assert seen == [torch.Size([16, 3, SIZE, SIZE])]


def test_dino_student_outputs_grouped_by_resolution():
    """Adjacent views of one resolution come back as one (views, N, K) group (read by the
    fused loss without a stack); views of a resolution that are not adjacent, one by one.
    Eval mode: batch norm's running statistics, so outputs do not depend on batching."""
    method = make("dino").eval()
    views = method.augment(images(), torch.Generator().manual_seed(5))
    single = [method.encoder(v) for v in views]
    grouped = method._student_forward(views)
    assert [g.shape[:2] for g in grouped] == [(2, 8), (2, 8)]
    torch.testing.assert_close(torch.cat([g.flatten(0, 1) for g in grouped]), torch.cat(single))
    order = (0, 2, 1, 3)
    mixed = method._student_forward([views[i] for i in order])
    assert [z.shape for z in mixed] == [single[i].shape for i in order]
    torch.testing.assert_close(torch.cat(mixed), torch.cat([single[i] for i in order]))


def test_feature_dim_inferred_for_torchvision_and_timm():
    torchvision = pytest.importorskip("torchvision")
    timm = pytest.importorskip("timm")
    r18 = torchvision.models.resnet18()
    r18.fc = nn.Identity()
    assert infer_feature_dim(r18, 32) == 512
    assert r18.training  # mode restored
    assert infer_feature_dim(timm.create_model("resnet18", num_classes=0)) == 512
    method = methods.SimCLR(r18, image_size=32, hidden_dim=16, output_dim=8)
    assert method.feature_dim == 512
    assert method(method.augment(images(4))).isfinite()


def test_bad_input():
    with pytest.raises(TypeError, match="backbone"):
        methods.SimCLR("resnet18")
    with pytest.raises(ValueError, match="image_size"):
        methods.SimCLR(tiny_backbone(), image_size=0)
    method = make("simclr")
    with pytest.raises(ValueError, match="views"):
        method(torch.zeros(2, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match=r"views\[1\]"):
        method([torch.zeros(2, 3, SIZE, SIZE), torch.zeros(2, 3)])
    with pytest.raises(ValueError, match="n_local_views"):
        make("dino", n_local_views=-1)


def test_negative_cosine_similarity_matches_lightly():
    lightly_loss = pytest.importorskip("lightly.loss")
    x0, x1 = torch.randn(7, 5, requires_grad=True), torch.randn(7, 5)
    ours = sslfast.NegativeCosineSimilarity()(x0, x1)
    ref = lightly_loss.NegativeCosineSimilarity()(x0, x1)
    torch.testing.assert_close(ours, ref)
    byol = sslfast.BYOLLoss()(x0, x1)
    torch.testing.assert_close(byol, 2 + 2 * ref)  # 2 - 2 cos, mean over rows
    byol.backward()
    assert x0.grad is not None
    with pytest.raises(ValueError, match="x1"):
        sslfast.NegativeCosineSimilarity()(x0, torch.randn(7, 4))
    with pytest.raises(TypeError, match="x0"):
        sslfast.BYOLLoss()(torch.zeros(3, 2, dtype=torch.int64), x1)


# ---- DDP: 2 gloo processes = one process on the full batch ------------------------------

N_PER_RANK = 6


def _ddp_method(name):
    torch.manual_seed(11)
    kw = dict(hidden_dim=32, output_dim=16, gather_distributed=True)
    if name == "simclr":
        method = methods.SimCLR(tiny_backbone(batch_norm=False), image_size=SIZE,
                                batch_norm=False, **kw)
    else:  # MoCo v2's head has no BatchNorm; shuffle-BN is then an exact no-op
        method = methods.MoCoV2(tiny_backbone(batch_norm=False), image_size=SIZE,
                                queue_size=40, **kw)
    return method.double()


def _ddp_views(world, step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(world * N_PER_RANK, 3, SIZE, SIZE, generator=g, dtype=torch.float64)
            for _ in range(2)]


def _train_steps(model, method, views_fn, steps=2):
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    losses, grads = [], []
    for step in range(steps):
        loss = model(views_fn(step))
        opt.zero_grad()
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in method.named_parameters()
                      if p.grad is not None})
        opt.step()
        method.step_end(step, steps)
        losses.append(loss.detach())
    return losses, grads, {k: v.clone() for k, v in method.state_dict().items()}


def _ddp_worker(rank, world):
    out = {}
    for name in ("simclr", "mocov2"):
        method = _ddp_method(name)
        model = nn.parallel.DistributedDataParallel(method, broadcast_buffers=False)
        rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        out[name] = _train_steps(
            model, method, lambda step, rows=rows: [v[rows] for v in _ddp_views(world, step)])
    return out


def test_ddp_two_processes_equal_one_process(tmp_path):
    world = 2
    per_rank = spawn_gloo(_ddp_worker, world, tmp_path)
    for name in ("simclr", "mocov2"):
        method = _ddp_method(name)
        losses, grads, state = _train_steps(method, method, lambda s: _ddp_views(world, s))
        for step in range(len(losses)):
            mean = sum(r[name][0][step] for r in per_rank) / world
            torch.testing.assert_close(mean, losses[step], rtol=1e-10, atol=1e-12, msg=name)
            for r in per_rank:  # DDP averages: every rank holds the full-batch gradient
                for k, g in grads[step].items():
                    torch.testing.assert_close(r[name][1][step][k], g, rtol=1e-8, atol=1e-12,
                                               msg=f"{name} {k}")
        for r in per_rank:  # weights, teacher, and for MoCo the shared queue and pointer
            for k, v in state.items():
                torch.testing.assert_close(r[name][2][k], v, rtol=1e-8, atol=1e-12,
                                           msg=f"{name} {k}")


def test_methods_survive_deepcopy_and_state_dict_round_trip():
    method = make("mocov2")
    method(method.augment(images(), torch.Generator().manual_seed(6)))
    clone = make("mocov2")
    clone.load_state_dict(copy.deepcopy(method.state_dict()))
    for k, v in method.state_dict().items():
        assert torch.equal(clone.state_dict()[k], v), k


def test_losses_ignore_an_enclosing_autocast():
    """bf16 training wraps the loss in torch.autocast: the fused ops keep their own
    precision (and on the CPU their out= buffers), inside or outside it."""
    from sslfast.functional import clip_loss, dino_loss, info_nce_loss, ntxent_loss

    a, b = torch.randn(12, 16, dtype=torch.bfloat16), torch.randn(12, 16, dtype=torch.bfloat16)
    queue = torch.randn(40, 16, dtype=torch.bfloat16)
    t = [torch.randn(5, 32, dtype=torch.bfloat16) for _ in range(2)]
    s = [torch.randn(5, 32, dtype=torch.bfloat16) for _ in range(3)]
    losses = {
        "ntxent": lambda x, y: ntxent_loss(x, y, 0.2),
        "moco": lambda x, y: info_nce_loss(x, y, queue=queue, temperature=0.2),
        "mocov3": lambda x, y: info_nce_loss(x, y, temperature=0.2),
        "clip": lambda x, y: clip_loss(x, y, 10.0),
        "dino": lambda x, y: dino_loss(t, [x[:5, :16].repeat(1, 2), *s[1:]], torch.zeros(32)),
    }
    for name, fn in losses.items():
        results = []
        for enabled in (False, True):
            x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                loss = fn(x, y)
                loss.backward()
            results.append((loss.detach(), x.grad))
        torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=0, msg=name)
