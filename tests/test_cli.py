"""The `flexbench` command line: ls, info (no dataset files needed), errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_models import MSDNET_REFERENCE

from benchmark import cli
from benchmark.config import PROFILES
from benchmark.data import DATASETS
from benchmark.methods import METHODS
from benchmark.models import ARCHS


def test_ls_lists_archs_methods_datasets_profiles(capsys):
    assert cli.main(["ls"]) == 0
    out = capsys.readouterr().out
    sections = {}
    current = None
    for line in out.splitlines():
        if not line.startswith(" "):
            current = line.rstrip(":")
            sections[current] = []
        else:
            sections[current].append(line.split()[0])
    assert sections == {
        "architectures": ARCHS.names(),
        "methods": METHODS.names(),
        "datasets": [
            n + (":<path>" if DATASETS.get(n).needs_arg else "") for n in DATASETS.names()
        ],
        "profiles": list(PROFILES),
    }
    assert "[T=5, a=0.5, divergence=kl (kl|alpha)]" in out  # parameters with their defaults


def test_console_script_runs():
    exe = Path(sys.executable).with_name("flexbench")
    out = subprocess.run([str(exe), "ls"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "msdnet" in out.stdout and "ipkd_ta" in out.stdout


def _rows(out: str, prefix: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines() if line.startswith(prefix)]


@pytest.mark.parametrize("dataset,num_classes", [("cifar100", 100), ("cifar10", 10)])
def test_info_prints_one_row_per_exit_without_dataset_files(dataset, num_classes, tmp_path, capsys):
    rc = cli.main(
        ["info", "--arch", "msdnet", "--dataset", dataset, "--profile", "paper", "--repeats",
         "1", "--data-root", str(tmp_path / "no-data-here")]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert f"({num_classes} classes, 32px)" in out
    rows = _rows(out, "exit")
    macs, params = MSDNET_REFERENCE[("anytime", num_classes)]
    assert [r[0] for r in rows] == [f"exit{i + 1}" for i in range(7)]
    for row, ref_macs, ref_params in zip(rows, macs, params):
        mmacs, mflops, gbitops, params_m, latency, iqr = map(float, row[1:])
        assert mmacs == pytest.approx(ref_macs / 1e6, rel=1e-3)
        assert mflops == pytest.approx(2 * mmacs, abs=2e-3)
        assert gbitops == pytest.approx(mmacs * 1024 / 1e3, rel=1e-3)  # full precision: 32 x 32
        assert params_m == pytest.approx(ref_params / 1e6, abs=1e-4)
        assert latency > 0 and iqr >= 0
    assert "latency: median and IQR of 1 interleaved rounds" in out and "cpu, 1 thread" in out
    assert not (tmp_path / "no-data-here").exists()


def test_info_slimmable_smoke_profile(capsys):
    rc = cli.main(
        ["info", "--arch", "slimmable_mobilenet_v1", "--dataset", "synthetic", "--repeats", "1",
         "--set", "arch.widths=[0.5,1.0]"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    rows = _rows(out, "w")
    assert [r[0] for r in rows] == ["w0.5", "w1.0"]
    assert float(rows[0][1]) < float(rows[1][1])


def test_info_bad_arch_is_a_clean_error(capsys):
    assert cli.main(["info", "--arch", "vgg", "--dataset", "synthetic"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flexbench: error: unknown architecture 'vgg'")
    assert "valid architectures: " + ", ".join(ARCHS.names()) in err


def test_train_with_missing_cifar_files_still_fails_before_work(tmp_path, capsys):
    """`info` needs no files, but `train` checks them before anything else happens."""
    rc = cli.main(
        ["train", "--arch", "msdnet", "--dataset", "cifar10", "--method", "joint",
         "--data-root", str(tmp_path), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
         "--set", f"runtime.workdir={tmp_path}/runs"]
    )  # fmt: skip
    assert rc == 2
    assert "cifar10 not found" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()
