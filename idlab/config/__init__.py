"""Study configuration: the schema (`idlab.config.schema`), the YAML loader
(`idlab.config.loader`), the typed per-run config (`idlab.config.run.RunConfig`) and
the checks a study passes before any run starts (`idlab.config.checks`); the JSON Schema of a
study file (`idlab.config.jsonschema.study_schema`, ``idlab schema``)."""

from idlab.config.jsonschema import study_schema
from idlab.config.loader import (
    describe_fields,
    load_study,
    parse_override,
    study_from_dict,
    to_dict,
)
from idlab.config.run import RunConfig
from idlab.config.schema import (
    BUILTIN_TASKS,
    PER_RUN_TRAIN_FIELDS,
    TASK_FAMILIES,
    ConfigError,
    EvalConfig,
    ModelConfig,
    SlurmConfig,
    StudyConfig,
    TargetConfig,
    TaskConfig,
    TrainConfig,
)

__all__ = [
    "BUILTIN_TASKS",
    "PER_RUN_TRAIN_FIELDS",
    "TASK_FAMILIES",
    "ConfigError",
    "EvalConfig",
    "ModelConfig",
    "RunConfig",
    "SlurmConfig",
    "StudyConfig",
    "TargetConfig",
    "TaskConfig",
    "TrainConfig",
    "describe_fields",
    "load_study",
    "parse_override",
    "study_from_dict",
    "study_schema",
    "to_dict",
]
