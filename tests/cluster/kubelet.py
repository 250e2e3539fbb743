"""A stand-in kubelet for the test cluster: it runs each Pod of a namespace as local processes.

There is no kubelet (nor container runtime) on the test machines, so Pods the
operator's objects produce would stay Pending forever. This harness plays the
node, as faithfully as the machine allows:

- the container's `command` + `args` run as given, with `$(VAR)` expansion from
  the container's `env` (values, `fieldRef` status.podIP / metadata.*);
- the "image" is this checkout's virtualenv: `fedjob` is found on its PATH, and
  the image's DeepSpeed ops folder is the local JIT cache, mounted writable (the
  real image builds the ops ahead of time, DS_BUILD_SHM_COMM=1, so it never
  writes there);
- every volume is materialised (ConfigMap and Secret keys with their modes,
  emptyDir, a per-claim folder for PVCs, hostPath as is) and bind-mounted at
  its `mountPath` in a private mount namespace (`unshare -m`), read-only where
  the mount says so, with a read-only root filesystem when the container asks;
- each Pod gets its own loopback address (127.0.0.N, or another range for a second
  cluster's node) as its Pod IP, and
  Service names in the arguments resolve to the address of a Pod the Service
  selects (the Pod starts once such a Pod exists, as DNS + endpoints would);
- Pod phase, IP, readiness (tcpSocket probes are really checked), restarts and
  exit codes are written back to the API server, so the Job, ReplicaSet and
  Deployment controllers do their real work;
- the termination message: a host file bind-mounted into the Pod stands for the
  container's terminationMessagePath (an env value equal to that path names the
  file instead, since /dev of this machine cannot be written), and what the process
  wrote there (or, with FallbackToLogsOnError, its log's tail when it failed) is the
  terminated state's `message`, also as `lastState` of a restarted container.

What it does not emulate: user switching (runAsUser), resource limits, image
pulls, and network isolation between Pods. A Pod spec that references a missing
volume, key or variable, or a command that fails, makes the Pod fail, and the
test with it.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

log = logging.getLogger("kubelet")
VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
IMAGE_FILES = {
    "/opt/fedjob/torch_extensions": Path(
        os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "fedjob" / "torch_extensions")
    )
}


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_mount_namespaces() -> None:
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "true"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        raise RuntimeError(f"the kubelet harness needs mount namespaces (unshare -m): {probe.stderr.strip()}")


class PodSpecError(Exception):
    """The Pod cannot run as specified (like a kubelet's CreateContainerConfigError)."""


@dataclass
class RunningPod:
    name: str
    uid: str
    ip: str
    restart_policy: str
    container: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    probe_port: int | None
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    ready: bool = False
    finished: bool = False
    exit_codes: list[int] = field(default_factory=list)
    message_file: Path | None = None
    message_policy: str = "File"
    last_state: dict[str, Any] | None = None


class FakeKubelet:
    def __init__(
        self,
        core: client.CoreV1Api,
        namespace: str,
        workdir: Path,
        venv_bin: Path,
        ip_prefix: str = "127.0.0.",
    ) -> None:
        check_mount_namespaces()
        self.ip_prefix = ip_prefix  # another node (a second cluster's) takes another range
        self.core = core
        self.ns = namespace
        self.workdir = workdir
        self.venv_bin = venv_bin
        self.pods: dict[str, RunningPod] = {}
        self.ips: dict[str, str] = {}  # pod uid -> address
        self.failures: list[str] = []  # pods the harness could not start, with the reason
        self._next_ip = 2
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kubelet", daemon=True)
        self._created_dirs: list[Path] = []

    # ----- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> FakeKubelet:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for pod in list(self.pods.values()):
            self._kill(pod)
        for d in reversed(self._created_dirs):
            with contextlib.suppress(OSError):
                d.rmdir()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sync()
            except Exception:  # keep playing the node; the test sees the consequences
                log.exception("kubelet sync failed")
            self._stop.wait(0.3)

    def _sync(self) -> None:
        pods = {p.metadata.uid: p for p in self.core.list_namespaced_pod(self.ns).items}
        for uid, run in list(self.pods.items()):
            pod = pods.get(uid)
            if pod is None or pod.metadata.deletion_timestamp:
                self._kill(run)
                del self.pods[uid]
                if pod is not None:
                    self._delete(pod)
        for uid, pod in pods.items():
            if uid in self.pods or pod.metadata.deletion_timestamp:
                if pod.metadata.deletion_timestamp and uid not in self.pods:
                    self._delete(pod)
                continue
            if pod.status and pod.status.phase in ("Succeeded", "Failed"):
                continue
            try:
                run = self._prepare(pod)
            except _NotYet:
                continue
            except PodSpecError as exc:
                self.failures.append(f"{pod.metadata.name}: {exc}")
                self._set_status(
                    pod.metadata.name,
                    {"phase": "Failed", "reason": "CreateContainerConfigError", "message": str(exc)},
                )
                self.pods[uid] = RunningPod(
                    pod.metadata.name, uid, "", "Never", "", [], {}, Path("/dev/null"), None, finished=True
                )
                continue
            self.pods[uid] = run
            self._spawn(run)
        for run in self.pods.values():
            self._tend(run)

    def _delete(self, pod: Any) -> None:
        try:
            self.core.delete_namespaced_pod(pod.metadata.name, self.ns, grace_period_seconds=0)
        except ApiException as exc:
            if exc.status != 404:
                raise

    # ----- turning a Pod spec into a process -------------------------------------------------------------

    def _ip_for(self, uid: str) -> str:
        if uid not in self.ips:
            self.ips[uid] = f"{self.ip_prefix}{self._next_ip}"
            self._next_ip += 1
        return self.ips[uid]

    def _prepare(self, pod: Any) -> RunningPod:
        spec = pod.spec
        if len(spec.containers) != 1 or spec.init_containers:
            raise PodSpecError("the harness runs exactly one container per Pod")
        c = spec.containers[0]
        ip = self._ip_for(pod.metadata.uid)
        root = self.workdir / "pods" / f"{pod.metadata.name}-{pod.metadata.uid[:8]}"
        root.mkdir(parents=True, exist_ok=True)
        sources = {v.name: self._materialise(v, root) for v in (spec.volumes or [])}
        env: dict[str, str] = {}
        for e in c.env or []:
            if e.value_from is not None:
                env[e.name] = self._env_from(e.value_from, pod, ip)
            else:
                env[e.name] = VAR.sub(lambda m: env.get(m.group(1), m.group(0)), e.value or "")
        message_path = c.termination_message_path or "/dev/termination-log"
        message_file = root / "termination-log"
        message_file.write_text("")
        env = {k: str(message_file) if v == message_path else v for k, v in env.items()}
        argv = [VAR.sub(lambda m: _expand(m, env), a) for a in [*(c.command or []), *(c.args or [])]]
        if not argv:
            raise PodSpecError("the container has no command (the harness has no image entrypoints)")
        argv = [self._resolve_services(a) for a in argv]
        mounts = []
        for m in c.volume_mounts or []:
            if m.name not in sources:
                raise PodSpecError(f"volumeMount {m.name!r} names no volume of the Pod")
            mounts.append((sources[m.name], m.mount_path, bool(m.read_only)))
        for target, src in IMAGE_FILES.items():
            src.mkdir(parents=True, exist_ok=True)
            mounts.append((src, target, False))
        # The "image" is this checkout and its virtualenv, at their own paths: mounted
        # last, so an emptyDir at /tmp cannot hide a checkout that lives under /tmp.
        for path in _image_paths():
            mounts.append((path, str(path), True))
        mounts.append((message_file, str(message_file), False))
        read_only_root = bool(c.security_context and c.security_context.read_only_root_filesystem)
        probe = (
            c.readiness_probe.tcp_socket.port if c.readiness_probe and c.readiness_probe.tcp_socket else None
        )
        if isinstance(probe, str):
            probe = next((p.container_port for p in c.ports or [] if p.name == probe), None)
        wrapped = self._namespace_wrapper(mounts, read_only_root, argv)
        proc_env = {
            "PATH": f"{self.venv_bin}:/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            **env,
            "PYTHONUNBUFFERED": "1",
        }
        return RunningPod(
            pod.metadata.name,
            pod.metadata.uid,
            ip,
            spec.restart_policy or "Always",
            c.name,
            wrapped,
            proc_env,
            root / "container.log",
            probe,
            message_file=message_file,
            message_policy=c.termination_message_policy or "File",
        )

    def _materialise(self, vol: Any, root: Path) -> Path:
        d = root / "volumes" / vol.name
        if vol.config_map is not None:
            cm = self._read(self.core.read_namespaced_config_map, vol.config_map.name)
            self._write_keys(
                d, dict(cm.data or {}), vol.config_map.items, vol.config_map.default_mode or 0o644, False
            )
        elif vol.secret is not None:
            sec = self._read(self.core.read_namespaced_secret, vol.secret.secret_name)
            data = {k: base64.b64decode(v).decode() for k, v in (sec.data or {}).items()}
            self._write_keys(d, data, vol.secret.items, vol.secret.default_mode or 0o644, True)
        elif vol.empty_dir is not None:
            d.mkdir(parents=True, exist_ok=True)
        elif vol.persistent_volume_claim is not None:
            self._read(
                self.core.read_namespaced_persistent_volume_claim, vol.persistent_volume_claim.claim_name
            )
            d = self.workdir / "pvcs" / vol.persistent_volume_claim.claim_name
            d.mkdir(parents=True, exist_ok=True)
        elif vol.host_path is not None:
            d = Path(vol.host_path.path)
            if vol.host_path.type == "Directory" and not d.is_dir():
                raise PodSpecError(f"hostPath {d} is not a directory")
        else:
            raise PodSpecError(f"volume {vol.name!r}: a kind the harness does not provide")
        return d

    def _read(self, read: Any, name: str) -> Any:
        try:
            return read(name, self.ns)
        except ApiException as exc:
            if exc.status == 404:
                raise _NotYet() from None  # a kubelet keeps the Pod in ContainerCreating
            raise

    @staticmethod
    def _write_keys(d: Path, data: dict[str, str], items: Any, default_mode: int, secret: bool) -> None:
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        chosen = [(i.key, i.path, i.mode) for i in items] if items else [(k, k, None) for k in data]
        for key, rel, mode in chosen:
            if key not in data:
                raise PodSpecError(f"key {key!r} not found in the {'Secret' if secret else 'ConfigMap'}")
            p = d / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(data[key])
            os.chmod(p, mode if mode is not None else default_mode)

    def _env_from(self, src: Any, pod: Any, ip: str) -> str:
        if src.field_ref is not None:
            path = src.field_ref.field_path
            values = {
                "status.podIP": ip,
                "metadata.name": pod.metadata.name,
                "metadata.namespace": self.ns,
                "status.hostIP": "127.0.0.1",
            }
            if path not in values:
                raise PodSpecError(f"fieldRef {path!r} is not provided by the harness")
            return values[path]
        if src.resource_field_ref is not None:
            ref = src.resource_field_ref
            kind, _, res = ref.resource.partition(".")
            c = next(
                c
                for c in pod.spec.containers
                if c.name == (ref.container_name or pod.spec.containers[0].name)
            )
            value = getattr(c.resources, kind, None) or {}
            if res not in value:
                raise PodSpecError(f"resourceFieldRef {ref.resource!r}: the container sets no {ref.resource}")
            return str(math.ceil(_quantity(value[res]) / _quantity(ref.divisor or "1")))
        if src.secret_key_ref is not None:
            sec = self._read(self.core.read_namespaced_secret, src.secret_key_ref.name)
            return base64.b64decode(sec.data[src.secret_key_ref.key]).decode()
        if src.config_map_key_ref is not None:
            cm = self._read(self.core.read_namespaced_config_map, src.config_map_key_ref.name)
            return str(cm.data[src.config_map_key_ref.key])
        raise PodSpecError("unsupported valueFrom")

    def _resolve_services(self, arg: str) -> str:
        """Service DNS names -> the address of a Pod the Service selects."""
        for svc in self.core.list_namespaced_service(self.ns).items:
            name = svc.metadata.name
            hosts = [
                f"{name}.{self.ns}.svc.cluster.local",
                f"{name}.{self.ns}.svc",
                f"{name}.{self.ns}",
                name,
            ]
            pattern = re.compile(r"(?<![\w.-])(" + "|".join(re.escape(h) for h in hosts) + r")(?=:\d)")
            if not pattern.search(arg):
                continue
            selector = ",".join(f"{k}={v}" for k, v in (svc.spec.selector or {}).items())
            backing = [
                p
                for p in self.core.list_namespaced_pod(self.ns, label_selector=selector).items
                if not p.metadata.deletion_timestamp
            ]
            if not backing:
                raise _NotYet()
            arg = pattern.sub(self._ip_for(backing[0].metadata.uid), arg)
        return arg

    def _namespace_wrapper(
        self, mounts: list[tuple[Path, str, bool]], read_only_root: bool, argv: list[str]
    ) -> list[str]:
        for _, target, _ in mounts:
            t = Path(target)
            if not t.exists():
                missing = [p for p in [t, *t.parents] if not p.exists()]
                t.mkdir(parents=True, exist_ok=True)
                self._created_dirs.extend(reversed(missing))
        plan = [(str(src), target, ro) for src, target, ro in mounts]
        return [
            "unshare",
            "-m",
            "--propagation",
            "private",
            sys.executable,
            "-c",
            _MOUNT_AND_EXEC,
            repr((plan, read_only_root)),
            *argv,
        ]

    # ----- running ----------------------------------------------------------------------------------------

    def _spawn(self, run: RunningPod) -> None:
        with open(run.log_path, "ab") as out:
            run.proc = subprocess.Popen(
                run.argv, env=run.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        run.ready = False
        self._report(run, running=True)

    def _tend(self, run: RunningPod) -> None:
        if run.finished or run.proc is None:
            return
        rc = run.proc.poll()
        if rc is None:
            if not run.ready and (run.probe_port is None or _port_open(run.ip, run.probe_port)):
                run.ready = True
                self._report(run, running=True)
            return
        run.exit_codes.append(rc)
        if run.restart_policy == "Always" or (run.restart_policy == "OnFailure" and rc != 0):
            run.last_state = {"terminated": self._terminated(run, rc)}
            if run.message_file is not None:
                run.message_file.write_text("")
            run.restarts += 1
            time.sleep(min(0.5 * run.restarts, 3))
            self._spawn(run)
            return
        run.finished = True
        self._report(run, running=False, exit_code=rc)

    def _terminated(self, run: RunningPod, exit_code: int) -> dict[str, Any]:
        message = ""
        if run.message_file is not None and run.message_file.exists():
            message = run.message_file.read_text(errors="replace")[-4096:]
        if not message and exit_code != 0 and run.message_policy == "FallbackToLogsOnError":
            lines = (
                run.log_path.read_text(errors="replace").splitlines()[-80:] if run.log_path.exists() else []
            )
            message = "\n".join(lines)[-2048:]
        return {
            "exitCode": exit_code,
            "finishedAt": _now(),
            "reason": "Completed" if exit_code == 0 else "Error",
            **({"message": message} if message else {}),
        }

    def _report(self, run: RunningPod, running: bool, exit_code: int | None = None) -> None:
        state: dict[str, Any]
        if running:
            state = {"running": {"startedAt": _now()}}
            phase = "Running"
        else:
            assert exit_code is not None
            state = {"terminated": self._terminated(run, exit_code)}
            phase = "Succeeded" if exit_code == 0 else "Failed"
        ready = running and run.ready
        self._set_status(
            run.name,
            {
                "phase": phase,
                "podIP": run.ip,
                "podIPs": [{"ip": run.ip}],
                "hostIP": "127.0.0.1",
                "startTime": _now(),
                "conditions": [
                    {"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": _now()},
                    {
                        "type": "ContainersReady",
                        "status": "True" if ready else "False",
                        "lastTransitionTime": _now(),
                    },
                ],
                "containerStatuses": [
                    {
                        "name": run.container,
                        "ready": ready,
                        "restartCount": run.restarts,
                        "image": "local",
                        "imageID": "local",
                        "state": state,
                        **({"lastState": run.last_state} if run.last_state else {}),
                    }
                ],
            },
        )

    def _set_status(self, name: str, status: dict[str, Any]) -> None:
        try:
            self.core.patch_namespaced_pod_status(name, self.ns, {"status": status})
        except ApiException as exc:
            if exc.status != 404:
                raise

    def _kill(self, run: RunningPod) -> None:
        if run.proc is not None and run.proc.poll() is None:
            try:
                os.killpg(run.proc.pid, signal.SIGTERM)
                run.proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(run.proc.pid, signal.SIGKILL)

    def logs(self, pod_prefix: str, tail: int = 4000) -> str:
        return "\n".join(
            f"--- {r.name}\n{r.log_path.read_text(errors='replace')[-tail:]}"
            for r in self.pods.values()
            if r.name.startswith(pod_prefix) and r.log_path.exists()
        )


# Runs inside the Pod's mount namespace. Sources are opened first and mounted
# through /proc/self/fd, so a mount over /tmp cannot hide a source under /tmp.
_MOUNT_AND_EXEC = """
import ast, os, stat, subprocess, sys
plan, read_only_root = ast.literal_eval(sys.argv[1])
fds = [os.open(src, os.O_PATH) for src, _, _ in plan]
def mount(*args):
    subprocess.run(["mount", *args], check=True)
for fd, (_, target, ro) in zip(fds, plan):
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        os.makedirs(target, exist_ok=True)  # inside a fresh emptyDir, say
    else:  # a file (the termination message) is mounted onto a file
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.exists(target):
            open(target, "a").close()
    # --no-canonicalize: resolving the /proc link by path would find the new mount point.
    mount("--no-canonicalize", "--bind", f"/proc/{os.getpid()}/fd/{fd}", target)
    if ro:
        mount("-o", "remount,bind,ro", target)
for fd in fds:
    os.close(fd)
# Last: a bind mount made from a read-only mount would inherit its read-only flag.
if read_only_root:
    mount("-o", "remount,bind,ro", "/")
os.execvp(sys.argv[2], sys.argv[2:])
"""


def _image_paths() -> list[Path]:
    repo = Path(__file__).resolve().parents[2]
    venv = Path(sys.prefix).resolve()
    return [repo] if venv.is_relative_to(repo) else [repo, venv]


class _NotYet(Exception):
    """Something the Pod needs does not exist yet; try again on the next pass."""


def _expand(m: re.Match[str], env: dict[str, str]) -> str:
    return env.get(m.group(1), m.group(0))


def _quantity(q: str) -> float:
    q = str(q)
    if q.endswith("m"):
        return float(q[:-1]) / 1000
    return float(q)


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


if __name__ == "__main__":  # pragma: no cover - manual use: python -m tests.cluster.kubelet NAMESPACE
    from kubernetes import config

    logging.basicConfig(level=logging.INFO)
    config.load_kube_config()
    k = FakeKubelet(
        client.CoreV1Api(), sys.argv[1], Path("/tmp/fake-kubelet"), Path(sys.executable).parent
    ).start()
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        k.stop()
