"""Evaluation: KL divergence to a reference model, sliding-window perplexity, model memory size, text tables.

    from lowbit.eval import divergence, format_table, model_size, perplexity
    ppl = perplexity(model, tokenizer, default_eval_text(), seq_len=256, stride=128)
    scores = divergence(quantized, float_model, tokenizer, default_eval_text())  # .mean_kl, .top1, ...
    save_topk_reference(float_model, tokenizer, default_eval_text(), "reference.safetensors", k=64)
    scores = divergence(quantized, "reference.safetensors", tokenizer, default_eval_text())
"""

from lowbit.eval.divergence import Divergence, divergence, opposite_order_pairs, token_kl
from lowbit.eval.perplexity import perplexity, sliding_windows
from lowbit.eval.size import model_size
from lowbit.eval.table import format_table
from lowbit.eval.topk import TopKReference, save_topk_reference, topk_kl_bounds

__all__ = [
    "Divergence", "TopKReference", "divergence", "format_table", "model_size", "opposite_order_pairs", "perplexity",
    "save_topk_reference", "sliding_windows", "token_kl", "topk_kl_bounds",
]
