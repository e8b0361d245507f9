"""GPTQ against a float64 OBQ-style reference written here, and against round-to-nearest."""

import pytest
import torch

from lowbit.algorithms.gptq import HessianAccumulator, damped_inverse_cholesky, gptq_quantize

QMAX = 7  # symmetric int4


def int4_group_amax(slab):
    return slab.abs().amax(dim=1, keepdim=True)


def int4_column(column, amax):
    scale = amax[:, 0] / QMAX
    return (column / scale).round().clamp(-QMAX, QMAX) * scale


def rtn(weight, group_size):
    out, columns = weight.shape
    slabs = weight.reshape(out, columns // group_size, group_size)
    scale = slabs.abs().amax(dim=-1, keepdim=True) / QMAX
    return ((slabs / scale).round().clamp(-QMAX, QMAX) * scale).reshape(out, columns)


def reference_gptq(weight, hessian, group_size, percdamp, order=None, static_groups=False):
    """Column by column in float64 with the explicit inverse Hessian and its rank-1 downdate (OBQ order)."""
    w, h = weight.double().clone(), hessian.double().clone()
    columns = w.shape[1]
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += percdamp * h.diagonal().mean() * torch.eye(columns, dtype=torch.float64)
    static = [w[:, g : g + group_size].abs().amax(1) for g in range(0, columns, group_size)]
    inverse = torch.linalg.inv(h)
    quantized = torch.zeros_like(w)
    order = list(range(columns)) if order is None else order
    for step, j in enumerate(order):
        if static_groups:
            amax = static[j // group_size]
        elif step % group_size == 0:
            amax = w[:, j : j + group_size].abs().amax(1)  # the group's current weights
        scale = amax / QMAX
        q = (w[:, j] / scale).round().clamp(-QMAX, QMAX) * scale
        quantized[:, j] = q
        error = (w[:, j] - q) / inverse[j, j]
        w -= error[:, None] * inverse[j][None, :]  # row j of the inverse is zero on finished columns
        inverse = inverse - inverse[:, j : j + 1] @ inverse[j : j + 1, :] / inverse[j, j]
    return quantized


def correlated_inputs(generator, rows, columns):
    mixing = torch.randn(columns, columns, generator=generator) / columns**0.5 + torch.eye(columns)
    x = torch.randn(rows, columns, generator=generator) @ mixing
    x[:, 3] *= 20  # an outlier channel
    return x


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(7)


@pytest.mark.parametrize("block_size", [4, 8, 64])
def test_gptq_equals_float64_reference(generator, block_size):
    x = correlated_inputs(generator, 200, 16).double()
    x[:, 5] = 0  # a dead input
    weight = torch.randn(6, 16, generator=generator, dtype=torch.float64)
    hessian = 2 * x.T @ x / x.shape[0]
    result = gptq_quantize(weight, hessian, int4_group_amax, int4_column, group_size=4,
                           block_size=block_size, percdamp=0.01)
    expected = reference_gptq(weight, hessian, 4, 0.01)
    torch.testing.assert_close(result.weight, expected, rtol=0, atol=1e-9)
    assert torch.all(result.weight[:, 5] == 0)
    assert len(result.group_amax) == 4


def test_gptq_act_order_static_groups_equals_reference(generator):
    x = correlated_inputs(generator, 200, 16).double()
    weight = torch.randn(5, 16, generator=generator, dtype=torch.float64)
    hessian = 2 * x.T @ x / x.shape[0]
    result = gptq_quantize(weight, hessian, int4_group_amax, int4_column, group_size=8, block_size=8,
                           act_order=True, static_groups=True)
    order = torch.argsort(hessian.diagonal(), descending=True).tolist()
    expected = reference_gptq(weight, hessian, 8, 0.01, order=order, static_groups=True)
    torch.testing.assert_close(result.weight, expected, rtol=0, atol=1e-9)


def test_gptq_output_error_is_below_round_to_nearest(generator):
    x = correlated_inputs(generator, 512, 64)
    weight = torch.randn(32, 64, generator=generator)
    accumulator = HessianAccumulator(64)
    for batch in x.split(100):
        accumulator.add(batch)
    result = gptq_quantize(weight, accumulator.hessian, int4_group_amax, int4_column, group_size=16)

    def output_error(quantized):
        return float((x.double() @ (quantized.double() - weight.double()).T).square().mean())

    gptq_error, rtn_error = output_error(result.weight), output_error(rtn(weight, 16))
    assert gptq_error < 0.8 * rtn_error, (gptq_error, rtn_error)


def test_hessian_accumulator_equals_float64_formula(generator):
    batches = [torch.randn(n, 3, 12, generator=generator) for n in (1, 4, 7)]
    accumulator = HessianAccumulator(12)
    for batch in batches:
        accumulator.add(batch)
    rows = torch.cat([b.reshape(-1, 12) for b in batches]).double()
    torch.testing.assert_close(accumulator.hessian.double(), 2 * rows.T @ rows / rows.shape[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="columns"):
        accumulator.add(torch.randn(2, 5))


def test_damping_is_raised_until_cholesky_succeeds():
    singular = torch.ones(4, 4)  # rank one: Cholesky fails at tiny damping in float32
    upper = damped_inverse_cholesky(singular, percdamp=1e-12)
    assert torch.isfinite(upper).all()
    assert torch.equal(upper, upper.triu())
    with pytest.raises(RuntimeError, match="not positive definite"):
        damped_inverse_cholesky(-torch.eye(4), percdamp=0.01)


def test_gptq_option_errors(generator):
    weight, hessian = torch.randn(4, 16, generator=generator), torch.eye(16)
    with pytest.raises(ValueError, match="static_groups=True"):
        gptq_quantize(weight, hessian, int4_group_amax, int4_column, group_size=4, act_order=True)
    with pytest.raises(ValueError, match="group_size"):
        gptq_quantize(weight, hessian, int4_group_amax, int4_column, group_size=5)
    with pytest.raises(ValueError, match="hessian"):
        gptq_quantize(weight, torch.eye(8), int4_group_amax, int4_column)
    with pytest.raises(ValueError, match="percdamp"):
        gptq_quantize(weight, hessian, int4_group_amax, int4_column, percdamp=0)
