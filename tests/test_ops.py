"""engine.ops: the fast forms of sums, norms and maxima over a trailing dim equal the plain ones."""

import pytest
import torch
import torch.nn.functional as F

from engine import ops


@pytest.mark.parametrize("shape", [(50, 3), (4, 7, 3), (20, 2)])
def test_ops_match_the_plain_forms_with_gradients(shape):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    pairs = [(ops.dot(a, b), (a * b).sum(-1)), (ops.dot(a, b, keepdim=True), (a * b).sum(-1, keepdim=True)),
             (ops.sumsq(a), (a * a).sum(-1)), (ops.norm(a), a.norm(dim=-1)),
             (ops.norm(a, keepdim=True, eps=1e-3), a.norm(dim=-1, keepdim=True).clamp(min=1e-3)),
             (ops.normalize(a), a / a.norm(dim=-1, keepdim=True).clamp(min=1e-6))]
    if shape[-1] == 3:
        pairs += [(ops.max3(a), a.max(-1).values), (ops.min3(a), a.min(-1).values)]
    for fast, plain in pairs:
        assert fast.shape == plain.shape
        assert torch.allclose(fast, plain)
        w = torch.randn(plain.shape, generator=g, dtype=torch.float64)
        ga = torch.autograd.grad((fast * w).sum(), a, retain_graph=True)[0]
        gp = torch.autograd.grad((plain * w).sum(), a, retain_graph=True)[0]
        assert torch.allclose(ga, gp)


def test_norms_have_a_finite_gradient_at_zero():
    x = torch.zeros(4, 3, requires_grad=True)
    ops.normalize(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    y = torch.tensor([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0]], requires_grad=True)
    ops.norm(y).sum().backward()
    assert torch.equal(y.grad, torch.tensor([[0.0, 0.0, 0.0], [0.6, 0.8, 0.0]]))  # as torch.norm's


def test_world_sdfs_have_finite_gradients_on_their_axes():
    """Points on a solid's axis make a 2-vector of zeros inside the SDF; the oracle's normals need its gradient."""
    from engine import world

    x = torch.tensor([[0.1, 0.2, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.3], [0.0, 0.0, 0.0]], requires_grad=True)
    for solid in world.SHAPES:
        x.grad = None
        world.solid_sdf(solid, x).sum().backward()
        assert torch.isfinite(x.grad).all(), solid


@pytest.mark.parametrize("shape", [(7, 32, 32, 32), (3, 8, 16, 12), (1, 2, 5, 3)])
def test_grid_sample_3d_matches_torch_values_and_gradients(shape):
    g = torch.Generator().manual_seed(0)
    grid = torch.randn(1, *shape, generator=g, requires_grad=True)
    x = torch.rand(5000, 3, generator=g) * 2.4 - 1.2  # some points outside [-1, 1]: border padding
    x[:8] = torch.tensor([[-1.0, -1, -1], [1, 1, 1], [1, -1, 1], [-1, 1, 1], [0, 0, 1], [0, 1, 0], [1, 0, 0], [0, 0, 0]])
    ref = F.grid_sample(grid, x.view(1, 1, 1, -1, 3), mode="bilinear", padding_mode="border", align_corners=True)
    ref = ref.view(shape[0], -1)
    out = ops.grid_sample_3d(grid, x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=0)  # ~2e-4 of a cell in position: float rounding of the row
    w = torch.randn(ref.shape, generator=g)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), grid)
    (g_out,) = torch.autograd.grad((out * w).sum(), grid)
    torch.testing.assert_close(g_out, g_ref, atol=2e-3, rtol=0)
