"""The EMA op (sslfast.functional.ema_) and its users ModelEMA / update_momentum."""

import copy

import pytest
import torch
from torch import nn

import sslfast
from sslfast.functional import ema_
from sslfast.reference import ema_reference
from tests import cuda_emu
from tests.utils import (
    CUDA_KERNEL_DEVICES,
    DEVICES,
    KERNEL_DEVICES,
    assert_no_host_sync,
    assert_parity,
    random_tensor,
    run_without_extension,
)

PAIRS = [
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.float64, torch.float64),
]
PAIR_IDS = [f"{str(t)[6:]}<-{str(s)[6:]}" for t, s in PAIRS]

# Odd sizes around the CPU (2**15) and CUDA (2**16) chunk and vector widths.
SHAPES = [(), (0,), (0, 5), (1,), (3,), (17, 3), (5, 7, 9), (65537,), (131, 1001)]
LAYOUTS = ["contiguous", "transposed", "strided"]


def _lists(shapes, pair, device, layout="contiguous"):
    tdt, sdt = pair
    targets, sources = [], []
    for shape in shapes:
        lay = layout if len(shape) >= 2 or layout == "strided" and len(shape) == 1 else "contiguous"
        targets.append(random_tensor(shape, tdt, device, lay))
        sources.append(random_tensor(shape, sdt, device, lay))
    return targets, sources


def _check_update(targets, sources, decay, backend="auto"):
    before = [t.clone() for t in targets]
    src_before = [s.clone() for s in sources]
    expected = ema_reference(before, sources, decay)
    ema_(targets, sources, decay, backend=backend)
    for i, (t, e) in enumerate(zip(targets, expected)):
        assert_parity(t, e, what=f"targets[{i}]")
    for s, s0 in zip(sources, src_before):
        assert torch.equal(s, s0), "sources must not be modified"


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_parity_with_reference(device, pair, layout):
    targets, sources = _lists(SHAPES, pair, device, layout)
    _check_update(targets, sources, 0.9)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("decay", [0.0, 0.3, 0.5, 0.7, 0.999, 0.9999, 1.0])
def test_decay_values(device, decay):
    targets, sources = _lists([(257,), (3, 33)], (torch.float32, torch.float32), device)
    _check_update(targets, sources, decay)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_decay_bounds_are_exact(device, pair):
    targets, sources = _lists([(1000,)], pair, device)
    t0 = targets[0].clone()
    ema_(targets, sources, 1.0)
    assert torch.equal(targets[0], t0), "decay=1 keeps the target"
    ema_(targets, sources, 0.0)
    assert torch.equal(targets[0], sources[0].to(targets[0].dtype)), "decay=0 copies the source"


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_channels_last_and_mixed_layouts(device):
    pair = (torch.float32, torch.bfloat16)
    t = random_tensor((4, 6, 5, 3), torch.float32, device, "channels_last")
    s_same = random_tensor((4, 6, 5, 3), torch.bfloat16, device, "channels_last")
    s_other = random_tensor((4, 6, 5, 3), torch.bfloat16, device)
    t2 = random_tensor((4, 6, 5, 3), torch.float32, device)
    _check_update([t, t2], [s_same, s_other], 0.8)
    _check_update([t2], [s_same], 0.8)
    del pair


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_many_tensors(device):
    """Hundreds of tensors of mixed sizes and dtype pairs in one call."""
    gen = torch.Generator().manual_seed(0)
    targets, sources = [], []
    for i in range(300):
        n = int(torch.randint(1, 5000, (1,), generator=gen)) if i % 50 else 70_001
        pair = PAIRS[i % len(PAIRS)]
        t, s = _lists([(n,)], pair, device)
        targets += t
        sources += s
    _check_update(targets, sources, 0.99)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_same_tensor_as_target_and_source(device):
    t = random_tensor((100,), torch.float32, device)
    t0 = t.clone()
    ema_([t], [t], 0.5)
    torch.testing.assert_close(t, t0)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("decay_dtype", [torch.float32, torch.float64])
def test_decay_tensor(device, decay_dtype):
    targets, sources = _lists([(1001,), (7, 3)], (torch.float32, torch.float32), device)
    _check_update(targets, sources, torch.tensor(0.95, dtype=decay_dtype))
    # A 0-dim tensor on the targets' device.
    _check_update(targets, sources, torch.tensor(0.75, dtype=decay_dtype, device=device))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_backends_agree(backend):
    targets, sources = _lists(SHAPES, (torch.float32, torch.bfloat16), "cpu")
    _check_update(targets, sources, 0.9, backend=backend)


def test_empty_lists_are_a_no_op():
    ema_([], [], 0.5)


def test_targets_requiring_grad_are_updated_without_autograd():
    p = nn.Parameter(torch.randn(10))
    s = torch.randn(10)
    expected = ema_reference([p], [s], 0.5)[0]
    ema_([p], [s], 0.5)
    assert p.grad_fn is None
    assert_parity(p, expected)


# ---- bad input ----------------------------------------------------------------

BAD_BACKENDS = ["auto", "reference"]


@pytest.mark.parametrize("backend", BAD_BACKENDS)
def test_bad_lists(backend):
    t, s = torch.randn(3), torch.randn(3)
    with pytest.raises(ValueError, match="targets has 2 tensors but sources has 1"):
        ema_([t, t.clone()], [s], 0.5, backend=backend)
    with pytest.raises(ValueError, match=r"targets\[1\] has shape \S+ but sources\[1\] has shape"):
        ema_([t, torch.randn(4)], [s, torch.randn(5)], 0.5, backend=backend)
    with pytest.raises(ValueError, match=r"targets\[0\] has shape \S+ but sources\[0\] has shape"):
        ema_([t], [torch.randn(1, 3)], 0.5, backend=backend)
    with pytest.raises(ValueError, match=r"targets\[1\] has elements that share memory"):
        ema_([t, torch.randn(3).expand(4, 3)], [s, torch.randn(4, 3)], 0.5, backend=backend)
    with pytest.raises(ValueError, match=r"targets\[0\] is on cpu but sources\[0\] is on meta"):
        ema_([t], [torch.empty(3, device="meta")], 0.5, backend=backend)


@pytest.mark.parametrize("backend", BAD_BACKENDS)
def test_targets_sharing_memory_are_refused(backend):
    """Targets are updated concurrently: one tensor twice (a tied parameter) would be
    updated once or twice by chance. Views that interleave without sharing an element
    are fine."""
    t, m = torch.randn(3), torch.randn(4, 6)
    kept = (t.clone(), m.clone())
    with pytest.raises(ValueError, match=r"targets\[0\] and targets\[2\] share memory"):
        ema_([t, torch.randn(2), t], [torch.randn(3), torch.randn(2), torch.randn(3)], 0.5,
             backend=backend)
    with pytest.raises(ValueError, match=r"targets\[0\] and targets\[1\] share memory"):
        ema_([m[1:3], m[:2]], [torch.randn(2, 6), torch.randn(2, 6)], 0.5, backend=backend)
    with pytest.raises(ValueError, match=r"targets\[0\] and targets\[1\] share memory"):
        ema_([m[2:].t(), m[:3].t()], [torch.randn(6, 2), torch.randn(6, 3)], 0.5,
             backend=backend)  # dense in another order (transposed) compare exactly too
    assert torch.equal(t, kept[0]) and torch.equal(m, kept[1]), "a rejected call changes nothing"
    _check_update([m[:, 0], m[:, 1], m[2:, 2:]], [torch.randn(4), torch.randn(4),
                                                  torch.randn(2, 4)], 0.5, backend=backend)


@pytest.mark.parametrize("backend", BAD_BACKENDS)
def test_bad_dtypes(backend):
    with pytest.raises(TypeError, match=r"targets\[0\] must be a floating-point tensor"):
        ema_([torch.zeros(3, dtype=torch.int64)], [torch.randn(3)], 0.5, backend=backend)
    with pytest.raises(TypeError, match=r"sources\[0\] must be a floating-point tensor"):
        ema_([torch.randn(3)], [torch.ones(3, dtype=torch.int32)], 0.5, backend=backend)
    with pytest.raises(TypeError, match=r"targets\[0\] is \S+ and sources\[0\] is \S+; supported"):
        ema_([torch.randn(3, dtype=torch.bfloat16)], [torch.randn(3)], 0.5, backend=backend)
    with pytest.raises(TypeError, match=r"targets\[0\] is \S+ and sources\[0\] is \S+; supported"):
        ema_([torch.randn(3).half()], [torch.randn(3).bfloat16()], 0.5, backend=backend)


@pytest.mark.parametrize("backend", BAD_BACKENDS)
def test_bad_decay(backend):
    t, s = [torch.randn(3)], [torch.randn(3)]
    t0 = t[0].clone()
    for bad in (-0.1, 1.5, float("nan"), float("inf"), torch.tensor(2.0)):
        with pytest.raises(ValueError, match="decay must be in"):
            ema_(t, s, bad, backend=backend)
    with pytest.raises(ValueError, match="decay must be a float or a 0-dim"):
        ema_(t, s, torch.tensor([0.5]), backend=backend)
    with pytest.raises(ValueError, match="decay must be a float or a 0-dim"):
        ema_(t, s, torch.tensor(1), backend=backend)
    with pytest.raises(TypeError, match="decay must be a float"):
        ema_(t, s, "0.5", backend=backend)
    with pytest.raises(TypeError, match="decay must be a float"):
        ema_(t, s, True, backend=backend)
    assert torch.equal(t[0], t0), "a rejected call changes nothing"


def test_bad_backend():
    t, s = [torch.randn(3)], [torch.randn(3)]
    with pytest.raises(ValueError, match="backend must be one of"):
        ema_(t, s, 0.5, backend="fast")
    with pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors"):
        ema_(t, s, 0.5, backend="cuda")
    with pytest.raises(ValueError, match="backend 'triton' is not implemented"):
        ema_(t, s, 0.5, backend="triton")


def test_env_backend(monkeypatch):
    t, s = [torch.randn(3)], [torch.randn(3)]
    monkeypatch.setenv("SSLFAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        ema_(t, s, 0.5)
    monkeypatch.setenv("SSLFAST_BACKEND", "reference")
    _check_update(t, s, 0.5)
    monkeypatch.setenv("SSLFAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="SSLFAST_BACKEND must be one of"):
        ema_(t, s, 0.5)


# ---- custom-op machinery ------------------------------------------------------

needs_ext = pytest.mark.skipif(not sslfast.has_cpu_kernels(), reason="extension not built")


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    targets, sources = _lists([(5, 3), (17,)], (torch.float32, torch.bfloat16), device)
    torch.library.opcheck(torch.ops.sslfast.ema_.default, (targets, sources, None, 0.9))
    decay = torch.tensor(0.9, device=device)
    torch.library.opcheck(torch.ops.sslfast.ema_.default, (targets, sources, decay, 0.0))


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    targets, sources = _lists([(5, 3), (17,)], (torch.float32, torch.float32), device)
    decay = torch.tensor(0.9, device=device)
    expected = ema_reference(targets, sources, 0.9)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(ts, ss, d):
        ema_(ts, ss, d)

    step(targets, sources, decay)
    for t, e in zip(targets, expected):
        assert_parity(t, e)


def test_fallback_without_extension():
    """The package imports and works without the compiled extension, warning once."""
    run_without_extension(
        """
        import warnings
        import torch
        warnings.simplefilter("always")
        import sslfast
        from sslfast.reference import ema_reference
        assert not sslfast.has_cpu_kernels()
        t = [torch.randn(100), torch.randn(7, 3)]
        s = [torch.randn(100).bfloat16(), torch.randn(7, 3).bfloat16()]
        exp = ema_reference(t, s, 0.9)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            sslfast.functional.ema_(t, s, 0.9)
            sslfast.functional.ema_(t, s, torch.tensor(1.0))
        msgs = [str(x.message) for x in w if "fallback" in str(x.message)]
        assert len(msgs) == 1, msgs
        for a, b in zip(t, exp):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
        print("ok")
        """
    )


@pytest.mark.cuda
def test_cuda_no_host_sync_with_device_decay():
    targets, sources = _lists([(100_000,), (33,)], (torch.float32, torch.bfloat16), "cuda")
    decay = torch.tensor(0.9, device="cuda")
    assert_no_host_sync(lambda: ema_(targets, sources, decay))


@pytest.mark.cuda
def test_cuda_mixed_devices_are_a_clear_error():
    """Any CUDA argument sends the op to the CUDA kernel, CPU targets too."""
    cpu, gpu = torch.randn(3), torch.randn(3, device="cuda")
    with pytest.raises(ValueError, match=r"targets\[0\] is on cpu but sources\[0\] is on cuda"):
        ema_([cpu], [gpu], 0.5)
    with pytest.raises(ValueError, match="decay is on cuda:0 but targets are on cpu"):
        torch.ops.sslfast.ema_([cpu], [cpu.clone()], torch.tensor(0.5, device="cuda"), 0.0)


@pytest.mark.parametrize("device", CUDA_KERNEL_DEVICES)
def test_cuda_many_launches(device, _cuda_emu):
    """More tensors and chunks than one launch's table holds (64 tensors, 320 blocks),
    a tensor cut between two launches; emulated, the same bits as the CPU kernel."""
    shapes = [(65536 * 330 + 5,)] + [(int(n),) for n in torch.randint(1, 200_000, (200,))]
    targets, sources = _lists(shapes, (torch.float32, torch.float16), device)
    before = [t.clone() for t in targets]
    _check_update(targets, sources, 0.999)
    if _cuda_emu is None:
        return
    launches = _cuda_emu._launches().splitlines()
    assert len(launches) >= 5, launches  # 64 tensors or 320 blocks each
    with cuda_emu.native():
        ema_(before, sources, 0.999)  # the CPU kernel
    assert all(torch.equal(t, b) for t, b in zip(targets, before))


@pytest.mark.cuda_emu
@pytest.mark.parametrize("decay_dtype", [torch.float32, torch.float64])
def test_cuda_emu_decay_in_device_memory(decay_dtype):
    """A decay tensor on the targets' device is read by the kernel (here the CPU
    tensor counts as device memory), misaligned tensors take the scalar loop."""
    t_base = random_tensor((70_002,), torch.float32, "cpu")
    s_base = random_tensor((70_002,), torch.bfloat16, "cpu")
    targets = [t_base[1:], random_tensor((3, 5), torch.float32, "cpu")[:, 1:]]
    sources = [s_base[1:], random_tensor((3, 4), torch.bfloat16, "cpu")]
    expected = [t.clone() for t in targets]
    with cuda_emu.native():
        ema_(expected, sources, float(torch.tensor(0.95, dtype=decay_dtype)))
    with cuda_emu.emulate(cpu_tensors_are_host=False):
        ema_(targets, sources, torch.tensor(0.95, dtype=decay_dtype))
    assert all(torch.equal(t, e) for t, e in zip(targets, expected))


@pytest.mark.cuda
def test_cuda_memory_is_in_place():
    from sslfast._memory import peak_memory

    targets, sources = _lists([(1 << 22,)] * 8, (torch.float32, torch.bfloat16), "cuda")
    _, peak = peak_memory(lambda: ema_(targets, sources, 0.99), "cuda")
    assert peak < 1 << 20, f"EMA allocated {peak} bytes"


def test_cpu_memory_is_in_place():
    from sslfast._memory import peak_memory

    targets, sources = _lists([(1 << 22,)] * 8, (torch.float32, torch.bfloat16), "cpu")
    ema_(targets, sources, 0.99)
    _, peak = peak_memory(lambda: ema_(targets, sources, 0.99), "cpu")
    if peak is None:
        pytest.skip("the OS cannot reset the RSS peak")
    # 8 x 16 MiB of targets: an out-of-place update would need 128 MiB more.
    assert peak < 8 << 20, f"EMA allocated {peak} bytes"


# ---- ModelEMA and update_momentum ----------------------------------------------


def _small_model(dtype=torch.float32):
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)
    )
    return m.to(dtype)


def _train_a_bit(model):
    """Change parameters and BN statistics (running stats, num_batches_tracked)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.train()
    model(torch.randn(4, 3, 8, 8, dtype=next(model.parameters()).dtype))


@pytest.mark.parametrize(
    "model_dtype,shadow_dtype",
    [(torch.float32, None), (torch.bfloat16, torch.float32), (torch.float16, torch.float32)],
)
def test_model_ema_matches_timm(model_dtype, shadow_dtype):
    timm_ema = pytest.importorskip("timm.utils.model_ema")
    model = _small_model(model_dtype)
    ours = sslfast.ModelEMA(model, decay=0.9, shadow_dtype=shadow_dtype)
    theirs = timm_ema.ModelEmaV3(model, decay=0.9, dtype=shadow_dtype)
    for step in range(5):
        _train_a_bit(model)
        decay = 0.9 if step % 2 else 0.7
        ours.update(model, decay=decay)
        theirs.apply_update_(model, decay)
    ref = theirs.module.state_dict()
    for name, v in ours.module.state_dict().items():
        assert v.dtype == ref[name].dtype, name
        if v.is_floating_point():
            torch.testing.assert_close(v, ref[name], rtol=1e-6, atol=1e-6, msg=name)
        else:
            assert torch.equal(v, ref[name]), name
    assert list(ours.state_dict()) == list(theirs.state_dict())


def test_model_ema_matches_reference_over_steps():
    model = _small_model()
    ema = sslfast.ModelEMA(model, decay=0.8)
    expected = {k: v.double() for k, v in ema.module.state_dict().items()}
    for _ in range(4):
        _train_a_bit(model)
        ema.update(model)
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                expected[k] = 0.8 * expected[k] + 0.2 * v.double()
            else:
                expected[k] = v.clone()
    for k, v in ema.module.state_dict().items():
        if v.is_floating_point():
            assert_parity(v, expected[k], what=k)
        else:
            assert torch.equal(v, expected[k]), k


def test_model_ema_bf16_shadow_matches_timm_round_to_nearest():
    timm_ema = pytest.importorskip("timm.utils.model_ema")
    model = _small_model(torch.bfloat16)
    ours = sslfast.ModelEMA(model, decay=0.5)
    theirs = timm_ema.ModelEmaV3(model, decay=0.5, stochastic_rounding=False)
    for _ in range(3):
        _train_a_bit(model)
        ours.update(model)
        theirs.apply_update_(model, 0.5)
    for k, v in theirs.module.state_dict().items():
        torch.testing.assert_close(ours.module.state_dict()[k], v, rtol=1e-2, atol=1e-2, msg=k)


@pytest.mark.parametrize("mode", ["average", "copy", "skip"])
def test_model_ema_buffer_modes(mode):
    model = _small_model()
    ema = sslfast.ModelEMA(model, decay=0.5, buffers=mode)
    before = copy.deepcopy(ema.module.state_dict())
    _train_a_bit(model)
    ema.update(model)
    bn, bn0, src = "1.running_mean", before["1.running_mean"], model.state_dict()
    got = ema.module.state_dict()
    if mode == "average":
        torch.testing.assert_close(got[bn], 0.5 * bn0 + 0.5 * src[bn])
        assert torch.equal(got["1.num_batches_tracked"], src["1.num_batches_tracked"])
    elif mode == "copy":
        assert torch.equal(got[bn], src[bn])
        assert torch.equal(got["1.num_batches_tracked"], src["1.num_batches_tracked"])
    else:
        assert torch.equal(got[bn], bn0)
        assert torch.equal(got["1.num_batches_tracked"], before["1.num_batches_tracked"])
    torch.testing.assert_close(got["0.weight"], 0.5 * before["0.weight"] + 0.5 * src["0.weight"])


def test_model_ema_state_dict_round_trip_and_eval():
    model = _small_model()
    ema = sslfast.ModelEMA(model, decay=0.9)
    _train_a_bit(model)
    ema.update(model)
    state = copy.deepcopy(ema.state_dict())
    other = sslfast.ModelEMA(_small_model(), decay=0.9)
    other.load_state_dict(state)
    for k, v in other.state_dict().items():
        assert torch.equal(v, state[k])
    # The loaded EMA keeps following a model.
    _train_a_bit(model)
    ema.update(model)
    other.update(model)
    for k, v in other.state_dict().items():
        assert torch.equal(v, ema.state_dict()[k]), k
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(ema(x), ema.module(x))


def test_model_ema_averages_a_tied_parameter_once():
    """A parameter shared by two modules is one tensor: one EMA step, as timm's
    ModelEmaV3 and lightly's update_momentum (over parameters()) take."""
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU(), nn.Linear(4, 4, bias=False))
    model[2].weight = model[0].weight
    ema = sslfast.ModelEMA(model, decay=0.5)
    assert ema.module[2].weight is ema.module[0].weight
    before = ema.module[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)
    assert_parity(ema.module[0].weight, (before + model[0].weight) / 2)


def test_model_ema_follows_moves_and_wrappers():
    model = _small_model()
    ema = sslfast.ModelEMA(model, decay=0.5, shadow_dtype=torch.float64)
    model.to(torch.float64)  # the model changes dtype after the EMA was made
    _train_a_bit(model)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    ema.update(model, decay=torch.tensor(0.5))
    w = model.state_dict()["4.weight"]
    torch.testing.assert_close(ema.module.state_dict()["4.weight"], 0.5 * before["4.weight"] + 0.5 * w)
    # A compiled wrapper is unwrapped to the module itself.
    ema.update(torch.compile(model), decay=1.0)
    torch.testing.assert_close(ema.module.state_dict()["4.weight"], 0.5 * before["4.weight"] + 0.5 * w)


def test_model_ema_bad_input():
    model = _small_model()
    with pytest.raises(ValueError, match="decay must be in"):
        sslfast.ModelEMA(model, decay=1.5)
    with pytest.raises(ValueError, match="buffers must be one of"):
        sslfast.ModelEMA(model, buffers="mean")
    with pytest.raises(TypeError, match="shadow_dtype must be a floating-point"):
        sslfast.ModelEMA(model, shadow_dtype=torch.int32)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        sslfast.ModelEMA([torch.randn(3)])
    ema = sslfast.ModelEMA(model)
    with pytest.raises(ValueError, match="decay must be in"):
        ema.update(model, decay=-1)
    with pytest.raises(ValueError, match="model does not match"):
        ema.update(nn.Linear(3, 3))


def test_update_momentum_matches_lightly():
    lightly_utils = pytest.importorskip("lightly.models.utils")
    model = _small_model()
    ours_ema, theirs_ema = copy.deepcopy(model), copy.deepcopy(model)
    for m in (0.99, 0.5, 0.0, 1.0):
        _train_a_bit(model)
        sslfast.update_momentum(model, ours_ema, m)
        lightly_utils.update_momentum(model, theirs_ema, m)
        for (k, a), b in zip(ours_ema.state_dict().items(), theirs_ema.state_dict().values()):
            if k.endswith("running_mean") or k.endswith("running_var"):
                continue  # buffers are left alone by both
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=k)


def test_update_momentum_bad_input():
    a, b = _small_model(), _small_model()
    with pytest.raises(ValueError, match="m must be in"):
        sslfast.update_momentum(a, b, 1.01)
    with pytest.raises(ValueError, match="model has 6 parameters but model_ema has 2"):
        sslfast.update_momentum(a, nn.Linear(2, 2), 0.5)
