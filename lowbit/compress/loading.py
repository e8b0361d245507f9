"""init_quantized_weights(config): load a model with its Linear weights going straight to packed storage.

Fused MoE experts (3-D ``gate_up_proj`` / ``down_proj``, ``lowbit.modules.experts``) are packed per expert
the same way, one fused tensor (one layer's experts) dense at a time, and become compressed experts.

    with init_quantized_weights(lowbit.INT4_BLOCKWISE_WEIGHT_ONLY_CFG):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    # the quantized nn.Linear layers are CompressedLinear now

Inside the block two PyTorch registration hooks (public ``torch.nn.modules.module`` API) watch the
modules being built: the module hook records each submodule's name under its parent, the parameter hook
sees every weight assigned to an ``nn.Linear``. When a real (not meta) weight arrives for a Linear that
the config quantizes, its statistics are computed as the weight quantizer's calibration would (max
calibration row chunk by row chunk, other calibrators on the whole weight), it is packed a chunk of rows
at a time (float32 temporaries of 1 MB; on a GPU a 64th of a larger weight) into
storage allocated once, and replaced by a meta placeholder, so one dense weight at a time exists. On
leaving the block the placeholders become ``CompressedLinear`` modules whose dequantized weights equal
what ``compress(quantize(model, config))`` gives.

Peak memory is then the packed model plus one dense weight, given two settings inside the block:
transformers' asynchronous read-ahead is off (``HF_DEACTIVATE_ASYNC_LOAD``), and on the CPU glibc's heap gives
freed temporaries back after each weight (``malloc_trim``). On an accelerator (``device_map="cuda"``),
transformers first reserves what it expects the weights to take; give ``from_pretrained`` a
``quantization_config=LowbitConfig(config)`` instead of this block (``lowbit.compress.hf_quantizer``): the same
loader then runs inside transformers' own quantizer integration, which reserves the packed size.

Weight statistics need no data, so only configs calibrated by ``"max"`` (or no algorithm) are accepted;
activation quantizers that want calibrated scales quantize dynamically from each input (a warning says
so). Use the model after the ``with`` block.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

from lowbit.calibration import calibrate_weight
from lowbit.compress.experts import PackedExperts, install_packed_experts, pack_experts
from lowbit.compress.linear import CompressedLinear
from lowbit.compress.packed import SCALE_DTYPES, TENSOR_NAMES, PackedWeight, WeightFormat, quantize_weight, storage_spec
from lowbit.config import QuantizeConfig, parse_config
from lowbit.expert_quantizer import ExpertQuantizer
from lowbit.modules.experts import expert_projections, is_fused_experts
from lowbit.quantizer import TensorQuantizer

# transformers >= 5 reads tensors ahead in worker threads unless this is set; sequential loading lets
# each dense weight be packed and freed before the next is read.
HF_SEQUENTIAL_LOAD = "HF_DEACTIVATE_ASYNC_LOAD"


class _Loader:
    """The hooks' shared state: where each module sits, and the packed weights waiting for the exit."""

    def __init__(self, config: QuantizeConfig, scale_dtype: torch.dtype):
        self.config = config
        self.scale_dtype = scale_dtype
        self.parents: dict[int, tuple[nn.Module, str]] = {}
        self.packed: dict[int, tuple[nn.Module, PackedWeight]] = {}
        self.experts: dict[int, tuple[nn.Module, dict[str, PackedExperts]]] = {}  # fused experts, per projection
        self._hooks = []

    def attach(self) -> None:
        """Watch modules being built and parameters being assigned (PyTorch's global registration hooks)."""
        self._hooks = [register_module_module_registration_hook(self.on_module),
                       register_module_parameter_registration_hook(self.on_parameter)]

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def place(self, model: nn.Module) -> None:
        """Record where every module of an already built ``model`` sits (the module hook's record)."""
        for parent in model.modules():
            for name, child in parent.named_children():
                self.on_module(parent, name, child)

    def on_module(self, parent: nn.Module, name: str, child: nn.Module | None) -> None:
        if child is not None:
            self.parents[id(child)] = (parent, name)

    def full_name(self, module: nn.Module) -> str:
        parts = []
        while id(module) in self.parents:
            module, name = self.parents[id(module)]
            parts.append(name)
        return ".".join(reversed(parts))

    def attributes(self, module: nn.Module, slot: str):
        parents = tuple(cls.__name__ for cls in type(module).__mro__)
        return self.config.attributes_for(f"{self.full_name(module)}.{slot}", parents)

    def packed_attributes(self, module: nn.Module, name: str):
        """The weight quantizer attributes ``module``'s parameter ``name`` is packed with; None when it stays dense
        (not a Linear weight or fused expert projection, not quantized, or sequential as W4A8)."""
        if is_fused_experts(module) and name in expert_projections(module):
            slots = [self.attributes(module, f"{p}_weight_quantizer") for p in expert_projections(module)]
            if any(a is None or isinstance(a, list) for a in slots):
                return None  # both projections packed, one stage each, or neither: as quantize + compress leaves it
            return self.attributes(module, f"{name}_weight_quantizer")
        if name != "weight" or type(module) is not nn.Linear:
            return None
        attributes = self.attributes(module, "weight_quantizer")
        return None if attributes is None or isinstance(attributes, list) else attributes

    def packed_bytes(self, module: nn.Module, name: str) -> int | None:
        """Bytes ``module``'s parameter ``name`` takes once packed (``storage_spec``); None when it stays dense."""
        attributes = self.packed_attributes(module, name)
        if attributes is None:
            return None
        shape = tuple(getattr(module, name).shape)
        if len(shape) == 2:
            return _storage_bytes(attributes, shape, self.scale_dtype)
        per_expert = shape[:0:-1] if module.is_transposed else shape[1:]  # each expert packs its (out, in) view
        return module.num_experts * _storage_bytes(attributes, per_expert, self.scale_dtype)

    def on_parameter(self, module: nn.Module, name: str, param: nn.Parameter | None):
        """The parameter hook: a real weight assigned to a module of the model being built is packed."""
        if param is None or param.device.type == "meta" or id(module) not in self.parents:
            return None  # (no place yet: nn.Linear.__init__'s own uninitialised weight)
        return self.pack(module, name, param.detach())

    def pack(self, module: nn.Module, name: str, weight: torch.Tensor) -> nn.Parameter | None:
        """Pack ``weight`` as ``module``'s ``name`` when the config quantizes it, and return the meta placeholder
        that takes its place until ``finish``; None when it stays dense. A fused (E, out, in) expert weight is
        packed per expert (``lowbit.compress.experts``)."""
        attributes = self.packed_attributes(module, name)
        if attributes is None:
            return None
        if weight.dim() == 3:
            quantizer = ExpertQuantizer(attributes, module.num_experts)
            view = weight.transpose(-1, -2) if module.is_transposed else weight
            calibrate_weight(quantizer.to(weight.device), view)
            self.experts.setdefault(id(module), (module, {}))[1][name] = pack_experts(view, quantizer, self.scale_dtype)
        else:
            fmt = WeightFormat.from_config(attributes, tuple(weight.shape))
            amin, amax = _weight_statistics(attributes, fmt, weight)
            self.packed[id(module)] = (module, _quantize_rows(weight, fmt, amin, amax, self.scale_dtype))
            if weight.device.type == "cpu":
                return_freed_host_memory()
        return nn.Parameter(torch.empty(weight.shape, dtype=weight.dtype, device="meta"), requires_grad=False)

    def quantizer(self, module: nn.Module, slot: str) -> TensorQuantizer:
        attributes = self.attributes(module, slot)
        if attributes is None or isinstance(attributes, list):
            quantizer = TensorQuantizer()
            quantizer.disable()
            return quantizer
        return TensorQuantizer(attributes)

    def finish(self) -> None:
        for module, packed in self.experts.values():
            if set(packed) != set(expert_projections(module)):
                raise ValueError(f"init_quantized_weights: {type(module).__name__} got only {sorted(packed)} packed")
            inputs = {p: self.quantizer(module, f"{p}_input_quantizer") for p in packed}
            install_packed_experts(module, type(module), packed, inputs, self.scale_dtype)
        if not self.packed and not self.experts:
            warnings.warn(
                "init_quantized_weights packed no weight: none was assigned to a quantized nn.Linear inside the "
                "block (load_state_dict copies into existing tensors unless assign=True)",
                stacklevel=3,
            )
        uncalibrated = 0
        for module, packed in self.packed.values():
            if id(module) not in self.parents:
                raise ValueError("init_quantized_weights: a packed nn.Linear belongs to no model built in the block")
            input_quantizer = self.quantizer(module, "input_quantizer")
            uncalibrated += input_quantizer.needs_calibration
            compressed = CompressedLinear.from_packed(
                packed, module.bias, input_quantizer, self.quantizer(module, "output_quantizer")
            )
            parent, name = self.parents[id(module)]
            setattr(parent, name, compressed.to(packed.codes.device))
        if uncalibrated:
            warnings.warn(
                f"{uncalibrated} input quantizer(s) want calibrated scales, which loading cannot provide; "
                "they quantize dynamically from each input",
                stacklevel=3,
            )


def _storage_bytes(attributes, shape: tuple[int, int], scale_dtype: torch.dtype) -> int:
    spec = storage_spec(WeightFormat.from_config(attributes, shape), shape, scale_dtype)
    return sum(math.prod(size) * dtype.itemsize for size, dtype in spec.values())


def return_freed_host_memory() -> None:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim``; elsewhere nothing).

    Each chunk's float32 temporaries are a few MB: glibc serves them from its heap, between the small
    packed tensors that stay, and keeps the freed pages, so without this the resident memory grows with
    the temporaries of every weight loaded (measured: a peak of 1.5-2.2x the packed model on a 300M Llama).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


# Elements per chunk of rows: float32 temporaries of 1 MB. Smaller chunks cost far more time in per-call
# overhead than they save (on the CPU 2**16 was 3x slower for the same peak on a 1.1B Llama). On the CPU the
# size is fixed, so glibc's heap reuses the freed temporaries; on accelerators a weight larger than 64
# chunks gets 64 larger ones (kernel launches stay few; the transient stays a fraction of the dense weight).
CHUNK_ELEMENTS = 1 << 18
DEVICE_CHUNKS_PER_WEIGHT = 64


def _row_chunks(weight: torch.Tensor) -> list[slice]:
    elements = CHUNK_ELEMENTS
    if weight.device.type != "cpu":
        elements = max(elements, weight.numel() // DEVICE_CHUNKS_PER_WEIGHT)
    rows = max(1, elements // weight.shape[1])
    return [slice(start, start + rows) for start in range(0, weight.shape[0], rows)]


def _weight_statistics(attributes, fmt: WeightFormat, weight: torch.Tensor):
    """(amin, amax) as the weight quantizer's calibration computes them, without a float32 copy of the
    whole weight for the max calibrator: per row chunk, then combined (max of maxima per tensor)."""
    if attributes.is_dynamic and fmt.kind != "nvfp4":
        return None, None
    method = attributes.calibrator["method"] if isinstance(attributes.calibrator, dict) else attributes.calibrator
    if method != "max":  # other calibrators see the whole weight, as lowbit.quantize gives it to them
        quantizer = TensorQuantizer(attributes).to(weight.device)
        quantizer.enable_calib()
        quantizer.disable_quant()
        quantizer(weight)
        quantizer.load_calib_amax()
        return quantizer.amin, None if quantizer.amax is None else quantizer.amax.detach()
    per_row = fmt.kind != "nvfp4" and (fmt.block_size is not None or fmt.per_channel)
    lows, highs = [], []
    for rows in _row_chunks(weight):
        chunk = weight[rows].float()
        view = chunk.unflatten(1, (-1, fmt.block_size)) if per_row and fmt.block_size else chunk
        dims = (-1,) if per_row else tuple(range(view.dim()))
        magnitude = view if fmt.keeps_amin else view.abs()
        highs.append(magnitude.amax(dim=dims, keepdim=True))
        lows.append(view.amin(dim=dims, keepdim=True) if fmt.keeps_amin else None)
    if per_row:
        return (torch.cat(lows) if fmt.keeps_amin else None), torch.cat(highs)
    amax = torch.stack(highs).amax(dim=0)
    return (torch.stack(lows).amin(dim=0) if fmt.keeps_amin else None), amax


def _quantize_rows(weight: torch.Tensor, fmt: WeightFormat, amin, amax, scale_dtype) -> PackedWeight:
    """``quantize_weight`` chunk by chunk of rows (every format is row-wise given its statistics), each
    chunk's codes and scales written into storage allocated once for the whole weight."""
    per_row = fmt.kind != "nvfp4" and (fmt.block_size is not None or fmt.per_channel)
    spec = storage_spec(fmt, tuple(weight.shape), scale_dtype)
    storage = {name: torch.empty(shape, dtype=dtype, device=weight.device) for name, (shape, dtype) in spec.items()}
    for rows in _row_chunks(weight):
        low = amin[rows] if per_row and amin is not None else amin
        high = amax[rows] if per_row and amax is not None else amax
        part = quantize_weight(weight[rows], fmt, amax=high, amin=low, scale_dtype=scale_dtype)
        for name, tensor in part.tensors().items():
            shared = tensor.dim() == 0 or (name == "scale" and fmt.block_size is None and not fmt.per_channel)
            target = storage[name] if shared else storage[name][rows]
            target.copy_(tensor)
    return PackedWeight(fmt, tuple(weight.shape), **{name: storage.get(name) for name in TENSOR_NAMES})


def packing_loader(config: dict | QuantizeConfig, scale_dtype: torch.dtype = torch.float32) -> _Loader:
    """The loader for ``config`` after checking that weights alone can calibrate it (no data while loading)."""
    config = parse_config(config)
    if config.algorithm not in (None, "max"):
        raise ValueError(
            f"algorithm={config.algorithm!r} needs calibration data; init_quantized_weights packs weights as they "
            "load, from the weights alone: use algorithm 'max' or None, or quantize + compress after loading"
        )
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype={scale_dtype}: allowed are {list(SCALE_DTYPES)}")
    return _Loader(config, scale_dtype)


@contextmanager
def init_quantized_weights(config: dict | QuantizeConfig, scale_dtype: torch.dtype = torch.float32) -> Iterator[None]:
    """Pack every quantized ``nn.Linear`` weight as it is loaded (see the module docstring)."""
    loader = packing_loader(config, scale_dtype)
    loader.attach()
    async_load = os.environ.get(HF_SEQUENTIAL_LOAD)
    os.environ[HF_SEQUENTIAL_LOAD] = "1"
    try:
        yield
    finally:
        loader.detach()
        if async_load is None:
            del os.environ[HF_SEQUENTIAL_LOAD]
        else:
            os.environ[HF_SEQUENTIAL_LOAD] = async_load
    loader.finish()
