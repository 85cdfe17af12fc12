"""Tiny model folders on disk (no download) for the ``lorakit hf`` command: a GPT-2, a Llama (both
with a context of 64 positions) and a BERT sharing a word-level tokenizer built here."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

_TEXT = (
    "repeat say the color of sky grass snow is blue green white red one two three four five good bad "
    "movie film great awful love hate it was not very user assistant : ! ?"
)
WORDS = _TEXT.split(" ")


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", "[CLS]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]", cls_token="[CLS]"
    )


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch

    root = tmp_path_factory.mktemp("models")
    tok = _tokenizer()
    n = len(tok)
    torch.manual_seed(0)
    gpt = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=n, n_positions=64, bos_token_id=2,
                                eos_token_id=2, pad_token_id=0)
    )  # fmt: skip
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=64, vocab_size=n, max_position_embeddings=64, bos_token_id=2,
                                 eos_token_id=2, pad_token_id=0)
    )  # fmt: skip
    bert = transformers.BertForMaskedLM(
        transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                vocab_size=n, pad_token_id=0)
    )  # fmt: skip
    out = {}
    for name, model in (("gpt2", gpt), ("llama", llama), ("bert", bert)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out
