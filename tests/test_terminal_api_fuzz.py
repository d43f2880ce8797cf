"""A property-based run of the whole terminal API from its OpenAPI document (schemathesis)
against a real node process: no 5xx, no response that breaks the document (schema, content type,
documented status codes), in its example, coverage, fuzzing and stateful phases.

``GET /v1/events`` is left out of this run: it is an endless Server-Sent Events stream, which
a request/response fuzzer can only time out on; tests/test_terminal_api.py covers it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from api_harness import ROOT, make_site, start
from meshpos.apps.procs import ProcessGroup
from meshpos.node import client

pytestmark = pytest.mark.slow


def test_schemathesis_finds_no_server_error_and_no_schema_violation(tmp_path: Path) -> None:
    make_site(tmp_path, "t1")
    node = tmp_path / "t1"
    group = ProcessGroup(tmp_path / "logs")
    try:
        start(group, "t1", node)
        url = client.running(node).status()["api"]["url"].removesuffix("/v1/")
        # the token reaches schemathesis through the environment, not its command line
        config = tmp_path / "schemathesis.toml"
        config.write_text('headers = { Authorization = "Bearer ${MESHPOS_API_TOKEN}" }\n')
        env = {**os.environ, "MESHPOS_API_TOKEN": (node / "api-token").read_text().strip()}
        proc = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
             str(ROOT / "protocols" / "terminal-api.yaml"), "--url", url, "--exclude-path", "/v1/events",
             "--checks", "not_a_server_error,response_schema_conformance,content_type_conformance,"
                         "status_code_conformance",
             "--max-examples", "30", "--seed", "20261202", "--request-timeout", "20", "--no-color"],
            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
        assert "passed" in proc.stdout
        # not vacuous: the run was authenticated and made sales
        assert client.running(node).status()["sales"]["own"] > 0
    finally:
        group.stop_all()
