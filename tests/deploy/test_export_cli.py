"""``python -m mnv3.export`` on a tiny trained run, and its bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from helpers import QUIET, TINY_DATA, compose_train, run_cli
from mnv3.cli import CONFIG_DIR
from mnv3.deploy import (
    onnx_op_types,
    onnx_session,
    run_onnx,
)

# -- the command line on a tiny trained run --------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mnv3.train import train

    tmp = tmp_path_factory.mktemp("export_run")
    size = ["data.image_size=64", "data.resize_size=64", "data.generate.image_size=64"]
    cfg = compose_train(tmp, [*TINY_DATA, *QUIET, *size, "trainer.max_epochs=1"])
    train(cfg)
    return tmp


def test_plain_data_overrides_open_only_without_a_data_group() -> None:
    from mnv3.cli import open_data_overrides

    argv = ["mnv3.eval", "ckpt_path=x", "data.root=/d", "split=val", "+data.a=1"]
    assert open_data_overrides(argv) == [
        "mnv3.eval",
        "ckpt_path=x",
        "++data.root=/d",
        "split=val",
        "+data.a=1",
    ]
    chosen = ["mnv3.eval", "data=imagenet", "data.root=/d"]
    assert open_data_overrides(chosen) == chosen  # Hydra still names a mistyped key there


def _compose_export(tmp: Path, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            "export",
            overrides=[f"paths.root_dir={tmp}", f"paths.output_dir={tmp}/export_out", *overrides],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def test_cli_exports_onnx_int8_with_sidecar(tiny_run: Path) -> None:
    ckpt = tiny_run / "run" / "checkpoints" / "best.ckpt"
    out = tiny_run / "deploy" / "model_int8.onnx"
    result = run_cli(
        "mnv3.export",
        # A plain data.<key> override (no Hydra "+") applies to the run's data config.
        [
            f"ckpt_path={ckpt}",
            "quantize=int8",
            "calibration_images=8",
            f"out={out}",
            "data.batch_size=4",
        ],
        cwd=tiny_run,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sidecar = json.loads((out.parent / "model_int8.onnx.json").read_text())
    assert sidecar["task"] == "classification" and len(sidecar["class_names"]) == 6
    assert sidecar["calibration_method"] == "minmax" and sidecar["float_postprocess"] is True
    assert sidecar["preprocessing"]["input_size"] == [64, 64]
    assert sidecar["preprocessing"]["resize"]["center_crop"] == 64
    assert "QuantizeLinear" in onnx_op_types(out)
    (logits,) = run_onnx(onnx_session(out), torch.zeros(2, 3, 64, 64))
    assert logits.shape == (2, 6)


def test_export_pt2_bf16_runs_any_batch_close_to_the_checkpoint(tiny_run: Path) -> None:
    """AOTInductor bf16 package (dynamic batch): the fp32 network's logits within bf16 error."""
    from mnv3.deploy import load_pt2, read_sidecar, run_pt2
    from mnv3.export import export
    from mnv3.trained_run import TrainedRun

    ckpt = tiny_run / "run" / "checkpoints" / "best.ckpt"
    cfg = _compose_export(tiny_run, [f"ckpt_path={ckpt}", "format=pt2", "quantize=bf16"])
    path = export(cfg)
    assert path == tiny_run / "run" / "export" / "best_bf16.pt2"
    sidecar = read_sidecar(path)
    assert sidecar["format"] == "pt2" and sidecar["precision"] == "bf16"
    assert sidecar["batch_size"] is None and sidecar["outputs"] == ["logits"]
    runner = load_pt2(path)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = TrainedRun.open(ckpt).network.eval()(images)
        got = torch.cat([run_pt2(runner, images), run_pt2(runner, images[:1])])
    assert got.dtype == torch.float32 and got.shape == (4, 6)
    scale = expected.abs().max()
    assert (got[:3] - expected).abs().max() <= 0.05 * scale  # bf16: 8 bits of mantissa
    assert (got[:3] - expected).abs().max() > 0  # it did run in bf16, not float32
    torch.testing.assert_close(got[3], got[0], atol=0.01 * float(scale), rtol=0)


def test_cli_bad_input_is_one_sentence(tiny_run: Path) -> None:
    ckpt = tiny_run / "run" / "checkpoints" / "best.ckpt"
    result = run_cli("mnv3.export", [f"ckpt_path={ckpt}", "input_size=[16,16]"], cwd=tiny_run)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: input size 16x16 is smaller than the network's output stride 32; "
        "expected at least 32x32"
    ]


@pytest.mark.parametrize(
    ("overrides", "sentence"),
    [
        (["format=tflite"], "format='tflite' is unknown; expected one of onnx, pte, pt2"),
        (["quantize=int4"], "quantize='int4' is unknown; expected null, int8 or bf16"),
        (
            ["format=pt2", "quantize=int8"],
            "quantize=int8 is not available for format=pt2; expected null or bf16 "
            "(quantize=int8 exports as format=onnx or pte)",
        ),
        (["quantize=bf16"], "quantize=bf16 is not available for format=onnx"),
        (["quantize=int8", "calibration_images=0"], "calibration_images=0; expected at least 1"),
        (["calibration_method=entropy"], "calibration_method='entropy' is unknown; expected"),
        (["qat_steps=4"], "qat_steps=4 needs format=pte quantize=int8"),
        (["qat_steps=-1"], "qat_steps=-1 is not a count"),
        (["quantize=int8", "calibration_split=test", "+data.test_split=null"], "no test split"),
        (["out={blocker}/model.onnx"], "cannot be written"),
    ],
)
def test_export_bad_input_exits_1_without_leftovers(
    tiny_run: Path,
    overrides: list[str],
    sentence: str | None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from mnv3.export import export

    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    blocker = tiny_run / "a_file"
    blocker.write_text("not a folder")
    ckpt = tiny_run / "run" / "checkpoints" / "best.ckpt"
    args = [o.format(blocker=blocker) for o in overrides]
    before = set((tiny_run / "run").rglob("*"))
    cfg = _compose_export(tiny_run, [f"ckpt_path={ckpt}", *args])
    with pytest.raises(SystemExit) as exit_info:
        export(cfg)
    assert exit_info.value.code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1, err
    if sentence is not None:
        assert sentence in err[0]
    assert set((tiny_run / "run").rglob("*")) == before
    assert not list(tiny_run.rglob("*.tmp"))
