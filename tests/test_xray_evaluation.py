"""End to end: a binary run keeps its temperature and operating points, and ``mnv3.eval`` prints
AUROC / AUPRC with bootstrap intervals and writes the per-image prediction file."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

from helpers import QUIET, compose_train
from mnv3.tasks import ClassificationTask
from mnv3.train import train

BINARY = [
    "backbone=small",
    "data.generate.num_classes=2",
    "data.generate.train_per_class=16",
    "data.generate.val_per_class=12",
    "data.generate.test_per_class=12",
    "data.generate.image_size=32",
    "data.image_size=32",
    "data.resize_size=32",
    "data.batch_size=16",
    "data.num_workers=0",
    "head.callbacks.gradcam_images=0",
    "head.evaluation.bootstrap_resamples=200",
    "head.evaluation.bootstrap_seed=3",
]


def test_binary_run_and_eval_report_intervals_calibration_and_predictions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    train(compose_train(tmp_path, [*BINARY, *QUIET, "logger=csv", "trainer.max_epochs=1"]))
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert state["temperature"].shape == () and float(state["temperature"]) > 0
    assert state["sensitivity_thresholds"].shape == (2, 1)  # sensitivities 0.9 and 0.95
    with open(run / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    test = [r for r in rows if r.get("test/auroc")][-1]
    assert float(test["test/auroc_ci_low"]) <= float(test["test/auroc"])
    assert float(test["test/auroc"]) <= float(test["test/auroc_ci_high"])
    assert (
        float(test["test/bootstrap_resamples"]) == 200 and float(test["test/bootstrap_seed"]) == 3
    )
    assert float(test["test/sens90/sensitivity"]) >= 0.0 and "test/ece" in test
    # Sensitivity / specificity of every operating point carry their intervals too.
    for point in ("", "sens90/", "sens95/"):
        for stat in ("sensitivity", "specificity"):
            low, high = (float(test[f"test/{point}{stat}_ci_{end}"]) for end in ("low", "high"))
            assert low <= float(test[f"test/{point}{stat}"]) <= high
    report = json.loads((run / "evaluation_test.json").read_text())
    assert {"auroc", "sensitivity", "sens95/specificity"} <= set(report["intervals"])
    assert list((run / "plots").glob("test_reliability_*.png"))
    assert json.loads((run / "evaluation_test.json").read_text())["bootstrap"]["unit"] == "images"

    from hydra.core.global_hydra import GlobalHydra

    from mnv3 import eval as mnv3_eval

    capsys.readouterr()
    out = tmp_path / "eval"
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["mnv3.eval", f"ckpt_path={ckpt}", f"hydra.run.dir={out}"])
    mnv3_eval.main()
    printed = capsys.readouterr().out
    assert "AUROC" in printed and "AUPRC" in printed and "95 % CI" in printed
    assert "200 resamples of 24 images" in printed and "seed 3" in printed
    assert "operating points chosen on validation" in printed and "sens95" in printed
    with open(out / "predictions_test.csv", newline="") as f:
        predictions = list(csv.DictReader(f))
    assert len(predictions) == 24
    assert set(predictions[0]) == {
        "path",
        "patient",
        "label",
        "probability",
        "decision",
        "decision_sens90",
        "decision_sens95",
    }
    assert all(Path(p["path"]).is_file() and p["label"] in ("0", "1") for p in predictions)
    # The prediction file's decisions are the checkpoint's threshold applied to its probabilities.
    threshold = float(state["decision_threshold"])
    assert all(
        p["decision"] == str(int(float(p["probability"]) >= threshold - 1e-6)) for p in predictions
    )

    # A checkpoint written before these buffers existed still loads (temperature 1).
    old = torch.load(ckpt, weights_only=True)
    for name in ("temperature", "sensitivity_thresholds"):
        del old["state_dict"][name]
    torch.save(old, tmp_path / "old.ckpt")
    task = ClassificationTask.load_trained(tmp_path / "old.ckpt")
    assert float(task.temperature) == 1.0


def test_explain_probabilities_use_the_fitted_temperature() -> None:
    from mnv3.explain import calibrated_probs, temperature_of

    logits = torch.tensor([0.3, 2.1])
    softmax = calibrated_probs(logits, multilabel=False, temperature=2.5)
    assert float(softmax[1]) == pytest.approx(float(torch.sigmoid((logits[1] - logits[0]) / 2.5)))
    task = ClassificationTask(
        model={"name": "mobilenet_v3_small"},
        num_classes=2,
        optimizer={"name": "adamw", "lr": 1e-3},
    )
    task.temperature.fill_(2.5)
    assert temperature_of(task) == 2.5
    multiclass = ClassificationTask(
        model={"name": "mobilenet_v3_small"}, num_classes=5, optimizer={"name": "sgd", "lr": 0.1}
    )
    assert temperature_of(multiclass) == 1.0 and not hasattr(multiclass, "sensitivity_thresholds")


@pytest.mark.parametrize(
    "override",
    [
        "head.evaluation.bootstrap_resamples=-1",
        "head.evaluation.sensitivities=[0.9,1.5]",
        "head.evaluation.confidence_level=1",
        "head.evaluation.calibration_bins=0",
    ],
)
def test_evaluation_settings_are_checked(tmp_path: Path, override: str) -> None:
    from mnv3.errors import ConfigError
    from mnv3.validate import check_values

    check_values(compose_train(tmp_path, []))
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        check_values(compose_train(tmp_path, [override]))
