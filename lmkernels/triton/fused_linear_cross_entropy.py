"""Fused linear cross-entropy on GPU: chunked GEMMs through torch.matmul (cuBLAS) and one
Triton row kernel for the softmax, the loss and d(loss)/d(logits).

Row kernel, one program per row of a (C, V) logits chunk X (any float dtype; fp32 maths):
    y   = softcap * tanh(X / softcap)          (SOFTCAP; else y = X)
    lse = log sum_j exp(y_j)                   (online max/sum over BLOCK_V tiles; or loaded: HAVE_LSE)
    loss = (1 - eps)(lse - y_t) + eps (lse - mean_j y_j) + z lse^2,  z_row = z lse^2
    dX_j = (s (p_j - q_j) + s 2 z lse p_j) (1 - (y_j / softcap)^2),  p = exp(y - lse)
with q the smoothed one-hot target: Q_OTHER = eps / V, Q_TARGET = 1 - eps + eps / V (formed in
double on the host: exactly 1 when V = 1); p - q first keeps the cancellation exact near p = q.
written in place over X (COMPUTE_GRAD); s = the row's share of the upstream gradient
(SCALE_PER_ROW: scale[row], else scale[0]). Rows with t == ignore_index: loss 0, dX 0.
A vocab-parallel shard: X holds the classes [vocab_start, vocab_start + V) of a V_total
vocabulary (the whole one: 0 and V), t is a global class id (no one-hot term when another
shard holds it) and the smoothing is spread over V_total; PARTIAL (shard forward) stores this
shard's lse and loss = -(1 - eps) y_t [t here] - eps sum_j y_j / V_total instead, z = 0
(lmkernels/distributed/vocab_parallel.py combines the shards).
The chunk loop then takes dh = dX W and dW += dX^T h (fp32 accumulator) from cuBLAS.
"""
import triton
import triton.language as tl

from lmkernels.triton._common import cast_for_store, tl_dtype, triton_interpreted


@triton.jit
def _softcapped(x, softcap, SOFTCAP: tl.constexpr):
    if SOFTCAP:
        # tanh(u) = 1 - 2 / (exp(2u) + 1): exact limits +-1 when exp over/underflows
        x = softcap * (1.0 - 2.0 / (tl.exp(2.0 * x / softcap) + 1.0))
    return x


@triton.jit
def flce_row_kernel(x_ptr, stride_x, target_ptr, scale_ptr, lse_ptr, loss_ptr, z_ptr,
                    V, vocab_start, V_total, ignore_index, eps, q_other, q_target, z_coef, softcap,
                    HAVE_LSE: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
                    SCALE_PER_ROW: tl.constexpr, SOFTCAP: tl.constexpr, PARTIAL: tl.constexpr,
                    BLOCK_V: tl.constexpr, DTYPE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_x
    offs0 = tl.arange(0, BLOCK_V)
    t_global = tl.load(target_ptr + row)
    t = t_global - vocab_start  # the target's column, if this shard holds it
    here = (t >= 0) & (t < V)
    if t_global == ignore_index:
        if COMPUTE_GRAD:
            for v0 in range(0, V, BLOCK_V):
                offs = v0 + offs0
                tl.store(base + offs, cast_for_store(tl.zeros([BLOCK_V], tl.float32), DTYPE),
                         mask=offs < V)
        if not HAVE_LSE:
            tl.store(lse_ptr + row, 0.0)
            tl.store(loss_ptr + row, 0.0)
            tl.store(z_ptr + row, 0.0)
    else:
        if HAVE_LSE:
            lse = tl.load(lse_ptr + row)
        else:
            m = float("-inf")
            s = 0.0
            sum_y = 0.0
            for v0 in range(0, V, BLOCK_V):
                offs = v0 + offs0
                ok = offs < V
                y = _softcapped(tl.load(base + offs, mask=ok, other=0.0).to(tl.float32), softcap, SOFTCAP)
                sum_y += tl.sum(tl.where(ok, y, 0.0), 0)
                y = tl.where(ok, y, float("-inf"))
                m_new = tl.maximum(m, tl.max(y, 0))
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(y - m_new), 0)
                m = m_new
            lse = m + tl.log(s)
            y_t = _softcapped(tl.load(base + t, mask=here, other=0.0).to(tl.float32), softcap, SOFTCAP)
            y_t = tl.where(here, y_t, 0.0)
            if PARTIAL:
                z_row = 0.0
                loss = -(1.0 - eps) * y_t - eps * sum_y / V_total
            else:
                z_row = z_coef * lse * lse
                loss = (1.0 - eps) * (lse - y_t) + eps * (lse - sum_y / V_total) + z_row
            tl.store(lse_ptr + row, lse)
            tl.store(loss_ptr + row, loss)
            tl.store(z_ptr + row, z_row)
        if COMPUTE_GRAD:
            if SCALE_PER_ROW:
                scale = tl.load(scale_ptr + row).to(tl.float32)
            else:
                scale = tl.load(scale_ptr).to(tl.float32)
            c = scale * 2.0 * z_coef * lse
            for v0 in range(0, V, BLOCK_V):
                offs = v0 + offs0
                ok = offs < V
                y = _softcapped(tl.load(base + offs, mask=ok, other=0.0).to(tl.float32), softcap, SOFTCAP)
                p = tl.exp(y - lse)
                d = (p - tl.where(offs == t, q_target, q_other)) * scale + p * c
                if SOFTCAP:
                    r = y / softcap
                    d = d * (1.0 - r * r)
                tl.store(base + offs, cast_for_store(d, DTYPE), mask=ok)


# 4096 elements per tile: 16 KB of fp32 per pass, 8 warps stream it with 16-byte loads (bf16:
# 8 per thread); the interpreter gets a small tile so awkward V still spans several tiles.
BLOCK_V = 128 if triton_interpreted() else 4096
NUM_WARPS = 8


def _row_kernel_call(x, target, scale, lse, loss_rows, z_rows, *, ignore_index, label_smoothing,
                     z_loss, softcap, have_lse, compute_grad, scale_per_row, vocab_start=0,
                     vocab_size=0):
    """(args, kwargs) of flce_row_kernel for a (C, V) chunk x: the one place both the launcher
    and compile_specs() build the call from. vocab_size > 0: x is a vocab-parallel shard's chunk."""
    V = x.shape[1]
    V_total = vocab_size or V
    args = (x, x.stride(0), target, scale, lse, loss_rows, z_rows, V, vocab_start, V_total,
            ignore_index, float(label_smoothing), label_smoothing / V_total,
            1.0 - label_smoothing + label_smoothing / V_total, float(z_loss), float(softcap or 1.0))
    kwargs = dict(HAVE_LSE=have_lse, COMPUTE_GRAD=compute_grad, SCALE_PER_ROW=scale_per_row,
                  SOFTCAP=softcap is not None, PARTIAL=vocab_size > 0 and not have_lse,
                  BLOCK_V=BLOCK_V, DTYPE=tl_dtype(x.dtype), num_warps=NUM_WARPS)
    return args, kwargs


def launch_rows(x, target, scale, lse, loss_rows, z_rows, **opts):
    """Runs the row kernel over the rows of the contiguous-rows chunk x (C, V)."""
    if x.shape[0] == 0:
        return
    args, kwargs = _row_kernel_call(x, target, scale, lse, loss_rows, z_rows, **opts)
    flce_row_kernel[(x.shape[0],)](*args, **kwargs)


def compile_specs():
    """For the sm_90/sm_100 compile gate (lmkernels/gpu_compile_check.py): every specialization
    the launchers make (dtype x softcap x forward with/without gradient, backward per-row or
    scalar scale) for a (1024, 32000) chunk. Streaming kernel: 16-byte loads required."""
    import torch

    from lmkernels.triton._compile_spec import ArgTensor, CompileSpec, Launch

    C, V = 1024, 32000
    f32 = lambda *shape: ArgTensor(torch.float32, shape=shape)  # noqa: E731
    modes = {"fwd": (False, False, False), "fwd+grad": (False, True, False),
             "bwd scalar": (True, True, False), "bwd per-row": (True, True, True),
             "fwd vocab-shard": (False, False, False)}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for softcap in (None, 30.0):
            for mode, (have_lse, grad, per_row) in modes.items():
                args, kwargs = _row_kernel_call(
                    ArgTensor(dtype, shape=(C, V)), ArgTensor(torch.int64, shape=(C,)),
                    f32(C if per_row else 1), f32(C), f32(C), f32(C), ignore_index=-100,
                    label_smoothing=0.1, z_loss=1e-4, softcap=softcap, have_lse=have_lse,
                    compute_grad=grad, scale_per_row=per_row,
                    vocab_size=4 * V if mode == "fwd vocab-shard" else 0)
                name = f"flce_row {str(dtype).removeprefix('torch.')} {mode}{' softcap' if softcap else ''}"
                yield CompileSpec(name, Launch(flce_row_kernel, args, kwargs), vector_loads=True)


def default_chunk_rows(N: int, V: int) -> int:
    """~8M logits per chunk (16 MB in bf16), as the CPU kernel."""
    return max(1, min(max((8 << 20) // V, 16), N))


def _check_targets(target, V, ignore_index):
    # One device sync per call: an out-of-range class would otherwise read out of bounds.
    bad = (target != ignore_index) & ((target < 0) | (target >= V))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"fused_linear_cross_entropy: target[{i}] = {int(target[i])} is out of "
                         f"range for V = {V} classes (and is not ignore_index = {ignore_index})")


def _chunk_loop(hidden, weight, target, bias, scale, lse, loss_rows, z_rows, grads, *, opts,
                chunk_size, have_lse, scale_per_row):
    # opts: the loss options of _row_kernel_call (ignore_index .. softcap, vocab_start, vocab_size)
    import torch

    N, V = hidden.shape[0], weight.shape[0]
    C = chunk_size if chunk_size > 0 else default_chunk_rows(N, V)
    for n0 in range(0, N, C):
        h = hidden[n0:n0 + C]
        x = torch.addmm(bias, h, weight.T) if bias is not None else h @ weight.T  # (c, V)
        sl = slice(n0, n0 + C)
        launch_rows(x, target[sl], scale[sl] if scale_per_row else scale, lse[sl],
                    loss_rows[sl] if loss_rows is not None else lse[sl],
                    z_rows[sl] if z_rows is not None else lse[sl],
                    have_lse=have_lse, compute_grad=grads is not None,
                    scale_per_row=scale_per_row, **opts)
        if grads is not None:
            gh, gw, gb = grads
            torch.mm(x, weight, out=gh[sl])
            if gw.dtype == x.dtype:
                gw.addmm_(x.T, h)
            else:  # bf16/fp16: products in the input dtype, accumulated across chunks in fp32
                gw += (x.T @ h).float()
            if gb is not None:
                gb += x.sum(0, dtype=torch.float32)


def _row_scale(target, ignore_index, reduction, grad_loss=None):
    import torch

    if reduction == "none":
        return grad_loss.reshape(-1).float().contiguous(), True
    g = torch.ones((), device=target.device) if grad_loss is None else grad_loss.float()
    if reduction == "sum":
        return g.reshape(1), False
    n_valid = (target != ignore_index).sum().clamp(min=1).float()  # all ignored: scale unused
    return (g / n_valid).reshape(1), False


def _reduce(rows, target, ignore_index, reduction):
    if reduction == "none":
        return rows
    total = rows.double().sum()
    if reduction == "mean":
        total = total / (target != ignore_index).sum()
    return total.float()


def flce_fwd(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap,
             reduction, chunk_size, compute_grad, vocab_start=0, vocab_size=0):
    """Launcher with the signature and outputs of torch.ops.lmkernels.fused_linear_cross_entropy_fwd."""
    import torch

    N, H = hidden.shape
    V = weight.shape[0]
    _check_targets(target, vocab_size or V, ignore_index)
    hidden, weight, target = hidden.contiguous(), weight.contiguous(), target.contiguous()
    f32 = dict(dtype=torch.float32, device=hidden.device)
    lse, loss_rows, z_rows = (torch.zeros(N, **f32) for _ in range(3))
    grads = None
    scale, per_row = (_row_scale(target, ignore_index, reduction) if compute_grad else (lse, False))
    if compute_grad:
        gw = torch.zeros(V, H, **f32) if weight.dtype != torch.float32 else torch.zeros_like(weight)
        gb = torch.zeros(V, **f32) if bias is not None else None
        grads = (torch.empty_like(hidden), gw, gb)
    opts = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                vocab_start=vocab_start, vocab_size=vocab_size)
    _chunk_loop(hidden, weight, target, bias, scale, lse, loss_rows, z_rows, grads, opts=opts,
                chunk_size=chunk_size, have_lse=False, scale_per_row=per_row)
    loss = _reduce(loss_rows, target, ignore_index, reduction)
    z = _reduce(z_rows, target, ignore_index, reduction)
    if grads is None:  # three distinct empties: outputs of an op may not alias
        return loss, z, lse, hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)
    gh, gw, gb = grads
    return (loss, z, lse, gh, gw.to(weight.dtype),
            gb.to(bias.dtype) if gb is not None else hidden.new_empty(0))


def flce_bwd(grad_loss, hidden, weight, target, bias, lse, ignore_index, label_smoothing, z_loss,
             softcap, reduction, chunk_size, vocab_start=0, vocab_size=0):
    """Launcher with the signature and outputs of torch.ops.lmkernels.fused_linear_cross_entropy_bwd."""
    import torch

    N, H = hidden.shape
    V = weight.shape[0]
    _check_targets(target, vocab_size or V, ignore_index)  # the op can be called on its own
    hidden, weight, target = hidden.contiguous(), weight.contiguous(), target.contiguous()
    f32 = dict(dtype=torch.float32, device=hidden.device)
    scale, per_row = _row_scale(target, ignore_index, reduction, grad_loss)
    gw = torch.zeros(V, H, **f32) if weight.dtype != torch.float32 else torch.zeros_like(weight)
    gb = torch.zeros(V, **f32) if bias is not None else None
    grads = (torch.empty_like(hidden), gw, gb)
    opts = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                vocab_start=vocab_start, vocab_size=vocab_size)
    _chunk_loop(hidden, weight, target, bias, scale, lse.contiguous(), None, None, grads, opts=opts,
                chunk_size=chunk_size, have_lse=True, scale_per_row=per_row)
    gh, gw, gb = grads
    return gh, gw.to(weight.dtype), (gb.to(bias.dtype) if gb is not None else hidden.new_empty(0))
