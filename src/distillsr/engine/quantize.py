"""int8 quantisation of an exported network with onnxruntime (``distillsr quantize`` in Python).

:func:`quantize` takes an fp32 ONNX export (:func:`distillsr.engine.export.export_onnx`) and
writes an int8 one that :class:`distillsr.engine.onnx_backend.OnnxModel` runs like the
original (same input, output and ``distillsr.*`` metadata, plus ``distillsr.quantization``).

Static quantisation (the default) is onnxruntime's QDQ format with per-channel int8 weights
and uint8 activations, calibrated (min/max) on LR patches: ``calib_count`` crops of
``calib_size`` x ``calib_size`` pixels of photos downscaled with MATLAB bicubic
(:func:`distillsr.data.train_data.downscale`), at most two per photo. Before the file is
written:

* nodes that must stay float are left out: LayerNorm and Softmax (by op type, and every node
  of a module whose class is a LayerNorm or Softmax, so decomposed forms count too);
* the sensitivity of each unit is measured: one unit quantised alone, the rest float, PSNR
  (Y, border = scale) on held-out patch pairs of other photos against the float run. A unit is
  a layer (the nodes one module owns directly: a convolution, or a block's own adds and
  activations) or, with ``granularity="block"``, one top-level child module;
* the units are then kept float until the whole quantised network loses at most ``max_drop``
  dB on the held-out patches, in the order of the most PSNR saved per share of run time that
  turns float (the unit's multiply-adds and those of the weighted nodes it reads, plus
  :data:`ISLAND_SHARE`), as few as a bisection over their number finds;
* when the last unit kept float has several nodes (a block), only the shortest leading run of
  its nodes (graph order) that keeps the cost within ``max_drop`` stays float
  (:func:`_refine_last_unit`; ``QuantizeReport.partial_float``).

Nodes that stay float read the unquantised tensors (:func:`float_inputs_unquantised`): a
float residual Add beside int8 convolutions adds the features as computed, not their uint8
copies.

The report (:class:`QuantizeReport`) lists each unit's drop, the units kept float and the
final drop; ``distillsr quantize`` writes it beside the file as ``FILE.sensitivity.json``.

Dynamic quantisation (``method="dynamic"``) quantises the weights ahead and the activations
per run (onnxruntime ``quantize_dynamic``); it needs no photos and measures nothing.
"""
from __future__ import annotations

import ast
import contextlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["QuantizeError", "QuantizeReport", "UnitSensitivity", "quantize", "calibration_patches",
           "graph_units", "float_nodes", "onnx_scale", "is_quantized", "format_report", "METHODS",
           "GRANULARITIES", "FLOAT_OP_TYPES", "QUANT_OP_TYPES", "auto_granularity",
           "float_inputs_unquantised", "ISLAND_SHARE"]

PathLike = Union[str, os.PathLike]
Log = Callable[[str], None]

METHODS = ("static", "dynamic")
GRANULARITIES = ("layer", "block", "off")
# op types that stay float whatever the sensitivity says
FLOAT_OP_TYPES = ("LayerNormalization", "Softmax")
# module classes whose every node stays float (a LayerNorm written as mean / var / sqrt)
_FLOAT_CLASS_WORDS = ("LayerNorm", "Softmax")
# nodes with weights: each is a layer of its own for the sensitivity
_WEIGHTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# op types quantised: the weighted ones and those that keep int8 data flowing between them,
# gates (Sigmoid, Mul) and Resize included (onnxruntime runs them as QLinearSigmoid / QLinearMul
# / uint8 Resize, which spares a dequantise / quantise pair around each); the rest stays float
QUANT_OP_TYPES = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "Concat", "LeakyRelu", "Relu", "MaxPool",
                  "DepthToSpace", "Sigmoid", "Mul", "Resize")


class QuantizeError(RuntimeError):
    """The quantisation cannot be done (bad input file, no calibration photos, ...)."""


@dataclass
class UnitSensitivity:
    """PSNR cost (dB, on the held-out patches) of quantising one unit alone."""
    unit: str
    nodes: int
    ops: str
    drop_db: float
    time_share: Optional[float] = None  # share of the network's multiply-adds


@dataclass
class QuantizeReport:
    method: str
    arch: str
    scale: int
    granularity: str
    calib_dir: Optional[str]
    calib_patches: int
    calib_size: int
    check_patches: int
    max_drop_db: float
    float_psnr: Optional[float] = None
    quantized_psnr: Optional[float] = None
    drop_db: Optional[float] = None
    forced_float: List[str] = field(default_factory=list)
    kept_float: List[str] = field(default_factory=list)
    units: List[UnitSensitivity] = field(default_factory=list)
    search: List[Dict[str, float]] = field(default_factory=list)
    # the last unit of kept_float when only its first nodes (graph order) stay float
    partial_float: Optional[Dict[str, object]] = None
    qdq_nodes: int = 0
    seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


# ----------------------------------------------------------------------------- the graph

def _load_proto(path: PathLike):
    import onnx
    try:
        return onnx.load(str(path))
    except Exception as e:  # onnx raises DecodeError and others
        raise QuantizeError(f"{path}: not a readable ONNX file ({type(e).__name__}: {e})") from None


def onnx_scale(proto) -> int:
    """The ``distillsr.scale`` metadata of an export."""
    meta = {p.key: p.value for p in proto.metadata_props}
    try:
        return int(meta["distillsr.scale"])
    except (KeyError, ValueError):
        raise QuantizeError("not a distillsr export: the ONNX file has no distillsr.scale metadata "
                            "(export it with distillsr export)") from None


def is_quantized(proto) -> bool:
    """Whether a graph already holds quantised nodes (QDQ pairs or QLinear/integer ops)."""
    return any(n.op_type in _QDQ_OPS or n.op_type.startswith("QLinear") or n.op_type.endswith("Integer")
               for n in proto.graph.node)


def _node_meta(node) -> Dict[str, str]:
    return {p.key: p.value for p in node.metadata_props}


def _scopes(node) -> List[str]:
    """Module path of a node as the exporter recorded it (``['', 'blocks.0', 'blocks.0.fdc.0',
    'conv2d_1']``); [] when unknown."""
    raw = _node_meta(node).get("pkg.torch.onnx.name_scopes")
    if not raw:
        return []
    try:
        scopes = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return []
    return [str(s) for s in scopes] if isinstance(scopes, list) else []


def _unit_of(node, granularity: str) -> str:
    """The unit a node belongs to: its owning module (``layer``) or top-level child (``block``)."""
    scopes = [s for s in _scopes(node)[:-1] if s]  # drop the op's own name and the root ''
    if not scopes:
        return "(top)"
    return scopes[0] if granularity == "block" else scopes[-1]


def float_nodes(proto) -> List[str]:
    """Nodes that always stay float: LayerNorm and Softmax ops, and every node of a LayerNorm
    or Softmax module."""
    out = []
    for n in proto.graph.node:
        classes = _node_meta(n).get("pkg.torch.onnx.class_hierarchy", "")
        if n.op_type in FLOAT_OP_TYPES or any(w in classes for w in _FLOAT_CLASS_WORDS):
            out.append(n.name)
    return out


def graph_units(proto, granularity: str = "layer") -> Dict[str, List[str]]:
    """``{unit: [node names]}`` of the nodes quantisation may touch (not the always-float ones,
    not shape arithmetic), in graph order."""
    if granularity not in ("layer", "block"):
        raise ValueError(f"unknown granularity {granularity!r}; choose layer or block")
    keep = set(float_nodes(proto))
    units: Dict[str, List[str]] = {}
    for n in proto.graph.node:
        if n.name in keep or n.op_type not in QUANT_OP_TYPES:
            continue
        units.setdefault(_unit_of(n, granularity), []).append(n.name)
    return units


def auto_granularity(proto) -> str:
    """``block`` when the graph's modules nest (fewer block units than layer units), else
    ``layer``. Blocks make the float part a few contiguous regions (few quantise / dequantise
    boundaries, which cost more than the float multiply-adds they spare); the last block the
    search keeps float is then cut down to a leading run of its nodes."""
    return "block" if len(graph_units(proto, "block")) < len(graph_units(proto, "layer")) else "layer"


def _op_summary(proto, names: Sequence[str]) -> str:
    wanted = set(names)
    counts: Dict[str, int] = {}
    for n in proto.graph.node:
        if n.name in wanted:
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return " ".join(f"{k}x{v}" if v > 1 else k for k, v in sorted(counts.items()))


# ----------------------------------------------------------------------------- photos

def calibration_patches(folder: PathLike, scale: int, count: int, size: int = 64, *, seed: int = 0,
                        skip_photos: int = 0, detailed: bool = False) -> List[Tuple[np.ndarray, np.ndarray]]:
    """``count`` pairs ``(lr, hr)``: ``lr`` a 1 x 3 x size x size float32 crop in [0, 1] of a photo
    downscaled x``scale`` (MATLAB bicubic), ``hr`` the matching uint8 HR crop (H x W x 3).

    Photos are taken in name order after the first ``skip_photos``, at most two crops each;
    photos too small for one crop are passed over. ``detailed``: each crop is the most detailed
    (largest mean absolute HR gradient) of four random ones, so that the float network scores
    near its benchmark PSNR there rather than on flat sky. Raises :class:`QuantizeError` naming the
    folder when it holds no usable photo."""
    from ..data.train_data import DataError, downscale, list_images, read_rgb
    folder = Path(folder)
    try:
        photos = list_images(folder)
    except DataError as e:
        raise QuantizeError(f"calibration photos: {e} (give --calib DIR, a folder of photos)") from None
    if not photos:
        raise QuantizeError(f"calibration photos: {folder} holds no image files (.png, .jpg, ...); "
                            "give --calib DIR, a folder of photos")
    rng = np.random.default_rng(seed)
    order = photos[skip_photos:] + photos[:skip_photos]
    pairs: List[Tuple[np.ndarray, np.ndarray]] = []
    for path in order:
        if len(pairs) >= count:
            break
        try:
            hr = read_rgb(path)
            lr = downscale(hr, scale)
        except DataError:
            continue  # an unreadable file among the photos is passed over
        h, w = lr.shape[:2]
        if h < size or w < size:
            continue
        for _ in range(min(2, count - len(pairs))):
            spots = [(int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1)))
                     for _ in range(4 if detailed else 1)]
            y, x = max(spots, key=lambda yx: _detail(hr, yx, size * scale, scale))
            crop = lr[y:y + size, x:x + size].astype(np.float32).transpose(2, 0, 1)[None] / 255.0
            pairs.append((np.ascontiguousarray(crop),
                          np.ascontiguousarray(hr[y * scale:(y + size) * scale, x * scale:(x + size) * scale])))
    if not pairs:
        raise QuantizeError(f"calibration photos: none of the {len(photos)} image(s) in {folder} could be "
                            f"read or is large enough for a {size}x{size} LR crop at x{scale} "
                            f"(>= {size * scale} pixels a side)")
    return pairs


def _detail(hr: np.ndarray, yx: Tuple[int, int], side: int, scale: int) -> float:
    y, x = yx[0] * scale, yx[1] * scale
    g = hr[y:y + side, x:x + side].astype(np.float32).mean(axis=2)
    return float(np.abs(np.diff(g, axis=0)).mean() + np.abs(np.diff(g, axis=1)).mean())


class _Reader:
    """The onnxruntime CalibrationDataReader over LR patches (one patch per run)."""

    def __init__(self, input_name: str, patches: Sequence[np.ndarray]):
        self._items = [{input_name: p} for p in patches]
        self._it = iter(self._items)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self._items)

    def __len__(self):
        return len(self._items)


# ----------------------------------------------------------------------------- scoring

class _Checker:
    """PSNR (Y, border = scale) of a graph on held-out patch pairs, mean over the patches."""

    def __init__(self, pairs, scale: int, input_name: str, threads: Optional[int]):
        self.pairs, self.scale, self.input_name, self.threads = pairs, scale, input_name, threads

    def psnr(self, path: PathLike) -> float:
        import onnxruntime as ort
        from ..metrics import psnr, to_uint8
        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        options.log_severity_level = 3
        runner = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        scores = []
        for lr, hr in self.pairs:
            sr = runner.run(None, {self.input_name: lr})[0][0].transpose(1, 2, 0)
            scores.append(psnr(to_uint8(sr), hr, crop=self.scale))
        return float(np.mean(scores))


@contextlib.contextmanager
def _quiet_quantizer():
    """onnxruntime.quantization logs through the root logger (a pre-processing hint each call)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _static(src: PathLike, dst: PathLike, *, cache: Path, reader: Optional[_Reader],
            nodes_to_quantize=None, nodes_to_exclude=None, src_proto=None) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    if reader is not None:
        reader.rewind()
    with _quiet_quantizer():
        quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_quantize=nodes_to_quantize, nodes_to_exclude=nodes_to_exclude,
                        op_types_to_quantize=list(QUANT_OP_TYPES),
                        calibrate_method=CalibrationMethod.MinMax, calibration_cache_path=str(cache))
    src_proto = src_proto if src_proto is not None else _load_proto(src)
    wanted = None if nodes_to_quantize is None else set(nodes_to_quantize)
    unwanted = set(nodes_to_exclude or ())
    floats = {n.name for n in src_proto.graph.node
              if n.op_type not in QUANT_OP_TYPES or n.name in unwanted or (wanted is not None and n.name not in wanted)}
    float_inputs_unquantised(src_proto, dst, floats)


def float_inputs_unquantised(src_proto, path: PathLike, float_names) -> int:
    """Rewrite the QDQ file ``path`` so that the nodes meant to run float (``float_names``) read
    the unquantised tensors: onnxruntime's quantiser hands every consumer of a quantised tensor
    its dequantised copy, so a float node next to int8 ones (a global residual Add, a kept-float
    convolution) would compute on rounded data for no speed gain. A tensor whose producer the
    quantiser changed (a Relu folded into the Conv before it) keeps its Q/DQ pair; Q/DQ nodes
    left without consumers are removed. Returns the number of inputs rewired."""
    import onnx
    proto = onnx.load(str(path))
    graph = proto.graph
    src_producer = {o: n.op_type for n in src_proto.graph.node for o in n.output}
    producer = {o: n.op_type for n in graph.node for o in n.output}
    quantised_from = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    original: Dict[str, str] = {}  # DQ output -> the float tensor its Q took
    for n in graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in quantised_from:
            t = quantised_from[n.input[0]]
            if t in src_producer and producer.get(t) == src_producer[t]:
                original[n.output[0]] = t
            elif t not in src_producer and t in {i.name for i in src_proto.graph.input}:
                original[n.output[0]] = t
    floats, rewired = set(float_names), 0
    for n in graph.node:
        if n.name in floats and n.op_type not in _QDQ_OPS:
            for i, name in enumerate(n.input):
                if name in original:
                    n.input[i] = original[name]
                    rewired += 1
    if not rewired:
        return 0
    outputs = {o.name for o in graph.output}
    while True:  # Q/DQ nodes whose outputs nobody reads any more
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.op_type in _QDQ_OPS and n.output[0] not in used]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input} | {i.name for i in graph.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    onnx.save_model(proto, str(path))
    return rewired


def _count_qdq(path: PathLike) -> int:
    return sum(n.op_type in _QDQ_OPS for n in _load_proto(path).graph.node)


def _set_metadata(path: PathLike, extra: Dict[str, str]) -> None:
    import onnx
    proto = onnx.load(str(path))
    have = {p.key: p for p in proto.metadata_props}
    for k, v in extra.items():
        if k in have:
            have[k].value = v
        else:
            e = proto.metadata_props.add()
            e.key, e.value = k, v
    onnx.save_model(proto, str(path))


# ----------------------------------------------------------------------------- quantize

def quantize(src: PathLike, dst: PathLike, *, method: str = "static", calib_dir: Optional[PathLike] = None,
             calib_count: int = 32, calib_size: int = 64, check_count: int = 16,
             granularity: str = "layer", max_drop: float = 0.15, threads: Optional[int] = None,
             keep_float: Optional[Sequence[str]] = None, log: Optional[Log] = None) -> QuantizeReport:
    """Quantise the fp32 export ``src`` to ``dst`` (written atomically: complete or absent).

    ``method``: ``static`` (QDQ, per-channel, calibrated on ``calib_dir``) or ``dynamic``.
    ``granularity``: the sensitivity unit (``layer``, ``block``) or ``off`` (no analysis:
    everything but LayerNorm / Softmax is quantised). ``max_drop``: the PSNR cost (dB) allowed
    on the ``check_count`` held-out patches; units are kept float until it holds.
    ``keep_float``: units (of ``granularity``) to keep float instead of searching; no
    sensitivity is measured then."""
    from ..io import atomic_write
    log = log or (lambda msg: None)
    if method not in METHODS:
        raise QuantizeError(f"unknown method {method!r}; choose {' or '.join(METHODS)}")
    if granularity not in GRANULARITIES:
        raise QuantizeError(f"unknown sensitivity granularity {granularity!r}; choose {', '.join(GRANULARITIES)}")
    if Path(dst).suffix.lower() != ".onnx":
        raise QuantizeError(f"{dst}: the output file should end in .onnx")
    start = time.perf_counter()
    proto = _load_proto(src)
    scale = onnx_scale(proto)
    if is_quantized(proto):
        raise QuantizeError(f"{src}: already quantised; give the fp32 export")
    meta = {p.key: p.value for p in proto.metadata_props}
    arch = meta.get("distillsr.arch", "onnx")
    input_name = proto.graph.input[0].name
    forced = float_nodes(proto)
    report = QuantizeReport(method, arch, scale, granularity if method == "static" else "off",
                            str(calib_dir) if calib_dir is not None and method == "static" else None,
                            0, calib_size, 0, max_drop, forced_float=forced)
    with tempfile.TemporaryDirectory(prefix="distillsr-quantize-") as tmpdir:
        tmp = Path(tmpdir)
        if method == "dynamic":
            from onnxruntime.quantization import QuantType, quantize_dynamic
            with _quiet_quantizer():
                quantize_dynamic(str(src), str(tmp / "q.onnx"), per_channel=True, weight_type=QuantType.QUInt8,
                                 nodes_to_exclude=forced or None)
        else:
            if calib_dir is None:
                raise QuantizeError("static quantisation needs calibration photos: give --calib DIR")
            calib = calibration_patches(calib_dir, scale, calib_count, calib_size, seed=0)
            report.calib_patches = len(calib)
            reader = _Reader(input_name, [lr for lr, _ in calib])
            cache = tmp / "ranges.json"
            log(f"calibrating on {len(calib)} LR patches of {calib_size}x{calib_size} from {calib_dir}")
            excluded = list(forced)
            if keep_float is not None:
                if granularity == "off":
                    raise QuantizeError("keep_float names units: give a granularity (layer or block)")
                units = graph_units(proto, granularity)
                unknown = [u for u in keep_float if u not in units]
                if unknown:
                    raise QuantizeError(f"no {granularity} unit named {', '.join(unknown)} in {src}")
                excluded += [n for u in keep_float for n in units[u]]
                report.kept_float = list(keep_float)
            _static(src, tmp / "q.onnx", cache=cache, reader=reader, nodes_to_exclude=excluded or None,
                    src_proto=proto)
            if granularity != "off" and keep_float is None:
                _choose_float_units(src, proto, tmp, cache, report, calib_dir, calib_size, check_count,
                                    input_name, threads, forced, log)
        _set_metadata(tmp / "q.onnx", {"distillsr.quantization": json.dumps(
            {"method": method, "format": "QDQ" if method == "static" else "dynamic",
             "weights": "int8 per-channel", "kept_float": report.kept_float,
             "partial_float": ({k: report.partial_float[k] for k in ("unit", "nodes", "of")}
                               if report.partial_float else None),
             "forced_float": len(forced), "drop_db_on_check_patches": report.drop_db})})
        report.qdq_nodes = _count_qdq(tmp / "q.onnx")
        data = (tmp / "q.onnx").read_bytes()
    atomic_write(dst, lambda t: Path(t).write_bytes(data))
    report.seconds = round(time.perf_counter() - start, 1)
    return report


def _choose_float_units(src, proto, tmp: Path, cache: Path, report: QuantizeReport, calib_dir, calib_size: int,
                        check_count: int, input_name: str, threads, forced: List[str], log: Log) -> None:
    """The sensitivity analysis and the float units it leads to (``tmp/q.onnx`` is replaced by
    the final choice)."""
    # held-out pairs: crops of other photos than the calibration ones
    pairs = calibration_patches(calib_dir, report.scale, check_count, calib_size, seed=1,
                                skip_photos=(report.calib_patches + 1) // 2, detailed=True)
    report.check_patches = len(pairs)
    checker = _Checker(pairs, report.scale, input_name, threads)
    report.float_psnr = round(checker.psnr(src), 4)
    units = graph_units(proto, report.granularity)
    log(f"sensitivity: {len(units)} {report.granularity} unit(s), each quantised alone, scored on "
        f"{len(pairs)} held-out patches (float: {report.float_psnr:.3f} dB)")
    one = tmp / "one.onnx"
    for i, (unit, nodes) in enumerate(units.items()):
        _static(src, one, cache=cache, reader=None, nodes_to_quantize=nodes, nodes_to_exclude=forced or None,
                src_proto=proto)
        drop = report.float_psnr - checker.psnr(one)
        report.units.append(UnitSensitivity(unit, len(nodes), _op_summary(proto, nodes), round(drop, 4)))
        log(f"  [{i + 1}/{len(units)}] {unit}: {drop:+.4f} dB")
    # the units kept float for the whole graph to fit max_drop, in the order of the most PSNR
    # saved per unit of run time lost (a unit's time share is estimated from its multiply-adds,
    # plus a floor for the quantise / dequantise steps around any float island); a bisection over
    # their number (the cost falls, give or take noise, as more stay float)
    shares = _unit_time_shares(src, proto, units, input_name, pairs[0][0])
    for u in report.units:
        u.time_share = round(shares[u.unit], 5)
    order = [u.unit for u in sorted(report.units, key=lambda u: -u.drop_db / (shares[u.unit] + ISLAND_SHARE))]
    final = tmp / "q.onnx"
    trials: Dict[int, float] = {0: report.float_psnr - checker.psnr(final)}
    log(f"  whole graph quantised: {trials[0]:+.4f} dB (allowed {report.max_drop_db} dB)")

    def build(k: int, path: Path) -> float:
        excluded = forced + [n for u in order[:k] for n in units[u]]
        _static(src, path, cache=cache, reader=None, nodes_to_exclude=excluded or None, src_proto=proto)
        trials[k] = report.float_psnr - checker.psnr(path)
        log(f"  first {k} unit(s) of the order float: {trials[k]:+.4f} dB")
        return trials[k]

    lo, hi = 0, len(order)
    if trials[0] > report.max_drop_db:
        best = None
        while hi - lo > 1:
            mid = (lo + hi) // 2
            trial = tmp / f"k{mid}.onnx"
            if build(mid, trial) <= report.max_drop_db:
                hi, best = mid, trial
            else:
                lo = mid
        if best is None:
            build(hi, tmp / f"k{hi}.onnx")
            best = tmp / f"k{hi}.onnx"
        os.replace(best, final)
        kept = order[:hi]
    else:
        kept, hi = [], 0
    report.kept_float = kept
    report.search = [{"float_units": k, "drop_db": round(v, 4)} for k, v in sorted(trials.items())]
    drop = trials[hi]
    if kept and len(units[kept[-1]]) > 1:
        drop = _refine_last_unit(src, proto, tmp, cache, report, units, kept, forced, checker, drop, log)
    report.drop_db = round(drop, 4)
    report.quantized_psnr = round(report.float_psnr - drop, 4)
    log(f"  chosen: {len(kept)} unit(s) float"
        + (f" ({report.partial_float['nodes']} of the last one's {len(units[kept[-1]])} nodes)"
           if report.partial_float else "") + f", {drop:+.4f} dB on the held-out patches")


def _refine_last_unit(src, proto, tmp: Path, cache: Path, report: QuantizeReport, units: Dict[str, List[str]],
                      kept: List[str], forced: List[str], checker: "_Checker", drop: float, log: Log) -> float:
    """The last unit the bisection kept float (the one that brought the cost within
    ``max_drop``) is cut down to the shortest leading run of its nodes, in graph order, that
    still keeps the cost within it: the float region grows from where it touches the float
    part before it instead of taking a whole block. ``tmp/q.onnx`` is replaced when a shorter
    run is found; returns the final drop."""
    last = units[kept[-1]]
    base = forced + [n for u in kept[:-1] for n in units[u]]
    lo, hi, best = 0, len(last), None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        trial = tmp / f"part{mid}.onnx"
        _static(src, trial, cache=cache, reader=None, nodes_to_exclude=base + last[:mid], src_proto=proto)
        cost = report.float_psnr - checker.psnr(trial)
        report.search.append({"float_units": len(kept) - 1, "partial_nodes": mid, "drop_db": round(cost, 4)})
        log(f"  {len(kept) - 1} unit(s) and the first {mid} of {len(last)} nodes of {kept[-1]} float: {cost:+.4f} dB")
        if cost <= report.max_drop_db:
            hi, best = mid, (trial, cost)
        else:
            lo = mid
    if best is None:
        return drop
    os.replace(best[0], tmp / "q.onnx")
    report.partial_float = {"unit": kept[-1], "nodes": hi, "of": len(last), "float_nodes": last[:hi]}
    return best[1]


# the run time share charged to any unit kept float on top of its multiply-adds: the
# dequantise / quantise (and layout) steps where int8 data enters and leaves a float island
ISLAND_SHARE = 0.02


def _unit_time_shares(src, proto, units: Dict[str, List[str]], input_name: str, patch: np.ndarray) -> Dict[str, float]:
    """The share of the network's multiply-adds (convolutions, MatMul, Gemm) that runs float
    when a unit is kept float: its own weighted nodes and those whose outputs it reads, from the
    tensor shapes of one float run on ``patch``."""
    import onnx
    import onnxruntime as ort
    weighted = [n for n in proto.graph.node if n.op_type in _WEIGHTED_OPS]
    if not weighted:
        return {u: 0.0 for u in units}
    probe = onnx.load(str(src))
    known = {o.name for o in probe.graph.output}
    wanted = []
    for n in weighted:
        for t in (n.input[0], n.output[0]):
            if t not in known:
                probe.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
                known.add(t)
            wanted.append(t)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    runner = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = list(dict.fromkeys(wanted))
    shapes = {k: v.shape for k, v in zip(names, runner.run(names, {input_name: patch}))}
    weights = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    macs: Dict[str, float] = {}
    for n in weighted:
        x, y = shapes[n.input[0]], shapes[n.output[0]]
        w = weights.get(n.input[1]) if len(n.input) > 1 else None
        if n.op_type == "Conv":
            per_output = float(np.prod(w[1:])) if w else float(x[1])
            macs[n.name] = float(np.prod(y)) * per_output
        elif n.op_type == "ConvTranspose":
            macs[n.name] = float(np.prod(x)) * (float(np.prod(w[1:])) if w else float(y[1]))
        else:  # MatMul, Gemm: the output times the inner dimension
            macs[n.name] = float(np.prod(y)) * float(x[-1])
    total = sum(macs.values()) or 1.0
    # a float node reads unquantised tensors (float_inputs_unquantised), so the weighted nodes
    # that produce its inputs run float too
    producer = {o: n.name for n in proto.graph.node for o in n.output}
    shares = {}
    for u, nodes in units.items():
        own = set(nodes)
        fed = {producer.get(i) for n in proto.graph.node if n.name in own for i in n.input}
        shares[u] = sum(macs.get(n, 0.0) for n in own | (fed - own)) / total
    return shares


def format_report(report: QuantizeReport, top: int = 15) -> str:
    """The sensitivity table (most sensitive first) and the outcome, for people."""
    lines = []
    if report.units:
        lines.append(f"sensitivity ({report.granularity} units quantised alone; PSNR drop on "
                     f"{report.check_patches} held-out patches, float {report.float_psnr:.3f} dB):")
        lines.append(f"  {'unit':<32} {'nodes':>5} {'drop dB':>8} {'time %':>6}  float  ops")
        for u in sorted(report.units, key=lambda u: -u.drop_db)[:top]:
            mark = "yes" if u.unit in report.kept_float else ""
            share = f"{100 * u.time_share:.1f}" if u.time_share is not None else "-"
            lines.append(f"  {u.unit:<32} {u.nodes:>5} {u.drop_db:>8.4f} {share:>6}  {mark:<5}  {u.ops}")
        if len(report.units) > top:
            lines.append(f"  ... {len(report.units) - top} more in the JSON report")
    lines.append(f"{report.method}: {len(report.forced_float)} LayerNorm/Softmax node(s) float, "
                 f"{len(report.kept_float)} sensitive unit(s) float"
                 + (f" (of {report.partial_float['unit']} only its first {report.partial_float['nodes']} of "
                    f"{report.partial_float['of']} nodes)" if report.partial_float else "")
                 + f", {report.qdq_nodes} Q/DQ nodes")
    if report.drop_db is not None:
        lines.append(f"held-out patches: {report.float_psnr:.3f} dB float -> {report.quantized_psnr:.3f} dB int8 "
                     f"({-report.drop_db:+.3f} dB; allowed {report.max_drop_db} dB)")
    return "\n".join(lines)
