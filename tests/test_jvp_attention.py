"""Attention with a closed-form JVP rule (models.jvp_attention) against forward-mode AD through math attention.

The reference everywhere is ``torch.func.jvp`` through :func:`math_attention` (PyTorch's generic rules).
The Triton kernels run under Triton's interpreter on the CPU (a subprocess: ``TRITON_INTERPRET`` must be set
before Triton is imported) and natively in the ``gpu``-marked tests.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from emf_lightning import meanflow
from emf_lightning.meanflow.tangent_rules import jvp_safe_attention
from emf_lightning.models import build_generator
from emf_lightning.models import jvp_attention as jvp_module
from emf_lightning.models.attention import attention, math_attention
from emf_lightning.models.jvp_attention import jvp_attention, set_jvp_attention_backend

attention_module = importlib.import_module("emf_lightning.models.attention")  # the package exports a function

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (batch, heads, Lq, Lk, head dim, key padding mask, tangents on k and v)
SHAPES = [
    (2, 3, 37, 37, 16, False, True),  # self-attention, odd length
    (2, 2, 33, 7, 32, True, False),  # cross-attention to short padded text: no tangent on k, v
    (1, 2, 70, 70, 64, True, True),  # a mask on self-attention, more than one kernel block of keys
    (2, 1, 5, 3, 24, True, True),  # shorter than any tile, head dim not a power of two
    (1, 1, 19, 23, 128, False, True),  # wide heads, Lq != Lk
]


def _case(shape, dtype=torch.float64, device="cpu", seed=0):
    b, h, lq, lk, d, masked, kv_tangent = shape
    g = torch.Generator().manual_seed(seed)

    def randn(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    q, k, v = randn(b, h, lq, d), randn(b, h, lk, d), randn(b, h, lk, d)
    dq, dk, dv = randn(b, h, lq, d), randn(b, h, lk, d), randn(b, h, lk, d)
    if not kv_tangent:
        dk, dv = None, None
    mask = None
    if masked:  # the first row keeps half its keys, the others all (every row has >= 1 real key)
        mask = torch.ones(b, lk, dtype=torch.bool, device=device)
        mask[0, (lk + 1) // 2 :] = False
    return (q, k, v), (dq, dk, dv), mask


def _reference(primals, tangents, mask):
    """(out, tangent) by forward-mode AD through math attention."""
    filled = tuple(torch.zeros_like(p) if t is None else t for p, t in zip(primals, tangents))
    return torch.func.jvp(lambda q, k, v: math_attention(q, k, v, mask), primals, filled)


def _graph_free(primals, tangents, mask, backend):
    """(out, tangent) of jvp_attention on forward-AD dual tensors, as MeanFlow's graph-free JVP calls it."""
    with torch.no_grad(), fwAD.dual_level():
        duals = [p if t is None else fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        out = fwAD.unpack_dual(jvp_attention(*duals, mask, backend=backend))
    return out.primal, out.tangent


@pytest.fixture
def backend():
    """Set the process-wide backend for one test, restored after it."""
    previous = jvp_module.get_jvp_attention_backend()
    yield set_jvp_attention_backend
    set_jvp_attention_backend(previous)


# ------------------------------------------------------------------------------------------ the torch path


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_torch_path_equals_forward_ad_through_math_attention_float64(shape):
    primals, tangents, mask = _case(shape)
    ref_out, ref_tangent = _reference(primals, tangents, mask)
    out, tangent = _graph_free(primals, tangents, mask, "torch")
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(tangent, ref_tangent, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
def test_torch_path_float32_within_rounding(shape):
    primals, tangents, mask = _case(shape, torch.float32)
    ref_out, ref_tangent = _reference(*_case(shape))  # float64 truth
    out, tangent = _graph_free(primals, tangents, mask, "torch")
    assert out.dtype == tangent.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(tangent.double(), ref_tangent, atol=1e-5, rtol=1e-5)


def test_tiles_of_query_rows_give_the_untiled_result(monkeypatch):
    primals, tangents, mask = _case((2, 2, 45, 45, 16, True, True))
    whole = _graph_free(primals, tangents, mask, "torch")
    monkeypatch.setattr(jvp_module, "TILE_ELEMENTS", 2 * 2 * 45 * 4)  # 4 query rows per tile: 12 tiles
    assert len(jvp_module._row_tiles(primals[0], primals[1])) == 12
    tiled = _graph_free(primals, tangents, mask, "torch")
    torch.testing.assert_close(tiled[0], whole[0], atol=1e-14, rtol=0)
    torch.testing.assert_close(tiled[1], whole[1], atol=1e-14, rtol=0)


def test_works_under_torch_func_jvp_and_equals_finite_differences():
    (q, k, v), (dq, dk, dv), mask = _case(SHAPES[2])

    def f(q_, k_, v_):
        return jvp_attention(q_, k_, v_, mask, backend="torch")

    with torch.no_grad():
        out, tangent = torch.func.jvp(f, (q, k, v), (dq, dk, dv))
        h = 1e-6
        fd = (f(q + h * dq, k + h * dk, v + h * dv) - f(q - h * dq, k - h * dk, v - h * dv)) / (2 * h)
    torch.testing.assert_close(out, math_attention(q, k, v, mask), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(tangent, fd, atol=1e-7, rtol=1e-6)


def test_bf16_autocast_tangent_is_as_close_to_float64_as_the_math_paths():
    """Under autocast both paths multiply in bf16 and take the softmax in float32; ours is no worse."""
    shape = (2, 4, 64, 64, 32, False, True)
    primals, tangents, mask = _case(shape, torch.float32)
    _, truth = _reference(*_case(shape))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, math_tangent = _reference(primals, tangents, mask)
        out, tangent = _graph_free(primals, tangents, mask, "torch")
    assert out.dtype == tangent.dtype == torch.bfloat16
    ours = (tangent.double() - truth).norm() / truth.norm()
    theirs = (math_tangent.double() - truth).norm() / truth.norm()
    assert ours < 1.1 * theirs and ours < 2e-2


# ------------------------------------------------------------------------------------------------ routing


class _Spy:
    def __init__(self, fn):
        self.fn, self.backends = fn, []

    def __call__(self, q, k, v, mask=None, backend=None):
        self.backends.append(backend)
        return self.fn(q, k, v, mask, backend)


@pytest.fixture
def spy(monkeypatch):
    s = _Spy(jvp_attention)
    monkeypatch.setattr(attention_module, "jvp_attention", s)
    return s


def test_attention_routes_only_graph_free_jvps_to_the_fused_op(spy, backend):
    backend("auto")
    (q, k, v), (dq, dk, dv), mask = _case(SHAPES[1])
    ref = _reference((q, k, v), (dq, dk, dv), mask)
    with jvp_safe_attention():
        out, tangent = _graph_free_via_attention(q, k, v, dq, mask)
        assert spy.backends == ["torch"]  # auto on the CPU
        torch.func.jvp(lambda q_: attention(q_, k, v, mask), (q,), (dq,))  # grad mode on: the math path
        with torch.no_grad():
            attention(q, k, v, mask)  # no tangent anywhere: the math path
    assert spy.backends == ["torch"]
    torch.testing.assert_close(tangent, ref[1], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(out, ref[0], atol=1e-12, rtol=1e-12)

    backend("math")
    with jvp_safe_attention():
        _graph_free_via_attention(q, k, v, dq, mask)
    assert spy.backends == ["torch"]


def _graph_free_via_attention(q, k, v, dq, mask):
    with torch.no_grad(), fwAD.dual_level():
        out = fwAD.unpack_dual(attention(fwAD.make_dual(q, dq), k, v, mask))
    return out.primal, out.tangent


def test_backend_setting_rejects_unknown_names(backend):
    with pytest.raises(
        ValueError,
        match=r"EMF_JVP_ATTENTION='flash' is not a JVP attention backend; use one of "
        r"auto, math, torch, triton",
    ):
        backend("flash")


def test_env_var_chooses_the_backend_at_import():
    code = "from emf_lightning.models import jvp_attention as j; print(j.get_jvp_attention_backend())"
    env = {**os.environ, "EMF_JVP_ATTENTION": "Math", "PYTHONPATH": _pythonpath()}
    assert (
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()
        == "math"
    )


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter runs Triton on the CPU")
def test_forcing_triton_on_cpu_tensors_is_a_clear_error():
    with pytest.raises(RuntimeError, match="EMF_JVP_ATTENTION=triton needs Triton and CUDA tensors"):
        jvp_attention(*_case(SHAPES[0])[0], backend="triton")


def test_the_chosen_path_is_logged_once_per_device(monkeypatch):
    from lightning.fabric.utilities import rank_zero

    lines = []
    monkeypatch.setattr(rank_zero, "rank_zero_info", lines.append)
    monkeypatch.setattr(jvp_module, "_logged", set())
    for _ in range(3):
        jvp_module.resolve_backend(torch.device("cpu"), "torch")
    jvp_module.resolve_backend(torch.device("cpu"), "math")
    assert lines == [
        "JVP attention on cpu: closed-form tangent in tiled torch ops (models/jvp_attention.py) "
        "(set EMF_JVP_ATTENTION=math|torch|triton to change)",
        "JVP attention on cpu: forward-mode AD through unfused math attention "
        "(set EMF_JVP_ATTENTION=math|torch|triton to change)",
    ]


# -------------------------------------------------------------------------------- end to end: MeanFlow's JVP


@pytest.mark.parametrize("size", ["tiny", "unet-tiny"])
def test_graph_free_jvp_of_a_backbone_equals_the_math_path(size, spy, backend):
    torch.manual_seed(0)
    gen = build_generator(size, text_dim=12, input_size=16).double()
    with torch.no_grad():
        for p in gen.parameters():  # zero-initialised outputs would make every tangent 0
            p.copy_(torch.randn_like(p) * 0.1)
    z, tangent_z = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.randn(2, 3, 16, 16, dtype=torch.float64)
    r, t = torch.tensor([0.1, 0.3], dtype=torch.float64), torch.tensor([0.5, 0.8], dtype=torch.float64)
    cond = (torch.randn(2, 4, 12, dtype=torch.float64), torch.tensor([[True, True, False, False], [True] * 4]))

    backend("math")
    old = meanflow.graph_free_jvp(gen, z, r, t, tangent_z, cond)
    assert spy.backends == []
    backend("torch")
    new = meanflow.graph_free_jvp(gen, z, r, t, tangent_z, cond)
    assert spy.backends and set(spy.backends) == {"torch"}  # self- and cross-attention both took the op
    assert old.abs().max() > 1e-3  # a tangent worth comparing
    torch.testing.assert_close(new, old, atol=1e-10, rtol=1e-8)


# ---------------------------------------------------------------------------- Triton kernels, interpreted


def _pythonpath() -> str:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return os.pathsep.join([src, str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")])


def triton_errors(device: str = "cpu") -> list[dict]:
    """Max |triton - reference| of out and tangent per case (float32; the reference is float64 math)."""
    results = []
    for shape in SHAPES:
        primals, tangents, mask = _case(shape, torch.float32, device)
        ref_out, ref_tangent = _reference(*_case(shape, torch.float64, device))
        out, tangent = _graph_free(primals, tangents, mask, "triton")
        results.append(
            {
                "shape": list(shape),
                "dtype": str(out.dtype),
                "tangent_dtype": str(tangent.dtype),
                "out": (out.double() - ref_out).abs().max().item(),
                "tangent": (tangent.double() - ref_tangent).abs().max().item(),
                "tangent_scale": ref_tangent.abs().max().item(),
            }
        )
    return results


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (it comes with torch's Linux CUDA wheels)")
def test_triton_kernels_under_the_interpreter_match_math_attention():
    code = "import json, test_jvp_attention as t; print('RESULT', json.dumps(t.triton_errors()))"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": _pythonpath(), "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    if run.returncode != 0 and "interpreter" in run.stderr.lower() and "not supported" in run.stderr.lower():
        pytest.skip(f"Triton's interpreter cannot run these kernels here: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.split("RESULT", 1)[1])
    assert len(results) == len(SHAPES)
    for r in results:
        assert r["dtype"] == r["tangent_dtype"] == "torch.float32"
        assert r["out"] < 1e-5, r
        assert r["tangent"] < 1e-5 * max(1.0, r["tangent_scale"]), r


# ------------------------------------------------------------------------------------- Triton kernels, CUDA


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_cuda_kernels_match_forward_ad_through_math_attention_fp32():
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # IEEE float32 products in both paths
    try:
        results = triton_errors("cuda")
    finally:
        torch.set_float32_matmul_precision(previous)
    for r in results:
        assert r["out"] < 1e-5, r
        assert r["tangent"] < 1e-5 * max(1.0, r["tangent_scale"]), r


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.parametrize(
    "shape",
    [(4, 12, 256, 256, 64, False, True), (4, 12, 256, 77, 64, True, False)],
    ids=["self-attention", "cross-attention"],
)
def test_cuda_kernels_bf16_are_as_close_to_float64_as_the_math_path(shape):
    primals, tangents, mask = _case(shape, torch.bfloat16, "cuda")
    _, truth = _reference(*_case(shape, torch.float64, "cuda"))
    _, math_tangent = _reference(primals, tangents, mask)
    out, tangent = _graph_free(primals, tangents, mask, "triton")
    assert out.dtype == tangent.dtype == torch.bfloat16
    ours = (tangent.double() - truth).norm() / truth.norm()
    theirs = (math_tangent.double() - truth).norm() / truth.norm()
    assert ours < 1.1 * theirs and ours < 2e-2, (ours.item(), theirs.item())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_cuda_graph_free_jvp_of_dit_equals_the_math_path(spy, backend):
    torch.manual_seed(0)
    gen = build_generator("tiny", text_dim=12, input_size=16).cuda()
    with torch.no_grad():
        for p in gen.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    z, tangent_z = torch.randn(4, 3, 16, 16, device="cuda"), torch.randn(4, 3, 16, 16, device="cuda")
    r, t = torch.rand(4, device="cuda") * 0.5, torch.rand(4, device="cuda") * 0.5 + 0.5
    cond = (torch.randn(4, 5, 12, device="cuda"), torch.ones(4, 5, dtype=torch.bool, device="cuda"))
    cond[1][0, 3:] = False
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        backend("math")
        old = meanflow.graph_free_jvp(gen, z, r, t, tangent_z, cond)
        backend("auto")
        new = meanflow.graph_free_jvp(gen, z, r, t, tangent_z, cond)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert set(spy.backends) == {"triton"}
    torch.testing.assert_close(new, old, atol=1e-4, rtol=1e-4)
