"""Frozen TensorFlow graphs of MobileNet v1 (``*_frozen.pb``), read without TensorFlow.

A frozen graph is a serialized ``GraphDef``: a list of ``NodeDef`` (name, op,
inputs, attributes) in which every variable has become a ``Const`` node of
the same name whose ``value`` attribute holds a ``TensorProto`` (dtype, shape,
and the values either as raw little-endian ``tensor_content`` or as repeated
``float_val``/``int_val``...).  The official release archives ship one beside
the checkpoint, and TensorFlow's "image retraining" example writes one
(``retrained_graph.pb``) that keeps the MobileNet body and its 1001-way
``MobilenetV1/Logits`` under TF-slim names, with the new head on top.

The graph's messages are decoded here, fields by number (see
tensorflow/core/framework/{graph,node_def,attr_value}.proto), on the wire
format and tensor messages of :mod:`mobilenets.formats`.  Every length and
every declared tensor size is checked against the file before anything is
sliced or allocated, so a damaged or hostile file gives one
:class:`FrozenGraphError` line, not a traceback or an out-of-memory.  The
constants are then converted exactly as a TF-slim checkpoint's variables are
(:func:`.tf_slim.from_tf_slim_variables`), with BatchNorm's epsilon and the
input resolution read from the graph.
"""

from __future__ import annotations

import math
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MobilenetsError
from ..formats import FormatError
from ..formats.protobuf import I32, LEN, expect, fields, text
from ..formats.tensorflow import declared, tensor, tensor_shape
from .archive import check_inflation

# protobuf refuses messages over 2 GiB, so no real GraphDef is larger
MAX_GRAPH_BYTES = (1 << 31) - 1
SCOPE = "MobilenetV1/"
ANCHOR = SCOPE + "Conv2d_0/weights"  # the first layer's kernel: present in every MobileNet v1 graph
DEFAULT_BN_EPS = 1e-3  # slim's batch_norm default, what mobilenet_v1_arg_scope uses
FUSED_BN_EPS = 1e-4  # the epsilon TensorFlow's FusedBatchNorm ops apply when the node has no attribute
# BatchNorm vectors TensorFlow may store as one repeated value (alpha 4: 27 layers x 4 x 4096 floats)
FILLED_SLACK = 4 << 20
BATCH_NORM_OPS = ("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3")
VARIABLE_OPS = ("VariableV2", "Variable", "VarHandleOp")


class FrozenGraphError(MobilenetsError):
    """Not a readable frozen TensorFlow graph of MobileNet v1; the message says which file, why, and what works."""


# ---------------------------------------------------------------- the graph


@dataclass(frozen=True)
class Node:
    """One NodeDef: its attributes stay raw AttrValue bytes until asked for."""

    name: str
    op: str
    inputs: tuple[str, ...]
    attrs: Mapping[str, memoryview]


class FrozenGraph:
    """The nodes of a serialized GraphDef by name; constants decoded on demand by :meth:`constant`."""

    def __init__(self, data: bytes, *, name: str = "<graph>"):
        self.name = name
        self.size = len(data)
        self.nodes: dict[str, Node] = {}
        self._sources: dict[str, str] = {}
        try:
            for field, wire, value in fields(memoryview(data)):
                if field == 1:  # GraphDef.node; versions and the function library are not needed
                    expect(field, wire, LEN)
                    node = _node(value)
                    self.nodes[node.name] = node
        except FormatError as e:
            raise FrozenGraphError(f"{name} is not a readable TensorFlow GraphDef ({e}); expected a frozen graph "
                                   f"such as mobilenet_v1_1.0_224_frozen.pb, whole and uncorrupted") from None
        if not self.nodes:
            raise FrozenGraphError(f"{name} holds no graph nodes; expected a frozen TensorFlow graph (.pb) "
                                   f"such as mobilenet_v1_1.0_224_frozen.pb")

    def _attr(self, node: Node, key: str) -> dict[int, tuple[int, object]]:
        """An AttrValue's fields by number (s=2, i=3, f=4, b=5, type=6, shape=7, tensor=8)."""
        raw = node.attrs.get(key)
        return {} if raw is None else {f: (w, v) for f, w, v in fields(raw)}

    def _tensor_attr(self, name: str):
        node = self.nodes[name]
        if node.op != "Const":
            raise FrozenGraphError(f"{self.name}: node {name} is a {node.op}, not a constant")
        wire, value = self._attr(node, "value").get(8, (None, None))
        if wire != LEN:
            raise FormatError("its value attribute holds no tensor")
        return value

    def _unreadable(self, name: str, e: FormatError) -> FrozenGraphError:
        return FrozenGraphError(f"{self.name}: constant {name} is unreadable ({e}); the file is damaged, "
                                f"download or export it again")

    def declared(self, name: str) -> tuple[tuple[int, ...], int]:
        """(shape, bytes once decoded) constant ``name`` declares, read without decoding its values."""
        try:
            _, shape, nbytes = declared(self._tensor_attr(name))
            return shape, nbytes
        except FormatError as e:
            raise self._unreadable(name, e) from None

    def constant(self, name: str) -> np.ndarray:
        try:
            return tensor(self._tensor_attr(name), self.size)
        except FormatError as e:
            raise self._unreadable(name, e) from None

    def float_attr(self, name: str, key: str) -> float | None:
        """A float attribute; None where the node has none, and a refusal where it has one that is no float."""
        raw = self.nodes[name].attrs.get(key)
        if raw is None:
            return None
        try:
            wire, value = self._attr(self.nodes[name], key).get(4, (None, None))
        except FormatError:
            wire = None
        if wire != I32:
            raise FrozenGraphError(f"{self.name}: node {name} has an attribute {key} that holds no float (empty "
                                   f"or of another type); TensorFlow would refuse to run it, export the graph again")
        return float(np.frombuffer(value, dtype="<f4")[0])

    def shape_attr(self, name: str, key: str = "shape") -> tuple[int, ...] | None:
        try:
            wire, value = self._attr(self.nodes[name], key).get(7, (None, None))
            return tensor_shape(value) if wire == LEN else None
        except FormatError:
            return None

    def source(self, ref: str) -> str:
        """The node an input reference reads, looking through ``^control``, ``:output`` and Identity nodes.

        Each chain of Identity nodes is walked once and remembered for every node on it, so resolving
        every input of the graph is linear in its size (a ladder of 8,000 Identity nodes read from each
        rung took 40 s walked afresh each time).
        """
        name = ref.lstrip("^").split(":")[0]
        path: list[str] = []
        on_path: set[str] = set()
        while name not in self._sources:
            node = self.nodes.get(name)
            if node is None or node.op != "Identity" or not node.inputs or name in on_path:
                self._sources[name] = name  # a cycle of Identity nodes ends where it closes
                break
            path.append(name)
            on_path.add(name)
            name = node.inputs[0].lstrip("^").split(":")[0]
        found = self._sources[name]
        for step in path:
            self._sources[step] = found
        return found


def _node(buf: memoryview) -> Node:
    name = op = ""
    inputs: list[str] = []
    attrs: dict[str, memoryview] = {}
    for field, wire, value in fields(buf):
        if field in (1, 2, 3, 5):
            expect(field, wire, LEN)
        if field == 1:
            name = text(value)
        elif field == 2:
            op = text(value)
        elif field == 3:
            inputs.append(text(value))
        elif field == 5:  # map<string, AttrValue>: entries of key = 1, value = 2
            key, attr = "", memoryview(b"")
            for f, w, v in fields(value):
                expect(f, w, LEN)
                if f == 1:
                    key = text(v)
                elif f == 2:
                    attr = v
            attrs[key] = attr
    if not name:
        raise FormatError("a node without a name")
    return Node(name, op, tuple(inputs), attrs)


# ---------------------------------------------------------------- files


def read_graph(path) -> FrozenGraph:
    """The graph in a ``.pb`` file, or in the one frozen ``.pb`` of a release ``.tgz``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not path.is_file():
        raise FrozenGraphError(f"{path} is not a regular file; pass a frozen graph .pb or its release .tgz")
    if path.name.endswith((".tgz", ".tar.gz", ".tar")):
        return FrozenGraph(_pb_from_archive(path), name=f"{path}")
    size = path.stat().st_size
    if size > MAX_GRAPH_BYTES:
        raise FrozenGraphError(f"{path} has {size} bytes, more than any GraphDef can have ({MAX_GRAPH_BYTES}); "
                               f"expected a frozen graph such as mobilenet_v1_1.0_224_frozen.pb")
    return FrozenGraph(path.read_bytes(), name=str(path))


def _pb_from_archive(path: Path) -> bytes:
    """The bytes of the archive's frozen graph, read in memory: no member is ever written to disk."""
    try:
        with tarfile.open(path) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".pb")]
            if len(members) > 1:  # a release holds one *_frozen.pb; anything else beside it is not the model
                members = [m for m in members if m.name.endswith("_frozen.pb")] or members
            if len(members) != 1:
                found = [m.name for m in members]
                raise FrozenGraphError(f"{path} holds {len(members)} frozen graphs {found[:4]}; expected one "
                                       f"*_frozen.pb (extract the one you want and pass it)")
            member = members[0]
            if member.size > MAX_GRAPH_BYTES:
                raise FrozenGraphError(f"{path}: {member.name} declares {member.size} bytes, more than any "
                                       f"GraphDef can have ({MAX_GRAPH_BYTES})")
            check_inflation(path, member.name, member.size, FrozenGraphError)
            data = tar.extractfile(member).read(member.size + 1)
    except (tarfile.TarError, EOFError, OSError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0].rstrip(":")  # tarfile lists each method it tried
        raise FrozenGraphError(f"{path} is not a readable tar archive ({reason}); expected a release archive "
                               f"such as mobilenet_v1_1.0_224.tgz") from None
    if len(data) != member.size:
        raise FrozenGraphError(f"{path}: {member.name} is truncated in the archive; download it again")
    return data


class _Constants:
    """The graph's MobilenetV1 constants under their TF-slim names: their shapes told without decoding them
    (the converter checks every shape against the architecture first), their values decoded when read.

    Together the constants read may declare no more bytes than the graph holds (plus
    :data:`FILLED_SLACK` for BatchNorm vectors stored as one repeated value): a trained model's weights
    are in its file, so a graph whose constants ask for more fills them from a few listed values.
    """

    def __init__(self, graph: FrozenGraph, prefix: str):
        self.graph, self.prefix = graph, prefix
        self.names_ = [n[len(prefix):] for n, node in graph.nodes.items()
                       if node.op == "Const" and n.startswith(prefix + SCOPE)]
        self.budget = graph.size + FILLED_SLACK

    def names(self) -> list[str]:
        return self.names_

    def shape(self, name: str) -> tuple[int, ...]:
        return self.graph.declared(self.prefix + name)[0]

    def read(self, name: str):
        _, nbytes = self.graph.declared(self.prefix + name)
        self.budget -= nbytes
        if self.budget < 0:
            raise FrozenGraphError(f"{self.graph.name}: its constants up to {self.prefix + name} declare more bytes "
                                   f"than the graph's {self.graph.size:,} (filled from a few listed values): "
                                   f"not a trained model's weights")
        return self.graph.constant(self.prefix + name)


def _scope_prefix(graph: FrozenGraph) -> str:
    """What precedes ``MobilenetV1/`` in the graph's names: "" unless it was imported under a name scope."""
    found = [n for n in graph.nodes if n == ANCHOR or n.endswith("/" + ANCHOR)]
    if not found:
        sample = sorted(graph.nodes)[:3]
        raise FrozenGraphError(f"{graph.name} is a TensorFlow graph but not a MobileNet v1 one: no node named "
                               f"{ANCHOR} among its {len(graph.nodes)} nodes (e.g. {sample}); expected a frozen "
                               f"MobileNet v1 graph under TF-slim names, such as mobilenet_v1_1.0_224_frozen.pb")
    name = min(found, key=len)
    op = graph.nodes[name].op
    if op in VARIABLE_OPS:
        raise FrozenGraphError(f"{graph.name} holds variables, not constants: it is not frozen; convert its "
                               f"checkpoint instead (source 'tf-slim')")
    if op != "Const":
        raise FrozenGraphError(f"{graph.name}: {name} is a {op} node, not a constant; expected a frozen graph")
    return name[: -len(ANCHOR)]


def bn_epsilon(graph: FrozenGraph, prefix: str = "") -> float:
    """BatchNorm's epsilon as the graph applies it: a FusedBatchNorm attribute (TensorFlow's 1e-4 where the
    node has none), or the constant that unfused batch_norm adds to moving_variance; slim's default when the
    graph shows neither.  An epsilon that is empty, not one number, not finite or not positive is refused."""
    found = set()
    read: dict[str, float] = {}  # each constant decoded once, however many nodes add it
    for node in graph.nodes.values():
        if not node.name.startswith(prefix):
            continue
        if node.op in BATCH_NORM_OPS:
            eps = graph.float_attr(node.name, "epsilon")
            found.add(FUSED_BN_EPS if eps is None else _check_epsilon(graph, node.name, eps))
        elif node.op in ("Add", "AddV2") and len(data := [i for i in node.inputs if not i.startswith("^")]) == 2:
            # "^name" inputs only order execution (a graph may give the add one): the two values are the rest
            sources = [graph.source(i) for i in data]
            if sources[0].endswith("/BatchNorm/moving_variance"):
                other = graph.nodes.get(sources[1])
                if other is not None and other.op != "Const":
                    # a computed epsilon (a Cast, say) is not read: slim's default would stand in for it unseen
                    raise FrozenGraphError(f"{graph.name}: {node.name} adds {other.name!r}, a {other.op} node, "
                                           f"to the variance: BatchNorm's epsilon must be a constant; freeze "
                                           f"the graph with its constants folded")
                if other is not None:
                    if other.name not in read:
                        shape, _ = graph.declared(other.name)
                        if math.prod(shape) != 1:
                            raise FrozenGraphError(f"{graph.name}: {node.name} adds an epsilon of shape {shape} to "
                                                   f"the variance; BatchNorm's epsilon is one number")
                        eps = float(graph.constant(other.name).reshape(-1)[0])
                        read[other.name] = _check_epsilon(graph, other.name, eps)
                    found.add(read[other.name])
    if len(found) > 1:
        raise FrozenGraphError(f"{graph.name}: its BatchNorm layers use different epsilons "
                               f"{sorted(float(f'{e:.7g}') for e in found)}; a MobileNet v1 uses one")
    # stored as float32: 0.001 reads back as 0.0010000000475, so keep the 7 digits float32 carries
    return float(f"{found.pop():.7g}") if found else DEFAULT_BN_EPS


def _check_epsilon(graph: FrozenGraph, name: str, eps: float) -> float:
    if not np.isfinite(eps) or eps <= 0:
        raise FrozenGraphError(f"{graph.name}: {name} gives BatchNorm an epsilon of {eps}; it must be a positive "
                               f"number (slim uses 0.001)")
    return eps


def input_resolution(graph: FrozenGraph, prefix: str = "") -> int | None:
    """The square input size of the placeholder the first convolution reads from, if its shape is known."""
    weights = prefix + ANCHOR
    first = [n for n in graph.nodes.values() if n.op == "Conv2D" and len(n.inputs) == 2
             and graph.source(n.inputs[1]) == weights]
    todo, seen = [graph.source(n.inputs[0]) for n in first], set()
    sizes = set()
    while todo:
        name = todo.pop()
        if name in seen or name not in graph.nodes:
            continue
        seen.add(name)
        node = graph.nodes[name]
        if node.op in ("Placeholder", "PlaceholderWithDefault"):
            shape = graph.shape_attr(name)
            if shape is not None and len(shape) == 4 and shape[1] == shape[2] and shape[1] > 0:
                sizes.add(shape[1])
        todo.extend(graph.source(i) for i in node.inputs)
    return sizes.pop() if len(sizes) == 1 else None


def from_tf_frozen(path, *, keep_background: bool = False, resolution: int | None = None):
    """Convert a frozen MobileNet v1 graph (``.pb``, or the release ``.tgz`` holding one) to our layout.

    Returns the same :class:`mobilenets.weights.Converted` as the other
    converters: alpha from the layer widths, ``resolution`` (unless given)
    from the input placeholder's shape, else the file name, else 224; a
    1001-way head loses class 0 ("background") unless ``keep_background``.
    """
    from .tf_slim import from_tf_slim_variables

    graph = read_graph(path)
    prefix = _scope_prefix(graph)
    return from_tf_slim_variables(_Constants(graph, prefix), path=path, source="tf-frozen",
                                  keep_background=keep_background,
                                  resolution=resolution or input_resolution(graph, prefix),
                                  bn_eps=bn_epsilon(graph, prefix))
