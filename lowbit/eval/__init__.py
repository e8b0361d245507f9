"""Evaluation: sliding-window perplexity, model memory size, and text tables for reports.

    from lowbit.eval import format_table, model_size, perplexity
    ppl = perplexity(model, tokenizer, default_eval_text(), seq_len=256, stride=128)
"""

from lowbit.eval.perplexity import perplexity, sliding_windows
from lowbit.eval.size import model_size
from lowbit.eval.table import format_table

__all__ = ["format_table", "model_size", "perplexity", "sliding_windows"]
