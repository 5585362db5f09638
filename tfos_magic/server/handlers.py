"""The REST API's routes: tiny handlers over `views.JobViews` (docs/server-api.md).

Every method is `@tornado.web.authenticated`, so the server refuses a request without
its token (or, from a browser, without the XSRF cookie and header) before any handler
code runs; every answer, errors included, is JSON.

The views read files, which may be large, slow or planted; they run on a small thread pool
of their own, never on the event loop, so the Jupyter server (its kernels, its other
APIs) keeps answering while a job's metrics are read.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import tornado.web
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado.ioloop import IOLoop

from .views import ApiError, JobViews

API = "tfos/api"
_NAME = r"(?P<name>[^/]+)"
READ_THREADS = 4  # requests the views answer at once; the others wait their turn, off the event loop


class _JobsHandler(APIHandler):
    """Calls the views and sends their answer, or their ApiError as a JSON error."""

    @property
    def views(self) -> JobViews:
        return self.settings["tfos_views"]

    async def answer(self, call: Callable[..., dict[str, Any]], *args: Any, status: int = 200) -> None:
        """Run the view on the API's threads and send its answer."""
        try:
            body = await IOLoop.current().run_in_executor(self.settings["tfos_executor"], _json_of, call, args)
        except ApiError as exc:
            self.fail(exc)
            return
        self.set_status(status)
        self.finish(body)

    def fail(self, error: ApiError) -> None:
        """Written here, not raised as an HTTPError: that one's message goes through
        %-formatting in the server's log, and job messages name `%tfos_...` magics."""
        self.set_status(error.status)
        self.finish(json.dumps({"message": error.message}))


class JobsHandler(_JobsHandler):
    @tornado.web.authenticated
    async def get(self) -> None:
        await self.answer(self.views.jobs)


class JobHandler(_JobsHandler):
    @tornado.web.authenticated
    async def get(self, name: str) -> None:
        await self.answer(self.views.job, name)


class EventsHandler(_JobsHandler):
    @tornado.web.authenticated
    async def get(self, name: str) -> None:
        await self.answer(self.views.events, name, self.get_query_argument("offset", None, strip=False))


class StopHandler(_JobsHandler):
    @tornado.web.authenticated
    async def post(self, name: str) -> None:
        await self.answer(self.views.stop, name, status=202)


class NotFoundHandler(_JobsHandler):
    """Any other path under the API: a JSON 404, not the server's HTML page."""

    def _missing(self, *args: Any) -> None:
        self.fail(ApiError(404, f"No such tfos API endpoint: {self.request.path}"))

    get = tornado.web.authenticated(_missing)
    post = tornado.web.authenticated(_missing)
    put = tornado.web.authenticated(_missing)
    delete = tornado.web.authenticated(_missing)


def _json_of(call: Callable[..., dict[str, Any]], args: tuple[Any, ...]) -> str:
    """The view's answer as JSON, made on the API's threads too (an events answer is up to
    a few MiB)."""
    return to_json(call(*args))


def to_json(body: Any) -> str:
    """`body` as JSON that a browser's JSON.parse takes: Python writes NaN and Infinity,
    which are no JSON, so any non-finite number (from a state.json edited by hand, or a
    product that overflowed) goes out as null."""
    try:
        return json.dumps(body, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(body), allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def setup_handlers(web_app: tornado.web.Application, views: JobViews) -> None:
    """Route the API under the server's base_url."""
    web_app.settings["tfos_views"] = views
    web_app.settings["tfos_executor"] = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="tfos-api")
    base = url_path_join(web_app.settings["base_url"], API)
    web_app.add_handlers(".*$", [
        (url_path_join(base, "jobs") + "/?", JobsHandler),
        (url_path_join(base, "jobs", _NAME) + "/?", JobHandler),
        (url_path_join(base, "jobs", _NAME, "events") + "/?", EventsHandler),
        (url_path_join(base, "jobs", _NAME, "stop") + "/?", StopHandler),
        (base + "(?:/.*)?", NotFoundHandler),
    ])
