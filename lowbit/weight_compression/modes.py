"""Weight compression modes (NNCF's names) as lowbit quantizer attributes, and what each one stores.

A layer's weight is seen as ``(out, in)`` (Linear, Embedding rows, GPT-2 Conv1D transposed, Conv
flattened by its quantizer); a *group* is ``group_size`` consecutive inputs of one output channel
(``block_sizes={-1: group_size}``), and ``group_size=-1`` means one group per output channel (``axis=0``).

==========  ==============================================  =====================================
mode        quantizer attributes (lowbit formula)           stored per group
==========  ==============================================  =====================================
INT8_ASYM   ``num_bits=8, asymmetric=True``                 fp16 scale + uint8 zero point
INT8_SYM    ``num_bits=8, signed_scale=True``               fp16 signed scale (codes int8)
INT4_ASYM   ``num_bits=4, asymmetric=True``, range search   fp16 scale + uint4 zero point
INT4_SYM    ``num_bits=4, signed_scale=True``, range search fp16 signed scale (codes stored as uint4
                                                            with the fixed zero point 8)
NF4         ``num_bits=4`` block view, NF4 table rounding   fp16 scale (= max |w| of the group)
FP4         ``num_bits=(2, 1)`` (E2M1)                      fp16 scale
MXFP4       ``num_bits=(2, 1)``, OCP MX blocks of 32        E8M0 scale (8 bits), no float scale
FP8_E4M3    ``num_bits=(4, 3)``                             fp16 scale
==========  ==============================================  =====================================

Scales: the integer modes calibrate ``amin``/``amax`` per group (min / max, as NNCF); the float modes
``amax = max |w|``. The symmetric integer modes use NNCF's *signed scale*
(``lowbit.formats.quantize_int_signed_scale``): the group's weight of largest magnitude maps exactly onto
code ``-2**(b-1)`` whatever its sign (step ``max|w| / 8`` at 4 bits, negative when that weight is
positive), so the long end of the code range ``[-8, 7]`` always serves the larger side. The 4-bit
integer modes then search each group's range over ``m`` in ``SCALE_SEARCH`` (0.5 to 1 in steps of 1/32;
``m = 1`` is plain calibration, so the error never grows): ``[min, max]`` becomes ``m * [min, max]``
(``lowbit.weight_compression.range_search``) for the least squared weight error (INT4_ASYM) or the least
largest absolute error (INT4_SYM). Measured (``bench/gpt2_fixture.py``): the squared error shrinks GPT-2's
outlier weights too far (KL to the float model 1.4x NNCF's), the largest error keeps them and still
gains on the bundled Llama.
``E2M1`` is NNCF's earlier name of ``MXFP4``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from lowbit.attributes import QuantizerAttributeConfig


class CompressWeightsMode(str, Enum):
    """The format of compressed weights (values as NNCF's ``CompressWeightsMode``)."""

    INT8_SYM = "int8_sym"
    INT8_ASYM = "int8_asym"
    INT4_SYM = "int4_sym"
    INT4_ASYM = "int4_asym"
    NF4 = "nf4"
    FP4 = "fp4"
    MXFP4 = "mxfp4"
    E2M1 = "mxfp4"  # NNCF's earlier name of MXFP4 (an alias: same member)
    FP8_E4M3 = "fp8_e4m3"


class BackupMode(str, Enum):
    """The format of eligible layers left out of the primary mode, and of the first/last layers."""

    NONE = "none"
    INT8_SYM = "int8_sym"
    INT8_ASYM = "int8_asym"


INT8_MODES = (CompressWeightsMode.INT8_SYM, CompressWeightsMode.INT8_ASYM)
MX_BLOCK_SIZE = 32
DEFAULT_GROUP_SIZE = 128
SCALE_SEARCH = {"start_multiplier": 0.5, "stop_multiplier": 1.0, "num_steps": 17}
FLOAT_SCALE_BITS = 16  # fp16 scales, as NNCF stores them
MX_SCALE_BITS = 8  # E8M0

_NUM_BITS = {
    CompressWeightsMode.INT8_SYM: 8,
    CompressWeightsMode.INT8_ASYM: 8,
    CompressWeightsMode.INT4_SYM: 4,
    CompressWeightsMode.INT4_ASYM: 4,
    CompressWeightsMode.NF4: 4,
    CompressWeightsMode.FP4: (2, 1),
    CompressWeightsMode.MXFP4: (2, 1),
    CompressWeightsMode.FP8_E4M3: (4, 3),
}
_CODE_BITS = {8: 8, 4: 4, (2, 1): 4, (4, 3): 8}
ASYMMETRIC_MODES = (CompressWeightsMode.INT8_ASYM, CompressWeightsMode.INT4_ASYM)
SIGNED_SCALE_MODES = (CompressWeightsMode.INT8_SYM, CompressWeightsMode.INT4_SYM)
RANGE_SEARCH_OBJECTIVES = {CompressWeightsMode.INT4_ASYM: "squared", CompressWeightsMode.INT4_SYM: "max_abs"}


def default_group_size(mode: CompressWeightsMode) -> int:
    """-1 (per channel) for 8-bit integer modes, 32 for MXFP4, 128 otherwise (NNCF's defaults)."""
    if mode in INT8_MODES:
        return -1
    return MX_BLOCK_SIZE if mode == CompressWeightsMode.MXFP4 else DEFAULT_GROUP_SIZE


@dataclass(frozen=True)
class LayerFormat:
    """One layer's compressed format: a mode and its group size (-1: one group per output channel)."""

    mode: CompressWeightsMode
    group_size: int

    @property
    def label(self) -> str:
        """``int4_asym g128``, ``int8_asym per-channel``, ... (NNCF's mode names)."""
        grouping = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"{self.mode.value} {grouping}"

    @property
    def is_nf4(self) -> bool:
        return self.mode == CompressWeightsMode.NF4

    @property
    def range_objective(self) -> str | None:
        """The error the range search minimises for this mode (``range_search``), None: no search."""
        return RANGE_SEARCH_OBJECTIVES.get(self.mode)

    def attributes(self) -> QuantizerAttributeConfig:
        """The weight quantizer's attributes.

        NF4 is the int4 block view rounded to the NF4 codebook (``lowbit.formats.nf4``).
        """
        num_bits = _NUM_BITS[self.mode]
        if self.mode == CompressWeightsMode.MXFP4:
            return QuantizerAttributeConfig(
                num_bits=num_bits, block_sizes={-1: MX_BLOCK_SIZE, "type": "dynamic", "scale_bits": (8, 0)}
            )
        granularity = {"axis": 0} if self.group_size == -1 else {"block_sizes": {-1: self.group_size}}
        codebook = "nf4" if self.is_nf4 else None
        return QuantizerAttributeConfig(num_bits=num_bits, asymmetric=self.mode in ASYMMETRIC_MODES,
                                        signed_scale=self.mode in SIGNED_SCALE_MODES, codebook=codebook,
                                        **granularity)

    def storage_bits(self, out_features: int, in_features: int) -> int:
        """Bits to store an ``(out, in)`` weight: codes, plus each group's scale (and zero point).

        ``codes = out * in * code_bits``; per group a 16-bit scale (8-bit E8M0 for MXFP4) and, for
        asymmetric modes, a zero point of ``code_bits``.
        """
        code_bits = _CODE_BITS[_NUM_BITS[self.mode]]
        groups_per_row = 1 if self.group_size == -1 else in_features // self.group_size
        scale_bits = MX_SCALE_BITS if self.mode == CompressWeightsMode.MXFP4 else FLOAT_SCALE_BITS
        zero_point_bits = code_bits if self.mode in ASYMMETRIC_MODES else 0
        groups = out_features * groups_per_row
        return out_features * in_features * code_bits + groups * (scale_bits + zero_point_bits)


def backup_format(backup_mode: BackupMode) -> LayerFormat | None:
    """The per-channel 8-bit format of ``backup_mode``, or None (keep the float weight) for NONE."""
    if backup_mode == BackupMode.NONE:
        return None
    return LayerFormat(CompressWeightsMode(backup_mode.value), -1)
