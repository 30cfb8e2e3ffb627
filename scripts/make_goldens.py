#!/usr/bin/env python3
"""Regenerate the model golden files in tests/data/golden/ (needs torch, safetensors, transformers).

The outputs are committed: CI has no Python. The C++ tests load each small random checkpoint the
way a user would (config.json + model.safetensors / pytorch_model.bin) and compare their forward
pass, final recurrent states, bits-per-byte and (case ssm_layernorm_bin) gradients with the
reference values stored in <case>/golden.safetensors (and <case>/grads.safetensors).

  python3 scripts/make_goldens.py [out_dir]        # default: tests/data/golden

Two references are computed for each checkpoint:
  * "transcription": a plain float64 re-statement of the Mamba LM math below, written directly in
    torch (no transformers), applied to the weights exactly as stored (upcast to float64);
  * "transformers": transformers' MambaForCausalLM (model.double(), CPU, eval, no cache) on the
    same weights, for the cases it can express (RMSNorm models). It keeps its norms, residual
    stream (residual_in_fp32) and A/D/dt-bias in float32 and returns float32 logits, so it agrees
    with the transcription only to ~1e-7 relative.

Everything is seeded and single-threaded; a second run writes byte-identical files (the script
canonicalises the safetensors header, whose metadata order is otherwise random per process).
"""
import collections
import hashlib
import json
import math
import os
import shutil
import struct
import sys
import tempfile

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as st_save

# The golden text. Its length is the main size knob of the folder (every logits tensor is
# [T, vocab] float64); see README.md for the trade-off. One non-ASCII character (é: C3 A9).
TEXT = "Hi, café! 42% bytes."

EPS = 1e-5
VOCAB_USED = 256          # bytes; logits beyond 256 (padded vocab) are produced but ignored
SIZE_LIMIT = 1_500_000    # bytes, whole output folder

CASES = [
    dict(name="hf_default", naming="hf", fmt="safetensors", store=torch.float32, seed=1001,
         d_model=32, n_layer=2, d_state=16, d_conv=4, expand=2, dt_rank=None, norm="rms",
         tied=True, vocab=256, bias=False, conv_bias=True,
         desc="transformers naming, HF config.json, d_model 32, 2 layers, d_state 16, d_conv 4, "
              "expand 2, dt_rank auto (2), RMSNorm, tied lm_head (absent from file), F32"),
    dict(name="hf_odd", naming="hf", fmt="safetensors", store=torch.float64, seed=1002,
         d_model=24, n_layer=3, d_state=5, d_conv=3, expand=2, dt_rank=7, norm="rms",
         tied=False, vocab=264, bias=True, conv_bias=False,
         desc="transformers naming, HF config.json, d_model 24, 3 layers, d_state 5, d_conv 3, "
              "time_step_rank 7, in/out_proj bias, no conv bias, untied lm_head, vocab 264 "
              "(padded), F64"),
    dict(name="ssm_rms_tied", naming="ssm", fmt="safetensors", store=torch.float32, seed=1003,
         d_model=16, n_layer=2, d_state=8, d_conv=2, expand=2, dt_rank=None, norm="rms",
         tied=True, vocab=256, bias=False, conv_bias=True,
         ssm_cfg={"d_state": 8, "d_conv": 2, "expand": 2},
         desc="mamba_ssm naming and config.json, d_model 16, 2 layers, d_state 8, d_conv 2, "
              "dt_rank auto (1), RMSNorm, tied (lm_head.weight also stored, equal to the "
              "embedding), F32"),
    dict(name="ssm_layernorm_bin", naming="ssm", fmt="bin", store=torch.float32, seed=1004,
         d_model=32, n_layer=3, d_state=16, d_conv=4, expand=2, dt_rank=None, norm="layer",
         tied=False, vocab=256, bias=False, conv_bias=True, grads=True,
         ssm_cfg={"expand": 2},
         desc="released-MambaByte layout: mamba_ssm naming, LayerNorm with bias, untied lm_head, "
              "d_model 32, 3 layers, ssm_cfg defaults (d_state 16, d_conv 4, dt_rank 2), "
              "pytorch_model.bin (torch.save zip, F32)"),
    dict(name="ssm_module_prefix", naming="ssm", fmt="bin", store=torch.float32, seed=1005,
         d_model=20, n_layer=2, d_state=4, d_conv=4, expand=2, dt_rank=3, norm="layer",
         tied=False, vocab=256, bias=False, conv_bias=True, prefix="module.",
         ssm_cfg={"d_state": 4, "d_conv": 4, "expand": 2, "dt_rank": 3, "conv_bias": True,
                  "bias": False},
         desc="DDP checkpoint: every key prefixed with 'module.', mamba_ssm naming, LayerNorm with "
              "bias, untied, explicit ssm_cfg (d_state 4, d_conv 4, dt_rank 3), d_model 20, "
              "2 layers, pytorch_model.bin (F32)"),
]


def fmt17(x):
    return f"{float(x):#.17g}"     # 17 significant digits, trailing zeros kept


# --------------------------------------------------------------------------------------------
# Deterministic safetensors writing
# --------------------------------------------------------------------------------------------
def save_safetensors(tensors, path, metadata=None):
    """safetensors.torch.save, then rewrite the JSON header canonically (sorted metadata,
    tensors in data-offset order, compact separators, space padding to 8 bytes). The safetensors
    package serialises __metadata__ from a hash map whose order changes between processes."""
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    blob = st_save(tensors, metadata=metadata)
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    meta = header.pop("__metadata__", None)
    canon = {}
    if meta:
        canon["__metadata__"] = dict(sorted(meta.items()))
    for k in sorted(header, key=lambda k: (header[k]["data_offsets"][0], k)):
        canon[k] = header[k]
    hb = json.dumps(canon, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        f.write(blob[8 + n:])


def read_metadata(path):
    with safe_open(path, "pt") as f:
        return dict(f.metadata() or {})


# --------------------------------------------------------------------------------------------
# Random weights (canonical names, float64; rounded to the storage dtype by the caller)
# --------------------------------------------------------------------------------------------
def dt_rank_of(c):
    return c["dt_rank"] if c["dt_rank"] is not None else math.ceil(c["d_model"] / 16)


def make_weights(c):
    """Canonical parameter names (mamba_ssm style without prefix):
    embedding, lm_head, norm_f.weight/bias, layers.{i}.norm.weight/bias, layers.{i}.mixer.*"""
    g = torch.Generator().manual_seed(c["seed"])
    f64 = torch.float64

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=g, dtype=f64) * std

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=f64)

    d, V, N, K = c["d_model"], c["vocab"], c["d_state"], c["d_conv"]
    di, R = c["expand"] * d, dt_rank_of(c)
    w = collections.OrderedDict()
    # Embedding / lm_head rows ~ N(0, 1/d): with a unit-RMS final hidden the logits are ~N(0,1).
    w["embedding"] = randn(V, d, std=d ** -0.5)
    for i in range(c["n_layer"]):
        p = f"layers.{i}."
        w[p + "norm.weight"] = 1.0 + randn(d, std=0.1)
        if c["norm"] == "layer":
            w[p + "norm.bias"] = randn(d, std=0.1)
        m = p + "mixer."
        w[m + "in_proj.weight"] = randn(2 * di, d, std=d ** -0.5)
        if c["bias"]:
            w[m + "in_proj.bias"] = randn(2 * di, std=0.1)
        w[m + "conv1d.weight"] = randn(di, 1, K, std=0.3)
        if c["conv_bias"]:
            w[m + "conv1d.bias"] = randn(di, std=0.1)
        w[m + "x_proj.weight"] = randn(R + 2 * N, di, std=1.5 * di ** -0.5)
        bound = R ** -0.5
        w[m + "dt_proj.weight"] = (2.0 * rand(di, R) - 1.0) * bound
        dt = torch.exp(rand(di) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        w[m + "dt_proj.bias"] = dt + torch.log(-torch.expm1(-dt))      # inverse softplus
        w[m + "A_log"] = torch.log(torch.arange(1, N + 1, dtype=f64)).expand(di, N) \
            + randn(di, N, std=0.05)
        w[m + "D"] = 1.0 + randn(di, std=0.1)
        w[m + "out_proj.weight"] = randn(d, di, std=2.0 * di ** -0.5)
        if c["bias"]:
            w[m + "out_proj.bias"] = randn(d, std=0.1)
    w["norm_f.weight"] = 1.0 + randn(d, std=0.1)
    if c["norm"] == "layer":
        w["norm_f.bias"] = randn(d, std=0.1)
    if not c["tied"]:
        w["lm_head"] = randn(V, d, std=d ** -0.5)
    # Round to the storage dtype once: every reference below sees exactly the stored values.
    return collections.OrderedDict((k, v.to(c["store"]).contiguous()) for k, v in w.items())


# --------------------------------------------------------------------------------------------
# Checkpoint names <-> canonical names
# --------------------------------------------------------------------------------------------
def canonical_to_file(c, w):
    """Map canonical weights to the key set that the real tool would write."""
    out = collections.OrderedDict()
    emb = "backbone.embeddings.weight" if c["naming"] == "hf" else "backbone.embedding.weight"
    pre = c.get("prefix", "")
    for k, v in w.items():
        if k == "embedding":
            out[pre + emb] = v
        elif k == "lm_head":
            out[pre + "lm_head.weight"] = v
        else:
            out[pre + "backbone." + k] = v
    if c["tied"] and c["naming"] == "ssm":
        # mamba_ssm's state_dict() lists the tied lm_head.weight as its own key.
        out[pre + "lm_head.weight"] = w["embedding"].clone()
    return out


def file_to_canonical(sd):
    """Generic loader mapping (what the C++ side must also do): strip 'module.', accept both
    'embedding' and 'embeddings', tie lm_head when absent."""
    w = {}
    for k, v in sd.items():
        if k.startswith("module."):
            k = k[len("module."):]
        if k in ("backbone.embedding.weight", "backbone.embeddings.weight"):
            w["embedding"] = v
        elif k == "lm_head.weight":
            w["lm_head"] = v
        elif k.startswith("backbone."):
            w[k[len("backbone."):]] = v
        else:
            raise KeyError(k)
    return w


def config_from_json(cfg):
    """Model hyper-parameters from either config.json flavour."""
    if "hidden_size" in cfg:  # transformers MambaConfig
        d = cfg["hidden_size"]
        r = cfg.get("time_step_rank", "auto")
        return dict(d_model=d, n_layer=cfg["num_hidden_layers"], vocab=cfg["vocab_size"],
                    d_state=cfg.get("state_size", 16), d_conv=cfg.get("conv_kernel", 4),
                    expand=cfg.get("expand", 2),
                    dt_rank=math.ceil(d / 16) if r == "auto" else int(r),
                    norm="rms", eps=cfg.get("layer_norm_epsilon", 1e-5),
                    tied=cfg.get("tie_word_embeddings", True))
    ssm = cfg.get("ssm_cfg", {})
    d = cfg["d_model"]
    r = ssm.get("dt_rank", "auto")
    vocab = cfg["vocab_size"]
    m = cfg.get("pad_vocab_size_multiple", 1)
    vocab += (m - vocab % m) % m
    return dict(d_model=d, n_layer=cfg["n_layer"], vocab=vocab, d_state=ssm.get("d_state", 16),
                d_conv=ssm.get("d_conv", 4), expand=ssm.get("expand", 2),
                dt_rank=math.ceil(d / 16) if r == "auto" else int(r),
                norm="rms" if cfg.get("rms_norm", True) else "layer", eps=1e-5,
                tied=cfg.get("tie_embeddings", True))


def load_checkpoint_from_disk(case_dir):
    with open(os.path.join(case_dir, "config.json")) as f:
        hp = config_from_json(json.load(f))
    st = os.path.join(case_dir, "model.safetensors")
    if os.path.exists(st):
        sd = load_file(st)
    else:
        sd = torch.load(os.path.join(case_dir, "pytorch_model.bin"), map_location="cpu",
                        weights_only=True)
    w = file_to_canonical(sd)
    return hp, w


# --------------------------------------------------------------------------------------------
# The float64 transcription
# --------------------------------------------------------------------------------------------
def silu(v):
    return v / (1.0 + torch.exp(-v))


def softplus(v):
    return torch.where(v > 20.0, v, torch.log1p(torch.exp(torch.clamp(v, max=20.0))))


def norm(x, w, b, kind, eps):
    if kind == "rms":
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w
    mu = x.mean(-1, keepdim=True)
    xc = x - mu
    var = (xc * xc).mean(-1, keepdim=True)
    return xc * torch.rsqrt(var + eps) * w + b


def mixer(h, p, hp):
    """h: [T, d_model] -> out [T, d_model], final ssm state [di, N], conv state [di, K-1]."""
    T = h.shape[0]
    N, K, R = hp["d_state"], hp["d_conv"], hp["dt_rank"]
    di = hp["expand"] * hp["d_model"]
    xz = h @ p["in_proj.weight"].T
    if "in_proj.bias" in p:
        xz = xz + p["in_proj.bias"]
    x, z = xz[:, :di], xz[:, di:]
    # causal depthwise conv: out[t,c] = b[c] + sum_k w[c,0,k] * x[t-(K-1)+k, c]
    xpad = torch.cat([torch.zeros(K - 1, di, dtype=x.dtype), x], 0)
    cw = p["conv1d.weight"][:, 0, :]                               # [di, K]
    conv = sum(xpad[k:k + T] * cw[:, k] for k in range(K))
    if "conv1d.bias" in p:
        conv = conv + p["conv1d.bias"]
    conv_state = xpad[T:T + K - 1].T.clone() if K > 1 else torch.zeros(di, 0, dtype=x.dtype)
    u = silu(conv)
    dbc = u @ p["x_proj.weight"].T
    dt, B, C = dbc[:, :R], dbc[:, R:R + N], dbc[:, R + N:R + 2 * N]
    delta = softplus(dt @ p["dt_proj.weight"].T + p["dt_proj.bias"])   # [T, di]
    A = -torch.exp(p["A_log"])                                     # [di, N]
    hs = torch.zeros(di, N, dtype=x.dtype)
    ys = []
    for t in range(T):
        hs = torch.exp(delta[t][:, None] * A) * hs + (delta[t] * u[t])[:, None] * B[t][None, :]
        ys.append(hs @ C[t] + p["D"] * u[t])
    y = torch.stack(ys, 0)
    out = (y * silu(z)) @ p["out_proj.weight"].T
    if "out_proj.bias" in p:
        out = out + p["out_proj.bias"]
    return out, hs, conv_state


def transcription(w, hp, ids):
    """w: canonical float64 weights. Returns logits [T, vocab], ssm states, conv states."""
    eps = hp.get("eps", EPS)
    hidden = w["embedding"][ids]
    residual = None
    ssm_states, conv_states = [], []
    for i in range(hp["n_layer"]):
        pre = f"layers.{i}."
        residual = hidden if residual is None else residual + hidden
        hidden = norm(residual, w[pre + "norm.weight"], w.get(pre + "norm.bias"), hp["norm"], eps)
        p = {k[len(pre + "mixer."):]: v for k, v in w.items() if k.startswith(pre + "mixer.")}
        hidden, s, cs = mixer(hidden, p, hp)
        ssm_states.append(s)
        conv_states.append(cs)
    residual = residual + hidden
    hidden = norm(residual, w["norm_f.weight"], w.get("norm_f.bias"), hp["norm"], eps)
    lm = w["lm_head"] if "lm_head" in w else w["embedding"]
    return hidden @ lm.T, ssm_states, conv_states


def next_byte_loss(logits, ids):
    """Mean natural-log cross-entropy of next-byte prediction over vocab 256."""
    lp = torch.log_softmax(logits[:-1, :VOCAB_USED], dim=-1)
    return -lp.gather(1, ids[1:, None]).mean()


def bits_per_byte(logits, ids):
    return float(next_byte_loss(logits.double(), ids)) / math.log(2.0)


def rel_diff(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


# --------------------------------------------------------------------------------------------
# transformers reference
# --------------------------------------------------------------------------------------------
def hf_config(c):
    from transformers import MambaConfig
    return MambaConfig(vocab_size=c["vocab"], hidden_size=c["d_model"], state_size=c["d_state"],
                       num_hidden_layers=c["n_layer"], layer_norm_epsilon=EPS, expand=c["expand"],
                       conv_kernel=c["d_conv"], use_bias=c["bias"], use_conv_bias=c["conv_bias"],
                       residual_in_fp32=True,
                       time_step_rank="auto" if c["dt_rank"] is None else c["dt_rank"],
                       tie_word_embeddings=c["tied"])


def hf_state_dict(w):
    """Canonical -> transformers module names (lm_head always included; tied models share it)."""
    sd = {}
    for k, v in w.items():
        if k == "embedding":
            sd["backbone.embeddings.weight"] = v
        elif k == "lm_head":
            sd["lm_head.weight"] = v
        else:
            sd["backbone." + k] = v
    if "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["backbone.embeddings.weight"]
    return sd


def hf_logits(model, ids):
    model = model.double().eval()
    with torch.no_grad():
        out = model(input_ids=ids[None], use_cache=False)
    return out.logits[0].to(torch.float64)


def hf_build(c, w):
    """A MambaForCausalLM holding exactly w (storage dtype) for case c."""
    from transformers import MambaForCausalLM
    cfg = hf_config(c)
    model = MambaForCausalLM(cfg).to(c["store"])
    missing, unexpected = model.load_state_dict(hf_state_dict(w), strict=False)
    assert not unexpected, unexpected
    assert not missing, missing
    if c["tied"]:
        assert model.lm_head.weight.data_ptr() == model.backbone.embeddings.weight.data_ptr()
    return model


# --------------------------------------------------------------------------------------------
# mamba_ssm-shaped modules, so pytorch_model.bin holds a genuine nn.Module state_dict()
# (OrderedDict in mamba_ssm's key order, with the `_metadata` attribute).
# --------------------------------------------------------------------------------------------
class SsmMixer(nn.Module):
    def __init__(self, d, di, N, K, R, conv_bias, bias):
        super().__init__()
        self.in_proj = nn.Linear(d, 2 * di, bias=bias)
        self.conv1d = nn.Conv1d(di, di, K, groups=di, padding=K - 1, bias=conv_bias)
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(di, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, di, bias=True)
        self.A_log = nn.Parameter(torch.zeros(di, N))
        self.D = nn.Parameter(torch.zeros(di))
        self.out_proj = nn.Linear(di, d, bias=bias)


class SsmBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c["d_model"]
        self.mixer = SsmMixer(d, c["expand"] * d, c["d_state"], c["d_conv"], dt_rank_of(c),
                              c["conv_bias"], c["bias"])
        self.norm = nn.LayerNorm(d, eps=EPS)


class SsmBackbone(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embedding = nn.Embedding(c["vocab"], c["d_model"])
        self.layers = nn.ModuleList([SsmBlock(c) for _ in range(c["n_layer"])])
        self.norm_f = nn.LayerNorm(c["d_model"], eps=EPS)


class SsmLMHead(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.backbone = SsmBackbone(c)
        self.lm_head = nn.Linear(c["d_model"], c["vocab"], bias=False)


class DDPWrapper(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.module = inner


def ssm_state_dict(c, file_sd):
    assert c["norm"] == "layer" and not c["tied"]
    model = SsmLMHead(c)
    if c.get("prefix") == "module.":
        model = DDPWrapper(model)
    elif c.get("prefix"):
        raise ValueError(c["prefix"])
    model.load_state_dict(file_sd, strict=True)
    model = model.to(c["store"])
    sd = model.state_dict()
    assert isinstance(sd, collections.OrderedDict) and hasattr(sd, "_metadata")
    for k, v in file_sd.items():
        assert torch.equal(sd[k], v) and sd[k].dtype == c["store"], k
    return sd


# --------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------
def write_case(c, out_root, ids, report):
    report_extra = {}
    case_dir = os.path.join(out_root, c["name"])
    if os.path.isdir(case_dir):
        shutil.rmtree(case_dir)
    os.makedirs(case_dir)
    w = make_weights(c)
    file_sd = canonical_to_file(c, w)

    # ---- checkpoint + config.json -----------------------------------------------------------
    if c["naming"] == "hf":
        from transformers import MambaForCausalLM
        model = hf_build(c, w)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            # config.json exactly as transformers writes it
            shutil.copyfile(os.path.join(tmp, "config.json"), os.path.join(case_dir, "config.json"))
            hf_st = os.path.join(tmp, "model.safetensors")
            hf_sd = load_file(hf_st)
            # our file must hold exactly the key set / dtypes / values that save_pretrained writes
            assert sorted(hf_sd) == sorted(file_sd), (sorted(set(hf_sd) ^ set(file_sd)))
            for k, v in file_sd.items():
                assert hf_sd[k].dtype == v.dtype and torch.equal(hf_sd[k], v), k
            ours = os.path.join(case_dir, "model.safetensors")
            save_safetensors(file_sd, ours, metadata={"format": "pt"})
            with open(ours, "rb") as fa, open(hf_st, "rb") as fb:
                report_extra["hf_bytes_identical"] = fa.read() == fb.read()
    else:
        cfg = collections.OrderedDict()
        cfg["d_model"] = c["d_model"]
        cfg["n_layer"] = c["n_layer"]
        cfg["vocab_size"] = c["vocab"]
        cfg["ssm_cfg"] = c["ssm_cfg"]
        cfg["rms_norm"] = c["norm"] == "rms"
        cfg["residual_in_fp32"] = True
        cfg["fused_add_norm"] = True
        cfg["pad_vocab_size_multiple"] = 8
        cfg["tie_embeddings"] = c["tied"]
        with open(os.path.join(case_dir, "config.json"), "w") as f:
            json.dump(cfg, f)
        if c["fmt"] == "safetensors":
            save_safetensors(file_sd, os.path.join(case_dir, "model.safetensors"),
                             metadata={"format": "pt"})
        else:
            sd = ssm_state_dict(c, file_sd)
            torch.save(sd, os.path.join(case_dir, "pytorch_model.bin"))

    # the hyper-parameters as a consumer reads them back from config.json
    with open(os.path.join(case_dir, "config.json")) as f:
        hp = config_from_json(json.load(f))
    for k in ("d_model", "n_layer", "vocab", "d_state", "d_conv", "expand", "norm", "tied"):
        assert hp[k] == c[k], (c["name"], k, hp[k], c[k])
    assert hp["dt_rank"] == dt_rank_of(c)

    # ---- transcription ----------------------------------------------------------------------
    w64 = {k: v.to(torch.float64) for k, v in w.items()}
    with torch.no_grad():
        logits, ssm_states, conv_states = transcription(w64, hp, ids)
    tensors = collections.OrderedDict()
    tensors["input_ids"] = ids.clone()
    tensors["logits_transcription"] = logits
    meta = {"case": c["desc"], "bits_per_byte_transcription": fmt17(bits_per_byte(logits, ids))}
    info = dict(report_extra, name=c["name"], bpb=float(meta["bits_per_byte_transcription"]),
                logit_std=float(logits[:, :VOCAB_USED].std()),
                max_prob=float(torch.softmax(logits[:, :VOCAB_USED], -1).max()))

    # ---- transformers -----------------------------------------------------------------------
    if c["norm"] == "rms":
        if c["naming"] == "hf":
            from transformers import MambaForCausalLM
            model = MambaForCausalLM.from_pretrained(case_dir, dtype=torch.float64)
        else:
            model = hf_build(c, w)
        lt = hf_logits(model, ids)
        tensors["logits_transformers"] = lt
        meta["bits_per_byte_transformers"] = fmt17(bits_per_byte(lt, ids))
        info["rel_diff"] = rel_diff(lt, logits)
        info["max_abs_diff"] = float((lt - logits).abs().max())
        info["bpb_diff"] = abs(float(meta["bits_per_byte_transformers"]) - info["bpb"])
        meta["rel_diff_transcription_vs_transformers"] = f"{info['rel_diff']:.3e}"
        assert info["rel_diff"] <= 1e-6, (c["name"], info["rel_diff"])

    for i, (s, cs) in enumerate(zip(ssm_states, conv_states)):
        tensors[f"final_ssm_state.{i}"] = s
        tensors[f"final_conv_state.{i}"] = cs
    save_safetensors(tensors, os.path.join(case_dir, "golden.safetensors"), metadata=meta)

    # ---- gradients --------------------------------------------------------------------------
    if c.get("grads"):
        leaves = {k: v.clone().requires_grad_(True) for k, v in w64.items()}
        lg, _, _ = transcription(leaves, hp, ids)
        loss = next_byte_loss(lg, ids)
        loss.backward()
        inv = {}
        for fk in file_sd:
            inv[next(iter(file_to_canonical({fk: None})))] = fk
        grads = collections.OrderedDict()
        for k, v in leaves.items():
            grads["grad." + inv[k]] = v.grad.detach().clone()
        assert torch.allclose(lg.detach(), logits, rtol=0, atol=0)
        save_safetensors(grads, os.path.join(case_dir, "grads.safetensors"),
                         metadata={"loss_transcription": fmt17(loss.item()),
                                   "loss": "mean natural-log cross-entropy of next-byte "
                                           "prediction over logits[:, :256], t = 0..T-2"})
        info["loss"] = loss.item()
        info["grad_norm"] = float(torch.sqrt(sum((g * g).sum() for g in grads.values())))
    if c["norm"] == "layer":
        lt = hf_layernorm_logits(c, w, ids)
        info["ln_check_rel_diff"] = rel_diff(lt, logits)
        assert info["ln_check_rel_diff"] <= 1e-6, info["ln_check_rel_diff"]
    report.append(info)


def hf_layernorm_logits(c, w, ids):
    """Cross-check for the LayerNorm cases (not stored): transformers' MambaForCausalLM with every
    MambaRMSNorm swapped for torch.nn.LayerNorm (weight + bias), so its mixer / conv / scan code
    and torch's LayerNorm check the transcription."""
    cfg = hf_config(c)
    from transformers import MambaForCausalLM
    model = MambaForCausalLM(cfg).double()
    d = c["d_model"]
    for i, blk in enumerate(model.backbone.layers):
        blk.norm = nn.LayerNorm(d, eps=EPS).double()
    model.backbone.norm_f = nn.LayerNorm(d, eps=EPS).double()
    sd = {k: v.double() for k, v in hf_state_dict(w).items()}
    model.load_state_dict(sd, strict=True)
    return hf_logits(model, ids)


def check_grads_fd(c, out_root, ids):
    """Central finite differences of the loss along a few fixed random directions (per
    parameter and all at once) against the stored gradients."""
    case_dir = os.path.join(out_root, c["name"])
    hp, w = load_checkpoint_from_disk(case_dir)
    w = {k: v.to(torch.float64) for k, v in w.items()}
    grads = load_file(os.path.join(case_dir, "grads.safetensors"))
    file_keys = {next(iter(file_to_canonical({k[len("grad."):]: None}))): k for k in grads}
    g = torch.Generator().manual_seed(7)

    def loss_at(shift):
        with torch.no_grad():
            lg, _, _ = transcription({k: w[k] + shift.get(k, 0.0) for k in w}, hp, ids)
            return float(next_byte_loss(lg, ids))

    worst = 0.0
    groups = [[k] for k in w] + [list(w)]
    for keys in groups:
        v = {k: torch.randn(w[k].shape, generator=g, dtype=torch.float64) for k in keys}
        h = 1e-5
        fd = (loss_at({k: h * v[k] for k in keys}) - loss_at({k: -h * v[k] for k in keys})) / (2 * h)
        an = sum(float((grads[file_keys[k]] * v[k]).sum()) for k in keys)
        err = abs(fd - an) / max(abs(an), 1e-3)
        worst = max(worst, err)
    assert worst < 1e-6, worst
    return worst


def verify_case(c, out_root, ids):
    """(a) reload the checkpoint from disk with the generic loader and recompute."""
    case_dir = os.path.join(out_root, c["name"])
    hp, w = load_checkpoint_from_disk(case_dir)
    assert all(v.dtype == c["store"] for v in w.values())
    w64 = {k: v.to(torch.float64) for k, v in w.items()}
    g = load_file(os.path.join(case_dir, "golden.safetensors"))
    assert torch.equal(g["input_ids"], ids)
    with torch.no_grad():
        logits, ss, cs = transcription(w64, hp, ids)
    d = float((logits - g["logits_transcription"]).abs().max())
    assert d == 0.0, (c["name"], d)
    for i in range(hp["n_layer"]):
        assert torch.equal(ss[i], g[f"final_ssm_state.{i}"])
        assert torch.equal(cs[i], g[f"final_conv_state.{i}"])
    meta = read_metadata(os.path.join(case_dir, "golden.safetensors"))
    assert meta["bits_per_byte_transcription"] == fmt17(bits_per_byte(logits, ids))
    if "logits_transformers" in g:
        assert float((g["logits_transformers"] - logits).abs().max()) < 1e-5
    return d


def check_stepwise(c, out_root, ids):
    """Feed the text one byte at a time through a recurrent implementation that carries exactly
    (final_conv_state, final_ssm_state); it must reproduce the prefill logits and states."""
    case_dir = os.path.join(out_root, c["name"])
    hp, w = load_checkpoint_from_disk(case_dir)
    w = {k: v.to(torch.float64) for k, v in w.items()}
    g = load_file(os.path.join(case_dir, "golden.safetensors"))
    N, K, R = hp["d_state"], hp["d_conv"], hp["dt_rank"]
    di = hp["expand"] * hp["d_model"]
    conv = [torch.zeros(di, K - 1, dtype=torch.float64) for _ in range(hp["n_layer"])]
    ssm = [torch.zeros(di, N, dtype=torch.float64) for _ in range(hp["n_layer"])]
    eps = hp["eps"]
    rows = []
    for t in range(ids.shape[0]):
        hidden = w["embedding"][ids[t]]
        residual = None
        for i in range(hp["n_layer"]):
            pre = f"layers.{i}."
            p = {k[len(pre + "mixer."):]: v for k, v in w.items() if k.startswith(pre + "mixer.")}
            residual = hidden if residual is None else residual + hidden
            h = norm(residual, w[pre + "norm.weight"], w.get(pre + "norm.bias"), hp["norm"], eps)
            xz = h @ p["in_proj.weight"].T + (p["in_proj.bias"] if "in_proj.bias" in p else 0)
            x, z = xz[:di], xz[di:]
            window = torch.cat([conv[i], x[:, None]], 1)             # [di, K] oldest first
            conv[i] = window[:, 1:]
            cv = (window * p["conv1d.weight"][:, 0, :]).sum(1)
            if "conv1d.bias" in p:
                cv = cv + p["conv1d.bias"]
            u = silu(cv)
            dbc = p["x_proj.weight"] @ u
            dt, B, C = dbc[:R], dbc[R:R + N], dbc[R + N:]
            delta = softplus(p["dt_proj.weight"] @ dt + p["dt_proj.bias"])
            ssm[i] = torch.exp(delta[:, None] * -torch.exp(p["A_log"])) * ssm[i] \
                + (delta * u)[:, None] * B[None, :]
            y = ssm[i] @ C + p["D"] * u
            hidden = p["out_proj.weight"] @ (y * silu(z))
            if "out_proj.bias" in p:
                hidden = hidden + p["out_proj.bias"]
        residual = residual + hidden
        hf = norm(residual, w["norm_f.weight"], w.get("norm_f.bias"), hp["norm"], eps)
        rows.append((w["lm_head"] if "lm_head" in w else w["embedding"]) @ hf)
    step_logits = torch.stack(rows, 0)
    ref = g["logits_transcription"]
    err = rel_diff(step_logits, ref)
    assert err < 1e-13, (c["name"], err)
    for i in range(hp["n_layer"]):
        assert rel_diff(ssm[i], g[f"final_ssm_state.{i}"]) < 1e-13
        assert rel_diff(conv[i], g[f"final_conv_state.{i}"]) < 1e-13
    return err


# --------------------------------------------------------------------------------------------
README = """\
# Golden reference outputs for small random Mamba checkpoints

Generated by `scripts/make_goldens.py` (do not edit by hand). Regenerate from the repository root
with

    python3 scripts/make_goldens.py

(needs torch, safetensors and transformers; generated with torch {torch_version},
transformers {tf_version}, safetensors {st_version}). The script is seeded and single-threaded
and rewrites the safetensors headers canonically, so a second run produces byte-identical files.
CI has no Python: the files below are committed and read by the C++ tests.

`text.txt` is the input ({n_bytes} bytes, no trailing newline, one non-ASCII character `é` =
C3 A9): `{text}`. Token ids are its raw bytes (vocab 256, no BOS).

## Cases

| case | files | what it covers |
|---|---|---|
{case_rows}

Weights are random but well conditioned: embedding / lm_head ~ N(0, 1/d_model), in_proj
~ N(0, 1/d_model), x_proj ~ N(0, 2.25/d_inner), out_proj ~ N(0, 4/d_inner), conv1d weight
~ N(0, 0.3^2), biases ~ N(0, 0.1^2), norm weights 1 + N(0, 0.1^2), norm biases N(0, 0.1^2),
A_log = log(1..d_state) + N(0, 0.05^2), D = 1 + N(0, 0.1^2), dt_proj.weight ~ U(+-dt_rank^-0.5),
dt_proj.bias = softplus^-1(dt) with dt log-uniform in [1e-3, 1e-1]. Seeds 1001..1005 (one
torch.Generator per case, weights drawn in float64 then rounded once to the storage dtype).
Logits are O(1) and the softmax is far from saturated (transcription, over logits[:, :256]):

| case | bits/byte | std of logits | largest softmax probability |
|---|---|---|---|
{cond_rows}

## Contents of `<case>/golden.safetensors`

| tensor | dtype | shape | meaning |
|---|---|---|---|
| `input_ids` | I64 | [T] | bytes of `text.txt` |
| `logits_transcription` | F64 | [T, vocab_size] | float64 transcription, whole text in one forward pass (includes padded rows 256.. for vocab 264) |
| `logits_transformers` | F64 | [T, vocab_size] | transformers `MambaForCausalLM` (cases hf_default, hf_odd, ssm_rms_tied only) |
| `final_ssm_state.{{i}}` | F64 | [d_inner, d_state] | layer i SSM state h_T after the whole text |
| `final_conv_state.{{i}}` | F64 | [d_inner, d_conv-1] | layer i: the last d_conv-1 conv *inputs* (pre-conv x), oldest first |

Metadata (strings): `case` (description), `bits_per_byte_transcription` (17 significant
digits; mean over t = 0..T-2 of -log2 softmax(logits[t, :256])[input_ids[t+1]]),
`bits_per_byte_transformers` and `rel_diff_transcription_vs_transformers` (cases with a
transformers reference).

`ssm_layernorm_bin/grads.safetensors`: F64 `grad.<checkpoint key>` for every parameter
(e.g. `grad.backbone.layers.0.mixer.A_log`), the float64 autograd gradient of
loss = mean natural-log cross-entropy of next-byte prediction over `logits[:, :256]`
(t = 0..T-2), computed on the transcription; metadata `loss_transcription` (17 digits) and
`loss` (description).

## The transcription

Per layer (d_inner = expand*d_model): residual += hidden (first layer: residual = embedding);
hidden = Norm(residual) (RMSNorm or LayerNorm with bias, eps 1e-5); x, z = split(in_proj(hidden));
x = silu(causal depthwise conv1d(x)); dt, B, C = split(x_proj(x)); delta = softplus(dt_proj(dt))
(softplus(v) = v for v > 20); A = -exp(A_log); h_t = exp(delta_t A) h_{{t-1}} + delta_t u_t B_t;
y_t = <h_t, C_t> + D u_t; out = out_proj(y * silu(z)). Final: residual += hidden;
logits = lm_head(norm_f(residual)). Everything in float64 on the stored weights upcast.

## Transcription vs transformers (measured)

transformers {tf_version} `MambaForCausalLM`, `model.double()`, CPU, eval, `use_cache=False`
(reference PyTorch path: no `mamba_ssm` / `causal_conv1d` kernels). It is not a pure float64
computation: `MambaRMSNorm` normalises in float32, `residual_in_fp32=True` casts the residual
stream to float32 in every block, A = -exp(A_log.float()), D and the dt_proj bias are cast to
float32, and the logits are returned as float32 (`lm_head(...).float()`); `logits_transformers`
holds those float32 values widened to F64. Hence the ~1e-7 relative agreement (rel. diff =
‖L_tf − L_tr‖₂ / ‖L_tr‖₂ over the whole [T, vocab_size] tensor; an element-wise comparison
against `logits_transformers` needs an absolute tolerance of a few 1e-6):

| case | rel. diff | max abs diff | bits/byte (transcription) | abs. diff of bits/byte |
|---|---|---|---|---|
{diff_rows}

The LayerNorm cases have no stored transformers reference (transformers' Mamba only has
RMSNorm). As an unstored cross-check the script runs transformers' `MambaForCausalLM` with every
`MambaRMSNorm` replaced by `torch.nn.LayerNorm` (weight + bias) on the same weights:

| case | rel. diff (LayerNorm-swapped transformers vs transcription) |
|---|---|
{ln_rows}

## Other checks the script makes on every run

- Reloading each checkpoint from disk (config.json + weights through a generic mapping: strip
  `module.`, accept `embedding`/`embeddings`, tie lm_head when absent, pad vocab to
  `pad_vocab_size_multiple`) reproduces `logits_transcription` and the final states exactly
  (max abs diff 0).
- A byte-at-a-time recurrent evaluation carrying only (conv state, ssm state) reproduces the
  prefill logits (relative error < 1e-13) and the stored final states.
- hf_*: `model.safetensors` holds exactly the keys, dtypes and values of transformers' own
  `save_pretrained` output (byte-identical: {hf_identical}); `config.json` is the one
  `save_pretrained` wrote; transformers' logits come from `MambaForCausalLM.from_pretrained` on
  the case folder itself.
- `grads.safetensors`: central finite differences of the loss along fixed random directions
  (one per parameter tensor plus one over all parameters) agree with the stored gradients to a
  worst relative error of {fd_err:.1e}.

## Notes

- hf_* `config.json` is written by transformers, so it carries its extra keys (`architectures`,
  `dtype`, `intermediate_size`, `time_step_floor/init_scheme/max/min/scale`, `use_cache`,
  `use_mambapy`, `use_associative_scan`, `bos/eos/pad_token_id`, `transformers_version`, ...);
  `time_step_rank` is written resolved (an integer, never `"auto"`).
- hf_default is tied: `model.safetensors` has no `lm_head.weight` (as save_pretrained writes);
  ssm_rms_tied stores `lm_head.weight` too, equal to `backbone.embedding.weight`.
- The ssm_* `pytorch_model.bin` files are `torch.save` of a real `nn.Module.state_dict()`
  (OrderedDict in mamba_ssm key order, with `_metadata`), zip format, archive folder
  `pytorch_model/`, fp32 (conv1d.weight is [d_inner, 1, d_conv] as in mamba_ssm).
- Size: the files other than this README total {total_bytes} bytes. Every logits tensor is
  [T, vocab] float64, so the text length is the size knob: about {per_byte} bytes of goldens per
  text byte on top of about {fixed_bytes} bytes of checkpoints, gradients and states. A 64-byte
  text would make the folder about {size64} bytes, over the 1.5 MB budget, hence the short text.
"""


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "tests", "data", "golden")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    os.makedirs(out, exist_ok=True)
    import warnings
    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as tf_logging
        tf_logging.set_verbosity_error()
        tf_logging.disable_progress_bar()
    except Exception:
        pass

    text_bytes = TEXT.encode("utf-8")
    with open(os.path.join(out, "text.txt"), "wb") as f:
        f.write(text_bytes)
    ids = torch.tensor(list(text_bytes), dtype=torch.int64)

    report = []
    for c in CASES:
        write_case(c, out, ids, report)
    fd_err = None
    for c in CASES:
        verify_case(c, out, ids)
        check_stepwise(c, out, ids)
        if c.get("grads"):
            fd_err = check_grads_fd(c, out, ids)

    import safetensors
    import transformers
    case_rows, diff_rows = [], []
    for c in CASES:
        files = sorted(os.listdir(os.path.join(out, c["name"])))
        case_rows.append(f"| `{c['name']}` | {', '.join('`%s`' % f for f in files)} | {c['desc']} |")
    for r in report:
        if "rel_diff" in r:
            diff_rows.append(f"| `{r['name']}` | {r['rel_diff']:.2e} | {r['max_abs_diff']:.2e} | "
                             f"{r['bpb']:.6f} | {r['bpb_diff']:.1e} |")
    logit_bytes = 0
    total = 0
    for dirpath, _, names in os.walk(out):
        for n in names:
            if n != "README.md":
                total += os.path.getsize(os.path.join(dirpath, n))
    for c in CASES:
        per = c["vocab"] * 8 * (2 if c["norm"] == "rms" else 1)
        logit_bytes += per
    cond_rows = [f"| `{r['name']}` | {r['bpb']:.6f} | {r['logit_std']:.3f} | {r['max_prob']:.3f} |"
                 for r in report]
    ln_rows = [f"| `{r['name']}` | {r['ln_check_rel_diff']:.2e} |" for r in report
               if "ln_check_rel_diff" in r]
    hf_identical = all(r.get("hf_bytes_identical", True) for r in report)
    readme_args = dict(
        ln_rows="\n".join(ln_rows), cond_rows="\n".join(cond_rows), hf_identical="yes" if hf_identical else "no", fd_err=fd_err,
        size64=total + logit_bytes * (64 - len(text_bytes)),
        torch_version=torch.__version__, tf_version=transformers.__version__,
        st_version=safetensors.__version__, n_bytes=len(text_bytes), text=TEXT,
        case_rows="\n".join(case_rows), diff_rows="\n".join(diff_rows),
        per_byte=logit_bytes, fixed_bytes=total - logit_bytes * len(text_bytes),
        total_bytes=total)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(README.format(**readme_args))

    # ---- summary ------------------------------------------------------------------------------
    print(f"text: {len(text_bytes)} bytes  {TEXT!r}")
    print(f"{'case':20s} {'bits/byte':>10s} {'logit std':>9s} {'max p':>6s} "
          f"{'rel diff tf':>11s} {'max|diff|':>9s}")
    for r in report:
        rd = f"{r['rel_diff']:.2e}" if "rel_diff" in r else "-"
        md = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else "-"
        print(f"{r['name']:20s} {r['bpb']:10.6f} {r['logit_std']:9.3f} {r['max_prob']:6.3f} "
              f"{rd:>11s} {md:>9s}")
        if "loss" in r:
            print(f"{'':20s} loss {r['loss']:.6f}  |grad| {r['grad_norm']:.4f}  "
                  f"finite-difference rel err {fd_err:.1e}")
        if "ln_check_rel_diff" in r:
            print(f"{'':20s} LayerNorm-swapped transformers rel diff {r['ln_check_rel_diff']:.2e}")
        if "hf_bytes_identical" in r:
            print(f"{'':20s} model.safetensors byte-identical to save_pretrained: "
                  f"{r['hf_bytes_identical']}")
    print("verified: reload-from-disk logits/states exact; stepwise recurrence matches prefill")
    total = 0
    for dirpath, _, names in sorted(os.walk(out)):
        for n in sorted(names):
            p = os.path.join(dirpath, n)
            size = os.path.getsize(p)
            total += size
            digest = hashlib.sha256(open(p, "rb").read()).hexdigest()[:12]
            print(f"{size:8d}  {digest}  {os.path.relpath(p, out)}")
    print(f"{total:8d}  total")
    assert total < SIZE_LIMIT, f"golden folder is {total} bytes, limit {SIZE_LIMIT}"


if __name__ == "__main__":
    main()
