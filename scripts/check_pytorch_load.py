#!/usr/bin/env python3
"""Check that a checkpoint written by `mambabyte train` (or save_model) is usable from PyTorch.

1. Loads <dir>/model.safetensors with safetensors.torch and config.json (mamba_ssm layout).
2. Loads the state dict, strict=True, into a torch.nn.Module with exactly mamba_ssm's
   MambaLMHeadModel parameter names and shapes (LayerNorm models; the module tree of
   scripts/make_goldens.py), so no tensor is missing, unexpected or misshapen.
3. Scores a text with the float64 transcription of the model (scripts/make_goldens.py) and
   compares its bits per byte with what `mambabyte eval --dtype double --json` prints.

Usage: scripts/check_pytorch_load.py RUN_OR_MODEL_DIR TEXT_FILE [--bytes N] [--cli build/bin/mambabyte]
Needs torch and safetensors (PyPI, CPU); not used by CI.
"""
import argparse
import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_goldens as g  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("text")
    ap.add_argument("--bytes", type=int, default=2000)
    ap.add_argument("--cli", default="build/bin/mambabyte")
    a = ap.parse_args()
    d = a.model
    if not os.path.exists(os.path.join(d, "config.json")) and os.path.isdir(os.path.join(d, "latest")):
        d = os.path.join(d, "latest")
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    hp = g.config_from_json(cfg)
    sd = load_file(os.path.join(d, "model.safetensors"))
    ssm = cfg.get("ssm_cfg", {})
    c = dict(d_model=hp["d_model"], n_layer=hp["n_layer"], vocab=hp["vocab"], d_state=hp["d_state"],
             d_conv=hp["d_conv"], expand=hp["expand"], dt_rank=hp["dt_rank"],
             conv_bias=ssm.get("conv_bias", True), bias=ssm.get("bias", False))
    if hp["norm"] == "layer" and not hp["tied"]:
        model = g.SsmLMHead(c)
        model.load_state_dict(sd, strict=True)  # raises on any missing / unexpected / misshapen tensor
        print(f"strict load into the mamba_ssm module tree: {len(sd)} tensors OK")
    else:
        print("(strict module load is only checked for LayerNorm + untied models)")
    w = g.file_to_canonical({k: v.double() for k, v in sd.items()})
    with open(a.text, "rb") as f:
        data = f.read()[: a.bytes]
    ids = torch.tensor(list(data), dtype=torch.long)
    logits, _, _ = g.transcription(w, hp, ids)
    bpb_torch = g.bits_per_byte(logits, ids)
    out = subprocess.run([a.cli, "eval", "--model", d, "--data", a.text, "--max-bytes", str(a.bytes),
                          "--dtype", "double", "--json", "--no-progress"], check=True, capture_output=True, text=True)
    bpb_cli = json.loads(out.stdout.strip().splitlines()[-1])["bits_per_byte"]
    rel = abs(bpb_torch - bpb_cli) / bpb_torch
    print(f"bits per byte: PyTorch float64 transcription {bpb_torch:.12f}, mambabyte {bpb_cli:.12f}, rel diff {rel:.2e}")
    sys.exit(0 if rel < 1e-9 else 1)


if __name__ == "__main__":
    main()
