from google.protobuf import struct_pb2 as _struct_pb2
from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]

class Output(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_UNSPECIFIED: _ClassVar[Output]
    OUTPUT_VIEW_EMBEDDINGS: _ClassVar[Output]
    OUTPUT_POOLED: _ClassVar[Output]
    OUTPUT_READINGS: _ClassVar[Output]
    OUTPUT_THUMBNAILS: _ClassVar[Output]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT16: DType
OUTPUT_UNSPECIFIED: Output
OUTPUT_VIEW_EMBEDDINGS: Output
OUTPUT_POOLED: Output
OUTPUT_READINGS: Output
OUTPUT_THUMBNAILS: Output

class Tensor(_message.Message):
    __slots__ = ("data", "shape", "dtype")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class RawImage(_message.Message):
    __slots__ = ("data", "height", "width", "channels")
    DATA_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    height: int
    width: int
    channels: int
    def __init__(self, data: _Optional[bytes] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., channels: _Optional[int] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoded", "raw")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    raw: RawImage
    def __init__(self, encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawImage, _Mapping]] = ...) -> None: ...

class View(_message.Message):
    __slots__ = ("yaw", "pitch", "roll", "fov", "width", "height")
    YAW_FIELD_NUMBER: _ClassVar[int]
    PITCH_FIELD_NUMBER: _ClassVar[int]
    ROLL_FIELD_NUMBER: _ClassVar[int]
    FOV_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    yaw: float
    pitch: float
    roll: float
    fov: float
    width: int
    height: int
    def __init__(self, yaw: _Optional[float] = ..., pitch: _Optional[float] = ..., roll: _Optional[float] = ..., fov: _Optional[float] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class ViewList(_message.Message):
    __slots__ = ("views",)
    VIEWS_FIELD_NUMBER: _ClassVar[int]
    views: _containers.RepeatedCompositeFieldContainer[View]
    def __init__(self, views: _Optional[_Iterable[_Union[View, _Mapping]]] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("request_id", "id", "image", "view_preset", "views", "yaw_offset", "vocabularies", "top_k", "outputs", "thumbnail_size", "timeout_ms", "meta")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    VIEW_PRESET_FIELD_NUMBER: _ClassVar[int]
    VIEWS_FIELD_NUMBER: _ClassVar[int]
    YAW_OFFSET_FIELD_NUMBER: _ClassVar[int]
    VOCABULARIES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    THUMBNAIL_SIZE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    id: str
    image: Image
    view_preset: str
    views: ViewList
    yaw_offset: float
    vocabularies: _containers.RepeatedScalarFieldContainer[str]
    top_k: int
    outputs: _containers.RepeatedScalarFieldContainer[Output]
    thumbnail_size: int
    timeout_ms: int
    meta: _struct_pb2.Struct
    def __init__(self, request_id: _Optional[str] = ..., id: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., view_preset: _Optional[str] = ..., views: _Optional[_Union[ViewList, _Mapping]] = ..., yaw_offset: _Optional[float] = ..., vocabularies: _Optional[_Iterable[str]] = ..., top_k: _Optional[int] = ..., outputs: _Optional[_Iterable[_Union[Output, str]]] = ..., thumbnail_size: _Optional[int] = ..., timeout_ms: _Optional[int] = ..., meta: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("decode_ms", "queue_ms", "engine_ms", "total_ms", "batch_items", "batch_views")
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ITEMS_FIELD_NUMBER: _ClassVar[int]
    BATCH_VIEWS_FIELD_NUMBER: _ClassVar[int]
    decode_ms: float
    queue_ms: float
    engine_ms: float
    total_ms: float
    batch_items: int
    batch_views: int
    def __init__(self, decode_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., engine_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., batch_items: _Optional[int] = ..., batch_views: _Optional[int] = ...) -> None: ...

class Label(_message.Message):
    __slots__ = ("label", "p")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    P_FIELD_NUMBER: _ClassVar[int]
    label: str
    p: float
    def __init__(self, label: _Optional[str] = ..., p: _Optional[float] = ...) -> None: ...

class Labels(_message.Message):
    __slots__ = ("labels",)
    LABELS_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.RepeatedCompositeFieldContainer[Label]
    def __init__(self, labels: _Optional[_Iterable[_Union[Label, _Mapping]]] = ...) -> None: ...

class Reading(_message.Message):
    __slots__ = ("vocabulary", "pooled", "views")
    VOCABULARY_FIELD_NUMBER: _ClassVar[int]
    POOLED_FIELD_NUMBER: _ClassVar[int]
    VIEWS_FIELD_NUMBER: _ClassVar[int]
    vocabulary: str
    pooled: Labels
    views: _containers.RepeatedCompositeFieldContainer[Labels]
    def __init__(self, vocabulary: _Optional[str] = ..., pooled: _Optional[_Union[Labels, _Mapping]] = ..., views: _Optional[_Iterable[_Union[Labels, _Mapping]]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("request_id", "status", "id", "views", "embeddings", "pooled", "readings", "thumbnails", "meta", "timings")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    VIEWS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    POOLED_FIELD_NUMBER: _ClassVar[int]
    READINGS_FIELD_NUMBER: _ClassVar[int]
    THUMBNAILS_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    status: _status_pb2.Status
    id: str
    views: _containers.RepeatedCompositeFieldContainer[View]
    embeddings: Tensor
    pooled: Tensor
    readings: _containers.RepeatedCompositeFieldContainer[Reading]
    thumbnails: _containers.RepeatedScalarFieldContainer[bytes]
    meta: _struct_pb2.Struct
    timings: Timings
    def __init__(self, request_id: _Optional[str] = ..., status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., id: _Optional[str] = ..., views: _Optional[_Iterable[_Union[View, _Mapping]]] = ..., embeddings: _Optional[_Union[Tensor, _Mapping]] = ..., pooled: _Optional[_Union[Tensor, _Mapping]] = ..., readings: _Optional[_Iterable[_Union[Reading, _Mapping]]] = ..., thumbnails: _Optional[_Iterable[bytes]] = ..., meta: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...

class DreamRequest(_message.Message):
    __slots__ = ("request_id", "id", "image", "view_preset", "views", "yaw_offset", "prompt", "from_labels", "template", "negative_prompt", "strength", "steps", "guidance", "seed", "trajectory_every", "timeout_ms", "meta")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    VIEW_PRESET_FIELD_NUMBER: _ClassVar[int]
    VIEWS_FIELD_NUMBER: _ClassVar[int]
    YAW_OFFSET_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    FROM_LABELS_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TRAJECTORY_EVERY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    id: str
    image: Image
    view_preset: str
    views: ViewList
    yaw_offset: float
    prompt: str
    from_labels: _containers.RepeatedScalarFieldContainer[str]
    template: str
    negative_prompt: str
    strength: float
    steps: int
    guidance: float
    seed: int
    trajectory_every: int
    timeout_ms: int
    meta: _struct_pb2.Struct
    def __init__(self, request_id: _Optional[str] = ..., id: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., view_preset: _Optional[str] = ..., views: _Optional[_Union[ViewList, _Mapping]] = ..., yaw_offset: _Optional[float] = ..., prompt: _Optional[str] = ..., from_labels: _Optional[_Iterable[str]] = ..., template: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., strength: _Optional[float] = ..., steps: _Optional[int] = ..., guidance: _Optional[float] = ..., seed: _Optional[int] = ..., trajectory_every: _Optional[int] = ..., timeout_ms: _Optional[int] = ..., meta: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class Trajectory(_message.Message):
    __slots__ = ("steps", "frames", "drift", "prompt_cosine")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    DRIFT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_COSINE_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedScalarFieldContainer[int]
    frames: _containers.RepeatedScalarFieldContainer[bytes]
    drift: _containers.RepeatedScalarFieldContainer[float]
    prompt_cosine: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, steps: _Optional[_Iterable[int]] = ..., frames: _Optional[_Iterable[bytes]] = ..., drift: _Optional[_Iterable[float]] = ..., prompt_cosine: _Optional[_Iterable[float]] = ...) -> None: ...

class VocabularyLabels(_message.Message):
    __slots__ = ("vocabulary", "labels")
    VOCABULARY_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    vocabulary: str
    labels: _containers.RepeatedCompositeFieldContainer[Label]
    def __init__(self, vocabulary: _Optional[str] = ..., labels: _Optional[_Iterable[_Union[Label, _Mapping]]] = ...) -> None: ...

class ViewDream(_message.Message):
    __slots__ = ("index", "view", "prompt", "seed", "source", "image", "scores", "labels", "nsfw", "trajectory")
    class ScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    INDEX_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    NSFW_FIELD_NUMBER: _ClassVar[int]
    TRAJECTORY_FIELD_NUMBER: _ClassVar[int]
    index: int
    view: View
    prompt: str
    seed: int
    source: bytes
    image: bytes
    scores: _containers.ScalarMap[str, float]
    labels: _containers.RepeatedCompositeFieldContainer[VocabularyLabels]
    nsfw: bool
    trajectory: Trajectory
    def __init__(self, index: _Optional[int] = ..., view: _Optional[_Union[View, _Mapping]] = ..., prompt: _Optional[str] = ..., seed: _Optional[int] = ..., source: _Optional[bytes] = ..., image: _Optional[bytes] = ..., scores: _Optional[_Mapping[str, float]] = ..., labels: _Optional[_Iterable[_Union[VocabularyLabels, _Mapping]]] = ..., nsfw: _Optional[bool] = ..., trajectory: _Optional[_Union[Trajectory, _Mapping]] = ...) -> None: ...

class DreamResponse(_message.Message):
    __slots__ = ("request_id", "status", "id", "dreams", "meta", "timings_ms")
    class TimingsMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    DREAMS_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    status: _status_pb2.Status
    id: str
    dreams: _containers.RepeatedCompositeFieldContainer[ViewDream]
    meta: _struct_pb2.Struct
    timings_ms: _containers.ScalarMap[str, float]
    def __init__(self, request_id: _Optional[str] = ..., status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., id: _Optional[str] = ..., dreams: _Optional[_Iterable[_Union[ViewDream, _Mapping]]] = ..., meta: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., timings_ms: _Optional[_Mapping[str, float]] = ...) -> None: ...

class CaptionRequest(_message.Message):
    __slots__ = ("request_id", "id", "image", "view_preset", "views", "yaw_offset", "flavours", "beams", "max_tokens", "timeout_ms", "meta")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    VIEW_PRESET_FIELD_NUMBER: _ClassVar[int]
    VIEWS_FIELD_NUMBER: _ClassVar[int]
    YAW_OFFSET_FIELD_NUMBER: _ClassVar[int]
    FLAVOURS_FIELD_NUMBER: _ClassVar[int]
    BEAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    id: str
    image: Image
    view_preset: str
    views: ViewList
    yaw_offset: float
    flavours: _containers.RepeatedScalarFieldContainer[str]
    beams: int
    max_tokens: int
    timeout_ms: int
    meta: _struct_pb2.Struct
    def __init__(self, request_id: _Optional[str] = ..., id: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., view_preset: _Optional[str] = ..., views: _Optional[_Union[ViewList, _Mapping]] = ..., yaw_offset: _Optional[float] = ..., flavours: _Optional[_Iterable[str]] = ..., beams: _Optional[int] = ..., max_tokens: _Optional[int] = ..., timeout_ms: _Optional[int] = ..., meta: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class Flavour(_message.Message):
    __slots__ = ("vocabulary", "label", "p")
    VOCABULARY_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    P_FIELD_NUMBER: _ClassVar[int]
    vocabulary: str
    label: str
    p: float
    def __init__(self, vocabulary: _Optional[str] = ..., label: _Optional[str] = ..., p: _Optional[float] = ...) -> None: ...

class ViewCaption(_message.Message):
    __slots__ = ("index", "view", "caption", "prompt", "flavours")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    CAPTION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    FLAVOURS_FIELD_NUMBER: _ClassVar[int]
    index: int
    view: View
    caption: str
    prompt: str
    flavours: _containers.RepeatedCompositeFieldContainer[Flavour]
    def __init__(self, index: _Optional[int] = ..., view: _Optional[_Union[View, _Mapping]] = ..., caption: _Optional[str] = ..., prompt: _Optional[str] = ..., flavours: _Optional[_Iterable[_Union[Flavour, _Mapping]]] = ...) -> None: ...

class CaptionResponse(_message.Message):
    __slots__ = ("request_id", "status", "id", "captions", "embeddings", "meta", "timings_ms")
    class TimingsMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    CAPTIONS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    status: _status_pb2.Status
    id: str
    captions: _containers.RepeatedCompositeFieldContainer[ViewCaption]
    embeddings: Tensor
    meta: _struct_pb2.Struct
    timings_ms: _containers.ScalarMap[str, float]
    def __init__(self, request_id: _Optional[str] = ..., status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., id: _Optional[str] = ..., captions: _Optional[_Iterable[_Union[ViewCaption, _Mapping]]] = ..., embeddings: _Optional[_Union[Tensor, _Mapping]] = ..., meta: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., timings_ms: _Optional[_Mapping[str, float]] = ...) -> None: ...

class EmbedTextRequest(_message.Message):
    __slots__ = ("texts",)
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, texts: _Optional[_Iterable[str]] = ...) -> None: ...

class EmbedTextResponse(_message.Message):
    __slots__ = ("embeddings",)
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    embeddings: Tensor
    def __init__(self, embeddings: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClipInfo(_message.Message):
    __slots__ = ("model", "weights", "embed_dim", "image_size", "mean", "std", "compiled")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    EMBED_DIM_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    COMPILED_FIELD_NUMBER: _ClassVar[int]
    model: str
    weights: str
    embed_dim: int
    image_size: _containers.RepeatedScalarFieldContainer[int]
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    compiled: bool
    def __init__(self, model: _Optional[str] = ..., weights: _Optional[str] = ..., embed_dim: _Optional[int] = ..., image_size: _Optional[_Iterable[int]] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., compiled: _Optional[bool] = ...) -> None: ...

class ReprojectionInfo(_message.Message):
    __slots__ = ("backend", "antialias", "min_decode_width")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    ANTIALIAS_FIELD_NUMBER: _ClassVar[int]
    MIN_DECODE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    backend: str
    antialias: bool
    min_decode_width: int
    def __init__(self, backend: _Optional[str] = ..., antialias: _Optional[bool] = ..., min_decode_width: _Optional[int] = ...) -> None: ...

class VocabularyInfo(_message.Message):
    __slots__ = ("name", "template", "labels")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    template: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., template: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_in_flight", "max_queue", "max_batch_views", "max_delay_ms", "max_message_bytes", "max_pixels", "max_views", "max_thumbnail_size", "max_streams", "max_decode_bytes", "idle_timeout_s", "max_dream_steps", "max_dream_views", "max_dream_batch", "max_dream_delay_ms", "max_caption_batch")
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_VIEWS_FIELD_NUMBER: _ClassVar[int]
    MAX_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_VIEWS_FIELD_NUMBER: _ClassVar[int]
    MAX_THUMBNAIL_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_DECODE_BYTES_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MAX_DREAM_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_DREAM_VIEWS_FIELD_NUMBER: _ClassVar[int]
    MAX_DREAM_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_DREAM_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_CAPTION_BATCH_FIELD_NUMBER: _ClassVar[int]
    max_in_flight: int
    max_queue: int
    max_batch_views: int
    max_delay_ms: float
    max_message_bytes: int
    max_pixels: int
    max_views: int
    max_thumbnail_size: int
    max_streams: int
    max_decode_bytes: int
    idle_timeout_s: float
    max_dream_steps: int
    max_dream_views: int
    max_dream_batch: int
    max_dream_delay_ms: float
    max_caption_batch: int
    def __init__(self, max_in_flight: _Optional[int] = ..., max_queue: _Optional[int] = ..., max_batch_views: _Optional[int] = ..., max_delay_ms: _Optional[float] = ..., max_message_bytes: _Optional[int] = ..., max_pixels: _Optional[int] = ..., max_views: _Optional[int] = ..., max_thumbnail_size: _Optional[int] = ..., max_streams: _Optional[int] = ..., max_decode_bytes: _Optional[int] = ..., idle_timeout_s: _Optional[float] = ..., max_dream_steps: _Optional[int] = ..., max_dream_views: _Optional[int] = ..., max_dream_batch: _Optional[int] = ..., max_dream_delay_ms: _Optional[float] = ..., max_caption_batch: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "architecture", "source", "parameters", "dtype", "device")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    name: str
    architecture: str
    source: str
    parameters: int
    dtype: str
    device: str
    def __init__(self, name: _Optional[str] = ..., architecture: _Optional[str] = ..., source: _Optional[str] = ..., parameters: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class DreamInfo(_message.Message):
    __slots__ = ("size", "scheduler", "attention", "strength", "steps", "guidance", "safety_checker")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    SAFETY_CHECKER_FIELD_NUMBER: _ClassVar[int]
    size: int
    scheduler: str
    attention: str
    strength: float
    steps: int
    guidance: float
    safety_checker: bool
    def __init__(self, size: _Optional[int] = ..., scheduler: _Optional[str] = ..., attention: _Optional[str] = ..., strength: _Optional[float] = ..., steps: _Optional[int] = ..., guidance: _Optional[float] = ..., safety_checker: _Optional[bool] = ...) -> None: ...

class CaptionInfo(_message.Message):
    __slots__ = ("image_size", "beams", "max_tokens")
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    BEAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    image_size: _containers.RepeatedScalarFieldContainer[int]
    beams: int
    max_tokens: int
    def __init__(self, image_size: _Optional[_Iterable[int]] = ..., beams: _Optional[int] = ..., max_tokens: _Optional[int] = ...) -> None: ...

class Info(_message.Message):
    __slots__ = ("clip", "device", "dtype", "attention", "reprojection", "views", "vocabularies", "batch_size", "top_k", "versions", "limits", "dream", "view_presets", "seed", "decode_budget_mib", "models", "caption", "diffusion", "captioner", "precision", "precision_reason", "embedding_dtype", "engine_config_json")
    class VersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CLIP_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    REPROJECTION_FIELD_NUMBER: _ClassVar[int]
    VIEWS_FIELD_NUMBER: _ClassVar[int]
    VOCABULARIES_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    DREAM_FIELD_NUMBER: _ClassVar[int]
    VIEW_PRESETS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DECODE_BUDGET_MIB_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    CAPTION_FIELD_NUMBER: _ClassVar[int]
    DIFFUSION_FIELD_NUMBER: _ClassVar[int]
    CAPTIONER_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    PRECISION_REASON_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DTYPE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    clip: ClipInfo
    device: str
    dtype: str
    attention: str
    reprojection: ReprojectionInfo
    views: _containers.RepeatedCompositeFieldContainer[View]
    vocabularies: _containers.RepeatedCompositeFieldContainer[VocabularyInfo]
    batch_size: int
    top_k: int
    versions: _containers.ScalarMap[str, str]
    limits: Limits
    dream: bool
    view_presets: _containers.RepeatedScalarFieldContainer[str]
    seed: int
    decode_budget_mib: int
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    caption: bool
    diffusion: DreamInfo
    captioner: CaptionInfo
    precision: str
    precision_reason: str
    embedding_dtype: str
    engine_config_json: str
    def __init__(self, clip: _Optional[_Union[ClipInfo, _Mapping]] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., attention: _Optional[str] = ..., reprojection: _Optional[_Union[ReprojectionInfo, _Mapping]] = ..., views: _Optional[_Iterable[_Union[View, _Mapping]]] = ..., vocabularies: _Optional[_Iterable[_Union[VocabularyInfo, _Mapping]]] = ..., batch_size: _Optional[int] = ..., top_k: _Optional[int] = ..., versions: _Optional[_Mapping[str, str]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., dream: _Optional[bool] = ..., view_presets: _Optional[_Iterable[str]] = ..., seed: _Optional[int] = ..., decode_budget_mib: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., caption: _Optional[bool] = ..., diffusion: _Optional[_Union[DreamInfo, _Mapping]] = ..., captioner: _Optional[_Union[CaptionInfo, _Mapping]] = ..., precision: _Optional[str] = ..., precision_reason: _Optional[str] = ..., embedding_dtype: _Optional[str] = ..., engine_config_json: _Optional[str] = ...) -> None: ...
