"""The search web app: a page to search faces and vote thumbs up/down, and its JSON API (spec 4.2, 4.3).

``create_app(library)`` builds the ASGI app over one :class:`~face_assets.library.FaceRecognitionLibrary`;
``face-assets serve`` runs it with uvicorn (one process: DuckDB has one writer). Endpoints:

- ``GET /``: the search page (no external assets).
- ``POST /api/search``: multipart ``image`` upload, or form field ``face_id`` of a catalog face.
- ``POST /api/feedback``: ``{"query_id", "result_id", "vote": "up" | "down", "voter"?}``.
- ``GET /api/faces``: catalog faces to pick a query from; ``GET /api/faces/{face_id}/thumbnail``.
- ``GET /api/feedback/stats``, ``GET /api/health``, ``GET /openapi.json``.

Images are served by face id only: the file read is the one the catalog names for that face, so no
request can name a path.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from .errors import (FeedbackError, FeedbackStoreUnavailableError, ImageLoadError, NoFaceDetectedError,
                     UnknownFaceError, UnknownQueryError)
from .feedback import Vote
from .imaging import load_image
from .library import FaceRecognitionLibrary

SESSION_COOKIE = "fa_session"


class FeedbackIn(BaseModel):
    """A vote on one result of a search."""

    model_config = ConfigDict(extra="forbid")

    query_id: str = Field(min_length=1, max_length=64, description="`query_id` returned by `POST /api/search`.")
    result_id: StrictInt = Field(ge=1, description="`face_id` of the result voted on.")
    vote: Literal["up", "down"] = Field(description="`up`: same person; `down`: different person.")
    voter: str | None = Field(None, min_length=1, max_length=200,
                              description="Who votes; default: the page's session cookie, else `anonymous`.")


class Hit(BaseModel):
    """One search result."""

    face_id: int
    image_id: str
    similarity: float
    cluster_id: int | None
    thumbnail_url: str


class SearchOut(BaseModel):
    """A recorded search: vote on its results with its ``query_id``."""

    query_id: str
    query_face_id: int | None
    bbox: list[float]
    results: list[Hit]


class FaceOut(BaseModel):
    """A catalog face that can be picked as a query."""

    face_id: int
    cluster_id: int | None
    thumbnail_url: str


def _thumbnail_url(face_id: int) -> str:
    return f"/api/faces/{face_id}/thumbnail"


def face_thumbnail(library: FaceRecognitionLibrary, face_id: int, size: int) -> bytes:
    """JPEG crop of one catalog face with some margin, longest side ``size`` pixels.

    Raises:
        UnknownFaceError: the catalog holds no such face.
        ImageLoadError: its image file is gone or unreadable.
    """
    face = library.catalog.faces_by_id([face_id]).get(face_id)
    if face is None:
        raise UnknownFaceError(face_id)
    img = load_image(face["path"], max_pixels=library.settings.images.max_pixels)
    x1, y1, x2, y2 = face["bbox"]
    mx, my = 0.25 * (x2 - x1), 0.25 * (y2 - y1)
    h, w = img.shape[:2]
    crop = img[max(0, int(y1 - my)):min(h, int(y2 + my)), max(0, int(x1 - mx)):min(w, int(x2 + mx))]
    if crop.size == 0:
        crop = img
    scale = size / max(crop.shape[:2])
    if scale < 1:
        crop = cv2.resize(crop, (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale))),
                          interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(crop), [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise ImageLoadError(face["path"], "cannot encode thumbnail")
    return buf.tobytes()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status)


def create_app(library: FaceRecognitionLibrary) -> FastAPI:
    """The ASGI app over ``library`` (which the caller opens and closes)."""
    cfg = library.settings.feedback
    app = FastAPI(title="face_assets search and feedback", version="1", docs_url=None, redoc_url=None,
                  description="Search faces, vote on the results; votes become training data.")
    page = (Path(__file__).with_name("resources") / "search.html").read_text(encoding="utf-8")

    @app.exception_handler(UnknownQueryError)
    @app.exception_handler(UnknownFaceError)
    async def _not_found(_request: Request, exc: Exception) -> JSONResponse:
        return _error(404, str(exc))

    @app.exception_handler(FeedbackError)
    async def _conflict(_request: Request, exc: FeedbackError) -> JSONResponse:
        return _error(409, str(exc))

    @app.exception_handler(FeedbackStoreUnavailableError)
    async def _unavailable(_request: Request, exc: FeedbackStoreUnavailableError) -> JSONResponse:
        return _error(503, str(exc))

    @app.exception_handler(ImageLoadError)
    async def _bad_image(_request: Request, exc: ImageLoadError) -> JSONResponse:
        return _error(400, f"cannot read the image: {exc.reason}")

    @app.exception_handler(NoFaceDetectedError)
    async def _no_face(_request: Request, _exc: NoFaceDetectedError) -> JSONResponse:
        return _error(422, "no face found in the image")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index(request: Request) -> HTMLResponse:
        response = HTMLResponse(page)
        if not request.cookies.get(SESSION_COOKIE):
            response.set_cookie(SESSION_COOKIE, secrets.token_hex(16), httponly=True, samesite="lax",
                                max_age=365 * 86400)
        return response

    @app.post("/api/search", response_model=SearchOut, responses={400: {}, 404: {}, 413: {}, 422: {}})
    def search(request: Request, image: UploadFile | None = File(None, description="query image file"),
               face_id: int | None = Form(None, ge=1, description="or: a catalog face to search with"),
               top_k: int | None = Form(None, ge=1, le=200)) -> SearchOut | JSONResponse:
        """Search with the main face of an uploaded image (or a catalog face) and record the query."""
        session = request.cookies.get(SESSION_COOKIE)
        if (image is None) == (face_id is None):
            return _error(422, "send either an 'image' file or a 'face_id'")
        if image is not None:
            data = image.file.read(cfg.max_upload_bytes + 1)
            if len(data) > cfg.max_upload_bytes:
                return _error(413, f"image larger than {cfg.max_upload_bytes} bytes")
            q = library.feedback_search(data, top_k=top_k, session_id=session, filename=(image.filename or "")[:200])
        else:
            q = library.feedback_search(face_id=face_id, top_k=top_k, session_id=session)
        return SearchOut(query_id=q.query_id, query_face_id=q.query_face_id, bbox=q.bbox, results=[
            Hit(face_id=r.face_id, image_id=r.image_id, similarity=r.similarity, cluster_id=r.cluster_id,
                thumbnail_url=_thumbnail_url(r.face_id)) for r in q.results])

    @app.post("/api/feedback", response_model=Vote, responses={404: {}, 409: {}, 422: {}})
    def feedback(request: Request, body: FeedbackIn) -> Vote:
        """Store a thumbs up/down; the same voter voting again on the same pair updates the vote."""
        session = request.cookies.get(SESSION_COOKIE)
        return library.record_feedback(body.query_id, body.result_id, body.vote, voter=body.voter, session_id=session)

    @app.get("/api/faces", response_model=list[FaceOut])
    def faces(limit: int = Query(24, ge=1, le=200), offset: int = Query(0, ge=0)) -> list[FaceOut]:
        """Valid catalog faces, in id order, to pick a query from."""
        ids = [r[0] for r in library.catalog.query(
            "SELECT face_id FROM faces WHERE is_valid ORDER BY face_id LIMIT ? OFFSET ?", [limit, offset])]
        rows = library.catalog.faces_by_id(ids)
        return [FaceOut(face_id=i, cluster_id=rows[i].get("cluster_id"), thumbnail_url=_thumbnail_url(i))
                for i in ids if i in rows]

    @app.get("/api/faces/{face_id}/thumbnail", response_class=Response, responses={404: {}})
    def thumbnail(face_id: int) -> Response:
        """JPEG thumbnail of a catalog face (by id only: no request names a file)."""
        try:
            jpeg = face_thumbnail(library, face_id, cfg.thumbnail_size)
        except ImageLoadError:
            return _error(404, f"the image of face {face_id} is not readable")
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/feedback/stats")
    def stats() -> dict:
        """Counts of queries and votes."""
        return library.feedback_stats()

    @app.get("/api/health")
    def health() -> dict:
        """Liveness: index size and model version."""
        return {"status": "ok", "faces": len(library.index), "model_version": library.model_version}

    return app


def serve(library: FaceRecognitionLibrary, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the app with uvicorn until interrupted (one worker: the catalog has one writer)."""
    import uvicorn

    uvicorn.run(create_app(library), host=host, port=port, log_level="info", workers=1)
