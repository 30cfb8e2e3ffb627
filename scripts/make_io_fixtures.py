#!/usr/bin/env python3
"""Regenerate the checkpoint-reader fixtures in tests/data/io/ (needs torch and safetensors).

The outputs are committed: CI has no Python. tests/test_io.cpp reads each .pt file with
mambabyte::io::read_pytorch_bin and compares it value-for-value (and dtype/shape) with the
matching *_expected.safetensors, which holds contiguous copies of the same tensors.

  python3 scripts/make_io_fixtures.py [out_dir]
"""
import collections
import os
import sys

import torch
from safetensors.torch import save_file


def contiguous_copy(sd):
    return {k: v.detach().clone().contiguous() for k, v in sd.items() if torch.is_tensor(v)}


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "tests", "data", "io")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(1234)

    # (a) a small nn.Module state dict: an OrderedDict of fp32 tensors carrying the
    #     `_metadata` attribute (pickled with BUILD), protocol 2 (torch's default).
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 3, bias=False))
    sd_a = model.state_dict()
    assert isinstance(sd_a, collections.OrderedDict)
    torch.save(sd_a, os.path.join(out, "fp32_state_dict.pt"))
    save_file(contiguous_copy(sd_a), os.path.join(out, "fp32_expected.safetensors"),
              metadata={"fixture": "fp32_state_dict.pt"})

    # (a') the same state dict pickled with protocol 4 (FRAME, MEMOIZE, STACK_GLOBAL, ...).
    torch.save(sd_a, os.path.join(out, "fp32_state_dict_proto4.pt"), pickle_protocol=4)

    # (b) mixed dtypes and views, wrapped under "state_dict" with non-tensor siblings and a
    #     non-tensor entry inside the state dict itself.
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 8.0 - 1.0
    sd_b = collections.OrderedDict()
    sd_b["emb.weight"] = torch.randn(5, 3).to(torch.bfloat16)
    sd_b["tokens"] = torch.tensor([[1, -2, 3], [2**40, -(2**33), 0]], dtype=torch.int64)
    sd_b["proj.weight_t"] = base.t()                      # transposed: stride (1, 6)
    sd_b["proj.slice"] = base[1:3, 2:5]                  # storage offset 8, stride (6, 1)
    sd_b["half"] = torch.linspace(-2, 2, 7).to(torch.float16)
    sd_b["scalar"] = torch.tensor(2.5, dtype=torch.float64)
    sd_b["empty"] = torch.zeros(0, 4)
    sd_b["num_batches_tracked"] = 7                     # a plain int: skipped by the reader
    for k, v in sd_b.items():
        if torch.is_tensor(v):
            v.requires_grad_(False)
    assert not sd_b["proj.weight_t"].is_contiguous()
    assert not sd_b["proj.slice"].is_contiguous()
    torch.save({"state_dict": sd_b, "epoch": 3, "note": "mixed"},
               os.path.join(out, "mixed_checkpoint.pt"))
    save_file(contiguous_copy(sd_b), os.path.join(out, "mixed_expected.safetensors"))

    # (c) the pre-1.6 legacy format, which the reader must refuse with a clear message.
    torch.save({"w": torch.ones(2)}, os.path.join(out, "legacy.pt"),
               _use_new_zipfile_serialization=False)

    total = 0
    for name in sorted(os.listdir(out)):
        size = os.path.getsize(os.path.join(out, name))
        total += size
        print(f"{size:8d}  {name}")
    print(f"{total:8d}  total")
    assert total < 50 * 1024, "fixtures must stay under 50 KB"


if __name__ == "__main__":
    main()
