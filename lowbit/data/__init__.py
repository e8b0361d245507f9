"""Calibration data: token windows of text, the forward loop that feeds them, and bundled texts.

    from lowbit.data import calibration_batches, default_calibration_text, make_forward_loop
    batches = calibration_batches(tokenizer, default_calibration_text(), num_samples=128, seq_len=256)
    lowbit.quantize(model, config, make_forward_loop(batches))
"""

from lowbit.data.calibration import calibration_batches, make_forward_loop, module_device, token_stream
from lowbit.data.padded import left_padded_batches
from lowbit.data.texts import default_calibration_text, default_eval_text, read_texts

__all__ = [
    "calibration_batches", "default_calibration_text", "default_eval_text", "left_padded_batches", "make_forward_loop",
    "module_device", "read_texts", "token_stream",
]
