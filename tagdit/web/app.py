"""The sampling page's server: one HTML page and a small JSON API over a loaded `Painter`.

    GET  /                       the page (tagdit/web/page.html, vanilla JS, no build step)
    GET  /api/info               the run: checkpoint, resolution, limits, tags per prompt
    GET  /api/tags?prefix=       vocabulary tags for prompt completion and the page's tag buttons
    POST /api/jobs               multipart form (GenerateForm fields + optional init_image) -> a job (202)
    GET  /api/jobs[/ID]          the unfinished jobs / one job: state, step i of n, seconds, result or error
    POST /api/jobs/ID/cancel     stop the job at its next sampler step
    POST /api/generate           the same form, answered when the images are drawn (for scripts)
    GET  /api/history?limit=     the batches `samples-web/` holds, newest first
    GET  /samples/NAME           a generated image or a batch's zip

Every refusal is JSON `{"error": message, "fields": {field: message}}` with a 4xx status, each message
starting with the field's label as the page shows it; an unexpected failure is logged here and answered
with a 500 that carries no stack trace. Drawing runs in a worker thread, one job at a time, so the page
and the API stay responsive meanwhile.
"""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from PIL import Image
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from tagdit.data.vocab import SPECIALS
from tagdit.sampling.methods import sampler_method
from tagdit.sampling.painter import MAX_IMAGE_SIDE, Painter, read_image
from tagdit.web.forms import (
    LABELS,
    MAX_BODY_BYTES,
    MAX_UPLOAD_BYTES,
    BodyTooLarge,
    FormError,
    GenerateForm,
    capped,
    form_error,
    limits,
)
from tagdit.web.jobs import Busy, Job, Jobs
from tagdit.web.prompts import complete, prompt_problems
from tagdit.web.samples import SAMPLE_NAME, read_batches, write_batch

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("page.html")


def error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


class Studio:
    """The loaded run, the folder it draws into, and its jobs (one draws at a time)."""

    def __init__(self, painter: Painter, out_dir: Path):
        self.painter, self.out_dir = painter, Path(out_dir)
        self.tags = painter.vocab.tokens[len(SPECIALS):]
        self.jobs = Jobs()

    def read(self, fields: dict[str, str], img2img: bool) -> GenerateForm:
        """The checked form, or a FormError naming every field that is wrong: its ranges, then what
        they cannot say (tags the vocabulary or the model refuses, the sampler's step limit)."""
        p = self.painter
        try:
            form, problems = GenerateForm.model_validate(fields), {}
        except ValidationError as e:
            form, problems = None, form_error(e).fields
        unknown: list[str] = []
        if "prompt" not in problems and "negative" not in problems:  # both are valid text: check their tags
            prompts = form or GenerateForm.model_construct(prompt=fields.get("prompt", ""),
                                                           negative=fields.get("negative", ""))
            tag_problems, unknown = prompt_problems(prompts, p.vocab, self.tags, p.max_tags)
            problems |= tag_problems
        if form is not None and not img2img:  # img2img caps its steps to its noised range itself
            most = len(p.dit.alpha_bar) - (form.sampler == "dpmpp_2m")  # dpmpp_2m's last step is from t = 1
            if form.steps > most:
                problems["steps"] = f"{LABELS['steps']} must be a whole number from 1 to {most} for {form.sampler}."
        if problems or form is None:
            raise FormError(problems, **({"unknown_tags": unknown} if unknown else {}))
        return form

    def generate(self, form: GenerateForm, image: Image.Image | None, image_name: str,
                 callback: Any = None) -> dict[str, Any]:
        """Draw `form.n` images (seeds seed … seed + n - 1) and write them; the batch as the page shows it.
        `callback(i, n)` hears of each sampler step and may raise to stop (see jobs.Job.progress)."""
        p = self.painter
        method = sampler_method(form.sampler, form.steps, form.eta if form.sampler == "ddim" else None, name="web")
        (cond, _), (neg, _) = p.parse(form.prompt), p.parse(form.negative)
        seeds = [form.seed + i for i in range(form.n)]
        t0 = time.perf_counter()
        if image is None:
            images = p.sample(cond, neg, method, form.cfg, seeds, form.n, callback=callback)
        else:
            images = p.img2img(image, cond, neg, method, form.cfg, form.strength, seeds, form.n, callback=callback)
        seconds = time.perf_counter() - t0
        settings = {"prompt": form.prompt, "negative": form.negative, "cfg": form.cfg, "sampler": form.sampler,
                    "steps": form.steps, **({"eta": form.eta} if form.sampler == "ddim" else {}),
                    **({"init_image": image_name, "strength": form.strength} if image is not None else {}),
                    "checkpoint": p.checkpoint.name}
        return write_batch(self.out_dir, images, seeds, settings, seconds)

    async def submit(self, request: Request) -> Job:
        """The request's form, checked, queued as a job (FormError / BodyTooLarge / Busy otherwise)."""
        fields, upload = await read_form(request)
        form = self.read(fields, img2img=upload is not None)
        image = await read_init_image(upload) if upload else None
        name = Path(upload.filename).name[:100] if upload else ""
        return self.jobs.submit(lambda job: self.generate(form, image, name, job.progress))


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
    """The uploaded image, decoded and checked (FormError in the page's words otherwise)."""
    data = await upload.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise BodyTooLarge(MAX_UPLOAD_BYTES)
    if not data:
        raise FormError({"init_image": f"{LABELS['init_image']}: the file is empty."})
    try:
        return read_image(data, MAX_IMAGE_SIDE)
    except ValueError:
        raise FormError({"init_image": image_problem(data)}) from None


def image_problem(data: bytes) -> str:
    """Why `read_image` refused `data`, in the page's words (its own message quotes Pillow's)."""
    label, side = LABELS["init_image"], MAX_IMAGE_SIDE
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
    except Image.DecompressionBombError:
        return f"{label} is too large: at most {side} × {side} pixels are accepted."
    except Exception:  # noqa: BLE001 (whatever Pillow raises, the answer is the same)
        return f"{label} is not an image this page can read (PNG, JPEG, WebP, GIF, BMP, …)."
    if max(w, h) > side:
        return f"{label} is {w} × {h} pixels: at most {side} × {side} are accepted."
    return f"{label} could not be decoded: the file looks damaged."


def add_error_handlers(app: FastAPI) -> None:
    """Every failure answers as JSON `{"error": …}` with its status; crashes are logged with their traceback."""
    @app.exception_handler(FormError)
    async def refused(request: Request, e: FormError) -> JSONResponse:
        return error(422, str(e), fields=e.fields, **e.extra)

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, e: BodyTooLarge) -> JSONResponse:
        return error(413, str(e), fields={"init_image": str(e)})

    @app.exception_handler(Busy)
    async def busy(request: Request, e: Busy) -> JSONResponse:
        return error(429, str(e))

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


def add_job_routes(app: FastAPI, studio: Studio) -> None:
    """Drawing: queue a job, follow it, cancel it; or draw and wait (`/api/generate`)."""
    def job(job_id: str) -> Job:
        if job_id not in studio.jobs.jobs:
            raise HTTPException(404, "no such drawing (the server forgets finished ones after a while)")
        return studio.jobs.jobs[job_id]

    @app.post("/api/jobs", status_code=202)
    async def submit(request: Request) -> JSONResponse:
        return JSONResponse((await studio.submit(request)).view(), status_code=202)

    @app.get("/api/jobs")
    def unfinished() -> dict[str, list[dict[str, Any]]]:
        return {"jobs": [j.view() for j in studio.jobs.unfinished()]}

    @app.get("/api/jobs/{job_id}")
    def follow(job_id: str) -> dict[str, Any]:
        return job(job_id).view()

    @app.post("/api/jobs/{job_id}/cancel")
    def cancel(job_id: str) -> dict[str, Any]:
        j = job(job_id)
        j.cancel_asked.set()
        return j.view()

    @app.post("/api/generate")
    async def generate(request: Request) -> JSONResponse:
        j = await studio.submit(request)
        await run_in_threadpool(j.ended.wait)
        if j.state == "done":
            return JSONResponse(j.result)
        view = j.view()
        return error(view.pop("status", 409), view.pop("error", "the drawing was cancelled"), **view)


def create_app(painter: Painter, out_dir: str | Path) -> FastAPI:
    """The page's app over a loaded painter, writing into `out_dir` (e.g. `<run>/samples-web`)."""
    app = FastAPI(title="tagdit sampling page", docs_url=None, redoc_url=None, openapi_url=None)
    studio = Studio(painter, Path(out_dir))
    app.state.studio = studio
    add_error_handlers(app)
    add_job_routes(app, studio)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text(encoding="utf-8")

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return {"checkpoint": str(painter.checkpoint), "resolution": painter.resolution, "tags": len(studio.tags),
                "max_tags": painter.max_tags, "limits": limits(), "labels": LABELS}

    @app.get("/api/tags")
    def tags(prefix: str = Query("", max_length=200), limit: int = Query(20, ge=1, le=200)) -> dict[str, list[str]]:
        return {"tags": complete(studio.tags, prefix, limit)}

    @app.get("/api/history")
    def history(limit: int = Query(30, ge=1, le=200)) -> dict[str, list[dict[str, Any]]]:
        return {"batches": read_batches(studio.out_dir, limit)}

    @app.get("/samples/{name}")
    def sample_file(name: str) -> FileResponse:
        path = studio.out_dir / name
        if not SAMPLE_NAME.fullmatch(name) or not path.is_file():
            raise HTTPException(404, f"no such sample: {name}")
        return FileResponse(path, filename=name if name.endswith(".zip") else None)

    return app
