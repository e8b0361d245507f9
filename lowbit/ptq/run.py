"""``lowbit ptq``'s run: load, calibrate, quantize, score against the float model, export, reload, report.

1. The plan (``lowbit.ptq.plan``) and the memory / time estimate (``lowbit.ptq.estimate``) from the model's
   skeleton on the meta device: printed, and all a ``--dry-run`` does.
2. Load the model and tokenizer; calibration batches: the bundled text or a .txt file cut in windows of
   ``--seq-len`` tokens, or a .jsonl file's records, each a sample, padded on the left (``lowbit.data``). The
   tokenizer is only read, so the export keeps its own padding side.
3. With ``--tasks ppl`` a float copy of the model is kept as the reference for KL (``lowbit.eval.divergence``).
4. Quantize (``lowbit.quantize``, without the layer-wise passes that only measure per-layer errors, which the
   report does not keep; or the layer-wise runner, or ``auto_quantize``: ``lowbit.ptq.runners``).
5. Score on the held-out text: mean per-token KL to the float model, its 99th percentile, top-1 agreement and
   perplexity beside the float model's; with a KV-cache format once more with the k/v quantizers off, so the
   report shows the KV cache's own share of the KL.
6. Export through ``lowbit.export`` (or lowbit's packed checkpoint), load it back and compare its logits on one
   calibration batch with the in-memory model's (``reload_difference``).
7. Print a table; write the JSON report (settings, plan, rows, measured against estimated memory and time)
   beside the export as ``<export-path>.ptq.json``, atomically.
"""

from __future__ import annotations

import copy
import gc
import json
import time
from pathlib import Path

import torch
from torch import nn

from lowbit.algorithms.layerwise import without_layer_errors
from lowbit.convert import disable_quantizer, enable_quantizer, quantize
from lowbit.data import calibration_batches, default_calibration_text, default_eval_text, make_forward_loop
from lowbit.data.padded import left_padded_batches
from lowbit.eval import divergence, format_table, perplexity
from lowbit.export import export
from lowbit.files import atomic_file
from lowbit.hf import load_causal_lm, save_quantized
from lowbit.ptq.estimate import estimate
from lowbit.ptq.memory import PeakMemory, return_large_frees
from lowbit.ptq.plan import Plan, plan
from lowbit.ptq.qformats import KV_QUANTIZERS, LOWBIT_EXPORT, ptq_config, with_search_precision
from lowbit.ptq.reload import check_reload, relative_difference, reload_export
from lowbit.ptq.runners import check_layerwise_runner, run_auto_quantize
from lowbit.ptq.settings import BUILTIN, PtqSettings, meta_model
from lowbit.report import packed_weight_bytes, run_context

EVAL_STRIDE_DIVISOR = 2  # windows overlap by half: every scored token has at least seq_len / 2 of context
MEGABYTE = 1e6


def report_path(export_path: Path) -> Path:
    """Where the JSON report goes: beside the export, ``<export-path>.ptq.json``."""
    return export_path.with_name(export_path.name + ".ptq.json")


def calibration_data(settings: PtqSettings, tokenizer) -> list[dict[str, torch.Tensor]]:
    """Windows of the bundled text / a .txt file, or a .jsonl file's records padded on the left."""
    if settings.calib_data.endswith(".jsonl"):
        return left_padded_batches(tokenizer, Path(settings.calib_data), settings.calib_size, settings.seq_len,
                                   settings.batch_size)
    text = default_calibration_text() if settings.calib_data == BUILTIN else Path(settings.calib_data)
    return calibration_batches(tokenizer, text, settings.calib_size, settings.seq_len, settings.batch_size)


def write_export(model: nn.Module, tokenizer, settings: PtqSettings) -> Path:
    """The export (atomic); ``lowbit`` is lowbit's packed checkpoint (the model is packed in place)."""
    if settings.export_format == LOWBIT_EXPORT:
        return save_quantized(model, tokenizer, settings.export_path, packed=True, overwrite=settings.overwrite)
    return export(model, settings.export_path, settings.export_format, tokenizer=tokenizer,
                  overwrite=settings.overwrite)


def score_rows(model: nn.Module, reference: nn.Module, tokenizer, settings: PtqSettings) -> list[dict]:
    """The float, quantized (and, with a KV format, KV-float) rows of the table."""
    window = {"seq_len": settings.seq_len, "stride": max(1, settings.seq_len // EVAL_STRIDE_DIVISOR),
              "max_tokens": settings.eval_tokens, "progress": settings.progress}
    text = default_eval_text()
    scores = divergence(model, reference, tokenizer, text, **window)
    rows = [{"model": "float", "kl": 0.0, "kl_p99": 0.0, "top1": 1.0, "perplexity": scores.reference_perplexity},
            _row(_quantized_name(settings), scores)]
    if settings.kv_qformat != "none":
        disable_quantizer(model, KV_QUANTIZERS)
        try:
            rows.append(_row(f"{settings.qformat} (KV cache float)", divergence(model, reference, tokenizer, text,
                                                                             **window)))
        finally:
            enable_quantizer(model, KV_QUANTIZERS)
    return rows


def _quantized_name(settings: PtqSettings) -> str:
    if settings.auto_quantize_bits is not None:
        return f"auto_quantize {settings.auto_quantize_bits} bits of {','.join(settings.quant)}"
    return f"{settings.qformat} + kv {settings.kv_qformat}"


def _row(name: str, scores) -> dict:
    return {"model": name, "kl": scores.mean_kl, "kl_p99": scores.kl_p99, "top1": scores.top1,
            "perplexity": scores.perplexity}


def _quantize(model: nn.Module, tokenizer, settings: PtqSettings, config: dict,
              batches: list[dict[str, torch.Tensor]]) -> dict:
    """Quantize in place by the runner the settings ask for; returns what the report records of it."""
    if settings.auto_quantize_bits is not None:
        return {"auto_quantize": run_auto_quantize(model, settings.auto_quantize_bits, settings.quant, batches)}
    with without_layer_errors():  # the report holds no per-layer errors: skip the passes that only measure them
        quantize(model, config, make_forward_loop(batches, progress=settings.progress))
    return {}


def run_ptq(settings: PtqSettings, argv: list[str]) -> dict:
    """The whole run (module docstring); returns the report it wrote."""
    config = with_search_precision(ptq_config(settings.qformat, settings.kv_qformat), settings.device)
    skeleton = meta_model(settings)  # imports the model's code: outside the measured span
    the_plan = plan(skeleton, config)
    the_plan.estimates = estimate(the_plan, skeleton, settings)
    print_plan(the_plan, settings)
    if settings.dry_run:
        return the_plan.as_dict()
    dtype = next(skeleton.parameters()).dtype
    del skeleton
    return_large_frees()
    if settings.low_memory_mode:
        return _run_layerwise(settings, config, the_plan, dtype, argv)
    peak = PeakMemory()
    peak.start()
    started = time.perf_counter()
    model, tokenizer = load_causal_lm(settings.model, dtype=dtype, device=settings.device,
                                      trust_remote_code=settings.trust_remote_code)
    batches = calibration_data(settings, tokenizer)
    reference = copy.deepcopy(model) if settings.evaluates else None
    seconds = {"load": time.perf_counter() - started}
    peak.phase("load")
    started = time.perf_counter()
    extra = _quantize(model, tokenizer, settings, config, batches) if "quant" in settings.tasks else {}
    _synchronize()
    seconds["quantize"] = time.perf_counter() - started
    peak.phase("quantize")
    rows = []
    if settings.evaluates and "quant" in settings.tasks:
        started = time.perf_counter()
        rows = score_rows(model, reference, tokenizer, settings)
        seconds["evaluate"] = time.perf_counter() - started
    elif settings.evaluates:
        rows = [{"model": "float", "perplexity": perplexity(model, tokenizer, default_eval_text(),
                                                            seq_len=settings.seq_len,
                                                            stride=max(1, settings.seq_len // 2),
                                                            max_tokens=settings.eval_tokens,
                                                            progress=settings.progress)}]
    peak.phase("evaluate")
    weight_bytes = packed_weight_bytes(model)
    quantization_difference = relative_difference(reference, model, batches[0]) if reference is not None else None
    del reference
    gc.collect()
    export_record = _export_and_reload(model, tokenizer, settings, batches[0], dtype, quantization_difference, peak)
    report = {
        **run_context(["lowbit", *argv]),
        "settings": _settings_record(settings),
        "plan": the_plan.as_dict(),
        "rows": rows,
        "weight_bytes_packed": weight_bytes,
        "export": export_record,
        "seconds": seconds,
        "measured": {"host_peak_bytes": peak.host_peak(), "gpu_peak_bytes": peak.gpu_peak(),
                     "host_method": peak.method, "calibration_seconds": seconds["quantize"],
                     **{f"{name}_phase_bytes": value for name, value in peak.phases.items()},
                     **{f"after_{name}_bytes": value for name, value in peak.after.items()}},
        **extra,
    }
    print(format_table(_display(rows)))
    print(_summary(report))
    if settings.exports:
        with atomic_file(report_path(settings.export_path), overwrite=True) as staging:
            staging.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return report


def _export_and_reload(model: nn.Module, tokenizer, settings: PtqSettings, batch: dict[str, torch.Tensor],
                       dtype: torch.dtype, quantization_difference: float | None, peak: PeakMemory) -> dict | None:
    """Export, load back, compare logits; RuntimeError when the reloaded model strays (``RELOAD_RTOL``)."""
    if not settings.exports:
        return None
    started = time.perf_counter()
    path = write_export(model, tokenizer, settings)
    seconds = {"write": time.perf_counter() - started}
    peak.phase("export")
    started = time.perf_counter()
    reloaded = reload_export(path, settings.export_format, settings.device, dtype)
    record = {"path": str(path), "format": settings.export_format,
              "bytes": sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()),
              "quantization_logits_difference": quantization_difference, "reloaded": reloaded is not None,
              "seconds": seconds}
    if reloaded is not None:
        record.update(check_reload(model, reloaded, batch))
        _synchronize()
        seconds["reload"] = time.perf_counter() - started
        peak.phase("reload")
    return record


def _run_layerwise(settings: PtqSettings, config: dict, the_plan: Plan, dtype: torch.dtype, argv: list[str]) -> dict:
    """``--low-memory-mode``: the layer-wise runner writes the packed checkpoint block by block; the export is
    then loaded back (packed, so smaller than the float model) and, with ``--tasks ppl``, its perplexity scored.
    No KL: the float reference would be the whole float model in memory, which this mode exists to avoid."""
    runner = check_layerwise_runner()
    peak = PeakMemory()
    peak.start()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(settings.model_directory, local_files_only=True,
                                              trust_remote_code=settings.trust_remote_code)
    started = time.perf_counter()
    batches = calibration_data(settings, tokenizer)
    result = runner(settings.model_directory, config, batches, settings.export_path, device=settings.device,
                    dtype=dtype, overwrite=settings.overwrite)
    tokenizer.save_pretrained(settings.export_path)
    seconds = {"quantize": time.perf_counter() - started}
    peak.phase("quantize")
    reloaded = reload_export(settings.export_path, LOWBIT_EXPORT, settings.device, dtype)
    with torch.no_grad():
        logits = reloaded(**{key: value.to(settings.device) for key, value in batches[0].items()}).logits
    rows = []
    if settings.evaluates:
        started = time.perf_counter()
        rows = [{"model": f"{settings.qformat} (layer-wise, reloaded)",
                 "perplexity": perplexity(reloaded, tokenizer, default_eval_text(), seq_len=settings.seq_len,
                                          stride=max(1, settings.seq_len // EVAL_STRIDE_DIVISOR),
                                          max_tokens=settings.eval_tokens, progress=settings.progress)}]
        seconds["evaluate"] = time.perf_counter() - started
    peak.phase("reload")
    path = settings.export_path
    report = {**run_context(["lowbit", *argv]), "settings": _settings_record(settings), "plan": the_plan.as_dict(),
              "rows": rows, "seconds": seconds,
              "layerwise": {"blocks": len(result.layers), "activation_bytes_on_disk": result.activation_bytes_on_disk,
                            "seconds": result.seconds},
              "export": {"path": str(path), "format": LOWBIT_EXPORT, "reloaded": True,
                         "bytes": sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()),
                         "reloaded_logits_finite": bool(torch.isfinite(logits).all())},
              "measured": {"host_peak_bytes": peak.host_peak(), "gpu_peak_bytes": peak.gpu_peak(),
                           "host_method": peak.method,
                           **{f"{name}_phase_bytes": value for name, value in peak.phases.items()}}}
    if rows:
        print(format_table(_display(rows)))
    with atomic_file(report_path(settings.export_path), overwrite=True) as staging:
        staging.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return report


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _settings_record(settings: PtqSettings) -> dict:
    return {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(settings).items()}


def _display(rows: list[dict]) -> list[dict]:
    def rounded(value, digits):
        return None if value is None else round(value, digits)

    return [{"model": r["model"], "KL": rounded(r.get("kl"), 5), "KL p99": rounded(r.get("kl_p99"), 4),
             "top-1 %": rounded(None if r.get("top1") is None else 100 * r["top1"], 2),
             "perplexity": rounded(r.get("perplexity"), 3)} for r in rows]


def _summary(report: dict) -> str:
    plan_record, measured = report["plan"], report["measured"]
    host = measured["host_peak_bytes"]
    estimated = plan_record["estimates"].get("host_peak_bytes")
    lines = [f"weights: {plan_record['bytes_before'] / MEGABYTE:.2f} MB -> {plan_record['bytes_after'] / MEGABYTE:.2f} "
             f"MB planned ({report['weight_bytes_packed'] / MEGABYTE:.2f} MB packed as quantized)"]
    if host is not None and estimated:
        lines.append(f"peak host memory: {host / MEGABYTE:.1f} MB measured, {estimated / MEGABYTE:.1f} MB estimated "
                     f"({host / estimated:.2f}x)")
    if report["export"] is not None:
        export_record = report["export"]
        difference = export_record.get("weights_difference")
        lines.append(f"exported {export_record['format']} to {export_record['path']} "
                     f"({export_record['bytes'] / MEGABYTE:.2f} MB)"
                     + ("; not loaded back (lowbit reads hf, compressed-tensors and lowbit)" if difference is None
                        else f"; reloaded: weights {difference:.2g}, static scales "
                             f"{export_record['amax_difference']:.2g} apart (relative)"))
    return "\n".join(lines)


def print_plan(the_plan: Plan, settings: PtqSettings) -> None:
    """The plan as text: rules and what they decide, what stays float and why, bytes, estimates."""
    lines = [f"plan for --qformat {settings.qformat} --kv-cache-qformat {settings.kv_qformat} "
             f"(algorithm {the_plan.algorithm}):"]
    for pattern, names in the_plan.rule_matches.items():
        lines.append(f"  rule {pattern!r}: {len(names)} quantizer(s), e.g. {', '.join(names[:2])}")
    quantized = the_plan.quantized
    formats = sorted({w.format for w in quantized})
    lines.append(f"  quantized: {len(quantized)} weight(s) in {', '.join(formats) or 'none'}")
    for weight in the_plan.left_float:
        lines.append(f"  float: {weight.name} {list(weight.shape)}: {weight.reason}")
    if the_plan.activations:
        kinds = sorted(set(the_plan.activations.values()))
        lines.append(f"  activations / KV: {len(the_plan.activations)} quantizer(s) in {', '.join(kinds)}")
    lines.append(f"  bytes: {the_plan.bytes_before:,d} -> {the_plan.bytes_after:,d} "
                 f"({the_plan.bytes_before / max(the_plan.bytes_after, 1):.2f}x smaller)")
    for key, value in the_plan.estimates.items():
        if key.endswith("bytes") and value is not None:
            lines.append(f"  estimated {key.removesuffix('_bytes').replace('_', ' ')}: {value / MEGABYTE:.1f} MB")
        elif key == "calibration_lower_bound_seconds":
            lines.append(f"  estimated calibration: at least {value:.1f} s (a lower bound: matmul FLOPs at the "
                         "measured matmul rate; searches, fake quantization and overheads not counted)")
    print("\n".join(lines))
