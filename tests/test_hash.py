"""Weight hashing (passes/hash.py: run) and codebook storage (passes/hash.py: encode) through
red_onnx.compress.

Storage is checked bit for bit: the weights an encoded model decodes (``Cast → Gather [→ Mul]``,
evaluated in numpy with the same float32 arithmetic *and* by onnxruntime on the subgraph alone) must
equal, as bit patterns, the plain weights of the same pipeline run with ``codebook="off"``.
Hashing is checked on the two reference models under the shared budget.
"""

from __future__ import annotations


import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from hypothesis import given, settings, strategies as st

import red_onnx
from red_onnx import kde, layers as layers_mod
from red_onnx.passes import codebook as codebook_pass, hash as hash_pass

from conftest import REPO, Builder, assert_same_outputs, op_counts, random_feeds, rel_l2, run

DIGITS = {"cnn": REPO / "models" / "digits_cnn.onnx", "resnet": REPO / "models" / "digits_resnet.onnx"}
LINEAR = ("Conv", "ConvTranspose", "Gemm", "MatMul")
BITS = {np.dtype(np.float16): np.uint16, np.dtype(np.float32): np.uint32, np.dtype(np.float64): np.uint64}


# --------------------------------------------------------------------------------------------- #
# decoding an encoded model


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def chain(model: onnx.ModelProto, tensor: str) -> dict | None:
    """The codebook chain producing ``tensor`` (checked to be exactly Cast(int32) → Gather(axis 0)
    [→ Mul(scales)] over initializers, or Cast of a float16 initializer), or None if ``tensor`` is
    an initializer."""
    inits, prod = _inits(model), _producers(model)
    if tensor in inits:
        return None
    node = prod[tensor]
    if node.op_type == "Cast" and node.input[0] in inits and inits[node.input[0]].dtype == np.float16:
        to = helper.tensor_dtype_to_np_dtype(_attr(node, "to"))
        assert to in (np.float32, np.float64), to
        return {"half": inits[node.input[0]], "dtype": np.dtype(to), "nodes": [node], "output": tensor}
    scales = None
    nodes = []
    if node.op_type == "Mul":
        gathered, scale_name = node.input
        assert scale_name in inits, "scales must be an initializer"
        scales = inits[scale_name]
        nodes.append(node)
        node = prod[gathered]
    assert node.op_type == "Gather" and _attr(node, "axis", 0) == 0, node.op_type
    book_name, idx32 = node.input
    assert book_name in inits, "codebook must be an initializer"
    cast = prod[idx32]
    assert cast.op_type == "Cast" and _attr(cast, "to") == onnx.TensorProto.INT32
    indices = inits[cast.input[0]]
    assert indices.dtype in (np.uint8, np.uint16), indices.dtype
    nodes += [node, cast]
    return {"indices": indices, "codebook": inits[book_name], "scales": scales, "nodes": nodes[::-1],
            "output": tensor}


def numpy_decode(c: dict) -> np.ndarray:
    if "half" in c:
        return c["half"].astype(c["dtype"])
    book = c["codebook"]
    out = book[c["indices"].astype(np.int32)]
    if c["scales"] is not None:
        out = out * c["scales"]  # same dtype, one correctly rounded multiply: what Mul computes
        assert out.dtype == book.dtype
    return out


def ort_decode(model: onnx.ModelProto, c: dict) -> np.ndarray:
    """Run just the codebook subgraph in onnxruntime (no graph inputs, optimizations off)."""
    inits = _inits(model)
    used = {i for n in c["nodes"] for i in n.input if i in inits}
    elem = helper.np_dtype_to_tensor_dtype(c["dtype"] if "half" in c else c["codebook"].dtype)
    graph = helper.make_graph(c["nodes"], "decode", [], [helper.make_tensor_value_info(c["output"], elem, None)],
                              [numpy_helper.from_array(inits[n], n) for n in sorted(used)])
    sub = helper.make_model(graph, opset_imports=list(model.opset_import))
    sub.ir_version = model.ir_version
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(sub.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {})[0]


def layer_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every linear node's weight as the node sees it (decoded where encoded), by node name.
    Encoded weights are decoded in numpy and in onnxruntime, which must agree bit for bit."""
    inits = _inits(model)
    result = {}
    for n in model.graph.node:
        if n.op_type not in LINEAR or len(n.input) < 2:
            continue
        c = chain(model, n.input[1])
        if c is None:
            result[n.name] = inits[n.input[1]]
            continue
        dec = numpy_decode(c)
        assert_bits_equal(ort_decode(model, c), dec)
        result[n.name] = dec
    return result


def assert_bits_equal(a: np.ndarray, b: np.ndarray, what: str = "") -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    bits = BITS[a.dtype]
    differ = int(np.count_nonzero(a.view(bits) != b.view(bits)))
    assert differ == 0, f"{what}: {differ} of {a.size} values differ in their bit pattern"


def encoded(model: onnx.ModelProto) -> dict[str, dict]:
    """The codebook chain of every linear node whose weight is computed, by node name."""
    return {n.name: c for n in model.graph.node if n.op_type in LINEAR and len(n.input) > 1
            and (c := chain(model, n.input[1])) is not None}


def pass_row(report, name: str) -> dict:
    rows = [p for p in report.passes if p["name"] == name]
    assert len(rows) == 1, [p["name"] for p in report.passes]
    return rows[0]


def codebook_rows(report) -> dict[str, dict]:
    """encode's per-weight rows (report.layers keyed by the weight's name)."""
    return {r["name"]: r["codebook"] for r in report.layers if "codebook" in r}


def assert_standard_ops(model: onnx.ModelProto) -> None:
    for n in model.graph.node:
        assert n.domain in ("", "ai.onnx"), n.domain
        assert onnx.defs.has(n.op_type), n.op_type


def session_opt(model: onnx.ModelProto, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------------------- #
# models whose weights take few values


def few_values(rng: np.random.Generator, shape, levels: int = 40, pow2: bool = False) -> np.ndarray:
    """A view-layout weight (out, ...) drawn from ``levels`` float32 values; ``pow2``: channel c is
    further multiplied by its own power of two (exact), and holds the largest level (same binade)."""
    book = (rng.standard_normal(levels) * 0.3).astype(np.float32)
    w = book[rng.integers(0, levels, shape)]
    if pow2:
        w.reshape(shape[0], -1)[:, 0] = book[np.argmax(np.abs(book))]
        exps = rng.integers(-6, 7, shape[0])
        w = (w * np.ldexp(np.float32(1), exps).astype(np.float32).reshape((-1,) + (1,) * (len(shape) - 1)))
        w = w.astype(np.float32)
        assert len(np.unique(w)) > 256, "the per-channel-scale path must be needed"
    else:
        assert len(np.unique(w)) <= 256
    return w


def build(kind: str, variant: str, seed: int = 0) -> onnx.ModelProto:
    """One linear layer of ``kind`` with a few-valued weight (variant "few"), few values times a
    power of two per channel ("pow2"), or few values then a channel affine map that the fold
    multiplies in ("bn": BatchNormalization, or a Mul by a per-channel non-power-of-two constant)."""
    b = Builder(seed=seed)
    rng = np.random.default_rng(seed + 100)
    levels = 30 if variant == "bn" else 40
    pow2 = variant == "pow2"
    if kind in ("conv", "conv_transpose"):
        c_in, c_out = (8, 32) if kind == "conv" else (8, 16)
        x = b.input("x", ["N", c_in, 6, 6])
        view = few_values(rng, (c_out, c_in, 3, 3), levels, pow2)
        if kind == "conv":
            y = b.node("Conv", [x, b.init(view, "W"), b.init(rng.standard_normal(c_out), "B")], name="layer",
                       kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        else:
            y = b.node("ConvTranspose", [x, b.init(view.swapaxes(0, 1).copy(), "W"), b.init(rng.standard_normal(c_out),
                                                                                          "B")],
                       name="layer", kernel_shape=[3, 3])
        if variant == "bn":
            y = b.bn(y, c_out, name="bn")
        b.output(y, ["N", c_out, 6, 6] if kind == "conv" else ["N", c_out, 8, 8])
        return b.model()
    k, n = 64, 32
    x = b.input("x", ["N", k])
    view = few_values(rng, (n, k), levels, pow2)
    if kind == "gemm_t1":
        y = b.node("Gemm", [x, b.init(view, "W"), b.init(rng.standard_normal(n), "B")], name="layer", transB=1)
    elif kind == "gemm_t0":
        y = b.node("Gemm", [x, b.init(view.T.copy(), "W"), b.init(rng.standard_normal(n), "B")], name="layer",
                   transB=0)
    else:
        y = b.node("MatMul", [x, b.init(view.T.copy(), "W")], name="layer")
        y = b.node("Add", [y, b.init(rng.standard_normal(n), "B")], name="layer_bias")
    if variant == "bn":
        if kind == "gemm_t0":
            y = b.bn(y, n, name="bn")
        else:  # Paddle-style unfused scale
            y = b.node("Mul", [y, b.init(rng.uniform(0.3, 3.0, n) * rng.choice([-1.0, 1.0], n), "S")], name="scale")
    b.output(y, ["N", n])
    return b.model()


KINDS = ["conv", "conv_transpose", "gemm_t1", "gemm_t0", "matmul"]


@pytest.mark.parametrize("variant", ["few", "pow2", "bn"])
@pytest.mark.parametrize("kind", KINDS)
def test_codebook_storage_is_exact_bit_for_bit(kind, variant):
    model = build(kind, variant)
    result, report = red_onnx.compress(model, tolerance=0)
    plain, plain_report = red_onnx.compress(model, tolerance=0, codebook="off")
    onnx.checker.check_model(result, full_check=True)
    assert_standard_ops(result)
    assert report.verified and plain_report.verified

    # the reference run keeps every weight plain; the encoded run decodes to the same bits
    assert not encoded(plain) and "Gather" not in op_counts(plain)
    enc = encoded(result)
    assert set(enc) == {"layer"}, f"{kind}/{variant}: the layer's weight was not encoded"
    decoded, reference = layer_weights(result), layer_weights(plain)
    assert decoded.keys() == reference.keys()
    for name in reference:
        assert_bits_equal(decoded[name], reference[name], name)

    c = enc["layer"]
    rows = codebook_rows(report)
    assert len(rows) == 1
    row = next(iter(rows.values()))
    assert row["index"] == "uint8" and c["indices"].dtype == np.uint8
    assert row["codebook_entries"] == c["codebook"].size <= 256
    assert row["per_channel_scale"] is (variant != "few") is (c["scales"] is not None)
    assert row["shared_by"] == 1 and row["bytes_after"] < row["bytes_before"]
    assert pass_row(report, "codebook")["weights_encoded"] == 1

    # outputs: equal to the input model to float rounding, identical to the plain result
    assert_same_outputs(model, result)
    feeds = random_feeds(model, np.random.default_rng(5))
    for y, y2 in zip(run(plain, feeds), run(result, feeds)):
        np.testing.assert_array_equal(y, y2)

    # size and parameter accounting: indices count as the weights they expand to
    assert report.bytes_after < report.bytes_before
    assert report.bytes_after < plain_report.bytes_after
    extra = c["codebook"].size + (c["scales"].size if c["scales"] is not None else 0)
    assert report.params_after == plain_report.params_after + extra
    assert report.params_before == plain_report.params_before
    assert report.params_before - 4 * 32 <= report.params_after <= report.params_before + extra


def test_signed_zeros_survive_the_codebook():
    """A pruned conv (many zeros) followed by BN with some negative gammas: the fold turns the
    zeros of those channels into -0.0. Storage must keep the sign bit of each zero ("bit for bit")."""
    b = Builder(seed=3)
    rng = np.random.default_rng(3)
    levels = np.array([-0.5, -0.25, 0.0, 0.0, 0.0, 0.25, 0.5], np.float32)
    w = levels[rng.integers(0, levels.size, (32, 8, 3, 3))]
    x = b.input("x", ["N", 8, 6, 6])
    y = b.node("Conv", [x, b.init(w, "W")], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    b.output(b.bn(y, 32, name="bn"), ["N", 32, 6, 6])
    model = b.model()
    result, _ = red_onnx.compress(model, tolerance=0)
    plain, _ = red_onnx.compress(model, tolerance=0, codebook="off")
    reference = layer_weights(plain)["conv"]
    assert np.signbit(reference[reference == 0]).any() and (~np.signbit(reference[reference == 0])).any()
    assert "conv" in encoded(result)
    assert_bits_equal(layer_weights(result)["conv"], reference, "conv")


def test_new_tensor_names_do_not_collide_with_existing_ones():
    """The model already has a tensor called '<weight>_codebook' (here: the Gemm's bias)."""
    b = Builder(seed=4)
    rng = np.random.default_rng(4)
    x = b.input("x", ["N", 64])
    w = few_values(rng, (32, 64))
    y = b.node("Gemm", [x, b.init(w, "W"), b.init(rng.standard_normal(32), "W_codebook")], name="fc", transB=1)
    b.output(b.relu(y), ["N", 32])
    model = b.model()
    result, report = red_onnx.compress(model, tolerance=0)
    onnx.checker.check_model(result, full_check=True)
    assert "fc" in encoded(result)
    assert_same_outputs(model, result)


# --------------------------------------------------------------------------------------------- #
# what is encoded and what is not


def test_shared_weight_is_encoded_once_and_every_user_reads_it():
    """An unrolled recurrent cell: three Gemm nodes share one weight."""
    b = Builder(seed=5)
    rng = np.random.default_rng(5)
    w = few_values(rng, (48, 48))
    wname = b.init(w, "W_hh")
    h = b.input("x", ["N", 48])
    users = []
    for step in range(3):
        users.append(f"step{step}")
        h = b.node("Tanh", [b.node("Gemm", [h, wname], name=users[-1], transB=1)])
    b.output(h, ["N", 48])
    model = b.model()
    result, report = red_onnx.compress(model, tolerance=0)
    plain, plain_report = red_onnx.compress(model, tolerance=0, codebook="off")
    onnx.checker.check_model(result, full_check=True)
    counts = op_counts(result)
    assert counts.get("Cast") == 1 and counts.get("Gather") == 1 and counts.get("Gemm") == 3
    gemms = [n for n in result.graph.node if n.op_type == "Gemm"]
    assert {n.name for n in gemms} == set(users)
    assert len({n.input[1] for n in gemms}) == 1  # all read the one decoded tensor
    enc = encoded(result)
    assert set(enc) == set(users)
    rows = codebook_rows(report)
    assert list(rows) == ["W_hh"] and rows["W_hh"]["shared_by"] == 3
    decoded, reference = layer_weights(result), layer_weights(plain)
    for name in users:
        assert_bits_equal(decoded[name], reference[name], name)
        assert_bits_equal(decoded[name], w, name)
    assert sum(np.prod(t.dims) for t in result.graph.initializer) < w.size + 300  # stored once
    assert report.bytes_after < report.bytes_before
    assert_same_outputs(model, result)


def _two_layer_model(distinct_second: int, seed: int = 6) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """fc1: 40 distinct values; fc2: ``distinct_second`` distinct values, no power-of-two structure."""
    b = Builder(seed=seed)
    rng = np.random.default_rng(seed)
    w1 = few_values(rng, (64, 32))
    n2 = max(distinct_second, 8192)
    book = np.unique(rng.standard_normal(distinct_second * 2).astype(np.float32))[:distinct_second]
    assert book.size == distinct_second
    w2 = book[np.concatenate([np.arange(distinct_second), rng.integers(0, distinct_second, n2 - distinct_second)])]
    w2 = rng.permutation(w2).reshape(-1, 64)[: n2 // 64].astype(np.float32)
    x = b.input("x", ["N", 32])
    h = b.relu(b.node("Gemm", [x, b.init(w1, "W1")], name="fc1", transB=1))
    y = b.node("MatMul", [h, b.init(w2.T.copy(), "W2")], name="fc2")
    b.output(y, ["N", w2.shape[0]])
    return b.model(), w1, w2


def test_more_than_256_values_need_auto_and_uint16():
    model, w1, w2 = _two_layer_model(1000)
    assert len(np.unique(w2)) == 1000
    u8, r8 = red_onnx.compress(model, tolerance=0)  # default: uint8
    auto, ra = red_onnx.compress(model, tolerance=0, codebook="auto")
    plain, rp = red_onnx.compress(model, tolerance=0, codebook="off")
    for m in (u8, auto):
        onnx.checker.check_model(m, full_check=True)
        assert_standard_ops(m)
    assert set(encoded(u8)) == {"fc1"}
    assert encoded(u8)["fc1"]["indices"].dtype == np.uint8
    assert set(encoded(auto)) == {"fc1", "fc2"}
    assert encoded(auto)["fc1"]["indices"].dtype == np.uint8  # auto still picks the narrowest index
    assert encoded(auto)["fc2"]["indices"].dtype == np.uint16
    rows = codebook_rows(ra)
    assert rows["W2"]["index"] == "uint16" and rows["W2"]["codebook_entries"] == 1000
    assert rows["W1"]["index"] == "uint8"
    reference = layer_weights(plain)
    for m in (u8, auto):
        decoded = layer_weights(m)
        for name in reference:
            assert_bits_equal(decoded[name], reference[name], name)
        assert_same_outputs(model, m)
    assert_bits_equal(layer_weights(u8)["fc2"], w2.T.copy(), "fc2")
    assert ra.bytes_after < r8.bytes_after < r8.bytes_before == rp.bytes_after
    assert ra.params_after == rp.params_after + 1000 + encoded(auto)["fc1"]["codebook"].size


def test_codebook_never_makes_the_file_larger():
    """A 2048-element weight with 1000 distinct values: uint16 indices + codebook save 96 raw bytes,
    less than the Cast/Gather nodes and the new tensor names cost in the file. encode() compares raw
    tensor bytes only (after >= before), so with codebook="auto" the file grows."""
    rng = np.random.default_rng(10)
    book = np.unique(rng.standard_normal(3000).astype(np.float32))[:1000]
    w = book[np.concatenate([np.arange(1000), rng.integers(0, 1000, 1048)])]
    w = rng.permutation(w).reshape(64, 32)
    b = Builder(seed=10)
    x = b.input("x", ["N", 64])
    b.output(b.node("MatMul", [x, b.init(w, "fc.weight")], name="fc"), ["N", 32])
    model = b.model()
    auto, report = red_onnx.compress(model, tolerance=0, codebook="auto")
    plain, plain_report = red_onnx.compress(model, tolerance=0, codebook="off")
    assert_bits_equal(layer_weights(auto)["fc"], w, "fc")
    assert report.bytes_after <= plain_report.bytes_after, \
        f"codebook storage grew the file: {plain_report.bytes_after} -> {report.bytes_after} bytes " \
        f"(encode reported bytes_saved={pass_row(report, 'codebook')['bytes_saved']})"


def test_auto_leaves_weights_with_more_than_65536_values_plain():
    rng = np.random.default_rng(7)
    b = Builder(seed=7)
    x = b.input("x", ["N", 300])
    w = rng.standard_normal((300, 300)).astype(np.float32)
    assert len(np.unique(w)) > 65536
    b.output(b.node("MatMul", [x, b.init(w, "W")], name="big"), ["N", 300])
    model = b.model()
    result, report = red_onnx.compress(model, tolerance=0, codebook="auto")
    assert not encoded(result) and pass_row(report, "codebook")["weights_encoded"] == 0
    assert_bits_equal(layer_weights(result)["big"], w, "big")


@pytest.mark.parametrize("setting", ["off", "uint8", "auto"])
def test_codebook_off_leaves_every_weight_plain(setting):
    models = [build(kind, variant) for kind in ("conv", "gemm_t0") for variant in ("few", "pow2", "bn")]
    for model in models:
        result, report = red_onnx.compress(model, tolerance=0, codebook=setting)
        if setting == "off":
            assert not encoded(result)
            assert not {"Cast", "Gather"} & set(op_counts(result))
            assert pass_row(report, "codebook")["weights_encoded"] == 0 and not codebook_rows(report)
            assert all(t.data_type == onnx.TensorProto.FLOAT for t in result.graph.initializer)
        else:
            assert set(encoded(result)) == {"layer"}


def test_codebook_off_with_hashing_leaves_digits_plain():
    result, report = red_onnx.compress(DIGITS["cnn"], tolerance=0.05, passes=["hash"], codebook="off",
                                       probe_ranges={"input": (0, 1)})
    assert not encoded(result) and not {"Cast", "Gather"} & set(op_counts(result))
    assert pass_row(report, "hash")["layers_hashed"] == 0  # nothing to gain without a codebook


@pytest.mark.parametrize("shape,expected", [((33, 31), False), ((32, 32), True)])
def test_small_weights_stay_plain(shape, expected):
    n, k = shape
    size = n * k
    assert (size >= codebook_pass.MIN_ELEMENTS) is expected and abs(size - codebook_pass.MIN_ELEMENTS) <= 1
    rng = np.random.default_rng(8)
    b = Builder(seed=8)
    w = np.array([-0.5, 0.25, 0.75, 1.5], np.float32)[rng.integers(0, 4, (n, k))]
    assert w.size == size
    x = b.input("x", ["N", k])
    b.output(b.node("Gemm", [x, b.init(w, "W")], name="fc", transB=1), ["N", n])
    model = b.model()
    result, report = red_onnx.compress(model, tolerance=0)
    assert ("fc" in encoded(result)) is expected
    assert_bits_equal(layer_weights(result)["fc"], w, "fc")
    assert (report.bytes_after < report.bytes_before) is expected


def test_excluded_layer_is_not_encoded():
    b = Builder(seed=9)
    rng = np.random.default_rng(9)
    x = b.input("x", ["N", 64])
    w1, w2 = few_values(rng, (48, 64)), few_values(rng, (32, 48))
    h = b.relu(b.node("Gemm", [x, b.init(w1, "W1")], name="keep_me", transB=1))
    b.output(b.node("Gemm", [h, b.init(w2, "W2")], name="skip_me", transB=1), ["N", 32])
    model = b.model()
    result, report = red_onnx.compress(model, tolerance=0, exclude="^skip")
    assert set(encoded(result)) == {"keep_me"}
    assert_bits_equal(layer_weights(result)["skip_me"], w2, "skip_me")
    assert list(codebook_rows(report)) == ["W1"]
    everything, _ = red_onnx.compress(model, tolerance=0, exclude="_me$")
    assert not encoded(everything)


# --------------------------------------------------------------------------------------------- #
# tolerance 0 hashes nothing


@pytest.mark.parametrize("source", ["synthetic", "cnn", "resnet"])
def test_tolerance_zero_hashes_nothing(source):
    model = build("conv", "bn") if source == "synthetic" else onnx.load(DIGITS[source])
    kwargs = {"probe_ranges": {"input": (0, 1)}} if source != "synthetic" else {}
    result, report = red_onnx.compress(model, tolerance=0, passes=["hash"], **kwargs)
    fold_only, _ = red_onnx.compress(model, tolerance=0, passes=[], codebook="off", **kwargs)
    assert pass_row(report, "hash")["layers_hashed"] == 0
    assert not any("hash" in r for r in report.layers)
    decoded, reference = layer_weights(result), layer_weights(fold_only)
    assert decoded.keys() == reference.keys()
    for name in reference:
        assert_bits_equal(decoded[name], reference[name], name)
    assert report.output_deviation <= 1e-5
    if source == "synthetic":
        assert encoded(result)  # storage still applies


# --------------------------------------------------------------------------------------------- #
# hashing under the budget


@pytest.fixture(scope="module")
def hashed_digits():
    return {name: red_onnx.compress(path, tolerance=0.05, passes=["hash"], probe_ranges={"input": (0, 1)})
            for name, path in DIGITS.items()}


@pytest.mark.parametrize("name", list(DIGITS))
def test_hashing_digits_under_the_budget(hashed_digits, name):
    model = onnx.load(DIGITS[name])
    result, report = hashed_digits[name]
    onnx.checker.check_model(result, full_check=True)
    assert_standard_ops(result)
    assert report.verified and report.output_deviation <= 0.05
    assert report.bytes_after < 0.5 * report.bytes_before
    hp = pass_row(report, "hash")
    assert hp["layers_hashed"] > 0 and hp["modified"]
    assert 0 < hp["deviation_allocated"] <= 0.05

    # per-layer rows of the hash pass, and every hashed layer stored as a codebook
    hashed_rows = {r["name"]: r["hash"] for r in report.layers if "hash" in r and "left_alone" not in r["hash"]}
    assert len(hashed_rows) == hp["layers_hashed"]
    enc = encoded(result)
    nodes = {n.name: n for n in result.graph.node}
    original_weights = layer_weights(model)
    for layer, row in hashed_rows.items():
        lo, hi = hash_pass.FACTOR_RANGE
        assert lo <= row["bandwidth_factor"] <= hi
        assert isinstance(row["modes"], int) and 1 <= row["modes"] <= 256
        assert row["distinct_before"] > row["modes"]  # hashing reduced the distinct values
        assert 0 < row["weight_error"] < 1
        assert layer in enc, f"{layer} was hashed but is not stored as a codebook"
        c = enc[layer]
        assert c["codebook"].size <= 256 and c["indices"].dtype == np.uint8
        w = numpy_decode(c)
        if c["scales"] is None:
            assert len(np.unique(w)) <= 256
        else:
            flat = c["scales"].reshape(-1)
            per = c["scales"].shape.index(flat.size) if flat.size > 1 else 0
            assert w.shape[per] == flat.size
            channels = np.moveaxis(w, per, 0).reshape(flat.size, -1)
            assert max(len(np.unique(ch)) for ch in channels) <= 256
        assert nodes[layer].input[1] == c["output"]
        # hashing moved the weights (the layer was not merely re-stored)
        ref = original_weights[layer]
        if ref.shape == w.shape and name == "resnet":  # resnet: no BN to fold, weights comparable
            assert not np.array_equal(ref, w)
            err = np.linalg.norm((w - ref).astype(np.float64)) / np.linalg.norm(ref.astype(np.float64))
            assert err == pytest.approx(row["weight_error"], rel=1e-3, abs=1e-6)

    # independent check on fresh inputs in the probe range
    rng = np.random.default_rng(77)
    x = rng.uniform(0, 1, (16, 1, 8, 8)).astype(np.float32)
    (ref,), (out,) = run(model, {"input": x}), run(result, {"input": x})
    worst = max(rel_l2(ref[i], out[i]) for i in range(len(x)))
    assert worst <= 0.1
    assert np.mean(ref.argmax(1) == out.argmax(1)) >= 0.8


def test_hashed_layer_is_stored_as_a_codebook():
    """A Gemm whose hashing (factor 0.05, 211 modes) shrinks some channel's peak below a power of two
    (e.g. 0.5054 -> 0.4984): encode's own power-of-two scales then see > 256 normalised values and
    leave the layer plain, so the budget spent on hashing buys no storage at all."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((64, 144)) * np.exp(rng.standard_normal((64, 1)))).astype(np.float32)
    b = Builder(seed=1)
    x = b.input("x", ["N", 144])
    b.output(b.node("Gemm", [x, b.init(w, "W")], name="fc", transB=1), ["N", 64])
    model = b.model()
    result, report = red_onnx.compress(model, tolerance=0.05, passes=["hash"])
    assert report.verified and report.output_deviation <= 0.05
    assert pass_row(report, "hash")["layers_hashed"] == 1
    assert "fc" in encoded(result), "hashed, but stored as plain float32"
    assert report.bytes_after < 0.5 * report.bytes_before


# --------------------------------------------------------------------------------------------- #
# onnxruntime with graph optimizations on


@pytest.mark.parametrize("kind,variant", [("conv", "bn"), ("gemm_t0", "pow2"), ("conv_transpose", "few"),
                                          ("matmul", "bn")])
def test_optimized_sessions_match_the_plain_model(kind, variant):
    model = build(kind, variant)
    result, _ = red_onnx.compress(model, tolerance=0)
    plain, _ = red_onnx.compress(model, tolerance=0, codebook="off")
    assert encoded(result)
    feeds = random_feeds(model, np.random.default_rng(11), batch=3)
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        ys, ys_plain = session_opt(result, level).run(None, feeds), session_opt(plain, level).run(None, feeds)
        for y, y2 in zip(ys, ys_plain):
            np.testing.assert_allclose(y, y2, rtol=1e-6, atol=1e-6)
            assert rel_l2(y2, y) <= 1e-6


def test_optimized_session_on_hashed_digits(hashed_digits):
    result, _ = hashed_digits["resnet"]
    x = np.random.default_rng(12).uniform(0, 1, (4, 1, 8, 8)).astype(np.float32)
    off = run(result, {"input": x})[0]
    on = session_opt(result).run(None, {"input": x})[0]
    assert rel_l2(off, on) <= 1e-5


# --------------------------------------------------------------------------------------------- #
# command line


def _cli(*args):
    """The CLI in this process, lossless (the default tolerance would hash too)."""
    from test_cli import cli

    return cli(*args, "--tolerance", "0")


def test_cli_codebook_option(tmp_path):
    model, _, _ = _two_layer_model(1000, seed=13)
    src = tmp_path / "in.onnx"
    onnx.save(model, src)
    expected = {"off": set(), "uint8": {"fc1"}, "auto": {"fc1", "fc2"}}
    for setting, layers in expected.items():
        out = tmp_path / f"out_{setting}.onnx"
        proc = _cli(src, out, "--codebook", setting, "-q")
        assert proc.returncode == 0, proc.stderr
        written = onnx.load(out)
        onnx.checker.check_model(written, full_check=True)
        assert set(encoded(written)) == layers
        assert_same_outputs(model, written)
    bad = tmp_path / "bad.onnx"
    proc = _cli(src, bad, "--codebook", "int4")
    assert proc.returncode == 2
    assert "--codebook" in proc.stderr and not bad.exists()


@pytest.mark.parametrize("limit", [16, 256, 2048])
def test_fitting_hash_is_the_smallest_bandwidth_that_fits(limit):
    """The bisection returns a codebook within the limit, and a 10% narrower bandwidth does not fit."""
    w = np.random.default_rng(limit).standard_normal((64, 300)).astype(np.float32)
    factor, (values, codebook, scales) = hash_pass.fitting_hash(w, limit)
    assert len(codebook) <= limit
    np.testing.assert_array_equal(values, kde.hash_channels(w, factor, per_channel=True, scale=hash_pass.SCALE,
                                                          representative=hash_pass.REPRESENTATIVE)[0])
    narrower = kde.hash_channels(w, factor / 1.1, per_channel=True, scale=hash_pass.SCALE,
                                 representative=hash_pass.REPRESENTATIVE)[1]
    assert len(narrower) > limit


def test_layers_searched_in_threads_give_the_serial_candidates(monkeypatch):
    """_propose searches layers in threads: the candidates (keys, savings, errors, factors) and the
    hashed weights are those of a one-thread search, bit for bit."""
    import onnx_graphsurgeon as gs
    from red_onnx.context import Context

    model = onnx.load(DIGITS["resnet"])

    def propose(cores):
        monkeypatch.setattr(hash_pass, "_cores", lambda: cores)
        ctx = Context(graph=gs.import_onnx(model), template=model, shapes={}, codebook="auto")
        return hash_pass._propose(ctx)

    serial, threaded = propose(1), propose(4)
    assert len(serial[0]) > 4  # several layers, several levels
    assert [(c.key, c.saving, c.error, c.data[1:4]) for c in serial[0]] == \
        [(c.key, c.saving, c.error, c.data[1:4]) for c in threaded[0]]
    for key in serial[1]:
        assert_bits_equal(serial[1][key], threaded[1][key], key)
        assert_bits_equal(serial[2][key], threaded[2][key], key)


def test_entry_targets_per_codebook_setting():
    assert hash_pass._entry_targets(1_000_000, "off") == []
    assert hash_pass._entry_targets(1_000_000, "uint8") == [256]
    # codebook = 1/4 and 1/16 of the uint16 indices' bytes, at most 65536 entries
    assert hash_pass._entry_targets(1_000_000, "auto") == [65_536, 31_250, 256]
    assert hash_pass._entry_targets(100_000, "auto") == [12_500, 3_125, 256]
    assert hash_pass._entry_targets(4_000_000, "auto") == [65_536, 256]
    assert hash_pass._entry_targets(4096, "auto") == [512, 256]
    assert hash_pass._entry_targets(2048, "auto") == [256]  # a uint16 codebook would cost too much


def test_auto_prefers_uint8_with_channel_scales_over_uint16():
    """40 values times a power of two per channel: over 256 distinct values in all, 40 per channel
    scale. uint8 indices + per-channel scales fit, so auto must not fall back to uint16."""
    rng = np.random.default_rng(12)
    w = few_values(rng, (64, 128), pow2=True)
    assert len(np.unique(w)) > 256
    b = Builder(seed=12)
    x = b.input("x", ["N", 128])
    b.output(b.node("Gemm", [x, b.init(w, "W")], name="fc", transB=1), ["N", 64])
    model = b.model()
    for setting in ("uint8", "auto"):
        result, _ = red_onnx.compress(model, tolerance=0, codebook=setting)
        enc = encoded(result)["fc"]
        assert enc["indices"].dtype == np.uint8 and enc["scales"] is not None, setting
        assert_bits_equal(layer_weights(result)["fc"], w, "fc")


@pytest.mark.parametrize("entries", [256, 768])
@pytest.mark.parametrize("kind", ["conv", "gemm_t1", "matmul"])
def test_max_abs_hashed_weight_is_stored_exactly(kind, entries):
    """A weight hashed with max-abs channel scales, hashed = fl(u·s), is stored as uint8 (uint16
    for 768 entries) indices, its codebook and s, decoding to the same bits. w/s alone does not
    give back u for every value (float division), so encode snaps w/s to the codebook the hash
    pass hands over, and checks. At uint16 the raw values also fit 65536 entries, but such a
    codebook (one entry per weight, nearly) does not pay: the split must be chosen."""
    import onnx_graphsurgeon as gs

    from red_onnx.context import Context

    rng = np.random.default_rng(3)
    n, k = 48, 64
    b = Builder(seed=3)
    x = b.input("x", ["N", k, 5, 5] if kind == "conv" else ["N", k])
    w = rng.standard_normal((n, k, 3, 3) if kind == "conv" else (n, k)).astype(np.float32)
    w *= rng.uniform(0.01, 3.0, (n,) + (1,) * (w.ndim - 1)).astype(np.float32)
    _, (hashed, codebook, scales) = hash_pass.fitting_hash(w, entries)
    assert hash_pass.SCALE == "maxabs" and len(codebook) <= entries
    quotient = hashed.reshape(n, -1) / scales[:, None]
    assert len(np.unique(quotient)) > entries, "division recovers u here: the test shows nothing"
    assert len(np.unique(hashed)) <= 65536
    stored = {"conv": hashed, "gemm_t1": hashed, "matmul": hashed.T.copy()}[kind]
    if kind == "conv":
        y = b.node("Conv", [x, b.init(stored, "W")], name="layer", pads=[1, 1, 1, 1])
    elif kind == "gemm_t1":
        y = b.node("Gemm", [x, b.init(stored, "W")], name="layer", transB=1)
    else:
        y = b.node("MatMul", [x, b.init(stored, "W")], name="layer")
    b.output(y, ["N", n, 5, 5] if kind == "conv" else ["N", n])
    model = b.model()
    for hint, expect in (({"hashed": {"W": (scales, codebook)}}, True),  # uint16 absorbs the ulp variants
                         ({"fold_scales": {"W": scales}}, entries > 256)):
        ctx = Context(graph=gs.import_onnx(model), template=model, shapes={}, **hint,
                      codebook="uint8" if entries <= 256 else "auto")
        result = codebook_pass.run(ctx)
        assert (result.counts["weights_encoded"] == 1) is expect
        if expect:
            out = gs.export_onnx(ctx.graph)
            c = encoded(out)["layer"]
            assert c["indices"].dtype == (np.uint8 if entries <= 256 else np.uint16) and c["scales"] is not None
            assert_bits_equal(layer_weights(out)["layer"], stored)
            assert_same_outputs(model, out)


@pytest.mark.parametrize("variant", ["few", "pow2"])
def test_layers_storable_exactly_are_not_hashed(variant):
    """A weight that is already few-valued (per power-of-two channel scale too) is stored exactly
    at uint8: hashing it would add error and save no bytes, so even a large tolerance leaves it."""
    model = build("conv", variant)
    result, report = red_onnx.compress(model, tolerance=0.3, passes=["hash"])
    assert pass_row(report, "hash")["layers_hashed"] == 0
    assert set(encoded(result)) == {"layer"}
    assert_same_outputs(model, result)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), kind=st.sampled_from(["normal", "cauchy", "few", "laplace"]),
       limit=st.sampled_from([4, 16, 256, 1000]), rows=st.integers(1, 40), shared=st.booleans())
def test_fitting_hash_property(seed, kind, limit, rows, shared):
    """For any tensor: the codebook fits the limit, and 10% less bandwidth does not (unless the
    factor is the smallest searched); None only if even the widest bandwidth does not fit. Also
    when the search starts from the counts of a search at 4x the limit (as the pass shares them)."""
    rng = np.random.default_rng(seed)
    shape = (rows, 200)
    w = {"normal": lambda: rng.standard_normal(shape), "cauchy": lambda: rng.standard_cauchy(shape),
         "few": lambda: rng.choice(rng.standard_normal(7), shape), "laplace": lambda: rng.laplace(size=shape)}[kind]()
    w = w.astype(np.float32)
    counts = {}
    if shared:
        hash_pass.fitting_hash(w, 4 * limit, counts=counts)
        assert counts
    found = hash_pass.fitting_hash(w, limit, counts=counts)
    f_min, f_max = hash_pass.FACTOR_RANGE

    def entries(f):
        return len(kde.hash_channels(w, f, per_channel=True, scale=hash_pass.SCALE)[1])

    if found is None:
        assert entries(f_max) > limit
        return
    factor, (values, codebook, scales) = found
    assert len(codebook) <= limit and f_min <= factor <= f_max
    assert factor == f_min or entries(factor / 1.1) > limit


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_snap_and_indices_lookups(dtype):
    """_snap gives a nearest codebook entry (the lower on ties), _indices each value's position in
    the sorted bit patterns (-0.0 and +0.0 apart), for values on, between and beyond the entries."""
    rng = np.random.default_rng(3)
    for n in (1, 2, 7, 300):
        codebook = np.unique(np.concatenate([(rng.standard_t(2, n) * 3).astype(dtype), np.array([0.0], dtype)]))
        values = np.concatenate([rng.choice(codebook, 200), (rng.standard_t(2, 200) * 4).astype(dtype),
                                 [codebook[0] - 1, codebook[-1] + 1, np.float64(codebook[0]) / 2]]).astype(dtype)
        snapped = codebook_pass._snap(values, codebook).astype(np.float64)
        v, c = values.astype(np.float64), codebook.astype(np.float64)
        dist = np.abs(v[:, None] - c[None, :])
        nearest = c[np.argmin(dist, axis=1)]  # argmin: the lower entry on ties
        np.testing.assert_array_equal(snapped, nearest)
        stored = np.concatenate([rng.choice(codebook, 100), np.array([0.0, -0.0, -0.0], dtype)])
        bits = codebook_pass.distinct_bits(stored)
        np.testing.assert_array_equal(codebook_pass._indices(stored, bits), np.searchsorted(bits, codebook_pass._bits(stored)))


def test_verification_backs_off_when_fresh_probes_disagree():
    """Allocation probes that never excite inputs 0-31 (x = 0 there) let the budget hash their
    small weights coarsely; the verification probes drive those inputs 100x harder, the result
    deviates there, and the pipeline rebuilds at smaller margins until the fresh probes agree:
    the written result stays within the tolerance on them (recomputed here), and the report
    says it backed off."""
    rng = np.random.default_rng(3)
    k, n = 64, 32
    view = rng.standard_normal((n, k)).astype(np.float32)
    view[:, :32] *= np.float32(0.01)  # hashed in one codebook with per-output-channel scales: coarse here
    b = Builder(seed=3)
    y = b.node("MatMul", [b.input("x", ["N", k]), b.init(view.T.copy(), "W")], name="layer")
    b.output(y, ["N", n])
    model = b.model()
    alloc = rng.standard_normal((8, 1, k)).astype(np.float32)
    alloc[:, :, :32] = 0
    fresh = rng.standard_normal((8, 1, k)).astype(np.float32)
    fresh[:, :, :32] *= 100
    tolerance = 0.01
    result, report = red_onnx.compress(model, tolerance=tolerance, passes=["hash"],
                                       probe_inputs={"x": np.concatenate((alloc, fresh))})
    assert any("backed off" in note for note in report.notes), report.notes
    assert report.verified and report.output_deviation <= tolerance
    worst = max(rel_l2(run(model, {"x": x})[0], run(result, {"x": x})[0]) for x in fresh)
    assert worst <= tolerance
    assert worst == pytest.approx(report.output_deviation, rel=1e-3, abs=1e-9)


def test_next_margin_scales_with_the_overshoot():
    """After a failed verification the margin shrinks by the overshoot (with 10% to spare), by at
    least 0.9x, and by half when the deviation is not finite."""
    from red_onnx.pipeline import next_margin

    assert next_margin(0.8, 0.0052, 0.005) == pytest.approx(0.8 * 0.9 * 0.005 / 0.0052)
    assert next_margin(0.8, 0.0101, 0.01) == pytest.approx(0.8 * 0.9 * 0.01 / 0.0101)
    assert next_margin(0.8, 0.01000001, 0.01) == pytest.approx(0.72)  # at least 0.9x smaller
    assert next_margin(0.5, 0.03, 0.01) == pytest.approx(0.15)
    assert next_margin(0.8, float("inf"), 0.01) == 0.4


@pytest.mark.parametrize("seed", range(4))
def test_distinct_bits_of_large_arrays_agree_with_unique(seed):
    """The sampled one-pass path (few distinct values, spread or clustered, signed zeros, a value
    only at the end) gives what np.unique of the bit patterns gives, and None over the limit."""
    rng = np.random.default_rng(seed)
    table = rng.standard_normal(40).astype(np.float32)
    values = table[rng.integers(0, 40, 200_000)]
    values[:50_000] = table[0]  # clustered: a prefix would see one value
    values[-1] = np.float32(7.5)  # only at the end: the sample misses it
    values[rng.integers(0, values.size, 30)] = np.float32(-0.0)
    values[rng.integers(0, values.size, 30)] = np.float32(0.0)
    bits = codebook_pass._bits(values)
    expected = np.unique(bits)
    np.testing.assert_array_equal(codebook_pass.distinct_bits(values), expected)
    np.testing.assert_array_equal(codebook_pass.distinct_bits(values, 256), expected)
    assert codebook_pass.distinct_bits(rng.standard_normal(200_000).astype(np.float32), 256) is None
    assert codebook_pass.distinct_bits(values, len(expected) - 1) is None


def test_distinct_values_counted_in_a_thread_give_the_same_result(monkeypatch, hashed_digits):
    """A large weight's distinct values are counted in a thread while its bandwidths are searched:
    the same model and the same per-layer rows as counted in line."""
    monkeypatch.setattr(hash_pass, "THREADED_COUNT", 1)
    result, report = red_onnx.compress(DIGITS["resnet"], 0.05, passes=["hash"], probe_ranges={"input": (0, 1)})
    reference, expected = hashed_digits["resnet"]
    assert result.SerializeToString() == reference.SerializeToString()
    rows = [r.get("hash") for r in report.layers]
    assert rows == [r.get("hash") for r in expected.layers] and any(r and "distinct_before" in r for r in rows)


def test_float16_weights_with_scales_decode_in_float32_where_onnxruntime_folds_them(tmp_path):
    """onnxruntime's CPU provider has no float16 Mul: a float16 codebook times float16 scales was
    decoded on every run (a UNet ran 1.6x slower). The chain is float32 up to a last Cast to
    float16; the optimizer folds it to a constant, and the weights are the plain result's, bit for bit."""
    b = Builder(seed=1)
    rng = np.random.default_rng(101)
    view = few_values(rng, (32, 8, 3, 3), 40, pow2=True).astype(np.float16)
    x = b.input("x", ["N", 8, 6, 6], elem=onnx.TensorProto.FLOAT16)
    y = b.node("Conv", [x, b.init(view, "W", dtype=np.float16), b.init(rng.standard_normal(32), "B", dtype=np.float16)],
               name="layer", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    b.output(y, ["N", 32, 6, 6], elem=onnx.TensorProto.FLOAT16)
    model = b.model()
    result, report = red_onnx.compress(model, tolerance=0)
    plain, _ = red_onnx.compress(model, tolerance=0, codebook="off")
    row = next(iter(codebook_rows(report).values()))
    assert row["per_channel_scale"]
    conv = next(n for n in result.graph.node if n.op_type == "Conv")
    cast = next(n for n in result.graph.node if conv.input[1] in n.output)
    assert cast.op_type == "Cast" and onnx.helper.get_attribute_value(cast.attribute[0]) == onnx.TensorProto.FLOAT16
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(result.SerializeToString(), options, providers=["CPUExecutionProvider"])
    folded = onnx.load(str(tmp_path / "optimized.onnx"))
    assert not {"Gather", "Mul"} & {n.op_type for n in folded.graph.node}, [n.op_type for n in folded.graph.node]
    weight = next(n for n in folded.graph.node if n.op_type == "Conv").input[1]  # (the Casts left convert activations)
    assert weight in {t.name for t in folded.graph.initializer}
    feeds = {"x": np.random.default_rng(5).standard_normal((2, 8, 6, 6)).astype(np.float16)}
    for y, y2 in zip(run(plain, feeds), run(result, feeds)):
        np.testing.assert_array_equal(y, y2)


@pytest.mark.parametrize("op, gates", [("LSTM", 4), ("GRU", 3)])
def test_recurrent_weights_are_hashed_and_stored_as_codebooks(op, gates):
    """An LSTM's or GRU's W and R (directions, gates·H, I or H) are hashed row by row and stored as
    codebooks (they were left plain): within the tolerance on fresh inputs, the same outputs with
    onnxruntime's optimizer (the decoding folded) as without."""
    rng = np.random.default_rng(21)
    t, i, h = 6, 24, 32
    b = Builder(seed=21)
    x = b.input("x", [t, "N", i])
    w = b.init(rng.standard_normal((2, gates * h, i)) / np.sqrt(i), "W")
    r = b.init(rng.standard_normal((2, gates * h, h)) / np.sqrt(h), "R")
    y = b.node(op, [x, w, r], hidden_size=h, direction="bidirectional", n_outputs=1)
    b.output(y, [t, 2, "N", h])
    model = b.model()
    tolerance = 0.01
    result, report = red_onnx.compress(model, tolerance=tolerance, passes=["hash"], input_shapes={"x": (t, 1, i)})
    assert report.verified and report.output_deviation <= tolerance
    assert pass_row(report, "hash")["layers_hashed"] == 2 and pass_row(report, "codebook")["weights_encoded"] == 2
    assert report.bytes_after < 0.5 * report.bytes_before
    assert not {t.name for t in result.graph.initializer} & {"W", "R"}  # both decoded from codebooks
    feeds = {"x": rng.standard_normal((t, 1, i)).astype(np.float32)}  # decoded at session creation or per run: alike
    np.testing.assert_allclose(session_opt(result).run(None, feeds)[0], run(result, feeds)[0], rtol=1e-5, atol=1e-6)
    for _ in range(8):
        feeds = {"x": rng.standard_normal((t, 1, i)).astype(np.float32)}
        assert rel_l2(run(model, feeds)[0], run(result, feeds)[0]) <= tolerance


def test_embedding_tables_and_shared_weights_are_hashed_and_stored_as_codebooks():
    """Weights no layer owns are hashed by rows and stored as codebooks (they were left plain): an
    embedding table (a Gather's data) and a weight two Gemms share (an unrolled RNN's cell), each
    within the tolerance on fresh inputs; the hashed table's rows each have their own scale."""
    rng = np.random.default_rng(22)
    vocab, d, t = 300, 48, 5
    b = Builder(seed=22)
    ids = b.input("ids", ["N", t], elem=onnx.TensorProto.INT64)
    table = b.init(rng.standard_normal((vocab, d)) * rng.uniform(0.1, 3, (vocab, 1)), "embedding")
    x = b.node("Gather", [table, ids], axis=0)  # (N, t, d)
    w = b.init(rng.standard_normal((d, d)) / np.sqrt(d), "cell")  # (out, in): transB
    first = b.node("Gather", [x, b.init(np.array(0, np.int64), dtype=np.int64)], axis=1)  # (N, d)
    h = b.node("Tanh", [b.node("Gemm", [first, w], transB=1)])
    second = b.node("Gather", [x, b.init(np.array(1, np.int64), dtype=np.int64)], axis=1)
    y = b.node("Add", [h, b.node("Gemm", [second, w], transB=1)])
    b.output(y, ["N", d])
    model = b.model()
    tolerance = 0.03
    result, report = red_onnx.compress(model, tolerance=tolerance, passes=["hash"], input_shapes={"ids": (1, t)})
    assert report.verified and report.output_deviation <= tolerance
    hashed = {r["name"] for r in report.layers if "hash" in r}
    assert hashed == {"embedding", "cell"}, hashed
    assert set(codebook_rows(report)) == {"embedding", "cell"}
    assert codebook_rows(report)["embedding"]["per_channel_scale"]
    assert not {t.name for t in result.graph.initializer} & {"embedding", "cell"}
    assert report.bytes_after < 0.5 * report.bytes_before
    for _ in range(8):
        feeds = {"ids": rng.integers(0, vocab, (1, t))}
        assert rel_l2(run(model, feeds)[0], run(result, feeds)[0]) <= tolerance


def test_a_tied_output_layer_through_a_transpose_is_hashed_with_its_table():
    """torch's dynamo exporter writes a language model's tied output layer as ``MatMul(x,
    Transpose(table))`` on the embedding table itself: the table is hashed once, for both uses,
    and the Transpose still reads it (one copy in the file); the head was hashed nowhere before."""
    rng = np.random.default_rng(24)
    vocab, d, t = 400, 32, 6
    b = Builder(seed=24)
    ids = b.input("ids", ["N", t], elem=onnx.TensorProto.INT64)
    table = b.init(rng.standard_normal((vocab, d)), "table")
    x = b.node("Relu", [b.matmul(b.node("Gather", [table, ids], axis=0), d, d)])
    logits = b.node("MatMul", [x, b.node("Transpose", [table], perm=[1, 0])], name="head")
    b.output(logits, ["N", t, vocab])
    model = b.model()
    tolerance = 0.03
    result, report = red_onnx.compress(model, tolerance=tolerance, passes=["hash"], input_shapes={"ids": (1, t)})
    assert report.verified and report.output_deviation <= tolerance
    assert "table" in {r["name"] for r in report.layers if "hash" in r}
    assert "table" in codebook_rows(report)
    floats = [tensor.dims for tensor in result.graph.initializer if tensor.data_type == onnx.TensorProto.FLOAT]
    assert [vocab, d] not in floats and [d, vocab] not in floats  # stored once, as indices
    assert report.bytes_after < 0.5 * report.bytes_before
    for _ in range(8):
        feeds = {"ids": rng.integers(0, vocab, (1, t))}
        assert rel_l2(run(model, feeds)[0], run(result, feeds)[0]) <= tolerance


def test_a_table_gathered_by_constant_indices_or_read_as_data_is_not_a_weight():
    """A constant gathered by constant indices (folded, not a table) and a constant two nodes read as
    data (an Add) are left as they are."""
    rng = np.random.default_rng(23)
    b = Builder(seed=23)
    x = b.input("x", ["N", 64])
    c = b.init(rng.standard_normal((64, 64)), "grid")
    picked = b.node("Gather", [c, b.init(np.array([0, 3]), dtype=np.int64)], axis=0)  # (2, 64)
    y = b.node("Add", [b.node("MatMul", [x, b.init(rng.standard_normal((64, 64)) / 8, "w")]), c])
    b.output(b.node("MatMul", [y, b.node("Transpose", [picked], perm=[1, 0])]), ["N", 2])
    model = b.model()
    names = {s.name for s in layers_mod.shared_weights(gs.import_onnx(model))}
    assert names == set(), names


def test_warm_up_loads_the_kernels_a_hash_pass_runs():
    """In a fresh process, the warm-up thread leaves every kernel that hashing and storing a
    float32 conv weight call already loaded (no kernel is first loaded by the pass itself)."""
    script = """
import threading, numba, numpy as np
from red_onnx import kde
from red_onnx.passes import codebook, hash as H
H.start_warm_up(); H.start_warm_up()  # once per process
[t.join() for t in threading.enumerate() if t.name == "red_onnx kernels"]
def loaded():
    return {f"{m.__name__}.{k}": len(v.signatures) for m in (kde, codebook) for k, v in vars(m).items()
            if isinstance(v, numba.core.registry.CPUDispatcher)}
before = loaded()
w = np.random.default_rng(1).standard_normal((96, 48, 3, 3)).astype(np.float32)
factor, (values, book, scales) = H.fitting_hash(w, 256)
codebook._snap((values / scales.reshape(-1, 1, 1, 1)).astype(np.float32), np.sort(book))
new = {k: n - before[k] for k, n in loaded().items() if n > before[k]}
assert not new, new
assert sum(before.values()) >= 10, before
"""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


# --------------------------------------------------------------------------------------------- #
# float16 storage


def _gemm_chain(weights: list[np.ndarray], dtype=np.float32) -> onnx.ModelProto:
    """x → Gemm(transB) → Relu → ... with the given (out, in) weights (``dtype``: their type and the model's)."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    b = Builder(seed=3)
    y = b.input("x", ["N", weights[0].shape[1]], elem=elem)
    for k, w in enumerate(weights):
        y = b.node("Gemm", [y, b.init(w, f"W{k}", dtype=dtype), b.init(np.full(w.shape[0], 0.1), f"B{k}", dtype=dtype)],
                   name=f"fc{k}", transB=1)
        if k < len(weights) - 1:
            y = b.node("Relu", [y], name=f"relu{k}")
    b.output(y, ["N", weights[-1].shape[0]], elem=elem)
    return b.model()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float16_values_are_stored_as_float16_exactly(dtype):
    """A weight whose values are all float16 values (over 256 of them) is stored as float16 → Cast,
    at tolerance 0, and decodes to the same bits; one value off the float16 grid keeps it plain."""
    rng = np.random.default_rng(0)
    half = (rng.standard_normal((48, 64)) / 8).astype(np.float16).astype(dtype)
    off = (rng.standard_normal((32, 48)) / 8).astype(np.float16).astype(dtype)
    off[5, 7] = np.nextafter(off[5, 7], np.inf)  # between two float16 values
    model = _gemm_chain([half, off], dtype)
    result, report = red_onnx.compress(model, tolerance=0)
    onnx.checker.check_model(result, full_check=True)
    enc = encoded(result)
    assert set(enc) == {"fc0"} and enc["fc0"]["half"].dtype == np.float16
    weights = layer_weights(result)  # decoded in numpy and in onnxruntime, which agree bit for bit
    assert_bits_equal(weights["fc0"], half.astype(dtype), "fc0")
    assert_bits_equal(weights["fc1"], off, "fc1")
    rows = codebook_rows(report)
    assert rows["W0"]["form"] == "float16" and rows["W0"]["bytes_after"] == half.size * 2
    assert result.ByteSize() < model.ByteSize() - half.nbytes // 2 + 1024
    feeds = {"x": rng.standard_normal((4, 64)).astype(dtype)}
    np.testing.assert_array_equal(run(result, feeds)[0], run(model, feeds)[0])
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        assert not any(n.op_type == "Cast" for n in _optimized(result, level).graph.node), "Cast folded"


def _optimized(model: onnx.ModelProto, level) -> onnx.ModelProto:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        options.log_severity_level = 3
        options.optimized_model_filepath = f"{tmp}/opt.onnx"
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(f"{tmp}/opt.onnx")


def test_half_exact_keeps_signed_zeros_and_rejects_values_off_the_grid():
    grid = np.array([0.0, -0.0, 1.5, -65504.0, 2.0 ** -24, np.inf], np.float32)
    assert codebook_pass.half_exact(grid) and codebook_pass.half_exact(grid.astype(np.float64))
    for bad in (np.float32(1 + 2 ** -12), np.float32(70000.0), np.float32(2.0 ** -26)):
        assert not codebook_pass.half_exact(np.append(grid, bad))
    big = np.random.default_rng(1).standard_normal(100_000).astype(np.float16).astype(np.float32)
    assert codebook_pass.half_exact(big)
    big[-1] += 1e-6  # off the grid outside the sample checked first
    assert not codebook_pass.half_exact(big)


def test_a_sensitive_layer_takes_the_float16_level():
    """At a tolerance its 256-entry codebook does not fit, a layer is rounded to float16 instead:
    stored as float16 → Cast, the measured deviation within the tolerance, the file smaller."""
    rng = np.random.default_rng(2)
    weights = [rng.standard_normal((96, 64)) / 8, rng.standard_normal((10, 96)) / 10]
    model = _gemm_chain([w.astype(np.float32) for w in weights])
    tol = 1e-3
    result, report = red_onnx.compress(model, tolerance=tol, seed=0)
    assert report.output_deviation <= tol
    rows = _hash_rows(report)
    assert rows and all(r["form"] == "float16" and r["modes"] is None for r in rows.values()), rows
    enc = encoded(result)
    assert set(enc) == set(rows) and all("half" in c for c in enc.values())
    assert_same_outputs(model, result, rtol=tol)
    coarse, coarse_report = red_onnx.compress(model, tolerance=0.05, seed=0)  # room for the codebooks
    assert {r["form"] for r in _hash_rows(coarse_report).values()} == {"codebook"}
    assert coarse.ByteSize() < result.ByteSize() < model.ByteSize() * 0.6


def _hash_rows(report) -> dict[str, dict]:
    """The hash pass's row of each layer it hashed, by node name."""
    return {r["name"]: r["hash"] for r in report.layers if "hash" in r and "left_alone" not in r["hash"]}


def test_codebook_off_offers_no_float16_level():
    rng = np.random.default_rng(2)
    model = _gemm_chain([(rng.standard_normal((96, 64)) / 8).astype(np.float32)])
    result, report = red_onnx.compress(model, tolerance=0.01, codebook="off")
    assert not encoded(result) and not any(t.data_type == onnx.TensorProto.FLOAT16 for t in result.graph.initializer)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), dtype=st.sampled_from([np.float32, np.float64]),
       special=st.lists(st.sampled_from([0.0, -0.0, 2.0 ** -24, -(2.0 ** -20), 65504.0, -65504.0, 1e-3]),
                        max_size=6))
def test_float16_storage_property(seed, dtype, special):
    """Random float16-valued weights (subnormals, signed zeros and the largest finite values among
    them), one Gemm each side of a Relu: stored as float16 → Cast at tolerance 0, decoded bit for
    bit in numpy and onnxruntime, the outputs identical."""
    rng = np.random.default_rng(seed)
    weights = []
    for shape in ((40, 32), (32, 40)):
        w = (rng.standard_normal(shape) * rng.uniform(1e-3, 10)).astype(np.float16)
        w.reshape(-1)[:len(special)] = special
        weights.append(w.astype(dtype))
    model = _gemm_chain(weights, dtype)
    result, _ = red_onnx.compress(model, tolerance=0)
    enc = encoded(result)
    assert set(enc) == {"fc0", "fc1"} and all("half" in c for c in enc.values())
    decoded = layer_weights(result)
    for k, w in enumerate(weights):
        assert_bits_equal(decoded[f"fc{k}"], w, f"fc{k}")
    feeds = {"x": rng.standard_normal((3, 32)).astype(dtype)}
    np.testing.assert_array_equal(run(result, feeds)[0], run(model, feeds)[0])
