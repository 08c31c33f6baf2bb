"""Shared pieces of the benchmark scripts: Ray/Serve start-up, closed-loop HTTP load, per-process
CPU accounting, py-spy summaries, percentiles, tables and JSON output.

Benchmarks are scripts, not tests. On the 2-core machines everything (client,
proxy, replicas, other people's work) shares the CPU, so a script compares variants measured side
by side in one run, interleaved in rounds, and reports ratios rather than absolute numbers.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # run as `python tests/benchmarks/<script>.py`
    sys.path.insert(0, str(REPO_ROOT))

# Serve knob presets. They are environment variables read when Ray's modules are imported and by
# the Serve controller/proxy/replica processes, so they must be set before `import ray`.
SERVE_PRESETS: dict[str, dict[str, str]] = {
    "default": {},
    # Ray 2.60's bundle: user code and router on the replica's main loop, gRPC between
    # deployments, direct ingress, GC frozen at start-up, buffered request-path logs.
    "throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    # HAProxy in front of the ingress replicas' own HTTP servers instead of the Python proxy.
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1"},
    "haproxy+throughput": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def apply_serve_env(preset: str, extra: Iterable[str] = ()) -> dict[str, str]:
    """Set the preset's and the extra KEY=VALUE variables in os.environ; call before importing ray."""
    if "ray" in sys.modules:
        raise RuntimeError("Serve knobs must be set before ray is imported")
    env = dict(SERVE_PRESETS[preset])
    for kv in extra:
        key, sep, value = kv.partition("=")
        if not sep:
            raise ValueError(f"--serve-env wants KEY=VALUE, got {kv!r}")
        env[key] = value
    if env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        # HAProxy's files default to fixed paths under /tmp; keep this run's apart from anyone
        # else's on a shared machine.
        # Short: Serve adds the node id and the admin socket path may not exceed 97 characters.
        d = tempfile.mkdtemp(prefix="ebh", dir="/tmp")
        env.setdefault("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", f"{d}/haproxy.cfg")
        env.setdefault("RAY_SERVE_HAPROXY_SOCKET_PATH", f"{d}/admin.sock")
        env.setdefault("RAY_SERVE_HAPROXY_SERVER_STATE_BASE", d)
        env.setdefault("RAY_SERVE_HAPROXY_SERVER_STATE_FILE", f"{d}/server-state")
    os.environ.update(env)
    return env


def start_ray_serve(num_cpus: float | None = None) -> tuple[str, int]:
    """A fresh local Ray on ports Ray picks (never Redis's 6379) and Serve on a free loopback port.

    ``address="local"`` forces a new instance: plain ``ray.init()`` would attach to a cluster
    someone else started with ``ray start`` on this machine.
    """
    import ray
    from ray import serve

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "deployments.proxy_guard:middlewares")
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=True, logging_level="WARNING",
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}", port


def stop_ray_serve(graceful: bool = True) -> None:
    """Stop Serve and Ray, then end any process this driver started that outlived them.

    ``graceful=False`` skips Serve's shutdown, whose draining of direct-ingress replicas
    (HAProxy mode) waits 30 s for nothing in a benchmark.
    """
    import psutil
    import ray
    from ray import serve

    ours = psutil.Process().children(recursive=True)
    try:
        if graceful:
            serve.shutdown()
    finally:
        ray.shutdown()
    alive = [p for p in ours if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, still = psutil.wait_procs(alive, timeout=5)
    for p in still:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


# -- statistics ---------------------------------------------------------------------------------

def percentile(sorted_vals: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of an already sorted list."""
    if not sorted_vals:
        return float("nan")
    k = (len(sorted_vals) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


def latency_summary_ms(latencies_s: list[float]) -> dict[str, float]:
    v = sorted(latencies_s)
    if not v:
        return {"n": 0}
    return {
        "n": len(v),
        "p50": percentile(v, 50) * 1e3,
        "p90": percentile(v, 90) * 1e3,
        "p99": percentile(v, 99) * 1e3,
        "mean": statistics.fmean(v) * 1e3,
        "min": v[0] * 1e3,
        "max": v[-1] * 1e3,
    }


# -- closed-loop load ---------------------------------------------------------------------------

class CheckFailed(Exception):
    """A response arrived but is wrong (status, body, usage)."""


@dataclass
class LoadResult:
    concurrency: int
    requests: int  # completed correctly
    errors: int
    elapsed_s: float
    latencies_s: list[float] = field(repr=False)
    ttft_s: list[float] = field(repr=False, default_factory=list)
    error_samples: list[str] = field(default_factory=list)
    client_cpu_s: float = 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s > 0 else 0.0


# ``send(client)`` performs one request, raises on any failure, and returns the time to first
# byte of the body in seconds (streams) or None.
SendFn = Callable[[Any], Awaitable[float | None]]


async def closed_loop(client, send: SendFn, concurrency: int, duration_s: float) -> LoadResult:
    """``concurrency`` workers each send one request after another for ``duration_s``.

    A worker does not start a request after the deadline; requests in flight at the deadline are
    awaited and counted. Throughput is completions over the time from start to the last
    completion, so the tail of the round is not lost.
    """
    latencies: list[float] = []
    ttfts: list[float] = []
    errors: Counter[str] = Counter()
    perf = time.perf_counter
    cpu0 = time.process_time()
    start = perf()
    deadline = start + duration_s
    last_done = start

    async def worker() -> None:
        nonlocal last_done
        while True:
            t0 = perf()
            if t0 >= deadline:
                return
            try:
                ttft = await send(client)
            except Exception as exc:  # counted and reported, never fatal
                errors[f"{type(exc).__name__}: {str(exc)[:200]}"] += 1
                t1 = perf()
            else:
                t1 = perf()
                latencies.append(t1 - t0)
                if ttft is not None:
                    ttfts.append(ttft)
            last_done = max(last_done, t1)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return LoadResult(
        concurrency=concurrency,
        requests=len(latencies),
        errors=sum(errors.values()),
        elapsed_s=last_done - start,
        latencies_s=latencies,
        ttft_s=ttfts,
        error_samples=[f"{n}x {msg}" for msg, n in errors.most_common(5)],
        client_cpu_s=time.process_time() - cpu0,
    )


@dataclass
class PairedResult:
    """Sequential requests, one variant after another, order flipped every iteration."""

    names: list[str]
    latencies_s: dict[str, list[float]]  # index i of every list belongs to iteration i
    errors: dict[str, int]
    error_samples: list[str]


async def paired_sequential(client, senders: dict[str, SendFn], iterations: int,
                            max_s: float = float("inf")) -> PairedResult:
    """C=1 latency with per-request interleaving: A B | B A | A B ... .

    Neighbouring requests of different variants see the same machine state, so drift and other
    people's load (bursty on a shared box) cancel in the paired differences far better than
    in rounds of seconds. An iteration with a failed request is dropped from every variant.
    Stops early after ``max_s`` seconds (on an even iteration count, so each order is as frequent).
    """
    names = list(senders)
    lat: dict[str, list[float]] = {n: [] for n in names}
    errors: dict[str, int] = {n: 0 for n in names}
    samples: Counter[str] = Counter()
    perf = time.perf_counter
    deadline = perf() + max_s
    for i in range(iterations):
        if i % 2 == 0 and perf() > deadline:
            break
        got = {}
        for name in (names if i % 2 == 0 else names[::-1]):
            t0 = perf()
            try:
                await senders[name](client)
            except Exception as exc:
                errors[name] += 1
                samples[f"{name}: {type(exc).__name__}: {str(exc)[:200]}"] += 1
                continue
            got[name] = perf() - t0
        if len(got) == len(names):
            for name, v in got.items():
                lat[name].append(v)
    return PairedResult(names, lat, errors, [f"{n}x {m}" for m, n in samples.most_common(5)])


def paired_p50_difference_ms(a: list[float], b: list[float], resamples: int = 400,
                             seed: int = 1) -> dict[str, float]:
    """p50(a) - p50(b) and the median of per-pair differences, in ms, with a bootstrap 95%
    interval over pairs for the former."""
    import random

    n = min(len(a), len(b))
    if n == 0:
        return {}
    a, b = a[:n], b[:n]
    diff = sorted(x - y for x, y in zip(a, b))
    p50 = percentile(sorted(a), 50) - percentile(sorted(b), 50)
    rng = random.Random(seed)
    boots = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        boots.append(percentile(sorted(a[i] for i in idx), 50) - percentile(sorted(b[i] for i in idx), 50))
    boots.sort()
    return {
        "pairs": n,
        "p50_difference_ms": p50 * 1e3,
        "p50_difference_ci95_ms": [percentile(boots, 2.5) * 1e3, percentile(boots, 97.5) * 1e3],
        "median_paired_difference_ms": percentile(diff, 50) * 1e3,
        "mean_difference_ms": statistics.fmean(diff) * 1e3,
    }


class HttpxClient:
    """httpx.AsyncClient: one keep-alive HTTP/1.1 pool for the whole run, room for every worker.

    ``post`` returns (status, body, seconds to the first body chunk or None) so that load
    generators can swap clients without changing their checks.
    """

    name = "httpx"

    def __init__(self, max_connections: int = 256, timeout_s: float = 60.0):
        import httpx

        self._c = httpx.AsyncClient(
            http1=True,
            http2=False,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections,
                                keepalive_expiry=300),
            timeout=httpx.Timeout(timeout_s),
            trust_env=False,  # no proxies from the environment on a loopback benchmark
        )

    async def post(self, url: str, body: bytes, headers: dict[str, str],
                   stream: bool = False) -> tuple[int, bytes, float | None]:
        if not stream:
            r = await self._c.post(url, content=body, headers=headers)
            return r.status_code, r.content, None
        t0 = time.perf_counter()
        ttft = None
        buf = bytearray()
        async with self._c.stream("POST", url, content=body, headers=headers) as r:
            async for chunk in r.aiter_bytes():
                if ttft is None:
                    ttft = time.perf_counter() - t0
                buf += chunk
            return r.status_code, bytes(buf), ttft

    async def aclose(self) -> None:
        await self._c.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()


class RawHttpClient:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams, for one loopback host.

    It costs the load generator several times less CPU per request than httpx, which matters
    when the client shares 2 cores with the system under test. It speaks just enough HTTP/1.1:
    Content-Length or chunked bodies, ``Connection: close``, one request per connection at a time.
    """

    name = "raw"

    def __init__(self, max_connections: int = 256, timeout_s: float = 60.0):
        self._idle: dict[tuple[str, int], list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {}
        self._open: set[asyncio.StreamWriter] = set()
        self._timeout = timeout_s

    @staticmethod
    def _split(url: str) -> tuple[str, int, str]:
        from urllib.parse import urlsplit

        u = urlsplit(url)
        if u.scheme != "http":
            raise ValueError("RawHttpClient speaks plain http only")
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        return u.hostname or "127.0.0.1", u.port or 80, path

    async def post(self, url: str, body: bytes, headers: dict[str, str],
                   stream: bool = False) -> tuple[int, bytes, float | None]:
        async with asyncio.timeout(self._timeout):  # no extra task per request, unlike wait_for
            return await self._post(url, body, headers)

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, float | None]:
        host, port, path = self._split(url)
        idle = self._idle.setdefault((host, port), [])
        if idle:
            reader, writer = idle.pop()
        else:
            reader, writer = await asyncio.open_connection(host, port)
            self._open.add(writer)
        try:
            head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
            head += [f"{k}: {v}" for k, v in headers.items()]
            t0 = time.perf_counter()
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
            raw = await reader.readuntil(b"\r\n\r\n")
            lines = raw.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            hdrs = {}
            for line in lines[1:]:
                if line:
                    k, _, v = line.partition(":")
                    hdrs[k.strip().lower()] = v.strip()
            ttft = None
            if "content-length" in hdrs:
                data = await reader.readexactly(int(hdrs["content-length"]))
            elif hdrs.get("transfer-encoding", "").lower() == "chunked":
                parts = []
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
                    if size == 0:
                        while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                            pass
                        break
                    chunk = await reader.readexactly(size + 2)
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    parts.append(chunk[:-2])
                data = b"".join(parts)
            else:
                data = await reader.read()
                hdrs["connection"] = "close"
        except BaseException:
            self._open.discard(writer)
            writer.close()
            raise
        if hdrs.get("connection", "").lower() == "close":
            self._open.discard(writer)
            writer.close()
        else:
            idle.append((reader, writer))
        return status, data, ttft

    async def aclose(self) -> None:
        for w in list(self._open):
            w.close()
        self._open.clear()
        self._idle.clear()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()


CLIENTS = {"httpx": HttpxClient, "raw": RawHttpClient}


# -- per-process CPU accounting -----------------------------------------------------------------

# Ray sets each worker's process title; these name the parts of a Serve app.
_TITLE_RULES = [
    (re.compile(r"ServeReplica:([^:\s]+):([^\s.]+)"), lambda m: f"{m.group(1)}.{m.group(2)}"),
    (re.compile(r"ProxyActor"), lambda m: "serve.proxy"),
    (re.compile(r"ServeController"), lambda m: "serve.controller"),
    (re.compile(r"(^|/)haproxy(\s|$)"), lambda m: "haproxy"),
    (re.compile(r"^ray::IDLE"), lambda m: "ray.other"),
    # Any other actor by its class (e.g. Ember's RateLimiter).
    (re.compile(r"^ray::([A-Za-z_]\w*)"), lambda m: f"actor.{m.group(1)}"),
]


def _classify(proc) -> str:
    try:
        cmd = " ".join(proc.cmdline()) or proc.name()
    except Exception:
        return "gone"
    for rx, name in _TITLE_RULES:
        m = rx.search(cmd)
        if m:
            return name(m)
    return "ray.other"  # raylet, GCS, idle workers, log monitor, ...


class ProcessCpu:
    """CPU seconds (user + system) of this driver and every process it started (Ray's raylet and
    GCS, their workers: Serve proxy, controller, replicas, HAProxy), grouped by role.

    Only descendants of this process are counted, so other people's Ray clusters on the same
    machine are left out.
    """

    def __init__(self, trees: dict[int, str] | None = None) -> None:
        import psutil

        self._psutil = psutil
        self.me = psutil.Process()
        self._procs: dict[int, tuple[Any, str]] = {}
        self.trees = dict(trees or {})  # pid -> role for it and all its descendants
        self.refresh()

    def refresh(self) -> None:
        """Find the processes again and re-read their titles: a Ray worker that was idle may have
        become an actor since (call it after start-up and warm-up, not inside a measurement)."""
        named: dict[int, str] = {}
        for pid, role in self.trees.items():
            try:
                root = self._psutil.Process(pid)
                named[pid] = role
                named.update((c.pid, role) for c in root.children(recursive=True))
            except self._psutil.NoSuchProcess:
                continue
        procs = {}
        for p in self.me.children(recursive=True):
            prev = self._procs.get(p.pid)
            procs[p.pid] = (prev[0] if prev else p, named.get(p.pid) or _classify(p))
        self._procs = procs

    def pids(self, role: str) -> list[int]:
        return [pid for pid, (_, r) in self._procs.items() if r == role]

    def roles(self) -> list[str]:
        return sorted({r for _, r in self._procs.values()})

    def snapshot(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for p, role in self._procs.values():
            try:
                t = p.cpu_times()
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied):
                continue
            # Include reaped children's time too (HAProxy workers, short-lived helpers).
            out[role] += t.user + t.system + getattr(t, "children_user", 0) + getattr(t, "children_system", 0)
        t = self.me.cpu_times()
        out["client(driver)"] = t.user + t.system
        return dict(out)

    @staticmethod
    def delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        return {k: b.get(k, 0.0) - a.get(k, 0.0) for k in set(a) | set(b)}


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        info["loadavg"] = os.getloadavg()
    except OSError:
        pass
    try:
        import ray

        info["ray"] = ray.__version__
    except Exception:
        pass
    return info


# -- py-spy -------------------------------------------------------------------------------------

def py_spy_binary() -> str | None:
    cand = Path(sys.executable).with_name("py-spy")
    if cand.exists():
        return str(cand)
    return shutil.which("py-spy")


def start_py_spy(pid: int, duration_s: float, out_file: Path, rate: int = 250,
                 gil_only: bool = True) -> subprocess.Popen | None:
    """Sample ``pid`` for ``duration_s`` into a collapsed-stack file.

    ``gil_only`` keeps only samples of the thread holding the GIL: in a replica (several Python
    threads: Serve's router loop, the user-code loop, Ray's worker loop) that is Python CPU time,
    whereas plain sampling also counts threads that wait in native code. ``--nonblocking`` reads
    the target's memory without stopping it, so the profiled process runs at (nearly) full speed.
    """
    exe = py_spy_binary()
    if exe is None:
        return None
    cmd = [exe, "record", "--pid", str(pid), "--duration", str(max(1, int(round(duration_s)))),
           "--rate", str(rate), "--format", "raw", "--nonblocking", "--output", str(out_file)]
    if gil_only:
        cmd.append("--gil")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


_FRAME_RX = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]+)(?::(?P<line>\d+))?\)$")


def _frame_key(frame: str) -> str:
    """'handler (/x/deployments/ingress.py:123)' -> 'handler (deployments/ingress.py)'."""
    m = _FRAME_RX.match(frame.strip())
    if not m:
        return frame.strip()
    f = m.group("file")
    for marker in ("/site-packages/", str(REPO_ROOT) + "/"):
        if marker in f:
            f = f.split(marker, 1)[1]
            break
    return f"{m.group('func')} ({f})"


def summarize_collapsed(path: Path, rate: int, requests: int, top: int = 25,
                        focus: tuple[str, ...] = ("deployments/", "cluster/", "policies/",
                                                  "gateway_overhead.py")) -> dict[str, Any]:
    """Inclusive and self time per function from a py-spy raw (collapsed) file, in ms per request.

    A sample is one thread seen running Python; its count / rate is seconds of CPU-ish time.
    """
    inclusive: Counter[str] = Counter()
    self_: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = [_frame_key(f) for f in stack.split(";") if f]
        for key in set(frames):
            inclusive[key] += count
        if frames:
            self_[frames[-1]] += count

    def ms(count: int) -> float:
        return round(count / rate / max(requests, 1) * 1e3, 4)

    return {
        "samples": total,
        "rate_hz": rate,
        "requests": requests,
        "active_ms_per_request": ms(total),
        "inclusive_top": [(k, ms(c), round(c / max(total, 1) * 100, 1)) for k, c in inclusive.most_common(top)],
        "self_top": [(k, ms(c), round(c / max(total, 1) * 100, 1)) for k, c in self_.most_common(top)],
        "focus_inclusive": [(k, ms(c), round(c / max(total, 1) * 100, 1))
                            for k, c in inclusive.most_common() if any(s in k for s in focus)][:top],
    }


# -- output -------------------------------------------------------------------------------------

def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.2f}"
        return str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def write_json(path: str | Path, data: Any) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)

    def default(o: Any) -> Any:
        if hasattr(o, "__dataclass_fields__"):
            return asdict(o)
        if isinstance(o, Path):
            return str(o)
        return str(o)

    p.write_text(json.dumps(data, indent=2, default=default, sort_keys=False) + "\n")
    return p
