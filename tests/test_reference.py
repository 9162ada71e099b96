"""The reference cell against the paper's equations (docs/spec.md), computed independently in each test."""

import pytest
import torch

from hmlstm import CellConfig, LayerParams, naive_cell_step
from hmlstm.boundary import BinaryBoundary, hard_sigmoid, straight_through_grad


@pytest.fixture(autouse=True)
def float64_default():
    """Every test here computes in float64 (restored afterwards so other modules are unaffected)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)

B, I, H, HA = 4, 5, 6, 3


def random_layer(seed=0, has_boundary=True, above=HA, layer_norm=False):
    g = torch.Generator().manual_seed(seed)
    G = 4 * H + int(has_boundary)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    p = LayerParams(r(G, I), r(G, H), r(G, above), r(G))
    if layer_norm:
        p = p._replace(ln_gates=1 + 0.1 * r(4 * H), ln_cell_w=1 + 0.1 * r(H), ln_cell_b=0.1 * r(H))
    x, h, c, ha = r(B, I), r(B, H), r(B, H), r(B, above)
    return p, x, h, c, ha


def gates_from_equations(p, x, h, ha, zb, zu):
    """f, i, o, g, s_z straight from eq. 4-7 (no layer norm), written independently of the reference."""
    s = h @ p.U.T + zb[:, None] * (ha @ p.V.T) + zu[:, None] * (x @ p.W.T) + p.b
    f, i, o, g = s[:, :H].sigmoid(), s[:, H:2 * H].sigmoid(), s[:, 2 * H:3 * H].sigmoid(), s[:, 3 * H:4 * H].tanh()
    return f, i, o, g, s[:, 4 * H] if s.shape[1] > 4 * H else None


def step(p, x, zu, h, c, z, ha, slope=1.0, cfg=CellConfig(), noise=None):
    return naive_cell_step(x, zu, h, c, z, ha, p, torch.tensor(slope), noise, cfg)


ONES, ZEROS = torch.ones(B, dtype=torch.float64), torch.zeros(B, dtype=torch.float64)


def test_update_follows_eq_2_3():
    p, x, h, c, ha = random_layer()
    h1, c1, z1 = step(p, x, ONES, h, c, ZEROS, ha)
    f, i, o, g, sz = gates_from_equations(p, x, h, ha, ZEROS, ONES)
    torch.testing.assert_close(c1, f * c + i * g)
    torch.testing.assert_close(h1, o * torch.tanh(f * c + i * g))
    torch.testing.assert_close(z1, (sz > 0).double())


def test_flush_follows_eq_2_3_and_ignores_previous_cell():
    p, x, h, c, ha = random_layer(1)
    for zu in (ONES, ZEROS):  # FLUSH whatever the layer below says
        h1, c1, z1 = step(p, x, zu, h, c, ONES, ha)
        f, i, o, g, sz = gates_from_equations(p, x, h, ha, ONES, zu)
        torch.testing.assert_close(c1, i * g)
        torch.testing.assert_close(h1, o * torch.tanh(i * g))
        torch.testing.assert_close(z1, (sz > 0).double())
        _, c2, _ = step(p, x, zu, h, c + 10 * torch.randn(B, H), ONES, ha)
        assert torch.equal(c1, c2)
        cc = c.clone().requires_grad_(True)
        _, c3, _ = step(p, x, zu, h, cc, ONES, ha)
        (grad,) = torch.autograd.grad(c3.sum(), cc)
        assert torch.equal(grad, torch.zeros_like(grad))


def test_copy_returns_state_exactly():
    p, x, h, c, ha = random_layer(2)
    h1, c1, z1 = step(p, x, ZEROS, h, c, ZEROS, ha)
    assert torch.equal(h1, h) and torch.equal(c1, c)
    assert torch.equal(z1, ZEROS)  # copy_boundary="hold": z stays 0


def test_mixed_rows_each_take_their_operation():
    p, x, h, c, ha = random_layer(3)
    zb = torch.tensor([1.0, 0.0, 0.0, 1.0])
    zu = torch.tensor([0.0, 1.0, 0.0, 1.0])
    h1, c1, _ = step(p, x, zu, h, c, zb, ha)
    f, i, o, g, _ = gates_from_equations(p, x, h, ha, zb, zu)
    expect_c = torch.stack([(i * g)[0], (f * c + i * g)[1], c[2], (i * g)[3]])
    torch.testing.assert_close(c1, expect_c)
    torch.testing.assert_close(h1[2], h[2])
    torch.testing.assert_close(h1[1], o[1] * torch.tanh(expect_c[1]))


def test_top_layer_has_no_boundary_and_copies_h_and_c():
    p, x, h, c, ha = random_layer(4, has_boundary=False, above=0)
    cfg = CellConfig(has_boundary=False)
    h1, c1, z1 = step(p, x, ZEROS, h, c, ZEROS, ha, cfg=cfg)
    assert z1 is None and torch.equal(h1, h) and torch.equal(c1, c)
    h2, c2, _ = step(p, x, ONES, h, c, ZEROS, ha, cfg=cfg)
    f, i, o, g, _ = gates_from_equations(p, x, h, ha, ZEROS, ONES)
    torch.testing.assert_close(c2, f * c + i * g)  # UPDATE, never FLUSH


def test_hold_and_recompute_differ_only_on_copy_rows():
    p, x, h, c, ha = random_layer(5)
    zb = torch.tensor([1.0, 0.0, 0.0, 0.0])
    zu = torch.tensor([0.0, 1.0, 0.0, 0.0])
    hold = step(p, x, zu, h, c, zb, ha, cfg=CellConfig(copy_boundary="hold"))
    rec = step(p, x, zu, h, c, zb, ha, cfg=CellConfig(copy_boundary="recompute"))
    torch.testing.assert_close(hold[0], rec[0])
    torch.testing.assert_close(hold[1], rec[1])
    torch.testing.assert_close(hold[2][:2], rec[2][:2])  # FLUSH, UPDATE rows: same z
    assert torch.equal(hold[2][2:], ZEROS[2:])  # COPY under hold: z_{t-1} = 0
    expect = ((h @ p.U[4 * H] + p.b[4 * H]) > 0).double()  # COPY under recompute: from U h + b alone
    torch.testing.assert_close(rec[2][2:], expect[2:])
    assert not torch.equal(rec[2][2:], hold[2][2:]) or bool((expect[2:] == 0).all())


@pytest.mark.parametrize("slope", [0.5, 1.0, 2.0, 5.0])
def test_straight_through_gradient_is_half_slope_inside(slope):
    x = torch.linspace(-3, 3, 601).requires_grad_(True)
    z = BinaryBoundary.apply(x, torch.tensor(slope), None)
    assert torch.equal(z, (x > 0).double())
    (grad,) = torch.autograd.grad(z, x, torch.ones_like(z))
    inside = x.detach().abs() < 1 / slope
    assert torch.equal(grad[inside], torch.full_like(grad[inside], slope / 2))
    assert torch.equal(grad[~inside], torch.zeros_like(grad[~inside]))
    # same function as the derivative of the hard sigmoid away from its kinks
    xs = x.detach()[(x.detach().abs() - 1 / slope).abs() > 1e-6].requires_grad_(True)
    (hs_grad,) = torch.autograd.grad(hard_sigmoid(xs, slope).sum(), xs)
    torch.testing.assert_close(hs_grad, straight_through_grad(xs.detach(), slope))


def test_sample_mode_thresholds_noise_with_straight_through_gradient():
    x = torch.randn(1000, requires_grad=True)
    noise = torch.rand(1000)
    z = BinaryBoundary.apply(x, torch.tensor(2.0), noise)
    assert torch.equal(z, (noise < hard_sigmoid(x.detach(), 2.0)).double())
    (grad,) = torch.autograd.grad(z.sum(), x)
    torch.testing.assert_close(grad, straight_through_grad(x.detach(), 2.0))


def test_layer_norm_placement():
    p, x, h, c, ha = random_layer(6, layer_norm=True)
    h1, c1, z1 = step(p, x, ONES, h, c, ZEROS, ha, cfg=CellConfig(layer_norm=True))
    pre = h @ p.U.T + x @ p.W.T
    gp = pre[:, :4 * H]
    gn = (gp - gp.mean(1, keepdim=True)) / torch.sqrt(gp.var(1, unbiased=False, keepdim=True) + 1e-5)
    s = gn * p.ln_gates + p.b[:4 * H]
    f, i, o, g = s[:, :H].sigmoid(), s[:, H:2 * H].sigmoid(), s[:, 2 * H:3 * H].sigmoid(), s[:, 3 * H:].tanh()
    cn = f * c + i * g
    cnorm = (cn - cn.mean(1, keepdim=True)) / torch.sqrt(cn.var(1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(c1, cn)
    torch.testing.assert_close(h1, o * torch.tanh(cnorm * p.ln_cell_w + p.ln_cell_b))
    torch.testing.assert_close(z1, ((pre[:, 4 * H] + p.b[4 * H]) > 0).double())  # boundary unit not normalized


def old_dense_z(z_hat, z_copy, zb, zu):
    """The boundary rule before 2026-12-01: z_t = z_{t-1} z~ + (1 - z_{t-1})(z^{l-1} z~ + (1 - z^{l-1}) z_copy)."""
    return zb * z_hat + (1 - zb) * (zu * z_hat + (1 - zu) * z_copy)


@pytest.mark.parametrize("mode", ["hold", "recompute"])
def test_boundary_rule_has_the_old_forward_values_on_every_forced_pattern(mode):
    """The revised rules change the gradient only: every (z_{t-1}, z^{l-1}) pattern gives the old values."""
    p, x, h, c, ha = random_layer(seed=7)
    patterns = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])  # (zb, zu) per row
    zb, zu = patterns[:, 0], patterns[:, 1]
    _, _, z_new = step(p, x, zu, h, c, zb, ha, slope=2.0, cfg=CellConfig(copy_boundary=mode))
    *_, s_z = gates_from_equations(p, x, h, ha, zb, zu)
    z_hat = (s_z > 0).double()
    z_copy = zb if mode == "hold" else ((h @ p.U[4 * H] + p.b[4 * H]) > 0).double()
    assert torch.equal(z_new, old_dense_z(z_hat, z_copy, zb, zu))


def _copy_rows_with_a_split_detector(seed):
    """A layer with COPY on every row (z_{t-1} = z^{l-1} = 0) and a boundary threshold that fires on some rows."""
    p, x, h, c, ha = random_layer(seed=seed)
    p = p._replace(b=p.b.clone())
    u = (h @ p.U[4 * H]).sort().values
    p.b[4 * H] = -(u[1] + u[2]) / 2  # threshold halfway between rows: fires on some, not all, none at the edge
    s_z = h @ p.U[4 * H] + p.b[4 * H]  # the detector's input on a COPY row
    z_tilde = (s_z > 0).double()
    assert 0 < z_tilde.sum() < B, "the test needs rows on both sides of the threshold"
    return p, x, h, c, ha, s_z, z_tilde


@pytest.mark.parametrize("slope", [0.5, 3.0])
def test_hold_rule_gradient_along_z_on_copy_steps_is_z_tilde_times_one_minus_z_below(slope):
    """Under `hold`, z_t = z~ (1 - (1 - z_{t-1})(1 - z^{l-1})): on a COPY step dz_t/dz_{t-1} = z~ (1 - z^{l-1}) and
    dz_t/dz^{l-1} = z~ (1 - z_{t-1}); the old rule's 1 + z~ (the exploding path on PTB) is gone. No top-down
    term, so z_{t-1} reaches z_t only through the rule itself."""
    p, x, h, c, ha, _, z_tilde = _copy_rows_with_a_split_detector(seed=3)
    p = p._replace(V=torch.zeros_like(p.V), W=torch.zeros_like(p.W))  # z~ independent of the gated terms
    z = torch.zeros(B, requires_grad=True)
    zu = torch.zeros(B, requires_grad=True)
    _, _, z_new = step(p, x, zu, h, c, z, ha, slope=slope, cfg=CellConfig(copy_boundary="hold"))
    assert torch.equal(z_new.detach(), torch.zeros(B))  # COPY holds z = 0
    dz, dzu = torch.autograd.grad(z_new, (z, zu), torch.ones(B))  # rows are independent: the diagonal
    torch.testing.assert_close(dz, z_tilde * (1 - zu.detach()))
    torch.testing.assert_close(dzu, z_tilde * (1 - z.detach()))


@pytest.mark.parametrize("slope", [0.1, 0.5])
def test_recompute_rule_gradient_along_z_comes_only_through_the_gated_products(slope):
    """Under `recompute`, z_t = z~_t from s = U h + z_{t-1} V h^{l+1} + z^{l-1} W h^{l-1} + b: on a COPY step
    dz_t/dz_{t-1} = dz~/ds * (V h^{l+1})[z row] and dz_t/dz^{l-1} = dz~/ds * (W h^{l-1})[z row], nothing else.
    With V = W = 0 both vanish."""
    p, x, h, c, ha, s_z, z_tilde = _copy_rows_with_a_split_detector(seed=4)
    st = straight_through_grad(s_z, torch.tensor(slope))
    assert bool((st != 0).any()), "the test needs rows inside the straight-through window"
    for zero_gated in (False, True):
        q = p._replace(V=torch.zeros_like(p.V), W=torch.zeros_like(p.W)) if zero_gated else p
        z = torch.zeros(B, requires_grad=True)
        zu = torch.zeros(B, requires_grad=True)
        _, _, z_new = step(q, x, zu, h, c, z, ha, slope=slope, cfg=CellConfig(copy_boundary="recompute"))
        torch.testing.assert_close(z_new.detach(), z_tilde)
        dz, dzu = torch.autograd.grad(z_new, (z, zu), torch.ones(B))
        torch.testing.assert_close(dz, st * (ha @ q.V[4 * H]))
        torch.testing.assert_close(dzu, st * (x @ q.W[4 * H]))
