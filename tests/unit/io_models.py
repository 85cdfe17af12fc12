"""Small models and helpers shared by the adapter-file tests (test_io*.py, integration/test_peft_interop.py)."""

from __future__ import annotations

import hashlib
import json
import struct

import torch
from torch import nn

import lorakit

torch.set_num_threads(1)


class Net(nn.Module):
    """Embedding -> Conv2d -> grouped Conv2d -> Linear -> head: every built-in layout."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.gconv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.lin = nn.Linear(8, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids).transpose(1, 2).unsqueeze(-1)  # (b, 8, t, 1)
        x = self.gconv(self.conv(x)).squeeze(-1).transpose(1, 2)  # (b, t, 8)
        return self.head(self.lin(x))


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


IDS = torch.arange(10).reshape(2, 5) % 20


def config(**kw: object) -> lorakit.LoraConfig:
    base: dict[str, object] = dict(r=4, alpha=6, targets=["emb", "conv", "gconv", "lin"], init="random")
    base.update(kw)
    return lorakit.LoraConfig(**base)  # type: ignore[arg-type]


def adapted_net(seed: int = 0, **kw: object) -> Net:
    """A Net with a non-trivial adapter 'default' (random A and B, alpha != r)."""
    m = make_net(seed)
    torch.manual_seed(100 + seed)
    lorakit.inject(m, config(**kw))
    return m


def state_hash(model: nn.Module) -> str:
    """Hash of every state_dict tensor plus requires_grad flags and the class of every module."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for k, p in model.named_parameters():
        h.update(f"{k}:{p.requires_grad}".encode())
    for k, m in model.named_modules():
        h.update(f"{k}:{type(m).__name__}".encode())
    return h.hexdigest()


def split_header(data: bytes) -> tuple[dict[str, object], bytes]:
    """A safetensors file's bytes -> (its JSON header, the data section)."""
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join_header(header: dict[str, object] | str, body: bytes) -> bytes:
    """Inverse of :func:`split_header` (a str header is written as is)."""
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def failing_net() -> Net:
    """A factory that raises, as a user's broken model factory would."""
    raise RuntimeError("cannot build the model: weights server unreachable")
