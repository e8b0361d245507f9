"""Small models with seeded weights (local generators) and helpers shared by the core tests."""

from __future__ import annotations

import copy

import torch
from torch import nn

SEED = 20240531


def fill_seeded(model: nn.Module, seed: int = SEED, outlier_fraction: float = 0.01) -> nn.Module:
    """Overwrite every parameter from a local generator: weights ~ N(0, 1/fan_in) with a few x8 outliers.

    1-D weights (norms) get 1 + small noise, biases small noise; embeddings N(0, 1).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            shape = parameter.shape
            if parameter.dim() == 1:
                noise = 0.1 * torch.randn(shape, generator=generator)
                parameter.copy_(1 + noise if name.endswith("weight") else noise)
                continue
            fan_in = parameter[0].numel() if "wte" not in name and "embed" not in name else 1
            values = torch.randn(shape, generator=generator) / fan_in**0.5
            outliers = torch.rand(shape, generator=generator) < outlier_fraction
            parameter.copy_(torch.where(outliers, values * 8, values))
    return model


def tiny_llama(num_layers: int = 2, hidden: int = 128, seed: int = SEED) -> nn.Module:
    """LlamaForCausalLM, hidden 128, 2 layers, 4 heads / 2 KV heads, vocab 512, seeded weights, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=128, tie_word_embeddings=False,
    )
    with torch.random.fork_rng():  # HF initialisation draws from the global RNG; keep it untouched
        model = LlamaForCausalLM(config)
    return fill_seeded(model, seed).eval()


def tiny_gpt2(seed: int = SEED) -> nn.Module:
    """GPT2LMHeadModel (Conv1D layers), 64 wide, 2 layers, 4 heads, vocab 256, seeded weights, eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64, bos_token_id=0,
                        eos_token_id=0)
    with torch.random.fork_rng():
        model = GPT2LMHeadModel(config)
    return fill_seeded(model, seed).eval()


class SmallCNN(nn.Module):
    """Conv1d -> Conv2d -> ConvTranspose2d -> Linear: every convolution kind quantize() must handle."""

    def __init__(self):
        super().__init__()
        self.conv1d = nn.Conv1d(4, 8, kernel_size=3, padding=1)
        self.conv2d = nn.Conv2d(8, 16, kernel_size=3, padding=1)
        self.deconv = nn.ConvTranspose2d(16, 8, kernel_size=2, stride=2)
        self.head = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, 4, 64)
        h = torch.relu(self.conv1d(x))  # (batch, 8, 64)
        h = torch.relu(self.conv2d(h.view(h.shape[0], 8, 8, 8)))  # (batch, 16, 8, 8)
        h = self.deconv(h)  # (batch, 8, 16, 16)
        return self.head(h.mean(dim=(2, 3)))


class MLP(nn.Module):
    def __init__(self, width: int = 64):
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def small_cnn(seed: int = SEED) -> SmallCNN:
    return fill_seeded(SmallCNN(), seed).eval()


def mlp(width: int = 64, seed: int = SEED) -> MLP:
    return fill_seeded(MLP(width), seed).eval()


def token_batches(vocab: int, count: int = 2, batch: int = 2, length: int = 32, seed: int = 7) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, length), generator=generator) for _ in range(count)]


def calibrate_quantizer(quantizer, *batches: torch.Tensor) -> None:
    """ModelOpt's calibration sequence: calib on / quant off, run the data, load amax, switch back."""
    quantizer.enable_calib()
    quantizer.disable_quant()
    for batch in batches:
        quantizer(batch)
    quantizer.load_calib_amax()
    quantizer.disable_calib()
    quantizer.enable_quant()


def snapshot(model: nn.Module) -> tuple[dict, list]:
    """(cloned state_dict, [(name, class)] of every module): what 'left untouched' compares."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    classes = [(name, type(module)) for name, module in model.named_modules()]
    return state, classes


def assert_untouched(model: nn.Module, before: tuple[dict, list]) -> None:
    state, classes = snapshot(model)
    assert classes == before[1]
    assert state.keys() == before[0].keys()
    for key, value in state.items():
        assert torch.equal(value, before[0][key]), key


def copy_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
