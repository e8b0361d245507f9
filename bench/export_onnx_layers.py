"""Where onnxruntime and lowbit part on the bundled Llama's W8A8 ONNX exports: layer by layer.

Protocol (fixed: bundled Llama, float32, calibration = first 256 tokens of the calibration text, input = first
128 held-out tokens): quantize with the config, export with ``export_onnx``, then
1. run ``export_copy`` (the export's own math, ONNX's ``x / step`` and ``codes * step``, in torch) and record every
   quantized layer's input;
2. add each activation QuantizeLinear's input to the ONNX graph's outputs and run onnxruntime (CPU, default
   options) on the same tokens;
3. print, per quantized layer in model order (q/k/v and gate/up share one input), the relative L2 difference of
   the two inputs and the first token where they differ.

    python bench/export_onnx_layers.py [FP8_DEFAULT_CFG | INT8_DEFAULT_CFG]
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import torch

import lowbit
from lowbit.export import export_onnx
from lowbit.export.onnx_qdq import QDQLayer, export_copy


def layer_inputs(model, ids) -> list[tuple[str, torch.Tensor]]:
    """(layer name, input) of every QDQLayer of ``export_copy(model)``, shared inputs once, in call order."""
    seen: list[tuple[str, torch.Tensor]] = []
    copy_model = export_copy(model)[0]
    for name, module in copy_model.named_modules():
        if isinstance(module, QDQLayer):
            module.register_forward_hook(lambda m, args, out, name=name: seen.append((name, args[0].detach())))
    with torch.no_grad():
        copy_model(ids)
    unique = []
    for name, x in seen:
        if not unique or not (unique[-1][1].shape == x.shape and torch.equal(unique[-1][1], x)):
            unique.append((name, x))
    return unique


def onnxruntime_inputs(path: Path, ids) -> list[torch.Tensor]:
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path))
    names = [node.input[0] for node in proto.graph.node if node.op_type == "QuantizeLinear"]
    for name in names:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(a) for a in session.run(names, {"input_ids": ids.numpy()})]


def main() -> None:
    cfg_name = sys.argv[1] if len(sys.argv) > 1 else "FP8_DEFAULT_CFG"
    model, tokenizer = lowbit.assets.load_default_model()
    model.config.use_cache = False
    calibration = tokenizer(lowbit.assets.bundled_text("calibration")[:4000], return_tensors="pt").input_ids[:, :256]
    ids = tokenizer(lowbit.assets.bundled_text("heldout")[:1200], return_tensors="pt").input_ids[:, :128]
    quantized = lowbit.quantize(copy.deepcopy(model), copy.deepcopy(getattr(lowbit, cfg_name)),
                                lambda m: m(calibration))
    with tempfile.TemporaryDirectory() as scratch:
        path = export_onnx(quantized, {"input_ids": ids}, Path(scratch) / "model.onnx")
        ours, theirs = layer_inputs(quantized, ids), onnxruntime_inputs(path, ids)
    print(f"torch {torch.__version__}, {cfg_name}: {len(ours)} quantized-layer inputs\n")
    print("| layer (input of) | ORT vs export's math in torch, rel. L2 | first differing token |")
    print("|---|---|---|")
    for (name, x), y in zip(ours, theirs, strict=True):
        y = y.reshape(x.shape)
        differs = ((y - x).abs().reshape(-1, x.shape[-1]).amax(-1) > 0).nonzero()
        first = differs[0].item() if len(differs) else "-"
        print(f"| {name} | {((y - x).norm() / x.norm()).item():.2e} | {first} |")


if __name__ == "__main__":
    main()
