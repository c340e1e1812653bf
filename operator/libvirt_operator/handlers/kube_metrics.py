"""client-go's rest_client_* metrics for kopf's own Kubernetes API requests (watches, its patches of
finalizers and progress annotations, Events), next to the operator's client (adapters.kube).

kopf accepts a ready-made aiohttp session from a login handler (`kopf.AiohttpSession`, "custom HTTP
sessions" in its docs); this one returns the usual credentials (handlers.startup.login) in a session
built the way kopf builds its own, plus an aiohttp TraceConfig that times every request. It has a
higher priority than the plain credentials, so kopf uses it. A watch counts when its response
headers arrive (as client-go measures it), not when the stream ends.
"""

from __future__ import annotations

import time
import warnings
from types import SimpleNamespace
from typing import Any

import aiohttp
import kopf

from ..core.metrics import REST_CLIENT_REQUESTS, REST_CLIENT_SECONDS
from .startup import login


def _host(url: Any) -> str:
    return f"{url.host}:{url.port}" if url.port else str(url.host)


async def _start(_: aiohttp.ClientSession, ctx: SimpleNamespace, __: aiohttp.TraceRequestStartParams) -> None:
    ctx.started = time.perf_counter()


async def _end(_: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestEndParams) -> None:
    _observe(ctx, params.method, params.url, str(params.response.status))


async def _failed(_: aiohttp.ClientSession, ctx: SimpleNamespace,
                  params: aiohttp.TraceRequestExceptionParams) -> None:
    _observe(ctx, params.method, params.url, "<error>")


def _observe(ctx: SimpleNamespace, method: str, url: Any, code: str) -> None:
    started = getattr(ctx, "started", None)
    if started is None:
        return
    verb, host = method.upper(), _host(url)
    REST_CLIENT_SECONDS.labels(verb, host).observe(time.perf_counter() - started)
    REST_CLIENT_REQUESTS.labels(code, verb, host).inc()


def trace_config() -> aiohttp.TraceConfig:
    config = aiohttp.TraceConfig()
    config.on_request_start.append(_start)
    config.on_request_end.append(_end)
    config.on_request_exception.append(_failed)
    return config


@kopf.on.login(id="metered")
async def metered_login(**kwargs: Any) -> kopf.AiohttpSession | None:
    info = login(**kwargs)
    if info is None:
        return None
    with warnings.catch_warnings():  # as kopf does: its own deprecation of basic auth helpers
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="kopf")
        auth = info.as_aiohttp_basic_auth()
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ssl=info.as_ssl_context()),
        headers=info.as_http_headers(), auth=auth, proxy=info.proxy_url, trust_env=info.trust_env,
        trace_configs=[trace_config()])
    return kopf.AiohttpSession(aiohttp_session=session, server=info.server, default_namespace=info.default_namespace,
                               expiration=info.expiration, priority=info.priority + 1)
