"""Log records reach the output whole: one write() a record, its newline included.

The daemon, the launcher running its command and the command itself share one output (the
test's log file, the journal's stream socket). A record written in two pieces (structlog's
PrintLogger prints the text, then the newline) lets another process's record land between
them, and a reader of JSON lines loses that one (it failed a launcher test under ASan).
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

RECORDER = """
import json, sys
from acrn_hsm_emu import logs

class Recorder:
    def __init__(self): self.writes = []
    def write(self, s): self.writes.append(s); return len(s)
    def flush(self): pass
    def isatty(self): return False

out = Recorder()
logs.configure("json", "info", out)
import logging, structlog
structlog.get_logger("a").info("test.structlog_record", n=1)
logging.getLogger("b").warning("a library's record")
logs.LibraryLogger("c").info("test.library_record")
sys.stdout.write(json.dumps(out.writes))
"""

WRITER = """
import sys
from acrn_hsm_emu import logs
import structlog
logs.configure("json", "info")
log = structlog.get_logger()
for i in range({n}):
    log.info("test.line", writer=sys.argv[1], i=i, pad="x" * 200)
"""


def test_each_record_is_one_write_ending_in_a_newline():
    p = subprocess.run([sys.executable, "-c", RECORDER], capture_output=True, text=True, cwd=REPO, check=True)
    writes = json.loads(p.stdout)
    assert len(writes) == 3, writes
    for w in writes:
        assert w.endswith("\n") and w.count("\n") == 1, writes
    records = [json.loads(w) for w in writes]
    assert [r["event"] for r in records] == ["test.structlog_record", "a library's record", "test.library_record"]


def test_two_processes_sharing_an_output_never_mix_records(tmp_path):
    """As a daemon and its launcher do: every line of the shared file is one whole record."""
    n = 3000
    path = tmp_path / "shared.log"
    with open(path, "ab") as f:
        procs = [subprocess.Popen([sys.executable, "-c", WRITER.format(n=n), w], stderr=f, cwd=REPO) for w in "ab"]
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # a mixed line fails to parse
    for w in "ab":
        assert [r["i"] for r in records if r["writer"] == w] == list(range(n))
