"""QuantizerAttributeConfig: what one TensorQuantizer does, validated once at the door.

The attribute names are ModelOpt's, so a ModelOpt ``quant_cfg`` entry works unchanged:

- ``num_bits``: an int 2..8 (integer grid) or ``(exponent_bits, mantissa_bits)`` in
  ``{(4, 3), (5, 2), (2, 1)}`` (FP8 E4M3, FP8 E5M2, FP4 E2M1).
- ``axis``: the axis (or axes) kept when reducing |x| to ``amax``: ``None`` is per-tensor,
  ``0`` on a Linear weight ``(out, in)`` is per output channel.
- ``block_sizes``: ``{axis: size, ...}`` splits those axes into blocks, one ``amax`` per block.
  ``size=None`` means the whole axis (``{-1: None}`` is per-token for activations).
  Extra keys: ``"type": "static" | "dynamic"`` (dynamic computes the scales from each input) and
  ``"scale_bits": (4, 3) | (8, 0)``: the block scale's own format (E4M3 gives NVFP4 with
  ``num_bits=(2, 1)`` and block 16; E8M0 gives the OCP MX formats with block 32).
- ``unsigned``, ``narrow_range``: the integer code range (see ``lowbit.formats.int_range``).
- ``asymmetric``: integer codes with a zero point, from running min/max (lowbit's addition).
- ``signed_scale``: symmetric integer codes whose scale takes the sign of the larger end of the running
  min/max, so that end maps exactly onto ``-2**(b-1)`` (NNCF's symmetric INT4/INT8, llama.cpp's Q4_0;
  ``lowbit.formats.quantize_int_signed_scale``); calibrator ``max`` only (lowbit's addition).
- ``calibrator``: ``"max" | "percentile" | "mse" | "entropy"`` or a dict with its options.
- ``learn_amax``: ``amax`` becomes a trainable parameter (clip-aware straight-through gradient).
- ``codebook``: the name of a codebook format (``lowbit.formats.register_codebook``; ``"nf4"`` built in): the
  integer block view rounds to the nearest of its levels times ``amax`` instead of the integer grid.

Types are checked strictly (:func:`check_type`): the switches are bools (not ``"yes"``, not ``1``), sizes, axes and
bit widths are ints (not floats, not bools), float formats are pairs of ints (a tuple or a list). Every error names
the attribute, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lowbit.calib.calibrators import make_calibrator
from lowbit.formats.codebook import codebook_levels

FLOAT_BITS = {(4, 3): "e4m3", (5, 2): "e5m2", (2, 1): "e2m1"}
BLOCK_SCALE_BITS = {(4, 3): "e4m3", (8, 0): "e8m0"}
BLOCK_SPECIAL_KEYS = ("type", "scale_bits", "scale_block_sizes")
CALIBRATORS = ("max", "percentile", "mse", "entropy")
PER_TENSOR_CALIBRATORS = ("percentile", "entropy")  # histogram calibrators: one amax per tensor
HIGH_PRECISION_DTYPES = ("Half", "BFloat16", "Float")
FLAGS = ("unsigned", "narrow_range", "asymmetric", "signed_scale", "enable", "fake_quant", "learn_amax")
TYPE_NAMES = {bool: "True or False", int: "an int", float: "a number", str: "a string", dict: "a dict"}


def is_int(value: Any) -> bool:
    """An int that is not a bool (``isinstance(True, int)`` holds in Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_type(name: str, value: Any, expected: type) -> Any:
    """``value`` unchanged when it has the ``expected`` type, else TypeError naming ``name``, the value and the type.

    Strict where Python is loose: a bool is neither an int nor a number, a float is not an int, and an int
    is a number (``float``).
    """
    if expected is int:
        ok = is_int(value)
    elif expected is float:
        ok = is_int(value) or isinstance(value, float)
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise TypeError(f"{name}={value!r}: expected {TYPE_NAMES[expected]}, got {type(value).__name__}")
    return value


def _int_pair(value: Any) -> tuple[int, int] | None:
    """``(a, b)`` from a 2-tuple or 2-list of ints, else None."""
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(is_int(v) for v in value):
        return int(value[0]), int(value[1])
    return None


def _as_bits(value: Any, name: str) -> int | tuple[int, int]:
    allowed = f"expected an int 2..8 or a pair (exponent_bits, mantissa_bits) in {sorted(FLOAT_BITS)}"
    if is_int(value):
        if not 2 <= value <= 8:
            raise ValueError(f"{name}={value}: integer bit width must be in 2..8")
        return value
    bits = _int_pair(value)
    if bits is None:
        raise TypeError(f"{name}={value!r}: {allowed}")
    if bits not in FLOAT_BITS:
        raise ValueError(f"{name}={value!r}: float formats allowed are {sorted(FLOAT_BITS)}")
    return bits


def _as_axis(axis: Any) -> int | tuple[int, ...] | None:
    if axis is None or is_int(axis):
        return axis
    if isinstance(axis, (tuple, list)) and axis and all(is_int(a) for a in axis):
        return tuple(axis)
    raise TypeError(f"axis={axis!r}: expected None, an int or a non-empty tuple of ints")


def _check_block_sizes(block_sizes: dict | None) -> dict | None:
    if block_sizes is None:
        return None
    if not isinstance(block_sizes, dict):
        raise TypeError(f"block_sizes={block_sizes!r}: expected a dict such as {{-1: 128}}")
    out: dict = {}
    for key, value in block_sizes.items():
        if key == "type":
            if value not in ("static", "dynamic"):
                raise ValueError(f"block_sizes['type']={value!r}: allowed are 'static', 'dynamic'")
        elif key == "scale_bits":
            if value is not None and _int_pair(value) not in BLOCK_SCALE_BITS:
                raise ValueError(
                    f"block_sizes['scale_bits']={value!r}: allowed are {sorted(BLOCK_SCALE_BITS)} or None"
                )
            value = None if value is None else _int_pair(value)
        elif key == "scale_block_sizes":
            # accepted for ModelOpt compatibility; lowbit keeps block scales unquantized twice
            if value is not None and not isinstance(value, dict):
                raise TypeError(f"block_sizes['scale_block_sizes']={value!r}: expected a dict or None")
        elif is_int(key):
            if value is not None and not is_int(value):
                raise TypeError(f"block_sizes[{key}]={value!r}: a block size must be a positive int or None")
            if value is not None and value < 1:
                raise ValueError(f"block_sizes[{key}]={value!r}: a block size must be a positive int or None")
        else:
            raise ValueError(
                f"block_sizes key {key!r}: allowed are integer axes and {list(BLOCK_SPECIAL_KEYS)}"
            )
        out[key] = value
    if not any(is_int(k) for k in out):
        raise ValueError(f"block_sizes={block_sizes!r}: name at least one axis, e.g. {{-1: 128}}")
    return out


def _check_calibrator(calibrator: Any, num_bits: int | tuple[int, int], unsigned: bool) -> None:
    """Build the calibrator once, unused, so its method, option names and option values are checked now."""
    def identity(x, amax):
        return x

    try:
        make_calibrator(calibrator, None, identity, num_bits, unsigned)
    except (TypeError, ValueError) as error:
        raise type(error)(f"calibrator={calibrator!r}: {error}; methods are {list(CALIBRATORS)}") from None


@dataclass(frozen=True)
class QuantizerAttributeConfig:
    """Attributes of one TensorQuantizer (see the module docstring for each field's meaning)."""

    num_bits: int | tuple[int, int] = 8
    axis: int | tuple[int, ...] | None = None
    block_sizes: dict | None = None
    unsigned: bool = False
    narrow_range: bool = False
    asymmetric: bool = False
    signed_scale: bool = False
    enable: bool = True
    fake_quant: bool = True
    calibrator: str | dict = "max"
    learn_amax: bool = False
    trt_high_precision_dtype: str = "Half"
    codebook: str | None = None
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_bits", _as_bits(self.num_bits, "num_bits"))
        object.__setattr__(self, "block_sizes", _check_block_sizes(self.block_sizes))
        object.__setattr__(self, "axis", _as_axis(self.axis))
        for flag in FLAGS:
            check_type(flag, getattr(self, flag), bool)
        if self.axis is not None and self.block_sizes is not None:
            raise ValueError(
                f"axis={self.axis!r} and block_sizes={self.block_sizes!r}: give one granularity, not both")
        _check_calibrator(self.calibrator, self.num_bits, self.unsigned)
        method = self.calibrator["method"] if isinstance(self.calibrator, dict) else self.calibrator
        per_tensor = self.axis is None and (not self.block_axes or self.block_scale_bits == (4, 3))
        if method in PER_TENSOR_CALIBRATORS and not per_tensor and not self.is_dynamic:
            raise ValueError(
                f"calibrator={self.calibrator!r} is per-tensor only, but axis={self.axis!r}, "
                f"block_sizes={self.block_sizes!r}: use 'max' or 'mse' for per-channel or per-block amax")
        check_type("trt_high_precision_dtype", self.trt_high_precision_dtype, str)
        if self.trt_high_precision_dtype not in HIGH_PRECISION_DTYPES:
            raise ValueError(
                f"trt_high_precision_dtype={self.trt_high_precision_dtype!r}: allowed are "
                f"{list(HIGH_PRECISION_DTYPES)}"
            )
        if self.codebook is not None:
            self._check_codebook()
        if not self.fake_quant:
            raise ValueError("fake_quant=False: real low-bit storage is lowbit.compress(model), not an attribute")
        if self.is_float and (self.unsigned or self.narrow_range or self.asymmetric):
            raise ValueError(
                f"num_bits={self.num_bits}: unsigned / narrow_range / asymmetric apply to integer formats only"
            )
        if self.asymmetric and (self.unsigned or self.narrow_range):
            raise ValueError("asymmetric=True already chooses the code range; drop unsigned / narrow_range")
        if self.signed_scale and (self.is_float or self.asymmetric or self.unsigned or self.narrow_range
                                  or method != "max" or self.learn_amax or self.codebook is not None):
            raise ValueError(
                f"signed_scale=True is a symmetric integer grid calibrated by 'max': got num_bits={self.num_bits}, "
                f"asymmetric={self.asymmetric}, unsigned={self.unsigned}, narrow_range={self.narrow_range}, "
                f"calibrator={self.calibrator!r}, learn_amax={self.learn_amax}, codebook={self.codebook!r}"
            )
        scale_bits = self.block_scale_bits
        if scale_bits is not None:
            size = self.block_sizes.get(-1)
            if (-1 not in self.block_sizes) or len(self.block_axes) != 1:
                raise ValueError(
                    f"block_sizes={self.block_sizes!r}: scale_bits needs exactly one block axis, -1"
                )
            if scale_bits == (4, 3) and (self.num_bits != (2, 1) or size != 16):
                raise ValueError(
                    f"scale_bits=(4, 3) is NVFP4: needs num_bits=(2, 1) and block_sizes={{-1: 16}}, got "
                    f"num_bits={self.num_bits}, block size {size}"
                )
            if scale_bits == (8, 0) and (not self.is_float or size != 32):
                raise ValueError(
                    f"scale_bits=(8, 0) is OCP MX: needs a float num_bits and block_sizes={{-1: 32}}, got "
                    f"num_bits={self.num_bits}, block size {size}"
                )

    def _check_codebook(self) -> None:
        if not isinstance(self.codebook, str):
            raise TypeError(f"codebook={self.codebook!r}: expected a registered codebook name or None")
        levels = codebook_levels(self.codebook)
        if self.is_float or self.asymmetric or self.unsigned or self.block_scale_bits is not None:
            raise ValueError(f"codebook={self.codebook!r} rounds an integer symmetric block view: drop float "
                             "num_bits, asymmetric, unsigned and scale_bits")
        if len(levels) > 2**self.num_bits:
            raise ValueError(f"codebook={self.codebook!r} has {len(levels)} levels; num_bits={self.num_bits} "
                             f"holds {2**self.num_bits}")

    @classmethod
    def from_dict(cls, attributes: dict) -> QuantizerAttributeConfig:
        """Build from a ModelOpt-style dict, naming any unknown key."""
        allowed = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = set(attributes) - allowed - {"type"}
        if unknown:
            raise ValueError(f"unknown quantizer attribute(s) {sorted(unknown)}; allowed are {sorted(allowed)}")
        attributes = {k: v for k, v in attributes.items() if k != "type"}
        return cls(**attributes)

    def to_dict(self) -> dict:
        """JSON-ready attributes (tuples become lists, integer dict keys stay ints)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        if out["codebook"] is None:  # written only when set: files of integer and float formats stay as they were
            del out["codebook"]
        if not out["signed_scale"]:  # likewise
            del out["signed_scale"]
        return out

    @property
    def is_float(self) -> bool:
        return isinstance(self.num_bits, tuple)

    @property
    def keeps_amin(self) -> bool:
        """The calibrated range is ``[amin, amax]`` (asymmetric and signed-scale grids), not ``amax`` alone."""
        return self.asymmetric or self.signed_scale

    @property
    def block_axes(self) -> dict[int, int | None]:
        return {k: v for k, v in (self.block_sizes or {}).items() if isinstance(k, int)}

    @property
    def block_scale_bits(self) -> tuple[int, int] | None:
        return (self.block_sizes or {}).get("scale_bits")

    @property
    def is_dynamic(self) -> bool:
        """True when every scale comes from each input, so calibration has nothing to collect.

        MX formats and ``type: dynamic`` blocks are dynamic; NVFP4's block scales are dynamic too,
        but its FP32 global scale comes from a calibrated per-tensor ``amax``.
        """
        if self.block_scale_bits == (8, 0):
            return True
        return (self.block_sizes or {}).get("type") == "dynamic" and self.block_scale_bits is None

    @property
    def format_name(self) -> str:
        """Short human name: int8, int4-asym, e4m3, nvfp4, mxfp4, mxfp8 ..."""
        if self.codebook is not None:
            return self.codebook
        scale_bits = self.block_scale_bits
        if scale_bits == (4, 3):
            return "nvfp4"
        if scale_bits == (8, 0):
            return "mxfp4" if self.num_bits == (2, 1) else f"mx{FLOAT_BITS[self.num_bits]}"
        if self.is_float:
            return FLOAT_BITS[self.num_bits]
        suffix = "-asym" if self.asymmetric else ("-unsigned" if self.unsigned else "")
        return f"int{self.num_bits}{suffix}"

    @property
    def granularity(self) -> str:
        if self.block_sizes is not None:
            sizes = ",".join(f"{k}:{v}" for k, v in self.block_axes.items())
            kind = (self.block_sizes or {}).get("type", "static")
            return f"block[{sizes}] {kind}"
        if self.axis is None:
            return "per-tensor"
        return f"per-channel axis={self.axis}"
