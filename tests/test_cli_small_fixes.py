"""Issue 12, reproduction 9's smaller ones: clear errors instead of tracebacks, a rotated log
file, `site init` all or nothing, enrollment that leaves a shared directory's mode alone,
`switch add-site` only for site directories, DOT that names cannot break."""

from __future__ import annotations

import html
import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from meshpos.cli.more import LOG_BACKUPS, LOG_MAX_BYTES, open_log_file
from meshpos.domain.errors import ConfigError, InputError
from meshpos.status.meshview import Known, MeshView, analyze, to_dot
from meshpos.wire.status import StatusBody
from meshpos.apps.procs import ProcessGroup
from meshpos.site.sitedir import init_site

from helpers import fill_disk, run_cli


def _clean_error(proc: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    for word in words:
        assert word in proc.stderr, (word, proc.stderr)


@pytest.fixture
def node(tmp_path: Path) -> Path:
    run_cli("site", "init", str(tmp_path / "site"), "--name", "Sagra", check=True)
    run_cli("enroll", str(tmp_path / "site"), str(tmp_path / "t1"), "--role", "terminal", "--name", "T1",
            check=True)
    return tmp_path / "t1"


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessGroup]:
    group = ProcessGroup(tmp_path / "logs")
    yield group
    group.stop_all()


# -- --log-file ------------------------------------------------------------------------------

def test_run_with_a_log_file_in_a_missing_directory_is_a_clear_error(node: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing" / "dir" / "x.log"
    _clean_error(run_cli("run", str(node), "--log-file", str(missing), "--no-mdns"), ConfigError.exit_code,
                 str(missing), "cannot open the log file", "No such file or directory")


def test_run_writes_its_log_file(node: Path, tmp_path: Path, procs: ProcessGroup) -> None:
    log = tmp_path / "node.log"
    procs.start_node("t1", node, "--no-mdns", "--log-file", str(log))
    run_cli("sell", str(node), "--amount", "1", "--cash", check=True)
    procs.stop("t1")
    assert "running" in log.read_text()


def test_log_file_rotates_at_its_documented_size(tmp_path: Path) -> None:
    path = tmp_path / "node.log"
    handler = open_log_file(path)
    logger = logging.getLogger("test.rotation")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        line = "x" * 1000
        for _ in range((LOG_BACKUPS + 2) * LOG_MAX_BYTES // 1000):
            logger.warning(line)
    finally:
        logger.removeHandler(handler)
        handler.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["node.log"] + [f"node.log.{i}" for i in range(1, LOG_BACKUPS + 1)]
    assert all((tmp_path / f).stat().st_size <= LOG_MAX_BYTES for f in files)


# -- report --csv ----------------------------------------------------------------------------

def test_report_csv_into_a_missing_directory_is_a_clear_error(node: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing" / "x.csv"
    _clean_error(run_cli("report", str(node), "--csv", str(missing)), ConfigError.exit_code, str(missing),
                 "cannot write the CSV report")
    assert run_cli("report", str(node), "--csv", str(tmp_path / "ok.csv"), check=True).returncode == 0


# -- site init: all or nothing -----------------------------------------------------------------

@pytest.mark.parametrize("bad, code, message", [
    (["--max-sale", "abc"], InputError.exit_code, "not a number"),
    (["--max-site-pending", "1.234"], InputError.exit_code, "decimal places"),
    (["--offline-window", "0"], InputError.exit_code, "--offline-window"),
    (["--currency", "XYZ"], InputError.exit_code, "unknown currency"),
    (["--switch-url", "http://plain"], InputError.exit_code, "https://"),
    (["--switch-key", "/nonexistent/switch.pub"], ConfigError.exit_code, "switch key file is missing"),
    (["--dashboard-password", "-"], InputError.exit_code, "no password on standard input"),
])
def test_site_init_with_a_bad_option_leaves_nothing(tmp_path: Path, bad: list[str], code: int,
                                                    message: str) -> None:
    target = tmp_path / "sites" / "new"
    _clean_error(run_cli("site", "init", str(target), "--name", "X", *bad), code, message)
    assert not target.exists()
    assert not (tmp_path / "sites").exists() or list((tmp_path / "sites").iterdir()) == []


def test_site_init_with_limits_puts_them_in_the_first_policy(tmp_path: Path) -> None:
    run_cli("site", "init", str(tmp_path / "s"), "--name", "X", "--max-sale", "20", "--offline-window", "2",
            check=True)
    from meshpos.site.sitedir import load_site
    policy = load_site(tmp_path / "s").policy
    assert (policy.version, policy.max_sale_minor, policy.offline_window_s) == (1, 2000, 7200)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no work directory left beside it


def test_site_init_on_a_full_disk_leaves_no_half_made_directory(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = Path(tempfile.mkdtemp(dir=tmp_path))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        fill_disk(mnt / "ballast")
        with pytest.raises(ConfigError, match="cannot create the site directory"):
            init_site(mnt / "site", "Full")
        assert sorted(p.name for p in mnt.iterdir()) == ["ballast"]
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# -- enroll keeps a shared directory's mode ---------------------------------------------------

def test_enroll_into_an_existing_directory_keeps_its_mode(tmp_path: Path) -> None:
    run_cli("site", "init", str(tmp_path / "site"), "--name", "Sagra", check=True)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    run_cli("enroll", str(tmp_path / "site"), str(shared), "--role", "terminal", "--name", "T", check=True)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755
    assert stat.S_IMODE((shared / "node.key").stat().st_mode) == 0o600
    run_cli("enroll", str(tmp_path / "site"), str(tmp_path / "fresh"), "--role", "terminal", "--name", "F",
            check=True)
    assert stat.S_IMODE((tmp_path / "fresh").stat().st_mode) == 0o700


# -- switch add-site ------------------------------------------------------------------------------

def test_switch_add_site_refuses_what_is_not_a_site_directory(tmp_path: Path, node: Path) -> None:
    run_cli("switch", "init", str(tmp_path / "sw"), "--listen", "127.0.0.1:0", "--acquirer", "127.0.0.1:9",
            check=True)
    run_cli("site", "set-switch", str(tmp_path / "site"), "--switch-key", str(tmp_path / "sw" / "switch.pub"),
            "--switch-url", "https://127.0.0.1:9", check=True)
    _clean_error(run_cli("switch", "add-site", str(tmp_path / "sw"), str(node)), ConfigError.exit_code,
                 "node directory, not a site directory")
    copy = tmp_path / "loose"
    copy.mkdir()
    for name in ("ca.pem", "policy.env"):
        shutil.copy(tmp_path / "site" / name, copy / name)
    _clean_error(run_cli("switch", "add-site", str(tmp_path / "sw"), str(copy)), ConfigError.exit_code,
                 "site.json")
    assert "registered" in run_cli("switch", "add-site", str(tmp_path / "sw"), str(tmp_path / "site"),
                                   check=True).stdout


# -- inspect --graph --------------------------------------------------------------------------------

NOW = 10_000_000_000
NASTY = ['a"b\\nc', "<b>{x}</b>", "back\\", "new\nline", '"; x -- y; "', "\\N\\G"]


def _view() -> MeshView:
    """The view of a terminal per nasty name, each linked to a gateway that is unreachable."""
    statuses = {f"t{i}": StatusBody.from_json({"at": NOW, "links": [{"node": "gw"}], "pending": {"count": 1}})
                for i in range(len(NASTY))}
    known = {f"t{i}": Known(name=name, role="terminal", linked=True, rtt_ms=3) for i, name in enumerate(NASTY)}
    known["gw"] = Known(name="gw", role="gateway")
    statuses["gw"] = StatusBody.from_json({"at": NOW - 3_600_000, "links": [{"node": f"t{i}"} for i in range(len(NASTY))]})
    view = analyze(statuses, known, now_ms=NOW, offline_window_ms=86_400_000, warn_before_ms=3_600_000)
    view.edges = [[n, "gw"] for n in NASTY]  # every terminal's link to the gateway drawn
    return view


def _dot_strings(text: str) -> list[str]:
    """The double-quoted strings of a DOT text, unescaped as Graphviz's lexer does (\\" only)."""
    out = []
    for m in re.finditer(r'"((?:[^"\\]|\\.)*)"', text, re.S):
        out.append(m.group(1).replace('\\"', '"'))
    return out


def test_dot_escapes_names_in_labels_and_ids() -> None:
    dot = to_dot(_view())
    ids = [s for s in _dot_strings(dot) if s not in ("rounded", "rounded,dashed")]
    # outside the quoted strings, only the graph's own syntax: no name leaked out of its quotes
    skeleton = re.sub(r'"((?:[^"\\]|\\.)*)"', '""', dot, flags=re.S)
    assert "x -- y" not in skeleton and "<b>" not in skeleton and "\nline" not in skeleton
    assert skeleton.count("--") == len(NASTY)
    # each name is there as a quoted string, its backslashes doubled (Graphviz shows them literally)
    for name in NASTY:
        shown = name.replace("\\", "\\\\").replace("\n", "\\\\n")
        assert shown in ids, (name, ids)
    if shutil.which("dot") is not None:  # CI installs graphviz; the parse above stands alone otherwise
        proc = subprocess.run(["dot", "-Tsvg"], input=dot, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        texts = [html.unescape(t) for t in re.findall(r"<text[^>]*>([^<]*)</text>", proc.stdout)]
        for name in NASTY:  # each name drawn as it is, on one line (a newline shown as \n)
            assert name.replace("\n", "\\n") in texts, (name, texts)
        assert texts.count("terminal, pending 1") == len(NASTY)
