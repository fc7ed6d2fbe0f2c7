"""torch.ops.lmkernels.fused_adamw_ (+ the Triton op) against the float64 reference."""
import copy
import re

import pytest
import torch
from torch.optim.adam import adam as torch_adam

import lmkernels
from lmkernels.reference.adamw import adamw_reference_
from tests._backends import backend_params, device_for

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


def run_steps(backend, lists, n_steps, **opts):
    params, grads, m, v, vmax, steps = lists
    for _ in range(n_steps):
        torch._foreach_add_(steps, 1.0)
        lmkernels.fused_adamw_(params, grads, m, v, steps, max_exp_avg_sqs=vmax, backend=backend, **opts)


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
        lmkernels.fused_adamw_(params, grads, m, v, steps, lr=1e-2, weight_decay=0.1, master_params=master, backend=backend)
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
        lmkernels.fused_adamw_(params, grads, m, v, s, lr=lr, stochastic_rounding_seed=1000 + i, backend=backend)
        lmkernels.fused_adamw_(exact, [g.float() for g in grads], m2, v2, s2, lr=lr, backend=backend)
        lmkernels.fused_adamw_(nearest, grads, m3, v3, s3, lr=lr, backend=backend)
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
    lmkernels.fused_adamw_(lists[0], lists[1], lists[2], lists[3], lists[5], lr=1e-2,
                           inv_scale=1 / scale, found_inf=torch.tensor(1.0, device=device), backend=backend)
    for k in range(4):
        assert all(torch.equal(a, b) for a, b in zip(lists[k], before[k]))
    # found_inf clear: scaled grads behave as unscaled ones.
    scaled = [g * scale for g in lists[1]]
    ref = copy.deepcopy(lists)
    lmkernels.fused_adamw_(lists[0], scaled, lists[2], lists[3], lists[5], lr=1e-2, inv_scale=1 / scale,
                           found_inf=torch.tensor(0.0, device=device), backend=backend)
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


@pytest.mark.parametrize("backend", backend_params("cpu", "triton"))
def test_opcheck(backend):
    device = device_for(backend)
    params, grads, m, v, vmax, steps = make_lists([(5,), (33,)], torch.float32, device, amsgrad=True)
    args = (params, grads, m, v, vmax, [], steps)
    kwargs = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, amsgrad=True,
                  maximize=False, adam_w_mode=True, lr_tensor=None, inv_scale=None, found_inf=None,
                  stochastic_rounding_seed=-1)
    op = torch.ops.lmkernels.fused_adamw_ if backend != "triton" else torch.ops.lmkernels.fused_adamw_triton_
    torch.library.opcheck(op, args, kwargs)


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
        lmkernels.fused_adamw_(lists[0], lists[1], lists[2], lists[3], lists[5], lr=1e-3, backend=backend)


def test_backend_errors():
    lists = make_lists([(3,)], torch.float32, "cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        lmkernels.fused_adamw_(lists[0], lists[1], lists[2], lists[3], lists[5], lr=1e-3, backend="gpu")
    with pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors"):
        lmkernels.fused_adamw_(lists[0], lists[1], lists[2], lists[3], lists[5], lr=1e-3, backend="cuda")


def test_empty_lists_and_tensors():
    lmkernels.fused_adamw_([], [], [], [], [], lr=1e-3)
    p, g = torch.zeros(0), torch.zeros(0)
    lmkernels.fused_adamw_([p], [g], [torch.zeros(0)], [torch.zeros(0)], [torch.tensor(1.0)], lr=1e-3)
