"""Tiny transformers built from configs (no download): GPT-2, Llama, BERT and ViT, plus one batch each."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import transformers
from torch import nn
from torch.utils.data import Dataset

VOCAB = 100


def gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=1, eos_token_id=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg).eval()


def llama(seed: int = 0, hidden: int = 32, intermediate: int = 64) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=intermediate, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
        num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(cfg).eval()


def vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=3,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.ViTForImageClassification(cfg).eval()


def batch(kind: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if kind == "vit":
        return {"pixel_values": torch.randn(4, 3, 16, 16, generator=g), "labels": torch.tensor([0, 1, 2, 1])}
    ids = torch.randint(3, VOCAB, (4, 10), generator=g)
    if kind == "bert":
        return {"input_ids": ids, "labels": torch.tensor([0, 1, 2, 1])}
    return {"input_ids": ids, "labels": ids}


BUILDERS: dict[str, Callable[..., nn.Module]] = {"gpt2": gpt2, "llama": llama, "bert": bert, "vit": vit}


def outputs(model: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: v for k, v in b.items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs).logits


class Tokens(Dataset[dict[str, torch.Tensor]]):
    """``n`` causal-LM examples: 4 random sequences of 12 tokens, repeated (something to learn)."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, VOCAB, (4, 12), generator=g).repeat(n // 4, 1)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}
