"""The Serve application of `segrl serve` and the Serve config file that deploys it.

``build_app(args)`` is the application builder a Serve config names
(``import_path: pipelines.serve.app:build_app``): its ``args`` hold the resolved segrl config.
``serve_config(config, model_dir, version)`` writes that Serve config (a ``ServeDeploySchema``:
HTTP options, the three deployments' replicas or autoscaling, queue bounds, resources and
``user_config``), so `serve deploy` or a KubeRay RayService can take the same file.

Why a config and not ``serve.run(app)``: a Python-built application gets a new code version on
every ``serve.run``, so changing its ``user_config`` restarts every replica; a config-built one
keeps its code version (import path and runtime env), so a new ``user_config`` (the hot swap's
model folder and version) reaches the running replicas through ``reconfigure``, in place.
Deploying a config is what `serve deploy` and `serve run CONFIG` do; segrl does it through the
same client call (Ray 2.60's ``serve._private.api.serve_start`` and ``deploy_apps``).
"""
from __future__ import annotations

import time
from pathlib import Path

from config import Config
from config.paths import FOLDERS

APP_NAME = "segrl"
IMPORT_PATH = "pipelines.serve.app:build_app"
PROXY_SLACK_S = 30.0
"""The proxy's own timeout lies this far beyond serve.request_timeout_s, so the ingress's JSON 408 comes first."""


def absolute_paths(config: Config) -> Config:
    """A copy whose path folders are absolute: replicas do not share the driver's working directory."""
    config = config.model_copy(deep=True)
    for name in FOLDERS:
        setattr(config.paths, name,
                str(Path(config.paths.resolve(name)).resolve()).replace("{", "{{").replace("}", "}}"))
    return config


def build_app(args: dict):
    """Serve's application builder: ``{"config": the resolved segrl config as a dict}``."""
    from pipelines.serve.ingress import Ingress
    from pipelines.serve.policy_deployment import PolicyDeployment
    from pipelines.serve.segment_deployment import SegmentDeployment

    config = Config.model_validate(args["config"])
    s, plain = config.serve, config.model_dump(mode="json")
    policy = PolicyDeployment.options(**policy_options(config), user_config=policy_user_config(config, None, 0))
    segment = SegmentDeployment.options(**s.segment.serve_options(), user_config=weights_user_config(None, 0))
    ingress = Ingress.options(**s.ingress.serve_options(), user_config={"request_timeout_s": s.request_timeout_s})
    return ingress.bind(policy.bind(plain), segment.bind(plain), plain)


def policy_options(config: Config) -> dict:
    """The policy deployment's Serve options; a vLLM generator runs its engine in the replica's process,
    as a rollout worker does (the same environment)."""
    options = config.serve.policy.serve_options()
    if config.serve.policy.generator == "vllm":
        from actors.rollout import ENGINE_ENV

        options["ray_actor_options"]["runtime_env"] = {"env_vars": dict(ENGINE_ENV)}
    return options


def weights_user_config(model_dir: str | None, version: int) -> dict:
    return {"model_dir": model_dir, "version": version}


def policy_user_config(config: Config, model_dir: str | None, version: int) -> dict:
    p = config.serve.policy
    return {**weights_user_config(model_dir, version), "max_batch_size": p.max_batch_size,
            "batch_wait_timeout_s": p.batch_wait_timeout_s}


def _deployment(name: str, options: dict, user_config: dict) -> dict:
    return {"name": name, **options, "user_config": user_config}


def serve_config(config: Config, model_dir: str | None, version: int, timeout_s: float | None = None) -> dict:
    """The Serve config (``ServeDeploySchema`` as a dict) serving ``model_dir`` as ``version``
    (``model_dir`` None: no model yet, requests get 503 until one is deployed). The ingress's
    request timeout (default serve.request_timeout_s) is a user_config too, changed in place."""
    s = config.serve
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": s.host, "port": s.port, "request_timeout_s": s.request_timeout_s + PROXY_SLACK_S},
        "applications": [{
            "name": APP_NAME,
            "route_prefix": "/",
            "import_path": IMPORT_PATH,
            "args": {"config": config.model_dump(mode="json")},
            "deployments": [
                _deployment("ingress", s.ingress.serve_options(),
                            {"request_timeout_s": timeout_s or s.request_timeout_s}),
                _deployment("policy", policy_options(config), policy_user_config(config, model_dir, version)),
                _deployment("segment", s.segment.serve_options(), weights_user_config(model_dir, version))],
        }],
    }


def deploy(serve_cfg: dict, wait_s: float = 600.0) -> None:
    """Apply a Serve config to the connected cluster (starting Serve with its HTTP options when
    needed) and wait until the application runs; a changed ``user_config`` reconfigures in place."""
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(serve_cfg)
    client = serve_api.serve_start(http_options=schema.http_options.model_dump(),
                                   proxy_location=schema.proxy_location)
    client.deploy_apps(schema)
    wait_running(wait_s)


def wait_running(wait_s: float) -> None:
    """Until the application and every deployment in it is healthy; an error naming the status past ``wait_s``."""
    from ray import serve

    deadline, last = time.monotonic() + wait_s, None
    while time.monotonic() < deadline:
        app = serve.status().applications.get(APP_NAME)
        last = app
        if app is not None and app.status == "RUNNING" and all(
                d.status == "HEALTHY" for d in app.deployments.values()):
            return
        if app is not None and app.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"serve application {APP_NAME} is {app.status}: {app.message}")
        time.sleep(0.5)
    raise TimeoutError(f"serve application {APP_NAME} not running after {wait_s:g} s (last status: "
                       f"{getattr(last, 'status', None)})")


def undeploy() -> None:
    """Delete this application only (never Serve or the cluster others use)."""
    from ray import serve

    serve.delete(APP_NAME)
