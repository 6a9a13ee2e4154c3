"""What the sampling page accepts: the generate form with its limits, refusals in the page's own
words (the field's label and range, never a library's message), and a request body capped while it
streams in, so an oversized upload is refused before it is held in memory."""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from starlette.requests import Request

from tagdit.sampling.methods import SamplerName

MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # init image file
MAX_FORM_BYTES = 64 * 1024  # everything else in the form
MAX_IMAGES = 16
MAX_STEPS = 1000
MAX_CFG = 30.0
MAX_TEXT = 2000  # characters of a prompt
MAX_BODY_BYTES = MAX_UPLOAD_BYTES + MAX_FORM_BYTES

# The page's label of each field, as its <label> shows it: every refusal starts with one of these.
LABELS = {"prompt": "Tags", "negative": "Negative tags", "sampler": "Sampler", "steps": "Steps", "cfg": "CFG scale",
          "eta": "eta", "seed": "Seed", "n": "Images", "strength": "Strength", "init_image": "Init image"}


def limits() -> dict[str, float]:
    """The limits as the page shows them."""
    from tagdit.sampling.painter import MAX_IMAGE_SIDE

    return {"n": MAX_IMAGES, "steps": MAX_STEPS, "cfg": MAX_CFG, "upload_mb": MAX_UPLOAD_BYTES // 2**20,
            "image_side": MAX_IMAGE_SIDE}


class GenerateForm(BaseModel):
    """One generate request; every field has the range the page's inputs show."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, str_max_length=MAX_TEXT)

    prompt: str = ""  # comma-separated tags; empty = unconditional
    negative: str = ""  # replaces the null condition in CFG
    cfg: float = Field(4.0, ge=0.0, le=MAX_CFG)
    sampler: SamplerName = "ddim"
    steps: int = Field(50, ge=1, le=MAX_STEPS)
    eta: float = Field(0.0, ge=0.0, le=1.0)  # ddim only
    seed: int = Field(0, ge=0, le=2**31 - 1)  # image i gets seed + i
    n: int = Field(4, ge=1, le=MAX_IMAGES)
    strength: float = Field(0.6, ge=0.0, le=1.0)  # img2img only

    @field_validator("eta")
    @classmethod
    def _eta_is_ddims(cls, eta: float, info: ValidationInfo) -> float:
        sampler = info.data.get("sampler", "ddim")
        if sampler != "ddim" and eta != 0:
            raise ValueError(f"applies to the ddim sampler only; {sampler} fixes its own (use eta 0)")
        return eta


class FormError(Exception):
    """A refused form: each field's message, in the page's words."""

    def __init__(self, fields: dict[str, str], **extra: Any):
        order = list(LABELS)  # the page's order, top to bottom; unknown fields last
        self.fields = dict(sorted(fields.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
        self.extra = extra
        super().__init__(" ".join(self.fields.values()))


def field_range(name: str) -> tuple[float, float] | None:
    """The (lowest, highest) value a numeric field accepts, from its declaration."""
    meta = GenerateForm.model_fields[name].metadata
    lo = next((m.ge for m in meta if hasattr(m, "ge")), None)  # annotated_types.Ge / Le
    hi = next((m.le for m in meta if hasattr(m, "le")), None)
    return None if lo is None or hi is None else (lo, hi)


def field_message(name: str, err: dict[str, Any]) -> str:
    """One pydantic error on field `name` as a sentence that starts with the field's label."""
    label = LABELS.get(name)
    if label is None:
        return f"The form sent a field this page does not have: {name[:40]}."
    if err["type"] == "value_error":
        return f"{label} {err['msg'].removeprefix('Value error, ')}."
    if name == "sampler":
        return f"{label} must be one of {', '.join(typing.get_args(SamplerName))}."
    if name in ("prompt", "negative"):
        return f"{label} must be at most {MAX_TEXT} characters."
    lo, hi = field_range(name) or (0, 0)
    if GenerateForm.model_fields[name].annotation is int:
        return f"{label} must be a whole number from {int(lo)} to {int(hi)}."
    return f"{label} must be a number from {lo:g} to {hi:g}."


def form_error(e: ValidationError) -> FormError:
    """A pydantic refusal of the form as a FormError: one message per field, in field order."""
    fields: dict[str, str] = {}
    for err in e.errors():
        name = str(err["loc"][0]) if err["loc"] else "form"
        fields.setdefault(name, field_message(name, err) if err["loc"] else err["msg"])
    return FormError(fields)


class BodyTooLarge(Exception):
    """The request body is larger than the page accepts."""

    def __init__(self, limit: int):
        super().__init__(f"{LABELS['init_image']} is too large: at most {limit // (1024 * 1024)} MB is accepted.")


def capped(request: Request, limit: int) -> Request:
    """The same request, whose body raises BodyTooLarge as soon as more than `limit` bytes arrived
    (a declared Content-Length over the limit is refused before reading anything)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    seen = 0

    async def receive():  # noqa: ANN202 (ASGI message)
        nonlocal seen
        message = await request.receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise BodyTooLarge(limit)
        return message

    return Request(request.scope, receive)
