"""The run configuration: schema (:mod:`.schema`), reading and type checks (:mod:`.parse`), checks
of the core sections (:mod:`.checks`) and typed options of registered implementations (:mod:`.options`).

This package imports no strategy, sync policy, codec or adapter method: each of those families
validates its own section, and :func:`dpeft.validate.load_config` (what commands call) composes
them. ``python -m dpeft.config`` prints the config reference, families' options included.
"""

from dpeft.config.checks import check_core, validate_lockstep, validate_ray, validate_split
from dpeft.config.parse import (
    build_config,
    build_section,
    config_to_dict,
    dump_config,
    merge_override,
    parse_override,
    read_config_file,
    read_config_tree,
    reference_rows,
)
from dpeft.config.schema import (
    AdapterConfig,
    AuthConfig,
    CodecConfig,
    DataConfig,
    EvalConfig,
    KillReviveConfig,
    ModelConfig,
    PrivacyConfig,
    RayConfig,
    RunConfig,
    SimulateConfig,
    SplitConfig,
    StrategyConfig,
    SyncConfig,
    TrackingConfig,
    TrainConfig,
    TransportConfig,
)

__all__ = [
    "AdapterConfig",
    "AuthConfig",
    "CodecConfig",
    "DataConfig",
    "EvalConfig",
    "KillReviveConfig",
    "ModelConfig",
    "PrivacyConfig",
    "TrackingConfig",
    "RayConfig",
    "RunConfig",
    "SimulateConfig",
    "SplitConfig",
    "StrategyConfig",
    "SyncConfig",
    "TrainConfig",
    "TransportConfig",
    "build_config",
    "build_section",
    "check_core",
    "config_to_dict",
    "dump_config",
    "merge_override",
    "parse_override",
    "read_config_file",
    "read_config_tree",
    "reference_rows",
    "validate_lockstep",
    "validate_ray",
    "validate_split",
]
