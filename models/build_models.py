"""Train and export the two small digits classifiers used by red_onnx's
benchmark and tests.

    python models/build_models.py

rebuilds ``models/digits_cnn.onnx`` and ``models/digits_resnet.onnx`` and
prints their parameter counts and their test accuracy measured with
onnxruntime on the exported files.

Importing this module has no side effects and does not import torch: the
benchmark and tests use ``digits_split()`` only, e.g.::

    sys.path.insert(0, REPO_ROOT)
    from models.build_models import digits_split
"""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np

MODELS_DIR = os.path.dirname(os.path.abspath(__file__))
CNN_PATH = os.path.join(MODELS_DIR, "digits_cnn.onnx")
RESNET_PATH = os.path.join(MODELS_DIR, "digits_resnet.onnx")

SEED = 0
OPSET = 17


# ---------------------------------------------------------------- data


def digits_split():
    """Return ``(x_train, y_train, x_test, y_test)`` for sklearn's digits.

    Images are float32 of shape [N, 1, 8, 8] with values pixel/16 in
    [0, 1]; labels are int64. The split is a fixed stratified
    ``train_test_split(test_size=0.3, random_state=0)`` (1257 train / 540
    test).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.3, random_state=0, stratify=y
    )
    return (
        np.ascontiguousarray(x_train, dtype=np.float32),
        np.ascontiguousarray(y_train, dtype=np.int64),
        np.ascontiguousarray(x_test, dtype=np.float32),
        np.ascontiguousarray(y_test, dtype=np.int64),
    )


# ---------------------------------------------------------------- models
# torch is imported inside functions only (see module docstring).


def _make_cnn():
    import torch.nn as nn

    # 24,226 trainable parameters (BN weight+bias included; BN running
    # mean/var are buffers and not counted).
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 8x8 -> 4x4
        nn.Conv2d(32, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 4x4 -> 2x2
        nn.Flatten(),
        nn.Linear(32 * 2 * 2, 72),
        nn.ReLU(),
        nn.Linear(72, 10),
    )


def _make_resnet():
    import torch.nn as nn

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.relu1 = nn.ReLU()
            self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu2 = nn.ReLU()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(cout),
                )
            else:
                self.shortcut = nn.Identity()

        def forward(self, x):
            out = self.relu1(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu2(out + self.shortcut(x))

    class DigitsResNet(nn.Module):
        # 42,938 trainable parameters.
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1, bias=False),
                nn.BatchNorm2d(16),
                nn.ReLU(),
            )
            self.layers = nn.Sequential(
                BasicBlock(16, 16, 1),  # 8x8
                BasicBlock(16, 16, 1),  # 8x8
                BasicBlock(16, 32, 2),  # 8x8 -> 4x4, 1x1 projection shortcut
                BasicBlock(32, 32, 1),  # 4x4
            )
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.flatten = nn.Flatten()
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            return self.fc(self.flatten(self.pool(self.layers(self.stem(x)))))

    return DigitsResNet()


# ---------------------------------------------------------------- training


def _setup_torch():
    import torch

    torch.manual_seed(SEED)
    np.random.seed(SEED)
    # One intra-op thread: CPU kernels then reduce in a fixed order, so the
    # trained weights do not depend on the machine's core count.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    return torch


def _train(model, x_train, y_train, epochs, lr, seed):
    torch = _setup_torch()
    torch.manual_seed(seed)
    rng = np.random.RandomState(seed)

    xt = torch.from_numpy(x_train)
    yt = torch.from_numpy(y_train)
    n = len(xt)
    batch = 64
    steps_per_epoch = (n + batch - 1) // batch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch
    )
    loss_fn = torch.nn.CrossEntropyLoss()

    model.train()
    for _ in range(epochs):
        perm = torch.from_numpy(rng.permutation(n))
        for i in range(steps_per_epoch):
            idx = perm[i * batch : (i + 1) * batch]
            xb = xt[idx]
            # light augmentation: random shift by up to 1 pixel (zero fill)
            dx, dy = rng.randint(-1, 2, size=2)
            if dx or dy:
                xb = torch.roll(xb, shifts=(int(dy), int(dx)), dims=(2, 3))
                if dy == 1:
                    xb[:, :, 0, :] = 0
                elif dy == -1:
                    xb[:, :, -1, :] = 0
                if dx == 1:
                    xb[:, :, :, 0] = 0
                elif dx == -1:
                    xb[:, :, :, -1] = 0
            opt.zero_grad()
            loss = loss_fn(model(xb), yt[idx])
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- export


def _export(model, path, keep_bn):
    import torch

    model.eval()
    dummy = torch.zeros(2, 1, 8, 8)
    kwargs = dict(
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=OPSET,
        dynamo=False,
        external_data=False,
    )
    if keep_bn:
        # PRESERVE + eval(): BatchNormalization nodes stay in the graph in
        # inference form (training_mode=0, running statistics); with
        # TrainingMode.EVAL the exporter folds them into the convolutions.
        # Constant folding is off as the exporter recommends for PRESERVE;
        # for this model the file is byte-identical either way.
        kwargs.update(training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    else:
        kwargs.update(training=torch.onnx.TrainingMode.EVAL)
    with torch.no_grad(), warnings.catch_warnings():
        # the legacy (TorchScript) exporter warns that it is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (dummy,), path, **kwargs)
    assert not model.training


# ---------------------------------------------------------------- checks


def op_counts(path):
    import collections

    import onnx

    m = onnx.load(path)
    return dict(sorted(collections.Counter(n.op_type for n in m.graph.node).items()))


def initializer_elements(path):
    import onnx
    from onnx import numpy_helper

    m = onnx.load(path)
    return sum(numpy_helper.to_array(t).size for t in m.graph.initializer)


def ort_logits(path, x):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


def ort_accuracy(path, x, y):
    return float((ort_logits(path, x).argmax(1) == y).mean())


def check_model(path, torch_model, x_test, y_test, expect_bn):
    """onnx checker, graph I/O spec, BN presence, torch==ORT, accuracy."""
    import onnx
    import torch

    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    assert m.opset_import[0].version == OPSET, m.opset_import
    (inp,) = m.graph.input
    (out,) = m.graph.output
    assert inp.name == "input" and out.name == "logits"
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert in_dims == ["batch", 1, 8, 8], in_dims
    assert out_dims == ["batch", 10], out_dims
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)

    ops = op_counts(path)
    n_bn = ops.get("BatchNormalization", 0)
    if expect_bn:
        assert n_bn > 0, ops
        for node in m.graph.node:
            if node.op_type == "BatchNormalization":
                tm = [a.i for a in node.attribute if a.name == "training_mode"]
                assert tm in ([], [0]), (node.name, tm)
                assert len(node.output) == 1, node.name
    else:
        assert n_bn == 0, ops

    with torch.no_grad():
        ref = torch_model.eval()(torch.from_numpy(x_test)).numpy()
    got = ort_logits(path, x_test)
    max_diff = float(np.abs(ref - got).max())
    assert max_diff < 1e-4, max_diff
    # a single sample and a batch differ only in batch size (dynamic axis,
    # and BN must not use batch statistics)
    one = ort_logits(path, x_test[:1])
    assert np.abs(one - got[:1]).max() < 1e-4

    acc = ort_accuracy(path, x_test, y_test)
    torch_acc = float((ref.argmax(1) == y_test).mean())
    return acc, torch_acc, max_diff, ops


# ---------------------------------------------------------------- main


def build_cnn(x_train, y_train):
    torch = _setup_torch()
    torch.manual_seed(SEED)
    model = _make_cnn()
    return _train(model, x_train, y_train, epochs=40, lr=3e-3, seed=SEED)


def build_resnet(x_train, y_train):
    torch = _setup_torch()
    torch.manual_seed(SEED)
    model = _make_resnet()
    return _train(model, x_train, y_train, epochs=40, lr=3e-3, seed=SEED)


def main():
    import time

    x_train, y_train, x_test, y_test = digits_split()
    print(f"digits: train {x_train.shape}, test {x_test.shape}")
    specs = [
        ("digits_cnn", CNN_PATH, build_cnn, True),
        ("digits_resnet", RESNET_PATH, build_resnet, False),
    ]
    for name, path, build, keep_bn in specs:
        t0 = time.perf_counter()
        model = build(x_train, y_train)
        t_train = time.perf_counter() - t0
        _export(model, path, keep_bn=keep_bn)
        acc, torch_acc, max_diff, ops = check_model(path, model, x_test, y_test, keep_bn)
        print(f"{name}: {os.path.relpath(path)}")
        print(f"  torch parameters     {_n_params(model):,}")
        print(f"  ONNX initializer elements {initializer_elements(path):,}")
        print(f"  file size            {os.path.getsize(path):,} bytes")
        print(f"  train time           {t_train:.1f} s")
        print(f"  ops                  {ops}")
        print(f"  max |torch - ORT|    {max_diff:.2e}")
        print(f"  test accuracy (ORT)  {acc:.4f}  (torch {torch_acc:.4f})")
        assert os.path.getsize(path) < 1 << 20
    return 0


if __name__ == "__main__":
    sys.exit(main())
