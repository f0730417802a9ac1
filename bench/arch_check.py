"""Architectures the bench models lack, with random weights: does every promise hold?

The bench's real models are CNNs and a CRNN/SVTR. Users bring more: squeeze-excitation blocks,
channel shuffles, dense blocks, grouped convs, U-Nets, transformers (a ViT among them, a BERT
written as HF writes it, with separate query, key and value projections, and a language model
whose output layer is tied to its embedding table), ConvNeXt-style channels-last
MLPs, an MLP-Mixer, GRUs, a CRNN (conv features per column into a BiLSTM), embeddings of token ids,
float16 exports. Each is built here with torch (random weights, batch-norm statistics
randomised) and compressed at several tolerances (all passes, default options: N(0, 1) probes,
token ids over their table's rows). Per row: the exit, the result's validity and interface, the
deviation on 256 new probes from the tool's probe distribution measured as the tool measures
(``bench.tail_check.tail``), the latency guard's ratio, the tool's seconds, MACs and bytes.
Random weights say nothing about how much a trained model of the kind compresses; the rows say
whether the tool is correct, honest and not slower on these graphs.

    python -m bench.arch_check [--models a,b] [--tolerances 0,0.01,0.1,0.5] [--out bench/arch_check.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import onnx

from .common import BENCH_DIR, CACHE

TOLERANCES = (0.0, 0.01, 0.1, 0.5)
PROBES = 256
OUT = CACHE / "arch"


def _nets():
    """name → (module factory, input shape, input dtype); built lazily (torch is a bench dependency)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class SE(nn.Module):
        def __init__(s, c):
            super().__init__()
            s.fc1, s.fc2 = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

        def forward(s, x):
            return x * torch.sigmoid(s.fc2(F.relu(s.fc1(F.adaptive_avg_pool2d(x, 1)))))

    def mbconv(c_in, c_mid, c_out, stride):
        return nn.Sequential(nn.Conv2d(c_in, c_mid, 1), nn.BatchNorm2d(c_mid), nn.SiLU(),
                             nn.Conv2d(c_mid, c_mid, 3, stride, 1, groups=c_mid), nn.BatchNorm2d(c_mid), nn.SiLU(),
                             SE(c_mid), nn.Conv2d(c_mid, c_out, 1), nn.BatchNorm2d(c_out))

    class EfficientNetLike(nn.Module):  # inverted residuals with squeeze-excitation, SiLU
        def __init__(s):
            super().__init__()
            s.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.SiLU())
            s.b1, s.b2 = mbconv(16, 64, 16, 1), mbconv(16, 96, 32, 2)
            s.head, s.fc = nn.Sequential(nn.Conv2d(32, 128, 1), nn.BatchNorm2d(128), nn.SiLU()), nn.Linear(128, 10)

        def forward(s, x):
            x = s.stem(x)
            x = s.head(s.b2(x + s.b1(x)))
            return s.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    class ShuffleNetLike(nn.Module):  # channel split, concat and shuffle (Reshape/Transpose on channels)
        def __init__(s):
            super().__init__()
            s.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU())
            s.branch = nn.Sequential(nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
                                     nn.Conv2d(16, 16, 3, 1, 1, groups=16), nn.BatchNorm2d(16),
                                     nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16), nn.ReLU())
            s.conv, s.fc = nn.Sequential(nn.Conv2d(32, 64, 1), nn.BatchNorm2d(64), nn.ReLU()), nn.Linear(64, 10)

        def forward(s, x):
            x = s.stem(x)
            for _ in range(2):
                a, b = x.chunk(2, dim=1)
                x = torch.cat([a, s.branch(b)], 1)
                n, c, h, w = x.shape
                x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
            return s.fc(torch.flatten(F.adaptive_avg_pool2d(s.conv(x), 1), 1))

    class UNetLike(nn.Module):  # ConvTranspose and bilinear Resize, skip Concat
        def __init__(s):
            super().__init__()
            s.e1 = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU())
            s.e2 = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU())
            s.up, s.up2 = nn.ConvTranspose2d(32, 16, 2, 2), nn.Conv2d(32, 16, 1)
            s.d1 = nn.Sequential(nn.Conv2d(48, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 2, 1))

        def forward(s, x):
            a = s.e1(x)
            b = s.e2(a)
            r = F.interpolate(s.up2(b), scale_factor=2, mode="bilinear", align_corners=False)
            return s.d1(torch.cat([a, s.up(b), r], 1))

    def encoder(d, heads, hidden, activation="relu"):
        enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, heads, hidden, dropout=0.0, batch_first=True,
                                                               activation=activation), 2, enable_nested_tensor=False)
        for p in enc.parameters():  # the layers are deep copies of one: give each its own values
            nn.init.xavier_uniform_(p) if p.dim() > 1 else nn.init.uniform_(p, -0.1, 0.1)
        return enc

    class TransformerLike(nn.Module):  # 2 encoder layers on 12 tokens of 16 features
        def __init__(s):
            super().__init__()
            s.emb, s.enc, s.head = nn.Linear(16, 64), encoder(64, 4, 128), nn.Linear(64, 5)

        def forward(s, x):
            return s.head(s.enc(s.emb(x)))

    class BertLike(nn.Module):  # token ids → embedding → 2 GELU encoder layers → first token → classes
        def __init__(s):
            super().__init__()
            s.emb, s.pos = nn.Embedding(100, 32), nn.Parameter(torch.randn(1, 12, 32) * 0.1)
            s.enc, s.cls = encoder(32, 4, 64, "gelu"), nn.Linear(32, 3)

        def forward(s, ids):
            return s.cls(s.enc(s.emb(ids) + s.pos)[:, 0])

    class HFLayer(nn.Module):  # a BERT layer as HF writes it: separate q, k, v projections, views into heads
        def __init__(s, d=32, heads=4):
            super().__init__()
            s.heads, s.size = heads, d // heads
            s.q, s.k, s.v, s.o = (nn.Linear(d, d) for _ in range(4))
            s.ff1, s.ff2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
            s.ln1, s.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)

        def forward(s, x):
            def heads(y):
                return y.view(y.size()[:-1] + (s.heads, s.size)).permute(0, 2, 1, 3)

            scores = heads(s.q(x)) @ heads(s.k(x)).transpose(-1, -2) / s.size ** 0.5
            c = (torch.softmax(scores, dim=-1) @ heads(s.v(x))).permute(0, 2, 1, 3).contiguous()
            x = s.ln1(x + s.o(c.view(c.size()[:-2] + (s.heads * s.size,))))
            return s.ln2(x + s.ff2(F.gelu(s.ff1(x))))

    class HFBertLike(nn.Module):  # token ids → embedding → 2 HF-style BERT layers → first token → classes
        def __init__(s):
            super().__init__()
            s.emb, s.pos = nn.Embedding(100, 32), nn.Parameter(torch.randn(1, 12, 32) * 0.1)
            s.layers, s.cls = nn.Sequential(HFLayer(), HFLayer()), nn.Linear(32, 3)

        def forward(s, ids):
            return s.cls(s.layers(s.emb(ids) + s.pos)[:, 0])

    class TiedLMLike(nn.Module):  # token ids → embedding → 2 GELU encoder layers → output layer tied to the table
        def __init__(s):
            super().__init__()
            s.emb, s.pos = nn.Embedding(100, 32), nn.Parameter(torch.randn(1, 12, 32) * 0.1)
            s.enc, s.head = encoder(32, 4, 64, "gelu"), nn.Linear(32, 100, bias=False)
            s.head.weight = s.emb.weight  # the exporter stores a transposed copy for the head

        def forward(s, ids):
            return s.head(s.enc(s.emb(ids) + s.pos))

    class ConvNeXtLike(nn.Module):  # depthwise 7x7, LayerNorm and MLP on channels last, layer scale
        def __init__(s):
            super().__init__()
            s.stem, s.dw, s.ln = nn.Conv2d(3, 32, 4, 4), nn.Conv2d(32, 32, 7, 1, 3, groups=32), nn.LayerNorm(32)
            s.pw1, s.pw2 = nn.Linear(32, 128), nn.Linear(128, 32)
            s.gamma, s.fc = nn.Parameter(torch.full((32,), 0.5)), nn.Linear(32, 10)

        def forward(s, x):
            x = s.stem(x)
            y = s.pw2(F.gelu(s.pw1(s.ln(s.dw(x).permute(0, 2, 3, 1))))) * s.gamma
            return s.fc((x + y.permute(0, 3, 1, 2)).mean((2, 3)))

    class GRULike(nn.Module):  # Conv1d, bidirectional GRU, per-step classes
        def __init__(s):
            super().__init__()
            s.conv, s.gru, s.fc = nn.Conv1d(8, 32, 3, padding=1), nn.GRU(32, 48, batch_first=True, bidirectional=True), \
                nn.Linear(96, 7)

        def forward(s, x):
            return s.fc(s.gru(F.relu(s.conv(x)).transpose(1, 2))[0])

    class CRNNLike(nn.Module):  # conv stack, per column the channels times the rows as features, BiLSTM, classes
        def __init__(s):
            super().__init__()
            s.convs = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d((2, 1)))
            s.lstm, s.fc = nn.LSTM(32 * 4, 48, bidirectional=True), nn.Linear(96, 11)

        def forward(s, x):
            f = s.convs(x)  # (N, 32, 4, W)
            n, c, h, w = f.shape
            return s.fc(s.lstm(f.permute(3, 0, 1, 2).reshape(w, n, c * h))[0])

    class DetectorHead(nn.Module):  # InstanceNorm, grouped conv, Hardswish, PixelShuffle, two outputs (sigmoid)
        def __init__(s):
            super().__init__()
            s.b = nn.Sequential(nn.Conv2d(3, 24, 3, 2, 1), nn.InstanceNorm2d(24, affine=True), nn.LeakyReLU(0.1),
                                nn.Conv2d(24, 48, 3, 2, 1, groups=2), nn.BatchNorm2d(48), nn.Hardswish())
            s.ps, s.c = nn.PixelShuffle(2), nn.Conv2d(12, 16, 3, 1, 1)
            s.cls, s.box = nn.Conv2d(16, 3, 1), nn.Conv2d(16, 4, 1)

        def forward(s, x):
            y = F.relu(s.c(s.ps(s.b(x))))
            return torch.sigmoid(s.cls(y)), s.box(y)

    class ViTLike(nn.Module):  # patch conv, class token, 2 pre-norm GELU encoder layers, LayerNorm, head
        def __init__(s, d=48):
            super().__init__()
            s.patch, s.cls = nn.Conv2d(3, d, 8, 8), nn.Parameter(torch.randn(1, 1, d) * 0.02)
            s.pos = nn.Parameter(torch.randn(1, 17, d) * 0.02)
            layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True, activation="gelu",
                                               norm_first=True)
            s.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            for p in s.enc.parameters():
                nn.init.xavier_uniform_(p) if p.dim() > 1 else nn.init.uniform_(p, -0.1, 0.1)
            s.norm, s.head = nn.LayerNorm(d), nn.Linear(d, 10)

        def forward(s, x):
            t = torch.cat([s.cls.expand(x.shape[0], -1, -1), s.patch(x).flatten(2).transpose(1, 2)], 1) + s.pos
            return s.head(s.norm(s.enc(t))[:, 0])

    class MixerLike(nn.Module):  # MLP-Mixer block: a token-mixing MLP (on the transposed tokens), a channel MLP
        def __init__(s, d=32):
            super().__init__()
            s.patch, s.ln1, s.ln2 = nn.Conv2d(3, d, 8, 8), nn.LayerNorm(d), nn.LayerNorm(d)
            s.tok = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
            s.ch, s.head = nn.Sequential(nn.Linear(d, 128), nn.GELU(), nn.Linear(128, d)), nn.Linear(d, 10)

        def forward(s, x):
            t = s.patch(x).flatten(2).transpose(1, 2)
            t = t + s.tok(s.ln1(t).transpose(1, 2)).transpose(1, 2)
            return s.head((t + s.ch(s.ln2(t))).mean(1))

    class DenseNetLike(nn.Module):  # dense layers: BN-ReLU-conv on the concat of all earlier maps; x.mean([2, 3]) head
        def __init__(s, growth=12, layers=4):
            super().__init__()
            s.stem = nn.Conv2d(3, 16, 3, 2, 1)
            s.layers = nn.ModuleList(
                nn.Sequential(nn.BatchNorm2d(16 + k * growth), nn.ReLU(), nn.Conv2d(16 + k * growth, 32, 1),
                              nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, growth, 3, 1, 1)) for k in range(layers))
            s.norm, s.fc = nn.BatchNorm2d(16 + layers * growth), nn.Linear(16 + layers * growth, 10)

        def forward(s, x):
            features = [s.stem(x)]
            for layer in s.layers:
                features.append(layer(torch.cat(features, 1)))
            return s.fc(F.relu(s.norm(torch.cat(features, 1))).mean([2, 3]))

    class ResNeXtLike(nn.Module):  # bottlenecks whose 3x3 conv is grouped (8 groups of 8 channels)
        def __init__(s, c=32, width=64, groups=8):
            super().__init__()
            s.stem = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1), nn.BatchNorm2d(c), nn.ReLU())
            s.blocks = nn.ModuleList(nn.Sequential(
                nn.Conv2d(c, width, 1), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, width, 3, 1, 1, groups=groups), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, c, 1), nn.BatchNorm2d(c)) for _ in range(2))
            s.fc = nn.Linear(c, 10)

        def forward(s, x):
            x = s.stem(x)
            for block in s.blocks:
                x = F.relu(x + block(x))
            return s.fc(x.mean([2, 3]))

    f32, f16, i64 = torch.float32, torch.float16, torch.int64
    return {
        "densenet_like": (DenseNetLike, (1, 3, 32, 32), f32),
        "resnext_like": (ResNeXtLike, (1, 3, 32, 32), f32),
        "efficientnet_like": (EfficientNetLike, (1, 3, 64, 64), f32),
        "shufflenet_like": (ShuffleNetLike, (1, 3, 64, 64), f32),
        "unet_like": (UNetLike, (1, 3, 32, 32), f32),
        "transformer_like": (TransformerLike, (1, 12, 16), f32),
        "bert_like": (BertLike, (1, 12), i64),
        "hf_bert_like": (HFBertLike, (1, 12), i64),
        "tied_lm_like": (TiedLMLike, (1, 12), i64),
        "convnext_like": (ConvNeXtLike, (1, 3, 64, 64), f32),
        "vit_like": (ViTLike, (1, 3, 32, 32), f32),
        "mixer_like": (MixerLike, (1, 3, 32, 32), f32),
        "gru_like": (GRULike, (1, 8, 20), f32),
        "crnn_like": (CRNNLike, (1, 1, 16, 32), f32),
        "detector_head": (DetectorHead, (1, 3, 64, 64), f32),
        "efficientnet_like_fp16": (EfficientNetLike, (1, 3, 64, 64), f16),
        "unet_like_fp16": (UNetLike, (1, 3, 32, 32), f16),
    }


def build(name: str) -> Path:
    import torch
    from torch import nn

    out = OUT / f"{name}.onnx"
    if out.exists():
        return out
    factory, shape, dtype = _nets()[name]
    torch.manual_seed(0)
    net = factory().eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.2, 0.2)
    x = torch.randint(0, 100, shape) if dtype == torch.int64 else torch.randn(*shape)
    if dtype == torch.float16:
        net, x = net.half(), x.half()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".part.onnx")
    torch.onnx.export(net, x, str(tmp), input_names=["x"], dynamic_axes={"x": {0: "n"}}, opset_version=17,
                      dynamo=False)
    tmp.replace(out)
    return out


def check(name: str, tolerances) -> list[dict]:
    import red_onnx
    from red_onnx.budget import random_probes
    from red_onnx.layers import input_specs

    from .tail_check import tail

    path = build(name)
    original = onnx.load(str(path))
    specs = input_specs(original)
    ranges = {"x": (0, 99)} if np.issubdtype(specs["x"][1], np.integer) else None  # as the tool probes token ids
    probes = random_probes(specs, PROBES, np.random.default_rng(2026), ranges)
    rows = []
    for tol in tolerances:
        t0 = time.perf_counter()
        try:
            result, report = red_onnx.compress(str(path), tolerance=tol)
        except Exception as err:  # a failure is a row, not the end of the run
            rows.append({"model": name, "tolerance": tol, "error": f"{type(err).__name__}: {err}"})
            print(json.dumps(rows[-1]), flush=True)
            continue
        seconds = time.perf_counter() - t0
        onnx.checker.check_model(result, full_check=True)
        same_interface = [(i.name, i.type) for i in result.graph.input] == \
            [(i.name, i.type) for i in original.graph.input] and \
            [(o.name, o.type) for o in result.graph.output] == [(o.name, o.type) for o in original.graph.output]
        d = tail(original, result, probes)
        allowed = tol if tol > 0 else red_onnx.pipeline._rounding(original)
        rows.append({
            "model": name, "tolerance": tol, "interface": same_interface, "tool_max": report.output_deviation,
            "share_above": float(np.mean(d > allowed)), "allowed_share": 3 / report.verification["probes"],
            "worst": float(d.max()), "macs": report.macs_after / report.macs_before,
            "bytes": report.bytes_after / report.bytes_before,
            "latency": (report.latency or {}).get("ratio"), "seconds": seconds,
            "notes": [n for n in report.notes if "integer input" in n or "latency guard" in n],
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def write(rows: list[dict], out: Path) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=BENCH_DIR).stdout.strip()
    lines = [
        "# Architectures the bench lacks, random weights (`python -m bench.arch_check`)",
        "",
        f"red_onnx at {commit}, all passes, default options; {PROBES} new probes from the tool's distribution "
        f"(N(0, 1); token ids uniform over the embedding's 100 rows), measured as the tool measures. "
        f"{platform.machine()}, Python {platform.python_version()}. See the module docstring for the nets; "
        "random weights: the MACs and bytes say nothing about a trained model of the kind.",
        "",
        "`ok`: a valid model with the input's interface, and the share of new probes above the tolerance (at 0: "
        "above the float rounding allowed) at most 3/N, N the tool's fresh probes. Latency: the guard's ratio "
        "of the result's onnxruntime time to the input's (one thread), where it timed.",
        "",
        "| model | T | ok | worst on new probes | share above | tool's max | MACs | bytes | latency | tool s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['tolerance']:g} | **error** {r['error'][:100]} |||||||| ")
            continue
        ok = r["interface"] and r["share_above"] <= r["allowed_share"]
        lat = f"{r['latency']:.2f}" if r["latency"] is not None else "-"
        lines.append(f"| {r['model']} | {r['tolerance']:g} | {'yes' if ok else '**no**'} | {r['worst']:.3g} | "
                     f"{r['share_above']:.1%} | {r['tool_max']:.3g} | {r['macs']:.3f} | {r['bytes']:.3f} | {lat} | "
                     f"{r['seconds']:.1f} |")
    notes = sorted({n for r in rows for n in r.get("notes", [])})
    if notes:
        lines += ["", "Notes the tool gave on these rows:", ""] + [f"- {n}" for n in notes]
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None)
    parser.add_argument("--tolerances", default=",".join(f"{t:g}" for t in TOLERANCES))
    parser.add_argument("--out", default=str(BENCH_DIR / "arch_check.md"))
    args = parser.parse_args(argv)
    names = args.models.split(",") if args.models else list(_nets())
    rows = []
    for name in names:
        rows += check(name, [float(t) for t in args.tolerances.split(",")])
    write(rows, Path(args.out))


if __name__ == "__main__":
    main()
