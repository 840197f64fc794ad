"""Request and response bodies of the HTTP API, field for field as vLLM's.

Unknown request fields are accepted and ignored (`extra="allow"`), as in vLLM.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tagserve.config import PoolingTask, check_removed_task
from tagserve.errors import ValidationError

EncodingFormat = Literal["float", "base64", "bytes", "bytes_only"]
EmbedDType = Literal["float32", "float16", "bfloat16", "fp8_e4m3", "fp8_e5m2"]
Endianness = Literal["native", "big", "little"]


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow")


class ContentPart(OpenAIBaseModel):
    type: str
    text: str | None = None


class ChatMessage(OpenAIBaseModel):
    role: str
    content: str | list[ContentPart] | None = None


class ChatFields(OpenAIBaseModel):
    """The chat form: `messages` rendered with the tokenizer's chat template."""

    messages: list[ChatMessage]
    add_generation_prompt: bool = False
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class PoolingFields(OpenAIBaseModel):
    """Fields shared by both forms of a `/pooling` request."""

    model: str | None = None
    task: PoolingTask | None = None
    encoding_format: EncodingFormat = "float"
    embed_dtype: EmbedDType = "float32"
    endianness: Endianness = "native"
    dimensions: int | None = None
    use_activation: bool | None = None
    truncate_prompt_tokens: Annotated[int, Field(ge=-1)] | None = None
    truncation_side: Literal["left", "right"] | None = None
    request_id: str | None = None
    priority: int = 0
    user: str | None = None
    cache_salt: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _reject_removed_parameters(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if "normalize" in data:
                raise ValidationError("Parameter `normalize` was removed; use `use_activation` "
                                      "instead.", parameter="normalize")
            check_removed_task(data.get("task"))
        return data


class PoolingCompletionRequest(PoolingFields):
    input: list[int] | list[list[int]] | str | list[str]
    add_special_tokens: bool = True


class PoolingChatRequest(PoolingFields, ChatFields):
    pass


PoolingRequest = PoolingCompletionRequest | PoolingChatRequest


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: int | None = 0
    prompt_tokens_details: None = None
    completion_tokens_details: None = None


class PoolingResponseData(BaseModel):
    index: int
    object: Literal["pooling"] = "pooling"
    data: list[list[float]] | list[float] | str = Field(
        description="`[num_tokens][num_labels]` floats, or base64 of the flattened tensor")


class PoolingResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[PoolingResponseData]
    usage: UsageInfo


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


class TokenizeCompletionRequest(OpenAIBaseModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(ChatFields):
    model: str | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool | None = False


TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None
    offsets: list[tuple[int, int]] = Field(
        description="tagserve extra: the [start, end) characters of each token in the prompt")


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelPermission(BaseModel):
    id: str = Field(default_factory=lambda: f"modelperm-{uuid.uuid4().hex[:16]}")
    object: Literal["model_permission"] = "model_permission"
    created: int = Field(default_factory=lambda: int(time.time()))
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "tagserve"
    root: str
    parent: str | None = None
    max_model_len: int
    permission: list[ModelPermission] = Field(default_factory=lambda: [ModelPermission()])


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class VersionResponse(BaseModel):
    version: str
