"""flowd.units: sizes and durations, read (workflow files, flowd.toml) and written
(flowctl's tables, log lines, task messages, fix hints). Stdlib only, no Docker."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from flowd import units

MiB = 1024 * 1024
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sizes_for_columns_keep_one_decimal():
    assert units.size(512) == "512 B"
    assert units.size(0) == "0 B"
    assert units.size(3 * MiB) == "3.0 MiB"
    assert units.size(1536) == "1.5 KiB"
    assert units.size(5 * 1024**5) == "5120.0 TiB"  # TiB is the largest unit


def test_sizes_of_a_limit_drop_the_point_zero():
    # a task's message: "killed: out of memory (limit 64 MiB)" (docs/format.md)
    assert units.size(64 * MiB, trim=True) == "64 MiB"
    assert units.size(1536, trim=True) == "1.5 KiB"
    assert units.size(100, trim=True) == "100 B"
    assert units.size(10, trim=True, byte_unit="bytes") == "10 bytes"
    assert units.size(1024**3, trim=True, byte_unit="bytes") == "1 GiB"


def test_sizes_in_a_fixed_unit():
    # the daemon's disk messages speak MiB whatever the amount
    assert units.size(0, unit="MiB") == "0.0 MiB"
    assert units.size(3 * 1024**3, unit="MiB") == "3072.0 MiB"
    assert units.size(MiB + MiB // 2, unit="MiB") == "1.5 MiB"


def test_durations_for_elapsed_times_round_to_two_units():
    assert units.duration(5.25) == "5.2s"
    assert units.duration(0) == "0.0s"
    assert units.duration(42) == "42s"
    assert units.duration(125) == "2m05s"
    assert units.duration(3 * 3600 + 60) == "3h01m"
    assert units.duration(3600 + 1) == "1h00m"
    assert units.duration(86400 + 2 * 3600) == "1d02h"


def test_durations_of_a_limit_are_exact():
    # a task's message: "timed out after 30s" (docs/flowctl.md)
    assert units.duration(30, exact=True) == "30s"
    assert units.duration(1.5, exact=True) == "1.5s"
    assert units.duration(90, exact=True) == "1m30s"
    assert units.duration(7200, exact=True) == "2h"
    assert units.duration(3601, exact=True) == "1h1s"


@pytest.mark.parametrize("text, n", [
    ("256m", 256 * MiB), ("1g", 1024**3), ("512k", 512 * 1024), ("1GiB", 1024**3),
    ("1.5m", 3 * MiB // 2), ("4096", 4096), (" 2 MB ", 2 * MiB), ("1t", 1024**4),
])
def test_parse_size(text, n):
    assert units.parse_size(text) == n


@pytest.mark.parametrize("text, seconds", [
    ("90s", 90), ("5m", 300), ("2h", 7200), ("1.5h", 5400), ("250ms", 0.25), ("1d", 86400),
    ("30", 30),
])
def test_parse_duration(text, seconds):
    assert units.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "m", "1x", "-1m", "1 2", "1e3"])
def test_a_bad_size_or_duration_says_what_to_write(bad):
    with pytest.raises(ValueError, match="write e.g. 256m or 1g"):
        units.parse_size(bad)
    with pytest.raises(ValueError, match="write e.g. 90s, 5m or 2h"):
        units.parse_duration(bad)


@pytest.mark.parametrize("size, duration", [("0", "0"), ("0m", "0s"), ("0.0g", "0.0h")])
def test_zero_is_refused(size, duration):
    with pytest.raises(ValueError, match="must be more than zero"):
        units.parse_size(size)
    with pytest.raises(ValueError, match="must be more than zero"):
        units.parse_duration(duration)


def test_spelled_values_read_back_as_written():
    assert units.spell_size(256 * MiB) == "256m"
    assert units.spell_size(1024**3) == "1g"
    assert units.spell_size(3 * 1024) == "3k"
    assert units.spell_size(1000) == "1000"
    assert units.spell_duration(7200) == "2h"
    assert units.spell_duration(300) == "5m"
    assert units.spell_duration(90) == "90s"
    assert units.spell_duration(0.25) == "250ms"
    assert units.spell_duration(1.5) == "1.5s"
    for n in (1, 1000, 6 * MiB, 256 * MiB, 3 * 1024**3 + 1, 1024**4):
        assert units.parse_size(units.spell_size(n)) == n
    for s in (0.25, 1, 1.5, 59, 60, 90, 3600, 5400, 86400):
        assert units.parse_duration(units.spell_duration(s)) == pytest.approx(s)


@pytest.mark.parametrize("size", ["256m", "1g", "512MiB", "1.5G", "64M"])
def test_a_size_means_the_same_bytes_in_a_workflows_memory_and_in_the_config(tmp_path, size):
    from flowd import config
    from flowd.parser import load_workflow

    wf, _ = load_workflow(_memory_workflow(tmp_path, size))
    conf = tmp_path / "flowd.toml"
    conf.write_text(f'max_memory = "{size}"\ndefault_memory = "{size}"\n')
    cfg = config.load(str(conf), required=True)
    assert wf.processes["p"].memory == cfg.max_memory == cfg.default_memory == units.parse_size(size)


@pytest.mark.parametrize("size", ["12 parsecs", "lots", "-5m"])
def test_a_bad_size_is_an_error_in_a_workflows_memory_and_in_the_config_alike(tmp_path, size):
    from flowd import config
    from flowd.errors import UsageError, WorkflowError
    from flowd.parser import load_workflow

    with pytest.raises(WorkflowError) as bad_wf:
        load_workflow(_memory_workflow(tmp_path, size))
    assert 'attribute "memory" is' in str(bad_wf.value) and size in str(bad_wf.value)
    conf = tmp_path / "flowd.toml"
    conf.write_text(f'max_memory = "{size}"\n')
    with pytest.raises(UsageError) as bad_conf:
        config.load(str(conf), required=True)
    assert "max_memory" in str(bad_conf.value) and size in str(bad_conf.value)


def _memory_workflow(tmp_path, size: str) -> str:
    path = tmp_path / "workflow.xml"
    path.write_text(f"""<workflow name="w">
  <channel name="a"><item>x</item></channel>
  <process name="p" image="flowd/busybox" memory="{size}">
    <input channel="a"/>
    <script>true</script>
  </process>
</workflow>
""")
    return str(path)


def test_the_checksum_warning_is_logged_once(tmp_path):
    # A file flowd cannot stamp (here a symlink: Linux allows no user extended
    # attributes on one) is logged once per process, not once per item.
    os.symlink("nowhere", tmp_path / "link")
    code = (
        "import logging, sys\n"
        "logging.basicConfig(stream=sys.stdout, format='%(levelname)s %(message)s')\n"
        "from flowd import checksum\n"
        f"for _ in range(3): checksum.stamp({str(tmp_path / 'link')!r}, checksum.Summer())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT}, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("WARNING cannot record an item checksum"), lines
