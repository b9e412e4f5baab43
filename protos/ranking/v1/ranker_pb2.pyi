from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ResponseFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESPONSE_FORMAT_CANDIDATES: _ClassVar[ResponseFormat]
    RESPONSE_FORMAT_COLUMNS: _ClassVar[ResponseFormat]
    RESPONSE_FORMAT_BOTH: _ClassVar[ResponseFormat]
RESPONSE_FORMAT_CANDIDATES: ResponseFormat
RESPONSE_FORMAT_COLUMNS: ResponseFormat
RESPONSE_FORMAT_BOTH: ResponseFormat

class Int64List(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, values: _Optional[_Iterable[int]] = ...) -> None: ...

class StringList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, values: _Optional[_Iterable[str]] = ...) -> None: ...

class FeatureValue(_message.Message):
    __slots__ = ("int_value", "float_value", "string_value", "int_list", "string_list")
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    FLOAT_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    INT_LIST_FIELD_NUMBER: _ClassVar[int]
    STRING_LIST_FIELD_NUMBER: _ClassVar[int]
    int_value: int
    float_value: float
    string_value: str
    int_list: Int64List
    string_list: StringList
    def __init__(self, int_value: _Optional[int] = ..., float_value: _Optional[float] = ..., string_value: _Optional[str] = ..., int_list: _Optional[_Union[Int64List, _Mapping]] = ..., string_list: _Optional[_Union[StringList, _Mapping]] = ...) -> None: ...

class Int64Column(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, values: _Optional[_Iterable[int]] = ...) -> None: ...

class DoubleColumn(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class StringColumn(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, values: _Optional[_Iterable[str]] = ...) -> None: ...

class Int64ListColumn(_message.Message):
    __slots__ = ("values", "lengths")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[int]
    lengths: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, values: _Optional[_Iterable[int]] = ..., lengths: _Optional[_Iterable[int]] = ...) -> None: ...

class StringListColumn(_message.Message):
    __slots__ = ("values", "lengths")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    lengths: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, values: _Optional[_Iterable[str]] = ..., lengths: _Optional[_Iterable[int]] = ...) -> None: ...

class FeatureColumn(_message.Message):
    __slots__ = ("ints", "floats", "strings", "int_lists", "string_lists")
    INTS_FIELD_NUMBER: _ClassVar[int]
    FLOATS_FIELD_NUMBER: _ClassVar[int]
    STRINGS_FIELD_NUMBER: _ClassVar[int]
    INT_LISTS_FIELD_NUMBER: _ClassVar[int]
    STRING_LISTS_FIELD_NUMBER: _ClassVar[int]
    ints: Int64Column
    floats: DoubleColumn
    strings: StringColumn
    int_lists: Int64ListColumn
    string_lists: StringListColumn
    def __init__(self, ints: _Optional[_Union[Int64Column, _Mapping]] = ..., floats: _Optional[_Union[DoubleColumn, _Mapping]] = ..., strings: _Optional[_Union[StringColumn, _Mapping]] = ..., int_lists: _Optional[_Union[Int64ListColumn, _Mapping]] = ..., string_lists: _Optional[_Union[StringListColumn, _Mapping]] = ...) -> None: ...

class Candidates(_message.Message):
    __slots__ = ("item_ids", "features")
    class FeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: FeatureColumn
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[FeatureColumn, _Mapping]] = ...) -> None: ...
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    item_ids: FeatureColumn
    features: _containers.MessageMap[str, FeatureColumn]
    def __init__(self, item_ids: _Optional[_Union[FeatureColumn, _Mapping]] = ..., features: _Optional[_Mapping[str, FeatureColumn]] = ...) -> None: ...

class RankRequest(_message.Message):
    __slots__ = ("request_id", "user", "context", "candidates", "objective_weights", "top_k", "model_version", "response_format")
    class UserEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: FeatureValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[FeatureValue, _Mapping]] = ...) -> None: ...
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: FeatureValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[FeatureValue, _Mapping]] = ...) -> None: ...
    class ObjectiveWeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    user: _containers.MessageMap[str, FeatureValue]
    context: _containers.MessageMap[str, FeatureValue]
    candidates: Candidates
    objective_weights: _containers.ScalarMap[str, float]
    top_k: int
    model_version: str
    response_format: ResponseFormat
    def __init__(self, request_id: _Optional[str] = ..., user: _Optional[_Mapping[str, FeatureValue]] = ..., context: _Optional[_Mapping[str, FeatureValue]] = ..., candidates: _Optional[_Union[Candidates, _Mapping]] = ..., objective_weights: _Optional[_Mapping[str, float]] = ..., top_k: _Optional[int] = ..., model_version: _Optional[str] = ..., response_format: _Optional[_Union[ResponseFormat, str]] = ...) -> None: ...

class ScoredCandidate(_message.Message):
    __slots__ = ("item_id", "index", "score", "objective_scores")
    class ObjectiveScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_SCORES_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    index: int
    score: float
    objective_scores: _containers.ScalarMap[str, float]
    def __init__(self, item_id: _Optional[str] = ..., index: _Optional[int] = ..., score: _Optional[float] = ..., objective_scores: _Optional[_Mapping[str, float]] = ...) -> None: ...

class RankedColumns(_message.Message):
    __slots__ = ("item_ids", "index", "score", "objective_scores")
    class ObjectiveScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: DoubleColumn
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[DoubleColumn, _Mapping]] = ...) -> None: ...
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_SCORES_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    index: _containers.RepeatedScalarFieldContainer[int]
    score: _containers.RepeatedScalarFieldContainer[float]
    objective_scores: _containers.MessageMap[str, DoubleColumn]
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ..., index: _Optional[_Iterable[int]] = ..., score: _Optional[_Iterable[float]] = ..., objective_scores: _Optional[_Mapping[str, DoubleColumn]] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("request_id", "candidates", "model_name", "model_version", "server_time_us", "ranked")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_US_FIELD_NUMBER: _ClassVar[int]
    RANKED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    candidates: _containers.RepeatedCompositeFieldContainer[ScoredCandidate]
    model_name: str
    model_version: str
    server_time_us: int
    ranked: RankedColumns
    def __init__(self, request_id: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[ScoredCandidate, _Mapping]]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., server_time_us: _Optional[int] = ..., ranked: _Optional[_Union[RankedColumns, _Mapping]] = ...) -> None: ...
