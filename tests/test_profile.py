"""distillsr profile: MAC counts against the reference counts of the official code, CLI output."""
import json

import pytest
import torch

import distillsr
from distillsr.cli.main import main
from distillsr.engine.profile import count_cost, input_size_for_output, parse_size, peak_memory
from conftest import shared_path


def _cost(name, scale, size=(1280, 720)):
    w, h = input_size_for_output(*size, scale)
    return count_cost(distillsr.create_model(name, scale), (1, 3, h, w))


# fixtures/asid/MANIFEST.json "macs": hooks on the official code (conv + linear) and
# FlopCounterMode totals (2 x MACs of conv, mm and bmm), all at 1280x720 output
@pytest.mark.parametrize("name, scale, conv_linear, flopcounter", [
    ("asid", 4, 16_996_316_280, 41_589_565_680),
    ("asid", 2, 62_929_556_856, 155_586_243_312),
    ("asid", 3, 28_988_830_584, 71_354_869_488),
    ("asid-d8", 4, 40_335_196_480, 99_120_087_680),
])
def test_macs_equal_the_official_counts(name, scale, conv_linear, flopcounter):
    c = _cost(name, scale)
    assert c.macs == conv_linear
    assert c.flops == flopcounter
    assert c.macs_total == c.macs + c.attention and c.attention > 0
    assert c.output_shape[2:] == ((720, 1281) if scale == 3 else (720, 1280))


def test_manifest_agrees_with_the_numbers_above():
    manifest = json.loads(shared_path("fixtures", "asid", "MANIFEST.json").read_text())["macs"]
    for key, scale in [("asid_x4", 4), ("asid_x2", 2)]:
        c = _cost("asid", scale)
        assert c.macs == manifest[key]["conv_linear_macs"]
        assert c.flops == manifest[key]["flopcounter_total"]


@pytest.mark.parametrize("scale, expected", [(4, 17.16), (2, 63.56)])
def test_paper_convention_adds_bias_and_layernorm(scale, expected):
    # fixtures/asid/README.md: conv bias additions + 2 x nn.LayerNorm elements on top of the
    # conv+linear MACs give 17.16 G (x4) and 63.56 G (x2); the paper prints 17.2 G and 63.592 G
    c = _cost("asid", scale)
    assert round(c.macs_paper / 1e9, 2) == expected
    assert c.macs_paper == c.macs + c.bias + c.layernorm and c.bias > 0 and c.layernorm > 0


def test_counting_runs_nothing_and_leaves_the_model_alone():
    model = distillsr.create_model("asid", 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    c = count_cost(model, (1, 3, 180, 320))
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert c.params == 313_104


def test_counts_do_not_depend_on_the_grad_mode_of_the_caller():
    # inference merges some products (exact algebra); the count is of the network as defined
    model = distillsr.create_model("asid", 4)
    ref = count_cost(model, (1, 3, 32, 48))
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            c = count_cost(model, (1, 3, 32, 48))
        assert (c.macs, c.flops, c.attention) == (ref.macs, ref.flops, ref.attention)


def test_counts_scale_with_the_padded_area():
    a = _cost("asid", 4, (64, 64)).macs            # 16x16 input
    b = _cost("asid", 4, (128, 64)).macs           # 32x16: twice the area
    c = _cost("asid", 4, (100, 64)).macs           # 25x16 is padded to 32x16
    assert b == c and 1.9 < b / a < 2.1


def test_parse_size():
    assert parse_size("1280x720") == (1280, 720)
    for bad in ["1280", "axb", "0x5", "12x-3"]:
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)


def test_peak_memory_sees_a_large_allocation():
    # in a fresh process: in this one, freed memory that the allocator kept resident (after
    # tune_cpu_allocator, say) would serve the allocation without growing the RSS
    import subprocess
    import sys
    from conftest import REPO
    code = ("import torch; from distillsr.engine.profile import peak_memory; n = 64 << 20; "
            "base = peak_memory(lambda: None); peak = peak_memory(lambda: torch.ones(n)); "
            "print(base, peak)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "PYTHONPATH": str(REPO / "src")})
    assert out.returncode == 0, out.stderr
    base, peak = out.stdout.split()
    if "None" in (base, peak):
        pytest.skip("peak memory is not measurable on this platform")
    n = 64 << 20  # 256 MB of float32, touched
    grew = int(peak) - int(base)  # the process alone is above 256 MB: count the growth
    assert 0.9 * 4 * n < grew < 2 * 4 * n


def test_cli_profile_writes_json(tmp_path, capsys):
    out = tmp_path / "p.json"
    rc = main(["profile", "--model", "asid", "--scale", "2", "--size", "64x48", "--repeats", "2",
               "--warmup", "0", "--threads", "1", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "MACs conv+linear" in text and "latency" in text
    data = json.loads(out.read_text())
    expected = _cost("asid", 2, (64, 48))
    assert data["macs"] == expected.macs and data["macs_paper"] == expected.macs_paper
    assert data["flops"] == expected.flops and data["params"] == 297_516
    assert data["output_shape"] == [1, 3, 48, 64] and data["input_shape"] == [1, 3, 24, 32]
    assert len(data["latency_s"]) == 2 and data["latency_median_s"] > 0
    assert data["achieved_gflops_per_s"] > 0


def test_cli_profile_count_only_for_every_family(capsys):
    for name in distillsr.list_models():
        rc = main(["profile", "--model", name, "--scale", "4", "--count-only"])
        assert rc == 0, name
    assert "latency" not in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--model", "asdi", "--scale", "4"], "unknown model 'asdi'"),
    (["--model", "asid", "--scale", "5"], "x5"),
    (["--model", "asid", "--scale", "4", "--size", "720p"], "size"),
    (["--model", "asid", "--scale", "4", "--repeats", "0"], "repeats"),
    (["--model", "asid", "--scale", "4", "--device", "tpu"], "device"),
])
def test_cli_profile_bad_input(argv, message, capsys):
    assert main(["profile", *argv, "--count-only"]) == 2
    assert message in capsys.readouterr().err


def test_cli_profile_says_why_fdiwn_macs_differ_from_the_paper(capsys):
    assert main(["profile", "--model", "fdiwn", "--scale", "4", "--count-only"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if "without WN convs" in l)
    assert "28.36 G" in line and "FDIWN's published mult-adds" in line  # paper: 28.4 G
    assert main(["profile", "--model", "asid", "--scale", "4", "--count-only"]) == 0
    assert "WN convs" not in capsys.readouterr().out  # no weight-normalised convs in ASID


def test_cli_profile_takes_model_and_scale_from_the_checkpoint(tmp_path, capsys):
    ckpt = distillsr.save_model(distillsr.create_model("asid", 3), tmp_path / "a.safetensors")
    assert main(["profile", "--weights", str(ckpt), "--count-only", "--size", "48x48"]) == 0
    assert capsys.readouterr().out.startswith("asid x3:")
    assert main(["profile", "--weights", str(ckpt), "--scale", "2", "--count-only"]) == 2
    assert "holds asid x3" in capsys.readouterr().err
    assert main(["profile", "--model", "asid", "--count-only"]) == 2
    assert "give --model NAME and --scale S, or --weights PATH" in capsys.readouterr().err


def test_cli_profile_count_only_writes_json_without_timings(tmp_path):
    out = tmp_path / "p.json"
    assert main(["profile", "--model", "asid", "--scale", "2", "--count-only", "--size", "32x32",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["latency_s"] == [] and data["latency_median_s"] is None and data["achieved_gflops_per_s"] is None
    assert data["macs"] == _cost("asid", 2, (32, 32)).macs
