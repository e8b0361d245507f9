"""How far onnxruntime is from lowbit's model on the bundled Llama's W8A8 ONNX exports, and why.

Protocol (fixed: bundled Llama, float32, torch threads 1, calibration = first 256 tokens of the calibration text,
evaluation = held-out tokens in 4 windows of 128): quantize with the config, export with ``export_onnx`` once
per ``numerics`` ("onnx": scales as Q/DQ steps; "lowbit": lowbit's Mul / Div around unit-step Q/DQ), then per
window the relative L2 distance of the logits (``||a - b|| / ||b||``):

- ORT vs lowbit: onnxruntime (CPU, default session options) against lowbit's fake-quantized model;
- graph in torch vs lowbit: ``export_copy`` (the export's own math, run in torch) against lowbit;
- floor: lowbit's model against itself computed in float64 (``.double()``: same quantizers, their math in
  float32; every other op in float64), i.e. how far float32 rounding alone moves lowbit's own logits;
- ORT vs lowbit-f64: onnxruntime against that float64 computation;
- KL to float: mean per-token KL(float model || quantized), in nats, of lowbit's logits and of onnxruntime's,
  i.e. whether onnxruntime runs a quantized model of the same quality;
- integer GEMMs: how many MatMulIntegerToFloat / QLinearMatMul / MatMulInteger nodes onnxruntime's optimised
  graph holds (the Q/DQ it recognised and fused), out of the quantized layers.

Then, for window 0 and ``numerics="lowbit"``, per quantized-layer input in model order (q/k/v and gate/up share
one): the relative L2 difference between onnxruntime's and torch's QuantizeLinear input and how many
activation codes differ (INT8: ``round``; FP8: E4M3 cast), which shows where float-kernel rounding first flips
a code and how the flips spread.

    python bench/export_onnx_layers.py [INT8_DEFAULT_CFG FP8_DEFAULT_CFG]
"""

from __future__ import annotations

import copy
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import lowbit
from lowbit.eval import token_kl
from lowbit.export import export_onnx
from lowbit.export.onnx_qdq import NUMERICS, QDQLayer, export_copy

WINDOWS, WINDOW = 4, 128


def relative(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).norm() / b.norm()).item()


INTEGER_GEMMS = ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger")


def mean_kl(float_logits: torch.Tensor, logits) -> float:
    """Mean per-token KL(float || quantized) in nats (float64)."""
    log_probs = torch.as_tensor(logits).double().log_softmax(-1)
    return token_kl(float_logits.double().log_softmax(-1), log_probs).mean().item()


def session(path: Path, extra_outputs: list[str] | None = None, optimized: Path | None = None):
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path))
    for name in extra_outputs or []:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def integer_gemms(optimized: Path) -> int:
    import onnx

    return sum(node.op_type in INTEGER_GEMMS for node in onnx.load(str(optimized)).graph.node)


def quantize_inputs(model, ids) -> list[tuple[str, torch.Tensor]]:
    """(layer, QuantizeLinear input) of every QDQLayer of ``export_copy(model, "lowbit")``, shared ones once."""
    seen: list[tuple[str, torch.Tensor]] = []
    copy_model = export_copy(model, "lowbit")[0]
    for name, module in copy_model.named_modules():
        if isinstance(module, QDQLayer) and module.input_scale is not None:
            def hook(m, args, out, name=name):
                x = args[0] if m.pre_quant_scale is None else args[0] * m.pre_quant_scale
                seen.append((name, (x * m.input_scale).detach()))
            module.register_forward_hook(hook)
    with torch.no_grad():
        copy_model(ids)
    unique = []
    for name, x in seen:
        if not unique or not (unique[-1][1].shape == x.shape and torch.equal(unique[-1][1], x)):
            unique.append((name, x))
    return unique


def codes(x: torch.Tensor, fp8: bool) -> torch.Tensor:
    return x.clamp(-448, 448).to(torch.float8_e4m3fn).float() if fp8 else torch.round(x).clamp(-128, 127)


def layer_table(quantized, path: Path, ids, fp8: bool) -> None:
    import onnx

    names = [node.input[0] for node in onnx.load(str(path)).graph.node if node.op_type == "QuantizeLinear"]
    theirs = session(path, names).run(names, {"input_ids": ids.numpy()})
    print("\n| layer (input of) | ORT vs torch, rel. L2 | activation codes that differ |")
    print("|---|---|---|")
    for (name, x), y in zip(quantize_inputs(quantized, ids), theirs, strict=True):
        y = torch.from_numpy(y).reshape(x.shape)
        flips = (codes(x, fp8) != codes(y, fp8)).sum().item()
        print(f"| {name} | {relative(y, x):.2e} | {flips} / {x.numel()} |")


def main() -> None:
    torch.set_num_threads(1)
    cfg_names = sys.argv[1:] or ["INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG"]
    model, tokenizer = lowbit.assets.load_default_model()
    model.config.use_cache = False
    calibration = tokenizer(lowbit.assets.bundled_text("calibration")[:4000], return_tensors="pt").input_ids[:, :256]
    heldout = tokenizer(lowbit.assets.bundled_text("heldout"), return_tensors="pt").input_ids
    windows = [heldout[:, i * WINDOW:(i + 1) * WINDOW] for i in range(WINDOWS)]
    import onnxruntime

    print(f"python {platform.python_version()}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
          f"lowbit {lowbit.__version__}; {WINDOWS} windows of {WINDOW} held-out tokens\n")
    with torch.no_grad():
        float_logits = [model(ids).logits for ids in windows]
    print("| config | numerics | window | ORT vs lowbit | graph in torch vs lowbit | floor: lowbit f32 vs f64 | "
          "ORT vs lowbit-f64 | KL to float: lowbit | KL to float: ORT |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for cfg_name in cfg_names:
            quantized = lowbit.quantize(copy.deepcopy(model), copy.deepcopy(getattr(lowbit, cfg_name)),
                                        lambda m: m(calibration))
            exact = copy.deepcopy(quantized).double()
            for numerics in NUMERICS:
                start = time.perf_counter()
                path = export_onnx(quantized, {"input_ids": windows[0]}, Path(scratch) / f"{cfg_name}-{numerics}.onnx",
                                   numerics=numerics)
                seconds = time.perf_counter() - start
                graph = export_copy(quantized, numerics)[0]
                layers = sum(isinstance(m, QDQLayer) for m in graph.modules())
                runner = session(path, optimized=path.with_suffix(".optimized.onnx"))
                print(f"<!-- {cfg_name} {numerics}: export {seconds:.0f} s; integer GEMMs in onnxruntime's graph: "
                      f"{integer_gemms(path.with_suffix('.optimized.onnx'))} for {layers} quantized layers -->")
                for index, ids in enumerate(windows):
                    result = torch.from_numpy(runner.run(None, {"input_ids": ids.numpy()})[0])
                    with torch.no_grad():
                        reference, emulated, wide = quantized(ids).logits, graph(ids).logits, exact(ids).logits
                    print(f"| {cfg_name} | {numerics} | {index} | {relative(result, reference):.2e} | "
                          f"{relative(emulated, reference):.2e} | {relative(reference, wide):.2e} | "
                          f"{relative(result, wide):.2e} | {mean_kl(float_logits[index], reference):.5f} | "
                          f"{mean_kl(float_logits[index], result):.5f} |", flush=True)
            layer_table(quantized, Path(scratch) / f"{cfg_name}-lowbit.onnx", windows[0], "FP8" in cfg_name)


if __name__ == "__main__":
    main()
