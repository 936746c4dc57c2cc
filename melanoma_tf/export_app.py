"""Puts a quantized student into the phone app (``app/``): model, sidecar and what the page shows.

    python -m melanoma_tf.export_app --model results/reference_ham10000/student_int8.tflite \
        --out app/public/model

Writes into ``--out``:

- ``model.tflite``: the model the browser runs, its arithmetic unchanged. LiteRT.js
  wants a fixed batch of 1 (written into the shape signatures) and feeds float32,
  int32 and uint8 tensors only, so an int8-in/int8-out flatbuffer gets a QUANTIZE op
  in front and a DEQUANTIZE op behind (float32 image in [0, 255] in, float32 logit
  out) around the same int8 network. The app ships the fp16 student, though: int8
  kernels differ between runtimes (XNNPACK on x86 or WebAssembly, TFLite's reference
  kernels) by several output steps on the same image; float arithmetic does not.
- ``model.json``: the model's sidecar (threshold, refer band, Platt calibration,
  preprocessing), with the size and sha256 of ``model.tflite`` the app checks
  before it runs anything, and ``derived_from`` naming the source file.
- ``app.json``: what the page tells the user about the model: how it was measured
  (sensitivity/specificity at the validation-chosen threshold, ROC-AUC with its
  interval, on which images) and what it was trained on.

The evaluation comes from ``python -m melanoma_tf.evaluate`` on the same model:
``--metrics`` or, found beside the model, ``eval_<stem>/metrics.json`` (a quantize
run folder) or ``<stem>_eval.json`` (a reference results folder). Its recorded
sha256 must be the model's: numbers of another model are refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
from pathlib import Path
from typing import Optional

from melanoma_tf.cli import run_main
from melanoma_tf.errors import MelanomaTfError
from melanoma_tf.files import write_atomic, write_json
from melanoma_tf.tflite import verify_model_file

log = logging.getLogger(__name__)

APP_MODEL = "model.tflite"
APP_SIDECAR = "model.json"
APP_INFO = "app.json"
DEFAULT_TRAINED_ON = ("HAM10000: dermoscopy images of pigmented skin lesions from two clinics, in Vienna "
                      "(Austria) and Queensland (Australia), mostly of people with light skin")


class ExportError(MelanomaTfError, ValueError):
    """The model, its sidecar or its evaluation cannot be exported; the message names the file."""


def _unpack(data: bytes):
    from ai_edge_litert import schema_py_generated as schema

    return schema, schema.ModelT.InitFromPackedBuf(bytearray(data), 0)


def _pack(model, size_hint: int) -> bytes:
    import flatbuffers

    builder = flatbuffers.Builder(size_hint + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def static_batch_flatbuffer(data: bytes) -> bytes:
    """The same flatbuffer with a batch of 1 written into every shape signature.

    LiteRT.js refuses a tensor of shape [1, H, W, 3] for an input declared
    [-1, H, W, 3] (a Keras model's dynamic batch); the arithmetic is unchanged.
    """
    _, model = _unpack(data)
    for graph in model.subgraphs:
        for tensor in graph.tensors:
            signature = tensor.shapeSignature
            if signature is not None and len(signature) and signature[0] == -1 and tensor.shape is not None:
                tensor.shapeSignature = [1, *list(signature[1:])]
    return _pack(model, len(data))


def float_io_flatbuffer(data: bytes) -> bytes:
    """The same flatbuffer with a float32 input and output around its int8 ones.

    Adds QUANTIZE (float32 -> the int8 input's scale and zero point) before the
    first op and DEQUANTIZE (int8 output -> float32) after the last, and points
    the subgraph's and the signature's inputs and outputs at the new tensors.
    Nothing else changes, so the int8 arithmetic is bit for bit the original's.

    Args:
      data: a flatbuffer with one int8 input and one int8 output.

    Returns:
      The new flatbuffer's bytes.
    """
    schema, model = _unpack(data)
    graph = model.subgraphs[0]
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise ExportError(f"expected one input and one output, got {len(graph.inputs)} and {len(graph.outputs)}")

    def code_index(builtin: int, version: int) -> int:
        for i, code in enumerate(model.operatorCodes):
            if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin:
                return i
        code = schema.OperatorCodeT()
        code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), version
        model.operatorCodes.append(code)
        return len(model.operatorCodes) - 1

    def float_twin(index: int, suffix: str) -> int:
        source = graph.tensors[index]
        tensor = schema.TensorT()
        tensor.shape, tensor.shapeSignature = source.shape, source.shapeSignature
        tensor.type = schema.TensorType.FLOAT32
        tensor.name = (source.name or b"") + suffix.encode()
        model.buffers.append(schema.BufferT())
        tensor.buffer = len(model.buffers) - 1
        graph.tensors.append(tensor)
        return len(graph.tensors) - 1

    def op(builtin: int, options_type: int, options, inputs: list[int], outputs: list[int]):
        operator = schema.OperatorT()
        operator.opcodeIndex = code_index(builtin, 2)
        operator.inputs, operator.outputs = inputs, outputs
        operator.builtinOptionsType, operator.builtinOptions = options_type, options
        return operator

    int8 = schema.TensorType.INT8
    old_in, old_out = int(graph.inputs[0]), int(graph.outputs[0])
    if graph.tensors[old_in].type != int8 or graph.tensors[old_out].type != int8:
        raise ExportError("the model's input and output are not int8: it needs no float interface")
    new_in, new_out = float_twin(old_in, "_float"), float_twin(old_out, "_float")
    B = schema.BuiltinOperator
    graph.operators.insert(0, op(B.QUANTIZE, schema.BuiltinOptions.QuantizeOptions, schema.QuantizeOptionsT(),
                                 [new_in], [old_in]))
    graph.operators.append(op(B.DEQUANTIZE, schema.BuiltinOptions.DequantizeOptions, schema.DequantizeOptionsT(),
                              [old_out], [new_out]))
    graph.inputs, graph.outputs = [new_in], [new_out]
    for signature in model.signatureDefs or []:
        for io in signature.inputs or []:
            io.tensorIndex = new_in if io.tensorIndex == old_in else io.tensorIndex
        for io in signature.outputs or []:
            io.tensorIndex = new_out if io.tensorIndex == old_out else io.tensorIndex
    return _pack(model, len(data))


def shown_probability(logit: float, sidecar: dict) -> float:
    """The probability the app shows: the sidecar's Platt calibration, else its temperature."""
    calibration = sidecar.get("calibration") or {}
    if calibration.get("method") == "platt":
        return float(1.0 / (1.0 + math.exp(-(calibration["a"] * logit + calibration["b"]))))
    return float(1.0 / (1.0 + math.exp(-logit / float(sidecar.get("temperature") or 1.0))))


def decision(logit: float, sidecar: dict) -> str:
    """``melanoma``, ``not_melanoma`` or ``refer``: evaluate's rule (called above the threshold, refer within
    ``refer_margin_logit`` of it in temperature-scaled units), as the app and the edge responder apply it."""
    temperature = float(sidecar.get("temperature") or 1.0)
    distance = logit - float(sidecar["threshold_logit"])
    if abs(distance) < float(sidecar.get("refer_margin_logit") or 0.0) * temperature:
        return "refer"
    return "melanoma" if distance >= 0 else "not_melanoma"


def find_metrics(model_path: Path, metrics: Optional[Path]) -> Path:
    """The evaluation of ``model_path``: ``metrics`` or one of the places quantize and the reference run use."""
    if metrics is not None:
        if not metrics.is_file():
            raise ExportError(f"{metrics}: evaluation file not found")
        return metrics
    candidates = [model_path.parent / f"eval_{model_path.stem}" / "metrics.json",
                  model_path.parent / f"{model_path.stem}_eval.json"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ExportError(f"{model_path}: no evaluation found ({', '.join(str(c) for c in candidates)}); run "
                      f"python -m melanoma_tf.evaluate --model {model_path} ... and pass its metrics.json "
                      "with --metrics")


def _scores(metrics: dict) -> dict:
    keys = ("n_images", "n_melanoma", "roc_auc", "roc_auc_ci", "sensitivity", "specificity", "ppv", "npv",
            "refer_fraction")
    return {k: metrics[k] for k in keys if metrics.get(k) is not None}


def app_info(metrics_path: Path, sidecar: dict, trained_on: str) -> dict:
    """What the page shows about the model, from the evaluation at ``metrics_path``."""
    try:
        metrics = json.loads(metrics_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExportError(f"{metrics_path}: not a JSON evaluation: {err}") from None
    if not isinstance(metrics, dict) or "roc_auc" not in metrics:
        raise ExportError(f"{metrics_path}: not an evaluation written by melanoma_tf.evaluate (no 'roc_auc')")
    evaluated = metrics.get("model_sha256")
    if evaluated is None:
        raise ExportError(f"{metrics_path}: does not say which model it evaluates (no 'model_sha256'); "
                          "evaluate the model again with python -m melanoma_tf.evaluate")
    if evaluated != sidecar.get("sha256"):
        raise ExportError(f"{metrics_path}: evaluates model sha256 {evaluated}, not this model's "
                          f"{sidecar.get('sha256')}")
    holdout = {"name": "HAM10000 holdout" if metrics.get("split") == "holdout" else str(metrics.get("split")),
               "description": "images of lesions the model was not trained on, same clinics",
               **_scores(metrics)}
    external = [{"name": name, "description": "another archive, other clinics and cameras", **_scores(result)}
                for name, result in sorted((metrics.get("external") or {}).items()) if "roc_auc" in result]
    return {"model": APP_MODEL, "sidecar": APP_SIDECAR,
            "threshold_source": metrics.get("threshold_source", "validation"),
            "target_sensitivity": sidecar.get("target_sensitivity", metrics.get("target_sensitivity")),
            "tested_on": [holdout, *external], "trained_on": trained_on}


def export_app(model_path: str | Path, out_dir: str | Path, metrics: Optional[str | Path] = None,
               trained_on: str = DEFAULT_TRAINED_ON) -> list[Path]:
    """Writes ``model.tflite``, ``model.json`` and ``app.json`` for the app into ``out_dir``.

    Returns:
      The written paths.

    Raises:
      ExportError, melanoma_tf.tflite.FlatbufferError: naming the file that is wrong.
    """
    model_path, out_dir = Path(model_path), Path(out_dir)
    sidecar = verify_model_file(model_path)
    if sidecar is None:
        raise ExportError(f"{model_path}: no sidecar {model_path.with_suffix('.json').name} beside it; the app "
                          "needs its threshold, calibration and preprocessing (export with melanoma_tf.quantize)")
    for key in ("input_size", "threshold_logit", "temperature", "input_dtype", "output_dtype"):
        if key not in sidecar:
            raise ExportError(f"{model_path.with_suffix('.json')}: missing key '{key}'")
    if sidecar.get("labels", "binary") != "binary":
        raise ExportError(f"{model_path}: the app shows one melanoma probability; this is a "
                          f"{sidecar.get('labels')} model")
    info = app_info(find_metrics(model_path, Path(metrics) if metrics else None), sidecar, trained_on)
    data = static_batch_flatbuffer(model_path.read_bytes())
    app_sidecar = dict(sidecar)
    if sidecar["input_dtype"] == "int8" and sidecar["output_dtype"] == "int8":
        data = float_io_flatbuffer(data)
        for key in ("input_scale", "input_zero_point", "output_scale", "output_zero_point", "tflm_arena_bytes"):
            app_sidecar.pop(key, None)
        app_sidecar.update(input_dtype="float32", output_dtype="float32",
                           interface="float32 image in, float32 logit out; QUANTIZE/DEQUANTIZE around the int8 "
                                     "network added by melanoma_tf.export_app")
    elif "int8" in (sidecar["input_dtype"], sidecar["output_dtype"]):
        raise ExportError(f"{model_path}: mixed {sidecar['input_dtype']} -> {sidecar['output_dtype']} interface")
    app_sidecar.update(model=APP_MODEL, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                       derived_from={"model": model_path.name, "sha256": sidecar["sha256"]})
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / APP_MODEL, out_dir / APP_SIDECAR, out_dir / APP_INFO]
    write_atomic(paths[0], data)
    write_json(paths[1], app_sidecar)
    write_json(paths[2], info)
    verify_model_file(paths[0])  # the written file opens and matches what the app will check
    return paths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m melanoma_tf.export_app", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a .tflite written by melanoma_tf.quantize (sidecar beside it)")
    parser.add_argument("--out", default="app/public/model", help="the app's model folder")
    parser.add_argument("--metrics", help="metrics.json of melanoma_tf.evaluate on this model (default: found "
                                          "beside the model)")
    parser.add_argument("--trained-on", default=DEFAULT_TRAINED_ON, help="what the page says the model learned from")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: "\n".join(f"wrote {path}" for path in
                                      export_app(args.model, args.out, args.metrics, args.trained_on)))


if __name__ == "__main__":
    sys.exit(main())
