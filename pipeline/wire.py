"""Hidden states to and from p2p/tensor.py's wire form (raw little-endian bytes, never pickle).

`hidden_to_wire(t)` packs a torch tensor (float32 / float16 / bfloat16); `hidden_from_wire(msg,
hidden_size=..., dtype=...)` validates the message (dtype, 3-D shape [batch, tokens, hidden_size],
byte length — p2p.tensor.unpack does the checks) and returns a tensor on `device`.
"""

from __future__ import annotations

import torch

from p2p.tensor import pack, unpack

TORCH_WIRE = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
WIRE_TORCH = {v: k for k, v in TORCH_WIRE.items()}


def hidden_to_wire(t: torch.Tensor) -> dict:
    if t.dtype not in TORCH_WIRE:
        raise ValueError(f"hidden states of dtype {t.dtype} cannot travel; use float32, float16 or bfloat16")
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        return pack(t.view(torch.uint16).numpy(), dtype="bfloat16")
    return pack(t.numpy())


def hidden_from_wire(msg: object, *, hidden_size: int, dtype: str | None = None, max_tokens: int | None = None,
                     device: str | torch.device = "cpu") -> torch.Tensor:
    """A validated [batch, tokens, hidden_size] tensor; a FrameError (p2p.errors) says what is wrong."""
    from p2p.errors import FrameError

    wt = unpack(msg, dtype=dtype, shape=(None, None, hidden_size))
    if wt.dtype not in WIRE_TORCH:
        raise FrameError(f"hidden states must be float32, float16 or bfloat16, got {wt.dtype}")
    if max_tokens is not None and wt.shape[1] > max_tokens:
        raise FrameError(f"{wt.shape[1]} tokens in one step exceed the limit of {max_tokens}")
    if not wt.data:
        return torch.empty(wt.shape, dtype=WIRE_TORCH[wt.dtype], device=device)
    # one copy into memory torch owns (the frame's bytes are read-only); little-endian hosts only
    t = torch.frombuffer(bytearray(wt.data), dtype=torch.uint16 if wt.dtype == "bfloat16" else WIRE_TORCH[wt.dtype])
    if wt.dtype == "bfloat16":
        t = t.view(torch.bfloat16)
    return t.reshape(wt.shape).to(device)
