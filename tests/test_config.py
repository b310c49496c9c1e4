"""Bad input fails with a ConfigError that names the problem and the valid values, before any
work: no MLflow run, no checkpoint. A diverging cell stops with TrainingError, run FAILED."""

from __future__ import annotations

import shutil
import time
import zipfile

import pytest
from conftest import all_runs, free_port, smoke_cfg

from benchmark import cli
from benchmark.config import PROFILES, cell_key, flatten, parse_sets, resolve
from benchmark.data import DATASETS
from benchmark.errors import ConfigError, TrainingError
from benchmark.methods import METHODS
from benchmark.models import ARCHS
from benchmark.training.train import CellOptions, train_cell

BAD_INPUTS = {
    # id: (extra CLI args, substrings the message must contain)
    "arch": (["--arch", "resnet"], ["unknown architecture 'resnet'", ", ".join(ARCHS.names())]),
    "method": (["--method", "kd"], ["unknown method 'kd'", ", ".join(METHODS.names())]),
    "dataset": (
        ["--dataset", "imagenet22k"],
        ["unknown dataset 'imagenet22k'", ", ".join(DATASETS.names())],
    ),
    "dataset_without_its_path": (
        ["--dataset", "imagenet"],
        ["dataset imagenet needs a path to read its files: imagenet:<dir or .zip>", "val/<wnid>"],
    ),
    "in_memory": (["--set", "data.in_memory=maybe"], ["data.in_memory must be auto, true or"]),
    "profile": (["--profile", "huge"], ["unknown profile 'huge'", ", ".join(PROFILES)]),
    "T_zero": (["--method", "ipkd", "--set", "method.T=0"], ["T must be > 0", "got 0"]),
    "T_negative": (["--method", "takd", "--set", "method.T=-2"], ["T must be > 0", "got -2"]),
    "T_not_number": (["--method", "ipkd", "--set", "method.T=hot"], ["T must be a number"]),
    "a_above_1": (["--method", "ipkd_ta", "--set", "method.a=1.5"], ["a must be in [0, 1]"]),
    "a_below_0": (["--method", "ipkd", "--set", "method.a=-0.1"], ["a must be in [0, 1]"]),
    "method_param": (
        ["--method", "ipkd", "--set", "method.b=1"],
        ["unknown parameter(s) b for method ipkd", "valid: T, a"],
    ),
    "param_of_paramless_method": (
        ["--method", "joint", "--set", "method.T=4"],
        ["unknown parameter(s) T for method joint", "valid: none"],
    ),
    "widths_unsorted": (
        ["--arch", "slimmable_mobilenet_v1", "--set", "arch.widths=[0.5,0.25,1.0]"],
        ["widths must be strictly increasing", "[0.5, 0.25, 1.0]"],
    ),
    "epochs_zero": (["--set", "train.epochs=0"], ["train.epochs must be an integer >= 1", "got 0"]),
    "epochs_negative": (["--set", "train.epochs=-3"], ["train.epochs must be an integer >= 1"]),
    "lr_negative": (["--set", "train.lr=-0.1"], ["train.lr must be > 0"]),
    "schedule": (["--set", "train.schedule=step"], ["train.schedule 'step'", "multistep, cosine"]),
    "device": (["--set", "runtime.device=tpu"], ["runtime.device 'tpu'", "auto, cpu, cuda"]),
    "set_key": (
        ["--set", "train.epoch=3"],
        ["unknown train setting(s) epoch", "valid:", "batch_size", "epochs"],
    ),
    "set_section": (
        ["--set", "optim.lr=3"],
        ["unknown setting 'optim.lr'", "arch, method, train, data, runtime"],
    ),
    "set_syntax": (["--set", "epochs=3"], ["--set expects section.key=value"]),
    "arch_param": (
        ["--set", "arch.depth=3"],
        ["unknown parameter(s) depth for arch msdnet", "valid:", "growth_rate"],
    ),
    "arch_preset": (
        ["--set", "arch.preset=huge"],
        ["unknown preset 'huge' for arch msdnet", "anytime, budgeted"],
    ),
    "path_missing": (["--dataset", "imagefolder:{tmp}/nowhere"], ["nowhere", "does not exist"]),
    "imagenet_path_missing": (
        ["--dataset", "imagenet:{tmp}/nowhere"],
        ["imagenet path {tmp}/nowhere does not exist"],
    ),
    "path_not_given": (["--dataset", "imagefolder"], ["imagefolder needs a path"]),
    "folder_no_classes": (
        ["--dataset", "imagefolder:{tmp}/empty"],
        ["has no train/<class>/<image> files", "one sub-folder per class"],
    ),
    "zip_no_train_test": (
        ["--dataset", "imagefolder:{tmp}/flat.zip"],
        ["flat.zip has no train/<class>/<image> files"],
    ),
    "not_dir_or_zip": (
        ["--dataset", "imagefolder:{tmp}/flat.txt"],
        ["neither a directory nor a .zip"],
    ),
    "cifar_files_missing": (
        ["--dataset", "cifar10", "--data-root", "{tmp}/nodata"],
        ["cifar10 not found", "nodata/cifar-10-batches-py", "--download"],
    ),
    "file_store_uri": (
        ["--tracking-uri", "./mlruns"],
        ["file store", "sqlite:///"],
    ),
    "batch_larger_than_data": (
        ["--set", "data.train_subset=20", "--set", "train.batch_size=32"],
        ["train.batch_size 32 exceeds the 20 training images"],
    ),
}


@pytest.fixture(scope="module")
def bad_inputs_env(mlflow_template, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-inputs")
    shutil.copy(mlflow_template, tmp / "mlflow.db")
    (tmp / "empty" / "train").mkdir(parents=True)
    (tmp / "empty" / "test").mkdir()
    with zipfile.ZipFile(tmp / "flat.zip", "w") as z:
        z.writestr("images/cat/0.png", b"not read")
    (tmp / "flat.txt").write_text("x")
    from mlflow.tracking import MlflowClient

    return tmp, MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_config_error_before_any_work(case, bad_inputs_env, capsys, monkeypatch):
    tmp, client = bad_inputs_env
    monkeypatch.chdir(tmp)
    extra, expected = BAD_INPUTS[case]
    extra = [a.replace("{tmp}", str(tmp)) for a in extra]
    args = ["train", "--arch", "msdnet", "--dataset", "synthetic", "--method", "joint"]
    args += ["--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}"]
    args += ["--set", f"runtime.workdir={tmp / 'runs'}", "--set", "runtime.threads=1"]
    args += extra  # later flags win
    rc = cli.main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("flexbench: error: ") and "Traceback" not in err
    for text in expected:
        assert text.replace("{tmp}", str(tmp)) in err, (text, err)
    assert all_runs(client) == []
    assert not (tmp / "runs").exists()
    assert not (tmp / "mlruns").exists()


def test_unreachable_tracking_server_fails_fast(tmp_path, capsys):
    port = free_port()
    t0 = time.monotonic()
    rc = cli.main(
        ["train", "--arch", "msdnet", "--dataset", "synthetic", "--method", "joint",
         "--tracking-uri", f"http://127.0.0.1:{port}", "--set", f"runtime.workdir={tmp_path}/r"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    assert time.monotonic() - t0 < 15
    assert f"cannot reach the MLflow tracking server http://127.0.0.1:{port}" in err
    assert "--tracking-uri" in err
    assert not (tmp_path / "r").exists()


def test_api_raises_config_error_listing_valid_values():
    with pytest.raises(ConfigError, match="valid methods: " + ", ".join(METHODS.names())):
        resolve("msdnet", "synthetic", "distill")
    with pytest.raises(ConfigError, match="seed must be an integer >= 0"):
        resolve("msdnet", "synthetic", "joint", seed=-1)


def test_non_finite_loss_stops_the_cell_and_marks_the_run_failed(tracking_uri, client, tmp_path):
    cfg = smoke_cfg("msdnet", "joint", tmp_path / "runs", train__epochs=3, train__lr=1e30)
    epochs_done = []
    with pytest.raises(TrainingError, match="non-finite loss"):
        train_cell(
            cfg,
            CellOptions(
                tracking_uri=tracking_uri,
                progress=False,
                epoch_callback=lambda e, m: epochs_done.append(e),
            ),
        )
    assert epochs_done == []  # stopped inside the first epoch
    (run,) = all_runs(client)
    assert run.info.status == "FAILED"
    assert run.data.tags["flexbench.status"] == "failed"
    assert "non-finite loss" in run.data.tags["flexbench.error"]
    assert not any(k.startswith("test/") for k in run.data.metrics)


def test_non_finite_loss_via_cli_exits_1(tracking_uri, tmp_path, capsys):
    rc = cli.main(
        ["train", "--arch", "slimmable_mobilenet_v1", "--dataset", "synthetic", "--method",
         "ipkd", "--tracking-uri", tracking_uri, "--set", f"runtime.workdir={tmp_path}/r",
         "--set", "train.lr=1e30", "--set", "runtime.threads=1", "--set", "data.train_subset=64"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "flexbench: training failed: non-finite loss" in err and "Traceback" not in err


# --- the resolved config and the cell key ------------------------------------------------
def test_overrides_apply_with_yaml_types():
    sets = ["train.epochs=3", "method.T=4", "arch.widths=[0.5, 1.0]", "train.lr=1e-3"]
    assert parse_sets(sets + ["train.nesterov=true", "data.train_subset=null"]) == {
        "train.epochs": 3,
        "method.T": 4,
        "arch.widths": [0.5, 1.0],
        "train.lr": 0.001,  # YAML alone would read 1e-3 as a string
        "train.nesterov": True,
        "data.train_subset": None,
    }
    cfg = resolve(
        "slimmable_mobilenet_v1", "synthetic", "ipkd_ta", 3, "smoke",
        {"method.T": 4, "method.a": 0.25, "arch.widths": [0.5, 1.0], "train.epochs": 5},
    )  # fmt: skip
    # the alpha-divergence parameters have no effect with the default divergence: left out
    assert cfg["method"] == {"name": "ipkd_ta", "T": 4.0, "a": 0.25, "divergence": "kl"}
    assert cfg["arch"]["widths"] == [0.5, 1.0]
    assert cfg["train"]["epochs"] == 5
    assert cfg["train"]["batch_size"] == PROFILES["smoke"]["train"]["batch_size"]
    assert cfg["seed"] == 3 and cfg["profile"] == "smoke"
    flat = flatten(cfg)
    assert flat["method.T"] == "4.0" and flat["arch.widths"] == "[0.5, 1.0]"
    assert flat["data.name"] == "synthetic"


def test_profile_schedule_per_architecture_and_set_wins():
    """mini gives saliency_vgg its own lr; other archs keep the profile's; --set overrides."""
    mini_lr = PROFILES["mini"]["train"]["lr"]
    vgg_lr = ARCHS.get("saliency_vgg").train["mini"]["lr"]
    assert vgg_lr != mini_lr
    assert resolve("saliency_vgg", "synthetic", "hsd", 0, "mini")["train"]["lr"] == vgg_lr
    assert resolve("msdnet", "synthetic", "joint", 0, "mini")["train"]["lr"] == mini_lr
    cfg = resolve("saliency_vgg", "synthetic", "joint", 0, "mini", {"train.lr": 0.3})
    assert cfg["train"]["lr"] == 0.3


# Cell keys of (arch/profile/method) cells computed before the architectures' profile sizes and
# schedules moved from config.PROFILES into the model files: a finished cell must keep its key.
FROZEN_KEYS = {
    "ddnn_resnet/mini/cifar100/takd/s1": "66c095c85f31",
    "ddnn_resnet/mini/ipkd": "8afbf57a0630",
    "ddnn_resnet/mini/joint": "904e41269547",
    "ddnn_resnet/paper/cifar100/takd/s1": "9f2fb9837d9f",
    "ddnn_resnet/paper/ipkd": "61d241c6663c",
    "ddnn_resnet/paper/joint": "378f7888f0e9",
    "ddnn_resnet/smoke/cifar100/takd/s1": "f90beb86ec64",
    "ddnn_resnet/smoke/ipkd": "3040289a06b7",
    "ddnn_resnet/smoke/joint": "7f06e639b488",
    "msdnet/mini/cifar100/takd/s1": "3229e9ac9014",
    "msdnet/mini/ipkd": "89664e816e6b",
    "msdnet/mini/joint": "eb8a432180a1",
    "msdnet/paper/cifar100/takd/s1": "27520c0d8693",
    "msdnet/paper/ipkd": "bf43bb5e4a8d",
    "msdnet/paper/joint": "e213ae94bb79",
    "msdnet/smoke/cifar100/takd/s1": "6b2444428f0c",
    "msdnet/smoke/ipkd": "ea5dc582deff",
    "msdnet/smoke/joint": "b4b263b0e927",
    "saliency_vgg/mini/cifar100/takd/s1": "befa83b24e77",
    "saliency_vgg/mini/ipkd": "d30ba18564a9",
    "saliency_vgg/mini/joint": "9509fa6a1469",
    "saliency_vgg/paper/cifar100/takd/s1": "1cdece7412ac",
    "saliency_vgg/paper/ipkd": "f2b7f1211853",
    "saliency_vgg/paper/joint": "bbdbad139b70",
    "saliency_vgg/smoke/cifar100/takd/s1": "d454de741de1",
    "saliency_vgg/smoke/ipkd": "12a30ef09b8f",
    "saliency_vgg/smoke/joint": "e8af62d67f6a",
    "slimmable_mobilenet_v1/mini/cifar100/takd/s1": "36b7bf900abd",
    "slimmable_mobilenet_v1/mini/ipkd": "fcd8b091758a",
    "slimmable_mobilenet_v1/mini/joint": "854e16130ab3",
    "slimmable_mobilenet_v1/paper/cifar100/takd/s1": "fb65431bea32",
    "slimmable_mobilenet_v1/paper/ipkd": "a3e641e8abd4",
    "slimmable_mobilenet_v1/paper/joint": "712a6f80d7b3",
    "slimmable_mobilenet_v1/smoke/cifar100/takd/s1": "889e0de4c90e",
    "slimmable_mobilenet_v1/smoke/ipkd": "1ace2d7161d3",
    "slimmable_mobilenet_v1/smoke/joint": "aa2ce7a738ae",
    "switchable_precision_resnet/mini/cifar100/takd/s1": "a565e77ec930",
    "switchable_precision_resnet/mini/ipkd": "ef8bbb206a95",
    "switchable_precision_resnet/mini/joint": "c2ab5127ef95",
    "switchable_precision_resnet/paper/cifar100/takd/s1": "d622c68ab9bb",
    "switchable_precision_resnet/paper/ipkd": "6633fa40e705",
    "switchable_precision_resnet/paper/joint": "54c98ddb8ce5",
    "switchable_precision_resnet/smoke/cifar100/takd/s1": "dd89ff5652b0",
    "switchable_precision_resnet/smoke/ipkd": "2584b1e3d2e4",
    "switchable_precision_resnet/smoke/joint": "b93d9a1c5daa",
}


@pytest.mark.parametrize("cell", sorted(FROZEN_KEYS))
def test_cell_keys_of_existing_cells_do_not_change(cell):
    arch, profile, *rest = cell.split("/")
    dataset, method, seed = ("synthetic", rest[0], 0) if len(rest) == 1 else (*rest[:2], 1)
    cfg = resolve(arch, dataset, method, int(seed), profile)
    assert cell_key(cfg) == FROZEN_KEYS[cell]


def test_every_architecture_declares_its_smoke_and_mini_sizes():
    """An architecture without scaled-down sizes would run at paper size in tests and on CPU."""
    for name in ARCHS.names():
        spec = ARCHS.get(name)
        assert {"smoke", "mini"} <= set(spec.profiles), name
        assert set(spec.profiles) | set(spec.train) <= set(PROFILES), name


def test_an_architecture_entry_for_an_unknown_profile_is_refused():
    from benchmark.models import register_arch

    @register_arch("tmp_typo_arch", defaults={}, profiles={"smoek": {}})
    def build(num_classes, image_size):  # pragma: no cover - never built
        raise AssertionError

    try:
        with pytest.raises(
            ConfigError,
            match="tmp_typo_arch declares profiles for unknown "
            "profile.s. smoek; valid profiles: paper, mini, smoke, imagenet",
        ):
            resolve("tmp_typo_arch", "synthetic", "joint", 0, "smoke")
    finally:
        ARCHS.unregister("tmp_typo_arch")


def test_cell_key_depends_on_what_determines_the_result():
    base = resolve("msdnet", "synthetic", "ipkd", 0, "smoke")
    key = cell_key(base)
    assert cell_key(resolve("msdnet", "synthetic", "ipkd", 0, "smoke")) == key
    same = {"runtime.workdir": "/elsewhere", "data.root": "/x", "runtime.threads": 3}
    assert cell_key(resolve("msdnet", "synthetic", "ipkd", 0, "smoke", same)) == key
    for seed, method, over in [
        (1, "ipkd", {}),
        (0, "ipkd_ta", {}),
        (0, "ipkd", {"method.T": 2}),
        (0, "ipkd", {"train.lr": 0.01}),
        (0, "ipkd", {"data.split_seed": 1}),
    ]:
        assert cell_key(resolve("msdnet", "synthetic", method, seed, "smoke", over)) != key
