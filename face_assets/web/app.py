"""The review web app: search faces and vote on the results, curate persons; its JSON API (docs/web.md).

``create_app(library)`` builds the ASGI app over one :class:`~face_assets.library.FaceRecognitionLibrary`;
``face-assets serve`` runs it with uvicorn (one process: DuckDB has one writer). Pages: ``/`` (search
and vote), ``/people`` (persons: rename, merge, move, split), ``/login``. Every ``/api`` route but
``/api/health`` and ``/api/login`` needs a role (:data:`face_assets.auth.ROLES`).

Images are served by face id or query id only: the file read is the one the catalog or the feedback
store names, so no request can name a path. Curation requests name the person they were made on, and
each is one library call (one write, its audit entry included) that can be undone (``/api/audit``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.datastructures import UploadFile
from starlette.middleware.sessions import SessionMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette_csrf import CSRFMiddleware

from ..auth import Principal, SessionStore, TokenStore
from ..errors import (ClusterNotFoundError, ConfigError, CurationError, FeedbackError, FeedbackStoreUnavailableError,
                      ImageLoadError, ImageTooLargeError, InvalidNameError, NoFaceDetectedError, UnknownFaceError,
                      UnknownQueryError)
from ..feedback import Vote
from ..imaging import load_image
from ..library import FaceRecognitionLibrary, SearchResult
from ..process import lower_thread_priority
from .images import ThumbnailCache, encode_jpeg, prepare_query_image
from .security import SESSION_ID, SESSION_KEY, Guard, SecurityHeaders, is_loopback, session_secret

logger = logging.getLogger(__name__)

SESSION_COOKIE = "fa_session"
CSRF_COOKIE = "fa_csrf"
CSRF_HEADER = "x-csrf-token"
MAX_RESULTS = 200
STATIC = Path(__file__).with_name("static")
Id = Annotated[int, Field(ge=1, le=2**62)]


class FeedbackIn(BaseModel):
    """A vote on one result of a search; the voter is the authenticated user."""

    model_config = ConfigDict(extra="forbid")

    query_id: str = Field(min_length=1, max_length=64, description="`query_id` returned by `POST /api/search`.")
    result_id: StrictInt = Field(ge=1, le=2**62, description="`face_id` of the result voted on.")
    vote: Literal["up", "down"] = Field(description="`up`: same person; `down`: different person.")


class LoginIn(BaseModel):
    """A page login with an API token."""

    model_config = ConfigDict(extra="forbid")

    token: str = Field(min_length=1, max_length=200)


class Hit(BaseModel):
    """One search result; ``is_match``: at or above the running model version's match threshold."""

    face_id: int
    image_id: str
    similarity: float
    is_match: bool
    cluster_id: int | None
    person: str | None = Field(description="The person's name, when the cluster is named.")
    thumbnail_url: str


class SearchOut(BaseModel):
    """A recorded search: vote on its results with its ``query_id``."""

    query_id: str
    query_face_id: int | None
    bbox: list[float]
    faces: list[list[float]] = Field(description="Boxes of every face of the query image; `face_index` was searched.")
    face_index: int
    image_size: list[int] = Field(description="Width and height of the query image the boxes refer to.")
    image_url: str
    threshold: float
    results: list[Hit]


class MyVote(BaseModel):
    """The caller's vote on one result."""

    result_id: int
    vote: str


class FaceOut(BaseModel):
    """A catalog face."""

    face_id: int
    cluster_id: int | None = None
    thumbnail_url: str


class PersonOut(BaseModel):
    """A person cluster: name, size and cover face."""

    cluster_id: int
    name: str | None
    size: int
    cover_face_id: int | None
    cover_url: str | None


class PeopleOut(BaseModel):
    """One page of persons."""

    total: int
    items: list[PersonOut]


class PersonFacesOut(PersonOut):
    """A person with one page of its faces."""

    faces: list[FaceOut]


class ChangeOut(BaseModel):
    """What a curation request did: its audit entry (``change_id``, for undo) and the persons it left."""

    change_id: int | None = Field(description="`POST /api/audit/{change_id}/undo` undoes it; null: nothing changed.")
    persons: list[PersonOut] = Field(description="rename: the person; merge: the kept one; move: the receiving "
                                     "one, then the source if faces are left; split: the source, then the new person.")


class RenameIn(BaseModel):
    """A person's new name; empty or null clears it (stored NFC; control and text-direction characters refused)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=400)


class MergeIn(BaseModel):
    """Persons to merge into the largest of them."""

    model_config = ConfigDict(extra="forbid")

    cluster_ids: list[Id] = Field(min_length=2, max_length=50)


class FacesIn(BaseModel):
    """Faces of one person: split off into a new person, or moved to ``to``."""

    model_config = ConfigDict(extra="forbid")

    face_ids: list[Id] = Field(min_length=1, max_length=2000)
    to: Id | None = Field(None, description="move: the person that receives the faces.")


class ChangeEntry(BaseModel):
    """One curation change of the audit log (its details vary with ``action``)."""

    model_config = ConfigDict(extra="allow")

    id: int
    at: str
    actor: str
    action: str
    cluster_ids: list[int]
    undoes: int | None
    undone_by: int | None


class _App(FastAPI):
    """FastAPI with :class:`SecurityHeaders` around its whole stack: answers made before the user
    middleware (the 413 of an oversized ``Content-Length``, server errors) carry the headers too."""

    def build_middleware_stack(self):
        return SecurityHeaders(super().build_middleware_stack())


def _thumbnail_url(face_id: int) -> str:
    return f"/api/faces/{face_id}/thumbnail"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    """Where and what, never the input itself (a 50 MB body must not come back in the error)."""
    return [{"loc": [str(p)[:40] for p in e.get("loc", ())], "msg": str(e.get("msg", ""))[:200],
             "type": e.get("type")} for e in exc.errors()[:20]]


def _install_error_handlers(app: FastAPI) -> None:
    """Library errors to typed 4xx / 503 answers whose messages do not repeat what was sent."""
    app.add_exception_handler(InvalidNameError, lambda _r, e: _error(422, str(e)[:300]))
    plain = {UnknownQueryError: (404, "unknown query_id: run a search first"),
             UnknownFaceError: (404, "unknown face id: not in the catalog"),
             ClusterNotFoundError: (404, "no such person"),
             NoFaceDetectedError: (422, "no face found in the image")}
    for cls, (status, message) in plain.items():
        app.add_exception_handler(cls, lambda _r, _e, s=status, m=message: _error(s, m))
    app.add_exception_handler(FeedbackError, lambda _r, e: _error(409, str(e)[:300]))
    app.add_exception_handler(CurationError, lambda _r, e: _error(409, str(e)[:300]))
    app.add_exception_handler(ImageTooLargeError, lambda _r, e: _error(413, f"image too large: {e.reason}"))
    app.add_exception_handler(ImageLoadError, lambda _r, e: _error(400, f"cannot read the image: {e.reason}"))
    app.add_exception_handler(FeedbackStoreUnavailableError, lambda _r, _e: _error(
        503, "the feedback store is unavailable: try again shortly", {"Retry-After": "5"}))
    app.add_exception_handler(RequestValidationError, lambda _r, e: JSONResponse(
        {"detail": _validation_errors(e)}, status_code=422))


def create_app(library: FaceRecognitionLibrary) -> FastAPI:
    """The ASGI app over ``library`` (which the caller opens and closes), configured by ``settings.web``."""
    settings = library.settings
    cfg, fcfg = settings.web, settings.feedback
    layout = settings.layout
    tokens = TokenStore(layout.tokens)
    sessions = SessionStore(layout.sessions)
    guard = Guard(cfg, tokens, sessions)
    thumbnails = ThumbnailCache(library, layout.thumbnails, fcfg.thumbnail_size)
    searches = threading.BoundedSemaphore(cfg.max_concurrent_searches)
    # Decoding and detection run on these threads only: the memory each thread's allocator keeps
    # after a large image is then bounded by the number of searches at once, not of requests.
    # ...and at web.search_nice, with the onnxruntime threads the first search starts (models load
    # lazily, on these threads): a people page or a curation action does not queue behind inference.
    search_pool = ThreadPoolExecutor(cfg.max_concurrent_searches, thread_name_prefix="search",
                                     initializer=lower_thread_priority, initargs=(cfg.search_nice,))

    stop = threading.Event()

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        # The index is read before the first request is taken: at millions of faces reading and checking
        # it takes seconds under the library's lock, and every call (curation, people pages) would wait
        # behind the first search. The port opens (and /api/health answers) once it is in memory.
        await asyncio.get_running_loop().run_in_executor(None, lambda: library.index)
        warmer = threading.Thread(target=thumbnails.prewarm, args=(stop,), name="thumbnails", daemon=True)
        if cfg.prewarm_thumbnails:
            warmer.start()  # cards then find their thumbnail made, not made on demand
        yield
        stop.set()
        search_pool.shutdown(wait=False, cancel_futures=True)
        if warmer.is_alive():
            warmer.join(10)
        sessions.close()

    async def in_pool(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(search_pool, fn, *args)
    viewer, reviewer, admin = guard.role("viewer"), guard.role("reviewer"), guard.role("admin")

    app = _App(title="face_assets review", version="2", docs_url=None, redoc_url=None, openapi_url=None,
                  max_body_size=cfg.max_json_bytes, lifespan=lifespan,
                  description="Search faces, vote on the results (votes become training data), curate persons.")
    _install_error_handlers(app)
    secret = session_secret(layout.session_key)
    # Outermost last: headers on every answer, then the Host check, then CSRF before the session is read.
    app.add_middleware(SessionMiddleware, secret_key=secret, session_cookie=SESSION_COOKIE,
                       max_age=int(cfg.session_hours * 3600), same_site="strict", https_only=cfg.cookie_secure)
    app.add_middleware(CSRFMiddleware, secret=secret, cookie_name=CSRF_COOKIE, header_name=CSRF_HEADER,
                       cookie_secure=cfg.cookie_secure, cookie_samesite="strict",
                       # With tokens, only requests carrying the session cookie are at risk; without
                       # auth every state-changing request is, and the login form always is.
                       sensitive_cookies={SESSION_COOKIE} if cfg.auth == "tokens" else None,
                       required_urls=[re.compile(r"^/api/login$")])
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=cfg.allowed_hosts)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def hits(results: list[SearchResult]) -> list[Hit]:
        labels = library.persons.store.labels({r.cluster_id for r in results if r.cluster_id is not None})
        return [Hit(face_id=r.face_id, image_id=r.image_id, similarity=r.similarity, is_match=r.is_match,
                    cluster_id=r.cluster_id, person=labels.get(r.cluster_id), thumbnail_url=_thumbnail_url(r.face_id))
                for r in results]

    def own_query(query_id: str, who: Principal) -> dict:
        query = library.feedback.get_query(query_id[:64])
        if query is None:
            raise UnknownQueryError(query_id)
        if query["session_id"] != who.token_id and not who.can("admin"):
            raise HTTPException(403, "not your query")
        return query

    # -- pages -------------------------------------------------------------------------------------
    def page(name: str):
        def handler(request: Request) -> Response:
            if guard.principal(request) is None:
                return RedirectResponse("/login", status_code=303)
            return FileResponse(STATIC / name, media_type="text/html")
        return handler

    app.get("/", include_in_schema=False)(page("search.html"))
    app.get("/people", include_in_schema=False)(page("people.html"))

    @app.get("/login", include_in_schema=False)
    def login_page() -> FileResponse:
        return FileResponse(STATIC / "login.html", media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> FileResponse:
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    # -- session -----------------------------------------------------------------------------------
    @app.get("/openapi.json", include_in_schema=False)
    def openapi(_who: Principal = Depends(viewer)) -> JSONResponse:
        """The OpenAPI description, to authenticated callers only."""
        return JSONResponse(app.openapi())

    @app.post("/api/login", responses={401: {}, 403: {}, 429: {}})
    def login(request: Request, body: LoginIn) -> dict:
        """Page login: exchange an API token for a server-side session and its cookie (needs the CSRF header)."""
        guard.login_attempt(request)
        who = tokens.authenticate(body.token)
        if who is None:
            guard.login_failed(request)
            raise HTTPException(401, "unknown or revoked token")
        old = request.session.get(SESSION_ID)
        if isinstance(old, str):
            sessions.end(old)
        request.session.clear()
        request.session[SESSION_KEY] = who.token_id
        request.session[SESSION_ID] = sessions.start(who.token_id, cfg.session_hours * 3600)
        return {"name": who.name, "role": who.role}

    @app.post("/api/logout")
    def logout(request: Request) -> dict:
        """End the page session on the server: its cookie, and any copy of it, is refused from now on."""
        sid = request.session.get(SESSION_ID)
        if isinstance(sid, str):
            sessions.end(sid)
        request.session.clear()
        return {"status": "logged out"}

    @app.get("/api/me")
    def me(who: Principal = Depends(viewer)) -> dict:
        """The caller's user name and role, and the server's auth mode."""
        return {"name": who.name, "role": who.role, "auth": cfg.auth}

    # -- search and votes --------------------------------------------------------------------------
    upload_limit = fcfg.max_upload_bytes

    @app.post("/api/search", response_model=SearchOut, max_body_size=upload_limit + 65_536,
              responses={400: {}, 401: {}, 404: {}, 413: {}, 422: {}, 429: {}, 503: {}},
              openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                  "type": "object", "properties": {
                      "image": {"type": "string", "format": "binary", "description": "query image file"},
                      "face_id": {"type": "integer", "description": "or: a catalog face to search with"},
                      "face_index": {"type": "integer", "description": "image: which face (see `faces`)"},
                      "top_k": {"type": "integer", "maximum": MAX_RESULTS}}}}}}})
    async def search(request: Request, who: Principal = Depends(viewer)) -> SearchOut | JSONResponse:
        """Search with a face of an uploaded image (or a catalog face) and record the query.

        Limits, in order: role and rate, then the body size (413 unread), then at most
        ``web.max_concurrent_searches`` at once (503 + Retry-After), then the pixel budget.
        """
        guard.search_slot(who)
        form = await request.form(max_files=1, max_fields=4, max_part_size=1024)
        image, face_id = form.get("image"), form.get("face_id")
        try:
            fields = {k: int(v) if v is not None and v != "" else None
                      for k, v in (("face_id", face_id), ("face_index", form.get("face_index")),
                                   ("top_k", form.get("top_k")))}
        except (TypeError, ValueError):
            return _error(422, "face_id, face_index and top_k are whole numbers")
        if (fields["face_id"] is not None and not 1 <= fields["face_id"] <= 2**62) or \
                (fields["face_index"] is not None and not 0 <= fields["face_index"] < 1000) or \
                (fields["top_k"] is not None and not 1 <= fields["top_k"] <= MAX_RESULTS):
            return _error(422, f"face_id >= 1, 0 <= face_index < 1000, 1 <= top_k <= {MAX_RESULTS}")
        if isinstance(image, str) or (image is None) == (fields["face_id"] is None):
            return _error(422, "send either an 'image' file or a 'face_id'")
        if not searches.acquire(blocking=False):
            return _error(503, "the server is busy with other searches: retry shortly", {"Retry-After": "2"})
        try:
            if isinstance(image, UploadFile):
                data = await image.read(upload_limit + 1)
                if len(data) > upload_limit:
                    return _error(413, f"image larger than {upload_limit} bytes")
                data = await in_pool(prepare_query_image, data, cfg.max_query_pixels, cfg.max_decode_pixels)
                q = await in_pool(lambda: library.feedback_search(
                    data, top_k=fields["top_k"], session_id=who.token_id, filename=(image.filename or "")[:200],
                    face_index=fields["face_index"]))
            else:
                q = await in_pool(lambda: library.feedback_search(
                    face_id=fields["face_id"], top_k=fields["top_k"], session_id=who.token_id))
            stored = library.feedback.get_query(q.query_id)
            return SearchOut(query_id=q.query_id, query_face_id=q.query_face_id, bbox=q.bbox, faces=q.faces,
                             face_index=q.face_index, image_size=[int(stored["width"] or 0), int(stored["height"] or 0)],
                             image_url=f"/api/queries/{q.query_id}/image", threshold=library.match_threshold,
                             results=await in_pool(hits, q.results))
        finally:
            searches.release()

    @app.get("/api/queries/{query_id}/results", response_model=list[Hit], responses={404: {}, 409: {}})
    def more_results(query_id: str, offset: int = Query(0, ge=0, lt=MAX_RESULTS),
                     limit: int = Query(12, ge=1, le=50), who: Principal = Depends(viewer)) -> list[Hit]:
        """More results of a recorded query, ``offset`` past the first ones (the query face left out)."""
        own_query(query_id, who)
        return hits(library.more_results(query_id[:64], offset, min(limit, MAX_RESULTS - offset)))

    @app.get("/api/queries/{query_id}/image", response_class=Response, responses={403: {}, 404: {}})
    def query_image(query_id: str, who: Principal = Depends(viewer)) -> Response:
        """The query image (at most 1024 px), to the user who searched it (or an admin)."""
        query = own_query(query_id, who)
        img = load_image(query["image_path"], max_pixels=settings.images.max_pixels)
        return Response(encode_jpeg(img, 1024, "query"), media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/queries/{query_id}/votes", response_model=list[MyVote], responses={404: {}})
    def my_votes(query_id: str, who: Principal = Depends(viewer)) -> list[MyVote]:
        """The caller's votes on a query (the page shows them again after a reload)."""
        own_query(query_id, who)
        return [MyVote(result_id=r["result_face_id"], vote=r["vote"])
                for r in library.feedback.votes(query_id=query_id) if r["voter"] == who.name]

    def searcher_only(query_id: str, who: Principal) -> None:
        """Votes on a query come from its searcher only (who saw its results), admins included."""
        if library.query_searcher(query_id[:64]) != who.token_id:
            raise HTTPException(403, "you can vote only on the results of your own searches")

    @app.post("/api/feedback", response_model=Vote, responses={401: {}, 403: {}, 404: {}, 409: {}, 422: {}, 503: {}})
    def feedback(body: FeedbackIn, who: Principal = Depends(reviewer)) -> Vote:
        """Store a thumbs up/down as the caller, on a search of theirs; voting again on the same result updates the vote."""
        searcher_only(body.query_id, who)
        return library.record_feedback(body.query_id, body.result_id, body.vote, voter=who.name,
                                       session_id=who.token_id)

    @app.delete("/api/feedback/{query_id}/{result_id}", responses={403: {}, 404: {}})
    def clear_vote(query_id: str, result_id: int, who: Principal = Depends(reviewer)) -> dict:
        """Withdraw the caller's vote on one result of a search of theirs (undo); 404 when there was none."""
        searcher_only(query_id, who)
        if not library.clear_feedback(query_id[:64], result_id, who.name):
            raise HTTPException(404, "no vote of yours on this result")
        return {"status": "cleared"}

    @app.get("/api/feedback/stats")
    def stats(_who: Principal = Depends(admin)) -> dict:
        """Counts of queries and votes."""
        return library.feedback_stats()

    # -- faces -------------------------------------------------------------------------------------
    @app.get("/api/faces", response_model=list[FaceOut])
    def faces(limit: int = Query(24, ge=1, le=200), offset: int = Query(0, ge=0, le=10**9),
              _who: Principal = Depends(viewer)) -> list[FaceOut]:
        """Searchable catalog faces with their person, in id order: one page, cut by the store."""
        return [FaceOut(face_id=f, cluster_id=c, thumbnail_url=_thumbnail_url(f))
                for f, c in library.persons.store.face_page(library.model_version, limit, offset)]

    @app.get("/api/faces/{face_id}/thumbnail", response_class=Response, responses={404: {}})
    def thumbnail(face_id: int = PathParam(ge=1, le=2**62),
                  _who: Principal = Depends(guard.role("viewer", limited=False))) -> Response:
        """JPEG thumbnail of a catalog face (by id only: no request names a file), cached on disk.

        Outside the rate limit: a page shows dozens at once, and each is made once, then read from disk.
        """
        try:
            jpeg = thumbnails.get(face_id)
        except ImageLoadError:
            return _error(404, "the image of this face is not readable")
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})

    # -- people ------------------------------------------------------------------------------------
    def person(info) -> PersonOut:
        cover = info.representative_face_id
        return PersonOut(cluster_id=info.cluster_id, name=info.label, size=info.size, cover_face_id=cover,
                         cover_url=_thumbnail_url(cover) if cover else None)

    @app.get("/api/people", response_model=PeopleOut)
    def people(q: str = Query("", max_length=100), offset: int = Query(0, ge=0, le=10**9),
               limit: int = Query(48, ge=1, le=200), _who: Principal = Depends(viewer)) -> PeopleOut:
        """Persons, largest first; ``q`` keeps those whose name contains it (any case) or whose id it is
        (``12``, ``#12``). Found, counted and paged by the store."""
        total, found = library.find_persons(q, limit, offset)
        return PeopleOut(total=total, items=[person(c) for c in found])

    @app.get("/api/people/{cluster_id}", response_model=PersonFacesOut, responses={404: {}})
    def person_faces(cluster_id: int = PathParam(ge=1, le=2**62), offset: int = Query(0, ge=0, le=10**9),
                     limit: int = Query(200, ge=1, le=500), _who: Principal = Depends(viewer)) -> PersonFacesOut:
        """One person with a page of its faces (by face id)."""
        info = library.get_cluster(cluster_id, limit=limit, offset=offset)
        return PersonFacesOut(**person(info).model_dump(), faces=[
            FaceOut(face_id=f, cluster_id=cluster_id, thumbnail_url=_thumbnail_url(f)) for f in info.face_ids])

    def changed(infos: list, change_id: int | None = None) -> ChangeOut:
        return ChangeOut(change_id=change_id if change_id is not None else infos[0].change_id,
                         persons=[person(i) for i in infos])

    @app.post("/api/people/{cluster_id}/rename", response_model=ChangeOut, responses={404: {}, 422: {}})
    def rename(body: RenameIn, cluster_id: int = PathParam(ge=1, le=2**62),
               who: Principal = Depends(reviewer)) -> ChangeOut:
        """Name a person (an empty name clears it); 422 for control or text-direction characters, or over 200."""
        return changed([library.rename(cluster_id, body.name, actor=who.name)])

    @app.post("/api/people/merge", response_model=ChangeOut, responses={404: {}, 409: {}})
    def merge(body: MergeIn, who: Principal = Depends(reviewer)) -> ChangeOut:
        """Merge persons into the largest of them (its id and, failing that, the first name are kept)."""
        return changed([library.merge(body.cluster_ids, actor=who.name)])

    @app.post("/api/people/{cluster_id}/move", response_model=ChangeOut, responses={404: {}, 409: {}, 422: {}})
    def move(body: FacesIn, cluster_id: int = PathParam(ge=1, le=2**62),
             who: Principal = Depends(reviewer)) -> ChangeOut | JSONResponse:
        """Move faces of this person to person ``to``: one write; 409 unless they all still are this person's."""
        if body.to is None:
            return _error(422, "say which person receives the faces: 'to'")
        target = library.move_faces(body.face_ids, body.to, from_cluster=cluster_id, actor=who.name)
        try:
            left = [library.get_cluster(cluster_id, limit=0)]
        except ClusterNotFoundError:
            left = []  # every face moved out: the person is gone
        return changed([target, *left], target.change_id)

    @app.post("/api/people/{cluster_id}/split", response_model=ChangeOut, responses={404: {}, 409: {}})
    def split(body: FacesIn, cluster_id: int = PathParam(ge=1, le=2**62),
              who: Principal = Depends(reviewer)) -> ChangeOut:
        """Make the chosen faces a new person (no name); the rest keep this person's id and name."""
        return changed(library.split(cluster_id, body.face_ids, actor=who.name))

    @app.get("/api/audit", response_model=list[ChangeEntry])
    def audit_log(limit: int = Query(20, ge=1, le=1000), before: int | None = Query(None, ge=1, le=2**62),
                  cluster_id: int | None = Query(None, ge=1, le=2**62),
                  _who: Principal = Depends(reviewer)) -> list[dict]:
        """Curation changes, newest first (ids below ``before``), of one person when ``cluster_id`` is given."""
        return library.curation_log(limit, before, cluster_id)

    @app.post("/api/audit/{change_id}/undo", response_model=ChangeOut, responses={409: {}})
    def undo(change_id: int = PathParam(ge=1, le=2**62), who: Principal = Depends(reviewer)) -> ChangeOut:
        """Undo a change as far as later changes left it (the undo is a change too, and can be undone)."""
        entry = library.undo(change_id, actor=who.name)
        infos = []
        for cid in entry["cluster_ids"]:
            try:
                infos.append(library.get_cluster(cid, limit=0))
            except ClusterNotFoundError:
                pass
        return changed(infos, entry["id"])

    @app.get("/api/health")
    def health() -> dict:
        """Liveness (no data: it answers without authentication)."""
        return {"status": "ok"}

    return app


def check_bind(library: FaceRecognitionLibrary, host: str) -> None:
    """Refuse ``web.auth: none`` beyond loopback; warn loudly about it, about no tokens, about Host names.

    Raises:
        ConfigError: ``web.auth`` is ``none`` and ``host`` is not a loopback address.
    """
    cfg = library.settings.web
    if cfg.auth == "none":
        if not is_loopback(host):
            raise ConfigError(f"web.auth 'none' serves loopback addresses only, not {host}: "
                              "create tokens (face-assets token create) and set web.auth: tokens")
        logger.warning("AUTHENTICATION IS OFF (web.auth: none): anyone on this machine can search, vote and "
                       "curate as 'local'. Loopback only.")
    elif not TokenStore(library.settings.layout.tokens).list():
        logger.warning("no API tokens yet: create one with 'face-assets token create NAME --role reviewer'")
    if not is_loopback(host) and set(cfg.allowed_hosts) <= {"127.0.0.1", "localhost"}:
        logger.warning("serving %s but web.allowed_hosts names loopback only: add the name clients use", host)


def serve(library: FaceRecognitionLibrary, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the app with uvicorn until interrupted (one worker: the catalog has one writer); see :func:`check_bind`."""
    import uvicorn

    check_bind(library, host)
    uvicorn.run(create_app(library), host=host, port=port, log_level="info", workers=1)
