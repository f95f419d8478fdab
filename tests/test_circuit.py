"""The no-wire circuit solver against an independent nodal analysis, limits and gradients."""
import numpy as np
import pytest
import torch
from nodal import nodal_currents

from xbarflow.crossbar import solve, transfer_matrix

pytestmark = pytest.mark.numerics

SHAPES = [(1, 1), (1, 7), (7, 1), (2, 3), (3, 2), (16, 16), (9, 40), (40, 9), (64, 64), (64, 33), (17, 64)]
RESISTANCES = [(0.0, 0.0), (1e3, 0.0), (0.0, 1e3), (1e3, 1e3), (5e3, 200.0), (100.0, 2e4)]


def _rel_err(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("rows,cols", SHAPES)
def test_solve_matches_nodal_analysis(rows, cols):
    rng = np.random.default_rng(rows * 100 + cols)
    G = rng.uniform(1 / 200e3, 1 / 20e3, size=(rows, cols))
    V = rng.uniform(-0.2, 0.2, size=(3, rows))
    for r_source, r_sink in RESISTANCES:
        I = solve(torch.tensor(G), torch.tensor(V), r_source=r_source, r_sink=r_sink).numpy()
        ref = nodal_currents(G, V, r_source, r_sink)
        assert _rel_err(I, ref) <= 1e-9, (rows, cols, r_source, r_sink)


def test_transfer_matrix_batched_over_tiles_matches_each_tile():
    rng = np.random.default_rng(1)
    G = torch.tensor(rng.uniform(5e-6, 5e-5, size=(2, 3, 12, 8)))
    T = transfer_matrix(G, r_source=2e3, r_sink=500.0)
    assert T.shape == G.shape
    eye = np.eye(12)
    for idx in np.ndindex(2, 3):
        ref = nodal_currents(G[idx].numpy(), eye, 2e3, 500.0)  # rows of T are the currents for unit inputs
        assert _rel_err(T[idx].numpy(), ref) <= 1e-9


@pytest.mark.parametrize("rows,cols", [(300, 260), (260, 300)])
def test_wide_tiles_lower_gram_matches_nodal_analysis(rows, cols):
    """From GRAM_LOWER_MIN_COLS columns of the eliminated side on, the Gram product forms only B's
    lower block triangle: the explicit T, the applied T and the Cholesky path still match the nodal
    analysis, and the explicit T's gradient matches the applied one's."""
    from xbarflow.crossbar.circuit import GRAM_LOWER_MIN_COLS, apply_transfer, transfer_columns

    assert min(rows, cols) >= GRAM_LOWER_MIN_COLS
    rng = np.random.default_rng(rows)
    G = rng.uniform(5e-6, 5e-5, size=(rows, cols))
    V = rng.uniform(-0.2, 0.2, size=(3, rows))
    ref = nodal_currents(G, V, 2e3, 500.0)
    Gt = torch.tensor(G, requires_grad=True)
    T = transfer_matrix(Gt, r_source=2e3, r_sink=500.0)
    assert _rel_err((torch.tensor(V) @ T).detach().numpy(), ref) <= 1e-9
    if cols <= rows:  # the Cholesky paths eliminate the rows: cols x cols systems
        Ga = Gt.detach().clone().requires_grad_(True)
        Y = apply_transfer(torch.tensor(V), Ga, r_source=2e3, r_sink=500.0)
        assert _rel_err(Y.detach().numpy(), ref) <= 1e-9
        T5 = transfer_columns(Gt.detach(), 5, r_source=2e3, r_sink=500.0)
        assert _rel_err(T5.numpy(), T.detach()[:, :5].numpy()) <= 1e-9
        probe = torch.tensor(rng.standard_normal((3, cols)))
        (g_explicit,) = torch.autograd.grad(((torch.tensor(V) @ T) * probe).sum(), Gt)
        (g_applied,) = torch.autograd.grad((Y * probe).sum(), Ga)
        assert torch.allclose(g_explicit, g_applied, rtol=1e-8, atol=1e-12 * float(g_explicit.abs().max()))


def test_zero_resistance_gives_ideal_product():
    G = torch.rand(5, 7, 6, dtype=torch.float64) * 1e-4
    assert torch.equal(transfer_matrix(G, r_source=0.0, r_sink=0.0), G)  # bitwise: no resistance, T is a copy of G


def test_parasitics_shrink_currents_and_vanish_as_r_goes_to_zero():
    torch.manual_seed(0)
    G = torch.rand(32, 24, dtype=torch.float64) * 4.5e-5 + 5e-6
    V = torch.rand(4, 32, dtype=torch.float64) * 0.2  # non-negative inputs: every column current > 0
    ideal = V @ G
    errors = []
    for r in [1e4, 1e3, 1e2, 1e1, 1.0, 1e-3]:
        I = solve(G, V, r_source=r, r_sink=r)
        assert bool((I < ideal).all()) and bool((I > 0).all())
        errors.append(float(((ideal - I).abs() / ideal).max()))
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 1e-5


@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (2, 4, 4)])
@pytest.mark.parametrize("r_source,r_sink", [(1e3, 2e3), (0.0, 1e3), (1e3, 0.0)])
def test_gradcheck_transfer_matrix(shape, r_source, r_sink):
    torch.manual_seed(0)
    # conductances scaled to ~1/kOhm so that r*G is O(1) and finite differences are well-conditioned
    G = (torch.rand(*shape, dtype=torch.float64) * 0.9 + 0.1) * 1e-3
    G.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda g: transfer_matrix(g, r_source=r_source, r_sink=r_sink), (G,))


@pytest.mark.parametrize("r_source,r_sink", [(1e3, 2e3), (0.0, 1e3), (1e3, 0.0)])
def test_gradient_of_a_blocked_tile_along_random_directions(r_source, r_sink):
    """The 36x34 tile (34 columns: the blocked inverse). gradcheck's full Jacobian, 1,224 x 1,224
    entries, took 2-12 minutes here, and its fast mode let a 1 % error through at its default
    tolerances (this T is ~1e-5 S, under its atol). Instead: a loss L = sum(W * T(G)) with random
    W, its analytic derivative along three random relative directions D against central
    differences, float64, step 1e-7. Measured: correct gradients agree to <= 3e-7 relative, a
    gradient 0.1 % off everywhere is 1e-3 away, one entry 10 % off is 8e-3 to 5e-2 away: 1e-5
    separates them by 30x and 100x."""
    torch.manual_seed(0)
    G = (torch.rand(36, 34, dtype=torch.float64) * 0.9 + 0.1) * 1e-3
    W = torch.randn(36, 34, dtype=torch.float64)

    def loss(g):
        return (W * transfer_matrix(g, r_source=r_source, r_sink=r_sink)).sum()

    Gr = G.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(Gr), Gr)
    h = 1e-7
    for _ in range(3):
        D = torch.randn_like(G) * G
        with torch.no_grad():
            numeric = (loss(G + h * D) - loss(G - h * D)) / (2 * h)
        analytic = (grad * D).sum()
        assert float((analytic - numeric).abs() / numeric.abs()) < 1e-5


def test_float32_agrees_with_float64():
    G = torch.rand(3, 64, 48, dtype=torch.float64) * 4.5e-5 + 5e-6
    T64 = transfer_matrix(G, r_source=1e3, r_sink=1e3)
    T32 = transfer_matrix(G.float(), r_source=1e3, r_sink=1e3)
    assert T32.dtype == torch.float32
    assert float(((T32.double() - T64).abs()).max() / T64.abs().max()) < 1e-5


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(r_source=-1.0, r_sink=0.0), "r_source"),
        (dict(r_source=0.0, r_sink=float("nan")), "r_sink"),
        (dict(r_source=float("inf"), r_sink=0.0), "r_source"),
        (dict(r_source=0.0, r_sink=0.0, r_wire=-2.0), "r_wire"),
    ],
)
def test_bad_resistance_raises(kwargs, match):
    G = torch.full((4, 4), 1e-5)
    with pytest.raises(ValueError, match=match):
        transfer_matrix(G, **kwargs)


def test_bad_conductance_raises():
    with pytest.raises(ValueError, match="G must be >= 0"):
        transfer_matrix(torch.tensor([[1e-5, -1e-6]]), r_source=1.0, r_sink=1.0)
    with pytest.raises(ValueError, match="G must be finite"):
        transfer_matrix(torch.tensor([[1e-5, float("nan")]]), r_source=1.0, r_sink=1.0)
    with pytest.raises(ValueError, match="G must have shape"):
        transfer_matrix(torch.tensor([1e-5, 1e-5]), r_source=1.0, r_sink=1.0)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="V must have shape"):
        solve(torch.full((4, 3), 1e-5), torch.zeros(2, 5), r_source=1.0, r_sink=1.0)


@torch.random.fork_rng()  # keep the global RNG stream of the other tests as it was
def test_transfer_columns_and_apply_transfer_match_explicit_and_gradcheck():
    """The Cholesky-factor paths (few used columns; small input batch) equal the explicit T, gradients included."""
    from xbarflow.crossbar.circuit import apply_transfer, transfer_columns

    torch.manual_seed(0)
    G = ((torch.rand(2, 3, 7, 5, dtype=torch.float64) * 0.9 + 0.1) * 1e-3).requires_grad_(True)
    T = transfer_matrix(G, r_source=1e3, r_sink=2e3)
    assert torch.allclose(transfer_columns(G, 2, r_source=1e3, r_sink=2e3), T[..., :2], rtol=1e-12, atol=0)
    assert torch.autograd.gradcheck(lambda g: transfer_columns(g, 2, r_source=1e3, r_sink=2e3), (G,))
    # U broadcasts over the first batch dimension (a grid row of tiles shares its inputs)
    U = torch.randn(3, 4, 7, dtype=torch.float64, requires_grad=True)
    assert torch.allclose(apply_transfer(U, G, r_source=1e3, r_sink=2e3), U @ T, rtol=1e-12, atol=1e-20)
    assert torch.autograd.gradcheck(lambda u, g: apply_transfer(u, g, r_source=1e3, r_sink=2e3), (U, G))
    # and the gradients agree with autograd through the explicit T
    w = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    ga = torch.autograd.grad((apply_transfer(U, G, r_source=1e3, r_sink=2e3) * w).sum(), (U, G))
    gb = torch.autograd.grad(((U @ transfer_matrix(G, r_source=1e3, r_sink=2e3)) * w).sum(), (U, G))
    for x, y in zip(ga, gb, strict=True):
        assert torch.allclose(x, y, rtol=1e-10, atol=1e-30)


def test_ill_conditioned_float32_switches_to_float64():
    """Both resistances huge: the rows float and float32 would lose ~3 digits; the solver says so and uses float64."""
    from xbarflow.crossbar.circuit import _TransferCols, float32_error_estimate

    torch.manual_seed(0)
    G = torch.rand(64, 64, dtype=torch.float64) * 4.5e-5 + 5e-6
    r = 1e9
    T64 = transfer_matrix(G, r_source=r, r_sink=r)
    naive32 = _TransferCols.apply(G.float(), r, r).double()  # what plain float32 would give
    assert float((naive32 - T64).abs().max() / T64.abs().max()) > 1e-3
    assert float32_error_estimate(G.float(), r, r) > 1e-3
    with pytest.warns(RuntimeWarning, match="float64"):
        T32 = transfer_matrix(G.float(), r_source=r, r_sink=r)
    assert T32.dtype == torch.float32 and bool(torch.isfinite(T32).all())
    assert float((T32.double() - T64).abs().max() / T64.abs().max()) < 1e-6
    # an ordinary circuit stays in float32 without a warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        transfer_matrix(G.float(), r_source=1e3, r_sink=1e3)


@pytest.mark.parametrize("n,batch", [(1, 3), (16, 2), (17, 2), (33, 3), (64, 130), (100, 2), (257, 1)])
def test_spd_inverse_blocked_matches_float64_inverse(n, batch):
    """The block (Schur complement) inverse, on both leaf sizes and odd splits, against LAPACK in
    float64; it reads only the lower triangle, as the Cholesky factorisation it replaces."""
    from xbarflow.crossbar.circuit import _spd_inverse

    gen = torch.Generator().manual_seed(n * 1000 + batch)
    A = torch.randn(batch, n, n + 3, generator=gen, dtype=torch.float64)
    B = A @ A.mT / n + 0.1 * torch.eye(n, dtype=torch.float64)
    ref = torch.linalg.inv(B)
    junk_upper = B + torch.triu(torch.full_like(B, 7.0), diagonal=1)  # must not be read
    assert torch.allclose(_spd_inverse(junk_upper), ref, rtol=0, atol=1e-9 * ref.abs().max())
    err32 = (_spd_inverse(B.float()).double() - ref).abs().max() / ref.abs().max()
    assert err32 < 1e-4


def test_spd_inverse_refuses_indefinite_matrix():
    from xbarflow.crossbar.circuit import _spd_inverse

    B = torch.eye(64, dtype=torch.float64).repeat(3, 1, 1)
    B[1, 50, 50] = -1.0  # the indefiniteness sits in a Schur complement, not in the first leaf
    with pytest.raises(ValueError, match="not positive definite"):
        _spd_inverse(B)


@pytest.mark.parametrize("rows,cols,used", [(12, 9, 2), (64, 64, 10), (30, 8, 1)])
@pytest.mark.parametrize("r_source,r_sink", [(1e3, 2e3), (0.0, 1e3), (1e3, 0.0)])
def test_merged_identical_columns_match_nodal_analysis_and_gradcheck(rows, cols, used, r_source, r_sink):
    """A tile's identical (padded) columns merged into one: the used columns' currents against the
    nodal analysis of the whole tile, and the gradient (the last column: all copies moved together) by finite
    differences."""
    from xbarflow.crossbar.circuit import transfer_columns_merged

    rng = np.random.default_rng(rows + cols + used)
    G = rng.uniform(5e-6, 5e-5, size=(2, rows, cols))
    G[..., used:] = 5e-6  # padded cells: g_min
    copies = cols - used
    T = transfer_columns_merged(torch.tensor(G[..., : used + 1]), copies, r_source=r_source, r_sink=r_sink).numpy()
    for t in range(2):
        ref = nodal_currents(G[t], np.eye(rows), r_source, r_sink)[:, :used]
        assert _rel_err(T[t], ref) <= 1e-9
    Gu = (torch.tensor(G[0, :, : used + 1]) * 20).requires_grad_(True)  # ~1/kOhm: well-conditioned differences
    assert torch.autograd.gradcheck(
        lambda g: transfer_columns_merged(g, copies, r_source=r_source, r_sink=r_sink), (Gu,))


@pytest.mark.filterwarnings("ignore:crossbar circuit too ill-conditioned")
def test_float32_check_from_the_range_decides_as_the_full_estimate():
    """The range-only bound that skips the float32 accuracy check's passes over G never changes
    its decision (cases on both sides of the threshold)."""
    from xbarflow.crossbar.circuit import _float64_if_needed, check_conductance

    gen = torch.Generator().manual_seed(3)
    decisions = set()
    for rows, cols in ((64, 64), (784, 11), (9, 40)):
        for lo, hi in ((1e-6, 1e-4), (1e-5, 1e-3), (0.0, 1e-2)):
            G = lo + (hi - lo) * torch.rand(2, rows, cols, generator=gen)
            extremes = check_conductance("G", G)
            for r_source, r_sink in ((1e3, 1e3), (1e4, 100.0), (50.0, 1e5), (1e5, 1e5)):
                full = _float64_if_needed(G, r_source, r_sink)
                assert _float64_if_needed(G, r_source, r_sink, extremes) == full
                decisions.add(full)
    assert decisions == {True, False}
