"""Training configs: typed validation, overrides, packaged configs, the CLI's errors."""
from pathlib import Path

import pytest

from distillsr.engine.config import (CONFIG_DIR, Config, ConfigError, config_from_dict, load_config,
                                     packaged_configs, resolve_config_path)
from distillsr.registry import list_models

REPO = Path(__file__).resolve().parents[1]


def test_misspelled_key_names_it_and_suggests(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  patch_szie: 48\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert "'data.patch_szie'" in msg and "did you mean 'data.patch_size'" in msg and str(f) in msg


def test_misspelled_top_level_and_section_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"'optimm'.*did you mean 'optim'"):
        config_from_dict({"optimm": {"lr": 1}})
    with pytest.raises(ConfigError, match=r"'train.ema_decy'.*did you mean 'train.ema_decay'"):
        load_config(None, ["train.ema_decy=0.9"])
    with pytest.raises(ConfigError, match=r"'sched.milestone'.*did you mean 'sched.milestones'"):
        load_config("asid_x2", ["sched.milestone=[1]"])


def test_types_and_ranges_are_checked():
    with pytest.raises(ConfigError, match=r"optim.lr: expected a number"):
        load_config(None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"data.batch_size: expected an integer"):
        load_config(None, ["data.batch_size=2.5"])
    with pytest.raises(ConfigError, match=r"data.flip: expected true or false"):
        load_config(None, ["data.flip=3"])
    with pytest.raises(ConfigError, match=r"train.amp: 'fp8' is not one of"):
        load_config(None, ["train.amp=fp8"])
    with pytest.raises(ConfigError, match=r"data.patch_size: must be > 0"):
        load_config(None, ["data.patch_size=0"])
    with pytest.raises(ConfigError, match=r"sched.milestones: 1.5"):
        load_config(None, ["sched.milestones=[1.5]"])
    with pytest.raises(ConfigError, match=r"data.lr_root: needed"):
        load_config(None, ["data.kind=paired"])


def test_yaml_numbers_without_dot_become_floats(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 5e-4\n  betas: [0.9, 0.99]\n")  # PyYAML reads 5e-4 as a string
    cfg = load_config(f)
    assert cfg.optim.lr == 5e-4 and isinstance(cfg.optim.lr, float) and cfg.optim.betas == [0.9, 0.99]
    assert cfg.name == "c"  # defaults to the file name


def test_overrides_and_base(tmp_path):
    (tmp_path / "base.yaml").write_text("seed: 7\ndata:\n  batch_size: 4\n  patch_size: 32\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ndata:\n  patch_size: 24\n")
    cfg = load_config(tmp_path / "child.yaml", ["train.iters=12", "model.options.blocks=2", "optim.lr=1e-3"])
    assert (cfg.seed, cfg.data.batch_size, cfg.data.patch_size) == (7, 4, 24)
    assert cfg.train.iters == 12 and cfg.model.options == {"blocks": 2} and cfg.optim.lr == 1e-3


def test_bare_name_resolves_to_the_packaged_file_and_root_configs_are_the_same():
    p = resolve_config_path("asid_x2")
    assert p == CONFIG_DIR / "asid_x2.yaml"
    root = REPO / "configs"
    assert root.is_dir()
    assert sorted(x.name for x in root.glob("*.yaml")) == sorted(x.name for x in CONFIG_DIR.glob("*.yaml"))
    for x in root.glob("*.yaml"):
        assert x.read_bytes() == (CONFIG_DIR / x.name).read_bytes()
    with pytest.raises(ConfigError, match="did you mean .*asid_x2"):
        resolve_config_path("asid_x")


@pytest.mark.parametrize("name", packaged_configs())
def test_every_packaged_config_is_valid(name):
    cfg = load_config(name)
    assert isinstance(cfg, Config) and cfg.name == name
    assert f"_x{cfg.model.scale}" in name
    known = list_models()
    if cfg.model.arch not in known:
        pytest.skip(f"architecture {cfg.model.arch!r} is not registered in this build")
    from distillsr.registry import create_model
    m = create_model(cfg.model.arch, cfg.model.scale, **cfg.model.options)
    assert m.scale == cfg.model.scale


def test_paper_recipes():
    a = load_config("asid_x2")  # docs/asid.md "Paper settings" and the authors' release
    assert (a.data.patch_size, a.data.batch_size, a.optim.name, a.optim.lr, a.optim.weight_decay) == \
        (64, 16, "adamw", 5e-4, 1e-4)
    assert a.train.iters == 3_200_000 and a.sched.milestones == [0.25, 0.5, 0.75] and a.sched.gamma == 0.5
    assert a.data.flip and a.data.rot90 and a.train.loss == "l1"
    for s in (3, 4):
        b = load_config(f"asid_x{s}")
        assert b.model.scale == s and b.optim == a.optim and b.train.iters == a.train.iters
    f = load_config("fdiwn_x4")
    assert (f.optim.name, f.optim.lr, f.data.batch_size, f.data.patch_size) == ("adam", 2e-4, 16, 48)


def test_cli_bad_key_exits_nonzero_with_the_key(capsys):
    from distillsr.cli.main import main
    rc = main(["train", "--config", "asid_x2", "data.batchsize=8"])
    err = capsys.readouterr().err
    assert rc == 2 and "data.batchsize" in err and "data.batch_size" in err
    rc = main(["train", "--config", "asid_x2", "train.iters=5", "--print-config"])
    assert rc == 0 and "iters: 5" in capsys.readouterr().out


@pytest.mark.parametrize("override,pattern", [
    ("model.options.blokcs=2", r"model.options.blokcs: asid has no option 'blokcs'; "
                               r"did you mean 'model.options.blocks'\?"),
    ("model.scale=5", r"model.scale: asid supports x2, x3, x4, not x5"),
    ("model.arch=asdi", r"model.arch: unknown architecture 'asdi'; did you mean 'asid'\?"),
])
def test_model_section_is_checked_when_loading(override, pattern, capsys):
    with pytest.raises(ConfigError, match=pattern):
        load_config("asid_x2", [override])
    from distillsr.cli.main import main
    rc = main(["train", "--config", "asid_x2", override, "--print-config"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: model.") and err.count("\n") == 1 and "Traceback" not in err


def test_model_options_follow_the_builder():
    # a builder that passes **options on to its class: the class's keywords are the options
    assert load_config(None, ["model.arch=asid-d8", "model.options.channels=32"]).model.options == {"channels": 32}
    with pytest.raises(ConfigError, match=r"rfdn has no option 'sharing'.*its options: channels, blocks, attention"):
        load_config(None, ["model.arch=rfdn", "model.options.sharing=none"])
    with pytest.raises(ConfigError, match=r"fdiwn-m supports x2, x3, x4, not x8"):
        config_from_dict({"model": {"arch": "fdiwn-m", "scale": 8}})


def test_a_value_the_architecture_refuses_is_a_config_error(tmp_path, capsys):
    from distillsr.cli.main import main
    rc = main(["train", "--config", "asid_x2_photos", "--data", str(tmp_path), f"out_dir={tmp_path / 'runs'}",
               "model.options.blocks=40"])
    err = capsys.readouterr().err
    assert rc == 2 and "model.options" in err and "blocks must be between 1 and 16" in err
    assert err.count("\n") == 1 and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", packaged_configs())
def test_packaged_configs_name_no_data_folder(name):
    assert "../shared" not in resolve_config_path(name).read_text()
    cfg = load_config(name)
    assert cfg.data.root == "" and cfg.val.dir == ""


def test_training_data_comes_from_the_command_line(tmp_path, capsys):
    from distillsr.cli.main import main
    out = str(tmp_path / "runs")
    rc = main(["train", "--config", "asid_x2_photos", f"out_dir={out}"])
    err = capsys.readouterr().err
    assert rc == 2 and "data.root is not set" in err and "--data DIR" in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()
    rc = main(["train", "--config", "asid_x2_photos", "--data", "/my/photos", "--val", "/my/Set5", "--print-config"])
    text = capsys.readouterr().out
    assert rc == 0 and "root: /my/photos" in text and "dir: /my/Set5" in text
    for args, message in ((["--data", str(tmp_path / "nope")], "data.root {}: no such folder (set it with --data DIR"),
                          (["--data", str(tmp_path), "--val", str(tmp_path / "nope")],
                           "val.dir {}: no such folder (set it with --val DIR")):
        rc = main(["train", "--config", "asid_x2_photos", f"out_dir={out}", *args])
        err = capsys.readouterr().err
        assert rc == 2 and message.format(tmp_path / "nope") in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()
    from distillsr.engine import train
    from distillsr.engine.config import check_data_paths
    cfg = load_config("asid_x2")
    for fn in (check_data_paths, train):  # the Python API refuses it too
        with pytest.raises(ConfigError, match="data.root is not set"):
            fn(cfg)
