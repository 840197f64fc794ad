"""Request and response bodies of tagserve's entity routes, `/v1/ner` and `/v1/redact`.

Request options are `LLM.ner`'s (README "Entities (NER)"); unknown request fields are ignored,
as on vLLM's routes. The response models document the bodies (OpenAPI, and the tests check
responses against them); the routes write that JSON straight from the results, which is faster.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from tagserve.server.protocol import OpenAIBaseModel

GroupStrategy = Literal["simple", "first", "average", "max"]
AggregationStrategy = Literal["none", GroupStrategy]
RedactMode = Literal["replace", "mask", "hash"]
Threshold = Annotated[float, Field(ge=0.0, le=1.0)]
Stride = Annotated[int, Field(ge=0)]


class EntityFields(OpenAIBaseModel):
    """What both routes take: the served model, which entities to keep, and long texts."""

    model: str | None = None
    labels: list[str] | None = Field(None, description="Keep only these entity labels")
    threshold: Threshold | None = Field(None, description="Drop entities scoring below it")
    request_id: str | None = None


class NerRequest(EntityFields):
    input: str | list[str] | list[list[str]] = Field(
        description="A text, a list of texts, or a list of word lists (joined with "
                    "`delimiter`; offsets index the joined text)")
    aggregation_strategy: AggregationStrategy = "simple"
    ignore_labels: list[str] = ["O"]
    stride: Stride | None = Field(None, description="Cover long texts with windows "
                                  "overlapping by this many tokens; without it they are "
                                  "truncated to one window")
    delimiter: str = " "
    window_merge: Literal["entities", "probabilities"] = "entities"
    bio: Literal["repair", "viterbi"] | None = None
    return_tokens: bool = False


class RedactRequest(EntityFields):
    input: str | list[str]
    mode: RedactMode = "replace"
    modes_by_label: dict[str, RedactMode] | None = Field(
        None, description="Per-label modes; other labels use `mode`")
    aggregation_strategy: GroupStrategy = "simple"
    bio: Literal["repair", "viterbi"] | None = None
    stride: Stride | None = Field(None, description="Window overlap in tokens; texts are "
                                  "always redacted whole (default: a quarter of the window)")
    mask_char: str = Field("*", min_length=1, max_length=1)
    hash_salt: str = ""


class NerDecodingResponse(BaseModel):
    """The served model's recommended entity decoding (config.json's "tagserve_ner_decoding";
    transformers' "simple" without BIO decoding or threshold when it names none): the page's
    defaults."""

    model: str
    aggregation_strategy: AggregationStrategy
    bio: Literal["repair", "viterbi"] | None
    threshold: float | None


class Entity(BaseModel):
    """An entity of an aggregating strategy."""

    entity_group: str
    score: float
    word: str
    start: int
    end: int


class TokenEntity(BaseModel):
    """A token of strategy "none"; `index` is its position, special tokens counted."""

    entity: str
    score: float
    index: int
    word: str
    start: int
    end: int


class TokenLabel(BaseModel):
    """`return_tokens`: one per non-special token of the whole text."""

    index: int
    token: str
    start: int
    end: int
    label: str
    score: float


class NerUsage(BaseModel):
    prompt_tokens: int = Field(description="Tokens run through the model, all windows counted")
    total_tokens: int


class NerData(BaseModel):
    index: int
    object: Literal["entities"] = "entities"
    entities: list[Entity] | list[TokenEntity]
    tokens: list[TokenLabel] | None = Field(None, description="Only with `return_tokens`")


class NerResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[NerData]
    usage: NerUsage


class RedactedEntity(Entity):
    replacement: str


class RedactData(BaseModel):
    index: int
    object: Literal["redaction"] = "redaction"
    text: str = Field(description="The input with every entity replaced")
    entities: list[RedactedEntity]


class RedactResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[RedactData]
    usage: NerUsage
