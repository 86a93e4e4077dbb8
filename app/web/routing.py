"""`DirectRoute`: the hot routes' route class, and the access rule as every route applies it.

The callbacks and the single-message lookup are registered in the app's router like every
other route, so they get the app's middleware, exception handlers and OpenAPI entry. What
they skip is FastAPI's per-request dependency solving and parameter validation, which cost
more than their own work (a callback under a campaign's burst; measured: FastAPI's full
handling halved the lookup's rate). Their endpoints take the `Request` and the path
parameters as strings and validate what they read themselves.

The route's own `dependencies` (the API's access rule on the /api router) still apply:
each is called with the request, through `app.dependency_overrides` like any FastAPI
dependency, so overriding the access dependency changes every /api route alike.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from functools import lru_cache
from typing import Any

from fastapi import APIRouter, Request
from fastapi import Depends as depends
from fastapi.params import Depends
from fastapi.routing import APIRoute
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.web.schemas import API_ERROR_RESPONSES
from app.web.security import require_api_access

Endpoint = Callable[..., Awaitable[Response]]


async def call_dependencies(request: Request, dependencies: Sequence[Depends]) -> None:
    """Run request-only dependencies (such as the access rule), honouring overrides."""
    overrides: dict[Any, Any] = getattr(request.app, "dependency_overrides", {})
    for dep in dependencies:
        if dep.dependency is None:
            continue
        fn = overrides.get(dep.dependency, dep.dependency)
        result = fn(request) if _takes_argument(fn) else fn()
        if inspect.isawaitable(result):
            await result


@lru_cache(maxsize=256)
def _takes_argument(fn: Callable[..., Any]) -> bool:
    # Cached: inspecting a signature cost more than the lookup it guards.
    return any(p.default is inspect.Parameter.empty and p.kind in (
        inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        for p in inspect.signature(fn).parameters.values())


class DirectRoute(APIRoute):
    """An APIRoute whose endpoint is called as `endpoint(request, **path_params)`.

    Its ASGI app is the bare request-response cycle: no exit stacks for dependencies with
    `yield` (it solves none) and no exception wrapper of its own. An exception goes up to the
    app's ExceptionMiddleware and error handlers like any other route's (profiled: the three
    wrappers cost a callback about a tenth of its time in the event loop).
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        handler = self.get_route_handler()

        async def serve(scope: Scope, receive: Receive, send: Send) -> None:
            response = await handler(Request(scope, receive, send))
            await response(scope, receive, send)

        self.app = serve

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint: Endpoint = self.endpoint
        dependencies = list(self.dependencies)

        async def handler(request: Request) -> Response:
            if dependencies:
                await call_dependencies(request, dependencies)
            return await endpoint(request, **request.path_params)

        return handler


def api_router(*, tags: list[str]) -> APIRouter:
    """A router for /api/v1 routes: the access rule on every route, and the errors any of them
    may answer in the schema."""
    return APIRouter(prefix="/api/v1", tags=tags,  # type: ignore[arg-type]
                     dependencies=[depends(require_api_access)], responses=API_ERROR_RESPONSES)
