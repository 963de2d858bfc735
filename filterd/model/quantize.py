"""int8 weights for CPU scoring: matrix products about 1.8x faster at gpt2 size.

Weights are quantized once, per output channel. fbgemm quantizes activations on the fly
with one scale for the whole input tensor, so in a padded batch a message's score would
depend on its batch-mates (and on padding). Int8 models are therefore run one message at
a time (see Classifier), where that tensor holds exactly the message's own tokens.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from filterd.model.family import Backbone


class Int8Linear(nn.Module):
    """A frozen nn.Linear with int8 weights; `rows` computes a slice of its outputs."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float().cpu()
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
        zeros = torch.zeros(len(scales), dtype=torch.long)
        with warnings.catch_warnings():
            # PyTorch marks quantized tensors deprecated in favour of torchao, whose int8
            # CPU path (torch._int_mm) measured 60x slower than float32 on AVX2 machines.
            warnings.filterwarnings("ignore", "torch.quantize_per", UserWarning)
            self.qweight = torch.quantize_per_channel(w, scales, zeros, 0, torch.qint8)
        bias = linear.bias if linear.bias is not None else torch.zeros(len(scales))
        self.bias = bias.detach().float().cpu()
        self.out_features = len(scales)
        self._packed: dict[tuple[int, int], object] = {}
        self._pack(0, self.out_features)  # at load, not in the first message's batch

    def _pack(self, start: int, stop: int) -> object:
        key = (start, stop)
        if key not in self._packed:
            self._packed[key] = torch.ops.quantized.linear_prepack(
                self.qweight[start:stop], self.bias[start:stop]
            )
        return self._packed[key]

    def rows(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        # reduce_range: 7-bit activations, so AVX2's 16-bit pair sums cannot overflow.
        flat = torch.ops.quantized.linear_dynamic(
            x.reshape(-1, x.shape[-1]).contiguous(), self._pack(start, stop), True
        )
        return flat.view(*x.shape[:-1], stop - start)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows(x, 0, self.out_features)


def quantize_int8(model: Backbone) -> Backbone:
    """Replace every Linear layer inside the blocks with Int8Linear, in place (for scoring
    only). Embeddings, norms and the head stay float32."""
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("precision int8 runs on the CPU only (fbgemm); use device: cpu")
    model.eval()
    for parent in list(model.blocks.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
    return model
