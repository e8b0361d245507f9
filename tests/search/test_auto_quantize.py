"""auto_quantize on a tiny Llama: decision groups, the budget, effective bits from the formula, scores against
references computed here, state save / load / re-apply, errors before the model is touched."""

import math

import pytest
import torch

from lowbit.modules import is_quantized
from lowbit.search import SearchState, apply_search_state, auto_quantize
from lowbit.search.auto import calibrate_formats, calibration_steps
from lowbit.search.candidates import NONE, search_formats
from lowbit.search.scores import gradient_scores, kl_scores
from tests.algorithms.tiny_llama import tiny_llama
from tests.search.conftest import FORMATS, forward_step, loss_func

LAYER = "model.layers.0"


def test_fused_layers_share_one_choice(searched):
    model, state = searched
    groups = [sorted(g.modules) for g in state.groups]
    assert sorted([f"{LAYER}.self_attn.{p}_proj" for p in "qkv"]) in groups
    assert sorted([f"{LAYER}.mlp.gate_proj", f"{LAYER}.mlp.up_proj"]) in groups
    assert [f"{LAYER}.self_attn.o_proj"] in groups and ["lm_head"] in groups
    for group in state.groups:  # the model holds the choice: one format per group
        formats = {_format_of(model.get_submodule(name)) for name in group.modules}
        assert formats == {group.choice}


def _format_of(module):
    quantizer = module.weight_quantizer
    if not quantizer.is_enabled:
        return NONE
    return "NVFP4_DEFAULT_CFG" if quantizer.config.num_bits == (2, 1) else "FP8_DEFAULT_CFG"


def reference_bits(model, assignment):
    """Effective bits written out: NVFP4 4 bits + an E4M3 scale per 16 + FP32 global; FP8 8 bits + FP32 scale;
    none 16 bits."""
    total_bits = total_numel = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        numel = module.weight.numel()
        bits = {"NVFP4_DEFAULT_CFG": 4 * numel + 8 * numel // 16 + 32, "FP8_DEFAULT_CFG": 8 * numel + 32,
                NONE: 16 * numel}[assignment[name]]
        total_bits += bits
        total_numel += numel
    return total_bits / total_numel


def test_effective_bits_follow_the_formula_and_the_budget(searched):
    model, state = searched
    achieved = reference_bits(model, state.assignment)
    assert state.effective_bits == pytest.approx(achieved, rel=1e-12)
    assert achieved <= 6.0
    assert state.solver["exact"]
    again = state.resolve(5.0)  # re-solved from the stored scores: a cheaper budget, more NVFP4
    assert reference_bits(model, again.assignment) <= 5.0 < achieved
    assert again.score >= state.score


def test_budget_outside_the_range_is_an_error_before_the_model_changes(batches):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lowest = reference_bits(model, {n: "NVFP4_DEFAULT_CFG" for n, m in model.named_modules()
                                    if isinstance(m, torch.nn.Linear)})
    for bits in (lowest - 0.01, 3.0, 16.5):
        with pytest.raises(ValueError, match=r"constraints\['effective_bits'\]=.*allowed is \[4\.5"):
            auto_quantize(model, {"auto_quantize_bits": bits}, FORMATS, batches, forward_step, loss_func)
    assert not any(is_quantized(m) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_an_already_quantized_model_is_refused(searched, batches):
    with pytest.raises(ValueError, match="already quantized"):
        auto_quantize(searched[0], {"effective_bits": 6}, FORMATS, batches, forward_step, loss_func)


@pytest.mark.parametrize("arguments, match", [
    ({"constraints": {"bits": 5}}, "unknown key"),
    ({"constraints": [4.8]}, "expected a dict"),
    ({"constraints": {"effective_bits": 5, "auto_quantize_bits": 6}}, "give the budget once"),
    ({"method": "hessian"}, "method='hessian'"),
    ({"loss_func": None}, "loss_func=None"),
    ({"data_loader": iter([])}, "re-iterable"),
    ({"quantization_formats": ["nvfp5"]}, "format 'nvfp5' is unknown"),
    ({"num_score_steps": 0}, "num_score_steps=0"),
])
def test_bad_arguments_name_themselves(batches, arguments, match):
    kwargs = {"constraints": {"effective_bits": 6}, "quantization_formats": FORMATS, "data_loader": batches,
              "forward_step": forward_step, "loss_func": loss_func, **arguments}
    with pytest.raises((TypeError, ValueError), match=match):
        auto_quantize(tiny_llama(), **kwargs)


def test_state_saves_loads_and_reapplies_without_scoring(searched, batches, tmp_path):
    model, state = searched
    path = state.save(tmp_path / "state.json")
    loaded = SearchState.load(path)
    assert loaded == state
    fresh = apply_search_state(tiny_llama(), loaded, batches, forward_step, num_calib_steps=2)
    batch = batches[0]
    with torch.no_grad():
        assert torch.equal(fresh(batch).logits, model(batch).logits)
    (tmp_path / "bad.json").write_text('{"writer": "lowbit.auto_quantize", "version": 1, "groups": [')
    with pytest.raises(ValueError, match="bad.json: not JSON"):
        SearchState.load(tmp_path / "bad.json")


def module_outputs(model, names, batch):
    """{module name: output} of one forward, captured by hooks."""
    outputs, handles = {}, []
    for name in names:
        handles.append(model.get_submodule(name).register_forward_hook(
            lambda _m, _a, out, name=name: outputs.__setitem__(name, out)))
    try:
        model(batch, labels=batch).loss.backward() if torch.is_grad_enabled() else model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def test_gradient_scores_equal_the_fisher_sum_written_out(batches):
    """sum over batches of sum((dL/dy * (y_f - y))^2), y_f from a whole-model forward with the module alone
    in format f, dL/dy from autograd on the float model: float64 here."""
    model = tiny_llama()
    names = [f"{LAYER}.self_attn.q_proj", f"{LAYER}.mlp.down_proj", "lm_head"]
    calibrated = calibrate_formats(model, search_formats(FORMATS), names, batches, lambda m, b: m(b), len(batches))
    scores = gradient_scores(calibrated, FORMATS, batches, forward_step, loss_func)
    for name in names:
        for search_format in FORMATS:
            expected = 0.0
            for batch in batches:
                calibrated.apply({})
                captured = {}
                module = model.get_submodule(name)
                handle = module.register_forward_hook(lambda _m, _a, out, c=captured: c.setdefault("y", out))
                loss = model(batch, labels=batch).loss
                handle.remove()
                grad, = torch.autograd.grad(loss, captured["y"])
                calibrated.apply({name: search_format})
                with torch.no_grad():
                    quantized = module_outputs(model, [name], batch)[name]
                expected += ((grad.double() * (quantized.double() - captured["y"].double())) ** 2).sum().item()
            assert scores[name][search_format] == pytest.approx(expected, rel=1e-3)
            assert expected > 0


def test_kl_scores_equal_the_divergence_written_out(batches):
    model = tiny_llama()
    groups = [[f"{LAYER}.mlp.gate_proj", f"{LAYER}.mlp.up_proj"], ["lm_head"]]
    names = [n for g in groups for n in g]
    calibrated = calibrate_formats(model, search_formats(FORMATS), names, batches, lambda m, b: m(b), len(batches))
    scores = kl_scores(calibrated, groups, FORMATS, batches, lambda m, b: m(b))
    for index, group in enumerate(groups):
        for search_format in FORMATS:
            total = 0.0
            for batch in batches:
                with torch.no_grad():
                    calibrated.apply({})
                    p = torch.log_softmax(model(batch).logits.double(), -1)
                    calibrated.apply({n: search_format for n in group})
                    q = torch.log_softmax(model(batch).logits.double(), -1)
                total += (p.exp() * (p - q)).sum(-1).mean().item()
            assert scores[index][search_format] == pytest.approx(total / len(batches), rel=1e-4)
    assert all(math.isfinite(v) for s in scores for v in s.values())


def test_kl_method_needs_no_loss_and_keeps_the_budget(batches):
    model, state = auto_quantize(tiny_llama(), {"effective_bits": 7.0}, ["nvfp4", "fp8"], batches,
                                 lambda m, b: m(b), method="kl_div", num_calib_steps=2, num_score_steps=1)
    assert state.method == "kl_div" and state.effective_bits <= 7.0
    assert set(state.formats) == set(FORMATS)
    assert state.effective_bits == pytest.approx(reference_bits(model, state.assignment), rel=1e-12)


def test_awq_formats_calibrate_on_a_quarter_of_the_batches():
    awq, fp8 = search_formats(["INT4_AWQ_CFG", "FP8_DEFAULT_CFG"])
    assert [calibration_steps(awq, n) for n in (1, 3, 8, 9)] == [1, 1, 2, 2]
    assert calibration_steps(fp8, 9) == 9


def test_checkpoint_resumes_without_scoring(batches, tmp_path):
    checkpoint = tmp_path / "search.json"
    calls = []

    def counting_loss(output, batch):
        calls.append(1)
        return output.loss

    _, first = auto_quantize(tiny_llama(), {"effective_bits": 6.0}, FORMATS, batches, forward_step, counting_loss,
                             num_calib_steps=2, num_score_steps=2, checkpoint=checkpoint)
    assert len(calls) == 2 and SearchState.load(checkpoint) == first
    model, resumed = auto_quantize(tiny_llama(), {"effective_bits": 5.0}, FORMATS, batches, forward_step,
                                   counting_loss, num_calib_steps=2, num_score_steps=2, checkpoint=checkpoint)
    assert len(calls) == 2  # no scoring
    assert resumed == first.resolve(5.0) and reference_bits(model, resumed.assignment) <= 5.0
    with pytest.raises(ValueError, match="checkpoint was searched with"):
        auto_quantize(tiny_llama(), {"effective_bits": 5.0}, FORMATS, batches, lambda m, b: m(b), method="kl_div",
                      checkpoint=checkpoint)
