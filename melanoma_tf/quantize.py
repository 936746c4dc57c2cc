"""Post-training quantization, quantization-aware training and 4-bit weights, to TFLite.

    python -m melanoma_tf.quantize --run RUN_DIR [--modes fp32,fp16,dynamic,int8,int16x8,int4,qat]

Writes ``RUN_DIR/tflite/<mode>.tflite`` with a sidecar ``<mode>.json`` (input size
and dtype, quantization scale/zero point, preprocessing, label names, the
validation-chosen threshold), scores every flatbuffer on the holdout with the
evaluation code, and prints one comparison table and the size targets. The
last line printed is ``tflite: <folder>``.

Modes: ``fp32``; ``fp16`` (float16 weights); ``dynamic`` (int8 weights, float
activations); ``int8`` (full integer, int8 input and output; representative
data = training-split images, never the holdout); ``int16x8`` (int16
activations, int8 weights); ``int4`` (weights clustered to 16 values per
tensor, stored as int8 with dynamic range: 4 bits of information, which the
gzip size shows); ``qat`` (TF-MOT quantization-aware fine-tuning, continuing
distillation from the run's teacher when the run was distilled, then full int8);
``fp64`` (not a flatbuffer: the Keras model computing in float64, the 64-bit
reference of the bit-width comparison, saved as ``fp64.keras``).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from melanoma_tf import config as cfgmod
from melanoma_tf import data as datamod
from melanoma_tf import models
from melanoma_tf.backend import keras, tf
from melanoma_tf.cli import run_main
from melanoma_tf.data import PreparedData
from melanoma_tf.distill import QatPlan, method_for
from melanoma_tf.distill.kd import Distiller
from melanoma_tf.distill.teachers import teacher_logits
from melanoma_tf.evaluation import evaluate
from melanoma_tf.files import write_atomic, write_json
from melanoma_tf.fit import Loop, Phase, fit_student, training_datasets
from melanoma_tf.mobilenet_v3 import HardSigmoid, HardSwish, hard_swish_form
from melanoma_tf.pipeline import class_weights, load_images
from melanoma_tf.runs import loss_for, resolve_stage_dir, split_frame
from melanoma_tf.tflite import TFLiteModel

log = logging.getLogger("melanoma_tf.quantize")

MODES = cfgmod.QUANT_MODES
PHONE_BUDGET_MB = 25.0
MCU_BUDGET_MB = 2.0


# --------------------------------------------------------------------------- QAT model


def _tfmot():
    import tensorflow_model_optimization as tfmot

    return tfmot


def output_quantize_config():
    """A QuantizeConfig for weightless layers (hard-swish, hard-sigmoid, Multiply, Rescaling): quantize the output."""
    Q = _tfmot().quantization.keras

    class OutputQuantizeConfig(Q.QuantizeConfig):
        def get_weights_and_quantizers(self, layer):
            return []

        def get_activations_and_quantizers(self, layer):
            return []

        def set_quantize_weights(self, layer, quantize_weights):
            pass

        def set_quantize_activations(self, layer, quantize_activations):
            pass

        def get_output_quantizers(self, layer):
            return [Q.quantizers.MovingAverageQuantizer(num_bits=8, per_axis=False, symmetric=False,
                                                        narrow_range=False)]

        def get_config(self):
            return {}

    return OutputQuantizeConfig


def quantization_aware(student: keras.Model) -> keras.Model:
    """Wraps the student for QAT with TF-MOT; weights are kept, outputs match the float model before training."""
    Q = _tfmot().quantization.keras
    config_cls = output_quantize_config()
    weightless = (HardSwish, HardSigmoid, keras.layers.Rescaling, keras.layers.Multiply)

    def annotate(layer):
        if isinstance(layer, weightless):
            return Q.quantize_annotate_layer(layer, config_cls())
        if isinstance(layer, keras.layers.InputLayer):
            return layer
        return Q.quantize_annotate_layer(layer)

    annotated = keras.models.clone_model(student, clone_function=annotate)
    annotated.set_weights(student.get_weights())
    with Q.quantize_scope({"OutputQuantizeConfig": config_cls, "HardSwish": HardSwish, "HardSigmoid": HardSigmoid}):
        return Q.quantize_apply(annotated)


def _wrapped_layers(qat: keras.Model) -> list:
    """The QAT model's layers that TF-MOT wraps (the input's QuantizeLayer is not one of them)."""
    from tensorflow_model_optimization.python.core.quantization.keras import quantize_wrapper

    return [layer for layer in qat.layers if isinstance(layer, quantize_wrapper.QuantizeWrapper)]


def _short_name(variable) -> str:
    """``kernel`` for ``block/conv/kernel:0``."""
    return variable.name.split("/")[-1].split(":")[0]


def _moving_average_ranges(qat: keras.Model) -> list:
    """The min/max variables of every activation and output range that TF-MOT learns by moving average."""
    moving = _tfmot().quantization.keras.quantizers.MovingAverageQuantizer
    ranges = []
    for layer in _wrapped_layers(qat):  # the input's QuantizeLayer keeps the extremes it has seen (AllValuesQuantizer)
        groups = [(q, layer._output_quantizer_vars) for q in layer._output_quantizers[:1]]
        for activation in layer._quantize_activations:
            groups += [(activation.quantizer, getattr(activation, name)) for name in
                       ("_pre_activation_vars", "_post_activation_vars") if hasattr(activation, name)]
        ranges += [v for q, found in groups if isinstance(q, moving) for v in (found["min_var"], found["max_var"])]
    return ranges


def calibrate_ranges(qat: keras.Model, images: np.ndarray, rounds: int = 3, batch_size: int = 32) -> int:
    """Sets the QAT model's activation ranges from ``images``, as post-training calibration does; returns their count.

    TF-MOT starts every activation range at [-6, 6] and moves it by an exponential average
    with decay 0.999 per training step, so after the few hundred steps of a fine-tune it is
    still mostly [-6, 6]: wider activations are clipped, narrow ones get coarse steps, and the
    model never recovers. (The 224 px reference student lost 0.05 validation ROC-AUC that way.)
    Here each range becomes the mean over the images' batches of its batch extremes (the
    average with its start removed). A range sees activations already quantized upstream, so
    the images pass ``rounds`` times, each pass with the upstream ranges of the one before.
    BatchNorm statistics updated by the passes are put back; weight ranges are recomputed at
    every step anyway.
    """
    ranges = _moving_average_ranges(qat)
    kept = [(v, v.numpy()) for v in qat.variables if "moving_mean" in v.name or "moving_variance" in v.name]
    forward = tf.function(lambda x: qat(x, training=True))
    batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    for _ in range(rounds if batches else 0):
        start = [v.numpy() for v in ranges]
        for batch in batches:
            forward(batch)
        left = 0.999 ** len(batches)  # the weight TF-MOT's average (decay 0.999) still gives its start
        for v, v0 in zip(ranges, start):
            v.assign((v.numpy() - left * v0) / (1.0 - left))
        for v, value in kept:
            v.assign(value)
    return len(ranges)


def fit_biases_in_int32(qat: keras.Model) -> int:
    """Widens the weight ranges whose int32 bias would overflow in TFLite; returns how many channels changed.

    TFLite stores a bias in int32 at the scale input scale x weight scale. TF-MOT gives a channel
    whose kernel is (almost) zero a range of almost zero, as in squeeze-excite channels that
    the pretrained network switched off (kernel 0, bias 3: the gate always open). Their bias
    then overflows and is saturated: the gate closes to about half. Post-training int8 widens such
    weight scales; this does the same to the QAT model before conversion. The smallest activation
    scale in the model bounds every layer's input scale from below; a channel is widened only
    where its own range is too small for its bias at that scale, so its weights keep their values.
    """
    ranges = _moving_average_ranges(qat)
    widths = [float(hi.numpy().max() - lo.numpy().min()) for lo, hi in zip(ranges[0::2], ranges[1::2])]
    input_scale = min([w / 255.0 for w in widths if w > 0] or [1.0])
    changed = 0
    for layer in _wrapped_layers(qat):
        biases = [w for w in layer.layer.weights if _short_name(w) == "bias"]
        if not biases:
            continue
        bias = np.abs(biases[0].numpy())
        for weight, _, found in layer._weight_vars:  # the wrapper replaces layer.kernel by its quantized tensor
            if _short_name(weight) not in ("kernel", "depthwise_kernel"):
                continue
            high = found["max_var"].numpy()
            needed = bias * 127.0 / (2.0 ** 31 * input_scale) * 1.01  # narrow-range symmetric: scale = max / 127
            needed = needed if needed.shape == high.shape else np.full_like(high, needed.max())
            wider = np.maximum(high, needed)
            changed += int((wider > high).sum())
            found["max_var"].assign(wider)
            found["min_var"].assign(-wider)
    return changed


def float64_copy(model: keras.Model) -> keras.Model:
    """The same model computing in float64 (the 64-bit reference of the bit-width comparison)."""
    config = model.get_config()
    for layer in config["layers"]:
        layer["config"]["dtype"] = "float64"
        if layer["class_name"] == "InputLayer":
            layer["config"]["dtype"] = "float64"
    copy = keras.Model.from_config(config)
    copy.set_weights([w.astype(np.float64) for w in model.get_weights()])
    return copy


def cluster_4bit(student: keras.Model) -> keras.Model:
    """Clusters every weight tensor to 16 centroids (4 bits of information per weight), stripped for export."""
    clustering = _tfmot().clustering.keras
    clustered = clustering.cluster_weights(
        student, number_of_clusters=16,
        cluster_centroids_init=clustering.CentroidInitialization.KMEANS_PLUS_PLUS)
    return clustering.strip_clustering(clustered)


# --------------------------------------------------------------------------- conversion


def convert(model: keras.Model, mode: str, representative: Optional[np.ndarray] = None,
            hard_swish: str = "fused") -> bytes:
    """Converts a Keras model to a TFLite flatbuffer in one of the modes.

    Args:
      hard_swish: for ``int8`` (post-training), how hard-swish is written
        (:func:`melanoma_tf.mobilenet_v3.hard_swish_form`): ``fused`` (one HARD_SWISH op,
        for TFLite-Micro) or ``mul`` (MUL/ADD, one XNNPACK partition, for phones and Pis).
        QAT models keep ``fused``: their fake-quantization was trained on that graph.
    """
    with hard_swish_form(hard_swish if mode == "int8" else "fused"):
        return _convert(model, mode, representative)


def keras_converter(model: keras.Model) -> tf.lite.TFLiteConverter:
    """A TFLite converter for the model's inference graph (``training=False``).

    Same graph and weights as ``TFLiteConverter.from_keras_model``, about 4x faster (6 s
    instead of 26 s for MobileNetV3-Small on 2 cores): the converter saves only the traced
    function and the variables it reads, not Keras's per-layer SavedModel functions.
    """
    (image,) = model.inputs  # every model here takes one image batch
    inference = tf.function(lambda x: model(x, training=False))
    function = inference.get_concrete_function(tf.TensorSpec(image.shape, image.dtype, name="image"))
    weights = tf.Module()
    weights.variables_ = list(model.variables)  # tracked, so the converter can save what the graph reads
    return tf.lite.TFLiteConverter.from_concrete_functions([function], weights)


def _convert(model: keras.Model, mode: str, representative: Optional[np.ndarray]) -> bytes:
    converter = keras_converter(model)
    if mode in ("fp32",):
        pass
    elif mode == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif mode in ("dynamic", "int4"):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif mode in ("int8", "qat", "int16x8"):
        if representative is None:
            raise ValueError(f"{mode} needs representative images")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([image[None].astype(np.float32)] for image in representative)
        if mode == "int16x8":
            # TFLite has no 16x8 HARD_SWISH kernel: it falls back to float between (de)quantize ops.
            converter.target_spec.supported_ops = [
                tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8,
                tf.lite.OpsSet.TFLITE_BUILTINS]
        else:
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
    else:
        raise ValueError(f"unknown quantization mode {mode!r}; choose from {MODES}")
    return converter.convert()


def representative_images(cfg, stage_dir: Path, n: int = 200, seed: int = 0) -> np.ndarray:
    """Up to n training-split images (never validation or holdout), for calibration."""
    train = split_frame(cfg, stage_dir, "train")
    pick = np.random.default_rng(seed).permutation(len(train))[:n]
    return load_images(train["path"].iloc[np.sort(pick)].tolist(), cfg.data.image_size)


def flatbuffer_details(path: Path) -> dict:
    """Input/output dtype and quantization of a flatbuffer, and its op list."""
    model = TFLiteModel(path)
    inp, out = model._input, model._output
    return {"input_shape": list(model.input_shape), "input_dtype": np.dtype(inp["dtype"]).name,
            "input_scale": float(inp["quantization"][0]), "input_zero_point": int(inp["quantization"][1]),
            "output_dtype": np.dtype(out["dtype"]).name, "output_scale": float(out["quantization"][0]),
            "output_zero_point": int(out["quantization"][1]), "ops": tflite_ops(path)}


def tflite_ops(path: Path) -> list[str]:
    """The builtin op names a flatbuffer uses (without delegates)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(model_path=str(path),
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter.allocate_tensors()
    return sorted({op["op_name"] for op in interpreter._get_ops_details()})


def tflm_arena_bytes(model_bytes: bytes, upper: int = 4 * 1024 * 1024, step: int = 1024) -> Optional[int]:
    """Smallest TFLite-Micro tensor arena (to ``step`` bytes) in which the model allocates and runs.

    Uses the ``tflite-micro`` wheel (the real TFLM interpreter); None when it is
    not installed or the model does not run in TFLM at all.
    """
    try:
        from tflite_micro.python.tflite_micro import runtime
    except ImportError:
        return None

    def fits(size: int) -> bool:
        try:
            interpreter = runtime.Interpreter.from_bytes(model_bytes, arena_size=size)
            details = interpreter.get_input_details(0)
            interpreter.set_input(np.zeros(details["shape"], dtype=details["dtype"]), 0)
            interpreter.invoke()
            return True
        except (RuntimeError, ValueError):
            return False

    with _quiet_stderr():  # TFLM logs every failed allocation of the search to stderr
        if not fits(upper):
            return None
        low, high = 0, upper
        while high - low > step:
            mid = (low + high) // 2
            if fits(mid):
                high = mid
            else:
                low = mid
    return high


class _quiet_stderr:
    """Silences file descriptor 2 (C++ logging) inside a with-block."""

    def __enter__(self):
        sys.stderr.flush()
        self._saved = os.dup(2)
        self._null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(self._null, 2)

    def __exit__(self, *exc):
        os.dup2(self._saved, 2)
        os.close(self._saved)
        os.close(self._null)
        return False


# --------------------------------------------------------------------------- QAT training


def qat_plan(cfg, stage_dir: Path) -> QatPlan:
    """What QAT of the run in ``stage_dir`` continues with: the method that trained it says (:mod:`melanoma_tf.distill`).

    Raises:
      ConfigError: a mean-teacher run that did not save its teacher, or a teacher file is missing.
    """
    stage = stage_dir.name if stage_dir.name in cfgmod.STAGES else cfg.stages[-1]
    return method_for(stage, cfg).qat_plan(stage_dir)


def qat_finetune(student: keras.Model, cfg, stage_dir: Path, folder: Path, epochs: int, lr: float,
                 calibration: Optional[np.ndarray] = None) -> keras.Model:
    """Quantization-aware fine-tuning of the student on the training split; returns the QAT model.

    Continues what the run was trained with (:func:`qat_plan`): logit KD from its teacher's
    cached logits with the run's balance, or plain fine-tuning with its loss. Activation ranges
    start calibrated on ``calibration`` (training images; :func:`calibrate_ranges`). Keeps the
    best epoch by validation ROC-AUC; resumable like training (``folder/state.json``).
    """
    folder.mkdir(parents=True, exist_ok=True)  # the teacher's logits are cached here first
    train, val = split_frame(cfg, stage_dir, "train"), split_frame(cfg, stage_dir, "val")
    data = PreparedData(pd.concat([train.assign(split="train"), val.assign(split="val")]), [], {})
    plan = qat_plan(cfg, stage_dir)
    cached = teacher_logits(plan.teacher_files, data, cfg, folder, stage_dir) if plan.teacher_files else None
    log.info("QAT: %s (alpha %.2f, T %.1f)", plan.description, plan.alpha, cfg.distill.temperature)
    weights = class_weights(train["label"].to_numpy(), 2 if cfg.data.labels == "binary" else cfg.num_outputs)
    loss_fn = loss_for(cfg, weights)
    sample_weights = weights[train["label"].to_numpy()] if cfg.data.class_weight == "balanced" else None
    train_ds, _, val_images = training_datasets(cfg, data, sample_weights, {"teacher_logits": cached})
    qat = quantization_aware(student)
    if calibration is not None and not (folder / "state.json").is_file():  # a resumed run restores its ranges
        count = calibrate_ranges(qat, calibration)
        log.info("QAT: %d activation ranges calibrated on %d training images", count, len(calibration))
    loop = Loop(train_ds, val_images, val["label"].to_numpy(), loss_fn, cfg.data.labels,
                make_trainer=lambda model: Distiller(model, loss_fn, alpha=plan.alpha,
                                                     temperature=cfg.distill.temperature, labels=cfg.data.labels),
                optimizer_for=lambda phase: keras.optimizers.Adam(phase.lr), verbose=cfg.train.verbose,
                name="QAT")
    fit_student(qat, loop, folder, [Phase("qat", epochs, lr)])
    return qat


# --------------------------------------------------------------------------- the command


def quantize_run(run_dir: str | Path, modes: tuple[str, ...] = MODES, qat_epochs: int = 2, qat_lr: float = 1e-5,
                 n_representative: int = 200, n_boot: int = 500, latency_runs: int = 50,
                 split: str = "holdout", int8_hard_swish: str = "fused") -> Path:
    """Writes and scores every requested flatbuffer; returns the ``tflite`` folder.

    ``split``: where the models are scored (``holdout``; sweeps choose on ``val``,
    into ``eval_val_*`` folders and ``comparison_val.*``). ``int8_hard_swish``: how the
    post-training int8 model writes hard-swish (see :func:`convert`).
    """
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise cfgmod.ConfigError(f"--modes: unknown mode(s) {unknown}; choose from {list(MODES)}")
    stage_dir = resolve_stage_dir(run_dir)
    cfg = cfgmod.load(stage_dir / "config.yaml")
    folder = stage_dir / "tflite"
    folder.mkdir(parents=True, exist_ok=True)
    student = models.load_model(stage_dir / "model.keras")
    if any(type(layer).__name__ == "TFOpLambda" for layer in student.layers) and "qat" in modes:
        raise cfgmod.ConfigError(f"{stage_dir}/model.keras was built with keras.applications' MobileNetV3 "
                                 "(TFOpLambda hard-swish), which TF-MOT cannot quantize; retrain with this version")
    integer = {"int8", "int16x8", "qat"} & set(modes)
    if integer and "shades_of_grey" in [layer.name for layer in student.layers]:
        raise cfgmod.ConfigError(f"{stage_dir}/model.keras corrects colour in the model (data.colour_constancy: "
                                 f"shades_of_grey), which has no integer TFLite kernels; --modes {sorted(integer)} "
                                 "cannot convert it (fp32, fp16, dynamic and int4 can)")
    representative = None
    if {"int8", "int16x8", "qat"} & set(modes):
        representative = representative_images(cfg, stage_dir, n_representative, cfg.seed)
    prefix = "eval" if split == "holdout" else f"eval_{split}"
    if not (folder / f"{prefix}_keras" / "metrics.json").is_file():
        evaluate(str(stage_dir), split=split, out=str(folder / f"{prefix}_keras"), n_boot=n_boot, gradcam=0,
                 latency_runs=latency_runs, relation=False)
    for mode in modes:
        log.info("converting %s", mode)
        if mode == "fp64":
            path = folder / "fp64.keras"
            models.save_model(float64_copy(student), path)
            evaluate(str(stage_dir), str(path), split=split, out=str(folder / f"{prefix}_fp64"), n_boot=n_boot,
                     gradcam=0, latency_runs=latency_runs, relation=False)
            continue
        # TF-MOT's wrappers can alter the layers they wrap: QAT and clustering start from a fresh copy.
        if mode == "qat":
            source = qat_finetune(models.load_model(stage_dir / "model.keras"), cfg, stage_dir,
                                  folder / "qat_train", qat_epochs, qat_lr, calibration=representative)
            widened = fit_biases_in_int32(source)
            if widened:
                log.info("QAT: %d weight channel range(s) widened so that their int32 biases fit", widened)
        elif mode == "int4":
            source = cluster_4bit(models.load_model(stage_dir / "model.keras"))
        else:
            source = student
        blob = convert(source, mode, representative, hard_swish=int8_hard_swish)
        path = folder / f"{mode}.tflite"
        (folder / f"{mode}.json").unlink(missing_ok=True)  # a sidecar of an earlier conversion no longer matches
        write_atomic(path, blob)
        eval_dir = evaluate(str(stage_dir), str(path), split=split, out=str(folder / f"{prefix}_{mode}"),
                            n_boot=n_boot, gradcam=0, latency_runs=latency_runs).parent
        sidecar = _sidecar(cfg, stage_dir, path, mode, eval_dir, blob)
        if mode == "int8":
            sidecar["hard_swish"] = int8_hard_swish
        write_json(folder / f"{mode}.json", sidecar)
    # The table covers every mode converted in this folder so far, so runs with different --modes add up.
    rows = [_row("keras fp32", stage_dir / "model.keras", folder / f"{prefix}_keras")]
    for mode in MODES:
        path = folder / (f"{mode}.keras" if mode == "fp64" else f"{mode}.tflite")
        if path.is_file() and (folder / f"{prefix}_{mode}" / "metrics.json").is_file():
            sidecar_path = folder / f"{mode}.json"
            rows.append(_row(mode, path, folder / f"{prefix}_{mode}",
                             json.loads(sidecar_path.read_text()) if sidecar_path.is_file() else None))
    table = pd.DataFrame(rows)
    name = "comparison" if split == "holdout" else f"comparison_{split}"
    write_atomic(folder / f"{name}.csv", table.to_csv(index=False))
    text = _table_markdown(table, split)
    write_atomic(folder / f"{name}.md", text + "\n" + "\n".join(_targets(table)) + "\n")
    print(text)
    for line in _targets(table):
        print(line)
    return folder


def _sidecar(cfg, stage_dir: Path, path: Path, mode: str, eval_dir: Path, blob: bytes) -> dict:
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    details = flatbuffer_details(path)
    arena = tflm_arena_bytes(blob) if details["input_dtype"] == "int8" else None
    return {
        "model": path.name, "mode": mode, "sha256": hashlib.sha256(blob).hexdigest(), "size_bytes": len(blob),
        "input_size": cfg.data.image_size, **details,
        "preprocessing": "RGB float in [0, 255], resized to input_size x input_size (bilinear, antialiased); "
                         "scaling to the network's range is inside the model. For int8 input: "
                         "q = round(x / input_scale + input_zero_point).",
        "output": "melanoma logit; probability = sigmoid((q - output_zero_point) * output_scale)"
        if cfg.data.labels == "binary" else "7 dx logits (softmax)",
        "labels": cfg.data.labels,
        "label_names": ["not_melanoma", "melanoma"] if cfg.data.labels == "binary" else list(datamod.DX_CLASSES),
        "threshold": metrics["threshold"], "threshold_logit": float(np.log(metrics["threshold"])
                                                                    - np.log1p(-metrics["threshold"])),
        "target_sensitivity": metrics["target_sensitivity"], "temperature": metrics["temperature"],
        # Validation-fitted calibration every runtime applies: probability = sigmoid(a * logit + b). Platt's b also
        # undoes the base-rate shift of class-weighted training, which a temperature alone cannot.
        "calibration": {"method": "platt", "a": metrics["platt"][0], "b": metrics["platt"][1],
                        "fitted_on": "validation"} if metrics.get("platt") else None,
        "refer_margin_logit": metrics["refer_margin_logit"],
        "tflm_arena_bytes": arena, "source_run": stage_dir.name,
    }


def _row(mode: str, path: Path, eval_dir: Path, sidecar: Optional[dict] = None) -> dict:
    m = json.loads((eval_dir / "metrics.json").read_text())
    blob = path.read_bytes()
    arena = (sidecar or {}).get("tflm_arena_bytes")
    return {"mode": mode, "file": path.name, "size_mb": len(blob) / 1e6,
            "gzip_mb": len(gzip.compress(blob, 9)) / 1e6, "roc_auc": m["roc_auc"], "threshold": m["threshold"],
            "sensitivity": m["sensitivity"], "specificity": m["specificity"],
            "latency_ms_median": m["latency_ms_median"], "input_dtype": (sidecar or {}).get("input_dtype", "float32"),
            "tflm_arena_kb": arena / 1024 if arena else None,
            **{f"ext_{name}_roc_auc": e.get("roc_auc") for name, e in (m.get("external") or {}).items()
               if "skipped" not in e}}


def _table_markdown(table: pd.DataFrame, split: str = "holdout") -> str:
    headers = ["mode", "size MB", "gzip MB", f"{split} ROC-AUC", "threshold", "sens", "spec", "latency ms",
               "input", "TFLM arena KB"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in table.to_dict("records"):
        arena = f"{r['tflm_arena_kb']:.0f}" if r["tflm_arena_kb"] and np.isfinite(r["tflm_arena_kb"]) else "n/a"
        lines.append(f"| {r['mode']} | {r['size_mb']:.3f} | {r['gzip_mb']:.3f} | {r['roc_auc']:.3f} | "
                     f"{r['threshold']:.3f} | {r['sensitivity']:.3f} | {r['specificity']:.3f} | "
                     f"{r['latency_ms_median']:.2f} | {r['input_dtype']} | {arena} |")
    return "\n".join(lines)


def _targets(table: pd.DataFrame) -> list[str]:
    rows = {r["mode"]: r for r in table.to_dict("records")}
    lines = []
    for mode in ("fp32", "fp16"):
        if mode in rows:
            ok = rows[mode]["size_mb"] <= PHONE_BUDGET_MB
            lines.append(f"target {mode} <= {PHONE_BUDGET_MB:.0f} MB (phone): {rows[mode]['size_mb']:.2f} MB "
                         f"{'OK' if ok else 'MISSED'}")
    for mode in ("qat", "int8"):
        r = rows.get(mode)
        if r and r["tflm_arena_kb"] and np.isfinite(r["tflm_arena_kb"]):
            total = r["size_mb"] + r["tflm_arena_kb"] * 1024 / 1e6
            lines.append(f"target {mode} model + TFLM arena <= {MCU_BUDGET_MB:.0f} MB (microcontroller): "
                         f"{r['size_mb']:.2f} + {r['tflm_arena_kb'] * 1024 / 1e6:.2f} = {total:.2f} MB "
                         f"{'OK' if total <= MCU_BUDGET_MB else 'MISSED'}")
    if "qat" in rows and "keras fp32" in rows:
        gap = rows["keras fp32"]["roc_auc"] - rows["qat"]["roc_auc"]
        lines.append(f"target QAT int8 holdout ROC-AUC within 0.01 of float: {rows['qat']['roc_auc']:.4f} vs "
                     f"{rows['keras fp32']['roc_auc']:.4f} (gap {gap:+.4f}) {'OK' if gap <= 0.01 else 'MISSED'}")
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m melanoma_tf.quantize", description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="run folder (a chained run: its last stage)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--qat-epochs", type=int, default=2)
    parser.add_argument("--qat-lr", type=float, default=1e-5,
                        help="QAT's learning rate, constant (default 1e-5: a 224 px student kept its float validation "
                             "ROC-AUC over 2 epochs; at 1e-4 it lost 0.02 by the second)")
    parser.add_argument("--representative", type=int, default=200,
                        help="training images for calibration (int8, and the ranges QAT starts from)")
    parser.add_argument("--bootstrap", type=int, default=500)
    parser.add_argument("--latency-runs", type=int, default=50)
    parser.add_argument("--split", choices=("holdout", "val"), default="holdout",
                        help="where to score the models (sweeps select on val)")
    parser.add_argument("--int8-hard-swish", choices=("fused", "mul"), default="fused",
                        help="int8 (post-training): fused = one HARD_SWISH op (TFLite-Micro: smallest arena); "
                             "mul = MUL/ADD, the whole graph in one XNNPACK partition (phones, Pis, x86)")
    args = parser.parse_args(argv)

    # TFLite latencies use one interpreter thread; TensorFlow keeps its threads for QAT training.
    return run_main(lambda: "tflite: " + str(quantize_run(
        args.run, tuple(m.strip() for m in args.modes.split(",") if m.strip()), args.qat_epochs, args.qat_lr,
        args.representative, args.bootstrap, args.latency_runs, args.split, args.int8_hard_swish)))


if __name__ == "__main__":
    sys.exit(main())
