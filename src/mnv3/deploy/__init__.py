"""Deployment: ONNX, ExecuTorch and AOTInductor export, int8 (torchao PT2E, onnxruntime QDQ),
bf16 (Inductor), runners.

Pure torch plus the ``deploy`` extra (onnx, onnxscript, onnxruntime, torchao, executorch); the
heavy libraries are imported by the functions that need them. ``mnv3.export`` is the command
line (:func:`export_network` chooses the exporter for a format and quantization, and
:func:`qat_network` runs a task's quantization-aware training); ``make bench`` times the files
these functions write.
"""

from mnv3.deploy.common import (
    ExportError,
    calibration_batches,
    example_input,
    fixed_batches,
    postprocess_detections,
    read_sidecar,
    sidecar_path,
    write_sidecar,
)
from mnv3.deploy.exporter import FORMAT_QUANTIZE, FORMATS, QUANTIZE, export_network
from mnv3.deploy.onnx_export import (
    DetectorForExport,
    DetectorNetwork,
    export_onnx,
    onnx_op_types,
    onnx_session,
    quantize_onnx,
    run_onnx,
    run_onnx_detector,
)
from mnv3.deploy.pt2 import export_pt2, load_pt2, run_pt2
from mnv3.deploy.pte import (
    export_pte,
    load_pte,
    run_pte,
    run_pte_detector,
    run_pte_outputs,
    xnnpack_delegation,
)
from mnv3.deploy.quantize import (
    compile_int8,
    prepare_qat,
    qat_finetune,
    qat_network,
    qat_to_eval,
    quantize_ptq,
    top1_agreement,
)

__all__ = [
    "FORMATS",
    "FORMAT_QUANTIZE",
    "QUANTIZE",
    "DetectorForExport",
    "DetectorNetwork",
    "ExportError",
    "calibration_batches",
    "compile_int8",
    "example_input",
    "export_network",
    "export_onnx",
    "export_pt2",
    "export_pte",
    "fixed_batches",
    "load_pt2",
    "load_pte",
    "onnx_op_types",
    "onnx_session",
    "postprocess_detections",
    "prepare_qat",
    "qat_finetune",
    "qat_network",
    "qat_to_eval",
    "quantize_onnx",
    "quantize_ptq",
    "read_sidecar",
    "run_onnx",
    "run_onnx_detector",
    "run_pt2",
    "run_pte",
    "run_pte_detector",
    "run_pte_outputs",
    "sidecar_path",
    "top1_agreement",
    "write_sidecar",
    "xnnpack_delegation",
]
