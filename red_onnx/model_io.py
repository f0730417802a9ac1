"""Loading, converting and saving models without losing what must survive a round trip.

What survives: opset imports, IR version, producer, model and graph doc strings, ``metadata_props``
(some applications keep their class list there), input/output names, types and dynamic dimensions.
Saving is atomic: a temporary file in the destination folder, then a rename.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .errors import InputError

TWO_GB = 2**31
EXTERNAL_DATA_THRESHOLD = TWO_GB - 2**26  # leave headroom under protobuf's 2 GB limit


def load(source: str | os.PathLike | onnx.ModelProto, notes: list[str] | None = None) -> onnx.ModelProto:
    """Read a model (with its external data) and check it, raising InputError with the reason. A
    graph whose nodes are out of order (onnxruntime runs it; onnx.checker refuses it: the float16
    converter of onnxruntime and onnxconverter-common writes its input Casts last) is sorted, a
    copy where ``source`` is a model, and ``notes`` says so."""
    if isinstance(source, onnx.ModelProto):
        model = source
        where = "model"
    else:
        path = Path(source)
        where = str(path)
        if not path.exists():
            raise InputError(f"{path}: no such file")
        if path.is_dir():
            raise InputError(f"{path}: is a directory, expected an .onnx file")
        if not path.is_file():  # a FIFO would block, /dev/zero would fill the memory
            raise InputError(f"{path}: not a regular file (a FIFO, a device?), expected an .onnx file")
        if not os.access(path, os.R_OK):
            raise InputError(f"{path}: not readable")
        try:
            model = onnx.load(str(path), load_external_data=True)
        except Exception as err:  # protobuf raises DecodeError or RuntimeWarning-like errors
            raise InputError(f"{path}: not a readable ONNX model ({_short(err)})") from None
    if not model.graph.node and not model.graph.output:
        raise InputError(f"{where}: not an ONNX model (empty graph)")
    bad = _invalid_text(model)
    if bad is not None:
        raise InputError(f"{where}: the model holds text that is not valid UTF-8 ({bad!r})")
    try:  # a file is checked from disk: serializing the loaded model would cost two more copies
        onnx.checker.check_model(where if where != "model" else model, full_check=False)
    except Exception as err:
        order = _topological_order(model.graph)
        if order is None or order == list(range(len(model.graph.node))):
            raise InputError(f"{where}: invalid ONNX model: {_short(err)}") from None
        if where == "model":
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            model = copy
        nodes = [model.graph.node[k] for k in order]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        try:
            onnx.checker.check_model(model, full_check=False)
        except Exception as err:
            raise InputError(f"{where}: invalid ONNX model: {_short(err)}") from None
        if notes is not None:
            notes.append("the input's nodes were not in topological order (onnxruntime runs such a graph, "
                         "onnx.checker refuses it); they were sorted")
    return model


def _topological_order(graph: onnx.GraphProto) -> list[int] | None:
    """The nodes' indices in an order where each node follows the producers of its inputs,
    keeping the given order where it allows (Kahn's algorithm, smallest index first); None where
    no such order exists (a cycle, an input nothing produces)."""
    import heapq

    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    producer = {name: k for k, node in enumerate(graph.node) for name in node.output}
    waiting: list[set[int]] = []  # per node, the producers it still waits for
    readers: dict[int, list[int]] = {}
    for k, node in enumerate(graph.node):
        needed = set()
        for name in node.input:
            if name in available:
                continue
            if name not in producer:
                return None
            needed.add(producer[name])
            readers.setdefault(producer[name], []).append(k)
        waiting.append(needed)
    ready = [k for k, w in enumerate(waiting) if not w]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for j in readers.get(k, ()):
            waiting[j].discard(k)
            if not waiting[j]:
                heapq.heappush(ready, j)
    return order if len(order) == len(graph.node) else None


def _all_proto_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from _all_proto_nodes(sub)


def _invalid_text(message) -> bytes | None:
    """The first string field (a name, a doc string) that is not valid UTF-8: protobuf returns those
    as bytes. Tensor data fields are bytes by type and are not looked at."""
    from google.protobuf.descriptor import FieldDescriptor as F

    for field, value in message.ListFields():
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == F.LABEL_REPEATED
        if field.type == F.TYPE_STRING:
            for text in (value if repeated else [value]):
                if isinstance(text, bytes):
                    return text
        elif field.type == F.TYPE_MESSAGE:
            for item in (value if repeated else [value]):
                bad = _invalid_text(item)
                if bad is not None:
                    return bad
    return None


def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


STANDARD_DOMAINS = ("", "ai.onnx")
#: joins a custom-domain node's domain and op type in the graph the passes see (:func:`to_graph`)
DOMAIN_MARK = "::"


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """Import into onnx-graphsurgeon (the model is not modified). The graph gets its own copy of
    the opset imports: onnx-graphsurgeon keeps the model's container, which holds the whole
    model's memory (weights included) for as long as the graph lives.

    A node of another domain gets the op ``domain::op`` until export (:func:`to_model`), so that
    no pass takes it for the standard op of its name: onnxruntime's saved optimized models hold
    ``com.microsoft.nchwc`` Convs, whose weights and activations are blocked by 8 channels."""
    graph = gs.import_onnx(model)
    domains = []
    for entry in graph.import_domains or ():
        copy = onnx.OperatorSetIdProto()
        copy.CopyFrom(entry)
        domains.append(copy)
    graph.import_domains = domains
    for node in _all_nodes(graph):
        if node.domain and node.domain not in STANDARD_DOMAINS:
            node.op = f"{node.domain}{DOMAIN_MARK}{node.op}"
    return graph


def _all_nodes(graph: gs.Graph):
    for node in graph.nodes:
        yield node
        for value in node.attrs.values():
            for sub in value if isinstance(value, list) else [value]:
                if isinstance(sub, gs.Graph):
                    yield from _all_nodes(sub)


#: Initializers with more elements reach onnxruntime sessions as arrays, read in place.
IN_PLACE_MIN = 1024
IN_MEMORY = "in-memory"  # the external-data location of a placeholder whose array is passed alongside


def placeholder(tensor: onnx.TensorProto, dims) -> None:
    """Turn ``tensor`` into an external-data placeholder (dims and type, no data) for a session
    that receives its array separately (onnxruntime's external initializers)."""
    tensor.ClearField("raw_data")
    del tensor.dims[:]
    tensor.dims.extend(int(d) for d in dims)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    tensor.external_data.add(key="location", value=IN_MEMORY)


def snapshot(graph: gs.Graph, template: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """:func:`to_light_model` of the graph as it stands, which is left as it is: exported directly
    where it is already clean and sorted (:func:`_tidy`), else from a copy (a 902-node graph's copy
    and sort cost 35 ms, its export 25 ms)."""
    if _tidy(graph):
        return to_light_model(graph, template, tidy=False)
    return to_light_model(graph.copy(), template)


def _tidy(graph: gs.Graph) -> bool:
    """Whether cleanup and a topological sort would find nothing to do: no functions or subgraphs,
    every node after the producers of its inputs, and every node feeding a graph output."""
    if graph.functions:
        return False
    produced = {t.name for t in graph.inputs}
    for node in graph.nodes:
        if any(isinstance(a, gs.Graph) for a in node.attrs.values()):
            return False
        if any(isinstance(t, gs.Variable) and t.name and t.name not in produced for t in node.inputs):
            return False
        produced.update(t.name for t in node.outputs)
    needed = {t.name for t in graph.outputs}
    for node in reversed(graph.nodes):
        if not any(t.name in needed for t in node.outputs):
            return False
        needed.update(t.name for t in node.inputs)
    return True


def to_light_model(graph: gs.Graph, template: onnx.ModelProto, tidy: bool = True
                   ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """:func:`to_model` without copying the large weights: the model holds placeholders, and the
    arrays (the graph's own, not copies) come back beside it for :func:`red_onnx.verify.session`."""
    big = {t.name: t for t in graph.tensors().values()
           if isinstance(t, gs.Constant) and t.shape is not None and int(np.prod(t.shape)) > IN_PLACE_MIN
           and t.values.dtype.kind in "fiub"}
    arrays = {name: t.values for name, t in big.items()}
    for name, t in big.items():
        t.values = np.zeros(0, arrays[name].dtype)
    try:
        model = to_model(graph, template, tidy)
    finally:
        for name, t in big.items():
            t.values = arrays[name]
    for init in model.graph.initializer:
        if init.name in arrays:
            placeholder(init, arrays[init.name].shape)
    return model, {init.name: arrays[init.name] for init in model.graph.initializer if init.name in arrays}


def to_full_model(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """:func:`to_model` for a large graph: the weights are written into the exported model one
    tensor at a time (the exporter would hold two copies of all of them at once)."""
    model, arrays = to_light_model(graph, template)
    for init in model.graph.initializer:
        if init.name in arrays:
            init.CopyFrom(onnx.numpy_helper.from_array(arrays[init.name], init.name))
    return model


def to_model(graph: gs.Graph, template: onnx.ModelProto, tidy: bool = True) -> onnx.ModelProto:
    """Export a graph (``tidy``: cleaned up and sorted first, in place), restoring every
    model-level field of ``template`` that the export drops.

    Intermediate ``value_info`` is dropped: rewrites change intermediate shapes, and stale shapes
    would contradict onnxruntime's own inference. Graph inputs and outputs keep theirs.
    """
    if tidy:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    for node in _all_proto_nodes(model.graph):
        if DOMAIN_MARK in node.op_type:
            node.op_type = node.op_type.split(DOMAIN_MARK)[-1]
    docs = {(n.name, n.op_type): n.doc_string for n in template.graph.node if n.doc_string and n.name}
    for node in model.graph.node:  # onnx-graphsurgeon drops the nodes' doc strings
        if (node.name, node.op_type) in docs and not node.doc_string:
            node.doc_string = docs[node.name, node.op_type]
    del model.graph.value_info[:]
    model.ir_version = template.ir_version
    del model.opset_import[:]
    model.opset_import.extend(template.opset_import)
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, field, getattr(template, field))
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    model.graph.name = template.graph.name
    model.graph.doc_string = template.graph.doc_string
    # graph inputs/outputs as they were (names, types, dynamic dims); an initializer the template
    # listed as an input stays one while it exists (IR < 4 lists every initializer)
    inits = {t.name: t for t in model.graph.initializer}
    template_inits = {t.name for t in template.graph.initializer}
    inputs = [i for i in template.graph.input if i.name not in template_inits or i.name in inits]
    if template.ir_version < 4:
        listed = {i.name for i in inputs}
        inputs += [onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                   for t in model.graph.initializer if t.name not in listed]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    del model.graph.output[:]
    model.graph.output.extend(template.graph.output)
    return model


def model_bytes(model: onnx.ModelProto) -> int:
    """Serialized size: the protobuf plus the raw bytes of every initializer, external or not."""
    external = sum(_external_size(t) for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    return proto_size(model) + external


def model_digest(model: onnx.ModelProto) -> bytes:
    """A digest of the whole model, weights included, serialized one tensor at a time."""
    import hashlib

    h = hashlib.blake2b(without_initializers(model).SerializeToString(deterministic=True), digest_size=16)
    for tensor in model.graph.initializer:
        h.update(tensor.SerializeToString(deterministic=True))
    return h.digest()


def proto_size(model: onnx.ModelProto) -> int:
    """The protobuf's serialized size, computed tensor by tensor (``model.ByteSize()`` serializes
    the whole model, a copy as large as the model, and refuses above 2 GB)."""
    skeleton = without_initializers(model)
    inits = sum(1 + _varint_len(n) + n for n in (t.ByteSize() for t in model.graph.initializer))
    if not model.HasField("graph"):
        return skeleton.ByteSize()
    graph_before = skeleton.graph.ByteSize()
    return skeleton.ByteSize() + inits + _varint_len(graph_before + inits) - _varint_len(graph_before)


def without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without its main graph's initializers (everything else kept)."""
    skeleton = onnx.ModelProto()
    _copy_fields(model, skeleton, skip="graph")
    if model.HasField("graph"):
        _copy_fields(model.graph, skeleton.graph, skip="initializer")
    return skeleton


def check_structure(model: onnx.ModelProto) -> None:
    """``onnx.checker.check_model`` on a copy whose large initializers hold one element: the checker
    then validates the graph (schemas, names, order) without a serialized copy of every weight,
    at any model size."""
    light = without_initializers(model)
    for init in model.graph.initializer:
        in_memory = any(e.key == "location" and e.value == IN_MEMORY for e in init.external_data)
        if in_memory or (_raw_nbytes(init) > 4096 and init.data_location != onnx.TensorProto.EXTERNAL):
            dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
            light.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(1, dtype), init.name))
        else:
            light.graph.initializer.add().CopyFrom(init)
    onnx.checker.check_model(light, full_check=False)


def _copy_fields(src, dst, skip: str) -> None:
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        if field.type == field.TYPE_MESSAGE or hasattr(value, "extend"):  # a message or a repeated field
            getattr(dst, field.name).MergeFrom(value)
        else:
            setattr(dst, field.name, value)


def _varint_len(n: int) -> int:
    return max(1, (int(n).bit_length() + 6) // 7)


def fits_in_protobuf(model: onnx.ModelProto) -> bool:
    return proto_size(model) < EXTERNAL_DATA_THRESHOLD


def _external_size(tensor: onnx.TensorProto) -> int:
    info = {e.key: e.value for e in tensor.external_data}
    if "length" in info:
        return int(info["length"])
    return int(np.prod(tensor.dims)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def external_files(path: str | os.PathLike) -> list[Path]:
    """The external data files a model file refers to (none if it cannot be read)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return []
    names = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    return [Path(path).parent / name for name in names]


def check_output_path(output: str | os.PathLike, inputs: list[str | os.PathLike]) -> Path:
    """Refuse an output (or the ``.data`` file beside it) that is one of the inputs or their external
    data, that lies in a missing or unwritable folder, that names a folder or something other than
    a regular file (a FIFO, a device), or whose name leaves no room for the temporary one."""
    text = os.fspath(output)
    if not text or text.endswith(("/", os.sep)):
        raise InputError(f"output path '{text}' names no file: give a file name")
    out = Path(output)
    folder = out.parent if str(out.parent) else Path(".")
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX") if folder.is_dir() else 255
    except (OSError, ValueError, AttributeError):
        name_max = 255
    if len(os.fsencode(out.name)) + TEMP_NAME_EXTRA > name_max:
        raise InputError(f"{out}: the file name is too long ({len(os.fsencode(out.name))} bytes; at most "
                         f"{name_max - TEMP_NAME_EXTRA} here, the temporary name adds {TEMP_NAME_EXTRA})")
    sources = [Path(s) for s in inputs] + [f for s in inputs if Path(s).is_file() for f in external_files(s)]
    for written in (out, out.with_name(out.name + ".data")):
        for src in sources:
            same = Path(os.path.abspath(src)) == Path(os.path.abspath(written)) or (
                src.exists() and written.exists() and os.path.samefile(src, written))
            if same:
                raise InputError(f"{written}: writing it would overwrite the input model or its weights; "
                                 "choose another output path")
    if not folder.is_dir():
        raise InputError(f"{out}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{out}: folder {folder} is not writable")
    for written in (out, out.with_name(out.name + ".data")):
        if written.is_dir():
            raise InputError(f"{written}: is a directory")
        if written.exists() and not written.is_file():
            raise InputError(f"{written}: exists and is not a regular file (a FIFO, a device?); refusing to replace it")
        if written.exists() and not os.access(written, os.W_OK):
            raise InputError(f"{written}: exists and is not writable")
    return out


#: Bytes the temporary folder's name adds to the output's name (".NAME.xxxxxxxx.tmp", and ".data").
TEMP_NAME_EXTRA = 20


def save(model: onnx.ModelProto, output: str | os.PathLike, external_data: bool | None = None) -> None:
    """Write ``model`` atomically: nothing appears at ``output`` unless the whole file was written.

    ``external_data=None`` stores weights beside the model only when it would exceed 2 GB.
    External data goes to ``<name>.data`` in the same folder, renamed into place before the model.
    Where that file exists already (an earlier output, or another writer that reserved the name
    first), the new data goes to ``<name>.<token>.data``
    so that the earlier model never points at new data: the pair switches with the model's rename,
    and the earlier model's data file is removed after it. An interrupt (SIGINT, SIGTERM) waits
    until the save has finished or failed and cleaned up (:func:`interrupts_deferred`).
    """
    with interrupts_deferred():
        _save(model, output, external_data)


@contextlib.contextmanager
def interrupts_deferred():
    """SIGINT and SIGTERM received inside the block take effect when it ends (the signal is sent
    again once the earlier handlers are back): a save is never left half-done, and nothing
    temporary stays. Outside the main thread signals cannot be handled: the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    earlier = {s: signal.signal(s, lambda signum, frame: received.append(signum))
               for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in earlier.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        for s in dict.fromkeys(received):
            os.kill(os.getpid(), s)


def _save(model: onnx.ModelProto, output: str | os.PathLike, external_data: bool | None) -> None:
    out = Path(output)
    if external_data is None:
        external_data = not fits_in_protobuf(model)
    folder = out.parent if str(out.parent) else Path(".")
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=folder))
    try:
        tmp_model = tmpdir / out.name
        if external_data:
            data_name = out.name + ".data"
            if not _reserve(folder / data_name):  # an earlier output's (or another writer's) data
                data_name = f"{out.name}.{tmpdir.name[len(out.name) + 2:-4]}.data"
            try:
                _save_external(model, tmp_model, tmpdir / data_name)
                _fsync(tmpdir / data_name)
                _fsync(tmp_model)
                previous = [f for f in external_files(out) if f.name.startswith(out.name + ".") and
                            f.parent == folder] if out.is_file() else []
                if (tmpdir / data_name).exists():
                    os.replace(tmpdir / data_name, folder / data_name)
                else:  # no tensor large enough to go external
                    (folder / data_name).unlink(missing_ok=True)
                os.replace(tmp_model, out)
            except BaseException:
                (folder / data_name).unlink(missing_ok=True)  # the earlier pair stays as it was
                raise
            for stale in previous:
                if stale.name != data_name:
                    stale.unlink(missing_ok=True)
        else:
            write_model(model, tmp_model)
            _fsync(tmp_model)
            os.replace(tmp_model, out)
    finally:
        for leftover in tmpdir.iterdir() if tmpdir.exists() else ():
            leftover.unlink()
        if tmpdir.exists():
            tmpdir.rmdir()


def _reserve(path: Path) -> bool:
    """Create ``path`` empty unless it exists, atomically (two writers never both get it)."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        return True
    except FileExistsError:
        return False


#: Models larger than this are written tensor by tensor (:func:`write_model`).
STREAM_BYTES = 2**28


def write_model(model: onnx.ModelProto, path: Path, stream_bytes: int | None = None) -> None:
    """Write ``model`` as ``onnx.save_model`` would, byte for byte. Above ``STREAM_BYTES`` the bytes
    are written field by field: the fields before the graph, the graph's fields before its
    initializers, each initializer (one serialized at a time), the rest of the graph, the rest of
    the model; ``SerializeToString`` would hold one or two copies of the whole model at once."""
    if proto_size(model) <= (STREAM_BYTES if stream_bytes is None else stream_bytes) or not model.HasField("graph"):
        onnx.save_model(model, str(path))
        return
    head, tail = _split_fields(model, 7)  # ModelProto.graph
    graph_head, graph_tail = _split_fields(model.graph, 5)  # GraphProto.initializer
    sizes = [t.ByteSize() for t in model.graph.initializer]
    graph_size = len(graph_head) + len(graph_tail) + sum(1 + _varint_len(n) + n for n in sizes)
    with open(path, "wb") as f:
        f.write(head + b"\x3a" + _varint(graph_size) + graph_head)  # field 7, wire type 2
        for tensor, size in zip(model.graph.initializer, sizes):
            f.write(b"\x2a" + _varint(size))  # field 5, wire type 2
            f.write(tensor.SerializeToString())
        f.write(graph_tail + tail)


def _split_fields(message, number: int) -> tuple[bytes, bytes]:
    """The serialized fields of ``message`` numbered below and above ``number`` (protobuf writes
    known fields in number order, so head + field ``number`` + tail is the whole message)."""
    head, tail = type(message)(), type(message)()
    for field, value in message.ListFields():
        if field.number == number:
            continue
        target = head if field.number < number else tail
        if field.type == field.TYPE_MESSAGE or hasattr(value, "extend"):
            getattr(target, field.name).MergeFrom(value)
        else:
            setattr(target, field.name, value)
    return head.SerializeToString(), tail.SerializeToString()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` atomically (a temporary file beside it, then a rename; interrupts deferred)."""
    with interrupts_deferred():
        _write_text(path, text)


def _write_text(path: str | os.PathLike, text: str) -> None:
    out = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent if str(out.parent) else ".")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_external(model: onnx.ModelProto, path: Path, data_path: Path, threshold: int = 1024) -> None:
    """Write the initializers over ``threshold`` bytes to ``data_path`` one tensor at a time (never a
    copy of the whole model), then the model proto that points at them to ``path``."""
    light = without_initializers(model)
    with open(data_path, "wb") as data:
        for init in model.graph.initializer:
            if init.data_location == onnx.TensorProto.EXTERNAL or _raw_nbytes(init) <= threshold:
                light.graph.initializer.add().CopyFrom(init)
                continue
            raw = init.raw_data if init.HasField("raw_data") else onnx.numpy_helper.to_array(init).tobytes()
            offset = data.tell()
            data.write(raw)
            tensor = light.graph.initializer.add(name=init.name, data_type=init.data_type, dims=init.dims,
                                                 data_location=onnx.TensorProto.EXTERNAL, doc_string=init.doc_string)
            for key, value in (("location", data_path.name), ("offset", str(offset)), ("length", str(len(raw)))):
                tensor.external_data.add(key=key, value=value)
    onnx.save_model(light, str(path))


def _raw_nbytes(init: onnx.TensorProto) -> int:
    """Bytes of a numeric tensor's data (0 for strings and unknown types: they stay inline)."""
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type))
    except (KeyError, ValueError, TypeError):
        return 0
    return int(np.prod(init.dims)) * dtype.itemsize if dtype.kind in "fiucb" else 0


def _fsync(path: Path) -> None:
    if path.exists():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
