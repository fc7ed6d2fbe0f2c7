"""lmkernels.optim.FusedAdamW against torch.optim.AdamW over many steps."""
import copy

import pytest
import torch

from lmkernels.optim import FusedAdamW
from tests._backends import device_for, op_backend_params as backend_params  # Triton runs through the op only on a GPU

SHAPES = [(1,), (97,), (1025,), (3, 7, 11), (0,), (64, 33)]


def make_params(device, dtype=torch.float32, shapes=SHAPES):
    return [torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype)) for s in shapes]


def clone_params(params, dtype=None):
    return [torch.nn.Parameter(p.detach().clone().to(dtype or p.dtype)) for p in params]


def set_grads(step, *param_lists):
    gen = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(param_lists[0]):
        g = torch.randn(p.shape, generator=gen)
        if i == 2 and step % 3 == 0:
            g = None  # a param without grad this step is skipped
        for plist in param_lists:
            plist[i].grad = None if g is None else g.to(plist[i].device, plist[i].dtype)


def max_rel_err(a, b):
    return max(((x.double() - y.double()).abs().max() / y.double().abs().max().clamp_min(1e-12)).item()
               for x, y in zip(a, b) if x.numel())


OPTIONS = [
    dict(lr=1e-2),
    dict(lr=3e-3, weight_decay=0.1, amsgrad=True),
    dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05, maximize=True),
]


@pytest.mark.parametrize("backend", backend_params("cpu", "triton", "cuda"))
@pytest.mark.parametrize("opts", OPTIONS, ids=["plain", "amsgrad-wd", "maximize-betas"])
def test_matches_torch_adamw_over_50_steps(backend, opts):
    device = device_for(backend)
    ours = make_params(device)
    theirs = clone_params(ours)
    ref64 = clone_params(ours, torch.float64)
    o1 = FusedAdamW(ours, backend=backend, **opts)
    o2 = torch.optim.AdamW(theirs, **opts)
    o3 = torch.optim.AdamW(ref64, **opts)
    n_steps = 50 if backend != "triton" or device == "cuda" else 12  # the interpreter is slow
    for step in range(n_steps):
        set_grads(step, ours, theirs, ref64)
        o1.step()
        o2.step()
        o3.step()
    # fp32 within rounding: our error vs float64 at most twice torch's own fp32 error.
    assert max_rel_err(ours, ref64) <= 2 * max_rel_err(theirs, ref64) + 1e-7
    for p, q in zip(ours, theirs):
        assert o1.state[p]["step"].item() == o2.state[q]["step"].item()


def test_param_groups_have_their_own_hyperparameters():
    a, b = make_params("cpu", shapes=[(10,), (20,)]), make_params("cpu", shapes=[(5,)])
    a2, b2 = clone_params(a), clone_params(b)
    groups = lambda x, y: [{"params": x}, {"params": y, "lr": 1e-1, "weight_decay": 0.0, "betas": (0.5, 0.9)}]  # noqa: E731
    o1, o2 = FusedAdamW(groups(a, b), lr=1e-3), torch.optim.AdamW(groups(a2, b2), lr=1e-3)
    for step in range(10):
        set_grads(step, a + b, a2 + b2)
        o1.step()
        o2.step()
    for p, q in zip(a + b, a2 + b2):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("direction", ["ours_to_torch", "torch_to_ours"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_state_dict_round_trip_continues_identically(direction, amsgrad):
    """Train 5 steps with one optimizer, move its state into the other kind, train 5 more:
    the result equals 10 uninterrupted steps."""
    opts = dict(lr=1e-2, weight_decay=0.1, amsgrad=amsgrad)
    first, second = (FusedAdamW, torch.optim.AdamW) if direction == "ours_to_torch" else (torch.optim.AdamW, FusedAdamW)
    p = make_params("cpu")
    straight = clone_params(p)
    o = first(p, **opts)
    o_straight = first(straight, **opts)
    for step in range(5):
        set_grads(step, p, straight)
        o.step()
        o_straight.step()
    o2 = second(p, **opts)
    o2.load_state_dict(copy.deepcopy(o.state_dict()))
    for step in range(5, 10):
        set_grads(step, p, straight)
        o2.step()
        o_straight.step()
    for x, y in zip(p, straight):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert o2.param_groups[0]["decoupled_weight_decay"] is True  # still AdamW, not Adam-L2


def test_adam_mode_matches_torch_adam():
    p = make_params("cpu")
    q = clone_params(p)
    o1 = FusedAdamW(p, lr=1e-2, weight_decay=0.1, adam_w_mode=False)
    o2 = torch.optim.Adam(q, lr=1e-2, weight_decay=0.1)
    for step in range(20):
        set_grads(step, p, q)
        o1.step()
        o2.step()
    for x, y in zip(p, q):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_lr_as_tensor_and_scheduler():
    p, q = make_params("cpu"), None
    q = clone_params(p)
    o1 = FusedAdamW(p, lr=torch.tensor(1e-2))
    o2 = torch.optim.AdamW(q, lr=1e-2)
    s1 = torch.optim.lr_scheduler.StepLR(o1, step_size=3, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(o2, step_size=3, gamma=0.5)
    for step in range(10):
        set_grads(step, p, q)
        o1.step()
        o2.step()
        s1.step()
        s2.step()
    for x, y in zip(p, q):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_grad_scaler_skips_inf_steps_and_unscales():
    torch.manual_seed(0)
    model = torch.nn.Linear(17, 5)
    ref = copy.deepcopy(model)
    opt = FusedAdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(8, 17)
    # Step 1: an inf gradient -> nothing changes, the scale backs off.
    before = copy.deepcopy(model.state_dict())
    loss = model(x).sum() * float("inf")
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(s["step"].item() == 0 for s in opt.state.values())
    assert scaler.get_scale() == 2.0**9
    # Step 2: finite -> identical to an unscaled torch AdamW step.
    opt.zero_grad()
    scaler.scale(model(x).square().mean()).backward()
    scaler.step(opt)
    scaler.update()
    ref(x).square().mean().backward()
    ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", backend_params("cpu", "triton", "cuda"))
def test_bf16_params_with_master_weights_track_fp32(backend):
    device = device_for(backend)
    ref = make_params(device, shapes=[(97,), (33, 5)])
    ours = clone_params(ref, torch.bfloat16)
    o1 = FusedAdamW(ours, lr=1e-2, weight_decay=0.1, master_weights=True, backend=backend)
    o2 = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    for step in range(8):
        set_grads(step, ref, ours)
        o1.step()
        o2.step()
    for p, q in zip(ours, ref):
        master = o1.state[p]["master_param"]
        torch.testing.assert_close(master, q, rtol=2e-2, atol=1e-2)  # grads were rounded to bf16
        assert torch.equal(p, master.to(torch.bfloat16))
        assert o1.state[p]["exp_avg"].dtype == torch.float32


def test_bf16_state_dict_into_torch_and_back():
    p = make_params("cpu", torch.bfloat16, shapes=[(40,), (7, 3)])
    o = FusedAdamW(p, lr=1e-2)
    set_grads(0, p)
    o.step()
    t = torch.optim.AdamW(p, lr=1e-2)
    t.load_state_dict(o.state_dict())
    assert t.state[p[0]]["exp_avg"].dtype == torch.bfloat16  # torch's policy
    set_grads(1, p)
    t.step()
    o.load_state_dict(t.state_dict())
    assert o.state[p[0]]["exp_avg"].dtype == torch.float32 and o.state[p[0]]["step"].item() == 2
    set_grads(2, p)
    o.step()


def allow_grad_dtype(p, dtype):
    """Newer torch refuses a .grad of another dtype unless the tensor's grad_dtype says so."""
    if hasattr(p, "grad_dtype"):
        p.grad = None
        p.grad_dtype = dtype


def test_bad_input_names_the_parameter():
    p = [torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3))]
    opt = FusedAdamW(p)
    p[1].grad = torch.randn(3).to_sparse()
    p[0].grad = torch.randn(4)
    with pytest.raises(ValueError, match=r"params'\]\[1\].*sparse gradient"):
        opt.step()
    allow_grad_dtype(p[1], torch.float64)
    p[1].grad = torch.randn(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"params'\]\[1\].*gradient dtype torch.float64"):
        opt.step()
    assert all(s["step"].item() == 0 for s in opt.state.values())  # failed steps do not count
    c = [torch.nn.Parameter(torch.randn(2, dtype=torch.complex64))]
    c[0].grad = torch.randn(2, dtype=torch.complex64)
    with pytest.raises(ValueError, match="complex"):
        FusedAdamW(c).step()
    with pytest.raises(ValueError, match="invalid learning rate"):
        FusedAdamW(p, lr=-1.0)
    with pytest.raises(ValueError, match="stochastic_rounding"):
        FusedAdamW(p, master_weights=True, stochastic_rounding=True)


def test_named_parameters_appear_in_errors():
    model = torch.nn.Linear(3, 2)
    opt = FusedAdamW(model.named_parameters())
    allow_grad_dtype(model.weight, torch.float64)
    model.weight.grad = torch.randn(2, 3, dtype=torch.float64)
    model.bias.grad = torch.randn(2)
    with pytest.raises(ValueError, match="'weight'"):
        opt.step()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices")
@pytest.mark.gpu
def test_mixed_devices_in_a_group_are_refused():
    p = [torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3, device="cuda"))]
    for x in p:
        x.grad = torch.zeros_like(x)
    with pytest.raises(ValueError, match="one device"):
        FusedAdamW(p).step()


def test_params_without_grad_are_skipped_and_empty_tensors_work():
    p = make_params("cpu", shapes=[(0,), (5,)])
    opt = FusedAdamW(p)
    opt.step()  # no grads at all
    assert not opt.state
    p[0].grad = torch.zeros(0)
    p[1].grad = torch.ones(5)
    before = p[1].detach().clone()
    opt.step()
    assert not torch.equal(p[1], before)


def test_state_dict_is_a_snapshot_of_step_counts():
    """A state_dict taken mid-training keeps its step counts while training goes on, and the
    optimizer's own steps keep counting (checkpoints rely on both)."""
    p = make_params("cpu", shapes=[(5,), (7,)])
    opt = FusedAdamW(p)
    set_grads(0, p)
    opt.step()
    sd = opt.state_dict()
    for step in range(1, 4):
        set_grads(step, p)
        opt.step()
    assert [s["step"].item() for s in sd["state"].values()] == [1.0, 1.0]
    assert [opt.state[x]["step"].item() for x in p] == [4.0, 4.0]
    assert [s["step"].item() for s in opt.state_dict()["state"].values()] == [4.0, 4.0]
