"""mnv3 as a package: the wheel holds the code, every Hydra config, the license and the console
scripts, and installed into a fresh virtual environment it trains from any working folder.

The wheel is built from a copy of the files pyproject.toml names (no build/ or egg-info left in
the checkout) with this environment's setuptools, offline. The fresh environment sees this
environment's third-party packages through a path line in a .pth file; Python does not run the
.pth files of a folder added that way, so the editable install's finder (which maps mnv3 onto
src/ and conf/) stays off and mnv3 can only come from the wheel.
"""

from __future__ import annotations

import configparser
import csv
import email.parser
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest
import yaml

from helpers import QUIET, TINY_DATA

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
PACKAGE_DIR = PYPROJECT["tool"]["setuptools"]["package-dir"]
SRC = REPO / PACKAGE_DIR[""] / "mnv3"
CONF = REPO / PACKAGE_DIR["mnv3.conf"]  # the top-level conf/ the wheel ships as mnv3.conf
# md5 of https://www.apache.org/licenses/LICENSE-2.0.txt, the text pyproject's license names.
APACHE_2_0_MD5 = "3b83ef96387f14655fc854ddc3c6bd57"
# pip offline and quiet: the wheel's build and install need no index.
PIP_OFFLINE = ("--no-deps", "--no-index", "--disable-pip-version-check", "--quiet")
# Where the installed mnv3 and its configs are, and every console script's function loaded;
# then the console script named first on the command line runs with --help, in this interpreter
# (each interpreter start imports torch and Lightning: ~10 s here; the scripts' own launch is
# what the training and prediction runs below do).
WHERE_THEN_HELP = (
    "import importlib.metadata as m, runpy, sys, mnv3.cli\n"
    "print(mnv3.cli.__file__, mnv3.cli.CONFIG_DIR, m.distribution('mnv3').locate_file(''))\n"
    "[ep.load() for ep in m.distribution('mnv3').entry_points]\n"
    "sys.argv = [sys.argv[1], '--help']\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def _run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a command as a user would (no PYTHONPATH, W&B off), output captured."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _tree(root: Path, pattern: str) -> set[str]:
    """The files under ``root`` matching ``pattern``, as posix paths relative to it."""
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob(pattern)
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The mnv3 wheel, built offline from a copy of the files pyproject.toml names."""
    project = tmp_path_factory.mktemp("project")
    names = ["pyproject.toml", PROJECT["readme"], *PROJECT["license-files"], *PACKAGE_DIR.values()]
    for name in names:
        source = REPO / name
        if source.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
            shutil.copytree(source, project / name, ignore=ignore)
        else:
            shutil.copy2(source, project / name)
    out = tmp_path_factory.mktemp("wheel")
    pip_wheel = (sys.executable, "-m", "pip", "wheel", "--no-build-isolation", *PIP_OFFLINE)
    build = _run(*pip_wheel, "-w", out, project, cwd=project)
    assert build.returncode == 0, build.stdout + build.stderr
    (built,) = out.glob("mnv3-*.whl")
    return built


def test_wheel_holds_code_configs_license_and_scripts(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    info = f"mnv3-{PROJECT['version']}.dist-info"
    assert {n.split("/")[0] for n in names} == {"mnv3", info}  # no top-level conf package
    # Every config at every depth (hydra/launcher, search/space, ...), and no other yaml.
    yaml_files = _tree(CONF, "*.yaml")
    assert "hydra/launcher/slurm.yaml" in yaml_files
    shipped_yaml = {n.removeprefix("mnv3/conf/") for n in names if n.endswith(".yaml")}
    assert shipped_yaml == yaml_files
    assert "mnv3/conf/__init__.py" in names
    # Every module: a package under src/mnv3 missing from pyproject's list would be absent.
    assert {f"mnv3/{m}" for m in _tree(SRC, "*.py")} <= names

    with zipfile.ZipFile(wheel) as archive:
        license_text = archive.read(f"{info}/licenses/LICENSE")
        metadata = email.parser.Parser().parsestr(archive.read(f"{info}/METADATA").decode())
        entry_points = configparser.ConfigParser()
        entry_points.read_string(archive.read(f"{info}/entry_points.txt").decode())
    assert license_text == (REPO / "LICENSE").read_bytes()
    assert hashlib.md5(license_text, usedforsecurity=False).hexdigest() == APACHE_2_0_MD5
    assert metadata["License-Expression"] == PROJECT["license"] == "Apache-2.0"
    assert metadata.get_all("License-File") == PROJECT["license-files"]
    assert not [c for c in metadata.get_all("Classifier") or [] if c.startswith("License ::")]

    scripts = dict(entry_points["console_scripts"])
    assert scripts == PROJECT["scripts"]
    assert {"mnv3-train", "mnv3-eval", "mnv3-export", "mnv3-explain"} <= scripts.keys()
    assert {"mnv3-search", "mnv3-predict"} <= scripts.keys()
    for target in scripts.values():  # each script's module is in the wheel
        module = target.split(":")[0].replace(".", "/")
        assert {f"{module}.py", f"{module}/__init__.py"} & names, target


def test_citation_names_this_version_and_license() -> None:
    citation = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0"
    assert (citation["version"], citation["license"]) == (PROJECT["version"], PROJECT["license"])


def test_wheel_in_a_fresh_venv_trains_from_another_folder(wheel: Path, tmp_path: Path) -> None:
    env_dir, work = tmp_path / "venv", tmp_path / "elsewhere"
    work.mkdir()
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(env_dir)
    python = env_dir / "bin" / "python"
    paths = _run(
        python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=work
    )
    site = Path(paths.stdout.strip())
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "mnv3_test_dependencies.pth").write_text("\n".join(ours) + "\n")

    # The third-party packages are there; mnv3 (editable finder included) is not.
    find_mnv3 = "import importlib.util, hydra; print(importlib.util.find_spec('mnv3'))"
    seen = _run(python, "-c", find_mnv3, cwd=work)
    assert seen.returncode == 0 and seen.stdout.strip() == "None", seen.stderr

    install = _run(
        python, "-m", "pip", "install", "--ignore-installed", *PIP_OFFLINE, wheel, cwd=work
    )
    assert install.returncode == 0, install.stdout + install.stderr

    # mnv3 and its configs come from the new environment, every console script loads, and
    # mnv3-train --help lists the wheel's experiments.
    where = _run(python, "-c", WHERE_THEN_HELP, env_dir / "bin" / "mnv3-train", cwd=work)
    assert where.returncode == 0, where.stderr
    location, help_text = where.stdout.split("\n", 1)
    module, config_dir, dist_site = location.split()
    assert Path(module) == site / "mnv3" / "cli.py"
    assert Path(config_dir) == site / "mnv3" / "conf"
    assert Path(dist_site) == site
    experiments = sorted(Path(f).stem for f in _tree(CONF / "experiment", "*.yaml"))
    assert f"experiment: {', '.join(experiments)}\n" in help_text

    # A real (one-batch) training run; data and logs land under the working folder.
    tiny = ["experiment=textures_quick", "debug=fast_dev_run", *TINY_DATA, *QUIET]
    run = _run(env_dir / "bin" / "mnv3-train", *tiny, cwd=work)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (folder,) = (work / "logs" / "train" / "runs").iterdir()
    config = yaml.safe_load((folder / "config_resolved.yaml").read_text())
    assert config["paths"]["root_dir"] == str(work)
    assert config["data"]["image_size"] == 32 and config["trainer"]["fast_dev_run"] is True
    assert (work / "data" / "textures" / "train").is_dir()
    hydra = yaml.safe_load((folder / ".hydra" / "hydra.yaml").read_text())["hydra"]
    sources = {s["provider"]: s["path"] for s in hydra["runtime"]["config_sources"]}
    assert Path(sources["main"]) == site / "mnv3" / "conf"

    # mnv3-predict on that run's checkpoint: one row per test image, re-read from its CSV.
    images = sorted((work / "data" / "textures" / "test").rglob("*.png"))
    ckpt = folder / "checkpoints" / "last.ckpt"
    out = work / "predicted"
    predicted = _run(
        env_dir / "bin" / "mnv3-predict",
        f"ckpt_path={ckpt}",
        f"input={work / 'data' / 'textures' / 'test'}",
        f"hydra.run.dir={out}",
        "data.num_workers=0",
        cwd=work,
    )
    assert predicted.returncode == 0, predicted.stdout[-3000:] + predicted.stderr[-3000:]
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(images) > 0
    assert {Path(r["path"]).name for r in rows} == {p.name for p in images}
