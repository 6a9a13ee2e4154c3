"""The sampling page's server: one HTML page and a small JSON API over a loaded `Painter`.

    GET  /                 the page (tagdit/web/page.html, vanilla JS, no build step)
    GET  /api/info         the run: checkpoint, resolution, limits
    GET  /api/tags?prefix= vocabulary tags for prompt completion
    POST /api/generate     multipart form (GenerateForm fields + optional init_image) -> image records
    GET  /samples/NAME     a generated image or a batch's zip

Every refusal is JSON `{"error": message}` with a 4xx status, shown on the page; an unexpected
failure is logged here and answered with a 500 that carries no stack trace. Generation runs in a
worker thread, one request at a time, so the page and the API stay responsive meanwhile.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
import secrets
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from PIL import Image, PngImagePlugin
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from tagdit.config import SamplerConfig
from tagdit.data.vocab import SPECIALS, normalize_tag
from tagdit.sampling.painter import MAX_IMAGE_SIDE, Painter, read_image
from tagdit.web.forms import (
    MAX_BODY_BYTES,
    MAX_UPLOAD_BYTES,
    BodyTooLarge,
    GenerateForm,
    capped,
    limits,
    validation_message,
)

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("page.html")
SAMPLE_NAME = re.compile(r"\d{8}-\d{6}-[0-9a-f]{8}(-\d{1,2})?\.(png|zip)")  # what `Studio` writes, nothing else


def error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def complete(tags: list[str], prefix: str, limit: int) -> list[str]:
    """Tags starting with `prefix` (as typed or normalised), then tags containing it elsewhere."""
    queries = {prefix.strip().lower(), normalize_tag(prefix)}
    starts = [t for t in tags if any(t.startswith(q) for q in queries)]
    inside = [t for t in tags if t not in starts and any(q in t for q in queries)]
    return (starts + inside)[:limit]


class Studio:
    """The loaded run and the folder it draws into; `generate` runs one request at a time."""

    def __init__(self, painter: Painter, out_dir: Path):
        self.painter, self.out_dir = painter, Path(out_dir)
        self.tags = painter.vocab.tokens[len(SPECIALS):]
        self.lock = threading.Lock()

    def unknown_tags(self, form: GenerateForm) -> dict[str, list[str]]:
        """Each tag of the prompts the vocabulary does not know -> up to 3 close vocabulary tags."""
        bad = self.painter.vocab.parse_prompt(form.prompt)[1] + self.painter.vocab.parse_prompt(form.negative)[1]
        return {t: difflib.get_close_matches(normalize_tag(t), self.tags, n=3, cutoff=0.6) for t in bad}

    def generate(self, form: GenerateForm, image: Image.Image | None, image_name: str) -> dict[str, Any]:
        """Draw `form.n` images (seeds seed … seed + n - 1), write them and a zip; their records."""
        p = self.painter
        method = SamplerConfig(name="web", sampler=form.sampler, steps=form.steps, eta=form.eta)
        (cond, _), (neg, _) = p.parse(form.prompt), p.parse(form.negative)
        seeds = [form.seed + i for i in range(form.n)]
        with self.lock:
            t0 = time.perf_counter()
            if image is None:
                images = p.sample(cond, neg, method, form.cfg, seeds, form.n)
            else:
                images = p.img2img(image, cond, neg, method, form.cfg, form.strength, seeds, form.n)
            seconds = time.perf_counter() - t0
        settings = {"prompt": form.prompt, "negative": form.negative, "cfg": form.cfg, "sampler": form.sampler,
                    "steps": form.steps, **({"eta": form.eta} if form.sampler == "ddim" else {}),
                    **({"init_image": image_name, "strength": form.strength} if image is not None else {}),
                    "checkpoint": p.checkpoint.name}
        return self.write(images, seeds, settings) | {"seconds": round(seconds, 2)}

    def write(self, images: list[Image.Image], seeds: list[int], settings: dict[str, Any]) -> dict[str, Any]:
        """PNGs (settings in their text chunk) and one zip, under names made here, never from input."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        batch = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
        records = []
        for i, (img, seed) in enumerate(zip(images, seeds, strict=True)):
            record = {"file": f"{batch}-{i}.png", "seed": seed, **settings}
            info = PngImagePlugin.PngInfo()
            info.add_text("parameters", json.dumps(record))
            img.save(self.out_dir / record["file"], pnginfo=info)
            records.append(record | {"url": f"samples/{record['file']}"})
        with zipfile.ZipFile(self.out_dir / f"{batch}.zip", "w") as z:
            for r in records:
                z.write(self.out_dir / r["file"], r["file"])
            z.writestr("settings.json", json.dumps([{k: v for k, v in r.items() if k != "url"} for r in records], indent=2))
        log.info("wrote %d images to %s (%s)", len(records), self.out_dir, batch)
        return {"images": records, "zip": f"samples/{batch}.zip"}


async def read_form(request: Request) -> tuple[dict[str, str], UploadFile | None]:
    """The form's text fields and its init image (None when no file was chosen), size-capped."""
    kind = request.headers.get("content-type", "")
    if not kind.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise HTTPException(415, "send the form as multipart/form-data")
    body = capped(request, MAX_BODY_BYTES)
    form = await body.form(max_files=1, max_fields=len(GenerateForm.model_fields) + 1)
    fields = {k: v for k, v in form.multi_items() if isinstance(v, str) and k != "init_image"}
    upload = form.get("init_image")
    return fields, upload if isinstance(upload, UploadFile) and upload.filename else None


async def read_init_image(upload: UploadFile) -> Image.Image:
    """The uploaded image, decoded and checked (ValueError with the reason otherwise)."""
    data = await upload.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise BodyTooLarge(MAX_UPLOAD_BYTES)
    if not data:
        raise ValueError("the init image file is empty")
    return read_image(data, MAX_IMAGE_SIDE)


def add_error_handlers(app: FastAPI) -> None:
    """Every failure answers as JSON `{"error": …}` with its status; crashes are logged with their traceback."""
    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, e: BodyTooLarge) -> JSONResponse:
        return error(413, str(e))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return error(e.status_code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def bad_query(request: Request, e: RequestValidationError) -> JSONResponse:
        return error(422, "; ".join(f"{'.'.join(map(str, x['loc'][1:]))}: {x['msg']}" for x in e.errors()))

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception) -> JSONResponse:
        log.exception("request %s failed", request.url.path)
        return error(500, f"the server failed ({type(e).__name__}); the details are in its log")


def create_app(painter: Painter, out_dir: str | Path) -> FastAPI:
    """The page's app over a loaded painter, writing into `out_dir` (e.g. `<run>/samples-web`)."""
    app = FastAPI(title="tagdit sampling page", docs_url=None, redoc_url=None, openapi_url=None)
    studio = Studio(painter, Path(out_dir))
    app.state.studio = studio
    add_error_handlers(app)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text(encoding="utf-8")

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return {"checkpoint": str(painter.checkpoint), "resolution": painter.resolution, "tags": len(studio.tags),
                "max_tags": painter.max_tags, "limits": limits()}

    @app.get("/api/tags")
    def tags(prefix: str = Query("", max_length=200), limit: int = Query(20, ge=1, le=200)) -> dict[str, list[str]]:
        return {"tags": complete(studio.tags, prefix, limit)}

    @app.post("/api/generate")
    async def generate(request: Request) -> JSONResponse:
        fields, upload = await read_form(request)
        try:
            form = GenerateForm.model_validate(fields)
        except ValidationError as e:
            return error(422, validation_message(e))
        unknown = studio.unknown_tags(form)
        if unknown:
            hints = [f"{t} (did you mean: {', '.join(s)}?)" if s else t for t, s in unknown.items()]
            return error(422, f"not in the vocabulary: {'; '.join(hints)}. Remove or correct them.",
                         unknown_tags=list(unknown))
        try:
            image = await read_init_image(upload) if upload else None
            name = Path(upload.filename).name[:100] if upload else ""
            result = await run_in_threadpool(studio.generate, form, image, name)
        except ValueError as e:
            return error(422, str(e))
        return JSONResponse(result)

    @app.get("/samples/{name}")
    def sample_file(name: str) -> FileResponse:
        path = studio.out_dir / name
        if not SAMPLE_NAME.fullmatch(name) or not path.is_file():
            raise HTTPException(404, f"no such sample: {name}")
        return FileResponse(path, filename=name if name.endswith(".zip") else None)

    return app
