"""Build the control plane's binaries from the Go modules, into a cache keyed by what they are built from.

Two small Go modules beside this file name what to build, with ``tool`` directives
and no Go code: ``kube/`` (kube-apiserver, kube-controller-manager, kube-scheduler,
kubectl, and the node's kubelet and kube-proxy, from ``k8s.io/kubernetes``) and ``etcd/``
(``go.etcd.io/etcd/server/v3``). The pod sandbox's ``pause`` program is C: ``pause.c``
from the same ``k8s.io/kubernetes`` module, compiled static with the system's gcc.

:func:`ensure_binaries` returns a :class:`Binaries` directory:

- the cache is ``$INTERCEPT_CLUSTER_CACHE``, else ``~/.cache/intercept-cluster``, and
  the directory in it is named by a hash of the three go.mod and go.sum files and of
  ``go version``: a change of any pin or of the toolchain builds anew, anything else
  reuses what is there (Go's own build cache makes a rebuild after a small change quick);
- a directory is used only when complete (it is filled under another name and renamed).

Raises :class:`BuildUnavailable` (Go or gcc missing) or :class:`BuildFailed` (with the
command and its last output lines). ``say`` receives one line per step.

:func:`pin_kubernetes` rewrites ``kube/go.mod`` for another Kubernetes release: the
``replace`` of every ``k8s.io/*`` staging module is generated from that release's own
go.mod, not typed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
MODULES = ("kube", "etcd")
# module directory -> the module it builds from
MAIN_MODULE = {"kube": "k8s.io/kubernetes", "etcd": "go.etcd.io/etcd/server/v3"}
# binary name -> (module directory, package)
PROGRAMS = {
    "kube-apiserver": ("kube", "k8s.io/kubernetes/cmd/kube-apiserver"),
    "kube-controller-manager": ("kube", "k8s.io/kubernetes/cmd/kube-controller-manager"),
    "kube-scheduler": ("kube", "k8s.io/kubernetes/cmd/kube-scheduler"),
    "kubectl": ("kube", "k8s.io/kubernetes/cmd/kubectl"),
    "kubelet": ("kube", "k8s.io/kubernetes/cmd/kubelet"),
    "kube-proxy": ("kube", "k8s.io/kubernetes/cmd/kube-proxy"),
    "etcd": ("etcd", "go.etcd.io/etcd/server/v3"),
}
PAUSE_SOURCE = "build/pause/linux/pause.c"  # in the k8s.io/kubernetes module: the pod sandbox's process
COMPLETE = ".complete"
HEARTBEAT = 60.0  # seconds between two "still building" lines

Say = Callable[[str], None]


class BuildUnavailable(Exception):
    """The binaries cannot be built here (no Go toolchain); the message says what is missing."""


class BuildFailed(Exception):
    """A build step failed; the message names the command and ends with its output."""


@dataclass(frozen=True)
class Binaries:
    """A complete directory of built programs (and ``pause``)."""

    dir: Path

    def __getitem__(self, program: str) -> Path:
        return self.dir / program


def cache_root(environ: dict[str, str] | os._Environ[str] = os.environ) -> Path:
    return Path(environ.get("INTERCEPT_CLUSTER_CACHE") or Path.home() / ".cache" / "intercept-cluster")


def go_missing() -> str | None:
    """Why the binaries cannot be built here, or None."""
    if shutil.which("go") is None:
        return "Go is not installed (no `go` on PATH): the real-cluster tests build kube-apiserver, etcd and the kubelet with it"
    if shutil.which("gcc") is None:
        return "gcc is not installed: the pod sandbox's pause.c is compiled with it (apt-get install gcc libc6-dev)"
    return None


def cache_key() -> str:
    """A hash of the pins (go.mod, go.sum of each module) and of the Go toolchain."""
    digest = hashlib.sha256()
    for module in MODULES:
        for name in ("go.mod", "go.sum"):
            digest.update(f"{module}/{name}\0".encode())
            digest.update((HERE / module / name).read_bytes())
    digest.update(_go("version").encode())
    digest.update(Path(__file__).read_bytes())  # how they are built (flags, assets) is part of what they are
    return digest.hexdigest()[:16]


def ensure_binaries(say: Say = lambda line: None, *, cache: Path | None = None) -> Binaries:
    """The binaries for the current pins: reused from the cache, else built now (minutes when cold)."""
    missing = go_missing()
    if missing:
        raise BuildUnavailable(missing)
    root = cache or cache_root()
    key = cache_key()
    target = root / key
    if (target / COMPLETE).is_file():
        say(f"binaries: reusing {target}")
        return Binaries(target)
    root.mkdir(parents=True, exist_ok=True)
    work = root / f".{key}.{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    started = time.monotonic()
    say(f"binaries: building into {target} (Go build cache: {_go('env', 'GOCACHE').strip()})")
    try:
        for module in MODULES:
            programs = [name for name, (m, _) in PROGRAMS.items() if m == module]
            version = _module_version(module)
            say(f"binaries: {', '.join(programs)} from {version}")
            for name in programs:
                step = time.monotonic()
                say(f"binaries: building {name} ...")
                _build(module, PROGRAMS[name][1], work / name, _version_flags(module, version), say)
                say(f"binaries: built {name} in {time.monotonic() - step:.0f}s")
        _build_pause(work / "pause", _module_version("kube"))
        (work / COMPLETE).write_text(json.dumps({"key": key, "seconds": round(time.monotonic() - started)}) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for old in root.iterdir():  # binaries of other pins: 400 MB each, and rebuilt quickly from Go's cache
        if old != target and not old.name.startswith(".") and (old / COMPLETE).is_file():
            shutil.rmtree(old, ignore_errors=True)
    say(f"binaries: ready in {time.monotonic() - started:.0f}s")
    return Binaries(target)


def _module_version(module: str) -> str:
    """``path@version`` of the module a Go module directory builds from."""
    return "@".join(_go_in(module, "list", "-m", "-f", "{{.Path}} {{.Version}}", MAIN_MODULE[module]).split())


def _version_flags(module: str, version: str) -> str:
    """The ``-X`` flags that stamp a Kubernetes binary with its release, as its own build does.

    Without them the API server reports ``v0.0.0-master`` to every client (``/version``).
    """
    if module != "kube":
        return ""
    release = version.rpartition("@")[2]
    major, minor = release.removeprefix("v").split(".")[:2]
    flags = []
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [f"-X {package}.gitVersion={release}", f"-X {package}.gitMajor={major}",
                  f"-X {package}.gitMinor={minor}", f"-X {package}.gitTreeState=clean"]
    return " " + " ".join(flags)


def _build(module: str, package: str, output: Path, ldflags: str, say: Say) -> None:
    """``go build`` one program, saying every :data:`HEARTBEAT` seconds that it still runs."""
    argv = ["go", "build", "-trimpath", f"-ldflags=-s -w{ldflags}", "-o", str(output), package]
    started = time.monotonic()
    with subprocess.Popen(argv, cwd=HERE / module, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as process:
        while True:
            try:
                out, _ = process.communicate(timeout=HEARTBEAT)
                break
            except subprocess.TimeoutExpired:
                say(f"binaries: still building {output.name} ({time.monotonic() - started:.0f}s; "
                    "a cold build of the Kubernetes binaries takes minutes)")
    if process.returncode != 0:
        tail = "\n".join(out.strip().splitlines()[-30:])
        raise BuildFailed(f"`{' '.join(argv)}` in {HERE / module} failed with exit code {process.returncode}:\n{tail}")


def _build_pause(output: Path, version: str) -> None:
    """``pause.c`` of the kubernetes module, static (the pause image holds nothing else)."""
    kubernetes = Path(_go_in("kube", "list", "-m", "-f", "{{.Dir}}", "k8s.io/kubernetes").strip())
    _run(["gcc", "-Os", "-static", f"-DVERSION={version.rpartition('@')[2]}", "-o", str(output),
          str(kubernetes / PAUSE_SOURCE)], HERE)
    _run(["strip", str(output)], HERE)


def _env() -> dict[str, str]:
    # The modules are built exactly as pinned: no workspace, go.sum must already hold every hash.
    return dict(os.environ, GOWORK="off", GOFLAGS="-mod=readonly", GOTOOLCHAIN="local")


def _go(*args: str) -> str:
    return _run(["go", *args], HERE)


def _go_in(module: str, *args: str) -> str:
    return _run(["go", *args], HERE / module)


def _run(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(argv, cwd=cwd, env=env or _env(), capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-30:])
        raise BuildFailed(f"`{' '.join(argv)}` in {cwd} failed with exit code {result.returncode}:\n{tail}")
    return result.stdout


# --------------------------------------------------------------------------- pins


def staging_replaces(kubernetes_go_mod: str, version: str) -> list[tuple[str, str]]:
    """``(module, module@v0.X.Y)`` for each ``k8s.io/*`` staging module the Kubernetes go.mod replaces locally.

    ``version`` is the Kubernetes release (``v1.37.2``); its staging modules are tagged
    ``v0.37.2``.
    """
    staging = "v0." + version.removeprefix("v").split(".", 1)[1]
    found = re.findall(r"^\s*(k8s\.io/[\w.-]+)\s+=>\s+\./staging/src/\1\s*$", kubernetes_go_mod, re.M)
    if not found:
        raise BuildFailed("the Kubernetes go.mod replaces no staging module: has its layout changed?")
    return [(module, staging) for module in found]


def pin_kubernetes(version: str, say: Say = lambda line: None) -> None:
    """Rewrite ``kube/go.mod`` (and go.sum) for Kubernetes ``version``, e.g. ``v1.37.2``."""
    info = json.loads(_run(["go", "mod", "download", "-json", f"k8s.io/kubernetes@{version}"], HERE,
                           env=dict(_env(), GOFLAGS="-mod=mod")))
    kubernetes_go_mod = Path(info["GoMod"]).read_text()
    replaces = staging_replaces(kubernetes_go_mod, version)
    say(f"pin: k8s.io/kubernetes {version}, {len(replaces)} staging modules replaced")
    go_version = re.search(r"^go (\S+)$", kubernetes_go_mod, re.M)[1]  # the language version it needs
    lines = ["module intercept.dev/e2e/cluster/kube", "", f"go {go_version}", "", "replace ("]
    lines += [f"\t{module} => {module} {tag}" for module, tag in replaces]
    lines += [")", ""]
    kube = HERE / "kube"
    (kube / "go.mod").write_text("\n".join(lines))
    (kube / "go.sum").unlink(missing_ok=True)
    tools = [f"{pkg}@{version}" for m, pkg in PROGRAMS.values() if m == "kube"]
    _run(["go", "get", "-tool", *tools], kube, env=dict(_env(), GOFLAGS="-mod=mod"))
    say(f"pin: wrote {kube / 'go.mod'}")
