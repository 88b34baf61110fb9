"""Study configuration: the schema (`idlab.config.schema`), the YAML loader
(`idlab.config.loader`), the typed per-run config (`idlab.config.run.RunConfig`) and
the checks a study passes before any run starts (`idlab.config.checks`)."""

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
    METHODS,
    PER_RUN_TRAIN_FIELDS,
    PROJECTIONS,
    TARGET_SETS,
    TASK_FAMILIES,
    ConfigError,
    FullConfig,
    LoraConfig,
    ModelConfig,
    SlurmConfig,
    StudyConfig,
    SubspaceConfig,
    TaskConfig,
    TrainConfig,
    target_set_label,
)

__all__ = [
    "BUILTIN_TASKS",
    "METHODS",
    "PER_RUN_TRAIN_FIELDS",
    "PROJECTIONS",
    "TARGET_SETS",
    "TASK_FAMILIES",
    "ConfigError",
    "FullConfig",
    "LoraConfig",
    "ModelConfig",
    "RunConfig",
    "SlurmConfig",
    "StudyConfig",
    "SubspaceConfig",
    "TaskConfig",
    "TrainConfig",
    "describe_fields",
    "load_study",
    "parse_override",
    "study_from_dict",
    "target_set_label",
    "to_dict",
]
