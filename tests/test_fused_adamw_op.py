"""torch.ops.lmkernels.fused_adamw_ (C++ CPU kernel; CUDA C++ and Triton on a GPU) and the
Triton launcher (interpreter, CPU tensors) against the float64 reference."""
import copy
import re

import pytest
import torch
from torch.optim.adam import adam as torch_adam

import lmkernels
from lmkernels.ops import adamw as adamw_op
from lmkernels.reference.adamw import adamw_reference_
from lmkernels.triton import adamw as triton_adamw
from tests._backends import backend_params, device_for, op_backend_params, uses_launcher

SHAPES = [(1,), (97,), (1025,), (3, 7, 11), (0,), (20000,)]  # 20000 spans two CPU work items


def make_lists(shapes, dtype, device, state_dtype=None, amsgrad=False):
    state_dtype = state_dtype or dtype
    params = [torch.randn(s, device=device).to(dtype) for s in shapes]
    grads = [torch.randn(s, device=device).to(dtype) for s in shapes]
    m = [(0.1 * torch.randn(s, device=device)).to(state_dtype) for s in shapes]
    v = [(0.1 * torch.rand(s, device=device)).to(state_dtype) for s in shapes]
    vmax = [x.clone() for x in v] if amsgrad else []
    steps = [torch.tensor(3.0, device=device) for _ in shapes]
    return params, grads, m, v, vmax, steps


def max_err(xs, ys):
    return max(((x.double() - y.double()).abs().max().item() for x, y in zip(xs, ys) if x.numel()), default=0.0)


def adamw_step(backend, params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1=0.9,
               beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
               adam_w_mode=True, max_exp_avg_sqs=(), master_params=(), inv_scale=None,
               found_inf=None, stochastic_rounding_seed=-1, checked=False):
    """lmkernels.fused_adamw_, or for Triton without a GPU its launcher on CPU tensors (with
    `checked`: the op's Triton path, i.e. the C++ checks and then the launcher)."""
    if not uses_launcher(backend):
        lmkernels.fused_adamw_(
            params, grads, exp_avgs, exp_avg_sqs, state_steps, lr=lr, beta1=beta1, beta2=beta2,
            eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            adam_w_mode=adam_w_mode, max_exp_avg_sqs=max_exp_avg_sqs, master_params=master_params,
            inv_scale=inv_scale, found_inf=found_inf,
            stochastic_rounding_seed=stochastic_rounding_seed, backend=backend)
        return
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    launch = adamw_op._triton_kernel if checked else triton_adamw.fused_adamw
    launch(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs),
           list(master_params), list(state_steps), 0.0 if lr_tensor is not None else lr, beta1,
           beta2, eps, weight_decay, amsgrad, maximize, adam_w_mode, lr_tensor, inv_scale,
           found_inf, stochastic_rounding_seed)


def run_steps(backend, lists, n_steps, **opts):
    params, grads, m, v, vmax, steps = lists
    for _ in range(n_steps):
        torch._foreach_add_(steps, 1.0)
        adamw_step(backend, params, grads, m, v, steps, max_exp_avg_sqs=vmax, **opts)


def torch_steps(lists, n_steps, lr, weight_decay=0.0, amsgrad=False, maximize=False, adam_w_mode=True,
                beta1=0.9, beta2=0.999, eps=1e-8):
    """PyTorch's own Adam maths (single-tensor path) in the tensors' dtype: the error yardstick."""
    params, grads, m, v, vmax, steps = lists
    cpu_steps = [s.cpu() for s in steps]
    for _ in range(n_steps):
        torch_adam(params, grads, m, v, vmax, cpu_steps, foreach=False, capturable=False,
                   differentiable=False, fused=None, grad_scale=None, found_inf=None,
                              has_complex=False, decoupled_weight_decay=adam_w_mode, amsgrad=amsgrad,
                              beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps,
                              maximize=maximize)


def reference_steps(lists, n_steps, **opts):
    params, grads, m, v, vmax, steps = lists
    for _ in range(n_steps):
        torch._foreach_add_(steps, 1.0)
        adamw_reference_(params, grads, m, v, steps, max_exp_avg_sqs=vmax, **opts)


OPTIONS = [
    dict(lr=1e-2, weight_decay=0.0),
    dict(lr=1e-2, weight_decay=0.1),
    dict(lr=3e-3, weight_decay=0.05, amsgrad=True),
    dict(lr=1e-2, weight_decay=0.1, maximize=True),
    dict(lr=1e-2, weight_decay=0.1, adam_w_mode=False, beta1=0.8, beta2=0.95, eps=1e-6),
]


@pytest.mark.parametrize("backend", backend_params("cpu", "triton", "cuda"))
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_fp32_matches_reference(backend, opts):
    device = device_for(backend)
    lists = make_lists(SHAPES, torch.float32, device, amsgrad=opts.get("amsgrad", False))
    ref = copy.deepcopy(lists)
    ref64 = [[t.double() if t.is_floating_point() and t.dim() else t.clone() for t in lst] for lst in copy.deepcopy(lists)]
    run_steps(backend, lists, 5, **opts)
    torch_steps(ref, 5, **opts)  # PyTorch in fp32: the error scale to stay within
    reference_steps(ref64, 5, **opts)
    ours, torch32 = max_err(lists[0], ref64[0]), max_err(ref[0], ref64[0])
    eps32 = torch.finfo(torch.float32).eps * max(p.abs().max().item() for p in ref64[0] if p.numel())
    assert ours <= 2 * torch32 + eps32, (ours, torch32)
    for k in (2, 3, 4):  # moments
        assert max_err(lists[k], ref64[k]) <= 2 * max_err(ref[k], ref64[k])


@pytest.mark.parametrize("backend", backend_params("cpu", "triton", "cuda"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("state_dtype", ["same", torch.float32])
def test_low_precision_matches_reference(backend, dtype, state_dtype):
    device = device_for(backend)
    sdt = dtype if state_dtype == "same" else state_dtype
    lists = make_lists(SHAPES[:5], dtype, device, state_dtype=sdt, amsgrad=True)
    ref = copy.deepcopy(lists)
    run_steps(backend, lists, 3, lr=1e-2, weight_decay=0.1, amsgrad=True)
    reference_steps(ref, 3, lr=1e-2, weight_decay=0.1, amsgrad=True)
    # Both compute in >= fp32 and round to the storage dtype each step: they may differ by the
    # last bit where the exact value sits near a rounding boundary, never more.
    for ours, theirs in zip(lists[0], ref[0]):
        ulp = torch.finfo(dtype).eps * theirs.double().abs().clamp_min(torch.finfo(dtype).tiny)
        assert ((ours.double() - theirs.double()).abs() <= 2 * ulp).all()
    # Moments: a step is ~4 roundings of operands no larger than the tensor's largest entry
    # (g - m cancels near zero, so an elementwise-relative bound would not hold for either).
    for k in (2, 3, 4):
        for ours, theirs in zip(lists[k], ref[k]):
            if theirs.numel():
                tol = 4 * torch.finfo(sdt).eps * theirs.double().abs().max()
                assert (ours.double() - theirs.double()).abs().max() <= tol


@pytest.mark.parametrize("backend", backend_params("cpu", "triton", "cuda"))
def test_master_weights(backend):
    device = device_for(backend)
    params, grads, m, v, _, steps = make_lists(SHAPES[:5], torch.bfloat16, device, state_dtype=torch.float32)
    master = [p.float() for p in params]
    ref = [master[i].clone() for i in range(len(params))], [g.float() for g in grads], copy.deepcopy(m), copy.deepcopy(v)
    ref_steps = copy.deepcopy(steps)
    for _ in range(4):
        torch._foreach_add_(steps, 1.0)
        torch._foreach_add_(ref_steps, 1.0)
        adamw_step(backend, params, grads, m, v, steps, lr=1e-2, weight_decay=0.1, master_params=master)
        adamw_reference_(*ref, ref_steps, lr=1e-2, weight_decay=0.1)
    assert max_err(master, ref[0]) < 1e-5
    for p, w in zip(params, master):
        assert torch.equal(p, w.to(torch.bfloat16))


@pytest.mark.parametrize("backend", backend_params("cpu", "triton", "cuda"))
def test_stochastic_rounding_is_unbiased(backend):
    """Updates far below one bf16 ulp: nearest rounding loses them all, stochastic rounding
    keeps them on average."""
    device = device_for(backend)
    n, n_steps = 4096, 20
    params = [torch.ones(n, device=device, dtype=torch.bfloat16)]
    grads = [torch.ones(n, device=device, dtype=torch.bfloat16)]
    exact = [torch.ones(n, device=device)]
    state = lambda: ([torch.zeros(n, device=device)], [torch.zeros(n, device=device)], [torch.zeros((), device=device)])  # noqa: E731
    m, v, s = state()
    m2, v2, s2 = state()
    nearest = [params[0].clone()]
    m3, v3, s3 = state()
    lr = 1e-4  # |update| ~ lr, bf16 ulp at 1.0 is 2^-7 = 0.0078
    for i in range(n_steps):
        for steps in (s, s2, s3):
            steps[0] += 1
        adamw_step(backend, params, grads, m, v, s, lr=lr, stochastic_rounding_seed=1000 + i)
        adamw_step(backend, exact, [g.float() for g in grads], m2, v2, s2, lr=lr)
        adamw_step(backend, nearest, grads, m3, v3, s3, lr=lr)
    assert torch.equal(nearest[0], torch.ones_like(nearest[0]))  # every update lost
    drift = 1.0 - exact[0].mean().item()  # ~ n_steps * lr
    mean = params[0].float().mean().item()
    # Each element ends within one ulp of the exact value; the mean's std is < ulp / sqrt(n).
    assert abs((1.0 - mean) - drift) < 5 * 2**-7 / n**0.5 + 1e-6, (mean, drift)


@pytest.mark.parametrize("backend", backend_params("cpu", "triton", "cuda"))
def test_grad_scaler_inputs(backend):
    device = device_for(backend)
    lists = make_lists(SHAPES[:4], torch.float32, device)
    before = copy.deepcopy(lists)
    scale = torch.tensor(1024.0, device=device)
    # found_inf set: nothing changes.
    torch._foreach_add_(lists[5], 1.0)
    adamw_step(backend, lists[0], lists[1], lists[2], lists[3], lists[5], lr=1e-2,
               inv_scale=1 / scale, found_inf=torch.tensor(1.0, device=device))
    for k in range(4):
        assert all(torch.equal(a, b) for a, b in zip(lists[k], before[k]))
    # found_inf clear: scaled grads behave as unscaled ones.
    scaled = [g * scale for g in lists[1]]
    ref = copy.deepcopy(lists)
    adamw_step(backend, lists[0], scaled, lists[2], lists[3], lists[5], lr=1e-2, inv_scale=1 / scale,
               found_inf=torch.tensor(0.0, device=device))
    adamw_reference_(ref[0], ref[1], ref[2], ref[3], ref[5], lr=1e-2)
    assert max_err(lists[0], ref[0]) < 1e-6


@pytest.mark.parametrize("backend", backend_params("cpu", "triton", "cuda"))
def test_lr_tensor(backend):
    device = device_for(backend)
    a = make_lists(SHAPES[:4], torch.float32, device)
    b = copy.deepcopy(a)
    lr = 2.0**-9  # exact in fp32, so the tensor and the float carry the same value
    run_steps(backend, a, 2, lr=torch.tensor(lr, device=device))
    run_steps(backend, b, 2, lr=lr)
    assert max_err(a[0], b[0]) == 0.0


@pytest.mark.parametrize("backend", op_backend_params("cpu", "triton", "cuda"))
def test_opcheck(backend):
    device = device_for(backend)
    params, grads, m, v, vmax, steps = make_lists([(5,), (33,)], torch.float32, device, amsgrad=True)
    args = (params, grads, m, v, vmax, [], steps)
    kwargs = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, amsgrad=True,
                  maximize=False, adam_w_mode=True, lr_tensor=None, inv_scale=None, found_inf=None,
                  stochastic_rounding_seed=-1, backend=backend)
    torch.library.opcheck(torch.ops.lmkernels.fused_adamw_, args, kwargs)


def test_compiles_fullgraph():
    params, grads, m, v, _, steps = make_lists([(7,), (64,)], torch.float32, "cpu")
    ref = copy.deepcopy((params, grads, m, v, steps))

    def step(params, grads, m, v, steps):
        lmkernels.fused_adamw_(params, grads, m, v, steps, lr=1e-2, weight_decay=0.1)

    torch.compile(step, fullgraph=True, backend="aot_eager")(params, grads, m, v, steps)
    step(*ref)
    assert max_err(params, ref[0]) == 0.0


BAD = {
    "int dtype": (lambda L: L[0].__setitem__(0, torch.ones(3, dtype=torch.int32)), "params[0] must be float32"),
    "grad dtype": (lambda L: L[1].__setitem__(0, L[1][0].double()), "grads[0] has dtype"),
    "grad shape": (lambda L: L[1].__setitem__(1, torch.zeros(5)), "grads[1] has shape"),
    "short list": (lambda L: L[2].pop(), "exp_avgs must have one tensor per entry"),
    "non-contiguous": (lambda L: L[0].__setitem__(1, torch.zeros(10, 2).t()), "params[1] must be contiguous"),
    "sparse grad": (lambda L: L[1].__setitem__(0, torch.zeros(3).to_sparse()), "grads[0] is sparse"),
    "complex": (lambda L: L[0].__setitem__(0, torch.zeros(3, dtype=torch.complex64)), "params[0] must be float32"),
    "step shape": (lambda L: L[5].__setitem__(0, torch.zeros(2)), "state_steps[0] must hold exactly one value"),
}


@pytest.mark.parametrize("backend", backend_params("cpu", "triton"))
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_named(backend, case):
    lists = [list(x) for x in make_lists([(3,), (2, 5)], torch.float32, device_for(backend))]
    mutate, message = BAD[case]
    mutate(lists)
    with pytest.raises((RuntimeError, ValueError), match=re.escape(message)):
        adamw_step(backend, lists[0], lists[1], lists[2], lists[3], lists[5], lr=1e-3, checked=True)


def raw_op(backend, params, grads, exp_avgs, exp_avg_sqs, state_steps, lr=1e-3, lr_tensor=None):
    """torch.ops.lmkernels.fused_adamw_ itself (for Triton without a GPU: its checked path)."""
    args = (params, grads, exp_avgs, exp_avg_sqs, [], [], state_steps)
    hyper = (lr, 0.9, 0.999, 1e-8, 0.0, False, False, True, lr_tensor, None, None, -1)
    if uses_launcher(backend):
        adamw_op._triton_kernel(*args, *hyper)
    else:
        names = ("lr", "beta1", "beta2", "eps", "weight_decay", "amsgrad", "maximize", "adam_w_mode",
                 "lr_tensor", "inv_scale", "found_inf", "stochastic_rounding_seed")
        torch.ops.lmkernels.fused_adamw_(*args, **dict(zip(names, hyper)), backend=backend)


@pytest.mark.parametrize("backend", backend_params("cpu", "triton"))
def test_raw_op_rejects_inputs_that_gave_nan_or_garbage(backend):
    """Issue 9 item 5: step 0 (NaN weights), lr < 0 and a param passed as its own grad (or
    moment) were accepted."""
    device = device_for(backend)
    cases = [
        (dict(step=0.0), "state_steps[1] must be >= 1"),
        (dict(step=float("nan")), "state_steps[1] must be >= 1"),
        (dict(lr=-1e-3), "lr must be >= 0; got -0.001"),
        (dict(lr=float("nan")), "lr must be >= 0"),
        (dict(lr_tensor=-1e-3), "lr must be >= 0; got lr_tensor"),
        (dict(alias="grads"), "grads[1] shares memory with params[1]"),
        (dict(alias="exp_avgs"), "exp_avgs[1] shares memory with params[1]"),
        (dict(alias="exp_avg_sqs"), "exp_avg_sqs[1] shares memory with params[1]"),
    ]
    for case, message in cases:
        params, grads, m, v, _, steps = (list(x) for x in make_lists([(3,), (2, 5)], torch.float32, device))
        before = [p.clone() for p in params]
        if "step" in case:
            steps[1] = torch.tensor(case["step"], device=device)
        lists = dict(grads=grads, exp_avgs=m, exp_avg_sqs=v)
        if "alias" in case:
            lists[case["alias"]][1] = params[1].detach()  # another tensor, the same memory
        lr_tensor = torch.tensor(case["lr_tensor"]) if "lr_tensor" in case else None
        with pytest.raises(ValueError, match=re.escape(message)):
            raw_op(backend, params, lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"], steps,
                   lr=case.get("lr", 1e-3), lr_tensor=lr_tensor)
        assert all(torch.equal(a, b) for a, b in zip(params, before)), case


def test_backend_errors():
    lists = make_lists([(3,)], torch.float32, "cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        lmkernels.fused_adamw_(lists[0], lists[1], lists[2], lists[3], lists[5], lr=1e-3, backend="gpu")
    with pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors"):
        lmkernels.fused_adamw_(lists[0], lists[1], lists[2], lists[3], lists[5], lr=1e-3, backend="cuda")
    with pytest.raises(ValueError, match=re.escape("call lmkernels.triton.adamw.fused_adamw directly")):
        lmkernels.fused_adamw_(lists[0], lists[1], lists[2], lists[3], lists[5], lr=1e-3, backend="triton")


@pytest.mark.parametrize("preferred", ["cuda", "triton", "cpu"])
def test_lmk_backend_does_not_break_cpu_tensors(monkeypatch, preferred):
    """LMK_BACKEND chooses among GPU kernels; CPU tensors have one kernel and ignore it."""
    a = make_lists([(97,), (5, 3)], torch.float32, "cpu")
    b = copy.deepcopy(a)
    run_steps("auto", a, 2, lr=1e-2, weight_decay=0.1)
    monkeypatch.setenv("LMK_BACKEND", preferred)
    run_steps("auto", b, 2, lr=1e-2, weight_decay=0.1)
    assert max_err(a[0], b[0]) == 0.0


def test_backend_table_for_cuda_tensors(monkeypatch):
    """What the op runs on CUDA tensors for each backend / LMK_BACKEND (the table is plain
    Python, so it is checked here without a GPU)."""
    table = adamw_op.BACKEND_TABLE
    compiled = lmkernels.build_info()["compiled_backends"]
    cuda_cpp = table.kernels["cuda"]
    assert (cuda_cpp is not None) == ("cuda" in compiled)
    assert table.pick("triton") is adamw_op._triton_kernel
    assert table.pick("auto") is (cuda_cpp if cuda_cpp is not None else adamw_op._triton_kernel)
    for bad, error, message in (("cpu", ValueError, "backend 'cpu' needs CPU tensors"),
                                ("gpu", ValueError, "backend must be one of")):
        with pytest.raises(error, match=re.escape(message)):
            table.pick(bad)
    monkeypatch.setenv("LMK_BACKEND", "triton")
    assert table.pick("auto") is adamw_op._triton_kernel
    if cuda_cpp is not None:
        assert table.pick("cuda") is cuda_cpp  # an explicit backend= beats LMK_BACKEND
    monkeypatch.setenv("LMK_BACKEND", "nope")
    with pytest.raises(ValueError, match="LMK_BACKEND must be one of"):
        table.pick("auto")
    if cuda_cpp is None:
        with pytest.raises(RuntimeError, match="built without CUDA kernels"):
            table.pick("cuda")
        monkeypatch.setenv("LMK_BACKEND", "cuda")  # a preference this build cannot honour
        monkeypatch.setattr(table, "_warned", set())  # it warns once per process
        with pytest.warns(UserWarning, match="LMK_BACKEND=cuda"):
            assert table.pick("auto") is adamw_op._triton_kernel


def test_fake_checks_shapes():
    """Under tracing the fake impl reports what the C++ checks would (not silently None)."""
    params, grads, m, v, _, steps = make_lists([(7,), (64,)], torch.float32, "meta")
    grads[1] = torch.empty(63, device="meta")
    with pytest.raises(RuntimeError, match=re.escape("grads[1] has shape (63,) but params[1] has shape (64,)")):
        lmkernels.fused_adamw_(params, grads, m, v, steps, lr=1e-2)
    with pytest.raises(RuntimeError, match="exp_avgs must have one tensor per entry of params"):
        lmkernels.fused_adamw_(params, grads[:1] * 2, m[:1], v, steps, lr=1e-2)


def test_empty_lists_and_tensors():
    lmkernels.fused_adamw_([], [], [], [], [], lr=1e-3)
    p, g = torch.zeros(0), torch.zeros(0)
    lmkernels.fused_adamw_([p], [g], [torch.zeros(0)], [torch.zeros(0)], [torch.tensor(1.0)], lr=1e-3)
