"""The viewer's web app (Starlette, served by uvicorn): pages over one run folder, read-only.

Pages: the run (its results table and plots, its sources), the trajectory list (filters, paging), one
trajectory turn by turn, one question across sources (rounds, variants), and the training samples
(the tokens each example put its loss on). URLs carry source keys and list indices, never paths;
anything else is 404.

Bound to 127.0.0.1 it is open to this machine only. Bound elsewhere it wants ``NAT_RAY_API_KEY``, like
the endpoint: a browser cannot send a Bearer header when it opens a page, so ``/login`` takes the key
once and sets an HttpOnly, SameSite=Strict cookie holding an HMAC of it (never the key); scripts may
send ``Authorization: Bearer <key>`` instead.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
from pathlib import Path
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from nat_ray.core import nat_data as col
from nat_ray.errors import ConfigError
from nat_ray.serve.guards import Secret, api_key_from_env, bearer_token
from nat_ray.view import query
from nat_ray.view.runs import RunFolder, open_run

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
KEY_ENV = "NAT_RAY_API_KEY"
COOKIE = "nat_ray_view"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
PAGE_SIZE = 50
TURN_LINE = re.compile(r"^(Thought|Action|Observation|Question)\s*:", re.MULTILINE)


# --------------------------------------------------------------------------------------------
# The key


def session_token(key: Secret) -> str:
    """What the cookie holds: an HMAC of the key, so the cookie never carries the key itself."""
    return hmac.new(key._value, b"nat-ray-view-session", hashlib.sha256).hexdigest()


class KeyGate:
    """ASGI middleware: every path but the login form and the static files needs the key or its cookie."""

    def __init__(self, app, key: Secret) -> None:
        self.app, self.key, self.token = app, key, session_token(key).encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] == "/login" or scope["path"].startswith("/static/"):
            await self.app(scope, receive, send)
            return
        if self.key.matches(bearer_token(scope["headers"])) or self._cookie_ok(scope["headers"]):
            await self.app(scope, receive, send)
            return
        if scope["method"] == "GET":
            target = scope["path"] + (("?" + scope["query_string"].decode()) if scope["query_string"] else "")
            response: Response = RedirectResponse("/login?" + urlencode({"next": target}), status_code=303)
        else:
            response = PlainTextResponse("the viewer wants the key: log in at /login", status_code=401)
        await response(scope, receive, send)

    def _cookie_ok(self, headers) -> bool:
        for name, value in headers:
            if name.lower() == b"cookie":
                for part in value.split(b";"):
                    k, _, v = part.strip().partition(b"=")
                    if k == COOKIE.encode() and hmac.compare_digest(v, self.token):
                        return True
        return False


def _safe_next(target: str | None) -> str:
    """Only a path of this site: never ``//host`` or ``https://...`` (no open redirect)."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


# --------------------------------------------------------------------------------------------
# Shaping rows for the pages


def split_turn(content: str) -> list[tuple[str, str]]:
    """A message's text as ``(kind, text)`` parts: Thought, Action, Observation, Question, or plain."""
    parts: list[tuple[str, str]] = []
    marks = list(TURN_LINE.finditer(content or ""))
    if not marks:
        return [("text", content or "")]
    if marks[0].start() > 0:
        parts.append(("text", content[: marks[0].start()]))
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(content)
        parts.append((m.group(1).lower(), content[m.start() : end].rstrip("\n")))
    return parts


def outcome(row: dict) -> str:
    if row.get(col.CORRECT_ROBUST):
        return "correct"
    return row.get(col.FAILURE_REASON) or "incorrect"


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


def _filters(request: Request) -> query.Filters:
    q = request.query_params
    return query.Filters(
        source=q.get("source") or None,
        task=q.get("task") or None,
        outcome=q.get("outcome") or None,
        reason=q.get("reason") or None,
        turns=_int(q.get("turns")),
        text=(q.get("q") or "").strip() or None,
    )


# --------------------------------------------------------------------------------------------
# The app


def create_app(run: RunFolder, key: Secret | None = None) -> Starlette:
    """The viewer over ``run``; with ``key``, every page wants it (the login form or a Bearer header)."""
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals.update(run=run, outcome=outcome, split_turn=split_turn, login=key is not None)
    templates.env.filters["zip"] = zip

    def render(request: Request, name: str, status: int = 200, **context) -> Response:
        return templates.TemplateResponse(request, name, context, status_code=status)

    def not_found(request: Request, what: str) -> Response:
        return render(request, "missing.html", status=404, what=what)

    async def overview(request: Request) -> Response:
        from markdown_it import MarkdownIt

        results = None
        if run.results is not None:
            # Raw HTML in the file is shown as text, never run: a results table may quote a model's words.
            markdown = MarkdownIt("commonmark", {"html": False}).enable("table")
            results = markdown.render(run.results.read_text(errors="replace"))
        return render(request, "run.html", results=results)

    async def trajectories(request: Request) -> Response:
        filters = _filters(request)
        if filters.source and run.source(filters.source) is None:
            return not_found(request, f"source {filters.source}")
        offset = _int(request.query_params.get("offset")) or 0
        page = query.page(run, filters, offset, PAGE_SIZE)
        menus = query.facets(run.source(filters.source)) if filters.source else _all_facets()
        params = {k: v for k, v in request.query_params.items() if k != "offset" and v}
        return render(
            request, "list.html", page=page, filters=filters, menus=menus, params=params, urlencode=urlencode
        )

    def _all_facets() -> dict:
        merged: dict[str, set] = {"tasks": set(), "reasons": set(), "turns": set()}
        for source in run.sources:
            for key, values in query.facets(source).items():
                merged[key].update(values)
        return {k: sorted(v) for k, v in merged.items()}

    async def trajectory(request: Request) -> Response:
        source = run.source(request.path_params["source"])
        row = query.trajectory(source, request.path_params["tid"]) if source else None
        if row is None:
            return not_found(request, "trajectory")
        lineage = {
            k: row.get(k)
            for k in (
                col.MODEL,
                col.ENGINE,
                col.CONFIG_HASH,
                col.TASK_SOURCE,
                col.TASK_HASH,
                col.TEMPERATURE,
                col.SEED,
            )
        }
        tools = row.get(col.TOOL_VERSIONS)
        if tools:
            try:
                lineage["tools"] = ", ".join(f"{k} {v}" for k, v in json.loads(tools).items())
            except (ValueError, AttributeError):
                lineage["tools"] = tools
        return render(request, "trajectory.html", row=row, source=source, lineage=lineage)

    async def compare(request: Request) -> Response:
        question_id = request.query_params.get("question_id")
        if not question_id:
            return not_found(request, "question (give ?question_id=...)")
        found = query.same_question(run, question_id, request.query_params.get("task") or None)
        if not found:
            return not_found(request, f"question {question_id}")
        return render(request, "compare.html", found=found, question_id=question_id)

    async def examples(request: Request) -> Response:
        samples = []
        for label, path in run.loss_samples:
            try:
                samples.append((label, json.loads(path.read_text())))
            except (OSError, ValueError) as err:
                log.warning("cannot read %s: %s", path, err)
        return render(request, "examples.html", samples=samples)

    async def plot(request: Request) -> Response:
        index = request.path_params["index"]
        if not 0 <= index < len(run.plots):
            return not_found(request, "plot")
        return FileResponse(run.plots[index], media_type="image/png")

    async def login(request: Request) -> Response:
        if key is None:
            return RedirectResponse("/", status_code=303)
        target = _safe_next(request.query_params.get("next"))
        if request.method == "POST":
            form = await request.form()
            target = _safe_next(str(form.get("next") or "/"))
            if key.matches(str(form.get("key") or "").strip().encode("utf-8")):
                response = RedirectResponse(target, status_code=303)
                response.set_cookie(COOKIE, session_token(key), httponly=True, samesite="strict")
                return response
            return render(request, "login.html", status=401, next=target, wrong=True)
        return render(request, "login.html", next=target, wrong=False)

    async def missing(request: Request, exc) -> Response:
        return not_found(request, "page")

    routes = [
        Route("/", overview),
        Route("/trajectories", trajectories),
        Route("/t/{source}/{tid}", trajectory),
        Route("/compare", compare),
        Route("/examples", examples),
        Route("/plots/{index:int}", plot),
        Route("/login", login, methods=["GET", "POST"]),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    middleware = [Middleware(KeyGate, key=key)] if key is not None else []
    return Starlette(routes=routes, middleware=middleware, exception_handlers={404: missing})


def check_bind(host: str, environ=None) -> Secret | None:
    """The key the viewer wants for ``host``: none on this machine's loopback, ``$NAT_RAY_API_KEY`` elsewhere.

    Raises:
        ConfigError: another host without the key set.
    """
    if host in LOOPBACK:
        return None
    key = api_key_from_env(KEY_ENV, environ)
    if key is None:
        raise ConfigError(
            f"--host {host} opens the viewer to other machines: set ${KEY_ENV} (the same key as the endpoint); "
            "the page then asks for it once"
        )
    return key


def run_view(run_dir: str, host: str = "127.0.0.1", port: int = 8600) -> int:
    """``nat-ray view``: serve the page over ``run_dir`` until Ctrl-C. Returns 0."""
    import uvicorn

    key = check_bind(host)
    run = open_run(run_dir)
    log.info(
        "%s (%s): %d sources, %d trajectories; open http://%s:%d/%s",
        run.root,
        run.kind,
        len(run.sources),
        run.rows,
        host if ":" not in host else f"[{host}]",
        port,
        " (log in with the key)" if key else "",
    )
    uvicorn.run(create_app(run, key), host=host, port=port, log_level="warning")
    return 0
