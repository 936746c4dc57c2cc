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

A mean-logit ensemble (``python -m melanoma_tf.soup --ensemble``, then ``quantize``)
ships as its members, each in its own file, with ``--members`` naming each member's
quantized file::

    python -m melanoma_tf.export_app --model runs/phone_ensemble/tflite/fp16.tflite \
        --members runs/student_seed{1,2,3}/tflite/fp16.tflite --out app/public/model

The app then runs ``member-1.tflite`` ... and averages their logits; the threshold,
calibration and measured numbers are the ensemble's (the file that was evaluated).
Before anything is written, the mean of the members' logits must equal the
ensemble's on probe images, so a file that is not one of its members is refused. The
members stay under the repository's 5 MB per-file limit where the one-file ensemble does not.

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
import tempfile
from pathlib import Path
from typing import Optional

from melanoma_tf.cli import run_main
from melanoma_tf.errors import MelanomaTfError
from melanoma_tf.files import write_atomic, write_json
from melanoma_tf.tflite import TFLiteModel, read_sidecar, verify_flatbuffer, verify_model_file

log = logging.getLogger(__name__)

APP_MODEL = "model.tflite"
APP_SIDECAR = "model.json"
APP_INFO = "app.json"
APP_MEMBER = "member-{}.tflite"
MEMBER_TOLERANCE = 1e-3  # largest |mean of the members' logits - the ensemble's logit| on the probe images
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
    return {"models": [APP_MODEL], "sidecar": APP_SIDECAR,
            "threshold_source": metrics.get("threshold_source", "validation"),
            "target_sensitivity": sidecar.get("target_sensitivity", metrics.get("target_sensitivity")),
            "tested_on": [holdout, *external], "trained_on": trained_on}


def _app_flatbuffer(path: Path, sidecar: dict) -> tuple[bytes, dict]:
    """The flatbuffer the app runs for ``path`` (batch 1, float interface) and its sidecar's changed keys."""
    data = static_batch_flatbuffer(path.read_bytes())
    if sidecar["input_dtype"] == "int8" and sidecar["output_dtype"] == "int8":
        return float_io_flatbuffer(data), {
            "input_dtype": "float32", "output_dtype": "float32",
            "interface": "float32 image in, float32 logit out; QUANTIZE/DEQUANTIZE around the int8 network added "
                         "by melanoma_tf.export_app"}
    if "int8" in (sidecar["input_dtype"], sidecar["output_dtype"]):
        raise ExportError(f"{path}: mixed {sidecar['input_dtype']} -> {sidecar['output_dtype']} interface")
    return data, {}


def _probe_logits(data: bytes, images) -> "np.ndarray":
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.tflite"
        path.write_bytes(data)
        return TFLiteModel(path).predict(images)[:, 0]


def member_flatbuffers(model_path: Path, sidecar: dict, members: list[Path], probes: int = 3) -> list[bytes]:
    """The app's flatbuffers of ``members``, checked to be the ensemble at ``model_path`` taken apart.

    Each member needs a sidecar with the ensemble's input size and preprocessing, and
    the mean of their logits must equal the ensemble's on ``probes`` seeded random
    images (within ``MEMBER_TOLERANCE``): what the app computes is what was evaluated.

    Raises:
      ExportError: naming the member that does not fit, or the largest difference.
    """
    import numpy as np

    if len(members) < 2:
        raise ExportError(f"--members names {len(members)} file(s): an ensemble has two or more")
    size = int(sidecar["input_size"])
    datas = []
    for member in members:
        member_sidecar = verify_model_file(member)
        if member_sidecar is None:
            raise ExportError(f"{member}: no sidecar {member.with_suffix('.json').name} beside it (a member is a "
                              "melanoma_tf.quantize output)")
        for key in ("input_size", "preprocessing", "labels"):
            if member_sidecar.get(key) != sidecar.get(key):
                raise ExportError(f"{member.with_suffix('.json')}: {key} {member_sidecar.get(key)!r} is not the "
                                  f"ensemble's {sidecar.get(key)!r}")
        datas.append(_app_flatbuffer(member, member_sidecar)[0])
    images = np.random.default_rng(0).uniform(0.0, 255.0, (probes, size, size, 3)).astype(np.float32)
    ensemble = _probe_logits(_app_flatbuffer(model_path, sidecar)[0], images)
    mean = np.mean([_probe_logits(data, images) for data in datas], axis=0)
    worst = float(np.max(np.abs(mean - ensemble)))
    if not worst <= MEMBER_TOLERANCE:
        raise ExportError(f"{model_path}: the mean logit of --members {', '.join(str(m) for m in members)} differs "
                          f"from the ensemble's by up to {worst:.4g} on {probes} probe images: not its members")
    log.info("members of %s: mean logit within %.2g of the ensemble's on %d probe images", model_path.name,
             worst, probes)
    return datas


def export_app(model_path: str | Path, out_dir: str | Path, metrics: Optional[str | Path] = None,
               trained_on: str = DEFAULT_TRAINED_ON, members: Optional[list[str | Path]] = None) -> list[Path]:
    """Writes ``model.tflite`` (or one ``member-<i>.tflite`` per ensemble member), ``model.json`` and
    ``app.json`` for the app into ``out_dir``; model files of an earlier export that are not rewritten go.

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
    data, interface = _app_flatbuffer(model_path, sidecar)
    app_sidecar = dict(sidecar, **interface)
    if interface:
        for key in ("input_scale", "input_zero_point", "output_scale", "output_zero_point", "tflm_arena_bytes"):
            app_sidecar.pop(key, None)
    app_sidecar.update(derived_from={"model": model_path.name, "sha256": sidecar["sha256"]})
    if members:
        datas = member_flatbuffers(model_path, sidecar, [Path(m) for m in members])
        names = [APP_MEMBER.format(i + 1) for i in range(len(datas))]
        for key in ("model", "size_bytes", "sha256"):
            app_sidecar.pop(key, None)
        app_sidecar.update(combine="mean_logit", members=[
            {"model": name, "size_bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
             "derived_from": {"model": str(Path(m).name), "sha256": read_sidecar(m)["sha256"]}}
            for name, blob, m in zip(names, datas, members)])
        info["models"] = names
    else:
        datas, names = [data], [APP_MODEL]
        app_sidecar.update(model=APP_MODEL, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / name for name in names] + [out_dir / APP_SIDECAR, out_dir / APP_INFO]
    for path, blob in zip(paths, datas):
        write_atomic(path, blob)
    write_json(out_dir / APP_SIDECAR, app_sidecar)
    write_json(out_dir / APP_INFO, info)
    # model files of an earlier export go only once the new ones are all written
    for stale in sorted({*out_dir.glob(APP_MEMBER.format("*")), out_dir / APP_MODEL} - set(paths)):
        stale.unlink(missing_ok=True)
    read_app_folder(out_dir)  # the written files open and match what the app will check
    return paths


def read_app_folder(folder: str | Path) -> tuple[dict, dict, list[Path]]:
    """What the app loads from ``folder``: ``app.json``, the sidecar and the model file(s), each file checked
    against the sidecar's size and sha256 as the page checks it.

    Raises:
      ExportError, melanoma_tf.tflite.FlatbufferError: naming the file that is missing or wrong.
    """
    folder = Path(folder)
    try:
        info = json.loads((folder / APP_INFO).read_text())
        sidecar = json.loads((folder / APP_SIDECAR).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExportError(f"{folder}: not an exported app model folder ({err})") from None
    entries = sidecar.get("members") or [sidecar]
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("model"), str)
                                                  for e in entries):
        raise ExportError(f"{folder / APP_SIDECAR}: 'members' must be a list of {{model, size_bytes, sha256}}")
    if [e.get("model") for e in entries] != info.get("models"):
        raise ExportError(f"{folder / APP_INFO}: models {info.get('models')} are not the sidecar's "
                          f"{[e.get('model') for e in entries]}")
    paths = []
    for entry in entries:
        path = folder / entry["model"]
        blob = verify_flatbuffer(path)
        if len(blob) != entry.get("size_bytes") or hashlib.sha256(blob).hexdigest() != entry.get("sha256"):
            raise ExportError(f"{path}: not the file {folder / APP_SIDECAR} describes (size or sha256)")
        paths.append(path)
    return info, sidecar, paths


def app_logits(folder: str | Path, images) -> "np.ndarray":
    """The logit the app computes for each image in ``folder``'s model(s): the members' mean for an ensemble."""
    import numpy as np

    _, _, paths = read_app_folder(folder)
    return np.mean([TFLiteModel(path).predict(images)[:, 0] for path in paths], axis=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m melanoma_tf.export_app", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a .tflite written by melanoma_tf.quantize (sidecar beside it)")
    parser.add_argument("--out", default="app/public/model", help="the app's model folder")
    parser.add_argument("--metrics", help="metrics.json of melanoma_tf.evaluate on this model (default: found "
                                          "beside the model)")
    parser.add_argument("--members", nargs="+", metavar="TFLITE",
                        help="ship an ensemble --model as these members, each a quantize output of a run the "
                             "ensemble averages (soup --ensemble --runs)")
    parser.add_argument("--trained-on", default=DEFAULT_TRAINED_ON, help="what the page says the model learned from")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: "\n".join(f"wrote {path}" for path in
                                      export_app(args.model, args.out, args.metrics, args.trained_on,
                                                 args.members)))


if __name__ == "__main__":
    sys.exit(main())
