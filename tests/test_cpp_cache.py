"""What the C++ backend keeps between calls: its cache of large CPU buffers (csrc/host_cache.h) and the
oneDNN-packed weights of inference calls (hmlstm/ops/cpp_sequence.py). Both must be invisible in the
results: a buffer is reused only once nothing refers to it, and a packing only while its weight is unchanged."""

import gc
import os
import subprocess
import sys

import pytest
import torch

from hmlstm import HMLSTM

cpp = pytest.importorskip("hmlstm.ops.cpp")
pytestmark = pytest.mark.skipif(cpp.unavailable_reason("cpu") is not None,
                                reason=f"C++ backend unavailable: {cpp.unavailable_reason('cpu')}")
from hmlstm.ops import cpp_sequence  # noqa: E402  (needs the extension)

# Big enough that every (T + 1, B, H) buffer is over the cache's 1 MiB threshold: 201 x 32 x 48 floats.
B, T, I, SIZES = 32, 200, 8, (48, 44)


def _model(seed: int = 0, **kw) -> HMLSTM:
    torch.manual_seed(seed)
    return HMLSTM(I, list(SIZES), backend="cpp", **kw)


def _x(seed: int) -> torch.Tensor:
    return torch.randn(B, T, I, generator=torch.Generator().manual_seed(seed))


def _grads(m: HMLSTM, x: torch.Tensor) -> list[torch.Tensor]:
    m.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = m(x)
    g = torch.Generator().manual_seed(1)
    loss = sum((h * torch.randn(h.shape, generator=g)).sum() for h in out.h)
    loss = loss + sum((c * torch.randn(c.shape, generator=g)).sum() for c in out.c)
    loss.backward()
    return [t.detach().clone() for t in (*out.h, *out.c, *out.z, x.grad, *(p.grad for p in m.parameters()))]


def test_repeated_calls_reuse_the_buffers():
    m = _model()
    x = _x(0)
    with torch.no_grad():
        m(x)  # warm: the blocks of this size exist from here on
        before = cpp.cpu_cache_info()
        m(x)
    after = cpp.cpu_cache_info()
    assert after["allocations"] == before["allocations"]
    assert after["reuses"] >= before["reuses"] + 2 * len(SIZES)  # at least h and c of every layer
    assert after["in_use"] == before["in_use"]


def test_training_steps_on_alternating_inputs_match_fresh_ones():
    """Reused buffers hold the previous call's values; results that read them before writing would
    differ between the first and second x1 here (the second follows an x2 step)."""
    m = _model(layer_norm=True)
    x1, x2 = _x(1), _x(2)
    first = _grads(m, x1)
    other = _grads(m, x2)
    again = _grads(m, x1)
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(first, other))
    assert cpp.cpu_cache_info()["reuses"] > 0


def test_a_buffer_still_viewed_is_not_reused():
    m = _model()
    with torch.no_grad():
        out = m(_x(3))
        kept = out.h[0][:, 7]  # a view of the layer's buffer: it alone must keep the block
        expected = kept.clone()
        del out
        for seed in (4, 5):
            m(_x(seed))
    torch.testing.assert_close(kept, expected, rtol=0, atol=0)


def test_empty_cpu_cache_frees_only_the_blocks_not_in_use():
    m = _model()
    with torch.no_grad():
        held = m(_x(6))
        m(_x(7))  # its blocks are free once the call returns
    info = cpp.cpu_cache_info()
    assert info["cached"] > 0 and info["in_use"] > 0
    cpp.empty_cpu_cache()
    info = cpp.cpu_cache_info()
    assert info["cached"] == 0 and info["in_use"] > 0
    with torch.no_grad():
        torch.testing.assert_close(held.h[1], m(_x(6)).h[1], rtol=0, atol=0)


def _run_with_env(value: str) -> subprocess.CompletedProcess:
    prog = (
        "import torch\n"
        "from hmlstm import HMLSTM\n"
        "from hmlstm.ops.cpp import cpu_cache_info\n"
        f"m = HMLSTM({I}, {list(SIZES)}, backend='cpp')\n"
        "with torch.no_grad():\n"
        f"    for _ in range(2): m(torch.randn({B}, {T}, {I}))\n"
        "info = cpu_cache_info()\n"
        "print(info['cached'], info['reuses'], info['allocations'], info['limit'])\n"
    )
    env = dict(os.environ, HMLSTM_CPU_CACHE_MB=value)
    return subprocess.run([sys.executable, "-c", prog], env=env, capture_output=True, text=True)


@pytest.mark.parametrize("value", ["0", "1"])
def test_the_environment_limits_the_cache(value):
    """0 turns the cache off; with a 1 MiB limit no block of these sizes (all above 1 MiB) is kept."""
    run = _run_with_env(value)
    assert run.returncode == 0, run.stderr
    cached, reuses, allocations, limit = map(int, run.stdout.split())
    assert (cached, reuses, limit) == (0, 0, int(value) << 20)
    if value == "0":
        assert allocations == 0  # every buffer from at::empty
    else:
        assert allocations >= 2 * 2 * len(SIZES)  # fresh blocks on both calls, none kept


def test_a_bad_cache_limit_names_the_variable():
    run = _run_with_env("lots")
    assert run.returncode != 0
    assert "HMLSTM_CPU_CACHE_MB must be a whole number of megabytes" in run.stderr


needs_packing = pytest.mark.skipif(not cpp_sequence._can_pack(torch.zeros(1)), reason="torch built without oneDNN")


def _packed_entries(m: HMLSTM) -> dict:
    ids = {id(p) for p in m.parameters()}
    return {k: v[3] for k, v in cpp_sequence._PACKED.items() if k[0] in ids}


@needs_packing
def test_inference_packs_the_weights_once_until_they_change():
    m, other = _model(0), _model(1)
    x = _x(8)
    with torch.no_grad():
        m(x)
        packed = _packed_entries(m)
        assert len(packed) == 2 * len(SIZES) + len(SIZES) - 1  # W and U per layer, V below the top
        m(x)
        assert all(_packed_entries(m)[k] is v for k, v in packed.items())
        # an in-place update (as an optimizer step) and load_state_dict: packed again, results follow
        m.layers[0].weight_hh.add_(0.25)
        changed = m(x).h[0].clone()
        assert _packed_entries(m)[(id(m.layers[0].weight_hh), B, False)] is not packed[
            (id(m.layers[0].weight_hh), B, False)]
        m.load_state_dict(other.state_dict())
        loaded = m(x)
        expected = other(x)
    torch.testing.assert_close(loaded.h[1], expected.h[1], rtol=0, atol=0)
    plain = _model(0)
    with torch.no_grad():
        plain.layers[0].weight_hh.add_(0.25)
        cpp_sequence.USE_PACKED_WEIGHTS = False
        try:
            unpacked = plain(x).h[0]
        finally:
            cpp_sequence.USE_PACKED_WEIGHTS = True
    torch.testing.assert_close(changed, unpacked, rtol=1e-5, atol=1e-5)


@needs_packing
def test_packings_go_with_their_weights():
    m = _model()
    with torch.no_grad():
        m(_x(9))
    keys = list(_packed_entries(m))
    assert keys
    del m
    gc.collect()
    assert not any(k in cpp_sequence._PACKED for k in keys)
