"""Engines that run picklable work somewhere: local processes, a Slurm job array (submitit), Ray tasks.

No scheduler or RPC of our own, and nothing about what the work is: callers hand over picklable
callables (`launch_local`) or a function and picklable items (`launch_slurm`, `launch_ray`).
- local: one `python -m mubench_probe.engines JOBFILE` process per callable on this machine, each
  shown its own GPUs through CUDA_VISIBLE_DEVICES when `gpus_per_call` > 0 (one per device);
  waits for all of them and forwards their output, prefixed with the callable's label.
- slurm: one Slurm job array through submitit (`--array-parallelism` tasks at a time); returns
  at once with the job id. submitit's local executor (`cluster="local"`) runs the very same
  code path without Slurm; its jobs end with this process, so the caller waits for them.
- ray: one Ray task per item with `num_gpus` / `num_cpus` from the Resources, on the cluster at
  `address` (None: RAY_ADDRESS or a new local cluster, "auto": the running one); waits.

What runs on them: extraction shards (`launch`) and evaluation units (`evaluation`).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ProbeError, UsageError

NotifyFn = Callable[[str], None]
DEFAULT_LOG_DIR = "probe-jobs"
RESULT = "probe-shard-result: "  # the local child's last line: this prefix, then its result as JSON


def need(module: str, extra: str, what: str) -> Any:
    """Import an optional engine, or one clear line naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"{what} needs {module}: pip install 'mubench-probe[{extra}]'") from None


@dataclass
class Launch:
    """What a launcher started: job ids, where logs go, and results when it waited."""

    launcher: str
    job_ids: list[str]
    log_dir: str | None = None
    results: list[Any] | None = None  # per shard, when the launcher waited for them
    handles: list[Any] = field(default_factory=list)  # submitit jobs (API callers may wait on them)

    def wait(self) -> list[Any]:
        """Results of every shard (blocks for submitit jobs)."""
        if self.results is None:
            self.results = [_job_result(h) for h in self.handles]
        return self.results

    def as_completed(self) -> Iterator[Any]:
        """submitit jobs' results in the order they finish."""
        submitit = need("submitit", "slurm", "--launcher slurm")
        for job in submitit.helpers.as_completed(self.handles, poll_frequency=0.5):
            yield _job_result(job)


def _job_result(job: Any) -> Any:
    """A submitit job's result; its failure as one line (the job's own error, its log folder)."""
    import submitit

    try:
        return job.result()
    except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as exc:
        last = [ln for ln in str(exc).splitlines() if ln.strip()][-1:] or ["?"]
        raise ProbeError(f"job {job.job_id} failed: {last[0]} (logs: {job.paths.folder})") from None


# ---- local processes ------------------------------------------------------------------------------


def visible_gpus(index: int, per_shard: int) -> str:
    """The CUDA_VISIBLE_DEVICES of shard `index`: its own `per_shard` devices, round-robin over the node's."""
    have = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = [d for d in have.split(",") if d.strip()] if have else None
    if devices is None:
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
            devices = [str(i) for i, ln in enumerate(out.stdout.splitlines()) if ln.startswith("GPU")]
        except (OSError, subprocess.SubprocessError):
            devices = []
    if not devices:
        return ""
    return ",".join(devices[(index * per_shard + j) % len(devices)] for j in range(per_shard))


def _new_file(folder: Path, prefix: str, suffix: str, data: bytes) -> Path:
    """A file of our own in `folder`, under a fresh name: created exclusively (O_EXCL) and never
    through a link (O_NOFOLLOW), readable by this user only. Whatever the folder already holds
    (a link planted there, a file a killed run left) is left alone, never written through."""
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)  # O_EXCL | O_NOFOLLOW, mode 0600
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return Path(name)


def launch_local(
    calls: Sequence[Callable[[], Any]],
    gpus_per_call: int = 0,
    log_dir: str | Path | None = None,
    notify: NotifyFn | None = None,
    *,
    label: Callable[[Any], str] = str,
    name: str = "job",
    failure_hint: str = "",
) -> Launch:
    """One process per picklable callable on this machine; waits and returns each one's (JSON) result.

    Each callable is pickled into a private job file in `log_dir` (removed once its process ends);
    output lines are forwarded to `notify` prefixed with `label(call)`. Any process that fails
    makes one ProbeError naming each failure, followed by `failure_hint`."""
    folder = Path(log_dir or tempfile.mkdtemp(prefix=f"probe-{name}s-"))
    folder.mkdir(parents=True, exist_ok=True)
    procs = []
    for i, call in enumerate(calls):
        jobfile = _new_file(folder, f"{name}-{i}-of-{len(calls)}-", ".pkl", pickle.dumps(call))
        env = dict(os.environ)
        if gpus_per_call > 0:
            env["CUDA_VISIBLE_DEVICES"] = visible_gpus(i, gpus_per_call)
        proc = subprocess.Popen(
            [sys.executable, "-m", "mubench_probe.engines", str(jobfile)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        procs.append((call, proc, jobfile))
    lines: dict[int, list[str]] = {}

    def forward(index: int, tag: str, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.setdefault(index, []).append(line.rstrip())
            if notify and not line.startswith(RESULT):
                notify(f"[{tag}] {line.rstrip()}")

    threads = [
        threading.Thread(target=forward, args=(i, label(c), p), daemon=True) for i, (c, p, _) in enumerate(procs)
    ]
    for t in threads:
        t.start()
    results, failed = [], []
    for i, ((call, proc, jobfile), t) in enumerate(zip(procs, threads, strict=True)):
        proc.wait()
        t.join()
        jobfile.unlink(missing_ok=True)
        out = lines.get(i, [])
        result = next((ln[len(RESULT) :] for ln in reversed(out) if ln.startswith(RESULT)), None)
        if proc.returncode != 0 or result is None:
            failed.append(f"{label(call)} exited with {proc.returncode}: {' | '.join(out[-3:])}")
        results.append(None if result is None else json.loads(result))
    if failed:
        raise ProbeError("; ".join(failed) + failure_hint)
    return Launch("local", [str(p.pid) for _, p, _ in procs], str(folder), results)


# ---- Slurm (submitit) -----------------------------------------------------------------------------


def parse_mem_gb(text: str | None) -> float | None:
    """Slurm-style memory: 32G, 500M, 1T or a number of GB."""
    if text is None:
        return None
    t = text.strip().upper().removesuffix("B")
    scale = {"K": 1 / 2**20, "M": 1 / 1024, "G": 1.0, "T": 1024.0}.get(t[-1:], None)
    try:
        return float(t[:-1]) * scale if scale is not None else float(t)
    except ValueError:
        raise UsageError(f"--mem takes e.g. 32G or 500M, not {text!r}") from None


def parse_minutes(text: str | None) -> int | None:
    """Slurm-style time: minutes, MM:SS, HH:MM:SS or D-HH:MM:SS."""
    if text is None:
        return None
    try:
        days, _, rest = text.strip().rpartition("-")
        parts = [int(p) for p in rest.split(":")]
        h, m, s = {1: (0, parts[0], 0), 2: (0, parts[0], parts[1]), 3: tuple(parts)}[len(parts)]
        return max(1, int((int(days or 0) * 24 + h) * 60 + m + (s > 0)))
    except (ValueError, KeyError):
        raise UsageError(f"--time takes minutes or [D-]HH:MM:SS, not {text!r}") from None


@dataclass(frozen=True)
class Resources:
    """What each shard asks the cluster for (Slurm via submitit, or Ray)."""

    partition: str | None = None
    gpus_per_shard: int = 0
    cpus_per_shard: int | None = None
    mem: str | None = None
    time: str | None = None
    array_parallelism: int | None = None


def launch_slurm(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    resources: Resources,
    log_dir: str | Path | None = None,
    cluster: str = "slurm",
    name: str = "probe",
) -> Launch:
    """Submit `fn(item)` for every item as one Slurm job array through submitit; returns at once."""
    submitit = need("submitit", "slurm", "--launcher slurm")
    if cluster == "slurm" and not _which("sbatch"):
        raise UsageError("--launcher slurm: no Slurm here (sbatch not found); run it on a Slurm login node")
    folder = Path(log_dir or DEFAULT_LOG_DIR) / "%j"
    ex = submitit.AutoExecutor(folder=folder, cluster=cluster)
    params: dict[str, Any] = {"name": name, "timeout_min": parse_minutes(resources.time) or 60 * 24}
    if resources.gpus_per_shard:
        params["gpus_per_node"] = resources.gpus_per_shard
    if resources.cpus_per_shard:
        params["cpus_per_task"] = resources.cpus_per_shard
    if (mem := parse_mem_gb(resources.mem)) is not None:
        params["mem_gb"] = mem
    if resources.partition:
        params["slurm_partition"] = resources.partition
    if resources.array_parallelism:
        params["slurm_array_parallelism"] = resources.array_parallelism
    ex.update_parameters(**params)
    jobs = ex.map_array(fn, list(items))
    ids = [str(j.job_id) for j in jobs]
    return Launch("slurm", ids, str(folder.parent), None, list(jobs))


def _which(cmd: str) -> bool:
    import shutil

    return shutil.which(cmd) is not None


# ---- Ray ------------------------------------------------------------------------------------------


def ray_results(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    resources: Resources,
    address: str | None = None,
    notify: NotifyFn | None = None,
    label: Callable[[Any], str] = str,
) -> Iterator[tuple[int, Any]]:
    """One Ray task per item (num_gpus / num_cpus from `resources`): (index, result) as each finishes."""
    ray = need("ray", "ray", "--launcher ray")
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    task = ray.remote(fn).options(
        num_gpus=resources.gpus_per_shard or 0, num_cpus=resources.cpus_per_shard or 1, max_retries=0
    )
    refs = [task.remote(item) for item in items]
    index = {ref: i for i, ref in enumerate(refs)}
    pending, t0 = list(refs), time.perf_counter()
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        for ref in done:
            i = index[ref]
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as exc:  # the task's own error, one line
                cause = getattr(exc, "cause", None) or exc
                raise ProbeError(f"ray task {label(items[i])} failed: {type(cause).__name__}: {cause}") from None
            if notify:
                notify(f"{label(items[i])} finished after {time.perf_counter() - t0:.0f} s")
            yield i, result


def launch_ray(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    resources: Resources,
    address: str | None = None,
    notify: NotifyFn | None = None,
    label: Callable[[Any], str] = str,
    stream: bool = False,
) -> Any:
    """Run `fn(item)` as Ray tasks and wait: a Launch with every result, or (`stream`) the results
    in the order they finish."""
    results = ray_results(fn, items, resources, address, notify, label)
    if stream:
        return (r for _, r in results)
    out: list[Any] = [None] * len(items)
    for i, r in results:
        out[i] = r
    return Launch("ray", [str(i) for i in range(len(items))], None, out)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m mubench_probe.engines JOBFILE`: run one pickled callable (the local launcher's child)
    and print its result as JSON after RESULT; a ProbeError is one line and its exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    call = pickle.loads(Path(args[0]).read_bytes())
    try:
        result = call()
    except ProbeError as exc:
        print(f"error: {exc}", flush=True)
        return exc.exit_code
    print(RESULT + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
