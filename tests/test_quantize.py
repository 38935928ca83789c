"""``distillsr quantize``: int8 ONNX files that eval and upscale run, within 0.10 dB of fp32."""
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_path

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from distillsr.engine import quantize as Q  # noqa: E402


def _in_process(*args):
    """The CLI in this process: (exit status, stdout, stderr)."""
    import contextlib
    import io
    from distillsr.cli.main import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def _eval_psnr(weights, data) -> float:
    """Set5 PSNR through ``distillsr eval --json``."""
    js = Path(weights).with_suffix(".json")
    code, out, err = _in_process("eval", "--weights", weights, "--data", data, "--datasets", "Set5",
                                 "--device", "cpu", "--json", js)
    assert code == 0, err
    assert "x4" in out
    return json.loads(js.read_text())["results"][0]["psnr"]


# ----------------------------------------------------------------------------- a small graph

def _small_graph(path: Path, scale: int = 2) -> Path:
    """conv -> LayerNorm -> conv -> Softmax(channels) * feature -> conv -> DepthToSpace, with a
    decomposed LayerNorm (ReduceMean / Sub) tagged by its module class as the exporter does."""
    rng = np.random.default_rng(0)
    c = 8

    def w(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), name)

    def scoped(node, scopes, classes):
        for key, value in (("pkg.torch.onnx.name_scopes", repr(scopes)),
                           ("pkg.torch.onnx.class_hierarchy", repr(classes))):
            e = node.metadata_props.add()
            e.key, e.value = key, value
        return node

    net = "tiny.Net"
    nodes = [
        scoped(helper.make_node("Conv", ["input", "w1", "b1"], ["f1"], "conv1", pads=[1, 1, 1, 1]),
               ["", "head", "conv"], [net, "Conv2d", "conv"]),
        helper.make_node("Transpose", ["f1"], ["t1"], "to_nhwc", perm=[0, 2, 3, 1]),
        scoped(helper.make_node("LayerNormalization", ["t1", "g", "beta"], ["t2"], "ln", axis=-1),
               ["", "norm", "ln"], [net, "LayerNorm", "ln"]),
        helper.make_node("Transpose", ["t2"], ["f2"], "to_nchw", perm=[0, 3, 1, 2]),
        scoped(helper.make_node("Conv", ["f2", "w2", "b2"], ["f3"], "conv2", pads=[1, 1, 1, 1]),
               ["", "body", "conv"], [net, "Conv2d", "conv"]),
        scoped(helper.make_node("ReduceMean", ["f3", "axes"], ["mu"], "ln2_mean", keepdims=1),
               ["", "norm2", "mean"], [net, "distillsr.models.asid.LayerNorm2d", "mean"]),
        scoped(helper.make_node("Sub", ["f3", "mu"], ["f4"], "ln2_sub"),
               ["", "norm2", "sub"], [net, "distillsr.models.asid.LayerNorm2d", "sub"]),
        scoped(helper.make_node("Softmax", ["f4"], ["a"], "softmax", axis=1),
               ["", "attn", "softmax"], [net, "Attention", "softmax"]),
        scoped(helper.make_node("Mul", ["a", "f4"], ["f5"], "gate"), ["", "attn", "mul"], [net, "Attention", "mul"]),
        scoped(helper.make_node("Add", ["f5", "f1"], ["f6"], "skip"), ["", "add"], [net, "add"]),
        scoped(helper.make_node("Conv", ["f6", "w3", "b3"], ["f7"], "conv3", pads=[1, 1, 1, 1]),
               ["", "tail", "conv"], [net, "Conv2d", "conv"]),
        helper.make_node("DepthToSpace", ["f7"], ["output"], "shuffle", blocksize=scale, mode="CRD"),
    ]
    inits = [w("w1", c, 3, 3, 3), w("b1", c), w("w2", c, c, 3, 3), w("b2", c),
             w("w3", 3 * scale * scale, c, 3, 3), w("b3", 3 * scale * scale),
             numpy_helper.from_array(np.ones(c, np.float32), "g"), numpy_helper.from_array(np.zeros(c, np.float32), "beta"),
             numpy_helper.from_array(np.array([1], np.int64), "axes")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, "h", "w"])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["n", 3, None, None])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    for k, v in (("distillsr.scale", str(scale)), ("distillsr.arch", "tiny")):
        e = model.metadata_props.add()
        e.key, e.value = k, v
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _photos(folder: Path, n: int = 4, side: int = 96) -> Path:
    from distillsr.io import write_image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        base = np.linspace(0, 255, side)[None, :, None] * np.ones((side, 1, 3))
        img = np.clip(base + rng.normal(0, 20, (side, side, 3)), 0, 255).astype(np.uint8)
        write_image(folder / f"p{i}.png", img)
    return folder


def _producers(proto):
    return {o: n for n in proto.graph.node for o in n.output}


def test_float_nodes_and_units_of_a_small_graph(tmp_path):
    proto = onnx.load(_small_graph(tmp_path / "tiny.onnx"))
    assert set(Q.float_nodes(proto)) == {"ln", "ln2_mean", "ln2_sub", "softmax"}
    layers = Q.graph_units(proto, "layer")
    assert layers == {"head": ["conv1"], "body": ["conv2"], "attn": ["gate"], "(top)": ["skip", "shuffle"],
                      "tail": ["conv3"]}
    # Mul (a gate) is quantised, the Softmax beside it is not; a block is the top-level module
    assert Q.graph_units(proto, "block") == layers


def test_layernorm_and_softmax_stay_float_after_static_quantisation(tmp_path):
    src = _small_graph(tmp_path / "tiny.onnx")
    out = tmp_path / "tiny_int8.onnx"
    report = Q.quantize(src, out, calib_dir=_photos(tmp_path / "photos"), calib_count=4, calib_size=16,
                        check_count=2, granularity="layer", max_drop=100.0)
    proto = onnx.load(out)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
    assert report.qdq_nodes == ops.count("QuantizeLinear") + ops.count("DequantizeLinear")
    made_by = _producers(proto)
    for n in proto.graph.node:
        if n.name in ("ln", "ln2_mean", "ln2_sub", "softmax"):
            assert n.op_type not in ("QuantizeLinear", "DequantizeLinear")
            # every input of a float node is a float tensor (no QuantizeLinear feeds it)
            for i in n.input:
                assert i not in made_by or made_by[i].op_type != "QuantizeLinear"
    # the three convolutions run on int8 weights (initialisers behind DequantizeLinear)
    inits = {i.name: i for i in proto.graph.initializer}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert len(convs) == 3
    for conv in convs:
        dq = made_by[conv.input[1]]
        assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].data_type == TensorProto.INT8
    assert [u.unit for u in report.units] == ["head", "body", "attn", "(top)", "tail"]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["distillsr.scale"] == "2" and json.loads(meta["distillsr.quantization"])["method"] == "static"


def test_sensitive_units_are_kept_float_until_the_cost_fits(tmp_path):
    src = _small_graph(tmp_path / "tiny.onnx")
    photos = _photos(tmp_path / "photos")
    loose = Q.quantize(src, tmp_path / "a.onnx", calib_dir=photos, calib_count=4, calib_size=16, check_count=2,
                       max_drop=100.0)
    # an unreachable target: every unit ends up float, the most sensitive first
    strict = Q.quantize(src, tmp_path / "b.onnx", calib_dir=photos, calib_count=4, calib_size=16, check_count=2,
                        max_drop=-1.0)
    assert loose.kept_float == [] and len(loose.units) == 5
    # the order: PSNR saved per share of the run time that turns float
    by_cost = [u.unit for u in sorted(loose.units, key=lambda u: -u.drop_db / (u.time_share + Q.ISLAND_SHARE))]
    assert strict.kept_float == by_cost
    assert strict.drop_db == 0.0  # all float: the float network's PSNR
    assert strict.qdq_nodes < loose.qdq_nodes


def test_time_shares_count_the_producers_a_float_unit_reads(tmp_path):
    src = _small_graph(tmp_path / "tiny.onnx")
    proto = onnx.load(src)
    units = Q.graph_units(proto, "layer")
    shares = Q._unit_time_shares(src, proto, units, "input", np.zeros((1, 3, 6, 5), np.float32))
    # multiply-adds per output pixel: conv1 8 x 27, conv2 8 x 72, conv3 12 x 72 (same spatial size)
    total = 8 * 27 + 8 * 72 + 12 * 72
    assert shares["head"] == pytest.approx(8 * 27 / total)
    assert shares["body"] == pytest.approx(8 * 72 / total)
    assert shares["tail"] == pytest.approx(12 * 72 / total)
    assert shares["attn"] == 0.0  # the gate reads the Softmax and the LayerNorm, no weighted node
    # the skip Add reads conv1's output and the shuffle conv3's: kept float, both run float
    assert shares["(top)"] == pytest.approx((8 * 27 + 12 * 72) / total)


def test_float_nodes_read_unquantised_tensors(tmp_path):
    src = _small_graph(tmp_path / "tiny.onnx")
    out = tmp_path / "kept.onnx"
    report = Q.quantize(src, out, calib_dir=_photos(tmp_path / "photos"), calib_count=4, calib_size=16,
                        granularity="layer", keep_float=["(top)"])
    assert report.kept_float == ["(top)"]
    proto = onnx.load(out)
    made_by = _producers(proto)
    skip = next(n for n in proto.graph.node if n.name == "skip")
    # the kept-float Add takes the gate's and conv1's outputs as computed, not their int8 copies
    assert list(skip.input) == ["f5", "f1"]
    assert made_by["f1"].op_type == "Conv" and made_by["f5"].op_type == "Mul"
    # f1's other consumer (the Transpose before the LayerNorm) is float too: its Q/DQ pair is gone,
    # while conv2's input, read by an int8 conv, keeps one
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == "f1" for n in proto.graph.node)
    assert any(n.op_type == "QuantizeLinear" and n.input[0] == "f2" for n in proto.graph.node)
    # no Q/DQ node is left without a consumer, no initialiser unused
    used = {i for n in proto.graph.node for i in n.input} | {o.name for o in proto.graph.output}
    for n in proto.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert n.output[0] in used, n.name
    assert {t.name for t in proto.graph.initializer} <= used
    # without the rewiring the Add would read dequantised copies
    plain = tmp_path / "plain.onnx"
    fp32 = onnx.load(src)
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    reader = Q._Reader("input", [lr for lr, _ in Q.calibration_patches(tmp_path / "photos", 2, 4, 16)])
    quantize_static(str(src), str(plain), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=["skip", "shuffle"], op_types_to_quantize=list(Q.QUANT_OP_TYPES),
                    calibrate_method=CalibrationMethod.MinMax)
    before = _producers(onnx.load(plain))
    skip_before = next(n for n in onnx.load(plain).graph.node if n.name == "skip")
    assert all(before[i].op_type == "DequantizeLinear" for i in skip_before.input)
    # the Add's two inputs and the shuffle's one
    assert Q.float_inputs_unquantised(fp32, plain, ["skip", "shuffle"]) == 3
    assert list(next(n for n in onnx.load(plain).graph.node if n.name == "skip").input) == ["f5", "f1"]
    # and the file runs
    from distillsr.engine.onnx_backend import OnnxModel
    import torch
    assert tuple(OnnxModel(out)(torch.rand(1, 3, 9, 11)).shape) == (1, 3, 18, 22)


# ----------------------------------------------------------------------------- E-RFDN end to end

@pytest.fixture(scope="module")
def erfdn_int8(tmp_path_factory):
    """The released E-RFDN x4 quantised through the CLI with a small calibration set."""
    weights = shared_path("weights", "official", "rfdn_aim_x4.pth")
    calib = shared_path("data", "train_photos")
    out = tmp_path_factory.mktemp("q") / "q.onnx"
    code, stdout, err = _in_process("quantize", "--weights", weights, "--scale", 4, "-o", out, "--calib", calib,
                                    "--calib-count", 16, "--check-count", 8, "--sensitivity", "block")
    assert code == 0, err
    return out, stdout


def test_erfdn_int8_costs_at_most_a_tenth_of_a_db_on_set5(erfdn_int8, tmp_path):
    out, stdout = erfdn_int8
    data = shared_path("data", "benchmark")
    weights = tmp_path / "rfdn_aim_x4.pth"  # the fp32 network, as torch runs it
    weights.write_bytes(shared_path("weights", "official", "rfdn_aim_x4.pth").read_bytes())
    cost = _eval_psnr(weights, data) - _eval_psnr(out, data)
    assert cost <= 0.10, stdout
    proto = onnx.load(out)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") >= 20  # most of the network is int8
    report = json.loads(Path(str(out) + ".sensitivity.json").read_text())
    assert report["units"] and report["drop_db"] <= report["max_drop_db"]
    assert "sensitivity" in stdout and "drop dB" in stdout


def test_upscale_runs_the_int8_file(erfdn_int8, tmp_path):
    from distillsr.io import read_image, write_image
    out, _ = erfdn_int8
    lr = (np.random.default_rng(0).random((20, 28, 3)) * 255).astype(np.uint8)
    write_image(tmp_path / "in" / "a.png", lr)
    code, _, err = _in_process("upscale", tmp_path / "in" / "a.png", "-o", tmp_path / "out", "--backend",
                               "onnxruntime", "--weights", out, "--device", "cpu")
    assert code == 0, err
    assert read_image(tmp_path / "out" / "a.png")[0].shape == (80, 112, 3)


# ----------------------------------------------------------------------------- bad input

def _main(capsys, *args):
    """The CLI in this process: (exit status, stdout, stderr)."""
    from distillsr.cli.main import main
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_bad_input_gives_clear_errors_and_no_output(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DISTILLSR_DATA", raising=False)
    out = tmp_path / "q.onnx"
    tiny = _small_graph(tmp_path / "tiny.onnx")
    photos = _photos(tmp_path / "photos", n=2)
    small = ("--calib-size", 16, "--calib-count", 2, "--check-count", 2)
    code, _, err = _main(capsys, "quantize", "--model", "e-rfdn-release", "-o", out, "--calib", photos)
    assert code == 2 and "--scale" in err
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not an onnx file at all")
    code, _, err = _main(capsys, "quantize", "--weights", corrupt, "-o", out, "--calib", photos)
    assert code == 2 and "corrupt.onnx" in err and "ONNX" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _main(capsys, "quantize", "--weights", tiny, "-o", out, "--calib", empty, *small)
    assert code == 2 and "empty" in err and "--calib" in err
    code, _, err = _main(capsys, "quantize", "--weights", tiny, "-o", out, "--calib", tmp_path / "nowhere")
    assert code == 2 and "no such folder" in err
    code, _, err = _main(capsys, "quantize", "--weights", tiny, "--scale", 3, "-o", out, "--calib", photos)
    assert code == 2 and "x2, not x3" in err
    code, _, err = _main(capsys, "quantize", "--weights", tiny, "-o", tmp_path / "q.bin", "--calib", photos)
    assert code == 2 and ".onnx" in err
    code, _, err = _main(capsys, "quantize", "--weights", tiny, "-o", out)  # no photos, no DISTILLSR_DATA
    assert code == 2 and "--calib DIR" in err
    code, _, err = _main(capsys, "quantize", "--weights", tiny, "-o", out, "--calib", photos, "--calib-size", 64)
    assert code == 2 and "large enough for a 64x64 LR crop at x2" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.onnx", "empty", "photos", "tiny.onnx"]
    # an int8 file is not quantised twice; eval names a corrupt ONNX file
    code, _, err = _main(capsys, "quantize", "--weights", tiny, "-o", out, "--calib", photos, *small,
                         "--sensitivity", "off")
    assert code == 0, err
    code, _, err = _main(capsys, "quantize", "--weights", out, "-o", tmp_path / "again.onnx", "--calib", photos)
    assert code == 2 and "already quantised" in err
    code, _, err = _main(capsys, "eval", "--weights", corrupt, "--data", tmp_path, "--device", "cpu")
    assert code == 1 and "corrupt.onnx" in err


def test_dynamic_quantisation_needs_no_photos(tmp_path, capsys):
    tiny = _small_graph(tmp_path / "tiny.onnx")
    out = tmp_path / "d.onnx"
    code, _, err = _main(capsys, "quantize", "--weights", tiny, "-o", out, "--method", "dynamic")
    assert code == 0, err
    from distillsr.engine.onnx_backend import OnnxModel
    import torch
    m = OnnxModel(out)
    assert m.scale == 2 and tuple(m(torch.rand(1, 3, 9, 11)).shape) == (1, 3, 18, 22)
    proto = onnx.load(out)
    assert any(n.op_type in ("ConvInteger", "DynamicQuantizeLinear") for n in proto.graph.node)


# ----------------------------------------------------------------------------- nested modules

def _nested_graph(path: Path) -> Path:
    """head conv -> a block of four 1x1 convs (modules body.c0 .. body.c3) -> tail conv ->
    DepthToSpace: the layers nest inside a block, as in the networks' exports."""
    rng = np.random.default_rng(2)
    c = 4

    def scoped(node, scopes):
        e = node.metadata_props.add()
        e.key, e.value = "pkg.torch.onnx.name_scopes", repr(scopes)
        return node

    nodes = [scoped(helper.make_node("Conv", ["input", "wh", "bh"], ["h"], "head_conv", pads=[1, 1, 1, 1]),
                    ["", "head", "conv"])]
    inits = [numpy_helper.from_array((rng.standard_normal((c, 3, 3, 3)) * 0.3).astype(np.float32), "wh"),
             numpy_helper.from_array(np.zeros(c, np.float32), "bh")]
    x = "h"
    for i in range(4):
        nodes.append(scoped(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"f{i}"], f"b{i}"),
                            ["", "body", f"body.c{i}", "conv"]))
        inits += [numpy_helper.from_array((np.eye(c) + rng.standard_normal((c, c)) * 0.1)
                                          .astype(np.float32)[:, :, None, None], f"w{i}"),
                  numpy_helper.from_array(np.zeros(c, np.float32), f"b{i}")]
        x = f"f{i}"
    nodes += [scoped(helper.make_node("Conv", [x, "wt", "bt"], ["t"], "tail_conv", pads=[1, 1, 1, 1]),
                     ["", "tail", "conv"]),
              helper.make_node("DepthToSpace", ["t"], ["output"], "shuffle", blocksize=1, mode="CRD")]
    inits += [numpy_helper.from_array((rng.standard_normal((3, c, 3, 3)) * 0.3).astype(np.float32), "wt"),
              numpy_helper.from_array(np.zeros(3, np.float32), "bt")]
    graph = helper.make_graph(nodes, "nested", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, "h", "w"])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["n", 3, None, None])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    for k, v in (("distillsr.scale", "1"), ("distillsr.arch", "nested")):
        e = model.metadata_props.add()
        e.key, e.value = k, v
    onnx.save(model, path)
    return path


def _int8_convs(proto):
    """Names of the convolutions whose weights are int8 (behind a DequantizeLinear)."""
    made_by = _producers(proto)
    return [n.name for n in proto.graph.node
            if n.op_type == "Conv" and n.input[1] in made_by and made_by[n.input[1]].op_type == "DequantizeLinear"]


def test_auto_takes_blocks_when_modules_nest(tmp_path):
    nested = onnx.load(_nested_graph(tmp_path / "nested.onnx"))
    assert Q.graph_units(nested, "block")["body"] == ["b0", "b1", "b2", "b3"]
    assert Q.auto_granularity(nested) == "block"
    # no nesting: every block is a layer, layers are the finer choice
    assert Q.auto_granularity(onnx.load(_small_graph(tmp_path / "tiny.onnx"))) == "layer"


def test_the_last_block_kept_float_is_cut_to_its_leading_nodes(tmp_path, monkeypatch):
    src = _nested_graph(tmp_path / "nested.onnx")

    # a stand-in score: each int8 convolution of the block costs 0.1 dB, head and tail nothing
    def psnr(self, path):
        return 40.0 - 0.1 * sum(name.startswith("b") for name in _int8_convs(onnx.load(str(path))))

    monkeypatch.setattr(Q._Checker, "psnr", psnr)
    out = tmp_path / "q.onnx"
    report = Q.quantize(src, out, calib_dir=_photos(tmp_path / "photos"), calib_count=4, calib_size=16,
                        check_count=2, granularity="block", max_drop=0.25)
    # the block alone costs 0.4 dB: it is kept float, then only as many of its leading
    # convolutions as bring the cost within 0.25 dB (two: 0.2 dB)
    assert report.kept_float == ["body"]
    assert report.partial_float["unit"] == "body" and report.partial_float["nodes"] == 2
    assert report.partial_float["float_nodes"] == ["b0", "b1"]
    assert report.drop_db == pytest.approx(0.2)
    assert sorted(_int8_convs(onnx.load(out))) == ["b2", "b3", "head_conv", "tail_conv"]
    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert json.loads(meta["distillsr.quantization"])["partial_float"] == {"unit": "body", "nodes": 2, "of": 4}
    assert "of body only its first 2 of 4 nodes" in Q.format_report(report)
    # a cost the whole block just meets: nothing to cut
    whole = Q.quantize(src, tmp_path / "w.onnx", calib_dir=tmp_path / "photos", calib_count=4, calib_size=16,
                       check_count=2, granularity="block", max_drop=0.05)
    assert whole.kept_float == ["body"] and whole.partial_float is None and whole.drop_db == 0.0


def test_int8_files_run_with_pooled_memory(tmp_path):
    from distillsr.engine.onnx_backend import OnnxModel
    src = _small_graph(tmp_path / "tiny.onnx")
    out = tmp_path / "q.onnx"
    Q.quantize(src, out, calib_dir=_photos(tmp_path / "photos"), calib_count=4, calib_size=16, granularity="off")
    assert OnnxModel(out).pooled_memory is True
    assert OnnxModel(src).pooled_memory is False
