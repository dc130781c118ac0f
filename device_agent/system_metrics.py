"""System telemetry read straight from /proc and /sys: no psutil on the device.

Every reading is best effort: a file that is missing or unreadable (not Linux, a container
without /sys, a board without a thermal zone) leaves its metric out instead of failing the
telemetry message. Names carry their unit; docs/protocol.md (section 4.4) lists them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# What the controller accepts as a metric name (edgefl.controller.telemetry_forward checks the
# same rule): a letter or underscore, then letters, digits and underscores, 64 at most.
METRIC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
# Thermal zone types that measure the SoC/CPU, preferred over the others (board, battery...).
_CPU_ZONES = ("cpu", "soc", "x86_pkg_temp", "tcpu", "ap-thermal")


def telemetry_name_ok(name: str) -> bool:
    """True if ``name`` is a metric name the controller will take."""
    return bool(METRIC_NAME.match(name))


class SystemMetrics:
    """Samples CPU, memory, temperature and uptime; CPU use is measured between samples.

    The first ``sample`` reports CPU use since this object was created, not since boot.
    Not thread-safe: one agent's worker thread samples.
    """

    def __init__(self, proc_root: str = "/proc", thermal_root: str = "/sys/class/thermal") -> None:
        self.proc = Path(proc_root)
        self.thermal = Path(thermal_root)
        self._cpu_prev = self._cpu_times()

    def sample(self) -> dict[str, float]:
        """The current readings: a subset of the names in docs/protocol.md 4.4."""
        out: dict[str, float] = {}
        cpu = self._cpu_times()
        if cpu is not None and self._cpu_prev is not None:
            busy = cpu[0] - self._cpu_prev[0]
            total = cpu[1] - self._cpu_prev[1]
            if total > 0:
                out["cpu_percent"] = round(100.0 * max(0.0, busy) / total, 2)
        if cpu is not None:
            self._cpu_prev = cpu
        load = _first_number(self.proc / "loadavg")
        if load is not None:
            out["load1"] = load
        out.update(self._memory())
        temp = self.temperature_c()
        if temp is not None:
            out["temp_c"] = temp
        uptime = _first_number(self.proc / "uptime")
        if uptime is not None:
            out["uptime_s"] = uptime
        rss = self._rss_bytes()
        if rss is not None:
            out["rss_bytes"] = rss
        return out

    def _cpu_times(self) -> tuple[float, float] | None:
        """(busy, total) jiffies from the aggregate ``cpu`` line of /proc/stat."""
        text = _read(self.proc / "stat")
        if not text or not text.startswith("cpu "):
            return None
        try:
            values = [float(v) for v in text.split("\n", 1)[0].split()[1:]]
        except ValueError:
            return None
        if len(values) < 4:
            return None
        # user nice system idle iowait irq softirq steal (guest is already in user)
        idle = values[3] + (values[4] if len(values) > 4 else 0.0)
        total = sum(values[:8])
        return total - idle, total

    def _memory(self) -> dict[str, float]:
        text = _read(self.proc / "meminfo")
        info: dict[str, float] = {}
        for line in (text or "").splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                try:
                    info[key] = float(parts[0]) * 1024.0  # /proc/meminfo counts kB
                except ValueError:
                    continue
        total = info.get("MemTotal")
        avail = info.get("MemAvailable", info.get("MemFree"))
        if not total or avail is None:
            return {}
        return {
            "mem_total_bytes": total,
            "mem_available_bytes": avail,
            "mem_used_percent": round(100.0 * (total - avail) / total, 2),
        }

    def _rss_bytes(self) -> float | None:
        """This process's resident memory (the agent and its trainer)."""
        text = _read(self.proc / "self" / "statm")
        if not text:
            return None
        try:
            pages = float(text.split()[1])
        except (IndexError, ValueError):
            return None
        return pages * float(os.sysconf("SC_PAGE_SIZE")) if hasattr(os, "sysconf") else None

    def temperature_c(self) -> float | None:
        """The CPU/SoC thermal zone's reading in °C, else the hottest zone; None without one."""
        readings: list[tuple[bool, float]] = []
        try:
            zones = sorted(self.thermal.glob("thermal_zone*"))
        except OSError:
            return None
        for zone in zones:
            raw = _read(zone / "temp")
            if not raw:
                continue
            try:
                milli = float(raw.strip())
            except ValueError:
                continue
            kind = (_read(zone / "type") or "").strip().lower()
            readings.append((any(k in kind for k in _CPU_ZONES), milli / 1000.0))
        if not readings:
            return None
        cpu = [t for is_cpu, t in readings if is_cpu]
        return round(max(cpu or [t for _, t in readings]), 2)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _first_number(path: Path) -> float | None:
    """The first whitespace-separated number in a file (/proc/uptime, /proc/loadavg)."""
    text = _read(path)
    try:
        return float(text.split()[0]) if text else None
    except (IndexError, ValueError):
        return None
