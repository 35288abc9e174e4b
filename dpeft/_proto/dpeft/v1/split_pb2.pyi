from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EdgeMessage(_message.Message):
    __slots__ = ("hello", "step_start", "lora_output", "lora_input_grad", "feature_grad", "frozen_factors", "round_update", "goodbye", "chunk")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    STEP_START_FIELD_NUMBER: _ClassVar[int]
    LORA_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    LORA_INPUT_GRAD_FIELD_NUMBER: _ClassVar[int]
    FEATURE_GRAD_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FACTORS_FIELD_NUMBER: _ClassVar[int]
    ROUND_UPDATE_FIELD_NUMBER: _ClassVar[int]
    GOODBYE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    step_start: StepStart
    lora_output: LoraOutput
    lora_input_grad: LoraInputGrad
    feature_grad: FeatureGrad
    frozen_factors: FrozenFactors
    round_update: RoundUpdate
    goodbye: Goodbye
    chunk: PayloadChunk
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., step_start: _Optional[_Union[StepStart, _Mapping]] = ..., lora_output: _Optional[_Union[LoraOutput, _Mapping]] = ..., lora_input_grad: _Optional[_Union[LoraInputGrad, _Mapping]] = ..., feature_grad: _Optional[_Union[FeatureGrad, _Mapping]] = ..., frozen_factors: _Optional[_Union[FrozenFactors, _Mapping]] = ..., round_update: _Optional[_Union[RoundUpdate, _Mapping]] = ..., goodbye: _Optional[_Union[Goodbye, _Mapping]] = ..., chunk: _Optional[_Union[PayloadChunk, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("edge_id", "token", "version")
    EDGE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    edge_id: str
    token: str
    version: str
    def __init__(self, edge_id: _Optional[str] = ..., token: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class StepStart(_message.Message):
    __slots__ = ("step", "train", "active", "payload", "more")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    step: int
    train: bool
    active: _containers.RepeatedScalarFieldContainer[int]
    payload: bytes
    more: bool
    def __init__(self, step: _Optional[int] = ..., train: _Optional[bool] = ..., active: _Optional[_Iterable[int]] = ..., payload: _Optional[bytes] = ..., more: _Optional[bool] = ...) -> None: ...

class LoraOutput(_message.Message):
    __slots__ = ("call", "payload", "more")
    CALL_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    call: int
    payload: bytes
    more: bool
    def __init__(self, call: _Optional[int] = ..., payload: _Optional[bytes] = ..., more: _Optional[bool] = ...) -> None: ...

class LoraInputGrad(_message.Message):
    __slots__ = ("call", "payload", "more")
    CALL_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    call: int
    payload: bytes
    more: bool
    def __init__(self, call: _Optional[int] = ..., payload: _Optional[bytes] = ..., more: _Optional[bool] = ...) -> None: ...

class FeatureGrad(_message.Message):
    __slots__ = ("step", "payload", "more")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    step: int
    payload: bytes
    more: bool
    def __init__(self, step: _Optional[int] = ..., payload: _Optional[bytes] = ..., more: _Optional[bool] = ...) -> None: ...

class FrozenFactors(_message.Message):
    __slots__ = ("module", "revive", "payload", "more")
    MODULE_FIELD_NUMBER: _ClassVar[int]
    REVIVE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    module: int
    revive: bool
    payload: bytes
    more: bool
    def __init__(self, module: _Optional[int] = ..., revive: _Optional[bool] = ..., payload: _Optional[bytes] = ..., more: _Optional[bool] = ...) -> None: ...

class RoundUpdate(_message.Message):
    __slots__ = ("round", "num_examples", "train_loss", "payload", "more", "steps", "bytes_up", "bytes_down", "edge_flops", "eval_loss", "eval_accuracy", "evaluated", "skipped")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BYTES_UP_FIELD_NUMBER: _ClassVar[int]
    BYTES_DOWN_FIELD_NUMBER: _ClassVar[int]
    EDGE_FLOPS_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    EVAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    EVALUATED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    round: int
    num_examples: int
    train_loss: float
    payload: bytes
    more: bool
    steps: int
    bytes_up: int
    bytes_down: int
    edge_flops: float
    eval_loss: float
    eval_accuracy: float
    evaluated: bool
    skipped: bool
    def __init__(self, round: _Optional[int] = ..., num_examples: _Optional[int] = ..., train_loss: _Optional[float] = ..., payload: _Optional[bytes] = ..., more: _Optional[bool] = ..., steps: _Optional[int] = ..., bytes_up: _Optional[int] = ..., bytes_down: _Optional[int] = ..., edge_flops: _Optional[float] = ..., eval_loss: _Optional[float] = ..., eval_accuracy: _Optional[float] = ..., evaluated: _Optional[bool] = ..., skipped: _Optional[bool] = ...) -> None: ...

class Goodbye(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class PayloadChunk(_message.Message):
    __slots__ = ("data", "more")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    more: bool
    def __init__(self, data: _Optional[bytes] = ..., more: _Optional[bool] = ...) -> None: ...

class CloudMessage(_message.Message):
    __slots__ = ("welcome", "lora_input", "features", "lora_output_grad", "step_end", "round_global", "error", "chunk")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    LORA_INPUT_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    LORA_OUTPUT_GRAD_FIELD_NUMBER: _ClassVar[int]
    STEP_END_FIELD_NUMBER: _ClassVar[int]
    ROUND_GLOBAL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    lora_input: LoraInput
    features: Features
    lora_output_grad: LoraOutputGrad
    step_end: StepEnd
    round_global: RoundGlobal
    error: SplitError
    chunk: PayloadChunk
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., lora_input: _Optional[_Union[LoraInput, _Mapping]] = ..., features: _Optional[_Union[Features, _Mapping]] = ..., lora_output_grad: _Optional[_Union[LoraOutputGrad, _Mapping]] = ..., step_end: _Optional[_Union[StepEnd, _Mapping]] = ..., round_global: _Optional[_Union[RoundGlobal, _Mapping]] = ..., error: _Optional[_Union[SplitError, _Mapping]] = ..., chunk: _Optional[_Union[PayloadChunk, _Mapping]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("session", "config_yaml", "modules", "groups", "client_id", "evaluate", "rounds", "local_steps", "federated", "payload", "more", "round", "train", "evaluate_now")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_YAML_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    FEDERATED_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_NOW_FIELD_NUMBER: _ClassVar[int]
    session: str
    config_yaml: str
    modules: _containers.RepeatedScalarFieldContainer[str]
    groups: _containers.RepeatedCompositeFieldContainer[ModuleGroup]
    client_id: int
    evaluate: bool
    rounds: int
    local_steps: int
    federated: bool
    payload: bytes
    more: bool
    round: int
    train: bool
    evaluate_now: bool
    def __init__(self, session: _Optional[str] = ..., config_yaml: _Optional[str] = ..., modules: _Optional[_Iterable[str]] = ..., groups: _Optional[_Iterable[_Union[ModuleGroup, _Mapping]]] = ..., client_id: _Optional[int] = ..., evaluate: _Optional[bool] = ..., rounds: _Optional[int] = ..., local_steps: _Optional[int] = ..., federated: _Optional[bool] = ..., payload: _Optional[bytes] = ..., more: _Optional[bool] = ..., round: _Optional[int] = ..., train: _Optional[bool] = ..., evaluate_now: _Optional[bool] = ...) -> None: ...

class ModuleGroup(_message.Message):
    __slots__ = ("modules",)
    MODULES_FIELD_NUMBER: _ClassVar[int]
    modules: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, modules: _Optional[_Iterable[int]] = ...) -> None: ...

class LoraInput(_message.Message):
    __slots__ = ("call", "modules", "needs_input_grad", "payload", "more")
    CALL_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    NEEDS_INPUT_GRAD_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    call: int
    modules: _containers.RepeatedScalarFieldContainer[int]
    needs_input_grad: bool
    payload: bytes
    more: bool
    def __init__(self, call: _Optional[int] = ..., modules: _Optional[_Iterable[int]] = ..., needs_input_grad: _Optional[bool] = ..., payload: _Optional[bytes] = ..., more: _Optional[bool] = ...) -> None: ...

class Features(_message.Message):
    __slots__ = ("step", "payload", "more")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    step: int
    payload: bytes
    more: bool
    def __init__(self, step: _Optional[int] = ..., payload: _Optional[bytes] = ..., more: _Optional[bool] = ...) -> None: ...

class LoraOutputGrad(_message.Message):
    __slots__ = ("call", "modules", "needs_input_grad", "payload", "more")
    CALL_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    NEEDS_INPUT_GRAD_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    call: int
    modules: _containers.RepeatedScalarFieldContainer[int]
    needs_input_grad: bool
    payload: bytes
    more: bool
    def __init__(self, call: _Optional[int] = ..., modules: _Optional[_Iterable[int]] = ..., needs_input_grad: _Optional[bool] = ..., payload: _Optional[bytes] = ..., more: _Optional[bool] = ...) -> None: ...

class StepEnd(_message.Message):
    __slots__ = ("step",)
    STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    def __init__(self, step: _Optional[int] = ...) -> None: ...

class RoundGlobal(_message.Message):
    __slots__ = ("round", "done", "payload", "more", "train")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    round: int
    done: bool
    payload: bytes
    more: bool
    train: bool
    def __init__(self, round: _Optional[int] = ..., done: _Optional[bool] = ..., payload: _Optional[bytes] = ..., more: _Optional[bool] = ..., train: _Optional[bool] = ...) -> None: ...

class SplitError(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...
