"""``lowbit ptq`` (ModelOpt's hf_ptq workflow) and ``lowbit.plan``: the qformat names (``qformats``), the plan of
a quantization before any weight is touched (``plan``), its memory and time estimate (``estimate``) and the
measured peaks (``memory``), the validated settings (``settings``), the run (``run``) and its parser (``cli``)."""

from lowbit.ptq.plan import Plan, WeightPlan, plan
from lowbit.ptq.qformats import KV_QFORMATS, QFORMATS, ptq_config

__all__ = ["KV_QFORMATS", "Plan", "QFORMATS", "WeightPlan", "plan", "ptq_config"]
