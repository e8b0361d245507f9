"""Train lowbit's default language model: a small Llama on public-domain English.

Corpus     : the train split of ``tools/fetch_corpus.py`` (Austen, Melville, the King James Bible,
             Shakespeare, Bierce, the Jargon File; ~15.5 MB), tokenized by ``tools/train_tokenizer.py``
             into ``.carry/corpus/train.npy`` (~4.6 M tokens) and ``validation.npy`` (~79 k tokens).
             The held-out split is not on the training machine.
Tokenizer  : byte-level BPE, vocabulary 4096 (``lowbit/assets/default_model/tokenizer.json``).
Model      : ``LlamaForCausalLM``, hidden 256, 8 layers, 4 attention heads (head dim 64), 2 key-value
             heads, MLP 768, vocabulary 4096, 512 positions, untied embeddings: 8 392 960 parameters.
             Every Linear's in_features (256 or 768) is a multiple of 128.
Training   : plain PyTorch loop, seed 0; batches of 64 random windows of 256 tokens (+1 target) drawn
             with a seeded torch.Generator; AdamW (betas 0.9/0.95, weight decay 0.1 on matrices and
             embeddings, none on norms), peak lr 2e-3, 100 warm-up steps then cosine to 10 % of peak,
             gradient clipping at 1.0, bf16 autocast over fp32 weights. Because the corpus is small the
             script sweeps the length of training (``--epochs``, one full cosine run each, shortest
             first, skipping a run that would not finish inside ``--time-budget-s``) and keeps the
             run with the lowest validation loss (mean next-token NLL over non-overlapping 256-token
             windows of the validation split).
Output     : the kept model in bf16, ``save_pretrained(out, max_shard_size="14MB",
             safe_serialization=True)`` (two shards, ~16.8 MB), and ``training_log.json`` beside that
             folder (every run's validation loss, time and throughput).
Command    : on the lent GPU (recorded run: one H200, torch 2.11, transformers 5.17), from the repository root:
             python3 tools/train_default_model.py --tokens .carry/corpus --out $OUT/default_model --time-budget-s 420
             then copy the files into lowbit/assets/default_model/ (next to the tokenizer) and run
             ``python tools/evaluate_default_model.py`` on CPU for the recorded figures.
Expected   : ~5 minutes in all on an H200 (~0.6 M tokens/s; the 32-epoch run is skipped by the budget);
             the kept run is 8 epochs with validation loss 3.507 nats (ppl 33.3); 16 epochs overfits
             (3.93). Held-out perplexity 32.2 against 738 for a unigram model: lowbit/assets/README.md.
             Smoke test on CPU: ``--device cpu --epochs 0.002 --batch-size 4 --out /tmp/smoke/default_model``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, PreTrainedModel

SEQ_LEN = 256


def default_model_config() -> LlamaConfig:
    """The architecture of lowbit's default model (token ids match tools/train_tokenizer.py)."""
    return LlamaConfig(
        hidden_size=256,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=768,
        vocab_size=4096,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )


@dataclass(frozen=True)
class RunConfig:
    """Hyper-parameters of one training run; ``epochs`` counts passes over the train tokens."""

    epochs: float
    batch_size: int = 64
    peak_lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0


def learning_rate(step: int, total_steps: int, run: RunConfig) -> float:
    """Linear warm-up to ``peak_lr``, then cosine decay to ``min_lr_ratio * peak_lr`` at ``total_steps``."""
    if step < run.warmup_steps:
        return run.peak_lr * (step + 1) / run.warmup_steps
    progress = min(1.0, (step - run.warmup_steps) / max(1, total_steps - run.warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return run.peak_lr * (run.min_lr_ratio + (1.0 - run.min_lr_ratio) * cosine)


def sample_batch(tokens: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` random windows of ``SEQ_LEN + 1`` tokens, shape (batch, SEQ_LEN + 1), int64."""
    starts = torch.randint(0, len(tokens) - SEQ_LEN - 1, (batch_size,), generator=generator,
                           device=tokens.device)
    return tokens[starts[:, None] + torch.arange(SEQ_LEN + 1, device=tokens.device)].long()


def next_token_loss(model: PreTrainedModel, windows: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting ``windows[:, 1:]`` from ``windows[:, :-1]``."""
    logits = model(input_ids=windows[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))


@torch.no_grad()
def validation_loss(model: PreTrainedModel, tokens: torch.Tensor, batch_size: int = 64) -> float:
    """Mean next-token NLL (nats) over non-overlapping ``SEQ_LEN + 1``-token windows of ``tokens``."""
    model.eval()
    count = (len(tokens) - 1) // SEQ_LEN
    windows = torch.stack([tokens[i * SEQ_LEN : i * SEQ_LEN + SEQ_LEN + 1] for i in range(count)]).long()
    total = 0.0
    for batch in windows.split(batch_size):
        with torch.autocast(tokens.device.type, dtype=torch.bfloat16):
            total += next_token_loss(model, batch).item() * len(batch)
    model.train()
    return total / count


def make_optimizer(model: PreTrainedModel, run: RunConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings (ndim >= 2) and none on norm weights."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": run.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=run.peak_lr, betas=(0.9, 0.95), fused=fused)


def train_run(run: RunConfig, train_tokens: torch.Tensor, valid_tokens: torch.Tensor,
              model_config: PretrainedConfig | None = None) -> tuple:
    """Train one model (``model_config``, default :func:`default_model_config`) from scratch; returns
    (model, log dict with validation loss and timings)."""
    device = train_tokens.device
    torch.manual_seed(run.seed)
    model = AutoModelForCausalLM.from_config(model_config or default_model_config()).to(device)
    optimizer = make_optimizer(model, run)
    generator = torch.Generator(device=device).manual_seed(run.seed)
    total_steps = max(1, round(run.epochs * len(train_tokens) / (run.batch_size * SEQ_LEN)))
    start = time.perf_counter()
    for step in range(total_steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, total_steps, run)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = next_token_loss(model, sample_batch(train_tokens, run.batch_size, generator))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), run.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 500 == 0 or step == total_steps - 1:
            print(f"  epochs={run.epochs:g} step {step:5d}/{total_steps} loss {loss.item():.4f}", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    log = {**asdict(run), "steps": total_steps, "train_seconds": round(seconds, 1),
           "tokens_per_second": round(total_steps * run.batch_size * SEQ_LEN / seconds),
           "final_train_loss": round(loss.item(), 4),
           "validation_loss": round(validation_loss(model, valid_tokens), 4)}
    print(f"  -> {log}", flush=True)
    return model, log


def main(model_config: PretrainedConfig | None = None, description: str = __doc__) -> None:
    """Sweep the training length of ``model_config`` (default: the default model's) and save the best run."""
    parser = argparse.ArgumentParser(description=description.split("\n\n")[0])
    parser.add_argument("--tokens", type=Path, default=Path(".carry/corpus"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=float, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--time-budget-s", type=float, default=420.0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--warmup-steps", type=int, default=RunConfig.warmup_steps)
    parser.add_argument("--peak-lr", type=float, default=RunConfig.peak_lr)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    train_tokens = torch.from_numpy(np.load(args.tokens / "train.npy").astype(np.int32)).to(device)
    valid_tokens = torch.from_numpy(np.load(args.tokens / "validation.npy").astype(np.int32)).to(device)
    print(f"train {len(train_tokens):,d} tokens, validation {len(valid_tokens):,d} tokens, device {device}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        print(torch.cuda.get_device_name(), "torch", torch.__version__)

    started, logs, best = time.perf_counter(), [], None
    for epochs in sorted(args.epochs):
        run = RunConfig(epochs=epochs, batch_size=args.batch_size, peak_lr=args.peak_lr,
                        warmup_steps=args.warmup_steps)
        if logs:
            tokens = epochs * len(train_tokens)
            estimate = tokens / logs[-1]["tokens_per_second"] * 1.1 + 5
            if time.perf_counter() - started + estimate > args.time_budget_s:
                print(f"skipping epochs={epochs:g}: ~{estimate:.0f} s would exceed the time budget")
                continue
        model, log = train_run(run, train_tokens, valid_tokens, model_config)
        logs.append(log)
        if best is None or log["validation_loss"] < best[1]["validation_loss"]:
            best = (model.cpu(), log)

    model, log = best
    print(f"kept epochs={log['epochs']:g}: validation loss {log['validation_loss']} "
          f"(ppl {math.exp(log['validation_loss']):.2f})")
    model.to(torch.bfloat16).save_pretrained(args.out, max_shard_size="14MB", safe_serialization=True)
    versions = {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    (args.out.parent / "training_log.json").write_text(json.dumps({"kept": log, "runs": logs, **versions}, indent=1))


if __name__ == "__main__":
    main()
