"""What the sampling page accepts: the generate form with its limits, and a request body capped while
it streams in, so an oversized upload is refused before it is held in memory."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.requests import Request

MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # init image file
MAX_FORM_BYTES = 64 * 1024  # everything else in the form
MAX_IMAGES = 16
MAX_STEPS = 1000
MAX_CFG = 30.0
MAX_BODY_BYTES = MAX_UPLOAD_BYTES + MAX_FORM_BYTES


def limits() -> dict[str, float]:
    """The limits as the page shows them."""
    from tagdit.sampling.painter import MAX_IMAGE_SIDE

    return {"n": MAX_IMAGES, "steps": MAX_STEPS, "cfg": MAX_CFG, "upload_mb": MAX_UPLOAD_BYTES // 2**20,
            "image_side": MAX_IMAGE_SIDE}


class GenerateForm(BaseModel):
    """One generate request; every field has the range the page's inputs show."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, str_max_length=2000)

    prompt: str = ""  # comma-separated tags; empty = unconditional
    negative: str = ""  # replaces the null condition in CFG
    cfg: float = Field(4.0, ge=0.0, le=MAX_CFG)
    sampler: Literal["ddim", "dpmpp_2m"] = "ddim"
    steps: int = Field(50, ge=1, le=MAX_STEPS)
    eta: float = Field(0.0, ge=0.0, le=1.0)  # ddim only
    seed: int = Field(0, ge=0, le=2**31 - 1)  # image i gets seed + i
    n: int = Field(4, ge=1, le=MAX_IMAGES)
    strength: float = Field(0.6, ge=0.0, le=1.0)  # img2img only

    @model_validator(mode="after")
    def _eta_is_ddims(self) -> GenerateForm:
        if self.sampler != "ddim" and self.eta != 0:
            raise ValueError(f"eta applies to the ddim sampler only; {self.sampler} is deterministic (use eta 0)")
        return self


def validation_message(e: ValidationError) -> str:
    """A pydantic error as one line a person can act on: "n: Input should be ≤ 16; steps: …"."""
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err["loc"])
        parts.append(f"{where}: {err['msg']}" if where else err["msg"].removeprefix("Value error, "))
    return "; ".join(parts)


class BodyTooLarge(Exception):
    """The request body is larger than the page accepts."""

    def __init__(self, limit: int):
        super().__init__(f"the upload is too large: at most {limit // (1024 * 1024)} MB")


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
