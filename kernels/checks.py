"""Correctness cases for every kernel: forward and all gradients against an fp32 torch reference.

One list of cases serves three callers:

- ``tessera bench kernels --check`` runs them at realistic sizes in bf16 on a GPU before timing;
- ``tests/kernels/test_kernel_checks.py``: ``test_realistic_bf16_gpu`` runs the same realistic bf16
  cases (``@pytest.mark.gpu``), and ``test_small`` runs them at small sizes in bf16 and fp32, on CPU
  under the Triton interpreter (bf16 included: see ``flash_attention._dot``), so the harness itself
  is tested everywhere.

The error of a case is the largest relative L2 error ``|a - r| / |r|`` over the outputs and the
gradients of every input, where ``r`` comes from the torch reference run in fp32 on the *same*
(already rounded) inputs with the same upstream gradients. A case passes when that error is
finite and below its tolerance for the dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

# Relative L2 tolerance per input dtype, from the unit roundoff u and the largest error measured at
# the small shapes on CPU (interpreter; triton 3.9), outputs and all gradients:
# - bf16 (u = 2^-8 = 3.9e-3): one rounding of each output (norms, RoPE, SwiGLU, cross entropy:
#   measured max 4.5e-3), and attention rounds P and dS to bf16 once more (measured max 6.5e-3;
#   at most 2.5e-3 at the realistic shapes on an H100, docs/kernels.md). Bounds 2e-2 and 1e-2 (~2-3x).
# - fp16 (u = 2^-11 = 4.9e-4): same roundings; measured max 3.4e-4 for both groups. Bound 2^-10 =
#   9.8e-4 (2u) for both.
# - fp32 (u = 2^-24 = 6e-8; the reference is fp32 too): measured max 3.1e-7 (attention) and 2.6e-7
#   (other). Bounds 2^-18 = 3.8e-6 and 2^-19 = 1.9e-6: room for the GPU's approximate exp2/rsqrt.
_TOL = {
    torch.bfloat16: {"attention": 2e-2, "other": 1e-2},
    torch.float16: {"attention": 2.0**-10, "other": 2.0**-10},
    torch.float32: {"attention": 2.0**-18, "other": 2.0**-19},
}


@dataclass
class Case:
    """One kernel call and its reference, with the inputs it differentiates."""

    name: str
    fn: Callable[..., object]
    ref: Callable[..., object]
    inputs: list[torch.Tensor]  # leaf tensors with requires_grad, in the kernel's dtype
    tol: float
    extra: dict = field(default_factory=dict)  # non-differentiable arguments, for the record


def _attention_cases(size: str) -> list[tuple[str, dict]]:
    # Every head dim causal and not; documents at the model's usual head dim.
    dims = (64, 128, 256) if size == "realistic" else (32, 24)  # 24: not a power of two
    doc_dim = dims[1] if size == "realistic" else dims[0]
    out = []
    for causal in (True, False):
        for d in dims:
            out.append((f"attention causal={causal} D={d}", dict(causal=causal, d=d, docs=False)))
        out.append((f"attention causal={causal} documents", dict(causal=causal, d=doc_dim, docs=True)))
    return out


def case_names(size: str = "realistic") -> list[str]:
    """Names of all cases at `size` ("realistic": GPU shapes, "small": interpreter shapes)."""
    _check_size(size)
    return [n for n, _ in _attention_cases(size)] + [
        "rmsnorm", "layernorm", "layernorm no bias", "rope", "rope position_ids", "swiglu",
        "cross_entropy", "cross_entropy smoothing+z_loss",
    ]


def _check_size(size: str) -> None:
    if size not in ("realistic", "small"):
        raise ValueError(f"size must be 'realistic' or 'small', got {size!r}")


def build_case(name: str, device: torch.device | str, dtype: torch.dtype, size: str = "realistic",
               seed: int = 0) -> Case:
    """The inputs of case `name`, drawn from a fixed seed, on `device` in `dtype`."""
    from .cross_entropy import cross_entropy, cross_entropy_ref
    from .flash_attention import attention_ref, flash_attention
    from .norms import layer_norm, layer_norm_ref, rms_norm, rms_norm_ref
    from .rope import apply_rope, apply_rope_ref, rope_cos_sin
    from .swiglu import swiglu, swiglu_ref

    _check_size(size)
    big = size == "realistic"
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        t = torch.randn(*shape, generator=gen) * scale + shift
        return t.to(device=device, dtype=dtype).requires_grad_()

    tols = _TOL[dtype]
    attn = dict(_attention_cases(size))
    if name in attn:
        spec = attn[name]
        # GQA 16/4 at an odd length (not a block multiple); small: 6 heads over 2, length 67.
        b, h, hkv, n = (2, 16, 4, 1999) if big else (2, 6, 2, 67)
        d, causal = spec["d"], spec["causal"]
        doc = None
        if spec["docs"]:
            doc = torch.zeros(b, n, dtype=torch.int32)
            doc[0, 300 % n:] += 1  # boundaries at odd places; row 1 reuses an id in a later run
            doc[0, 1001 % n:] += 1
            doc[1, 777 % n:] = 5
            doc[1, 1500 % n:] = 0
            doc = doc.to(device)
        return Case(name, lambda q, k, v: flash_attention(q, k, v, causal=causal, doc_ids=doc),
                    lambda q, k, v: attention_ref(q, k, v, causal=causal, doc_ids=doc),
                    [rnd(b, h, n, d), rnd(b, hkv, n, d), rnd(b, hkv, n, d)], tols["attention"],
                    dict(b=b, h=h, hkv=hkv, n=n, d=d, causal=causal, documents=doc is not None))
    m, dm = (8191, 4096) if big else (37, 96)
    if name == "rmsnorm":
        return Case(name, rms_norm, rms_norm_ref, [rnd(m, dm, scale=3.0, shift=1.0), rnd(dm, scale=0.1, shift=1.0)],
                    tols["other"], dict(m=m, d=dm))
    if name in ("layernorm", "layernorm no bias"):
        ins = [rnd(m, dm, scale=3.0, shift=1.0), rnd(dm, scale=0.1, shift=1.0)]
        if name == "layernorm":
            ins.append(rnd(dm, scale=0.1))
        return Case(name, layer_norm, layer_norm_ref, ins, tols["other"], dict(m=m, d=dm))
    if name in ("rope", "rope position_ids"):
        b, hq, hk, n, d = (2, 16, 4, 1999, 128) if big else (3, 6, 2, 17, 32)
        cos, sin = rope_cos_sin(2 * n, d, device=device)
        pos = None
        if name == "rope position_ids":  # packed documents: positions restart at odd places
            pos = torch.cat([torch.arange(n // 3), torch.arange(n - n // 3)]).expand(b, n).contiguous().to(device)
        return Case(name, lambda q, k: apply_rope(q, k, cos, sin, position_ids=pos),
                    lambda q, k: apply_rope_ref(q, k, cos, sin, position_ids=pos),
                    [rnd(b, hq, n, d), rnd(b, hk, n, d)], tols["other"], dict(b=b, hq=hq, hk=hk, n=n, d=d))
    if name == "swiglu":
        mf, f = (8191, 14336) if big else (37, 200)
        return Case(name, swiglu, swiglu_ref, [rnd(mf, f, scale=2.0), rnd(mf, f)], tols["other"], dict(m=mf, f=f))
    if name in ("cross_entropy", "cross_entropy smoothing+z_loss"):
        mv, vv = (4097, 128256) if big else (19, 1000)
        y = torch.randint(0, vv, (mv,), generator=gen)
        y[::7] = -100
        y = y.to(device)
        kw = dict(label_smoothing=0.1, z_loss=1e-4) if "smoothing" in name else {}
        return Case(name, lambda x: cross_entropy(x, y, **kw), lambda x: cross_entropy_ref(x, y, **kw),
                    [rnd(mv, vv, scale=2.0)], tols["other"], dict(m=mv, v=vv, **kw))
    raise KeyError(f"unknown kernel check {name!r}; known: {case_names(size)}")


def _rel(a: torch.Tensor, r: torch.Tensor) -> float:
    return ((a.float() - r.float()).norm() / r.float().norm().clamp_min(1e-12)).item()


def run_case(case: Case) -> dict:
    """Run one case; returns {check, ok, max_rel_err, errors, tol} (or {check, ok: False, error})."""
    try:
        out = case.fn(*case.inputs)
        outs = out if isinstance(out, tuple) else (out,)
        gen = torch.Generator().manual_seed(1234)
        grads_out = [torch.randn(o.shape, generator=gen).to(o.device, o.dtype) for o in outs]
        grads = torch.autograd.grad(outs, case.inputs, grads_out)
        f32 = [i.detach().float().requires_grad_() for i in case.inputs]
        r = case.ref(*f32)
        routs = r if isinstance(r, tuple) else (r,)
        rgrads = torch.autograd.grad(routs, f32, [g.float() for g in grads_out])
        labels = [f"out{i}" for i in range(len(outs))] + [f"grad{i}" for i in range(len(grads))]
        errs = [_rel(o, ro) for o, ro in zip(outs, routs)] + [_rel(g, rg) for g, rg in zip(grads, rgrads)]
        ok = all(math.isfinite(e) and e < case.tol for e in errs)
        return dict(check=case.name, ok=ok, max_rel_err=max(errs), tol=case.tol,
                    errors={k: round(e, 6) for k, e in zip(labels, errs)}, **case.extra)
    except Exception as e:  # noqa: BLE001 - a crash is a failed check, reported with its message
        return dict(check=case.name, ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")


def run_checks(device: torch.device | str, dtype: torch.dtype, size: str = "realistic",
               names: Optional[list[str]] = None, log: Optional[Callable[[str], None]] = print) -> list[dict]:
    """Build and run the named cases (all by default) one at a time, freeing each before the next."""
    results = []
    for name in names or case_names(size):
        res = run_case(build_case(name, device, dtype, size))
        if log is not None:
            log(f"  check {name:36s} {'OK  ' if res['ok'] else 'FAIL'} "
                f"{res.get('max_rel_err', res.get('error'))}")
        results.append(res)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results
