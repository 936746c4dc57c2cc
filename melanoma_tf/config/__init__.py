"""Typed, strict configuration: the schema (:mod:`.schema`) and how YAML becomes it (:mod:`.load`)."""

from melanoma_tf.config.load import (
                                     fingerprint,
                                     from_dict,
                                     load,
                                     load_sweep_config,
                                     parse_override,
                                     replace,
                                     save,
                                     to_dict,
                                     to_yaml,
)
from melanoma_tf.config.schema import (
                                     QUANT_MODES,
                                     STAGES,
                                     TEACHER_BLOCKS,
                                     TEACHER_PACKAGES,
                                     VALIDATION_SCORES,
                                     AugmentConfig,
                                     Config,
                                     ConfigError,
                                     DataConfig,
                                     DistillConfig,
                                     ExternalSet,
                                     LossConfig,
                                     OutputConfig,
                                     RaySettings,
                                     RelationalConfig,
                                     StudentConfig,
                                     SweepConfig,
                                     SyntheticConfig,
                                     TeacherConfig,
                                     TrainConfig,
)

__all__ = ["QUANT_MODES", "STAGES", "VALIDATION_SCORES", "AugmentConfig", "Config", "ConfigError", "DataConfig",
           "DistillConfig", "ExternalSet", "LossConfig", "OutputConfig", "RaySettings", "RelationalConfig",
           "StudentConfig", "SweepConfig", "SyntheticConfig", "TeacherConfig", "TrainConfig", "fingerprint",
           "from_dict", "load", "load_sweep_config", "parse_override", "replace", "save", "to_dict", "to_yaml"]
