"""The REST API's routes: tiny handlers over `views.JobViews` (docs/server-api.md).

Every method is `@tornado.web.authenticated`, so the server refuses a request without
its token (or, from a browser, without the XSRF cookie and header) before any handler
code runs; every answer, errors included, is JSON.
"""

from __future__ import annotations

import json
from typing import Any

import tornado.web
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join

from .views import ApiError, JobViews

API = "tfos/api"
_NAME = r"(?P<name>[^/]+)"


class _JobsHandler(APIHandler):
    """Calls the views and sends their answer, or their ApiError as a JSON error."""

    @property
    def views(self) -> JobViews:
        return self.settings["tfos_views"]

    def answer(self, call: Any, *args: Any, status: int = 200) -> None:
        try:
            body = call(*args)
        except ApiError as exc:
            self.fail(exc)
            return
        self.set_status(status)
        self.finish(json.dumps(body))

    def fail(self, error: ApiError) -> None:
        """Written here, not raised as an HTTPError: that one's message goes through
        %-formatting in the server's log, and job messages name `%tfos_...` magics."""
        self.set_status(error.status)
        self.finish(json.dumps({"message": error.message}))


class JobsHandler(_JobsHandler):
    @tornado.web.authenticated
    def get(self) -> None:
        self.answer(self.views.jobs)


class JobHandler(_JobsHandler):
    @tornado.web.authenticated
    def get(self, name: str) -> None:
        self.answer(self.views.job, name)


class EventsHandler(_JobsHandler):
    @tornado.web.authenticated
    def get(self, name: str) -> None:
        self.answer(self.views.events, name, self.get_query_argument("offset", None))


class StopHandler(_JobsHandler):
    @tornado.web.authenticated
    def post(self, name: str) -> None:
        self.answer(self.views.stop, name, status=202)


class NotFoundHandler(_JobsHandler):
    """Any other path under the API: a JSON 404, not the server's HTML page."""

    def _missing(self, *args: Any) -> None:
        self.fail(ApiError(404, f"No such tfos API endpoint: {self.request.path}"))

    get = tornado.web.authenticated(_missing)
    post = tornado.web.authenticated(_missing)
    put = tornado.web.authenticated(_missing)
    delete = tornado.web.authenticated(_missing)


def setup_handlers(web_app: tornado.web.Application, views: JobViews) -> None:
    """Route the API under the server's base_url."""
    web_app.settings["tfos_views"] = views
    base = url_path_join(web_app.settings["base_url"], API)
    web_app.add_handlers(".*$", [
        (url_path_join(base, "jobs") + "/?", JobsHandler),
        (url_path_join(base, "jobs", _NAME) + "/?", JobHandler),
        (url_path_join(base, "jobs", _NAME, "events") + "/?", EventsHandler),
        (url_path_join(base, "jobs", _NAME, "stop") + "/?", StopHandler),
        (base + "(?:/.*)?", NotFoundHandler),
    ])
