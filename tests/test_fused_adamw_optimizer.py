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
    with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
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


# --- issue 9: replaced state, duplicates, copies, clear errors ----------------------------------

def _step_both(step, ours, theirs, o1, o2):
    """One step of both, every param with a grad (so no change in which params step)."""
    gen = torch.Generator().manual_seed(2000 + step)
    for p, q in zip(ours, theirs):
        p.grad = torch.randn(p.shape, generator=gen)
        q.grad = p.grad.clone()
    o1.step()
    o2.step()


def test_replaced_state_tensors_are_used_and_saved():
    """Issue 9 item 3: a state entry (or a whole param's state) replaced between steps is what
    the next step updates and what state_dict() saves, as in torch.optim.AdamW."""
    ours = make_params("cpu", shapes=[(97,), (3, 7), (5,)])
    theirs = clone_params(ours)
    o1, o2 = FusedAdamW(ours, lr=1e-2, amsgrad=True), torch.optim.AdamW(theirs, lr=1e-2, amsgrad=True)
    for step in range(3):
        _step_both(step, ours, theirs, o1, o2)
    for opt, ps in ((o1, ours), (o2, theirs)):
        opt.state[ps[0]]["exp_avg"] = torch.full_like(ps[0], 0.5)
        opt.state[ps[0]]["step"] = torch.tensor(10.0)
        opt.state[ps[1]]["exp_avg_sq"] = torch.zeros_like(ps[1])
        opt.state[ps[1]]["max_exp_avg_sq"] = torch.zeros_like(ps[1])
        s = opt.state[ps[2]]
        opt.state[ps[2]] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(ps[2]),
                            "exp_avg_sq": s["exp_avg_sq"].clone(), "max_exp_avg_sq": s["max_exp_avg_sq"].clone()}
    for step in range(3, 6):
        _step_both(step, ours, theirs, o1, o2)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    sd1, sd2 = o1.state_dict()["state"], o2.state_dict()["state"]
    for i in range(3):
        for key in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            torch.testing.assert_close(sd1[i][key], sd2[i][key].float(), rtol=1e-5, atol=1e-7)
    assert sd1[0]["step"].item() == 13.0


def test_in_place_state_edits_and_pop_are_honoured():
    ours = make_params("cpu", shapes=[(33,), (4,)])
    theirs = clone_params(ours)
    o1, o2 = FusedAdamW(ours, lr=1e-2), torch.optim.AdamW(theirs, lr=1e-2)
    _step_both(0, ours, theirs, o1, o2)
    for opt, ps in ((o1, ours), (o2, theirs)):
        opt.state[ps[0]]["exp_avg"].mul_(3.0)  # in place: the same tensor
        opt.state[ps[0]]["step"] += 1  # in place as well
        opt.state.pop(ps[1])  # the param starts afresh
    for step in range(1, 4):
        _step_both(step, ours, theirs, o1, o2)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert o1.state[ours[1]]["step"].item() == 3.0


def test_params_added_later_and_first_grads_later_are_stepped():
    ours = make_params("cpu", shapes=[(6,), (7,), (8,)])
    theirs = clone_params(ours)
    o1, o2 = FusedAdamW(ours[:2], lr=1e-2), torch.optim.AdamW(theirs[:2], lr=1e-2)
    for step in range(4):
        set_grads(step, ours, theirs)
        if step < 2:  # params[1] has no grad yet: it gets state only at its first grad
            ours[1].grad = theirs[1].grad = None
        o1.step()
        o2.step()
        if step == 1:
            o1.param_groups[0]["params"].append(ours[2])
            o2.param_groups[0]["params"].append(theirs[2])
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert [o1.state[p]["step"].item() for p in ours] == [4.0, 2.0, 1.0]  # set_grads: no grad for [2] at step 3


def test_a_step_keeps_no_reference_to_the_grads():
    """zero_grad(set_to_none=True) must free the grads: the step's cached plan may not hold them."""
    import weakref

    p = make_params("cpu", shapes=[(1025,), (3,)])
    opt = FusedAdamW(p)
    set_grads(0, p)
    refs = [weakref.ref(x.grad) for x in p]
    opt.step()
    opt.zero_grad(set_to_none=True)
    assert all(r() is None for r in refs)


def test_duplicate_parameters_are_refused():
    """Issue 9 item 4: torch warns and then steps a duplicate twice (for-loop) or once with a
    doubled step count (foreach, fused); FusedAdamW refuses it with a clear error."""
    a, b = make_params("cpu", shapes=[(3,), (4,)])
    with pytest.raises(ValueError, match=r"\['params'\]\[2\] is the same tensor as .*\['params'\]\[0\]"):
        FusedAdamW([a, b, a])
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[1\] is the same tensor"):
        FusedAdamW([{"params": [a]}, {"params": [b, b]}])
    opt = FusedAdamW([a, b])
    opt.param_groups[0]["params"].append(b)  # after construction: refused at the step
    a.grad, b.grad = torch.ones(3), torch.ones(4)
    with pytest.raises(ValueError, match="same tensor"):
        opt.step()


def _copy_by(how, opt):
    import io
    import pickle

    if how == "deepcopy":
        return copy.deepcopy(opt)
    if how == "pickle":
        return pickle.loads(pickle.dumps(opt))
    buf = io.BytesIO()
    torch.save(opt, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_optimizer_object_copies_keep_stepping_like_torch(how):
    """Issue 9 item 10: a copied / pickled / torch.save'd optimizer steps on (today:
    AttributeError 'stochastic_rounding'), exactly as a copied torch.optim.AdamW does."""
    ours = make_params("cpu", shapes=[(97,), (3, 5)])
    theirs = clone_params(ours)
    o1 = FusedAdamW(ours, lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True)
    o2 = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True)
    for step in range(3):
        _step_both(step, ours, theirs, o1, o2)
    c1, c2 = _copy_by(how, o1), _copy_by(how, o2)
    ours2, theirs2 = c1.param_groups[0]["params"], c2.param_groups[0]["params"]
    assert ours2[0] is not ours[0]  # the copy has its own params, as torch's does
    for step in range(3, 6):
        _step_both(step, ours2, theirs2, c1, c2)
    for p, q in zip(ours2, theirs2):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert c1.state[ours2[0]]["step"].item() == 6.0 and o1.state[ours[0]]["step"].item() == 3.0
    _step_both(6, ours, theirs, o1, o2)  # the original is untouched by its copy's steps
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_copies_keep_fused_adamw_settings():
    p = make_params("cpu", torch.bfloat16, shapes=[(17,)])
    opt = FusedAdamW(p, master_weights=True)
    set_grads(0, p)
    opt.step()
    c = copy.deepcopy(opt)
    assert (c.master_weights, c.stochastic_rounding, c.backend) == (True, False, "auto")
    set_grads(1, c.param_groups[0]["params"])
    c.step()
    q = c.param_groups[0]["params"][0]
    assert torch.equal(q, c.state[q]["master_param"].to(torch.bfloat16))
    assert FusedAdamW(make_params("cpu", torch.bfloat16, shapes=[(3,)]), stochastic_rounding=True).__reduce_ex__(2)


BAD_ARGS = [
    (dict(betas=(0.9,)), r"betas must be a pair \(beta1, beta2\).*got \(0\.9,\)"),
    (dict(betas=0.9), r"betas must be a pair"),
    (dict(betas=(0.9, 1.0)), r"betas\[1\] must be in \[0, 1\); got 1\.0"),
    (dict(betas=(float("nan"), 0.9)), r"betas\[0\] must be in \[0, 1\); got nan"),
    (dict(betas=("a", 0.9)), r"betas\[0\] must be a number; got 'a' \(str\)"),
    (dict(lr=float("nan")), r"lr must be a finite number >= 0; got nan"),
    (dict(lr=float("inf")), r"lr must be a finite number >= 0; got inf"),
    (dict(lr=-1.0), r"lr must be a finite number >= 0; got -1\.0"),
    (dict(lr="0.1"), r"lr must be a number; got '0\.1' \(str\)"),
    (dict(lr=torch.tensor([1e-3, 1e-3])), r"lr as a tensor must hold one real number; got shape \(2,\)"),
    (dict(eps=float("nan")), r"eps must be a finite number >= 0; got nan"),
    (dict(eps=None), r"eps must be a number; got None"),
    (dict(weight_decay=float("nan")), r"weight_decay must be a finite number >= 0; got nan"),
    (dict(weight_decay=-0.1), r"weight_decay must be a finite number >= 0"),
    (dict(amsgrad="yes"), r"amsgrad must be True or False; got 'yes' \(str\)"),
    (dict(maximize=2), r"maximize must be True or False; got 2"),
    (dict(adam_w_mode=None), r"adam_w_mode must be True or False; got None"),
    (dict(master_weights="no"), r"master_weights must be True or False"),
    (dict(backend="gpu"), r"backend must be one of .*got 'gpu'"),
    (dict(master_weights=True, stochastic_rounding=True), "stochastic_rounding is for parameters without master_weights"),
]


@pytest.mark.parametrize("kwargs,message", BAD_ARGS, ids=[str(k) for k, _ in BAD_ARGS])
def test_constructor_names_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FusedAdamW(make_params("cpu", shapes=[(3,)]), **kwargs)


def test_bad_group_hyperparameters_name_the_group():
    a, b = make_params("cpu", shapes=[(3,), (4,)])
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['lr'\] must be a finite number >= 0; got nan"):
        FusedAdamW([{"params": [a]}, {"params": [b], "lr": float("nan")}])
    opt = FusedAdamW([a])
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['betas'\] must be a pair"):
        opt.add_param_group({"params": [b], "betas": (0.9, 0.99, 0.999)})
    assert len(opt.param_groups) == 1  # the bad group was not kept


@pytest.mark.parametrize("key", ["step", "exp_avg"])
def test_loaded_state_missing_an_entry_names_the_parameter(key):
    p = make_params("cpu", shapes=[(3,), (4,)])
    t = torch.optim.AdamW(p)
    set_grads(0, p)
    t.step()
    sd = t.state_dict()
    del sd["state"][1][key]
    opt = FusedAdamW(p)
    with pytest.raises(ValueError, match=rf"the state of parameter \(param_groups\[0\]\['params'\]\[1\].*has no '{key}' entry"):
        opt.load_state_dict(sd)


def test_state_replaced_by_a_wrong_shape_names_the_parameter():
    p = make_params("cpu", shapes=[(3,), (4,)])
    opt = FusedAdamW(p)
    set_grads(0, p)
    opt.step()
    opt.state[p[1]]["exp_avg"] = torch.zeros(5)
    set_grads(1, p)
    with pytest.raises(ValueError, match=r"state\['exp_avg'\] of parameter \(param_groups\[0\]\['params'\]\[1\].*shape \(4,\); got shape \(5,\)"):
        opt.step()
