"""Fused MoE experts (transformers 5 Mixtral / Qwen2-MoE / Qwen3-MoE) as quantized modules.

References are float64 and written here or in tests/core/reference.py (per-expert loops over the
format definitions, routing recomputed from the router's own top-k). Tolerances: amax exact (a max of
float32 values), fake-quant values as ``assert_matches`` (a few ulps, one grid step at rounding ties),
float forward through our loop vs transformers' eager loop exact, down_proj input amax
rtol 1e-5 (float32 matmul over 128-256 terms against float64).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import lowbit
from lowbit.expert_quantizer import ExpertQuantizer
from tests.core.reference import (
    E2M1,
    E4M3,
    assert_matches,
    fp_reference,
    group_reduce,
    int_reference,
    mx_reference,
    nvfp4_reference,
    random_with_outliers,
)
from tests.modules.moe_models import (
    MOE_FAMILIES,
    NUM_EXPERTS,
    assert_every_expert_weight_quantized,
    experts_modules,
    needs_fused_experts,
    tiny_mixtral,
    tiny_qwen3_moe,
)

pytestmark = needs_fused_experts

INT4_G128 = {"num_bits": 4, "block_sizes": {-1: 128}}
OFF = {"default": {"enable": False}}


def _tokens(vocab: int = 256, batch: int = 2, length: int = 24, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _loop(*batches):
    def forward_loop(model):
        for ids in batches:
            model(ids)
    return forward_loop


def _first_experts(model):
    return next(iter(experts_modules(model).values()))


# ---- forward ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_disabled_quantizers_give_transformers_eager_output(family):
    """Our routed loop is transformers' eager loop: with every quantizer off the logits are identical."""
    reference = MOE_FAMILIES[family](experts_implementation="eager")
    model = copy.deepcopy(reference)
    lowbit.quantize(model, {"quant_cfg": {"*experts*": {"num_bits": 8}, **OFF}, "algorithm": None})
    lowbit.disable_quantizer(model, "*")
    ids = _tokens()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_every_preset_quantizes_every_expert_weight(family):
    """The MoE rows of the family matrix: presets reach the experts, router gates stay float."""
    ids = _tokens()
    for preset in ("INT4_AWQ_CFG", "FP8_DEFAULT_CFG", "NVFP4_DEFAULT_CFG", "INT8_DEFAULT_CFG"):
        model = MOE_FAMILIES[family]()
        config = {**getattr(lowbit.presets, preset), "algorithm": "max"}
        lowbit.quantize(model, config, _loop(ids))
        assert_every_expert_weight_quantized(model)
        names = [name for name, _ in lowbit.iter_quantizers(model)]
        assert not any(".gate." in name and name.endswith("weight_quantizer") for name in names), preset
        with torch.no_grad():
            assert torch.isfinite(model(ids).logits).all(), preset


# ---- per-expert weight scales against float64 references ---------------------------------------------
WEIGHT_FORMATS = {
    "int4_per_channel": ({"num_bits": 4, "axis": 0}, "int"),
    "int8_per_channel": ({"num_bits": 8, "axis": 0}, "int"),
    "int4_g128": (INT4_G128, "int"),
    "int8_g64": ({"num_bits": 8, "block_sizes": {-1: 64}}, "int"),
    "fp8_per_tensor": ({"num_bits": (4, 3), "axis": None}, "fp8"),
    "nvfp4": ({"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}}, "nvfp4"),
    "mxfp4": ({"num_bits": (2, 1), "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}}, "mx"),
}


REFERENCE_ROWS = 64  # rows are quantized independently given the amax: the slow float64 references see 64


def _expert_reference(weight: torch.Tensor, attributes: dict, kind: str):
    """float64 fake-quantized first REFERENCE_ROWS rows of one expert (out, in), and the expert's amax
    spread over (out, in) (0-dim for NVFP4's global amax; None for MX: dynamic)."""
    rows = weight[:REFERENCE_ROWS]
    if kind == "mx":
        return mx_reference(rows, E2M1, 32), None
    if kind == "nvfp4":
        amax = weight.double().abs().max()
        return nvfp4_reference(rows, amax.item()), amax
    amax = group_reduce(weight, "absmax", attributes.get("axis"), attributes.get("block_sizes"))
    if kind == "fp8":
        return fp_reference(rows, amax[:REFERENCE_ROWS], E4M3), amax
    return int_reference(rows, amax[:REFERENCE_ROWS], attributes["num_bits"]), amax


@pytest.mark.parametrize("name", sorted(WEIGHT_FORMATS))
def test_per_expert_weight_scales_match_float64_reference(name):
    """One amax per expert per channel / block (NVFP4: a global amax per expert): expert e is quantized as
    if it were a Linear alone. Experts get weights of very different magnitudes (x1 ... x1000)."""
    attributes, kind = WEIGHT_FORMATS[name]
    model = tiny_mixtral()
    experts = _first_experts(model)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for expert in range(NUM_EXPERTS):
            shape = experts.gate_up_proj[expert].shape
            experts.gate_up_proj[expert] = random_with_outliers(shape, generator) * 10.0 ** (expert - 1)
    lowbit.quantize(model, {"quant_cfg": {"*experts.gate_up_proj_weight_quantizer": attributes, **OFF}})
    quantizer = experts.gate_up_proj_weight_quantizer
    with torch.no_grad():
        quantized = quantizer(experts.gate_up_proj)
    for expert in range(NUM_EXPERTS):
        weight = experts.gate_up_proj[expert].detach()
        reference, amax = _expert_reference(weight, attributes, kind)
        assert_matches(quantized[expert, :REFERENCE_ROWS], reference)
        if amax is not None:
            assert torch.equal(_expand_like(quantizer.amax[expert], amax), amax), f"expert {expert}"


def _expand_like(amax_view: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """A quantizer's amax (one expert: per tensor, (out, 1) or (out, in/b, 1)) spread over ``full``'s shape."""
    if full.dim() == 0:
        return amax_view.double().reshape(())
    if amax_view.dim() == 3:  # blocks: (out, in/b, 1) -> (out, in)
        return amax_view.double().expand(-1, -1, full.shape[1] // amax_view.shape[1]).reshape(full.shape)
    return amax_view.double().reshape(-1, 1).expand(full.shape) if amax_view.numel() > 1 else \
        amax_view.double().reshape(1, 1).expand(full.shape)


# ---- per-expert input amax on the tokens routed to each expert ---------------------------------------
def _routed_inputs(model, ids):
    """{experts module: (hidden (T, H) float64, top_k_index (T, k))} captured from the float model."""
    captured = {}
    handles = [module.register_forward_pre_hook(
        lambda module, args: captured.__setitem__(module, (args[0].double(), args[1])))
        for module in experts_modules(model).values()]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _reference_input_amax(module, hidden, top_k_index, all_tokens: bool):
    """float64 per-expert max|x| of the gate_up input and of the down_proj input (act(gate) * up)."""
    gate_up, down = [], []
    for expert in range(module.num_experts):
        rows = torch.ones(len(hidden), dtype=torch.bool) if all_tokens else (top_k_index == expert).any(-1)
        x = hidden[rows]
        projected = x @ module.gate_up_proj[expert].detach().double().t()
        gate, up = projected.chunk(2, dim=-1)
        h = torch.nn.functional.silu(gate) * up
        gate_up.append(x.abs().max() if len(x) else torch.tensor(float("nan"), dtype=torch.float64))
        down.append(h.abs().max() if len(x) else torch.tensor(float("nan"), dtype=torch.float64))
    return torch.stack(gate_up), torch.stack(down)


INPUT_ONLY = {"quant_cfg": {"*experts*input_quantizer": {"num_bits": 8, "axis": None}, **OFF}, "algorithm": "max"}


@pytest.mark.parametrize("all_tokens", [False, True], ids=["routed", "calibrate_all_experts"])
def test_input_amax_per_expert_on_its_routed_tokens(all_tokens):
    """Each expert's input amax is the max over the tokens the router sent it (over all tokens with
    calibrate_all_experts), gate_up and down_proj inputs alike. Weights stay float so the float model's
    routing is the calibration routing."""
    model = tiny_qwen3_moe()
    ids = _tokens()
    captured = _routed_inputs(model, ids)
    config = {**INPUT_ONLY, "algorithm": {"method": "max", "calibrate_all_experts": all_tokens}}
    lowbit.quantize(model, config, _loop(ids))
    for module, (hidden, top_k_index) in captured.items():
        gate_up, down = _reference_input_amax(module, hidden, top_k_index, all_tokens)
        assert torch.isfinite(gate_up).all(), "the seeded batch routes a token to every expert"
        torch.testing.assert_close(module.gate_up_proj_input_quantizer.amax.double(), gate_up, rtol=0, atol=0)
        torch.testing.assert_close(module.down_proj_input_quantizer.amax.double(), down, rtol=1e-5, atol=0)


def test_calibrate_all_experts_leaves_outputs_unchanged():
    """Routing every token to every expert is for statistics only: the forward during calibration returns
    what it returns without the option, and every expert gets an amax although the router feeds only
    experts 0 and 1."""
    model = tiny_mixtral()
    experts = _first_experts(model)
    lowbit.quantize(experts, {"quant_cfg": {"*input_quantizer": {"num_bits": 8}, **OFF}, "algorithm": None})
    hidden = random_with_outliers((32, 128), torch.Generator().manual_seed(9))
    top_k_index = torch.stack([torch.zeros(32, dtype=torch.long), torch.ones(32, dtype=torch.long)], dim=-1)
    top_k_weights = torch.full((32, 2), 0.5)
    outputs = {}
    for all_experts in (False, True):
        with torch.no_grad(), warnings.catch_warnings(record=True):  # routed only: experts 2, 3 starve
            lowbit.calibrate(experts, {"method": "max", "calibrate_all_experts": all_experts},
                             lambda m, key=all_experts: outputs.setdefault(key, m(hidden, top_k_index, top_k_weights)))
    assert torch.equal(outputs[True], outputs[False])
    amax = experts.gate_up_proj_input_quantizer.amax
    assert amax.shape == (NUM_EXPERTS,) and torch.equal(amax, torch.full_like(amax, hidden.abs().max()))
    assert experts.gate_up_proj_input_quantizer.starved_experts == []


# ---- starved experts ---------------------------------------------------------------------------------
def test_starved_expert_gets_siblings_largest_amax_and_a_warning():
    model = tiny_mixtral()
    experts = _first_experts(model)
    lowbit.quantize(experts, {"quant_cfg": {"*input_quantizer": {"num_bits": 8, "axis": None},
                                            "*weight_quantizer": INT4_G128, **OFF}, "algorithm": None})
    generator = torch.Generator().manual_seed(4)
    hidden = random_with_outliers((40, 128), generator)
    top_k_index = torch.randint(0, 3, (40, 2), generator=generator)  # experts 3.. never chosen
    top_k_weights = torch.full((40, 2), 0.5)
    starved = str(list(range(3, NUM_EXPERTS))).replace("[", r"\[").replace("]", r"\]")
    with pytest.warns(UserWarning, match=rf"gate_up_proj_input_quantizer: expert\(s\) {starved} of {NUM_EXPERTS} "):
        lowbit.calibrate(experts, "max", lambda m: m(hidden, top_k_index, top_k_weights))
    for slot in ("gate_up_proj_input_quantizer", "down_proj_input_quantizer"):
        amax = getattr(experts, slot).amax
        assert torch.isfinite(amax).all() and (amax[3:] == amax[:3].max()).all(), slot
        assert len(amax.unique()) > 1, "the fed experts keep their own amax"
    weight_amax = experts.gate_up_proj_weight_quantizer.amax
    expected = group_reduce(experts.gate_up_proj[3].detach(), "absmax", block_sizes={-1: 128})
    assert torch.equal(_expand_like(weight_amax[3], expected), expected)  # from its own weights
    with torch.no_grad():  # the starved expert now computes with finite scales
        out = experts(hidden, torch.full((40, 2), 3), top_k_weights)
    assert torch.isfinite(out).all()


def test_every_expert_starved_stays_dynamic_without_nan():
    model = tiny_mixtral()
    experts = _first_experts(model)
    lowbit.quantize(experts, {"quant_cfg": {"*input_quantizer": {"num_bits": 8}, **OFF}, "algorithm": None})
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        lowbit.calibrate(experts, "max", lambda m: None)
    assert experts.gate_up_proj_input_quantizer.amax is None
    hidden = torch.randn(8, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = experts(hidden, torch.zeros(8, 2, dtype=torch.long), torch.full((8, 2), 0.5))
    assert torch.isfinite(out).all()


# ---- errors at the door -----------------------------------------------------------------------------
def test_calibrate_all_experts_must_be_bool():
    model = tiny_mixtral()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="calibrate_all_experts='yes'"):
        lowbit.quantize(model, {**INPUT_ONLY, "algorithm": {"method": "max", "calibrate_all_experts": "yes"}},
                        _loop(_tokens()))
    assert not any(type(m).__name__.startswith("Quant") for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_block_size_that_does_not_divide_an_expert_dim_is_refused_before_conversion():
    model = tiny_qwen3_moe()  # expert intermediate 128: block 96 divides neither 128 nor 128
    with pytest.raises(ValueError, match=r"experts\.gate_up_proj_weight_quantizer: block_sizes\[1\]=96"):
        lowbit.quantize(model, {"quant_cfg": {"*experts*weight_quantizer": {"num_bits": 4,
                                                                            "block_sizes": {-1: 96}}, **OFF}})
    assert not any(type(m).__name__.startswith("Quant") for m in model.modules())


def test_expert_quantizer_checks_its_input():
    quantizer = ExpertQuantizer({"num_bits": 8}, num_experts=3)
    with pytest.raises(ValueError, match=r"over 3 experts got a tensor of shape \(2, 4\)"):
        quantizer(torch.ones(2, 4))
    with pytest.raises(IndexError, match="expert=3: this quantizer has 3 experts"):
        quantizer(torch.ones(2, 4), expert=3)
    with pytest.raises(ValueError, match="num_experts=0"):
        ExpertQuantizer({"num_bits": 8}, num_experts=0)


# ---- per-expert records for the structure layer (AWQ / GPTQ per expert) -------------------------------
def _int4_experts(seed: int = 21):
    model = tiny_mixtral()
    experts = _first_experts(model)
    lowbit.quantize(experts, {"quant_cfg": {"*weight_quantizer": INT4_G128, "*input_quantizer": {"num_bits": 8},
                                            **OFF}, "algorithm": None})
    from lowbit.calibration import calibrate_weights

    calibrate_weights(experts)
    generator = torch.Generator().manual_seed(seed)
    hidden = random_with_outliers((48, 128), generator)
    top_k_index = torch.stack([torch.randperm(NUM_EXPERTS, generator=generator)[:2] for _ in range(48)])
    return experts, hidden, top_k_index, torch.full((48, 2), 0.5)


def test_expert_quantizer_view_reads_and_writes_one_slice():
    experts, *_ = _int4_experts()
    parent = experts.gate_up_proj_weight_quantizer
    view = parent.expert(2)
    weight = experts.gate_up_proj[2].detach()
    expected = group_reduce(weight, "absmax", block_sizes={-1: 128})
    assert torch.equal(_expand_like(view.compute_amax(weight), expected), expected)
    assert torch.equal(view.amax, parent.amax[2]) and view.config is parent.config
    assert torch.equal(view.fake_quant(weight), parent(experts.gate_up_proj)[2])
    before = parent.amax.clone()
    view.set_amax(view.amax * 0.5)  # TensorQuantizer's own code, through the view
    assert torch.equal(parent.amax[2], before[2] * 0.5)
    assert torch.equal(parent.amax[[0, 1, 3]], before[[0, 1, 3]])
    assert_matches(view.fake_quant(weight), int_reference(weight, _expand_like(parent.amax[2], expected), 4))
    scale = torch.rand(128, generator=torch.Generator().manual_seed(2)) + 0.5
    experts.gate_up_proj_input_quantizer.expert(1).pre_quant_scale = scale
    stacked = experts.gate_up_proj_input_quantizer.pre_quant_scale
    assert torch.equal(stacked[1], scale) and torch.equal(stacked[[0, 2]], torch.ones(2, 128))


def test_expert_records_see_their_routed_tokens_and_write_the_fused_weight():
    from lowbit.structure.experts import expert_weights

    experts, hidden, top_k_index, top_k_weights = _int4_experts()
    records = expert_weights("mlp.experts", experts)
    assert [r.name for r in records[:2]] == ["mlp.experts.gate_up_proj.0", "mlp.experts.gate_up_proj.1"]
    assert len(records) == 2 * NUM_EXPERTS and len(set(records)) == len(records)
    seen = {}
    handles = [r.observe_inputs(lambda x, r=r: seen.setdefault(r, []).append(x)) for r in records]
    with torch.no_grad():
        experts(hidden, top_k_index, top_k_weights)
    for handle in handles:
        handle.remove()
    for record in records[:NUM_EXPERTS]:  # gate_up: the raw routed rows, in the router's order
        expert = record.key[1]
        top_k_pos, token_idx = torch.where(top_k_index.t() == expert)
        assert torch.equal(torch.cat(seen[record]), hidden[token_idx])
    with torch.no_grad():
        experts(hidden, top_k_index, top_k_weights)
    assert sum(len(v) for v in seen.values()) == 2 * NUM_EXPERTS  # removed handles see nothing more
    record = records[NUM_EXPERTS + 3]  # down_proj of expert 3
    with torch.no_grad():
        record.weight.copy_(torch.zeros_like(record.weight))
    assert experts.down_proj[3].abs().sum() == 0 and experts.down_proj[2].abs().sum() > 0


def test_gptq_per_expert_on_routed_tokens_beats_rounding():
    """GPTQ's core (lowbit.algorithms.gptq) run through the records: each expert's Hessian from its own routed
    tokens; each expert's output error on those tokens is at most plain rounding's (float64 check)."""
    from lowbit.algorithms.gptq import gptq_quantize
    from lowbit.algorithms.weights import quantize_column
    from lowbit.structure.experts import expert_weights

    experts, hidden, top_k_index, top_k_weights = _int4_experts()
    records = [r for r in expert_weights("", experts) if r.key[0] == "gate_up_proj"]
    inputs = {}
    handles = [r.observe_inputs(lambda x, r=r: inputs.setdefault(r, []).append(x)) for r in records]
    with torch.no_grad():
        experts(hidden, top_k_index, top_k_weights)
    for handle in handles:
        handle.remove()
    for record in records:
        x = torch.cat(inputs[record]).double()
        quantizer = record.weight_quantizer
        original = record.weight.detach().clone()
        rounded = quantizer.fake_quant(original)
        hessian = 2 * x.t() @ x / len(x)
        result = gptq_quantize(original, hessian.float(), quantizer.compute_amax,
                               lambda column, amax, q=quantizer: quantize_column(q, column, amax), group_size=128)
        error_gptq = ((x @ (result.weight.double() - original.double()).t()) ** 2).mean()
        error_rtn = ((x @ (rounded.double() - original.double()).t()) ** 2).mean()
        assert error_gptq <= error_rtn, (record.name, error_gptq.item(), error_rtn.item())


def test_calibrating_a_view_calibrates_that_expert_only():
    from lowbit.quantizer import collecting_statistics

    experts, *_ = _int4_experts()
    parent = experts.down_proj_weight_quantizer
    before = parent.amax.clone()
    view = parent.expert(5)
    scaled = experts.down_proj[5].detach() * 3.0
    with torch.no_grad(), collecting_statistics([view]):
        view(scaled)
    expected = group_reduce(scaled, "absmax", block_sizes={-1: 128})
    assert torch.equal(_expand_like(parent.amax[5], expected), expected)
    others = [e for e in range(NUM_EXPERTS) if e != 5]
    assert torch.equal(parent.amax[others], before[others]) and not parent._calib
