"""Config rendering for the peers (no processes started)."""

from __future__ import annotations

import re
from pathlib import Path

from harness.peers import BENCH_DIR, render_nginx_conf, restate_config, stepgate_settings


def test_nginx_template_has_every_placeholder_filled() -> None:
    template = (BENCH_DIR / "nginx.conf.template").read_text()
    conf = render_nginx_conf(
        template, prefix=Path("/x/p"), port=1234, upstream_port=5678, workers="1"
    )
    directives = "\n".join(line for line in conf.splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"@[A-Z_]+@", directives)
    assert "listen 127.0.0.1:1234" in conf
    assert "server 127.0.0.1:5678;" in conf
    assert "keepalive 64;" in conf and 'proxy_set_header Connection "";' in conf


def test_stepgate_settings_use_loopback_an_absolute_store_and_full_durability() -> None:
    s = stepgate_settings(
        public_port=1,
        internal_port=2,
        store_path=Path("/abs/s.db"),
        upstream_url="http://127.0.0.1:3",
        durability="full",
        extra={"log_level": "warning"},
    )
    assert s["store"] == "sqlite:////abs/s.db"
    assert s["listen"] == "127.0.0.1:1" and s["internal_listen"] == "127.0.0.1:2"
    assert s["durability"] == "full" and s["log_level"] == "warning"
    durable = {r["name"] for r in s["routes"] if r.get("durable")}
    assert durable == {"steps", "raw", "min", "gate"}


def test_stepgate_settings_take_a_postgresql_store_instead_of_the_file() -> None:
    s = stepgate_settings(
        public_port=1,
        internal_port=2,
        store_path=Path("/abs/s.db"),
        upstream_url="http://127.0.0.1:3",
        durability="full",
        extra={},
        store="postgresql://postgres@127.0.0.1:5432/stepgate_bench_x",
    )
    assert s["store"] == "postgresql://postgres@127.0.0.1:5432/stepgate_bench_x"


def test_restate_config_binds_loopback_only() -> None:
    text = restate_config(Path("/d"), fabric=1, ingress=2, admin=3)
    assert 'bind-ip = "127.0.0.1"' in text and 'listen-mode = "tcp"' in text
    assert "disable-telemetry = true" in text
