"""The studio: a single page served by the ingress itself (``GET /`` and ``/studio``), plain
HTML/CSS/ES modules from ``serve/static`` -- no build step, nothing fetched from elsewhere. The
page and its files need no key (it asks for one and sends it as a Bearer header); everything it
does goes through the public API."""

from pathlib import Path
from typing import Optional

from fastapi.responses import FileResponse

from acestep.audio import AUDIO_FORMATS
from acestep.dit.tasks import TRACK_NAMES, task_catalog
from serve.edge.errors import APIError, FieldError, error_responses
from serve.http_app import api

STATIC = Path(__file__).with_name("static")
MEDIA_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}
FILES = tuple(sorted(p.name for p in STATIC.iterdir() if p.suffix in MEDIA_TYPES)) if STATIC.is_dir() else ()
PUBLIC_PATHS = frozenset({"/", "/studio", *(f"/studio/{name}" for name in FILES)})


class StudioRoutes:
    """Route group inherited by ``serve.api.Ingress``."""

    @api.get("/", include_in_schema=False)
    async def studio_root(self):
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @api.get("/studio", include_in_schema=False)
    async def studio_page(self):
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @api.get("/studio/{name}", include_in_schema=False)
    async def studio_file(self, name: str):
        if name not in FILES:  # a fixed list: no path from the client reaches the filesystem
            raise APIError(404, "unknown studio file", loc=("path", "name"), code="not_found")
        return FileResponse(STATIC / name, media_type=MEDIA_TYPES[Path(name).suffix],
                            headers={"Cache-Control": "no-cache"})

    @api.get("/v1/task_types", responses=error_responses(422))
    async def task_types(self, model: Optional[str] = None):
        """The task types as a client needs them: whether a source file is required, whether it
        takes a window or track names, its default instruction, and whether this app can serve it
        (with the DiT it would use, or why not) -- with ``model``, whether that DiT can; beside them
        the track names and the output formats (``audio_format``) a request may name."""
        turbo = await self.state.turbo_by_model()
        if model:
            try:
                model = self.served.dit_name(model)
            except FieldError as error:  # the query parameter, not a body field
                raise APIError(422, error.message, loc=("query", "model")) from None
        tasks = []
        for entry in task_catalog():
            try:
                entry.update(servable=True, model=self.served.pick_dit(model, entry["task_type"], turbo), reason=None)
            except FieldError as error:
                entry.update(servable=False, model=None, reason=error.message)
            tasks.append(entry)
        return {"tasks": tasks, "track_names": list(TRACK_NAMES), "audio_formats": list(AUDIO_FORMATS)}
